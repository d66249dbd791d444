"""Out-of-core: memory stays flat as the input grows.

Synthetic reviews are written to CSV files, read back by Dask in partitions
of about 2,000 rows, enriched with one chain (zero-latency simulator in its
own process) and written to Parquet. Each size runs in a fresh process that
reports its peak RSS. Target: peak RSS at 40,000 rows <= 1.3x at 10,000.

    python benchmarks/out_of_core.py [--sizes 10000 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks._common import simulator_process, table

WORDS = [
    "plum",
    "cherry",
    "cedar",
    "graphite",
    "cassis",
    "violet",
    "tar",
    "rose",
    "leather",
    "tobacco",
    "saline",
    "citrus",
]


def make_csv(directory: str, rows: int) -> str:
    import pandas as pd

    os.makedirs(directory, exist_ok=True)
    per_file = 5000
    for k in range(0, rows, per_file):
        n = min(per_file, rows - k)
        pd.DataFrame(
            {
                "id": range(k, k + n),
                "description": [
                    f"Review {i}: " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(1, 25))
                    for i in range(k, k + n)
                ],
                "points": [80 + i % 20 for i in range(k, k + n)],
            }
        ).to_csv(os.path.join(directory, f"part-{k // per_file:04d}.csv"), index=False)
    return os.path.join(directory, "part-*.csv")


def child(url: str, pattern: str, output: str, cache: str) -> None:
    import dask.dataframe as dd
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    import dask_llm  # noqa: F401

    chain = ChatPromptTemplate.from_template("One flavour in {description}") | ChatOpenAI(
        model="gpt-4o-mini", base_url=url
    )
    start = time.perf_counter()
    ddf = dd.read_csv(pattern, blocksize="300KB")
    ddf.llm.enrich({"flavour": chain}, cache=cache, progress=False).to_parquet(output)
    took = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024, "seconds": took, "partitions": ddf.npartitions}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    tmp = tempfile.mkdtemp(prefix="dask-llm-ooc-")
    rows = []
    with simulator_process() as url:
        for size in args.sizes:
            pattern = make_csv(os.path.join(tmp, f"in-{size}"), size)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.out_of_core",
                    "--child",
                    url,
                    pattern,
                    os.path.join(tmp, f"out-{size}"),
                    os.path.join(tmp, f"cache-{size}.sqlite"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((size, result))
    base = rows[0][1]["peak_mib"]
    print(
        table(
            [
                (
                    f"{size:,}",
                    str(r["partitions"]),
                    f"{r['seconds']:.1f}",
                    f"{r['peak_mib']:.0f}",
                    f"{r['peak_mib'] / base:.2f}",
                )
                for size, r in rows
            ],
            ("rows", "partitions", "seconds", "peak RSS MiB", f"vs {rows[0][0]:,}"),
        )
    )
    ratio = rows[-1][1]["peak_mib"] / base
    print(
        f"\npeak RSS {rows[-1][0]:,} / {rows[0][0]:,} rows = {ratio:.2f} "
        f"(target <= 1.3: {'MET' if ratio <= 1.3 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
