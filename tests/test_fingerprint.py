"""The cache never serves a changed chain's answers (issue 9, case 1).

Each case changes something a chain sends (a closure's prompt, a global model
name, a system prompt read by a function) and checks that the rerun asks the
provider again and returns the new answers; and that what does not change
what is sent (the chain's own post-processing) is answered from the cache
and still post-processed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from pydantic import BaseModel, field_validator

import dask_llm
from dask_llm.cache import SQLiteCache, make_key
from dask_llm.chains.fingerprint import analyse
from tests.chains import llm, summary_chain
from tests.helpers import requests

ROWS = pd.DataFrame({"description": [f"Review {i}: cassis and cedar" for i in range(6)]})


def run(chain: dask_llm.Chain, cache: Any, frame: pd.DataFrame = ROWS) -> pd.DataFrame:
    return frame.llm.enrich([chain], cache=cache, usage=False)


def test_a_factory_whose_prompt_comes_from_a_closure(sim: Any, tmp_path: Any) -> None:
    cache = tmp_path / "c.sqlite"

    def factory(instruction: str) -> Any:
        def make() -> Any:
            prompt = ChatPromptTemplate.from_template(instruction + " {description}")
            return prompt | llm(sim.base_url) | StrOutputParser()

        return make

    first = run(dask_llm.Chain.from_factory(factory("Summarise:"), name="s"), cache)
    sent = requests(sim)
    again = run(dask_llm.Chain.from_factory(factory("Summarise:"), name="s"), cache)
    assert requests(sim) == sent  # unchanged: all from the cache
    pd.testing.assert_frame_equal(first, again)
    changed = run(dask_llm.Chain.from_factory(factory("Translate:"), name="s"), cache)
    assert requests(sim) == sent + len(ROWS)
    assert (changed["s"] != first["s"]).all()


def test_a_lambda_whose_closure_changes(sim: Any, tmp_path: Any) -> None:
    """French then German: the function's bytecode is the same, its closure is not."""
    cache = tmp_path / "c.sqlite"

    def translate_to(language: str) -> Any:
        def prompt(row: dict[str, Any]) -> str:
            return f"Translate into {language}: {row['description']}"

        return RunnableLambda(prompt) | llm(sim.base_url) | StrOutputParser()

    def chain(language: str) -> dask_llm.Chain:
        return dask_llm.Chain(
            translate_to(language), inputs={"description": "description"}, name="t"
        )

    french = run(chain("French"), cache)
    sent = requests(sim)
    assert run(chain("French"), cache)["t"].tolist() == french["t"].tolist()
    assert requests(sim) == sent
    german = run(chain("German"), cache)
    assert requests(sim) == sent + len(ROWS)
    assert (german["t"] != french["t"]).all()


MODEL_NAME = "gpt-4o-mini"


def test_a_factory_reading_a_global_model_name(
    sim: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c.sqlite"
    url = sim.base_url

    def make() -> Any:
        prompt = ChatPromptTemplate.from_template("Summarise: {description}")
        return prompt | llm(url).model_copy(update={"model_name": MODEL_NAME}) | StrOutputParser()

    run(dask_llm.Chain.from_factory(make, name="s"), cache)
    sent = requests(sim)
    monkeypatch.setitem(globals(), "MODEL_NAME", "gpt-4o")
    run(dask_llm.Chain.from_factory(make, name="s"), cache)
    assert requests(sim) == sent + len(ROWS)
    assert sim.stats()["models"].get("gpt-4o") == len(ROWS)


SYSTEM_PROMPT = "You are a sommelier."


def test_a_global_system_prompt_read_by_a_function_step(
    sim: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c.sqlite"

    def messages(row: dict[str, Any]) -> list[tuple[str, str]]:
        return [("system", SYSTEM_PROMPT), ("human", row["description"])]

    chain = dask_llm.Chain(
        RunnableLambda(messages) | llm(sim.base_url) | StrOutputParser(),
        inputs={"description": "description"},
        name="s",
    )
    run(chain, cache)
    sent = requests(sim)
    run(chain, cache)
    assert requests(sim) == sent
    monkeypatch.setitem(globals(), "SYSTEM_PROMPT", "You are a pirate.")
    run(chain, cache)
    assert requests(sim) == sent + len(ROWS)


def test_cached_answers_still_go_through_the_chains_own_post_processing(
    sim: Any, tmp_path: Any
) -> None:
    """Only the request keys an answer; a changed parser step re-runs on the cached answer."""
    cache = tmp_path / "c.sqlite"
    base = ChatPromptTemplate.from_template("Summarise: {description}") | llm(sim.base_url)

    def chain(step: Any) -> dask_llm.Chain:
        return dask_llm.Chain(
            base | StrOutputParser() | RunnableLambda(step), outputs="s", name="s"
        )

    upper = run(chain(str.upper), cache)
    sent = requests(sim)
    lower = run(chain(str.lower), cache)
    assert requests(sim) == sent
    assert lower["s"].tolist() == [text.lower() for text in upper["s"]]


def test_complete_chains_have_a_memo_fingerprint_and_code_makes_one_opaque(sim: Any) -> None:
    class Tasting(BaseModel):
        notes: str

    class Checked(BaseModel):
        notes: str

        @field_validator("notes")
        @classmethod
        def lower(cls, value: str) -> str:
            return value.lower()

    prompt = ChatPromptTemplate.from_template("Notes on {description}")
    model = llm(sim.base_url)
    assert analyse(prompt | model | StrOutputParser()).memo is not None
    assert analyse(prompt | model.with_structured_output(Tasting)).memo is not None
    assert analyse(prompt | model.with_structured_output(Tasting, include_raw=True)).memo
    opaque = analyse(prompt | model.with_structured_output(Checked))
    assert opaque.memo is None and "validators" in opaque.opaque[0]
    assert analyse(prompt | model | RunnableLambda(lambda m: m)).memo is None

    class Longer(BaseModel):  # the same name, another field: another memo fingerprint
        notes: str
        score: int

    longer = analyse(prompt | model.with_structured_output(Longer))
    assert longer.memo != analyse(prompt | model.with_structured_output(Tasting)).memo


def test_a_cache_written_before_the_row_memo_keeps_working(sim: Any, tmp_path: Any) -> None:
    """0.1 keyed answers by the chain's fingerprint alone: those entries are read and moved."""
    path = tmp_path / "old.sqlite"
    chain = dask_llm.Chain(summary_chain(sim.base_url), name="summarize")
    old = SQLiteCache(path)
    for text in ROWS["description"]:
        old.put(
            make_key(chain.fingerprint, {"description": text}),
            {"summary": "old", "sentiment": "neutral"},
        )
    old.close()
    out = run(chain, path)
    assert requests(sim) == 0
    assert (out["summary"] == "old").all()
    memo = chain.memo_fingerprint
    assert memo is not None
    moved = SQLiteCache(path)
    keys = [make_key(memo, {"description": t}) for t in ROWS["description"]]
    assert len(moved.get_many(keys)) == len(ROWS)
    moved.close()


def test_an_answer_that_breaks_its_schema_is_asked_again_not_served_from_the_cache(
    make_simulator: Any, tmp_path: Any
) -> None:
    sim = make_simulator(schema_violation=0.5, seed=3)
    run(dask_llm.Chain(summary_chain(sim.base_url), name="s"), tmp_path / "c.sqlite")
    summary = dask_llm.last_run()
    assert summary is not None and summary.retries > 0
    # Each retry was a real request: the bad answer in the cache was not served again.
    assert sim.stats()["requests"] == len(ROWS) + summary.retries
