"""What a provider's prompt cache can reuse of a chain's prompt, known before any request.

OpenAI caches prompt prefixes of 1,024 tokens and more, in steps of 128
tokens (1,024, 1,152, 1,280...), and bills the prompt tokens it reads from
its cache at the cached-input price (``core.usage.Price``). A prefix is the
request's tools and response format, then its messages in order: for a
chain, the structured-output schema it sends, then the fixed text of its
prompt before the first row value (``chains.prompt``). Every row of a chain
shares that prefix; nothing after the first row value is shared.

Two uses:

* **The projection** (``estimate``): every call of a chain but its first
  reads the cacheable part of that prefix from the cache (the first one
  writes it). That is the most caching can give: OpenAI's cache is best
  effort (a prefix sent more than about 15 times a minute spills over to
  machines that have not cached it, and one unused for 5 to 10 minutes is
  evicted), so the projected cost is a lower bound for a cold or very fast
  job, and the pilot, which measures ``cached_tokens``, is the better guide.
* **The order check** (``enrich``): a fixed block of 1,024 tokens or more
  *after* a row value can never be cached; written before the row's values
  it would be, on every row but the first. ``enrich`` warns once per call
  (``PromptCacheWarning``), naming the chain.

Tokens are counted with ``preview.tokens.token_counter``, the estimate's own.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from dask_llm.chains.plan import Plan, PlannedChain
from dask_llm.chains.prompt import prompt_layout, schema_text
from dask_llm.preview.tokens import Counter, token_counter

#: The shortest prefix OpenAI caches, and the step of a cached prefix, in tokens.
MIN_CACHED_TOKENS: Final = 1024
STEP_CACHED_TOKENS: Final = 128


def cacheable(prefix_tokens: int) -> int:
    """Tokens of a ``prefix_tokens``-long fixed prefix a prompt cache can hold: 0 below
    1,024, else the 128-token step at or below it."""
    if prefix_tokens < MIN_CACHED_TOKENS:
        return 0
    steps = (prefix_tokens - MIN_CACHED_TOKENS) // STEP_CACHED_TOKENS
    return MIN_CACHED_TOKENS + steps * STEP_CACHED_TOKENS


def cached_per_call(pc: PlannedChain, count: Counter) -> int:
    """Prompt tokens of each call of ``pc`` a prompt cache can serve once it holds them."""
    layout = prompt_layout(pc.chain.runnable)
    if layout is None:
        return 0
    return cacheable(count(schema_text(pc.chain.runnable)) + count(layout.prefix))


class OutOfOrder(NamedTuple):
    """A fixed block of a chain's prompt that comes after a row value (``out_of_order``)."""

    chain: str
    #: Tokens of the longest fixed block after a row value.
    block_tokens: int
    #: What a cache can hold of the prefix as written, and with that block moved before.
    cached_now: int
    cached_moved: int


def out_of_order(plan: Plan) -> list[OutOfOrder]:
    """The chains whose prompt puts a row value before a fixed block long enough to cache."""
    count, _ = token_counter()
    found = []
    for pc in plan.chains:
        try:
            runnable = pc.chain.runnable
        # A factory that cannot run here is reported where it runs, not by this check.
        except Exception:
            continue
        layout = prompt_layout(runnable)
        if layout is None or not layout.after_values:
            continue
        block = max(count(text) for text in layout.after_values)
        if block < MIN_CACHED_TOKENS:
            continue
        prefix = count(schema_text(runnable)) + count(layout.prefix)
        found.append(OutOfOrder(pc.name, block, cacheable(prefix), cacheable(prefix + block)))
    return found
