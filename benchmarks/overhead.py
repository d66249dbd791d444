"""Engine overhead: ``enrich`` against a bare ``asyncio.gather`` of ``chain.ainvoke``.

Zero-latency simulator (in its own process), 2,000 rows x 1 chain
(prompt | ChatOpenAI | StrOutputParser), one process, the same aiohttp
transport and concurrency for both. What is left is our per-row cost: input
resolution, throttle, retries wrapper, usage callback, result assembly.
Also: enrich on 2 worker processes against 1 (dask's process pool).

    python benchmarks/overhead.py [--rows 2000] [--concurrency 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import dask.dataframe as dd
import openai
import pandas as pd
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import dask_llm  # noqa: F401  (registers the .llm accessor)
from benchmarks._common import median, simulator_process, table

PROMPT = ChatPromptTemplate.from_template("Name one flavour in: {description}")


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"description": [f"review {i}: cherry, oak, long finish" for i in range(n)]}
    )


def bare(url: str, df: pd.DataFrame, concurrency: int) -> float:
    async def run() -> None:
        http = openai.DefaultAioHttpClient()
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=url, http_async_client=http, max_retries=0)
        chain = PROMPT | llm | StrOutputParser()
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> str:
            async with sem:
                return await chain.ainvoke({"description": text})

        try:
            await asyncio.gather(*(one(t) for t in df["description"]))
        finally:
            await http.aclose()

    start = time.perf_counter()
    asyncio.run(run())
    return len(df) / (time.perf_counter() - start)


def ours(url: str, df: pd.DataFrame, concurrency: int) -> float:
    chain = PROMPT | ChatOpenAI(model="gpt-4o-mini", base_url=url) | StrOutputParser()
    start = time.perf_counter()
    out = df.llm.enrich({"flavour": chain}, max_concurrency=concurrency, cache=False)
    took = time.perf_counter() - start
    assert out["llm_error"].isna().all()
    return len(df) / took


def processes(url: str, df: pd.DataFrame, workers: int, concurrency: int) -> float:
    chain = PROMPT | ChatOpenAI(model="gpt-4o-mini", base_url=url) | StrOutputParser()
    ddf = dd.from_pandas(df, npartitions=4 * workers)
    out = ddf.llm.enrich({"flavour": chain}, max_concurrency=concurrency, cache=False)
    start = time.perf_counter()
    result = out.compute(scheduler="processes", num_workers=workers)
    took = time.perf_counter() - start
    assert result["llm_error"].isna().all()
    return len(df) / took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    df = frame(args.rows)
    with simulator_process() as url:
        bare(url, df.head(200), args.concurrency)  # warm up both paths
        ours(url, df.head(200), args.concurrency)
        b, o = [], []
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            b.append(bare(url, df, args.concurrency))
            o.append(ours(url, df, args.concurrency))
        p1 = median([processes(url, df, 1, args.concurrency) for _ in range(args.repeat)])
        p2 = median([processes(url, df, 2, args.concurrency) for _ in range(args.repeat)])
    mb, mo = median(b), median(o)
    print(
        f"{args.rows} rows x 1 chain, zero-latency simulator, {args.concurrency} in flight, "
        f"median of {args.repeat}\n"
    )
    print(
        table(
            [
                ("bare asyncio.gather(chain.ainvoke)", f"{mb:.0f}", "1.00"),
                ("dask-llm enrich (pandas, 1 loop)", f"{mo:.0f}", f"{mo / mb:.2f}"),
                ("enrich, dask processes, 1 worker", f"{p1:.0f}", f"{p1 / mb:.2f}"),
                ("enrich, dask processes, 2 workers", f"{p2:.0f}", f"{p2 / mb:.2f}"),
            ],
            ("approach", "calls/s", "vs bare"),
        )
    )
    print(
        f"\nenrich / bare = {mo / mb:.2f} "
        f"(target >= 0.90: {'MET' if mo / mb >= 0.9 else 'MISSED'}); "
        f"2 processes / 1 process = {p2 / p1:.2f}"
    )


if __name__ == "__main__":
    main()
