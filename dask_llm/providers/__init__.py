"""What differs between LLM providers (OpenAI, Anthropic) behind one interface: see
``providers.base`` and docs/providers.md."""

from dask_llm.providers.base import Provider
from dask_llm.providers.registry import OPENAI, is_routable, provider_of, providers

__all__ = ["OPENAI", "Provider", "is_routable", "provider_of", "providers"]
