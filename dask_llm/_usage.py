"""Tokens and dollars: per-call usage from LangChain callbacks, priced from a dated table.

Usage is read from what the provider reports (``usage_metadata`` of each
chat model response), summed over every attempt of a call (a retried
schema violation was paid for too), and over the chains of a row.

Prices are US dollars per million tokens, as OpenAI lists them for standard
(non-batch, uncached) use. They change: the table says when it was taken,
and ``prices=`` on ``enrich`` overrides or extends it. A model that is not
in the table gets a null cost, never a guessed one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

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


class UsageRecorder(BaseCallbackHandler):
    """Adds up the usage of every chat model response in one chain call (attempts included)."""

    run_inline = True  # called on the loop's thread, not via an executor hop
    raise_error = False

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.usage = Usage()
        self._prices = prices

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        llm_output = response.llm_output or {}
        model = llm_output.get("model_name")
        # n=1: the first message with usage metadata carries the request's usage.
        for generations in response.generations:
            for gen in generations:
                message = getattr(gen, "message", None)
                meta = getattr(message, "usage_metadata", None)
                if meta:
                    model = (getattr(message, "response_metadata", None) or {}).get(
                        "model_name", model
                    )
                    self._add(model, meta.get("input_tokens", 0), meta.get("output_tokens", 0))
                    return
        token_usage = llm_output.get("token_usage") or {}
        if token_usage:
            self._add(
                model, token_usage.get("prompt_tokens", 0), token_usage.get("completion_tokens", 0)
            )

    def _add(self, model: str | None, input_tokens: Any, output_tokens: Any) -> None:
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
