"""The simulator, driven through the openai SDK, ChatOpenAI and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import fields
from typing import Any, Literal

import aiohttp
import openai
import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from dask_llm.simulator import Simulator, SimulatorConfig, fetch_stats
from tests.conftest import API_KEY

MESSAGES = [{"role": "user", "content": "Describe a bright, crisp Riesling from the Mosel."}]


def client(sim: Simulator, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", **kwargs)


def ask(sim: Simulator, **kwargs: Any) -> Any:
    with client(sim) as c:
        return c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=kwargs.pop("messages", MESSAGES), **kwargs
        )


class Grape(BaseModel):
    name: str
    share: float = Field(ge=0, le=1)


class Review(BaseModel):
    summary: str
    sentiment: Literal["positive", "neutral", "negative"]
    score: int = Field(ge=80, le=100)
    grapes: list[Grape] = Field(min_length=2, max_length=4)
    tags: list[str]
    organic: bool
    vintage: int | None


# -- wire format ---------------------------------------------------------------------------
def test_text_completion_and_usage(sim: Simulator) -> None:
    raw = ask(sim)
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content
    usage = reply.usage
    assert usage.prompt_tokens > 10
    assert usage.completion_tokens == -(-len(reply.choices[0].message.content) // 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = sim.stats()
    assert stats["successes"] == 1
    assert stats["prompt_tokens"] == usage.prompt_tokens
    assert stats["completion_tokens"] == usage.completion_tokens


def test_prompt_tokens_grow_with_the_prompt(sim: Simulator) -> None:
    short = ask(sim).parse().usage.prompt_tokens
    long_messages = [{"role": "user", "content": "word " * 400}]
    assert ask(sim, messages=long_messages).parse().usage.prompt_tokens >= short + 400


def test_answers_are_deterministic_and_repeats_are_counted(sim: Simulator) -> None:
    first = ask(sim).parse().choices[0].message.content
    second = ask(sim).parse().choices[0].message.content
    other = ask(sim, messages=[{"role": "user", "content": "A smoky Syrah."}]).parse()
    assert first == second
    assert other.choices[0].message.content != first
    assert sim.stats()["duplicate_requests"] == 1


def test_the_seed_changes_the_answers(make_simulator: Any) -> None:
    a, b = make_simulator(seed=1), make_simulator(seed=2)
    assert ask(a).parse().choices[0].message.content != ask(b).parse().choices[0].message.content


def test_max_tokens_truncates_with_finish_reason_length(sim: Simulator) -> None:
    reply = ask(sim, max_tokens=3).parse()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert len(reply.choices[0].message.content) <= 12


def test_json_object_mode(sim: Simulator) -> None:
    reply = ask(sim, response_format={"type": "json_object"}).parse()
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_models_endpoint(make_simulator: Any) -> None:
    sim = make_simulator(models=("gpt-4o-mini", "tiny"))
    with client(sim) as c:
        assert [m.id for m in c.models.list()] == ["gpt-4o-mini", "tiny"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_parses_into_the_model(sim: Simulator, method: str) -> None:
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=sim.base_url, max_retries=0)
    chain = ChatPromptTemplate.from_template("Review {wine}") | llm.with_structured_output(
        Review, method=method
    )
    review = chain.invoke({"wine": "a Barolo"})
    assert isinstance(review, Review)
    assert 2 <= len(review.grapes) <= 4 and all(0 <= g.share <= 1 for g in review.grapes)
    assert 80 <= review.score <= 100


def test_streaming(sim: Simulator) -> None:
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=sim.base_url, max_retries=0, streaming=True)
    chunks = list(llm.stream("Describe a Merlot"))
    assert "".join(str(c.content) for c in chunks)


# -- limits --------------------------------------------------------------------------------
def test_429_carries_retry_after_and_rate_limit_headers(make_simulator: Any) -> None:
    sim = make_simulator(rpm=60)  # one request per 1 s slice
    ok = ask(sim)
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in ok.headers
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    with pytest.raises(openai.RateLimitError) as info:
        ask(sim)
    err = info.value
    assert err.code == "rate_limit_exceeded"
    headers = err.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert sim.stats()["rate_limited"] == 1
    time.sleep(int(headers["retry-after-ms"]) / 1000)
    assert ask(sim).parse().choices


def test_tpm_limit(make_simulator: Any) -> None:
    sim = make_simulator(tpm=6000, completion_tokens=40)  # 100 tokens per 1 s slice
    ask(sim, max_tokens=50)
    with pytest.raises(openai.RateLimitError, match="tokens per min"):
        ask(sim, max_tokens=50)
    time.sleep(1.0)
    assert ask(sim, max_tokens=50).headers["x-ratelimit-limit-tokens"] == "6000"


def test_max_in_flight(make_simulator: Any) -> None:
    sim = make_simulator(latency=0.3, max_in_flight=2)

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
            calls = [
                c.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
                for i in range(5)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert sum(isinstance(r, openai.RateLimitError) for r in results) == 3
    assert sim.stats()["peak_in_flight"] >= 3


# -- faults --------------------------------------------------------------------------------
def test_a_hang_trips_the_client_timeout(make_simulator: Any) -> None:
    sim = make_simulator(hang=1.0)
    with client(sim, timeout=0.3) as c, pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert sim.stats()["faults"]["hang"] == 1


@pytest.mark.parametrize(
    ("option", "error", "fault"),
    [
        pytest.param("error_rate", openai.InternalServerError, "error_500", id="500"),
        pytest.param("error_503", openai.InternalServerError, "error_503", id="503"),
        pytest.param("connection_reset", openai.APIConnectionError, "connection_reset", id="reset"),
    ],
)
def test_faults_surface_as_client_errors(
    make_simulator: Any, option: str, error: type[Exception], fault: str
) -> None:
    sim = make_simulator(**{option: 1.0})
    with client(sim) as c, pytest.raises(error):
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert sim.stats()["faults"][fault] == 1
    assert sim.stats()["successes"] == 0


def test_malformed_json_body(make_simulator: Any) -> None:
    sim = make_simulator(malformed_json=1.0)
    with client(sim) as c, pytest.raises((openai.APIResponseValidationError, json.JSONDecodeError)):
        c.chat.completions.create(model="m", messages=MESSAGES)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_schema_violation_fails_parsing(make_simulator: Any, method: str) -> None:
    sim = make_simulator(schema_violation=1.0)
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=sim.base_url, max_retries=0)
    with pytest.raises(Exception) as info:
        llm.with_structured_output(Review, method=method).invoke("Review a Chianti")
    assert "summary" in str(info.value) or "validation" in str(info.value).lower()
    assert sim.stats()["faults"]["schema_violation"] == 1


def test_schema_violation_of_a_truncated_answer_is_still_an_answer(make_simulator: Any) -> None:
    sim = make_simulator(schema_violation=1.0)
    reply = ask(
        sim,
        max_tokens=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Review", "schema": Review.model_json_schema()},
        },
    ).parse()
    assert reply.choices[0].finish_reason == "length"
    assert sim.stats()["faults"]["schema_violation"] == 1


def test_fault_rates_are_about_right_and_seeded(make_simulator: Any) -> None:
    sim = make_simulator(error_rate=0.2, seed=3)

    async def main() -> int:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
            calls = [
                c.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
                for i in range(300)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
        return sum(isinstance(r, openai.InternalServerError) for r in results)

    failures = asyncio.run(main())
    assert 35 <= failures <= 90
    assert sim.stats()["faults"]["error_500"] == failures


def test_wrong_api_key_gets_401_without_the_key_echoed(make_simulator: Any) -> None:
    sim = make_simulator(api_key=API_KEY)
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-wrong-key", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.chat.completions.create(model="m", messages=MESSAGES)
        assert "sk-wrong-key" not in str(info.value) and API_KEY not in str(info.value)
    with openai.OpenAI(base_url=sim.base_url, api_key=API_KEY, max_retries=0) as c:
        assert c.chat.completions.create(model="m", messages=MESSAGES).choices


def test_context_length_exceeded(make_simulator: Any) -> None:
    sim = make_simulator(context_tokens=50)
    with pytest.raises(openai.BadRequestError) as info:
        ask(sim, messages=[{"role": "user", "content": "long " * 100}])
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 50 tokens" in str(info.value)


# -- bad input, raw ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        pytest.param(b"{not json", 400, None, id="invalid-json"),
        pytest.param(b'{"model": "m"}', 400, "messages", id="missing-messages"),
        pytest.param(b'{"model": "m", "messages": "hi"}', 400, "messages", id="messages-not-list"),
        pytest.param(
            b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model", id="missing-model"
        ),
        pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
        pytest.param(
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            400,
            "max_tokens",
            id="max_tokens-not-an-integer",
        ),
        pytest.param(
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
            404,
            None,
            id="unknown-model",
        ),
    ],
)
def test_bad_input_gets_openai_error_bodies(
    make_simulator: Any, body: bytes, status: int, param: str | None
) -> None:
    sim = make_simulator(models=("gpt-4o-mini",))

    async def post() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{sim.base_url}/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            return r.status, await r.json()

    got, payload = asyncio.run(post())
    assert got == status
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert ask(sim).parse().choices  # the server is still fine


# -- latency and stats ---------------------------------------------------------------------
def test_latency_model_is_lognormal_around_the_median_and_per_request() -> None:
    """The model itself, without timing: one draw per request content, median as configured."""
    sim = Simulator(latency=0.15, jitter=0.3, per_token_latency=0.01)
    draws = [sim.app._latency(i.to_bytes(16, "big"), 0) for i in range(2000)]
    assert 0.135 < statistics.median(draws) < 0.165
    assert min(draws) < 0.1 < 0.2 < max(draws)  # spread by the jitter
    assert sim.app._latency(b"same request....", 10) == sim.app._latency(b"same request....", 10)
    assert sim.app._latency(b"same request....", 10) - sim.app._latency(b"same request....", 0) == (
        pytest.approx(0.1)
    )


def test_latency_is_really_waited(make_simulator: Any) -> None:
    sim = make_simulator(latency=0.2)
    with client(sim) as c:
        c.chat.completions.create(model="m", messages=MESSAGES)  # connect first
        t0 = time.perf_counter()
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "other"}])
        assert time.perf_counter() - t0 >= 0.2


def test_stats_peaks_and_reset(make_simulator: Any) -> None:
    sim = make_simulator(latency=0.2)

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
            await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": str(i)}]
                    )
                    for i in range(12)
                )
            )

    asyncio.run(main())
    stats = fetch_stats(sim.base_url)
    assert stats["requests"] == stats["successes"] == 12
    assert stats["peak_in_flight"] >= 10 and stats["in_flight"] == 0
    assert stats["peak_requests_1s"] == stats["peak_requests_60s"] == 12
    assert stats["models"] == {"m": 12}
    sim.reset()
    assert sim.stats()["requests"] == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="probability"):
        SimulatorConfig(error_rate=1.5)
    with pytest.raises(TypeError, match="unknown simulator option"):
        Simulator(latnecy=1)
    with pytest.raises(ValueError, match="spurious_429_shape must be one of"):
        SimulatorConfig(spurious_429_shape="teapot")
    with pytest.raises(ValueError, match="overloaded is a probability"):
        SimulatorConfig(overloaded=2.0)


# -- CLI -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_prints_its_url_serves_and_stops_on_ctrl_c() -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dask_llm",
            "simulate",
            "--port",
            "0",
            "--rpm",
            "600",
            "--limit-mode",
            "bucket",
            "--batch-validation-delay",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
                raw = c.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
                uploaded = c.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
                batch = c.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
            assert raw.headers["x-ratelimit-limit-requests"] == "600"
            assert batch.status == "validating"
            stats = fetch_stats(url)
            assert stats["batches_created"] == 1 and stats["series"][0]["requests"] == 1
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0


def test_the_cli_mirrors_every_config_option() -> None:
    from dask_llm.cli import simulate

    options = {p.name for p in simulate.params} - {"host", "port"}
    assert options == {f.name for f in fields(SimulatorConfig)}


@pytest.mark.slow
def test_cli_rejects_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dask_llm", "simulate", "--error-rate", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "probability" in result.stderr


# -- the hot path's shortcuts --------------------------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        {"model": "gpt-4o-mini", "messages": MESSAGES},
        {"model": 'm\u00e9"x\\', "messages": [{"role": "user", "content": '\u00e9 " \\ \n'}]},
        {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 2},
        {"model": "gpt-4o-mini", "messages": MESSAGES, "response_format": {"type": "json_object"}},
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
    ],
)
def test_rendered_answers_are_byte_identical_to_json_dumps(payload: dict[str, Any]) -> None:
    from dask_llm.simulator._app import SimulatorApp, render, with_usage

    app = SimulatorApp(SimulatorConfig())
    body, completion_tokens, _ = app._compose(payload, app.answer_key(payload), None)
    for cached, tier in ((0, "default"), (1152, "flex")):
        full = with_usage(body, 7, completion_tokens, cached, tier)
        assert full["usage"]["total_tokens"] == 7 + completion_tokens
        assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
        rendered = render(body, 7, completion_tokens, cached, tier)
        assert rendered == json.dumps(full, separators=(",", ":")).encode()


def test_the_answer_does_not_depend_on_key_order_or_spacing(sim: Simulator) -> None:
    payloads = [
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"A Pinot Gris."}]}',
        b'{"messages": [{"content": "A Pinot Gris.", "role": "user"}], "model": "gpt-4o-mini"}',
    ]

    async def post(data: bytes) -> Any:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{sim.base_url}/chat/completions",
                data=data,
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            return await r.json()

    first, second = (asyncio.run(post(p)) for p in payloads)
    assert first == second
