"""What differs between LLM providers, behind one small interface.

Everything that makes a paid job safe (the request cache, dedup, the
budget, pacing, the ledger, usage and cost, the breaker, Ctrl-C) happens in
the job's transport (``transport.pipeline``), on the HTTP requests of the
chain's models. Only a few facts there depend on who answers, and a
``Provider`` is those facts, for one provider:

* **its models**: which LangChain chat models are its (``owns``), and how to
  give one a private async client on the loop running it, whose httpx
  transport the job wraps (``local_model``); the key is never shipped: each
  process's SDK reads it from its environment (the chains layer, below this
  one, knows each model's key field: ``chains.shipping.KEY_ENV``);
* **its requests**: which paths are chat requests (cached, batched:
  ``is_chat``), whether one asks for a cheaper tier (``is_flex``);
* **its answers**: the usage a body reports (``read``: input, output, cache
  read and cache write tokens, truncation, refusal), the limits its headers
  announce (``announced``), whether a 429 says its quota is spent
  (``is_quota_429``) and whether an error is one no retry can fix (``fatal``);
* **its SDK's exceptions** (``status_errors``, ``connection_errors``,
  ``validation_errors``), for the retry policy;
* **its Batch API**, where the job's batch sender supports it (``batch``).

Prices are data, in ``core.usage.PRICES`` (a model's name says whose it is).
A third provider (Gemini, say) is one module with one ``Provider`` subclass,
listed in ``providers.registry``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

from dask_llm.core.outcome import Announced
from dask_llm.core.usage import Reported

#: Statuses no retry can fix: bad key, no permission, no such model or endpoint.
FATAL_STATUS: Final = frozenset({401, 403, 404})


@dataclass(frozen=True, slots=True)
class BatchState:
    """A provider's batch as the batch sender sees it.

    ``status`` in OpenAI's words, whatever the provider's: ``validating``,
    ``in_progress``, ``finalizing``, ``cancelling``, then ``completed``,
    ``failed`` (rejected at validation: ``failed_because`` says why),
    ``expired`` or ``cancelled``. ``raw`` is the SDK's object, for ``results``.
    ``done`` of ``total`` lines have finished (answered or failed) so far, as the
    provider counts them (``total`` 0: not known yet, as while validating).
    """

    id: str
    status: str
    failed_because: str = ""
    raw: Any = None
    done: int = 0
    total: int = 0


class BatchClient(ABC):
    """One provider's Batch API, for one base URL and key (``Provider.batch_client``)."""

    @abstractmethod
    async def submit(
        self, bodies: Mapping[str, bytes], *, job: str, stored: Callable[[str], None]
    ) -> BatchState:
        """Create a batch of the request ``bodies`` (by custom id).

        ``stored(ref)`` is called once the requests are where a rerun can find them,
        before the batch is created (OpenAI: the uploaded file's id); ``find(ref)``
        then finds the batch made of them. A lost answer to the create call is looked
        for, never created again.
        """

    @abstractmethod
    async def find(self, ref: str) -> str | None:
        """The id of the batch made of the requests ``submit`` stored as ``ref``, if any."""

    @abstractmethod
    async def retrieve(self, batch_id: str) -> BatchState: ...

    @abstractmethod
    async def cancel(self, batch_id: str) -> None: ...

    @abstractmethod
    async def results(self, batch: BatchState) -> list[tuple[str, int, bytes]]:
        """(custom id, HTTP status, body) of each request an ended batch ran; requests it
        never ran (expired, cancelled) are left out."""

    @abstractmethod
    async def close(self) -> None: ...


class StatusError(Protocol):
    """What the retry policy and ``llm_error`` read off an SDK's error answer (the openai
    and anthropic SDKs' ``APIStatusError``)."""

    status_code: int
    request: Any
    response: Any
    body: object
    message: str


class ConnectionFailure(Protocol):
    """An SDK's error for a request that got no answer (``APIConnectionError``)."""

    message: str


class Provider(ABC):
    """One provider's wire facts (see the module docstring); stateless, one instance each."""

    #: A short name, for messages ("openai", "anthropic").
    name: ClassVar[str]
    #: The SDK's exceptions for an error answer, for no answer (connection, timeout), and
    #: for an answer whose body did not parse.
    status_errors: ClassVar[tuple[type[StatusError], ...]]
    connection_errors: ClassVar[tuple[type[ConnectionFailure], ...]]
    validation_errors: ClassVar[tuple[type[BaseException], ...]]
    #: The root of the SDK's errors (any of the above, and more).
    api_errors: ClassVar[tuple[type[Exception], ...]]
    #: Whether the job's batch sender speaks this provider's Batch API.
    batch: ClassVar[bool] = False
    #: How the ids of its batches begin (``cancel_batches`` sends each id to its provider).
    batch_prefix: ClassVar[str] = ""
    #: Whether it limits output tokens apart (Anthropic's output tokens per minute): its
    #: ``tpm`` then counts the prompt alone, and its requests reserve their expected output
    #: from an output bucket of their own (``limits.pacer.OutputBucket``).
    output_limit: ClassVar[bool] = False

    @abstractmethod
    def owns(self, model: Any) -> bool:
        """Whether ``model`` is one of this provider's LangChain chat models."""

    @abstractmethod
    def routable(self, model: Any) -> bool:
        """Whether the job's transport can carry ``model``'s requests (not when the user
        gave it an HTTP client of their own)."""

    @abstractmethod
    def local_model(
        self,
        model: Any,
        *,
        wrap: Callable[[Any], Any],
        timeout: float | None,
        service_tier: str | None,
    ) -> tuple[Any, Any] | None:
        """A copy of ``model`` with an async client of its own, for the running event loop.

        ``wrap(inner)`` returns the httpx transport to put around the SDK's own
        (``inner``); ``timeout`` is seconds per request (None: the model's own, or
        the default). Returns the copy and its client (closed with ``close``), or
        None when the model cannot be routed (``routable``).
        """

    @abstractmethod
    async def close(self, client: Any) -> None:
        """Close a client ``local_model`` opened."""

    @abstractmethod
    def model_name(self, model: Any) -> str | None:
        """The model name a chat model sends (for prices)."""

    @abstractmethod
    def is_chat(self, path: str) -> bool:
        """Whether a POST to ``path`` asks the model for an answer (cached, batchable)."""

    def is_flex(self, body: bytes) -> bool:
        """Whether a request body asks for a cheaper, slower tier (OpenAI's Flex)."""
        return False

    @abstractmethod
    def read(self, body: bytes) -> Reported:
        """What an answer's body says about its usage (JSON or a stream)."""

    @abstractmethod
    def announced(self, headers: Mapping[str, str]) -> Announced:
        """The limits an answer's headers announce, per minute."""

    #: (remaining, limit) header pairs its answers carry: what ``limits.headers.Headroom``
    #: reads, for a 429 that carries none of its own.
    remaining: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    def is_quota_429(
        self, headers: Mapping[str, str] | None, body: bytes, *, room: bool | None = None
    ) -> bool:
        """Whether a 429 says the quota is spent (pace slower), not a busy server.

        ``room``: what the freshest ``remaining`` headers of the job's other answers from
        this provider say (``Headroom.room()``: True room, False near spent, None none).
        """

    def fatal(self, status: int, body: bytes) -> bool:
        """Whether an error answer means no request of the job can succeed."""
        return status in FATAL_STATUS

    def batch_group(self, request: Any) -> tuple[str, str]:
        """(base URL, API key) of a chat request: whose Batch API its batch line goes to."""
        raise NotImplementedError(f"{self.name}: no Batch API")

    def cancel_batches(self, batch_ids: list[str], *, client: Any = None) -> dict[str, str]:
        """Cancel batches (from outside any job: ``dask_llm.cancel_batches``); each one's
        status after it, in OpenAI's words. ``client``: the SDK's sync client to use, when it
        is this provider's (default: one from the environment)."""
        raise NotImplementedError(f"{self.name}: no Batch API")

    def batch_client(self, base_url: str, api_key: str, *, completion_window: str) -> BatchClient:
        """A client of the provider's Batch API (``batch`` is True); ``completion_window``
        where the provider lets a batch choose it (OpenAI)."""
        raise NotImplementedError(f"{self.name}: no Batch API")


def error_of(data: bytes) -> tuple[str | None, str]:
    """(code or type, message) of an error body; (None, "") when it has neither.

    OpenAI's envelope is ``{"error": {"code", "type", "message"}}``, Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``: both read here.
    """
    try:
        error = json.loads(data).get("error") or {}
    except (ValueError, AttributeError):
        return None, ""
    if not isinstance(error, dict):
        return None, ""
    code = error.get("code") or error.get("type")
    return (str(code) if code else None), str(error.get("message") or "")
