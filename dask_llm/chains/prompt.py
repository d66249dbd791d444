"""A chain's prompt as a provider's prompt cache sees it: fixed text and row values, in order.

OpenAI (and the simulator) cache the longest prompt *prefix* they have seen
recently: only the text before the first row value can be shared by every
row. ``prompt_layout`` renders the chain's prompt template with a marker for
each variable and cuts the text at the markers, giving the fixed blocks and
where the row's values fall between them: the fixed prefix (what a cache
can reuse) and any fixed block after a value (what it cannot, in that
order). What tokens that makes, and what it saves, is the preview's
business (``preview.caching``); this module only reads the template.

The prompt is the chain's first step when it is a prompt template (as
``estimate`` renders it), else the first template in the runnable's graph.
A prompt that cannot be rendered with text markers (a ``MessagesPlaceholder``
of the row's messages, a template that validates its inputs), or a chain
with no template (Python code), has no layout: None, and nothing is claimed.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from langchain_core.prompts import BasePromptTemplate

from dask_llm.chains.graph import find

#: A variable's stand-in: control characters no template contains, so the cut is exact.
_MARK = "\x1fdask-llm-value-{}\x1f"
_MARKS = re.compile("\x1fdask-llm-value-\\d+\x1f")


@dataclass(frozen=True, slots=True)
class PromptLayout:
    """The rendered prompt cut at its row values: ``blocks[0]`` is the fixed text before the
    first value, ``blocks[k]`` the fixed text after the ``k``-th value."""

    blocks: tuple[str, ...]

    @property
    def prefix(self) -> str:
        """The fixed text before the first row value (the whole prompt when it has none)."""
        return self.blocks[0]

    @property
    def after_values(self) -> tuple[str, ...]:
        """The fixed blocks that come after a row value: no cache can share them."""
        return self.blocks[1:]


def prompt_layout(runnable: Any) -> PromptLayout | None:
    """The layout of ``runnable``'s prompt template; None when it has none it can render."""
    prompt = _prompt_of(runnable)
    if prompt is None:
        return None
    names = list(getattr(prompt, "input_variables", []) or [])
    marks = {name: _MARK.format(i) for i, name in enumerate(names)}
    try:
        text = str(prompt.format_prompt(**marks).to_string())
    # A template is the user's object: whatever it raises on text markers, it has no layout.
    except Exception:
        return None
    return PromptLayout(tuple(_MARKS.split(text)))


def schema_text(runnable: Any) -> str:
    """The structured-output schema ``runnable`` sends with each request (tools, response
    format): prompt tokens too, and the start of the prefix a prompt cache sees."""
    texts = []
    for binding in find(runnable, lambda x: hasattr(x, "kwargs") and hasattr(x, "bound")):
        for key in ("tools", "response_format"):
            if key in binding.kwargs:
                with contextlib.suppress(TypeError):
                    texts.append(json.dumps(binding.kwargs[key], default=str))
    return "".join(texts)


def _prompt_of(runnable: Any) -> BasePromptTemplate | None:
    first = getattr(runnable, "first", runnable)
    if isinstance(first, BasePromptTemplate):
        return first
    found = find(runnable, lambda x: isinstance(x, BasePromptTemplate))
    return found[0] if found else None
