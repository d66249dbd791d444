"""``enrich`` on dask.distributed: a LocalCluster, and a scheduler + worker started by hand."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import socket
import time
import warnings
from typing import Any

import cloudpickle
import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from dask_llm.limits.coordinator import MARGIN
from tests.chains import summary_chain
from tests.chains import wine_chains as chains
from tests.helpers import local_cluster

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


def test_local_cluster_of_processes(sim: Any, shared_cluster: Any) -> None:
    with distributed.Client(shared_cluster) as client:
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


DUMMY_KEY = "sk-local-vllm-dummy-key-0000"


def test_an_explicit_key_reaches_local_workers_only_when_asked(
    sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dummy key for a local server, given as api_key=, with no OPENAI_API_KEY anywhere."""
    monkeypatch.delenv("OPENAI_API_KEY")
    chain = dask_llm.Chain(summary_chain(sim.base_url, api_key=DUMMY_KEY), name="summarize")
    ddf = dd.from_pandas(frame(6), npartitions=2)
    # A cluster of its own: its worker starts without OPENAI_API_KEY in its environment.
    with local_cluster(n_workers=1, spawn=True) as cluster, distributed.Client(cluster):
        with pytest.raises(ValueError, match="ship_api_keys=True") as info:
            ddf.llm.enrich([chain], cache=False)
        assert "\n" not in str(info.value) and DUMMY_KEY not in str(info.value)
        out = ddf.llm.enrich([chain], cache=False, ship_api_keys=True).compute()
    assert out["llm_error"].isna().all()


def test_a_key_from_the_environment_is_not_called_explicit(
    sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers started without OPENAI_API_KEY; the client has it, and the model read it."""
    key = os.environ["OPENAI_API_KEY"]
    monkeypatch.delenv("OPENAI_API_KEY")
    ddf = dd.from_pandas(frame(6), npartitions=2)
    with (
        local_cluster(n_workers=1, spawn=True) as cluster,
        distributed.Client(cluster),
    ):
        monkeypatch.setenv("OPENAI_API_KEY", key)
        chain = dask_llm.Chain(summary_chain(sim.base_url), name="summarize")  # key from env
        with pytest.raises(ValueError, match="ship_api_keys=True") as info:
            ddf.llm.enrich([chain], cache=False)
    message = str(info.value)
    assert "explicit" not in message and "this process's OPENAI_API_KEY" in message, message


def test_an_explicit_key_on_the_process_pool(sim: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    chain = dask_llm.Chain(summary_chain(sim.base_url, api_key=DUMMY_KEY), name="summarize")
    ddf = dd.from_pandas(frame(6), npartitions=2)
    with pytest.raises(dask_llm.WorkerSetupError, match="ship_api_keys=True"):
        ddf.llm.enrich([chain], cache=False).compute(scheduler="processes", num_workers=2)
    shipped = ddf.llm.enrich([chain], cache=False, ship_api_keys=True)
    out = shipped.compute(scheduler="processes", num_workers=2)
    assert out["llm_error"].isna().all()
    assert DUMMY_KEY not in repr(shipped.dask)


def _ledger_state(dask_scheduler: Any) -> dict[str, Any]:
    plugin = dask_scheduler.plugins["dask-llm-ledger"]
    coordinator = plugin.coordinator
    return {job: coordinator.snapshot(job) for job in list(coordinator._jobs)}


def test_a_killed_workers_lease_returns_within_seconds(make_simulator: Any) -> None:
    import signal
    import time

    sim = make_simulator(latency=0.3)
    rate = 1200 / 60 * (1 - MARGIN)
    rows = 150  # ~7.5 s at 20/s: the job outlives the kill (at 40 answers) and the lease's TTL
    with (
        local_cluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = dd.from_pandas(frame(rows), npartitions=6).llm.enrich(
            [dask_llm.Chain(summary_chain(sim.base_url), name="summarize")],
            rpm=1200,
            cache=False,
        )
        future = client.compute(out)
        deadline = time.monotonic() + 60
        while sim.stats()["successes"] < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        (state,) = client.run_on_scheduler(_ledger_state).values()
        assert len(state["members"]) == 2  # both workers hold a share
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            # The dead member is gone and the whole rate is lent to the living (the
            # survivor, and the worker the nanny started in its place, if it has work).
            (state,) = client.run_on_scheduler(_ledger_state).values()
            dead = [m for m in state["members"] if m.startswith(f"{victim}-")]
            lent = sum(share for share, _ in state["members"].values())
            if not dead and lent >= rate * 0.99:
                break
            assert time.monotonic() - killed < 5.0, state
            time.sleep(0.1)
        result = future.result(timeout=120)
    assert len(result) == rows
    assert result["llm_error"].isna().all()


_STARTS: dict[int, float] = {}  # row -> when its chain began (the worker runs in this process)


def _row_starts(inputs: dict[str, Any]) -> dict[str, Any]:
    import time

    _STARTS[int(inputs["description"].split()[1].rstrip(":"))] = time.monotonic()
    return inputs


def test_a_worker_starts_its_next_partition_during_the_tail_of_the_last(
    make_simulator: Any,
) -> None:
    """A worker with one thread: once a partition has begun its last rows, the next begins.

    Without it, the worker sends nothing while the last answers of each partition
    come back, and on a cluster those tails line up (``_cluster.secede_for_tail``).
    """
    from langchain_core.runnables import RunnableLambda

    sim = make_simulator(latency=1.0)
    _STARTS.clear()
    with (
        local_cluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        distributed.Client(cluster) as client,
    ):
        chain = RunnableLambda(_row_starts) | summary_chain(sim.base_url)
        out = dd.from_pandas(frame(24), npartitions=2).llm.enrich(
            [dask_llm.Chain(chain, name="summarize", inputs={"description": "description"})],
            cache=False,
        )
        result = client.compute(out).result()
        threads = client.run(lambda dask_worker: dask_worker.state.nthreads)
    assert result["llm_error"].isna().all(), result["llm_error"].dropna().tolist()
    parts = [[t for row, t in _STARTS.items() if row // 12 == p] for p in (0, 1)]
    first, second = sorted(parts, key=min)  # whichever the worker ran first
    assert len(first) == len(second) == 12
    # The first partition's answers take a second; the second began well before.
    assert min(second) < max(first) + 0.5, min(second) - max(first)
    assert list(threads.values()) == [1]


def test_batch_mode_on_a_local_cluster(make_simulator: Any, shared_cluster: Any) -> None:
    sim = make_simulator(batch_validation_delay=0.05, batch_delay=0.2, batch_finalize_delay=0.05)
    policy = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1)
    with distributed.Client(shared_cluster) as client:
        out = dd.from_pandas(frame(), npartitions=2).llm.enrich(
            chains(sim.base_url), batch=policy, cache=False
        )
        result = client.compute(out).result()
    assert result["llm_error"].isna().all(), result["llm_error"].dropna().tolist()
    stats = sim.stats()
    assert stats["requests"] == 0
    assert stats["batch_lines_ok"] == 60 and stats["batch_duplicate_lines"] == 0
    summary = dask_llm.last_run()
    assert summary is not None and summary.batch_lines == 60


def test_batch_waits_of_one_worker_overlap_whatever_its_threads(make_simulator: Any) -> None:
    # Issue 28: with more partitions than threads, batch waits ran one after another.
    sim = make_simulator(batch_validation_delay=0.05, batch_delay=1.5, batch_finalize_delay=0.05)
    policy = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1)
    with (
        local_cluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = dd.from_pandas(frame(24), npartitions=4).llm.enrich(
            [dask_llm.Chain(summary_chain(sim.base_url), name="summarize")],
            batch=policy,
            cache=False,
        )
        start = time.monotonic()
        result = client.compute(out).result()
        took = time.monotonic() - start
    assert result["llm_error"].isna().all(), result["llm_error"].dropna().tolist()
    assert sim.stats()["batches_created"] == 4
    assert took < 2 * 1.6, took  # one window (4 one after another: 6.4 s)


def test_a_cluster_of_the_suite_starts_while_another_process_holds_port_8787() -> None:
    """Issue 28, defect 14: the suite failed whenever port 8787 was taken.

    ``dashboard_address=None`` turns the dashboard off, yet the scheduler's HTTP server
    still binds 8787 and warns when it cannot (an error under ``filterwarnings``). The
    conftest holds 8787 for the whole session; the suite's clusters take a free port.
    """
    with contextlib.ExitStack() as held:
        # Held by a conftest (this worker's or another's: under pytest-xdist, the one that
        # holds it may finish first and let it go), or here.
        with contextlib.suppress(OSError):
            held.enter_context(socket.create_server(("127.0.0.1", 8787)))
        with pytest.raises(OSError), socket.create_server(("127.0.0.1", 8787)):
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None).close()
            gc.collect()  # distributed leaves the socket of its failed listen() unclosed
        assert any("Port 8787 is already in use" in str(w.message) for w in caught), caught
        with local_cluster(n_workers=0, processes=False) as cluster:
            assert cluster.scheduler.http_server.port not in (0, 8787)
