"""Flex processing and prompt-cache pricing, against the simulator (issue 27).

Flex requests are priced at the Flex price (the Batch API's, unless the table
says otherwise), their 429 "resource unavailable" answers are retried and are
not the quota's, their timeout is OpenAI's advice; cached prompt tokens are
charged at the cached-input price, and the bill equals the server's counts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pandas as pd
import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import dask_llm
from dask_llm.cache import request_key
from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT, FLEX_REQUEST_TIMEOUT, EnrichOptions
from dask_llm.core.usage import PRICES, Price, check_prices, cost_usd, price_of
from dask_llm.engine import job as _job
from dask_llm.engine.calls import PartitionStats
from dask_llm.observe.report import _chain_table
from dask_llm.preview.estimate import significant
from dask_llm.transport.pipeline import LoopClients
from dask_llm.transport.wire import outcome_of
from tests.chains import llm, summary_chain
from tests.helpers import requests

ROWS = pd.DataFrame({"description": [f"Review {i}: plum, tobacco and cedar" for i in range(8)]})
FAST = dask_llm.RetryPolicy(wait_initial=0.005, wait_max=0.02)
#: A fixed instruction of about 1,500 tokens (6,000 characters), before the row's text.
INSTRUCTION = "You are a sommelier. Follow the house style guide strictly. " * 100


def bill(stats: dict[str, Any], price: tuple[float, ...]) -> float:
    """What the provider would bill for the simulator's own token counts."""
    return cost_usd(
        price, stats["prompt_tokens"], stats["completion_tokens"], stats["cached_tokens"]
    )


def cost(out: pd.DataFrame) -> float:
    assert out["llm_cost_usd"].notna().all()
    return float(out["llm_cost_usd"].sum())


# -- Flex ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"service_tier": "flex"}, id="enrich-option"),
        pytest.param({}, id="model-setting"),
    ],
)
def test_flex_requests_are_sent_and_priced_at_the_flex_price(sim: Any, how: dict) -> None:
    model = {} if how else {"service_tier": "flex"}
    chain = dask_llm.Chain(summary_chain(sim.base_url, **model), name="s")
    out = ROWS.llm.enrich([chain], cache=False, **how)
    stats = sim.stats()
    assert out["llm_error"].isna().all()
    assert stats["flex_requests"] == stats["flex_answered"] == stats["requests"] == len(ROWS)
    flex = price_of("gpt-4o-mini", tier="flex")
    assert flex is not None and flex == price_of("gpt-4o-mini", batch=True)
    assert cost(out) == pytest.approx(bill(stats, flex), rel=1e-9)
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.flex_calls == summary.calls == len(ROWS)
    assert summary.list_price_calls == 0 and summary.batch_calls == 0
    assert "by tier: 8 Flex" in str(summary)
    chains = summary.record.as_dict()["chains"] if summary.record else {}
    assert chains["s"]["flex"] == len(ROWS)


def test_flex_costs_half_of_list_price_for_the_same_answers(sim: Any) -> None:
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    listed = ROWS.llm.enrich(chain, cache=False)
    flex = ROWS.llm.enrich(chain, cache=False, service_tier="flex")
    pd.testing.assert_series_equal(listed["summary"], flex["summary"])  # the same answers
    assert cost(flex) == pytest.approx(0.5 * cost(listed), rel=1e-9)


def test_a_flex_price_in_the_table_beats_the_batch_price(sim: Any) -> None:
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    prices = {"gpt-4o-mini": {"input": 1.0, "output": 2.0, "flex_input": 0.2, "flex_output": 0.4}}
    out = ROWS.llm.enrich(chain, cache=False, service_tier="flex", prices=prices)
    stats = sim.stats()
    expected = (stats["prompt_tokens"] * 0.2 + stats["completion_tokens"] * 0.4) / 1e6
    assert cost(out) == pytest.approx(expected, rel=1e-9)


def test_resource_unavailable_answers_are_retried_and_are_not_the_quota(
    make_simulator: Any,
) -> None:
    sim = make_simulator(flex_unavailable=0.3, rpm=6000, seed=3)
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    rows = pd.DataFrame({"description": [f"Review {i}: cassis and graphite" for i in range(24)]})
    out = rows.llm.enrich(chain, cache=False, service_tier="flex", retry=FAST)
    stats = sim.stats()
    assert out["llm_error"].isna().all()
    unavailable = stats["faults"]["flex_unavailable"]
    assert unavailable > 0 and stats["rate_limited"] == 0
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.flex_unavailable == unavailable
    assert summary.flex_calls == summary.calls == stats["flex_answered"] == len(rows)
    assert summary.rate_limited == 0 and summary.retries >= unavailable
    record = summary.record.as_dict() if summary.record else {}
    assert record["chains"]["s"]["unavailable"] == unavailable
    kinds = {kind for kind, per_bucket in record["errors"].items() if sum(per_bucket)}
    assert kinds == {"429 unavailable"}
    assert summary.record is not None
    table = _chain_table(summary.record)  # the report's, without drawing its plots
    assert "by Flex / batch / Flex unavailable" in table
    assert f"<td>{len(rows)} / 0 / {unavailable}</td>" in table
    # Not billed: the cost is the answers' only.
    assert cost(out) == pytest.approx(bill(stats, price_of("gpt-4o-mini", tier="flex")), rel=1e-9)


@pytest.mark.parametrize(
    ("headers", "code", "quota", "unavailable"),
    [
        pytest.param({}, "resource_unavailable", False, True, id="no-headers"),
        pytest.param({"x-ratelimit-remaining-requests": "12"}, None, False, True, id="quota-left"),
        pytest.param({"x-ratelimit-remaining-requests": "0"}, None, True, False, id="quota-spent"),
        pytest.param({}, "rate_limit_exceeded", True, False, id="rate-limit-code"),
    ],
)
def test_a_flex_429_is_unavailable_unless_the_quota_is_spent(
    headers: dict[str, str], code: str | None, quota: bool, unavailable: bool
) -> None:
    import httpx

    body = b'{"error": {"code": "%s"}}' % (code or "x").encode()
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    outcome = outcome_of(429, headers, body, request, flex=True)
    assert (outcome.quota, outcome.unavailable) == (quota, unavailable)
    assert outcome.cost(None) == 0.0
    assert outcome_of(429, headers, body, request).unavailable is False  # not a Flex request


def local_timeout(model: Any, request_timeout: float | None, tier: str | None) -> Any:
    job = _job.attach(EnrichOptions(job=f"flex-timeouts-{request_timeout}-{tier}"))

    async def main() -> Any:
        clients = LoopClients(job, PartitionStats())
        local, _ = clients.localize(model, timeout=request_timeout, service_tier=tier)
        result = (local.root_async_client.timeout, local.service_tier)
        await clients.aclose()
        return result

    try:
        return asyncio.run(main())
    finally:
        _job.detach(job)


def test_flex_waits_fifteen_minutes_unless_a_timeout_is_set(sim: Any) -> None:
    assert FLEX_REQUEST_TIMEOUT == 900.0
    assert local_timeout(llm(sim.base_url), None, "flex") == (FLEX_REQUEST_TIMEOUT, "flex")
    flex_model = llm(sim.base_url, service_tier="flex")
    assert local_timeout(flex_model, None, None) == (FLEX_REQUEST_TIMEOUT, "flex")
    assert local_timeout(llm(sim.base_url, timeout=3), None, "flex") == (3, "flex")
    assert local_timeout(flex_model, 7.0, None) == (7.0, "flex")
    assert local_timeout(flex_model, None, "default") == (DEFAULT_REQUEST_TIMEOUT, "default")
    assert flex_model.service_tier == "flex"  # the user's model is untouched


def test_flex_and_list_price_share_cached_answers(sim: Any, tmp_path: Any) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    flex = body[:-1] + b', "service_tier": "flex"}'
    assert request_key("POST", "/v1/chat/completions", body) == request_key(
        "POST", "/v1/chat/completions", flex
    )
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    ROWS.llm.enrich(chain, cache=tmp_path / "c.sqlite")
    again = ROWS.llm.enrich(chain, cache=tmp_path / "c.sqlite", service_tier="flex")
    assert again["llm_cost_usd"].eq(0.0).all() and requests(sim) == len(ROWS)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"service_tier": "priority"}, ValueError, "service_tier=", id="unknown"),
        pytest.param(
            {"service_tier": "flex", "batch": True}, ValueError, "choose one", id="with-batch"
        ),
    ],
)
def test_bad_service_tiers_are_refused_before_any_request(
    sim: Any, options: dict, error: type, match: str
) -> None:
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    with pytest.raises(error, match=match):
        ROWS.llm.enrich(chain, cache=False, **options)
    assert requests(sim) == 0


def test_the_progress_bar_says_how_many_answers_came_by_flex() -> None:
    from dask_llm.observe.progress import RunProgress

    run = RunProgress(job="bar", partitions=1, total_rows=4, show=False)
    run.apply({"kind": "start", "partition": 0, "attempt": 1, "rows": 4})
    counts = {"rows": 4, "calls": 4, "flex_calls": 4, "flex_unavailable": 1, "cost": 0.01}
    run.apply({"kind": "counts", "partition": 0, "attempt": 1, "counts": counts})
    counts = {"cached_tokens": 2048, "saved": 0.0002}
    run.apply({"kind": "counts", "partition": 0, "attempt": 1, "counts": counts})
    assert "4 by Flex (1 unavailable)" in run._postfix()
    assert "2,048 cached" in run._postfix()
    assert run.summary.caching_saved_usd == pytest.approx(0.0002)


# -- prompt caching --------------------------------------------------------------------------
def instructed_chain(base_url: str, **model: Any) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", INSTRUCTION), ("human", "Review: {description}")]
    )
    return prompt | llm(base_url, **model) | StrOutputParser()


@pytest.mark.parametrize("tier", [None, "flex"])
def test_cached_tokens_are_charged_at_the_cached_price(sim: Any, tier: str | None) -> None:
    chain = [dask_llm.Chain(instructed_chain(sim.base_url), name="d")]
    out = ROWS.llm.enrich(chain, cache=False, service_tier=tier)
    stats = sim.stats()
    assert stats["cached_tokens"] > 0 and stats["cached_tokens"] % 128 == 0
    price = price_of("gpt-4o-mini", tier="flex" if tier else "default")
    assert price is not None
    assert cost(out) == pytest.approx(bill(stats, price), rel=1e-9)
    uncached = cost_usd(price, stats["prompt_tokens"], stats["completion_tokens"])
    assert cost(out) < uncached  # what the cost column said before
    summary = dask_llm.last_run()
    assert summary is not None and summary.cached_tokens == stats["cached_tokens"]
    saved = stats["cached_tokens"] * (price.input - price.cached_input) / 1e6
    assert summary.caching_saved_usd == pytest.approx(saved, rel=1e-9)
    assert summary.caching_saved_usd == pytest.approx(uncached - cost(out), rel=1e-9)
    assert "from the prompt cache" in str(summary)
    record = summary.record.as_dict() if summary.record else {}
    assert record["chains"]["d"]["cached_tokens"] == stats["cached_tokens"]


def test_a_model_with_its_own_client_is_priced_from_langchains_cached_tokens(sim: Any) -> None:
    import httpx2

    own = httpx2.AsyncClient(limits=httpx2.Limits(max_keepalive_connections=0))
    chain = [dask_llm.Chain(instructed_chain(sim.base_url, http_async_client=own), name="d")]
    out = ROWS.llm.enrich(chain, cache=False, service_tier="flex")
    stats = sim.stats()
    assert stats["cached_tokens"] > 0 and stats["flex_answered"] == len(ROWS)
    price = price_of("gpt-4o-mini", tier="flex")
    assert price is not None
    assert cost(out) == pytest.approx(bill(stats, price), rel=1e-9)


# -- the price table ---------------------------------------------------------------------------
def test_the_table_has_cached_input_prices() -> None:
    assert PRICES["gpt-4o-mini"] == Price(0.15, 0.60, cached_input=0.075)
    rates = price_of("gpt-4o-mini-2024-07-18")
    assert rates == (0.15, 0.60, 0.075, 0.15)  # OpenAI bills no cache writes: input price
    assert price_of("gpt-4o-mini", batch=True) == (0.075, 0.30, 0.0375, 0.075)
    assert price_of("gpt-4-turbo") == (10.0, 30.0, 10.0, 10.0)  # no caching: input price


@pytest.mark.parametrize(
    ("entry", "rates", "batch"),
    [
        pytest.param((1.0, 2.0), (1.0, 2.0, 1.0, 1.0), (0.5, 1.0, 0.5, 0.5), id="two-numbers"),
        pytest.param(
            (1.0, 2.0, 0.3, 0.6), (1.0, 2.0, 1.0, 1.0), (0.3, 0.6, 0.3, 0.3), id="four-numbers"
        ),
        pytest.param(
            {"input": 1.0, "output": 2.0, "cached_input": 0.25},
            (1.0, 2.0, 0.25, 1.0),
            (0.5, 1.0, 0.125, 0.5),
            id="mapping",
        ),
        pytest.param(
            Price(1.0, 2.0, cached_input=0.1),
            (1.0, 2.0, 0.1, 1.0),
            (0.5, 1.0, 0.05, 0.5),
            id="price",
        ),
    ],
)
def test_price_overrides_keep_their_shapes(entry: Any, rates: tuple, batch: tuple) -> None:
    check_prices({"m": entry})
    assert price_of("m", {"m": entry}) == rates
    assert price_of("m", {"m": entry}, batch=True) == batch
    assert price_of("m", {"m": entry}, tier="flex") == batch


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        pytest.param({"input": 1.0, "output": 2.0, "cache": 0.5}, "unknown key", id="unknown-key"),
        pytest.param({"input": 1.0}, "needs output", id="missing-output"),
        pytest.param({"input": 1.0, "output": -2.0}, ">= 0", id="negative"),
        pytest.param({"input": 1.0, "output": "2"}, "numbers", id="text"),
    ],
)
def test_bad_mapping_prices_are_refused(entry: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_prices({"gpt-4o-mini": entry})


def test_estimate_takes_every_price_shape(sim: Any) -> None:
    chain = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    shapes = [(1.0, 2.0), {"input": 1.0, "output": 2.0}, Price(1.0, 2.0, cached_input=0.5)]
    costs = {
        ROWS.llm.estimate(chain, cache=False, prices={"gpt-4o-mini": p}).cost_usd for p in shapes
    }
    assert len(costs) == 1 and None not in costs  # no cached share projected yet
    assert requests(sim) == 0


# -- estimate and pilot: the cached share and the Flex price before paying -------------------
def text_chain(base_url: str, *, bind: bool = False, **model: Any) -> Any:
    prompt = ChatPromptTemplate.from_template("One word for {description}")
    chat = llm(base_url, **model)
    return prompt | (chat.bind(service_tier="flex") if bind else chat) | StrOutputParser()


def test_estimate_projects_the_cached_share_of_a_fixed_prefix(sim: Any) -> None:
    rows = pd.concat([ROWS] * 3, ignore_index=True)
    rows["description"] += [f" ({i})" for i in range(len(rows))]
    chain = [dask_llm.Chain(instructed_chain(sim.base_url), name="d")]
    est = rows.llm.estimate(chain, cache=False)
    assert requests(sim) == 0
    # Every call but the first reads the fixed instruction's cacheable prefix.
    per_call = est.cached_tokens // (len(rows) - 1)
    assert per_call * (len(rows) - 1) == est.cached_tokens
    assert per_call >= 1024 and per_call % 128 == 0
    out = rows.llm.enrich(chain, cache=False)
    stats = sim.stats()
    # The server cached what the estimate said it would (its first calls may all miss).
    assert stats["cached_tokens"] <= est.cached_tokens
    assert stats["cached_tokens"] >= est.cached_tokens - 4 * per_call
    assert out["llm_error"].isna().all()
    assert est.input_tokens == pytest.approx(stats["prompt_tokens"], rel=0.05)
    price = price_of("gpt-4o-mini")
    assert price is not None
    # Cached tokens at the cached price (output tokens are the estimate's guess of 150).
    expected = cost_usd(price, est.input_tokens, est.output_tokens, est.cached_tokens)
    assert est.cost_usd == pytest.approx(expected, rel=1e-9)
    saved = est.cached_tokens * (price.input - price.cached_input) / 1e6
    assert est.caching_saved_usd == pytest.approx(saved)
    assert f"~{est.cached_tokens:,} from the prompt cache" in str(est)
    assert "less for the prompt cache" in str(est)


def test_estimate_projects_no_cached_share_for_a_short_or_late_instruction(sim: Any) -> None:
    short = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    assert ROWS.llm.estimate(short, cache=False).cached_tokens == 0
    late = ChatPromptTemplate.from_messages(
        [("human", "Review: {description}"), ("system", INSTRUCTION)]
    )
    chain = [dask_llm.Chain(late | llm(sim.base_url) | StrOutputParser(), name="late")]
    est = ROWS.llm.estimate(chain, cache=False)
    assert est.cached_tokens == 0 and "prompt cache" not in str(est)


@pytest.mark.parametrize(
    ("model", "bind", "options"),
    [
        pytest.param({}, False, {"service_tier": "flex"}, id="enrich-option"),
        pytest.param({"service_tier": "flex"}, False, {}, id="model-field"),
        pytest.param({}, True, {}, id="bound"),
    ],
)
def test_estimate_prices_flex_at_the_flex_price(
    sim: Any, model: dict, bind: bool, options: dict
) -> None:
    listed = ROWS.llm.estimate([dask_llm.Chain(text_chain(sim.base_url), name="t")], cache=False)
    chain = [dask_llm.Chain(text_chain(sim.base_url, bind=bind, **model), name="t")]
    est = ROWS.llm.estimate(chain, cache=False, **options)
    assert listed.flex_calls == 0 and "Flex" not in str(listed)
    assert est.flex_calls == est.calls == len(ROWS)
    assert listed.cost_usd is not None
    assert est.cost_usd == pytest.approx(0.5 * listed.cost_usd, rel=1e-9)
    assert est.list_price_cost_usd == pytest.approx(listed.cost_usd, rel=1e-9)
    assert f"with Flex (list price: ${significant(listed.cost_usd)})" in str(est)
    # enrich's option beats the model's own: service_tier="default" is list price.
    if not bind:
        default = ROWS.llm.estimate(chain, cache=False, service_tier="default")
        assert default.cost_usd == pytest.approx(listed.cost_usd, rel=1e-9)
    assert requests(sim) == 0


def test_estimate_refuses_flex_with_batch_and_unknown_tiers(sim: Any) -> None:
    chain = [dask_llm.Chain(text_chain(sim.base_url), name="t")]
    with pytest.raises(ValueError, match="choose one"):
        ROWS.llm.estimate(chain, cache=False, service_tier="flex", batch=True)
    with pytest.raises(ValueError, match="service_tier="):
        ROWS.llm.estimate(chain, cache=False, service_tier="priority")  # type: ignore[typeddict-item]


def test_the_pilot_projects_the_cached_share_and_the_flex_price_it_measured(sim: Any) -> None:
    rows = pd.DataFrame({"description": [f"Review {i}: plum and cedar" for i in range(40)]})
    chain = [dask_llm.Chain(instructed_chain(sim.base_url), name="d")]
    pilot = rows.llm.pilot(chain, n=10, cache=False, service_tier="flex")
    stats = sim.stats()
    assert stats["cached_tokens"] > 0
    assert pilot.cached_share == pytest.approx(stats["cached_tokens"] / stats["prompt_tokens"])
    assert pilot.flex_share == 1.0
    price = price_of("gpt-4o-mini", tier="flex")
    assert price is not None
    assert pilot.cost_usd == pytest.approx(bill(stats, price), rel=1e-9)
    assert pilot.projected_cost_usd == pytest.approx(pilot.cost_usd * 4, rel=1e-9)
    text = str(pilot)
    assert f"{pilot.cached_share:.0%} of input tokens from the prompt cache" in text
    assert "(Flex)" in text


# -- the order of a prompt: a fixed block after the row's values is never cached -------------
def late_chain(base_url: str) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("human", "Review: {description}"), ("system", INSTRUCTION)]
    )
    return prompt | llm(base_url) | StrOutputParser()


def test_enrich_warns_once_when_a_row_value_comes_before_a_cacheable_block(sim: Any) -> None:
    chains = [
        dask_llm.Chain(late_chain(sim.base_url), name="late"),
        dask_llm.Chain(instructed_chain(sim.base_url), name="first", outputs="first_out"),
    ]
    with pytest.warns(dask_llm.PromptCacheWarning) as caught:
        out = ROWS.llm.enrich(chains, cache=False)
    assert out["llm_error"].isna().all()
    (warning,) = caught  # one, for the one chain in that order; none per row or partition
    text = str(warning.message)
    assert "chain 'late'" in text and "'first'" not in text
    assert "cached now: 0 tokens a call" in text and "Put the fixed instruction first" in text
    # The server agrees: only the chain with its instruction first was cached.
    assert 0 < sim.stats()["cached_tokens"] < len(ROWS) * 1536


@pytest.mark.parametrize(
    "template",
    [
        pytest.param([("system", INSTRUCTION), ("human", "{description}")], id="fixed-first"),
        pytest.param([("human", "{description}"), ("system", "Be brief.")], id="short-after"),
    ],
)
def test_no_warning_when_the_order_costs_nothing(sim: Any, template: list) -> None:
    chain = ChatPromptTemplate.from_messages(template) | llm(sim.base_url) | StrOutputParser()
    ROWS.llm.enrich([dask_llm.Chain(chain, name="c")], cache=False)  # warnings are errors here


# -- Flex set only through .bind(): its timeout, and enrich's service_tier over it ----------
def bound_local(runnable: Any, request_timeout: float | None, tier: str | None) -> Any:
    """(timeout, tier the request asks for) of ``runnable``'s localized model and binding."""
    job = _job.attach(EnrichOptions(job=f"bound-timeouts-{request_timeout}-{tier}"))

    async def main() -> Any:
        clients = LoopClients(job, PartitionStats())
        local, _ = clients.localize(runnable, timeout=request_timeout, service_tier=tier)
        model = local.bound
        asked = local.kwargs.get("service_tier", model.service_tier)
        result = (model.root_async_client.timeout, asked)
        await clients.aclose()
        return result

    try:
        return asyncio.run(main())
    finally:
        _job.detach(job)


def test_a_model_bound_to_flex_waits_fifteen_minutes_unless_a_timeout_is_set(sim: Any) -> None:
    bound = llm(sim.base_url).bind(service_tier="flex")
    assert bound_local(bound, None, None) == (FLEX_REQUEST_TIMEOUT, "flex")
    assert bound_local(bound, 7.0, None) == (7.0, "flex")
    assert bound_local(llm(sim.base_url, timeout=3).bind(service_tier="flex"), None, None) == (
        3,
        "flex",
    )
    # enrich(service_tier=...) is every model's tier, a bound one's too.
    assert bound_local(bound, None, "default") == (DEFAULT_REQUEST_TIMEOUT, "default")
    assert bound.kwargs == {"service_tier": "flex"}  # the user's binding is untouched


def test_enrich_service_tier_beats_a_bound_one(sim: Any) -> None:
    chain = [dask_llm.Chain(text_chain(sim.base_url, bind=True), name="t")]
    out = ROWS.llm.enrich(chain, cache=False)
    assert sim.stats()["flex_answered"] == len(ROWS)
    listed = ROWS.llm.enrich(chain, cache=False, service_tier="default")
    assert sim.stats()["flex_answered"] == len(ROWS)  # no more Flex requests
    assert cost(out) == pytest.approx(0.5 * cost(listed), rel=1e-9)


def test_the_budget_reserves_a_flex_request_at_the_flex_price() -> None:
    job = _job.attach(EnrichOptions(job="flex-worst-case", budget_usd=1.0))
    try:
        body = b'{"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user"}]}'
        flex = body[:-1] + b', "service_tier": "flex"}'
        listed, flex_price = price_of("gpt-4o-mini"), price_of("gpt-4o-mini", tier="flex")
        assert listed is not None and flex_price is not None
        assert job.worst_cost(body) == pytest.approx(cost_usd(listed, len(body), 100))
        assert job.worst_cost(flex) == pytest.approx(cost_usd(flex_price, len(flex), 100))
    finally:
        _job.detach(job)
