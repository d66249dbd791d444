"""Every chain shape gives the columns docs/chains.md promises, typed, known before any request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypedDict

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pytest
from langchain.chat_models import init_chat_model
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, Field

import dask_llm
from tests.chains import llm
from tests.helpers import requests

PROMPT = ChatPromptTemplate.from_template("Describe this wine as JSON if asked: {description}")
ROWS = pd.DataFrame({"description": [f"Review {i}: ripe plum, cedar" for i in range(6)]})
TEXT = pd.StringDtype("pyarrow")


class Tasting(BaseModel):
    summary: str
    score: int = Field(ge=0, le=100)
    sweet: bool
    tags: list[str] = Field(min_length=1, max_length=3)


class TastingDict(TypedDict):
    summary: str
    score: int


TASTING_SCHEMA = {
    "title": "Tasting",
    "description": "A tasting note.",
    "type": "object",
    "properties": {"summary": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["summary", "score"],
}

TYPED = {
    "summary": TEXT,
    "score": pd.Int64Dtype(),
    "sweet": pd.BooleanDtype(),
    "tags": pd.ArrowDtype(pa.list_(pa.string())),
}


def with_instructions(parser: Any) -> Any:
    prompt = ChatPromptTemplate.from_template("Describe this wine: {description}\n{instructions}")
    return prompt.partial(instructions=parser.get_format_instructions())


def shapes(url: str) -> list[Any]:
    model = llm(url)
    configurable = init_chat_model(
        "gpt-4o-mini", model_provider="openai", configurable_fields=("temperature",), base_url=url
    )
    return [
        pytest.param(PROMPT | model, None, {"c": TEXT}, id="message"),
        pytest.param(PROMPT | model | StrOutputParser(), None, {"c": TEXT}, id="text"),
        pytest.param(
            PROMPT | model | StrOutputParser(), ["word"], {"word": TEXT}, id="text-one-name-list"
        ),
        pytest.param(PROMPT | model | StrOutputParser(), "word", {"word": TEXT}, id="text-named"),
        pytest.param(
            PROMPT | model.with_structured_output(Tasting), None, TYPED, id="pydantic-json-schema"
        ),
        pytest.param(
            PROMPT | model.with_structured_output(Tasting, method="function_calling"),
            None,
            TYPED,
            id="pydantic-tools",
        ),
        pytest.param(  # json_mode sends no schema: the prompt must describe it
            with_instructions(PydanticOutputParser(pydantic_object=Tasting))
            | model.with_structured_output(Tasting, method="json_mode"),
            None,
            TYPED,
            id="pydantic-json-mode",
        ),
        pytest.param(
            PROMPT | model.with_structured_output(Tasting, include_raw=True),
            ["summary", "score", "raw"],
            {"summary": TEXT, "score": pd.Int64Dtype(), "raw": TEXT},
            id="include-raw",
        ),
        pytest.param(
            PROMPT | model.with_structured_output(TastingDict),
            None,
            {"summary": TEXT, "score": pd.Int64Dtype()},
            id="typeddict",
        ),
        pytest.param(
            PROMPT | model.with_structured_output(TASTING_SCHEMA),
            None,
            {"summary": TEXT, "score": pd.Int64Dtype()},
            id="json-schema-dict",
        ),
        pytest.param(
            with_instructions(PydanticOutputParser(pydantic_object=Tasting))
            | model
            | PydanticOutputParser(pydantic_object=Tasting),
            None,
            TYPED,
            id="pydantic-output-parser",
        ),
        pytest.param(
            with_instructions(JsonOutputParser(pydantic_object=Tasting))
            | model
            | JsonOutputParser(pydantic_object=Tasting),
            None,
            TYPED,
            id="json-output-parser",
        ),
        pytest.param(PROMPT | configurable, None, {"c": TEXT}, id="configurable-model"),
        pytest.param(
            PROMPT | configurable.with_structured_output(Tasting),
            None,
            TYPED,
            id="configurable-structured",
        ),
    ]


def _cases() -> list[Any]:
    # The URL is only known at run time; ids are fixed here.
    return [p.id for p in shapes("http://127.0.0.1:9/v1")]


@pytest.mark.parametrize("case", _cases())
def test_chain_shapes_give_typed_columns(sim: Any, case: str) -> None:
    param = next(p for p in shapes(sim.base_url) if p.id == case)
    runnable, outputs, expected = param.values
    chain = dask_llm.Chain(runnable, outputs=outputs, name="c")
    lazy = dd.from_pandas(ROWS, npartitions=2).llm.enrich([chain], cache=False, progress=False)
    assert requests(sim) == 0  # the columns were known without a request
    assert {col: lazy.dtypes[col] for col in expected} == expected
    out = lazy.compute()
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().tolist()[:1]
    for col in expected:
        assert out[col].notna().all(), col


@pytest.mark.parametrize(
    ("make", "outputs", "message"),
    [
        pytest.param(
            lambda url: PROMPT | llm(url) | StrOutputParser(),
            ["a", "b"],
            "returns text",
            id="two-columns-from-text",
        ),
        pytest.param(
            lambda url: PROMPT | llm(url).with_structured_output(Tasting),
            ["summary", "colour"],
            "does not return: colour",
            id="unknown-field",
        ),
    ],
)
def test_outputs_that_cannot_match_fail_at_enrich_time(
    sim: Any, make: Callable[[str], Any], outputs: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ROWS.llm.enrich([dask_llm.Chain(make(sim.base_url), outputs=outputs, name="c")])
    assert requests(sim) == 0


def test_include_raw_routes_a_parsing_error_to_the_row_without_paying_again(
    make_simulator: Any,
) -> None:
    sim = make_simulator(schema_violation=1.0)
    chain = PROMPT | llm(sim.base_url).with_structured_output(Tasting, include_raw=True)
    out = ROWS.llm.enrich([dask_llm.Chain(chain, name="c")], cache=False)
    assert out["llm_error"].str.contains("ValidationError").all()
    assert requests(sim) == len(ROWS)  # one request per row: no retry paid for


def test_lists_read_back_from_parquet_with_the_default_readers(sim: Any, tmp_path: Any) -> None:
    chain = dask_llm.Chain(PROMPT | llm(sim.base_url).with_structured_output(Tasting), name="c")
    path = str(tmp_path / "out")
    lazy = dd.from_pandas(ROWS, npartitions=2).llm.enrich([chain], cache=False)
    lazy.to_parquet(path)
    with_pandas = pd.read_parquet(path)
    with_dask = dd.read_parquet(path).compute()
    for frame in (with_pandas, with_dask):
        assert len(frame) == len(ROWS)
        assert list(frame["tags"].iloc[0]) == list(lazy.compute()["tags"].iloc[0])
    typed = pd.read_parquet(path, dtype_backend="pyarrow")
    assert str(typed["tags"].dtype).startswith("list<")


def test_the_same_chain_object_serves_two_jobs(sim: Any) -> None:
    chain = dask_llm.Chain(PROMPT | llm(sim.base_url) | StrOutputParser(), outputs=["note"])
    first = ROWS.llm.enrich([chain], cache=False)
    second = ROWS.llm.enrich({"again": chain}, cache=False)
    assert first["note"].tolist() == second["note"].tolist()
    assert chain.name is None


class Loose(BaseModel):
    summary: str
    extra: dict[str, int]
    anything: Any


def test_dict_and_any_fields_are_json_text_that_parquet_writes_and_reads_back(
    sim: Any, tmp_path: Any
) -> None:
    # Issue 28: no fixed Arrow type, so an object column that Dask could not
    # write (before any call) and pandas could not write (after paying).
    chain = dask_llm.Chain(PROMPT | llm(sim.base_url).with_structured_output(Loose), name="c")
    lazy = dd.from_pandas(ROWS, npartitions=2).llm.enrich([chain], cache=False)
    assert lazy.dtypes["extra"] == lazy.dtypes["summary"]  # text, known before any call
    assert lazy.dtypes["anything"] == lazy.dtypes["summary"]
    assert requests(sim) == 0
    lazy.to_parquet(str(tmp_path / "dask"))
    eager = ROWS.llm.enrich([chain], cache=False)
    eager.to_parquet(tmp_path / "pandas.parquet")
    for back in (
        dd.read_parquet(str(tmp_path / "dask")).compute(),
        pd.read_parquet(tmp_path / "pandas.parquet"),
    ):
        assert back["llm_error"].isna().all()
        assert [json.loads(v) for v in back["extra"]] == [{}] * len(ROWS)
        assert all(isinstance(json.loads(v), str) for v in back["anything"])
