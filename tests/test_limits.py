"""Pacing, AIMD and backoff logic, on a clock the tests move by hand (no sleeping)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from dask_llm._limits import _RATE_BACKOFF, _RATE_RECOVERY_S, _SAFETY, Concurrency, Pacer, Throttle
from dask_llm._retry import RetryPolicy, classify, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pacer_without_limits_never_waits() -> None:
    pacer = Pacer(clock=Clock())
    assert [pacer.reserve(500) for _ in range(100)] == [0.0] * 100


def test_pacer_spaces_requests_at_the_rpm_with_a_safety_margin() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # 10/s, paced a little below
    waits = [pacer.reserve(1) for _ in range(20)]
    assert waits[0] == 0.0
    step = 1 / (10 * _SAFETY)
    assert waits[-1] == pytest.approx(19 * step)
    # Requests booked within any 1 s window never exceed rpm/60.
    starts = [clock.now + w for w in waits]
    assert max(sum(1 for t in starts if s <= t < s + 1) for s in starts) <= 10


def test_late_arrivals_are_held_to_the_rate_over_any_second() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # 10/s, held a little below
    # A busy loop sends ten booked requests at once: the tenth must wait.
    assert [pacer.admit() for _ in range(9)] == [0.0] * 9
    assert pacer.admit() == pytest.approx(1.0)
    clock.now += 1.0
    assert pacer.admit() == 0.0


def test_pacer_time_passing_frees_the_budget() -> None:
    clock = Clock()
    pacer = Pacer(rpm=60, clock=clock)
    assert pacer.reserve(1) == 0.0
    assert pacer.reserve(1) == pytest.approx(1 / _SAFETY)
    clock.now += 10
    assert pacer.reserve(1) == 0.0


def test_pacer_paces_tokens_by_cost() -> None:
    clock = Clock()
    pacer = Pacer(tpm=60_000, clock=clock)  # 1,000 tokens/s before the margin
    assert pacer.reserve(2_000) == 0.0
    assert pacer.reserve(10) == pytest.approx(2_000 / (1_000 * _SAFETY))


def test_pacer_splits_the_budget_between_processes() -> None:
    clock = Clock()
    alone, shared = Pacer(rpm=600, clock=clock), Pacer(rpm=600, share=2, clock=clock)
    alone.reserve(1)
    shared.reserve(1)
    assert shared.reserve(1) == pytest.approx(2 * alone.reserve(1))


def test_pacer_learns_the_limit_from_headers_and_keeps_the_lower_one() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    pacer.learn({"x-ratelimit-limit-requests": "3000", "x-ratelimit-limit-tokens": "bogus"})
    assert pacer.rates()[0] == pytest.approx(50 * _SAFETY)
    assert pacer.rates()[1] is None
    given = Pacer(rpm=600, clock=clock)
    given.learn({"x-ratelimit-limit-requests": "3000"})
    assert given.rates()[0] == pytest.approx(10 * _SAFETY)


def test_an_isolated_429_holds_starts_until_retry_after_but_keeps_the_rate() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)
    before = pacer.rates()[0]
    pacer.rejected(started=clock.now - 0.5, retry_after=0.25)
    assert pacer.rates()[0] == before
    assert pacer.reserve(1) == pytest.approx(0.25)


def test_repeated_429s_slow_the_pacer_once_per_burst_then_it_recovers() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)
    before = pacer.rates()[0]
    for _ in range(4):  # 5% of 10 s at 9.7/s is about 5: not yet
        pacer.rejected(started=clock.now - 0.5, retry_after=None)
    assert pacer.rates()[0] == before
    pacer.rejected(started=clock.now - 0.5, retry_after=None)
    assert pacer.rates()[0] == pytest.approx(before * _RATE_BACKOFF)
    pacer.rejected(started=clock.now - 0.4, retry_after=None)  # same burst: no second cut
    assert pacer.rates()[0] == pytest.approx(before * _RATE_BACKOFF)
    clock.now += _RATE_RECOVERY_S / 2
    assert before * _RATE_BACKOFF < pacer.rates()[0] < before
    clock.now += _RATE_RECOVERY_S / 2 + 0.01
    assert pacer.rates()[0] == pytest.approx(before)


def test_a_burst_sent_before_the_limit_was_known_is_paid_back() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    for _ in range(20):
        assert pacer.reserve(1) == 0.0  # no limit known yet
    pacer.learn({"x-ratelimit-limit-requests": "3000"})  # 50/s, paced a little below
    wait = pacer.reserve(1)
    assert wait == pytest.approx(19 / (50 * _SAFETY))


def test_concurrency_slow_start_then_multiplicative_decrease() -> None:
    clock = Clock()
    c = Concurrency(initial=4, cap=100, clock=clock)
    for _ in range(10):
        c.on_success()
    assert c.limit == 14
    c.on_overload(started=clock.now - 0.1)
    assert c.limit == 7
    # More 429s from the same burst (requests started before the cut) change nothing.
    c.on_overload(started=clock.now - 0.05)
    assert c.limit == 7
    clock.now += 1
    # After the first 429, growth is additive: about +1 per `limit` successes.
    for _ in range(7):
        c.on_success()
    assert 7.9 < c.limit < 8.1
    c.on_overload(started=clock.now)
    assert 3.9 < c.limit < 4.1


def test_concurrency_cap_is_hard() -> None:
    c = Concurrency(initial=50, cap=8, clock=Clock())
    assert c.limit == 8
    for _ in range(100):
        c.on_success()
    assert c.limit == 8
    assert [c.try_acquire() for _ in range(9)] == [True] * 8 + [False]


def test_concurrency_never_below_one() -> None:
    clock = Clock()
    c = Concurrency(initial=2, cap=8, clock=clock)
    for _ in range(5):
        clock.now += 1
        c.on_overload(started=clock.now)
    assert c.limit == 1


def test_waiters_are_woken_in_order_across_event_loops_without_sleeping() -> None:
    c = Concurrency(initial=1, cap=1, clock=Clock())
    order: list[int] = []

    async def main() -> None:
        await c.acquire()

        async def waiter(k: int) -> None:
            await c.acquire()
            order.append(k)
            c.release()

        tasks = [asyncio.create_task(waiter(k)) for k in range(3)]
        await asyncio.sleep(0)
        assert c.in_flight == 1 and len(c._waiters) == 3
        c.release()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == [0, 1, 2]
    assert c.in_flight == 0


def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    c = Concurrency(initial=1, cap=1, clock=Clock())

    async def main() -> None:
        await c.acquire()
        task = asyncio.create_task(c.acquire())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        c.release()
        assert c.in_flight == 0
        await asyncio.wait_for(c.acquire(), 1)
        c.release()

    asyncio.run(main())


def test_throttle_estimate_is_corrected_by_reported_usage() -> None:
    t = Throttle(max_concurrency=4, clock=Clock())
    first = t.estimate_tokens(prompt_chars=4_000, max_tokens=100)
    assert first == pytest.approx(1_100)
    t.record_estimate(1_100)
    t.record_usage(prompt_tokens=2_000, completion_tokens=200)  # the estimate was half
    assert t.estimate_tokens(prompt_chars=4_000, max_tokens=100) == pytest.approx(2_200)


def test_throttle_cuts_concurrency_on_429_only_when_the_rate_is_unknown() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=64, initial_concurrency=16, clock=clock)
    t.observe(clock.now, 429, {"retry-after": "1"})
    assert t.rate_limited == 1 and t.concurrency.limit == 8
    paced = Throttle(max_concurrency=64, initial_concurrency=16, clock=clock)
    paced.observe(clock.now, 200, {"x-ratelimit-limit-requests": "3000"})
    assert paced.concurrency.limit == 64  # pacing governs: concurrency opens to the cap
    paced.observe(clock.now, 429, {"retry-after-ms": "20"})
    assert paced.rate_limited == 1 and paced.concurrency.limit == 64


@pytest.mark.parametrize(
    ("retry", "waits"),
    [
        pytest.param(1, [0.5], id="first-retry-capped-at-wait_initial"),
        pytest.param(3, [2.0], id="doubles-per-retry"),
        pytest.param(20, [30.0], id="capped-at-wait_max"),
    ],
)
def test_backoff_is_full_jitter_under_a_doubling_cap(retry: int, waits: list[float]) -> None:
    policy = RetryPolicy(wait_initial=0.5, wait_max=30.0)
    assert policy.backoff(retry, rng=lambda: 1.0) == waits[0]
    assert policy.backoff(retry, rng=lambda: 0.0) == 0.0


class _Headers(dict[str, str]):
    pass


class _Response:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = _Headers(headers)


class _Err(Exception):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("x")
        self.response = _Response(headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500", "retry-after": "9"}, 1.5, id="ms-wins"),
        pytest.param({"retry-after": "2"}, 2.0, id="seconds"),
        pytest.param({"retry-after": "0"}, 0.0, id="zero-means-now"),
        pytest.param({"retry-after-ms": "0"}, 0.0, id="zero-ms-means-now"),
        pytest.param({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, id="past-http-date"),
        pytest.param({"retry-after": "soon"}, None, id="unparseable"),
        pytest.param({}, None, id="absent"),
    ],
)
def test_retry_after_reads_the_headers(headers: dict[str, str], expected: float | None) -> None:
    """One parser for the throttle and the retries; 0 means now in both."""
    assert retry_after(headers) == expected


def test_retry_after_reads_a_future_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after({"retry-after": when})
    assert wait is not None and 25 < wait <= 30


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(ValueError("user code"), None, id="python-error-not-retried"),
        pytest.param(TimeoutError(), "transient", id="timeout"),
        pytest.param(ConnectionResetError(), "transient", id="connection-reset"),
    ],
)
def test_classify_plain_exceptions(exc: BaseException, kind: str | None) -> None:
    assert classify(exc) == kind
