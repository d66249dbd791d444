"""OpenAI (and OpenAI-compatible servers): ``ChatOpenAI`` and the Chat Completions API.

* **Models.** langchain-openai's ``BaseChatOpenAI`` (``ChatOpenAI``,
  ``AzureChatOpenAI``). Its async client is replaced per loop by
  ``root_async_client.with_options(http_client=...)``: same key, base URL,
  headers and organization, on the SDK's aiohttp transport
  (``openai.DefaultAioHttpClient``, measured 1.8x the calls/s of httpx
  here), SDK retries off (dask-llm retries, one layer only). A model given
  its own ``http_async_client`` keeps it and is not routed.
* **Answers.** ``usage.prompt_tokens`` (cache reads in
  ``prompt_tokens_details.cached_tokens``; OpenAI bills no cache writes),
  ``completion_tokens``, ``service_tier`` (the tier that served it),
  ``finish_reason="length"`` (truncated), a non-null ``refusal``.
* **Limits.** ``x-ratelimit-limit-requests`` / ``-tokens`` announce rpm and
  tpm; a 429 is read by ``limits.headers.is_quota_429``.
* **Fatal.** 401, 403, 404, and the billing 429 ``insufficient_quota``.
* **Batch API.** ``/v1/files`` and ``/v1/batches`` (``transport.batch``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import openai
from langchain_openai.chat_models.base import BaseChatOpenAI

from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT, FLEX_REQUEST_TIMEOUT
from dask_llm.core.outcome import Announced
from dask_llm.core.usage import MODEL, Reported
from dask_llm.limits.headers import OPENAI_NAMES, is_quota_429, positive_number
from dask_llm.providers.base import (
    BatchClient,
    BatchState,
    Provider,
    error_of,
)

_PROMPT: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CACHED: Final = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
#: The ``service_tier`` of a request or answer body (JSON).
_SERVICE_TIER: Final = re.compile(rb'"service_tier"\s*:\s*"([^"]+)"')
_FINISH_LENGTH: Final = re.compile(rb'"finish_reason"\s*:\s*"length"')
_REFUSAL: Final = re.compile(rb'"refusal"\s*:\s*"')
#: The endpoint of the chat requests sent as batch lines.
BATCH_ENDPOINT: Final = "/v1/chat/completions"


class OpenAIProvider(Provider):
    """OpenAI's Chat Completions API through langchain-openai's ``BaseChatOpenAI``."""

    name = "openai"
    status_errors = (openai.APIStatusError,)
    connection_errors = (openai.APIConnectionError,)
    validation_errors = (openai.APIResponseValidationError,)
    api_errors = (openai.APIError,)
    batch = True
    batch_prefix = "batch_"

    def owns(self, model: Any) -> bool:
        return isinstance(model, BaseChatOpenAI)

    def routable(self, model: Any) -> bool:
        return model.http_async_client is None

    def local_model(
        self,
        model: Any,
        *,
        wrap: Callable[[Any], Any],
        timeout: float | None,
        service_tier: str | None,
    ) -> tuple[Any, Any] | None:
        root = model.root_async_client
        if root is None or not self.routable(model):
            return None
        update: dict[str, Any] = {}
        if service_tier is not None and model.service_tier != service_tier:
            update["service_tier"] = service_tier
        flex = (service_tier or model.service_tier) == "flex"
        # The SDK's aiohttp client allows 1,000 connections: above any sane concurrency.
        http = openai.DefaultAioHttpClient()
        http._transport = wrap(http._transport)
        options: dict[str, Any] = {"http_client": http, "max_retries": 0}
        if timeout is not None:
            options["timeout"] = timeout
        elif "request_timeout" not in model.model_fields_set:
            # The SDK's own is 600 s; OpenAI advises 15 minutes for Flex.
            options["timeout"] = FLEX_REQUEST_TIMEOUT if flex else DEFAULT_REQUEST_TIMEOUT
        client = root.with_options(**options)
        update.update(root_async_client=client, async_client=client.chat.completions)
        return model.model_copy(update=update), client

    async def close(self, client: Any) -> None:
        await client.close()

    def model_name(self, model: Any) -> str | None:
        name = model.model_name
        return name if isinstance(name, str) else None

    def is_chat(self, path: str) -> bool:
        return path.endswith("/chat/completions")

    def is_flex(self, body: bytes) -> bool:
        match = _SERVICE_TIER.search(body)
        return match is not None and match.group(1) == b"flex"

    def read(self, body: bytes) -> Reported:
        """Model, prompt, completion and cached tokens, and service tier of a Chat
        Completions body (JSON or SSE): the last ``usage`` counts (a stream sends it in
        its final chunk); None where the body reports none."""
        prompt = _PROMPT.findall(body)
        model = MODEL.search(body)
        name = model.group(1).decode() if model else None
        tier = _SERVICE_TIER.findall(body)
        served = tier[-1].decode() if tier else None
        truncated = _FINISH_LENGTH.search(body) is not None
        refused = _REFUSAL.search(body) is not None
        if not prompt:
            return Reported(name, None, None, None, served, truncated=truncated, refused=refused)
        completion = _COMPLETION.findall(body)
        cached = _CACHED.findall(body)
        return Reported(
            name,
            int(prompt[-1]),
            int(completion[-1]) if completion else 0,
            int(cached[-1]) if cached else 0,
            served,
            cache_write_tokens=0,
            truncated=truncated,
            refused=refused,
        )

    def announced(self, headers: Mapping[str, str]) -> Announced:
        return Announced(
            positive_number(headers.get("x-ratelimit-limit-requests")),
            positive_number(headers.get("x-ratelimit-limit-tokens")),
        )

    remaining = OPENAI_NAMES

    def is_quota_429(
        self, headers: Mapping[str, str] | None, body: bytes, *, room: bool | None = None
    ) -> bool:
        return is_quota_429(headers, error_of(body)[0], room=room)

    def fatal(self, status: int, body: bytes) -> bool:
        return super().fatal(status, body) or (
            status == 429 and error_of(body)[0] == "insufficient_quota"
        )

    def batch_group(self, request: Any) -> tuple[str, str]:
        base = str(request.url).split("/chat/completions", 1)[0]
        auth = request.headers.get("authorization", "")
        return base, auth[7:] if auth.lower().startswith("bearer ") else auth

    def batch_client(self, base_url: str, api_key: str, *, completion_window: str) -> BatchClient:
        return OpenAIBatches(base_url, api_key, window=completion_window)

    def cancel_batches(self, batch_ids: list[str], *, client: Any = None) -> dict[str, str]:
        return cancel_openai_batches(batch_ids, client)


def cancel_openai_batches(batch_ids: list[str], client: Any = None) -> dict[str, str]:
    """``Provider.cancel_batches`` of OpenAI's (sync: called outside any event loop)."""
    api = client if isinstance(client, openai.OpenAI) else openai.OpenAI()
    statuses: dict[str, str] = {}
    try:
        for batch_id in batch_ids:
            batch = api.batches.retrieve(batch_id)
            if batch.status not in ("completed", "failed", "expired", "cancelled", "cancelling"):
                batch = api.batches.cancel(batch_id)
            statuses[batch_id] = batch.status
    finally:
        if api is not client:
            api.close()
    return statuses


class OpenAIBatches(BatchClient):
    """OpenAI's Batch API: the requests as a JSONL file (``/v1/files``), then a batch of it.

    The openai SDK's own retries (2) are on for these calls except ``batches.create``,
    which is not idempotent (a lost answer to it is found by listing batches).
    """

    def __init__(self, base_url: str, api_key: str, *, window: str = "24h") -> None:
        self.client = openai.AsyncOpenAI(
            api_key=api_key or "none",
            base_url=base_url,
            max_retries=2,
            http_client=openai.DefaultAioHttpClient(),
        )
        self.window = window

    async def submit(
        self, bodies: Mapping[str, bytes], *, job: str, stored: Callable[[str], None]
    ) -> BatchState:
        data = b"\n".join(
            json.dumps(
                {
                    "custom_id": key,
                    "method": "POST",
                    "url": BATCH_ENDPOINT,
                    "body": json.loads(body),
                },
                separators=(",", ":"),
            ).encode()
            for key, body in bodies.items()
        )
        uploaded = await self.client.files.create(
            file=("dask-llm-batch.jsonl", data), purpose="batch"
        )
        stored(uploaded.id)
        try:
            batch = await self.client.with_options(
                max_retries=0
            ).batches.create(
                input_file_id=uploaded.id,
                endpoint=BATCH_ENDPOINT,
                completion_window=self.window,  # type: ignore[arg-type]
                metadata={"created_by": "dask-llm", "job": job[:512]},
            )
        except (openai.APIConnectionError, openai.InternalServerError):
            found = await self.find(uploaded.id)
            if found is None:
                raise
            return await self.retrieve(found)
        return _state(batch)

    async def find(self, ref: str) -> str | None:
        async for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == ref:
                return str(batch.id)
        return None

    async def retrieve(self, batch_id: str) -> BatchState:
        return _state(await self.client.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> None:
        await self.client.batches.cancel(batch_id)

    async def results(self, batch: BatchState) -> list[tuple[str, int, bytes]]:
        out: list[tuple[str, int, bytes]] = []
        for file_id in (batch.raw.output_file_id, batch.raw.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.content.splitlines():
                if not raw.strip():
                    continue
                record = json.loads(raw)
                key = record.get("custom_id")
                response = record.get("response")
                if not isinstance(key, str) or not isinstance(response, dict):
                    continue  # expired or cancelled: never ran
                body = json.dumps(response.get("body") or {}).encode()
                out.append((key, int(response.get("status_code", 500)), body))
        return out

    async def close(self) -> None:
        await self.client.close()


def _state(batch: Any) -> BatchState:
    counts = getattr(batch, "request_counts", None)
    done = (counts.completed + counts.failed) if counts is not None else 0
    return BatchState(
        str(batch.id),
        str(batch.status),
        _validation_errors(batch) if batch.status == "failed" else "",
        batch,
        done=done,
        total=counts.total if counts is not None else 0,
    )


def _validation_errors(batch: Any) -> str:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    parts = []
    for error in errors[:5]:
        where = f" line {error.line}" if getattr(error, "line", None) else ""
        parts.append(f"{error.code}{where}: {error.message}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more if parts else "failed validation"
