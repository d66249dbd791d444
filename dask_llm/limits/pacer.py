"""How one HTTP request of a job may start: pacing within the job's lease, and concurrency.

One ``Throttle`` per job per process and provider (the job's ``Throttles``,
owned by the ``Job``), shared by every partition running in that process, on
whatever thread and event loop. It governs HTTP requests, not chain calls: a
chain that calls the model twice counts twice, and retries count as what they
are, new requests. It sits in the transport (``transport.pipeline``), so it
sees every request's body (to estimate its tokens) and every response's
status and headers. A job whose chains call OpenAI and Anthropic paces each
provider's requests to that provider's limits, with concurrency of its own:
one pace for both held each at a share of the lower limit (the lease of
each provider is a lane of the job's ledger: ``limits.ledger``).

* **Pacing.** The job's ``rpm``/``tpm`` (told, or learned from the
  provider's headers, as ``Provider.announced`` reads them) are held by the job's ledger
  (``limits.coordinator``), which lends each process a rate according to its
  demand; ``Pacer`` spends this process's rate. Two rules, both needed:
  starts are booked no closer than ``1 / rate`` apart (GCRA from the last
  booked start at the rate in force; a process behind its schedule makes up
  at most ``CATCH_UP_S`` of starts), and at the moment a request is really
  sent, no more than the process's share of the limit (its rate
  before the margin, rounded down) may have started in the last 1.01 s: a
  loop that was busy sends booked requests late and together, and a provider
  that counts any sliding second (or fixed slices, or a token bucket: each
  is looser than a sliding window) would see the bunch. The extra 10 ms
  cover the spread of delays between our write and the provider's clock.
  The shares sum to at most the limit, so the job holds it over any sliding
  second as the provider stamps it.
* **429s.** Only a *quota* 429 (its rate-limit headers showing a spent
  quota; or none on it, and the freshest headers of the job's other answers,
  kept by the throttle's ``Headroom``, not showing room: see
  ``limits.headers``) says the pace is too fast: starts are held until its
  ``Retry-After``, and if more than 5% of the last 10 s of requests met one,
  pacing slows by 5% (once per burst, recovering over 15 s). Any other 429 (a
  busy server, a Flex request's "resource unavailable", a header-less 429
  while the quota has room) and a 529 (overloaded) are only retried after
  their ``Retry-After``: they do not slow the job, and their start is given
  back (``Pacer.refund``). (0.1 slowed on every 429, so 5% of stray 429s
  halved a known limit; until 2026-12-07 a header-less ``rate_limit_exceeded``
  was always the quota's, and 5% of those held a job at 37-39%.)
* **Adaptive concurrency** (AIMD, as TCP), while no rate is known: the number
  of requests in flight starts at ``initial_concurrency``, grows by one per
  success until the first quota 429 (slow start), then by ``1/limit`` per
  success, and halves on a quota 429 (once per round trip), up to
  ``max_concurrency`` (``UNPACED_MAX_CONCURRENCY`` under "auto"). Where the
  provider sends no limit headers and none is told, this alone finds the
  ceiling.
* **Concurrency that follows the rate.** Once a rate is known (told, or
  learned from the headers), pacing governs, and requests in flight follow
  what this process's share of the rate keeps on the wire: share x latency
  (Little's law), times ``HEADROOM`` plus ``SPARE`` (latency varies around its
  mean, and a request waiting for its paced start holds a slot). A fixed cap
  throttles a fast tier: 256 in flight at 2 s a call is 7,680 rpm a process,
  whatever the account allows. The share is the ledger's lease, so the
  processes of a job split the concurrency as they split the rate, and a
  process lent more grows with it (its requests waiting for a slot are
  demand: ``Ledger.queue``). The latency is the moving mean of the answers;
  before the first answer, at least the time since the first request went
  out (a provider slower than the 1 s guess does not stall the start).
  ``max_concurrency=`` stays a hard cap; under "auto" the cap is half the
  process's open-file limit (each request in flight holds a socket; above it
  a job would fail with "too many open files"), at most ``AUTO_MAX_CONCURRENCY``.
  The latency is measured from the paced start, so time waiting for pacing
  never counts as latency, and the event loop's lag is taken off it: a
  process short of CPU sees its answers late by the time its loop takes to
  come round, more so the more rows it has under way, and sizing by that
  latency fed on itself (measured here on 20,000 rows at 500 req/s, two busy
  cores: 410 in flight for 134 calls/s, against 256 for 175 with the fixed
  cap). The partitions' loops report their lag (``loop_lag``).

* **Output tokens** (Anthropic's output tokens per minute, ``output_tpm``
  told or learned): a bucket of their own (``OutputBucket``), from which each
  request books its ``max_tokens`` and to which its answer gives back what it
  did not use, as Anthropic counts them.

Token costs are estimated before sending: the prompt at body characters / 4,
scaled by the ratio of the prompt tokens answers reported to those estimated
so far; plus, where ``tpm`` counts output too (OpenAI), ``max_tokens`` or the
mean output seen so far. Anthropic's ``tpm`` is its input-tokens limit: there
the prompt alone counts, and the output is the output bucket's. (Until
2026-12-07 no answer's usage reached the estimate: from the first answer on,
every estimate was a quarter of its raw size.)

aiolimiter was the first choice for pacing, but its limiter belongs to one
event loop, and a job here spans many loops on many threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dask_llm.core.config import UNPACED_MAX_CONCURRENCY, Told, told
from dask_llm.core.outcome import Announced
from dask_llm.limits.coordinator import MARGIN, RENEW_S
from dask_llm.limits.headers import OPENAI_NAMES, Headroom, retry_after

if sys.platform != "win32":
    import resource

log = logging.getLogger(__name__)

#: Statuses of answers the provider did not count against the quota (a 429 not the
#: quota's, a 529 overloaded): their start is given back to the pacing.
_NOT_COUNTED = frozenset({429, 529})
_DECREASE = 0.5
_RATE_BACKOFF = 0.95
_RATE_RECOVERY_S = 15.0
#: Arrivals are counted over this window: the provider's second plus the spread of
#: the delays between our write and its clock (see ``Pacer.admit``).
ADMIT_WINDOW_S = 1.01
#: Seconds of starts a process that fell behind its schedule may make up at once.
CATCH_UP_S = 0.1
#: How long a request waits for the reply to a report on its way before it looks again.
HOLD_S = 0.005
#: With a known rate, requests in flight may be this many times rate x latency, ...
HEADROOM = 1.5
#: ... plus this many (low rates, and the spread of a few slow answers).
SPARE = 16
#: The most requests in flight a process has under "auto" (``max_concurrency=None``).
AUTO_MAX_CONCURRENCY = 10_000
#: Seconds between two readings of the rate and latency that set concurrency.
FOLLOW_S = 0.05
#: Seconds of its rate an output bucket holds (``OutputBucket``): the provider's may hold
#: one second's (a minute's limit enforced over shorter spans), less what requests booked
#: may reach it late (``OUTPUT_LATE_S``).
OUTPUT_BUCKET_S = 1.0
OUTPUT_LATE_S = 0.1
#: Output tokens a request is expected to use before any answer said (no ``max_tokens``).
FIRST_OUTPUT_GUESS = 256.0


def auto_max_concurrency() -> int:
    """The hard cap on requests in flight under "auto": half the open-file limit, at most
    ``AUTO_MAX_CONCURRENCY`` (each request on the wire holds a socket)."""
    if sys.platform == "win32":
        return 1_000  # no per-process limit to read; sockets are not files there
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1_000
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return AUTO_MAX_CONCURRENCY
    return max(64, min(AUTO_MAX_CONCURRENCY, soft // 2))


class Pacer:
    """Request and token pacing within a rate (GCRA + a strict sliding window); thread-safe.

    The rate is the ledger's lease when there is one (``ledger``), else ``rpm``/``tpm``
    (told or learned) minus the margin: a pacer on its own, for tests and tools.
    """

    __slots__ = (
        "_hold",
        "_last",
        "_last_tok",
        "_lock",
        "_penalty",
        "_penalty_at",
        "_rejections",
        "_sent",
        "_unwritten",
        "_unwritten_tok",
        "clock",
        "learned_rpm",
        "learned_tpm",
        "ledger",
        "rpm",
        "tpm",
    )

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        ledger: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.ledger = ledger
        self.learned_rpm: float | None = None
        self.learned_tpm: float | None = None
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None  # the last booked start
        self._last_tok: tuple[float, float] | None = None  # (start, tokens) of the last booking
        self._hold = 0.0  # no start before this (a quota 429's Retry-After)
        self._penalty = 1.0  # multiplier < 1 after repeated quota 429s
        self._penalty_at = -math.inf
        self._sent: deque[tuple[float, float]] = deque()  # (start, tokens) of the last second
        self._unwritten = 0  # requests admitted, not yet on the wire (``written``)
        self._unwritten_tok = 0.0  # and their tokens
        self._rejections: deque[float] = deque()  # quota 429s in the last 10 s

    def rates(self) -> tuple[float | None, float | None]:
        """This process's requests/s and tokens/s, or None where unlimited."""
        if self.ledger is not None:
            req, tok = self.ledger.rates()
        else:

            def lowest(told: float | None, learned: float | None) -> float | None:
                known = [x for x in (told, learned) if x]
                return min(known) / 60.0 * (1.0 - MARGIN) if known else None

            req, tok = lowest(self.rpm, self.learned_rpm), lowest(self.tpm, self.learned_tpm)
        penalty = self._current_penalty()
        return (
            None if req is None else req * penalty,
            None if tok is None else tok * penalty,
        )

    def _current_penalty(self) -> float:
        if self._penalty >= 1.0:
            return 1.0
        # Recover linearly to 1 over _RATE_RECOVERY_S after the last slow-down.
        elapsed = self.clock() - self._penalty_at
        return min(1.0, self._penalty + (1.0 - self._penalty) * elapsed / _RATE_RECOVERY_S)

    def reserve(self, tokens: float) -> float | None:
        """Book the next start for a request of ``tokens``; return the seconds to wait.

        None: this process cannot start it within the next renewal of its lease (no
        share, or a share too small for the queue); nothing was booked, ask again then,
        with the lease as it will be.
        """
        with self._lock:
            req_rate, tok_rate = self.rates()
            now = self.clock()
            if req_rate is None and tok_rate is None:
                return 0.0
            if (req_rate is not None and req_rate <= 0) or (tok_rate is not None and tok_rate <= 0):
                self._waiting()
                return None
            # The next free start follows from the last booked one at the rate in force
            # now: a lease that grows (or shrinks) applies at once.
            # A process that fell behind its schedule (a busy loop, a row still being
            # built when its turn came) may catch up by CATCH_UP_S worth of starts: its
            # next booking follows the last one, not the late moment it was made. The
            # strict window (``admit``) still holds any second to the share of the limit.
            booked = self._hold
            if req_rate and self._last is not None:
                booked = max(booked, self._last + 1.0 / req_rate, now - CATCH_UP_S)
            start = max(now, booked)
            if tok_rate and self._last_tok is not None:
                start = max(start, self._last_tok[0] + self._last_tok[1] / tok_rate)
                booked = max(booked, start)
            if start - now > RENEW_S:
                self._waiting()
                return None
            self._last = booked if req_rate and self._last is not None else start
            self._last_tok = (start, tokens)
            wait = start - now
            if wait > 0:
                self._waiting()
            return wait

    def admit(self, tokens: float, *, unwritten: bool = False) -> float:
        """Check a paced request at the moment it is sent; return 0 (sent) or seconds to wait.

        GCRA books start times, but an event loop that was busy can send several
        booked requests late and together. The provider counts arrivals in short
        windows, so arrivals, too, are held: no more than this process's share of
        the *limit* (its rate before the margin) in any ``ADMIT_WINDOW_S``. The
        window is longer than the provider's second by the spread of the delays
        between our write and the provider's clock: a window exactly 1 s long
        admits a request the instant the oldest leaves it, so a burst echoes every
        second and meets its own echo wherever the older one arrived a few
        milliseconds later (measured: 0.3-6 ms between write and the simulator's
        stamp, server peaks 4-15 above a client window that held). Counting to
        the share of the limit, not of the paced rate, keeps the window from
        binding while pacing holds, so requests are not pinned to its edge: the
        window's rate (the share over ``ADMIT_WINDOW_S``) must stay above the
        paced rate (the share less ``MARGIN``), by 1% today. Lowering one of the
        two means checking the other (a test holds them apart).

        ``unwritten``: the caller writes the request after this returns and calls
        ``written`` once it has: until then the request counts as sent *now*,
        whenever it was admitted; then at the moment it was written. A request
        admitted at t and written late (another thread held the GIL, a collection
        ran: p99 10-40 ms, at most 0.2-0.7 s on two busy cores, 2026-12-07) left
        the window at t + 1.01 s while the provider counted it until its write
        + 1 s, and the request admitted in its place made the provider's second
        one more than the limit.
        """
        with self._lock:
            req_rate, tok_rate = self.rates()
            now = self.clock()
            sent = self._sent
            while sent and sent[0][0] <= now - ADMIT_WINDOW_S:
                sent.popleft()
            pending, pending_tok = self._unwritten, self._unwritten_tok
            if req_rate is not None and len(sent) + pending + 1 > max(
                1, math.floor(req_rate / (1.0 - MARGIN) + 1e-9)
            ):
                self._waiting()
                return max(1e-3, sent[0][0] + ADMIT_WINDOW_S - now) if sent else HOLD_S
            if tok_rate is not None and (sent or pending):
                used = sum(t for _, t in sent) + pending_tok
                if used + tokens > max(tokens, tok_rate / (1.0 - MARGIN)):
                    self._waiting()
                    return max(1e-3, sent[0][0] + ADMIT_WINDOW_S - now) if sent else HOLD_S
            paced = req_rate is not None or tok_rate is not None
            if (
                paced
                and self.ledger is not None
                and self.ledger.holding(tokens, req=req_rate is not None, tok=tok_rate is not None)
            ):
                return HOLD_S  # its report is on its way: see ``Ledger.holding``
            if paced and unwritten:
                self._unwritten += 1
                self._unwritten_tok += tokens
            elif paced:
                sent.append((now, tokens))
            if self.ledger is not None:
                self.ledger.started(tokens)
            return 0.0

    def written(self, tokens: float) -> None:
        """A request admitted ``unwritten`` (of ``tokens``) is on the wire now (or failed)."""
        with self._lock:
            if self._unwritten <= 0:
                return  # admitted while no rate was known: not counted
            self._unwritten -= 1
            self._unwritten_tok = max(0.0, self._unwritten_tok - tokens)
            self._sent.append((self.clock(), tokens))

    def refund(self, started: float) -> None:
        """A request that started at ``started`` was turned away uncounted: give its start back.

        A 429 that is not the quota's (an overloaded server) spent none of the
        provider's quota, so it spends none of ours: the strict window forgets
        the request's start (if still within the last second) and the next
        booking moves up by one interval. A provider that does count such
        requests sees the job over its limit by their share; its quota 429s
        then hold and slow the pace as any other.
        """
        with self._lock:
            sent = self._sent
            for i, (at, _) in enumerate(sent):
                if at >= started - 1e-3:
                    del sent[i]
                    break
            req_rate = self.rates()[0]
            if req_rate and self._last is not None and self._last > self.clock():
                self._last -= 1.0 / req_rate

    def _waiting(self) -> None:
        if self.ledger is not None:
            self.ledger.waiting()

    def learn(self, rpm: float | None, tpm: float | None) -> None:
        """Take the limits (per minute) an answer's headers announce, as its provider reads
        them (``Provider.announced``)."""
        if not (rpm or tpm):
            return
        if (rpm and rpm != self.learned_rpm) or (tpm and tpm != self.learned_tpm):
            log.info("dask-llm: the provider announces rpm=%s tpm=%s", rpm, tpm)
        with self._lock:
            self.learned_rpm = rpm or self.learned_rpm
            self.learned_tpm = tpm or self.learned_tpm
        if self.ledger is not None:
            self.ledger.learned(rpm, tpm)

    def rejected(self, started: float, retry_after_s: float | None) -> None:
        """A request started at ``started`` met a *quota* 429 asking to wait ``retry_after_s``.

        A few quota 429s while pacing to a known limit are arrival jitter: hold every
        start until the moment the provider named, and go on at the same rate. More
        than 5% of the last 10 s of requests rejected mean the limit we pace to is not
        the whole story (another client shares the quota): then pace 5% slower, once
        per burst (429s of requests that started before the last slow-down are the same
        event), recovering over the next 15 s. Without a known limit every 429 counts.
        """
        with self._lock:
            now = self.clock()
            if retry_after_s:
                self._hold = max(self._hold, now + min(retry_after_s, 60.0))
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
            "dask-llm: more than 5%% of requests met a quota 429: pacing at %.0f%% of the "
            "limit, recovering over %.0f s",
            100 * self._penalty,
            _RATE_RECOVERY_S,
        )


class OutputBucket:
    """Output tokens per minute, paced apart (Anthropic's output limit); thread-safe.

    Anthropic counts a request's ``max_tokens`` against its output limit from the
    moment the request arrives, and gives back what the answer did not use once it
    is done; its limits are buckets refilled continuously, which it may enforce
    over spans shorter than the minute. So does this bucket: it holds
    ``OUTPUT_BUCKET_S`` of this process's output rate (the ledger's lease of the
    job's ``output_tpm``, told or learned, less the margin) and refills at that
    rate. A request books its expected output before it starts (``take``: its
    ``max_tokens``, else the mean output so far) and waits until the bucket, less
    what the requests booked before it took, holds it (or the whole bucket, for a
    reservation larger than that): starts are booked in turn, into debt, so a
    large reservation is not starved by small ones, and no booking is polled. Its
    answer then gives back what it did not use, or takes what it used beyond
    (``settle``). It takes no later than the provider, refills no faster and
    gives back no sooner, so the provider's bucket has room for every request
    it lets go, but for one thing: a request reaches the provider after its
    booked start, and while both buckets are full the provider's loses the
    refill of that delay, which ours counted. So ours holds ``OUTPUT_LATE_S``
    less than a second (a bucket the size of the provider's met a 429 on 7% of
    a job's requests, each a burst after its ``Retry-After``), and a request
    books its output last, after the pacer's wait (a 429's hold would otherwise
    be such a delay). A process's share of the limit moves between the job's
    processes as its requests' do (``limits.coordinator``).

    An answer that never came keeps its whole reservation (the provider may have
    spent it); an error answer's is given back (a 429 or an error costs no output).
    The bucket starts full when the limit is told (the provider's is full at the
    job's start, as far as the job knows). Learned from an answer, it starts at
    what that answer said the provider's holds (``saw``), else empty: the
    requests sent before, unbooked, may hold most of the provider's (it costs
    the job at most ``OUTPUT_BUCKET_S`` of output, once).

    What is left (``saw``: ``anthropic-ratelimit-output-tokens-remaining``, of
    every answer, a 429's too). The provider's bucket is the account's: another
    client of the key, a job that ran before, or requests the job sent before it
    knew the limit spend from it, and ours, which counts only this job's
    bookings, would then let requests go into a bucket that cannot hold them
    (each a 429, held for its ``retry-after``, then sent again into the same
    bucket). So where an answer says the provider holds a smaller share of its
    limit than ours holds of its capacity (less the bookings the provider may
    not have counted yet: those to go out from ``OUTPUT_LATE_S`` before now
    on), ours follows it down to that share; it never follows up (ours counts
    bookings still on their way that the provider's does not yet). Following
    the level is not following the rate: a bucket that another client drains
    refills at less than ours, so a quota 429 whose
    headers say the output tokens are spent (``rejected``) also paces the
    output 5% slower, once per burst, recovering over 15 s (as ``Pacer`` for
    requests, without its 5% threshold: that counts requests, which do not
    bind here). The ``-reset`` header is not read: it is a time
    of the provider's clock, to the second, for a bucket about a second deep,
    and a bucket refilled continuously at a known rate needs only its level.
    """

    __slots__ = (
        "_at",
        "_blind",
        "_booked",
        "_level",
        "_lock",
        "_penalty",
        "_penalty_at",
        "clock",
        "learned",
        "ledger",
        "otpm",
    )

    def __init__(
        self,
        *,
        otpm: float | None = None,
        ledger: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.otpm = otpm
        self.learned: float | None = None
        self.ledger = ledger
        self.clock = clock
        self._lock = threading.Lock()
        self._level: float | None = None  # None: nothing booked yet
        self._at = -math.inf
        self._blind = False  # requests went out while no limit was known
        # (start, tokens) of the bookings of the last OUTPUT_LATE_S and those still to go.
        self._booked: deque[tuple[float, float]] = deque()
        self._penalty = 1.0  # < 1 after quota 429s of spent output tokens (``rejected``)
        self._penalty_at = -math.inf

    def _base_rate(self) -> float | None:
        """This process's share of the limit, output tokens/s (None: unlimited)."""
        if self.ledger is not None:
            rate: float | None = self.ledger.output_rate()
            return rate
        known = [x for x in (self.otpm, self.learned) if x]
        return min(known) / 60.0 * (1.0 - MARGIN) if known else None

    def rate(self) -> float | None:
        """This process's output tokens/s, or None where unlimited: its share of the limit,
        slower after quota 429s of spent output tokens (``rejected``)."""
        base = self._base_rate()
        return None if base is None else base * self._current_penalty()

    def _current_penalty(self) -> float:
        if self._penalty >= 1.0:
            return 1.0
        elapsed = self.clock() - self._penalty_at
        return min(1.0, self._penalty + (1.0 - self._penalty) * elapsed / _RATE_RECOVERY_S)

    def rejected(self, started: float) -> None:
        """A request that started at ``started`` met a quota 429 whose headers say the output
        tokens are spent: pace the output 5% slower, once per burst (429s of requests that
        started before the last slow-down are the same one), recovering over 15 s."""
        with self._lock:
            if started < self._penalty_at:
                return
            self._penalty = max(0.3, self._current_penalty() * _RATE_BACKOFF)
            self._penalty_at = self.clock()

    def _refilled(self, now: float, rate: float) -> float:
        capacity = rate * (OUTPUT_BUCKET_S - OUTPUT_LATE_S)
        if self._level is None:
            return 0.0 if self._blind else capacity
        return min(capacity, self._level + max(0.0, now - self._at) * rate)

    def take(self, tokens: float) -> tuple[float | None, float]:
        """Book ``tokens`` of output for a request: (seconds to wait, tokens booked).

        (0, 0): no output limit known, nothing booked. (None, 0): no share leased now
        (nothing booked; ask again after ``RENEW_S``).
        """
        with self._lock:
            rate = self.rate()
            if rate is None or tokens <= 0:
                if rate is None and tokens > 0 and self._level is None:
                    self._blind = True
                return 0.0, 0.0
            if rate <= 0:
                wait: float | None = None
            else:
                now = self.clock()
                level = self._refilled(now, rate)
                capacity = rate * (OUTPUT_BUCKET_S - OUTPUT_LATE_S)
                wait = max(0.0, (min(tokens, capacity) - level) / rate)
                self._level, self._at = level - tokens, now
                self._booked.append((now + wait, tokens))
                self._uncounted(now)
        if self.ledger is not None:
            if wait != 0.0:
                self.ledger.waiting()
            if wait is not None:
                self.ledger.spent_output(tokens)
        return wait, 0.0 if wait is None else tokens

    def settle(self, booked: float, used: float | None) -> None:
        """A request that booked ``booked`` tokens used ``used`` (None: not known, kept)."""
        if not booked or used is None or used == booked:
            return
        with self._lock:
            if self._level is not None:
                self._level += booked - used  # capped at the next refill
        if self.ledger is not None:
            self.ledger.spent_output(used - booked)

    def _uncounted(self, now: float) -> float:
        """Tokens booked that the provider may not have counted yet: those whose request
        goes out from ``OUTPUT_LATE_S`` before ``now`` on (its lock held)."""
        booked = self._booked
        while booked and booked[0][0] < now - OUTPUT_LATE_S:
            booked.popleft()
        return sum(tokens for at, tokens in booked if at >= now - OUTPUT_LATE_S)

    def saw(self, left: float | None, limit: float | None) -> float | None:
        """An answer said the provider's output bucket holds ``left`` tokens of its
        ``limit`` (per minute; None: it did not say): ours follows it down (see the class
        docstring).

        ``left`` is read as a share of the limit, and ours is held to that share of its
        own capacity: the provider counts it out of a minute's limit, which it may enforce
        over a shorter span (the simulator's ``limit_window``), and what is left of that
        span is the same share. (Of a bucket that is a whole minute's, this is cautious:
        half the minute left holds ours to half its second; such a bucket is near full
        while the job keeps under its limit.)
        Returns what the provider's holds, in ours (None: it did not say).
        """
        if left is None or not limit:
            return None
        with self._lock:
            rate = self.rate()
            if rate is None or rate <= 0:
                return None
            now = self.clock()
            capacity = rate * (OUTPUT_BUCKET_S - OUTPUT_LATE_S)
            provider = capacity * min(1.0, left / limit)
            holds = provider - self._uncounted(now)
            if self._level is None and self._blind:
                level = holds  # a limit learned: the provider's level, not an empty bucket
            else:
                level = min(holds, self._refilled(now, rate))
            self._level, self._at = level, now
        return provider

    def learn(self, otpm: float | None) -> None:
        """The output tokens per minute an answer's headers announce."""
        if not otpm:
            return
        if otpm != self.learned:
            log.info("dask-llm: the provider announces output tpm=%s", otpm)
            self.learned = otpm
        if self.ledger is not None:
            self.ledger.learned(None, None, otpm)


class Concurrency:
    """A limit on requests in flight, shared across threads and event loops.

    ``cap`` is hard. Below it the limit moves one of two ways: AIMD up to
    ``ceiling`` while no rate is known (``on_success``, ``on_overload``), or set
    by the throttle to what a known rate needs (``follow``).
    """

    __slots__ = (
        "_last_cut",
        "_lock",
        "_waiters",
        "cap",
        "ceiling",
        "clock",
        "in_flight",
        "limit",
        "slow_start",
    )

    def __init__(
        self,
        *,
        initial: int,
        cap: int,
        ceiling: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = max(1, cap)
        self.ceiling = self.cap if ceiling is None else max(1, min(ceiling, self.cap))
        self.limit = float(min(max(1, initial), self.ceiling))
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
            if self.limit < self.ceiling:
                self.limit = min(
                    float(self.ceiling),
                    self.limit + (1.0 if self.slow_start else 1.0 / self.limit),
                )
                self._wake()

    def follow(self, target: float) -> None:
        """Pacing governs: the limit is ``target`` (what the rate needs), within the cap."""
        limit = float(min(self.cap, max(1, int(target))))
        if limit == self.limit:
            return
        with self._lock:
            self.limit = limit
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


class Throttle:
    """Everything that decides when one HTTP request of a job to one provider may start."""

    def __init__(
        self,
        *,
        max_concurrency: int | None,
        initial_concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        output_tpm: float | None = None,
        output_apart: bool = False,
        ledger: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_concurrency``: the hard cap on requests in flight; None for "auto" (see the
        module docstring): ``auto_max_concurrency()``, and ``UNPACED_MAX_CONCURRENCY``
        while no rate is known. ``output_apart``: its provider limits output tokens apart
        (``tpm`` counts the prompt alone; ``output_tpm`` the output, in ``output``)."""
        self.auto = max_concurrency is None
        if max_concurrency is None:
            cap, ceiling = auto_max_concurrency(), UNPACED_MAX_CONCURRENCY
        else:
            cap = ceiling = max_concurrency
        self.concurrency = Concurrency(
            initial=initial_concurrency, cap=cap, ceiling=ceiling, clock=clock
        )
        self.pacer = Pacer(rpm=rpm, tpm=tpm, ledger=ledger, clock=clock)
        #: Output tokens, where its provider limits them apart (else None).
        self.output = (
            OutputBucket(otpm=output_tpm, ledger=ledger, clock=clock) if output_apart else None
        )
        #: The freshest rate-limit headers of this job's answers here, one reading per
        #: provider (by its header names): how a 429 is read.
        self._headrooms: dict[tuple[tuple[str, str], ...], Headroom] = {}
        self.clock = clock
        self._lock = threading.Lock()
        self._estimated = 0.0  # prompt tokens estimated (characters / 4) of answered requests
        self._actual = 0.0  # prompt tokens they reported
        self._completions = 0.0
        self._calls = 0
        self.rate_limited = 0
        self.latency = 1.0  # seconds on the wire, moving average of successes
        self.lag = 0.0  # seconds the event loops come round late, moving average
        self._first: float | None = None  # the first paced start
        self._answered = False  # an answer has come back (``latency`` is measured)
        self._followed = -math.inf  # the last ``_follow``
        self._tokens = 0.0  # the last request's estimated tokens (a tpm-only rate)
        self._output = 0.0  # the last request's output booked (an output-bound rate)
        self._row_target: int | None = None  # paced: rows to keep under way; None: unpaced
        self._capped = False  # "auto" met its cap once (logged)

    def headroom(self, names: Sequence[tuple[str, str]] = OPENAI_NAMES) -> Headroom:
        """The freshest rate-limit reading of this job's answers that carry ``names``
        ((remaining, limit) header pairs: one provider's), made on first use."""
        key = tuple(names)
        with self._lock:
            found = self._headrooms.get(key)
            if found is None:
                found = self._headrooms[key] = Headroom(clock=self.clock, names=key)
            return found

    def estimate_tokens(self, prompt_chars: int, max_tokens: int | None) -> float:
        """The tokens a request counts against ``tpm``, before it is sent.

        Its prompt: ``prompt_chars / 4``, scaled by the ratio of the prompt tokens
        answers reported to those estimated so far (within 1/4 and 4); plus, unless
        its provider limits output apart (then ``output`` paces it), its expected
        output (``expected_output``), as OpenAI counts it.
        """
        with self._lock:
            ratio = self._actual / self._estimated if self._estimated > 0 else 1.0
            prompt = prompt_chars / 4.0 * min(4.0, max(0.25, ratio))
        if self.output is not None:
            return prompt
        return prompt + self.expected_output(max_tokens)

    def expected_output(self, max_tokens: int | None) -> float:
        """The output tokens a request may use: its ``max_tokens`` (what providers count
        until its answer), else the mean output of the answers so far."""
        if max_tokens:
            return float(max_tokens)
        with self._lock:
            return self._completions / self._calls if self._calls else FIRST_OUTPUT_GUESS

    def record_usage(
        self, prompt_chars: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """A request of ``prompt_chars`` characters was answered with this usage (None: not
        reported): what corrects the estimates of the next ones."""
        with self._lock:
            if prompt_tokens is not None and prompt_chars > 0:
                self._estimated += prompt_chars / 4.0
                self._actual += prompt_tokens
            if completion_tokens is not None:
                self._completions += completion_tokens
                self._calls += 1

    def settle_output(self, booked: float, status: int | None, used: int | None) -> None:
        """A request that booked ``booked`` output tokens ended with ``status`` (None: no
        answer), its answer saying it used ``used``: give back what it did not use."""
        if self.output is None or not booked:
            return
        if status is None:
            return  # it may have been spent: kept
        self.output.settle(booked, used if status < 400 else 0)

    async def acquire(
        self, tokens: float, *, admit: bool = True, output: float = 0.0
    ) -> tuple[float, float]:
        """Wait for a slot and, unless ``admit=False``, a paced start; return the start
        time (for ``observe``) and the output tokens booked (for ``settle_output``).

        ``output``: the output tokens the request may use (``expected_output``), booked
        from ``output`` where its provider limits them apart. ``admit=False``: a slot
        only; the caller paces the request itself with ``admit``, at the moment it is
        written (see ``transport.pipeline``: anything that suspends between pacing and
        the write bunches requests on the wire).
        """
        ledger = self.pacer.ledger
        if ledger is not None:
            # Waiting for a slot is demand too: the ledger must not read a process whose
            # requests all wait for concurrency as one that needs no rate.
            ledger.queue(+1)
        try:
            now = self.clock()
            if now - self._followed >= FOLLOW_S:
                # A known rate governs from the first request, not from the first answer
                # (which is a round trip away: a second of 16 in flight at the start).
                self._tokens = tokens
                self._output = output
                self._follow(now)
            await self.concurrency.acquire()
        finally:
            if ledger is not None:
                ledger.queue(-1)
        if admit:
            try:
                return await self.admit(tokens, output=output)
            except BaseException:
                self.concurrency.release()
                raise
        return self.clock(), 0.0

    async def admit(
        self, tokens: float, *, unwritten: bool = False, output: float = 0.0
    ) -> tuple[float, float]:
        """Wait for a request's paced start, its output tokens, then the strict window;
        return the start and the output tokens booked.

        ``unwritten``: the caller calls ``written`` once the request is on the wire
        (``Pacer.admit``).

        All at the moment the request goes on the wire (when the transport lets
        the caller call this there): a start booked earlier, then written late by
        a busy loop (the SDK and the connection in between: p90 0.5 s, p99 2 s
        on a LocalCluster at 500 requests/s, 2026-12-07), reached the wire
        together with others booked around it, and the strict window alone let
        them through in bursts (up to 216 in 100 ms a process), which came back
        a window later as their echo (see ``Pacer.admit``).
        """
        ledger = self.pacer.ledger
        if ledger is not None:
            ledger.queue(+1)  # waiting for its start is demand
        booked = 0.0
        try:
            while (delay := self.pacer.reserve(tokens)) is None:  # noqa: ASYNC110 (a lease)
                await asyncio.sleep(RENEW_S)
            if delay > 0:
                await asyncio.sleep(delay)
            if self.output is not None:
                # Its output last but the window, as close to the wire as a booking can
                # be: a request booked, then held (a quota 429's Retry-After), would reach
                # a provider whose bucket had refilled to the brim while ours counted it
                # taken.
                while True:
                    wait, booked = self.output.take(output)
                    if wait is not None:
                        break
                    await asyncio.sleep(RENEW_S)  # no share of the output limit now
                if wait > 0:
                    await asyncio.sleep(wait)
            while (late := self.pacer.admit(tokens, unwritten=unwritten)) > 0:  # noqa: ASYNC110
                await asyncio.sleep(late)
        except BaseException:
            if self.output is not None:
                self.output.settle(booked, 0.0)  # never sent: nothing spent
            raise
        finally:
            if ledger is not None:
                ledger.queue(-1)
        return self.clock(), booked

    def written(self, tokens: float) -> None:
        """A request admitted ``unwritten`` is on the wire now (or its write failed)."""
        self.pacer.written(tokens)

    def observe(
        self,
        started: float,
        status: int | None,
        headers: Mapping[str, str] | None,
        *,
        quota: bool = True,
        announced: Sequence[float | None] = (),
        remaining: Sequence[tuple[str, str]] = OPENAI_NAMES,
    ) -> None:
        """A request that started at ``started`` ended with ``status`` (None: no response).

        ``quota``: for a 429, whether it said the quota is spent (``Provider.is_quota_429``,
        read with the provider's ``headroom(...).room()`` before this call).
        ``announced``: the (rpm, tpm, output tpm, output tokens left) its headers announce
        (``Provider.announced``); the output bucket follows what is left down
        (``OutputBucket.saw``), so settle the request's output first (``settle_output``).
        ``remaining``: its provider's (remaining, limit) header pairs: the reading of
        ``headroom(remaining)`` that its headers refresh.
        A 429 that is not the quota's and a 529 (overloaded) give their start back:
        the provider counted neither.
        """
        now = self.clock()
        with self._lock:
            if status == 429:
                self.rate_limited += 1
            elif status is not None and status < 400:
                self.latency = 0.8 * self.latency + 0.2 * max(0.0, now - started)
                self._answered = True
        limits = Announced(*announced)
        self.pacer.learn(limits.rpm, limits.tpm)
        if self.output is not None:
            self.output.learn(limits.otpm)
            holds = self.output.saw(limits.otpm_left, limits.otpm)
            if status == 429 and quota and holds is not None and holds < max(1.0, self._output):
                self.output.rejected(started)  # its headers say the output tokens are spent
        self.headroom(remaining).saw(headers)
        if now - self._followed >= FOLLOW_S:
            self._follow(now)  # a rate learned from these headers governs at once
        if status == 429 and quota:
            # With a known rate, pacing answers a 429; halving concurrency on top
            # would starve the pipe for several round trips.
            if self._row_target is None:
                self.concurrency.on_overload(started)
            self.pacer.rejected(started, retry_after(headers))
        elif status in _NOT_COUNTED:
            self.pacer.refund(started)
        elif status is not None and status < 400 and self._row_target is None:
            self.concurrency.on_success()

    def release(self) -> None:
        self.concurrency.release()

    def loop_lag(self, seconds: float) -> None:
        """A partition's loop ran a callback ``seconds`` after it was due."""
        self.lag = 0.9 * self.lag + 0.1 * max(0.0, seconds)

    def row_target(self) -> int:
        """How many rows this process should have under way to keep the pipe full.

        Paced: what the rate can have on the wire (rate x latency), doubled for
        rows between calls, plus a few. Unpaced: twice the concurrency limit.
        """
        now = self.clock()
        if now - self._followed >= FOLLOW_S:
            self._follow(now)
        target = self._row_target
        if target is None:
            return max(4, int(2 * self.concurrency.limit))
        return target

    def _follow(self, now: float) -> None:
        """Set concurrency and the rows to keep under way from the rate and latency now.

        At most every ``FOLLOW_S`` (the lease changes every ``RENEW_S``, the latency
        with every answer): reading the rate costs a lock or two, every request.
        """
        self._followed = now
        req, tok = self.pacer.rates()
        if tok is not None and self._tokens > 0:
            # Tokens a second, in requests of the size seen last.
            by_tokens = tok / self._tokens
            req = by_tokens if req is None else min(req, by_tokens)
        elif req is None and tok is not None:
            req = tok / 1_000.0  # no request estimated yet: a guess, corrected next time
        out = self.output.rate() if self.output is not None else None
        if out is not None:
            # Output tokens a second, in requests of the output answers used so far (what
            # they booked beyond it comes back with them), else of what the last one booked.
            used = self._completions / self._calls if self._calls else self._output
            by_output = out / max(used, 1.0)
            req = by_output if req is None else min(req, by_output)
        if req is None:
            self._row_target = None  # unpaced: AIMD governs
            return
        if self._first is None:
            self._first = now
        latency = self.latency if self._answered else max(self.latency, now - self._first)
        # What the loop's lag added to it (floored: a loop that lags more than its
        # answers take is short of CPU, and more rows would not help it).
        latency = max(0.1 * latency, latency - self.lag)
        if req > 0:  # 0: a lease that lapsed; nothing moves until the next one
            target = req * latency * HEADROOM + SPARE
            concurrency = self.concurrency
            if target > concurrency.cap and self.auto and not self._capped:
                self._capped = True
                log.info(
                    "dask-llm: %.0f requests/s at %.2f s each want %.0f in flight; this "
                    "process holds at most %d (half its open-file limit: raise `ulimit -n` "
                    "for more)",
                    req,
                    latency,
                    target,
                    concurrency.cap,
                )
            concurrency.follow(target)
        self._row_target = min(self.concurrency.cap, int(2 * max(req, 1.0) * latency) + 8)


class Throttles:
    """A job's throttles in this process, one per provider, and its rows under way.

    A job whose chains call two providers paces each provider's requests to that
    provider's own limits, with concurrency of its own (a provider's requests
    waiting for their turn hold no slot of the other's): each has a ``Throttle``
    (``of``), leasing its rates from its own lane of the job's ledger (the
    ledger's own for the job's ``default`` provider, ``Ledger.lane`` for each
    other). Limits told (``rpm``, ``tpm``, ``output_tpm``, without a ledger:
    tests and tools; a job's are its ledger's) hold for each provider apart: a
    number the same for each, a mapping by provider name each its own. The
    job's partitions admit rows by what every provider's pipe needs
    (``row_target``): a row under way waits on whichever is slower.
    """

    def __init__(
        self,
        *,
        max_concurrency: int | None,
        initial_concurrency: int = 16,
        rpm: Told = None,
        tpm: Told = None,
        output_tpm: Told = None,
        ledger: Any = None,
        default: str = "openai",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings: dict[str, Any] = {
            "max_concurrency": max_concurrency,
            "initial_concurrency": initial_concurrency,
            "clock": clock,
        }
        self._told: dict[str, Told] = {"rpm": rpm, "tpm": tpm, "output_tpm": output_tpm}
        self.ledger = ledger
        self.default = default
        self._lock = threading.Lock()
        self._by_provider: dict[str, Throttle] = {}
        self.rows = 0  # rows under way in this process, all partitions of the job
        #: The hard cap on requests in flight, per provider (``Concurrency.cap``).
        self.cap = max(1, auto_max_concurrency() if max_concurrency is None else max_concurrency)
        self._initial = initial_concurrency

    def of(self, provider: str, *, output_apart: bool = False) -> Throttle:
        """The throttle of the requests to ``provider`` (made on first use).

        ``output_apart``: the provider limits output tokens apart (``Provider.output_limit``).
        """
        found = self._by_provider.get(provider)
        if found is not None:
            return found
        with self._lock:
            found = self._by_provider.get(provider)
            if found is None:
                ledger = self.ledger
                if ledger is not None and provider != self.default:
                    ledger = ledger.lane(provider)
                found = self._by_provider[provider] = Throttle(
                    **self._settings,
                    rpm=told(self._told["rpm"], provider),
                    tpm=told(self._told["tpm"], provider),
                    output_tpm=told(self._told["output_tpm"], provider),
                    output_apart=output_apart,
                    ledger=ledger,
                )
            return found

    def throttles(self) -> list[Throttle]:
        with self._lock:
            return list(self._by_provider.values())

    def names(self) -> list[str]:
        """The providers whose requests this process has paced so far."""
        with self._lock:
            return list(self._by_provider)

    def rows_started(self, delta: int) -> None:
        with self._lock:
            self.rows += delta

    def row_target(self) -> int:
        """How many rows this process should have under way: what the provider that needs
        the most has on its wire (``Throttle.row_target``), before any request as unpaced."""
        targets = [t.row_target() for t in self.throttles()]
        return max(targets) if targets else max(4, 2 * self._initial)

    def loop_lag(self, seconds: float) -> None:
        """A partition's loop ran a callback ``seconds`` after it was due."""
        for throttle in self.throttles():
            throttle.loop_lag(seconds)
