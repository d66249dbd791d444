"""The job's ledger: capacity follows demand, never above the limit; a hard dollar cap.

All on a clock the tests move by hand: no sleeping, no processes.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from dask_llm._coordinator import LEASE_TTL_S, MARGIN, RENEW_S, WINDOW_S, Coordinator

LIMIT = 100 / 60 * 60 * 60  # rpm for 100 requests/s
RATE = 100 * (1 - MARGIN)  # what the whole job may use, per second


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_a_member_with_little_work_keeps_what_it_uses_and_the_rest_goes_to_the_hungry() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    leases: dict[str, Any] = {}
    for _ in range(12):
        leases = renew_all(c, clock, {"big": {}, "small": {"hungry": False, "used_req": 8.0}})
    assert leases["small"]["rate_req"] == pytest.approx(8.0 * 1.25)
    assert leases["big"]["rate_req"] == pytest.approx(RATE - 10.0)


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


def test_a_member_that_stops_renewing_gives_its_share_back_within_three_seconds() -> None:
    clock = Clock()
    c = Coordinator(clock=clock)
    for _ in range(12):
        renew_all(c, clock, {"a": {}, "dead": {}})
    died = clock.now
    while c.lease("job", "a", report())["rate_req"] < RATE * 0.99:
        clock.now += RENEW_S
        assert clock.now - died < LEASE_TTL_S + WINDOW_S + 0.5


def test_capacity_moves_between_members_without_ever_exceeding_the_limit() -> None:
    """Random demand, joins and departures: the rates in force never sum above the limit.

    A member may use a rate from the moment it is granted until one window after a
    lower grant replaced it (its requests of the last second still count at the
    provider): that is what is summed, at every renewal.
    """
    clock = Clock()
    c = Coordinator(clock=clock)
    rng = random.Random(7)
    in_force: dict[str, list[tuple[float, float]]] = {}  # member -> [(granted at, rate)]
    members = {"a"}
    for step in range(2_000):
        if rng.random() < 0.02:
            members.add(f"m{step}")
        if len(members) > 1 and rng.random() < 0.02:
            members.discard(rng.choice(sorted(members)))  # stops renewing: dies
        name = rng.choice(sorted(members))
        hungry = rng.random() < 0.6
        lease = c.lease("job", name, report(hungry=hungry, used_req=rng.uniform(0, 60)))
        in_force.setdefault(name, []).append((clock.now, lease["rate_req"]))
        clock.now += rng.uniform(0.01, RENEW_S / 2)
        total = 0.0
        for grants in in_force.values():
            recent = [r for t, r in grants if t >= clock.now - WINDOW_S - RENEW_S]
            total += max(recent) if recent else 0.0
        assert total <= RATE * 1.000001, (step, total)


# -- dollars ------------------------------------------------------------------------------------
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
