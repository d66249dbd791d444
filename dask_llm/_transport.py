"""Per-event-loop HTTP clients for the models inside a chain.

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
``http_async_client`` by the user keeps it: that client is the user's choice.
"""

from __future__ import annotations

from typing import Any

import openai
from langchain_openai.chat_models.base import BaseChatOpenAI

from dask_llm._graph import rewrite


class LoopClients:
    """The clients opened for one event loop; ``aclose()`` them before the loop ends."""

    __slots__ = ("_clients",)

    def __init__(self) -> None:
        self._clients: list[openai.AsyncOpenAI] = []

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
        options: dict[str, Any] = {"http_client": openai.DefaultAioHttpClient(), "max_retries": 0}
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
