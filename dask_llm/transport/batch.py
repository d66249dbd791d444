"""Batch API mode: the requests the chains would send online, sent as the provider's batches.

``enrich(chains, batch=True)`` runs the chains unchanged. Each chat-completion
request they make reaches the job's transport (``transport.pipeline``) as online; in
batch mode the transport hands it to this partition's ``Batcher`` and waits.
When every row of the partition is waiting (on a batch line, or on an
identical request another partition has in a batch), the waiting requests
are submitted as a batch of the provider's Batch API (``custom_id`` = the
request's cache key; ``providers.base.BatchClient``: OpenAI's ``/v1/files``
and ``/v1/batches``, Anthropic's ``/v1/messages/batches``), split to stay
within the API's limits (``BatchPolicy.max_lines``, ``max_bytes``). A watcher polls each batch
with backoff; when it ends, its output and error files are read, each answer
enters the result cache, and each waiting request is answered with its line
as if it had come online, so the chain's own parsers, structured output,
usage and cost run exactly as in online mode. A dependent chain's requests
appear once its inputs are back: the next round.

Why a quiescence rule rather than "one batch per chain": chains are opaque
(a chain may send two requests, a parse failure is retried by a new request,
a row may be answered from the cache), so the batcher does not guess how
many requests a round has; it counts, per row, the chain calls under way
and the requests waiting, and submits when nothing else can arrive.

**Never pay twice.** Before any wait the cache records, for each line, the
input file it was uploaded in (``batchline:<key>``), and for each file the
batch made of it (``batchfile:<file id>``); a file whose batch id was never
recorded (a crash between the two) is found by listing the batches. A rerun
after a crash, Ctrl-C or a killed worker finds each missing request there
and re-attaches to its batch (still running, or finished and not yet read)
instead of submitting it again. Without a cache (``cache=False``) there is
nothing to re-attach to.

**A stop for the budget or the quality gate** cancels the partition's batches
in flight (``cancel_in_flight``), each through its own provider's client: nobody
wants their answers at a price the budget refused, or from a job the gate judged
broken. The watchers then poll every ``poll_initial`` and read what each batch
finished once its cancel is done (cached: a rerun pays only for the rest),
waiting at most ``STOP_CANCEL_WAIT_S``: a cancel still under way then is named
as on Ctrl-C. Ctrl-C does not cancel: the user may want them, and a rerun
re-attaches to them.

**Partial results.** Lines that failed (an error status) and lines a batch
never ran (expired, cancelled) are answered with a retryable error
(408 ``batch_expired``), so the job's retry policy resubmits them in the
next round, without backoff and without its time budget (a round is the
wait); ``BatchPolicy(fallback="online")`` sends them online instead, and
``deadline=`` sends what is not back by then online: its batches are
cancelled a quarter of the deadline before it (at most 10 minutes before), so
that what they finished is read by the deadline however long the provider
takes to cancel; lines of a cancel still under way at the deadline go online
(a line that batch finished is then paid twice). A batch
the provider rejects at validation stops the job with its errors named:
every other line would be rejected alike.

Each provider's SDK speaks its own Batch API (``providers``): it is already
the transport of its chat models and knows the objects' shapes; its own
retries (2) are on for these calls except the create call, which is not
idempotent (a lost answer to it is found by listing batches, where the
provider allows it, not by creating another).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

from dask_llm.core.config import BatchPolicy
from dask_llm.core.deadline import batch_late
from dask_llm.core.errors import JobStopped
from dask_llm.providers.base import BatchClient, BatchState, Provider
from dask_llm.providers.registry import OPENAI, api_errors, providers, status_errors
from dask_llm.transport.wire import Answer, fatal_reason

log = logging.getLogger(__name__)

#: The row (of this partition) whose chains run in this context; set by the runner.
ROW: contextvars.ContextVar[int | None] = contextvars.ContextVar("dask_llm_row", default=None)

#: Whose Batch API a line goes to: (provider, base URL, API key).
Group = tuple[Provider, str, str]
_GAUGES: Final = {
    "validating": "batches_validating",
    "in_progress": "batches_in_progress",
    "finalizing": "batches_finalizing",
    "cancelling": "batches_in_progress",
}
_TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
#: A deadline's batches are cancelled this share of it before it, at most CANCEL_MAX_S:
#: the provider takes a while to cancel (OpenAI: up to 10 minutes), and the lines a
#: cancelled batch finished are read only once the cancel is done.
CANCEL_SHARE: Final = 0.25
CANCEL_MAX_S: Final = 600.0
#: How often lines waiting for the budget look again when none of this partition's settle.
_RESERVE_RETRY_S: Final = 0.25
#: How long a job stopped by its budget or quality gate waits for the provider to cancel
#: its batches, to read and cache what they finished; a cancel still under way then is
#: named as on Ctrl-C (a rerun with the same cache re-attaches and reads it).
STOP_CANCEL_WAIT_S: Final = 60.0


class GoOnline:
    """The answer to a line that is to be sent online instead (fallback or deadline)."""

    __slots__ = ()


GO_ONLINE: Final = GoOnline()


class _Progress:
    """What a batch has shown of its pace (``deadline=``): lines ``done0`` at ``since``
    (the last poll that saw it validating, or the first that saw it at all), in wave
    ``wave`` (the partition's submissions so far: its round of the chains), submitted
    (or first seen) at ``submitted``."""

    __slots__ = ("done0", "since", "submitted", "wave")

    def __init__(self, since: float, done0: int, wave: int) -> None:
        self.since = since
        self.submitted = since
        self.done0 = done0
        self.wave = wave


class _Line:
    __slots__ = ("body", "future", "group", "key", "reattached")

    def __init__(self, key: str, body: bytes, group: Group, future: Any) -> None:
        self.key = key
        self.body = body
        self.group = group
        self.future = future
        self.reattached = False  # waits on a batch an earlier run submitted


class Batcher:
    """One partition's batches: collects its requests, submits them, answers them."""

    def __init__(self, job: Any, stats: Any, policy: BatchPolicy, on_progress: Any) -> None:
        self.job = job
        self.stats = stats
        self.policy = policy
        self._on_progress = on_progress
        self._unsent: list[_Line] = []
        # row -> [chain calls under way, requests waiting]
        self._rows: dict[int, list[int]] = {}
        self._blocked_rows = 0
        self._check_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: dict[Group, BatchClient] = {}
        self._watching: dict[str, dict[str, list[_Line]]] = {}
        self.in_flight: dict[str, str] = {}  # batch id -> last status seen
        self._first_submit: float | None = None
        self._online = False  # cancelling for the deadline: everything goes online
        self._stopping = False  # the job stopped (budget, quality): cancelling, nothing new
        self._wake = asyncio.Event()  # set: the watchers look at their batches now
        self._groups: dict[str, Group] = {}  # batch id -> whose Batch API it is in
        self._read_batches: set[str] = set()  # ended and read: never re-attached to
        # Lines waiting to reserve their worst case (budget_usd=): (worst case, its future).
        self._reservations: deque[tuple[Callable[[], float], asyncio.Future[float | None]]] = (
            deque()
        )
        self._retry_handle: asyncio.Handle | None = None
        # deadline=: each batch's pace (batch id -> its progress), and the submissions so far.
        self._progress: dict[str, _Progress] = {}
        self._wave = 0

    # -- rows: what may still send a request -------------------------------------------------
    def row_admitted(self, row: int) -> None:
        self._rows[row] = [0, 0]

    def row_done(self, row: int) -> None:
        state = self._rows.pop(row, None)
        if state is not None and _blocked(state):
            self._blocked_rows -= 1
        self._maybe_submit()

    def call_started(self) -> None:
        self._change(ROW.get(), 1, 0)

    def call_ended(self) -> None:
        self._change(ROW.get(), -1, 0)

    def _change(self, row: int | None, calls: int, waiting: int) -> None:
        state = self._rows.get(row) if row is not None else None
        if state is None:
            return
        before = _blocked(state)
        state[0] += calls
        state[1] += waiting
        after = _blocked(state)
        self._blocked_rows += int(after) - int(before)
        if after:
            self._maybe_submit()

    def _maybe_submit(self) -> None:
        if self._unsent and self._blocked_rows >= len(self._rows) and self._check_handle is None:
            # A moment later, and only if it still holds: a dependent chain's task is
            # woken by its dependency one loop step after the dependency returned.
            loop = asyncio.get_running_loop()
            self._check_handle = loop.call_later(0.02, self._check)

    def _check(self) -> None:
        self._check_handle = None
        if self._unsent and self._blocked_rows >= len(self._rows):
            lines, self._unsent = self._unsent, []
            self._wave += 1
            self._spawn(self._submit(lines))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- a request --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a request's wait: this row waits on something outside it."""
        row = ROW.get()
        self._change(row, 0, 1)
        try:
            yield
        finally:
            self._change(row, 0, -1)

    # -- the budget: a round is what the budget allows at once ------------------------------------
    async def reserve(self, worst_of: Callable[[], float]) -> float | None:
        """Reserve a line's worst-case cost (``budget_usd=``); None: the budget is spent.

        When what is left of the budget is reserved by lines in flight, the line
        queues (its row counts as waiting) until a batch settles: every queued
        line then tries again in one pass, in order, with its worst case computed
        anew (a line queued before any answer reserved 1,024 completion tokens;
        after one, 1.5x the largest seen), so the next batch holds every line the
        budget allows at once rather than those that happened to wake first.
        """
        if not self._reservations:
            worst = worst_of()
            reserved = self.job.ledger.reserve(worst)
            if reserved is not None:
                return worst if reserved else None
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._reservations.append((worst_of, future))
        self._retry_later(_RESERVE_RETRY_S)
        return await future

    def settled(self) -> None:
        """A line's reservation settled: the queued lines try again (once, after every settle)."""
        if self._reservations:
            self._retry_later(0.0)

    def _retry_later(self, delay: float) -> None:
        if self._retry_handle is not None:
            if delay > 0:
                return
            self._retry_handle.cancel()
        loop = asyncio.get_running_loop()
        if delay > 0:
            self._retry_handle = loop.call_later(delay, self._retry_reservations)
        else:
            self._retry_handle = loop.call_soon(self._retry_reservations)

    def _retry_reservations(self) -> None:
        self._retry_handle = None
        queue = self._reservations
        try:
            self.job.check()
        except BaseException as exc:
            while queue:
                _, future = queue.popleft()
                if not future.done():
                    future.set_exception(exc)
            return
        while queue:
            worst_of, future = queue[0]
            if future.done():  # its row was cancelled
                queue.popleft()
                continue
            worst = worst_of()
            reserved = self.job.ledger.reserve(worst)
            if reserved is None:
                break
            queue.popleft()
            future.set_result(worst if reserved else None)
        if queue:
            # A line of another partition may settle too: look again a lease later.
            self._retry_later(_RESERVE_RETRY_S)

    async def answer(
        self, request: Any, body: bytes, key: str, *, provider: Provider, fresh: bool = False
    ) -> Any:
        """The answer to ``request`` (to ``provider``) from a batch (an ``Answer``), or
        ``GO_ONLINE``.

        ``fresh``: asked again (its cached answer did not parse): a line of its own,
        never re-attached.
        """
        if self._online:
            return GO_ONLINE
        loop = asyncio.get_running_loop()
        custom_id = f"{key}.{uuid.uuid4().hex[:8]}" if fresh else key
        base, api_key = provider.batch_group(request)
        line = _Line(custom_id, body, (provider, base, api_key), loop.create_future())
        batch_id = None if fresh else await self._registered(line)
        if batch_id is not None:
            self._watch_line(batch_id, line)
        else:
            self._unsent.append(line)
            self._maybe_submit()
        return await line.future

    # -- re-attaching after a crash -------------------------------------------------------
    async def _registered(self, line: _Line) -> str | None:
        """The batch ``line`` was submitted in by an earlier run, if it may still answer."""
        job = self.job
        if job.cache is None:
            return None
        found = job.cache_get([f"batchline:{line.key}"], self.stats).get(f"batchline:{line.key}")
        if not isinstance(found, dict) or not isinstance(found.get("file"), str):
            return None
        file_id = found["file"]
        for batch_id, lines in self._watching.items():
            if line.key in lines:
                return batch_id
        entry = job.cache_get([f"batchfile:{file_id}"], self.stats).get(f"batchfile:{file_id}")
        if isinstance(entry, dict) and isinstance(entry.get("batch"), str):
            batch_id = str(entry["batch"])
            return None if batch_id in self._read_batches else batch_id
        try:
            found_id = await self._client(line.group).find(file_id)
        except api_errors() as exc:
            log.warning("dask-llm: could not list batches to re-attach (%s)", exc)
            return None
        if found_id is not None:
            job.cache_put(f"batchfile:{file_id}", {"batch": found_id}, self.stats)
        return found_id  # None: stored, never submitted: submit again

    def _watch_line(self, batch_id: str, line: _Line) -> None:
        line.reattached = True
        lines = self._watching.get(batch_id)
        if lines is None:
            self._watching[batch_id] = {line.key: [line]}
            self._groups[batch_id] = line.group
            self.stats.batches += 1  # this run's batches: submitted or re-attached to
            log.info("dask-llm: re-attaching to batch %s", batch_id)
            self._spawn(self._watch(batch_id, line.group))
        else:
            lines.setdefault(line.key, []).append(line)

    # -- submitting -----------------------------------------------------------------------------
    async def _submit(self, lines: list[_Line]) -> None:
        groups: dict[Group, list[_Line]] = {}
        for line in lines:
            groups.setdefault(line.group, []).append(line)
        for group, members in groups.items():
            for chunk in _chunks(members, self.policy.max_lines, self.policy.max_bytes):
                try:
                    await self._submit_one(group, chunk)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._fail_lines(chunk, exc)

    async def _submit_one(self, group: Group, chunk: list[_Line]) -> None:
        self.job.check()
        by_key: dict[str, list[_Line]] = {}
        for line in chunk:
            by_key.setdefault(line.key, []).append(line)

        def stored(ref: str) -> None:
            for key in by_key:
                self.job.cache_put(f"batchline:{key}", {"file": ref}, self.stats)
            refs.append(ref)

        refs: list[str] = []
        batch = await self._client(group).submit(
            {key: members[0].body for key, members in by_key.items()},
            job=str(self.job.options.job),
            stored=stored,
        )
        for ref in refs:
            self.job.cache_put(f"batchfile:{ref}", {"batch": batch.id}, self.stats)
        if self._first_submit is None:
            self._first_submit = time.monotonic()
        self.stats.batches += 1
        self._progress[batch.id] = _Progress(time.monotonic(), 0, max(1, self._wave))
        self._status(batch.id, batch.status)
        log.info("dask-llm: submitted batch %s (%d lines)", batch.id, len(by_key))
        self._watching[batch.id] = by_key
        self._groups[batch.id] = group
        if self._stopping:
            # The job stopped (budget, quality) while this batch's create call was under
            # way: ``cancel_in_flight`` did not know it yet. Cancelled now; its watcher
            # reads what it finished, as for the others.
            await self._cancel_for_stop(batch.id)
        self._spawn(self._watch(batch.id, group))

    # -- watching -------------------------------------------------------------------------------
    async def _watch(self, batch_id: str, group: Group) -> None:
        client = self._client(group)
        delay = self.policy.poll_initial
        cancelled = False
        try:
            while True:
                batch = await client.retrieve(batch_id)
                if self.in_flight.get(batch_id) != batch.status:
                    self._status(batch_id, batch.status)
                if batch.status in _TERMINAL:
                    break
                late = not cancelled and self._late(batch)
                if not cancelled and (late or self._past(self._cancel_at())):
                    self._online = True
                    if not late:
                        log.info("dask-llm: deadline near, cancelling batch %s", batch_id)
                    await client.cancel(batch_id)
                    cancelled = True
                    self._replan_online(batch)
                    delay = self.policy.poll_initial  # what it finished is read once it ends
                if cancelled and self._past(self._deadline_at()):
                    self._give_up(batch_id, batch.status)
                    return
                next_event = self._deadline_at() if cancelled else self._cancel_at()
                if next_event is not None:
                    delay = min(delay, max(0.0, next_event - time.monotonic()) + 0.01)
                if self._stopping:  # cancelled: its finished lines are read as soon as it ends
                    await asyncio.sleep(self.policy.poll_initial)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(max(delay, self.policy.poll_initial) * 1.5, self.policy.poll_max)
            await self._read(client, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            watched = self._watching.get(batch_id, {})
            lines = [line for members in watched.values() for line in members]
            self._fail_lines(lines, exc)
        finally:
            self._watching.pop(batch_id, None)
            self._groups.pop(batch_id, None)
            self._progress.pop(batch_id, None)
            self._status(batch_id, None)

    def _status(self, batch_id: str, status: str | None) -> None:
        """Batch ``batch_id`` is now in ``status`` (None: ended and read, or given up)."""
        stats = self.stats
        for old, sign in ((self.in_flight.get(batch_id), -1), (status, +1)):
            field = _GAUGES.get(old or "")
            if field is not None:
                setattr(stats, field, getattr(stats, field) + sign)
        if status is None:
            self.in_flight.pop(batch_id, None)
        else:
            self.in_flight[batch_id] = status
        self._on_progress()

    def _deadline_at(self) -> float | None:
        """When (``time.monotonic``) what is not back goes online; None: no deadline yet.

        With ``enrich(deadline=)``, re-planned (never later) as the job measures its online
        rate and latency: ``TierChooser.cutoff_at``."""
        deadline = self.policy.deadline
        if deadline is None or self._first_submit is None:
            return None
        at = self._first_submit + deadline
        tiers = self.job.tiers()
        cutoff = tiers.cutoff_at() if tiers is not None else None
        if cutoff is not None:
            at = min(at, cutoff - time.time() + time.monotonic())
        return at

    def _cancel_at(self) -> float | None:
        """When the batches are cancelled, for what they finished to be read by the deadline."""
        at = self._deadline_at()
        if at is None or self.policy.deadline is None:
            return None
        return at - min(self.policy.deadline * CANCEL_SHARE, CANCEL_MAX_S)

    # -- deadline=: re-planned from a batch's progress (core.deadline) ------------------------
    def _late(self, batch: BatchState) -> bool:
        """Whether ``batch``, by its pace so far, cannot end before its cancel would begin
        (``core.deadline.batch_late``): then it is cancelled now, not at the cut-off. A
        batch still validating is late once even the turnaround assumed, from now, would
        end its rounds after that moment.

        Only where its lines go online by Flex (OpenAI's), at the Batch API's price:
        Anthropic's would go at list price, so its batch keeps its cut-off, answering
        at half price until then."""
        tiers = self.job.tiers()
        cancel_at = self._cancel_at()
        group = self._groups.get(batch.id)
        if tiers is None or cancel_at is None or group is None or group[0] is not OPENAI:
            return False
        now = time.monotonic()
        progress = self._progress.get(batch.id)
        if progress is None:  # re-attached to: its pace is measured from here
            progress = self._progress[batch.id] = _Progress(now, batch.done, max(1, self._wave))
        validating = batch.status == "validating" or batch.total <= 0
        if validating:
            progress.since = now  # not running yet: its pace starts after this
        elif batch.status != "in_progress":
            return False  # finalizing: every line is done; cancelling: under way
        done, total = batch.done - progress.done0, batch.total - progress.done0
        turnaround = tiers.deadline.batch_turnaround
        rounds_left = max(1, tiers.rounds - progress.wave + 1)
        end = batch_late(
            now=now,
            since=progress.since,
            done=done,
            total=total,
            turnaround=turnaround,
            rounds_left=rounds_left,
            cancel_at=cancel_at,
            submitted=progress.submitted,
            validating=validating,
        )
        if end is None:
            return False
        if validating:
            log.info(
                "dask-llm: batch %s has been validating for %.1f s: even at the turnaround "
                "assumed (%.1f s) from now, its %d round(s) would end after its cancel would "
                "begin (in %.1f s); cancelling it now, its lines go online",
                batch.id,
                now - progress.submitted,
                turnaround,
                rounds_left,
                cancel_at - now,
            )
        else:
            log.info(
                "dask-llm: batch %s has done %d of %d lines in %.1f s: expected to end in %s "
                "(%d round(s) left), after its cancel would begin (in %.1f s); cancelling it "
                "now, what it has not done goes online",
                batch.id,
                batch.done,
                batch.total,
                now - progress.since,
                "never" if end == float("inf") else f"{end - now:,.1f} s",
                rounds_left,
                cancel_at - now,
            )
        self.stats.batches_late += 1
        return True

    def _replan_online(self, batch: BatchState) -> None:
        """A batch was cancelled for the deadline: the job's online requests re-planned
        (whether the first of them may wait for Flex), with what it has not done. The
        chooser picks OpenAI's tiers only: an Anthropic batch's lines go at list price."""
        tiers = self.job.tiers()
        group = self._groups.get(batch.id)
        if tiers is None or group is None or group[0] is not OPENAI:
            return
        progress = self._progress.get(batch.id)
        wave = progress.wave if progress is not None else max(1, self._wave)
        left = max(0, batch.total - batch.done) or sum(
            len(members) for members in self._watching.get(batch.id, {}).values()
        )
        rounds_left = max(1, tiers.rounds - wave + 1)
        plan = tiers.plan(now=time.time(), requests=left * rounds_left, batch=False)
        log.info("dask-llm: re-planned: %s", plan.describe())

    @staticmethod
    def _past(moment: float | None) -> bool:
        return moment is not None and time.monotonic() >= moment

    def _give_up(self, batch_id: str, status: str) -> None:
        """The deadline passed with ``batch_id``'s cancel under way: its lines go online."""
        lines = self._watching.get(batch_id, {})
        log.warning(
            "dask-llm: batch %s is still %s at the deadline; its %d lines go online (a line "
            "it finished before its cancel took effect is paid twice)",
            batch_id,
            status,
            len(lines),
        )
        for members in lines.values():
            _resolve(members, GO_ONLINE)

    async def _read(self, client: BatchClient, batch: BatchState) -> None:
        lines = self._watching.get(batch.id, {})
        earlier = all(line.reattached for members in lines.values() for line in members)
        if batch.status == "failed" and earlier:
            # An earlier run's batch that was rejected: this run submits its own.
            for members in lines.values():
                self._resubmit(members)
            self._read_batches.add(batch.id)
            return
        if batch.status == "failed":
            text = batch.failed_because
            self.job.fatal_answer(f"the provider rejected batch {batch.id} ({text})")
            body = json.dumps(
                {"error": {"code": "batch_failed", "message": f"batch {batch.id}: {text}"}}
            ).encode()
            for members in lines.values():
                _resolve(members, Answer.json(400, body))
            return
        answered: set[str] = set()
        for key, status, body in await client.results(batch):
            answer = Answer.json(status, body)
            if answer.status < 400:
                self.job.cache_put(key.split(".")[0], answer.to_cache(), self.stats)
                self.stats.batch_lines += 1
            answered.add(key)
            members = lines.get(key) or []
            if members:
                if answer.status >= 400 and self._go_online():
                    _resolve(members, GO_ONLINE)
                else:
                    _resolve(members, answer)
        for key, members in lines.items():
            if key in answered:
                continue
            if self._stopping:  # never ran: the row says why the job stopped
                _resolve_stopped(members, self.job)
            elif all(line.reattached for line in members):
                # An earlier run's batch that never ran it (expired, cancelled): not
                # an attempt of this run, so it joins this run's next batch.
                self._resubmit(members)
            elif self._go_online():
                _resolve(members, GO_ONLINE)
            else:
                _resolve(members, Answer.json(408, _expired_body(batch)))
        self._read_batches.add(batch.id)
        self.stats.batches_done += 1
        self._on_progress()

    def _resubmit(self, members: list[_Line]) -> None:
        for line in members:
            line.reattached = False
            self._unsent.append(line)
        self._maybe_submit()

    def _go_online(self) -> bool:
        return self.policy.fallback == "online" or self._online

    def _fail_lines(self, lines: list[_Line], exc: Exception) -> None:
        answer = None
        if isinstance(exc, status_errors()) and lines:
            answer = Answer.json(exc.status_code, exc.response.content)
            provider = lines[0].group[0]
            reason = fatal_reason(exc.status_code, exc.response.content, exc.request, provider)
            if reason is not None:
                self.job.fatal_answer(reason)
        for line in lines:
            if line.future.done():
                continue
            if answer is not None:
                line.future.set_result(answer)
            else:
                line.future.set_exception(exc)

    # -- clients ----------------------------------------------------------------------------------
    def _client(self, group: Group) -> BatchClient:
        client = self._clients.get(group)
        if client is None:
            provider, base_url, api_key = group
            client = provider.batch_client(
                base_url, api_key, completion_window=self.policy.completion_window
            )
            self._clients[group] = client
        return client

    def batch_ids(self) -> list[str]:
        return sorted(self.in_flight)

    async def cancel_in_flight(self, *, wait_s: float = STOP_CANCEL_WAIT_S) -> None:
        """The job stopped for its budget or quality gate: cancel this partition's batches.

        Each goes to its own provider's Batch API; the watchers then look every
        ``poll_initial`` and read what each batch finished once its cancel is done
        (cached: a rerun pays nothing twice). Waits at most ``wait_s``: batches still
        cancelling then stay in ``batch_ids()``, named in the stop's message.
        """
        self._stopping = True
        ids = [i for i in self.batch_ids() if i in self._groups]
        for batch_id in ids:
            await self._cancel_for_stop(batch_id)
        self._wake.set()
        watchers = [t for t in self._tasks if not t.done()]
        if watchers:
            await asyncio.wait(watchers, timeout=wait_s)

    async def _cancel_for_stop(self, batch_id: str) -> None:
        try:
            await self._client(self._groups[batch_id]).cancel(batch_id)
            log.info("dask-llm: the job stopped, cancelled batch %s", batch_id)
        except api_errors() as exc:  # ended meanwhile (the watcher reads it), or unreachable
            log.warning("dask-llm: could not cancel batch %s (%s)", batch_id, exc)

    async def aclose(self) -> None:
        if self._check_handle is not None:
            self._check_handle.cancel()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


def _blocked(state: list[int]) -> bool:
    return state[1] > 0 and state[1] >= state[0]


def _chunks(lines: list[_Line], max_lines: int, max_bytes: int) -> Iterator[list[_Line]]:
    chunk: list[_Line] = []
    keys: set[str] = set()
    size = 0
    for line in lines:
        cost = len(line.body) + len(line.key) + 80
        new_key = line.key not in keys
        if chunk and new_key and (len(keys) >= max_lines or size + cost > max_bytes):
            yield chunk
            chunk, keys, size = [], set(), 0
        chunk.append(line)
        if new_key:
            keys.add(line.key)
            size += cost
    if chunk:
        yield chunk


def _resolve(members: list[_Line], value: Any) -> None:
    for line in members:
        if not line.future.done():
            line.future.set_result(value)


def _resolve_stopped(members: list[_Line], job: Any) -> None:
    try:
        job.check()
    except JobStopped as exc:
        for line in members:
            if not line.future.done():
                line.future.set_exception(exc)


def _expired_body(batch: BatchState) -> bytes:
    message = f"batch {batch.id} ended {batch.status} before this line ran"
    return json.dumps({"error": {"code": "batch_expired", "message": message}}).encode()


def policy_for_retries(policy: Any) -> Any:
    """The retry policy in batch mode: no backoff and no time budget (a round is the wait)."""
    return dataclasses.replace(policy, wait_initial=0.0, wait_max=0.0, timeout=float("inf"))


def cancel_batches(*batch_ids: str, client: Any = None) -> dict[str, str]:
    """Cancel batches a job submitted (their ids are in the interrupt message and the log).

    Each id goes to its provider's Batch API (OpenAI's ``batch_...``, Anthropic's
    ``msgbatch_...``). ``client``: an ``openai.OpenAI`` or ``anthropic.Anthropic`` to use
    for that provider's batches (default: one from the environment: ``OPENAI_API_KEY`` and
    ``OPENAI_BASE_URL``, ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL``). Returns each
    batch's status after the cancel, in OpenAI's words; a batch that has already ended is
    left as it is. Lines a cancelled batch finished stay answered: a rerun reads them and
    submits only the rest.
    """
    by_provider: dict[Provider, list[str]] = {}
    ranked = sorted(
        (p for p in providers(every=True) if p.batch),
        key=lambda p: len(p.batch_prefix),
        reverse=True,
    )
    for batch_id in batch_ids:
        owner = next((p for p in ranked if batch_id.startswith(p.batch_prefix)), OPENAI)
        by_provider.setdefault(owner, []).append(batch_id)
    statuses: dict[str, str] = {}
    for provider, ids in by_provider.items():
        statuses.update(provider.cancel_batches(ids, client=client))
    return {batch_id: statuses[batch_id] for batch_id in batch_ids}
