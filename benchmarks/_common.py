"""Shared by the benchmarks: a simulator in its own process, another client's paced load,
medians, and a table printer.

The simulator runs in a subprocess so that it never shares a GIL with the
client being measured (the simulator benchmark shows it is not the bottleneck).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

import aiohttp

from dask_llm.simulator import fetch_stats


@contextlib.contextmanager
def simulator_process(*args: str, priority: bool = False) -> Iterator[str]:
    """Start ``python -m dask_llm simulate --port 0 ARGS``; yield its base URL.

    ``priority``: run it ahead of the client (nice -10, where allowed). A provider
    timestamps arrivals at its front end, which our CPU load never delays; a
    simulator sharing two cores with a busy client reads requests late and in
    bursts, and its windows then see bunches that were never sent.
    """
    os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_llm", "simulate", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if priority:
        with contextlib.suppress(OSError):  # not allowed: run at the same priority
            os.setpriority(os.PRIO_PROCESS, proc.pid, -10)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        url = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "http://" in line:
                url = line[line.index("http://") :].split()[0]
                break
        if not url:
            raise RuntimeError(
                f"simulator did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def paced_load(
    rate: float,
    send: Callable[[aiohttp.ClientSession], Awaitable[None]],
    *,
    headers: Mapping[str, str],
    counts: dict[str, int],
) -> Iterator[None]:
    """Another client of the provider for the length of the block: ``send(session)``
    started ``rate`` times a second, whatever the answers, on a session of ``headers`` in
    a thread of its own; ``counts["sent"]`` counts the sends. At the block's end it waits
    for its last answers (30 s at most), so what ``send`` counts is final then."""
    done = threading.Event()

    async def run() -> None:
        async with aiohttp.ClientSession(headers=dict(headers)) as session:
            tasks: set[asyncio.Future[None]] = set()
            start = time.monotonic()
            while not done.is_set():
                counts["sent"] += 1
                task = asyncio.ensure_future(send(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, start + counts["sent"] / rate - time.monotonic()))
            await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(30)


#: ``GET /sim/stats`` of the simulator at a base URL (the simulator's own helper).
stats = fetch_stats


def reset(base_url: str) -> None:
    import urllib.request

    root = base_url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(f"{root}/sim/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=10).close()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
