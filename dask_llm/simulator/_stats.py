"""What the simulator saw: counts, peaks over exact sliding windows, tokens, money paid twice."""

from __future__ import annotations

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
)


class Stats:
    """Counters of one simulator. Mutated on its event loop only; read from anywhere."""

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
        self.duplicate_requests = 0
        self.models: dict[str, int] = {}
        self._last_1s: deque[float] = deque()
        self._last_60s: deque[float] = deque()
        self._answered: set[bytes] = set()

    def started(self, now: float) -> None:
        """A request arrived. Peaks are exact: the busiest window ends at some arrival."""
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        for window, span, attr in (
            (self._last_1s, 1.0, "peak_requests_1s"),
            (self._last_60s, 60.0, "peak_requests_60s"),
        ):
            window.append(now)
            edge = now - span
            while window[0] <= edge:
                window.popleft()
            if len(window) > getattr(self, attr):
                setattr(self, attr, len(window))

    def finished(self) -> None:
        self.in_flight -= 1

    def answered(
        self, digest: bytes, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.successes += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.models[model] = self.models.get(model, 0) + 1
        if digest in self._answered:
            self.duplicate_requests += 1
        else:
            self._answered.add(digest)

    def snapshot(self) -> dict[str, Any]:
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
            "duplicate_requests": self.duplicate_requests,
            "models": dict(self.models),
        }
