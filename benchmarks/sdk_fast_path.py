"""The client's CPU per call with the SDK fast path (``_sdk``) against the SDK's own path.

The wine workload (2 dependent structured chains, ``dask_llm.demo``) on one
process (the pandas accessor), against the simulator in its own process with
zero latency, so that the client's own work is all there is to measure. The
two paths alternate (``DASK_LLM_SDK_FAST_PATH=0`` for the SDK's), in the same
run; medians of ``--repeat`` runs each. Printed: calls/s, CPU milliseconds
per call (this process, all threads) and the ratios.

    python -m benchmarks.sdk_fast_path --input ../shared/data/wine_reviews_sample.csv
    python -m benchmarks.sdk_fast_path --rows 300 --repeat 2   # the project's sample
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks._common import median, simulator_process, table


def run(url: str, frame: object, *, fast: bool) -> tuple[float, float]:
    """One enrich of ``frame``; returns (calls/s, CPU ms per call)."""
    import dask_llm  # noqa: F401  (registers the .llm accessor)
    from dask_llm.demo import make_chains

    os.environ["DASK_LLM_SDK_FAST_PATH"] = "1" if fast else "0"
    chains = make_chains("gpt-4o-mini", url)
    start, cpu = time.perf_counter(), time.process_time()
    out = frame.llm.enrich(chains, cache=False, progress=False)  # type: ignore[attr-defined]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head()
    calls = 2 * len(out)
    return calls / wall, 1000 * cpu / calls


def main() -> None:
    from benchmarks.rate_limited import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="a wine reviews CSV (default: the sample)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    frame = load(args.input, args.rows)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with simulator_process("--latency", "0", priority=True) as url:
        run(url, frame.head(20), fast=True)  # imports, connections, schemas
        run(url, frame.head(20), fast=False)
        for i in range(args.repeat):
            for fast in (i % 2 == 0, i % 2 != 0):  # alternate which goes first
                results[fast].append(run(url, frame, fast=fast))
    os.environ.pop("DASK_LLM_SDK_FAST_PATH", None)
    rate = {k: median([r for r, _ in v]) for k, v in results.items()}
    cpu = {k: median([c for _, c in v]) for k, v in results.items()}
    rows = [
        ("SDK's own path", f"{rate[False]:.0f}", f"{cpu[False]:.2f}", "1.00x", "1.00x"),
        (
            "fast path",
            f"{rate[True]:.0f}",
            f"{cpu[True]:.2f}",
            f"{rate[True] / rate[False]:.2f}x",
            f"{cpu[True] / cpu[False]:.2f}x",
        ),
    ]
    print(
        f"{len(frame)} wine rows x 2 structured chains, zero latency, one process; "
        f"medians of {args.repeat} runs each, alternating"
    )
    print(table(rows, ("path", "calls/s", "CPU ms/call", "calls/s vs SDK", "CPU vs SDK")))


if __name__ == "__main__":
    main()
