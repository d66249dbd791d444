"""The SDK fast path: the same bytes on the wire, our loops only, off when the SDK changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, TypedDict

import httpx2 as httpx
import pandas as pd
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from openai._utils._transform import PropertyInfo
from openai.types.chat import completion_create_params

import dask_llm
from dask_llm.transport import sdk as _sdk
from tests.chains import Features, Summary, llm, text_chain, wine_chains
from tests.helpers import requests, reviews


class Verdict(TypedDict):
    """A response format given as a TypedDict (sent as a JSON schema, not parsed)."""

    verdict: Literal["buy", "skip"]
    reason: str


# Chat parameter types as a future SDK might have them: an alias, a date format.
class _Part(TypedDict, total=False):
    file_data: Annotated[str, PropertyInfo(alias="fileData")]


class _Dated(TypedDict, total=False):
    at: Annotated[str, PropertyInfo(format="iso8601")]


class _Aliased(TypedDict, total=False):
    messages: Iterable[_Part | _Dated]


class _Formatted(TypedDict, total=False):
    items: list[_Dated]


@tool
def lookup_vintage(wine: str, year: int) -> str:
    """Look up a vintage."""
    return f"{wine} {year}"


PROMPT = ChatPromptTemplate.from_template("Summarise this review: {description}")
HISTORY = [
    SystemMessage("You are a sommelier."),
    HumanMessage(
        content=[
            {"type": "text", "text": "What is on this label?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]
    ),
    AIMessage(
        "",
        tool_calls=[
            {"name": "lookup_vintage", "args": {"wine": "Barolo", "year": 2016}, "id": "call_1"}
        ],
    ),
    ToolMessage("Barolo 2016: a great year", tool_call_id="call_1"),
    HumanMessage("And the score?"),
]

#: (name, build the runnable from a model, its input): every shape of chat request we send.
CHAINS: list[tuple[str, Callable[[Any], Any], Any]] = [
    (
        "structured-parse",
        lambda m: PROMPT | m.with_structured_output(Summary),
        {"description": "x"},
    ),
    (
        "function-calling",
        lambda m: PROMPT | m.with_structured_output(Features, method="function_calling"),
        {"description": "x"},
    ),
    (
        "typeddict-schema",
        lambda m: PROMPT | m.with_structured_output(Verdict),
        {"description": "x"},
    ),
    (
        "text-with-options",
        lambda m: PROMPT | m.bind(max_tokens=50, stop=["\n", "END"], seed=7, logit_bias={"1": -5}),
        {"description": "x"},
    ),
    ("tools-history-image", lambda m: m.bind_tools([lookup_vintage]), HISTORY),
]


async def _bodies(base_url: str, build: Callable[[Any], Any], value: Any, *, fast: bool) -> bytes:
    seen: list[bytes] = []

    async def capture(request: httpx.Request) -> None:
        seen.append(request.content)

    http = httpx.AsyncClient(event_hooks={"request": [capture]})
    try:
        if fast:
            assert _sdk.activate()
        model = llm(base_url, http_async_client=http, temperature=0.2, max_retries=0)
        await build(model).ainvoke(value)
    finally:
        await http.aclose()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(("build", "value"), [c[1:] for c in CHAINS], ids=[c[0] for c in CHAINS])
def test_the_request_body_is_the_sdks_own_byte_for_byte(sim: Any, build: Any, value: Any) -> None:
    slow = asyncio.run(_bodies(sim.base_url, build, value, fast=False))
    fast = asyncio.run(_bodies(sim.base_url, build, value, fast=True))
    assert fast == slow
    assert b'"messages"' in fast


def test_a_cache_written_without_the_fast_path_is_hit_in_full_with_it(
    sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = reviews(8)
    chains = [*wine_chains(sim.base_url), dask_llm.Chain(text_chain(sim.base_url), name="word")]
    monkeypatch.setenv("DASK_LLM_SDK_FAST_PATH", "0")
    before = frame.llm.enrich(chains, progress=False)
    sent = requests(sim)
    assert sent == 3 * len(frame)
    monkeypatch.delenv("DASK_LLM_SDK_FAST_PATH")
    again = frame.llm.enrich(chains, progress=False)
    assert requests(sim) == sent  # every key the same: nothing asked again
    usage = ["llm_input_tokens", "llm_output_tokens", "llm_cost_usd"]  # nothing paid the 2nd time
    pd.testing.assert_frame_equal(again.drop(columns=usage), before.drop(columns=usage))


def test_the_sdks_chat_types_allow_it_and_a_type_with_an_alias_or_format_does_not() -> None:
    assert _sdk.install()
    assert _sdk._plain_type(completion_create_params.CompletionCreateParams)

    assert not _sdk._plain_type(_Aliased)
    assert not _sdk._plain_type(_Formatted)


def test_only_our_loops_take_it() -> None:
    import openai.lib._chat_completion_resources as resources

    assert _sdk.install()
    params = completion_create_params.CompletionCreateParams
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": None}

    async def transform(active: bool) -> dict[str, Any]:
        if active:
            _sdk.activate()
        return await resources.async_maybe_transform(body, params)  # type: ignore[no-any-return]

    ours = asyncio.run(transform(True))
    theirs = asyncio.run(transform(False))  # a user's own call: the SDK's walk
    assert ours == theirs == body
    assert ours["messages"] is body["messages"]
    assert theirs["messages"] is not body["messages"]


def test_anything_but_plain_json_goes_to_the_sdks_transform() -> None:
    import datetime

    from openai import omit

    assert _sdk.plain_body({"a": [1, 2.5, "x", None, True, {"b": "c"}], "o": omit}) == {
        "a": [1, 2.5, "x", None, True, {"b": "c"}]
    }
    for odd in ((1, 2), Summary(summary="s", sentiment="positive"), datetime.date(2026, 1, 1)):
        assert _sdk.plain_body({"a": [{"b": odd}]}) is None
    assert _sdk.plain_body({"a": {1: "integer key"}}) is None


def test_each_response_format_schema_is_built_once_and_handed_out_fresh() -> None:
    import openai.lib._chat_completion_resources as resources

    assert _sdk.install()
    build = resources._type_to_response_format  # type: ignore[attr-defined]

    async def twice() -> tuple[Any, Any]:
        _sdk.activate()
        first = build(Summary)
        first["json_schema"]["name"] = "changed by a caller"
        return first, build(Summary)

    first, second = asyncio.run(twice())
    assert second["json_schema"]["name"] == "Summary"
    assert second == build.__wrapped__(Summary)
    assert first is not second


def test_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_LLM_SDK_FAST_PATH", "0")
    assert not _sdk.enabled()

    async def main() -> bool:
        return _sdk.activate()

    assert not asyncio.run(main())
