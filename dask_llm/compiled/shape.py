"""Which chains the compiled path takes, read from the chain's own objects.

A chain is compiled when it is a ``RunnableSequence`` of exactly:

* a ``ChatPromptTemplate`` of system / human / AI messages, each a static
  message of text or an f-string template of plain ``{name}`` fields (no
  format spec, conversion, attribute or index, no partial variables);
* a ``ChatOpenAI`` (not a subclass: Azure and others build other requests),
  bare or bound (``.bind(...)``, ``with_structured_output``), or the ``raw``
  branch of ``with_structured_output(..., include_raw=True)``;
* nothing, ``StrOutputParser()``, or the parser ``with_structured_output``
  put there for its method (json_schema, function_calling, json_mode; a
  Pydantic class, a TypedDict or a JSON schema), or a
  ``PydanticOutputParser`` / ``JsonOutputParser`` of the user's.

Anything that could see or change a call beyond its request and answer
keeps LangChain's path: callbacks or a rate limiter on the model or the
binding, a LangChain cache, streaming, LangSmith tracing or LangChain's
debug/verbose switches, a configured binding. ``shape_of`` returns the
``Shape`` or the reason it is not one.
"""

from __future__ import annotations

import functools
import string
from typing import Any, Literal

import pydantic
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import (
    JsonOutputParser,
    PydanticOutputParser,
    StrOutputParser,
)
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.prompts.chat import (
    AIMessagePromptTemplate,
    HumanMessagePromptTemplate,
    SystemMessagePromptTemplate,
)
from langchain_core.runnables import (
    RunnableBinding,
    RunnableGenerator,
    RunnableLambda,
    RunnableParallel,
    RunnableSequence,
    RunnableWithFallbacks,
)
from langchain_core.runnables.passthrough import RunnableAssign
from langchain_openai import ChatOpenAI

#: How an answer becomes the chain's result.
#: text: the message's text; json_schema: the SDK's parse of the content into a Pydantic
#: class; tools: the first tool call's arguments (into a class, or a dict);
#: content: the content as JSON (into a class, or a dict).
Kind = Literal["text", "json_schema", "tool_model", "tool_dict", "content_model", "content_dict"]

_MESSAGE_TEMPLATES: dict[type, type[BaseMessage]] = {
    SystemMessagePromptTemplate: SystemMessage,
    HumanMessagePromptTemplate: HumanMessage,
    AIMessagePromptTemplate: AIMessage,
}
_STATIC_MESSAGES = (SystemMessage, HumanMessage, AIMessage)


class Shape:
    """A compiled chain's parts: its messages, its model step and how its answer is read.

    ``messages``: per message of the prompt, ``(message class, template)`` where
    ``template`` is the f-string (``fields`` says it has any) or, for a static
    message, its text. ``model_step``: the runnable LangChain would call with the
    prompt's messages (a bound model, or the model). ``schema``: the Pydantic class
    (``*_model`` kinds) or the tool's name (``tool_dict``).
    """

    __slots__ = ("include_raw", "kind", "messages", "model", "model_step", "schema")

    def __init__(
        self,
        messages: list[tuple[type[BaseMessage], str, bool]],
        model_step: Any,
        model: ChatOpenAI,
        kind: Kind,
        schema: Any,
        include_raw: bool,
    ) -> None:
        self.messages = messages
        self.model_step = model_step
        self.model = model
        self.kind = kind
        self.schema = schema
        self.include_raw = include_raw

    def format(self, inputs: dict[str, Any]) -> list[str]:
        """Each message's text for a row (what LangChain's prompt would make of it)."""
        return [
            template.format(**inputs) if fields else template
            for _, template, fields in self.messages
        ]


def shape_of(runnable: Any) -> Shape | str:
    """The chain's ``Shape``, or why the compiled path does not take it."""
    why = _global_reason()
    if why:
        return why
    if type(runnable) is not RunnableSequence:
        return f"a {type(runnable).__name__}, not a prompt | model sequence"
    steps = runnable.steps
    if len(steps) < 2:
        return "too few steps"
    messages = _messages(steps[0])
    if isinstance(messages, str):
        return messages
    include_raw = False
    step = steps[1]
    if type(step) is RunnableParallel:
        branches = step.steps__
        if set(branches) != {"raw"} or len(steps) != 3:
            return "a parallel step other than include_raw's"
        step = branches["raw"]
        include_raw = True
    model = _model(step)
    if isinstance(model, str):
        return model
    rest = list(steps[2:])
    if include_raw:
        parser = _include_raw_parser(rest[0])
        if parser is None:
            return "an include_raw step of another shape"
        rest = parser
    kind = _kind(rest, step)
    if isinstance(kind, str):
        return kind
    return Shape(messages, step, model, kind[0], kind[1], include_raw)


def _global_reason() -> str | None:
    try:
        from langchain_core.globals import get_debug, get_llm_cache, get_verbose
        from langchain_core.tracers.context import _tracing_v2_is_enabled
    except ImportError as exc:  # a LangChain that moved them: nothing can be proven off
        return f"LangChain's switches cannot be read ({exc})"
    if _tracing_v2_is_enabled():
        return "LangSmith tracing is on"
    if get_debug() or get_verbose():
        return "LangChain's debug or verbose output is on"
    if get_llm_cache() is not None:
        return "a LangChain LLM cache is set"
    return None


def _messages(prompt: Any) -> list[tuple[type[BaseMessage], str, bool]] | str:
    if type(prompt) is not ChatPromptTemplate:
        return f"first step is a {type(prompt).__name__}, not a ChatPromptTemplate"
    if prompt.partial_variables:
        return "the prompt has partial variables"
    out: list[tuple[type[BaseMessage], str, bool]] = []
    for item in prompt.messages:
        message: Any = item
        if type(message) in _STATIC_MESSAGES:
            if not isinstance(message.content, str) or message.additional_kwargs or message.name:
                return "a static message that is not plain text"
            out.append((type(message), message.content, False))
            continue
        cls: Any = _MESSAGE_TEMPLATES.get(type(message))
        if cls is None:
            return f"a prompt message of type {type(message).__name__}"
        inner = message.prompt
        if (
            type(inner) is not PromptTemplate
            or inner.template_format != "f-string"
            or inner.partial_variables
            or message.additional_kwargs
        ):
            return "a message template that is not a plain f-string"
        fields = _plain_fields(inner.template)
        if fields is None:
            return "a template field with a format spec, conversion, attribute or index"
        # A template without fields is formatted once ("{{" reads "{").
        out.append((cls, inner.template if fields else inner.template.format(), bool(fields)))
    if not out:
        return "an empty prompt"
    return out


def _plain_fields(template: str) -> list[str] | None:
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            return None
        fields.append(name)
    return fields


def _model(step: Any) -> ChatOpenAI | str:
    if isinstance(step, RunnableBinding):
        if step.config or step.config_factories:
            return "the model's binding carries a config"
        if any(key in step.kwargs for key in ("callbacks", "stream")):
            return "the model's binding sets callbacks or streaming"
        step = step.bound
    if type(step) is not ChatOpenAI:
        return f"the model is a {type(step).__name__}, not a ChatOpenAI"
    if step.callbacks or getattr(step, "callback_manager", None):
        return "the model has callbacks"
    if step.rate_limiter is not None:
        return "the model has a LangChain rate limiter"
    if step.cache not in (None, False):
        return "the model has a LangChain cache"
    if step.streaming or (step.n or 1) != 1:
        return "the model streams or asks for several choices"
    if getattr(step, "output_version", None) not in (None, "v0"):
        return f"the model's output_version is {step.output_version!r}"
    if getattr(step, "use_responses_api", None):
        return "the model uses the Responses API"
    return step


def _include_raw_parser(step: Any) -> list[Any] | None:
    """The parser steps inside ``with_structured_output(..., include_raw=True)``'s tail."""
    if type(step) is not RunnableWithFallbacks or type(step.runnable) is not RunnableAssign:
        return None
    parsed = step.runnable.mapper.steps__.get("parsed")
    if type(parsed) is not RunnableSequence:
        return None
    first, *rest = parsed.steps
    if type(first) is not RunnableLambda:
        return None
    return rest


def _kind(rest: list[Any], model_step: Any) -> tuple[Kind, Any] | str:
    if rest and type(rest[0]) is RunnableGenerator:
        # with_structured_output's refusal check: a refusal is never parsed here
        # (the compiled reader leaves such answers to LangChain).
        check = getattr(getattr(rest[0], "_atransform", None), "__name__", "")
        if check != "_acheck_refusal":
            return "a generator step other than the refusal check"
        rest = rest[1:]
    if not rest:
        return ("text", None)
    if len(rest) != 1:
        return "more than one step after the model"
    parser = rest[0]
    kind = type(parser)
    if kind is StrOutputParser:
        return ("text", None)
    if kind is PydanticOutputParser:
        if not _is_model(parser.pydantic_object):
            return "a PydanticOutputParser of a pydantic v1 model"
        return ("content_model", parser.pydantic_object)
    if kind is JsonOutputParser:
        return ("content_dict", None)
    if kind is PydanticToolsParser and parser.first_tool_only and len(parser.tools) == 1:
        if parser.return_id or not _is_model(parser.tools[0]):
            return "a tools parser of another shape"
        return ("tool_model", parser.tools[0])
    if kind is JsonOutputKeyToolsParser and parser.first_tool_only and not parser.return_id:
        return ("tool_dict", parser.key_name)
    if kind is RunnableBinding and type(parser.bound) is RunnableLambda:
        func = parser.bound.func
        if (
            isinstance(func, functools.partial)
            and getattr(func.func, "__name__", "") == "_oai_structured_outputs_parser"
            and _is_model(func.keywords.get("schema"))
            and not parser.kwargs
        ):
            return ("json_schema", func.keywords["schema"])
    return f"a {kind.__name__} after the model"


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)
