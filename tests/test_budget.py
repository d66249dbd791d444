"""``budget_usd=``: a hard cap on spend across processes; a rerun pays only what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from dask_llm.core.usage import price_of
from tests.chains import fake_chat_chain, summary_chain
from tests.helpers import requests, reviews

ROWS = 160


def spent(sim: Any) -> float:
    """What the simulator was paid, at the price table's rate for gpt-4o-mini."""
    stats = sim.stats()
    price = price_of("gpt-4o-mini")
    assert price is not None
    return (stats["prompt_tokens"] * price[0] + stats["completion_tokens"] * price[1]) / 1e6


def chains(url: str) -> list[dask_llm.Chain]:
    # max_tokens makes each request's worst case exact: spend can then never pass the cap.
    return [dask_llm.Chain(summary_chain(url, max_tokens=80), name="summarize")]


def full_cost(make_simulator: Any) -> float:
    sim = make_simulator()
    reviews(ROWS).llm.enrich(chains(sim.base_url), cache=False)
    return spent(sim)


@pytest.mark.slow
def test_a_job_twice_its_budget_stops_at_the_cap_and_a_rerun_finishes_it(
    make_simulator: Any, tmp_path: Path
) -> None:
    total = full_cost(make_simulator)
    budget = total / 2
    sim = make_simulator(latency=0.05)
    cache = tmp_path / "cache.sqlite"
    ddf = dd.from_pandas(reviews(ROWS), npartitions=4)
    first = ddf.llm.enrich(chains(sim.base_url), budget_usd=budget, cache=cache)
    out = first.compute(scheduler="processes", num_workers=2)
    paid = spent(sim)
    # The stated bound: with max_tokens set, spend never passes the cap ...
    assert paid <= budget * (1 + 1e-9)
    # ... and the job used most of it (what it could not reserve at the end).
    assert paid >= 0.8 * budget
    stopped = out["llm_error"].dropna()
    assert len(stopped) > 0
    assert stopped.str.contains("budget reached").all()
    done = out["llm_error"].isna().sum()
    summary = dask_llm.last_run()
    assert summary is not None and summary.budget_usd == pytest.approx(budget)

    second = ddf.llm.enrich(chains(sim.base_url), budget_usd=2 * budget, cache=cache)
    again = second.compute(scheduler="processes", num_workers=2)
    assert again["llm_error"].isna().all()
    stats = sim.stats()
    assert stats["duplicate_requests"] == 0  # no call paid twice
    assert stats["successes"] == ROWS  # every row paid for exactly once, over both runs
    assert done > 0


def test_errors_raise_names_the_spend(make_simulator: Any) -> None:
    sim = make_simulator()
    with pytest.raises(dask_llm.BudgetExceeded, match=r"budget reached: \$"):
        reviews(60).llm.enrich(chains(sim.base_url), budget_usd=1e-4, errors="raise", cache=False)


def test_a_stop_without_a_cache_does_not_promise_a_resume(make_simulator: Any) -> None:
    # Issue 28: with cache=False the message still said "every answer paid for is kept".
    sim = make_simulator()
    with pytest.raises(dask_llm.BudgetExceeded) as info:
        reviews(60).llm.enrich(chains(sim.base_url), budget_usd=1e-4, errors="raise", cache=False)
    assert "is kept" not in str(info.value)
    assert "no answer was kept (cache=False)" in str(info.value)


def test_a_model_without_a_price_cannot_run_under_a_budget(sim: Any) -> None:
    chain = dask_llm.Chain(summary_chain(sim.base_url, model="my-local-llama"), name="s")
    frame = dd.from_pandas(reviews(4), npartitions=1)
    with pytest.raises(ValueError, match="needs a price for model 'my-local-llama'"):
        frame.llm.enrich([chain], budget_usd=1.0)
    out = frame.llm.enrich(
        [chain], budget_usd=1.0, prices={"my-local-llama": (0.1, 0.2)}, cache=False
    ).compute()
    assert out["llm_error"].isna().all()
    assert requests(sim) == 4


def test_estimate_says_when_it_exceeds_the_budget(sim: Any) -> None:
    est = reviews(50).llm.estimate(chains(sim.base_url), cache=False, budget_usd=1e-5)
    assert est.cost_usd is not None and est.cost_usd > 1e-5
    assert "exceeds the budget" in str(est)
    fits = reviews(50).llm.estimate(chains(sim.base_url), cache=False, budget_usd=100.0)
    assert "exceeds" not in str(fits)


def test_progress_and_last_run_show_spend_against_the_budget(sim: Any) -> None:
    reviews(10).llm.enrich(chains(sim.base_url), budget_usd=5.0, cache=False)
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.budget_usd == 5.0
    assert "of $5.00 budget" in str(summary)
    assert pd.notna(summary.cost_usd)


def test_a_budget_is_refused_for_a_chat_model_dask_llm_does_not_see() -> None:
    with pytest.raises(ValueError, match=r"chain 'fake': budget_usd=.*FakeListChatModel"):
        reviews(30).llm.enrich(
            [dask_llm.Chain(fake_chat_chain(), name="fake")], budget_usd=0.0001, cache=False
        )
