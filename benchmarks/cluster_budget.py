"""One ledger for the job against 0.1's even split: skew, scale-up, stray 429s.

The wine workload (2 dependent chains) against the simulator in its own
process, enforcing a strict sliding 1-second window (``--limit-mode
sliding``) at 100 requests/s (``rpm=6000``, told to the job) with a 1 s
median latency. Bound = calls / rate + 2 latencies (the dependent chain's
last answers). Each configuration runs with this tree's code and with 0.1's
(the commit this work started from, checked out into a temporary worktree and
put first on ``PYTHONPATH`` of the job's process), against the same
simulator, in the same run:

* 4,000 rows x 2 chains on 8 partitions, one holding 60% of the rows, then
  even partitions: on the threaded scheduler, and a LocalCluster of 2 and of
  4 worker processes. Reported: wall / bound and 429s (share of requests).
  Targets: <= 1.05x, 429s <= 0.5%.
* scale-up: a LocalCluster of 1 worker scaled to 3 after 15 s: wall / bound
  and the peak over any sliding second (target <= 1.10x, peak <= 100).
* capped: the skewed job (2,000 rows) on a LocalCluster of 4 where one
  process cannot send the whole limit (``max_concurrency=24`` at 1 s latency,
  about 24 requests/s of 40 allowed, ``rpm=2400``): the big partition's process
  is the job's critical path, and is lent its part of the work from the start.
* stray 429s: 3,000 calls against a token bucket at 3,000 rpm that also
  answers 5% of requests with 429s that are not the quota's (no rate-limit
  headers): calls/s against the limit, told and learned, over the whole run
  and sustained (the steady seconds between start-up and the last answers;
  target >= 90%).

``--ceiling`` also runs each configuration against a simulator without a
limit (same latency): what the client itself can do on this machine. On two
cores the client's own work (LangChain and the SDK, 8-16 ms of CPU a call)
is often the ceiling at 100 requests/s, and wall / max(bound, no limit) is
what the pacing costs. ``--baseline REV`` compares with another commit
(``HEAD`` to measure an uncommitted change) instead of 0.1.

    python -m benchmarks.cluster_budget --input ../shared/data/wine_reviews_sample.csv --ceiling
    python -m benchmarks.cluster_budget --rows 1000   # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from benchmarks._common import reset, simulator_process, stats, table

CAPPED_ROWS = 2000  # 4,000 calls at 40/s: 100 s
CAPPED = {"skew": True, "rpm": 2400, "workers": 4, "max_concurrency": 24, "rows": CAPPED_ROWS}
STRAY_ROWS = 1500  # 3,000 calls: a minute at the limit, so start-up and tail weigh little
BASELINE = "0f4678b"  # 0.1: rpm/tpm split evenly across processes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: The columns of the comparison tables: this tree's run, the baseline's, and the ratio.
HEADERS = (
    "run",
    "wall/bound",
    "429s",
    "peak/s",
    "0.1 wall/bound",
    "0.1 429s",
    "0.1 peak/s",
    "wall vs 0.1",
)


def job(args: argparse.Namespace) -> None:
    """One configuration, in a process of its own (its PYTHONPATH picks the code)."""
    import dask.dataframe as dd
    import pandas as pd

    import dask_llm
    from benchmarks.rate_limited import load
    from dask_llm.demo import make_chains

    frame = load(args.input, args.rows)
    if args.skew:
        big = int(len(frame) * 0.6)
        rest = len(frame) - big
        sizes = [big] + [rest // 7 + (1 if i < rest % 7 else 0) for i in range(7)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        parts = [frame.iloc[a:b] for a, b in itertools.pairwise(bounds)]
        ddf = dd.concat([dd.from_pandas(p, npartitions=1) for p in parts])
    else:
        ddf = dd.from_pandas(frame, npartitions=8)
    options: dict[str, Any] = {"cache": False, "progress": False}
    if args.rpm:
        options["rpm"] = args.rpm
    if args.max_concurrency:
        options["max_concurrency"] = args.max_concurrency
    out = ddf.llm.enrich(make_chains("gpt-4o-mini", args.job), **options)
    start = time.perf_counter()
    if args.workers:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=args.threads,
                dashboard_address=":0",
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(args.workers)
            # A user's cluster is up, and has imported what jobs use, before this job.
            client.run(_warm)
            start = time.perf_counter()
            future = client.compute(out)
            if args.scale_to:
                time.sleep(args.scale_after)
                cluster.scale(args.scale_to)
            result = future.result()
            wall = time.perf_counter() - start  # not the cluster's shutdown
    else:
        result = out.compute(scheduler="threads", num_workers=8)
        wall = time.perf_counter() - start
    failed = int(result["llm_error"].notna().sum())
    print(json.dumps({"wall": wall, "rows": len(result), "failed": failed}))
    del pd, dask_llm


def _warm() -> None:
    import dask_llm.demo  # noqa: F401  (and LangChain, the openai SDK)


def run_job(url: str, code: str, args: argparse.Namespace, **config: Any) -> dict[str, Any]:
    """One configuration of ``code`` against a freshly reset simulator, with its stats."""
    reset(url)
    result = job_process(url, code, args, **config)
    result.update(stats(url))
    return result


def job_process(url: str, code: str, args: argparse.Namespace, **config: Any) -> dict[str, Any]:
    """Run one configuration of ``code`` in a process of its own; its wall, rows, failed."""
    # By path: with 0.1 first on the path, "benchmarks" is 0.1's package, without this file.
    cmd = [sys.executable, os.path.abspath(__file__), "--job", url]
    cmd += ["--rows", str(config.get("rows", args.rows))]
    if args.input:
        cmd += ["--input", args.input]
    for flag in ("skew", "rpm", "workers", "threads", "scale_to", "scale_after", "max_concurrency"):
        value = config.get(flag)
        if value:
            cmd += [f"--{flag.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return run_in_tree(cmd, code=code, timeout_s=3600)


def run_in_tree(
    cmd: list[str], *, code: str, timeout_s: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` (a benchmark's job, by path) with ``code``'s tree first on the path and
    this one after it, and ``env`` on top of this process's; the JSON of its last line."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([code, ROOT]), **(env or {})}
    full_env.setdefault("OPENAI_API_KEY", "sk-benchmark")
    done = subprocess.run(
        cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def baseline_tree(rev: str = BASELINE) -> Iterator[str]:
    """0.1's code (or ``rev``'s), checked out next to this tree for the length of the run."""
    where = tempfile.mkdtemp(prefix="dask-llm-baseline-")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "--detach", where, rev],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", ROOT, "worktree", "remove", "--force", where],
            check=False,
            capture_output=True,
        )


def describe(result: dict[str, Any], bound: float) -> tuple[str, str, str]:
    share = result["rate_limited"] / max(1, result["requests"])
    return (
        f"{result['wall'] / bound:.3f}x",
        f"{result['rate_limited']} ({share:.1%})",
        str(result["peak_requests_1s"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", default=None)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--only", default="", help="comma-separated: skew,even,scale,capped,stray")
    parser.add_argument(
        "--new-only", action="store_true", help="skip 0.1's runs (a quicker look while tuning)"
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="the commit to compare with (default: 0.1's); e.g. HEAD to measure a change",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also run each configuration against a simulator without a limit: what the "
        "client itself can do on this machine, the floor under any paced wall time",
    )
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skew", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rpm", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max-concurrency", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scale-to", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scale-after", type=float, default=15.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    only = set(filter(None, args.only.split(","))) or {"skew", "even", "scale", "capped", "stray"}
    rate, latency = 100.0, 1.0
    bound = 2 * args.rows / rate + 2 * latency
    rows: list[tuple[str, ...]] = []

    def both(name: str, **config: Any) -> None:
        new = run_job(url, ROOT, args, **config)
        old = new if args.new_only else run_job(url, old_tree, args, **config)
        assert new["failed"] == 0, new
        n, o = describe(new, bound), describe(old, bound)
        ratio = new["wall"] / old["wall"]
        row = (name, *n, *o, f"{ratio:.2f}x")
        if args.ceiling:
            free = run_job(open_url, ROOT, args, **{**config, "rpm": None})
            floor = max(bound, free["wall"])
            row += (f"{free['wall'] / bound:.2f}x", f"{new['wall'] / floor:.2f}x")
        rows.append(row)
        print(rows[-1], flush=True)

    with baseline_tree(args.baseline) as old_tree:
        sim_args = ["--latency", str(latency), "--jitter", "0.2", "--rpm", "6000"]
        with (
            simulator_process(*sim_args, "--limit-mode", "sliding", priority=True) as url,
            simulator_process(*sim_args[:4], priority=True) as open_url,
        ):
            if "skew" in only:
                both("skewed, threads", skew=True, rpm=6000)
                both("skewed, LocalCluster 2", skew=True, rpm=6000, workers=2)
                both("skewed, LocalCluster 4", skew=True, rpm=6000, workers=4)
            if "even" in only:
                both("even, threads", rpm=6000)
                both("even, LocalCluster 2", rpm=6000, workers=2)
                both("even, LocalCluster 4", rpm=6000, workers=4)
            if "scale" in only:
                both("scale-up 1 -> 3 workers", rpm=6000, workers=1, scale_to=3, scale_after=15)
        if rows:
            print(
                f"\n{args.rows:,} rows x 2 chains, strict sliding window at 100 req/s (rpm=6000 "
                f"told), 1 s median latency: bound {bound:.0f} s\n"
            )
            print(
                table(
                    rows,
                    (
                        *HEADERS,
                        *(
                            ("no limit: wall/bound", "wall/max(bound, no limit)")
                            if args.ceiling
                            else ()
                        ),
                    ),
                )
            )
        if "capped" in only:
            # One process cannot send the whole limit here (24 rows in flight at 1 s
            # latency: about 24 requests/s of the 40 allowed). Split evenly, the big
            # partition's process gets a quarter while the others have work, then
            # runs alone at its 24/s; lent by its part of the job's work, from the start.
            capped = ["--latency", str(latency), "--jitter", "0.2", "--rpm", "2400"]
            with simulator_process(*capped, "--limit-mode", "sliding", priority=True) as url:
                rows_capped = CAPPED_ROWS
                new = run_job(url, ROOT, args, **CAPPED)
                old = new if args.new_only else run_job(url, old_tree, args, **CAPPED)
            capped_bound = 2 * rows_capped / 40.0 + 2 * latency
            n, o = describe(new, capped_bound), describe(old, capped_bound)
            print(
                f"\n{rows_capped:,} rows x 2 chains, 60% in 1 of 8 partitions, LocalCluster of 4, "
                f"max_concurrency=24, strict sliding window at 40 req/s (rpm=2400 told): "
                f"bound {capped_bound:.0f} s\n"
            )
            print(
                table(
                    [("skewed, 24 in flight", *n, *o, f"{new['wall'] / old['wall']:.2f}x")],
                    HEADERS,
                )
            )
        if "stray" in only:
            stray_rows = []
            stray = ["--latency", "0.5", "--rpm", "3000", "--limit-mode", "bucket"]
            with simulator_process(*stray, "--spurious-429", "0.05", priority=True) as url:
                for told in (3000, None):
                    label = "rpm=3000 told" if told else "limit learned"
                    results = {}
                    for name, code in (("new", ROOT), ("0.1", old_tree)):
                        if name == "0.1" and args.new_only:
                            results[name] = results["new"]
                            continue
                        r = run_job(url, code, args, rows=STRAY_ROWS, rpm=told)
                        results[name] = (
                            r["successes"] / r["wall"],
                            steady(r["series"]),
                            r["faults"].get("spurious_429", 0),
                        )
                    (new_rate, new_steady, strays), old = results["new"], results["0.1"]
                    stray_rows.append(
                        (
                            label,
                            f"{new_rate:.1f}/s ({new_rate / 50:.0%})",
                            f"{new_steady:.1f}/s ({new_steady / 50:.0%})",
                            f"{old[0]:.1f}/s ({old[0] / 50:.0%})",
                            f"{old[1]:.1f}/s ({old[1] / 50:.0%})",
                            str(strays),
                        )
                    )
                    print(stray_rows[-1], flush=True)
            print(
                f"\n{2 * STRAY_ROWS:,} calls, token bucket at 3,000 rpm (50/s), 5% stray 429s, "
                "0.5 s latency. Whole run: successes / wall (the job's start-up, ~0.7 s, and "
                "its last answers and retries count); sustained: mean successes/s over the "
                "seconds between the first and the last second with requests.\n"
            )
            print(
                table(
                    stray_rows,
                    (
                        "limit",
                        "whole run (of 50/s)",
                        "sustained",
                        "0.1 whole run",
                        "0.1 sustained",
                        "stray 429s",
                    ),
                )
            )


def steady(series: list[dict[str, int]]) -> float:
    """Mean successes/s strictly between the first and the last second with requests."""
    busy = [row["t"] for row in series if row["requests"]]
    middle = [row["successes"] for row in series if busy[0] < row["t"] < busy[-1]]
    return sum(middle) / max(1, len(middle))


if __name__ == "__main__":
    main()
