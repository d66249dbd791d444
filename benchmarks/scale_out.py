"""Scale-out: a latency-bound workload with a per-worker concurrency cap, 1 vs 2 worker processes.

The simulator answers in 0.5 s; each worker process may have 8 requests in
flight (``max_concurrency=8``), so one process tops out near 16 calls/s and
two should come close to twice that. Target: >= 1.8x.

    python benchmarks/scale_out.py [--rows 400] [--cap 8]
"""

from __future__ import annotations

import argparse
import time

import dask.dataframe as dd
import pandas as pd
from distributed import Client, LocalCluster

import dask_llm
from benchmarks._common import median, simulator_process, table
from tests.chains import text_chain


def run(url: str, workers: int, rows: int, cap: int) -> float:
    df = pd.DataFrame({"description": [f"review {i}: plum, smoke" for i in range(rows)]})
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("dask_llm"))  # warm imports outside the timing
        out = dd.from_pandas(df, npartitions=8).llm.enrich(
            [dask_llm.Chain(text_chain(url), name="word")], max_concurrency=cap, cache=False
        )
        start = time.perf_counter()
        result = client.compute(out).result()
        took = time.perf_counter() - start
    assert result["llm_error"].isna().all()
    return rows / took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with simulator_process("--latency", "0.5") as url:
        one = median([run(url, 1, args.rows, args.cap) for _ in range(args.repeat)])
        two = median([run(url, 2, args.rows, args.cap) for _ in range(args.repeat)])
    print(f"{args.rows} rows, 0.5 s latency, max_concurrency={args.cap} per worker process\n")
    print(
        table(
            [
                ("1 worker process", f"{one:.1f}", "1.00"),
                ("2 worker processes", f"{two:.1f}", f"{two / one:.2f}"),
            ],
            ("cluster", "calls/s", "vs 1"),
        )
    )
    print(f"\n2 / 1 = {two / one:.2f} (target >= 1.8: {'MET' if two / one >= 1.8 else 'MISSED'})")


if __name__ == "__main__":
    main()
