"""Stable fingerprints of chains, and whether a fingerprint is complete.

A fingerprint must be the same in every process and every session for the
same chain. It feeds two consumers: dask's tokenizer
(``Chain.__dask_tokenize__``), which needs a deterministic token for every
``map_partitions`` argument, and the row memo of the result cache, which
returns a row's final columns without running the chain at all.

The second use is only safe when the fingerprint sees *everything* that
decides the answer. It cannot when a chain holds Python code: a
``RunnableLambda`` whose closure changed from French to German, a factory
that reads a global model name, a parser subclass whose ``parse`` was
edited, a Pydantic schema with validators. Bytecode hashes do not see
closures or globals, so those chains are **opaque**: ``analyse`` says so,
and the runner keys their answers only by what is actually sent to the
provider (the request body, see ``transport.pipeline``), never by the fingerprint.
A chain is **complete** when every object in it is plain data, a LangChain
class (its behaviour fixed by the installed LangChain version, which is
part of the memo fingerprint), or a Pydantic schema without validators.

``repr`` is no good (clients print memory addresses) and LangChain's
``dumpd`` gives up on pydantic classes, so we walk the object graph
ourselves: pydantic models by their fields (minus clients, secrets and
callbacks, which do not change the answer), classes by their JSON schema,
functions by their qualified name and bytecode.

The description (``describe``) is frozen: ``fingerprint`` (the v1 key of
caches written before the row memo existed) must stay what it was, so
anything new (versions, TypedDict fields) goes into the memo fingerprint
only.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import importlib.metadata
import inspect
import json
import operator
import pathlib
import types
import typing
from dataclasses import dataclass
from typing import Any

import pydantic

from dask_llm.chains.graph import CLIENT_FIELDS

# Fields that never change an answer: transport objects, credentials,
# tracing. Leaving them out also keeps secrets out of every fingerprint.
_IGNORED_FIELDS = CLIENT_FIELDS | frozenset(
    {
        "api_key",
        "openai_organization",
        "openai_proxy",
        "anthropic_proxy",
        "default_request_timeout",
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
# Further fields that do not change an answer but hold objects (a limiter, a
# LangChain cache, a tokenizer hook). Left out of the completeness check only,
# so that the frozen description above stays what it was.
_NEUTRAL_FIELDS = frozenset({"rate_limiter", "cache", "custom_get_token_ids"})
# Packages whose classes behave as their installed version says: the version
# is part of the memo fingerprint, so an upgrade is a new fingerprint.
_TRUSTED_ROOTS = ("langchain", "pydantic", "builtins", "typing")
_PLAIN = (
    enum.Enum,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    pathlib.PurePath,
)


@dataclass(frozen=True)
class Analysis:
    """``fingerprint``: the stable hash (tokenizing, legacy cache keys).

    ``memo``: the hash that keys the row memo, or None when the chain is
    opaque; ``opaque``: why (the first few reasons, for logs and docs).
    """

    fingerprint: str
    memo: str | None
    opaque: tuple[str, ...]


class _Notes:
    __slots__ = ("extras", "opaque", "packages")

    def __init__(self) -> None:
        self.opaque: list[str] = []
        self.packages: set[str] = set()
        self.extras: list[str] = []

    def mark(self, reason: str) -> None:
        if len(self.opaque) < 8 and reason not in self.opaque:
            self.opaque.append(reason)


def fingerprint(obj: Any) -> str:
    """Hex SHA-256 of a canonical description of ``obj``."""
    return _hash(describe(obj))


def analyse(obj: Any) -> Analysis:
    """The fingerprint of ``obj``, and its memo fingerprint when ``obj`` is complete."""
    notes = _Notes()
    text = _canonical(describe(obj, notes=notes))
    v1 = hashlib.sha256(text.encode()).hexdigest()
    if notes.opaque:
        return Analysis(v1, None, tuple(notes.opaque))
    versions = sorted(f"{p}=={_version(p)}" for p in notes.packages)
    memo = _hash({"v": 2, "description": v1, "versions": versions, "extras": notes.extras})
    return Analysis(v1, memo, ())


def _hash(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def describe(obj: Any, _depth: int = 0, *, notes: _Notes | None = None) -> Any:
    """A JSON-able description of ``obj`` that is stable across processes."""
    n = notes if notes is not None else _Notes()
    if _depth > 50:
        n.mark("nested more than 50 levels deep")
        return "<deep>"
    d = _depth + 1
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, bytes):
        return {"bytes": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, pydantic.SecretStr):
        return "<secret>"
    if isinstance(obj, list | tuple):
        return [describe(x, d, notes=n) for x in obj]
    if isinstance(obj, set | frozenset):
        return sorted((describe(x, d, notes=n) for x in obj), key=repr)
    if isinstance(obj, dict):
        return {
            str(k): describe(v, d, notes=n) for k, v in obj.items() if str(k) not in _IGNORED_FIELDS
        }
    if isinstance(obj, type):
        return _describe_class(obj, n)
    if isinstance(obj, pydantic.BaseModel):
        cls = type(obj)
        _note_class(cls, n, instance=True)
        fields = {}
        for name in sorted(cls.model_fields):
            if name in _IGNORED_FIELDS:
                continue
            value = getattr(obj, name, None)
            if name in _NEUTRAL_FIELDS:
                fields[name] = describe(value, d)  # frozen output, not checked
            else:
                fields[name] = describe(value, d, notes=n)
        return {"type": _qualname(cls), "fields": fields}
    if isinstance(obj, types.FunctionType | types.MethodType | types.BuiltinFunctionType):
        _check_callable(obj, n, d)
        return _describe_function(obj)
    checked = False
    if callable(obj) and hasattr(obj, "__call__"):  # noqa: B004
        _check_callable(obj, n, d)
        checked = True
        call = type(obj).__call__
        if isinstance(call, types.FunctionType):
            return {"callable": _qualname(type(obj)), "call": _describe_function(call)}
    text = repr(obj)
    if not checked and not isinstance(obj, _PLAIN):  # their repr is their value
        _check_object(obj, n, d)
    if " at 0x" in text:
        return {"type": _qualname(type(obj))}
    return {"type": _qualname(type(obj)), "repr": text}


def _check_object(obj: Any, notes: _Notes, depth: int) -> None:
    """A plain (non-pydantic) object: complete only if LangChain's own, with data inside.

    ``RunnableLambda`` and ``RunnableGenerator`` are how LangChain itself wraps its
    parsers (``with_structured_output`` uses both); a user's lambda is opaque.
    """
    cls = type(obj)
    if not _root(cls).startswith("langchain"):
        notes.mark(f"object {_qualname(cls)}")
        return
    notes.packages.add(_distribution(cls.__module__))
    for name, value in sorted(vars(obj).items()):
        if value is None or name.startswith("__"):
            continue
        notes.extras.append(_canonical({name: describe(value, depth, notes=notes)}))


def _check_callable(fn: Any, notes: _Notes, depth: int) -> None:
    """Code is complete only when it is LangChain's own, with any data it closes over."""
    if isinstance(fn, functools.partial):
        _check_callable(fn.func, notes, depth)
        data = {"args": describe(list(fn.args), depth, notes=notes)}
        data["keywords"] = describe(dict(fn.keywords), depth, notes=notes)
        notes.extras.append(_canonical(data))
        return
    if isinstance(fn, operator.itemgetter | operator.attrgetter):
        notes.extras.append(repr(fn))  # "operator.itemgetter('raw')": data only
        return
    if isinstance(fn, types.MethodType):
        _check_callable(fn.__func__, notes, depth)
        notes.extras.append(_canonical(describe(fn.__self__, depth, notes=notes)))
        return
    module = getattr(fn, "__module__", None) or "?"
    if not module.startswith("langchain"):
        notes.mark(f"Python code {_qualname(fn)}")
        return
    notes.packages.add(_distribution(module))
    cells = getattr(fn, "__closure__", None) or ()
    for cell in cells:
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        notes.extras.append(_canonical(describe(content, depth, notes=notes)))


def _describe_class(cls: type, notes: _Notes) -> Any:
    if issubclass(cls, pydantic.BaseModel):
        _note_class(cls, notes, instance=False)
        try:
            schema = cls.model_json_schema()
        except Exception as exc:  # a schema pydantic cannot render: say so
            notes.mark(f"class {_qualname(cls)} has no JSON schema ({type(exc).__name__})")
            schema = None
        return {"class": _qualname(cls), "schema": schema}
    if typing.is_typeddict(cls):
        hints = {k: repr(v) for k, v in cls.__annotations__.items()}
        notes.extras.append(_canonical({"typeddict": _qualname(cls), "fields": hints}))
    elif _root(cls) not in _TRUSTED_ROOTS:
        notes.mark(f"class {_qualname(cls)}")
    return {"class": _qualname(cls)}


def _note_class(cls: type, notes: _Notes, *, instance: bool) -> None:
    """Record the package a class comes from, or why its behaviour is not fixed by data."""
    root = _root(cls)
    if root.startswith("langchain") or root == "pydantic":
        notes.packages.add(_distribution(cls.__module__))
        return
    if instance:
        # A user's own Runnable or parser: its methods are code we cannot see into.
        notes.mark(f"{_qualname(cls)} (defined outside LangChain)")
        return
    # A user's schema class: data, unless it carries code that changes parsed values.
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is not None and any(
        getattr(decorators, kind, None)
        for kind in (
            "validators",
            "field_validators",
            "root_validators",
            "model_validators",
            "field_serializers",
            "model_serializers",
            "computed_fields",
        )
    ):
        notes.mark(f"schema {_qualname(cls)} has validators or serializers")
    if "model_post_init" in vars(cls) or "__init__" in vars(cls):
        notes.mark(f"schema {_qualname(cls)} runs its own code on construction")
    for field in getattr(cls, "model_fields", {}).values():
        if field.default_factory is not None:
            notes.mark(f"schema {_qualname(cls)} has a default_factory")
            break


def _root(cls: type) -> str:
    return (getattr(cls, "__module__", None) or "?").split(".", 1)[0]


def _distribution(module: str) -> str:
    root = module.split(".", 1)[0]
    return root.replace("_", "-")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


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
