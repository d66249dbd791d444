"""Anthropic: ``ChatAnthropic`` (langchain-anthropic) and the Messages API.

* **Models.** ``ChatAnthropic`` builds its async client once per model object
  (a ``cached_property``) on an httpx client that langchain-anthropic caches
  per base URL for the whole process: the "Event loop is closed" trap of a
  client used on one loop and then another. Each loop gets a copy of the
  model whose ``_async_client`` is a new ``anthropic.AsyncAnthropic`` with the
  model's own parameters (key, base URL, headers), on the SDK's aiohttp
  transport, SDK retries off (dask-llm retries). Nothing of the user's model
  is touched. A model's key is never shipped: each process's SDK reads
  ``ANTHROPIC_API_KEY`` from its environment.
* **Answers.** ``usage.input_tokens`` counts only the prompt tokens that were
  neither read from nor written to the prompt cache; the whole prompt is
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``,
  and each part is priced apart (cache reads at 0.1x the input price, 5-minute
  cache writes at 1.25x: ``core.usage.PRICES``). ``stop_reason`` says
  ``max_tokens`` (truncated) or ``refusal``.
* **Limits.** ``anthropic-ratelimit-requests-limit`` announces the rpm,
  ``anthropic-ratelimit-input-tokens-limit`` (else ``-tokens-limit``) the tpm
  and ``anthropic-ratelimit-output-tokens-limit`` the output tpm, each paced
  apart (``output_limit``): the throttle's token estimate of a request counts
  its prompt alone against the input limit, and the request reserves its
  ``max_tokens`` from the output bucket until its answer says what it used
  (``limits.pacer.OutputBucket``), whose level follows what
  ``-output-tokens-remaining`` says is left (the ``-reset`` time is not read: a
  time of the provider's clock, to the second, of a bucket about a second deep).
  Anthropic answers 429 ``rate_limit_error``
  only for its limits (with ``retry-after``): every such 429 is the quota's.
  Overload is 529 ``overloaded_error``, retried and never fatal.
* **Fatal.** 401, 403, 404, and the 400 "credit balance is too low".
* **Message Batches API** (``/v1/messages/batches``), half price: requests go
  in the create call itself (no file), results come as JSONL once the batch
  has ended (``succeeded`` / ``errored`` / ``canceled`` / ``expired``). A
  batch has no metadata to find it by: a crash between the create call and
  recording its id (the length of that call) leaves a batch a rerun cannot
  re-attach to, and its requests are sent again.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

import anthropic
from langchain_anthropic import ChatAnthropic

from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT
from dask_llm.core.outcome import Announced
from dask_llm.core.usage import MODEL, Reported
from dask_llm.limits.headers import is_quota_429, number, positive_number
from dask_llm.providers.base import BatchClient, BatchState, Provider, error_of

_INPUT: Final = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT: Final = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_CACHE_READ: Final = re.compile(rb'"cache_read_input_tokens"\s*:\s*(\d+)')
_CACHE_WRITE: Final = re.compile(rb'"cache_creation_input_tokens"\s*:\s*(\d+)')
_STOP_MAX_TOKENS: Final = re.compile(rb'"stop_reason"\s*:\s*"max_tokens"')
_STOP_REFUSAL: Final = re.compile(rb'"stop_reason"\s*:\s*"refusal"')
_HEADER: Final = "anthropic-ratelimit-"
#: The HTTP status of an ``errored`` batch result, by its error's type.
_ERROR_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
#: Message Batches' processing status in OpenAI's words (``BatchState``).
_STATUS: Final = {"in_progress": "in_progress", "canceling": "cancelling"}


class AnthropicProvider(Provider):
    """Anthropic's Messages API through langchain-anthropic's ``ChatAnthropic``."""

    name = "anthropic"
    status_errors = (anthropic.APIStatusError,)
    connection_errors = (anthropic.APIConnectionError,)
    validation_errors = (anthropic.APIResponseValidationError,)
    api_errors = (anthropic.APIError,)
    batch = True
    batch_prefix = "msgbatch_"
    output_limit = True

    def owns(self, model: Any) -> bool:
        return isinstance(model, ChatAnthropic)

    def routable(self, model: Any) -> bool:
        return True  # ChatAnthropic takes no HTTP client of the user's

    def local_model(
        self,
        model: Any,
        *,
        wrap: Callable[[Any], Any],
        timeout: float | None,
        service_tier: str | None,
    ) -> tuple[Any, Any] | None:
        http = anthropic.DefaultAioHttpClient()
        http._transport = wrap(http._transport)
        params = dict(model._client_params)
        params.update(http_client=http, max_retries=0)
        if timeout is not None:
            params["timeout"] = timeout
        elif "default_request_timeout" not in model.model_fields_set:
            params["timeout"] = DEFAULT_REQUEST_TIMEOUT  # the SDK's own is 600 s
        client = anthropic.AsyncAnthropic(**params)
        local = model.model_copy()
        # ``_async_client`` is a cached_property: the copy's own, found before the property.
        local.__dict__["_async_client"] = client
        return local, client

    async def close(self, client: Any) -> None:
        await client.close()

    def model_name(self, model: Any) -> str | None:
        name = model.model
        return name if isinstance(name, str) else None

    def is_chat(self, path: str) -> bool:
        return path.endswith("/v1/messages")

    def read(self, body: bytes) -> Reported:
        """Model, the whole prompt's tokens (cache reads and writes included), output, cache
        read and cache write tokens of a Messages body (JSON or a stream: the last of each
        counts, as ``message_delta`` carries the final output tokens)."""
        model = MODEL.search(body)
        name = model.group(1).decode() if model else None
        truncated = _STOP_MAX_TOKENS.search(body) is not None
        refused = _STOP_REFUSAL.search(body) is not None
        uncached = _INPUT.findall(body)
        if not uncached:
            return Reported(name, None, None, None, None, truncated=truncated, refused=refused)
        output = _OUTPUT.findall(body)
        read = _CACHE_READ.findall(body)
        written = _CACHE_WRITE.findall(body)
        cache_read = int(read[-1]) if read else 0
        cache_write = int(written[-1]) if written else 0
        return Reported(
            name,
            int(uncached[-1]) + cache_read + cache_write,
            int(output[-1]) if output else 0,
            cache_read,
            None,
            cache_write_tokens=cache_write,
            truncated=truncated,
            refused=refused,
        )

    def announced(self, headers: Mapping[str, str]) -> Announced:
        tpm = positive_number(headers.get(f"{_HEADER}input-tokens-limit"))
        return Announced(
            positive_number(headers.get(f"{_HEADER}requests-limit")),
            tpm or positive_number(headers.get(f"{_HEADER}tokens-limit")),
            positive_number(headers.get(f"{_HEADER}output-tokens-limit")),
            number(headers.get(f"{_HEADER}output-tokens-remaining")),
        )

    remaining = tuple(
        (f"{_HEADER}{kind}-remaining", f"{_HEADER}{kind}-limit")
        for kind in ("requests", "input-tokens", "output-tokens")
    )

    def is_quota_429(
        self, headers: Mapping[str, str] | None, body: bytes, *, room: bool | None = None
    ) -> bool:
        # Anthropic's own 429 carries its limit headers, and a bucket refilled continuously
        # may show a little left on it: with them, a rate_limit_error is the quota's. A
        # 429 without them (a gateway's, a mock's) is read by the shared rule, against the
        # freshest headers. Its busy answer (overloaded_error) comes as a 529, not a 429.
        code, _ = error_of(body)
        if headers is not None and any(name in headers for name, _ in self.remaining):
            return code in (None, "rate_limit_error")
        return is_quota_429(headers, code, room=room, remaining=())

    def fatal(self, status: int, body: bytes) -> bool:
        if super().fatal(status, body):
            return True
        _, message = error_of(body)
        return status == 400 and "credit balance" in message.lower()

    def batch_group(self, request: Any) -> tuple[str, str]:
        base = str(request.url).split("/v1/messages", 1)[0]
        return base, request.headers.get("x-api-key", "")

    def batch_client(self, base_url: str, api_key: str, *, completion_window: str) -> BatchClient:
        return AnthropicBatches(base_url, api_key)

    def cancel_batches(self, batch_ids: list[str], *, client: Any = None) -> dict[str, str]:
        api = client if isinstance(client, anthropic.Anthropic) else anthropic.Anthropic()
        statuses: dict[str, str] = {}
        try:
            for batch_id in batch_ids:
                batch = api.messages.batches.retrieve(batch_id)
                if batch.processing_status == "in_progress":
                    batch = api.messages.batches.cancel(batch_id)
                statuses[batch_id] = _state(batch).status
        finally:
            if api is not client:
                api.close()
        return statuses


class AnthropicBatches(BatchClient):
    """Anthropic's Message Batches API through the anthropic SDK (its retries, 2, are on
    except for ``create``, which is not idempotent)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key or "none",
            base_url=base_url,
            max_retries=2,
            http_client=anthropic.DefaultAioHttpClient(),
        )

    async def submit(
        self, bodies: Mapping[str, bytes], *, job: str, stored: Callable[[str], None]
    ) -> BatchState:
        requests = []
        for key, body in bodies.items():
            params = json.loads(body)
            params.pop("stream", None)  # a batch's requests are not streamed
            requests.append({"custom_id": key, "params": params})
        stored(f"msgbatch-request-{uuid.uuid4().hex}")  # nothing a rerun can look up
        batch = await self.client.with_options(max_retries=0).messages.batches.create(
            requests=requests  # type: ignore[arg-type]
        )
        return _state(batch)

    async def find(self, ref: str) -> str | None:
        return None  # a Message Batch carries nothing to find it by

    async def retrieve(self, batch_id: str) -> BatchState:
        return _state(await self.client.messages.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> None:
        await self.client.messages.batches.cancel(batch_id)

    async def results(self, batch: BatchState) -> list[tuple[str, int, bytes]]:
        out: list[tuple[str, int, bytes]] = []
        async for line in await self.client.messages.batches.results(batch.id):
            result = line.result
            if result.type == "succeeded":
                out.append((line.custom_id, 200, result.message.to_json(indent=None).encode()))
            elif result.type == "errored":
                error = result.error.model_dump(mode="json")
                kind = (error.get("error") or {}).get("type", "api_error")
                out.append(
                    (line.custom_id, _ERROR_STATUS.get(kind, 500), json.dumps(error).encode())
                )
        return out

    async def close(self) -> None:
        await self.client.close()


def _state(batch: Any) -> BatchState:
    counts = batch.request_counts
    status = _STATUS.get(batch.processing_status)
    if status is None:  # ended: how, its counts say
        status = "cancelled" if counts.canceled else "expired" if counts.expired else "completed"
    done = counts.succeeded + counts.errored + counts.canceled + counts.expired
    return BatchState(str(batch.id), status, "", batch, done=done, total=done + counts.processing)
