"""The client's CPU per structured call on the compiled path against LangChain's path.

The wine workload (2 structured chains, the second reading the first's
summary, ``dask_llm.demo``) on one process (the pandas accessor), against the
simulator in its own process with zero latency, so that the client's own work
is all there is to measure. Both paths run in the same run, alternating
(``compiled=False`` for LangChain's path; both with the SDK fast path, today's
default); medians of ``--repeat`` runs each. Printed: calls/s, CPU
milliseconds per call (this process, all threads) and the ratios. The issue's
targets: <= 1.0 ms of CPU per call, >= 4x LangChain's calls/s.

    python -m benchmarks.fast_path --input ../shared/data/wine_reviews_sample.csv
    python -m benchmarks.fast_path --rows 300 --repeat 2   # the project's sample
    python -m benchmarks.fast_path --profile compiled.prof  # cProfile of one compiled run
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks._common import median, simulator_process, table


def run(url: str, frame: object, *, compiled: bool) -> tuple[float, float]:
    """One enrich of ``frame``; returns (calls/s, CPU ms per call)."""
    import dask_llm  # noqa: F401  (registers the .llm accessor)
    from dask_llm.demo import make_chains

    chains = make_chains("gpt-4o-mini", url)
    start, cpu = time.perf_counter(), time.process_time()
    out = frame.llm.enrich(  # type: ignore[attr-defined]
        chains, cache=False, progress=False, compiled=compiled
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head()
    calls = 2 * len(out)
    return calls / wall, 1000 * cpu / calls


def main() -> None:
    from benchmarks.rate_limited import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="a wine reviews CSV (default: the sample)")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", default=None, help="write a cProfile of one compiled run")
    args = parser.parse_args()
    frame = load(args.input, args.rows)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with simulator_process("--latency", "0", priority=True) as url:
        run(url, frame.head(20), compiled=True)  # imports, connections, schemas
        run(url, frame.head(20), compiled=False)
        if args.profile:
            import cProfile

            with cProfile.Profile() as profile:
                run(url, frame, compiled=True)
            profile.dump_stats(args.profile)
        for i in range(args.repeat):
            for compiled in (i % 2 == 0, i % 2 != 0):  # alternate which goes first
                results[compiled].append(run(url, frame, compiled=compiled))
    rate = {k: median([r for r, _ in v]) for k, v in results.items()}
    cpu = {k: median([c for _, c in v]) for k, v in results.items()}
    rows = [
        ("LangChain's path", f"{rate[False]:.0f}", f"{cpu[False]:.2f}", "1.00x", "1.00x"),
        (
            "compiled path",
            f"{rate[True]:.0f}",
            f"{cpu[True]:.2f}",
            f"{rate[True] / rate[False]:.2f}x",
            f"{cpu[True] / cpu[False]:.2f}x",
        ),
    ]
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{len(frame)} wine rows x 2 structured chains, zero latency, one process; "
        f"medians of {args.repeat} runs each, alternating; load average {load_avg} "
        f"on {os.cpu_count()} cores"
    )
    print(
        table(rows, ("path", "calls/s", "CPU ms/call", "calls/s vs LangChain", "CPU vs LangChain"))
    )


if __name__ == "__main__":
    main()
