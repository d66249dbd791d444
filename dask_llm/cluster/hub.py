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

    ("event", event)            -> None       a progress event (``observe.progress``)
    ("stop", job, run, kind, text, error) -> None  a child stops the whole run
    ("poll", job, run)          -> (kind, text, error) | None

A child polls every 0.1 s while it runs partitions, so a stop reaches every
process within that. Failure modes: a child that cannot connect (the task
was shipped to another machine, which only ``distributed`` does, and there
the hub is not used) runs on without the hub, as a process of its own; if
the client dies, the children's connections break and they stop their
partitions (``client gone``).

Runs. Every local computation (``compute``, ``to_parquet``...) is a *run*,
numbered in the client when Dask starts it (``_ComputeWatch`` in ``engine.job``
calls ``run_began``). A stop belongs to the job *and* the run: computing the
same lazy frame again after a Ctrl-C is a new run of the same job id, and it
must not meet the old run's stop (it is how a notebook user resumes). A run
that ends with an error is *abandoned* (``run_ended``): every partition of it
stops, also one that begins only after the error. That matters at start-up:
a Ctrl-C while dask's process pool is still spawning reaches the client before
any partition exists, and dask then waits for the tasks it already submitted;
without the mark they would run to the end (measured: the whole job paid,
40 s after the Ctrl-C). A pool child learns its run from the pickled options
(``current_run``, read while the client thread submits); a partition on
threads takes the newest run of its process (``newest_run``), which can
misname the run only when two computations start in different threads at
once. Stops and abandoned runs are kept ten minutes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from dask_llm.core.runtime import part
from dask_llm.limits.coordinator import local_coordinator
from dask_llm.observe import progress as _progress

log = logging.getLogger(__name__)

_KEEP_STOPS_S = 600.0


# -- runs and stop signals, in the client --------------------------------------------------------
class Hub:
    """The job hub's state in this process (a part of the process's ``core.runtime``).

    In the client: the local computations (*runs*) begun and not ended, with the
    jobs each holds; each thread's stack of runs; the stops of jobs, by (job,
    run) (run None where no run is known: ``distributed``), and the runs that
    ended with an error or were interrupted; the listener, started on first use.
    Stops and abandoned runs are kept ``_KEEP_STOPS_S`` (a partition of a run may
    begin late, in a child still starting), then pruned. In a pool child: its
    connections to the client's hub, one per hub. ``close()`` stops the listener
    and closes the connections.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stops: dict[tuple[str, int | None], tuple[str, str, Any, float]] = {}
        self.abandoned: dict[int, tuple[str, str, float]] = {}
        self.live: dict[int, set[str]] = {}
        self.run_ids = itertools.count(1)
        self.newest_run: int | None = None
        self.local = threading.local()
        self.server: HubServer | None = None
        self.clients: dict[tuple[tuple[str, int], int], HubClient] = {}

    def prune(self, now: float) -> None:
        """Forget stops and abandoned runs older than ``_KEEP_STOPS_S`` (under ``lock``)."""
        for key in [k for k, stop in self.stops.items() if now - stop[3] > _KEEP_STOPS_S]:
            del self.stops[key]
        for run in [r for r, mark in self.abandoned.items() if now - mark[2] > _KEEP_STOPS_S]:
            del self.abandoned[run]

    def close(self) -> None:
        with self.lock:
            server, self.server = self.server, None
            clients, self.clients = list(self.clients.values()), {}
        if server is not None:
            server.close()
        for client in clients:
            client.close()


def run_began() -> int:
    """A local computation starts in this thread: its run number."""
    hub = part(Hub)
    with hub.lock:
        run = next(hub.run_ids)
        hub.newest_run = run
        hub.live[run] = set()
    stack: list[int] = getattr(hub.local, "runs", None) or []
    stack.append(run)
    hub.local.runs = stack
    return run


def run_ended(run: int, abandoned: tuple[str, str] | None = None) -> set[str]:
    """The computation ``run`` ended (``abandoned``: with this stop); the jobs it held."""
    hub = part(Hub)
    stack: list[int] = getattr(hub.local, "runs", None) or []
    if run in stack:
        stack.remove(run)
    now = time.monotonic()
    with hub.lock:
        hub.prune(now)
        jobs = hub.live.pop(run, set())
        if abandoned is not None:
            hub.abandoned[run] = (abandoned[0], abandoned[1], now)
    return jobs


def drop_box(job: str, run: int | None) -> Path:
    """Where a child of dask's process pool leaves a partition's frame for the child that
    collects it (``engine.handoff``): a directory per job and run under the client's
    temporary directory (the handle tells the children), removed when the run ends
    (``engine.job``)."""
    return Path(tempfile.gettempdir()) / f"dask-llm-handoff-{job}-{run}"


def live_runs() -> list[int]:
    """Runs begun and not ended in this process (any thread)."""
    hub = part(Hub)
    with hub.lock:
        return list(hub.live)


def current_run() -> int | None:
    """The run this thread is computing now, if any (read when options are pickled)."""
    stack: list[int] | None = getattr(part(Hub).local, "runs", None)
    return stack[-1] if stack else None


def newest_run() -> int | None:
    """The run begun last in this process (a partition on threads belongs to it)."""
    return part(Hub).newest_run


def run_holds(run: int | None, job: str) -> None:
    """Note that ``run`` holds ``job`` (its options were pickled, or a partition began)."""
    if run is None:
        return
    hub = part(Hub)
    with hub.lock:
        jobs = hub.live.get(run)
        if jobs is not None:
            jobs.add(job)


def signal_stop(job: str, run: int | None, kind: str, text: str, error: Any = None) -> None:
    """Record that ``job``'s ``run`` must stop (the first reason wins)."""
    now = time.monotonic()
    hub = part(Hub)
    with hub.lock:
        hub.prune(now)
        hub.stops.setdefault((job, run), (kind, text, error, now))


def stop_signal(job: str, run: int | None) -> tuple[str, str, Any] | None:
    """(kind, text, error) of the stop of ``job``'s ``run``, if it has been told to stop."""
    hub = part(Hub)
    with hub.lock:
        found = hub.stops.get((job, run))
        if found is None and run is not None and run in hub.abandoned:
            kind, text, _ = hub.abandoned[run]
            return (kind, text, None)
    return None if found is None else (found[0], found[1], found[2])


# -- the server, in the client ------------------------------------------------------------------
class HubServer:
    """The client's listener; one per process, started on first use."""

    def __init__(self) -> None:
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.address: tuple[str, int] = self._listener.address
        self.pid = os.getpid()
        self._closed = False
        thread = threading.Thread(target=self._accept, name="dask-llm-hub", daemon=True)
        thread.start()

    def close(self) -> None:
        """Stop listening (connections already open end with their children)."""
        self._closed = True
        # Closing a socket does not wake a thread blocked in accept() on Linux, and the
        # socket listens on until it returns: a connection of our own wakes it.
        with contextlib.suppress(OSError, EOFError):
            Client(self.address, authkey=self.authkey).close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:  # a client that failed the challenge, or the listener closed
                continue
            if self._closed:
                conn.close()
                return
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
        _, job, run, kind, text, error = message
        signal_stop(job, run, kind, text, error)
        return None
    if op == "poll":
        return stop_signal(message[1], message[2])
    if op == "lease":
        _, job, member, report = message
        return local_coordinator().lease(job, member, report)
    raise ValueError(f"unknown operation {op!r}")


def hub_address() -> tuple[tuple[str, int], bytes]:
    """The address and key of this process's hub, started on first use."""
    hub = part(Hub)
    with hub.lock:
        if hub.server is None or hub.server.pid != os.getpid():
            hub.server = HubServer()
        return hub.server.address, hub.server.authkey


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


def hub_client(address: tuple[str, int], authkey: bytes) -> HubClient:
    """This process's connection to the hub at ``address`` (one per hub)."""
    key = (tuple(address), os.getpid())
    hub = part(Hub)
    with hub.lock:
        client = hub.clients.get(key)  # type: ignore[arg-type]
        if client is None:
            client = hub.clients[key] = HubClient(address, authkey)  # type: ignore[index]
        return client
