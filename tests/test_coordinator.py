"""The job's ledger: capacity follows demand, never above the limit; a hard dollar cap.

All on a clock the tests move by hand: no sleeping, no processes.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any

import pytest

from dask_llm.limits.coordinator import LEASE_TTL_S, MARGIN, RENEW_S, WINDOW_S, Coordinator
from dask_llm.limits.ledger import GONE_S, Ledger
from dask_llm.limits.pacer import HOLD_S, Pacer

LIMIT = 100 / 60 * 60 * 60  # rpm for 100 requests/s
RATE = 100 * (1 - MARGIN)  # what the whole job may use, per second
UNIT = 1 - MARGIN  # rates are granted in whole requests of a member's window (``_whole_window``)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Link:
    """A ledger's way to ``coordinator``; while ``up`` is False, each lease raises
    ``failure`` (a scheduler, or a worker's loop, that does not answer)."""

    def __init__(
        self, coordinator: Coordinator, *, failure: type[Exception] = ConnectionError
    ) -> None:
        self.coordinator = coordinator
        self.failure = failure
        self.up = True

    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
        if not self.up:
            raise self.failure("the coordinator did not answer")
        return self.coordinator.lease(job, member, report)


def report(**fields: Any) -> dict[str, Any]:
    return {"config": {"rpm": LIMIT}, "hungry": True, **fields}


def renew_all(c: Coordinator, clock: Clock, members: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One round of renewals, a quarter second apart, like the members' threads."""
    leases = {}
    for name, fields in members.items():
        leases[name] = c.lease("job", name, report(**fields))
    clock.now += RENEW_S
    return leases


def test_one_member_gets_the_whole_limit_less_the_margin() -> None:
    c = Coordinator(clock=Clock())
    assert c.lease("job", "a", report())["rate_req"] == pytest.approx(RATE)


def test_hungry_members_share_evenly_once_the_surplus_has_aged() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    c.lease("job", "a", report())
    leases: dict[str, Any] = {}
    for _ in range(12):  # 3 s of renewals
        leases = renew_all(c, clock, {"a": {}, "b": {}})
    assert leases["a"]["rate_req"] == pytest.approx(RATE / 2)
    assert leases["b"]["rate_req"] == pytest.approx(RATE / 2)


def test_rates_are_whole_windows_and_use_the_limit_to_the_last_request() -> None:
    """A member's strict window holds whole requests (``Pacer.admit``): rates are granted in them.

    Three members due a third of the limit each: 34, 33 and 33 requests a
    window, not 33.3 each (which its window rounds down to 33: a request a
    second lost).
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    leases: dict[str, Any] = {}
    for _ in range(12):
        leases = renew_all(c, clock, {"a": {}, "b": {}, "c": {}})
    windows = sorted(leases[n]["rate_req"] / UNIT for n in "abc")
    assert windows == pytest.approx([33, 33, 34])


def test_a_member_with_little_work_keeps_what_it_uses_and_the_rest_goes_to_the_hungry() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    leases: dict[str, Any] = {}
    for _ in range(12):
        leases = renew_all(c, clock, {"big": {}, "small": {"hungry": False, "used_req": 8.0}})
    assert leases["small"]["rate_req"] == pytest.approx(8.0 * 1.25, abs=UNIT)
    assert leases["big"]["rate_req"] == pytest.approx(RATE - 10.0, abs=UNIT)


def test_a_new_member_gets_a_share_within_two_seconds() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    for _ in range(4):
        renew_all(c, clock, {"a": {}})
    joined = clock.now
    while c.lease("job", "b", report())["rate_req"] < RATE / 2 * 0.99:
        c.lease("job", "a", report())
        clock.now += RENEW_S
        assert clock.now - joined < 2.0


def skewed(c: Coordinator, clock: Clock, backlogs: dict[str, int], begun: dict[str, list[int]]):
    """Renewals for 3 s of a job of 8 partitions, each member reporting its backlog."""
    config = {"rpm": LIMIT, "partitions": 8}
    leases: dict[str, Any] = {}
    for round_ in range(12):
        for name, backlog in backlogs.items():
            fields = {"backlog": backlog, "begun": begun[name] if round_ == 0 else []}
            leases[name] = c.lease("job", name, {**report(**fields), "config": config})
        clock.now += RENEW_S
    return leases


def test_a_member_holding_most_of_the_remaining_work_gets_its_part_of_the_limit() -> None:
    """60% of the rows in one partition of 8, on 4 processes: it is lent 60%, not a quarter.

    Split evenly, it would get a quarter of the rate while the others have work,
    then finish alone, at what one process can do (on 2 cores, less than the
    limit). The partitions not begun count at the median of those begun.
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    backlogs = {"big": 2400, "a": 229, "b": 229, "c": 229}
    leases = skewed(c, clock, backlogs, {n: [b] for n, b in backlogs.items()})
    work = 2400 + 3 * 229 + 4 * 229  # 4 partitions not begun, at the median size
    assert leases["big"]["rate_req"] == pytest.approx(RATE * 2400 / work, abs=UNIT)
    for name in "abc":
        assert leases[name]["rate_req"] == pytest.approx(RATE * (1 - 2400 / work) / 3, abs=UNIT)


def test_a_process_running_small_partitions_one_after_another_is_not_starved() -> None:
    """The small partitions still queued count as the others' work, not the big one's."""
    clock = Clock()
    c = Coordinator(clock=clock)
    leases = skewed(c, clock, {"big": 2400, "small": 229}, {"big": [2400], "small": [229]})
    work = 2400 + 229 + 6 * 229
    assert leases["small"]["rate_req"] == pytest.approx(RATE * (1 - 2400 / work), abs=UNIT)
    assert leases["small"]["rate_req"] > RATE / 3  # by its own rows alone: 9%


def test_even_partitions_share_evenly_and_a_member_that_does_not_tell_its_backlog_too() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    even = skewed(c, clock, {"a": 500, "b": 500}, {"a": [500], "b": [500]})
    assert even["a"]["rate_req"] == pytest.approx(RATE / 2)
    assert even["b"]["rate_req"] == pytest.approx(RATE / 2)
    clock.now += 10 * LEASE_TTL_S
    c = Coordinator(clock=clock)
    config = {"rpm": LIMIT, "partitions": 8}
    leases: dict[str, Any] = {}
    for _ in range(12):
        big = report(backlog=2400, begun=[2400])
        leases["big"] = c.lease("job", "big", {**big, "config": config})
        leases["old"] = c.lease("job", "old", {**report(), "config": config})  # an older member
        clock.now += RENEW_S
    assert leases["big"]["rate_req"] == pytest.approx(RATE / 2)


def test_a_critical_member_that_cannot_use_its_part_keeps_what_it_uses() -> None:
    """Short of CPU, it is not hungry: it keeps what it sends plus a quarter, the rest moves."""
    clock = Clock()
    c = Coordinator(clock=clock)
    config = {"rpm": LIMIT, "partitions": 2}
    leases: dict[str, Any] = {}
    for round_ in range(12):
        big = report(backlog=2400, begun=[2400] if round_ == 0 else [], hungry=False, used_req=30.0)
        leases["big"] = c.lease("job", "big", {**big, "config": config})
        small = report(backlog=200, begun=[200] if round_ == 0 else [])
        leases["small"] = c.lease("job", "small", {**small, "config": config})
        clock.now += RENEW_S
    assert leases["big"]["rate_req"] == pytest.approx(30.0 * 1.25, abs=UNIT)
    assert leases["small"]["rate_req"] == pytest.approx(RATE - 30.0 * 1.25, abs=UNIT)


def test_capacity_no_one_asks_for_goes_to_the_members_with_rows_still_to_run() -> None:
    """The job's last rows: a quiet member with rows left is lent the limit, not 1% of it.

    Its requests come in bursts (a dependent chain's, when answers are back); lent
    1% while quiet, each burst was paced at one request a second until its lease
    followed, and the last rows of a job trickled out for seconds.
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    config = {"rpm": LIMIT, "partitions": 8}
    leases: dict[str, Any] = {}
    for _ in range(12):
        for name, backlog in (("last", 5), ("done", 0)):
            quiet = report(backlog=backlog, hungry=False, used_req=0.0, sent_1s=(0, 0.0))
            leases[name] = c.lease("job", name, {**quiet, "config": config})
        clock.now += RENEW_S
    assert leases["done"]["rate_req"] == pytest.approx(RATE * 0.01)
    assert leases["last"]["rate_req"] == pytest.approx(RATE * 0.99)


def test_a_quiet_member_keeps_what_it_sent_in_its_last_second() -> None:
    """Quiet since its last renewal, it still sent 9 requests in the last second: it keeps them."""
    clock = Clock()
    c = Coordinator(clock=clock)
    leases: dict[str, Any] = {}
    for _ in range(12):
        quiet = {"hungry": False, "used_req": 0.0, "sent_1s": (9, 0.0), "interval": RENEW_S}
        leases = renew_all(c, clock, {"big": {}, "small": quiet})
    assert leases["small"]["rate_req"] == pytest.approx(9 * (1 - MARGIN) * 1.25, abs=UNIT)
    assert leases["big"]["rate_req"] == pytest.approx(RATE - 9 * (1 - MARGIN) * 1.25, abs=UNIT)


def test_what_a_member_sent_in_the_last_second_stays_committed_until_it_leaves_the_window() -> None:
    """Its requests of the last second still count at the provider: lent only as they leave.

    A sent its whole window's worth (its rate before the margin, as its strict
    window allows, ``Pacer.admit``), evenly, then stopped at once, and reports
    what of it is still in its last second. What b is lent and what of a's
    requests the provider still counts never pass the limit, and b has the
    whole rate once a's last second has passed, not a window later.
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    full = RATE / (1 - MARGIN)
    stopped = clock.now + RENEW_S

    def in_window() -> float:
        return full * max(0.0, WINDOW_S - (clock.now - stopped)) / WINDOW_S

    c.lease("job", "a", report(sent_1s=(full, 0.0), interval=RENEW_S))
    clock.now = stopped
    c.lease("job", "a", report(hungry=False, sent_1s=(in_window(), 0.0), interval=RENEW_S))
    b = c.lease("job", "b", report())
    assert b["rate_req"] == pytest.approx(0.0)
    while clock.now < stopped + WINDOW_S + RENEW_S:
        clock.now += RENEW_S
        c.lease("job", "a", report(hungry=False, sent_1s=(in_window(), 0.0), interval=RENEW_S))
        b = c.lease("job", "b", report())
        assert b["rate_req"] / (1 - MARGIN) + in_window() <= full * (1 + 1e-9)
    assert b["rate_req"] >= RATE * 0.98


def test_a_late_renewal_keeps_what_its_window_may_have_sent_committed() -> None:
    """Seconds it did not report: it may have sent its whole window's worth in them."""
    clock = Clock()
    c = Coordinator(clock=clock)
    assert c.lease("job", "a", report())["rate_req"] == pytest.approx(RATE)
    clock.now += 3 * RENEW_S  # late: nothing reported for 0.75 s
    c.lease("job", "a", report(hungry=False, sent_1s=(0.0, 0.0), interval=3 * RENEW_S))
    assert c.lease("job", "b", report())["rate_req"] < RATE * 0.02


def test_a_rate_granted_and_not_used_moves_to_the_others_at_once() -> None:
    """A partition still building its rows, or the tail of one: nothing sent, nothing held."""
    clock = Clock()
    c = Coordinator(clock=clock)
    assert c.lease("job", "a", report())["rate_req"] == pytest.approx(RATE)
    clock.now += RENEW_S
    idle = report(hungry=False, sent_1s=(0.0, 0.0), interval=RENEW_S)
    assert c.lease("job", "a", idle)["rate_req"] < RATE * 0.02
    assert c.lease("job", "b", report())["rate_req"] > RATE * 0.98


def test_a_member_that_stops_renewing_gives_its_share_back_within_three_seconds() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    for _ in range(12):
        renew_all(c, clock, {"a": {}, "dead": {}})
    died = clock.now
    while c.lease("job", "a", report())["rate_req"] < RATE * 0.99:
        clock.now += RENEW_S
        assert clock.now - died < LEASE_TTL_S + WINDOW_S + 0.5


def test_while_its_report_is_on_its_way_a_member_sends_no_more_than_it_reported() -> None:
    """The coordinator lends at once what a report says was not sent: the old rate must not use it.

    Until the reply is back, the member's old rate still applies; its strict
    window then holds it to what it reported in its last second.
    """
    clock = Clock()
    coordinator = Coordinator(clock=clock)
    pacers: list[Pacer] = []
    on_the_way: list[list[float]] = []

    class SlowLink:  # the pacer admits while its report is on the way
        def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
            if pacers:
                on_the_way.append([pacers[0].admit(1.0) for _ in range(3)])
                clock.now += WINDOW_S  # what it reported leaves the window
                on_the_way.append([pacers[0].admit(1.0) for _ in range(3)])
            return coordinator.lease(job, member, report)

    ledger = Ledger("job", {"rpm": LIMIT}, SlowLink(), clock=clock)
    ledger._renew()
    pacers.append(Pacer(ledger=ledger, clock=clock))
    assert [pacers[0].admit(1.0) for _ in range(2)] == [0.0, 0.0]
    ledger._renew()  # it reports 2 requests in its last second
    assert on_the_way == [[HOLD_S] * 3, [0.0, 0.0, HOLD_S]]
    assert pacers[0].admit(1.0) == 0.0  # the reply is here: its new rate applies


def test_a_report_that_fails_in_an_unforeseen_way_leaves_no_hold_behind() -> None:
    clock = Clock()

    class BuggyLink:
        def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
            raise TypeError("a bug in the link")

    ledger = Ledger("job", {"rpm": LIMIT}, BuggyLink(), clock=clock)
    with pytest.raises(TypeError):
        ledger._renew()
    assert not ledger.holding(1.0, req=True, tok=False)


def test_a_member_whose_lease_has_lapsed_sends_nothing_until_it_renews() -> None:
    """The coordinator lends a lapsed lease to the others: the member must not keep using it."""
    clock = Clock()
    coordinator = Coordinator(clock=clock)

    link = Link(coordinator)
    ledger = Ledger("job", {"rpm": LIMIT}, link, clock=clock)
    ledger._renew()
    assert ledger.rates() == (pytest.approx(RATE), None)
    link.up = False
    clock.now += LEASE_TTL_S / 2
    ledger._renew()  # late renewals fail: the lease holds until it lapses
    assert ledger.rates() == (pytest.approx(RATE), None)
    clock.now += LEASE_TTL_S / 2 + 0.01
    assert ledger.rates() == (0.0, None)
    link.up = True
    ledger._renew()  # its lapsed lease still counts one window at the coordinator
    clock.now += WINDOW_S
    ledger.waiting()  # it has requests waiting: hungry
    ledger._renew()
    assert ledger.rates() == (pytest.approx(RATE), None)


def test_capacity_moves_between_members_without_ever_exceeding_the_limit() -> None:
    """Random demand, joins and departures: what the members send never sums above the limit.

    Each member sends, between its renewals, at the most its strict window lets
    it (its rate in force before the margin, ``Pacer.admit``) when hungry, or at
    part of it, and reports what it sent in the last second; a member whose
    renewal is late stops sending when its lease ends (``Ledger.rates``). The
    test sums what every member really sent over every sliding second: never
    above the limit itself.
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    rng = random.Random(7)
    renewed: dict[str, float] = {}  # member -> its last renewal
    used: dict[str, float] = {}  # member -> what it sends now (requests/s)
    sends: list[tuple[str, float, float, float]] = []  # (member, from, to, requests/s)

    def sent(since: float, name: str | None = None) -> float:
        """Requests sent from ``since`` to now (by ``name``, or by all)."""
        live = [(m, renewed[m], min(clock.now, renewed[m] + LEASE_TTL_S), used[m]) for m in used]
        return sum(
            r * max(0.0, min(b, clock.now) - max(a, since))
            for m, a, b, r in sends + live
            if name is None or m == name
        )

    members = {"a"}
    for step in range(4_000):
        if rng.random() < 0.01:
            members.add(f"m{step}")
        if len(members) > 1 and rng.random() < 0.01:
            members.discard(rng.choice(sorted(members)))  # stops renewing (and sending): dies
        for gone in set(used) - members:
            sends.append((gone, renewed[gone], renewed[gone] + LEASE_TTL_S, used.pop(gone)))
        name = rng.choice(sorted(members))
        last = renewed.get(name, clock.now)
        last_second = (sent(clock.now - WINDOW_S, name), 0.0)
        if name in used:
            sends.append((name, last, min(clock.now, last + LEASE_TTL_S), used.pop(name)))
        hungry = rng.random() < 0.6
        fields = report(hungry=hungry, sent_1s=last_second, interval=clock.now - last)
        fields["config"] = {"rpm": LIMIT, "partitions": 50}
        if rng.random() < 0.05:  # a partition begins; the backlogs skewed, as real jobs are
            fields["begun"] = [int(rng.paretovariate(1.0) * 100)]
        fields["backlog"] = int(rng.paretovariate(1.0) * 100)
        lease = c.lease("job", name, fields)
        renewed[name] = clock.now
        window = lease["rate_req"] / (1 - MARGIN)
        used[name] = window * (1.0 if hungry else rng.uniform(0.0, 1.0))
        clock.now += rng.uniform(0.01, RENEW_S / 2)
        total = sent(clock.now - WINDOW_S)  # the sliding second ending now
        assert total <= RATE / (1 - MARGIN) * WINDOW_S * 1.000001, (step, total)
        sends = [x for x in sends if x[2] > clock.now - 2.0]


# -- dollars ------------------------------------------------------------------------------------
def test_each_provider_of_a_job_is_a_lane_leased_from_limits_of_its_own() -> None:
    """A job's requests to another provider travel as a lane of each member's report: leased
    from a ledger of their own (the limits told hold there too, the learned ones are that
    provider's), lent by the job's work; the budget stays the job's, one."""
    clock = Clock()
    c = Coordinator(clock=clock)
    config = {"rpm": LIMIT, "budget_usd": 1.0, "partitions": 4}
    claude = {"hungry": True, "learned_rpm": 600.0, "learned_otpm": 6_000.0}
    a = c.lease("job", "a", {**report(config=config, begun=[10]), "lanes": {"anthropic": claude}})
    assert a["rate_req"] == pytest.approx(RATE) and a["rate_out"] is None
    lane = a["lanes"]["anthropic"]
    assert lane["rate_req"] == pytest.approx(10 * UNIT)  # its own, lower, limit
    assert lane["rate_out"] == pytest.approx(100 * UNIT)
    assert lane["grant_usd"] == math.inf  # no budget of its own
    for _ in range(8):  # a second member: each lane is split on its own, once a's surplus ages
        clock.now += RENEW_S
        for name in ("a", "b"):
            b = c.lease("job", name, {**report(config=config), "lanes": {"anthropic": claude}})
    assert b["rate_req"] == pytest.approx(RATE / 2)
    assert b["lanes"]["anthropic"]["rate_req"] == pytest.approx(5 * UNIT)
    assert b["lanes"]["anthropic"]["rate_out"] == pytest.approx(50 * UNIT)
    own, other = c._jobs["job"], c._jobs["job/anthropic"]
    assert other.budget_usd is None and own.budget_usd == 1.0
    assert (other.partitions, other.begun, list(other.sizes)) == (4, 1, [10])


def test_a_lane_paces_a_limit_it_learned_from_the_moment_it_learned_it() -> None:
    """Before its first lease a lane spends an even share of the limits told; a limit its
    provider announced after the last lease, an even share of that until the next."""
    clock = Clock()
    coordinator = Coordinator(clock=clock)
    ledger = Ledger("job", {"rpm": LIMIT}, Link(coordinator), clock=clock)
    ledger._renew()
    claude = ledger.lane("anthropic")
    assert claude.rates() == (pytest.approx(RATE), None)  # not leased yet: the told rpm
    ledger._renew()
    assert claude.rates() == (pytest.approx(RATE), None) and claude.output_rate() is None
    claude.learned(None, None, 6_000)  # an answer announces 100 output tokens/s
    assert claude.output_rate() == pytest.approx(100 * UNIT)
    claude.waiting()  # its requests wait for the bucket: it would use more
    ledger._renew()
    assert claude.output_rate() == pytest.approx(100 * UNIT)  # lent by the ledger now
    assert coordinator._jobs["job/anthropic"].limits()[2] == pytest.approx(100 * UNIT)


def budget_report(**fields: Any) -> dict[str, Any]:
    return {"config": {"budget_usd": 1.0}, "hungry": True, **fields}


def test_allowances_are_granted_out_of_what_is_left_and_the_cap_stops_the_job() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    a = c.lease("job", "a", budget_report(need_usd=0.3, want_usd=0.6))
    assert a["grant_usd"] == pytest.approx(0.6)
    b = c.lease("job", "b", budget_report(need_usd=0.3, want_usd=0.6))
    assert b["grant_usd"] == pytest.approx(0.4)  # all that is left
    # b wants more while a's reserve is out: it waits (nothing granted, no stop).
    waits = c.lease("job", "b", budget_report(allowance=0.4, need_usd=0.05))
    assert waits["grant_usd"] == 0.0 and waits["stop"] is None
    # a settles: 0.55 spent of its 0.6, 0.05 kept; b may have the 0.05 left.
    c.lease("job", "a", budget_report(spent_usd=0.55, allowance=0.0))
    assert c.lease("job", "b", budget_report(allowance=0.4, need_usd=0.05))["grant_usd"] > 0
    # b spends all of its 0.45: the settled spend alone leaves no room: the job stops.
    stopped = c.lease("job", "b", budget_report(spent_usd=0.45, allowance=0.0, need_usd=0.05))
    assert stopped["grant_usd"] == 0.0
    assert stopped["stop"].startswith("budget reached")
    state = c.snapshot("job")
    assert state is not None
    assert state["spent_usd"] + state["outstanding_usd"] <= 1.0 + 1e-9


def test_a_dead_members_allowance_counts_as_spent() -> None:
    """It may have paid for requests it could not report: the cap must still hold."""
    clock = Clock()
    c = Coordinator(clock=clock)
    c.lease("job", "dead", budget_report(need_usd=0.4, want_usd=0.4))
    clock.now += LEASE_TTL_S + 0.1
    c.lease("job", "a", budget_report())
    state = c.snapshot("job")
    assert state is not None and state["spent_usd"] == pytest.approx(0.4)


def test_the_real_pacers_of_members_that_come_and_go_never_pass_the_limit_together() -> None:
    """Members with their real ``Ledger`` and ``Pacer``, on one clock: every send counted.

    Demand changes at random (all it can send, a trickle, bursts, nothing),
    members join, finish and die. Every request each pacer lets out is stamped;
    no sliding second of the whole job holds more than the limit, and the job
    does reach it. (The pacers' even spacing does most of the work here: the
    test above, whose members send at a constant rate per lease, is the one
    that checks the commitments.)
    """
    clock = Clock()
    coordinator = Coordinator(clock=clock)
    rng = random.Random(11)

    class Member:
        def __init__(self, name: str) -> None:
            self.name = name
            self.ledger = Ledger(
                "job", {"rpm": LIMIT, "partitions": 40}, Link(coordinator), clock=clock
            )
            self.ledger.member = name
            self.pacer = Pacer(ledger=self.ledger, clock=clock)
            self.next_renewal = clock.now + rng.uniform(0.0, RENEW_S)
            self.demand = 0.0  # requests/s (inf: all it may send)
            self.queued = 0
            self.ready = clock.now  # when its next request may be tried
            self.booked = False
            self.ledger.partition_began(int(rng.paretovariate(1.0) * 100))
            self.ledger._renew()

    sends: deque[float] = deque()
    peak = 0
    members: dict[str, Member] = {"m0": Member("m0")}
    tick = 0.002
    for step in range(20_000):  # 40 s
        clock.now += tick
        if rng.random() < tick / 3:  # a member joins every 3 s or so
            members[f"m{step}"] = Member(f"m{step}")
        if len(members) > 1 and rng.random() < tick / 6:  # or leaves: its work is done, or it died
            gone = members.pop(rng.choice(sorted(members)))
            if rng.random() < 0.5:
                gone.ledger._renew(release=True)
        for m in members.values():
            if rng.random() < tick / 2:  # its demand changes every 2 s or so
                m.demand = rng.choice([math.inf, math.inf, rng.uniform(0.0, 60.0), 0.0])
            if clock.now >= m.next_renewal:
                m.next_renewal += RENEW_S
                m.ledger._renew()
            if m.demand == math.inf:
                m.queued = max(m.queued, 1)
            elif rng.random() < m.demand * tick:
                m.queued += 1
            if rng.random() < tick:  # a burst: a dependent chain's requests, answers back
                m.queued += rng.randint(10, 60)
            while m.queued and clock.now >= m.ready:
                if not m.booked:
                    wait = m.pacer.reserve(1.0)
                    if wait is None:
                        m.ready = clock.now + RENEW_S
                        break
                    m.booked = True
                    m.ready = clock.now + wait
                    continue
                late = m.pacer.admit(1.0)
                if late > 0:
                    m.ready = clock.now + late
                    break
                m.booked = False
                m.queued -= 1
                m.ledger.rows_done(1)
                sends.append(clock.now)
                while sends[0] <= clock.now - WINDOW_S:
                    sends.popleft()
                peak = max(peak, len(sends))
        assert len(sends) <= 100, (step, len(sends))
    assert peak >= 90  # and the test did drive the job near its limit


def test_a_ledger_silent_for_seconds_holds_the_sends_and_stops_the_job_only_once_gone() -> None:
    """A worker's event loop blocked for ~5 s (a probe of the user's on it) stopped a
    30,000-row job: "the job's ledger is gone" came after 3 s of silence. Now a silence
    holds the sends (a lapsed lease leases nothing) and the job stops after ``GONE_S``."""
    clock = Clock()
    coordinator = Coordinator(clock=clock)
    stops: list[str] = []

    link = Link(coordinator, failure=TimeoutError)  # the worker's loop did not answer
    ledger = Ledger("job", {"rpm": LIMIT}, link, clock=clock, on_stop=stops.append)
    ledger._renew()
    link.up = False
    clock.now += LEASE_TTL_S + 0.01
    for _ in range(10):  # 10 s more of failed renewals, the lease lapsed
        ledger._renew()
        assert ledger.rates() == (0.0, None)  # held, not overspent
        clock.now += 1.0
    assert stops == []
    link.up = True
    for _ in range(10):  # back: the coordinator lends it a share again within seconds
        ledger._renew()
        if ledger.rates()[0]:
            break
        clock.now += RENEW_S
    assert (ledger.rates()[0] or 0.0) > 0.0
    link.up = False
    clock.now += GONE_S + LEASE_TTL_S + 0.1
    ledger._renew()
    assert stops and "ledger is gone" in stops[0]
