"""What came back on the wire: an answer read to its end, and what it means.

The one place that reads an HTTP answer's bytes for what they say about the
job, shared by the online sender (``transport.pipeline``) and the Batch API sender
(``transport.batch``): ``Answer`` (status, headers, body: what the cache keeps and
identical requests share), and from its status, headers and body, as its
provider (``providers``) reads them (usage, limits, a quota 429, whether it
is *fatal*: no retry can fix it, a bad key, a missing model, a spent
account), the answer's ``Outcome`` (``outcome_of``), read once and handed
to every stage. Neither sender imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask_llm.core.outcome import NOTHING_ANNOUNCED, Outcome, read_outcome
from dask_llm.providers import OPENAI, Provider
from dask_llm.providers.base import error_of


class Answer:
    """A response read to its end: what the cache keeps and identical requests share."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def json(cls, status: int, body: bytes) -> Answer:
        """An answer with a JSON body and no other headers (a batch line's)."""
        return cls(status, [("content-type", "application/json")], body)

    def to_cache(self) -> dict[str, Any]:
        return {
            "s": self.status,
            "t": self._content_type(),
            "b": self.body.decode("utf-8", "replace"),
        }

    def kept(self) -> Answer:
        """This answer as kept to answer a repeat (as the cache keeps it): status, body and
        content type. The provider's other headers (twenty or so, ~60 small objects) are
        of the moment it was sent; kept for every answer of a partition, they were ~10%
        of a worker's memory at 30,000 rows (the rest: ``JobTransport.forget``)."""
        return Answer(self.status, [("content-type", self._content_type())], self.body)

    def _content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "")

    @classmethod
    def from_cache(cls, value: Any) -> Answer | None:
        """The answer a cache entry holds; None for a miss (or an entry of another shape)."""
        if not isinstance(value, dict) or not isinstance(value.get("b"), str):
            return None
        return cls(
            int(value.get("s", 200)), [("content-type", str(value.get("t")))], value["b"].encode()
        )


def host_of(request: Any) -> str:
    """``host:port`` a request went to, for messages."""
    url = request.url
    return f"{url.host}:{url.port}" if url.port else str(url.host)


def fatal_reason(status: int, data: bytes, request: Any, provider: Provider = OPENAI) -> str | None:
    """Why an answer means no request of the job can succeed (``Provider.fatal``: 401, 403,
    404, a spent account), in words for ``llm_error``; None for any other answer."""
    if not provider.fatal(status, data):
        return None
    code, message = error_of(data)
    text = f"HTTP {status}{f' {code}' if code else ''} from {host_of(request)}"
    if message:
        text += f": {message[:300]}"
    return f"the provider refused the job ({text}); no request was sent after it"


def outcome_of(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes,
    request: Any,
    *,
    provider: Provider = OPENAI,
    batch: bool = False,
    flex: bool = False,
    room: bool | None = None,
) -> Outcome:
    """Read an answer once (status None: none came), as its ``provider`` means it: usage
    (cache reads and writes), the tier that served it, the limits its headers announce,
    a quota 429 or a Flex request's "resource unavailable", fatal or not.

    ``flex``: the request asked for Flex processing (``Provider.is_flex``). ``room``:
    what the freshest rate-limit headers of the job's other answers from this
    provider say (``limits.headers.Headroom.room()``), for a 429 that carries none
    of its own.
    """
    announced = provider.announced(headers) if headers is not None else NOTHING_ANNOUNCED
    if status is None:
        return read_outcome(status, headers, body, batch=batch, flex=flex)
    if status < 400:
        return read_outcome(
            status,
            headers,
            body,
            reported=provider.read(body),
            announced=announced,
            batch=batch,
            flex=flex,
        )
    return read_outcome(
        status,
        headers,
        body,
        announced=announced,
        batch=batch,
        flex=flex,
        quota=status == 429 and provider.is_quota_429(headers, body, room=room),
        fatal=fatal_reason(status, body, request, provider),
    )
