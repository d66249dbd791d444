"""core.runtime: one owner for the process's state, with a lifetime and a reset."""

from __future__ import annotations

import threading

from dask_llm.core import runtime
from dask_llm.observe import progress
from dask_llm.observe.record import ProcessTotals, process_totals
from dask_llm.transport.dedup import InFlight


class _Part:
    made = 0

    def __init__(self) -> None:
        type(self).made += 1
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_part_is_made_once_per_runtime_even_when_threads_race() -> None:
    rt = runtime.Runtime()
    _Part.made = 0
    seen: list[_Part] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        seen.append(rt.part(_Part))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _Part.made == 1
    assert all(p is seen[0] for p in seen)


def test_reset_closes_the_parts_and_starts_afresh() -> None:
    before = runtime.part(_Part)
    totals = process_totals()
    try:
        after = runtime.reset()
        assert before.closed
        fresh = after.part(_Part)
        assert fresh is not before and not fresh.closed
        assert process_totals() is not totals
        assert isinstance(process_totals(), ProcessTotals)
    finally:
        runtime.reset()


def test_the_state_modules_keep_lives_in_the_runtime() -> None:
    """Registries that were module globals are parts now: a reset empties them."""
    rt = runtime.reset()
    try:
        progress.receive({"job": "j-runtime", "kind": "start", "partitions": 1})
        assert progress.active_jobs() == ["j-runtime"]
        assert rt.part(InFlight).calls == {}
        runtime.reset()
        assert progress.active_jobs() == []
    finally:
        runtime.reset()


def test_the_hub_and_the_jobs_are_parts_too() -> None:
    """Runs, stops and the jobs of the process live in the runtime: a reset forgets them
    and stops the hub's listener."""
    from multiprocessing.connection import Client

    from dask_llm.cluster import hub
    from dask_llm.core.config import EnrichOptions
    from dask_llm.engine import job as jobs

    runtime.reset()
    try:
        run = hub.run_began()
        hub.signal_stop("j-hub", run, "interrupted", "interrupted (test)")
        assert hub.stop_signal("j-hub", run) == ("interrupted", "interrupted (test)", None)
        attached = jobs.attach(EnrichOptions(job="j-jobs"))
        jobs.detach(attached)
        assert runtime.part(jobs.Jobs).by_key
        address, key = hub.hub_address()
        runtime.reset()
        assert hub.stop_signal("j-hub", run) is None
        assert hub.live_runs() == [] and runtime.part(jobs.Jobs).by_key == {}
        try:
            Client(address, authkey=key).close()
        except OSError:
            pass  # the listener is closed
        else:
            raise AssertionError("the hub still listens after a reset")
    finally:
        runtime.reset()
