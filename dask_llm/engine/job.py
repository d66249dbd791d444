"""One ``enrich`` job in one process: what every partition of it running here shares.

A ``Job`` owns, for its process, the job's throttle (pacing and
concurrency), its cache handle, its fatal-answer breaker and its stop state;
partitions attach to it when they start and detach when they end. A job
that has had no partition for a minute is dropped (a process of a long-lived
cluster does not accumulate the state of every job it ever ran).

Stopping. A long paid job must stop when its user says so, and pay for
nothing more. A job stops for one of five reasons, and the first one wins:

=============  ===============================================  =========================
kind           cause                                            the partition then
=============  ===============================================  =========================
interrupted    Ctrl-C, or the computation failed elsewhere      raises ``JobStopped``
raised         ``errors="raise"``: a row failed somewhere       raises ``JobStopped``
fatal          401/403/404, ``insufficient_quota``, refused     gives every row not done
               connections: no request could succeed            the reason in ``llm_error``
budget         ``budget_usd`` reached                           likewise
quality        a rate crossed ``quality_gate`` (``core.config``)  likewise
=============  ===============================================  =========================

Once stopped, no new request starts (the transport checks before sending and
after waiting for its turn), rows not started are not started, and requests
already on the wire get a short grace (``STOP_GRACE_S``) to come back and be
written to the cache before they are cancelled: a rerun then pays only for
what was not back.

How a stop reaches every process of the job:

* in the process that raised or was interrupted, at once (this object);
* synchronous and threaded schedulers: a Dask callback (``_ComputeWatch``,
  registered when dask-llm is imported) numbers each local computation (a
  *run*, ``cluster.hub``) and sees it end with an error in the client: it stops the
  run's jobs (Ctrl-C: every job running there) and marks the run abandoned,
  so a partition of it that begins later stops at once too. A pandas frame's
  job belongs to the computation whose task enriches it, else to no run: a
  computation that failed or was interrupted before it never stops it;
* dask's process pool: the same mark is kept in the client's job hub
  (``cluster.hub``); children poll it every 0.1 s, and stop when it is gone.
  Computing the same frame again is a new run, which the old stop does not
  touch;
* ``distributed``: an interrupted client releases its futures, and the
  scheduler marks the tasks cancelled on the workers; each partition polls
  its own task's state every 0.1 s.

Garbage collection. While partitions run in a process, its long-lived
objects (imported modules, models, the chains) are frozen out of the
collector (``gc.freeze``) and collections are made rarer; both are restored
when the last partition leaves. A full collection over a heap of LangChain
objects stalls every thread of the process for hundreds of milliseconds:
measured here (2,000 wine rows x 2 chains at 100 requests/s, threaded
scheduler), the stalls bunched requests that pacing had spread, giving 27
quota 429s and 1.23x the bound; frozen, with thresholds (50,000, 20, 100),
13 and 1.08x. What a partition leaves in reference cycles (on 3.11, every
connection of its closed loop: asyncio's socket transport holds a bound
method of itself) would then wait for the job's end, and on a worker the next
partition's freeze would freeze it too: so each partition's end collects,
while the long-lived objects are still frozen and unscanned (68 ms median
with 4 threads; docs/cluster.md, "Memory over a long job").

The fatal breaker exists because a bad key, a missing model or a wrong
``base_url`` would otherwise cost one failed request (and its retries) per
row: after the first such answer the job stops sending, and every affected
row is told the real reason (status, code, host). Once a model has answered,
it takes ``_FATAL_REPEATS`` such answers in a row: providers send the odd
403 among successes, which fails only its row.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from dask.callbacks import Callback

from dask_llm.cluster import hub as _hub
from dask_llm.compiled import Verdicts
from dask_llm.core import where as _cluster
from dask_llm.core.deadline import TierChooser
from dask_llm.core.errors import ChainError, JobStopped
from dask_llm.core.runtime import part
from dask_llm.core.usage import MAX_TOKENS, MODEL, Tier, cost_usd, price_of
from dask_llm.limits.ledger import Ledger, even_share_hint, link_for
from dask_llm.limits.pacer import Throttles
from dask_llm.observe import metrics as _metrics
from dask_llm.observe import progress as _progress
from dask_llm.observe.record import Recorder
from dask_llm.providers import OPENAI, providers

if TYPE_CHECKING:
    from dask_llm.cluster.handle import JobHandle
    from dask_llm.core.config import EnrichOptions

log = logging.getLogger(__name__)

#: Seconds requests already on the wire get to land in the cache after a stop.
STOP_GRACE_S = 2.0
#: How often a running partition looks for a stop from elsewhere.
POLL_S = 0.1
_IDLE_S = 60.0
_REFUSED_BEFORE_FATAL = 3
#: Fatal answers (401/403/404, ``insufficient_quota``) in a row, once a request of the
#: same model has succeeded, that stop the job.
_FATAL_REPEATS = 3


class Stop(NamedTuple):
    kind: str  # "interrupted" | "raised" | "fatal" | "budget" | "quality"
    text: str
    #: For "raised": (message, index, chain) of the ``ChainError``, which every
    #: partition then raises, so the caller sees it whichever partition ends first.
    error: tuple[str, Any, str] | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            message, index, chain = self.error
            raise ChainError(message, index=index, chain=chain)
        raise JobStopped(self.text, kind=self.kind)


class Job:
    """The state one job keeps in one process (see the module docstring)."""

    def __init__(
        self, options: EnrichOptions, handle: JobHandle | None = None, run: int | None = None
    ) -> None:
        self.id = options.job
        #: The client's run (one computation) this object serves; see ``cluster.hub``.
        self.run = run
        self.options = options
        self.cache = options.cache
        self._lock = threading.Lock()
        self._stop: Stop | None = None
        self._refused = 0
        #: Models with a successful answer, and their fatal answers since the last success.
        self._answered: set[bytes | None] = set()
        self._fatal_streak: dict[bytes | None, int] = {}
        self._attached = 0
        self._idle_since = time.monotonic()
        self._last_poll = 0.0
        self._cache_warned = False
        #: Chains that could not be built here: (why, partitions that failed for it).
        self._unbuilt: dict[str, tuple[str, int]] = {}
        self.worker = _cluster.distributed_worker()
        self.hub: _hub.HubClient | None = None
        if (
            self.worker is None
            and handle is not None
            and handle.hub is not None
            and _cluster.in_pool_child()
        ):
            address, key = handle.hub
            self.hub = _hub.hub_client(address, key)
        self.ledger = Ledger(
            options.job,
            {
                "rpm": options.rpm,
                "tpm": options.tpm,
                "output_tpm": options.output_tpm,
                "budget_usd": options.budget_usd,
                "partitions": options.partitions,
            },
            link_for(self.hub),
            default=OPENAI.name,
            fallback_share=even_share_hint(options.processes),
            on_stop=self._ledger_says_stop,
        )
        #: Pacing and concurrency, per provider (each paced to its own limits: the
        #: ledger's own lane for OpenAI's requests, a lane of its own for each other's).
        self.throttle = Throttles(
            max_concurrency=options.max_concurrency,
            initial_concurrency=options.initial_concurrency,
            ledger=self.ledger,
            default=OPENAI.name,
        )
        self._largest_completion = 0
        #: With ``deadline=``: the tier of each online request (``core.deadline``).
        self._tiers: TierChooser | None = None
        #: Chains of this job that fell back from the compiled path here, and why.
        self.compiled = Verdicts()
        # The run record (``observe.record``): requests, rows, the quality gate; metrics read it.
        self.recorder = Recorder(
            prices=options.price_table,
            # The report's request limit: one number (by provider: what the headers say).
            rpm=None if isinstance(options.rpm, Mapping) else options.rpm,
            gate=options.quality_gate,
            on_gate=lambda text: self.stop("quality", text),
        )
        _metrics.install()

    # -- stopping ---------------------------------------------------------------------------
    @property
    def stopped(self) -> Stop | None:
        """Why the job stopped, or None: what this process knows now (no I/O)."""
        return self._stop

    def stop(
        self,
        kind: str,
        text: str,
        *,
        error: tuple[str, Any, str] | None = None,
        broadcast: bool = True,
    ) -> None:
        """Stop the job here and, with ``broadcast``, in every process of it."""
        with self._lock:
            if self._stop is not None:
                return
            self._stop = Stop(kind, text, error)
        if kind in ("fatal", "budget", "quality"):
            self.recorder.stopped(kind, text)
        log.warning("dask-llm job %s: stopping (%s): %s", self.id[:8], kind, text)
        if not broadcast:
            return
        if self.hub is not None:
            with contextlib.suppress(ConnectionError):
                self.hub.call("stop", self.id, self.run, kind, text, error)
        elif self.worker is None:
            _hub.signal_stop(self.id, self.run, kind, text, error)

    def poll(self, task_key: Any = None) -> Stop | None:
        """Look for a stop from elsewhere (at most every ``POLL_S``); return the stop, if any."""
        if self._stop is not None:
            return self._stop
        now = time.monotonic()
        if now - self._last_poll < POLL_S:
            return None
        self._last_poll = now
        found: tuple[str, str, Any] | None = None
        if self.worker is not None:
            if _cluster.task_abandoned(self.worker, task_key):
                found = (
                    "interrupted",
                    "the client released this task (interrupted or failed)",
                    None,
                )
        elif self.hub is not None:
            try:
                found = self.hub.call("poll", self.id, self.run)
            except ConnectionError:
                found = ("interrupted", "the client that computes this job is gone", None)
        else:
            found = _hub.stop_signal(self.id, self.run)
        if found is not None:
            self.stop(found[0], found[1], error=found[2], broadcast=False)
        return self._stop

    def check(self) -> None:
        """Raise ``JobStopped`` if the job has stopped (before a request is sent)."""
        stop = self._stop
        if stop is not None:
            raise JobStopped(stop.text, kind=stop.kind)

    def _ledger_says_stop(self, text: str) -> None:
        self.stop("budget" if text.startswith("budget") else "interrupted", text, broadcast=False)

    # -- the budget -----------------------------------------------------------------------------
    def worst_cost(self, body: bytes, *, batch: bool = False) -> float:
        """What a request may cost at most (``budget_usd``): see ``limits.coordinator``.

        Prompt tokens are at most the body's bytes (a token is at least a byte, and the
        body holds every message), each at the dearer of the input and cache write prices;
        completion tokens at most ``max_tokens``, else 1.5x the largest completion seen
        (1,024 before any); at the price of the tier asked (the Batch API's, Flex's for a
        body that asks for it, else the list price).
        """
        match = MODEL.search(body)
        model = match.group(1).decode() if match else None
        flex = any(provider.is_flex(body) for provider in providers())
        tier: Tier = "batch" if batch else ("flex" if flex else "default")
        price = price_of(model, self.options.price_table, tier=tier)
        if price is None:
            self.stop(
                "budget",
                f"budget_usd needs a price for every model, and {model!r} has none "
                "(give prices={model: (input, output)})",
            )
            return math.inf
        limit = MAX_TOKENS.search(body)
        completion = (
            int(limit.group(1))
            if limit
            else (1.5 * self._largest_completion if self._largest_completion else 1024)
        )
        # Every prompt token may be a cache write (Anthropic bills those above the input).
        return cost_usd(price, len(body), completion, cache_write_tokens=len(body))

    def completion_seen(self, tokens: int) -> None:
        if tokens > self._largest_completion:
            self._largest_completion = tokens

    # -- the deadline ------------------------------------------------------------------------
    def tiers(self, rounds: int = 1) -> TierChooser | None:
        """The job's tier chooser here (None: no ``deadline=``); made by the first partition."""
        deadline = self.options.deadline
        if deadline is None:
            return None
        with self._lock:
            if self._tiers is None:
                self._tiers = TierChooser(deadline, rounds=rounds)
            return self._tiers

    # -- the fatal breaker --------------------------------------------------------------------
    def fatal_answer(self, description: str, body: bytes = b"") -> None:
        """A 401/403/404 or ``insufficient_quota`` for the request ``body``.

        It stops the job when nothing of its model has succeeded yet (a wrong key,
        model or URL: no request can succeed), or when it repeats with no success
        between (``_FATAL_REPEATS``: a key revoked, an account run dry). One such
        answer among successes fails only its row: providers send the odd 403.
        """
        match = MODEL.search(body)
        model = match.group(1) if match else None
        with self._lock:
            streak = self._fatal_streak[model] = self._fatal_streak.get(model, 0) + 1
            proven = model is not None and model in self._answered
        if not proven or streak >= _FATAL_REPEATS:
            self.stop("fatal", description)
        else:
            log.warning("dask-llm job %s: %s; the job goes on", self.id[:8], description)

    def answered(self, body: bytes) -> None:
        """A request of ``body``'s model succeeded: its fatal answers so far were one-offs."""
        match = MODEL.search(body)
        if match is None:
            return
        model = match.group(1)
        if model not in self._answered or self._fatal_streak.get(model):
            with self._lock:
                self._answered.add(model)
                self._fatal_streak.pop(model, None)

    def connection_refused(self, description: str) -> None:
        with self._lock:
            self._refused += 1
            refused = self._refused
        if refused >= _REFUSED_BEFORE_FATAL:
            self.stop("fatal", description)

    def connection_ok(self) -> None:
        self._refused = 0

    # -- chains that cannot be built here ---------------------------------------------------------
    def cannot_build(self, chain: str, exc: BaseException | None = None) -> str | None:
        """Why ``chain`` cannot be built in this process (None: not known to fail).

        With ``exc`` (its factory or recipe just failed), that is recorded and logged
        with its traceback, once per job and process; each later partition of the job
        that meets it here counts it and fails at once, without building it again.
        """
        with self._lock:
            known = self._unbuilt.get(chain)
            if known is None and exc is None:
                return None
            if known is None:
                assert exc is not None
                text = (
                    f"chain {chain!r} cannot be built in this process: {type(exc).__name__}: {exc}"
                )
                self._unbuilt[chain] = (text, 1)
            else:
                text, count = known
                self._unbuilt[chain] = (text, count + 1)
        count = self._unbuilt[chain][1]
        if count == 1:
            log.error(
                "dask-llm job %s: %s (logged once; the job's other partitions here fail "
                "without trying again)",
                self.id[:8],
                text,
                exc_info=exc,
            )
        else:
            log.debug("dask-llm job %s: %s (partition %d here)", self.id[:8], text, count)
        return f"{text} ({count} partition(s) of this job here)"

    # -- the cache, which may fail without failing the job -------------------------------------
    def cache_get(self, keys: Sequence[str], stats: Any) -> dict[str, Any]:
        """Cached values of ``keys``; a failing cache is a miss (logged and counted)."""
        if self.cache is None or not keys:
            return {}
        try:
            return self.cache.get_many(keys)
        # A ResultCache may be anyone's code over any store: whatever it raises, the
        # job goes on without it for this lookup.
        except Exception as exc:
            self._cache_failed("read", exc, stats)
            return {}

    def cache_put(self, key: str, value: Any, stats: Any) -> None:
        """Store ``value``; a failing write is logged and counted, and the answer kept."""
        if self.cache is None:
            return
        try:
            self.cache.put(key, value)
        except (TypeError, ValueError) as exc:  # not JSON: keep the answer, do not cache it
            log.debug("dask-llm: an answer that is not JSON was not cached: %s", exc)
        except Exception as exc:  # see cache_get
            self._cache_failed("write", exc, stats)

    def _cache_failed(self, what: str, exc: Exception, stats: Any) -> None:
        stats.cache_errors += 1
        level = logging.DEBUG if self._cache_warned else logging.WARNING
        self._cache_warned = True
        log.log(
            level,
            "dask-llm: cache %s failed (%s: %s); the answer is kept, only not cached",
            what,
            type(exc).__name__,
            exc,
        )

    # -- lifetime ------------------------------------------------------------------------------
    def reporter(self, partition: int, attempt: str) -> _progress.Reporter:
        """Where a partition of this job sends its progress events."""
        base = {"job": self.id, "run": self.run, "partition": partition, "attempt": attempt}
        drain = self.recorder.drain
        if self.worker is not None:
            worker = self.worker
            return _progress.Reporter(
                lambda msg: worker.log_event(_progress.TOPIC, msg), base, interval=0.5, drain=drain
            )
        if self.hub is not None:
            hub = self.hub
            return _progress.Reporter(
                lambda msg: hub.call("event", msg), base, interval=0.5, drain=drain
            )
        return _progress.Reporter(_progress.receive, base, interval=0.0, drain=drain)


_GC_THRESHOLDS = (50_000, 20, 100)


class Jobs:
    """The jobs with partitions in this process (a part of the process's ``core.runtime``).

    ``by_key``: each job's ``Job`` by (job id, run), made by its first partition here
    and dropped once it has had no partition for ``_IDLE_S`` (checked whenever a
    partition attaches): a long-lived worker does not keep every job it ran.
    ``partitions`` and ``gc_saved``: the collector's settings while partitions run.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[tuple[str, int | None], Job] = {}
        self.partitions = 0
        self.gc_saved: tuple[int, int, int] | None = None

    def gc_enter(self) -> None:
        """A partition begins (under ``lock``): the first freezes the collector."""
        self.partitions += 1
        if self.partitions == 1:
            self.gc_saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*_GC_THRESHOLDS)

    def gc_leave(self) -> None:
        """A partition ends (under ``lock``): what it left in reference cycles is collected
        now, while the long-lived objects are still frozen (not scanned), and the last
        partition restores the collector."""
        if self.gc_saved is not None:
            started = time.perf_counter()
            found = gc.collect()
            log.debug(
                "dask-llm: a partition ended: %d objects collected in %.1f ms",
                found,
                (time.perf_counter() - started) * 1e3,
            )
        self.partitions -= 1
        if self.partitions == 0 and self.gc_saved is not None:
            gc.set_threshold(*self.gc_saved)
            gc.unfreeze()
            self.gc_saved = None


def run_of(options: EnrichOptions, handle: JobHandle | None) -> int | None:
    """The run a partition starting here with ``handle`` belongs to (see ``cluster.hub``)."""
    if handle is not None and handle.run is not None:
        return handle.run  # pickled for a pool child, in the client thread that submitted it
    if _cluster.in_pool_child() or _cluster.distributed_worker() is not None:
        return None
    if options.total_rows is not None:
        # A pandas frame, enriched now by the caller: inside a computation's task, that
        # computation (stopped with it); else a run of its own, which no computation that
        # ended before it, failed or interrupted, can touch.
        return _hub.current_run() or max(_hub.live_runs(), default=None)
    return _hub.newest_run()  # threads or synchronous: the client's newest computation


def attach(options: EnrichOptions, handle: JobHandle | None = None) -> Job:
    """The process's ``Job`` for ``options.job`` in this run, with one more partition attached.

    ``handle`` is the way back to the client (None: a job of this process's own)."""
    now = time.monotonic()
    run = run_of(options, handle)
    _hub.run_holds(run, options.job)
    jobs = part(Jobs)
    with jobs.lock:
        jobs.gc_enter()
        for key in [
            k
            for k, job in jobs.by_key.items()
            if job._attached == 0 and now - job._idle_since > _IDLE_S
        ]:
            del jobs.by_key[key]
        job = jobs.by_key.get((options.job, run))
        if job is None:
            job = jobs.by_key[(options.job, run)] = Job(options, handle, run)
        job._attached += 1
        job.ledger.attached(job._attached)
    job.ledger.start()
    return job


def detach(job: Job) -> None:
    jobs = part(Jobs)
    with jobs.lock:
        jobs.gc_leave()
        job._attached -= 1
        if job._attached == 0:
            job._idle_since = time.monotonic()
        job.ledger.attached(job._attached)


def running_jobs() -> list[Job]:
    jobs = part(Jobs)
    with jobs.lock:
        return [job for job in jobs.by_key.values() if job._attached > 0]


def stop_run(run: int | None, kind: str, text: str, *, everything: bool) -> list[str]:
    """Stop the computation ``run`` (``everything``: every job running here); the job ids.

    The run is marked abandoned in the hub, so its partitions stop also where
    they have not begun yet (a pool child still starting up, a task queued).
    """
    stopped = set(_hub.run_ended(run, (kind, text))) if run is not None else set()
    runs = {run}
    if everything:  # Ctrl-C: every computation of this process
        for other in _hub.live_runs():
            stopped |= _hub.run_ended(other, (kind, text))
            runs.add(other)
        stopped.update(_progress.active_jobs())
    for job in running_jobs():
        if everything or job.run in runs:
            stopped.add(job.id)
            job.stop(kind, text)
    return sorted(stopped)


def resume_hint(summary: _progress.RunSummary | None, *, cached: bool | None = None) -> str:
    """What a rerun will pay, for a stop's message. ``cached``: whether the job kept a
    cache (default: what ``summary`` says; True without one)."""
    if cached is None:
        cached = summary is None or summary.cache is not None
    done = f"{summary.rows:,} rows were done; " if summary is not None else ""
    if not cached:
        return f"{done}no answer was kept (cache=False): a rerun pays again for every answer."
    where = f" in the cache at {summary.cache}" if summary is not None and summary.cache else ""
    return (
        f"{done}every answer paid for is kept{where}. Run the same job again to resume: "
        "only what is missing is paid for."
    )


def batches_hint(ids: Sequence[str], *, cached: bool) -> str:
    """For a stop's message: the batches still running at the provider, and what a rerun
    does with them (re-attach only with ``batch=`` and the cache that recorded them)."""
    if not ids:
        return ""
    cancel = f"dask_llm.cancel_batches({', '.join(repr(i) for i in ids)}) cancels them"
    if not cached:
        # Nothing recorded which line is in which batch: no rerun can find them.
        return (
            f"batches still running: {', '.join(ids)} (this job has no cache "
            f"(cache=False), so a rerun cannot re-attach to them and pays for their "
            f"lines again; {cancel}); "
        )
    return (
        f"batches still running: {', '.join(ids)} (a rerun with batch= and the same "
        f"cache re-attaches to them; an online rerun, or one with cache=False, pays for "
        f"their lines again; {cancel}); "
    )


class _ComputeWatch(Callback):
    """Stops dask-llm jobs when a local Dask computation ends with an error or an interrupt.

    Dask's local schedulers (synchronous, threads, processes) call ``_finish``
    in a ``finally`` block, in the client, with ``errored=True`` when the
    computation is being abandoned; the exception in flight tells which.
    Partitions still running in pool threads or child processes would otherwise
    go on calling the API for rows whose results nobody will read.
    """

    def _start(self, dsk: Any) -> None:
        _hub.run_began()

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        run = _hub.current_run()
        if not errored:
            if run is not None:
                _sweep_drop_boxes(_hub.run_ended(run), run)
            return
        exc = sys.exc_info()[1]
        if isinstance(exc, KeyboardInterrupt):
            kind, text = "interrupted", "interrupted (KeyboardInterrupt)"
        elif isinstance(exc, JobStopped):  # the job stopped itself; its run ends with it
            if run is not None:
                _sweep_drop_boxes(_hub.run_ended(run, (exc.kind, str(exc))), run)
            return
        else:
            kind = "interrupted"
            text = f"the computation failed ({type(exc).__name__ if exc else 'error'})"
        interrupted = isinstance(exc, KeyboardInterrupt)
        stopped = stop_run(run, kind, text, everything=interrupted)
        _sweep_drop_boxes(stopped, run)
        for job_id in stopped:
            summary = _progress.stop_run(job_id, "interrupted", run)
            if interrupted:
                print(
                    f"dask-llm: stopped job {job_id[:8]}: {resume_hint(summary)}", file=sys.stderr
                )


def _sweep_drop_boxes(job_ids: Iterable[str], run: int | None) -> None:
    """The run ended: its jobs' drop boxes go (frames of a failed run nobody collects)."""
    for job_id in job_ids:
        box = _hub.drop_box(job_id, run)
        if box.exists():
            shutil.rmtree(box, ignore_errors=True)


_WATCH = _ComputeWatch()
_WATCH.register()


@atexit.register
def _unfinished_runs() -> None:
    """At exit, say how to resume runs that never finished (e.g. ``distributed`` + Ctrl-C)."""
    for job_id in _progress.active_jobs():
        summary = _progress.stop_run(job_id, "interrupted")
        # On distributed the workers that wait for the batches may say nothing more: name
        # them from what they reported.
        batches = (
            batches_hint(summary.batches_in_flight, cached=summary.cache is not None)
            if summary is not None
            else ""
        )
        print(
            f"dask-llm: job {job_id[:8]} did not finish: {batches}{resume_hint(summary)}",
            file=sys.stderr,
        )
