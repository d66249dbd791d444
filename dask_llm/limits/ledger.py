"""A process's side of the job's ledger: its lease, renewed four times a second.

The job's budgets are held in one place (``limits.coordinator``); each process
running partitions of the job is a *member* that leases from it. ``Ledger``
is the member: a small thread renews the lease every ``RENEW_S`` while
partitions of the job run here, reporting what was used and whether requests
are waiting for pacing (so that capacity follows demand), what the provider's
headers said, and what was spent. Between renewals the pacer (``limits.pacer``)
works from the leased rates alone, and requests reserve their worst-case cost
from the dollar allowance, with no round trip.

Rates are leased per provider: each provider's requests are a ``Lane`` of the
lease (requests/s, tokens/s and output tokens/s, and what was used of them),
the ledger's own for the job's default provider (OpenAI) and one more for each
other provider the job's requests go to here; one report carries them all,
and the budget and the job's work once (``Coordinator.lease``).

How a member reaches the coordinator:

* ``LocalLink``: the coordinator of this process (threads, the synchronous
  scheduler, the pandas accessor);
* ``HubLink``: the client's coordinator through the job hub (a child of dask's
  process pool);
* ``SchedulerLink``: the scheduler plugin's ``dask_llm_lease`` handler, through
  the worker's own connection (``distributed``).

If the coordinator cannot be reached (a scheduler without dask-llm, a hub that
is gone), the member falls back to its even share of the limit, as 0.1 did,
and says so in the log; if it could be reached once and no longer can for a
whole lease, it stops sending (see ``limits.coordinator``, failure modes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from dask_llm.core import where as _cluster
from dask_llm.core.config import told
from dask_llm.limits.coordinator import (
    ALLOWANCE_S,
    HANDLER,
    LEASE_TTL_S,
    MARGIN,
    RENEW_S,
    WINDOW_S,
    local_coordinator,
)

log = logging.getLogger(__name__)

#: Seconds a member keeps its lease after its last partition ended.
LINGER_S = 2.0
#: A ledger reached before and silent this long stops its job (the scheduler is gone).
#: A shorter silence only holds the sends (``Lane._rates``: a lease that expired leases
#: nothing): a worker's event loop blocked for seconds (a large transfer, a GC pause, a
#: ``client.run`` of the user's) is no reason to fail every row left. Measured: a probe
#: that held a worker's loop for ~5 s stopped a 30,000-row job when this was 3 s.
GONE_S = 30.0


class Link(Protocol):
    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]: ...


class LocalLink:
    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
        return local_coordinator().lease(job, member, report)


class HubLink:
    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self.hub.call("lease", job, member, report)
        return reply


class SchedulerLink:
    """The scheduler plugin's handler, called on the worker's own event loop."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
        worker = self.worker
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle(task: asyncio.Future[Any]) -> None:
            if task.cancelled():
                answer.set_exception(LeaseUnavailable("the worker is closing"))
            elif task.exception() is not None:
                answer.set_exception(task.exception())
            else:
                answer.set_result(task.result())

        def call() -> None:
            # Made here, on the worker's loop: a worker that closed before this ran
            # leaves no call behind (a coroutine made and never awaited).
            rpc = getattr(worker.scheduler, HANDLER)
            asyncio.ensure_future(rpc(job=job, member=member, report=report)).add_done_callback(
                settle
            )

        try:
            worker.loop.asyncio_loop.call_soon_threadsafe(call)
        except RuntimeError as exc:  # its loop is closed
            raise LeaseUnavailable("the worker has closed") from exc
        reply = answer.result(timeout=LEASE_TTL_S)
        if not isinstance(reply, dict):
            raise LeaseUnavailable(f"the scheduler answered {reply!r}")
        return reply


class LeaseUnavailable(ConnectionError):
    """The coordinator cannot be reached."""


class Lane:
    """One provider's rates in a member's lease: what that provider's pacer spends.

    A job whose chains call two providers paces each to its own limits: each
    provider's requests are a lane of the member's lease, leased from its own
    ledger at the coordinator (the job's key for the job's own lane, ``job/name``
    for the others' : ``limits.coordinator``). Thread-safe.
    """

    def __init__(self, ledger: Ledger, name: str) -> None:
        self._ledger = ledger
        #: Its provider's name: whose limits told it is lent (``Ledger.told``).
        self.name = name
        self._lock = threading.Lock()
        self.rate_req: float | None = None
        self.rate_tok: float | None = None
        self.rate_out: float | None = None
        self.replied = False  # a reply to a report of this lane has arrived
        self.learned_rpm: float | None = None
        self.learned_tpm: float | None = None
        self.learned_otpm: float | None = None
        self._started_req = 0
        self._started_tok = 0.0
        self._spent_out = 0.0  # output tokens reserved less those given back, since the report
        self._last_second: deque[tuple[float, float]] = deque()  # (start, tokens)
        self._out_second: deque[tuple[float, float]] = deque()  # (when, output tokens)
        self._hungry = True  # until it has reported once: a new member has work
        self._queued = 0
        # What each report on its way said was sent in its last second (see ``holding``).
        self._reported: list[tuple[int, float]] = []

    # -- what the pacer reads --------------------------------------------------------------------
    def rates(self) -> tuple[float | None, float | None]:
        """Leased requests/s and tokens/s (None: no limit known anywhere)."""
        req, tok, _ = self._rates()
        return req, tok

    def output_rate(self) -> float | None:
        """Leased output tokens/s (None: no output limit known anywhere)."""
        return self._rates()[2]

    def _rates(self) -> tuple[float | None, float | None, float | None]:
        ledger = self._ledger
        if ledger.fallback or not self.replied:
            # Before the first lease (of the ledger, or of a lane made since): an even
            # share, not unpaced.
            return self._even_share()
        if ledger.clock() > ledger.expires:
            # Renewals are late (a busy process, a slow link): the coordinator has
            # given this share to others by now. Wait for the next lease.
            return (
                None if self.rate_req is None else 0.0,
                None if self.rate_tok is None else 0.0,
                None if self.rate_out is None else 0.0,
            )
        # A limit learned here that the ledger did not know at its last lease: an even
        # share of it until the next.
        req, tok, out = self._even_share()
        return (
            req if self.rate_req is None else self.rate_req,
            tok if self.rate_tok is None else self.rate_tok,
            out if self.rate_out is None else self.rate_out,
        )

    def _even_share(self) -> tuple[float | None, float | None, float | None]:
        config = self._ledger.told(self.name)
        processes = self._ledger.fallback_share

        def share(told: Any, learned: float | None) -> float | None:
            known = [x for x in (told, learned) if x]
            if not known:
                return None
            return min(known) / 60.0 * (1.0 - MARGIN) / processes

        return (
            share(config.get("rpm"), self.learned_rpm),
            share(config.get("tpm"), self.learned_tpm),
            share(config.get("output_tpm"), self.learned_otpm),
        )

    def started(self, tokens: float) -> None:
        with self._lock:
            self._started_req += 1
            self._started_tok += tokens
            self._last_second.append((self._ledger.clock(), tokens))

    def spent_output(self, tokens: float) -> None:
        """Output tokens reserved (> 0) or given back (< 0, an answer used fewer)."""
        with self._lock:
            self._spent_out += tokens
            self._out_second.append((self._ledger.clock(), tokens))

    def _sent_last_second(self, now: float) -> tuple[int, float]:
        """Requests and tokens started in the last second (what the provider still counts)."""
        recent = self._last_second
        while recent and recent[0][0] <= now - WINDOW_S:
            recent.popleft()
        return len(recent), sum(t for _, t in recent)

    def _output_last_second(self, now: float) -> float:
        recent = self._out_second
        while recent and recent[0][0] <= now - WINDOW_S:
            recent.popleft()
        return max(0.0, sum(t for _, t in recent))

    def holding(self, tokens: float, *, req: bool, tok: bool) -> bool:
        """Whether a request must wait for the reply to the report on its way.

        The coordinator counts this member, until its next report, at the higher
        of what it reported sending in its last second and the rate it grants
        now; the rest it lends to others at once. Until the reply is here, the
        old rate still applies: so no more than was reported may be in this
        process's last second (``req``/``tok``: which limits are in force).
        """
        if not self._reported:  # every admit asks; a report is on its way a few ms a renewal
            return False
        with self._lock:
            if not self._reported:
                return False
            count, used = self._sent_last_second(self._ledger.clock())
            held_req = min(x[0] for x in self._reported)
            held_tok = min(x[1] for x in self._reported)
        return (req and count + 1 > held_req) or (tok and used + tokens > held_tok)

    def waiting(self) -> None:
        """A request had to wait for pacing: this member could use more."""
        self._hungry = True

    def queue(self, delta: int) -> None:
        """Requests waiting for their start (+1 when one begins to wait, -1 when it goes)."""
        with self._lock:
            self._queued += delta

    def learned(self, rpm: float | None, tpm: float | None, otpm: float | None = None) -> None:
        with self._lock:
            if rpm and (self.learned_rpm is None or rpm < self.learned_rpm):
                self.learned_rpm = rpm
            if tpm and (self.learned_tpm is None or tpm < self.learned_tpm):
                self.learned_tpm = tpm
            if otpm and (self.learned_otpm is None or otpm < self.learned_otpm):
                self.learned_otpm = otpm

    # -- the report and its reply (under the ledger's lock) ----------------------------------
    def _report(self, now: float, elapsed: float) -> tuple[dict[str, Any], tuple[int, float]]:
        with self._lock:
            sent_1s = self._sent_last_second(now)
            self._reported.append(sent_1s)
            report = {
                "used_req": self._started_req / elapsed,
                "used_tok": self._started_tok / elapsed,
                "used_out": max(0.0, self._spent_out) / elapsed,
                "sent_1s": sent_1s,
                "sent_out_1s": self._output_last_second(now),
                "hungry": self._hungry or self._queued > 0,
                "learned_rpm": self.learned_rpm,
                "learned_tpm": self.learned_tpm,
                "learned_otpm": self.learned_otpm,
            }
            self._started_req = 0
            self._started_tok = 0.0
            self._spent_out = 0.0
            self._hungry = False
        return report, sent_1s

    def _answered(self, sent_1s: tuple[int, float], reply: dict[str, Any] | None) -> None:
        """The report that said ``sent_1s`` got ``reply`` (None: it was not delivered)."""
        with self._lock:
            self._reported.remove(sent_1s)
            if reply is None:
                return
            rate_req, rate_tok = reply.get("rate_req"), reply.get("rate_tok")
            rate_out = reply.get("rate_out")
            self.rate_req, self.rate_tok, self.rate_out = rate_req, rate_tok, rate_out
            self.replied = True


class Ledger:
    """One member's lease of one job (thread-safe; the pacer reads it on every request).

    The lease holds the job's budget and work, and one ``Lane`` of rates per provider
    the job's requests go to here: the ledger's own (the job's default provider's,
    whose fields the report carries as they always were) and ``lane(name)`` for each
    other. The ledger answers for its own lane (``rates``, ``started``, ...).
    """

    def __init__(
        self,
        job: str,
        config: dict[str, Any],
        link: Link,
        *,
        default: str = "openai",
        fallback_share: int = 1,
        on_stop: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.config = config
        self.link = link
        self.member = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fallback_share = max(1, fallback_share)
        self.on_stop = on_stop
        self.clock = clock
        self._lock = threading.Lock()
        self.reached = False  # the coordinator answered at least once
        self.fallback = False
        self.expires = 0.0
        #: The provider of its own lane (the job's default); each other's is ``lane(name)``.
        self.default = default
        self.own = Lane(self, default)
        self._lanes: dict[str, Lane] = {}
        # dollars
        self.budgeted = config.get("budget_usd") is not None
        self.allowance = 0.0  # held, not reserved
        self.reserved = 0.0
        self.spent_since = 0.0
        self.spent_rate = 0.0
        self.spent_usd = 0.0
        self.budget_usd: float | None = config.get("budget_usd")
        # demand
        self._begun: list[int] = []  # rows to run of each partition begun since the last report
        self._last = clock()
        self._thread: threading.Thread | None = None
        self._partitions = 0
        self._idle_since = clock()
        self._backlog = 0  # rows of the partitions running here that are not done yet

    def lane(self, name: str) -> Lane:
        """The rates of the requests to provider ``name`` (made on first use)."""
        with self._lock:
            found = self._lanes.get(name)
            if found is None:
                found = self._lanes[name] = Lane(self, name)
            return found

    def told(self, provider: str) -> dict[str, float | None]:
        """The limits told for ``provider``'s requests (``rpm``, ``tpm``, ``output_tpm``,
        per minute; None: none): the job's config holds a number for every provider, or a
        mapping by provider name (``core.config.told``)."""
        config = self.config
        return {name: told(config.get(name), provider) for name in ("rpm", "tpm", "output_tpm")}

    # -- its own lane, for the pacer of the job's default provider -------------------------------
    def rates(self) -> tuple[float | None, float | None]:
        """Leased requests/s and tokens/s of its own lane (None: no limit known anywhere)."""
        return self.own.rates()

    def output_rate(self) -> float | None:
        return self.own.output_rate()

    def started(self, tokens: float) -> None:
        self.own.started(tokens)

    def spent_output(self, tokens: float) -> None:
        self.own.spent_output(tokens)

    def holding(self, tokens: float, *, req: bool, tok: bool) -> bool:
        return self.own.holding(tokens, req=req, tok=tok)

    def waiting(self) -> None:
        self.own.waiting()

    def queue(self, delta: int) -> None:
        self.own.queue(delta)

    def learned(self, rpm: float | None, tpm: float | None, otpm: float | None = None) -> None:
        self.own.learned(rpm, tpm, otpm)

    # -- the work ----------------------------------------------------------------------------------
    def partition_began(self, rows: int) -> None:
        """A partition of the job began here with ``rows`` rows to run (the cache's not counted)."""
        with self._lock:
            self._backlog += rows
            self._begun.append(rows)

    def rows_done(self, rows: int) -> None:
        """``rows`` of the partitions running here are done (or will not run: a stop)."""
        with self._lock:
            self._backlog = max(0, self._backlog - rows)

    # -- dollars ----------------------------------------------------------------------------------
    def reserve(self, worst_usd: float) -> bool | None:
        """Reserve ``worst_usd`` for a request.

        True: reserved. None: not now (what is left of the budget is reserved by
        requests in flight; try again when they have settled). False: the budget is
        spent (the job stops).
        """
        if not self.budgeted:
            return True
        if self._take(worst_usd):
            return True
        with self._lock:
            need = worst_usd - self.allowance
        reply = self._renew(need=need)
        if reply is None:
            return None
        if reply.get("stop"):
            return False
        return True if self._take(worst_usd) else None

    def _take(self, worst_usd: float) -> bool:
        """Reserve ``worst_usd`` out of the allowance in hand, if it is there."""
        with self._lock:
            if self.allowance < worst_usd:
                return False
            self.allowance -= worst_usd
            self.reserved += worst_usd
            return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """A request that reserved ``reserved_usd`` cost ``actual_usd``."""
        if not self.budgeted:
            return
        with self._lock:
            self.reserved -= reserved_usd
            self.allowance += reserved_usd - actual_usd
            self.spent_since += actual_usd
            self.spent_usd += actual_usd

    # -- the lease ---------------------------------------------------------------------------------
    def attached(self, partitions: int) -> None:
        """How many partitions of the job run here now."""
        with self._lock:
            self._partitions = partitions
            if partitions == 0:
                self._idle_since = self.clock()

    def start(self) -> None:
        """Lease now, and renew in the background while partitions run (idempotent).

        The lease is kept ``LINGER_S`` after the last partition ends: a worker that
        runs partitions one after another keeps its share between them.
        """
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="dask-llm-lease", daemon=True)
            thread = self._thread
        self._renew()
        thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(RENEW_S)
            with self._lock:
                idle = self._partitions == 0 and self.clock() - self._idle_since > LINGER_S
                if idle:
                    self._thread = None
            if idle:
                self._renew(release=True)
                return
            self._renew()

    def _renew(self, *, need: float = 0.0, release: bool = False) -> dict[str, Any] | None:
        now = self.clock()
        with self._lock:
            elapsed = max(1e-3, now - self._last)
            self._last = now
            want = max(need, self.spent_rate * ALLOWANCE_S) if self.budgeted else 0.0
            if self.budgeted and self.allowance > want and not need:
                self.allowance = want  # hand back what it will not need soon
            begun = self._begun
            own, sent_1s = self.own._report(now, elapsed)
            lanes = {name: lane._report(now, elapsed) for name, lane in self._lanes.items()}
            report = {
                # The limits told, as its own lane's provider's (numbers: a coordinator
                # holds one number a ledger); each lane's below.
                "config": {**self.config, **self.told(self.default)},
                **own,
                "interval": elapsed,
                "spent_usd": self.spent_since,
                "allowance": self.allowance + self.reserved,
                "need_usd": need,
                "want_usd": want,
                "release": release,
                "backlog": self._backlog,
                "begun": begun,
            }
            if lanes:
                # Each other provider's rates, leased from a ledger of their own (the same
                # work and backlog: ``Coordinator.lease``).
                report["lanes"] = {
                    name: {**sub, "config": self.told(name)} for name, (sub, _) in lanes.items()
                }
            self._begun = []
            spent = self.spent_since
            self.spent_rate = 0.8 * self.spent_rate + 0.2 * (spent / elapsed)
            self.spent_since = 0.0

        def answered(reply: dict[str, Any] | None) -> None:
            self.own._answered(sent_1s, reply)
            replies = (reply or {}).get("lanes") or {}
            for name, (_, sent) in lanes.items():
                self._lanes[name]._answered(sent, None if reply is None else replies.get(name, {}))

        try:
            reply = self.link.lease(self.job, self.member, report)
        except (OSError, ConnectionError, TimeoutError, RuntimeError, KeyError, ValueError) as exc:
            answered(None)
            with self._lock:
                self.spent_since += spent  # not delivered: report it next time
                self._begun = begun + self._begun
            self._unreachable(exc, now)
            return None
        except BaseException:
            answered(None)  # else this process would hold its sends for good
            raise
        with self._lock:
            self.reached = True
            self.fallback = False
            self.expires = now + LEASE_TTL_S  # the coordinator's, counted from before the call
            grant = reply.get("grant_usd") or 0.0
            if self.budgeted and math.isfinite(grant):
                self.allowance += grant
            self.budget_usd = reply.get("budget_usd", self.budget_usd)
        answered(reply)
        stop = reply.get("stop")
        if stop and self.on_stop is not None:
            self.on_stop(stop)
        return reply

    def _unreachable(self, exc: BaseException, now: float) -> None:
        if not self.reached:
            if not self.fallback:
                log.warning(
                    "dask-llm: the job's ledger cannot be reached (%s: %s); pacing to an even "
                    "share of the limit in this process",
                    type(exc).__name__,
                    exc,
                )
            self.fallback = True
        elif now > self.expires + GONE_S and self.on_stop is not None:
            self.on_stop(f"the job's ledger is gone ({type(exc).__name__}: {exc})")


def link_for(hub: Any) -> Link:
    """How this process reaches its job's coordinator."""
    worker = _cluster.distributed_worker()
    if worker is not None:
        return SchedulerLink(worker)
    if hub is not None:
        return HubLink(hub)
    return LocalLink()


def even_share_hint(hint: int) -> int:
    """How many processes would split the limit evenly, if the ledger cannot be reached.

    ``hint``: the ``distributed`` cluster's worker processes when ``enrich`` was called.
    """
    if _cluster.distributed_worker() is not None:
        return max(1, hint)
    if _cluster.in_pool_child():
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(hint, cpus or 1)
    return max(1, hint)
