"""Where this code runs: the one place that asks which scheduler's process this is.

Three places matter to a job: the process that called ``enrich`` (the
*client*; it also runs the partitions with the synchronous and threaded
schedulers), a process of dask's local process pool (a child of the client),
and a ``distributed`` worker. ``distributed`` is only consulted when it is
already imported: importing it costs about a second, and a process without
it cannot be a worker or hold a client.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
from typing import Any

from dask_llm.core.runtime import part

log = logging.getLogger(__name__)


def distributed_worker() -> Any:
    """The ``distributed`` worker running this task, or None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def distributed_client() -> Any:
    """The default ``distributed`` client of this process, or None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def in_pool_child() -> bool:
    """True in a process of dask's local process pool (or any multiprocessing child)."""
    return multiprocessing.parent_process() is not None


def worker_processes() -> int:
    """How many worker processes the default ``distributed`` client has (1 without one)."""
    client = distributed_client()
    if client is None:
        return 1
    try:
        return max(1, len(client.nthreads()))
    except (OSError, RuntimeError, ValueError):  # a client that is closing
        return 1


_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "inproc")


def remote_worker(client: Any) -> str | None:
    """The address of a worker (or the scheduler) of ``client`` on another host, if any."""
    try:
        info = client.scheduler_info()
    except (OSError, RuntimeError, ValueError):
        return None
    addresses = [str((getattr(client, "scheduler", None) and client.scheduler.address) or "")]
    addresses += list(info.get("workers", {}))
    for address in addresses:
        host = address.split("://", 1)[-1]
        if address and not host.startswith(_LOOPBACK):
            return address
    return None


def workers_without(client: Any, variable: str) -> list[str]:
    """Workers of ``client`` whose environment lacks ``variable`` (one round trip)."""
    try:
        found = client.run(_has_variable, variable)
    except (OSError, RuntimeError, ValueError):
        return []
    return sorted(address for address, has in found.items() if not has)


def _has_variable(variable: str) -> bool:
    import os

    return bool(os.environ.get(variable))


def current_task_key() -> Any:
    """The key of the ``distributed`` task this thread executes, or None."""
    if "distributed" not in sys.modules:
        return None
    from distributed.worker import thread_state

    return getattr(thread_state, "key", None)


class Tails:
    """Partitions of this process that left their worker thread for their tail (a part of
    the process's ``core.runtime``): at most one per thread slot."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.out = 0


def secede_for_tail(*, cap: bool = True) -> bool:
    """Give this task's ``distributed`` thread slot to the next partition; True if done.

    Called when a partition has admitted its last row: what is left is its
    tail (the rows in flight, their last answers and retries: seconds in which
    this process would send less and less). ``distributed.secede`` lets the
    worker start its next task now, so that the next partition's rows fill the
    pipe as the tail empties it (a worker with one thread otherwise idles for
    the tail of every partition, and on a cluster those tails line up). The
    task still ends as usual; its thread leaves the pool when it does. At most
    one tail per thread slot is out at a time, so a worker of small partitions
    does not pile them up; ``cap=False`` for a partition in batch mode, whose
    batch waits hold no CPU: every partition of the worker waits at once, so
    that their batch windows overlap whatever its number of threads.
    """
    worker = distributed_worker()
    if worker is None or current_task_key() is None:
        return False
    try:
        from distributed import secede

        tails = part(Tails)
        with tails.lock:
            if cap and tails.out >= max(1, int(worker.state.nthreads)):
                return False
            tails.out += 1
        try:
            secede()
        except BaseException:
            with tails.lock:
                tails.out -= 1
            raise
    except (AttributeError, ValueError, KeyError, RuntimeError) as exc:
        log.debug("dask-llm: the partition could not secede (%s)", exc)
        return False
    return True


def tail_done() -> None:
    """A partition that seceded for its tail has ended."""
    tails = part(Tails)
    with tails.lock:
        tails.out = max(0, tails.out - 1)


def task_abandoned(worker: Any, key: Any) -> bool:
    """Whether ``distributed`` no longer wants the task ``key`` this worker executes.

    A client that is interrupted (or whose computation failed elsewhere) releases
    its futures; the scheduler then tells the worker to forget the task, which
    the worker cannot do to a running thread, so it marks it ``cancelled``. The
    thread itself has to notice: this is how.
    """
    if worker is None or key is None:
        return False
    try:
        ts = worker.state.tasks.get(key)
    except (AttributeError, RuntimeError):  # the worker is closing; its dict changing
        return False
    return ts is None or ts.state in ("cancelled", "released", "forgotten")
