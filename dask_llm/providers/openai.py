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

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import openai
from langchain_openai.chat_models.base import BaseChatOpenAI

from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT, FLEX_REQUEST_TIMEOUT
from dask_llm.core.outcome import Announced
from dask_llm.core.usage import MODEL, Reported
from dask_llm.limits.headers import is_quota_429, positive_number
from dask_llm.providers.base import Provider, error_code, error_of

_PROMPT: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CACHED: Final = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
#: The ``service_tier`` of a request or answer body (JSON).
_SERVICE_TIER: Final = re.compile(rb'"service_tier"\s*:\s*"([^"]+)"')
_FINISH_LENGTH: Final = re.compile(rb'"finish_reason"\s*:\s*"length"')
_REFUSAL: Final = re.compile(rb'"refusal"\s*:\s*"')


class OpenAIProvider(Provider):
    """OpenAI's Chat Completions API through langchain-openai's ``BaseChatOpenAI``."""

    name = "openai"
    key_env = "OPENAI_API_KEY"
    key_field = "openai_api_key"
    status_errors = (openai.APIStatusError,)
    connection_errors = (openai.APIConnectionError,)
    validation_errors = (openai.APIResponseValidationError,)
    batch = True

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

    def is_quota_429(self, headers: Mapping[str, str] | None, body: bytes) -> bool:
        return is_quota_429(headers, error_code(body))

    def fatal(self, status: int, body: bytes) -> bool:
        return super().fatal(status, body) or (
            status == 429 and error_of(body)[0] == "insufficient_quota"
        )
