"""Calling once for identical (chain, inputs) pairs that are in flight at the same time.

The result cache catches a repeat that comes after the first answer is
stored; this catches the repeats that come while the first call is still on
the wire (the wine data repeats whole reviews, often close together). It is
process-wide, so partitions on other threads and other event loops wait on
the same call: a ``concurrent.futures.Future`` can be awaited from any loop
(``asyncio.wrap_future``). Across processes only the cache deduplicates.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from dask_llm.core.runtime import part

T = TypeVar("T")


class InFlight:
    """Calls on the wire now, by key (a part of the process's ``core.runtime``): an entry
    lives from its call's start to its end, so the size is the calls in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, Future[Any]] = {}


async def once(key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
    """Run ``call()`` unless a call for ``key`` is already running; share its outcome.

    Returns the result and whether this caller ran the call itself.
    """
    flights = part(InFlight)
    with flights.lock:
        running = flights.calls.get(key)
        if running is None:
            mine: Future[Any] = Future()
            flights.calls[key] = mine
    if running is not None:
        return await asyncio.wrap_future(running), False
    try:
        result = await call()
    except BaseException as exc:
        mine.set_exception(exc)
        # Nobody may be waiting; mark it retrieved so it is not logged as lost.
        mine.exception()
        raise
    else:
        mine.set_result(result)
        return result, True
    finally:
        with flights.lock:
            del flights.calls[key]
