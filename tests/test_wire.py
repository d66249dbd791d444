"""transport.wire: each answer is read once into an Outcome that every stage acts on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from dask_llm.transport.wire import Answer, outcome_of

REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_paid_answer_carries_its_usage_truncation_and_refusal() -> None:
    answer = body(
        model="gpt-4o-mini",
        choices=[{"finish_reason": "length", "message": {"refusal": "no", "content": None}}],
        usage={"prompt_tokens": 1000, "completion_tokens": 500},
    )
    outcome = outcome_of(200, {}, answer, REQUEST)
    assert outcome.ok and not outcome.quota and outcome.fatal is None
    assert (outcome.model, outcome.prompt_tokens, outcome.completion_tokens) == (
        "gpt-4o-mini",
        1000,
        500,
    )
    assert outcome.truncated and outcome.refused
    # The one cost formula: (1000 * 0.15 + 500 * 0.60) / 1e6.
    assert outcome.cost(None) == pytest.approx(0.00045)
    assert outcome.cost({"gpt-4o-mini": (1.0, 2.0)}) == pytest.approx(0.002)


def test_a_batch_line_is_priced_at_the_batch_price() -> None:
    answer = body(model="gpt-4o-mini", usage={"prompt_tokens": 1000, "completion_tokens": 500})
    online = outcome_of(200, None, answer, REQUEST).cost(None)
    batch = outcome_of(200, None, answer, REQUEST, batch=True).cost(None)
    assert online is not None and batch == pytest.approx(online / 2)


def test_an_answer_without_usage_or_price_has_no_cost_and_an_error_costs_nothing() -> None:
    assert outcome_of(200, None, body(model="x"), REQUEST).cost(None) is None
    unpriced = body(model="no-such-model", usage={"prompt_tokens": 1, "completion_tokens": 1})
    assert outcome_of(200, None, unpriced, REQUEST).cost(None) is None
    assert outcome_of(500, None, b"oops", REQUEST).cost(None) == 0.0
    assert outcome_of(None, None, b"", REQUEST).ok is False


@pytest.mark.parametrize(
    ("headers", "code", "room", "quota"),
    [
        pytest.param({"x-ratelimit-remaining-requests": "0"}, None, True, True, id="headers-spent"),
        pytest.param(
            {"x-ratelimit-remaining-requests": "40"}, None, None, False, id="headers-room"
        ),
        pytest.param({}, "rate_limit_exceeded", None, True, id="no-headers-quota-code"),
        pytest.param({}, "rate_limit_exceeded", True, False, id="no-headers-while-room"),
        pytest.param({}, "server_overloaded", None, False, id="no-headers-busy"),
        pytest.param({}, None, None, True, id="no-headers-no-code"),
    ],
)
def test_a_429_is_read_as_the_quota_or_not(
    headers: dict[str, str], code: str | None, room: bool | None, quota: bool
) -> None:
    error = body(error={"code": code, "message": "slow down"} if code else {"message": "busy"})
    outcome = outcome_of(429, headers, error, REQUEST, room=room)
    assert outcome.quota is quota and outcome.fatal is None and not outcome.ok


def test_the_error_type_counts_where_there_is_no_code() -> None:
    """Anthropic's errors have a type and no code: ``overloaded_error`` is a busy server."""
    error = body(type="error", error={"type": "overloaded_error", "message": "Overloaded"})
    assert outcome_of(429, {}, error, REQUEST).quota is False
    error = body(type="error", error={"type": "rate_limit_error", "message": "Slow down"})
    assert outcome_of(429, {}, error, REQUEST).quota is True


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_fatal_answer_says_why_naming_the_host(status: int) -> None:
    error = body(error={"code": "invalid_api_key", "message": "Incorrect API key"})
    outcome = outcome_of(status, {}, error, REQUEST)
    assert outcome.fatal is not None
    assert f"HTTP {status} invalid_api_key from 127.0.0.1:9" in outcome.fatal
    assert "Incorrect API key" in outcome.fatal


def test_insufficient_quota_is_fatal_and_not_the_rate_limit() -> None:
    error = body(error={"code": "insufficient_quota", "message": "You exceeded your quota"})
    outcome = outcome_of(429, {}, error, REQUEST)
    assert outcome.fatal is not None and "insufficient_quota" in outcome.fatal


def test_an_answer_kept_for_a_repeat_holds_what_the_cache_would() -> None:
    """Without a cache a partition keeps its answers for repeats (``Answer.kept``): the
    status, the body and the content type, not the provider's other headers, which were
    most of a worker's memory growth over a long partition."""
    headers = [("Content-Type", "application/json")]
    headers += [(f"x-ratelimit-{i}", str(i)) for i in range(20)]
    answer = Answer(200, headers, body(id="a"))
    kept = answer.kept()
    assert (kept.status, kept.body, kept.headers) == (
        200,
        answer.body,
        [("content-type", "application/json")],
    )
    cached = Answer.from_cache(answer.to_cache())
    assert cached is not None
    assert (cached.status, cached.headers, cached.body) == (kept.status, kept.headers, kept.body)
