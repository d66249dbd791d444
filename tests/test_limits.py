"""Pacing, AIMD and backoff logic, on a clock the tests move by hand (no sleeping)."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import sys
import time

import pytest

from dask_llm.core.config import UNPACED_MAX_CONCURRENCY, RetryPolicy
from dask_llm.engine.retry import classify
from dask_llm.limits.coordinator import MARGIN
from dask_llm.limits.headers import FRESH_S, Headroom, is_quota_429, retry_after
from dask_llm.limits.pacer import (
    _RATE_BACKOFF,
    _RATE_RECOVERY_S,
    ADMIT_WINDOW_S,
    AUTO_MAX_CONCURRENCY,
    CATCH_UP_S,
    FOLLOW_S,
    HEADROOM,
    OUTPUT_BUCKET_S,
    OUTPUT_LATE_S,
    SPARE,
    Concurrency,
    OutputBucket,
    Pacer,
    Throttle,
    Throttles,
    auto_max_concurrency,
)
from dask_llm.providers import OPENAI

if sys.platform != "win32":
    import resource


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pacer_without_limits_never_waits() -> None:
    pacer = Pacer(clock=Clock())
    assert [pacer.reserve(500) for _ in range(100)] == [0.0] * 100


def booked_starts(pacer: Pacer, clock: Clock, n: int, tokens: float = 1) -> list[float]:
    """Start times of ``n`` requests, letting time pass when the pacer says "not yet"."""
    starts = []
    while len(starts) < n:
        wait = pacer.reserve(tokens)
        if wait is None:
            clock.now += 0.05  # nothing booked: come back later
        else:
            starts.append(clock.now + wait)
    return starts


def test_pacer_spaces_requests_at_the_rpm_with_a_margin_and_no_burst() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # 10/s, paced a little below
    starts = booked_starts(pacer, clock, 20)
    step = 1 / (10 * (1 - MARGIN))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(step)  # no burst allowance, even at the start
    assert starts[-1] - starts[0] == pytest.approx(19 * step)
    assert max(sum(1 for t in starts if s <= t < s + 1) for s in starts) <= 10


def test_a_process_that_fell_behind_catches_up_a_little_and_no_more() -> None:
    """A slot missed while the loop was busy is made up, up to CATCH_UP_S of them."""
    clock = Clock()
    pacer = Pacer(rpm=6000, clock=clock)  # 100/s: paced at 98/s
    step = 1 / (100 * (1 - MARGIN))
    assert pacer.reserve(1) == 0.0
    clock.now += 3 * step  # two slots missed
    assert [pacer.reserve(1) for _ in range(3)] == [0.0, 0.0, 0.0]  # made up at once
    assert pacer.reserve(1) == pytest.approx(step)  # then the schedule again
    clock.now += 5.0  # a long stall: only CATCH_UP_S of it is made up
    made_up = 0
    while pacer.reserve(1) == 0.0:
        made_up += 1
    assert made_up == int(CATCH_UP_S / step) + 1


def test_the_pacer_books_at_most_one_renewal_ahead() -> None:
    """Beyond that it says "ask again", so that a lease that grows applies at once."""
    clock = Clock()
    pacer = Pacer(rpm=60, clock=clock)  # about one a second
    assert pacer.reserve(1) == 0.0
    assert pacer.reserve(1) is None


def test_late_arrivals_are_held_to_the_limit_over_any_second_and_a_guard() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # 10/s: paced at 9.8/s, at most 10 in any 1.01 s
    # A busy loop sends eleven booked requests at once: the eleventh must wait.
    assert [pacer.admit(1) for _ in range(10)] == [0.0] * 10
    assert pacer.admit(1) == pytest.approx(ADMIT_WINDOW_S)
    clock.now += 1.0
    assert pacer.admit(1) > 0  # a second later, the guard still holds it
    clock.now += ADMIT_WINDOW_S - 1.0
    assert pacer.admit(1) == 0.0


def test_a_burst_does_not_echo_at_the_edge_of_the_providers_second() -> None:
    """Paced requests never fill the window, so none is sent the instant an old one leaves.

    A window of exactly 1 s, full, admits the next request as the oldest leaves it:
    the provider, stamping the old one a few ms late, sees both in one second.
    """
    clock = Clock()
    pacer = Pacer(rpm=6000, clock=clock)  # 100/s: paced at 98/s
    starts: list[float] = []
    end = clock.now + 10.0
    while clock.now < end:
        wait = pacer.reserve(1)
        assert wait is not None
        clock.now += wait
        assert pacer.admit(1) == 0.0  # pacing alone keeps it under the window
        starts.append(clock.now)
    # Even if each request reached the provider up to 10 ms late, no second holds more.
    assert max(sum(1 for t in starts if at - ADMIT_WINDOW_S < t <= at) for at in starts) <= 100
    assert len(starts) == pytest.approx(1000 * (1 - MARGIN), abs=2)  # the pace: the paced rate


def test_the_strict_window_stays_looser_than_the_pace() -> None:
    """Over its window, a share lets through more than pacing sends (else it binds)."""
    assert 1.0 / ADMIT_WINDOW_S >= (1.0 - MARGIN) * 1.005


def test_a_request_counts_from_its_write_and_as_sent_until_then() -> None:
    """Admitted at t and written at t + 0.3 s (another thread held the GIL), a request is
    in the provider's second until t + 1.3 s: the window counts it from its write."""
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)  # at most 10 in any 1.01 s
    assert [pacer.admit(1, unwritten=True) for _ in range(10)] == [0.0] * 10
    clock.now += 5.0
    assert pacer.admit(1) > 0  # none of them is on the wire yet: each counts as sent now
    clock.now += 0.3
    for _ in range(10):
        pacer.written(1)
    clock.now += 1.0
    assert pacer.admit(1) > 0  # a second after their writes, 5.3 s after their admission
    clock.now += ADMIT_WINDOW_S - 1.0
    assert pacer.admit(1) == 0.0
    pacer.written(1)  # one more than was admitted unwritten: nothing to move
    assert [pacer.admit(1) for _ in range(9)] == [0.0] * 9
    assert pacer.admit(1) > 0


def test_a_throttle_paces_at_the_write_when_the_caller_admits_there() -> None:
    """``acquire(admit=False)`` takes a slot and books nothing: the booking is the write's."""
    clock = Clock()
    throttle = Throttle(max_concurrency=8, rpm=60, clock=clock)  # about one a second

    async def main() -> None:
        for _ in range(3):
            await throttle.acquire(1, admit=False)
        assert throttle.concurrency.in_flight == 3
        assert throttle.pacer.reserve(1) == 0.0  # the first booking: none was made before

    asyncio.run(main())


def test_tokens_too_are_held_over_any_second() -> None:
    clock = Clock()
    pacer = Pacer(tpm=60_000, clock=clock)  # 1,000 tokens/s before the margin
    assert pacer.admit(600) == 0.0
    assert pacer.admit(600) == pytest.approx(ADMIT_WINDOW_S)  # 1,200 tokens in one second: no
    clock.now += ADMIT_WINDOW_S
    assert pacer.admit(600) == 0.0
    assert pacer.admit(5_000) > 0  # one request larger than a second's tokens waits its turn
    clock.now += ADMIT_WINDOW_S
    assert pacer.admit(5_000) == 0.0  # and then goes alone


def test_pacer_time_passing_frees_the_budget() -> None:
    clock = Clock()
    pacer = Pacer(rpm=60, clock=clock)
    assert pacer.reserve(1) == 0.0
    clock.now += 0.9
    assert pacer.reserve(1) == pytest.approx(1 / (1 - MARGIN) - 0.9)
    clock.now += 10
    assert pacer.reserve(1) == 0.0


def test_pacer_paces_tokens_by_cost() -> None:
    clock = Clock()
    pacer = Pacer(tpm=60_000, clock=clock)  # 1,000 tokens/s before the margin
    starts = booked_starts(pacer, clock, 2, tokens=2_000)
    assert starts[1] - starts[0] == pytest.approx(2_000 / (1_000 * (1 - MARGIN)))


class FixedLease:
    """What a ledger gives the pacer: this process's share of the job's rate."""

    def __init__(self, req: float | None, tok: float | None = None) -> None:
        self.req, self.tok = req, tok
        self.waited = 0
        self.starts = 0

    def rates(self) -> tuple[float | None, float | None]:
        return self.req, self.tok

    def waiting(self) -> None:
        self.waited += 1

    def started(self, tokens: float) -> None:
        self.starts += 1

    def learned(self, rpm: float | None, tpm: float | None) -> None:
        pass

    def holding(self, tokens: float, *, req: bool, tok: bool) -> bool:
        return False


def test_the_pacer_spends_the_leased_rate_and_says_when_it_waits() -> None:
    clock = Clock()
    lease = FixedLease(req=5.0)
    pacer = Pacer(ledger=lease, clock=clock)
    assert pacer.reserve(1) == 0.0 and pacer.reserve(1) == pytest.approx(0.2)
    assert lease.waited == 1  # hungry: the ledger will ask for more
    lease.req = 50.0  # the lease grows: the next start follows at the new rate
    assert pacer.reserve(1) == pytest.approx(0.2 + 0.02)
    lease.req = 0.0  # no share leased now
    assert pacer.reserve(1) is None
    lease.req = 5.0
    assert [pacer.admit(1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lease.starts == 3


def test_pacer_learns_the_limit_from_headers_and_keeps_the_lower_one() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    said = OPENAI.announced(
        {"x-ratelimit-limit-requests": "3000", "x-ratelimit-limit-tokens": "bogus"}
    )
    pacer.learn(said.rpm, said.tpm)
    assert pacer.rates()[0] == pytest.approx(50 * (1 - MARGIN))
    assert pacer.rates()[1] is None
    given = Pacer(rpm=600, clock=clock)
    given.learn(OPENAI.announced({"x-ratelimit-limit-requests": "3000"}).rpm, None)
    assert given.rates()[0] == pytest.approx(10 * (1 - MARGIN))


def test_an_isolated_quota_429_holds_starts_until_retry_after_but_keeps_the_rate() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)
    before = pacer.rates()[0]
    pacer.rejected(started=clock.now - 0.5, retry_after_s=0.25)
    assert pacer.rates()[0] == before
    assert pacer.reserve(1) == pytest.approx(0.25)


def test_repeated_quota_429s_slow_the_pacer_once_per_burst_then_it_recovers() -> None:
    clock = Clock()
    pacer = Pacer(rpm=600, clock=clock)
    before = pacer.rates()[0]
    for _ in range(4):  # 5% of 10 s at 9.7/s is about 5: not yet
        pacer.rejected(started=clock.now - 0.5, retry_after_s=None)
    assert pacer.rates()[0] == before
    pacer.rejected(started=clock.now - 0.5, retry_after_s=None)
    assert pacer.rates()[0] == pytest.approx(before * _RATE_BACKOFF)
    pacer.rejected(started=clock.now - 0.4, retry_after_s=None)  # same burst: no second cut
    assert pacer.rates()[0] == pytest.approx(before * _RATE_BACKOFF)
    clock.now += _RATE_RECOVERY_S / 2
    assert before * _RATE_BACKOFF < pacer.rates()[0] < before
    clock.now += _RATE_RECOVERY_S / 2 + 0.01
    assert pacer.rates()[0] == pytest.approx(before)


SPENT = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
LEFT = {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "9000"}


@pytest.mark.parametrize(
    ("headers", "code", "room", "quota"),
    [
        # Its own headers decide, whatever the other answers said.
        pytest.param(SPENT, "rate_limit_exceeded", True, True, id="requests-spent"),
        pytest.param(
            {"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "0"},
            None,
            True,
            True,
            id="tokens-spent",
        ),
        pytest.param(LEFT, "rate_limit_exceeded", False, False, id="quota-left"),
        # A busy server's code is never the quota's.
        pytest.param({"retry-after": "1"}, "server_overloaded", None, False, id="overloaded"),
        pytest.param({}, "resource_unavailable", False, False, id="flex-unavailable"),
        pytest.param({}, "overloaded_error", None, False, id="anthropic-overloaded"),
        pytest.param({}, "insufficient_quota", None, False, id="billing"),
        # Header-less: the quota's unless the freshest other answers show room.
        pytest.param({}, "rate_limit_exceeded", True, False, id="header-less-while-room"),
        pytest.param({}, "rate_limit_exceeded", None, True, id="header-less-no-fresh-headers"),
        pytest.param({}, "rate_limit_exceeded", False, True, id="header-less-fresh-near-0"),
        pytest.param({"retry-after": "1"}, None, None, True, id="no-headers-no-code"),
        pytest.param({"retry-after": "1"}, None, True, False, id="no-headers-no-code-room"),
    ],
)
def test_only_a_429_of_a_spent_quota_slows_the_job(
    headers: dict[str, str], code: str | None, room: bool | None, quota: bool
) -> None:
    assert is_quota_429(headers, code, room=room) is quota


def test_headroom_reads_the_freshest_headers_for_a_second_and_a_half() -> None:
    clock = Clock()
    room = Headroom(clock=clock)
    assert room.room() is None  # nothing seen yet
    room.saw({"retry-after": "1"})  # no rate-limit headers: no reading
    assert room.room() is None
    room.saw({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2950"})
    assert room.room() is True
    clock.now += FRESH_S
    assert room.room() is True
    clock.now += 0.01
    assert room.room() is None  # stale: a bucket refilled continuously has moved on
    # Room means above a second's worth of the limit (3000 rpm: 50), every kind.
    room.saw({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "50"})
    assert room.room() is False
    room.saw({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "51"})
    assert room.room() is True
    room.saw({**LEFT, "x-ratelimit-limit-tokens": "600000"})  # 9000 < 10000 tokens a second
    assert room.room() is False
    room.saw(SPENT)  # a quota 429's own headers are a reading too
    assert room.room() is False
    room.saw({"x-ratelimit-remaining-requests": "3"})  # no limit given: above 0 is room
    assert room.room() is True


def test_a_throttle_keeps_the_headroom_of_its_answers() -> None:
    """The reading belongs to the job's throttle (one per job per process), fed by observe."""
    clock = Clock()
    t = Throttle(max_concurrency=64, rpm=3000, clock=clock)
    other = Throttle(max_concurrency=64, rpm=3000, clock=clock)
    t.observe(
        clock.now,
        200,
        {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2950"},
    )
    assert t.headroom().room() is True and other.headroom().room() is None


def test_a_429_that_is_not_the_quotas_does_not_touch_pacing_or_concurrency() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=64, initial_concurrency=16, clock=clock)
    for _ in range(50):
        t.observe(clock.now, 429, {"retry-after": "1"}, quota=False)
    assert t.concurrency.limit == 16
    assert t.pacer.reserve(1) == 0.0  # no hold


def test_a_429_that_is_not_the_quotas_gives_its_start_back() -> None:
    """The provider did not count it (no quota spent): neither does the pace."""
    clock = Clock()
    t = Throttle(max_concurrency=64, rpm=600, clock=clock)  # 10 in any 1.01 s
    starts = [clock.now] * 10
    assert [t.pacer.admit(1) for _ in starts] == [0.0] * 10
    assert t.pacer.admit(1) > 0  # the window is full
    t.observe(starts[0], 429, {"retry-after": "1"}, quota=False)
    assert t.pacer.admit(1) == 0.0  # the stray 429's start was given back
    assert t.pacer.admit(1) > 0
    t.observe(starts[1], 429, {"x-ratelimit-remaining-requests": "0"}, quota=True)
    assert t.pacer.admit(1) > 0  # a quota 429 was counted: nothing given back
    # The next booking moves up by one interval.
    clock.now += 5.0
    first = t.pacer.reserve(1)
    second = t.pacer.reserve(1)
    assert first == 0.0 and second is not None and second > 0
    t.observe(clock.now, 429, {}, quota=False)
    assert t.pacer.reserve(1) == pytest.approx(second)


def test_a_529_overloaded_gives_its_start_back_and_slows_nothing() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=64, rpm=600, clock=clock)  # 10 in any 1.01 s
    assert [t.pacer.admit(1) for _ in range(10)] == [0.0] * 10
    assert t.pacer.admit(1) > 0
    t.observe(clock.now, 529, {"retry-after": "1"})
    assert t.pacer.admit(1) == 0.0  # given back
    assert t.pacer.rates()[0] == pytest.approx(10 * (1 - MARGIN))  # no slow-down, no hold
    t.observe(clock.now, 503, {"retry-after": "1"})
    assert t.pacer.admit(1) > 0  # a 503 was counted: nothing given back


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
    """The prompt's estimate is scaled by what answers reported; the output is max_tokens
    (what the provider counts), else the mean output so far; a provider that limits
    output apart counts the prompt alone against tpm."""
    t = Throttle(max_concurrency=4, clock=Clock())
    first = t.estimate_tokens(prompt_chars=4_000, max_tokens=100)
    assert first == pytest.approx(1_100)
    t.record_usage(4_000, prompt_tokens=2_000, completion_tokens=200)  # the prompt was half
    assert t.estimate_tokens(prompt_chars=4_000, max_tokens=100) == pytest.approx(2_100)
    assert t.expected_output(None) == 200 and t.expected_output(64) == 64
    assert t.estimate_tokens(prompt_chars=4_000, max_tokens=None) == pytest.approx(2_200)
    apart = Throttle(max_concurrency=4, output_apart=True, clock=Clock())
    assert apart.estimate_tokens(prompt_chars=4_000, max_tokens=100) == pytest.approx(1_000)


OTPM = 6_000  # output tokens per minute: 100 a second
OUT_RATE = 100 * (1 - MARGIN)  # what a bucket of its own refills at, and what it holds:
OUT_CAP = OUT_RATE * (OUTPUT_BUCKET_S - OUTPUT_LATE_S)  # a second's, less the late arrivals


def test_the_output_bucket_books_in_turn_and_gets_back_what_answers_did_not_use() -> None:
    clock = Clock()
    bucket = OutputBucket(otpm=OTPM, clock=clock)
    # Told: full at the start. Two requests of 40 go now; the third waits for what the
    # bucket lacks; the fourth is booked after it (into debt: in turn, never polled).
    assert bucket.take(40) == (0.0, 40) and bucket.take(40) == (0.0, 40)
    third, booked = bucket.take(40)
    assert booked == 40 and third == pytest.approx((40 - (OUT_CAP - 80)) / OUT_RATE)
    fourth = bucket.take(40)[0]
    assert fourth == pytest.approx(third + 40 / OUT_RATE)
    # The first answer used 10 of its 40: the next booking is 30 tokens sooner.
    bucket.settle(40, 10)
    assert bucket.take(40)[0] == pytest.approx(fourth + 10 / OUT_RATE)
    # A second later the debt is paid by the refill; a reservation larger than the whole
    # bucket goes once the bucket is full, and those after it wait for what it took.
    clock.now += 10.0
    assert bucket.take(500) == (0.0, 500)
    assert bucket.take(10)[0] == pytest.approx((500 - OUT_CAP + 10) / OUT_RATE)


def test_an_output_limit_learned_from_an_answer_starts_from_an_empty_bucket() -> None:
    """The requests sent before the limit was known were not booked: they may hold most of
    the provider's bucket, so this one starts empty (a told limit starts full)."""
    clock = Clock()
    bucket = OutputBucket(clock=clock)
    assert bucket.take(40) == (0.0, 0.0)  # no limit known: not paced, nothing booked
    bucket.learn(OTPM)
    assert bucket.take(40) == (pytest.approx(40 / OUT_RATE), 40)


def left(tokens: float) -> tuple[float, float]:
    """The (remaining, limit) headers of a provider whose bucket holds the share of its
    limit that ``tokens`` are of ours: it counts them out of a minute's limit."""
    return tokens / OUT_CAP * OTPM, OTPM


def test_an_output_limit_learned_starts_from_what_the_answer_says_is_left() -> None:
    """Learned with the remaining header: the provider's level, not an empty bucket (nor a
    full one: the requests sent before it may hold the provider's)."""
    clock = Clock()
    full, spent = OutputBucket(clock=clock), OutputBucket(clock=clock)
    for bucket, tokens in ((full, OUT_CAP), (spent, 10)):
        assert bucket.take(40) == (0.0, 0.0)  # sent before the limit was known
        bucket.learn(OTPM)
        bucket.saw(*left(tokens))
    assert full.take(40) == (0.0, 40)
    assert spent.take(40)[0] == pytest.approx((40 - 10) / OUT_RATE)


def test_the_output_bucket_follows_what_is_left_down_never_up() -> None:
    """Another client spends the account's bucket: an answer saying a smaller share is left
    than ours holds pulls ours down (less what ours booked that the provider may not count
    yet); one saying more changes nothing (ours counts bookings on their way)."""
    clock = Clock()
    bucket = OutputBucket(otpm=OTPM, clock=clock)
    assert bucket.take(20) == (0.0, 20)  # ours holds OUT_CAP - 20
    bucket.saw(*left(OUT_CAP))  # more than ours: ours stays
    assert bucket.take(0.001)[0] == 0.0
    clock.now += 1.0  # refilled; the booking is older than OUTPUT_LATE_S: counted there
    bucket.saw(*left(15))
    assert bucket.take(40)[0] == pytest.approx((40 - 15) / OUT_RATE)
    # A booking of the last OUTPUT_LATE_S (or still to go) may not have reached the
    # provider: what it says is left is less that.
    clock.now += 10.0
    assert bucket.take(30) == (0.0, 30)
    clock.now += OUTPUT_LATE_S / 2
    bucket.saw(*left(50))
    assert bucket.take(40)[0] == pytest.approx((40 - (50 - 30)) / OUT_RATE)
    # A share of the limit, whatever span the provider counts it over: half of it left
    # holds ours to half of its capacity.
    clock.now += 10.0
    bucket.saw(OTPM / 2, OTPM)
    assert bucket.take(OUT_CAP / 2) == (0.0, OUT_CAP / 2)
    assert bucket.take(10)[0] == pytest.approx(10 / OUT_RATE)


def test_a_429_of_spent_output_tokens_empties_the_output_bucket_and_slows_it() -> None:
    """The 429's booking is given back (the provider took none of it), then its headers say
    what is left: the next request waits for it, not for a bucket ours thought full."""
    clock = Clock()
    t = Throttle(max_concurrency=4, output_tpm=OTPM, output_apart=True, clock=clock)
    assert t.output is not None
    _, booked = t.output.take(40)
    clock.now += 1.0
    t.settle_output(booked, 429, None)
    t.observe(clock.now - 0.05, 429, {"retry-after": "1"}, announced=(None, None, OTPM, 0.0))
    # And the output is paced 5% slower, once for the burst, recovering over 15 s; a 429
    # of the requests' limit (output tokens left) does not touch it.
    assert t.output.rate() == pytest.approx(OUT_RATE * _RATE_BACKOFF)
    assert t.output.take(40)[0] == pytest.approx(40 / (OUT_RATE * _RATE_BACKOFF))
    t.observe(clock.now - 0.05, 429, {}, announced=(None, None, OTPM, 0.0))
    t.observe(clock.now, 429, {}, announced=(None, None, OTPM, 500.0))
    assert t.output.rate() == pytest.approx(OUT_RATE * _RATE_BACKOFF)
    clock.now += _RATE_RECOVERY_S
    assert t.output.rate() == pytest.approx(OUT_RATE)


def test_an_error_answer_gives_its_output_back_and_a_lost_one_keeps_it() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=4, output_tpm=OTPM, output_apart=True, clock=clock)
    assert t.output is not None
    for _ in range(4):
        t.output.take(40)  # the bucket owes 72 now
    owed = t.output.take(0.001)[0]
    t.settle_output(40, None, None)  # no answer: the provider may have spent it
    t.settle_output(40, 200, None)  # an answer without usage: likewise
    assert t.output.take(0.001)[0] == pytest.approx(owed, abs=1e-4)
    t.settle_output(40, 429, None)  # turned away: it spent nothing
    assert t.output.take(0.001)[0] == pytest.approx(owed - 40 / OUT_RATE, abs=1e-4)


def test_each_provider_has_a_throttle_of_its_own_and_the_rows_follow_the_neediest() -> None:
    clock = Clock()
    throttles = Throttles(max_concurrency=None, rpm=600, output_tpm=OTPM, clock=clock)
    openai = throttles.of("openai")
    claude = throttles.of("anthropic", output_apart=True)
    assert throttles.of("openai") is openai and claude is not openai
    assert openai.output is None and claude.output is not None
    assert openai.pacer.rates()[0] == claude.pacer.rates()[0] == pytest.approx(10 * (1 - MARGIN))
    claude.observe(clock.now - 2.0, 200, {}, announced=(60, None, None))  # slow, few
    openai.observe(clock.now - 0.1, 200, {}, announced=(6_000, None))
    assert claude.pacer.rates()[0] == pytest.approx(1 * (1 - MARGIN))  # its own limit only
    assert openai.pacer.rates()[0] == pytest.approx(10 * (1 - MARGIN))
    assert throttles.row_target() == max(openai.row_target(), claude.row_target())


def test_limits_told_by_provider_hold_for_each_provider_its_own() -> None:
    clock = Clock()
    throttles = Throttles(
        max_concurrency=None, rpm={"openai": 600, "anthropic": 60}, tpm=6_000, clock=clock
    )
    openai, claude = throttles.of("openai"), throttles.of("anthropic", output_apart=True)
    assert openai.pacer.rates() == (pytest.approx(10 * (1 - MARGIN)), pytest.approx(98))
    assert claude.pacer.rates() == (pytest.approx(1 * (1 - MARGIN)), pytest.approx(98))
    assert claude.output is not None and claude.output.rate() is None  # not told: unlimited


def test_throttle_cuts_concurrency_on_429_only_when_the_rate_is_unknown() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=64, initial_concurrency=16, clock=clock)
    t.observe(clock.now, 429, {"retry-after": "1"})
    assert t.rate_limited == 1 and t.concurrency.limit == 8
    paced = Throttle(max_concurrency=64, initial_concurrency=16, clock=clock)
    paced.observe(clock.now, 200, {}, announced=(3000, None))
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


# -- concurrency that follows the rate (max_concurrency=None) --------------------------------------
def answered(t: Throttle, clock: Clock, latency: float, n: int = 1) -> None:
    """``n`` requests that took ``latency`` seconds came back 200."""
    for _ in range(n):
        t.observe(clock.now - latency, 200, None)


def test_a_known_rate_keeps_rate_x_latency_in_flight_past_256() -> None:
    """Little's law: 980 requests/s at 1 s each need 980 on the wire, not a fixed 256."""
    clock = Clock()
    t = Throttle(max_concurrency=None, rpm=60_000, clock=clock)  # 980/s after the margin
    answered(t, clock, 1.0)
    assert t.concurrency.limit == int(980 * 1.0 * HEADROOM + SPARE)
    assert sum(t.concurrency.try_acquire() for _ in range(2_000)) == t.concurrency.limit > 256
    # Slower answers: more in flight (the moving mean follows them).
    answered(t, clock, 3.0, n=40)
    clock.now += 2 * FOLLOW_S
    t.row_target()
    assert t.concurrency.limit == pytest.approx(980 * 3.0 * HEADROOM + SPARE, rel=0.01)


def test_an_explicit_max_concurrency_caps_what_the_rate_would_want() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=300, rpm=60_000, clock=clock)
    answered(t, clock, 1.0)
    assert t.concurrency.limit == 300
    assert sum(t.concurrency.try_acquire() for _ in range(2_000)) == 300
    assert t.row_target() == 300


def test_without_a_rate_auto_concurrency_adapts_up_to_256_then_follows_a_learned_rate() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=None, initial_concurrency=16, clock=clock)
    answered(t, clock, 1.0, n=1_000)
    assert t.concurrency.limit == UNPACED_MAX_CONCURRENCY == 256
    assert t.concurrency.cap > 256  # the hard cap under "auto" is the open-file limit's
    clock.now += 2 * FOLLOW_S
    t.observe(clock.now - 1.0, 200, {}, announced=(60_000, None))
    assert t.concurrency.limit == int(980 * 1.0 * HEADROOM + SPARE)


def test_concurrency_follows_the_processes_share_down_as_well_as_up() -> None:
    clock = Clock()
    t = Throttle(max_concurrency=None, rpm=60_000, clock=clock)
    answered(t, clock, 1.0)
    t.pacer.rpm = 6_000  # a smaller share of the job's limit
    clock.now += 2 * FOLLOW_S
    t.row_target()
    assert t.concurrency.limit == int(98 * 1.0 * HEADROOM + SPARE)
    assert t.row_target() == int(2 * 98 * 1.0) + 8


def test_before_the_first_answer_latency_is_at_least_the_wait_for_it() -> None:
    """A provider slower than the 1 s guess does not stall the job's start."""
    clock = Clock()
    t = Throttle(max_concurrency=None, rpm=6_000, clock=clock)  # 98/s
    t.row_target()  # the first reading: the guess, 1 s
    assert t.concurrency.limit == int(98 * 1.0 * HEADROOM + SPARE)
    clock.now += 5.0  # no answer yet
    t.row_target()
    assert t.concurrency.limit == int(98 * 5.0 * HEADROOM + SPARE)


def test_auto_max_concurrency_is_half_the_open_file_limit() -> None:
    cap = auto_max_concurrency()
    assert 64 <= cap <= AUTO_MAX_CONCURRENCY
    if sys.platform != "win32":
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            assert cap == max(64, min(AUTO_MAX_CONCURRENCY, soft // 2))


def test_the_loops_lag_is_not_latency_to_size_concurrency_by() -> None:
    """A process short of CPU sees answers late by its loop's lag: more rows would not help."""
    clock = Clock()
    t = Throttle(max_concurrency=None, rpm=60_000, clock=clock)
    answered(t, clock, 1.0)
    for _ in range(100):
        t.loop_lag(0.4)
    clock.now += 2 * FOLLOW_S
    t.row_target()
    assert t.concurrency.limit == pytest.approx(980 * 0.6 * HEADROOM + SPARE, abs=2)
