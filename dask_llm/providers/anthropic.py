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
* **Limits.** ``anthropic-ratelimit-requests-limit`` announces the rpm and
  ``anthropic-ratelimit-input-tokens-limit`` (else ``-tokens-limit``) the tpm
  the throttle paces to: the throttle's token estimate of a request counts
  its prompt and its ``max_tokens``, so pacing to the input limit is on the
  safe side; the output limit is not paced apart (its 429s slow the job as
  any quota 429). Anthropic answers 429 ``rate_limit_error`` only for its
  limits (with ``retry-after``): every such 429 is the quota's. Overload is
  529 ``overloaded_error``, retried and never fatal.
* **Fatal.** 401, 403, 404, and the 400 "credit balance is too low".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import anthropic
from langchain_anthropic import ChatAnthropic

from dask_llm.core.config import DEFAULT_REQUEST_TIMEOUT
from dask_llm.core.outcome import Announced
from dask_llm.core.usage import MODEL, Reported
from dask_llm.limits.headers import positive_number
from dask_llm.providers.base import Provider, error_of

_INPUT: Final = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT: Final = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_CACHE_READ: Final = re.compile(rb'"cache_read_input_tokens"\s*:\s*(\d+)')
_CACHE_WRITE: Final = re.compile(rb'"cache_creation_input_tokens"\s*:\s*(\d+)')
_STOP_MAX_TOKENS: Final = re.compile(rb'"stop_reason"\s*:\s*"max_tokens"')
_STOP_REFUSAL: Final = re.compile(rb'"stop_reason"\s*:\s*"refusal"')
_HEADER: Final = "anthropic-ratelimit-"


class AnthropicProvider(Provider):
    """Anthropic's Messages API through langchain-anthropic's ``ChatAnthropic``."""

    name = "anthropic"
    key_env = "ANTHROPIC_API_KEY"
    key_field = "anthropic_api_key"
    status_errors = (anthropic.APIStatusError,)
    connection_errors = (anthropic.APIConnectionError,)
    validation_errors = (anthropic.APIResponseValidationError,)

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
        )

    def is_quota_429(self, headers: Mapping[str, str] | None, body: bytes) -> bool:
        code, _ = error_of(body)
        return code in (None, "rate_limit_error")

    def fatal(self, status: int, body: bytes) -> bool:
        if super().fatal(status, body):
            return True
        _, message = error_of(body)
        return status == 400 and "credit balance" in message.lower()
