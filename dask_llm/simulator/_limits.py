"""Sliding-window request and token limits, answered the way OpenAI answers them."""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """At most ``budget`` units in any ``window`` seconds; ``per_minute`` is the stated limit."""

    __slots__ = ("_events", "_used", "budget", "per_minute", "window")

    def __init__(self, per_minute: int, window: float) -> None:
        self.per_minute = per_minute
        self.window = window
        self.budget = max(1.0, per_minute * window / 60.0)
        self._events: deque[tuple[float, float]] = deque()
        self._used = 0.0

    def _trim(self, now: float) -> None:
        events = self._events
        edge = now - self.window
        while events and events[0][0] <= edge:
            self._used -= events.popleft()[1]

    def try_take(self, now: float, amount: float) -> float:
        """Take ``amount`` now and return 0, or return the seconds until it would fit."""
        self._trim(now)
        if self._used + amount <= self.budget or not self._events:
            self._events.append((now, amount))
            self._used += amount
            return 0.0
        # Wait until enough of the oldest events have left the window.
        need = self._used + amount - self.budget
        freed = 0.0
        for t, a in self._events:
            freed += a
            if freed >= need:
                return max(0.001, t + self.window - now)
        return self.window

    def remaining(self, now: float) -> int:
        self._trim(now)
        used_per_minute = self._used * 60.0 / self.window
        return max(0, int(self.per_minute - used_per_minute))

    def reset_after(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self._trim(now)
        if not self._events:
            return 0.0
        return max(0.0, self._events[-1][0] + self.window - now)

    def clear(self) -> None:
        self._events.clear()
        self._used = 0.0


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{rest:.0f}s"
