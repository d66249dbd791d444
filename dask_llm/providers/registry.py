"""The providers dask-llm knows, and which one a chat model or an SDK exception belongs to.

OpenAI's is always there (langchain-openai is a dependency). Anthropic's is an
optional extra (``pip install "dask-llm[anthropic]"``), and it is loaded only
once this process has imported langchain-anthropic or the anthropic SDK: a
``ChatAnthropic`` model, or an exception of its SDK, can exist only then (a
model unpickled on a worker imports them first). Importing the anthropic SDK
costs about a third of ``import dask_llm`` (measured with ``-X importtime``:
~0.9 s of ~2.7 s on this machine), and every process of a job pays it: each
worker, each child of dask's process pool, the CLI. ``providers(every=True)``
loads every installed provider (for a batch id, which names no model). A new
provider is one module with a ``Provider`` subclass, added to ``_OPTIONAL``
(or beside ``OPENAI`` if its SDK is a dependency).
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, Final

from dask_llm.providers.base import ConnectionFailure, Provider, StatusError
from dask_llm.providers.openai import OpenAIProvider

OPENAI: Final = OpenAIProvider()

#: The optional providers: their module, its Provider class, and the modules one of
#: which this process has imported if a model or an exception of theirs can exist.
_OPTIONAL: Final = (
    ("dask_llm.providers.anthropic", "AnthropicProvider", ("langchain_anthropic", "anthropic")),
)
#: Every provider's name (``Provider.name``), installed or not: what a limit told by
#: provider (``rpm={"anthropic": 50}``) may name.
NAMES: Final = (OPENAI.name, "anthropic")

_lock = threading.Lock()
_loaded: dict[str, Provider | None] = {}  # module -> its provider; None: not installed


def _load(module: str, name: str) -> Provider | None:
    with _lock:
        if module not in _loaded:
            try:
                # An optional dependency's module, loaded by name as a plugin is.
                found = getattr(importlib.import_module(module), name)
            except ImportError:  # the optional extra is not installed
                _loaded[module] = None
            else:
                _loaded[module] = found()
        return _loaded[module]


def providers(*, every: bool = False) -> tuple[Provider, ...]:
    """The providers of this process: OpenAI's, and each optional one whose SDK has been
    imported here (``every=True``: each one installed, importing its SDK)."""
    found: list[Provider] = [OPENAI]
    for module, name, markers in _OPTIONAL:
        if every or module in _loaded or any(m in sys.modules for m in markers):
            provider = _load(module, name)
            if provider is not None:
                found.append(provider)
    return tuple(found)


def status_errors() -> tuple[type[StatusError], ...]:
    """The SDKs' exceptions for an HTTP error answer, over every loaded provider."""
    return tuple(e for p in providers() for e in p.status_errors)


def connection_errors() -> tuple[type[ConnectionFailure], ...]:
    """The SDKs' exceptions for no answer (connection, timeout)."""
    return tuple(e for p in providers() for e in p.connection_errors)


def validation_errors() -> tuple[type[BaseException], ...]:
    """The SDKs' exceptions for an answer they could not read."""
    return tuple(e for p in providers() for e in p.validation_errors)


def api_errors() -> tuple[type[Exception], ...]:
    """Every exception of the SDKs' own."""
    return tuple(e for p in providers() for e in p.api_errors)


def provider_of(model: Any) -> Provider | None:
    """The provider whose chat model ``model`` is; None for any other object."""
    for provider in providers():
        if provider.owns(model):
            return provider
    return None


def is_routable(model: Any) -> bool:
    """Whether ``model`` is a known provider's chat model whose requests the job's
    transport can carry."""
    provider = provider_of(model)
    return provider is not None and provider.routable(model)
