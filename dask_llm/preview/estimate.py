"""Dry runs: what a job would cost and how long it would take, without a single request.

``ddf.llm.estimate(chains, rpm=..., tpm=...)`` plans the chains exactly as
``enrich`` does, renders each row's prompt, and counts:

* **calls**: one per distinct (chain, inputs) pair whose inputs are present,
  as ``enrich`` makes them (it skips rows with missing inputs and calls
  identical pairs once). A chain that reads another chain's output is keyed
  by its own column inputs and its upstream chain's key (deterministic
  upstream answers make equal inputs); a row whose upstream would be skipped
  is skipped too. Answers already in the cache's row memo are not counted,
  dependent chains included when their upstream answers are cached (for
  chains holding Python code, which have no row memo, the count is an upper
  bound: their requests are only known by running them).
* **input tokens**: the rendered prompt (plus the structured-output schema
  sent with it) through tiktoken's ``o200k_base`` encoding when it is
  available offline (tiktoken downloads encodings at first use, which a
  machine without network cannot; we check tiktoken's cache first and never
  trigger the download), else the stated heuristic of 4 characters a token.
  Outputs of upstream chains are stood in for by text of their expected length.
* **expected output tokens**: the model's ``max_tokens`` if set, else 24 per
  field of a structured output, else 150 for text.
* **cached input tokens**: what the provider's prompt cache can serve of
  each call's prompt, from the chain's fixed prefix (``preview.caching``):
  the cacheable part of it (1,024 tokens and more, in steps of 128) on every
  call of the chain but its first. Priced at the cached-input price; at most
  what caching gives (the provider's cache is best effort).
* **cost** from the price table (shown to 4 significant digits), each call
  at the price of the tier it would be sent by: Flex for a model that asks
  for it (``service_tier="flex"`` on ``estimate``, as on ``enrich``; the
  model's own field, or its ``.bind(service_tier=...)``), the Batch API's
  with ``batch=True``, else the list price, which is shown beside; and the
  **projected wall time** at the given ``rpm``/``tpm``/``output_tpm`` (each a
  number for every provider apart, or a mapping by provider name, as
  ``enrich`` takes them): for each provider, the largest of its calls / rpm,
  its tokens / tpm (OpenAI counts prompt and output against it; Anthropic the
  prompt alone) and, where it limits output apart (Anthropic), its expected
  output tokens / output_tpm; the job's is the largest over its providers
  (each is paced apart; a row waits for all its chains), and the estimate
  names the limit that binds (``bound_by``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from langchain_core.runnables import RunnableBinding

from dask_llm.cache import ResultCache, make_key, read_only
from dask_llm.chains.columns import is_missing
from dask_llm.chains.graph import find
from dask_llm.chains.plan import Plan, PlannedChain
from dask_llm.chains.prompt import schema_text
from dask_llm.core.config import UNPACED_MAX_CONCURRENCY, Told, told
from dask_llm.core.deadline import Deadline, TierPlan, plan_tiers, rate_of
from dask_llm.core.usage import PriceEntry, Tier, cost_usd, price_of, savings_usd
from dask_llm.preview.caching import cached_per_call
from dask_llm.preview.tokens import token_counter
from dask_llm.providers import provider_of, providers

_TEXT_OUTPUT_TOKENS = 150
_FIELD_OUTPUT_TOKENS = 24


@dataclass
class Estimate:
    """What ``enrich`` would do. ``cost_usd``/``wall_s`` are None when unknown."""

    rows: int
    calls: int
    calls_by_chain: dict[str, int]
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    wall_s: float | None
    tokenizer: str
    budget_usd: float | None = None
    #: Estimated for the Batch API (``cost_usd`` at batch prices, no wall time).
    batch: bool = False
    #: The cost online (Flex where asked) and through the Batch API (None where a model
    #: has no price).
    online_cost_usd: float | None = None
    batch_cost_usd: float | None = None
    #: Partitions of the frame: batch waits overlap only where they run at once.
    partitions: int = 1
    #: Input tokens (of ``input_tokens``) the prompt cache can serve, and what that saves
    #: against paying them as input (``preview.caching``: at most).
    cached_tokens: int = 0
    caching_saved_usd: float | None = None
    #: Calls sent by Flex processing; the cost of every call online at list price.
    flex_calls: int = 0
    list_price_cost_usd: float | None = None
    #: With ``deadline=``: the plan across the tiers (``core.deadline``), and ``cost_usd`` is
    #: its cost (the Flex price taken as the Batch API's, as in ``PRICES``).
    deadline_plan: TierPlan | None = None
    #: The limit ``wall_s`` is projected at: "anthropic's output_tpm=18,000" (None: no wall
    #: time).
    bound_by: str | None = None

    def __str__(self) -> str:
        cost = "unknown" if self.cost_usd is None else f"${significant(self.cost_usd)}"
        if self.batch and self.online_cost_usd is not None:
            cost += f" with the Batch API (online: ${significant(self.online_cost_usd)})"
        elif self.flex_calls and self.list_price_cost_usd is not None:
            some = "" if self.flex_calls == self.calls else f" for {self.flex_calls:,} calls"
            cost += f" with Flex{some} (list price: ${significant(self.list_price_cost_usd)})"
        if self.cached_tokens and self.caching_saved_usd:
            cost += f", ${significant(self.caching_saved_usd)} less for the prompt cache"
        if self.deadline_plan is not None:
            cost += f"; {self.deadline_plan.describe()}"
        if self.batch:
            wall = "within the batch window per round (one per dependent chain level)"
            if self.partitions > 1:
                wall += f", all {self.partitions:,} partitions waiting at once"
        elif self.wall_s is None:
            wall = "unknown (give rpm= or tpm=)"
        else:
            wall = f"{self.wall_s / 60:,.1f} min"
            if self.bound_by is not None:
                wall += f" (bound by {self.bound_by})"
        if not self.batch and self.batch_cost_usd is not None and self.cost_usd:
            wall += f"; Batch API: ~${significant(self.batch_cost_usd)}"
        return (
            f"{self.rows:,} rows -> {self.calls:,} calls "
            f"({', '.join(f'{k}: {v:,}' for k, v in self.calls_by_chain.items())}); "
            f"~{self.input_tokens:,} input{self._cached()} + ~{self.output_tokens:,} output tokens "
            f"({self.tokenizer}); cost ~{cost}; wall time ~{wall}"
        ) + self._over_budget()

    def _cached(self) -> str:
        if not self.cached_tokens:
            return ""
        return f" (~{self.cached_tokens:,} from the prompt cache)"

    def _over_budget(self) -> str:
        if self.budget_usd is None or self.cost_usd is None or self.cost_usd <= self.budget_usd:
            return ""
        return (
            f"; this exceeds the budget of ${significant(self.budget_usd)}: the job would stop "
            "there (rerun with a larger budget to go on)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_of(pc: PlannedChain) -> Any:
    models = find(pc.chain.runnable, lambda x: provider_of(x) is not None)
    return models[0] if models else None


def _model_name(model: Any) -> str | None:
    provider = provider_of(model) if model is not None else None
    return provider.model_name(model) if provider is not None else None


def _provider_name(model: Any) -> str:
    """The name of the provider ``model`` sends to ("" for a model of no known provider)."""
    provider = provider_of(model) if model is not None else None
    return provider.name if provider is not None else ""


def _render(pc: PlannedChain, inputs: dict[str, Any]) -> str:
    runnable = pc.chain.runnable
    first = getattr(runnable, "first", runnable)
    fmt = getattr(first, "format_prompt", None)
    if fmt is not None:
        try:
            return str(fmt(**inputs).to_string())
        except (KeyError, TypeError, ValueError):  # a template it cannot render alone
            pass
    return " ".join(str(v) for v in inputs.values())


def expected_output_tokens(pc: PlannedChain, model: Any) -> int:
    max_tokens = getattr(model, "max_tokens", None) if model is not None else None
    if max_tokens:
        return int(max_tokens)
    if pc.outputs.scalar:
        return _TEXT_OUTPUT_TOKENS
    return _FIELD_OUTPUT_TOKENS * len(pc.outputs.fields)


def partition_counts(
    df: pd.DataFrame,
    plan: Plan,
    cache: ResultCache | None,
    partition_info: dict[str, Any] | None = None,
    *,
    service_tier: str | None = None,
) -> pd.DataFrame:
    """One row per (row, chain) that would be called: its dedup key, token counts (of its
    input tokens, ``cached_tokens`` a prompt cache can serve: ``preview.caching``), model
    and the tier it would be sent by (``service_tier``: every model's, as ``enrich``'s).

    Chains are taken in dependency order, as the engine's memo pass does: a
    chain whose answer is in the cache's row memo costs nothing, and its cached
    answer is the real input of the chains that read it (so they are looked up
    too); where an upstream answer is not known, a stand-in of its expected
    length is rendered and the call is keyed by the upstream call's key.
    """
    count, _ = token_counter()
    part = int((partition_info or {}).get("number", 0))
    n = len(df)
    columns = {c: df[c].tolist() for pc in plan.chains for c, p in pc.sources.values() if p is None}
    records: list[tuple[str, str, int, int, int, Any, str, str]] = []
    call_keys: dict[str, list[str | None]] = {}  # None: skipped for that row
    known: dict[str, list[Any]] = {}  # cached outputs (dicts of fields, or the value)
    for pc in plan.chains:
        model = _model_of(pc)
        out_tokens = expected_output_tokens(pc, model)
        schema_tokens = count(schema_text(pc.chain.runnable))
        cached = cached_per_call(pc, count)
        tier = tier_of(pc, model, service_tier)
        memo, legacy = pc.chain.memo_fingerprint, pc.chain.legacy_fingerprint
        keys: list[str | None] = [None] * n
        values: list[Any] = [MISSING] * n
        full: list[dict[str, Any] | None] = [None] * n
        own_inputs: list[dict[str, Any] | None] = [None] * n
        for i in range(n):
            if any(call_keys[d][i] is None for d in pc.deps):
                continue
            own = {v: columns[c][i] for v, (c, p) in pc.sources.items() if p is None}
            if any(is_missing(x) for x in own.values()):
                continue
            own_inputs[i] = own
            inputs: dict[str, Any] | None = dict(own)
            for v, (c, p) in pc.sources.items():
                if p is not None and inputs is not None:
                    upstream = known[p][i]
                    if upstream is MISSING:
                        inputs = None
                    else:
                        inputs[v] = _field(upstream, plan, p, c)
            full[i] = inputs
            try:
                if inputs is not None:
                    keys[i] = make_key(pc.chain.fingerprint, inputs)
                else:
                    upstream_keys = [call_keys[d][i] for d in pc.deps]
                    keys[i] = make_key(pc.chain.fingerprint, {**own, "__upstream__": upstream_keys})
            except TypeError:
                keys[i] = f"row-{part}-{i}-{pc.name}"
            if cache is None and keys[i] is not None:
                # No cache (cache=False): a repeat is answered within its partition
                # only; another partition (maybe another process) calls it again.
                keys[i] = f"{part}:{keys[i]}"
        if cache is not None and memo is not None:
            rows = [i for i in range(n) if full[i] is not None]
            values = _lookup(cache, memo, legacy, rows, full, values)
        call_keys[pc.name] = keys
        known[pc.name] = values
        stand_in = "lorem " * out_tokens
        for i in range(n):
            given = own_inputs[i]
            key = keys[i]
            if key is None or values[i] is not MISSING or given is None:
                continue
            rendered = full[i] or {
                **given,
                **{v: stand_in for v, (_, p) in pc.sources.items() if p is not None},
            }
            tokens = count(_render(pc, rendered)) + schema_tokens + 7
            records.append(
                (
                    pc.name,
                    key,
                    tokens,
                    min(cached, tokens),
                    out_tokens,
                    _model_name(model),
                    tier,
                    _provider_name(model),
                )
            )
    return pd.DataFrame(records, columns=list(_COUNTS)).astype(_COUNTS)


_COUNTS: dict[str, Any] = {
    "chain": object,
    "key": object,
    "input_tokens": "int64",
    "cached_tokens": "int64",
    "output_tokens": "int64",
    "model": object,
    "tier": object,
    "provider": object,
}


def tier_of(pc: PlannedChain, model: Any, service_tier: str | None) -> Tier:
    """The tier ``pc``'s requests are sent by: ``service_tier`` when given (``enrich``
    sets it on every model), else the chain's ``.bind(service_tier=...)``, else the
    model's own ``service_tier``. Only Flex has a price of its own online."""
    asked = service_tier
    if asked is None:
        bound = find(
            pc.chain.runnable,
            lambda x: isinstance(x, RunnableBinding) and "service_tier" in x.kwargs,
        )
        asked = bound[0].kwargs["service_tier"] if bound else getattr(model, "service_tier", None)
    return "flex" if asked == "flex" else "default"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _field(value: Any, plan: Plan, producer: str, column: str) -> Any:
    """The value of ``column`` in the cached output of chain ``producer``."""
    pc = next(c for c in plan.chains if c.name == producer)
    if pc.outputs.scalar:
        return value
    field = next(f for f, col in pc.outputs.fields.items() if col == column)
    return value.get(field) if isinstance(value, dict) else None


def _lookup(
    cache: ResultCache,
    memo: str,
    legacy: str | None,
    rows: list[int],
    full: list[dict[str, Any] | None],
    values: list[Any],
) -> list[Any]:
    keys: dict[int, str] = {}
    for i in rows:
        inputs = full[i]
        assert inputs is not None
        try:
            keys[i] = make_key(memo, inputs)
        except TypeError:
            continue
    found = cache.get_many(list(keys.values()))
    if legacy is not None:
        old = {}
        for i, key in keys.items():
            if key not in found:
                inputs = full[i]
                assert inputs is not None
                old[make_key(legacy, inputs)] = key
        for old_key, value in cache.get_many(list(old)).items():
            found[old[old_key]] = value
    values = list(values)
    for i, key in keys.items():
        if key in found:
            values[i] = found[key]
    return values


def run_estimate(
    frame: Any,
    plan: Plan,
    cache: ResultCache | None,
    *,
    rpm: Told,
    tpm: Told,
    output_tpm: Told = None,
    prices: Mapping[str, PriceEntry],
    budget_usd: float | None = None,
    batch: bool = False,
    service_tier: str | None = None,
    deadline: Deadline | None = None,
) -> Estimate:
    """``estimate()``'s work: counts per partition (read-only cache), then the summary."""
    import dask
    import dask.dataframe as dd

    store = read_only(cache)
    try:
        if isinstance(frame, dd.DataFrame):
            meta = partition_counts(frame._meta, plan, None, service_tier=service_tier)
            counts_lazy = frame.map_partitions(
                partition_counts, plan, store, service_tier=service_tier, meta=meta
            )
            counts, rows = dask.compute(counts_lazy, frame.map_partitions(len).sum())
        else:
            counts = partition_counts(frame, plan, store, service_tier=service_tier)
            rows = len(frame)
    finally:
        if store is not None:
            store.close()
    estimate = summarize(
        counts,
        rows=int(rows),
        plan=plan,
        rpm=rpm,
        tpm=tpm,
        output_tpm=output_tpm,
        prices=prices,
        batch=batch,
    )
    estimate.budget_usd = budget_usd
    estimate.partitions = int(getattr(frame, "npartitions", 1))
    if deadline is not None:
        tiers = plan_tiers(
            deadline,
            now=time.time(),
            requests=estimate.calls,
            rounds=plan.rounds,
            rate_per_s=rate_of(
                deadline,
                # By provider: the slowest (a row waits for all its chains), as enrich's.
                rpm=min(rpm.values()) if isinstance(rpm, Mapping) else rpm,
                max_concurrency=UNPACED_MAX_CONCURRENCY,
            ),
        )
        estimate.deadline_plan = tiers
        online, cheap = estimate.cost_usd, estimate.batch_cost_usd
        if online is not None and cheap is not None:
            share = 1.0 if tiers.batch_s is not None else tiers.flex_share
            estimate.cost_usd = share * cheap + (1.0 - share) * online
    return estimate


def significant(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, without an exponent: 0.004612, 12.35, 1,234."""
    if value == 0:
        return "0.00"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def summarize(
    counts: pd.DataFrame,
    *,
    rows: int,
    plan: Plan,
    rpm: Told,
    tpm: Told,
    output_tpm: Told = None,
    prices: Mapping[str, PriceEntry] | None,
    batch: bool = False,
) -> Estimate:
    unique = counts.drop_duplicates(subset=["chain", "key"]).reset_index(drop=True)
    # The first call of each chain writes its prefix to the prompt cache; the rest read it.
    unique.loc[~unique["chain"].duplicated(), "cached_tokens"] = 0
    by_chain = unique.groupby("chain").size().to_dict()
    input_tokens = int(unique["input_tokens"].sum())
    output_tokens = int(unique["output_tokens"].sum())
    cost, saved = _cost(unique, prices, tier=None)
    batch_cost, batch_saved = _cost(unique, prices, tier="batch")
    list_cost, _ = _cost(unique, prices, tier="default")
    calls = len(unique)
    wall = _wall(unique, rpm=rpm, tpm=tpm, output_tpm=output_tpm)
    _, tokenizer = token_counter()
    return Estimate(
        rows=rows,
        calls=calls,
        calls_by_chain={pc.name: int(by_chain.get(pc.name, 0)) for pc in plan.chains},
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=batch_cost if batch else cost,
        wall_s=None if batch or wall is None else wall[0],
        tokenizer=tokenizer,
        batch=batch,
        online_cost_usd=cost,
        batch_cost_usd=batch_cost,
        cached_tokens=int(unique["cached_tokens"].sum()),
        caching_saved_usd=batch_saved if batch else saved,
        flex_calls=0 if batch else int((unique["tier"] == "flex").sum()),
        list_price_cost_usd=list_cost,
        bound_by=None if batch or wall is None else wall[1],
    )


def _wall(
    unique: pd.DataFrame, *, rpm: Told, tpm: Told, output_tpm: Told
) -> tuple[float, str] | None:
    """(seconds, the limit that binds) of the calls ``unique`` at the limits told, each
    provider's calls at its own (``told``), paced apart; None: no limit told for any."""
    apart = {p.name for p in providers() if p.output_limit}
    waits: list[tuple[float, str]] = []
    for name, group in unique.groupby("provider", dropna=False):
        provider = str(name)
        whose = f"{provider}'s " if provider else ""
        output = float(group["output_tokens"].sum())
        tokens = float(group["input_tokens"].sum()) + (0.0 if provider in apart else output)
        limits = [
            ("rpm", told(rpm, provider), float(len(group))),
            ("tpm", told(tpm, provider), tokens),
        ]
        if provider in apart:
            limits.append(("output_tpm", told(output_tpm, provider), output))
        for option, limit, amount in limits:
            if limit:
                waits.append((amount / (limit / 60.0), f"{whose}{option}={limit:,.0f}"))
    return max(waits, key=lambda wait: wait[0]) if waits else None


def _cost(
    unique: pd.DataFrame, prices: Mapping[str, PriceEntry] | None, *, tier: Tier | None
) -> tuple[float | None, float | None]:
    """(cost, what the prompt cache saved) in US dollars, each call at ``tier`` (None: the
    tier it would be sent by); (None, None) when a model has no price."""
    cost = saved = 0.0
    for (model, asked), group in unique.groupby(["model", "tier"], dropna=False):
        price = price_of(model if isinstance(model, str) else None, prices, tier=tier or asked)
        if price is None:
            return None, None
        cached = int(group["cached_tokens"].sum())
        cost += cost_usd(price, group["input_tokens"].sum(), group["output_tokens"].sum(), cached)
        saved += savings_usd(price, cached)
    return float(cost), float(saved)
