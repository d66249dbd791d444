"""Rewriting a LangChain runnable graph.

Runnables compose as pydantic models (``RunnableSequence.first/middle/last``,
``RunnableBinding.bound``, ``RunnableParallel.steps__``, fallbacks, branches,
...). Rather than knowing every composite type, we walk pydantic fields and
the lists, tuples and dicts inside them, and copy only the path from the root
to whatever a visitor replaced: the user's own objects are never mutated.

Plain-Python runnables (``RunnableLambda``) are leaves: a model captured in a
closure cannot be found, and is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic
from langchain_core.runnables import Runnable

#: Fields of an OpenAI or Anthropic chat model that hold transport objects or the API key:
#: never part of a fingerprint, never shipped to a worker (rebuilt there from its environment).
CLIENT_FIELDS = frozenset(
    {
        "client",
        "async_client",
        "root_client",
        "root_async_client",
        "http_client",
        "http_async_client",
        "openai_api_key",
        "anthropic_api_key",
    }
)

Visitor = Callable[[Any], Any]
"""Returns a replacement for an object, or ``NotImplemented`` to descend into it."""


def rewrite(obj: Any, visit: Visitor) -> Any:
    """Return ``obj`` with every sub-object the visitor replaces swapped out."""
    memo: dict[int, Any] = {}
    return _rewrite(obj, visit, memo)


def _rewrite(obj: Any, visit: Visitor, memo: dict[int, Any]) -> Any:
    key = id(obj)
    if key in memo:
        return memo[key]
    replaced = visit(obj)
    if replaced is not NotImplemented:
        memo[key] = replaced
        return replaced
    result = obj
    if isinstance(obj, pydantic.BaseModel):
        update = {}
        for name in type(obj).model_fields:
            value = getattr(obj, name, None)
            if _may_contain(value):
                new = _rewrite(value, visit, memo)
                if new is not value:
                    update[name] = new
        if update:
            result = obj.model_copy(update=update)
    elif isinstance(obj, list | tuple):
        items = [_rewrite(x, visit, memo) for x in obj]
        if any(a is not b for a, b in zip(items, obj, strict=True)):
            result = type(obj)(items) if isinstance(obj, list) else tuple(items)
    elif isinstance(obj, dict):
        new_items = {k: _rewrite(v, visit, memo) for k, v in obj.items()}
        if any(new_items[k] is not obj[k] for k in obj):
            result = type(obj)(new_items) if type(obj) is dict else new_items
    memo[key] = result
    return result


def _may_contain(value: Any) -> bool:
    # Runnables that are not pydantic models (RunnableLambda, a configurable
    # init_chat_model) are leaves, but the visitor must still see them.
    return isinstance(value, pydantic.BaseModel | list | tuple | dict | Runnable) or hasattr(
        value, "_dask_llm_recipe"
    )


def find(obj: Any, predicate: Callable[[Any], bool]) -> list[Any]:
    """Every distinct sub-object of ``obj`` for which ``predicate`` holds."""
    found: dict[int, Any] = {}

    def visit(x: Any) -> Any:
        if predicate(x):
            found[id(x)] = x
            return x
        return NotImplemented

    rewrite(obj, visit)
    return list(found.values())
