"""Simulator throughput: requests/s at zero latency, against a bare aiohttp handler.

Each server runs in its own process pinned to CPU 0; the load generator (raw
aiohttp, 256 requests in flight, keep-alive) runs here pinned to CPU 1. The
bare handler returns a fixed chat-completion JSON: the ceiling aiohttp itself
sets on this machine. Target: the simulator >= 3,000 req/s on one core, and
>= 0.9x the bare handler.

Also reported: the server's CPU time per request (user + system, from
/proc/PID/stat over the timed run, Linux only). On a machine shared with other
work, req/s moves with whatever else runs; CPU per request moves much less, so
it is the better figure to compare two versions of the simulator.

    python benchmarks/simulator.py [--seconds 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp

from benchmarks._common import median, table

BARE = r"""
import json, sys
from aiohttp import web
BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
    "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
    "total_tokens": 2}}).encode()
async def chat(request):
    await request.read()
    return web.Response(body=BODY, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print("listening on http://127.0.0.1:%d/v1" % port, flush=True)
    import asyncio; await asyncio.Event().wait()
import asyncio; asyncio.run(main())
"""


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (nan where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(cmd: list[str]) -> Iterator[tuple[str, int]]:
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: _pin(0)
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            yield line.strip().rsplit(" ", 1)[-1], proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


async def load(url: str, pid: int, seconds: float, in_flight: int) -> tuple[float, float]:
    """Requests per second, and the server's CPU microseconds per request."""
    body = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Describe a crisp '
        b'Riesling with notes of lime and slate."}]}'
    )
    done = 0
    stop_at = 0.0
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(k: int) -> None:
            nonlocal done
            n = 0
            while time.perf_counter() < stop_at:
                # vary the body so the simulator cannot serve everything from its answer cache
                payload = body.replace(b"crisp", f"crisp{k}-{n}".encode())
                n += 1
                async with session.post(
                    f"{url}/chat/completions",
                    data=payload,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    assert r.status == 200, r.status
                done += 1

        stop_at = time.perf_counter() + 0.5  # warm-up: connections, caches
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        done = 0
        cpu = cpu_seconds(pid)
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        elapsed = time.perf_counter() - start
        return done / elapsed, (cpu_seconds(pid) - cpu) / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    _pin(1)
    sim_cmd = [sys.executable, "-m", "dask_llm", "simulate", "--port", "0"]
    bare_cmd = [sys.executable, "-c", BARE]
    sims: list[tuple[float, float]] = []
    bares: list[tuple[float, float]] = []
    for _ in range(args.repeat):  # interleaved
        with server(sim_cmd) as (url, pid):
            sims.append(asyncio.run(load(url, pid, args.seconds, args.in_flight)))
        with server(bare_cmd) as (url, pid):
            bares.append(asyncio.run(load(url, pid, args.seconds, args.in_flight)))
    s, b = median([r for r, _ in sims]), median([r for r, _ in bares])
    s_cpu, b_cpu = median([c for _, c in sims]), median([c for _, c in bares])
    print(
        f"zero latency, {args.in_flight} in flight, server on one core, median of {args.repeat}\n"
    )
    print(
        table(
            [
                ("bare aiohttp handler", f"{b:.0f}", "1.00", f"{b_cpu:.0f}"),
                ("dask-llm simulator", f"{s:.0f}", f"{s / b:.2f}", f"{s_cpu:.0f}"),
            ],
            ("server", "req/s", "vs bare", "server CPU us/req"),
        )
    )
    print(
        f"\nsimulator {s:.0f} req/s, bare aiohttp {b:.0f} req/s, ratio {s / b:.2f}; "
        f"target >= 3,000 req/s: {'MET' if s >= 3000 else 'MISSED'}; "
        f"server CPU per request {s_cpu:.0f} us vs {b_cpu:.0f} us bare"
    )


if __name__ == "__main__":
    main()
