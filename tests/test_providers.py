"""Each provider reads its own answers: usage (cache reads and writes), limits, quota 429s,
fatal answers; and the seam's front door."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_openai import ChatOpenAI

import dask_llm.core.usage
import dask_llm.providers
from dask_llm.core.usage import price_of
from dask_llm.providers import OPENAI, provider_of, providers
from dask_llm.providers.anthropic import AnthropicProvider
from dask_llm.transport.wire import outcome_of

CLAUDE = next(p for p in providers() if isinstance(p, AnthropicProvider))
REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/messages")


def claude_answer(**usage: Any) -> bytes:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Cassis."}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 100,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 20,
            **usage,
        },
    }
    return json.dumps(body).encode()


def test_exported_members() -> None:
    assert sorted(dask_llm.providers.__all__) == sorted(
        ["OPENAI", "Provider", "is_routable", "provider_of", "providers"]
    )


@pytest.mark.slow  # a subprocess, or seconds of waiting
def test_an_optional_provider_is_loaded_only_once_its_sdk_is_imported() -> None:
    """``import dask_llm`` does not import the anthropic SDK (a third of its import time);
    a ChatAnthropic model, which imports it, finds its provider."""
    code = (
        "import sys, dask_llm\n"
        "from dask_llm.providers import providers\n"
        "assert 'anthropic' not in sys.modules, 'imported with dask_llm'\n"
        "assert [p.name for p in providers()] == ['openai']\n"
        "from langchain_anthropic import ChatAnthropic\n"
        "assert [p.name for p in providers()] == ['openai', 'anthropic']\n"
        "model = ChatAnthropic(model='claude-haiku-4-5', api_key='k')\n"
        "assert dask_llm.providers.provider_of(model).name == 'anthropic'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_batch_id_finds_its_provider_before_its_sdk_is_imported() -> None:
    assert [p.name for p in providers(every=True)] == ["openai", "anthropic"]


def test_each_model_finds_its_provider() -> None:
    assert provider_of(ChatOpenAI(model="gpt-4o-mini", api_key="k")) is OPENAI
    assert provider_of(ChatAnthropic(model="claude-haiku-4-5", api_key="k")) is CLAUDE
    assert provider_of("not a model") is None


def test_claude_usage_counts_the_whole_prompt_and_prices_each_part() -> None:
    body = claude_answer(cache_creation_input_tokens=2_000, cache_read_input_tokens=5_000)
    reported = CLAUDE.read(body)
    assert reported.prompt_tokens == 7_100  # uncached + cache reads + cache writes
    assert reported.cached_tokens == 5_000 and reported.cache_write_tokens == 2_000
    outcome = outcome_of(200, {}, body, REQUEST, provider=CLAUDE)
    price = price_of("claude-sonnet-4-5")  # the dated name finds its entry
    assert price == (3.0, 15.0, 0.30, 3.75)
    expected = (100 * 3.0 + 5_000 * 0.30 + 2_000 * 3.75 + 20 * 15.0) / 1e6
    assert outcome.cost(None) == pytest.approx(expected)
    batch = outcome_of(200, None, body, REQUEST, provider=CLAUDE, batch=True)
    assert batch.cost(None) == pytest.approx(expected / 2)


def test_a_claude_stream_reports_its_final_output_tokens() -> None:
    events = [
        {"type": "message_start", "message": json.loads(claude_answer(output_tokens=1))},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 64},
        },
    ]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode()
    reported = CLAUDE.read(stream)
    assert (reported.prompt_tokens, reported.completion_tokens) == (100, 64)
    assert reported.truncated


@pytest.mark.parametrize(
    ("status", "body", "fatal"),
    [
        pytest.param(401, {"type": "authentication_error"}, True, id="401"),
        pytest.param(404, {"type": "not_found_error"}, True, id="404"),
        pytest.param(529, {"type": "overloaded_error"}, False, id="529-overloaded"),
        pytest.param(
            400,
            {"type": "invalid_request_error", "message": "Your credit balance is too low"},
            True,
            id="credit-balance",
        ),
        pytest.param(400, {"type": "invalid_request_error", "message": "bad"}, False, id="400"),
    ],
)
def test_claude_fatal_answers(status: int, body: dict[str, str], fatal: bool) -> None:
    data = json.dumps({"type": "error", "error": body}).encode()
    outcome = outcome_of(status, {}, data, REQUEST, provider=CLAUDE)
    assert (outcome.fatal is not None) is fatal


def test_claude_limits_and_429s() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-input-tokens-limit": "2000000",
        "anthropic-ratelimit-output-tokens-limit": "400000",
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "retry-after": "3",
    }
    limited = json.dumps({"type": "error", "error": {"type": "rate_limit_error"}}).encode()
    outcome = outcome_of(429, headers, limited, REQUEST, provider=CLAUDE)
    assert outcome.quota and outcome.fatal is None
    # The output limit (paced apart) and what is left of it (0: its bucket follows).
    assert outcome.announced == (4000, 2_000_000, 400_000, 0)
    overloaded = json.dumps({"type": "error", "error": {"type": "overloaded_error"}}).encode()
    assert not outcome_of(529, headers, overloaded, REQUEST, provider=CLAUDE).quota


def test_openai_reads_as_before() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "choices": [{"finish_reason": "length", "message": {"refusal": "no"}}],
            "usage": {
                "prompt_tokens": 1_000,
                "completion_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 512},
            },
        }
    ).encode()
    reported = OPENAI.read(body)
    assert (reported.prompt_tokens, reported.cached_tokens, reported.cache_write_tokens) == (
        1_000,
        512,
        0,
    )
    assert reported.truncated and reported.refused
    assert OPENAI.announced({"x-ratelimit-limit-requests": "500"}) == (500, None, None, None)


def test_caching_savings_count_the_premium_of_cache_writes() -> None:
    price = price_of("claude-haiku-4-5")
    assert price is not None
    usage = dask_llm.core.usage.Usage()
    usage.charge("claude-haiku-4-5", 3_000, 10, None, cached_tokens=1_000, cache_write_tokens=2_000)
    # Reads saved 0.9 of the input price on 1,000 tokens; writes cost 0.25 more on 2,000.
    assert usage.saved == pytest.approx((1_000 * 0.9 - 2_000 * 0.25) / 1e6)
    expected = (1_000 * 0.10 + 2_000 * 1.25 + 10 * 5.0) / 1e6
    assert usage.cost_usd == pytest.approx(expected)
