"""A misbehaving provider and bad input: every row ends with an answer or an explanation."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_llm
from tests.chains import summary_chain, text_chain
from tests.chains import wine_chains as chains
from tests.conftest import API_KEY
from tests.helpers import local_cluster

pytestmark = pytest.mark.slow


def test_a_faulty_provider_loses_no_row(make_simulator: Any) -> None:
    sim = make_simulator(
        error_rate=0.05,
        hang=0.01,
        malformed_json=0.01,
        connection_reset=0.01,
        schema_violation=0.01,
        seed=11,
    )
    n = 1000
    df = pd.DataFrame(
        {
            "description": [f"Review {i}: tar and roses" for i in range(n)],
            "title": [f"Wine {i}" for i in range(n)],
            "country": ["Italy"] * n,
        }
    )
    out = (
        dd.from_pandas(df, npartitions=4)
        .llm.enrich(chains(sim.base_url), request_timeout=2.0, cache=False)
        .compute()
    )  # nothing may be raised out of compute()
    assert len(out) == n
    answered = out["features"].notna()
    explained = out["llm_error"].notna()
    assert (answered | explained).all()
    assert answered.mean() >= 0.999, out["llm_error"].dropna().value_counts().head()
    faults = sim.stats()["faults"]
    assert faults["error_500"] > 50 and faults["hang"] > 5 and faults["schema_violation"] > 5


def test_schema_violations_are_retried_a_bounded_number_of_times(make_simulator: Any) -> None:
    sim = make_simulator(schema_violation=1.0)
    df = pd.DataFrame({"description": ["one review"]})
    out = df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    assert sim.stats()["requests"] == 3  # RetryPolicy.parse_attempts
    assert out.loc[0, "llm_error"].startswith("s: ")
    assert "summary" in out.loc[0, "llm_error"]
    assert out.loc[0, "llm_input_tokens"] > 0  # the failed attempts were paid for, and counted


def test_context_length_is_a_row_error_without_retries(make_simulator: Any) -> None:
    sim = make_simulator(context_tokens=200)
    df = pd.DataFrame({"description": ["short", "long " * 400, "also short"]})
    out = df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    assert out["llm_error"].isna().tolist() == [True, False, True]
    assert "context_length_exceeded" in out.loc[1, "llm_error"]
    assert sim.stats()["requests"] == 3


def test_a_wrong_key_fails_fast_and_no_secret_leaks(
    make_simulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim = make_simulator(api_key="sk-the-right-one")
    caplog.set_level(logging.DEBUG)
    df = pd.DataFrame({"description": ["a", "b"]})
    out = df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    # Row "b" is sent too, unless the first 401 stopped the job before its turn (a race
    # an idle machine wins): then it names the provider's refusal instead.
    errors = out["llm_error"]
    sent = errors.str.contains("AuthenticationError")
    assert sent.any() and (sent | errors.str.contains("not sent: the provider refused")).all()
    assert errors.str.contains("401").all(), errors.tolist()
    assert sim.stats()["requests"] == sent.sum()  # 401 is not retried
    with pytest.raises(dask_llm.ChainError) as info:
        df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], errors="raise")
    for text in (out.to_string(), str(info.value), repr(info.value), caplog.text):
        assert API_KEY not in text


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        pytest.param(None, "missing input description", id="none"),
        pytest.param(np.nan, "missing input description", id="nan"),
        pytest.param("", "missing input description", id="empty-string"),
        pytest.param("   ", "missing input description", id="blank-string"),
        pytest.param(42, None, id="integer"),
        pytest.param(3.5, None, id="float"),
        pytest.param(True, None, id="bool"),
        pytest.param(["a", "list"], None, id="list"),
        pytest.param("Côte-Rôtie 🍷 — 葡萄酒", None, id="unicode-emoji"),
    ],
)
def test_bad_input_values(sim: Any, value: Any, outcome: str | None) -> None:
    df = pd.DataFrame({"description": ["fine review", value]}, dtype=object)
    out = df.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    assert pd.isna(out.loc[0, "llm_error"])
    if outcome is None:
        assert pd.isna(out.loc[1, "llm_error"]) and isinstance(out.loc[1, "summary"], str)
    else:
        assert out.loc[1, "llm_error"] == f"s: {outcome}"


def test_categorical_columns(sim: Any) -> None:
    df = pd.DataFrame({"description": pd.Categorical(["red", "white", "red", None])})
    out = (
        dd.from_pandas(df, npartitions=2)
        .llm.enrich({"word": text_chain(sim.base_url)}, cache=False)
        .compute()
    )
    assert out["llm_error"].isna().tolist() == [True, True, True, False]


def test_python_errors_in_a_chain_are_row_errors_not_retried() -> None:
    calls = []

    def fragile(d: dict[str, Any]) -> str:
        calls.append(d["x"])
        if d["x"] == 2:
            raise KeyError("no such grape")
        return "ok"

    df = pd.DataFrame({"x": [1, 2, 3]})
    out = df.llm.enrich([dask_llm.Chain(fragile, inputs={"x": "x"}, outputs="y", name="f")])
    assert out["llm_error"].tolist()[1] == "f: KeyError: 'no such grape'"
    assert sorted(calls) == [1, 2, 3]


def test_distributed_survives_a_killed_worker(make_simulator: Any) -> None:
    distributed = pytest.importorskip("distributed")
    sim = make_simulator(latency=0.25)
    n = 160
    df = pd.DataFrame({"description": [f"Review {i}" for i in range(n)]})
    with (
        local_cluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = dd.from_pandas(df, npartitions=8).llm.enrich(
            [dask_llm.Chain(summary_chain(sim.base_url), name="s")], max_concurrency=8
        )
        future = client.compute(out)
        deadline = time.monotonic() + 30
        while sim.stats()["successes"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        result = future.result(timeout=120)
        deadline = time.monotonic() + 10
        while (dask_llm.last_run() is None or dask_llm.last_run().rows < n) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)  # the workers' last events are on their way
    assert len(result) == n
    assert result["llm_error"].isna().all()
    assert result["summary"].notna().all()
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.rows == n  # a partition rerun elsewhere replaces its first attempt


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_an_answer_whose_body_does_not_parse_is_asked_again_not_reused(
    make_simulator: Any, tmp_path: Any, cached: bool
) -> None:
    # A 200 whose JSON is cut off: kept by the cache (or, without one, by the
    # partition's own answers), the retry got the same broken body back.
    sim = make_simulator(malformed_json=0.3, seed=4)
    df = pd.DataFrame({"description": [f"Review {i}: tar and roses" for i in range(30)]})
    chain = dask_llm.Chain(summary_chain(sim.base_url), name="summarize")
    out = df.llm.enrich(
        [chain], cache=tmp_path / "cache.sqlite" if cached else False, progress=False
    )
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().tolist()
    assert sim.stats()["faults"]["malformed_json"] > 3
