"""Stable fingerprints of chains.

A fingerprint must be the same in every process and every session for the
same chain, and must change whenever something that changes the answer
changes (prompt text, model name, temperature, output schema, ...). It feeds
two consumers: dask's tokenizer (``Chain.__dask_tokenize__``), which needs a
deterministic token for every ``map_partitions`` argument, and the result
cache, which keys paid-for answers by it.

``repr`` is no good (clients print memory addresses) and LangChain's
``dumpd`` gives up on pydantic classes and lambdas, so we walk the object
graph ourselves: pydantic models by their fields (minus clients, secrets and
callbacks, which do not change the answer), classes by their JSON schema,
functions by their qualified name and bytecode.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import types
from typing import Any

import pydantic

from dask_llm._graph import CLIENT_FIELDS

# Fields that never change an answer: transport objects, credentials,
# tracing. Leaving them out also keeps secrets out of every fingerprint.
_IGNORED_FIELDS = CLIENT_FIELDS | frozenset(
    {
        "api_key",
        "openai_organization",
        "openai_proxy",
        "callbacks",
        "callback_manager",
        "verbose",
        "tags",
        "metadata",
        "max_retries",
        "request_timeout",
        "timeout",
        "default_headers",
        "default_query",
        "http_socket_options",
        "profile",
    }
)


def fingerprint(obj: Any) -> str:
    """Hex SHA-256 of a canonical description of ``obj``."""
    text = json.dumps(describe(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able description of ``obj`` that is stable across processes."""
    if _depth > 50:
        return "<deep>"
    d = _depth + 1
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, bytes):
        return {"bytes": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, pydantic.SecretStr):
        return "<secret>"
    if isinstance(obj, list | tuple):
        return [describe(x, d) for x in obj]
    if isinstance(obj, set | frozenset):
        return sorted((describe(x, d) for x in obj), key=repr)
    if isinstance(obj, dict):
        return {str(k): describe(v, d) for k, v in obj.items() if str(k) not in _IGNORED_FIELDS}
    if isinstance(obj, type):
        if issubclass(obj, pydantic.BaseModel):
            try:
                schema = obj.model_json_schema()
            except Exception:
                schema = None
            return {"class": _qualname(obj), "schema": schema}
        return {"class": _qualname(obj)}
    if isinstance(obj, pydantic.BaseModel):
        fields = {
            name: describe(getattr(obj, name, None), d)
            for name in sorted(type(obj).model_fields)
            if name not in _IGNORED_FIELDS
        }
        return {"type": _qualname(type(obj)), "fields": fields}
    if isinstance(obj, types.FunctionType | types.MethodType | types.BuiltinFunctionType):
        return _describe_function(obj)
    if callable(obj) and hasattr(obj, "__call__") and not isinstance(obj, type):  # noqa: B004
        call = type(obj).__call__
        if isinstance(call, types.FunctionType):
            return {"callable": _qualname(type(obj)), "call": _describe_function(call)}
    text = repr(obj)
    if " at 0x" in text:
        return {"type": _qualname(type(obj))}
    return {"type": _qualname(type(obj)), "repr": text}


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _describe_function(fn: Any) -> Any:
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return {"function": _qualname(fn)}
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(const.co_code)
        else:
            h.update(repr(const).encode())
    return {"function": _qualname(fn), "code": h.hexdigest()}
