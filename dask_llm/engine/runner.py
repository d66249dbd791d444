"""The per-partition engine: one event loop runs every row x chain of a partition.

A partition runs in three steps:

1. **The memo pass.** For each chain whose fingerprint is complete, in
   dependency order, the row memo of the cache is read for every row in one
   round (``engine.calls``); a row whose chains are all answered there is done
   without LangChain running at all.
2. **The rows.** The remaining rows are pulled by a pool of row workers
   that grows (and shrinks) with what the job's throttle can put on the
   wire; each worker walks its row's chains in dependency order, so a row's
   dependent chain starts the moment its own inputs are ready, with no
   barrier between chains and none between rows (``Runnable.abatch`` on a
   sequence waits for the slowest row at every step). Chains of one row that
   do not depend on each other run concurrently.
3. **The columns** (``chains.columns``), in the input's row order and index
   (duplicates included).

A supervisor admits rows and watches for a stop (``engine.job``): when the job
stops, no row is admitted, requests already on the wire get
``STOP_GRACE_S`` to land in the cache, and the rest is cancelled; the
partition then raises ``JobStopped`` (interrupted, or a row failed with
``errors="raise"``: that ``ChainError`` is raised) or, after a fatal
provider answer, returns its rows with the reason in ``llm_error``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pandas as pd

from dask_llm.chains.columns import RowFailed, as_json, column, is_missing
from dask_llm.chains.plan import Plan, PlannedChain
from dask_llm.chains.shipping import provide_keys
from dask_llm.cluster.handle import JobHandle
from dask_llm.core import where as _cluster
from dask_llm.core.config import UNPACED_MAX_CONCURRENCY, BatchPolicy, EnrichOptions
from dask_llm.core.deadline import rate_of
from dask_llm.core.errors import BudgetExceeded, ChainError, JobStopped, WorkerSetupError
from dask_llm.core.usage import Usage
from dask_llm.engine import job as jobs
from dask_llm.engine.calls import MISSING, ChainCaller, PartitionStats
from dask_llm.engine.loop import run_sync
from dask_llm.transport import sdk as _sdk
from dask_llm.transport.batch import ROW, Batcher
from dask_llm.transport.pipeline import LoopClients

log = logging.getLogger(__name__)

_ADMIT_EVERY_S = 0.02
_ADMIT_AT_ONCE = 8


class PartitionRun:
    """State of one partition's run on one event loop."""

    def __init__(
        self,
        df: pd.DataFrame,
        plan: Plan,
        options: EnrichOptions,
        job: jobs.Job,
        *,
        partition: int = 0,
    ) -> None:
        self.df = df
        self.plan = plan
        self.options = options
        self.job = job
        self.n = len(df)
        needed = {
            col for pc in plan.chains for col, producer in pc.sources.values() if producer is None
        }
        self.inputs: dict[str, list[Any]] = {col: df[col].tolist() for col in needed}
        self.outputs: dict[str, list[Any]] = {col: [None] * self.n for col in plan.new_columns}
        self.done: dict[str, list[bool]] = {pc.name: [False] * self.n for pc in plan.chains}
        self.errors: list[str | None] = [None] * self.n
        self.reported = [False] * self.n
        self.row_usage = [Usage() for _ in range(self.n)]
        # Rows with a request that got no answer in time: if no answer was paid for the row,
        # its usage is unknown (the provider may bill it, and never says): null, not zero.
        self.unanswered = [False] * self.n
        self.stats = PartitionStats()
        self.callers: dict[str, ChainCaller] = {}
        self.reporter = job.reporter(partition, uuid.uuid4().hex)
        self._reported = self.stats.snapshot()
        self._raised: ChainError | None = None
        self.task_key = _cluster.current_task_key()
        self.seceded = False  # left the worker's thread pool for its tail (_cluster)
        self.batcher: Batcher | None = None
        self._backlog = 0  # rows of this partition still to run, as told to the ledger
        self._batch_ids: list[str] = []  # batches in flight, as told to the client

    async def run(self) -> pd.DataFrame:
        self.reporter.started(
            self.n,
            {
                "partitions": self.options.partitions,
                "total_rows": self.options.total_rows,
                "show": self.options.progress and not _cluster.in_pool_child(),
                "cache": self.options.cache_label,
                "budget_usd": self.options.budget_usd,
                "deadline_at": None if self.options.deadline is None else self.options.deadline.at,
            },
        )
        try:
            return await self._run()
        finally:
            # The callers' ``localize`` closes over this run: a cycle that only a full
            # collection breaks, and the job's collector runs rarely (``engine.job``).
            # Left, each ended partition (its input frame, its rows' values and usage)
            # stayed in memory until the job's end: a worker grew ~3.5 KB per call.
            self.callers.clear()
            if self.seceded:
                _cluster.tail_done()
            if self.job.cache is not None:
                self.job.cache.close()  # this thread's connection; the next partition reopens
            self.reporter.done()
            self._release_rows()

    def _release_rows(self) -> None:
        """The frame is built: drop the rows. Should this run still be referenced (on
        3.13 a finished frame of ``enrich_partition`` can hold it until a collection),
        it holds no row of its partition."""
        self.df = self.df.iloc[:0]
        self.inputs, self.outputs, self.done = {}, {}, {}
        self.errors, self.reported, self.row_usage, self.unanswered = [], [], [], []

    # -- the three steps ------------------------------------------------------------------------
    async def _run(self) -> pd.DataFrame:
        if self.n == 0:
            self.job.ledger.partition_began(0)  # the job's work left counts it as done
            return self._frame()
        loop = asyncio.get_running_loop()
        # Sync-only runnables (a RunnableLambda of a plain function) run in the
        # loop's default executor: bound it, and let asyncio.run shut it down.
        loop.set_default_executor(
            ThreadPoolExecutor(self.options.sync_threads, thread_name_prefix="dask-llm-sync")
        )
        policy = self.options.batch
        if self.options.deadline is not None:
            policy = self._deadline_policy()
        if policy is not None:
            self.batcher = Batcher(
                self.job, self.stats, policy, on_progress=lambda: self._report(0, 0, Usage())
            )
        # The SDK's per-request body walk and schema build, skipped for this loop's tasks.
        _sdk.activate()
        clients = LoopClients(self.job, self.stats, self.batcher)

        def localize(runnable: Any) -> tuple[Any, bool]:
            return clients.localize(
                runnable,
                timeout=self.options.request_timeout,
                service_tier=self.options.service_tier,
            )

        try:
            for pc in self.plan.chains:
                self.callers[pc.name] = ChainCaller(
                    pc, localize, job=self.job, stats=self.stats, batch=policy
                )
            self._memo_pass()
            pending = [i for i in range(self.n) if not self._row_complete(i)]
            # What is left of this partition, for the job's ledger: a process whose
            # partitions hold much of the job's remaining work is lent more (limits.coordinator).
            self.job.ledger.partition_began(len(pending))
            self._backlog = len(pending)
            self._build(pending)
            await self._supervise(pending)
        finally:
            if self._backlog:
                self.job.ledger.rows_done(self._backlog)  # a stop: they will not run here
                self._backlog = 0
            if self.batcher is not None:
                hint = self._batches_hint()
                if hint and self.job.stopped is not None:
                    print(f"dask-llm: {hint.rstrip('; ')}", file=sys.stderr)
                await self.batcher.aclose()
            await clients.aclose()
        stop = self.job.stopped
        if self._raised is not None:
            raise self._raised
        if stop is not None and stop.kind == "raised":
            stop.raise_error()
        hint = jobs.resume_hint(None, cached=self.options.cache is not None)
        if stop is not None and stop.kind == "budget" and self.options.errors == "raise":
            raise BudgetExceeded(f"{stop.text}; {hint}")
        if stop is not None and stop.kind == "quality" and self.options.errors == "raise":
            raise JobStopped(f"{stop.text}; {hint}", kind=stop.kind)
        if stop is not None and stop.kind not in ("fatal", "budget", "quality"):
            raise JobStopped(f"{stop.text}; {self._batches_hint()}{hint}", kind=stop.kind)
        return self._frame()

    def _memo_pass(self) -> None:
        """Answer what the row memo holds, chain by chain, without running any chain."""
        for pc in self.plan.chains:
            caller = self.callers[pc.name]
            if caller.memo is None:
                continue
            rows = []
            inputs = []
            for i in range(self.n):
                row_inputs = self._inputs_of(i, pc)
                if row_inputs is not None:
                    rows.append(i)
                    inputs.append(row_inputs)
            for i, value in zip(rows, caller.lookup(inputs), strict=True):
                if value is not MISSING:
                    self._put(i, pc, value)
                    self.stats.cache_hits += 1
        done_rows = [i for i in range(self.n) if self._row_complete(i)]
        for i in done_rows:
            self.reported[i] = True
        if done_rows:
            self._report(len(done_rows), 0, Usage())

    def _build(self, pending: list[int]) -> None:
        """Build here, before any row runs, each chain the ``pending`` rows need (a factory,
        a shipped recipe): one that cannot be built fails the partition once, with the
        reason logged once per job and process, not once per row (``Job.cannot_build``)."""
        for pc in self.plan.chains:
            if all(self.done[pc.name][i] for i in pending):
                continue
            known = self.job.cannot_build(pc.name)
            if known is not None:
                raise WorkerSetupError(known)
            try:
                pc.chain.runnable  # noqa: B018  (built on first use, then kept)
            # A factory is the user's code: whatever it raises, the chain is not there.
            except Exception as exc:
                raise WorkerSetupError(self.job.cannot_build(pc.name, exc)) from exc

    def _deadline_policy(self) -> BatchPolicy | None:
        """With ``deadline=``: this partition's plan (``core.deadline``), made as it starts;
        the Batch API, cut off in time, or None (online: the transport picks each tier)."""
        options = self.options
        deadline = options.deadline
        chooser = self.job.tiers(self.plan.rounds)
        assert deadline is not None and chooser is not None
        plan = chooser.plan(
            now=time.time(),
            requests=self.n * len(self.plan.chains) * options.partitions,
            rate_per_s=rate_of(
                deadline,
                # By provider: the slowest (a row waits for all its chains).
                rpm=min(rpm.values()) if isinstance(rpm := options.rpm, Mapping) else rpm,
                max_concurrency=options.max_concurrency or UNPACED_MAX_CONCURRENCY,
            ),
        )
        log.info("dask-llm: %s", plan.describe())
        if plan.batch_s is None:
            return None
        turnaround = deadline.batch_turnaround
        return BatchPolicy(
            poll_initial=min(5.0, max(0.05, turnaround / 20)),
            poll_max=min(60.0, max(0.1, turnaround / 5)),
            deadline=plan.batch_s,
            fallback="online",
        )

    def _batches_hint(self) -> str:
        ids = self.batcher.batch_ids() if self.batcher is not None else []
        return jobs.batches_hint(ids, cached=self.job.cache is not None)

    async def _batch_row(self, i: int) -> None:
        assert self.batcher is not None
        ROW.set(i)
        try:
            await self._row(i)
        finally:
            self.batcher.row_done(i)

    async def _supervise(self, pending: list[int]) -> None:
        """Admit rows as the throttle can use them; on a stop, grace then cancel."""
        if not pending:
            return
        queue = iter(pending)
        remaining = len(pending)
        cap = min(remaining, self.job.throttle.cap)
        workers: set[asyncio.Task[None]] = set()
        # Workers that ended, told by their tasks: with a thousand under way (a fast
        # tier), looking at each of them every 20 ms cost more than the rows' own work.
        ended: list[asyncio.Task[None]] = []
        throttle = self.job.throttle
        loop = asyncio.get_running_loop()

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            task.add_done_callback(ended.append)
            workers.add(task)

        async def worker() -> None:
            nonlocal remaining
            for i in queue:
                remaining -= 1
                throttle.rows_started(1)
                try:
                    await self._row(i)
                finally:
                    throttle.rows_started(-1)
                if self.job.stopped is not None or throttle.rows >= throttle.row_target():
                    return  # the process has enough under way: follow the target down

        if self.batcher is not None:
            # Batch mode: every row at once (a row waiting for its batch costs a coroutine),
            # counted from here, so the batcher never submits before all have begun.
            for i in pending:
                self.batcher.row_admitted(i)
                spawn(self._batch_row(i))
            remaining = 0
        try:
            # Rows are admitted a few at a time: each admitted row does a few ms of
            # LangChain work before its request, and a loop busy preparing 250 rows
            # at once sends nothing for a second.
            while True:
                if self.job.poll(self.task_key) is not None:
                    break
                while ended:
                    task = ended.pop()
                    workers.discard(task)
                    if not task.cancelled() and task.exception() is not None:
                        # Not a row's failure (those are in llm_error) but the partition's:
                        # a chain that cannot be built here, a bug. The other rows wind
                        # down, then it is raised.
                        await self._wind_down(workers)
                        raise task.exception()  # type: ignore[misc]
                if remaining <= 0 and not workers:
                    break
                if remaining <= 0 and not self.seceded:
                    # Every row admitted: the rest is this partition's tail; in batch
                    # mode, its batch waits, which hold no CPU: on distributed the
                    # worker's next partition starts now, whatever its threads.
                    self.seceded = _cluster.secede_for_tail(cap=self.batcher is None)
                # The target is the process's (all its partitions share the pipe).
                room = min(cap - len(workers), throttle.row_target() - throttle.rows)
                for _ in range(min(_ADMIT_AT_ONCE, room, remaining)):
                    spawn(worker())
                slept = loop.time()
                await asyncio.sleep(_ADMIT_EVERY_S)
                # How late this loop comes round (a process short of CPU): the
                # throttle takes it off the latency it sizes concurrency by.
                throttle.loop_lag(loop.time() - slept - _ADMIT_EVERY_S)
        except asyncio.CancelledError:
            # asyncio.run cancels us on Ctrl-C (when this loop runs in the main thread).
            self.job.stop("interrupted", "interrupted (KeyboardInterrupt)")
            await self._wind_down(workers)
            raise
        await self._wind_down(workers)

    async def _wind_down(self, workers: set[asyncio.Task[None]]) -> None:
        stop = self.job.stopped
        if self.batcher is not None and stop is not None and stop.kind in ("budget", "quality"):
            # Not Ctrl-C (its batches are named, and a rerun re-attaches): what they
            # finished is read and cached, the rest never runs (transport.batch).
            await self.batcher.cancel_in_flight()
        live = [t for t in workers if not t.done()]
        if live:
            _, late = await asyncio.wait(live, timeout=jobs.STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*live, return_exceptions=True)
        # Every failed task's exception is read (asyncio logs a traceback for each one
        # left unread); the first is raised.
        failed = [t.exception() for t in workers if t.done() and not t.cancelled()]
        for exc in failed:
            if exc is not None:
                raise exc
        stop = self.job.stopped
        if stop is not None and stop.kind in ("fatal", "budget", "quality"):
            for i in range(self.n):
                self._fail_rest(i, stop.text)

    # -- rows -------------------------------------------------------------------------------------
    async def _row(self, i: int) -> None:
        if self.plan.is_path:
            failed: set[str] = set()
            for pc in self.plan.chains:
                if pc.deps and failed.intersection(pc.deps):
                    failed.add(pc.name)
                    continue
                if not await self._chain(i, pc):
                    failed.add(pc.name)
        else:
            tasks: dict[str, asyncio.Task[bool]] = {}

            async def one(pc: PlannedChain) -> bool:
                if pc.deps:
                    done = await asyncio.gather(*(tasks[d] for d in pc.deps))
                    if not all(done):
                        return False
                return await self._chain(i, pc)

            for pc in self.plan.chains:  # dependency order: deps' tasks exist already
                tasks[pc.name] = asyncio.create_task(one(pc))
            await asyncio.gather(*tasks.values())
        self._row_done(i)

    async def _chain(self, i: int, pc: PlannedChain) -> bool:
        """Run one chain for row ``i``; store its outputs or its error. True on success."""
        if self.done[pc.name][i]:
            return True
        try:
            inputs = self._inputs_of(i, pc, strict=True)
            assert inputs is not None
            caller = self.callers[pc.name]
            key = caller.memo_key(inputs)
            if key is not None and pc.deps:
                # A dependent chain's inputs were not known at the memo pass.
                (hit,) = caller.lookup([inputs])
                if hit is not MISSING:
                    self.stats.cache_hits += 1
                    self._put(i, pc, hit)
                    return True
            if self.batcher is None:
                value, usage = await caller.call(inputs, key)
            else:
                self.batcher.call_started()
                try:
                    value, usage = await caller.call(inputs, key)
                finally:
                    self.batcher.call_ended()
            self.row_usage[i].add(usage)
            self._put(i, pc, value)
            return True
        except RowFailed as failure:
            spent = getattr(failure, "usage", None)
            if spent is not None:
                self.row_usage[i].add(spent)
            if _timed_out(failure.cause):
                self.unanswered[i] = True
            self._fail(i, pc, failure)
            return False

    def _inputs_of(
        self, i: int, pc: PlannedChain, *, strict: bool = False
    ) -> dict[str, Any] | None:
        """Row ``i``'s inputs to ``pc``; None (``RowFailed`` if ``strict``) if one is missing."""
        inputs = {}
        for var, (col, producer) in pc.sources.items():
            if producer is None:
                value = self.inputs[col][i]
            elif self.done[producer][i]:
                value = self.outputs[col][i]
            else:
                value = None
            if is_missing(value):
                if strict:
                    raise RowFailed(f"{pc.name}: missing input {col}")
                return None
            if isinstance(value, str):
                # Text that is not Unicode (a lone surrogate from a bad decode upstream)
                # cannot be sent, keyed or cached: this row fails, not the job.
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    if strict:
                        raise RowFailed(
                            f"{pc.name}: input {col} is not valid text ({exc.reason}: "
                            f"{value[exc.start]!r} at character {exc.start}); fix or drop it"
                        ) from None
                    return None
            inputs[var] = value
        return inputs

    def _row_complete(self, i: int) -> bool:
        return all(self.done[pc.name][i] for pc in self.plan.chains)

    def _put(self, i: int, pc: PlannedChain, value: Any) -> None:
        fields = pc.outputs.fields
        if pc.outputs.scalar:
            ((_, col),) = fields.items()
            self.outputs[col][i] = value
        else:
            for fname, col in fields.items():
                self.outputs[col][i] = value[fname]
        self.done[pc.name][i] = True

    def _fail(self, i: int, pc: PlannedChain, failure: RowFailed) -> None:
        stopped = getattr(failure, "stopped", False)
        if self.options.errors == "raise" and not stopped:
            label = self.df.index[i]
            message = f"row {label!r}: {failure.message}"
            error = ChainError(message, index=label, chain=pc.name)
            error.__cause__ = failure.cause
            if self._raised is None:
                self._raised = error
            self.job.stop(
                "raised",
                f"row {label!r} failed ({pc.name}) with errors='raise'",
                error=(message, label, pc.name),
            )
            return
        previous = self.errors[i]
        self.errors[i] = failure.message if previous is None else f"{previous}; {failure.message}"

    def _fail_rest(self, i: int, text: str) -> None:
        """After a fatal answer: every chain not done for row ``i`` gets the reason."""
        missing = [pc.name for pc in self.plan.chains if not self.done[pc.name][i]]
        if missing and self.errors[i] is None:
            self.errors[i] = f"{', '.join(missing)}: not sent: {text}"
        self._row_done(i)

    def _row_done(self, i: int) -> None:
        if not self.reported[i]:
            self.reported[i] = True
            if self._backlog:
                self._backlog -= 1
                self.job.ledger.rows_done(1)
            self.job.recorder.row_done(self.df.index[i], self.errors[i], self.row_usage[i])
            self._report(1, int(self.errors[i] is not None), self.row_usage[i])

    def _report(self, rows: int, failed: int, usage: Usage) -> None:
        if self.batcher is not None:
            ids = self.batcher.batch_ids()
            if ids != self._batch_ids:  # the client names them after Ctrl-C
                self._batch_ids = ids
                self.reporter.batches(ids)
        now = self.stats.snapshot()
        (
            calls,
            retries,
            limited,
            hits,
            cache_errors,
            batches,
            batches_done,
            batch_lines,
            validating,
            in_progress,
            finalizing,
            unavailable,
            late,
        ) = (a - b for a, b in zip(now, self._reported, strict=True))
        self._reported = now
        self.reporter.add(
            rows=rows,
            failed=failed,
            calls=calls,
            retries=retries,
            rate_limited=limited,
            cache_hits=hits,
            cache_errors=cache_errors,
            batches=batches,
            batches_done=batches_done,
            batch_lines=batch_lines,
            batches_validating=validating,
            batches_in_progress=in_progress,
            batches_finalizing=finalizing,
            batches_late=late,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            saved=usage.saved,
            flex_calls=usage.flex_calls,
            batch_calls=usage.batch_calls,
            flex_unavailable=unavailable,
            unknown_usage=int(usage.unknown),
            cost=usage.cost_usd,
        )

    # -- output -----------------------------------------------------------------------------------
    def _frame(self) -> pd.DataFrame:
        out = self.df.copy(deep=False)
        columns: dict[str, list[Any]] = {**self.outputs, self.plan.error_column: self.errors}
        if self.plan.usage_columns is not None:
            tokens_in, tokens_out, cost = self.plan.usage_columns
            rows = [
                None if unanswered and not u.calls else u
                for u, unanswered in zip(self.row_usage, self.unanswered, strict=True)
            ]
            columns[tokens_in] = [None if u is None else u.tokens_in for u in rows]
            columns[tokens_out] = [None if u is None else u.tokens_out for u in rows]
            columns[cost] = [None if u is None else u.cost_usd for u in rows]
        for col, dtype in self.plan.new_columns.items():
            values = columns[col]
            if col in self.plan.json_columns:
                values = [as_json(v) for v in values]
            out[col] = column(values, dtype, self.df.index)
        return out


def _timed_out(exc: BaseException | None) -> bool:
    """Whether a chain call failed on a request that got no answer in time."""
    for _ in range(10):
        if exc is None:
            return False
        if isinstance(exc, openai.APITimeoutError):
            return True
        exc = exc.__cause__
    return False


def enrich_partition(
    df: pd.DataFrame,
    plan: Plan,
    options: EnrichOptions,
    handle: JobHandle,
    partition_info: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Dask's partition function: enrich ``df`` on a fresh event loop."""
    partition = int((partition_info or {}).get("number", 0))
    if handle.keys:
        provide_keys(handle.keys)
    job = jobs.attach(options, handle)
    try:
        run = PartitionRun(df, plan, options, job, partition=partition)
        return run_sync(
            run.run,
            on_interrupt=lambda: job.stop("interrupted", "interrupted (KeyboardInterrupt)"),
            grace=jobs.STOP_GRACE_S + 2.0,
        )
    finally:
        jobs.detach(job)
