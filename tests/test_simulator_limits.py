"""The simulator's rate-limit modes: the limiters on a synthetic clock, then over HTTP."""

from __future__ import annotations

import contextlib
import math
import random
import socket
import threading
import time
from typing import Any

import openai
import pytest

from dask_llm.simulator import Simulator
from dask_llm.simulator._limits import FixedWindow, SlidingWindow, TokenBucket, make_limiter
from dask_llm.simulator._stats import Stats

MESSAGES = [{"role": "user", "content": "A dry Furmint from Tokaj."}]


def client(sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


def chat(c: openai.OpenAI, content: str = "A dry Furmint from Tokaj.", **kwargs: Any) -> Any:
    """One chat request on ``c``; the raw response (its headers and its parse)."""
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **kwargs
    )


def ask(sim: Simulator, content: str = "A dry Furmint from Tokaj.", **kwargs: Any) -> Any:
    """One chat request on a new client."""
    with client(sim) as c:
        return chat(c, content, **kwargs)


def max_in_any_window(events: list[tuple[float, float]], window: float) -> float:
    """The most units in any half-open window ``(t - window, t]`` (the max ends at an event)."""
    return max(sum(a for s, a in events if t - window < s <= t) for t, _ in events)


# -- sliding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_sliding_is_strict_in_any_window(seed: int) -> None:
    rng = random.Random(seed)
    window = SlidingWindow(per_minute=600, window=1.0)  # budget 10 per second
    t = 0.0
    taken: list[tuple[float, float]] = []
    for _ in range(3000):
        t += rng.expovariate(25.0)
        amount = rng.choice([1, 1, 1, 2, 3])
        if window.try_take(t, amount) == 0.0:
            taken.append((t, amount))
    assert max_in_any_window(taken, 1.0) == 10  # reached, never exceeded
    assert len(taken) > 500


@pytest.mark.parametrize("seed", range(5))
def test_sliding_is_strict_and_exact_when_arrivals_come_out_of_order(seed: int) -> None:
    """Arrivals counted up to 0.2 s out of order (a new connection read a turn late) are
    each placed at their own time: no window passes the budget, and one that fits every
    window holding it passes (taken as the latest time seen, it was refused or moved)."""
    rng = random.Random(seed)
    window = SlidingWindow(per_minute=600, window=1.0)  # budget 10 per second
    t = 0.0
    arrivals = []
    for _ in range(2000):
        t += rng.expovariate(25.0)
        arrivals.append(t)
    shown = sorted(arrivals, key=lambda a: a + rng.uniform(0.0, 0.2))  # the order counted
    taken: list[tuple[float, float]] = []
    for a in shown:
        fits = max_in_any_window([*taken, (a, 1)], 1.0) <= 10 if len(taken) < 40 else None
        passed = window.try_take(a, 1) == 0.0
        if fits is not None:
            assert passed == fits
        if passed:
            taken.append((a, 1))
    assert max_in_any_window(taken, 1.0) == 10  # reached, never exceeded
    assert len(taken) > 500


def test_the_peak_second_counts_each_arrival_at_its_own_time() -> None:
    rng = random.Random(3)
    arrivals = sorted(rng.uniform(0.0, 20.0) for _ in range(600))
    stats = Stats()
    for a in sorted(arrivals, key=lambda a: a + rng.uniform(0.0, 0.3)):
        stats.started(a)
    events = [(a, 1.0) for a in arrivals]
    assert stats.peak_requests_1s == max_in_any_window(events, 1.0)


def test_sliding_admits_exactly_what_fits_and_says_when_the_rest_would() -> None:
    """In time order, each decision is the brute-force one, and the wait it gives is exact."""
    rng = random.Random(7)
    window = SlidingWindow(per_minute=300, window=2.0)  # budget 10 per 2 s
    taken: list[tuple[float, float]] = []
    t = 0.0
    for _ in range(2000):
        t += rng.expovariate(8.0)
        amount = rng.choice([1, 2, 4])
        used = sum(a for s, a in taken if t - 2.0 < s <= t)
        wait = window.try_take(t, amount)
        assert (wait == 0.0) == (used + amount <= 10)
        if wait == 0.0:
            taken.append((t, amount))
        else:
            later = t + wait + 1e-9
            assert sum(a for s, a in taken if later - 2.0 < s <= later) + amount <= 10
            if wait > 0.002:
                before = t + wait - 0.001
                assert sum(a for s, a in taken if before - 2.0 < s <= before) + amount > 10


def test_sliding_headers_count_the_window() -> None:
    window = SlidingWindow(per_minute=120, window=1.0)  # budget 2
    assert window.remaining(0.0) == 120 and window.reset_after(0.0) == 0.0
    window.try_take(10.0, 1)
    assert window.remaining(10.0) == 60
    assert window.reset_after(10.25) == pytest.approx(0.75)
    assert window.remaining(11.0) == 120


# -- fixed -----------------------------------------------------------------------------------
def test_fixed_slices_are_aligned_to_the_origin_and_pass_twice_the_budget_across_a_boundary() -> (
    None
):
    window = FixedWindow(per_minute=600, window=1.0, origin=100.0)  # 10 per slice
    taken = [t for t in (100.9 + k * 0.005 for k in range(15)) if window.try_take(t, 1) == 0.0]
    assert len(taken) == 10
    wait = window.try_take(100.98, 1)
    assert wait == pytest.approx(0.02)
    after = [t for t in (101.0 + k * 0.005 for k in range(15)) if window.try_take(t, 1) == 0.0]
    assert len(after) == 10
    both = [(t, 1.0) for t in taken + after]
    assert max_in_any_window(both, 1.0) == 20  # twice the budget within one second
    assert window.reset_after(101.5) == pytest.approx(0.5)
    assert window.remaining(102.0) == 600


def test_fixed_charges_a_late_arrival_to_the_current_slice() -> None:
    window = FixedWindow(per_minute=120, window=1.0, origin=0.0)  # 2 per slice
    assert window.try_take(5.1, 1) == 0.0
    assert window.try_take(4.99, 1) == 0.0  # arrived in slice 4, checked in slice 5
    assert window.try_take(5.2, 1) > 0


# -- bucket ----------------------------------------------------------------------------------
def test_bucket_bursts_its_capacity_then_holds_the_rate() -> None:
    bucket = TokenBucket(per_minute=600, window=1.0)  # capacity 10, 10 a second
    assert [bucket.try_take(0.0, 1) for _ in range(10)] == [0.0] * 10
    assert bucket.try_take(0.0, 1) == pytest.approx(0.1)
    assert bucket.remaining(0.0) == 0 and bucket.reset_after(0.0) == pytest.approx(1.0)
    # 60 s at 40 arrivals a second: capacity + rate * time pass, no more.
    passed = sum(bucket.try_take(k / 40, 1) == 0.0 for k in range(1, 2401))
    assert passed == pytest.approx(600, abs=1)
    assert bucket.remaining(1000.0) == 600


def test_bucket_wait_is_exact() -> None:
    bucket = TokenBucket(per_minute=60, window=5.0)  # capacity 5, 1 a second
    for _ in range(5):
        bucket.try_take(0.0, 1)
    wait = bucket.try_take(0.0, 2)
    assert wait == pytest.approx(2.0)
    assert bucket.try_take(1.99, 2) > 0
    assert bucket.try_take(2.0, 2) == 0.0


# -- all modes -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sliding", "fixed", "bucket"])
def test_a_request_larger_than_the_budget_never_fits(mode: str) -> None:
    limiter = make_limiter(mode, 6000, 1.0, 0.0)  # 100 tokens per second
    assert limiter.try_take(0.0, 101) == math.inf
    assert limiter.try_take(0.0, 100) == 0.0


@pytest.mark.parametrize("mode", ["sliding", "fixed"])
def test_a_budget_under_one_request_widens_the_window_to_keep_the_rate(mode: str) -> None:
    limiter = make_limiter(mode, 30, 1.0, 0.0)  # 30 rpm: one every 2 s
    passed = sum(limiter.try_take(k * 0.5, 1) == 0.0 for k in range(40))  # 20 s
    assert passed == 10
    assert limiter.budget == 1.0 and limiter.window == 2.0


# -- over HTTP -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sliding", "fixed", "bucket"])
def test_every_mode_answers_429_the_openai_way(make_simulator: Any, mode: str) -> None:
    sim = make_simulator(rpm=60, limit_mode=mode)  # one request per second
    ok = ask(sim)
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        ask(sim, "another")
    err = info.value
    assert err.code == "rate_limit_exceeded"
    assert err.body["type"] == "requests"  # type: ignore[index]
    assert "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 60" in err.message
    headers = err.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000 and headers["retry-after"] == "1"
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in headers
    assert sim.stats()["rate_limited"] == 1
    time.sleep(int(headers["retry-after-ms"]) / 1000 + 0.01)
    assert ask(sim, "a third").parse().choices


def _at_phase(sim: Simulator, window: float, phase: float) -> None:
    """Sleep until ``phase`` seconds into one of the server's fixed slices."""
    since = (time.monotonic() - sim.app.started) % window
    time.sleep((phase - since) % window)


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="the kernel's receive time: Linux")
def test_a_request_is_stamped_when_it_arrived_not_when_its_handler_ran(
    make_simulator: Any,
) -> None:
    """Four requests sent 0.6 s apart while the server's loop is busy for 2.5 s are read
    together: stamped by their handlers they were four in one second, a burst the client
    never sent; stamped when their bytes arrived, they are at most two."""
    sim = make_simulator()
    busy = threading.Thread(target=sim._on_loop, args=(lambda: time.sleep(2.5),))
    busy.start()
    time.sleep(0.1)
    senders = []
    for k in range(4):
        senders.append(threading.Thread(target=ask, args=(sim, f"sent {k}")))
        senders[-1].start()
        time.sleep(0.6)
    for thread in (busy, *senders):
        thread.join()
    stats = sim.stats()
    assert stats["requests"] == 4
    assert stats["peak_requests_1s"] <= 3  # two, give or take a late thread


@pytest.mark.parametrize(("mode", "passed"), [("fixed", 4), ("sliding", 2)])
def test_fixed_slices_let_a_client_pass_twice_the_budget_across_a_boundary(
    make_simulator: Any, mode: str, passed: int
) -> None:
    sim = make_simulator(rpm=60, limit_window=2.0, limit_mode=mode)  # 2 per 2 s
    # One client, its connection opened before the clock starts: a new client per request
    # cost CI more than the 0.4 s to the boundary, and the pair before it spilled across.
    with client(sim) as c:
        c.models.list()  # not counted against the limit
        _at_phase(sim, 2.0, 1.6)
        results = [chat(c, f"before {k}") for k in range(2)]
        _at_phase(sim, 2.0, 0.05)
        for k in range(2):
            with contextlib.suppress(openai.RateLimitError):
                results.append(chat(c, f"after {k}"))
    assert len(results) == passed
    stats = sim.stats()
    assert stats["peak_requests_1s"] == 4  # all four arrived within one second
    assert stats["rate_limited"] == 4 - passed


def test_bucket_mode_over_http(make_simulator: Any) -> None:
    sim = make_simulator(rpm=120, limit_window=5.0, limit_mode="bucket")  # capacity 10, 2/s
    with client(sim) as c:
        for k in range(10):
            chat(c, f"burst {k}")
        with pytest.raises(openai.RateLimitError) as info:
            chat(c, "one too many")
        assert 0 < int(info.value.response.headers["retry-after-ms"]) <= 500
        time.sleep(1.05)  # two more tokens
        chat(c, "refilled 1")
        left = chat(c, "refilled 2").headers["x-ratelimit-remaining-requests"]
        assert int(left) < 12  # per-minute units: less than one request (12) left
        with pytest.raises(openai.RateLimitError):
            chat(c, "empty again")
    assert sim.stats()["rate_limited"] == 2


def test_a_request_too_large_for_the_tpm_window_is_refused_without_retry_after(
    make_simulator: Any,
) -> None:
    sim = make_simulator(tpm=6000)  # 100 tokens per 1 s window
    with pytest.raises(openai.RateLimitError) as info:
        ask(sim, max_tokens=200)
    err = info.value
    assert "Request too large for gpt-4o-mini on tokens per min (TPM): Limit 6000" in err.message
    assert err.body["type"] == "tokens"  # type: ignore[index]
    assert "retry-after" not in err.response.headers
    assert err.response.headers["x-ratelimit-limit-tokens"] == "6000"
    assert ask(sim, max_tokens=50).parse().choices  # a request that fits still passes


@pytest.mark.parametrize(("per_key", "refused"), [(False, 1), (True, 0)])
def test_limits_are_the_accounts_or_each_keys(
    make_simulator: Any, per_key: bool, refused: int
) -> None:
    # One request a bucket, refilled over 10 s: a busy machine does not refill it between calls.
    sim = make_simulator(rpm=6, limit_window=10.0, limit_mode="bucket", limit_per_key=per_key)
    mine = client(sim)
    theirs = openai.OpenAI(base_url=sim.base_url, api_key="sk-another-key", max_retries=0)
    with mine, theirs:
        assert chat(mine).headers["x-ratelimit-remaining-requests"] == "0"
        with contextlib.suppress(openai.RateLimitError):
            # Its own bucket is full: the headers say so.
            assert chat(theirs).headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError):
            chat(mine, "again")  # the first key's bucket is empty either way
    assert sim.stats()["rate_limited"] == 1 + refused
    sim.reset()
    with client(sim) as c:
        chat(c)  # a reset fills every bucket again
