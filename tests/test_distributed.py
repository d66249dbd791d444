"""``enrich`` on dask.distributed: a LocalCluster, and a scheduler + worker started by hand."""

from __future__ import annotations

import os
import pickle
from typing import Any

import cloudpickle
import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from tests.chains import features_chain, summary_chain

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


def frame(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "description": [f"Review {i}: plum and spice" for i in range(n)],
            "title": [f"Wine {i}" for i in range(n)],
            "country": ["Italy", "Chile", "Greece"] * (n // 3),
        }
    )


def chains(url: str) -> list[dask_llm.Chain]:
    return [
        dask_llm.Chain(summary_chain(url), name="summarize"),
        dask_llm.Chain(features_chain(url), name="features"),
    ]


def test_local_cluster_of_processes(sim: Any) -> None:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = dd.from_pandas(frame(), npartitions=4).llm.enrich(chains(sim.base_url))
        result = client.compute(out).result()
    assert len(result) == 30
    assert result["llm_error"].isna().all(), result["llm_error"].dropna().tolist()


def test_the_api_key_is_not_in_the_task_graph(sim: Any) -> None:
    key = os.environ["OPENAI_API_KEY"]
    out = dd.from_pandas(frame(), npartitions=2).llm.enrich(chains(sim.base_url))
    graph = dict(out.__dask_graph__())
    blob = cloudpickle.dumps(graph)
    assert key.encode() not in blob
    assert b"sk-test" not in blob
    # and it still unpickles into something runnable
    assert pickle.loads(blob)


def test_scheduler_and_worker_started_as_separate_processes(
    sim: Any, hand_started_cluster: str
) -> None:
    with distributed.Client(hand_started_cluster, timeout=30) as client:
        client.wait_for_workers(1, timeout=30)
        out = dd.from_pandas(frame(), npartitions=3).llm.enrich(chains(sim.base_url))
        result = client.compute(out).result()
    assert len(result) == 30 and result["llm_error"].isna().all()
