"""``dask_llm_*`` series on distributed's own ``/metrics``, during a job and after it."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import dask.dataframe as dd
import pytest

import dask_llm
from tests.chains import summary_chain
from tests.helpers import local_cluster, reviews


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value for the dask_llm_* samples at ``url``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(dask_llm_[^{\s]+(?:\{[^}]*\})?) (\S+)$", text, flags=re.MULTILINE)
    }


@pytest.mark.slow
def test_a_workers_metrics_show_the_job_while_it_runs_and_after(make_simulator: Any) -> None:
    distributed = pytest.importorskip("distributed")
    sim = make_simulator(latency=0.25, spurious_429=0.1, spurious_retry_after=0.05)
    with (
        local_cluster(n_workers=1, threads_per_worker=2, processes=True) as cluster,
        distributed.Client(cluster) as client,
    ):
        (worker,) = client.scheduler_info()["workers"].values()
        worker_url = f"http://{worker['host']}:{worker['services']['dashboard']}/metrics"
        scheduler_url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/metrics"
        out = dd.from_pandas(reviews(60), npartitions=2).llm.enrich(
            [dask_llm.Chain(summary_chain(sim.base_url), name="summarize")],
            cache=False,
            progress=False,
            retry=dask_llm.RetryPolicy(wait_initial=0.05, wait_max=0.1),
        )
        # Counters count since the process started: the scheduler here is this
        # process, which earlier tests' clusters may have reported to.
        before = scrape(scheduler_url)
        future = client.compute(out)
        during: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            during = scrape(worker_url)
            if during.get('dask_llm_requests_in_flight{scope="process"}', 0) > 0:
                break
            time.sleep(0.05)
        future.result()
        assert during['dask_llm_requests_in_flight{scope="process"}'] > 0
        assert 0 < during['dask_llm_requests_total{scope="process"}'] < 60 * 1.5

        stats = sim.stats()
        after = scrape(worker_url)
        assert after['dask_llm_requests_total{scope="process"}'] == stats["requests"]
        assert after['dask_llm_requests_in_flight{scope="process"}'] == 0
        assert (
            after['dask_llm_rate_limited_total{scope="process"}']
            == (stats["faults"]["spurious_429"])
        )
        assert after['dask_llm_errors_total{kind="429 other",scope="process"}'] > 0
        assert after['dask_llm_retries_total{scope="process"}'] > 0
        assert after['dask_llm_input_tokens_total{scope="process"}'] == stats["prompt_tokens"]
        assert after['dask_llm_output_tokens_total{scope="process"}'] == stats["completion_tokens"]
        assert after['dask_llm_spend_usd_total{scope="process"}'] > 0
        assert after['dask_llm_rows_total{scope="process",status="ok"}'] == 60

        # The scheduler sums what every worker reported through the event log.
        def increase(name: str) -> float:
            return cluster_view.get(name, 0.0) - before.get(name, 0.0)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cluster_view = scrape(scheduler_url)
            if increase('dask_llm_rows_total{scope="cluster",status="ok"}') == 60:
                break
            time.sleep(0.1)
        assert increase('dask_llm_requests_total{scope="cluster"}') == stats["requests"]
        assert (
            increase('dask_llm_output_tokens_total{scope="cluster"}')
            == (stats["completion_tokens"])
        )
    summary = dask_llm.last_run()
    assert summary is not None and summary.record is not None
    assert summary.record.totals()["started"] == stats["requests"]  # via the event log
