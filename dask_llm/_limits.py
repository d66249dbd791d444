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
* **Adaptive concurrency** (AIMD, as TCP), while no rate is known (once
  one is, pacing governs and concurrency opens to its cap, since ramping
  up would only slow the start): the number of requests in flight
  starts at ``initial_concurrency``, grows by one per success until the
  first 429 (slow start), then by ``1/limit`` per success; a 429 halves it
  (once per round trip, not once per 429 of the same burst) unless pacing
  knows the rate, which answers 429s better. Where the provider sends no
  limit headers this alone finds the ceiling.
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
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from dask_llm import _cluster
from dask_llm._retry import retry_after

log = logging.getLogger("dask_llm")

_SAFETY = 0.97
_DECREASE = 0.5
_RATE_BACKOFF = 0.95
_RATE_RECOVERY_S = 15.0


class Pacer:
    """Request and token pacing (GCRA), thread-safe, with an injectable clock."""

    __slots__ = (
        "_lock",
        "_next",
        "_penalty",
        "_penalty_at",
        "_recent",
        "_rejections",
        "_sent",
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
        self._penalty_at = -math.inf
        self._recent: deque[float] = deque()  # starts in the last second, before a limit is known
        self._sent: deque[float] = deque()  # actual starts in the last second
        self._rejections: deque[float] = deque()  # 429s in the last 10 s

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
                # Unpaced until a limit is known; remember the burst to pay it back then.
                self._recent.append(now)
                while self._recent and self._recent[0] <= now - 1.0:
                    self._recent.popleft()
                return 0.0
            start = max(now, self._next)
            step = 0.0
            if req_rate:
                step = 1.0 / req_rate
            if tok_rate:
                step = max(step, tokens / tok_rate)
            self._next = start + step
            return start - now

    def admit(self) -> float:
        """Check a paced request at the moment it is sent; return 0 (sent) or seconds to wait.

        GCRA books start times, but an event loop that was busy can send several
        booked requests late and together. The provider counts arrivals in short
        windows, so arrivals, too, are held to the rate over any 1 s window.
        """
        with self._lock:
            req_rate = self.rates()[0]
            now = self.clock()
            sent = self._sent
            while sent and sent[0] <= now - 1.0:
                sent.popleft()
            if req_rate and len(sent) + 1 > max(1.0, req_rate):
                return sent[0] + 1.0 - now
            sent.append(now)
            return 0.0

    def learn(self, headers: Mapping[str, str]) -> None:
        """Take the provider's limits from ``x-ratelimit-limit-*`` response headers."""
        rpm = _number(headers.get("x-ratelimit-limit-requests"))
        tpm = _number(headers.get("x-ratelimit-limit-tokens"))
        if (rpm and rpm != self.learned_rpm) or (tpm and tpm != self.learned_tpm):
            log.info("dask-llm: the provider announces rpm=%s tpm=%s", rpm, tpm)
        if rpm or tpm:
            with self._lock:
                was_unpaced = self.rates() == (None, None)
                self.learned_rpm = rpm or self.learned_rpm
                self.learned_tpm = tpm or self.learned_tpm
                req_rate = self.rates()[0]
                if was_unpaced and req_rate and self._recent:
                    # The requests sent before we knew the limit count against it:
                    # start pacing only once that burst is paid back.
                    now = self.clock()
                    burst = sum(1 for t in self._recent if t > now - 1.0)
                    self._next = max(self._next, now + burst / req_rate - 1.0 / req_rate)
                self._recent.clear()

    def rejected(self, started: float, retry_after: float | None) -> None:
        """A request started at ``started`` got a 429 asking to wait ``retry_after`` s.

        A few 429s while pacing to a known limit are arrival jitter (a stalled loop
        on either side bunches arrivals into one window): hold every start until
        the moment the provider named, and go on at the same rate. More than 5%
        of the last 10 s of requests rejected mean the limit we pace to is not the
        whole story (another client shares the quota): then pace 5% slower, once
        per burst (429s of requests that started before the last slow-down are the
        same event), recovering over the next 15 s. Without a known limit every
        429 counts.
        """
        with self._lock:
            now = self.clock()
            if retry_after:
                self._next = max(self._next, now + min(retry_after, 60.0))
            rejections = self._rejections
            rejections.append(now)
            while rejections[0] <= now - 10.0:
                rejections.popleft()
            rate = self.rates()[0]
            if rate is not None and len(rejections) < max(3.0, 0.05 * rate * 10.0):
                return  # under 5% of the last 10 s of requests: jitter, not a wrong limit
            if started < self._penalty_at:
                return
            self._penalty = max(0.3, self._current_penalty() * _RATE_BACKOFF)
            self._penalty_at = now
        log.info(
            "dask-llm: more than 5%% of requests met a 429: pacing at %.0f%% of the limit, "
            "recovering over %.0f s",
            100 * self._penalty,
            _RATE_RECOVERY_S,
        )


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

    def open_up(self) -> None:
        """Pacing governs now: let concurrency go to its cap."""
        with self._lock:
            if self.limit < self.cap:
                self.limit = float(self.cap)
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
        self.rate_limited = 0
        self.latency = 1.0  # seconds on the wire, moving average of successes

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
            while (late := self.pacer.admit()) > 0:  # noqa: ASYNC110 (waits on a clock)
                await asyncio.sleep(late)
        except BaseException:
            self.concurrency.release()
            raise
        return self.clock()

    def observe(
        self, started: float, status: int | None, headers: Mapping[str, str] | None
    ) -> None:
        """A request that started at ``started`` ended with ``status`` (None: no response)."""
        with self._lock:
            if status == 429:
                self.rate_limited += 1
            elif status is not None and status < 400:
                self.latency = 0.8 * self.latency + 0.2 * max(0.0, self.clock() - started)
        if headers is not None:
            self.pacer.learn(headers)
        if self.pacer.rates() != (None, None):
            self.concurrency.open_up()
        if status == 429:
            # With a known rate, pacing answers a 429; halving concurrency on top
            # would starve the pipe for several round trips.
            if self.pacer.rates()[0] is None:
                self.concurrency.on_overload(started)
            self.pacer.rejected(started, retry_after(headers))
        elif status is not None and status < 400:
            self.concurrency.on_success()

    def release(self) -> None:
        self.concurrency.release()

    def row_target(self) -> int:
        """How many rows a partition should have under way to keep the pipe full.

        Paced: what the rate can have on the wire (rate x latency), doubled for
        rows between calls, plus a few. Unpaced: twice the concurrency limit.
        """
        rate = self.pacer.rates()[0]
        if rate is None:
            return max(4, int(2 * self.concurrency.limit))
        return min(self.concurrency.cap, int(2 * rate * self.latency) + 8)


def process_share(hint: int) -> int:
    """How many processes split the job's budget, as seen from this process.

    ``hint``: the ``distributed`` cluster's worker processes when ``enrich`` was called.
    """
    if _cluster.distributed_worker() is not None:
        return max(1, hint)
    if _cluster.in_pool_child():
        # A process of dask's local pool: as many as the CPUs, unless told more.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(hint, cpus or 1)
    return max(1, hint)
