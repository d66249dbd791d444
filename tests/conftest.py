"""Fixtures: the project's simulator on 127.0.0.1, driven through the real clients."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

# Before anything builds a ChatOpenAI: workers (threads, processes, distributed
# workers started from here) read the key from this environment. The value is
# recognisable so tests can scan task graphs, logs and caches for it.
API_KEY = "sk-test-dask-llm-SECRET-0123456789"
os.environ["OPENAI_API_KEY"] = API_KEY
os.environ.pop("OPENAI_BASE_URL", None)
ANTHROPIC_KEY = "sk-ant-test-dask-llm-SECRET-9876543210"
os.environ["ANTHROPIC_API_KEY"] = ANTHROPIC_KEY
for _name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_URL"):
    os.environ.pop(_name, None)

# A run started in the background by a non-interactive shell script starts with SIGINT
# ignored, and every process it starts inherits that: the Ctrl-C tests then saw jobs
# that never stopped (14 failed that way with a CPU burner started from a script). The
# tests send SIGINT on purpose: restore Python's own handler, which children get back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import dask  # noqa: E402
import distributed  # noqa: E402
import distributed.utils  # noqa: E402

# The worker processes of the suite's LocalClusters fork from a server that imported the
# stack once, as distributed's own suite does: spawned, each imported it again (~2.4 s of
# CPU, about 40 of them per run, on a suite that is CPU-bound on two cores at -n 4). Each
# gets this process's environment when its cluster starts (``helpers.local_cluster``);
# a test whose workers must lack a variable asks for spawned ones. Dask's local process
# pool keeps spawn, as users run it (its children inherit the environment of the moment).
dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
distributed.utils.get_mp_context()  # distributed's preload list, set once
multiprocessing.set_forkserver_preload(["distributed", "dask_llm", "tests.helpers"])

from dask_llm.simulator import Simulator, fetch_stats  # noqa: E402
from tests.helpers import HTTP_ADDRESS, local_cluster  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (in their order, then the rest in theirs): on several workers
    (``-n 4``, ``--dist worksteal``) the longest start first, and the run does not end on
    a slow one that one worker begins while the others have nothing left. Every worker
    collects the same order, as pytest-xdist needs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    """One zero-latency simulator for the session; reset before each test that uses ``sim``."""
    with Simulator() as sim:
        yield sim


@pytest.fixture
def sim(simulator: Simulator) -> Simulator:
    """The session simulator with fresh stats and limit windows."""
    simulator.reset()
    return simulator


@pytest.fixture
def make_simulator() -> Iterator[Callable[..., Simulator]]:
    """Start simulators with particular settings; all stopped at the end of the test."""
    started: list[Simulator] = []

    def make(**options: Any) -> Simulator:
        s = Simulator(**options).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session", autouse=True)
def _port_8787_taken() -> Iterator[None]:
    """The suite runs as if another cluster (or a notebook's dashboard) held port 8787.

    distributed's scheduler binds its HTTP server to 8787 even with
    ``dashboard_address=None`` and warns (an error here) when the port is taken: a test
    cluster that needs 8787 then fails on every run, not only when another run of the
    suite happens to hold the port at the same moment.
    """
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8787))
            s.listen()
        except OSError:
            pass  # another process holds it: the condition is there already
        yield


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[distributed.LocalCluster]:
    """Two worker processes of two threads, started once for the session's cluster tests
    that kill no worker; each test connects a ``Client`` of its own (so no default client
    outlives it)."""
    with local_cluster(n_workers=2, threads_per_worker=2, processes=True) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's default cache lives in its own directory."""
    monkeypatch.setenv("DASK_LLM_CACHE", str(tmp_path / "cache.sqlite"))


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Whatever a test (or the code it runs) does to os.environ is undone after it."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def _wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Until something listens on ``port`` of 127.0.0.1 (``proc`` dying first is an error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


def _stop(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """Terminate ``procs`` one after the other, each killed if still running 10 s later.

    One after the other: a worker whose scheduler goes away while it closes retries
    the scheduler for seconds (8 s here, against 0.4 s when its scheduler is still up).
    """
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hand_started_cluster() -> Iterator[str]:
    """`dask scheduler` and `dask worker` as separate processes, as on a real cluster."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [
                *dask_cli,
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--no-dashboard", "--dashboard-address", HTTP_ADDRESS),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    try:
        _wait_for_port(port, procs[0])
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "2",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )
        yield address
    finally:
        _stop(reversed(procs))


class ExternalSimulator:
    """A simulator in a process of its own, as the provider is: our GIL never delays its clock.

    The in-process simulator shares the test's GIL, so a busy client stamps its
    requests' arrivals late by up to a switch interval or more; tests that check
    the peak over a sliding second at the limit itself use this one.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def stats(self) -> dict[str, Any]:
        return fetch_stats(self.base_url)


@pytest.fixture
def external_simulator() -> Iterator[Callable[..., ExternalSimulator]]:
    """Start ``python -m dask_llm simulate`` with the given options (``--latency 0.05``...)."""
    procs: list[subprocess.Popen[str]] = []

    def make(*args: str) -> ExternalSimulator:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask_llm", "simulate", "--port", str(port), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        _wait_for_port(port, proc)
        return ExternalSimulator(f"http://127.0.0.1:{port}/v1")

    yield make
    _stop(procs)
