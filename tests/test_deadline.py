"""``enrich(deadline=)``: finish by then at the least cost (issue 27).

Against a simulator whose batches take a set time (0.05 s validating, 2 s in
progress, 0.05 s finalizing), whose list-price answers take 0.1 s and whose Flex
answers ten times that: 10 rows, paced at 5 requests/s (2 s to send them all;
nearer 2.7 s: the pacing waits for its first answers). The planner is told a little more than
the simulator does (the margins).
Each deadline is met; the cost, read from each row's ``llm_cost_usd``, is
compared with the same answers at list price.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

import dask_llm
from dask_llm.core.deadline import Deadline, plan_tiers
from tests.chains import summary_chain
from tests.helpers import requests
from tests.helpers import reviews as frame

ROWS = 10
RPM = 300.0  # 5 requests/s: 2 s to send the 10 rows
SIM = {
    "latency": 0.1,
    "flex_slowdown": 10.0,
    "batch_validation_delay": 0.05,
    "batch_delay": 2.0,
    "batch_finalize_delay": 0.05,
}
#: What the planner is told (a little above what the simulator does: a margin).
KNOWN = {"batch_turnaround": 4.0, "flex_latency": 1.5, "latency": 0.3}


def chains(url: str) -> list[Any]:
    return [dask_llm.Chain(summary_chain(url), name="summarize")]


def list_price(out: Any) -> float:
    price = dask_llm.PRICES["gpt-4o-mini"]
    return float(
        (
            (out["llm_input_tokens"] * price.input + out["llm_output_tokens"] * price.output) / 1e6
        ).sum()
    )


def run(sim: Any, seconds: float) -> tuple[Any, float, float]:
    """The frame, its cost as a share of list price, and the seconds to spare."""
    deadline = Deadline(at=time.time() + seconds, **KNOWN)
    out = frame(ROWS).llm.enrich(chains(sim.base_url), cache=False, rpm=RPM, deadline=deadline)
    spare = deadline.at - time.time()
    assert out["llm_error"].isna().all()
    return out, float(out["llm_cost_usd"].sum()) / list_price(out), spare


def test_a_deadline_the_batch_api_meets_goes_by_batch(make_simulator: Any) -> None:
    sim = make_simulator(**SIM)
    _, share, spare = run(sim, 12.0)
    assert spare > 0
    assert requests(sim) == 0  # all by batch
    assert sim.stats()["batch_lines_ok"] == ROWS
    assert share == pytest.approx(0.5)
    summary = dask_llm.last_run()
    assert summary is not None and summary.batch_calls == ROWS
    assert summary.record is not None
    counts = summary.record.chains["summarize"]
    assert counts.batch_cost_usd == pytest.approx(counts.cost_usd)


@pytest.mark.slow  # about 4 s
def test_a_deadline_only_flex_meets_goes_online_by_flex(make_simulator: Any) -> None:
    sim = make_simulator(**SIM)
    _, share, spare = run(sim, 6.8)
    assert spare > 0
    assert sim.stats()["batch_lines_submitted"] == 0
    assert requests(sim) == ROWS
    assert share == pytest.approx(0.5)
    summary = dask_llm.last_run()
    assert summary is not None and summary.flex_calls == ROWS


def test_a_tight_deadline_pays_list_price_for_what_cannot_wait_for_flex(
    make_simulator: Any,
) -> None:
    sim = make_simulator(**SIM)
    _, share, spare = run(sim, 3.4)
    assert spare > 0
    assert requests(sim) == ROWS
    summary = dask_llm.last_run()
    assert summary is not None and 0 < summary.flex_calls < ROWS
    assert 0.5 < share < 1.0
    # The run record (and its report) say what each tier cost.
    assert summary.record is not None
    counts = summary.record.chains["summarize"]
    assert counts.flex == summary.flex_calls and counts.batch_cost_usd == 0
    assert 0 < counts.flex_cost_usd < counts.cost_usd
    assert share == pytest.approx(
        (0.5 * summary.flex_calls + (ROWS - summary.flex_calls)) / ROWS, rel=0.05
    )


def test_estimate_shows_the_plan_and_its_cost(sim: Any) -> None:
    batch = frame(ROWS).llm.estimate(chains(sim.base_url), rpm=RPM, cache=False, deadline=3600)
    assert batch.deadline_plan is not None and batch.deadline_plan.tier == "flex"  # 24 h batches
    known = Deadline(at=time.time() + 3600, batch_turnaround=600)
    cheap = frame(ROWS).llm.estimate(chains(sim.base_url), rpm=RPM, cache=False, deadline=known)
    assert cheap.deadline_plan is not None and cheap.deadline_plan.tier == "batch"
    assert "Batch API, cut off" in str(cheap)
    assert cheap.cost_usd == pytest.approx(cheap.batch_cost_usd)


@pytest.mark.parametrize(
    ("seconds", "tier", "flex"),
    [
        pytest.param(12.0, "batch", 1.0, id="batch"),
        pytest.param(6.8, "flex", 1.0, id="flex"),
        pytest.param(3.4, "flex", 0.65, id="part-list-price"),
    ],
)
def test_the_plan(seconds: float, tier: str, flex: float) -> None:
    deadline = Deadline(at=100.0 + seconds, **KNOWN)
    plan = plan_tiers(deadline, now=100.0, requests=ROWS, rounds=1, rate_per_s=RPM / 60)
    assert plan.tier == tier and plan.meets
    assert plan.flex_share == pytest.approx(flex)


def test_the_cut_off_leaves_the_cancel_and_the_online_tail() -> None:
    # 1,000 requests at 10/s: 100 s online at list price (+10 s latency); a batch of
    # 1 h must end before its cancel begins, 600 s before the cut-off.
    deadline = Deadline(at=10_000.0, batch_turnaround=3600)
    plan = plan_tiers(deadline, now=0.0, requests=1_000, rounds=2, rate_per_s=10.0)
    assert plan.batch_s == pytest.approx(10_000 - 20 - 100 - 20)
    assert plan.batch_s is not None and plan.batch_s - 600 >= 2 * 3600
    late = plan_tiers(deadline, now=2_200.0, requests=1_000, rounds=2, rate_per_s=10.0)
    assert late.batch_s is None  # two rounds of an hour no longer fit


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(60, id="seconds"),
        pytest.param(dt.timedelta(minutes=1), id="timedelta"),
        pytest.param(dt.datetime.fromtimestamp(1_060, dt.UTC), id="aware-datetime"),
    ],
)
def test_a_deadline_is_seconds_a_timedelta_or_an_aware_datetime(value: Any) -> None:
    assert Deadline.of(value, now=1_000.0).at == pytest.approx(1_060.0)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        pytest.param(dt.datetime(2030, 1, 1), ValueError, id="naive-datetime"),
        pytest.param(-5, ValueError, id="past"),
        pytest.param("tomorrow", TypeError, id="text"),
    ],
)
def test_a_deadline_that_cannot_be_read_is_refused(value: Any, error: type) -> None:
    with pytest.raises(error):
        Deadline.of(value, now=1_000.0)


def test_deadline_chooses_the_tiers_itself(sim: Any) -> None:
    with pytest.raises(ValueError, match="deadline= chooses"):
        frame(2).llm.enrich(chains(sim.base_url), batch=True, deadline=60)
