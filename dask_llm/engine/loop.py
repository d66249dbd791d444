"""Running a partition's coroutine from synchronous code, wherever that code runs.

Dask calls partition functions synchronously: on a worker thread (threaded,
processes and distributed schedulers) or on the caller's own thread (the
synchronous scheduler, and the pandas accessor). The caller's thread may
already run an event loop (a Jupyter cell), where ``asyncio.run`` refuses to
start; there the coroutine gets a fresh loop on a short-lived thread of its
own, and the caller's thread waits. A nested loop (``nest_asyncio``) would
also work, but it patches asyncio for the whole process.

Interrupts. On the main thread without a running loop, ``asyncio.run``
turns Ctrl-C into a cancellation of the coroutine, which stops its job
gracefully and re-raises. When the caller's thread only waits for a loop
thread, Ctrl-C reaches that wait as a ``KeyboardInterrupt`` (a notebook
kernel) or as a cancellation of the caller's task (``asyncio.run`` around
synchronous code; the wait checks for it every 0.1 s): ``on_interrupt``
stops the job, the loop thread gets ``grace`` seconds to wind down (requests
on the wire land in the cache), and the interrupt goes on, so interrupting a
cell leaves no job running.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(
    make_coro: Callable[[], Coroutine[Any, Any, T]],
    *,
    on_interrupt: Callable[[], None] | None = None,
    grace: float = 5.0,
) -> T:
    """Run ``make_coro()`` to completion on a new event loop and return its result."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    if not running:
        # Outside the except block: whatever the job raises (a Ctrl-C, a stop) must
        # not read as raised "during handling of RuntimeError: no running event loop".
        return asyncio.run(make_coro())
    return _run_in_thread(make_coro, on_interrupt, grace)


def _run_in_thread(
    make_coro: Callable[[], Coroutine[Any, Any, T]],
    on_interrupt: Callable[[], None] | None,
    grace: float,
) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(make_coro())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    # The caller's own task: asyncio.run turns Ctrl-C into its cancellation, which a
    # thread blocked in join() would only see once the job had finished.
    caller = asyncio.current_task()
    thread = threading.Thread(target=target, name="dask-llm-loop", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            if caller is not None and caller.cancelling():
                raise asyncio.CancelledError
    except (KeyboardInterrupt, asyncio.CancelledError):
        if on_interrupt is not None:
            on_interrupt()
        thread.join(grace)
        raise
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
