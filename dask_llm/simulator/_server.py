"""Running the simulator: in a background thread (tests, examples), or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import threading
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from dask_llm.simulator._app import SimulatorApp
from dask_llm.simulator._arrivals import ArrivalSite
from dask_llm.simulator._config import SimulatorConfig

T = TypeVar("T")


async def _start(app: SimulatorApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        app.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5
    )
    await runner.setup()
    site = ArrivalSite(runner, host, port, app.arrivals, backlog=1024)
    await site.start()
    return runner, site.port


class Simulator:
    """An OpenAI-compatible LLM server on a background thread.

    ::

        with Simulator(latency=0.5, rpm=3000) as sim:
            llm = ChatOpenAI(base_url=sim.base_url, api_key="sk-any")

    Keyword-only options are those of ``SimulatorConfig``, plus ``host`` (default
    loopback) and ``port`` (0: any free port). The server is listening when
    ``start()`` returns (or the ``with`` body begins).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.config = SimulatorConfig.from_kwargs(**options)
        self.host = host
        self.port = port
        self.app = SimulatorApp(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: what ``base_url=`` of an OpenAI client takes."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """``http://HOST:PORT``: what ``base_url=`` of ``ChatAnthropic`` (and the anthropic SDK,
        which adds ``/v1/messages``) takes."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Simulator:
        if self._thread is not None:
            raise RuntimeError("the simulator is already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._runner, self.port = loop.run_until_complete(
                    _start(self.app, self.host, self.port)
                )
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._runner.cleanup())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="dask-llm-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """What the simulator saw so far (the same as ``GET /sim/stats``)."""
        return self._on_loop(self.app.snapshot)

    def reset(self) -> None:
        """Clear stats, rate-limit windows, files and batches (the same as ``POST /sim/reset``)."""
        self._on_loop(self.app.reset)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's event loop (its state is not shared across threads)."""
        loop = self._loop
        if loop is None or self._thread is None or not loop.is_running():
            return fn()
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        result: list[T] = []
        failure: list[BaseException] = []

        def do() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # handed to the caller
                failure.append(exc)
            finally:
                done.set()

        loop.call_soon_threadsafe(do)
        if not done.wait(10):
            raise TimeoutError("the simulator's event loop did not answer within 10 s")
        if failure:
            raise failure[0]
        return result[0]


def serve(config: SimulatorConfig, *, host: str, port: int) -> None:
    """Run in the foreground until SIGINT/SIGTERM; print the base URL once listening."""

    async def main() -> None:
        app = SimulatorApp(config)
        runner, bound = await _start(app, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"dask-llm simulator listening on http://{host}:{bound}/v1", flush=True)
        # The server stamps each request's arrival on its loop; a full collection of
        # its heap stalls that loop and bunches the stamps of requests that were
        # spread evenly (a 2,000-row job paced at 98 a second: the server's sliding
        # peak 108-114 and 15-20 429s; frozen: 100-103, 0-6).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


def fetch_stats(base_url: str) -> dict[str, Any]:
    """``GET /sim/stats`` of a simulator at ``base_url`` (e.g. one in another process)."""
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/sim/stats", timeout=10) as r:
        result: dict[str, Any] = json.loads(r.read())
    return result
