"""The simulator's settings: latency, limits, faults and the Batch API."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

LIMIT_MODES = ("sliding", "fixed", "bucket")


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulated provider behaves. Times in seconds, probabilities in [0, 1].

    Latency: ``latency`` is the median time to first token; each request's is
    ``latency * exp(N(0, jitter))`` (lognormal), drawn from the request's own
    content and ``seed``, so a request takes the same time however often and in
    whatever order it is sent. ``per_token_latency`` is added per output token.

    Limits, like OpenAI's: ``rpm`` requests and ``tpm`` tokens per minute,
    enforced with a budget of ``rpm * limit_window / 60`` per ``limit_window``
    seconds (OpenAI enforces per-minute limits in short slices, so a burst of a
    minute's budget in one second is refused). ``limit_mode`` says how:
    ``"sliding"`` (at most the budget in any ``limit_window`` seconds, on
    arrival), ``"fixed"`` (slices aligned to multiples of ``limit_window`` since
    the server started: twice the budget can pass across a boundary) or
    ``"bucket"`` (a token bucket of capacity ``budget`` refilled at ``rpm / 60``
    a second). A request's token cost is its prompt tokens plus ``max_tokens``
    (or ``completion_tokens`` when it sets none). ``max_in_flight`` caps
    concurrent requests. All excess gets HTTP 429 with ``x-ratelimit-*``
    headers.

    Faults, each drawn per request from a generator seeded with ``seed``:
    ``error_rate`` (HTTP 500), ``error_503``, ``hang`` (never answers),
    ``malformed_json`` (a 200 whose body does not parse), ``connection_reset``,
    ``schema_violation`` (structured output missing a required field),
    ``forbidden`` (403), ``spurious_429`` (a 429 that is not the quota's: no
    ``x-ratelimit-*`` headers, ``retry-after`` of ``spurious_retry_after``).
    ``insufficient_quota`` (every request) and ``quota_after`` (requests
    arriving once that many answers were sent) get OpenAI's billing 429.
    ``context_tokens``: prompts above it get 400 ``context_length_exceeded``.
    ``api_key``: when set, any other key gets 401. ``models``: when set, other
    models get 404 ``model_not_found``.

    The Batch API: a batch validates for ``batch_validation_delay``, then its
    lines complete evenly over ``batch_delay``, then it finalizes for
    ``batch_finalize_delay``; a cancelled one is ``cancelling`` for
    ``batch_cancel_delay``. ``batch_expire_after`` (None: never) expires a batch
    that is still in progress that long (only the first ``batch_expire_count``
    batches created, when that is set). ``batch_line_failure_rate``: lines
    answered with a 500 in the error file. ``batch_max_lines`` and
    ``batch_max_bytes`` are OpenAI's limits on an input file.
    """

    latency: float = 0.0
    jitter: float = 0.0
    per_token_latency: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    limit_window: float = 1.0
    limit_mode: str = "sliding"
    max_in_flight: int | None = None
    error_rate: float = 0.0
    error_503: float = 0.0
    hang: float = 0.0
    hang_seconds: float = 3600.0
    malformed_json: float = 0.0
    connection_reset: float = 0.0
    schema_violation: float = 0.0
    forbidden: float = 0.0
    spurious_429: float = 0.0
    spurious_retry_after: float = 1.0
    insufficient_quota: bool = False
    quota_after: int | None = None
    context_tokens: int | None = None
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    completion_tokens: int = 40
    seed: int = 0
    batch_validation_delay: float = 0.1
    batch_delay: float = 1.0
    batch_finalize_delay: float = 0.1
    batch_cancel_delay: float = 0.1
    batch_expire_after: float | None = None
    batch_expire_count: int | None = None
    batch_line_failure_rate: float = 0.0
    batch_max_lines: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "latency",
            "jitter",
            "per_token_latency",
            "hang_seconds",
            "spurious_retry_after",
            "batch_validation_delay",
            "batch_delay",
            "batch_finalize_delay",
            "batch_cancel_delay",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.limit_window <= 0:
            raise ValueError("limit_window must be > 0")
        if self.limit_mode not in LIMIT_MODES:
            raise ValueError(
                f"limit_mode must be one of {', '.join(LIMIT_MODES)}, not {self.limit_mode!r}"
            )
        for name in (
            "error_rate",
            "error_503",
            "hang",
            "malformed_json",
            "connection_reset",
            "schema_violation",
            "forbidden",
            "spurious_429",
            "batch_line_failure_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability: between 0 and 1, not {value}")
        for name in ("rpm", "tpm", "max_in_flight", "context_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, or None for no limit")
        if self.quota_after is not None and self.quota_after < 0:
            raise ValueError("quota_after must be >= 0, or None for no quota")
        if self.batch_expire_after is not None and self.batch_expire_after < 0:
            raise ValueError("batch_expire_after must be >= 0, or None to never expire")
        if self.batch_expire_count is not None and self.batch_expire_count < 0:
            raise ValueError("batch_expire_count must be >= 0, or None for every batch")
        for name in ("completion_tokens", "batch_max_lines", "batch_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SimulatorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown simulator option(s): {', '.join(unknown)}")
        if kwargs.get("models") is not None:
            kwargs["models"] = tuple(kwargs["models"])
        return cls(**kwargs)
