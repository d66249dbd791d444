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

Prices are US dollars per million tokens, as the providers list them: input,
cached input (prompt tokens read from the provider's prompt cache: OpenAI's
``usage.prompt_tokens_details.cached_tokens``, Anthropic's
``cache_read_input_tokens``), cache writes (Anthropic's
``cache_creation_input_tokens``, billed above the input price) and output,
for standard (online, non-Flex) use. The Batch API and Flex processing are billed at
their own prices (half, for every model here, unless an entry says
otherwise); a tier's cached input costs its input price times the model's
cached share (``cached_input / input``). They change: the table says when
it was taken, ``PRICES`` is read-only, and ``prices=`` on ``enrich``
overrides or extends it. A model that is not in the table gets a null cost,
never a guessed one.
"""

from __future__ import annotations

import contextvars
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from langchain_core.callbacks import BaseCallbackHandler

PRICES_AS_OF = "2025-08-07"
#: When the Claude entries of ``PRICES`` were taken (Anthropic's price list).
CLAUDE_PRICES_AS_OF = "2025-10-15"

#: The Batch API's price as a share of the online price, for entries without their own.
BATCH_DISCOUNT: Final = 0.5

USAGE_COLUMNS = ("llm_input_tokens", "llm_output_tokens", "llm_cost_usd")

#: How an answer was served, for its price: online at list price, the Batch API, Flex.
Tier = Literal["default", "batch", "flex"]


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, US dollars per million tokens.

    ``input`` and ``output`` are the online (list) prices. ``cached_input`` is
    what a prompt token read from the provider's prompt cache costs (None: the
    input price, as for a model without prompt caching); ``cache_write`` what a
    prompt token written to it costs (Anthropic's 5-minute cache writes; None:
    the input price, as OpenAI's automatic caching bills them). ``batch_*`` are the
    Batch API's (None: ``BATCH_DISCOUNT`` of the online price); ``flex_*`` are
    Flex processing's (None: the Batch API's, as OpenAI bills Flex).
    """

    input: float
    output: float
    cached_input: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None
    flex_input: float | None = None
    flex_output: float | None = None
    cache_write: float | None = None

    def rates(self, tier: Tier = "default") -> Rates:
        """The (input, output, cached input) prices of answers served by ``tier``."""
        cached = self.input if self.cached_input is None else self.cached_input
        written = self.input if self.cache_write is None else self.cache_write
        if tier == "default":
            return Rates(self.input, self.output, cached, written)
        batch_in = self.input * BATCH_DISCOUNT if self.batch_input is None else self.batch_input
        batch_out = self.output * BATCH_DISCOUNT if self.batch_output is None else self.batch_output
        if tier == "flex":
            batch_in = batch_in if self.flex_input is None else self.flex_input
            batch_out = batch_out if self.flex_output is None else self.flex_output
        share = cached / self.input if self.input else 1.0
        write_share = written / self.input if self.input else 1.0
        return Rates(batch_in, batch_out, batch_in * share, batch_in * write_share)


class Rates(NamedTuple):
    """US dollars per million tokens of one model served by one tier (``price_of``)."""

    input: float
    output: float
    cached_input: float
    cache_write: float


#: model -> ``Price`` (input, output, cached input, cache write; USD per 1M tokens), as OpenAI
#: lists them on ``PRICES_AS_OF`` and Anthropic on ``CLAUDE_PRICES_AS_OF`` (5-minute cache
#: writes at 1.25x the input price, cache reads at 0.1x). Read-only: pass ``prices=``.
PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "gpt-5": Price(1.25, 10.00, cached_input=0.125),
        "gpt-5-mini": Price(0.25, 2.00, cached_input=0.025),
        "gpt-5-nano": Price(0.05, 0.40, cached_input=0.005),
        "gpt-4.1": Price(2.00, 8.00, cached_input=0.50),
        "gpt-4.1-mini": Price(0.40, 1.60, cached_input=0.10),
        "gpt-4.1-nano": Price(0.10, 0.40, cached_input=0.025),
        "gpt-4o": Price(2.50, 10.00, cached_input=1.25),
        "gpt-4o-mini": Price(0.15, 0.60, cached_input=0.075),
        "o3": Price(2.00, 8.00, cached_input=0.50),
        "o4-mini": Price(1.10, 4.40, cached_input=0.275),
        "gpt-4-turbo": Price(10.00, 30.00),  # no prompt caching
        "gpt-3.5-turbo": Price(0.50, 1.50),  # no prompt caching
        "claude-opus-4-1": Price(15.00, 75.00, cached_input=1.50, cache_write=18.75),
        "claude-opus-4": Price(15.00, 75.00, cached_input=1.50, cache_write=18.75),
        "claude-sonnet-4-5": Price(3.00, 15.00, cached_input=0.30, cache_write=3.75),
        "claude-sonnet-4": Price(3.00, 15.00, cached_input=0.30, cache_write=3.75),
        "claude-3-7-sonnet": Price(3.00, 15.00, cached_input=0.30, cache_write=3.75),
        "claude-haiku-4-5": Price(1.00, 5.00, cached_input=0.10, cache_write=1.25),
        "claude-3-5-haiku": Price(0.80, 4.00, cached_input=0.08, cache_write=1.00),
        "claude-3-haiku": Price(0.25, 1.25, cached_input=0.03, cache_write=0.30),
    }
)

#: A dated snapshot's suffix (OpenAI's ``-2024-07-18``, Anthropic's ``-20250929``) or an alias's.
_DATED = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_FIELDS: Final = tuple(f.name for f in fields(Price))
_SHAPES = (
    "numbers, US dollars per million tokens: (input, output), (input, output, batch_input, "
    "batch_output), or a mapping such as {'input': 0.15, 'cached_input': 0.075, "
    "'output': 0.6} (keys: " + ", ".join(_FIELDS) + ")"
)

#: What ``prices=`` takes per model: a ``Price``, a 2- or 4-tuple, or a mapping of its fields.
PriceEntry = Price | tuple[float, ...] | Mapping[str, float]


def as_price(entry: Any) -> Price:
    """The ``Price`` of a ``prices=`` entry (see ``check_prices`` for the shapes)."""
    if isinstance(entry, Price):
        return entry
    if isinstance(entry, Mapping):
        return Price(**{k: float(v) for k, v in entry.items()})
    if len(entry) == 4:
        return Price(
            float(entry[0]),
            float(entry[1]),
            batch_input=float(entry[2]),
            batch_output=float(entry[3]),
        )
    return Price(float(entry[0]), float(entry[1]))


def check_prices(prices: Mapping[str, Any] | None) -> None:
    """Refuse a ``prices=`` table that would fail or mislead after a paid call.

    Each entry is ``(input, output)``, ``(input, output, batch_input, batch_output)``,
    a mapping of ``Price``'s fields (``input`` and ``output`` required) or a ``Price``:
    US dollars per million tokens, each a finite number >= 0.
    """
    for model, price in (prices or {}).items():
        what = f"prices={{{model!r}: {price!r}}}"
        if isinstance(price, Price):
            numbers: list[Any] = [getattr(price, f) for f in _FIELDS]
            numbers = [p for p in numbers if p is not None]
        elif isinstance(price, Mapping):
            unknown = sorted(set(map(str, price)) - set(_FIELDS))
            if unknown:
                raise ValueError(
                    f"{what}: unknown key(s) {', '.join(unknown)}; a price is {_SHAPES}"
                )
            missing = [k for k in ("input", "output") if k not in price]
            if missing:
                raise ValueError(f"{what}: needs {' and '.join(missing)}; a price is {_SHAPES}")
            numbers = list(price.values())
        elif isinstance(price, tuple | list):
            numbers = list(price)
            if len(numbers) not in (2, 4) and all(_is_number(p) for p in numbers):
                raise ValueError(
                    f"{what} has {len(numbers)} number(s); give 2 or 4: a price is {_SHAPES}"
                )
        else:
            raise ValueError(f"{what}: a price is {_SHAPES}")
        if not all(_is_number(p) for p in numbers):
            raise ValueError(f"{what}: a price is {_SHAPES}")
        if not all(math.isfinite(p) and p >= 0 for p in numbers):
            raise ValueError(f"{what}: every price must be a finite number >= 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def price_of(
    model: str | None,
    prices: Mapping[str, PriceEntry] | None = None,
    *,
    batch: bool = False,
    tier: Tier = "default",
) -> Rates | None:
    """(input, output, cached input) USD per 1M tokens for ``model``, or None when unknown.

    ``tier``: the prices of answers served by the Batch API or by Flex processing
    (``batch=True`` is ``tier="batch"``); see ``Price`` for the defaults.
    """
    price = _price_entry(model, prices)
    if price is None:
        return None
    return price.rates("batch" if batch else tier)


def cost_usd(
    price: tuple[float, ...],
    input_tokens: float,
    output_tokens: float,
    cached_tokens: float = 0,
    cache_write_tokens: float = 0,
) -> float:
    """US dollars for ``input_tokens`` (of which ``cached_tokens`` were read from the prompt
    cache and ``cache_write_tokens`` written to it) and ``output_tokens`` at ``price``
    (``price_of``: USD per million tokens, input, output, then cached input and cache write).
    The one cost formula of dask-llm: the budget's worst case, the settled cost, the run
    record, the row's cost and the estimate."""
    cached = min(cached_tokens, input_tokens) if cached_tokens else 0
    written = min(cache_write_tokens, input_tokens - cached) if cache_write_tokens else 0
    cached_rate = price[2] if len(price) > 2 else price[0]
    write_rate = price[3] if len(price) > 3 else price[0]
    return (
        (input_tokens - cached - written) * price[0]
        + cached * cached_rate
        + written * write_rate
        + output_tokens * price[1]
    ) / 1e6


def _price_entry(model: str | None, prices: Mapping[str, PriceEntry] | None) -> Price | None:
    if not model:
        return None
    undated = _DATED.sub("", model)
    for name in (model, undated):
        if prices and name in prices:
            return as_price(prices[name])
        if name in PRICES:
            return PRICES[name]
    return None


class Usage:
    """Tokens and cost of one or more calls; ``unknown`` when some usage was never reported.

    ``cached_tokens`` (of ``input_tokens``) were read from the provider's prompt cache,
    ``cache_write_tokens`` (of ``input_tokens``) written to it (Anthropic bills them apart);
    ``saved`` is what that cache saved, in US dollars, against paying them as input.
    ``flex_calls`` and ``batch_calls`` of the ``calls`` were served by Flex processing
    and by the Batch API; the others at list price.
    """

    __slots__ = (
        "batch_calls",
        "cache_write_tokens",
        "cached_tokens",
        "calls",
        "cost",
        "flex_calls",
        "input_tokens",
        "output_tokens",
        "saved",
        "unknown",
        "unpriced",
    )

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.cache_write_tokens = 0
        self.cost = 0.0
        self.saved = 0.0
        self.unpriced = False  # some tokens came from a model without a price
        self.unknown = False  # some paid answer reported no usage at all
        self.calls = 0  # paid answers
        self.flex_calls = 0  # paid answers served by Flex
        self.batch_calls = 0  # paid answers served by the Batch API

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cost += other.cost
        self.saved += other.saved
        self.unpriced = self.unpriced or other.unpriced
        self.unknown = self.unknown or other.unknown
        self.calls += other.calls
        self.flex_calls += other.flex_calls
        self.batch_calls += other.batch_calls

    def charge(
        self,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        prices: Mapping[str, PriceEntry] | None,
        *,
        batch: bool = False,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        tier: Tier = "default",
    ) -> None:
        tier = "batch" if batch else tier
        self.count(tier)
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached_tokens
        self.cache_write_tokens += cache_write_tokens
        price = price_of(model, prices, tier=tier)
        if price is None:
            self.unpriced = True
        else:
            self.cost += cost_usd(
                price, input_tokens, output_tokens, cached_tokens, cache_write_tokens
            )
            self.saved += savings_usd(price, cached_tokens, cache_write_tokens)

    def count(self, tier: Tier) -> None:
        """One more paid answer, served by ``tier``."""
        self.calls += 1
        self.flex_calls += tier == "flex"
        self.batch_calls += tier == "batch"

    @property
    def tokens_in(self) -> int | None:
        return None if self.unknown else self.input_tokens

    @property
    def tokens_out(self) -> int | None:
        return None if self.unknown else self.output_tokens

    @property
    def cost_usd(self) -> float | None:
        return None if self.unknown or self.unpriced else self.cost


def savings_usd(price: Rates, cached_tokens: float, cache_write_tokens: float = 0) -> float:
    """US dollars the prompt cache saved at ``price``: on ``cached_tokens``, the input price
    they would have cost less the cached-input price they did; less what writing
    ``cache_write_tokens`` to it cost above the input price (Anthropic's writes: 1.25x)."""
    read = cached_tokens * (price.input - price.cached_input)
    return (read - cache_write_tokens * (price.cache_write - price.input)) / 1e6


class Attempt:
    """What one attempt of one chain call sent and received (the transport fills it)."""

    __slots__ = ("cached", "keys", "paid_answers", "prices", "refresh", "usage")

    def __init__(self, prices: Mapping[str, PriceEntry] | None, refresh: frozenset[str]) -> None:
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
        cached_tokens: int | None = None,
        cache_write_tokens: int | None = None,
        tier: Tier = "default",
    ) -> None:
        self.paid_answers += 1
        if prompt is None:
            self.usage.unknown = True
            self.usage.count("batch" if batch else tier)
        else:
            self.usage.charge(
                model,
                prompt,
                completion or 0,
                self.prices,
                batch=batch,
                cached_tokens=cached_tokens or 0,
                cache_write_tokens=cache_write_tokens or 0,
                tier=tier,
            )


#: The attempt of the chain call running in this context: the transport adds to it.
current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "dask_llm_attempt", default=None
)

#: The ``model`` of a request or answer body (JSON).
MODEL: Final = re.compile(rb'"model"\s*:\s*"([^"]+)"')
#: A request body's ``max_tokens`` / ``max_completion_tokens``.
MAX_TOKENS: Final = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d+)')


class Reported(NamedTuple):
    """What an answer body says about its usage, as its provider reads it
    (``providers.base.Provider.read``). Input tokens are the whole prompt, cache reads and
    writes included, whatever the provider's own field counts."""

    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    #: Prompt tokens read from the prompt cache.
    cached_tokens: int | None
    #: The tier that served it (``service_tier``: ``"default"``, ``"flex"``...), if it says.
    service_tier: str | None
    #: Prompt tokens written to the prompt cache (billed at ``Price.cache_write``).
    cache_write_tokens: int | None = None
    #: Cut at the request's ``max_tokens``.
    truncated: bool = False
    #: The model refused to answer.
    refused: bool = False


class UsageCallback(BaseCallbackHandler):
    """Reads ``usage_metadata`` off the chat model answers LangChain reports."""

    run_inline = True  # no executor hop per callback in async chains
    raise_error = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers = 0
        self.reported: list[tuple[str | None, int, int, int, int, Tier]] = []
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
                        # langchain-openai prefixes a Flex answer's details with "flex_".
                        details = meta.get("input_token_details") or {}
                        tier: Tier = "flex" if "flex" in details else "default"
                        cached = details.get("flex_cache_read" if tier == "flex" else "cache_read")
                        self.reported.append(
                            (
                                model,
                                int(meta.get("input_tokens", 0)),
                                int(meta.get("output_tokens", 0)),
                                int(cached or 0),
                                int(details.get("cache_creation") or 0),
                                tier,
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
        for model, prompt, completion, cached, written, tier in callback.reported:
            result.charge(
                model,
                prompt,
                completion,
                attempt.prices,
                cached_tokens=cached,
                cache_write_tokens=written,
                tier=tier,
            )
    else:
        result.add(usage)
        result.calls += untapped
        result.unknown = True
    return result
