"""Two per-request costs of the openai SDK, skipped inside dask-llm's own event loops.

Measured where the client's CPU is the ceiling (a profile of a structured
chain at 100 requests/s, the GIL held): before the SDK hands a chat request
to the transport, it

* walks the whole body against ``CompletionCreateParams``
  (``async_maybe_transform``): for every message, every member of a union of
  six TypedDicts, with ``typing`` introspection at each node. That is 17-22%
  of the CPU of an enrich job, to apply property aliases and date / file
  formats that no field of the chat request has;
* builds the response format's strict JSON schema from the pydantic model
  again for every request (``type_to_response_format_param``): another 5%.

With both skipped, a zero-latency structured chain (2 dependent chains, one
process) took 2.8-3.6 ms of CPU a call instead of 4.4-4.9 ms, and sent
1.3-1.5x the calls a second (``benchmarks/sdk_fast_path.py``).

What replaces them, and why the bytes on the wire cannot change:

* The walk is kept only where it can do something. ``SAFE`` is decided once,
  by walking the SDK's own chat parameter types: no ``PropertyInfo`` alias or
  format anywhere in them. Then, for a body made only of dicts, lists,
  strings, numbers, booleans and None (what LangChain sends), the SDK's
  transform returns the same keys in the same order with the omitted ones
  dropped, and that is what the fast path returns. Anything else (a pydantic
  object, a date, a file, a tuple, a sentinel below the top level) goes to
  the SDK's own transform. A new SDK whose chat types gain an alias or a
  format turns the fast path off by itself, and ``tests/test_sdk.py`` says so.
* The schema is built once per response-format class (held weakly) and
  handed out as a fresh copy each time (``json.loads`` of the text the SDK's
  function returned the first time, so the order of keys is the SDK's).

The request body is byte for byte the SDK's own: the request cache's keys
(``cache.request_key``, over the bytes sent) are the same with and without
the fast path, and ``tests/test_sdk.py`` checks that a cache written without
it is hit in full with it.

Scope. The two functions are looked up by the SDK's chat modules as module
globals; ``install()`` replaces those names with wrappers (once per process).
The wrappers take the fast path only in a context where ``activate()`` was
called, which ``LoopClients`` does on each partition's loop, so a user's own
calls of the SDK, even in the same process, take the SDK's path untouched.
``DASK_LLM_SDK_FAST_PATH=0`` in the environment (of the workers, too) turns
it off; so does an SDK that has moved either name (nothing is patched then).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import logging
import os
import threading
import typing
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import typing_extensions

log = logging.getLogger(__name__)

#: Set in each partition's loop (``activate``): the wrappers take the fast path there only.
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("dask_llm_sdk_fast", default=False)

#: The SDK modules whose module-level names are wrapped, and the names.
_TRANSFORM_MODULES = (
    "openai.lib._chat_completion_resources",
    "openai.resources.chat.completions.completions",
)
_SCHEMA_MODULE = "openai.lib._chat_completion_resources"

_lock = threading.Lock()
_installed: bool | None = None  # None: not tried yet
_chat_params: tuple[object, ...] = ()
_schemas: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def enabled() -> bool:
    """Whether the fast path is wanted (``DASK_LLM_SDK_FAST_PATH`` unset or not ``0``)."""
    return os.environ.get("DASK_LLM_SDK_FAST_PATH", "1").strip().lower() not in ("0", "false", "no")


def activate() -> bool:
    """Install the wrappers if needed and take the fast path in the current context.

    Call it from inside the coroutine whose tasks should use it (tasks inherit
    the context they are created in). Returns whether the fast path is on.
    """
    if not enabled() or not install():
        return False
    _ACTIVE.set(True)
    return True


def install() -> bool:
    """Wrap the SDK's chat transform and schema builder, once per process.

    Returns False (and patches nothing) when the SDK's chat types carry an
    alias or a format, or when it has moved either name.
    """
    global _installed, _chat_params
    with _lock:
        if _installed is not None:
            return _installed
        _installed = False
        try:
            from openai.types.chat import completion_create_params as params

            chat_params = (
                params.CompletionCreateParams,
                params.CompletionCreateParamsNonStreaming,
                params.CompletionCreateParamsStreaming,
            )
            modules: list[Any] = [importlib.import_module(name) for name in _TRANSFORM_MODULES]
            schema_module: Any = importlib.import_module(_SCHEMA_MODULE)
            originals = [m.async_maybe_transform for m in modules]
            schema_original = schema_module._type_to_response_format
        except (ImportError, AttributeError) as exc:
            log.info("dask-llm: the openai SDK's fast path is off (%s)", exc)
            return False
        if not all(_plain_type(t) for t in chat_params):
            log.info("dask-llm: the openai SDK's chat types have aliases or formats: fast path off")
            return False
        _chat_params = chat_params
        for module, original in zip(modules, originals, strict=True):
            module.async_maybe_transform = _transform_wrapper(original)
        schema_module._type_to_response_format = _schema_wrapper(schema_original)
        _installed = True
        return True


# -- the transform ---------------------------------------------------------------------------


def _transform_wrapper(
    original: Callable[[object, object], Awaitable[Any]],
) -> Callable[[object, object], Awaitable[Any]]:
    async def async_maybe_transform(data: object, expected_type: object) -> Any:
        if _ACTIVE.get() and expected_type in _chat_params and type(data) is dict:
            fast = plain_body(data)
            if fast is not None:
                return fast
        return await original(data, expected_type)

    async_maybe_transform.__wrapped__ = original  # type: ignore[attr-defined]
    return async_maybe_transform


def plain_body(data: dict[str, Any]) -> dict[str, Any] | None:
    """``data`` without its omitted values, if the rest is plain JSON; else None.

    For a chat request whose types have no alias or format, that is what the
    SDK's transform returns (same keys, same order).
    """
    from openai._utils import is_given

    out: dict[str, Any] = {}
    for key, value in data.items():
        if not is_given(value):
            continue
        if not _plain(value):
            return None
        out[key] = value
    return out


def _plain(value: object) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())  # type: ignore[attr-defined]
    if kind is list:
        return all(_plain(v) for v in value)  # type: ignore[attr-defined]
    return False


def _plain_type(root: object) -> bool:
    """No ``PropertyInfo`` with an alias or a format anywhere below ``root``."""
    from openai._utils._transform import PropertyInfo

    seen: set[int] = set()
    stack = [root]
    while stack:
        tp = stack.pop()
        if id(tp) in seen:
            continue
        seen.add(id(tp))
        if typing.get_origin(tp) is typing.Annotated:
            for meta in getattr(tp, "__metadata__", ()):
                if isinstance(meta, PropertyInfo) and (meta.alias or meta.format):
                    return False
        if typing_extensions.is_typeddict(tp):
            try:
                hints = typing_extensions.get_type_hints(tp, include_extras=True)
            except Exception:  # unresolvable: it cannot be proven plain
                return False
            stack.extend(hints.values())
        stack.extend(typing.get_args(tp))
    return True


# -- the response format's schema ------------------------------------------------------------


def _schema_wrapper(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def type_to_response_format(response_format: Any) -> Any:
        if not _ACTIVE.get() or not isinstance(response_format, type):
            return original(response_format)
        try:
            text = _schemas.get(response_format)
        except TypeError:  # not weakly referenceable
            return original(response_format)
        if text is None:
            built = original(response_format)
            with contextlib.suppress(
                TypeError, ValueError
            ):  # not JSON: the SDK builds it each time
                _schemas[response_format] = json.dumps(built)
            return built
        return json.loads(text)

    type_to_response_format.__wrapped__ = original  # type: ignore[attr-defined]
    return type_to_response_format
