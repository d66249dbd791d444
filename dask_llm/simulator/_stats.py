"""What the simulator saw: counts, peaks over exact sliding windows, tokens, money paid twice.

The per-second ``series`` lets a client check its own record against the
server's. What is counted when (all on the server's clock, seconds since the
last reset, ``t = floor(now - origin)``):

* ``requests``: in the second the request arrived (its bytes reached the
  server: ``_arrivals``).
* ``rate_limited`` (quota 429s: rpm, tpm, max_in_flight, request too large),
  ``spurious_429`` and ``faults`` (every other non-200: 400, 401, 403, 404,
  billing 429s, 500, 503, hangs, malformed bodies, resets, schema violations):
  in the second the request ARRIVED, like the fault counters, so each is in
  the same row as its request.
* ``successes``, ``prompt_tokens``, ``cached_tokens`` (of the prompt tokens,
  read from the prompt cache), ``completion_tokens``: in the second the
  answer was sent (after the simulated latency).

Flex processing: ``flex_requests`` arrived asking for it, ``flex_answered``
were answered by it (a 200), and ``faults["flex_unavailable"]`` got its 429
"resource unavailable" (in the ``faults`` column of the series, never in
``rate_limited``).

Rows are dense (idle seconds are rows of zeros) up to the second of the
snapshot, and only the last ``SERIES_SECONDS`` are kept. The series counts the
online endpoint only: Batch API lines have their own counters.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from typing import Any

FAULTS = (
    "error_500",
    "error_503",
    "hang",
    "malformed_json",
    "connection_reset",
    "schema_violation",
    "context_length_exceeded",
    "unauthorized",
    "bad_request",
    "model_not_found",
    "forbidden",
    "insufficient_quota",
    "spurious_429",
    "flex_unavailable",
    "overloaded",
)

SERIES_SECONDS = 3600
#: Arrivals are kept this long past the 1 s window, for those that are counted late.
LATE_S = 5.0
SERIES_FIELDS = (
    "requests",
    "successes",
    "rate_limited",
    "spurious_429",
    "faults",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
)
_REQUESTS, _SUCCESSES, _LIMITED, _SPURIOUS, _FAULTS, _PROMPT, _COMPLETION, _CACHED = range(8)


class Series:
    """Per-second rows of counters, dense, the last ``SERIES_SECONDS`` of them."""

    __slots__ = ("_first", "_row", "_rows", "_t", "origin", "origin_unix")

    def __init__(self, origin: float, origin_unix: float) -> None:
        self.origin = origin
        self.origin_unix = origin_unix
        self._rows: deque[list[int]] = deque()
        self._first = 0
        self._t = -1
        self._row: list[int] = []

    def row(self, now: float) -> list[int] | None:
        """The row of the second ``now`` falls in (None: before the origin, or dropped)."""
        elapsed = now - self.origin
        t = int(elapsed)
        if t == self._t and elapsed >= 0:
            return self._row
        if elapsed < 0:
            return None
        if t > self._t:
            self._extend(t)
            return self._row
        k = t - self._first
        return self._rows[k] if k >= 0 else None

    def _extend(self, t: int) -> None:
        rows = self._rows
        if not rows or t - self._t >= SERIES_SECONDS:
            rows.clear()
            self._first = max(0, t - SERIES_SECONDS + 1)
            new = t - self._first + 1
        else:
            new = t - self._t
        width = len(SERIES_FIELDS)
        for _ in range(new):
            if len(rows) == SERIES_SECONDS:
                rows.popleft()
                self._first += 1
            rows.append([0] * width)
        self._t = t
        self._row = rows[-1]

    def snapshot(self, now: float) -> list[dict[str, int]]:
        self.row(now)  # rows up to the current second
        return [
            {"t": self._first + k, **dict(zip(SERIES_FIELDS, row, strict=True))}
            for k, row in enumerate(self._rows)
        ]


class Stats:
    """Counters of one simulator, mutated and read on its event loop."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.successes = 0
        self.rate_limited = 0
        self.faults = dict.fromkeys(FAULTS, 0)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.peak_requests_1s = 0
        self.peak_requests_60s = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.flex_requests = 0
        self.flex_answered = 0
        self.duplicate_requests = 0
        self.models: dict[str, int] = {}
        self._recent: deque[float] = deque()  # arrivals of the last 1 + LATE_S s, in order
        self._last_60s: deque[float] = deque()
        self._answered: set[bytes] = set()
        self.series = Series(time.monotonic(), time.time())

    def started(self, now: float) -> None:
        """A request arrived at ``now``. Peaks are exact: the busiest window ends at some arrival.

        Arrivals may come out of order (stamped when their bytes came in, counted
        when their handler runs): one earlier than the latest is put in its place
        (within ``LATE_S``), and the fullest second that holds it counted. The
        60 s peak counts it at the latest time (a few ms on a minute).
        """
        self.requests += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        recent = self._recent
        if not recent or now >= recent[-1]:
            recent.append(now)
            edge = now - 1.0 - LATE_S
            while recent[0] <= edge:
                recent.popleft()
            busiest = len(recent) - bisect.bisect_right(recent, now - 1.0)
        else:
            at = bisect.bisect_right(recent, now)
            recent.insert(at, now)
            ends = [
                now,
                *itertools.takewhile(
                    lambda t: t < now + 1.0, itertools.islice(recent, at + 1, None)
                ),
            ]
            busiest = max(
                bisect.bisect_right(recent, x) - bisect.bisect_right(recent, x - 1.0) for x in ends
            )
        if busiest > self.peak_requests_1s:
            self.peak_requests_1s = busiest
        window = self._last_60s
        window.append(max(now, window[-1]) if window else now)
        edge = window[-1] - 60.0
        while window[0] <= edge:
            window.popleft()
        if len(window) > self.peak_requests_60s:
            self.peak_requests_60s = len(window)
        row = self.series.row(now)
        if row is not None:
            row[_REQUESTS] += 1

    def finished(self) -> None:
        self.in_flight -= 1

    def fault(self, name: str, arrived: float) -> None:
        """A request that arrived at ``arrived`` got fault ``name`` (one of ``FAULTS``)."""
        self.faults[name] += 1
        row = self.series.row(arrived)
        if row is not None:
            row[_SPURIOUS if name == "spurious_429" else _FAULTS] += 1

    def limited(self, arrived: float) -> None:
        """A request that arrived at ``arrived`` got a quota 429."""
        self.rate_limited += 1
        row = self.series.row(arrived)
        if row is not None:
            row[_LIMITED] += 1

    def answered(
        self,
        digest: bytes,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        *,
        cached_tokens: int = 0,
        flex: bool = False,
    ) -> None:
        """A 200 was sent at ``now`` (``flex``: by Flex processing)."""
        self.successes += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached_tokens
        self.flex_answered += flex
        self.models[model] = self.models.get(model, 0) + 1
        if digest in self._answered:
            self.duplicate_requests += 1
        else:
            self._answered.add(digest)
        row = self.series.row(now)
        if row is not None:
            row[_SUCCESSES] += 1
            row[_PROMPT] += prompt_tokens
            row[_COMPLETION] += completion_tokens
            row[_CACHED] += cached_tokens

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "requests": self.requests,
            "successes": self.successes,
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "peak_requests_1s": self.peak_requests_1s,
            "peak_requests_60s": self.peak_requests_60s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "flex_requests": self.flex_requests,
            "flex_answered": self.flex_answered,
            "duplicate_requests": self.duplicate_requests,
            "models": dict(self.models),
            "series_origin": self.series.origin_unix,
            "series": self.series.snapshot(now),
        }
