"""Simulator throughput: requests/s at zero latency, against a bare aiohttp handler.

Each server runs in its own process pinned to CPU 0; the load generator (raw
aiohttp, 256 requests in flight, keep-alive) runs here pinned to CPU 1. The
bare handler returns a fixed chat-completion JSON: the ceiling aiohttp itself
sets on this machine. Target: the simulator >= 3,000 req/s on one core.

    python benchmarks/simulator.py [--seconds 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


@contextlib.contextmanager
def server(cmd: list[str]) -> Iterator[str]:
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: _pin(0)
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            yield line.strip().rsplit(" ", 1)[-1]
        finally:
            proc.terminate()
            proc.wait(10)


async def load(url: str, seconds: float, in_flight: int) -> float:
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
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    _pin(1)
    sim_cmd = [sys.executable, "-m", "dask_llm", "simulate", "--port", "0"]
    bare_cmd = [sys.executable, "-c", BARE]
    sims, bares = [], []
    for _ in range(args.repeat):  # interleaved
        with server(sim_cmd) as url:
            sims.append(asyncio.run(load(url, args.seconds, args.in_flight)))
        with server(bare_cmd) as url:
            bares.append(asyncio.run(load(url, args.seconds, args.in_flight)))
    s, b = median(sims), median(bares)
    print(
        f"zero latency, {args.in_flight} in flight, server on one core, median of {args.repeat}\n"
    )
    print(
        table(
            [
                ("bare aiohttp handler", f"{b:.0f}", "1.00"),
                ("dask-llm simulator", f"{s:.0f}", f"{s / b:.2f}"),
            ],
            ("server", "req/s", "vs bare"),
        )
    )
    print(
        f"\nsimulator {s:.0f} req/s, bare aiohttp {b:.0f} req/s, ratio {s / b:.2f}; "
        f"target >= 3,000 req/s: {'MET' if s >= 3000 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
