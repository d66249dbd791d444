"""Progress you can watch and a summary you can keep: rows, calls, retries, 429s, tokens, cost.

Each process keeps one ``RunProgress`` per job, fed by the partitions running
in it. Where the job runs in the process that called ``compute`` (the
synchronous and threaded schedulers, the pandas accessor) it drives a
``tqdm.auto`` bar, which renders in terminals and notebooks. On
``distributed`` the workers send their counts to the client through Dask's
event machinery (``Worker.log_event`` -> ``Client.subscribe_topic``, twice a
second per worker and at partition end), and the client draws the bar for
the whole cluster, row by row. (Dask's local process pool has no channel
back: there the bar counts nothing until the end, and ``last_run()`` is
empty; use threads or ``distributed``.)

The bar's total is the job's rows when known, else estimated as partitions x
the mean rows of the partitions seen so far. When every partition has
reported, the bar closes and a one-line summary is printed (``progress=``
on) and kept: ``dask_llm.last_run()``.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

TOPIC = "dask-llm-progress"


@dataclass
class RunSummary:
    """What one run of a job did. ``cost_usd`` is None when a model had no price."""

    rows: int = 0
    failed_rows: int = 0
    calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    wall_s: float = 0.0

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else 0.0

    def __str__(self) -> str:
        cost = "unknown" if self.cost_usd is None else f"${self.cost_usd:,.4f}"
        return (
            f"{self.rows:,} rows ({self.failed_rows:,} failed) in {self.wall_s:,.1f} s: "
            f"{self.calls:,} calls ({self.calls_per_s:,.1f}/s), {self.retries:,} retries, "
            f"{self.rate_limited:,} rate-limited, {self.cache_hits:,} from cache, "
            f"{self.input_tokens:,} tokens in / {self.output_tokens:,} out, cost {cost}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calls_per_s": self.calls_per_s}


_LAST: list[RunSummary] = []


def last_run() -> RunSummary | None:
    """The summary of the last run that finished in this process (the client on distributed)."""
    return _LAST[-1] if _LAST else None


class RunProgress:
    """Counts of one job in one process, with an optional bar."""

    def __init__(self, *, partitions: int, total_rows: int | None, show: bool) -> None:
        self.partitions = partitions
        self.total_rows = total_rows
        self.show = show
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.summary = RunSummary()
        self.started = time.monotonic()
        self.partitions_seen = 0
        self.partitions_done = 0
        self.rows_seen = 0
        self.bar: Any = None

    # -- fed by partitions (or by events from workers) ----------------------------------
    def partition_started(self, rows: int) -> None:
        with self._lock:
            if self.partitions_done >= self.partitions and self.partitions_seen:
                self._reset()  # the same lazy frame computed again: a new run
            self.partitions_seen += 1
            self.rows_seen += rows
            if self.show and self.bar is None:
                self.bar = _bar()
            self._retotal()

    def add(
        self,
        *,
        rows: int = 0,
        failed: int = 0,
        calls: int = 0,
        retries: int = 0,
        rate_limited: int = 0,
        cache_hits: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost: float | None = 0.0,
    ) -> None:
        with self._lock:
            s = self.summary
            s.rows += rows
            s.failed_rows += failed
            s.calls += calls
            s.retries += retries
            s.rate_limited += rate_limited
            s.cache_hits += cache_hits
            s.input_tokens += input_tokens
            s.output_tokens += output_tokens
            if cost is None or s.cost_usd is None:
                s.cost_usd = None
            else:
                s.cost_usd += cost
            s.wall_s = time.monotonic() - self.started
            if self.bar is not None:
                self.bar.update(rows)
                self.bar.set_postfix_str(self._postfix(), refresh=False)

    def partition_done(self) -> None:
        with self._lock:
            self.partitions_done += 1
            if self.partitions_done < self.partitions:
                return
            self.summary.wall_s = time.monotonic() - self.started
            summary = self.summary
            bar, self.bar = self.bar, None
        _LAST.append(summary)
        del _LAST[:-1]
        if bar is not None:
            bar.set_postfix_str(self._postfix(), refresh=False)
            bar.close()
            print(f"dask-llm: {summary}", file=sys.stderr)

    def _retotal(self) -> None:
        if self.bar is None:
            return
        if self.total_rows is not None:
            total = self.total_rows
        else:
            mean = self.rows_seen / max(1, self.partitions_seen)
            total = round(mean * self.partitions)
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def _postfix(self) -> str:
        s = self.summary
        cost = "?" if s.cost_usd is None else f"${s.cost_usd:.4f}"
        rate = s.calls / s.wall_s if s.wall_s > 0 else 0.0
        return (
            f"{rate:.1f} calls/s, {s.retries} retries, {s.rate_limited} 429s, "
            f"{s.input_tokens + s.output_tokens:,} tok, {cost}, {s.failed_rows} failed"
        )


def _bar() -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="row", desc="dask-llm", dynamic_ncols=True, mininterval=0.5)


_RUNS: dict[str, RunProgress] = {}
_RUNS_LOCK = threading.Lock()


def progress_for(job: str, *, partitions: int, total_rows: int | None, show: bool) -> RunProgress:
    with _RUNS_LOCK:
        run = _RUNS.get(job)
        if run is None:
            run = _RUNS[job] = RunProgress(partitions=partitions, total_rows=total_rows, show=show)
        return run


def interactive() -> bool:
    """Whether a person is probably watching: a terminal or a notebook."""
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# -- distributed ---------------------------------------------------------------------------
def on_distributed_worker() -> Any:
    """The ``distributed`` worker running this task, or None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def listen_on_client(job: str, run: RunProgress) -> None:
    """Feed ``run`` from the workers' events for ``job`` (when a distributed client exists)."""
    if "distributed" not in sys.modules:
        return
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return

    def handle(event: Any) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("job") != job:
            return
        kind = msg.get("kind")
        if kind == "start":
            run.partition_started(int(msg["rows"]))
        elif kind == "counts":
            run.add(**msg["counts"])
        elif kind == "done":
            run.partition_done()

    client.subscribe_topic(f"{TOPIC}-{job}", handle)


class EventSink:
    """On a ``distributed`` worker: batch counts and send them to the client as events."""

    def __init__(self, worker: Any, job: str) -> None:
        self.worker = worker
        self.job = job
        self.topic = f"{TOPIC}-{job}"
        self.counts: dict[str, Any] = {}
        self.last = time.monotonic()

    def _send(self, msg: dict[str, Any]) -> None:
        self.worker.log_event(self.topic, {"job": self.job, **msg})

    def partition_started(self, rows: int) -> None:
        self._send({"kind": "start", "rows": rows})

    def add(self, **counts: Any) -> None:
        for key, value in counts.items():
            if key == "cost":
                old = self.counts.get("cost", 0.0)
                self.counts["cost"] = None if value is None or old is None else old + value
            else:
                self.counts[key] = self.counts.get(key, 0) + value
        if time.monotonic() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.counts:
            self._send({"kind": "counts", "counts": self.counts})
            self.counts = {}
        self.last = time.monotonic()

    def partition_done(self) -> None:
        self._send({"kind": "done"})


class _LocalSink:
    def __init__(self, run: RunProgress) -> None:
        self.run = run

    def partition_started(self, rows: int) -> None:
        self.run.partition_started(rows)

    def add(self, **counts: Any) -> None:
        self.run.add(**counts)

    def flush(self) -> None:
        pass

    def partition_done(self) -> None:
        self.run.partition_done()


def progress_sink(options: Any) -> Any:
    """Where a partition reports: events to the client on distributed, else this process."""
    worker = on_distributed_worker()
    if worker is not None:
        return EventSink(worker, options.job)
    run = progress_for(
        options.job,
        partitions=options.partitions,
        total_rows=options.total_rows,
        show=options.progress and not _in_pool_child(),
    )
    return _LocalSink(run)


def _in_pool_child() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None
