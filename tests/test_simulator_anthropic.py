"""The simulator speaks Anthropic's Messages API, as the real anthropic SDK reads it."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import pytest

from dask_llm.providers.anthropic import AnthropicProvider

MODEL = "claude-haiku-4-5"
SCHEMA = {
    "type": "object",
    "properties": {"grape": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["grape", "score"],
}


def client(sim: Any, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=sim.anthropic_base_url, api_key="k", **kwargs)


def ask(c: anthropic.Anthropic, text: str = "Describe a Chilean red", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 200)
    return c.messages.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **kwargs
    )


def test_a_text_answer_with_its_usage_and_limit_headers(make_simulator: Any) -> None:
    sim = make_simulator(rpm=600, tpm=100_000, output_tpm=20_000)
    with client(sim) as c:
        raw = ask(c)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    for kind in ("requests", "input-tokens", "output-tokens"):
        assert raw.headers[f"anthropic-ratelimit-{kind}-limit"]
        assert int(raw.headers[f"anthropic-ratelimit-{kind}-remaining"]) >= 0
        assert raw.headers[f"anthropic-ratelimit-{kind}-reset"].endswith("Z")
    announced = AnthropicProvider().announced(raw.headers)
    assert announced[:3] == (600, 100_000, 20_000)
    left = int(raw.headers["anthropic-ratelimit-output-tokens-remaining"])
    assert announced.otpm_left == left  # what the output bucket held as it answered


def test_tool_use_follows_the_tools_input_schema(sim: Any) -> None:
    tool = {"name": "Tasting", "description": "a tasting", "input_schema": SCHEMA}
    with client(sim) as c:
        message = ask(c, tools=[tool], tool_choice={"type": "tool", "name": "Tasting"}).parse()
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "Tasting"
    assert isinstance(block.input["grape"], str) and isinstance(block.input["score"], int)


def test_a_cached_prefix_is_written_once_then_read(sim: Any) -> None:
    system = [
        {
            "type": "text",
            "text": "You are a sommelier. " * 400,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    provider = AnthropicProvider()
    with client(sim) as c:
        first = ask(c, system=system)
        second = ask(c, "Describe a Chilean white", system=system)
    written, read = first.parse().usage, second.parse().usage
    assert written.cache_creation_input_tokens >= 1024 and written.cache_read_input_tokens == 0
    assert read.cache_read_input_tokens == written.cache_creation_input_tokens
    assert read.cache_creation_input_tokens == 0
    # The provider reads the whole prompt: uncached + cache reads + cache writes.
    reported = provider.read(second.http_response.content)
    assert reported.prompt_tokens == read.input_tokens + read.cache_read_input_tokens
    assert reported.cached_tokens == read.cache_read_input_tokens
    assert provider.read(first.http_response.content).cache_write_tokens == (
        written.cache_creation_input_tokens
    )


def test_the_request_bucket_refills_continuously_and_answers_429_with_retry_after(
    make_simulator: Any,
) -> None:
    sim = make_simulator(rpm=600)  # 10/s, a bucket of one second's requests
    with client(sim) as c:
        statuses = []
        for _ in range(12):
            try:
                statuses.append(ask(c).status_code)
            except anthropic.RateLimitError as exc:
                statuses.append(exc.status_code)
                limited = exc
        assert statuses.count(429) >= 1
        assert limited.response.headers["retry-after"] == "1"
        assert limited.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert AnthropicProvider().is_quota_429(limited.response.headers, limited.response.content)
        time.sleep(0.25)  # refilled by 2.5 requests: not a whole second's slice
        assert ask(c).status_code == 200
    assert sim.stats()["rate_limited"] == statuses.count(429)


def test_the_output_bucket_takes_max_tokens_then_gets_back_what_the_answer_did_not_use(
    make_simulator: Any,
) -> None:
    sim = make_simulator(output_tpm=6_000)  # 100 output tokens/s, a bucket of one second's
    with client(sim) as c:
        raw = ask(c, max_tokens=90)
    used = raw.parse().usage.output_tokens
    assert 0 < used < 60
    # Per-minute units: 60 x the bucket's level: 100, less 90 taken on arrival, plus the
    # 90 - used the answer gave back (and whatever refilled in between).
    left = int(raw.headers["anthropic-ratelimit-output-tokens-remaining"])
    assert (100 - used) * 60 <= left <= 100 * 60


def test_overloaded_is_a_529_and_not_fatal(make_simulator: Any) -> None:
    sim = make_simulator(overloaded=1.0)
    with client(sim) as c, pytest.raises(anthropic.APIStatusError) as info:
        ask(c)
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert not AnthropicProvider().fatal(529, info.value.response.content)
    assert sim.stats()["faults"]["overloaded"] == 1


def test_a_wrong_key_is_a_401_and_fatal(make_simulator: Any) -> None:
    sim = make_simulator(api_key="the-right-one")
    with client(sim) as c, pytest.raises(anthropic.AuthenticationError) as info:
        ask(c)
    assert AnthropicProvider().fatal(401, info.value.response.content)


def test_a_stream_carries_the_same_answer(sim: Any) -> None:
    with client(sim) as c:
        whole = ask(c).parse()
        with c.messages.stream(
            model=MODEL,
            max_tokens=200,
            messages=[{"role": "user", "content": "Describe a Chilean red"}],
        ) as stream:
            streamed = stream.get_final_message()
    assert streamed.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert streamed.usage.output_tokens == whole.usage.output_tokens


# -- the Message Batches API --------------------------------------------------------------------
def batch_requests(n: int) -> list[Any]:
    return [
        {
            "custom_id": f"r{i}",
            "params": {
                "model": MODEL,
                "max_tokens": 50,
                "messages": [{"role": "user", "content": f"Describe wine {i}"}],
            },
        }
        for i in range(n)
    ]


def wait_ended(c: anthropic.Anthropic, batch_id: str) -> Any:
    deadline = time.monotonic() + 10
    while (batch := c.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return batch


def test_a_message_batch_answers_as_the_online_endpoint(make_simulator: Any) -> None:
    sim = make_simulator(batch_delay=0.1, batch_line_failure_rate=0.2, seed=2)
    with client(sim) as c:
        created = c.messages.batches.create(requests=batch_requests(10))
        assert created.processing_status == "in_progress"
        assert created.request_counts.processing == 10
        batch = wait_ended(c, created.id)
        assert batch.results_url and batch.ended_at is not None
        results = {r.custom_id: r.result for r in c.messages.batches.results(batch.id)}
        online = ask(c, "Describe wine 3", max_tokens=50).parse()
        assert [b.id for b in c.messages.batches.list()] == [batch.id]
    kinds = [r.type for r in results.values()]
    assert kinds.count("errored") == batch.request_counts.errored >= 1
    assert kinds.count("succeeded") == batch.request_counts.succeeded
    if results["r3"].type == "succeeded":
        assert results["r3"].message.content == online.content  # type: ignore[union-attr]
        assert results["r3"].message.usage == online.usage  # type: ignore[union-attr]
    stats = sim.stats()
    assert stats["message_batches_created"] == 1 and stats["message_batch_requests"] == 10
    assert stats["requests"] == 1  # the batch's lines are not online requests


def test_a_cancelled_and_an_expired_batch(make_simulator: Any) -> None:
    sim = make_simulator(batch_delay=1.0, batch_expire_after=0.2, batch_expire_count=1)
    with client(sim) as c:
        expiring = c.messages.batches.create(requests=batch_requests(10))
        ended = wait_ended(c, expiring.id)
        counts = ended.request_counts
        assert counts.expired > 0 and counts.succeeded + counts.expired == 10
        kinds = [r.result.type for r in c.messages.batches.results(expiring.id)]
        assert kinds.count("expired") == counts.expired

        cancelled = c.messages.batches.create(requests=batch_requests(10))
        assert c.messages.batches.cancel(cancelled.id).processing_status == "canceling"
        counts = wait_ended(c, cancelled.id).request_counts
        assert counts.canceled > 0 and counts.succeeded + counts.canceled == 10
    # The second batch resubmitted lines the first had answered: paid twice, and counted.
    stats = sim.stats()
    assert stats["message_batch_duplicates"] == min(
        stats["message_batch_succeeded"] - ended.request_counts.succeeded,
        ended.request_counts.succeeded,
    )
