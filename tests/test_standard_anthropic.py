"""LangChain's own standard tests of a chat model (``langchain-tests``) for ``ChatAnthropic``
pointed at the simulator's Messages API (``simulator._anthropic``).

Configured as langchain-anthropic configures its own class (``TestAnthropicStandard``:
image and PDF inputs, in tool messages too, Anthropic-format inputs, a model override),
with the tests' downloads made locally (``tests.test_standard._offline_get``) so the
class runs offline. Left skipped: audio inputs (Claude takes none), JSON mode (Claude has
no such mode; ``with_structured_output`` uses tool use) and ``test_stream_time`` (a
benchmark replayed from recorded VCR cassettes of the provider).

``ChatAnthropic`` builds its async client on an httpx client that langchain-anthropic
caches per base URL for the whole process; a keep-alive connection pooled there belongs
to the event loop that opened it, and the next test's loop (pytest-asyncio gives each
test its own) would find it closed (the trap dask-llm's per-loop clients avoid, see
``transport.pipeline``). Here each test's models get an httpx client of the test's own,
closed on its loop at its end.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_anthropic import chat_models as anthropic_models
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.integration_tests import chat_models as standard

from dask_llm.simulator import Simulator
from tests.test_standard import _offline_get


class TestChatAnthropicOnSimulator(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _on_simulator(self, simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.base_url = simulator.anthropic_base_url
        monkeypatch.setattr(standard, "httpx", types.SimpleNamespace(get=_offline_get))

    @pytest.fixture(autouse=True)
    async def _async_http_clients(self, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
        opened: list[anthropic.DefaultAsyncHttpxClient] = []

        def fresh(**kwargs: Any) -> anthropic.DefaultAsyncHttpxClient:
            kwargs.pop("anthropic_proxy", None)
            opened.append(anthropic.DefaultAsyncHttpxClient(**kwargs))
            return opened[-1]

        monkeypatch.setattr(anthropic_models, "_get_default_async_httpx_client", fresh)
        yield
        for client in opened:
            await client.aclose()

    @property
    def chat_model_class(self) -> type[ChatAnthropic]:
        return ChatAnthropic

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": "claude-haiku-4-5",
            "base_url": self.base_url,
            "api_key": "sk-ant-any",
            "max_tokens": 300,
        }

    @property
    def model_override_value(self) -> str:
        return "claude-sonnet-4-5"

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def supports_pdf_inputs(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def supports_pdf_tool_message(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True
