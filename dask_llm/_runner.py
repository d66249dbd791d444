"""The per-partition engine: one event loop runs every row x chain of a partition.

Rows are pulled by a pool of row workers that grows (and shrinks) with what
the job's throttle can put on the wire; each worker walks its row's chains in
dependency order, so a row's dependent chain starts the moment its own inputs
are ready, with no barrier between chains and none between rows
(``Runnable.abatch`` on a sequence waits for the slowest row at every step).
When chains of one row are independent of each other, they run concurrently.
A request holds its throttle slot only while it is on the wire, never while
it sleeps before a retry (tenacity drives the retries, ``_retry`` the policy).

Each answer is normalised to plain data, written to the cache at once, and
shared with identical calls in flight (``_dedup``).

Results are kept per row position, so the index (duplicates included) and the
row order are those of the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import openai
import pandas as pd
import pydantic
import tenacity
from langchain_core.messages import BaseMessage

from dask_llm import _dedup as dedup
from dask_llm._cache import ResultCache, make_key
from dask_llm._chain import object_dtype
from dask_llm._errors import ChainError
from dask_llm._limits import Throttle, process_share, throttle_for
from dask_llm._plan import Plan, PlannedChain
from dask_llm._progress import progress_sink
from dask_llm._retry import RetryPolicy, classify, is_rate_limit, retry_after
from dask_llm._transport import LoopClients
from dask_llm._usage import Usage, UsageRecorder
from dask_llm._usage import current as usage_context


@dataclass(frozen=True, kw_only=True)
class EnrichOptions:
    """Options of one ``enrich`` job (see ``enrich`` for their meaning)."""

    job: str
    max_concurrency: int = 256
    initial_concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    processes: int = 1
    errors: Literal["column", "raise"] = "column"
    timeout: float | None = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sync_threads: int = 16
    prices: tuple[tuple[str, tuple[float, float]], ...] = ()
    cache: ResultCache | None = None
    partitions: int = 1
    total_rows: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.errors not in ("column", "raise"):
            raise ValueError(f"errors= must be 'column' or 'raise', not {self.errors!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout= must be > 0 seconds, or None")
        if self.sync_threads < 1:
            raise ValueError("sync_threads must be >= 1")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}= must be > 0, or None for no limit")

    def __dask_tokenize__(self) -> Any:
        # Each enrich() call is its own job (its own throttle); the cache object is
        # named by its type and location, not by content.
        return ("dask_llm.EnrichOptions", self.job, repr(self.cache))

    def throttle(self) -> Throttle:
        """This process's throttle for the job (shared by its partitions)."""
        return throttle_for(
            self.job,
            max_concurrency=self.max_concurrency,
            initial_concurrency=self.initial_concurrency,
            rpm=self.rpm,
            tpm=self.tpm,
            share=process_share(self.processes),
        )


class _RowFailed(Exception):
    """Internal: a chain failed for a row; ``message`` goes to the error column."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line; for API errors, ``Type (status code): message``."""
    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        code = getattr(exc, "code", None)
        name = f"{name} ({exc.status_code}{f' {code}' if code else ''})"
        body = exc.body if isinstance(exc.body, dict) else {}
        text = str(body.get("message") or exc.message)
    else:
        text = str(exc)
    text = text.strip().replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{name}: {text}" if text else name


class PartitionRun:
    """State of one partition's run on one event loop."""

    def __init__(self, df: pd.DataFrame, plan: Plan, options: EnrichOptions) -> None:
        self.df = df
        self.plan = plan
        self.options = options
        self.n = len(df)
        needed = {
            col for pc in plan.chains for col, producer in pc.sources.values() if producer is None
        }
        self.inputs: dict[str, list[Any]] = {col: df[col].tolist() for col in needed}
        self.outputs: dict[str, list[Any]] = {col: [None] * self.n for col in plan.new_columns}
        self.errors: list[str | None] = [None] * self.n
        self.row_usage = [Usage() for _ in range(self.n)]
        self.prices = dict(options.prices)
        self.calls = 0
        self.retries = 0
        self.cache_hits = 0
        self.cache = options.cache
        self.rate_limited = 0
        self.throttle = options.throttle()
        self.runnables: dict[str, Any] = {}
        self.sink = progress_sink(options)
        self._reported = (0, 0, 0, 0)

    async def run(self) -> pd.DataFrame:
        self.sink.partition_started(self.n)
        try:
            return await self._run()
        finally:
            if self.cache is not None:
                self.cache.close()  # this thread's connection; the next partition reopens
            self.sink.flush()
            self.sink.partition_done()

    def _row_done(self, i: int) -> None:
        usage = self.row_usage[i]
        counters = (self.calls, self.retries, self.rate_limited, self.cache_hits)
        calls, retries, limited, hits = (
            a - b for a, b in zip(counters, self._reported, strict=True)
        )
        self._reported = counters
        self.sink.add(
            rows=1,
            failed=int(self.errors[i] is not None),
            calls=calls,
            retries=retries,
            rate_limited=limited,
            cache_hits=hits,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost=usage.cost_usd,
        )

    async def _run(self) -> pd.DataFrame:
        if self.n == 0:
            return self._frame()
        loop = asyncio.get_running_loop()
        # Sync-only runnables (a RunnableLambda of a plain function) run in the
        # loop's default executor: bound it, and let asyncio.run shut it down.
        loop.set_default_executor(
            ThreadPoolExecutor(self.options.sync_threads, thread_name_prefix="dask-llm-sync")
        )
        clients = LoopClients(self.throttle)
        try:
            for pc in self.plan.chains:
                self.runnables[pc.name] = clients.localize(
                    pc.chain.runnable, timeout=self.options.timeout
                )
            row_fn = self._row_path if self.plan.is_path else self._row_dag
            cap = min(self.n, self.options.max_concurrency)
            next_row = 0
            workers = 0

            async def worker() -> None:
                nonlocal next_row, workers
                try:
                    while next_row < self.n:
                        i = next_row
                        next_row += 1
                        await row_fn(i)
                        self._row_done(i)
                        if workers > self.throttle.row_target():
                            return  # the pool follows the target down, too
                finally:
                    workers -= 1

            # Rows are admitted as the throttle can use them, a few at a time: each
            # admitted row does a few ms of LangChain work before its request, and a
            # loop busy preparing 250 rows at once sends nothing for a second.
            async with asyncio.TaskGroup() as tg:
                while next_row < self.n:
                    target = min(cap, self.throttle.row_target())
                    for _ in range(min(8, target - workers, self.n - next_row)):
                        workers += 1
                        tg.create_task(worker())
                    await asyncio.sleep(0.02)
        except* ChainError as group:
            raise group.exceptions[0] from None
        finally:
            await clients.aclose()
        return self._frame()

    # -- rows -------------------------------------------------------------------------
    async def _row_path(self, i: int) -> None:
        failed: set[str] = set()
        for pc in self.plan.chains:
            if pc.deps and failed.intersection(pc.deps):
                failed.add(pc.name)
                continue
            if not await self._run_chain(i, pc):
                failed.add(pc.name)

    async def _row_dag(self, i: int) -> None:
        tasks: dict[str, asyncio.Task[bool]] = {}

        async def one(pc: PlannedChain) -> bool:
            if pc.deps:
                done = await asyncio.gather(*(tasks[d] for d in pc.deps))
                if not all(done):
                    return False
            return await self._run_chain(i, pc)

        for pc in self.plan.chains:  # dependency order: deps' tasks exist already
            tasks[pc.name] = asyncio.create_task(one(pc))
        await asyncio.gather(*tasks.values())

    async def _run_chain(self, i: int, pc: PlannedChain) -> bool:
        """Run one chain for row ``i``; store its outputs or its error. True on success."""
        try:
            inputs = {}
            for var, (col, producer) in pc.sources.items():
                value = self.inputs[col][i] if producer is None else self.outputs[col][i]
                if _is_missing(value):
                    raise _RowFailed(f"{pc.name}: missing input {col}")
                inputs[var] = value
            key = self._key(pc, inputs)
            if key is None:
                value = await self._paid_call(i, pc, inputs)
            else:
                hit = self.cache.get_many([key]) if self.cache is not None else {}
                if key in hit:
                    value = hit[key]
                    self.cache_hits += 1
                else:
                    value, _ = await dedup.once(key, lambda: self._paid_call(i, pc, inputs, key))
            self._put(i, pc, value)
            return True
        except _RowFailed as failure:
            self._fail(i, pc, failure)
            return False

    def _key(self, pc: PlannedChain, inputs: dict[str, Any]) -> str | None:
        try:
            return make_key(pc.chain.fingerprint, inputs)
        except TypeError:
            return None  # inputs that are not plain data: call, but do not cache

    async def _paid_call(
        self, i: int, pc: PlannedChain, inputs: dict[str, Any], key: str | None = None
    ) -> Any:
        """Call the chain (with retries), normalise its result, and store it in the cache."""
        recorder = UsageRecorder(self.prices)
        try:
            result = await self._call(pc, inputs, recorder)
        finally:
            self._account(i, recorder.usage)
        value = _normalize(pc, result)
        if key is not None and self.cache is not None:
            with contextlib.suppress(TypeError, ValueError):  # not JSON-able: keep, don't cache
                self.cache.put(key, value)
        return value

    def _account(self, i: int, usage: Usage) -> None:
        if usage.calls:
            self.throttle.record_usage(usage.input_tokens, usage.output_tokens, usage.calls)
        self.row_usage[i].add(usage)

    async def _call(self, pc: PlannedChain, inputs: dict[str, Any], recorder: UsageRecorder) -> Any:
        policy = self.options.retry
        runnable = self.runnables[pc.name]
        self.calls += 1
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(policy.attempts)
            | tenacity.stop_before_delay(policy.timeout),
            wait=_wait(policy),
            retry=_should_retry(policy),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                with attempt:
                    token = usage_context.set(recorder)
                    try:
                        return await runnable.ainvoke(inputs)
                    except Exception as exc:
                        self.rate_limited += is_rate_limit(exc)
                        raise
                    finally:
                        usage_context.reset(token)
        except _RowFailed:
            raise
        except Exception as exc:
            raise _RowFailed(f"{pc.name}: {_describe(exc)}", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _put(self, i: int, pc: PlannedChain, value: Any) -> None:
        fields = pc.outputs.fields
        if pc.outputs.scalar:
            ((_, col),) = fields.items()
            self.outputs[col][i] = value
        else:
            for fname, col in fields.items():
                self.outputs[col][i] = value[fname]

    def _fail(self, i: int, pc: PlannedChain, failure: _RowFailed) -> None:
        if self.options.errors == "raise":
            label = self.df.index[i]
            raise ChainError(
                f"row {label!r}: {failure.message}", index=label, chain=pc.name
            ) from failure.cause
        previous = self.errors[i]
        self.errors[i] = failure.message if previous is None else f"{previous}; {failure.message}"

    # -- output -----------------------------------------------------------------------
    def _frame(self) -> pd.DataFrame:
        out = self.df.copy(deep=False)
        columns: dict[str, list[Any]] = {**self.outputs, self.plan.error_column: self.errors}
        if self.plan.usage_columns is not None:
            tokens_in, tokens_out, cost = self.plan.usage_columns
            rows = self.row_usage
            columns[tokens_in] = [u.input_tokens for u in rows]
            columns[tokens_out] = [u.output_tokens for u in rows]
            columns[cost] = [u.cost_usd for u in rows]
        for col, dtype in self.plan.new_columns.items():
            out[col] = _column(columns[col], dtype, self.df.index)
        return out


def _normalize(pc: PlannedChain, result: Any) -> Any:
    """The part of a chain's result that goes to its columns, as plain data (what is cached)."""
    spec = pc.outputs
    if spec.scalar:
        if isinstance(result, BaseMessage):
            return result.content
        if isinstance(result, pydantic.BaseModel):
            return result.model_dump(mode="json")
        return result
    if isinstance(result, pydantic.BaseModel):
        result = result.model_dump(mode="json")
    if not isinstance(result, dict):
        raise _RowFailed(
            f"{pc.name}: returned {type(result).__name__}, expected fields {', '.join(spec.fields)}"
        )
    missing = [f for f in spec.fields if f not in result]
    if missing:
        raise _RowFailed(f"{pc.name}: output missing from the result: {', '.join(missing)}")
    return {f: result[f] for f in spec.fields}


def _column(values: list[Any], dtype: Any, index: pd.Index) -> pd.Series:
    if dtype == object_dtype():
        return pd.Series(values, dtype=object, index=index)
    try:
        return pd.Series(values, dtype=dtype, index=index)
    except (TypeError, ValueError):
        # A value of the wrong type (text where the schema said a number): keep
        # each value that converts, null the rest, rather than fail the partition.
        return pd.Series([_convert(v, dtype) for v in values], dtype=dtype, index=index)


def _convert(value: Any, dtype: Any) -> Any:
    try:
        return pd.array([value], dtype=dtype)[0]
    except (TypeError, ValueError):
        return None


def _wait(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    def wait(state: tenacity.RetryCallState) -> float:
        backoff = policy.backoff(state.attempt_number)
        exc = state.outcome.exception() if state.outcome else None
        floor = retry_after(exc) if exc is not None else None
        return max(backoff, floor) if floor is not None else backoff

    return wait


def _should_retry(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], bool]:
    def should(state: tenacity.RetryCallState) -> bool:
        if state.outcome is None or not state.outcome.failed:
            return False
        kind = classify(state.outcome.exception())  # type: ignore[arg-type]
        if kind == "transient":
            return True
        return kind == "parse" and state.attempt_number < policy.parse_attempts

    return should


def enrich_partition(df: pd.DataFrame, plan: Plan, options: EnrichOptions) -> pd.DataFrame:
    """Dask's partition function: enrich ``df`` on a fresh event loop."""
    from dask_llm._loop import run_sync

    return run_sync(lambda: PartitionRun(df, plan, options).run())
