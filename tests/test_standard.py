"""LangChain's own standard tests of a chat model (``langchain-tests``), run against the
simulator: ``ChatOpenAI`` pointed at it must pass what it passes pointed at OpenAI.

The class is configured as langchain-openai configures its own (``TestOpenAIStandard``:
image, image-URL, PDF, JSON-mode and Anthropic-format inputs; prompt-cache reads in the
usage), plus what the simulator serves that a real endpoint may not (model override) and
two settings a client needs for any OpenAI-compatible ``base_url``:

* ``stream_usage=True``: ChatOpenAI asks for the usage chunk by itself only when it talks
  to api.openai.com; the simulator sends it whenever ``stream_options.include_usage`` asks.
* an httpx ``AsyncClient`` of each test's own, opened and closed on the test's event loop
  (``http_async_client``). By default langchain-openai shares one per (base URL, timeout)
  across the process, and a keep-alive connection it pooled belongs to the event loop that
  opened it: the next test's loop (pytest-asyncio gives each test its own) reusing it fails
  with "Event loop is closed" whatever the server (an AsyncClient cannot span event loops,
  encode/httpx#2473); that is the "astream across event loops" failure, and it would also
  break any later test of the suite that runs ChatOpenAI on a loop of its own. Only refusing
  keep-alive would hide it on the server's side, and OpenAI keeps connections alive.

Left skipped, as langchain-openai leaves them for ``gpt-4o-mini``: audio inputs and images
or PDFs inside tool messages (Chat Completions takes text only there), and
``test_stream_time`` (a benchmark replayed from recorded VCR cassettes of the provider).

The tests fetch their image and PDF from the internet; here they get small local ones (the
simulator does not look at them) so the class runs offline, in CI.
"""

from __future__ import annotations

import struct
import types
import zlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.integration_tests import chat_models as standard

from dask_llm.simulator import Simulator


def _png() -> bytes:
    """A 1x1 white PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\xff\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 72]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def _offline_get(url: str, **_: Any) -> types.SimpleNamespace:
    """What the standard tests download, made here; anything else is refused."""
    for suffix, content in ((".png", _png()), (".pdf", _PDF)):
        if url.endswith(suffix):
            return types.SimpleNamespace(content=content)
    raise AssertionError(f"the standard tests run offline here; nothing serves {url}")


# langchain-openai's own warnings, raised whatever the server (filterwarnings is "error"):
# its streaming structured output dumps the SDK's chunk, whose `parsed` field is typed None
# (langchain-ai/langchain#35538, fixed for invoke only); and test_structured_output_pydantic_2_v1
# hands it a pydantic v1 model on purpose, which it answers with a warning that it switches to
# function calling; test_pdf_inputs sends a PDF block without a filename, which it warns it
# fills in.
@pytest.mark.filterwarnings("ignore:OpenAI may require a filename for file uploads:UserWarning")
@pytest.mark.filterwarnings(
    "ignore:Pydantic serializer warnings.\\s+PydanticSerializationUnexpectedValue"
    "\\(Expected `none`.*field_name='parsed':UserWarning"
)
@pytest.mark.filterwarnings("ignore:Received a Pydantic BaseModel V1 schema:UserWarning")
class TestChatOpenAIOnSimulator(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _on_simulator(self, simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.base_url = simulator.base_url
        monkeypatch.setattr(standard, "httpx", types.SimpleNamespace(get=_offline_get))

    @pytest.fixture(autouse=True)
    async def _async_http_client(self) -> AsyncIterator[None]:
        async with openai.DefaultAsyncHttpxClient() as http:
            self.http_async_client = http
            yield

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": "gpt-4o-mini",
            "base_url": self.base_url,
            "api_key": "sk-any",
            "stream_usage": True,
            "http_async_client": self.http_async_client,
        }

    @property
    def model_override_value(self) -> str:
        return "gpt-4o"

    @property
    def supports_json_mode(self) -> bool:
        return True

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
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A prompt over 1,024 tokens sent twice: the second reads it from the prompt cache."""
        model = ChatOpenAI(**{**self.standard_chat_model_params, **self.chat_model_params})
        prompt = "Summarize these tasting notes. " + "Cassis, cedar and graphite. " * 300
        message: AIMessage | None = None
        for _ in range(2):
            if stream:
                total: Any = None
                for chunk in model.stream(prompt):
                    total = chunk if total is None else total + chunk
                message = total
            else:
                message = model.invoke(prompt)
        assert message is not None and message.usage_metadata is not None
        details = message.usage_metadata.get("input_token_details") or {}
        assert details.get("cache_read", 0) > 0
        return message
