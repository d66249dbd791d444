"""Each shape of 429 (and the 529) a provider sends, read the way the provider meant it.

Through the real ``ChatOpenAI`` and the simulator: what slows the job is a
*quota* 429 (``Outcome.quota``), which the run record labels ``"429 rate
limit"``; every other 429 is ``"429 other"`` (or ``"429 unavailable"`` for
Flex) and is retried after its ``Retry-After`` with its start given back
(``tests/test_limits`` holds what each does to the throttle, on a clock).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import dask_llm
from dask_llm.limits.pacer import Throttle
from dask_llm.transport.wire import outcome_of
from tests.chains import summary_chain
from tests.conftest import API_KEY
from tests.helpers import reviews

#: Fast retries (the floor is still each answer's Retry-After).
FAST = dask_llm.RetryPolicy(attempts=10, wait_initial=0.01, wait_max=0.05)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def enrich(sim: Any, rows: int, **options: Any) -> tuple[dict[str, int], float]:
    """Run the summary chain over ``rows`` rows; the run record's failed requests by kind,
    and the wall time."""
    start = time.monotonic()
    out = reviews(rows).llm.enrich(
        [dask_llm.Chain(summary_chain(sim.base_url), name="s")],
        cache=False,
        progress=False,
        retry=FAST,
        **options,
    )
    wall = time.monotonic() - start
    assert out["llm_error"].isna().all()
    summary = dask_llm.last_run()
    assert summary is not None and summary.record is not None
    return {k: sum(v) for k, v in summary.record.error_series().items()}, wall


def test_a_header_less_rate_limit_429_while_the_quota_has_room_does_not_slow(
    make_simulator: Any,
) -> None:
    """The issue's shape: ``rate_limit_exceeded``, ``retry-after`` alone, while every 200
    says the quota is far from spent: retried, not the quota's."""
    sim = make_simulator(
        rpm=60_000,
        limit_mode="bucket",
        spurious_429=0.3,
        spurious_429_shape="rate_limit",
        spurious_retry_after=0.05,
        seed=0,  # the first request is answered: a reading before any stray 429
    )
    # One request in flight: each stray 429 comes after a 200 of the last moment.
    kinds, _ = enrich(sim, 30, rpm=60_000, max_concurrency=1)
    strays = sim.stats()["faults"]["spurious_429"]
    assert strays >= 3
    assert kinds == {"429 other": strays}


def test_a_429_whose_headers_say_the_quota_is_spent_slows(make_simulator: Any) -> None:
    """10 requests a second, not told: the opening burst of 16 meets quota 429s that say
    ``remaining: 0``."""
    sim = make_simulator(rpm=600)
    kinds, _ = enrich(sim, 16)
    limited = sim.stats()["rate_limited"]
    assert limited > 0
    assert kinds == {"429 rate limit": limited}


def test_a_header_less_429_with_no_headers_to_read_against_is_the_quotas(
    make_simulator: Any,
) -> None:
    """A provider that sends no rate-limit headers at all: a ``rate_limit_exceeded`` is the
    quota's (it is the only signal AIMD has), and waits its ``Retry-After``."""
    sim = make_simulator(
        spurious_429=0.3, spurious_429_shape="rate_limit", spurious_retry_after=0.3, seed=1
    )
    kinds, wall = enrich(sim, 12)
    strays = sim.stats()["faults"]["spurious_429"]
    assert strays > 0
    assert kinds == {"429 rate limit": strays}
    assert wall >= 0.3  # retry-after: 0.3 (a lower bound: a busy machine only adds to it)


def test_a_header_less_429_while_the_freshest_headers_say_near_0_is_the_quotas(
    make_simulator: Any,
) -> None:
    """Answers of the simulator, read by the transport's own functions: a 200 that leaves
    a 60 rpm bucket empty (``remaining: 0``), then the issue's header-less 429; and the
    same 429 after a 200 of a bucket with room."""
    empty = make_simulator(rpm=60, limit_mode="bucket")
    roomy = make_simulator(rpm=60_000, limit_mode="bucket")
    stray = make_simulator(spurious_429=1.0, spurious_429_shape="rate_limit")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(headers=auth) as http:

        def ask(sim: Any) -> httpx.Response:
            return http.post(f"{sim.base_url}/chat/completions", json=BODY)

        for before, quota in ((empty, True), (roomy, False)):
            throttle = Throttle(max_concurrency=16)
            answered = ask(before)
            assert answered.status_code == 200
            throttle.observe(time.monotonic(), 200, answered.headers)
            refused = ask(stray)
            assert refused.status_code == 429
            assert not any(k.startswith("x-ratelimit") for k in refused.headers)
            outcome = outcome_of(
                429,
                refused.headers,
                refused.content,
                refused.request,
                room=throttle.headroom().room(),
            )
            assert outcome.quota is quota, answered.headers


def test_a_flex_resource_unavailable_429_does_not_slow(make_simulator: Any) -> None:
    sim = make_simulator(flex_unavailable=0.3, rpm=60_000, seed=3)
    kinds, _ = enrich(sim, 20, service_tier="flex")
    unavailable = sim.stats()["faults"]["flex_unavailable"]
    assert unavailable > 0
    assert kinds == {"429 unavailable": unavailable}


@pytest.mark.parametrize(
    "told", [pytest.param(None, id="learned"), pytest.param(60_000, id="told")]
)
def test_a_529_overloaded_is_retried_after_its_retry_after_and_is_no_429(
    make_simulator: Any, told: int | None
) -> None:
    sim = make_simulator(overloaded=0.3, spurious_retry_after=0.5, rpm=60_000, seed=2)
    kinds, wall = enrich(sim, 12, rpm=told)
    stats = sim.stats()
    overloaded = stats["faults"]["overloaded"]
    assert overloaded > 0 and stats["rate_limited"] == 0
    assert kinds == {"529": overloaded}
    assert wall >= 0.5  # retry-after-ms: 500, honoured
