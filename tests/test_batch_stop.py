"""A job that stops for its budget or its quality gate cancels its batches in flight (issue 27).

Two partitions on the threaded scheduler: one submits a batch at once, which the
simulator takes 4 s to run; the other's rows wait a second in a chain step, then
ask for more than the budget, which stops the job. The first partition's batch
is then cancelled at the provider, the lines it finished are read and cached,
and a rerun with the same cache pays only for the lines it never ran.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

import dask_llm
from tests.chains import llm
from tests.helpers import requests

POLL = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1)
ROWS = 10
#: A title this long asks for more than the budget (a prompt token is at most a byte).
BIG = "x" * 200_000


def late_if_big(inputs: dict[str, Any]) -> dict[str, Any]:
    if len(inputs["title"]) > 1_000:
        time.sleep(1.0)  # the other partition's batch is submitted by then
    return inputs


def late_failure_if_big(inputs: dict[str, Any]) -> dict[str, Any]:
    if len(late_if_big(inputs)["title"]) > 1_000:
        raise ValueError("no name for so long a title")
    return inputs


def chains(url: str, first: Any = late_if_big) -> list[Any]:
    prompt = ChatPromptTemplate.from_template("Name {title}, given: {description}")
    chain = RunnableLambda(first) | prompt | llm(url) | StrOutputParser()
    return [
        dask_llm.Chain(chain, name="name", inputs={"title": "title", "description": "description"})
    ]


def frame() -> pd.DataFrame:
    small = [f"Wine {i}" for i in range(ROWS)]
    return pd.DataFrame(
        {
            "title": small + [BIG] * 2,
            "description": [f"Review {i}: cassis and cedar" for i in range(ROWS + 2)],
        }
    )


def batch_stats(sim: Any) -> dict[str, int]:
    return {k: v for k, v in sim.stats().items() if k.startswith("batch")}


STOPS = {
    # The big rows ask for more than the budget.
    "budget": ({"budget_usd": 0.01}, late_if_big, "budget reached"),
    # The big rows fail: 2 errors in 2 rows finished.
    "quality": (
        {"quality_gate": dask_llm.QualityGate(max_error_rate=0.5, min_rows=2)},
        late_failure_if_big,
        "quality gate",
    ),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stop_cancels_the_batches_in_flight_and_the_rerun_pays_nothing_twice(
    make_simulator: Any, tmp_path: Path, stop: str
) -> None:
    options, first, says = STOPS[stop]
    sim = make_simulator(batch_delay=4.0, batch_validation_delay=0.05, batch_finalize_delay=0.05)
    cache = tmp_path / "cache.sqlite"
    ddf = dd.from_pandas(frame(), chunksize=ROWS)  # the batch, then the big rows
    start = time.monotonic()
    out = ddf.llm.enrich(chains(sim.base_url, first), cache=cache, batch=POLL, **options)
    out = out.compute(scheduler="threads")
    took = time.monotonic() - start
    stats = batch_stats(sim)
    # The batch was cancelled, not left running for its 10 s (nor waited for).
    assert stats["batches_created"] == 1
    assert stats["batches_cancelled"] == 1, stats
    assert took < 8.0, took
    finished = stats["batch_lines_ok"]
    assert stats["batch_lines_cancelled"] == ROWS - finished > 0
    # The rows it never ran, and the big ones, say why.
    assert out["llm_error"].str.contains(says).sum() == ROWS - finished + (stop == "budget") * 2
    assert out["llm_error"].isna().sum() == finished
    summary = dask_llm.last_run()
    assert summary is not None and summary.batches_in_progress == 0

    # The rerun (online, fast): the lines the cancelled batch finished come from the
    # cache; only the rest is paid for.
    rerun = frame().iloc[:ROWS].llm.enrich(chains(sim.base_url), cache=cache)
    assert rerun["llm_error"].isna().all()
    assert requests(sim) == ROWS - finished
    assert batch_stats(sim) == stats  # nothing submitted again, nothing paid twice
    assert stats["batch_duplicate_lines"] == 0


def test_a_stop_during_a_batch_create_call_cancels_that_batch_too(
    make_simulator: Any, tmp_path: Path
) -> None:
    """The budget stops the job while the first partition's create call is under way (the
    provider takes 2 s to answer it): the batch it creates is cancelled on arrival, not
    left to run and named as still in flight."""
    options, first, says = STOPS["budget"]
    sim = make_simulator(
        batch_create_delay=2.0,
        batch_delay=4.0,
        batch_validation_delay=0.05,
        batch_finalize_delay=0.05,
    )
    ddf = dd.from_pandas(frame(), chunksize=ROWS)
    out = ddf.llm.enrich(
        chains(sim.base_url, first), cache=tmp_path / "cache.sqlite", batch=POLL, **options
    ).compute(scheduler="threads")
    stats = batch_stats(sim)
    assert stats["batches_created"] == 1
    assert stats["batches_cancelled"] == 1, stats
    assert out["llm_error"].str.contains(says).all()
    summary = dask_llm.last_run()
    assert summary is not None and summary.batches_in_progress == 0
