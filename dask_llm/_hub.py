"""The job hub: how the processes of a job reach the client that computes it.

With dask's local process pool a job's partitions run in child processes of
the client. They need two things from the client: to be told that the job
must stop (Ctrl-C in the client, a partition that raised elsewhere), and a
way to send their run counts back (progress bar, ``last_run()``). Dask
gives neither: its pool returns only task results, and only at the end.

So the client runs a small hub, started the first time a job is pickled for
another process (that pickling happens in the client, just before the task
is submitted) and shared by all jobs of the process: a
``multiprocessing.connection.Listener`` on 127.0.0.1 with a random
``authkey`` (HMAC challenge on every connection), one thread per connected
child. Messages are small tuples; every one gets a reply:

    ("event", event)            -> None       a progress event (``_progress``)
    ("stop", job, kind, text, error) -> None  a child stops the whole job
    ("poll", job)               -> (kind, text, error) | None

A child polls every 0.1 s while it runs partitions, so a stop reaches every
process within that. Failure modes: a child that cannot connect (the task
was shipped to another machine, which only ``distributed`` does, and there
the hub is not used) runs on without the hub, as a process of its own; if
the client dies, the children's connections break and they stop their
partitions (``client gone``).

Stops are kept per job for ten minutes (a later compute of the same lazy
frame is a new run with the same job id; ``clear`` forgets the stop when it
starts).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from dask_llm import _progress

log = logging.getLogger("dask_llm")

_KEEP_STOPS_S = 600.0

# -- stop signals, in the client --------------------------------------------------------------
_STOPS: dict[str, tuple[str, str, Any, float]] = {}
_STOPS_LOCK = threading.Lock()


def signal_stop(job: str, kind: str, text: str, error: Any = None) -> None:
    """Record that ``job`` must stop (the first reason wins)."""
    now = time.monotonic()
    with _STOPS_LOCK:
        for old in [j for j, stop in _STOPS.items() if now - stop[3] > _KEEP_STOPS_S]:
            del _STOPS[old]
        _STOPS.setdefault(job, (kind, text, error, now))


def stop_signal(job: str) -> tuple[str, str, Any] | None:
    """(kind, text, error) of ``job``'s stop, if it has been told to stop."""
    with _STOPS_LOCK:
        found = _STOPS.get(job)
    return None if found is None else (found[0], found[1], found[2])


def clear(job: str) -> None:
    """A new run of ``job`` starts: forget an earlier run's stop."""
    with _STOPS_LOCK:
        _STOPS.pop(job, None)


# -- the server, in the client ------------------------------------------------------------------
class HubServer:
    """The client's listener; one per process, started on first use."""

    def __init__(self) -> None:
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.address: tuple[str, int] = self._listener.address
        self.pid = os.getpid()
        thread = threading.Thread(target=self._accept, name="dask-llm-hub", daemon=True)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:  # a client that failed the challenge, or the listener closed
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="dask-llm-hub-conn", daemon=True
            ).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return  # the child has gone
                try:
                    reply = _handle(message)
                except (TypeError, ValueError, KeyError) as exc:
                    log.debug("dask-llm hub: bad message %r: %s", message, exc)
                    reply = None
                try:
                    conn.send(reply)
                except OSError:
                    return


def _handle(message: tuple[Any, ...]) -> Any:
    op = message[0]
    if op == "event":
        _progress.receive(message[1])
        return None
    if op == "stop":
        _, job, kind, text, error = message
        signal_stop(job, kind, text, error)
        return None
    if op == "poll":
        return stop_signal(message[1])
    if op == "lease":
        from dask_llm._coordinator import local_coordinator

        _, job, member, report = message
        return local_coordinator().lease(job, member, report)
    raise ValueError(f"unknown operation {op!r}")


_SERVER: HubServer | None = None
_SERVER_LOCK = threading.Lock()


def hub_address() -> tuple[tuple[str, int], bytes]:
    """The address and key of this process's hub, started on first use."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER.pid != os.getpid():
            _SERVER = HubServer()
        return _SERVER.address, _SERVER.authkey


# -- the client side, in a child process --------------------------------------------------------
class HubClient:
    """A child's connection to the client's hub (thread-safe, connects lazily)."""

    def __init__(self, address: tuple[str, int], authkey: bytes) -> None:
        self.address = address
        self.authkey = authkey
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.broken = False

    def call(self, *message: Any) -> Any:
        """Send ``message`` and return the reply; raises ``ConnectionError`` if the hub is gone."""
        with self._lock:
            if self.broken:
                raise ConnectionError("the client's job hub is gone")
            try:
                if self._conn is None:
                    self._conn = Client(self.address, authkey=self.authkey)
                self._conn.send(message)
                return self._conn.recv()
            except (OSError, EOFError) as exc:
                self.broken = True
                raise ConnectionError(f"the client's job hub is gone ({exc})") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_CLIENTS: dict[tuple[tuple[str, int], int], HubClient] = {}
_CLIENTS_LOCK = threading.Lock()


def hub_client(address: tuple[str, int], authkey: bytes) -> HubClient:
    """This process's connection to the hub at ``address`` (one per hub)."""
    key = (tuple(address), os.getpid())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)  # type: ignore[arg-type]
        if client is None:
            client = _CLIENTS[key] = HubClient(address, authkey)  # type: ignore[index]
        return client
