"""Running a partition's coroutine from synchronous code, wherever that code runs.

Dask calls partition functions synchronously: on a worker thread (threaded,
processes and distributed schedulers) or on the caller's own thread (the
synchronous scheduler, and the pandas accessor). The caller's thread may
already run an event loop (a Jupyter cell), where ``asyncio.run`` refuses to
start; there the coroutine gets a fresh loop on a short-lived thread of its
own, and the caller's thread waits. A nested loop (``nest_asyncio``) would
also work, but it patches asyncio for the whole process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``make_coro()`` to completion on a new event loop and return its result."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    return _run_in_thread(make_coro)


def _run_in_thread(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(make_coro())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="dask-llm-loop", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
