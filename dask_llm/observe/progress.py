"""Progress you can watch and a summary you can keep: rows, calls, retries, 429s, tokens, cost.

Every partition reports the same three events: ``start`` (its row count),
``counts`` (what it did since the last report, twice a second and at the
end) and ``done``; in batch mode also ``batches``, the ids of its batches in
flight whenever they change, so that the client can name them after Ctrl-C
whichever process waits for them. They reach the process that called ``compute`` (the
client) by the shortest way there is:

* synchronous and threaded schedulers, the pandas accessor: a direct call;
* dask's local process pool: the client's job hub (``cluster.hub``), a socket;
* ``distributed``: ``Worker.log_event`` -> ``Client.subscribe_topic``
  (one subscription per client, whatever the number of jobs).

The client keeps one ``RunProgress`` per job while it runs (created by the
first ``start``, dropped when the run ends, so nothing accumulates), draws a
``tqdm.auto`` bar when a person is watching, and at the end keeps the
summary: ``dask_llm.last_run()``.

Rows are counted once per partition: a partition whose task is run again
(a worker died, the scheduler retried it) replaces its earlier attempt's
rows. Calls, tokens and dollars are added up over every attempt, because
they were paid.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dask_llm.core.runtime import part
from dask_llm.observe.record import RunRecord
from dask_llm.observe.report import render_html, write_report

TOPIC = "dask-llm-progress"

#: Counters a partition reports in its ``counts`` events (all ints, cost a float or None).
COUNTERS = (
    "rows",
    "failed",
    "calls",
    "retries",
    "rate_limited",
    "cache_hits",
    "cache_errors",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "saved",
    "flex_calls",
    "batch_calls",
    "flex_unavailable",
    "unknown_usage",
    "batches",
    "batches_done",
    "batch_lines",
    "batches_validating",
    "batches_in_progress",
    "batches_finalizing",
    "batches_late",
)


@dataclass
class RunSummary:
    """What one run of a job did.

    ``status`` is ``"completed"``, ``"interrupted"`` (Ctrl-C, or the computation
    failed elsewhere) or ``"stopped: <why>"`` (a fatal provider answer, ``errors="raise"``).
    Tokens count what the provider reported; ``rows_without_usage`` rows had calls
    whose usage no provider reported, and then ``cost_usd`` is None, as it is when
    a model has no price. Answers from the cache cost nothing and count in
    ``cache_hits``; ``cache_errors`` counts failed cache reads and writes (the
    answers were kept, only not cached).

    With ``deadline=``: ``deadline_at`` (seconds since the epoch) and
    ``deadline_spare_s``, the seconds left when the run ended (negative: missed by
    that much); ``batches_late``, batches cancelled before their cut-off because
    their progress showed they could not finish in time; ``cost_by_tier``, what
    each tier cost.
    """

    rows: int = 0
    failed_rows: int = 0
    calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    cache_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    caching_saved_usd: float = 0.0
    flex_calls: int = 0
    batch_calls: int = 0
    flex_unavailable: int = 0
    rows_without_usage: int = 0
    batches: int = 0
    batches_done: int = 0
    batch_lines: int = 0
    #: Batches in each status now (during a run; 0 once it has ended).
    batches_validating: int = 0
    batches_in_progress: int = 0
    batches_finalizing: int = 0
    #: deadline=: batches cancelled early, their progress too slow to finish in time.
    batches_late: int = 0
    #: Ids of the batches submitted and not yet read, as the client last heard: after an
    #: interrupt, those still running at the provider (``dask_llm.cancel_batches``).
    batches_in_flight: tuple[str, ...] = ()
    cost_usd: float | None = 0.0
    budget_usd: float | None = None
    wall_s: float = 0.0
    deadline_at: float | None = None
    deadline_spare_s: float | None = None
    status: str = "completed"
    cache: str | None = field(default=None, repr=False)
    #: What every request did over time (``observe.record``): ``report()`` draws it.
    record: RunRecord | None = field(default=None, repr=False, compare=False)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def list_price_calls(self) -> int:
        """Paid answers that came online at list price (neither Flex nor the Batch API)."""
        return self.calls - self.flex_calls - self.batch_calls

    @property
    def cost_by_tier(self) -> dict[str, float]:
        """US dollars paid by tier: ``"batch"``, ``"flex"`` and ``"list"`` (list price),
        from the run record (empty without one)."""
        if self.record is None:
            return {}
        chains = self.record.chains.values()
        batch = sum(c.batch_cost_usd for c in chains)
        flex = sum(c.flex_cost_usd for c in chains)
        total = sum(c.cost_usd for c in chains)
        return {"batch": batch, "flex": flex, "list": max(0.0, total - batch - flex)}

    def __str__(self) -> str:
        cost = "unknown" if self.cost_usd is None else f"${self.cost_usd:,.4f}"
        if self.budget_usd is not None:
            cost += f" of ${_dollars(self.budget_usd)} budget"
        text = (
            f"{self.rows:,} rows ({self.failed_rows:,} failed) in {self.wall_s:,.1f} s: "
            f"{self.calls:,} calls ({self.calls_per_s:,.1f}/s), {self.retries:,} retries, "
            f"{self.rate_limited:,} rate-limited, {self.cache_hits:,} from cache, "
            f"{self.input_tokens:,} tokens in / {self.output_tokens:,} out, cost {cost}"
        )
        if self.cached_tokens:
            text += (
                f", {self.cached_tokens:,} input tokens from the prompt cache (saved "
                f"${self.caching_saved_usd:,.4f})"
            )
        if self.flex_calls or self.flex_unavailable or self.deadline_at is not None:
            text += f", by tier: {self._tiers()}; {self.flex_unavailable:,} Flex unavailable"
        if self.cache_errors:
            text += f", {self.cache_errors:,} cache errors"
        if self.batches:
            text += (
                f", {self.batches:,} batches ({self.batches_done:,} done, "
                f"{self.batch_lines:,} lines answered"
                + (
                    f", {self.batches_late:,} cancelled early: too slow"
                    if self.batches_late
                    else ""
                )
                + ")"
            )
        if self.deadline_spare_s is not None:
            spare = self.deadline_spare_s
            text += (
                f", deadline met ({spare:,.1f} s to spare)"
                if spare >= 0
                else f", deadline missed by {-spare:,.1f} s"
            )
        if self.status != "completed":
            text += f" [{self.status}]"
        return text

    def _tiers(self) -> str:
        """Answers by tier, each with what it cost when the run record says."""
        cost = self.cost_by_tier
        parts = []
        for name, tier, calls in (
            ("Flex", "flex", self.flex_calls),
            ("batch", "batch", self.batch_calls),
            ("list price", "list", self.list_price_calls),
        ):
            paid = f" (${cost[tier]:,.4f})" if cost else ""
            parts.append(f"{calls:,} {name}{paid}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        # Plain data only (the record has its own ``as_dict``).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.pop("cache")
        data.pop("record")
        return {
            **data,
            "calls_per_s": self.calls_per_s,
            "list_price_calls": self.list_price_calls,
            "cost_by_tier": self.cost_by_tier,
        }

    def report(self, path: str | os.PathLike[str], *, estimate: Any = None) -> str:
        """Write the run's report to ``path``: one self-contained HTML file, readable offline.

        Plots of throughput against the limit, requests in flight, 429s, retries and
        errors over time, latency per chain and cumulative cost against ``estimate``
        (an ``Estimate``, a ``Pilot`` or US dollars) and the budget; a table of errors
        with sample rows. Returns the path written. See ``docs/report.md``.
        """
        return write_report(self, path, estimate=estimate)

    def _repr_html_(self) -> str:
        return render_html(self, standalone=False)


def _dollars(value: float) -> str:
    """Cents for a dollar and more, four significant digits below (a $0.0005 budget)."""
    return f"{value:,.2f}" if value >= 1 else f"{value:.4g}"


#: Summaries kept of runs that ended (a job's caller reads its own at once).
_KEEP_DONE = 8
#: Runs stopped early whose late events are dropped, kept at most.
_KEEP_ENDED = 512


class Runs:
    """The client's runs (a part of the process's ``core.runtime``).

    ``active``: each run in progress by (job, the client's run number: ``cluster.hub``;
    None on distributed), from its first partition's ``start`` event until its last
    partition ends or it is stopped. A rerun of a job after an interrupt is the same
    job and another run: keyed by job alone, the first run's tail (a pool child
    reporting a partition it began after the stop) was counted in the rerun.
    ``ended``: numbered runs stopped early, whose late events are dropped (the last
    ``_KEEP_ENDED``). ``done``: the summaries
    of the last ``_KEEP_DONE`` runs that ended, by job, oldest dropped first
    (``last_run()`` is the newest). ``subscribed``: the ``distributed`` clients
    whose workers' progress events feed ``active``, held weakly (a client that is
    gone goes); ``close()`` unsubscribes them.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[tuple[str, int | None], RunProgress] = {}
        self.ended: dict[tuple[str, int], None] = {}
        self.done: dict[str, RunSummary] = {}
        self.subscribed: weakref.WeakSet[Any] = weakref.WeakSet()

    def close(self) -> None:
        with self.lock:
            clients, self.subscribed = list(self.subscribed), weakref.WeakSet()
            self.active.clear()
        for client in clients:
            with contextlib.suppress(Exception):  # best effort: the client may be closing
                client.unsubscribe_topic(TOPIC)


def last_run() -> RunSummary | None:
    """The summary of the last run that ended in this process (the client on distributed)."""
    runs = part(Runs)
    with runs.lock:
        return next(reversed(runs.done.values()), None)


def summary_of(job: str) -> RunSummary | None:
    """The summary of ``job``'s last run that ended in this process, if it is among the
    last few."""
    runs = part(Runs)
    with runs.lock:
        return runs.done.get(job)


class RunProgress:
    """Counts of one job's run, as the client sees them, with an optional bar."""

    def __init__(
        self,
        *,
        job: str,
        partitions: int,
        total_rows: int | None,
        show: bool,
        cache: str | None = None,
        budget_usd: float | None = None,
        deadline_at: float | None = None,
    ) -> None:
        self.job = job
        self.partitions = max(1, partitions)
        self.total_rows = total_rows
        self.show = show
        self.summary = RunSummary(
            cache=cache,
            budget_usd=budget_usd,
            deadline_at=deadline_at,
            record=RunRecord(budget_usd=budget_usd),
        )
        self.started = time.monotonic()
        self._lock = threading.Lock()
        # partition -> (attempt, rows it has, rows done, failed rows)
        self._parts: dict[int, list[Any]] = {}
        self._done: set[int] = set()
        self._in_flight: dict[int, tuple[str, ...]] = {}  # partition -> its batches
        self._cost_known = True
        self.finished = False
        self.bar: Any = None

    # -- events ---------------------------------------------------------------------------
    def apply(self, event: dict[str, Any]) -> bool:
        """Take one event; True once the run has ended (every partition done)."""
        kind = event.get("kind")
        part = int(event.get("partition", 0))
        attempt = event.get("attempt")
        with self._lock:
            if self.finished:
                return True
            if kind == "start":
                self._parts[part] = [attempt, int(event.get("rows", 0)), 0, 0]
                self._done.discard(part)
                if self.show and self.bar is None:
                    self.bar = _bar()
                self._retotal()
            elif kind == "counts":
                self._add(part, attempt, event.get("counts") or {})
                if event.get("record") and self.summary.record is not None:
                    self.summary.record.merge(event["record"])
            elif kind == "batches":
                self._in_flight[part] = tuple(event.get("ids") or ())
                ids = {i for batch_ids in self._in_flight.values() for i in batch_ids}
                self.summary.batches_in_flight = tuple(sorted(ids))
            elif kind == "done":
                state = self._parts.get(part)
                if state is not None and state[0] == attempt:
                    self._done.add(part)
                if len(self._done) >= self.partitions:
                    self._finish("completed")
                    return True
        return False

    def _add(self, part: int, attempt: Any, counts: dict[str, Any]) -> None:
        s = self.summary
        state = self._parts.get(part)
        current = state is not None and state[0] == attempt
        if current:
            assert state is not None
            state[2] += int(counts.get("rows", 0))
            state[3] += int(counts.get("failed", 0))
        s.calls += int(counts.get("calls", 0))
        s.retries += int(counts.get("retries", 0))
        s.rate_limited += int(counts.get("rate_limited", 0))
        s.cache_hits += int(counts.get("cache_hits", 0))
        s.cache_errors += int(counts.get("cache_errors", 0))
        s.input_tokens += int(counts.get("input_tokens", 0))
        s.output_tokens += int(counts.get("output_tokens", 0))
        s.cached_tokens += int(counts.get("cached_tokens", 0))
        s.caching_saved_usd += float(counts.get("saved", 0.0))
        s.flex_calls += int(counts.get("flex_calls", 0))
        s.batch_calls += int(counts.get("batch_calls", 0))
        s.flex_unavailable += int(counts.get("flex_unavailable", 0))
        s.rows_without_usage += int(counts.get("unknown_usage", 0))
        s.batches += int(counts.get("batches", 0))
        s.batches_done += int(counts.get("batches_done", 0))
        s.batch_lines += int(counts.get("batch_lines", 0))
        s.batches_validating += int(counts.get("batches_validating", 0))
        s.batches_in_progress += int(counts.get("batches_in_progress", 0))
        s.batches_finalizing += int(counts.get("batches_finalizing", 0))
        s.batches_late += int(counts.get("batches_late", 0))
        cost = counts.get("cost", 0.0)
        if cost is None:
            self._cost_known = False
        elif self._cost_known and s.cost_usd is not None:
            s.cost_usd += float(cost)
        s.cost_usd = s.cost_usd if self._cost_known else None
        before = s.rows
        s.rows = sum(p[2] for p in self._parts.values())
        s.failed_rows = sum(p[3] for p in self._parts.values())
        s.wall_s = time.monotonic() - self.started
        if self.bar is not None:
            self.bar.update(s.rows - before)
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def stop(self, status: str) -> RunSummary:
        """End the run early (interrupted or stopped); its summary becomes ``last_run()``."""
        with self._lock:
            if not self.finished:
                self._finish(status)
            return self.summary

    def _finish(self, status: str) -> None:
        self.finished = True
        s = self.summary
        stop = s.record.stop if s.record is not None else None
        s.status = f"stopped: {stop[1]}" if stop is not None and status == "completed" else status
        s.wall_s = time.monotonic() - self.started
        if s.deadline_at is not None:
            s.deadline_spare_s = s.deadline_at - time.time()
        runs = part(Runs)
        with runs.lock:
            runs.done.pop(self.job, None)
            runs.done[self.job] = s
            while len(runs.done) > _KEEP_DONE:
                del runs.done[next(iter(runs.done))]
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.set_postfix_str(self._postfix(), refresh=False)
            bar.close()
            print(f"dask-llm: {s}", file=sys.stderr)

    def _retotal(self) -> None:
        if self.bar is None:
            return
        if self.total_rows is not None:
            total = self.total_rows
        else:
            seen = [p[1] for p in self._parts.values()]
            total = round(sum(seen) / max(1, len(seen)) * self.partitions)
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def _postfix(self) -> str:
        s = self.summary
        cost = "?" if s.cost_usd is None else f"${s.cost_usd:.4f}"
        if s.budget_usd is not None:
            cost += f"/${_dollars(s.budget_usd)}"
        rate = s.calls / s.wall_s if s.wall_s > 0 else 0.0
        if s.batches:
            return (
                f"batches: {s.batches_validating} validating, {s.batches_in_progress} in "
                f"progress, {s.batches_finalizing} finalizing, {s.batches_done}/{s.batches} "
                f"done, {s.batch_lines:,} lines, "
                f"{s.input_tokens + s.output_tokens:,} tok, {cost}, {s.failed_rows} failed"
            )
        flex = (
            f", {s.flex_calls:,} by Flex ({s.flex_unavailable} unavailable)"
            if s.flex_calls or s.flex_unavailable
            else ""
        )
        cached = f", {s.cached_tokens:,} cached" if s.cached_tokens else ""
        return (
            f"{rate:.1f} calls/s, {s.retries} retries, {s.rate_limited} 429s{flex}, "
            f"{s.input_tokens + s.output_tokens:,} tok{cached}, {cost}, {s.failed_rows} failed"
        )


def _bar() -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="row", desc="dask-llm", dynamic_ncols=True, mininterval=0.5)


# -- the client's runs in progress ---------------------------------------------------------
def receive(event: dict[str, Any]) -> None:
    """Apply a partition's event to its job's run (created by its first ``start``)."""
    job = event.get("job")
    if not isinstance(job, str):
        return
    number = event.get("run")
    key = (job, number if isinstance(number, int) else None)
    runs = part(Runs)
    with runs.lock:
        if key in runs.ended:
            return  # the tail of a run that was stopped
        run = runs.active.get(key)
        if run is None or (run.finished and event.get("kind") == "start"):
            if event.get("kind") != "start":
                return  # the tail of a run that has ended
            run = runs.active[key] = RunProgress(
                job=job,
                partitions=int(event.get("partitions", 1)),
                total_rows=event.get("total_rows"),
                show=bool(event.get("show")),
                cache=event.get("cache"),
                budget_usd=event.get("budget_usd"),
                deadline_at=event.get("deadline_at"),
            )
    if run.apply(event):
        with runs.lock:
            if runs.active.get(key) is run:
                del runs.active[key]


def active_jobs() -> list[str]:
    """Jobs with a run in progress in this process (as the client sees them)."""
    runs = part(Runs)
    with runs.lock:
        return list(dict.fromkeys(job for job, _ in runs.active))


def stop_run(job: str, status: str, run: int | None = None) -> RunSummary | None:
    """End ``job``'s runs in progress early; the summary of the newest (None if none here).

    Slices of one job computed at once are runs of their own: then the summary's
    ``rows`` and ``batches_in_flight`` are those of all the runs stopped, which is what
    a rerun of the job will not pay for again and what still runs at the provider.
    Their late events, and those of ``run`` (stopped before any of its partitions
    reported), are dropped from then on: a numbered run is never resumed, a rerun
    is the next number.
    """
    runs = part(Runs)
    with runs.lock:
        keys = sorted((k for k in runs.active if k[0] == job), key=lambda k: k[1] or 0)
        stopped = [runs.active.pop(k) for k in keys]
        for number in [n for _, n in keys] + [run]:
            if number is not None:
                runs.ended[(job, number)] = None
        for stale in list(runs.ended)[: max(0, len(runs.ended) - _KEEP_ENDED)]:
            del runs.ended[stale]
    summaries = [progress.stop(status) for progress in stopped]
    if len(summaries) < 2:
        return summaries[0] if summaries else None
    return replace(
        summaries[-1],
        rows=sum(summary.rows for summary in summaries),
        batches_in_flight=tuple(
            sorted({b for summary in summaries for b in summary.batches_in_flight})
        ),
    )


def interactive() -> bool:
    """Whether a person is probably watching: a terminal or a notebook."""
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# -- distributed: one subscription per client ------------------------------------------------
def listen_on_client(client: Any) -> None:
    """Feed this process's runs from the events ``client``'s workers send (idempotent)."""
    runs = part(Runs)
    with runs.lock:
        if client in runs.subscribed:
            return
        runs.subscribed.add(client)

    def handle(event: Any) -> None:
        _, msg = event
        if isinstance(msg, dict):
            receive(msg)

    client.subscribe_topic(TOPIC, handle)


# -- where a partition reports -----------------------------------------------------------------
class Reporter:
    """A partition's side: counts batched and sent as events through ``send``."""

    __slots__ = ("_base", "_counts", "_drain", "_last", "_send", "interval")

    def __init__(
        self, send: Any, base: dict[str, Any], *, interval: float = 0.5, drain: Any = None
    ) -> None:
        self._send = send
        self._drain = drain  # the job's run record in this process (``Recorder.drain``)
        self._base = base
        self._counts: dict[str, Any] = {}
        self._last = time.monotonic()
        self.interval = interval

    def started(self, rows: int, extra: dict[str, Any]) -> None:
        self._emit({"kind": "start", "rows": rows, **extra})

    def add(self, **counts: Any) -> None:
        c = self._counts
        for key, value in counts.items():
            if key == "cost":
                old = c.get("cost", 0.0)
                c["cost"] = None if value is None or old is None else old + value
            elif value:
                c[key] = c.get(key, 0) + value
        if time.monotonic() - self._last > self.interval:
            self.flush()

    def flush(self) -> None:
        record = self._drain() if self._drain is not None else None
        if self._counts or record:
            counts, self._counts = self._counts, {}
            self._emit({"kind": "counts", "counts": counts, "record": record})
        self._last = time.monotonic()

    def batches(self, ids: list[str]) -> None:
        """The partition's batches in flight are now ``ids`` (sent at once: they change
        when a batch is submitted or read)."""
        self._emit({"kind": "batches", "ids": ids})

    def done(self) -> None:
        self.flush()
        self._emit({"kind": "done"})

    def _emit(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress must never fail a partition
            self._send({**self._base, **msg})
