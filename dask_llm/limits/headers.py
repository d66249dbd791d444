"""What a provider's response headers say about its limits.

The one parser of ``retry-after-ms`` / ``retry-after`` (used by the retry
loop and the throttle alike), and the reading of a 429: the quota spent, or
a busy server (see ``limits.pacer`` for what each does to pacing).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, else ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date. ``0`` means "now" (0.0); None
    when neither header is there or parses.
    """
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_quota_429(headers: Mapping[str, str] | None, code: str | None) -> bool:
    """Whether a 429 says the quota is spent (pace slower), not that the server is busy.

    Rate-limit headers decide when they are there: a quota is spent when one of
    ``x-ratelimit-remaining-requests`` / ``-tokens`` is 0. Without them, only
    ``code="rate_limit_exceeded"`` is the quota's.
    """
    remaining = [
        (headers or {}).get(f"x-ratelimit-remaining-{kind}") for kind in ("requests", "tokens")
    ]
    known = [r for r in remaining if r is not None]
    if known:
        return any(positive_number(r) is None for r in known)  # "0" (or unparseable): spent
    return code == "rate_limit_exceeded"


def positive_number(value: str | None) -> float | None:
    """A header's number if it is > 0; None when absent, 0 or not a number."""
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None
