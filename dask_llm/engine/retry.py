"""Retries: which failures, how long to wait, and the loop that runs a chain call's attempts.

One retry layer only: the SDK's own retries are switched off on the clients
dask-llm opens (``max_retries=0``, see ``transport.pipeline``), so attempts never
multiply. Retried: 429, 408, 409, 5xx, connection errors, timeouts, bodies
that do not parse, and answers that do not fit their schema (the latter
within a smaller budget of their own, ``parse_attempts``, since a model that
misreads a schema tends to do it again). Not retried: every other 4xx (400
including ``context_length_exceeded``, 401, 403, 404, 422), a stopped job,
and exceptions raised by the user's own Python code.

The schedule is stamina's and tenacity's: exponential backoff with full
jitter (``uniform(0, min(wait_max, wait_initial * 2**n))``), within an
attempt budget and a total time budget (``timeout``, stamina's meaning: the
whole retrying, not one request; a request's own limit is
``request_timeout`` on ``enrich``). A server's ``retry-after-ms`` /
``retry-after`` is a floor under the wait; ``retry_after`` here is the one
parser of those headers, used by the throttle too. The loop is tenacity's
(retry?, then the wait, then stop?: ``stop_after_attempt | stop_before_delay``),
written out: tenacity's ``AsyncRetrying``, built for every chain call, cost
2% of a job's CPU at zero latency, most of it for the first attempt, which
is nearly always the last.

An answer that failed to parse is retried *around* the request cache: the
request keys of the failed attempt go to the next attempt's ``refresh`` set,
so it is asked again (and the new answer replaces the cached one) instead of
being served the same bad answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic
from langchain_core.exceptions import OutputParserException

from dask_llm.core.config import RetryPolicy
from dask_llm.core.errors import JobStopped
from dask_llm.core.usage import (
    Attempt,
    PriceEntry,
    Usage,
    UsageCallback,
    current_attempt,
    settle,
)
from dask_llm.limits.headers import retry_after
from dask_llm.observe.record import ACTIVE
from dask_llm.providers.registry import connection_errors, status_errors, validation_errors

_RETRY_STATUS = frozenset({408, 409, 429})
log = logging.getLogger(__name__)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc`` (the SDK wraps what its transport raised)."""
    seen = 0
    while exc.__cause__ is not None and seen < 10:
        exc = exc.__cause__
        seen += 1
    return exc


def classify(exc: BaseException) -> str | None:
    """``"transient"``, ``"parse"`` (answer did not fit its schema) or ``None`` (do not retry)."""
    if isinstance(root_cause(exc), JobStopped):
        return None
    if isinstance(exc, status_errors()):
        if exc.status_code in _RETRY_STATUS or exc.status_code >= 500:
            return "transient"
        return None
    if isinstance(exc, connection_errors() + validation_errors()):
        return "transient"  # includes APITimeoutError
    if isinstance(exc, TimeoutError | ConnectionError | json.JSONDecodeError):
        return "transient"
    if isinstance(exc, OutputParserException | pydantic.ValidationError):
        return "parse"
    return None


def _exception_headers(exc: BaseException) -> Mapping[str, str] | None:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None)


async def call_with_retries(
    invoke: Callable[[dict[str, Any] | None], Awaitable[Any]],
    *,
    policy: RetryPolicy,
    prices: Mapping[str, PriceEntry] | None,
    stats: Any,
    stopped: Callable[[], bool],
    with_callbacks: bool,
) -> tuple[Any, Usage]:
    """Run ``invoke(config)`` with retries; return its result and the usage of every attempt.

    ``config`` carries a usage callback when ``with_callbacks`` (models the
    transport cannot see). On failure the last exception propagates, with the
    usage so far in its ``usage`` attribute.
    """
    total = Usage()
    refresh: frozenset[str] = frozenset()
    began = time.monotonic()
    number = 0
    while True:
        number += 1
        if number > 1:
            stats.retries += 1
            if (active := ACTIVE.get()) is not None:
                active[0].retried()
        attempt = Attempt(prices, refresh)
        callback = UsageCallback() if with_callbacks else None
        token = current_attempt.set(attempt)
        try:
            value = await invoke({"callbacks": [callback]} if callback else None)
            return value, _plus(total, settle(attempt, callback))
        except BaseException as exc:
            total.add(settle(attempt, callback))
            if classify(exc) == "parse" or isinstance(
                root_cause(exc), (json.JSONDecodeError, *validation_errors())
            ):
                # An answer that did not fit its schema, or a body that did not
                # parse: the next attempt asks again instead of being served the
                # same answer by the cache (or this partition's answers).
                refresh = refresh | frozenset(attempt.keys)
            failure = exc
        finally:
            current_attempt.reset(token)
        # tenacity's order: retry?, then the wait, then stop? (the time budget counts
        # the wait: no attempt starts after ``timeout``).
        sleep = _next_wait(failure, number, policy, stopped)
        if number >= policy.attempts:
            sleep = None
        if sleep is not None and time.monotonic() - began + sleep >= policy.timeout:
            sleep = None
        if sleep is None:
            failure.usage = total  # type: ignore[attr-defined]
            raise failure
        log.debug(
            "dask-llm: retry %d in %.2f s after %s: %s",
            number,
            sleep,
            type(failure).__name__,
            failure,
        )
        try:
            await asyncio.sleep(sleep)
        except BaseException as exc:
            exc.usage = total  # type: ignore[attr-defined]
            raise


def _next_wait(
    exc: BaseException, number: int, policy: RetryPolicy, stopped: Callable[[], bool]
) -> float | None:
    """Seconds before attempt ``number + 1`` after ``exc`` ended attempt ``number``; None: do
    not retry. An answer that did not fit its schema is recorded as a parse failure."""
    if stopped():
        return None
    kind = classify(exc)
    if kind == "parse" and (active := ACTIVE.get()) is not None:
        active[0].parse_failed(active[1])
    if not (kind == "transient" or (kind == "parse" and number < policy.parse_attempts)):
        return None
    backoff = policy.backoff(number)
    floor = retry_after(_exception_headers(exc))
    return max(backoff, floor) if floor is not None else backoff


def _plus(total: Usage, last: Usage) -> Usage:
    total.add(last)
    return total
