"""The simulator's settings: latency, limits, faults and the Batch API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

LIMIT_MODES = ("sliding", "fixed", "bucket")
#: What a spurious 429 looks like (``spurious_429_shape``).
SPURIOUS_SHAPES = ("overloaded", "rate_limit")


def _option(default: Any, text: str) -> Any:
    """A setting with its default and its one-line help (``dask-llm simulate --help``)."""
    return field(default=default, metadata={"help": text})


def _choice(default: str, text: str, choices: tuple[str, ...]) -> Any:
    """A setting that takes one of ``choices`` (the command line offers exactly those)."""
    return field(default=default, metadata={"help": text, "choices": choices})


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
    headers. ``limit_per_key``: each API key (its ``Authorization`` header)
    gets rpm/tpm limiters of its own, as providers that limit per key do;
    otherwise every key shares one, as OpenAI's organization limits.

    Faults, each drawn per request from a generator seeded with ``seed``:
    ``error_rate`` (HTTP 500), ``error_503``, ``hang`` (never answers),
    ``malformed_json`` (a 200 whose body does not parse), ``connection_reset``,
    ``schema_violation`` (structured output missing a required field),
    ``forbidden`` (403), ``spurious_429`` (a 429 that is not the quota's: no
    ``x-ratelimit-*`` headers, ``retry-after`` of ``spurious_retry_after``;
    ``spurious_429_shape`` says which: ``"overloaded"``, OpenAI's
    ``server_overloaded``, or ``"rate_limit"``, ``{"error": {"type":
    "rate_limit_error", "code": "rate_limit_exceeded", "message": "Rate limit
    exceeded."}}`` with ``retry-after`` alone, as third-party mocks and some of
    OpenAI's own answers send while the quota has room), ``overloaded``
    (a 529 ``overloaded_error``, as Anthropic sends, with the same
    ``retry-after``, on either API; it consumes no quota either).
    ``insufficient_quota`` (every request) and ``quota_after`` (requests
    arriving once that many answers were sent) get OpenAI's billing 429.
    ``context_tokens``: prompts above it get 400 ``context_length_exceeded``.
    ``api_key``: when set, any other key gets 401. ``models``: when set, other
    models get 404 ``model_not_found``.

    Anthropic's Messages API (``/v1/messages``, see ``_anthropic``) has the same
    answers, ``rpm`` and ``tpm`` (input tokens) and ``output_tpm`` as token
    buckets, and ``overloaded`` (529 ``overloaded_error``).

    Flex processing (requests with ``service_tier="flex"``, echoed in the
    answer): ``flex_slowdown`` multiplies their latency; ``flex_unavailable``
    answers that share of them, on arrival, with OpenAI's 429 "resource
    unavailable" (not the quota's: no quota is used, ``x-ratelimit-*`` headers
    as on any answer). Other requests are answered by the default tier.

    Prompt caching, automatic as OpenAI's: a prompt of 1,024 tokens or more
    whose prefix (tools, response format, then messages) was seen within
    ``prompt_cache_ttl`` seconds reports the longest such prefix, in steps of
    128 tokens, as ``usage.prompt_tokens_details.cached_tokens`` (see
    ``_prompt_cache``); 0 switches it off.

    The Batch API: a batch validates for ``batch_validation_delay``, then its
    lines complete evenly over ``batch_delay``, then it finalizes for
    ``batch_finalize_delay``; a cancelled one is ``cancelling`` for
    ``batch_cancel_delay``. ``batch_expire_after`` (None: never) expires a batch
    that is still in progress that long (only the first ``batch_expire_count``
    batches created, when that is set). ``batch_line_failure_rate``: lines
    answered with a 500 in the error file. ``batch_max_lines`` and
    ``batch_max_bytes`` are OpenAI's limits on an input file.
    """

    latency: float = _option(0.0, "Median seconds to first token.")
    jitter: float = _option(0.0, "Lognormal sigma of the latency.")
    per_token_latency: float = _option(0.0, "Seconds per output token.")
    rpm: int | None = _option(None, "Requests per minute (429 beyond).")
    tpm: int | None = _option(None, "Tokens per minute (429 beyond).")
    limit_window: float = _option(
        1.0, "Seconds over which rpm/tpm are enforced (OpenAI-style slices)."
    )
    limit_mode: str = _option(
        "sliding", "How rpm/tpm windows are drawn: sliding, fixed slices, or a token bucket."
    )
    max_in_flight: int | None = _option(None, "Concurrent requests (429 beyond).")
    limit_per_key: bool = _option(
        False, "Each API key gets rpm/tpm limiters of its own (default: one for all keys)."
    )
    error_rate: float = _option(0.0, "Probability of HTTP 500.")
    error_503: float = _option(0.0, "Probability of HTTP 503.")
    hang: float = _option(0.0, "Probability of never answering.")
    hang_seconds: float = _option(3600.0, "How long a hang lasts.")
    malformed_json: float = _option(0.0, "Probability of a broken body.")
    connection_reset: float = _option(0.0, "Probability of a reset.")
    schema_violation: float = _option(0.0, "Probability that structured output breaks its schema.")
    forbidden: float = _option(0.0, "Probability of HTTP 403.")
    spurious_429: float = _option(
        0.0, "Probability of a 429 that is not the quota's (no x-ratelimit-* headers)."
    )
    spurious_retry_after: float = _option(1.0, "Seconds of retry-after sent with a spurious 429.")
    spurious_429_shape: str = _choice(
        "overloaded",
        "Spurious 429s' shape: overloaded (server_overloaded) or rate_limit (rate_limit_exceeded, "
        "retry-after alone); neither has x-ratelimit-* headers.",
        SPURIOUS_SHAPES,
    )
    insufficient_quota: bool = _option(False, "Answer every request with the billing 429.")
    quota_after: int | None = _option(
        None, "Billing 429 for requests arriving once this many answers were sent."
    )
    context_tokens: int | None = _option(None, "Longest prompt accepted (400 beyond).")
    api_key: str | None = _option(None, "Require this key (401 otherwise).")
    models: tuple[str, ...] | None = _option(None, "Accepted model (repeatable; default any).")
    completion_tokens: int = _option(40, "Length of text answers.")
    seed: int = _option(0, "Seed of answers, latency and faults.")
    flex_slowdown: float = _option(3.0, "Latency multiplier of Flex requests (service_tier=flex).")
    flex_unavailable: float = _option(
        0.0, "Probability that a Flex request gets 429 resource unavailable (not the quota)."
    )
    prompt_cache_ttl: float = _option(
        300.0, "Seconds a prompt prefix stays cached after its last use (0: no prompt caching)."
    )
    batch_create_delay: float = _option(
        0.0, "Seconds the Batch API takes to answer a create call (the batch exists after)."
    )
    batch_validation_delay: float = _option(0.1, "Seconds a batch stays validating.")
    batch_delay: float = _option(
        1.0, "Seconds a batch is in progress (its lines complete evenly over it)."
    )
    batch_finalize_delay: float = _option(0.1, "Seconds a batch finalizes.")
    batch_cancel_delay: float = _option(0.1, "Seconds a cancelled batch stays cancelling.")
    batch_expire_after: float | None = _option(
        None, "Seconds in progress after which a batch expires (default: never)."
    )
    batch_expire_count: int | None = _option(
        None, "Only the first N batches created can expire (default: all)."
    )
    batch_line_failure_rate: float = _option(
        0.0, "Probability that a batch line is answered with a 500 (in the error file)."
    )
    batch_max_lines: int = _option(50_000, "Most requests in a batch file.")
    output_tpm: int | None = _option(
        None, "Output tokens per minute of /v1/messages (Anthropic's OTPM; 429 beyond)."
    )
    overloaded: float = _option(
        0.0, "Probability of a 529 overloaded_error, Anthropic's overload answer (either API)."
    )
    batch_max_bytes: int = _option(200 * 1024 * 1024, "Largest batch input file, in bytes.")

    def __post_init__(self) -> None:
        for name in (
            "latency",
            "jitter",
            "per_token_latency",
            "hang_seconds",
            "spurious_retry_after",
            "batch_create_delay",
            "batch_validation_delay",
            "batch_delay",
            "batch_finalize_delay",
            "batch_cancel_delay",
            "flex_slowdown",
            "prompt_cache_ttl",
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
            "flex_unavailable",
            "batch_line_failure_rate",
            "overloaded",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability: between 0 and 1, not {value}")
        if self.spurious_429_shape not in SPURIOUS_SHAPES:
            raise ValueError(
                f"spurious_429_shape must be one of {', '.join(SPURIOUS_SHAPES)}, "
                f"not {self.spurious_429_shape!r}"
            )
        for name in ("rpm", "tpm", "output_tpm", "max_in_flight", "context_tokens"):
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
