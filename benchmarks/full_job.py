"""The full-size job of issue 25: the Kaggle wine set's rows x 2 dependent chains at 30,000 rpm.

N wine rows (default 129,971, the size of the Kaggle set: the sample in
``--input`` repeated, each copy's descriptions made distinct) x the two
dependent structured chains of ``dask_llm.demo``, against the simulator in
its own process enforcing a strict sliding 1-second window at 500
requests/s (``rpm=30000``, told to the job), ~1 s median latency (lognormal
jitter 0.2). On a LocalCluster of 2 worker processes and on the threaded
scheduler (``--scheduler``). Bound = calls / rate + 2 latencies (the
dependent chain's last answers). Printed, per scheduler:

* wall / bound (the ratio the targets are set in: <= 1.10x on the
  LocalCluster, <= 1.20x on threads for the full job; <= 1.10x / 1.15x for
  ``--rows 20000``);
* rows lost (an ``llm_error``, or missing; the loader keeps no row with a
  null input, so none is lost to its input);
* the peak over any sliding second at the simulator against the limit, and
  its quota 429s;
* the most requests in flight at the simulator, and calls/s;
* the resident memory of the client and of each worker process when 10%, 50%
  and 100% of the calls were answered (the target: flat over the run,
  nothing grows per row; not met yet in the workers, see docs/cluster.md,
  "Memory over a long job"). ``--worker-profile off`` (or ``both``) runs the
  LocalCluster with distributed's statistical profiler off: it samples every
  worker thread's stack every 10 ms and keeps an hour of call trees
  (``profile_history``); it is 10-20 MB of the workers' growth at 30,000 rows.

``--baseline REV`` also runs each configuration with another commit's code
(checked out into a temporary worktree, first on the job's ``PYTHONPATH``)
against the same simulator, in the same run, and prints the ratio. The data
is never committed: ``--input`` reads it where it is.

    python -m benchmarks.full_job --input ../shared/data/wine_reviews_sample.csv
    python -m benchmarks.full_job --input ../shared/data/wine_reviews_sample.csv --rows 20000
    python -m benchmarks.full_job --rows 20000 --scheduler threads --baseline main
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import pandas as pd

# This file is also the job's process, run with the baseline's tree first on the path:
# there ``benchmarks`` is the baseline's, so what it may lack is looked up when used.
from benchmarks import cluster_budget
from benchmarks._common import reset, simulator_process, stats, table
from benchmarks.cluster_budget import ROOT, baseline_tree

KAGGLE_ROWS = 129_971
RPM = 30_000
LATENCY_S = 1.0
#: The points of the run (share of calls answered) where memory is read; the table
#: shows 10%, 50% and 100%, and a line per run below it every tenth.
MARKS = (0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90)


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    import psutil

    return float(psutil.Process().memory_info().rss) / 1e6


class Marks:
    """Reads the client's and the workers' memory as the simulator's answers pass each mark."""

    def __init__(self, url: str, calls: int, client: Any = None) -> None:
        self.url = url
        self.calls = calls
        self.client = client
        self.seen: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def read(self, label: str) -> None:
        workers: list[float] = []
        if self.client is not None:
            try:
                rss = self.client.run(rss_mb, nanny=False)
                workers = [rss[address] for address in sorted(rss)]  # same order at each mark
            except Exception as exc:  # a mark is a reading, never the job's failure
                print(f"workers' memory not read at {label}: {exc}", file=sys.stderr)
        self.seen[label] = {"client": rss_mb(), "workers": workers}

    def _watch(self) -> None:
        pending = list(MARKS)
        while pending and not self._stop.wait(0.5):
            try:
                done = stats(self.url)["successes"]
            except OSError:
                continue
            while pending and done >= pending[0] * self.calls:
                self.read(f"{pending.pop(0):.0%}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.read("100%")


def job(args: argparse.Namespace) -> None:
    """One configuration, in a process of its own (its PYTHONPATH picks the code)."""
    import dask.dataframe as dd

    import dask_llm  # noqa: F401  (registers the .llm accessor)
    from benchmarks.rate_limited import load
    from dask_llm.demo import make_chains

    frame = load(args.input, args.rows)
    calls = 2 * len(frame)
    ddf = dd.from_pandas(frame, npartitions=args.partitions)
    out = ddf.llm.enrich(make_chains("gpt-4o-mini", args.job), rpm=RPM, cache=False, progress=False)
    # Written out, as a job of this size is (out.compute() would hold every row's answers
    # in the workers and the client: their memory would grow with the output by design).
    written = tempfile.mkdtemp(prefix="full-job-")
    threads = {"scheduler": "threads", "num_workers": args.threads}
    cpu = time.process_time()
    if args.scheduler == "cluster":
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(args.workers)
            client.run(_warm)  # a user's cluster has imported what jobs use
            marks = Marks(args.job, calls, client)
            cpu = time.process_time()
            start = time.perf_counter()
            out.to_parquet(written, write_index=False)  # the client's cluster writes it
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu
            marks.close()
    else:
        marks = Marks(args.job, calls)
        start = time.perf_counter()
        out.to_parquet(written, write_index=False, compute_kwargs=threads)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        marks.close()
    result = pd.read_parquet(written, columns=["llm_error"])
    shutil.rmtree(written, ignore_errors=True)
    lost = len(frame) - len(result) + int(result["llm_error"].notna().sum())
    errors = result["llm_error"].dropna().head(3).tolist()
    print(
        json.dumps(
            {
                "wall": wall,
                "rows": len(frame),
                "lost": lost,
                "errors": errors,
                "client_cpu": cpu / wall,
                "memory": marks.seen,
            }
        )
    )


def _warm() -> None:
    import dask_llm.demo  # noqa: F401  (and LangChain, the openai SDK)


def run_job(
    url: str, code: str, args: argparse.Namespace, scheduler: str, *, profile: bool = True
) -> dict[str, Any]:
    reset(url)
    time.sleep(1.2)  # the last job's requests leave the window
    cmd = [sys.executable, os.path.abspath(__file__), "--job", url, "--scheduler", scheduler]
    cmd += ["--rows", str(args.rows), "--partitions", str(args.partitions)]
    cmd += ["--workers", str(args.workers), "--threads", str(args.threads)]
    if args.input:
        cmd += ["--input", args.input]
    env: dict[str, str] = {}
    if not profile:  # distributed's statistical profiler, on by default in every worker
        env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
    result = cluster_budget.run_in_tree(cmd, code=code, timeout_s=7200, env=env)
    result.update(stats(url))
    return result


def over_the_run(name: str, r: dict[str, Any]) -> str:
    """One run's memory at every mark: the client's, then each worker's."""
    labels = [f"{m:.0%}" for m in MARKS] + ["100%"]
    seen = [r["memory"][label] for label in labels if label in r["memory"]]
    lines = [
        f"  {name}: "
        + ", ".join(
            f"{label} {r['memory'][label]['client']:.0f}"
            for label in labels
            if label in r["memory"]
        )
    ]
    for w in range(max((len(m["workers"]) for m in seen), default=0)):
        lines.append(
            f"    worker {w + 1}: "
            + " ".join(f"{m['workers'][w]:.0f}" if w < len(m["workers"]) else "-" for m in seen)
        )
    return "\n".join(lines)


def describe(name: str, r: dict[str, Any], bound: float) -> tuple[str, ...]:
    limit = RPM // 60

    def memory(label: str) -> str:
        m = r["memory"].get(label)
        if m is None:
            return "-"
        workers = "/".join(f"{w:.0f}" for w in m["workers"])
        return f"{m['client']:.0f}" + (f" [{workers}]" if workers else "")

    return (
        name,
        f"{r['wall']:.1f}",
        f"{r['wall'] / bound:.3f}x",
        str(r["lost"]),
        f"{r['peak_requests_1s']} / {limit}",
        str(r["rate_limited"]),
        str(r["peak_in_flight"]),
        f"{2 * r['rows'] / r['wall']:.0f}",
        f"{r['client_cpu']:.0%}",
        *(memory(label) for label in ("10%", "50%", "100%")),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", default=None, help="a wine reviews CSV (default: the demo's)")
    parser.add_argument("--rows", type=int, default=KAGGLE_ROWS)
    parser.add_argument(
        "--scheduler", choices=("cluster", "threads", "both"), default="both", help="which runs"
    )
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threaded scheduler's threads")
    parser.add_argument(
        "--partitions", type=int, default=0, help="default: one per 4,000 rows, at least 8"
    )
    parser.add_argument("--baseline", default=None, help="also run this commit's code (e.g. main)")
    parser.add_argument(
        "--worker-profile",
        choices=("on", "off", "both"),
        default="on",
        help="distributed's profiler in the LocalCluster's workers (on: dask's default)",
    )
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.partitions:
        args.partitions = max(8, args.rows // 4000)
    if args.job:
        job(args)
        return
    bound = 2 * args.rows / (RPM / 60) + 2 * LATENCY_S
    schedulers = ("cluster", "threads") if args.scheduler == "both" else (args.scheduler,)
    labels = {"cluster": f"LocalCluster of {args.workers}", "threads": "threads"}
    rows: list[tuple[str, ...]] = []
    series: list[str] = []
    sim = ("--latency", str(LATENCY_S), "--jitter", "0.2", "--rpm", str(RPM), "--seed", "1")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with (
        simulator_process(*sim, "--limit-mode", "sliding", priority=True) as url,
        baseline_tree(args.baseline) if args.baseline else contextlib.nullcontext() as old_tree,
    ):
        for scheduler in schedulers:
            if scheduler == "cluster" and args.worker_profile != "on":
                quiet = run_job(url, ROOT, args, scheduler, profile=False)
                rows.append(describe(f"{labels[scheduler]}, profiler off", quiet, bound))
                series.append(over_the_run(rows[-1][0], quiet))
                print(rows[-1], quiet["errors"] or "", flush=True)
                if args.worker_profile == "off":
                    continue
            new = run_job(url, ROOT, args, scheduler)
            rows.append(describe(labels[scheduler], new, bound))
            series.append(over_the_run(rows[-1][0], new))
            print(rows[-1], new["errors"] or "", flush=True)
            if old_tree is not None:
                old = run_job(url, old_tree, args, scheduler)
                rows.append(describe(f"{labels[scheduler]}, {args.baseline}", old, bound))
                series.append(over_the_run(rows[-1][0], old))
                rows.append((f"  this tree / {args.baseline}", f"{new['wall'] / old['wall']:.2f}x"))
                rows[-1] += ("",) * (len(rows[-2]) - 2)
                print(rows[-2], flush=True)
    print(
        f"\n{args.rows:,} wine rows x 2 dependent chains on {args.partitions} partitions, "
        f"strict sliding window at {RPM // 60} req/s (rpm={RPM} told), {LATENCY_S:g} s median "
        f"latency: bound {bound:.1f} s. Load average at the start: {load:.2f} on "
        f"{os.cpu_count()} cores. Memory: MB resident, client [workers].\n"
    )
    print(
        table(
            rows,
            (
                "run",
                "wall s",
                "wall/bound",
                "rows lost",
                "peak 1s / limit",
                "quota 429s",
                "most in flight",
                "calls/s",
                "client CPU",
                "RSS 10%",
                "RSS 50%",
                "RSS 100%",
            ),
        )
    )
    print("\nMemory every tenth of the run (MB resident; workers: each worker's, in order):")
    print("\n".join(series))


if __name__ == "__main__":
    main()
