"""Result cache cost: ``SQLiteCache.put`` and ``get_many`` against bare sqlite3 in the same run.

Baseline: a bare ``sqlite3`` connection on its own file with the same pragmas
(WAL, ``synchronous=NORMAL``, autocommit), doing the same ``INSERT OR
REPLACE`` of the same text and the same ``SELECT ... IN (...)``, without
JSON, checksums or connection lookup. The ratio is what our layer adds.

Measured: one ``put`` (median of per-call times) with 1 process, and with 4
processes putting at once (each its own keys); ``get_many`` of 1,000 present
keys alone, and while 4 processes keep writing. Values are a ~100-byte JSON
answer, like a summary plus a score.

    python benchmarks/cache.py [--puts 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sqlite3
import tempfile
import time
from typing import Any

from benchmarks._common import median, table
from dask_llm.cache import SQLiteCache

VALUE = {"summary": "Ripe plum and cedar, firm tannins, a long finish.", "score": 91, "ok": True}
WRITERS = 4


class Bare:
    """The baseline: sqlite3 with the same pragmas and statements, nothing else."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=60000")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
            "checksum TEXT NOT NULL, created REAL NOT NULL)"
        )
        self.text = json.dumps(VALUE)

    def put(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)", (key, self.text, "x", 0.0)
        )

    def get_many(self, keys: list[str]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT key, value, checksum FROM results WHERE key IN ({marks})"
            out += self.conn.execute(sql, chunk).fetchall()
        return out

    def close(self) -> None:
        self.conn.close()


def opener(kind: str, path: str) -> Any:
    return SQLiteCache(path) if kind == "ours" else Bare(path)


def key(prefix: str, i: int) -> str:
    return hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest()


def time_puts(
    kind: str, path: str, prefix: str, n: int, start_at: float = 0.0
) -> tuple[float, float, float]:
    """(median seconds of one put, start, end) over ``n`` puts of fresh keys.

    Starts at ``start_at`` (``time.monotonic``, a system-wide clock) so that
    processes spawned one after another really put at the same time.
    """
    cache = opener(kind, path)
    cache.put(key(prefix, -1), VALUE)  # open the connection outside the timing
    time.sleep(max(0.0, start_at - time.monotonic()))
    times = []
    start = time.monotonic()  # system-wide clock: comparable across processes
    for i in range(n):
        t = time.perf_counter()
        cache.put(key(prefix, i), VALUE)
        times.append(time.perf_counter() - t)
    end = time.monotonic()
    cache.close()
    return median(times), start, end


def write_until(kind: str, path: str, prefix: str, ready: Any, stop: Any, done: Any) -> None:
    cache = opener(kind, path)
    cache.put(key(prefix, -1), VALUE)
    ready.wait()
    i = 0
    while not stop.is_set():
        cache.put(key(prefix, i), VALUE)
        i += 1
    cache.close()
    with done.get_lock():
        done.value += i


def concurrent_puts(kind: str, path: str, n: int, round_: int) -> tuple[float, float]:
    """(median put seconds, total puts/s) with WRITERS processes putting ``n`` each."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 5.0  # after every worker has spawned and imported
    with ctx.Pool(WRITERS) as pool:
        runs = pool.starmap(
            time_puts,
            [(kind, path, f"w{round_}-{w}", n, start_at) for w in range(WRITERS)],
            chunksize=1,
        )
    assert min(start for _, start, _ in runs) >= start_at, "a worker started late"
    elapsed = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    return median([m for m, _, _ in runs]), WRITERS * n / elapsed


def time_get_many(kind: str, path: str, keys: list[str], repeat: int = 30) -> float:
    cache = opener(kind, path)
    cache.get_many(keys[:1])
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        got = cache.get_many(keys)
        times.append(time.perf_counter() - t)
    assert len(got) == len(keys), (kind, len(got))
    cache.close()
    return median(times)


def get_many_while_writing(kind: str, path: str, keys: list[str]) -> tuple[float, float]:
    """(median get_many seconds, puts/s the writers made meanwhile)."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop, done = ctx.Barrier(WRITERS + 1), ctx.Event(), ctx.Value("q", 0)
    writers = [
        ctx.Process(target=write_until, args=(kind, path, f"bg-{w}", ready, stop, done))
        for w in range(WRITERS)
    ]
    for p in writers:
        p.start()
    ready.wait(60)  # every writer is connected and about to write
    t = time.perf_counter()
    try:
        took = time_get_many(kind, path, keys)
    finally:
        stop.set()
        elapsed = time.perf_counter() - t
        for p in writers:
            p.join(30)
    assert all(p.exitcode == 0 for p in writers)
    return took, done.value / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for kind in ("bare", "ours"):
                path = os.path.join(tmp, f"{kind}.sqlite")
                put1, _, _ = time_puts(kind, path, f"one{r}", args.puts)
                put4, rate4 = concurrent_puts(kind, path, args.puts // 2, r)
                present = [key(f"one{r}", i) for i in range(1000)]
                get1 = time_get_many(kind, path, present)
                get4, rate_bg = get_many_while_writing(kind, path, present)
                for name, value in [
                    ("put, 1 process (us)", put1 * 1e6),
                    (f"put, {WRITERS} processes at once (us)", put4 * 1e6),
                    (f"puts/s in total, {WRITERS} processes", rate4),
                    ("get_many 1,000 keys, alone (ms)", get1 * 1e3),
                    (f"get_many 1,000 keys, {WRITERS} writers (ms)", get4 * 1e3),
                    (f"  meanwhile, puts/s by the {WRITERS} writers", rate_bg),
                ]:
                    results.setdefault((name, kind), []).append(value)
    names = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for name in names:
        ours, bare = median(results[(name, "ours")]), median(results[(name, "bare")])
        rows.append((name, f"{ours:,.1f}", f"{bare:,.1f}", f"{ours / bare:.2f}x"))
    print(f"median of {args.repeat} runs; SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    print(table(rows, ("measure", "SQLiteCache", "bare sqlite3", "ratio")))


if __name__ == "__main__":
    main()
