"""The Batch API against online calls, in the same run, on the wine workload.

2,000 wine rows x 2 dependent chains (a summary, then five features of it)
against the simulator in its own process: once online (paced to
``--rpm``, ``--latency`` per call), once with ``batch=True`` (each batch in
progress for ``--batch-delay`` seconds). Reported: cost (batch / online),
online chat requests in batch mode, batches and rounds, wall time against
the bound of 2 batch delays (+ validation and finalizing) + polling
overhead, and whether both frames have the same columns, dtypes and values
(cost aside).

Targets (issue 12): cost <= 0.55x, 0 online requests, 2 rounds, wall <= 2
batch delays + polling overhead, identical columns and dtypes. The client's
own work (LangChain building each request and parsing each answer, about
8 ms per call here, the same online) cannot overlap a round it feeds: it is
measured on batches that take no time and counted in the bound.

Partitions run as dask schedules them, and each submits its own batches:
with the threaded scheduler and more partitions than threads, rounds queue
behind each other. Here the frame has as many partitions as the scheduler
has threads (``--partitions``, default 2).

    python -m benchmarks.batch --input ../shared/data/wine_reviews_sample.csv
"""

from __future__ import annotations

import argparse
import time

import dask.dataframe as dd
import pandas as pd

import dask_llm
from benchmarks._common import reset, simulator_process, stats, table
from benchmarks.rate_limited import load
from dask_llm.demo import make_chains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="wine reviews CSV (default: the demo data)")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch-delay", type=float, default=10.0)
    parser.add_argument("--poll", type=float, default=0.5, help="longest seconds between polls")
    parser.add_argument("--rpm", type=float, default=30_000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--scheduler", default="threads", choices=["threads", "processes"])
    args = parser.parse_args()

    frame = load(args.input, args.rows)
    ddf = dd.from_pandas(frame, npartitions=args.partitions)
    validation, finalize = 0.5, 0.5
    sim_args = [
        *("--latency", str(args.latency), "--rpm", str(int(args.rpm))),
        *("--batch-delay", str(args.batch_delay)),
        *("--batch-validation-delay", str(validation), "--batch-finalize-delay", str(finalize)),
    ]
    # The client's own work (building 4,000 requests, parsing 4,000 answers through
    # LangChain) is the same in both modes; it is measured with batches that take
    # no time, so the wall time can be split into waiting and working.
    zero = [
        *("--batch-delay", "0", "--batch-validation-delay", "0"),
        *("--batch-finalize-delay", "0"),
    ]
    with simulator_process(*zero, priority=True) as url:
        start = time.perf_counter()
        ddf.llm.enrich(
            make_chains("gpt-4o-mini", url),
            cache=False,
            progress=False,
            batch=dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.05),
        ).compute(scheduler=args.scheduler, num_workers=args.partitions)
        work_s = time.perf_counter() - start
    with simulator_process(*sim_args, priority=True) as url:
        chains = make_chains("gpt-4o-mini", url)
        start = time.perf_counter()
        online = ddf.llm.enrich(chains, cache=False, progress=False, rpm=args.rpm).compute(
            scheduler=args.scheduler, num_workers=args.partitions
        )
        online_s = time.perf_counter() - start
        online_requests = stats(url)["requests"]
        reset(url)

        policy = dask_llm.BatchPolicy(poll_initial=min(0.5, args.poll), poll_max=args.poll)
        start = time.perf_counter()
        batched = ddf.llm.enrich(chains, cache=False, progress=False, batch=policy).compute(
            scheduler=args.scheduler, num_workers=args.partitions
        )
        batch_s = time.perf_counter() - start
        summary = dask_llm.last_run()
        sim = stats(url)

    same = [c for c in online.columns if c != "llm_cost_usd"]
    identical = (
        list(online.columns) == list(batched.columns)
        and (online.dtypes == batched.dtypes).all()
        and online[same].equals(batched[same])
    )
    cost_ratio = batched["llm_cost_usd"].sum() / online["llm_cost_usd"].sum()
    batches = sim["batches_created"]
    rounds = batches / args.partitions
    waits = 2 * (validation + args.batch_delay + finalize)
    bound = waits + work_s
    rows = [
        ("online", f"{online_s:.1f}", str(online_requests), "-", "-", "1.00x", "-"),
        (
            "batch",
            f"{batch_s:.1f}",
            str(sim["requests"]),
            str(batches),
            f"{rounds:g}",
            f"{cost_ratio:.3f}x",
            f"{batch_s / bound:.2f}x",
        ),
    ]
    print(
        f"{len(frame):,} wine rows x 2 dependent chains, {args.partitions} partitions; "
        f"batch delay {args.batch_delay:g} s (+{validation:g} s validating, +{finalize:g} s "
        f"finalizing), polls every <= {args.poll:g} s; online at {args.rpm:,.0f} rpm, "
        f"{args.latency:g} s per call"
    )
    print(
        table(
            rows,
            ("mode", "wall s", "online requests", "batches", "rounds", "cost", "wall / bound"),
        )
    )
    print(
        f"bound = 2 x (validating + in progress + finalizing) + the client's work = "
        f"{waits:.1f} + {work_s:.1f} = {bound:.1f} s (the work: the same job on batches that "
        "take no time); polling overhead = wall - bound = "
        f"{batch_s - bound:+.1f} s"
    )
    print(
        f"batch lines: {sim['batch_lines_submitted']:,} submitted, {sim['batch_lines_ok']:,} ok, "
        f"{sim['batch_duplicate_lines']} duplicated"
    )
    print(f"same columns, dtypes and values (cost aside): {identical}")
    print(f"last_run(): {summary}")
    if not identical:
        diff = pd.concat([online[same], batched[same]], keys=["online", "batch"], axis=1)
        print(diff.head())


if __name__ == "__main__":
    main()
