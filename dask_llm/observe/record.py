"""The run record: what every request of a job did, second by second, in bounded memory.

Two halves, like progress (``observe.progress``):

* **``Recorder``**, one per job per process (owned by the ``Job``). The
  transport tells it when a request goes on the wire and what came back
  (status, headers, body: usage, ``finish_reason``, refusals), the retry
  loop tells it about retries and answers that did not parse, the runner
  about each finished row. It keeps only what happened since the last
  ``drain()`` (a few rows of counters), plus a handful of cumulative
  counters for the quality gate and for Prometheus (``observe.metrics``).
* **``RunRecord``**, one per run in the client. Each partition's progress
  ``counts`` event carries the drained delta of its process (direct call on
  threads, the job hub for dask's process pool, the event log on
  ``distributed``), and the record merges them.

Memory is bounded on both sides. A worker holds at most the seconds since
its last report (half a second). The client keeps one row of counters per
time bucket; buckets start one second wide and double in width (adjacent
pairs merged) whenever there are more than ``MAX_BUCKETS``, so a 10-hour
run keeps 2,048-4,096 buckets of 16 s. Latencies are counted in a fixed
log-spaced histogram per chain (``LATENCY_EDGES_S``: 1 ms to 20 min, 12% wide
buckets): mergeable across processes, constant size, percentiles within a
bucket's width. Sample rows are kept per error kind, the first
``SAMPLES_PER_KIND`` of each.

What is counted, and when (unix time of the process that sent the request):

* ``started``: the request got its turn from the throttle and went to the
  HTTP stack (cache hits and identical requests already in flight are not
  requests); ``finished``: its answer (or its failure) came back.
* ``in_flight``: the mean number of requests on the wire in the bucket
  (request-seconds over the bucket's width: exact, and additive across
  processes, unlike a sampled gauge).
* ``rate_limited``: 429s of the quota (``Outcome.quota``: see
  ``limits.headers``); ``other_429``: every other 429 (overloaded, billing,
  header-less while the quota had room, a Flex request's "resource
  unavailable", whose error kind is ``"429 unavailable"``); ``retries``: a chain
  call's attempt after the first; ``errors``: every other non-2xx status and
  requests that got no answer, by kind (``"500"``, ``"503"``, ``"timeout"``,
  ``"connection"``, ``"cancelled"``...).
* tokens and ``cost_usd`` of 2xx answers, in the second they came back, at
  the job's prices (``prices=`` over ``PRICES``) for the tier that served
  them; answers without a price count their tokens and mark the cost unknown.
  Per chain, also: prompt tokens read from the provider's prompt cache
  (``cached_tokens``) and what that saved (``saved_usd``), answers by tier
  (``flex``, ``batch``; the rest at list price) and Flex requests answered
  "resource unavailable" (``unavailable``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from dask_llm.core.runtime import part
from dask_llm.core.usage import PriceEntry, price_of, savings_usd

if TYPE_CHECKING:
    from dask_llm.core.config import QualityGate
    from dask_llm.core.outcome import Outcome
    from dask_llm.core.usage import Usage

#: Time buckets a client keeps per run before merging them two by two.
MAX_BUCKETS: Final = 4096
#: Sample rows kept per kind of error.
SAMPLES_PER_KIND: Final = 3
#: Upper edges of the latency histogram's buckets, in seconds (the last is open).
LATENCY_EDGES_S: Final = tuple(10 ** (k / 20) / 1000 for k in range(128))

#: Fields of a time bucket, in order.
FIELDS: Final = (
    "started",
    "finished",
    "in_flight",
    "rate_limited",
    "other_429",
    "retries",
    "errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)
_STARTED, _FINISHED, _IN_FLIGHT, _LIMITED, _OTHER_429, _RETRIES, _ERRORS, _IN, _OUT, _COST = range(
    len(FIELDS)
)
_WIDTH = len(FIELDS)


#: (recorder, chain) of the chain call running in this context: the transport and the
#: retry loop find them here.
ACTIVE: contextvars.ContextVar[tuple[Recorder, str] | None] = contextvars.ContextVar(
    "dask_llm_record", default=None
)


def latency_bucket(seconds: float) -> int:
    return bisect.bisect_left(LATENCY_EDGES_S, seconds)


def error_kind(status: int | None, quota: bool, exc: BaseException | None = None) -> str:
    """The kind of a failed request, as the record and the metrics label it.

    Without a status: ``"cancelled"`` (the job stopped with it on the wire),
    ``"timeout"`` or ``"connection"``, from the exception ``exc`` under way.
    """
    if status is None:
        if isinstance(exc, asyncio.CancelledError):
            return "cancelled"
        if exc is not None and "timeout" in type(exc).__name__.lower():
            return "timeout"
        return "connection"
    if status == 429:
        return "429 rate limit" if quota else "429 other"
    return str(status)


def row_error_kind(message: str) -> str:
    """``"RateLimitError"``, ``"OutputParserException"``, ``"not sent"``... of a row's error."""
    _, _, rest = message.partition(": ")
    rest = rest or message
    if rest.startswith("not sent"):
        return "not sent"
    return re.split(r"[ :(]", rest, maxsplit=1)[0] or "error"


class ChainCounts:
    """Per chain: requests, answers, what was wrong with them, tokens, cost, latencies."""

    __slots__ = (
        "batch",
        "batch_cost_usd",
        "cached_tokens",
        "calls",
        "cost_usd",
        "flex",
        "flex_cost_usd",
        "input_tokens",
        "latency",
        "ok",
        "output_tokens",
        "parse_failures",
        "refused",
        "saved_usd",
        "truncated",
        "unavailable",
        "unpriced",
    )

    def __init__(self) -> None:
        self.calls = 0  # requests sent
        self.ok = 0  # 2xx answers
        self.flex = 0  # 2xx answers served by Flex processing
        self.batch = 0  # 2xx answers served by the Batch API
        self.flex_cost_usd = 0.0  # what the Flex answers cost (of ``cost_usd``)
        self.batch_cost_usd = 0.0  # what the Batch API's answers cost (of ``cost_usd``)
        self.unavailable = 0  # Flex requests answered 429 "resource unavailable"
        self.cached_tokens = 0  # prompt tokens read from the provider's prompt cache
        self.saved_usd = 0.0  # what the prompt cache saved
        self.truncated = 0  # finish_reason "length"
        self.refused = 0  # a non-null "refusal"
        self.parse_failures = 0  # attempts whose answer did not fit the output schema
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.unpriced = 0  # 2xx answers whose cost is unknown
        self.latency: dict[int, int] = {}  # histogram bucket -> requests

    def to_wire(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "latency"}
        data["latency"] = [[b, n] for b, n in self.latency.items()]
        return data

    def merge(self, data: Mapping[str, Any]) -> None:
        for name in self.__slots__:
            if name == "latency":
                for b, n in data.get("latency", ()):
                    self.latency[int(b)] = self.latency.get(int(b), 0) + int(n)
            else:
                setattr(self, name, getattr(self, name) + data.get(name, 0))

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile latency (0-100) in seconds: the bucket's geometric middle."""
        total = sum(self.latency.values())
        if not total:
            return None
        rank = q / 100 * total
        seen = 0
        for b in sorted(self.latency):
            seen += self.latency[b]
            if seen >= rank:
                upper = LATENCY_EDGES_S[min(b, len(LATENCY_EDGES_S) - 1)]
                lower = LATENCY_EDGES_S[b - 1] if 0 < b <= len(LATENCY_EDGES_S) else upper / 1.12
                return math.sqrt(lower * upper)
        return None  # pragma: no cover


class RowCounts:
    """Rows finished, failed, and the moments of their cost, calls and tokens (for projections)."""

    __slots__ = (
        "cached",
        "calls",
        "calls_sq",
        "cost",
        "cost_sq",
        "failed",
        "input_tokens",
        "n",
        "output_tokens",
        "priced",
        "tokens_sq",
        "unsent",
    )

    def __init__(self) -> None:
        self.n = 0
        self.failed = 0
        self.cached = 0  # rows answered without a request (the moments leave them out)
        # Rows that failed without a request (a stop: budget, fatal, gate): what a row
        # costs is not seen in them, so the moments leave them out too.
        self.unsent = 0
        self.priced = 0  # rows whose cost is known (the cost moments are over these)
        self.cost = 0.0
        self.cost_sq = 0.0
        self.calls = 0
        self.calls_sq = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.tokens_sq = 0

    def add(self, failed: bool, usage: Usage) -> None:
        self.n += 1
        self.failed += int(failed)
        if usage.calls == 0:
            if failed:
                self.unsent += 1
            else:
                self.cached += 1
            return
        cost = usage.cost_usd
        if cost is not None:
            self.priced += 1
            self.cost += cost
            self.cost_sq += cost * cost
        self.calls += usage.calls
        self.calls_sq += usage.calls * usage.calls
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        tokens = usage.input_tokens + usage.output_tokens
        self.tokens_sq += tokens * tokens

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def merge(self, data: Mapping[str, Any]) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + data.get(name, 0))


class ProcessTotals:
    """Counters of every job that ran in this process (for Prometheus): a part of the
    process's ``core.runtime``, fixed in size, kept for the runtime's life."""

    __slots__ = (
        "errors",
        "in_flight",
        "input_tokens",
        "lock",
        "output_tokens",
        "rate_limited",
        "requests",
        "responses",
        "retries",
        "rows",
        "rows_failed",
        "spend_usd",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.responses = 0
        self.in_flight = 0
        self.rate_limited = 0  # every 429
        self.retries = 0
        self.errors: dict[str, int] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.spend_usd = 0.0
        self.rows = 0
        self.rows_failed = 0


def process_totals() -> ProcessTotals:
    """What the jobs of this process did (read by ``observe.metrics``)."""
    return part(ProcessTotals)


class Recorder:
    """One job's record in one process: the delta since the last ``drain``, and a few totals."""

    def __init__(
        self,
        *,
        prices: Mapping[str, PriceEntry],
        rpm: float | None = None,
        gate: QualityGate | None = None,
        on_gate: Callable[[str], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._prices = prices
        self._rpm = rpm
        self._gate = gate
        self._on_gate = on_gate
        self._limit_rpm: float | None = None
        self._stop: tuple[str, str] | None = None
        self._reset()
        # cumulative, in this process, for the quality gate
        self.rows = RowCounts()
        self.chains: dict[str, ChainCounts] = {}

    def _reset(self) -> None:
        self._buckets: dict[int, list[float]] = {}
        self._errors: dict[tuple[int, str], int] = {}
        self._chains: dict[str, ChainCounts] = {}
        self._rows = RowCounts()
        self._samples: list[list[str]] = []
        self._sampled: dict[str, int] = {}
        self._row_errors: dict[str, int] = {}

    def _bucket(self, t: float) -> list[float]:
        second = int(t)
        row = self._buckets.get(second)
        if row is None:
            row = self._buckets[second] = [0.0] * _WIDTH
        return row

    def _chain(self, chain: str) -> tuple[ChainCounts, ChainCounts]:
        delta = self._chains.get(chain)
        if delta is None:
            delta = self._chains[chain] = ChainCounts()
        total = self.chains.get(chain)
        if total is None:
            total = self.chains[chain] = ChainCounts()
        return delta, total

    # -- requests (the transport) --------------------------------------------------------
    def request_started(self) -> float:
        """A request goes on the wire now; returns its start time for ``request_finished``."""
        now = time.time()
        with self._lock:
            self._bucket(now)[_STARTED] += 1
        with (totals := process_totals()).lock:
            totals.requests += 1
            totals.in_flight += 1
        return now

    def request_finished(self, started: float, outcome: Outcome) -> None:
        """The request started at ``started`` ended with ``outcome`` (read once by the
        transport; its ``status`` is None when no answer came)."""
        now = time.time()
        active = ACTIVE.get()
        chain = active[1] if active is not None else "?"
        ok = outcome.ok
        status = outcome.status
        prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
        cached = outcome.cached_tokens or 0
        written = outcome.cache_write_tokens or 0
        cost = outcome.cost(self._prices) if ok else None
        saved = 0.0
        if ok and (cached or written):
            price = price_of(outcome.model, self._prices, tier=outcome.tier)
            saved = savings_usd(price, cached, written) if price is not None else 0.0
        truncated, refused = outcome.truncated, outcome.refused
        # Called from the transport's ``finally``: the exception under way, if any.
        if ok:
            kind = None
        elif outcome.unavailable:
            kind = "429 unavailable"
        else:
            kind = error_kind(status, outcome.quota, sys.exc_info()[1])
        # The provider's requests limit as its headers said it (read once, in the outcome).
        limit = outcome.announced.rpm
        with self._lock:
            if limit is not None:
                self._limit_rpm = limit
            row = self._bucket(now)
            row[_FINISHED] += 1
            _spread(self, started, now)
            if kind == "429 rate limit":
                row[_LIMITED] += 1
            elif kind in ("429 other", "429 unavailable"):
                row[_OTHER_429] += 1
            elif kind is not None:
                row[_ERRORS] += 1
            if kind is not None:
                key = (int(now), kind)
                self._errors[key] = self._errors.get(key, 0) + 1
            for counts in self._chain(chain):
                counts.calls += 1
                bucket = latency_bucket(now - started)
                counts.latency[bucket] = counts.latency.get(bucket, 0) + 1
                counts.unavailable += outcome.unavailable
                if ok:
                    counts.ok += 1
                    counts.flex += outcome.tier == "flex"
                    counts.batch += outcome.tier == "batch"
                    counts.cached_tokens += cached
                    counts.saved_usd += saved
                    counts.truncated += int(truncated)
                    counts.refused += int(refused)
                    counts.input_tokens += prompt or 0
                    counts.output_tokens += completion or 0
                    if cost is None:
                        counts.unpriced += 1
                    else:
                        counts.cost_usd += cost
                        if outcome.tier == "flex":
                            counts.flex_cost_usd += cost
                        elif outcome.tier == "batch":
                            counts.batch_cost_usd += cost
            if ok:
                row[_IN] += prompt or 0
                row[_OUT] += completion or 0
                row[_COST] += cost or 0.0
        with (totals := process_totals()).lock:
            totals.in_flight -= 1
            totals.responses += 1
            if status == 429:
                totals.rate_limited += 1
            if kind is not None:
                totals.errors[kind] = totals.errors.get(kind, 0) + 1
            if ok:
                totals.input_tokens += prompt or 0
                totals.output_tokens += completion or 0
                totals.spend_usd += cost or 0.0

    # -- chain calls (the retry loop) ------------------------------------------------------
    def retried(self) -> None:
        with self._lock:
            self._bucket(time.time())[_RETRIES] += 1
        with (totals := process_totals()).lock:
            totals.retries += 1

    def parse_failed(self, chain: str) -> None:
        with self._lock:
            for counts in self._chain(chain):
                counts.parse_failures += 1

    # -- rows (the runner) -----------------------------------------------------------------
    def row_done(self, label: Any, error: str | None, usage: Usage) -> None:
        """A row is finished (``error``: its ``llm_error``); may trip the quality gate."""
        with self._lock:
            self._rows.add(error is not None, usage)
            self.rows.add(error is not None, usage)
            if error is not None:
                kind = row_error_kind(error)
                self._row_errors[kind] = self._row_errors.get(kind, 0) + 1
                if self._sampled.get(kind, 0) < SAMPLES_PER_KIND:
                    self._sampled[kind] = self._sampled.get(kind, 0) + 1
                    self._samples.append([kind, _label(label), error[:500]])
            breach = None
            if self._gate is not None and self._stop is None:
                breach = self._gate.breach(self.rows, self.chains.values())
        with (totals := process_totals()).lock:
            totals.rows += 1
            totals.rows_failed += int(error is not None)
        if breach is not None and self._on_gate is not None:
            self._on_gate(breach)

    def stopped(self, kind: str, text: str) -> None:
        """The job stopped here (fatal, budget, quality): the record says why."""
        with self._lock:
            if self._stop is None:
                self._stop = (kind, text)

    # -- the way out -----------------------------------------------------------------------
    def drain(self) -> dict[str, Any] | None:
        """What happened since the last drain, as plain data for an event (None: nothing)."""
        with self._lock:
            if not (self._buckets or self._chains or self._rows.n or self._stop):
                return None
            delta: dict[str, Any] = {
                "seconds": [[t, *row] for t, row in self._buckets.items()],
                "errors": [[t, kind, n] for (t, kind), n in self._errors.items()],
                "chains": {name: c.to_wire() for name, c in self._chains.items()},
                "rows": self._rows.to_wire(),
                "samples": self._samples,
                "row_errors": self._row_errors,
                "rpm": self._rpm,
                "limit_rpm": self._limit_rpm,
                "stop": list(self._stop) if self._stop else None,
            }
            sampled = self._sampled
            self._reset()
            self._sampled = sampled  # the first few of each kind, over the whole job
            return delta


def _spread(recorder: Recorder, started: float, ended: float) -> None:
    """Add a request's time on the wire to the buckets it spans (request-seconds)."""
    t = started
    while t < ended:
        edge = min(ended, math.floor(t) + 1.0)
        recorder._bucket(t)[_IN_FLIGHT] += edge - t
        t = edge


def _label(value: Any) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)
    return text[:80]


class RunRecord:
    """A run as the client saw it: every process's deltas merged (see the module docstring)."""

    def __init__(self, *, budget_usd: float | None = None) -> None:
        self._lock = threading.Lock()
        self.width = 1  # seconds per bucket
        self.buckets: dict[int, list[float]] = {}
        self.errors: dict[int, dict[str, int]] = {}
        self.chains: dict[str, ChainCounts] = {}
        self.rows = RowCounts()
        self.row_errors: dict[str, int] = {}
        self.samples: dict[str, list[tuple[str, str]]] = {}
        self.rpm: float | None = None
        self.limit_rpm: float | None = None
        self.budget_usd = budget_usd
        self.stop: tuple[str, str] | None = None
        self.first: float | None = None

    def merge(self, delta: Mapping[str, Any]) -> None:
        with self._lock:
            for t, *values in delta.get("seconds", ()):
                row = self._row(int(t))
                for k, v in enumerate(values):
                    row[k] += v
            for t, kind, n in delta.get("errors", ()):
                key = int(t) // self.width * self.width
                counts = self.errors.setdefault(key, {})
                counts[kind] = counts.get(kind, 0) + int(n)
            for name, data in (delta.get("chains") or {}).items():
                self.chains.setdefault(name, ChainCounts()).merge(data)
            self.rows.merge(delta.get("rows") or {})
            for kind, n in (delta.get("row_errors") or {}).items():
                self.row_errors[kind] = self.row_errors.get(kind, 0) + int(n)
            for kind, row, message in delta.get("samples", ()):
                kept = self.samples.setdefault(kind, [])
                if len(kept) < SAMPLES_PER_KIND:
                    kept.append((row, message))
            self.rpm = delta.get("rpm") or self.rpm
            self.limit_rpm = delta.get("limit_rpm") or self.limit_rpm
            if delta.get("stop") and self.stop is None:
                kind, text = delta["stop"]
                self.stop = (str(kind), str(text))
            self._compact()

    def _row(self, t: int) -> list[float]:
        if self.first is None or t < self.first:
            self.first = float(t)
        key = t // self.width * self.width
        row = self.buckets.get(key)
        if row is None:
            row = self.buckets[key] = [0.0] * _WIDTH
        return row

    def _compact(self) -> None:
        while len(self.buckets) > MAX_BUCKETS:
            self.width *= 2
            merged: dict[int, list[float]] = {}
            for t, row in self.buckets.items():
                key = t // self.width * self.width
                into = merged.get(key)
                if into is None:
                    merged[key] = row
                else:
                    for k in range(_WIDTH):
                        into[k] += row[k]
            self.buckets = merged
            errors: dict[int, dict[str, int]] = {}
            for t, counts in self.errors.items():
                into_e = errors.setdefault(t // self.width * self.width, {})
                for kind, n in counts.items():
                    into_e[kind] = into_e.get(kind, 0) + n
            self.errors = errors

    # -- reading -----------------------------------------------------------------------------
    @property
    def limit_per_s(self) -> float | None:
        """The request limit in requests a second: ``rpm=`` if given, else the provider's."""
        rpm = self.rpm or self.limit_rpm
        return rpm / 60 if rpm else None

    def series(self) -> dict[str, list[float]]:
        """Dense columns over the run: ``t`` (seconds since the first bucket), then ``FIELDS``
        (counts per bucket; ``in_flight`` the mean over it), and ``width`` seconds a bucket."""
        with self._lock:
            if not self.buckets:
                return {"t": [], **{f: [] for f in FIELDS}}
            start, end = min(self.buckets), max(self.buckets)
            out: dict[str, list[float]] = {"t": [], **{f: [] for f in FIELDS}}
            for t in range(start, end + 1, self.width):
                row = self.buckets.get(t) or [0.0] * _WIDTH
                out["t"].append(float(t - start))
                for k, name in enumerate(FIELDS):
                    value = row[k] / self.width if k == _IN_FLIGHT else row[k]
                    out[name].append(value)
            return out

    def error_series(self) -> dict[str, list[int]]:
        """Failed requests per bucket, by kind, aligned with ``series()["t"]``."""
        with self._lock:
            if not self.buckets:
                return {}
            start, end = min(self.buckets), max(self.buckets)
            kinds = sorted({k for counts in self.errors.values() for k in counts})
            return {
                kind: [
                    self.errors.get(t, {}).get(kind, 0) for t in range(start, end + 1, self.width)
                ]
                for kind in kinds
            }

    def totals(self) -> dict[str, float]:
        """Each of ``FIELDS`` over the whole run (``in_flight``: request-seconds)."""
        with self._lock:
            sums = [0.0] * _WIDTH
            for row in self.buckets.values():
                for k in range(_WIDTH):
                    sums[k] += row[k]
            return dict(zip(FIELDS, sums, strict=True))

    def as_dict(self) -> dict[str, Any]:
        """Everything in the record, as plain data (JSON-serializable)."""
        return {
            "width_s": self.width,
            "series": self.series(),
            "errors": self.error_series(),
            "chains": {
                name: {
                    **c.to_wire(),
                    "p50_s": c.percentile(50),
                    "p90_s": c.percentile(90),
                    "p99_s": c.percentile(99),
                }
                for name, c in self.chains.items()
            },
            "rows": self.rows.to_wire(),
            "row_errors": dict(self.row_errors),
            "samples": {k: [list(s) for s in v] for k, v in self.samples.items()},
            "limit_per_s": self.limit_per_s,
            "budget_usd": self.budget_usd,
            "stop": list(self.stop) if self.stop else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())
