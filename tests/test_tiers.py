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
