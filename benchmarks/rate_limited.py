"""Rate-limited workload: saturate the provider's limit without losing rows.

1,000 wine reviews x 2 dependent chains against the simulator at 0.5 s latency
and 3,000 requests/minute (enforced, as OpenAI does, in 1 s slices). The bound
is 2,000 calls / 50 per s = 40 s. Peers use the openai SDK's default retries
(2, honouring Retry-After); dask-llm turns those off and retries itself.

    python benchmarks/rate_limited.py --input ../shared/data/wine_reviews_sample.csv
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import dask.dataframe as dd
import openai
import pandas as pd
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

import dask_llm  # noqa: F401  (registers the .llm accessor)
from benchmarks._common import reset, simulator_process, stats, table
from dask_llm.demo import make_chains

RPM = 3000


def load(path: str | None, n: int) -> pd.DataFrame:
    from importlib import resources

    source = path or str(resources.files("dask_llm") / "data" / "wine_reviews_demo.csv")
    frame = pd.read_csv(source)[["description", "title", "country"]].dropna()
    while len(frame) < n:  # the shipped sample is small: vary it to size
        more = frame.copy()
        more["description"] = more["description"] + f" ({len(frame)})"
        frame = pd.concat([frame, more])
    return frame.head(n).reset_index(drop=True)


def peer(url: str, run: Callable[[Any, Any, list[dict]], Any], records: list[dict]) -> int:
    """Run a peer on its own loop with its own aiohttp client; return rows lost."""

    async def main() -> int:
        http = openai.DefaultAioHttpClient()
        c1, c2 = (c.runnable for c in make_chains("gpt-4o-mini", url, http_async_client=http))
        try:
            return await run(c1, c2, records)
        finally:
            await http.aclose()

    return asyncio.run(main())


def second(first: Any, r: dict) -> dict:
    return {"title": r["title"], "country": r["country"], "summary": first.summary}


def abatch(concurrency: int) -> Callable[..., Any]:
    async def run(c1: Any, c2: Any, records: list[dict]) -> int:
        composed = (
            RunnablePassthrough.assign(first=c1)
            | RunnableLambda(lambda d: second(d["first"], d))
            | c2
        )
        out = await composed.abatch(
            records, config={"max_concurrency": concurrency}, return_exceptions=True
        )
        return sum(isinstance(o, Exception) for o in out)

    return run


async def article(c1: Any, c2: Any, records: list[dict]) -> int:
    firsts = await asyncio.gather(
        *(c1.ainvoke({"description": r["description"]}) for r in records), return_exceptions=True
    )
    ok = [(r, f) for r, f in zip(records, firsts, strict=True) if not isinstance(f, Exception)]
    seconds = await asyncio.gather(
        *(c2.ainvoke(second(f, r)) for r, f in ok), return_exceptions=True
    )
    return len(records) - len(ok) + sum(isinstance(s, Exception) for s in seconds)


def pipeline(concurrency: int) -> Callable[..., Any]:
    async def run(c1: Any, c2: Any, records: list[dict]) -> int:
        sem = asyncio.Semaphore(concurrency)

        async def row(r: dict) -> bool:
            async with sem:
                try:
                    f = await c1.ainvoke({"description": r["description"]})
                    await c2.ainvoke(second(f, r))
                    return True
                except Exception:
                    return False

        done = await asyncio.gather(*(row(r) for r in records))
        return done.count(False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", help="CSV with description, title, country")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--only", help="comma-separated subset of approaches to run")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    frame = load(args.input, args.rows)
    records = frame.to_dict("records")
    bound = 2 * len(frame) / (RPM / 60)
    results = []
    sim = ("--latency", "0.5", "--rpm", str(RPM), "--seed", "1")
    with simulator_process(*sim) as url:
        approaches: list[tuple[str, Callable[[], int]]] = [
            ("LangChain abatch, max_concurrency=64", lambda: peer(url, abatch(64), records)),
            ("LangChain abatch, max_concurrency=16", lambda: peer(url, abatch(16), records)),
            ("article-style asyncio.gather", lambda: peer(url, article, records)),
            ("bounded per-row pipeline, 32", lambda: peer(url, pipeline(32), records)),
        ]

        def ours(**options: Any) -> int:
            chains = make_chains("gpt-4o-mini", url)
            ddf = dd.from_pandas(frame, npartitions=args.partitions)
            out = ddf.llm.enrich(chains, cache=False, **options).compute()
            return int(out["llm_error"].notna().sum())

        approaches += [
            ("dask-llm enrich (defaults)", lambda: ours()),
            (f"dask-llm enrich (rpm={RPM})", lambda: ours(rpm=RPM)),
        ]
        wanted = set(args.only.split(",")) if args.only else None
        for name, run in approaches:
            if wanted and not any(w in name for w in wanted):
                continue
            time.sleep(1.5)  # let the previous approach's window drain
            reset(url)
            start = time.perf_counter()
            lost = run()
            wall = time.perf_counter() - start
            s = stats(url)
            results.append(
                (
                    name,
                    f"{wall:.1f}",
                    f"{wall / bound:.2f}x",
                    str(lost),
                    str(s["rate_limited"]),
                    str(s["peak_requests_60s"]),
                )
            )
            print(f"  {name}: {wall:.1f} s, {lost} rows lost", flush=True)
    print(f"\n{len(frame)} rows x 2 chains, 0.5 s latency, {RPM} rpm; bound {bound:.0f} s\n")
    print(table(results, ("approach", "wall s", "vs bound", "rows lost", "429s", "peak/60s")))


if __name__ == "__main__":
    main()
