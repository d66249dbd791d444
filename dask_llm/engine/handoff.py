"""Batch waits on dask's local schedulers: every partition waits at once.

In batch mode a partition submits its batches and then waits for them:
minutes to hours, holding no CPU. Dask's local schedulers run at most as many
tasks at once as their pool has threads (``dask.local.get_async`` fires a
task only into a free slot), and a task cannot leave its slot the way a
``distributed`` task secedes (``core.where.secede_for_tail``); so with more
partitions than threads the batch windows came in waves (issue 28: 8
partitions on 2 threads took four windows, 26.9 s against 7.2 s on 8
threads).

So a Dask frame enriched with ``batch=`` (and no ``distributed`` client: that
keeps its one-layer graph and secedes) gets a graph of two layers
(``api.enrich``):

1. ``begin`` (a task per partition) hands its partition to a thread of its
   own in this process (``loop.Handed``, running ``runner.enrich_partition``
   exactly as a scheduler's thread would) and returns a ticket at once;
2. ``all_begun``, a barrier over every ticket, so that no second-layer task
   takes a scheduler thread before every partition has been handed off (dask
   runs the tasks a finished task makes ready first: without the barrier,
   partition 0's second layer would hold a thread as soon as its first
   layer ended);
3. ``end`` (a task per partition, after the barrier) waits for its ticket's
   partition and returns its frame.

Every partition thus runs from start to end on its own thread, its chain
levels one after another as online, and all the partitions' batch windows
overlap, every level of dependent chains included, whatever the pool's
threads. Nothing about a partition's run changes: the same function, the
same job in the process, its stops, the cache and re-attaching after a
crash. The synchronous scheduler gets the same (its one thread hands every
partition off, then collects them).

Why threads of our own rather than the other ways weighed (issue 28):

* a first layer that only submits the first batches (their ids kept in the
  cache) and a second that re-runs the partition, re-attaching as after a
  crash, builds every request twice, needs a cache (``cache=False`` has
  nothing to re-attach to), and leaves the batches of dependent chains in
  waves;
* one event loop for every partition of the process would share one thread
  between partitions written for a loop each (their clients, their executor
  for sync runnables) for no gain: a waiting partition costs an idle thread.

What it costs. Every partition runs at once, so every input partition (and
each output, until it is consumed) is in memory at once; the scheduler keeps
each input until its second layer, which the partition's run holds anyway.
That is the price of overlapping the windows (on ``distributed`` the seceded
partitions hold theirs alike); a frame too large for memory is enriched a
slice of partitions at a time. The partitions' CPU work (building requests,
parsing answers) shares the process's GIL as it does on the pool's threads.

On dask's process pool a task of the second layer may run in any child,
while its partition runs in the child that ran its first layer, and dask's
pool offers no way to pick the child. There the partition's thread, when its
run ends, leaves its frame (pickled, or what it raised) in a *drop box*: a
file named by its ticket in a directory of the job and run
(``cluster.hub.drop_box``, under the client's temporary directory); the second
layer, in whichever child, waits for that file, reads it and removes it. The
partitions' waits overlap as on threads (every first layer runs before any
second, the barrier sees to that); the price is one write and one read of
each output frame. The box is removed when the run ends (``_ComputeWatch``),
also for a run that failed, whose frames nobody collects; a partition that
ends after that finds its box gone and leaves nothing behind.

State: ``Handoffs``, a part of the process's runtime, holds each partition
handed off until its second layer takes it; one whose computation ended
without taking it (an error elsewhere) is dropped once it has ended.
"""

from __future__ import annotations

import contextvars
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from dask_llm.chains.plan import Plan
from dask_llm.cluster import hub as _hub
from dask_llm.cluster.handle import JobHandle
from dask_llm.core import where as _cluster
from dask_llm.core.config import EnrichOptions
from dask_llm.core.errors import JobStopped
from dask_llm.core.runtime import part
from dask_llm.engine import job as jobs
from dask_llm.engine.loop import Handed
from dask_llm.engine.runner import enrich_partition

#: A ticket of a pool child: this, then the path of the partition's drop box file.
_POOL = "pool:"
#: How often a second layer looks for its partition's file (seconds, first and at most).
_LOOK_FIRST_S = 0.01
_LOOK_MAX_S = 0.1

#: The meta of the first layer: one ticket per partition (None: not handed off).
TICKET_META = pd.Series([], dtype=object, name="ticket")


class Handoffs:
    """Partitions handed to threads of their own (a part of the process's ``core.runtime``).

    ``running``: by ticket, each partition's thread and the run (``cluster.hub``) that
    computes it, from its first layer until its second takes it. One whose run has
    ended without taking it (an error elsewhere in the computation) is dropped once
    its thread has ended (looked for whenever a partition is handed off).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, tuple[Handed[pd.DataFrame], int | None]] = {}

    def put(self, ticket: str, handed: Handed[pd.DataFrame], run: int | None) -> None:
        live = set(_hub.live_runs())
        with self.lock:
            for gone in [
                t
                for t, (h, r) in self.running.items()
                if h.done() and r is not None and r not in live
            ]:
                del self.running[gone]
            self.running[ticket] = (handed, run)

    def take(self, ticket: str) -> Handed[pd.DataFrame] | None:
        with self.lock:
            found = self.running.pop(ticket, None)
        return None if found is None else found[0]


def begin(
    df: pd.DataFrame,
    plan: Plan,
    options: EnrichOptions,
    handle: JobHandle,
    partition_info: dict[str, Any] | None = None,
) -> pd.Series:
    """The first layer: hand the partition to a thread of its own; its ticket.

    In a child of dask's process pool the ticket names the partition's drop box (its
    second layer may run in another child). On a ``distributed`` worker the partition
    is not handed off (that graph has one layer): the ticket is None."""
    if _cluster.distributed_worker() is not None:
        return pd.Series([None], dtype=object, name="ticket")
    ticket = uuid.uuid4().hex
    number = int((partition_info or {}).get("number", 0))
    run = jobs.run_of(options, handle)

    def call() -> pd.DataFrame:
        return enrich_partition(df, plan, options, handle, partition_info)

    if _cluster.in_pool_child():
        box = Path(handle.box) if handle.box is not None else _hub.drop_box(options.job, run)
        box.mkdir(mode=0o700, exist_ok=True)
        path = box / f"{ticket}.pickle"
        Handed(
            lambda: _leave(path, call),
            name=f"dask-llm-partition-{number}",
            daemon=False,  # the child lives on until the frame is left
            context=contextvars.copy_context(),
        )
        return pd.Series([_POOL + str(path)], dtype=object, name="ticket")
    handed = Handed(
        call,
        name=f"dask-llm-partition-{number}",
        # Joined at exit: a partition stopped by Ctrl-C still names its batches.
        daemon=False,
        context=contextvars.copy_context(),
    )
    part(Handoffs).put(ticket, handed, run)
    return pd.Series([ticket], dtype=object, name="ticket")


def all_begun(tickets: pd.Series) -> int:
    """The barrier between the layers: how many partitions began."""
    return len(tickets)


def end(
    df: pd.DataFrame,
    tickets: pd.Series,
    begun: int,
    plan: Plan,
    options: EnrichOptions,
    handle: JobHandle,
    partition_info: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """The second layer: the partition's frame, from its thread (or run here, without one)."""
    ticket = tickets.iloc[0]
    if ticket is None:
        return enrich_partition(df, plan, options, handle, partition_info)
    if ticket.startswith(_POOL):
        return _collect(Path(ticket.removeprefix(_POOL)), options.job)
    handed = part(Handoffs).take(ticket)
    if handed is None:
        raise RuntimeError(
            f"dask-llm job {options.job[:8]}: partition "
            f"{(partition_info or {}).get('number', '?')} began in another process than the "
            "one that collects it; compute a batch= job with the scheduler it was built for"
        )
    return handed.result(
        on_interrupt=lambda: _interrupted(options.job), grace=jobs.STOP_GRACE_S + 2.0
    )


def _interrupted(job_id: str) -> None:
    """Ctrl-C while the synchronous scheduler waits: stop the job's partitions here."""
    for job in jobs.running_jobs():
        if job.id == job_id:
            job.stop("interrupted", "interrupted (KeyboardInterrupt)")


def _leave(path: Path, call: Callable[[], pd.DataFrame]) -> None:
    """Run a pool child's partition and leave its frame (or what it raised) at ``path``.

    Written whole under another name, then renamed: the reader never sees half a file.
    A box removed meanwhile (its run ended) takes nothing."""
    try:
        left: tuple[str, Any] = ("frame", call())
    except BaseException as exc:  # raised again by the second layer
        left = ("error", exc)
    try:
        data = pickle.dumps(left, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: its type and text
        error = left[1] if left[0] == "error" else None
        text = f"{type(error).__name__}: {error}" if error is not None else "unpicklable frame"
        data = pickle.dumps(("error", RuntimeError(text)), protocol=pickle.HIGHEST_PROTOCOL)
    part_path = path.with_suffix(".part")
    try:
        part_path.write_bytes(data)
        os.replace(part_path, path)
    except FileNotFoundError:
        pass


def _collect(path: Path, job_id: str) -> pd.DataFrame:
    """The second layer in a pool child: wait for the partition's file, take it.

    A box gone before its file came means that the client ended the run (an error
    elsewhere, Ctrl-C): nobody reads this task's result, and it must not hold the
    pool's shutdown, which waits for it."""
    pause = _LOOK_FIRST_S
    while not path.exists():
        if not path.parent.exists():
            raise JobStopped(
                f"dask-llm job {job_id[:8]}: the computation ended before this partition did"
            )
        time.sleep(pause)
        pause = min(_LOOK_MAX_S, pause * 2)
    kind, value = pickle.loads(path.read_bytes())
    path.unlink()  # the box itself goes with the run: other partitions may not have left yet
    if kind == "error":
        raise value
    frame: pd.DataFrame = value
    return frame
