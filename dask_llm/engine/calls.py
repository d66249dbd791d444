"""One chain for one row: the row memo, the call with its retries, and what it cost.

The result cache answers at two levels (see ``docs/cache.md``):

* **The row memo**: the chain's final columns for these inputs, keyed by
  the chain's *memo fingerprint* and the row's inputs. It skips LangChain
  entirely (a cached rerun reads tens of thousands of rows a second), so it
  is used only for chains whose fingerprint is complete (``chains.fingerprint``):
  templates, models and parsers, no Python code. Caches written before the
  memo existed are read through their old keys for such chains and their
  entries copied to the new ones.
* **The request cache**, in the transport, for every chain: keyed by the
  request body, answered through the chain's own parsing.

Answers that are paid for land in the request cache at once; the row memo
is written when the chain's result for the row is complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from dask_llm.cache import make_key
from dask_llm.chains.columns import RowFailed, normalize
from dask_llm.chains.plan import PlannedChain
from dask_llm.compiled import CompiledChain, compile_chain
from dask_llm.compiled import enabled as compiled_enabled
from dask_llm.core.config import BatchPolicy
from dask_llm.core.errors import JobStopped
from dask_llm.core.usage import Usage
from dask_llm.engine.retry import call_with_retries, root_cause
from dask_llm.observe.record import ACTIVE
from dask_llm.providers.registry import connection_errors, status_errors
from dask_llm.transport.batch import policy_for_retries
from dask_llm.transport.wire import host_of

log = logging.getLogger(__name__)


class PartitionStats:
    """What one partition did: the counters it reports."""

    __slots__ = (
        "batch_lines",
        "batches",
        "batches_done",
        "batches_finalizing",
        "batches_in_progress",
        "batches_late",
        "batches_validating",
        "cache_errors",
        "cache_hits",
        "calls_paid",
        "flex_unavailable",
        "rate_limited",
        "retries",
    )

    def __init__(self) -> None:
        self.calls_paid = 0
        self.retries = 0
        self.rate_limited = 0
        self.flex_unavailable = 0  # Flex requests answered 429 "resource unavailable"
        self.cache_hits = 0
        self.cache_errors = 0
        self.batches = 0  # batches submitted, or re-attached to after a crash
        self.batches_done = 0  # batches ended and read
        self.batch_lines = 0  # lines answered by batches
        # Batches of this partition in each status now (gauges: reported as changes).
        self.batches_validating = 0
        self.batches_in_progress = 0
        self.batches_finalizing = 0
        self.batches_late = 0  # deadline=: cancelled early, their progress too slow

    def snapshot(self) -> tuple[int, ...]:
        return (
            self.calls_paid,
            self.retries,
            self.rate_limited,
            self.cache_hits,
            self.cache_errors,
            self.batches,
            self.batches_done,
            self.batch_lines,
            self.batches_validating,
            self.batches_in_progress,
            self.batches_finalizing,
            self.flex_unavailable,
            self.batches_late,
        )


class ChainCaller:
    """Calls one chain of the plan on this partition's loop."""

    def __init__(
        self,
        pc: PlannedChain,
        localize: Callable[[Any], tuple[Any, bool]],
        *,
        job: Any,
        stats: PartitionStats,
        batch: BatchPolicy | None = None,
    ) -> None:
        self.pc = pc
        self.job = job
        self.stats = stats
        #: This partition's Batch API policy (None: online); ``deadline=`` chooses it per
        #: partition, so it is not always the job's ``batch=``.
        self.batch = batch
        # Without a cache there is no memo to read or write: no key to compute per row.
        self.memo = pc.chain.memo_fingerprint if job.cache is not None else None
        self.legacy = pc.chain.legacy_fingerprint if self.memo is not None else None
        self._localize = localize
        self._local: tuple[Any, bool] | None = None
        self._compiled: CompiledChain | None = None

    def _runnable(self) -> tuple[Any, bool]:
        """The chain with this loop's clients in it (built on the first call: a partition
        answered from the row memo opens none)."""
        if self._local is None:
            self._local = self._localize(self.pc.chain.runnable)
            runnable, tapped = self._local
            options = self.job.options
            # Not with batch=: a batch's rows wait for each other, and a row waiting for
            # the proof would hold the batch that the proof waits for.
            if tapped and options.compiled and self.batch is None and compiled_enabled():
                self._compiled = compile_chain(self.pc, runnable, self.job.compiled)
        return self._local

    # -- the row memo ---------------------------------------------------------------------------
    def memo_key(self, inputs: dict[str, Any]) -> str | None:
        if self.memo is None:
            return None
        try:
            return make_key(self.memo, inputs)
        except TypeError:
            return None  # inputs that are not plain data: call, but do not memoize

    def lookup(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Memoized values for the rows' inputs (``MISSING`` where none), in one round."""
        keys = [self.memo_key(inputs) for inputs in rows]
        wanted = [k for k in keys if k is not None]
        found = self.job.cache_get(wanted, self.stats) if wanted else {}
        if self.legacy is not None and len(found) < len(wanted):
            found.update(self._legacy(rows, keys, found))
        return [found.get(k, MISSING) if k is not None else MISSING for k in keys]

    def _legacy(
        self, rows: list[dict[str, Any]], keys: list[str | None], found: dict[str, Any]
    ) -> dict[str, Any]:
        """Entries of a cache written before the row memo existed, moved to their new keys."""
        assert self.legacy is not None
        old: dict[str, str] = {}
        for inputs, key in zip(rows, keys, strict=True):
            if key is not None and key not in found:
                old[make_key(self.legacy, inputs)] = key
        moved: dict[str, Any] = {}
        for old_key, value in self.job.cache_get(list(old), self.stats).items():
            moved[old[old_key]] = value
            self.job.cache_put(old[old_key], value, self.stats)
        return moved

    # -- the call ---------------------------------------------------------------------------------
    async def call(self, inputs: dict[str, Any], key: str | None) -> tuple[Any, Usage]:
        """The chain's normalized result for ``inputs`` and its usage; ``RowFailed`` on failure."""
        job = self.job
        options = job.options
        runnable, tapped = self._runnable()
        if self._compiled is not None:
            runnable = self._compiled  # LangChain's path until proven, then its own

        def invoke(config: dict[str, Any] | None) -> Any:
            return runnable.ainvoke(inputs, config)

        policy = options.retry
        if self.batch is not None:
            if not tapped:
                raise RowFailed(
                    f"{self.pc.name}: batch=True needs every chat model of the chain to be a "
                    "ChatOpenAI (or init_chat_model) that dask-llm routes (no "
                    "http_async_client of its own, no model built inside Python code)",
                    None,
                )
            policy = policy_for_retries(policy)
        if self.pc.outputs.include_raw:
            # The user asked for the raw answer beside the parsed one: an answer that
            # does not parse is this row's error, not a reason to pay for another.
            policy = dataclasses.replace(policy, parse_attempts=1)
        active = ACTIVE.set((job.recorder, self.pc.name))  # the run record's chain
        try:
            result, usage = await call_with_retries(
                invoke,
                policy=policy,
                prices=options.price_table,
                stats=self.stats,
                stopped=lambda: job.stopped is not None,
                with_callbacks=not tapped,
            )
        except (asyncio.CancelledError, RowFailed):
            raise
        # The chain is the user's code: whatever it raises is this row's error, and the
        # other rows go on (errors="column").
        except Exception as exc:
            usage = getattr(exc, "usage", Usage())
            raise _failure(self.pc.name, exc, job, usage) from exc
        finally:
            ACTIVE.reset(active)
        try:
            value = normalize(self.pc, result)
        except RowFailed as failure:
            failure.usage = usage  # type: ignore[attr-defined]
            raise
        if key is not None:
            job.cache_put(key, value, self.stats)
        return value, usage


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _failure(name: str, exc: BaseException, job: Any, usage: Usage) -> RowFailed:
    cause = root_cause(exc)
    if isinstance(cause, JobStopped) or (
        job.stopped is not None and isinstance(exc, connection_errors())
    ):
        stop = job.stopped
        text = stop.text if stop is not None else str(cause)
        failure = RowFailed(f"{name}: not sent: {text}", exc)
        failure.stopped = True  # type: ignore[attr-defined]
    else:
        failure = RowFailed(f"{name}: {describe(exc)}", exc)
    failure.usage = usage  # type: ignore[attr-defined]
    return failure


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line; API errors with status and code; connection errors with
    their cause."""
    name = type(exc).__name__
    if isinstance(exc, status_errors()):
        code = getattr(exc, "code", None)
        name = f"{name} ({exc.status_code}{f' {code}' if code else ''} from {host_of(exc.request)})"
        body = exc.body if isinstance(exc.body, dict) else {}
        text = str(body.get("message") or exc.message)
    elif isinstance(exc, connection_errors()) and exc.__cause__ is not None:
        text = f"{exc.message} {root_cause(exc)}"
    else:
        text = str(exc)
    text = text.strip().replace("\n", " ")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{name}: {text}" if text else name
