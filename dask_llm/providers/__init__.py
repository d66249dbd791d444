"""What differs between LLM providers (OpenAI, Anthropic) behind one interface: see
``providers.base`` and docs/providers.md."""

from dask_llm.providers.base import Provider
from dask_llm.providers.registry import OPENAI, PROVIDERS, is_routable, provider_of

__all__ = ["OPENAI", "PROVIDERS", "Provider", "is_routable", "provider_of"]
