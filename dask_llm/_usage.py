"""Tokens and dollars: per-call usage read off the wire, priced from a dated table.

Usage is what the provider reports in each response's ``usage`` block, read
by the HTTP transport of the clients dask-llm opens (``_transport``) as the
body streams past, and credited to the chain call running in that context
(a ``ContextVar``). LangChain callbacks would miss the responses whose
parsing failed (a structured answer that broke its schema still cost
tokens) and cost a callback-manager round per call. Usage is summed over
every attempt of a call and over the chains of a row.

Prices are US dollars per million tokens, as OpenAI lists them for standard
(non-batch, uncached) use. They change: the table says when it was taken,
and ``prices=`` on ``enrich`` overrides or extends it. A model that is not
in the table gets a null cost, never a guessed one.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

PRICES_AS_OF = "2025-08-07"

USAGE_COLUMNS = ("llm_input_tokens", "llm_output_tokens", "llm_cost_usd")

#: model -> (input, output) USD per 1M tokens.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def price_of(
    model: str | None, prices: Mapping[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for ``model``, or None when unknown."""
    if not model:
        return None
    table = {**PRICES, **(prices or {})}
    if model in table:
        return table[model]
    undated = _DATED.sub("", model)
    return table.get(undated)


class Usage:
    """Tokens and cost of one or more calls."""

    __slots__ = ("calls", "cost", "input_tokens", "output_tokens", "unpriced")

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.unpriced = False  # some tokens came from a model without a price
        self.calls = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        self.unpriced = self.unpriced or other.unpriced
        self.calls += other.calls

    @property
    def cost_usd(self) -> float | None:
        return None if self.unpriced else self.cost


#: The usage of the chain call running in this context: the transport adds to it.
current: contextvars.ContextVar[UsageRecorder | None] = contextvars.ContextVar(
    "dask_llm_usage", default=None
)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]+)"')


def record_body(recorder: UsageRecorder, body: bytes) -> None:
    """Add the ``usage`` of a Chat Completions response body (JSON or SSE) to ``recorder``."""
    prompt = _PROMPT.findall(body)
    if not prompt:
        return
    completion = _COMPLETION.findall(body)
    model = _MODEL.search(body)
    recorder.add(
        model.group(1).decode() if model else None,
        int(prompt[-1]),
        int(completion[-1]) if completion else 0,
    )


def tap(stream: Any, recorder: UsageRecorder) -> Any:
    """Wrap an httpx response stream so its usage is recorded once it has been read."""
    base = next((c for c in type(stream).__mro__ if c.__name__ == "AsyncByteStream"), None)
    if base is None:  # an unknown HTTP stack: no usage rather than a broken call
        return stream
    return _tap_class(base)(stream, recorder)


_TAPS: dict[type, type] = {}


def _tap_class(base: type) -> type:
    cls = _TAPS.get(base)
    if cls is None:

        class UsageTap(base):
            def __init__(self, inner: Any, recorder: UsageRecorder) -> None:
                self.inner = inner
                self.recorder = recorder

            async def __aiter__(self) -> AsyncIterator[bytes]:
                chunks = []
                async for chunk in self.inner:
                    chunks.append(chunk)
                    yield chunk
                record_body(self.recorder, b"".join(chunks))

            async def aclose(self) -> None:
                await self.inner.aclose()

        cls = _TAPS[base] = UsageTap
    return cls


class UsageRecorder:
    """Adds up the usage of every model response of one chain call (attempts included)."""

    __slots__ = ("_prices", "usage")

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.usage = Usage()
        self._prices = prices

    def add(self, model: str | None, input_tokens: Any, output_tokens: Any) -> None:
        input_tokens, output_tokens = int(input_tokens or 0), int(output_tokens or 0)
        usage = self.usage
        usage.calls += 1
        usage.input_tokens += input_tokens
        usage.output_tokens += output_tokens
        price = price_of(model, self._prices)
        if price is None:
            usage.unpriced = True
        else:
            usage.cost += (input_tokens * price[0] + output_tokens * price[1]) / 1e6
