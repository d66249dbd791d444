"""``enrich(deadline=)``: finish by then at the least cost (issue 27).

Against a simulator whose batches take a set time (0.05 s validating, 2 s in
progress, 0.05 s finalizing), whose list-price answers take 0.1 s and whose Flex
answers ten times that: 10 rows, paced at 5 requests/s (2 s to send them all;
nearer 2.7 s: the pacing waits for its first answers). The planner is told a little more than
the simulator does (the margins).
Each deadline is met; the cost, read from each row's ``llm_cost_usd``, is
compared with the same answers at list price.

Then what was assumed turns out wrong, and the job re-plans from what it sees: a
batch far slower than stated (its progress says so: it is cancelled early, what
it finished is kept, the rest goes by Flex), and Flex far less available than
stated (measured: what cannot wait for it goes at list price).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

import dask_llm
from dask_llm.core.deadline import Deadline, TierChooser, batch_late, plan_tiers, projected_end
from tests.chains import summary_chain, wine_chains
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


def run(sim: Any, seconds: float, rows: int = ROWS) -> tuple[Any, float, float]:
    """The frame, its cost as a share of list price, and the seconds to spare."""
    deadline = Deadline(at=time.time() + seconds, **KNOWN)
    out = frame(rows).llm.enrich(chains(sim.base_url), cache=False, rpm=RPM, deadline=deadline)
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


# -- re-planned from what the job sees -------------------------------------------------------
@pytest.mark.slow  # about 10 s
def test_a_batch_slower_than_stated_is_cancelled_early_and_the_rest_goes_online(
    make_simulator: Any,
) -> None:
    # The planner is told batches take 4 s: 16 s leave room for one (its cut-off is 11 s
    # away, its cancel begins at 8 s). This simulator's batch takes 20 s (a line a
    # second), and its cancel takes 3 s, as a provider's does (OpenAI: up to 10 minutes).
    # Its progress shows by its first line that it cannot end by 8 s: it is cancelled
    # then, and what it did not finish goes online by Flex, in time. Cancelled at its
    # cut-off instead, it would still be cancelling when the cut-off came: its lines
    # would all go online then, at list price for part, and those it had finished
    # would be paid twice.
    rows = 20
    sim = make_simulator(**{**SIM, "batch_delay": 20.0, "batch_cancel_delay": 3.0})
    out, share, spare = run(sim, 16.0, rows=rows)
    assert spare > 0
    stats = sim.stats()
    assert stats["batch_lines_submitted"] == rows and stats["batches_cancelled"] == 1
    # Nothing paid twice: each row's request answered once, by the batch or online.
    assert stats["batch_lines_ok"] + stats["successes"] == rows
    assert stats["batch_duplicate_lines"] == 0 and stats["batch_lines_ok"] < rows
    assert 0.5 - 1e-9 <= share <= 1.0
    summary = dask_llm.last_run()
    assert summary is not None and summary.batches_late == 1
    assert summary.batch_calls == stats["batch_lines_ok"]
    assert summary.flex_calls + summary.list_price_calls == stats["successes"]
    assert summary.deadline_spare_s is not None and summary.deadline_spare_s > 0
    tiers = summary.cost_by_tier
    assert sum(tiers.values()) == pytest.approx(float(out["llm_cost_usd"].sum()))
    assert "cancelled early: too slow" in str(summary) and "deadline met" in str(summary)
    report = summary._repr_html_()  # the report says it too, and each tier's cost
    assert "deadline met" in report and "cost by Flex / batch / list price" in report


def test_a_batch_stuck_validating_is_cancelled_early_and_goes_by_flex(
    make_simulator: Any,
) -> None:
    # The planner is told batches take 4 s: 12 s leave room for one (its cancel begins
    # 6.8 s after it is submitted). This simulator's batch validates for 30 s. Once it
    # has validated for 2.8 s, even the 4 s assumed from then would end after its cancel
    # begins: it is late, cancelled while validating (nothing done, nothing paid), and
    # every line goes online by Flex, in time: 0.5x list price, ~5 s to spare. On main it
    # waited for its cut-off (6.8 s): the online requests then had no room to wait for
    # Flex's answers, and all went at list price (1.0x, ~3 s to spare).
    sim = make_simulator(**{**SIM, "batch_validation_delay": 30.0})
    _, share, spare = run(sim, 12.0)
    assert spare > 0
    stats = sim.stats()
    assert stats["batches_created"] == 1 and stats["batches_cancelled"] == 1
    # Cancelled before it ran a line: nothing paid twice.
    assert stats["batch_lines_submitted"] == stats["batch_lines_ok"] == 0
    assert stats["successes"] == ROWS
    summary = dask_llm.last_run()
    assert summary is not None and summary.batches_late == 1
    assert summary.flex_calls == ROWS
    assert share == pytest.approx(0.5)


@pytest.mark.slow  # about 13 s
def test_a_limit_lower_than_told_moves_the_cut_off_earlier(make_simulator: Any) -> None:
    """The job is told 6,000 requests/minute; the provider allows 60 (its headers say so).

    6 rows of two dependent chains: 12 requests, 1.3 s online at the rate told, so the
    cut-off is 16 s - 1.3 s and the batch's cancel begins 11 s in. The first batch
    expires at once (the simulator's ``batch_expire_count=1``): its lines go online, and
    their answers announce the real limit. Re-planned at 1 request/s, the 12 requests
    need 13 s online: the cut-off is already past, so the second round's batch is
    cancelled as soon as it is submitted and its lines go online by Flex, in time (~2.5 s
    to spare, 0.5x list price). On main the cut-off stayed where the rate told put it:
    the second batch ran, showing nothing, until 4 s (its turnaround) had passed; its 6
    lines then went online at 1 a second, partly at list price, and the job ended ~5.6 s
    late (0.84x list price).
    """
    sim = make_simulator(
        latency=0.1,
        flex_slowdown=10.0,
        rpm=60,
        batch_validation_delay=0.05,
        batch_delay=100.0,
        batch_finalize_delay=0.05,
        batch_expire_after=0.3,
        batch_expire_count=1,
    )
    deadline = Deadline(at=time.time() + 16.0, **{**KNOWN, "batch_turnaround": 4.0})
    rows = 6
    out = frame(rows).llm.enrich(
        wine_chains(sim.base_url), cache=False, rpm=6_000, deadline=deadline
    )
    spare = deadline.at - time.time()
    assert out["llm_error"].isna().all()
    assert spare > 0
    stats = sim.stats()
    assert stats["batches_created"] == 2 and stats["batches_expired"] == 1
    assert stats["batch_lines_ok"] == 0 and stats["batch_duplicate_lines"] == 0
    summary = dask_llm.last_run()
    assert summary is not None and summary.batches_late == 1
    assert summary.list_price_calls == 0  # all online by Flex: at the Batch API's price
    assert summary.flex_calls == 2 * rows


@pytest.mark.slow  # about 5 s
def test_flex_less_available_than_stated_moves_the_rest_to_list_price(
    make_simulator: Any,
) -> None:
    # Planned all by Flex (as in the Flex test above), but 80% of Flex requests are
    # "resource unavailable" (the planner was told none): measured, a Flex request's
    # expected time grows, and requests go at list price sooner.
    sim = make_simulator(**SIM, flex_unavailable=0.8, seed=2)
    _, share, spare = run(sim, 6.8)
    # ~2 s to spare on a quiet machine; main missed by ~2 s. A busy one (CI beside a
    # benchmark) ended 0.6 s late: a second's tolerance, and the move itself below.
    assert spare > -1.0
    summary = dask_llm.last_run()
    assert summary is not None and summary.flex_unavailable > 0
    assert summary.list_price_calls > 0  # the rest moved to list price
    assert 0.5 <= share <= 1.0


@pytest.mark.parametrize(
    ("done", "total", "now", "end"),
    [
        pytest.param(0, 10, 3.0, 4.0, id="nothing-done-within-the-turnaround"),
        pytest.param(0, 10, 5.0, float("inf"), id="nothing-done-past-the-turnaround"),
        pytest.param(2, 10, 2.0, 10.0, id="at-its-pace"),
        pytest.param(10, 10, 6.0, 6.0, id="all-done"),
    ],
)
def test_a_batch_end_is_projected_at_its_pace(
    done: int, total: int, now: float, end: float
) -> None:
    assert projected_end(now=now, since=0.0, done=done, total=total, turnaround=4.0) == end


def is_late(*, rounds_left: int, cancel_at: float = 5.0, **progress: Any) -> bool:
    """``batch_late`` of a batch of 10 lines, 1 s assumed per round, whose cancel would
    begin at ``cancel_at``; ``progress``: its ``now``, ``since``, ``done`` and the rest."""
    end = batch_late(
        total=10, turnaround=1.0, rounds_left=rounds_left, cancel_at=cancel_at, **progress
    )
    return end is not None


@pytest.mark.parametrize(
    ("done", "rounds_left", "late"),
    [
        pytest.param(5, 1, False, id="half-done-in-time"),
        pytest.param(2, 1, True, id="too-slow"),
        pytest.param(5, 2, True, id="in-time-but-not-its-next-round"),
    ],
)
def test_a_batch_is_late_when_it_cannot_end_before_its_cancel(
    done: int, rounds_left: int, late: bool
) -> None:
    # 10 lines, 2 s in progress; its cancel would begin at 5 s.
    assert is_late(now=2.0, since=0.0, done=done, rounds_left=rounds_left) is late


@pytest.mark.parametrize(
    ("now", "rounds_left", "late"),
    [
        pytest.param(3.5, 1, False, id="one-round-fits-from-now"),
        pytest.param(4.5, 1, True, id="validated-past-its-slack"),
        pytest.param(3.5, 2, True, id="its-next-round-does-not-fit"),
    ],
)
def test_a_batch_still_validating_is_late_when_the_turnaround_from_now_does_not_fit(
    now: float, rounds_left: int, late: bool
) -> None:
    # Submitted at 0, still validating; 1 s assumed per round; its cancel would begin at 5 s.
    progress = {"now": now, "since": now, "done": 0, "submitted": 0.0, "validating": True}
    assert is_late(rounds_left=rounds_left, **progress) is late


def test_a_later_round_counts_this_rounds_validation_too() -> None:
    # Submitted at 0, validated until 2, half done at 3: its lines end at 4. The next round
    # validates as this one did: 4 s, not the 2 s in progress, so it ends at 8, after the
    # cancel (7). Counted from the end of validation alone, it looked in time (6).
    progress = {"now": 3.0, "since": 2.0, "done": 5}
    assert is_late(rounds_left=2, cancel_at=7.0, submitted=0.0, **progress)
    # No submission known: from ``since``, as on main.
    assert not is_late(rounds_left=2, cancel_at=7.0, **progress)


def test_flex_unavailability_measured_moves_the_switch_to_list_price_earlier() -> None:
    # Flex assumed 1.5 s and always available: a request sent 2 s before the deadline
    # goes by Flex. Half of its answers "resource unavailable": not any more.
    chooser = TierChooser(Deadline(at=100.0, **KNOWN), rounds=1)
    chooser.plan(now=0.0, requests=10, rate_per_s=5.0)
    assert chooser.tier(now=98.0) == "flex"
    for _ in range(10):
        chooser.observe(1.0, flex=True)
        chooser.observe(0.01, flex=True, unavailable=True)
    assert chooser.flex_measured()[1] == pytest.approx(10 / 24)
    assert chooser.tier(now=98.0) == "default"
    assert chooser.tier(now=97.0) == "flex"


def test_the_cut_off_is_re_planned_at_a_lower_limit_the_headers_announce() -> None:
    # 1,000 requests told at 10/s: 100 s online, + 2 x 10 s warm-up, + 2 rounds x 10 s.
    chooser = TierChooser(Deadline(at=10_000.0, batch_turnaround=3600), rounds=2)
    plan = chooser.plan(now=0.0, requests=1_000, rate_per_s=10.0)
    assert plan.batch_s is not None
    assert chooser.cutoff_at() == pytest.approx(plan.batch_s)
    chooser.announced(rpm=1_200.0, tpm=None)  # 20/s: better than told, the plan keeps its own
    assert chooser.cutoff_at() == pytest.approx(plan.batch_s)
    chooser.announced(rpm=120.0, tpm=None)  # 2/s: 500 s online
    assert chooser.cutoff_at() == pytest.approx(10_000 - 20 - 500 - 20)
    # A token limit counts in the tokens answers used: 600 a minute at 100 an answer.
    chooser.observe(1.0, flex=False, tokens=100)
    chooser.announced(rpm=None, tpm=600.0)
    assert chooser.online_measured()[0] == pytest.approx(0.1)


def test_the_list_price_latency_measured_moves_flexs_last_safe_moment_earlier() -> None:
    # Two rounds: a Flex answer (1.5 s) must leave room for its row's next round at list
    # price, assumed 0.3 s: a request 2 s before the deadline goes by Flex. Answers at
    # list price that take 1 s each: not any more.
    chooser = TierChooser(Deadline(at=100.0, **KNOWN), rounds=2)
    chooser.plan(now=0.0, requests=10, rate_per_s=5.0)
    assert chooser.tier(now=98.1) == "flex"
    for _ in range(4):
        chooser.observe(1.0, flex=False)
    assert chooser.online_measured()[1] == pytest.approx(1.0)
    assert chooser.tier(now=98.1) == "default"
    assert chooser.tier(now=97.4) == "flex"
    later = plan_tiers(
        Deadline(at=100.0, **KNOWN), now=0.0, requests=10, rounds=2, rate_per_s=5.0, latency=1.0
    )
    assert later.flex_until == pytest.approx(100.0 - 1.5 - 1.0)
