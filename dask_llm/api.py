"""``df.llm``: the accessor on Dask and pandas DataFrames, and ``enrich`` itself.

The accessors only store the frame (Dask's ``__getattr__`` would swallow an
``AttributeError`` raised while building one into a confusing "no attribute
'llm'"); everything is validated in ``enrich``, before any request.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict, Unpack, overload

import dask
import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor as register_dask_accessor
from langchain_core.language_models import BaseChatModel

from dask_llm.cache import ResultCache, check_cache, open_cache
from dask_llm.chains.chain import Chain
from dask_llm.chains.graph import find
from dask_llm.chains.outputs import is_configurable_model, string_dtype
from dask_llm.chains.plan import Plan, make_plan
from dask_llm.chains.shipping import explicit_keys
from dask_llm.cluster.handle import JobHandle
from dask_llm.cluster.plugin import register
from dask_llm.core import where as _cluster
from dask_llm.core.config import (
    DEFAULT_BATCH,
    DEFAULT_ERROR_COLUMN,
    DEFAULT_ERRORS,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_RETRY,
    DEFAULT_SYNC_THREADS,
    SERVICE_TIERS,
    BatchPolicy,
    EnrichOptions,
    Errors,
    QualityGate,
    RetryPolicy,
    ServiceTier,
    Told,
    told_names,
)
from dask_llm.core.deadline import Deadline
from dask_llm.core.errors import PromptCacheWarning
from dask_llm.core.usage import USAGE_COLUMNS, PriceEntry, as_price, check_prices, price_of
from dask_llm.engine import handoff
from dask_llm.engine.runner import enrich_partition
from dask_llm.observe import progress as _progress
from dask_llm.observe.progress import RunSummary
from dask_llm.preview.caching import out_of_order
from dask_llm.preview.estimate import Estimate, run_estimate
from dask_llm.preview.pilot import Pilot, run_pilot
from dask_llm.providers import Provider, is_routable, provider_of
from dask_llm.providers.registry import NAMES

ChainsArg = Chain | Sequence[Any] | Mapping[str, Any] | Any
CacheArg = bool | str | os.PathLike[str] | ResultCache | None
DeadlineArg = float | datetime.timedelta | datetime.datetime | Deadline | None

_UNSET: Any = object()


class EnrichKwargs(TypedDict, total=False):
    """The keyword options of ``enrich`` (see its docstring), for typed accessors."""

    max_concurrency: int | None
    rpm: Told
    tpm: Told
    output_tpm: Told
    budget_usd: float | None
    errors: Errors
    request_timeout: float | None
    retry: RetryPolicy | int
    sync_threads: int
    error_column: str
    usage: bool | Sequence[str]
    prices: Mapping[str, PriceEntry] | None
    cache: CacheArg
    progress: bool | None
    ship_api_keys: bool
    batch: bool | BatchPolicy
    quality_gate: QualityGate | None
    service_tier: ServiceTier | None
    compiled: bool
    deadline: DeadlineArg


class EstimateKwargs(TypedDict, total=False):
    """The keyword options of ``estimate``."""

    rpm: Told
    tpm: Told
    output_tpm: Told
    budget_usd: float | None
    cache: CacheArg
    prices: Mapping[str, PriceEntry] | None
    batch: bool
    service_tier: ServiceTier | None
    deadline: DeadlineArg


# Where pandas and dask are typed (pandas-stubs), a checker resolves the frame's
# kind; without stubs both are Any and the options are still checked.
@overload
def enrich(
    frame: dd.DataFrame, chains: ChainsArg, **options: Unpack[EnrichKwargs]
) -> dd.DataFrame: ...
@overload
def enrich(
    frame: pd.DataFrame, chains: ChainsArg, **options: Unpack[EnrichKwargs]
) -> pd.DataFrame: ...
def enrich(
    frame: dd.DataFrame | pd.DataFrame,
    chains: ChainsArg,
    *,
    max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY,
    rpm: Told = None,
    tpm: Told = None,
    output_tpm: Told = None,
    budget_usd: float | None = None,
    errors: Errors = DEFAULT_ERRORS,
    request_timeout: float | None = None,
    retry: RetryPolicy | int = DEFAULT_RETRY,
    sync_threads: int = DEFAULT_SYNC_THREADS,
    error_column: str = DEFAULT_ERROR_COLUMN,
    usage: bool | Sequence[str] = True,
    prices: Mapping[str, PriceEntry] | None = None,
    cache: CacheArg = True,
    progress: bool | None = None,
    ship_api_keys: bool = False,
    batch: bool | BatchPolicy = False,
    quality_gate: QualityGate | None = None,
    service_tier: ServiceTier | None = None,
    compiled: bool = True,
    deadline: DeadlineArg = None,
    timeout: Any = _UNSET,
    attempts: Any = _UNSET,
    retry_timeout: Any = _UNSET,
) -> dd.DataFrame | pd.DataFrame:
    """Add the outputs of ``chains`` to every row of ``frame``.

    Args:
        frame: a Dask or pandas DataFrame. A Dask frame gives a lazy Dask frame
            (nothing is called until it is computed); a pandas frame is enriched now.
        chains: a ``Chain``, a list of them, or ``{name: runnable}``.
        max_concurrency: hard cap on HTTP requests in flight per process (shared by the
            partitions running in it). Default (None): automatic. With a known rate
            (``rpm``/``tpm`` told, or learned from the provider's headers), the process
            keeps what its share of the rate needs on the wire: share x observed latency,
            with headroom (a 30,000 rpm tier at 2 s per call needs 1,000 in flight).
            Without one, at most 256, adapting on its own below that: it grows while
            responses are clean and halves on a 429. See docs/rate-limits.md.
        rpm: requests per minute for the whole job, across all processes and workers.
            Default: what the provider announces in its ``x-ratelimit-*`` headers. A
            job whose chains call two providers paces each to its own limit: a number
            holds for each provider's requests apart; a mapping by provider name
            (``rpm={"openai": 30_000, "anthropic": 50}``) tells each its own, and a
            provider it does not name is paced to what its headers announce.
        tpm: tokens per minute for the whole job, likewise (Anthropic: input tokens).
        output_tpm: output tokens per minute, for a provider that limits them apart
            (Anthropic; OpenAI has no such limit), likewise. Default: what its
            ``anthropic-ratelimit-output-tokens-limit`` header announces.
        budget_usd: a hard cap on the job's spend, in US dollars, across all processes.
            Each request reserves its worst-case cost before it is sent and settles on
            the reported usage; at the cap no request starts, and rows not done get
            ``llm_error`` "budget reached ..." (``errors="raise"``: ``BudgetExceeded``).
            Every model needs a price (``prices=``): checked here. See
            docs/rate-limits.md for the bound on how far spend can pass the cap.
        errors: ``"column"`` records a row's failure in ``error_column`` and goes on;
            ``"raise"`` stops the job and raises ``ChainError`` naming the row's index.
        request_timeout: seconds one HTTP request may take before it is abandoned (and
            retried). Default: the model's own ``timeout=`` if it sets one, else 60
            (900 for Flex requests, as OpenAI advises).
        retry: a ``RetryPolicy`` (attempts, total time, backoff, parse attempts), or a
            number of attempts.
        sync_threads: threads per partition for chains with only a sync implementation.
        error_column: name of the column that explains failed rows (null where all
            chains succeeded).
        usage: add per-row ``llm_input_tokens``, ``llm_output_tokens`` and ``llm_cost_usd``
            (totals over the row's chains and attempts, null where the provider reported
            no usage or the model has no price); three names rename them; False leaves
            them out.
        prices: ``{model: price}`` US dollars per million tokens, over the built-in
            table (``dask_llm.PRICES``). A price is ``(input, output)``, ``(input,
            output, batch_input, batch_output)``, a ``dask_llm.Price`` or a mapping of
            its fields (``{"input": 0.15, "cached_input": 0.075, "output": 0.6}``; also
            ``batch_input``, ``batch_output``, ``flex_input``, ``flex_output``). Unset:
            cached input at the input price, the Batch API at ``BATCH_DISCOUNT`` of the
            online price, Flex at the Batch API's. Models in neither get a null cost.
        cache: where paid answers are kept, so a rerun (after a crash, or with more
            rows) pays only for calls it has not made yet: ``True`` (default) for
            ``$DASK_LLM_CACHE`` or ``./.dask-llm-cache/results.sqlite``, a path, a
            ``ResultCache`` object, or ``False``. Checked here: an unusable location
            is a ``ValueError`` now, not after the first paid call.
        progress: show a progress bar (rows, calls/s, retries, 429s, tokens, cost, ETA);
            default: when a person is probably watching (a terminal or a notebook). After
            the run, ``dask_llm.last_run()`` holds its summary either way.
        ship_api_keys: send models' explicit ``api_key=`` to worker processes, which
            otherwise read ``OPENAI_API_KEY`` from their own environment. Only to workers
            on this machine (dask's process pool, a ``LocalCluster``): a cluster with a
            worker elsewhere is a ``ValueError``. Keys never appear in logs or reprs.
        batch: send the requests through OpenAI's Batch API (half the price, answers
            within the batch window) instead of online: ``True``, or a ``BatchPolicy``
            (polling, fallback to online calls, a deadline). Outputs, ``llm_error``,
            usage and cost columns are as online; each dependent chain is a later
            round. Needs a cache to re-attach to batches after a crash. See
            docs/batch.md.
        quality_gate: a ``QualityGate``: stop the job early, keeping what is paid, when
            the rate of errors, truncated answers, refusals or parse failures crosses its
            threshold (judged once ``min_rows`` rows have finished; rows not done get
            ``llm_error`` naming the rate). See ``pilot`` to measure the rates first.
        service_tier: ``"flex"`` sends every OpenAI model's requests by Flex processing
            (billed at Batch API prices, answers in seconds to minutes; its 429
            "resource unavailable" answers are retried with backoff and do not slow the
            pacing); ``"default"`` sends them at list price; None (default): each model
            keeps its own ``service_tier=``. Not with ``batch=``. See docs/cost.md.
        deadline: finish by then at the least cost (seconds from now, a ``timedelta``,
            an aware ``datetime``, or a ``dask_llm.Deadline`` saying what to assume of
            each tier): the Batch API when there is room for it, cancelled at a cut-off
            that leaves time for the rest online; online by Flex while its answers come
            back in time; list price for what cannot wait for Flex. Not with ``batch=``
            or ``service_tier=``. See docs/cost.md.
        compiled: call ``prompt | ChatOpenAI`` chains (bound, with structured output,
            with LangChain's parsers) without LangChain's runtime per call, once their
            first calls on each partition are proven to send the same bytes and read
            the same values (default True; ``DASK_LLM_COMPILED=0`` in the environment
            turns it off too). Other chains take LangChain's path. See docs/compiled.md.
        timeout, attempts, retry_timeout: deprecated names of ``request_timeout`` and of
            ``retry=RetryPolicy(attempts=..., timeout=...)``; they warn and still work.

    Returns:
        The frame's columns, then each chain's output columns, the usage columns, then
        ``error_column``.

    Raises:
        ValueError: an input that resolves to no column, clashing output columns,
            a dependency cycle, a bad option, an unusable cache; ``budget_usd``,
            ``rpm``, ``tpm`` or ``batch`` for a chain whose chat model sends its own
            requests (not ChatOpenAI, or with its own ``http_async_client``), which
            also gets a ``UserWarning`` that its answers are not cached.

    Warns:
        PromptCacheWarning: a chain's prompt puts a row's values before a fixed block of
            1,024 tokens or more, which no prompt cache can reuse in that order.
        TypeError: something that is not a chain.
    """
    if not isinstance(frame, dd.DataFrame | pd.DataFrame):
        raise TypeError(f"enrich() takes a Dask or pandas DataFrame, not {type(frame).__name__}")
    request_timeout, retry = _deprecated(request_timeout, retry, timeout, attempts, retry_timeout)
    job = _configure(
        frame,
        chains,
        max_concurrency=max_concurrency,
        rpm=rpm,
        tpm=tpm,
        output_tpm=output_tpm,
        budget_usd=budget_usd,
        errors=errors,
        request_timeout=request_timeout,
        retry=retry,
        sync_threads=sync_threads,
        error_column=error_column,
        usage=usage,
        prices=prices,
        cache=cache,
        progress=progress,
        ship_api_keys=ship_api_keys,
        batch=batch,
        quality_gate=quality_gate,
        service_tier=service_tier,
        compiled=compiled,
        deadline=deadline,
    )
    if isinstance(frame, dd.DataFrame):
        client = _cluster.distributed_client()
        if client is not None:
            _progress.listen_on_client(client)
            register(client)
        if job.options.batch is not None and client is None:
            return _batch_graph(frame, job)
        return _on_partitions(frame, enrich_partition, job=job, meta=job.plan.meta(frame._meta))
    return _enrich_now(frame, job)[0]


def _batch_graph(frame: dd.DataFrame, job: _Configured) -> dd.DataFrame:
    """A batch job's graph for dask's local schedulers (``engine.handoff``): each partition
    handed to a thread of its own, a barrier, then each partition's frame collected, so
    that every partition's batch windows overlap whatever the scheduler's threads."""
    tickets = _on_partitions(frame, handoff.begin, job=job, meta=handoff.TICKET_META)
    begun = dask.delayed(handoff.all_begun, pure=True)(tickets)
    return _on_partitions(
        frame, handoff.end, tickets, begun, job=job, meta=job.plan.meta(frame._meta)
    )


def _on_partitions(
    frame: dd.DataFrame, func: Callable[..., Any], *args: Any, job: _Configured, meta: Any
) -> dd.DataFrame:
    """``func(partition, *args, plan, options, handle)`` on each partition of ``frame``
    (``args`` mapped as ``map_partitions`` maps them), with the ``meta`` given: dask's
    inference would run ``func``, and so the LLM, on a fake partition."""
    return frame.map_partitions(
        func,
        *args,
        job.plan,
        job.options,
        job.handle,
        meta=meta,
        enforce_metadata=False,
        align_dataframes=False,
    )


class _Configured(NamedTuple):
    plan: Plan
    options: EnrichOptions
    handle: JobHandle


def _configure(
    frame: dd.DataFrame | pd.DataFrame,
    chains: ChainsArg,
    *,
    max_concurrency: int | None,
    rpm: Told,
    tpm: Told,
    output_tpm: Told,
    budget_usd: float | None,
    errors: Errors,
    request_timeout: float | None,
    retry: RetryPolicy,
    sync_threads: int,
    error_column: str,
    usage: bool | Sequence[str],
    prices: Mapping[str, PriceEntry] | None,
    cache: CacheArg,
    progress: bool | None,
    ship_api_keys: bool,
    batch: bool | BatchPolicy,
    quality_gate: QualityGate | None,
    service_tier: ServiceTier | None,
    compiled: bool = True,
    deadline: DeadlineArg = None,
) -> _Configured:
    """The plan, options and handle of one job: everything checked before anything is
    opened or sent."""
    is_dask = isinstance(frame, dd.DataFrame)
    plan = make_plan(
        chains,
        list(frame.columns),
        text_dtype=_dask_text_dtype() if is_dask else string_dtype(),
        error_column=error_column,
        usage_columns=_usage_columns(usage),
    )
    check_prices(prices)
    _check_prompt_order(plan)
    store = open_cache(cache, default_path=default_cache_path())
    options = EnrichOptions(
        job=uuid.uuid4().hex,
        max_concurrency=max_concurrency,
        rpm=rpm,
        tpm=tpm,
        output_tpm=output_tpm,
        budget_usd=budget_usd,
        processes=_cluster.worker_processes(),
        errors=errors,
        request_timeout=request_timeout,
        retry=retry,
        sync_threads=sync_threads,
        prices=tuple(sorted((m, as_price(p)) for m, p in (prices or {}).items())),
        cache=store,
        partitions=frame.npartitions if is_dask else 1,
        total_rows=None if is_dask else len(frame),
        progress=_progress.interactive() if progress is None else bool(progress),
        batch=_batch_policy(batch),
        quality_gate=quality_gate,
        service_tier=service_tier,
        compiled=bool(compiled),
        deadline=None if deadline is None else Deadline.of(deadline),
    )
    _check_unseen_models(plan, options)
    _check_told(plan, options.rpm, options.tpm, options.output_tpm)
    handle = JobHandle(job=options.job, keys=_keys_to_ship(plan, ship_api_keys))
    if budget_usd is not None:
        _check_prices(plan, options)
    if store is not None:
        check_cache(store, cache)
    return _Configured(plan, options, handle)


def _configure_like_enrich(
    frame: pd.DataFrame, chains: ChainsArg, options: Mapping[str, Any]
) -> _Configured:
    """``_configure`` for ``options`` as ``enrich`` would take them (its defaults, its
    checks and deprecations: read from its one signature)."""
    bound = inspect.signature(enrich).bind(frame, chains, **options)
    bound.apply_defaults()
    args = dict(bound.arguments)
    request_timeout, retry = _deprecated(
        args.pop("request_timeout"),
        args.pop("retry"),
        args.pop("timeout"),
        args.pop("attempts"),
        args.pop("retry_timeout"),
    )
    return _configure(
        args.pop("frame"), args.pop("chains"), request_timeout=request_timeout, retry=retry, **args
    )


def _enrich_now(df: pd.DataFrame, job: _Configured) -> tuple[pd.DataFrame, RunSummary]:
    """Enrich a pandas frame in this thread; the frame and the run's summary."""
    out = enrich_partition(df, job.plan, job.options, job.handle)
    summary = _progress.summary_of(job.options.job)
    if summary is None:  # every run here ends with a summary
        raise RuntimeError(f"job {job.options.job}: its run left no summary")
    return out, summary


def _providers_of(plan: Plan) -> set[str] | None:
    """The names of the providers the plan's chains call; None when a chain's cannot be
    told before it runs (a factory's model, ``init_chat_model``'s configurable one)."""
    names: set[str] = set()
    for pc in plan.chains:
        if pc.chain.is_factory:
            return None
        for model in find(pc.chain.runnable, lambda x: isinstance(x, BaseChatModel)):
            if is_configurable_model(model):
                return None
            provider = provider_of(model)
            if provider is not None:
                names.add(provider.name)
    return names


def _check_told(plan: Plan, *limits: Told) -> None:
    """Refuse a limit told by provider that names an unknown provider, or one that no chain
    of the job calls (its limit would pace nothing: most likely a model meant for it that
    goes another way, say a ``ChatOpenAI`` at an Anthropic-compatible gateway, whose
    requests would then run unpaced)."""
    named = told_names(*limits)
    if not named:
        return
    unknown = sorted(named - set(NAMES))
    if unknown:
        raise ValueError(
            f"a limit told by provider names {unknown[0]!r}, which is no provider dask-llm "
            f"knows: use one of {', '.join(repr(n) for n in NAMES)}"
        )
    used = _providers_of(plan)
    if used is None:
        return
    unused = sorted(named - used)
    if unused:
        calls = ", ".join(repr(n) for n in sorted(used)) or "none"
        raise ValueError(
            f"a limit told by provider names {unused[0]!r}, but no chain of this job calls "
            f"it (they call: {calls}): drop it, or name the provider each chain's model "
            "goes to (a ChatOpenAI at another provider's OpenAI-compatible endpoint is "
            "'openai')"
        )


def _check_unseen_models(plan: Plan, options: EnrichOptions) -> None:
    """Refuse, or say, what cannot hold for a chat model whose requests dask-llm does not see.

    The budget, pacing, the Batch API and the cache act on the requests of the job's
    transport: those of the known providers' models (``providers``: ChatOpenAI,
    ChatAnthropic, and ``init_chat_model``'s configurable ones) on clients dask-llm
    opens. Another chat model, or a ChatOpenAI given its own ``http_async_client``,
    sends past all of them. What the user asked for (``budget_usd``, ``rpm``, ``tpm``,
    ``batch``) is refused, and ``batch`` for a provider whose Batch API dask-llm does
    not speak; the cache, on by default, is said once not to keep that chain's answers.
    """
    unseen: list[tuple[str, str]] = []
    for pc in plan.chains:
        if pc.chain.is_factory:
            continue  # its model is built in each process, out of sight here
        for model in find(pc.chain.runnable, lambda x: isinstance(x, BaseChatModel)):
            if is_configurable_model(model):
                continue
            if is_routable(model):
                if options.batch is not None and not _provider(model).batch:
                    raise ValueError(
                        f"chain {pc.name!r}: batch= cannot hold for its model "
                        f"{_model_label(model)}: dask-llm does not speak "
                        f"{_provider(model).name}'s Batch API; drop batch="
                    )
                continue
            unseen.append((pc.name, _model_label(model)))
    if not unseen:
        return
    chain, label = unseen[0]
    asked = [
        name
        for name, value in (
            ("budget_usd", options.budget_usd),
            ("rpm", options.rpm),
            ("tpm", options.tpm),
            ("output_tpm", options.output_tpm),
            ("batch", options.batch),
        )
        if value is not None
    ]
    if asked:
        raise ValueError(
            f"chain {chain!r}: {asked[0]}= cannot hold for its model {label}: dask-llm "
            "budgets, paces and batches the requests of ChatOpenAI and ChatAnthropic models "
            "on clients it opens, and this model sends its own; drop the option, or use "
            "ChatOpenAI (without http_async_client=) or ChatAnthropic"
        )
    if options.cache is not None:
        where = ", ".join(f"chain {c!r} ({m})" for c, m in unseen)
        warnings.warn(
            f"dask-llm: the answers of {where} are not cached: dask-llm caches the requests "
            "of ChatOpenAI and ChatAnthropic models on clients it opens; a rerun pays for "
            "them again "
            "(pass cache=False to say you know)",
            UserWarning,
            stacklevel=4,
        )


def _provider(model: Any) -> Provider:
    provider = provider_of(model)
    assert provider is not None
    return provider


def _check_prompt_order(plan: Plan) -> None:
    """Say, once per chain, when its prompt puts a row's values before a fixed block long
    enough to be cached: in that order no prompt cache can reuse it (``preview.caching``)."""
    for found in out_of_order(plan):
        warnings.warn(
            f"dask-llm: chain {found.chain!r} puts a row's values before a fixed block of "
            f"~{found.block_tokens:,} tokens, which no prompt cache can reuse in that order "
            f"(cached now: {found.cached_now:,} tokens a call; with that block before the "
            f"row's values: {found.cached_moved:,}). Put the fixed instruction first (a "
            "system message, then the row) to pay the cached-input price for it; see "
            "docs/cost.md",
            PromptCacheWarning,
            stacklevel=4,
        )


def _model_label(model: Any) -> str:
    name = getattr(model, "model_name", None) or getattr(model, "model", None)
    return f"{type(model).__name__}({name!r})" if isinstance(name, str) else type(model).__name__


def _check_prices(plan: Plan, options: EnrichOptions) -> None:
    """Under a budget every model needs a price: found now, not after the first request."""
    for pc in plan.chains:
        models = find(pc.chain.runnable, lambda x: provider_of(x) is not None)
        names = [_provider(m).model_name(m) for m in models]
        for conf in find(pc.chain.runnable, is_configurable_model):
            names.append(conf._default_config.get("model"))
        for name in names:
            if price_of(name, options.price_table) is None:
                raise ValueError(
                    f"chain {pc.name!r}: budget_usd= needs a price for model {name!r}, which "
                    "the price table does not have; give prices={model: (input, output)} in "
                    "US dollars per million tokens"
                )


def _keys_to_ship(plan: Plan, ship: bool) -> tuple[tuple[str, str], ...]:
    """Explicit keys to send with the job, after checking where the workers are."""
    keys: dict[str, str] = {}
    named: list[tuple[str, str]] = []  # (chain, the variable its workers would read)
    for pc in plan.chains:
        if pc.chain.is_factory:
            continue  # a factory builds its model, key and all, in each process
        found = explicit_keys(pc.chain.runnable)
        keys.update((ref, secret) for ref, (secret, _) in found.items())
        named.extend((pc.name, env) for _, env in found.values())
    client = _cluster.distributed_client()
    if ship:
        remote = _cluster.remote_worker(client) if client is not None else None
        if remote is not None:
            raise ValueError(
                f"ship_api_keys=True: a worker of this cluster runs on another host ({remote}); "
                "keys are only sent to workers on this machine: set OPENAI_API_KEY (or "
                "ANTHROPIC_API_KEY) in the workers' environment instead"
            )
        return tuple(sorted(keys.items()))
    for chain, env in dict.fromkeys(named) if client is not None else ():
        missing = _cluster.workers_without(client, env)
        if missing:
            # LangChain stores a key read from the environment as if it had been given:
            # say where it came from (a key equal to the variable here is that one).
            from_env = set(keys.values()) == {os.environ.get(env)}
            origin = (
                f"its model's key is this process's {env}"
                if from_env
                else "its model has an explicit api_key"
            )
            raise ValueError(
                f"chain {chain!r}: {origin}, which is not sent to workers, and "
                f"{len(missing)} worker(s) have no {env} ({missing[0]}); set it in their "
                "environment, or pass ship_api_keys=True (workers on this machine only)"
            )
    return ()


def _deprecated(
    request_timeout: float | None,
    retry: RetryPolicy | int,
    timeout: Any,
    attempts: Any,
    retry_timeout: Any,
) -> tuple[float | None, RetryPolicy]:
    """Map the 0.1 option names onto today's, with a warning each."""
    if isinstance(retry, bool) or not isinstance(retry, RetryPolicy | int):
        raise TypeError(f"retry= takes a RetryPolicy or a number of attempts, not {retry!r}")
    policy = RetryPolicy(attempts=retry) if isinstance(retry, int) else retry
    if timeout is not _UNSET:
        _warn("timeout=", "request_timeout=")
        request_timeout = timeout
    changes: dict[str, Any] = {}
    if attempts is not _UNSET:
        _warn("attempts=", "retry=RetryPolicy(attempts=...) or retry=<int>")
        changes["attempts"] = attempts
    if retry_timeout is not _UNSET:
        _warn("retry_timeout=", "retry=RetryPolicy(timeout=...)")
        changes["timeout"] = retry_timeout
    if changes:
        policy = dataclasses.replace(policy, **changes)
    return request_timeout, policy


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"enrich({old}) is deprecated and will be removed in dask-llm 0.3; use {new}",
        FutureWarning,
        stacklevel=4,
    )


def _usage_columns(usage: bool | Sequence[str]) -> tuple[str, str, str] | None:
    if usage is True:
        return USAGE_COLUMNS
    if usage is False or usage is None:
        return None
    names = tuple(usage)
    if len(names) != 3 or not all(isinstance(n, str) for n in names):
        raise ValueError(
            "usage= takes True, False, or three column names (input tokens, output tokens, cost)"
        )
    return (names[0], names[1], names[2])


def default_cache_path() -> str:
    """``$DASK_LLM_CACHE``, else ``./.dask-llm-cache/results.sqlite``, made absolute here
    so that workers with another working directory use the same file."""
    path = os.environ.get("DASK_LLM_CACHE") or os.path.join(".dask-llm-cache", "results.sqlite")
    return os.path.abspath(path)


def _batch_policy(batch: Any) -> BatchPolicy | None:
    if isinstance(batch, BatchPolicy):
        return batch
    if isinstance(batch, bool):
        return DEFAULT_BATCH if batch else None
    raise TypeError(f"batch= takes True, False or a BatchPolicy, not {batch!r}")


def _dask_text_dtype() -> Any:
    """The dtype dask gives text columns: pyarrow strings unless the user turned that off."""
    if dask.config.get("dataframe.convert-string", True) is not False:
        return pd.StringDtype("pyarrow")
    return string_dtype()


def estimate(
    frame: dd.DataFrame | pd.DataFrame,
    chains: ChainsArg,
    *,
    rpm: Told = None,
    tpm: Told = None,
    output_tpm: Told = None,
    cache: CacheArg = True,
    prices: Mapping[str, PriceEntry] | None = None,
    budget_usd: float | None = None,
    batch: bool = False,
    service_tier: ServiceTier | None = None,
    deadline: DeadlineArg = None,
) -> Estimate:
    """What ``enrich(frame, chains)`` would do, without any request: see ``Estimate``.

    Nothing is written: the cache is only read (a missing cache file is an empty one).

    Args:
        rpm, tpm, output_tpm: the limits to project the wall time at, per minute, as
            ``enrich`` takes them: a number for each provider apart, or a mapping by
            provider name. Each chain's calls are projected at its provider's limits
            (``tpm``: Anthropic's input tokens; ``output_tpm``: Anthropic's output
            tokens, its model's ``max_tokens`` each), and the estimate says which
            limit binds.
        cache: the cache ``enrich`` would use (answers in it are not counted), or False.
        prices: as for ``enrich``.
        budget_usd: the budget ``enrich`` would run under; the estimate says when it
            would exceed it.
        batch: estimate for ``enrich(..., batch=True)``: cost at Batch API prices (the
            online cost is shown beside it) and no rate-limited wall time.
        service_tier: as for ``enrich``: ``"flex"`` prices every OpenAI model's calls at
            the Flex price (the list price is shown beside it); None: each model's own
            ``service_tier`` (its field or ``.bind(service_tier=...)``).
        deadline: as for ``enrich``: the estimate shows the plan across the tiers (Batch
            API, Flex, list price) and its cost (``deadline_plan``); not with ``batch=``
            or ``service_tier=``.

    The cost prices the share of each prompt a provider's prompt cache can serve (the
    chain's fixed prefix, 1,024 tokens and more) at the cached-input price: see
    docs/cost.md.
    """
    if not isinstance(frame, dd.DataFrame | pd.DataFrame):
        raise TypeError(f"estimate() takes a Dask or pandas DataFrame, not {type(frame).__name__}")
    check_prices(prices)
    if service_tier is not None and service_tier not in SERVICE_TIERS:
        raise ValueError(f"service_tier= must be 'flex', 'default' or None, not {service_tier!r}")
    if service_tier == "flex" and batch:
        raise ValueError("service_tier='flex' and batch= are two ways to one price: choose one")
    if deadline is not None and (batch or service_tier is not None):
        raise ValueError(
            "deadline= chooses among the Batch API, Flex and list price itself: "
            "leave out batch= and service_tier="
        )
    plan = make_plan(chains, list(frame.columns), text_dtype=string_dtype())
    # Checked as enrich checks them (a copy of each mapping; the user's is not kept).
    checked = EnrichOptions(job="estimate", rpm=rpm, tpm=tpm, output_tpm=output_tpm)
    _check_told(plan, checked.rpm, checked.tpm, checked.output_tpm)
    store = open_cache(cache, default_path=default_cache_path())
    return run_estimate(
        frame,
        plan,
        store,
        rpm=checked.rpm,
        tpm=checked.tpm,
        output_tpm=checked.output_tpm,
        prices=dict(prices or {}),
        budget_usd=budget_usd,
        batch=bool(batch),
        service_tier=service_tier,
        deadline=None if deadline is None else Deadline.of(deadline),
    )


def pilot(
    frame: dd.DataFrame | pd.DataFrame,
    chains: ChainsArg,
    *,
    n: int = 200,
    **options: Unpack[EnrichKwargs],
) -> Pilot:
    """Run ``chains`` now on ``n`` rows spread over ``frame`` and project the full job.

    The sample is stratified (rows from every partition, in proportion to its length,
    evenly spaced within it) and enriched with ``options`` as ``enrich`` would. The
    ``Pilot`` gives the rates of errors, truncated answers (``finish_reason="length"``),
    refusals and parse failures, tokens per call, and the full job's projected cost and
    wall time with 95% intervals. Its answers are cached like any run's.

    Raises:
        ValueError: ``n`` < 1, or anything ``enrich`` refuses.
    """
    if not isinstance(frame, dd.DataFrame | pd.DataFrame):
        raise TypeError(f"pilot() takes a Dask or pandas DataFrame, not {type(frame).__name__}")
    if options.get("quality_gate") is not None:
        raise ValueError("pilot() reports the rates itself: pass quality_gate= to enrich()")
    if n < 1:
        raise ValueError(f"pilot(n=) must be >= 1, not {n!r}")
    settings: dict[str, Any] = {"progress": False, **options}

    def run(sample: pd.DataFrame) -> RunSummary:
        # enrich()'s own checks and deprecations, then the pandas path, keeping the summary.
        return _enrich_now(sample, _configure_like_enrich(sample, chains, settings))[1]

    tpm = options.get("tpm")
    # A tpm by provider: the pilot projects by the requests' limit and its own pace (its
    # record does not keep tokens per provider).
    return run_pilot(frame, run, n=n, tpm=None if isinstance(tpm, Mapping) else tpm)


class _LLMAccessor:
    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def pilot(self, chains: ChainsArg, *, n: int = 200, **options: Unpack[EnrichKwargs]) -> Pilot:
        """Enrich ``n`` rows spread over the frame now, and project the full job's rates,
        cost and time; see ``dask_llm.pilot``."""
        return pilot(self._obj, chains, n=n, **options)

    def estimate(self, chains: ChainsArg, **options: Unpack[EstimateKwargs]) -> Estimate:
        """Calls, tokens, cost and wall time ``enrich`` would take; see ``dask_llm.estimate``."""
        return estimate(self._obj, chains, **options)


@register_dask_accessor("llm")
class DaskLLMAccessor(_LLMAccessor):
    """``ddf.llm``: LLM enrichment of a Dask DataFrame (lazy)."""

    _obj: dd.DataFrame

    def enrich(self, chains: ChainsArg, **options: Unpack[EnrichKwargs]) -> dd.DataFrame:
        """Add the outputs of ``chains`` to every row (lazily); see ``dask_llm.enrich``."""
        return enrich(self._obj, chains, **options)


@pd.api.extensions.register_dataframe_accessor("llm")
class PandasLLMAccessor(_LLMAccessor):
    """``df.llm``: LLM enrichment of a pandas DataFrame (runs now)."""

    _obj: pd.DataFrame

    def enrich(self, chains: ChainsArg, **options: Unpack[EnrichKwargs]) -> pd.DataFrame:
        """Add the outputs of ``chains`` to every row, now; see ``dask_llm.enrich``."""
        return enrich(self._obj, chains, **options)
