"""Per-event-loop HTTP clients for the models inside a chain, with the job's throttle in them.

An async HTTP client belongs to the event loop it first ran on.
langchain-openai caches one default ``httpx`` async client per base URL for
the whole process, so a chain used on one loop and then on another fails with
``RuntimeError: Event loop is closed`` (or "bound to a different event
loop"), and the user's own ``asyncio.run(chain.ainvoke(...))`` breaks once
our loop has touched that shared client.

So each partition's loop gets private copies of the chain's models, with an
``AsyncOpenAI`` of its own built by ``with_options`` (same key, base URL,
headers, organization) on the aiohttp transport (``openai.DefaultAioHttpClient``,
measured 1.8x the calls/s of httpx here), SDK retries off (dask-llm retries,
one layer only), and closes them when the loop ends. The user's model
objects and their clients are never touched. A model given its own
``http_async_client`` by the user keeps it (and is not throttled): that
client is the user's choice.

The job's ``Throttle`` wraps the client's transport: every HTTP request waits
for a concurrency slot and a paced start, and every response's status and
``x-ratelimit-*`` headers feed back into it. Wrapping ``_transport`` of the
httpx client is the one private attribute we touch; ``tests/test_transport``
fails loudly if the SDK moves it.
"""

from __future__ import annotations

import re
from typing import Any, cast

import openai
from langchain_openai.chat_models.base import BaseChatOpenAI

from dask_llm import _usage as usage
from dask_llm._graph import rewrite
from dask_llm._limits import Throttle

_MAX_TOKENS = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d+)')


class ThrottledTransport:
    """An httpx async transport that asks the throttle before each request."""

    def __init__(self, inner: Any, throttle: Throttle) -> None:
        self.inner = inner
        self.throttle = throttle

    async def handle_async_request(self, request: Any) -> Any:
        body = request.content if request.method == "POST" else b""
        match = _MAX_TOKENS.search(body) if body else None
        estimate = self.throttle.estimate_tokens(len(body), int(match.group(1)) if match else None)
        started = await self.throttle.acquire(estimate)
        status = None
        headers = None
        try:
            response = await self.inner.handle_async_request(request)
            status = response.status_code
            headers = response.headers
            recorder = usage.current.get()
            if recorder is not None and status < 400:
                response.stream = usage.tap(response.stream, recorder)
            return response
        finally:
            self.throttle.observe(started, status, headers)
            if status is not None and status < 400:
                self.throttle.record_estimate(estimate)
            self.throttle.release()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> ThrottledTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.inner.__aexit__(*args)


class LoopClients:
    """The clients opened for one event loop; ``aclose()`` them before the loop ends."""

    __slots__ = ("_clients", "_throttle")

    def __init__(self, throttle: Throttle | None = None) -> None:
        self._clients: list[openai.AsyncOpenAI] = []
        self._throttle = throttle

    def localize(self, runnable: Any, *, timeout: float | None = None) -> Any:
        """A copy of ``runnable`` whose OpenAI models use clients owned by this loop."""

        def visit(obj: Any) -> Any:
            if isinstance(obj, BaseChatOpenAI):
                return self._local_model(obj, timeout=timeout)
            return NotImplemented

        return rewrite(runnable, visit)

    def _local_model(self, model: Any, *, timeout: float | None) -> Any:
        root = model.root_async_client
        if root is None or model.http_async_client is not None:
            return model
        # The SDK's aiohttp client allows 1,000 connections: above any sane concurrency.
        http = openai.DefaultAioHttpClient()
        if self._throttle is not None:
            http._transport = cast(Any, ThrottledTransport(http._transport, self._throttle))
        options: dict[str, Any] = {"http_client": http, "max_retries": 0}
        if timeout is not None:
            options["timeout"] = timeout
        client = root.with_options(**options)
        self._clients.append(client)
        return model.model_copy(
            update={"root_async_client": client, "async_client": client.chat.completions}
        )

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()
