"""Ctrl-C a running job: how fast it stops, what it keeps, what the rerun pays.

300 wine reviews x 2 dependent chains on 3 partitions, against the simulator
(its own process) at 1,200 rpm and 1 s per call. The job runs in a child
process with a result cache; 4 s in, it gets SIGINT (what Ctrl-C sends).
Measured on the threaded scheduler, dask's process pool and a LocalCluster
(2 worker processes):

* exit: seconds from SIGINT to the process's exit (target <= 5 s);
* paid / cached: answers the simulator gave before the exit, and those in the
  cache file afterwards (the rest were lost: paid, but not kept);
* after exit: requests the simulator saw after the process ended (target 0);
* rerun: requests of the same job run again to completion, against the
  answers still missing plus those in flight at the interrupt (target
  rerun <= missing + in flight).

A last row interrupts the process pool 1 s in, while its children are still
starting: no partition has begun, and the job must still stop at once.

    python -m benchmarks.interrupt [--input ../shared/data/wine_reviews_sample.csv]
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

from benchmarks._common import reset, simulator_process, stats, table

ROWS = 300
CALLS = 2 * ROWS
STARTING_S = 1.0


def job(url: str, source: str | None, scheduler: str, cache: str) -> None:
    """The job itself (run in a child process)."""
    import dask.dataframe as dd

    import dask_llm  # noqa: F401
    from benchmarks.rate_limited import load
    from dask_llm.demo import make_chains

    frame = load(source, ROWS)
    out = dd.from_pandas(frame, npartitions=3).llm.enrich(
        make_chains("gpt-4o-mini", url), cache=cache, progress=False
    )
    if scheduler == "local-cluster":
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=":0") as cluster,
            Client(cluster),
        ):
            print("started", flush=True)
            out.compute()
    else:
        print("started", flush=True)
        out.compute(scheduler=scheduler, num_workers=3)


def cached_answers(cache: str) -> int:
    """Provider answers kept in the cache file (request entries, not row-memo entries)."""
    with sqlite3.connect(cache) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM results WHERE value LIKE '{\"s\":%'").fetchone()
    return int(n)


def spawn(url: str, source: str | None, scheduler: str, cache: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "benchmarks.interrupt", "--job", url, "--scheduler", scheduler]
    if source:
        cmd += ["--input", source]
    cmd += ["--cache", cache]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure(url: str, source: str | None, scheduler: str, after: float) -> tuple[str, ...]:
    reset(url)
    cache = os.path.join(tempfile.mkdtemp(), "cache.sqlite")
    proc = spawn(url, source, scheduler, cache)
    assert proc.stdout is not None
    proc.stdout.readline()  # "started": the cluster is up, the compute begins
    time.sleep(after)
    in_flight = stats(url)["in_flight"]
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    exit_s = time.monotonic() - sent
    paid = stats(url)["successes"]
    time.sleep(2.0)
    late = stats(url)["successes"] - paid
    cached = cached_answers(cache)
    told = "resume" in err
    reset(url)
    rerun = spawn(url, source, "threads", cache)
    rerun.communicate(timeout=600)
    rerun_requests = stats(url)["successes"]
    missing = CALLS - paid
    return (
        scheduler,
        f"{exit_s:.1f} s",
        str(paid),
        str(cached),
        str(late),
        str(in_flight),
        str(rerun_requests),
        str(missing + in_flight),
        "yes" if rerun_requests <= missing + in_flight and exit_s <= 5.0 else "NO",
        "yes" if told else "no",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", default=None)
    parser.add_argument("--after", type=float, default=4.0, help="seconds before the SIGINT")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scheduler", default="threads", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.job, args.input, args.scheduler, args.cache)
        return
    rows = []
    with simulator_process("--latency", "1.0", "--jitter", "0.2", "--rpm", "1200") as url:
        for scheduler in ("threads", "processes", "local-cluster"):
            rows.append(measure(url, args.input, scheduler, args.after))
            print(rows[-1], flush=True)
        # The pool's children still starting (~3 s here): no partition has begun, and
        # dask waits for the tasks it submitted, which must stop as they begin.
        row = measure(url, args.input, "processes", STARTING_S)
        rows.append((f"processes, ^C at {STARTING_S:.0f} s", *row[1:]))
        print(rows[-1], flush=True)
    print(
        f"\n{ROWS} rows x 2 chains, 3 partitions, 1,200 rpm, 1 s per call, SIGINT after "
        f"{args.after:.0f} s\n"
    )
    print(
        table(
            rows,
            (
                "scheduler",
                "exit",
                "paid",
                "cached",
                "paid after exit",
                "in flight at ^C",
                "rerun requests",
                "missing + in flight",
                "target met",
                "told how to resume",
            ),
        )
    )


if __name__ == "__main__":
    main()
