"""Progress bar, run summary, and usage columns that add up to what the provider counted."""

from __future__ import annotations

import time
import uuid
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from tests.chains import wine_chains as chains
from tests.helpers import reviews as frame


def test_progress_bar_reaches_100_percent_and_a_summary_is_kept(
    sim: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = dd.from_pandas(frame(30), npartitions=3).llm.enrich(
        chains(sim.base_url), progress=True, cache=False
    )
    result = out.compute()
    err = capsys.readouterr().err
    assert "dask-llm" in err and "100%" in err and "30/30" in err
    assert "calls/s" in err and "429s" in err
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.rows == 30 and summary.failed_rows == 0 and summary.calls == 60
    stats = sim.stats()
    assert summary.input_tokens == stats["prompt_tokens"] == result["llm_input_tokens"].sum()
    assert summary.output_tokens == stats["completion_tokens"] == result["llm_output_tokens"].sum()
    assert summary.cost_usd == pytest.approx(result["llm_cost_usd"].sum())
    assert "60 calls" in str(summary)


def test_progress_off_prints_nothing(sim: Any, capsys: pytest.CaptureFixture[str]) -> None:
    frame(5).llm.enrich(chains(sim.base_url), progress=False, cache=False)
    assert "dask-llm" not in capsys.readouterr().err
    assert dask_llm.last_run() is not None and dask_llm.last_run().rows == 5  # type: ignore[union-attr]


def test_unknown_models_have_a_null_cost_never_a_wrong_one(sim: Any) -> None:
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    chain = ChatPromptTemplate.from_template("{description}") | ChatOpenAI(
        model="house-model-7b", base_url=sim.base_url
    )
    out = frame(3).llm.enrich([dask_llm.Chain(chain, outputs="t")], cache=False)
    assert out["llm_cost_usd"].isna().all() and out["llm_input_tokens"].gt(0).all()
    priced = frame(3).llm.enrich(
        [dask_llm.Chain(chain, outputs="t")], cache=False, prices={"house-model-7b": (1.0, 2.0)}
    )
    expected = (priced["llm_input_tokens"] * 1.0 + priced["llm_output_tokens"] * 2.0) / 1e6
    pd.testing.assert_series_equal(
        priced["llm_cost_usd"], expected.astype("Float64"), check_names=False
    )


def test_usage_columns_can_be_renamed_or_dropped(sim: Any) -> None:
    out = frame(2).llm.enrich(chains(sim.base_url), usage=("tin", "tout", "usd"), cache=False)
    assert {"tin", "tout", "usd"} <= set(out.columns)
    out = frame(2).llm.enrich(chains(sim.base_url), usage=False, cache=False)
    assert not {"llm_input_tokens", "llm_cost_usd"} & set(out.columns)


@pytest.mark.slow
def test_distributed_rows_are_aggregated_on_the_client(
    make_simulator: Any, shared_cluster: Any
) -> None:
    distributed = pytest.importorskip("distributed")
    sim = make_simulator(latency=0.05)
    with distributed.Client(shared_cluster) as client:
        out = dd.from_pandas(frame(40), npartitions=4).llm.enrich(
            chains(sim.base_url), cache=False, progress=False
        )
        client.compute(out).result()
        deadline = time.monotonic() + 30  # events travel through the scheduler
        while time.monotonic() < deadline:
            summary = dask_llm.last_run()
            if summary is not None and summary.rows == 40:
                break
            time.sleep(0.05)
    assert summary is not None and summary.rows == 40 and summary.calls == 80
    assert summary.input_tokens == sim.stats()["prompt_tokens"]


def test_a_stop_counts_the_rows_of_every_slice_of_its_job() -> None:
    """Slices of one job computed at once are runs of their own: stopped together (the
    message at exit), the rows done are those of both, not of the newest alone."""
    from dask_llm.observe.progress import receive, stop_run

    job = uuid.uuid4().hex
    for run, rows in ((1, 40), (2, 30)):
        base = {"job": job, "run": run, "partition": 0, "attempt": f"{run}.0"}
        base |= {"partitions": 2, "total_rows": None}
        receive({**base, "kind": "start", "rows": 50})
        receive({**base, "kind": "counts", "counts": {"rows": rows, "calls": rows}})
    summary = stop_run(job, "interrupted")
    assert summary is not None
    assert (summary.rows, summary.status) == (70, "interrupted")


def test_the_tail_of_an_interrupted_run_never_counts_in_its_rerun() -> None:
    """Dask's process pool: children of an interrupted run may report partitions that began
    after the client stopped it, while the rerun (the same job, the next run) reports too.
    The events are those the client's hub receives, in an order seen there."""
    from dask_llm.observe.progress import receive, stop_run

    job = uuid.uuid4().hex

    def event(run: int, part: int, kind: str, **extra: Any) -> dict[str, Any]:
        base = {"job": job, "run": run, "partition": part, "attempt": f"{run}.{part}"}
        return {**base, "kind": kind, "partitions": 4, "total_rows": None, **extra}

    receive(event(1, 0, "start", rows=75))
    stop_run(job, "interrupted")  # Ctrl-C
    for part in (1, 2, 3):  # the first run's tail: begun late, stopped at once
        receive(event(1, part, "start", rows=75))
        receive(event(1, part, "done"))
    for part in range(4):  # the rerun
        receive(event(2, part, "start", rows=75))
        receive(event(2, part, "counts", counts={"rows": 75, "calls": 150}))
        receive(event(2, part, "done"))
    ran = dask_llm.last_run()
    assert ran is not None
    assert (ran.rows, ran.calls, ran.status) == (300, 600, "completed")


@pytest.mark.parametrize(
    ("spare", "says"),
    [
        pytest.param(4.3, "deadline met (4.3 s to spare)", id="met"),
        pytest.param(-3.0, "deadline missed by 3.0 s", id="missed"),
    ],
)
def test_a_summary_says_each_tier_and_the_deadline(spare: float, says: str) -> None:
    summary = dask_llm.RunSummary(
        calls=10, flex_calls=4, batch_calls=3, deadline_at=0.0, deadline_spare_s=spare
    )
    assert "by tier: 4 Flex, 3 batch, 3 list price" in str(summary)
    assert says in str(summary)
    assert summary.cost_by_tier == {}  # no run record: no cost by tier
