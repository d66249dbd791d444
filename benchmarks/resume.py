"""Kill a job half way (SIGKILL), rerun it: the rerun pays only for what is missing.

2,000 wine reviews x 2 chains against the simulator (its own process). The job
runs in a child process with a result cache; at about half its calls the
child is killed with SIGKILL; the same command is run again to completion.
Then the job runs once more, uninterrupted, on an empty cache, and the two
final frames are compared.

Reported: requests the rerun sent against the calls still missing at the kill
(plus the calls in flight then, which were paid but never stored), and the
simulator's ``duplicate_requests`` (identical requests answered twice: money
paid twice). Target: rerun requests <= missing + in flight; frames equal.

    python benchmarks/resume.py --input ../shared/data/wine_reviews_sample.csv
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pandas as pd

from benchmarks._common import simulator_process, stats, table

OUTPUT_COLUMNS = ["summary", "sentiment", "features", "llm_error"]


def job(url: str, source: str | None, rows: int, cache: str, output: str) -> None:
    """The job itself (run in a child process)."""
    import dask.dataframe as dd

    import dask_llm  # noqa: F401
    from benchmarks.rate_limited import load
    from dask_llm.demo import make_chains

    frame = load(source, rows)
    out = dd.from_pandas(frame, npartitions=8).llm.enrich(
        make_chains("gpt-4o-mini", url), cache=cache, max_concurrency=64
    )
    out.to_parquet(output, write_index=True)


def spawn(url: str, args: argparse.Namespace, cache: str, output: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.resume",
        "--job",
        url,
        "--rows",
        str(args.rows),
        "--cache",
        cache,
        "--output",
        output,
    ]
    if args.input:
        cmd += ["--input", args.input]
    return subprocess.Popen(cmd)


def cached(path: str) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
    conn.close()
    return int(n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--job")
    parser.add_argument("--cache")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.job:
        job(args.job, args.input, args.rows, args.cache, args.output)
        return

    tmp = tempfile.mkdtemp(prefix="dask-llm-resume-")
    cache = os.path.join(tmp, "cache.sqlite")
    with simulator_process("--latency", "0.2", "--jitter", "0.3", "--seed", "5") as url:
        total_calls = 2 * args.rows
        proc = spawn(url, args, cache, os.path.join(tmp, "killed.parquet"))
        while stats(url)["successes"] < total_calls // 2 and proc.poll() is None:
            time.sleep(0.02)
        at_kill = stats(url)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = stats(url)  # includes what the job sent between the snapshot and the kill
        saved = cached(cache)

        rerun = spawn(url, args, cache, os.path.join(tmp, "resumed.parquet"))
        assert rerun.wait() == 0
        after = stats(url)
        rerun_requests = after["requests"] - killed["requests"]
        unique_calls = cached(cache)
        missing = unique_calls - saved

        fresh_cache = os.path.join(tmp, "fresh.sqlite")
        full = spawn(url, args, fresh_cache, os.path.join(tmp, "full.parquet"))
        assert full.wait() == 0

    resumed = pd.read_parquet(os.path.join(tmp, "resumed.parquet"), dtype_backend="pyarrow")
    uninterrupted = pd.read_parquet(os.path.join(tmp, "full.parquet"), dtype_backend="pyarrow")
    equal = resumed[OUTPUT_COLUMNS].equals(uninterrupted[OUTPUT_COLUMNS])
    print(
        f"{args.rows} rows x 2 chains; killed with SIGKILL after {at_kill['successes']} answers\n"
    )
    print(
        table(
            [
                ("distinct calls in the job", str(unique_calls)),
                ("answers stored before the kill", str(saved)),
                ("calls in flight at the kill", str(at_kill["in_flight"])),
                ("calls missing after the kill", str(missing)),
                ("requests sent by the rerun", str(rerun_requests)),
                ("duplicate paid (simulator, kill + rerun)", str(after["duplicate_requests"])),
                ("resumed frame == uninterrupted frame", str(equal)),
            ],
            ("measure", "value"),
        )
    )
    ok = rerun_requests <= missing + at_kill["in_flight"] and equal
    print(
        f"\nrerun requests {rerun_requests} <= missing {missing} + in flight "
        f"{at_kill['in_flight']}: {'MET' if ok else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
