"""Tokens and dollars: exact where the provider reported them, null where it did not.

Usage comes from two places, in this order of trust:

1. **The wire.** The job's transport (``transport.pipeline``) reads the ``usage``
   block of every answer it receives for the chain call running in this
   context (an ``Attempt`` in a ``ContextVar``). This sees what LangChain
   would not: answers whose parsing then failed, and every retry.
2. **LangChain's ``usage_metadata``**, through a callback, for chat models
   whose requests do not pass our transport (other providers, a model with
   the user's own ``http_async_client``, models built inside Python code).

A chain call's usage is the wire's when every model answer passed the
transport; LangChain's when none did and every answer carried
``usage_metadata``; otherwise **unknown**: tokens and cost are null for that
row, never a guessed zero. Answers served from the cache cost nothing in
this run.

Prices are US dollars per million tokens, as OpenAI lists them for standard
(non-batch, uncached) use. They change: the table says when it was taken,
``PRICES`` is read-only, and ``prices=`` on ``enrich`` overrides or extends
it. A model that is not in the table gets a null cost, never a guessed one.
"""

from __future__ import annotations

import contextvars
import math
import re
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from langchain_core.callbacks import BaseCallbackHandler

PRICES_AS_OF = "2025-08-07"

#: The Batch API's price as a share of the online price, for entries without their own.
BATCH_DISCOUNT: Final = 0.5

USAGE_COLUMNS = ("llm_input_tokens", "llm_output_tokens", "llm_cost_usd")

#: model -> (input, output) USD per 1M tokens. Read-only: pass ``prices=`` to change it.
PRICES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
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
)

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def check_prices(prices: Mapping[str, Any] | None) -> None:
    """Refuse a ``prices=`` table that would fail or mislead after a paid call.

    Each entry is ``(input, output)`` or ``(input, output, batch_input, batch_output)``,
    US dollars per million tokens, each a finite number >= 0.
    """
    for model, price in (prices or {}).items():
        what = f"prices={{{model!r}: {price!r}}}"
        if not isinstance(price, tuple | list) or not all(
            isinstance(p, int | float) and not isinstance(p, bool) for p in price
        ):
            raise ValueError(
                f"{what}: a price is a tuple of numbers, (input, output) US dollars per "
                "million tokens, or (input, output, batch_input, batch_output)"
            )
        if len(price) not in (2, 4):
            raise ValueError(
                f"{what} has {len(price)} number(s); give 2 or 4: (input, output) US dollars "
                "per million tokens, or (input, output, batch_input, batch_output)"
            )
        if not all(math.isfinite(p) and p >= 0 for p in price):
            raise ValueError(f"{what}: every price must be a finite number >= 0")


def price_of(
    model: str | None,
    prices: Mapping[str, tuple[float, ...]] | None = None,
    *,
    batch: bool = False,
) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for ``model``, or None when unknown.

    ``batch``: the Batch API's price: an entry's third and fourth numbers when it
    has them (``prices={"m": (in, out, batch_in, batch_out)}``), else
    ``BATCH_DISCOUNT`` of the online price (OpenAI's Batch API is half price for
    every model in ``PRICES``).
    """
    price = _online_or_batch(model, prices)
    if price is None:
        return None
    if batch:
        if len(price) >= 4:
            return (float(price[2]), float(price[3]))
        return (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
    return (price[0], price[1])


def cost_usd(price: tuple[float, ...], input_tokens: float, output_tokens: float) -> float:
    """US dollars for ``input_tokens`` and ``output_tokens`` at ``price`` (``price_of``: USD
    per million tokens, input then output). The one cost formula of dask-llm: the budget's
    worst case, the settled cost, the run record, the row's cost and the estimate."""
    return (input_tokens * price[0] + output_tokens * price[1]) / 1e6


def _online_or_batch(
    model: str | None, prices: Mapping[str, tuple[float, ...]] | None
) -> tuple[float, ...] | None:
    if not model:
        return None
    for table in (prices or {}, PRICES):
        if model in table:
            return table[model]
    undated = _DATED.sub("", model)
    for table in (prices or {}, PRICES):
        if undated in table:
            return table[undated]
    return None


class Usage:
    """Tokens and cost of one or more calls; ``unknown`` when some usage was never reported."""

    __slots__ = ("calls", "cost", "input_tokens", "output_tokens", "unknown", "unpriced")

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.unpriced = False  # some tokens came from a model without a price
        self.unknown = False  # some paid answer reported no usage at all
        self.calls = 0  # paid answers

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        self.unpriced = self.unpriced or other.unpriced
        self.unknown = self.unknown or other.unknown
        self.calls += other.calls

    def charge(
        self,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        prices: Mapping[str, tuple[float, ...]] | None,
        *,
        batch: bool = False,
    ) -> None:
        self.calls += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        price = price_of(model, prices, batch=batch)
        if price is None:
            self.unpriced = True
        else:
            self.cost += cost_usd(price, input_tokens, output_tokens)

    @property
    def tokens_in(self) -> int | None:
        return None if self.unknown else self.input_tokens

    @property
    def tokens_out(self) -> int | None:
        return None if self.unknown else self.output_tokens

    @property
    def cost_usd(self) -> float | None:
        return None if self.unknown or self.unpriced else self.cost


class Attempt:
    """What one attempt of one chain call sent and received (the transport fills it)."""

    __slots__ = ("cached", "keys", "paid_answers", "prices", "refresh", "usage")

    def __init__(
        self, prices: Mapping[str, tuple[float, ...]] | None, refresh: frozenset[str]
    ) -> None:
        self.prices = prices
        self.refresh = refresh  # request keys whose cached answers must not be reused
        self.keys: list[str] = []  # request keys answered in this attempt
        self.cached = 0  # answers from the cache or from an identical request in flight
        self.paid_answers = 0
        self.usage = Usage()

    def paid(
        self,
        model: str | None,
        prompt: int | None,
        completion: int | None,
        *,
        batch: bool = False,
    ) -> None:
        self.paid_answers += 1
        if prompt is None:
            self.usage.unknown = True
            self.usage.calls += 1
        else:
            self.usage.charge(model, prompt, completion or 0, self.prices, batch=batch)


#: The attempt of the chain call running in this context: the transport adds to it.
current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "dask_llm_attempt", default=None
)

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
#: The ``model`` of a request or answer body (JSON).
MODEL: Final = re.compile(rb'"model"\s*:\s*"([^"]+)"')
#: A request body's ``max_tokens`` / ``max_completion_tokens``.
MAX_TOKENS: Final = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d+)')


def read_usage(body: bytes) -> tuple[str | None, int | None, int | None]:
    """(model, prompt tokens, completion tokens) of a Chat Completions body (JSON or SSE).

    The last ``usage`` in the body counts (a stream sends it in its final chunk);
    None where the body reports none.
    """
    prompt = _PROMPT.findall(body)
    model = MODEL.search(body)
    name = model.group(1).decode() if model else None
    if not prompt:
        return name, None, None
    completion = _COMPLETION.findall(body)
    return name, int(prompt[-1]), int(completion[-1]) if completion else 0


class UsageCallback(BaseCallbackHandler):
    """Reads ``usage_metadata`` off the chat model answers LangChain reports."""

    run_inline = True  # no executor hop per callback in async chains
    raise_error = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers = 0
        self.reported: list[tuple[str | None, int, int]] = []
        self.unreported = 0

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        output = response.llm_output or {}
        for generations in response.generations:
            for gen in generations:
                message = getattr(gen, "message", None)
                meta = getattr(message, "usage_metadata", None)
                model = None
                info = getattr(message, "response_metadata", None) or {}
                model = info.get("model_name") or info.get("model") or output.get("model_name")
                with self._lock:
                    self.answers += 1
                    if meta:
                        self.reported.append(
                            (
                                model,
                                int(meta.get("input_tokens", 0)),
                                int(meta.get("output_tokens", 0)),
                            )
                        )
                    else:
                        self.unreported += 1


def settle(attempt: Attempt, callback: UsageCallback | None) -> Usage:
    """The usage of one attempt: the wire's, LangChain's, or unknown (see the module docstring)."""
    usage = attempt.usage
    if callback is None:
        return usage
    seen_on_wire = attempt.paid_answers + attempt.cached
    untapped = callback.answers - seen_on_wire
    if untapped <= 0:
        return usage
    result = Usage()
    if seen_on_wire == 0 and callback.unreported == 0:
        for model, prompt, completion in callback.reported:
            result.charge(model, prompt, completion, attempt.prices)
    else:
        result.add(usage)
        result.calls += untapped
        result.unknown = True
    return result
