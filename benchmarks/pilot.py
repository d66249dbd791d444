"""The pilot's projection against the full run it projects, on real wine reviews.

``ddf.llm.pilot(chains, n=200)`` runs a stratified sample of the frame and
projects the full job's cost and wall time; then the full job runs (no cache,
so every row is paid) under the same limits, and the table compares the
projection with what was measured in the same run: the ratio of projected to
real cost (target: within 10%) and of projected to real wall time. The full
run's report (``last_run().report``) is written with the pilot as its
estimate; ``--png`` saves its plots too (``docs/report.png`` comes from here).

The simulator gives realistic trouble: lognormal latency, 1% 500s, 2%
overloaded 429s, a quota of ``--rpm`` requests a minute.

    python benchmarks/pilot.py --input ../shared/data/wine_reviews_sample.csv --rows 2000
"""

from __future__ import annotations

import argparse
import time

import dask.dataframe as dd

import dask_llm
from benchmarks._common import simulator_process, table
from benchmarks.rate_limited import load
from dask_llm.demo import make_chains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", help="wine reviews CSV (default: the shipped demo rows)")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--n", type=int, default=200, help="rows in the pilot")
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--budget", type=float, default=None, help="budget_usd of the full run")
    parser.add_argument("--report", default="pilot-report.html")
    parser.add_argument("--png", default=None, help="also save the report's plots as a PNG")
    args = parser.parse_args()

    frame = dd.from_pandas(load(args.input, args.rows), npartitions=8)
    sim_args = ["--latency", "0.3", "--jitter", "0.5", "--rpm", str(args.rpm)]
    sim_args += ["--error-rate", "0.01", "--spurious-429", "0.02"]
    with simulator_process(*sim_args, priority=True) as url:
        chains = make_chains("gpt-4o-mini", url)
        started = time.monotonic()
        pilot = frame.llm.pilot(chains, n=args.n, cache=False, rpm=args.rpm)
        pilot_s = time.monotonic() - started
        print(pilot)
        started = time.monotonic()
        out = frame.llm.enrich(
            chains, cache=False, rpm=args.rpm, budget_usd=args.budget, progress=False
        )
        out.compute()
        full_s = time.monotonic() - started
    full = dask_llm.last_run()
    assert full is not None and full.cost_usd is not None
    assert pilot.projected_cost_usd is not None and pilot.projected_cost_interval is not None
    assert pilot.projected_wall_s is not None
    low, high = pilot.projected_cost_interval
    rows = [
        (
            "cost (USD)",
            f"{pilot.projected_cost_usd:.5f} ({low:.5f}-{high:.5f})",
            f"{full.cost_usd:.5f}",
            f"{pilot.projected_cost_usd / full.cost_usd:.3f}",
        ),
        (
            "wall time (s)",
            f"{pilot.projected_wall_s:.1f}",
            f"{full_s:.1f}",
            f"{pilot.projected_wall_s / full_s:.3f}",
        ),
    ]
    print(
        f"{args.rows:,} rows x 2 chains; pilot of {pilot.sample_rows} rows took {pilot_s:.1f} s, "
        f"{pilot_s / full_s:.1%} of the full run"
    )
    print(table(rows, ("", "pilot's projection", "full run", "projected / real")))
    print(full)
    path = full.report(args.report, estimate=pilot)
    print(f"report: {path}")
    if args.png:
        print(f"plots: {full.report(args.png, estimate=pilot)}")


if __name__ == "__main__":
    main()
