"""A fully cached rerun: how fast the cache answers, by level.

The wine workload (2 dependent chains, structured output) and a text chain
(prompt | model | StrOutputParser) run once against the simulator to fill a
cache, then again with everything cached. Reported in rows per second of the
rerun (median of 3):

* **row memo**: the chains as they are (complete fingerprints): the cache
  answers each row's columns without running LangChain;
* **request cache only**: the same chains with a Python step appended (an
  identity lambda), which makes them opaque, so every row runs the chain and
  its requests are answered from the cache.

Target (issue 9): >= 10,000 rows/s for the row memo; 0.1's fingerprint-only
cache read 31,000 rows/s (and served stale answers for opaque chains).

    python benchmarks/cached_rerun.py --input ../shared/data/wine_reviews_sample.csv --rows 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import dask.dataframe as dd
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

import dask_llm
from benchmarks._common import median, simulator_process, stats, table
from benchmarks.rate_limited import load
from dask_llm.demo import make_chains


def text_chain(url: str) -> list[dask_llm.Chain]:
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=url)
    prompt = ChatPromptTemplate.from_template("One sentence on: {description}")
    return [dask_llm.Chain(prompt | llm | StrOutputParser(), name="note")]


def opaque(chains: list[dask_llm.Chain]) -> list[dask_llm.Chain]:
    """The same chains with an identity step of Python code: no row memo."""
    out = []
    for c in chains:
        spec = c.output_columns()
        outputs = list(spec.fields) if not spec.scalar else c.name
        out.append(
            dask_llm.Chain(c.runnable | RunnableLambda(lambda x: x), outputs=outputs, name=c.name)
        )
    return out


def rerun(frame: object, chains: list[dask_llm.Chain], cache: str, partitions: int) -> float:
    ddf = dd.from_pandas(frame, npartitions=partitions)
    start = time.perf_counter()
    ddf.llm.enrich(chains, cache=cache, progress=False).compute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", default=None)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    frame = load(args.input, args.rows)
    rows = []
    with simulator_process() as url:
        for name, chains in (
            ("wine: 2 structured chains", make_chains("gpt-4o-mini", url)),
            ("prompt | model | parser", text_chain(url)),
        ):
            cache = os.path.join(tempfile.mkdtemp(), "cache.sqlite")
            fill = rerun(frame, chains, cache, args.partitions)
            paid = stats(url)["successes"]
            memo = median([rerun(frame, chains, cache, args.partitions) for _ in range(3)])
            before = stats(url)["requests"]
            slow = opaque(chains)
            rerun(frame.head(1), slow, cache, 1)  # warm
            requests_only = rerun(frame, slow, cache, args.partitions)
            assert stats(url)["requests"] == before, "a cached rerun sent requests"
            rows.append(
                (
                    name,
                    f"{len(frame) / fill:,.0f}",
                    str(paid),
                    f"{len(frame) / memo:,.0f}",
                    f"{len(frame) / memo / 10_000:.2f}x",
                    f"{len(frame) / requests_only:,.0f}",
                )
            )
            print(rows[-1], flush=True)
    print(f"\n{len(frame):,} rows, {args.partitions} partitions, threaded scheduler, rows/s\n")
    print(
        table(
            rows,
            (
                "chains",
                "first run",
                "requests",
                "rerun: row memo",
                "vs 10,000 target",
                "rerun: request cache only",
            ),
        )
    )


if __name__ == "__main__":
    main()
