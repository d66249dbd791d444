"""Job-wide rpm: the aggregate arrival rate at the provider, across partitions and processes."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from tests.chains import fake_chat_chain, text_chain
from tests.helpers import reviews

pytestmark = pytest.mark.slow

RPM = 600  # 10 requests/s for the whole job


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"description": [f"Review {i}: cassis and graphite" for i in range(n)]})


def test_threads_with_four_partitions_in_flight_share_one_budget(
    external_simulator: Any,
) -> None:
    # The provider enforces nothing: we measure our own pacing, on a clock of its own.
    sim = external_simulator("--latency", "0.05")
    out = dd.from_pandas(frame(60), npartitions=4).llm.enrich(
        {"word": text_chain(sim.base_url)}, rpm=RPM, cache=False
    )
    result = out.compute(scheduler="threads", num_workers=4)
    assert result["llm_error"].isna().all()
    stats = sim.stats()
    assert stats["requests"] == 60
    assert stats["peak_requests_1s"] <= RPM / 60  # over any sliding second


def test_two_distributed_workers_share_one_budget(
    external_simulator: Any, shared_cluster: Any
) -> None:
    distributed = pytest.importorskip("distributed")
    # A provider's clock is its own: a simulator in this process (a thread under the
    # GIL, beside the scheduler) stamps arrivals late and in bunches on a busy machine.
    sim = external_simulator("--latency", "0.05")
    with distributed.Client(shared_cluster) as client:
        out = dd.from_pandas(frame(60), npartitions=4).llm.enrich(
            [dask_llm.Chain(text_chain(sim.base_url), name="word")], rpm=RPM, cache=False
        )
        # The cluster is the session's: earlier tests' jobs may linger in its ledger.
        before = client.run_on_scheduler(_jobs)
        result = client.compute(out).result()
        # The job's ledger lives on the scheduler (not the fallback even split),
        # and the workers told it each partition's rows (its work left, to lend by).
        assert client.run_on_scheduler(_has_ledger)
        begun = client.run_on_scheduler(_partitions_begun, skip=before)
        assert begun == [(4, 4, [15, 15, 15, 15])]
    assert result["llm_error"].isna().all()
    stats = sim.stats()
    assert stats["requests"] == 60
    assert stats["peak_requests_1s"] <= RPM / 60


def _has_ledger(dask_scheduler: Any) -> bool:
    return (
        "dask-llm-ledger" in dask_scheduler.plugins and "dask_llm_lease" in dask_scheduler.handlers
    )


def _jobs(dask_scheduler: Any) -> list[Any]:
    plugin = dask_scheduler.plugins.get("dask-llm-ledger")
    return [] if plugin is None else list(plugin.coordinator._jobs)


def _partitions_begun(
    dask_scheduler: Any, skip: Collection[Any] = ()
) -> list[tuple[Any, int, list[int]]]:
    jobs = dask_scheduler.plugins["dask-llm-ledger"].coordinator._jobs
    return [(x.partitions, x.begun, sorted(x.sizes)) for j, x in jobs.items() if j not in skip]


def test_the_ledger_hears_of_every_partition_an_empty_one_too(sim: Any) -> None:
    """Each partition's rows to run reach the ledger (its estimate of the job's work left)."""
    from dask_llm.limits.coordinator import local_coordinator

    df = dd.from_pandas(frame(30), npartitions=3)
    kept = df[~df["description"].str.startswith("Review 1")]  # partition 1 (rows 10-19): empty
    out = kept.llm.enrich({"word": text_chain(sim.base_url)}, rpm=RPM * 10, cache=False)
    # Earlier tests' jobs (and an in-process cluster's scheduler's) live here too, and
    # their members' last renewals may touch them while this job runs: take the new one.
    before = set(local_coordinator()._jobs)
    result = out.compute(scheduler="threads", num_workers=3)
    assert result["llm_error"].isna().all() and len(result) == 19
    (ledger,) = [x for job, x in local_coordinator()._jobs.items() if job not in before]
    # The ledger hears of a partition at its member's next renewal (4 a second), which
    # may come after a short job has returned.
    deadline = time.monotonic() + 5.0
    while ledger.begun < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (ledger.partitions, ledger.begun, sorted(ledger.sizes)) == (3, 3, [0, 9, 10])


def test_the_providers_limit_is_learned_without_any_option(make_simulator: Any) -> None:
    """Not told the limit, the job reads it from x-ratelimit headers and loses nothing."""
    sim = make_simulator(latency=0.05, rpm=1200)  # 20/s enforced in 1 s slices
    out = frame(100).llm.enrich({"word": text_chain(sim.base_url)}, cache=False)
    assert out["llm_error"].isna().all()
    assert sim.stats()["peak_requests_60s"] <= 1200


@pytest.mark.parametrize(
    "option",
    [pytest.param({"rpm": 60}, id="rpm"), pytest.param({"tpm": 10_000}, id="tpm")],
)
def test_pacing_is_refused_for_a_chat_model_dask_llm_does_not_see(option: dict[str, Any]) -> None:
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"chain 'fake': {name}=.*FakeListChatModel"):
        reviews(30).llm.enrich(
            [dask_llm.Chain(fake_chat_chain(), name="fake")], cache=False, **option
        )


def test_requests_in_flight_follow_rate_x_latency_past_256(external_simulator: Any) -> None:
    """A known rate of 9,800 requests/s at 3 s a call wants ~29,000 in flight: all 320 rows
    go out together, where a fixed cap of 256 held the rest for a round trip."""
    sim = external_simulator("--latency", "3")
    out = frame(320).llm.enrich({"word": text_chain(sim.base_url)}, rpm=600_000, cache=False)
    assert out["llm_error"].isna().all()
    stats = sim.stats()
    assert stats["requests"] == 320
    assert stats["peak_in_flight"] > 256


def test_an_explicit_max_concurrency_caps_requests_in_flight(make_simulator: Any) -> None:
    sim = make_simulator(latency=0.2)
    out = frame(120).llm.enrich(
        {"word": text_chain(sim.base_url)}, rpm=600_000, max_concurrency=40, cache=False
    )
    assert out["llm_error"].isna().all()
    assert 0 < sim.stats()["peak_in_flight"] <= 40
