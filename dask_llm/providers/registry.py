"""The providers dask-llm knows, and which one a chat model or an SDK exception belongs to.

OpenAI's is always there (langchain-openai is a dependency); Anthropic's when
langchain-anthropic is installed (``pip install "dask-llm[anthropic]"``). A
new provider is one module with a ``Provider`` subclass, added to ``PROVIDERS``.
"""

from __future__ import annotations

from typing import Any, Final

from dask_llm.providers.base import Provider
from dask_llm.providers.openai import OpenAIProvider

OPENAI: Final = OpenAIProvider()

try:
    from dask_llm.providers.anthropic import AnthropicProvider
except ImportError:  # the optional extra is not installed
    _ANTHROPIC: tuple[Provider, ...] = ()
else:
    _ANTHROPIC = (AnthropicProvider(),)

#: Every provider available in this process.
PROVIDERS: Final[tuple[Provider, ...]] = (OPENAI, *_ANTHROPIC)

#: The SDKs' exceptions, each kind over every provider (for the retry policy).
STATUS_ERRORS: Final = tuple(e for p in PROVIDERS for e in p.status_errors)
CONNECTION_ERRORS: Final = tuple(e for p in PROVIDERS for e in p.connection_errors)
VALIDATION_ERRORS: Final = tuple(e for p in PROVIDERS for e in p.validation_errors)
API_ERRORS: Final = tuple(e for p in PROVIDERS for e in p.api_errors)


def provider_of(model: Any) -> Provider | None:
    """The provider whose chat model ``model`` is; None for any other object."""
    for provider in PROVIDERS:
        if provider.owns(model):
            return provider
    return None


def is_routable(model: Any) -> bool:
    """Whether ``model`` is a known provider's chat model whose requests the job's
    transport can carry."""
    provider = provider_of(model)
    return provider is not None and provider.routable(model)
