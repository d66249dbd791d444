"""What a provider's response headers say about its limits.

The one parser of ``retry-after-ms`` / ``retry-after`` (used by the retry
loop and the throttle alike), and the reading of a 429: the quota spent
(pace slower), or a busy server (retry after its ``Retry-After``, pace as
before; see ``limits.pacer`` for what each does).

A 429 is the quota's only when

* its own rate-limit headers say the quota is spent (one of
  ``x-ratelimit-remaining-requests`` / ``-tokens`` is 0), or
* it carries no such headers, its error does not say the server is busy
  (overloaded, a Flex request's "resource unavailable", billing), and the
  freshest rate-limit headers of the job's other answers do not say there is
  room (``Headroom``: an answer received in the last ``FRESH_S`` seconds, its
  every ``remaining`` above a second's worth of its limit).

Why the second rule reads the other answers. Providers and the mocks built
after them send header-less ``rate_limit_exceeded`` 429s while the quota has
room (users report OpenAI 429s without ``x-ratelimit-*`` headers, and 429s
while their other answers showed the quota far from spent). Read as the quota
spent, 5% of such 429s held a job at 37-39% of a 3,000 rpm bucket; read
against the other answers, 94-96% (``benchmarks/stray_429.py``). A
header-less 429 with no fresh reading, or while the last reading was near 0,
is still the quota's: a provider that never sends headers keeps its AIMD
signal, and a quota really spent still slows.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

#: OpenAI's headers of what is left of the quota, and of the limit they are counted against.
REMAINING: Final = ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
LIMITS: Final = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens")
#: (remaining, limit) header pairs of OpenAI's answers (``Headroom``'s default).
OPENAI_NAMES: Final = tuple(zip(REMAINING, LIMITS, strict=True))
#: Seconds for which the rate-limit headers of an answer speak for the quota now: a
#: bucket refilled continuously (or a window that slides) is another bucket a second on.
FRESH_S: Final = 1.5
#: Error codes (or types) of 429s that are never the quota's: a busy server, a Flex
#: request the tier has no capacity for, a spent account (fatal, not paced).
BUSY_CODES: Final = frozenset(
    {
        "server_overloaded",
        "engine_overloaded",
        "overloaded",
        "overloaded_error",
        "resource_unavailable",
        "server_error",
        "insufficient_quota",
    }
)


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


def is_quota_429(
    headers: Mapping[str, str] | None,
    code: str | None,
    *,
    room: bool | None = None,
    remaining: Sequence[str] = REMAINING,
) -> bool:
    """Whether a 429 says the quota is spent (pace slower), not that the server is busy.

    ``headers``: the 429's own; ``code``: its error's code (or type; None: none);
    ``room``: what the freshest rate-limit headers of other answers say
    (``Headroom.room()``: True room, False near spent, None no fresh reading);
    ``remaining``: the names of the provider's "what is left" headers.

    Its own headers decide when they are there: spent when one of them is 0 (or
    does not parse). Without them, a busy server's code (``BUSY_CODES``) is never
    the quota's, and any other 429 is, unless ``room`` is True.
    """
    found = [(headers or {}).get(name) for name in remaining]
    known = [r for r in found if r is not None]
    if known:
        return any(positive_number(r) is None for r in known)  # "0" (or unparseable): spent
    if code in BUSY_CODES:
        return False
    return room is not True


class Headroom:
    """The freshest rate-limit headers of a job's answers in this process: is there room?

    One per job per process, owned by its throttle (``limits.pacer.Throttle``)
    and fed every answer's headers there; read for each header-less 429
    (``is_quota_429``'s ``room``). It keeps one reading, the latest, so it
    never grows. Thread-safe; ``clock`` is injectable for tests.

    Room: every ``remaining`` header of the reading above its margin, a second's
    worth of its limit (``limit / 60``: what a job at the limit can spend before
    a reading is stale), or above 0 where the answer says no limit.
    """

    __slots__ = ("_at", "_lock", "_room", "clock", "fresh_s", "names")

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        fresh_s: float = FRESH_S,
        names: Sequence[tuple[str, str]] = OPENAI_NAMES,
    ) -> None:
        self.clock = clock
        self.fresh_s = fresh_s
        #: (remaining header, limit header) per kind of quota.
        self.names = tuple(names)
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._room = False

    def saw(self, headers: Mapping[str, str] | None) -> None:
        """An answer came back with ``headers`` (any status): keep its reading, if it has one."""
        if headers is None:
            return
        room: bool | None = None
        for remaining_name, limit_name in self.names:
            value = headers.get(remaining_name)
            if value is None:
                continue
            left = positive_number(value) or 0.0
            limit = positive_number(headers.get(limit_name))
            above = left > (limit / 60.0 if limit else 0.0)
            room = above if room is None else room and above
        if room is None:
            return
        now = self.clock()
        with self._lock:
            if now >= self._at:
                self._at, self._room = now, room

    def room(self) -> bool | None:
        """True: the freshest reading (of the last ``fresh_s`` seconds) shows room; False: it
        shows a quota at or near its end; None: no reading that fresh."""
        with self._lock:
            if self.clock() - self._at > self.fresh_s:
                return None
            return self._room


def number(value: str | None) -> float | None:
    """A header's number if it is >= 0; None when absent, negative or not a number."""
    if not value:
        return None
    try:
        found = float(value)
    except ValueError:
        return None
    return found if found >= 0 and found == found else None


def positive_number(value: str | None) -> float | None:
    """A header's number if it is > 0; None when absent, 0 or not a number."""
    return number(value) or None  # 0.0 is falsy: None
