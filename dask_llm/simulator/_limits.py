"""Request and token limits in three modes, answered the way OpenAI answers them.

Every limiter has a stated per-minute limit (what the ``x-ratelimit-limit-*``
headers say) and a ``budget``: what may pass per ``window`` seconds,
``per_minute * window / 60``. The modes differ in how a window is drawn:

* ``SlidingWindow``: at most ``budget`` units in ANY window of ``window``
  seconds, windows half-open ``(t - window, t]``, times measured on arrival.
  Strict in any order: an arrival stamped before the last one counted (its
  bytes came in first, its handler ran later: a new connection is read a
  turn of the loop after it is accepted) is counted at its own time, and
  passes only if every window that holds it has room. (Taken as the last
  time seen, as until 2026-12-07, such arrivals were moved up to 0.15 s
  late, and counted in a second they were not sent in.)
* ``FixedWindow``: slices ``[origin + k * window, origin + (k + 1) * window)``
  since the server started, each with its own budget. A client can pass twice
  the budget across a boundary, as some providers allow. A late arrival from
  the previous slice is charged to the current one (conservative).
* ``TokenBucket``: capacity ``budget``, refilled continuously at
  ``per_minute / 60`` per second, full at start (like OpenAI's organisation
  limits: a burst of the capacity, then the steady rate).

A budget below 1 request would refuse everything: sliding and fixed windows
then widen to ``60 / per_minute`` seconds (budget 1, the stated rate still
holds); the bucket's capacity is at least 1. A request costing more than the
budget can never pass (``try_take`` returns ``math.inf``): OpenAI answers such
a request with "Request too large", and so does the simulator, instead of
letting one request exceed the budget of a window.

``remaining`` is in per-minute units, ``per_minute * (1 - used / budget)``;
``reset_after`` is the time until the limiter is back to its initial state.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Protocol

_EPS = 1e-9
#: How late (seconds) an arrival may be counted and still be placed among the others.
LATE_S = 5.0


class Limiter(Protocol):
    per_minute: int
    budget: float
    window: float

    def try_take(self, now: float, amount: float) -> float:
        """Take ``amount`` and return 0, or return the seconds until it would fit."""
        ...

    def remaining(self, now: float) -> int: ...

    def reset_after(self, now: float) -> float: ...

    def clear(self) -> None: ...


def _widened(per_minute: int, window: float) -> float:
    return max(window, 60.0 / per_minute)


class SlidingWindow:
    """At most ``budget`` units in any ``window`` seconds; ``per_minute`` is the stated limit."""

    __slots__ = ("_edge", "_events", "_gone", "_used", "budget", "per_minute", "window")

    def __init__(self, per_minute: int, window: float) -> None:
        self.per_minute = per_minute
        self.window = _widened(per_minute, window)
        self.budget = per_minute * self.window / 60.0
        self._events: deque[tuple[float, float]] = deque()  # in the window: after ``_edge``
        self._gone: deque[tuple[float, float]] = deque()  # left it, kept for late arrivals
        self._edge = -math.inf
        self._used = 0.0

    def _trim(self, now: float) -> None:
        events = self._events
        edge = now - self.window
        if edge <= self._edge:
            return
        self._edge = edge
        gone = self._gone
        while events and events[0][0] <= edge:
            event = events.popleft()
            self._used -= event[1]
            gone.append(event)
        if not events:
            self._used = 0.0  # no drift from float sums
        while gone and gone[0][0] <= edge - LATE_S:
            gone.popleft()

    def try_take(self, now: float, amount: float) -> float:
        if amount > self.budget + _EPS:
            return math.inf
        events = self._events
        if events and now < events[-1][0]:
            return self._take_late(now, amount)
        self._trim(now)
        if self._used + amount <= self.budget + _EPS:
            events.append((now, amount))
            self._used += amount
            return 0.0
        return self._wait(now, amount)

    def _wait(self, now: float, amount: float) -> float:
        """Seconds until enough of the oldest events have left the window."""
        need = self._used + amount - self.budget - _EPS
        freed = 0.0
        for t, a in self._events:
            freed += a
            if freed >= need:
                return max(0.001, t + self.window - now)
        return self.window

    def _take_late(self, now: float, amount: float) -> float:
        """``try_take`` for an arrival stamped before the last one counted.

        It belongs to every window ``(x - window, x]`` with ``now <= x < now +
        window``; the fullest of them ends at ``now`` or at a later event, all
        of them (an arrival is late by a turn of the server's loop, rarely more
        than a second) at or before the last event. Counted from the newest
        events and the newest of those gone, not the whole window.
        """
        events, gone, window = self._events, self._gone, self.window
        later = _newer(events, now)
        fullest = 0.0
        for x in [now, *(t for t, _ in reversed(later) if t < now + window)]:
            # The window's events: those after the edge, less the newer than x and the
            # older than x - window, plus those gone that are newer than x - window.
            held = self._used - sum(a for t, a in later if t > x)
            held -= sum(a for t, a in _older(events, x - window))
            held += sum(a for t, a in _newer(gone, x - window))
            fullest = max(fullest, held)
        if fullest + amount > self.budget + _EPS:
            return self._wait(events[-1][0], amount)
        if now > self._edge:
            events.insert(len(events) - len(later), (now, amount))
            self._used += amount
        else:
            gone.insert(len(gone) - len(_newer(gone, now)), (now, amount))
        return 0.0

    def remaining(self, now: float) -> int:
        self._trim(now)
        return max(0, int(self.per_minute * (1.0 - self._used / self.budget) + _EPS))

    def reset_after(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self._trim(now)
        if not self._events:
            return 0.0
        return max(0.0, self._events[-1][0] + self.window - now)

    def clear(self) -> None:
        self._events.clear()
        self._gone.clear()
        self._edge = -math.inf
        self._used = 0.0


def _newer(events: deque[tuple[float, float]], than: float) -> list[tuple[float, float]]:
    """The events after ``than`` (newest first), read from the newest end."""
    return list(itertools.takewhile(lambda e: e[0] > than, reversed(events)))


def _older(events: deque[tuple[float, float]], than: float) -> list[tuple[float, float]]:
    """The events at or before ``than`` (oldest first), read from the oldest end."""
    return list(itertools.takewhile(lambda e: e[0] <= than, events))


class FixedWindow:
    """At most ``budget`` units per slice of ``window`` seconds, slices aligned to ``origin``."""

    __slots__ = ("_origin", "_slice", "_used", "budget", "per_minute", "window")

    def __init__(self, per_minute: int, window: float, origin: float) -> None:
        self.per_minute = per_minute
        self.window = _widened(per_minute, window)
        self.budget = per_minute * self.window / 60.0
        self._origin = origin
        self._slice = -1
        self._used = 0.0

    def _roll(self, now: float) -> int:
        k = int((now - self._origin) // self.window)
        if k > self._slice:
            self._slice = k
            self._used = 0.0
        return self._slice

    def try_take(self, now: float, amount: float) -> float:
        if amount > self.budget + _EPS:
            return math.inf
        k = self._roll(now)
        if self._used + amount <= self.budget + _EPS:
            self._used += amount
            return 0.0
        return max(0.001, self._origin + (k + 1) * self.window - now)

    def remaining(self, now: float) -> int:
        self._roll(now)
        return max(0, int(self.per_minute * (1.0 - self._used / self.budget) + _EPS))

    def reset_after(self, now: float) -> float:
        k = self._roll(now)
        if self._used <= 0:
            return 0.0
        return max(0.0, self._origin + (k + 1) * self.window - now)

    def clear(self) -> None:
        self._slice = -1
        self._used = 0.0


class TokenBucket:
    """Capacity ``budget``, refilled at ``per_minute / 60`` units a second."""

    __slots__ = ("_at", "_level", "budget", "per_minute", "rate", "window")

    def __init__(self, per_minute: int, window: float) -> None:
        self.per_minute = per_minute
        self.window = window
        self.rate = per_minute / 60.0
        self.budget = max(1.0, per_minute * window / 60.0)
        self._level = self.budget
        self._at = -math.inf

    def _refill(self, now: float) -> None:
        if now > self._at:
            if self._at > -math.inf:
                self._level = min(self.budget, self._level + (now - self._at) * self.rate)
            self._at = now

    def try_take(self, now: float, amount: float) -> float:
        if amount > self.budget + _EPS:
            return math.inf
        self._refill(now)
        if self._level + _EPS >= amount:
            self._level -= amount
            return 0.0
        return max(0.001, (amount - self._level) / self.rate)

    def give(self, now: float, amount: float) -> None:
        """Put back ``amount`` taken earlier and not used (never above the capacity)."""
        self._refill(now)
        self._level = min(self.budget, self._level + amount)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, int(self.per_minute * self._level / self.budget + _EPS))

    def reset_after(self, now: float) -> float:
        self._refill(now)
        return max(0.0, (self.budget - self._level) / self.rate)

    def clear(self) -> None:
        self._level = self.budget
        self._at = -math.inf


def make_limiter(mode: str, per_minute: int, window: float, origin: float) -> Limiter:
    if mode == "fixed":
        return FixedWindow(per_minute, window, origin)
    if mode == "bucket":
        return TokenBucket(per_minute, window)
    return SlidingWindow(per_minute, window)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{rest:.0f}s"
