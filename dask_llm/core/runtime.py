"""The process's runtime: one owner for the state dask-llm keeps between calls.

Some state must outlive a call: the jobs with partitions running in this
process, the client's runs in progress and the summaries of the last ones,
the coordinator of the ledgers that live here, the job hub's stop marks,
identical requests in flight, the process's totals for ``/metrics``... Each
piece belongs to the module of its concept, which declares it as one small
class (its *part*: its fields, its lock, what bounds its size and when its
entries go); the ``Runtime`` holds one instance of each part, made on first
use. No module keeps a registry of its own.

Lifetime: a process has one runtime, made at import and kept for the life of
the process (a pool child or a ``distributed`` worker has its own, as each
process has its own memory). ``reset()`` closes every part that holds a
resource (a part's ``close()``: the hub's listener, say) and starts afresh:
for tests, which get a clean process state without a new process. Nothing
in a part grows per call: each part's docstring says what bounds it.

This module is the core layer's: a part class may come from any layer (the
runtime only stores it), so the runtime imports nothing of dask-llm.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

_P = TypeVar("_P")


class Runtime:
    """The parts of this process's state, one instance of each part class."""

    __slots__ = ("_lock", "_parts")

    def __init__(self) -> None:
        self._parts: dict[type[Any], Any] = {}
        self._lock = threading.Lock()

    def part(self, kind: type[_P]) -> _P:
        """This process's instance of ``kind`` (made with ``kind()`` on first use)."""
        found = self._parts.get(kind)
        if found is None:
            with self._lock:
                found = self._parts.get(kind)
                if found is None:
                    found = self._parts[kind] = kind()
        return found

    def parts(self) -> list[Any]:
        """The parts made so far."""
        with self._lock:
            return list(self._parts.values())

    def close(self) -> None:
        """Close every part that holds a resource (those with a ``close()``)."""
        for found in self.parts():
            close = getattr(found, "close", None)
            if close is not None:
                close()


_RUNTIME = Runtime()


def runtime() -> Runtime:
    """This process's runtime."""
    return _RUNTIME


def part(kind: type[_P]) -> _P:
    """This process's instance of the part ``kind`` (``runtime().part(kind)``)."""
    return _RUNTIME.part(kind)


def reset() -> Runtime:
    """Close this process's runtime and start a new, empty one (tests); returns it."""
    global _RUNTIME
    old, _RUNTIME = _RUNTIME, Runtime()
    old.close()
    return _RUNTIME
