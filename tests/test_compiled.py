"""The compiled path (``dask_llm.compiled``): the same requests, values, errors and usage as
LangChain's path, for every shape it takes, against the simulator through the real clients."""

from __future__ import annotations

import logging
import re
from typing import Any, TypedDict

import pandas as pd
import pytest
from langchain_core.messages import AIMessage, SystemMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser, StrOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import BaseModel

import dask_llm
from dask_llm.core.config import RetryPolicy
from dask_llm.core.usage import USAGE_COLUMNS
from tests.chains import Summary, llm, wine_chains
from tests.helpers import requests, reviews

LOGGER = "dask_llm.compiled.caller"
ROWS = 12


class Note(TypedDict):
    summary: str
    score: int


NOTE_SCHEMA = {
    "title": "Note",
    "description": "A tasting note.",
    "type": "object",
    "properties": {"summary": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["summary", "score"],
}


class Tasting(BaseModel):
    summary: str
    score: int


def _prompt(text: str = "Summarise this review: {description}") -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([("system", "You are a sommelier."), ("human", text)])


def _instructed(parser: Any) -> ChatPromptTemplate:
    """A prompt carrying the parser's format instructions in its text (no partial variables)."""
    instructions = parser.get_format_instructions().replace("{", "{{").replace("}", "}}")
    return _prompt("Review: {description}\n\n" + instructions)


def _few_shot() -> ChatPromptTemplate:
    """Static messages (an AI answer among them), a template without fields, escaped braces."""
    return ChatPromptTemplate.from_messages(
        [
            SystemMessage(content="You are a sommelier."),
            ("human", "Summarise: {{crisp, dry}}"),
            AIMessage(content="A crisp, dry wine."),
            ("human", "Summarise: {description} ({description})"),
        ]
    )


SHAPES: dict[str, Any] = {
    "prompt-model": lambda url: _prompt() | llm(url),
    "few-shot": lambda url: _few_shot() | llm(url).with_structured_output(Summary),
    "str-parser": lambda url: _prompt() | llm(url) | StrOutputParser(),
    "bind": lambda url: (
        _prompt() | llm(url).bind(temperature=0.3, stop=["\n\n"]) | StrOutputParser()
    ),
    "model-fields": lambda url: _prompt() | llm(url, temperature=0, max_tokens=60, seed=3),
    "json-schema-pydantic": lambda url: _prompt() | llm(url).with_structured_output(Summary),
    "json-schema-strict": lambda url: (
        _prompt() | llm(url).with_structured_output(Summary, strict=True)
    ),
    "json-schema-typeddict": lambda url: _prompt() | llm(url).with_structured_output(Note),
    "json-schema-dict": lambda url: _prompt() | llm(url).with_structured_output(NOTE_SCHEMA),
    "function-calling-pydantic": lambda url: (
        _prompt() | llm(url).with_structured_output(Summary, method="function_calling")
    ),
    "function-calling-dict": lambda url: (
        _prompt() | llm(url).with_structured_output(NOTE_SCHEMA, method="function_calling")
    ),
    "json-mode-pydantic": lambda url: (
        _instructed(PydanticOutputParser(pydantic_object=Tasting))
        | llm(url).with_structured_output(Tasting, method="json_mode")
    ),
    "json-mode-dict": lambda url: (
        _instructed(JsonOutputParser(pydantic_object=Tasting))
        | llm(url).with_structured_output(NOTE_SCHEMA, method="json_mode")
    ),
    "include-raw": lambda url: (
        _prompt() | llm(url).with_structured_output(Summary, include_raw=True)
    ),
    "include-raw-function-calling": lambda url: (
        _prompt()
        | llm(url).with_structured_output(Summary, method="function_calling", include_raw=True)
    ),
    "include-raw-dict": lambda url: (
        _prompt() | llm(url).with_structured_output(NOTE_SCHEMA, include_raw=True)
    ),
    "pydantic-parser": lambda url: (
        _instructed(PydanticOutputParser(pydantic_object=Tasting))
        | llm(url)
        | PydanticOutputParser(pydantic_object=Tasting)
    ),
    "json-parser": lambda url: (
        _instructed(JsonOutputParser(pydantic_object=Tasting))
        | llm(url)
        | JsonOutputParser(pydantic_object=Tasting)
    ),
}
OUTPUTS: dict[str, Any] = {
    "include-raw": ["summary", "sentiment", "raw"],
    "include-raw-function-calling": ["summary", "sentiment", "raw"],
    "include-raw-dict": ["summary", "score", "raw"],
}


def _chain(shape: str, url: str, **wiring: Any) -> dask_llm.Chain:
    return dask_llm.Chain(SHAPES[shape](url), name="c", outputs=OUTPUTS.get(shape), **wiring)


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame without its usage columns (an answer from the cache costs nothing now)."""
    return frame.drop(columns=list(USAGE_COLUMNS))


def _compiled(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The chains that took the compiled path, as its debug lines say."""
    return [r.getMessage() for r in caplog.records if "takes the compiled path" in r.getMessage()]


def _fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "for the rest of this job" in r.getMessage()]


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_sends_the_same_bytes_and_reads_the_same_values(
    shape: str, sim: Any, tmp_path: Any, debug_log: pytest.LogCaptureFixture
) -> None:
    df = reviews(ROWS)
    path = str(tmp_path / "answers.sqlite")
    langchain = df.llm.enrich([_chain(shape, sim.base_url)], cache=path, compiled=False)
    sent = requests(sim)
    assert sent == ROWS and not _compiled(debug_log)
    assert langchain["llm_error"].isna().all(), langchain["llm_error"].dropna().tolist()

    # Another wiring of the same chain (no row memo in common): its requests are the
    # cache's keys, so each one the compiled path sends must be LangChain's, byte for byte.
    same_requests = _chain(shape, sim.base_url, inputs={"description": "description"})
    from_cache = df.llm.enrich([same_requests], cache=path)
    assert requests(sim) == sent, "a compiled request was not LangChain's"
    assert _compiled(debug_log) and not _fallbacks(debug_log)
    pd.testing.assert_frame_equal(_values(from_cache), _values(langchain))

    fresh = df.llm.enrich([_chain(shape, sim.base_url)], cache=False)
    assert requests(sim) == 2 * sent
    pd.testing.assert_frame_equal(fresh, langchain)


def test_two_dependent_chains_equal_langchains_path(
    sim: Any, debug_log: pytest.LogCaptureFixture
) -> None:
    df = reviews(40)
    langchain = df.llm.enrich(wine_chains(sim.base_url), cache=False, compiled=False)
    compiled = df.llm.enrich(wine_chains(sim.base_url), cache=False)
    assert len(_compiled(debug_log)) == 2
    pd.testing.assert_frame_equal(compiled, langchain)
    assert requests(sim) == 2 * 2 * 40


def test_a_cache_written_by_the_compiled_path_is_hit_in_full_by_langchains(
    sim: Any, tmp_path: Any, debug_log: pytest.LogCaptureFixture
) -> None:
    df = reviews(ROWS)
    path = str(tmp_path / "answers.sqlite")
    compiled = df.llm.enrich([_chain("json-schema-pydantic", sim.base_url)], cache=path)
    assert _compiled(debug_log)
    sent = requests(sim)
    other = _chain("json-schema-pydantic", sim.base_url, inputs={"description": "description"})
    langchain = df.llm.enrich([other], cache=path, compiled=False)
    assert requests(sim) == sent
    pd.testing.assert_frame_equal(_values(langchain), _values(compiled))


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"schema_violation": 0.3}, id="schema-violation"),
        pytest.param({"malformed_json": 0.3}, id="malformed-json"),
        pytest.param({"error_rate": 0.3}, id="server-error"),
    ],
)
@pytest.mark.parametrize("shape", ["json-schema-pydantic", "function-calling-pydantic"])
def test_an_answer_that_does_not_parse_fails_its_row_with_langchains_error(
    shape: str, fault: dict[str, float], make_simulator: Any, debug_log: pytest.LogCaptureFixture
) -> None:
    df = reviews(24)
    frames = []
    for compiled in (False, True):
        # One request at a time: the simulator draws its faults in the order requests come.
        server = make_simulator(seed=5, **fault)
        out = df.llm.enrich(
            [_chain(shape, server.base_url)],
            cache=False,
            compiled=compiled,
            max_concurrency=1,
            retry=RetryPolicy(attempts=2, parse_attempts=2, wait_initial=0),
        )
        host = server.base_url.split("/")[2]  # each server has its own port
        out["llm_error"] = out["llm_error"].str.replace(host, "HOST", regex=False)
        frames.append(out)
    langchain, compiled_frame = frames
    assert _compiled(debug_log)
    assert langchain["llm_error"].notna().any()
    pd.testing.assert_frame_equal(compiled_frame, langchain)


def test_a_difference_in_the_request_falls_back_with_one_log_line(
    sim: Any, monkeypatch: pytest.MonkeyPatch, debug_log: pytest.LogCaptureFixture
) -> None:
    """LangChain formats a prompt otherwise than the compiled path: it is caught on the
    first row checked (whichever of the concurrent rows comes first: CI on 3.13 saw row
    1), and the chain takes LangChain's path for the job."""
    from langchain_core.prompts.prompt import PromptTemplate

    original = PromptTemplate.format

    def shouting(self: PromptTemplate, **kwargs: Any) -> str:
        return original(self, **{k: str(v).upper() for k, v in kwargs.items()})

    monkeypatch.setattr(PromptTemplate, "format", shouting)
    df = reviews(ROWS)
    out = df.llm.enrich([_chain("json-schema-pydantic", sim.base_url)], cache=False)
    (line,) = _fallbacks(debug_log)
    assert "'c'" in line and "request bodies differ at byte" in line
    assert re.search(r"REVIEW \d+:", line), line  # the row's own text, as LangChain sent it
    assert not _compiled(debug_log)
    assert out["llm_error"].isna().all()
    assert requests(sim) == ROWS  # nothing was sent twice


def test_a_difference_in_the_values_falls_back_with_one_log_line(
    sim: Any, monkeypatch: pytest.MonkeyPatch, debug_log: pytest.LogCaptureFixture
) -> None:
    original = PydanticToolsParser.parse_result

    def rounded(self: PydanticToolsParser, result: Any, *, partial: bool = False) -> Any:
        value = original(self, result, partial=partial)
        return value.model_copy(update={"summary": value.summary[:5]}) if value else value

    monkeypatch.setattr(PydanticToolsParser, "parse_result", rounded)
    df = reviews(ROWS)
    out = df.llm.enrich([_chain("function-calling-pydantic", sim.base_url)], cache=False)
    (line,) = _fallbacks(debug_log)
    assert "parsed values differ" in line
    assert (out["summary"].str.len() <= 5).all()  # LangChain's values, every row
    assert requests(sim) == ROWS


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_switch_turns_it_off(
    how: str, sim: Any, monkeypatch: pytest.MonkeyPatch, debug_log: pytest.LogCaptureFixture
) -> None:
    options: dict[str, Any] = {}
    if how == "option":
        options["compiled"] = False
    else:
        monkeypatch.setenv("DASK_LLM_COMPILED", "0")
    df = reviews(ROWS)
    out = df.llm.enrich([_chain("json-schema-pydantic", sim.base_url)], cache=False, **options)
    assert out["llm_error"].isna().all()
    assert not _compiled(debug_log) and not _fallbacks(debug_log)


def _lambda_chain(url: str) -> Runnable:
    return _prompt() | llm(url) | StrOutputParser() | RunnableLambda(str.upper)


def test_a_chain_of_another_shape_takes_langchains_path(
    sim: Any, debug_log: pytest.LogCaptureFixture
) -> None:
    df = reviews(4)
    chain = dask_llm.Chain(_lambda_chain(sim.base_url), name="c", outputs="c")
    out = df.llm.enrich([chain], cache=False)
    assert out["c"].str.isupper().all()
    assert not _compiled(debug_log) and not _fallbacks(debug_log)
    assert "more than one step after the model" in debug_log.text
