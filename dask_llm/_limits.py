"""Job-wide concurrency and rate limits: how a job saturates a provider without 429 storms.

One ``Throttle`` per job per process, shared by every partition that runs in
that process at once (threads of the threaded scheduler, of a ``distributed``
worker). It governs HTTP requests, not chain calls: a chain that calls the
model twice counts twice, and retries count as what they are, new requests.
It sits in the HTTP transport of the clients dask-llm opens (``_transport``),
so it sees every request's body (to estimate its tokens) and every response's
status and ``x-ratelimit-*`` headers.

Three mechanisms, each for a different ignorance:

* **Pacing** (GCRA, a leaky bucket kept as "the next free start time"):
  requests start no closer than ``1 / rate`` apart, and tokens at most at
  ``tpm / 60`` per second. The rate is the user's ``rpm=``/``tpm=`` if given,
  else what the provider says in ``x-ratelimit-limit-requests`` /
  ``-tokens`` (OpenAI sends them on every response), times a safety factor
  (0.95: arrival jitter on the wire must not push a 1-second window over).
  Pacing is arithmetic under a ``threading.Lock``, so partitions on
  different threads and event loops draw on one budget. A request's token
  cost is estimated before sending (request body characters / 4, plus
  ``max_tokens`` or the mean completion seen so far) and the estimate is
  scaled by the ratio of reported ``usage`` to estimates seen so far.
* **Adaptive concurrency** (AIMD, as TCP): the number of requests in flight
  starts at ``initial_concurrency``, grows by one per success until the
  first 429 (slow start), then by ``1/limit`` per success; a 429 halves it
  (once per round trip, not once per 429 of the same burst). Where the
  provider sends no limit headers this alone finds the ceiling.
  ``max_concurrency`` is a hard cap.
* **Retry-After**: a 429 also slows pacing by 10% (recovering over the next
  clean minute), and each retried request waits at least what the server
  asked (``_retry``).

Job-wide limits across processes: the budget is split evenly. A process
that runs partitions of the job takes ``rate / P``, where ``P`` is the number
of worker processes: the ``distributed`` cluster's worker count (read from
the client when ``enrich`` is called, and from the worker's scheduler at run
time), the size of dask's local process pool, or 1 for the threaded and
synchronous schedulers. Trade-off: no coordinator, no round trip per request
and nothing to fail; but a process idle at the end of a job leaves its share
unused, so the tail runs below the limit. (A lease server on the scheduler
would fix that at the cost of a network hop per lease; not worth it until
measured.)

aiolimiter was the first choice for pacing, but its limiter belongs to one
event loop, and a job here spans many loops on many threads.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

_SAFETY = 0.95
_DECREASE = 0.5
_RATE_BACKOFF = 0.9
_RATE_RECOVERY_S = 60.0


class Pacer:
    """Request and token pacing (GCRA), thread-safe, with an injectable clock."""

    __slots__ = (
        "_lock",
        "_next",
        "_penalty",
        "_penalty_at",
        "clock",
        "learned_rpm",
        "learned_tpm",
        "rpm",
        "share",
        "tpm",
    )

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.share = max(1, share)
        self.learned_rpm: float | None = None
        self.learned_tpm: float | None = None
        self.clock = clock
        self._lock = threading.Lock()
        self._next = 0.0  # earliest start of the next request
        self._penalty = 1.0  # multiplier < 1 after a 429
        self._penalty_at = 0.0

    def _limit(self, given: float | None, learned: float | None) -> float | None:
        limits = [x for x in (given, learned) if x]
        return min(limits) if limits else None

    def rates(self) -> tuple[float | None, float | None]:
        """This process's requests/s and tokens/s, or None where unlimited."""
        factor = _SAFETY * self._current_penalty() / self.share
        rpm = self._limit(self.rpm, self.learned_rpm)
        tpm = self._limit(self.tpm, self.learned_tpm)
        return (rpm / 60.0 * factor if rpm else None, tpm / 60.0 * factor if tpm else None)

    def _current_penalty(self) -> float:
        if self._penalty >= 1.0:
            return 1.0
        # Recover linearly to 1 over _RATE_RECOVERY_S after the last 429.
        elapsed = self.clock() - self._penalty_at
        return min(1.0, self._penalty + (1.0 - self._penalty) * elapsed / _RATE_RECOVERY_S)

    def reserve(self, tokens: float) -> float:
        """Book the next start for a request of ``tokens``; return the seconds to wait."""
        with self._lock:
            req_rate, tok_rate = self.rates()
            now = self.clock()
            if req_rate is None and tok_rate is None:
                return 0.0
            start = max(now, self._next)
            step = 0.0
            if req_rate:
                step = 1.0 / req_rate
            if tok_rate:
                step = max(step, tokens / tok_rate)
            self._next = start + step
            return start - now

    def learn(self, headers: Mapping[str, str]) -> None:
        """Take the provider's limits from ``x-ratelimit-limit-*`` response headers."""
        rpm = _number(headers.get("x-ratelimit-limit-requests"))
        tpm = _number(headers.get("x-ratelimit-limit-tokens"))
        if rpm or tpm:
            with self._lock:
                self.learned_rpm = rpm or self.learned_rpm
                self.learned_tpm = tpm or self.learned_tpm

    def slow_down(self) -> None:
        """A 429 came back: pace 10% slower for a while."""
        with self._lock:
            self._penalty = max(0.3, self._current_penalty() * _RATE_BACKOFF)
            self._penalty_at = self.clock()


class Concurrency:
    """AIMD limit on requests in flight, shared across threads and event loops."""

    __slots__ = (
        "_last_cut",
        "_lock",
        "_waiters",
        "cap",
        "clock",
        "in_flight",
        "limit",
        "slow_start",
    )

    def __init__(
        self, *, initial: int, cap: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cap = max(1, cap)
        self.limit = float(min(max(1, initial), self.cap))
        self.in_flight = 0
        self.slow_start = True
        self.clock = clock
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._last_cut = -math.inf

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight < int(self.limit) and not self._waiters:
                self.in_flight += 1
                return True
            return False

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.in_flight < int(self.limit) and not self._waiters:
                self.in_flight += 1
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut  # the releaser counted us in before waking us
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                    queued = True
                except ValueError:
                    queued = False  # woken at the same moment: give the slot back
            if not queued:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            loop, fut = self._waiters.popleft()
            self.in_flight += 1
            try:
                loop.call_soon_threadsafe(_resolve, fut, self)
            except RuntimeError:  # that loop is closed: its waiter is gone
                self.in_flight -= 1

    def on_success(self) -> None:
        with self._lock:
            if self.limit < self.cap:
                self.limit = min(
                    float(self.cap), self.limit + (1.0 if self.slow_start else 1.0 / self.limit)
                )
                self._wake()

    def on_overload(self, started: float) -> None:
        """A request that started at ``started`` got a 429: cut the limit, once per round trip."""
        with self._lock:
            self.slow_start = False
            if started < self._last_cut:
                return  # part of a burst we have already answered
            self.limit = max(1.0, self.limit * _DECREASE)
            self._last_cut = self.clock()


def _resolve(fut: asyncio.Future[None], owner: Concurrency) -> None:
    if fut.done():  # cancelled while the wake-up was on its way
        owner.release()
    else:
        fut.set_result(None)


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


class Throttle:
    """Everything that decides when one HTTP request of a job may start."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        initial_concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = Concurrency(
            initial=initial_concurrency, cap=max_concurrency, clock=clock
        )
        self.pacer = Pacer(rpm=rpm, tpm=tpm, share=share, clock=clock)
        self.clock = clock
        self._lock = threading.Lock()
        self._estimated = 0.0
        self._actual = 0.0
        self._completions = 0.0
        self._calls = 0
        self.requests = 0
        self.rate_limited = 0

    def estimate_tokens(self, prompt_chars: int, max_tokens: int | None) -> float:
        """Token cost of a request before it is sent, scaled by what usage has shown."""
        with self._lock:
            expected_out = max_tokens or (self._completions / self._calls if self._calls else 256.0)
            raw = prompt_chars / 4.0 + expected_out
            ratio = self._actual / self._estimated if self._estimated > 0 else 1.0
        return raw * min(4.0, max(0.25, ratio))

    def record_estimate(self, estimated: float) -> None:
        """A request estimated at ``estimated`` tokens succeeded (its usage will follow)."""
        with self._lock:
            self._estimated += estimated

    def record_usage(self, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        """Usage the provider reported for ``requests`` successful requests."""
        with self._lock:
            self._actual += prompt_tokens + completion_tokens
            self._completions += completion_tokens
            self._calls += requests

    async def acquire(self, tokens: float) -> float:
        """Wait for a slot and a paced start; return the start time (for ``observe``)."""
        await self.concurrency.acquire()
        try:
            delay = self.pacer.reserve(tokens)
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self.concurrency.release()
            raise
        return self.clock()

    def observe(
        self, started: float, status: int | None, headers: Mapping[str, str] | None
    ) -> None:
        """A request that started at ``started`` ended with ``status`` (None: no response)."""
        with self._lock:
            self.requests += 1
            if status == 429:
                self.rate_limited += 1
        if headers is not None:
            self.pacer.learn(headers)
        if status == 429:
            self.concurrency.on_overload(started)
            self.pacer.slow_down()
        elif status is not None and status < 400:
            self.concurrency.on_success()

    def release(self) -> None:
        self.concurrency.release()


_THROTTLES: dict[str, Throttle] = {}
_THROTTLES_LOCK = threading.Lock()


def throttle_for(job: str, **kwargs: Any) -> Throttle:
    """The process's throttle for ``job`` (created on first use)."""
    with _THROTTLES_LOCK:
        throttle = _THROTTLES.get(job)
        if throttle is None:
            throttle = _THROTTLES[job] = Throttle(**kwargs)
        return throttle


def process_share(hint: int) -> int:
    """How many processes split the job's budget, as seen from this process."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        try:
            from distributed import get_client

            return max(1, len(get_client().nthreads()))
        except Exception:
            return max(1, hint)
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        # A process of dask's local pool: as many as the CPUs, unless told more.
        import os

        return max(
            hint,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
        )
    return max(1, hint)
