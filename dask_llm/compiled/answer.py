"""Reading a chat completion straight into what the chain would have returned.

``read`` takes the answer's bytes and returns the chain's result as LangChain
would build it (a Pydantic object, a dict, the text, or include_raw's
``{"raw", "parsed", "parsing_error"}`` with the raw answer's text), or
``UNSURE``. It is deliberately narrow: it answers only when the answer is
the plain case (one choice, finished normally, no refusal, the content or
the one tool call the chain asked for, JSON that the standard library reads
as it is) where LangChain's own reading is known to give the same value.
Everything else (an error body, a truncated or filtered answer, a refusal,
JSON that needs LangChain's lenient reading, a value that fails its schema)
is ``UNSURE``, and the caller hands the answer to LangChain itself, so that
the row gets LangChain's own value or LangChain's own error, text for text.
"""

from __future__ import annotations

import json
from typing import Any

from dask_llm.compiled.shape import Shape

UNSURE: Any = object()

_TOOL_FINISH = frozenset({"stop", "tool_calls"})


def tool_name(shape: Shape) -> str | None:
    """The tool name a tools chain's answer must call."""
    if shape.kind == "tool_model":
        schema = shape.schema
        return str(schema.model_config.get("title") or schema.__name__)
    if shape.kind == "tool_dict":
        return str(shape.schema)
    return None


def read(shape: Shape, body: bytes, tool: str | None) -> Any:
    """The chain's result for an answer ``body``, or ``UNSURE`` (see the module docstring)."""
    try:
        data = json.loads(body)
    except ValueError:
        return UNSURE
    if type(data) is not dict or data.get("error"):
        return UNSURE
    choices = data.get("choices")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return UNSURE
    choice = choices[0]
    message = choice.get("message")
    if type(message) is not dict or message.get("refusal") is not None:
        return UNSURE
    finish = choice.get("finish_reason")
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    kind = shape.kind
    try:
        if kind == "tool_model" or kind == "tool_dict":
            if finish not in _TOOL_FINISH or type(tool_calls) is not list or len(tool_calls) != 1:
                return UNSURE
            args = _tool_args(tool_calls[0], tool)
            if args is UNSURE:
                return UNSURE
            parsed = shape.schema(**args) if kind == "tool_model" else args
        else:
            if finish != "stop" or tool_calls or type(content) is not str:
                return UNSURE
            if kind == "text":
                return content
            if not (content.startswith("{") and content.endswith("}")):
                return UNSURE
            if kind == "json_schema":
                parsed = shape.schema.model_validate_json(content)
            else:
                value = json.loads(content)
                if type(value) is not dict:
                    return UNSURE
                parsed = shape.schema.model_validate(value) if kind == "content_model" else value
    except (ValueError, TypeError):  # not JSON, not the schema (pydantic's ValidationError)
        return UNSURE
    if shape.include_raw:
        raw = content if type(content) is str else ""
        return {"raw": raw, "parsed": parsed, "parsing_error": None}
    return parsed


def _tool_args(call: Any, tool: str | None) -> Any:
    if type(call) is not dict or call.get("type", "function") != "function":
        return UNSURE
    function = call.get("function")
    if type(function) is not dict or function.get("name") != tool:
        return UNSURE
    arguments = function.get("arguments")
    if type(arguments) is not str or not arguments.startswith("{"):
        return UNSURE
    args = json.loads(arguments)
    return args if type(args) is dict else UNSURE
