"""Running a partition's coroutine from synchronous code, wherever that code runs.

Dask calls partition functions synchronously: on a worker thread (threaded,
processes and distributed schedulers) or on the caller's own thread (the
synchronous scheduler, and the pandas accessor). The caller's thread may
already run an event loop (a Jupyter cell), where ``asyncio.run`` refuses to
start; there the coroutine gets a fresh loop on a short-lived thread of its
own, and the caller's thread waits (``Handed``: a call on a thread of its own,
which ``engine.handoff`` also uses for a batch job's partitions). A nested
loop (``nest_asyncio``) would also work, but it patches asyncio for the whole
process.

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
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

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
    thread = Handed(lambda: asyncio.run(make_coro()), name="dask-llm-loop", daemon=True)
    return thread.result(on_interrupt=on_interrupt, grace=grace)


class Handed(Generic[T]):
    """A call running on a thread of its own, and the caller's wait for its result.

    ``context``: the ``contextvars`` the call runs in (default: a fresh, empty one, as
    for any new thread). ``daemon=False`` threads are joined at the interpreter's exit,
    so that a call stopped by a Ctrl-C still says what it leaves behind.
    """

    def __init__(
        self,
        call: Callable[[], T],
        *,
        name: str,
        daemon: bool,
        context: contextvars.Context | None = None,
    ) -> None:
        self._box: dict[str, Any] = {}
        run = (context if context is not None else contextvars.Context()).run
        self._thread = threading.Thread(
            target=run, args=(self._target, call), name=name, daemon=daemon
        )
        self._thread.start()

    def _target(self, call: Callable[[], T]) -> None:
        try:
            self._box["result"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            self._box["error"] = exc

    def done(self) -> bool:
        """Whether the call has returned or raised."""
        return not self._thread.is_alive()

    def result(self, *, on_interrupt: Callable[[], None] | None = None, grace: float = 5.0) -> T:
        """Wait for the call: its result, or what it raised.

        An interrupt of the wait (see the module docstring) calls ``on_interrupt``,
        gives the call ``grace`` seconds to wind down, and goes on."""
        # The caller's own task: asyncio.run turns Ctrl-C into its cancellation, which a
        # thread blocked in join() would only see once the call had finished.
        try:
            caller = asyncio.current_task()
        except RuntimeError:  # no event loop runs in the caller's thread
            caller = None
        thread = self._thread
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
        if "error" in self._box:
            raise self._box["error"]
        result: T = self._box["result"]
        return result
