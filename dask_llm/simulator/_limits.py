"""Request and token limits in three modes, answered the way OpenAI answers them.

Every limiter has a stated per-minute limit (what the ``x-ratelimit-limit-*``
headers say) and a ``budget``: what may pass per ``window`` seconds,
``per_minute * window / 60``. The modes differ in how a window is drawn:

* ``SlidingWindow``: at most ``budget`` units in ANY window of ``window``
  seconds, windows half-open ``(t - window, t]``, times measured on arrival.
  Strict as long as arrivals reach it in time order (the app stamps a request
  when its body has been read and checks it before awaiting anything); an
  earlier time than the last one seen is taken as the last one.
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

import math
from collections import deque
from typing import Protocol

_EPS = 1e-9


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

    __slots__ = ("_events", "_used", "budget", "per_minute", "window")

    def __init__(self, per_minute: int, window: float) -> None:
        self.per_minute = per_minute
        self.window = _widened(per_minute, window)
        self.budget = per_minute * self.window / 60.0
        self._events: deque[tuple[float, float]] = deque()
        self._used = 0.0

    def _trim(self, now: float) -> None:
        events = self._events
        edge = now - self.window
        while events and events[0][0] <= edge:
            self._used -= events.popleft()[1]
        if not events:
            self._used = 0.0  # no drift from float sums

    def try_take(self, now: float, amount: float) -> float:
        if amount > self.budget + _EPS:
            return math.inf
        events = self._events
        if events and now < events[-1][0]:
            now = events[-1][0]
        self._trim(now)
        if self._used + amount <= self.budget + _EPS:
            events.append((now, amount))
            self._used += amount
            return 0.0
        # Wait until enough of the oldest events have left the window.
        need = self._used + amount - self.budget - _EPS
        freed = 0.0
        for t, a in self._events:
            freed += a
            if freed >= need:
                return max(0.001, t + self.window - now)
        return self.window

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
        self._used = 0.0


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
