"""Which failures to retry, and how long to wait before the next attempt.

One retry layer only: the SDK's own retries are switched off on the clients
dask-llm opens (``max_retries=0``, see ``_transport``), so attempts never
multiply. Retried: 429, 408, 409, 5xx, connection errors, timeouts, bodies
that do not parse, and answers that do not fit their schema (the latter
within a smaller budget of their own, since a model that misreads a schema
tends to do it again). Not retried: every other 4xx (400 including
``context_length_exceeded``, 401, 403, 404, 422) and exceptions raised by
the user's own Python code.

The schedule is stamina's and tenacity's: exponential backoff with full
jitter (``uniform(0, min(wait_max, wait_initial * 2**n))``), within an
attempt budget and a total time budget; a server's ``retry-after-ms`` /
``retry-after`` is a floor under the wait. tenacity drives the loop; this
module only supplies the policy it needs (a wait that reads the response
headers, a predicate that knows the OpenAI error types).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import openai
import pydantic
from langchain_core.exceptions import OutputParserException

_RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How failed calls are retried.

    Args:
        attempts: most attempts per call, the first included.
        timeout: most seconds from a call's first attempt to the start of its last.
        wait_initial: backoff cap before the first retry, in seconds; doubles per retry.
        wait_max: largest backoff cap, in seconds.
        parse_attempts: most attempts for answers that do not fit the output schema.
    """

    attempts: int = 8
    timeout: float = 600.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    parse_attempts: int = 3

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry attempts must be >= 1")
        if self.timeout < 0 or self.wait_initial < 0 or self.wait_max < 0:
            raise ValueError("retry times must be >= 0 seconds")
        if self.parse_attempts < 1:
            raise ValueError("parse_attempts must be >= 1")

    def backoff(self, retry_number: int, rng: Callable[[], float] = random.random) -> float:
        """Full-jitter wait before retry ``retry_number`` (1 for the first retry)."""
        cap = min(self.wait_max, self.wait_initial * 2 ** (retry_number - 1))
        return cap * rng()


def classify(exc: BaseException) -> str | None:
    """``"transient"``, ``"parse"`` (answer did not fit its schema) or ``None`` (do not retry)."""
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code in _RETRY_STATUS or exc.status_code >= 500:
            return "transient"
        return None
    if isinstance(exc, openai.APIConnectionError | openai.APIResponseValidationError):
        return "transient"  # includes APITimeoutError
    if isinstance(exc, TimeoutError | ConnectionError | json.JSONDecodeError):
        return "transient"
    if isinstance(exc, OutputParserException | pydantic.ValidationError):
        return "parse"
    return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


def is_rate_limit(exc: BaseException) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429
