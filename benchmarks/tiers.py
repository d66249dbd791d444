"""Flex processing and prompt-cache pricing against list price, in the same run (issue 27).

Two workloads against the simulator in its own process:

1. **Flex.** Wine rows x 2 dependent chains (a summary, then five features
   of it), paced to ``--rpm``, once at list price and once with
   ``service_tier="flex"`` while the simulator answers ``--unavailable`` of
   the Flex requests with 429 "resource unavailable" (Flex answers are also
   ``--flex-slowdown`` times slower). Targets: every row answered, cost
   0.50x list price, and calls/s at the rate as at list price (those 429s
   are retried and do not slow the pacing).
2. **Prompt caching.** One chain whose prompt is a fixed instruction of
   about 1,500 tokens before the row's text, ``--cache-rows`` rows, at list
   price and by Flex. Target: ``llm_cost_usd`` summed equals the bill
   computed from the simulator's own token counts (prompt, cached,
   completion) within 0.1%; beside it, what the cost column said before
   cached tokens had a price (every prompt token at the input price).
3. **Deadlines.** Wine rows x 2 dependent chains, 2 partitions, once at list
   price (its wall time W), then with three deadlines against a simulator
   whose batches take ``--batch-delay`` seconds: one the Batch API can meet
   (4 W + 3 batch turnarounds: all by batch, ~0.50x), one only Flex can meet
   (W + 4 Flex latencies + 2 s: online by Flex, ~0.50x) and one that needs list
   price for part (W + 1 s: between 0.50x and 1.0x). A fourth has the first
   deadline and the same assumption, against a simulator whose batches take
   ``--slow-batch-delay`` (10x ``--batch-delay`` by default): the plan picks the
   Batch API, the batches' progress shows they cannot make it, and they are
   cancelled early, the rest online (target: by the deadline, between 0.50x and
   1.0x). Each run's wall time is printed against its deadline, and its cost
   against list price.

    python -m benchmarks.tiers --input ../shared/data/wine_reviews_sample.csv
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import dask.dataframe as dd
import pandas as pd
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import dask_llm
from benchmarks._common import reset, simulator_process, stats, table
from benchmarks.rate_limited import load
from dask_llm.core.usage import cost_usd, price_of
from dask_llm.demo import make_chains

MODEL = "gpt-4o-mini"


def instruction(tokens: int = 1500) -> str:
    """A fixed house style guide of about ``tokens`` tokens (4 characters a token)."""
    rules = [
        "name the grape before the region",
        "say how the wine feels before how it tastes",
        "keep fruit descriptors to three at most",
        "never call a wine cheap; say good value instead",
        "use the reviewer's own score words where they fit",
        "mention oak only when the review does",
        "write acidity, tannin and body in that order",
        "end with one word for the finish",
    ]
    lines = ["You are a sommelier writing house tasting notes. Follow every rule."]
    k = 0
    while sum(len(line) + 1 for line in lines) < 4 * tokens:
        lines.append(f"Rule {k + 1}: {rules[k % len(rules)]} (section {k // len(rules) + 1}).")
        k += 1
    return "\n".join(lines)


def instructed_chain(base_url: str) -> list[dask_llm.Chain]:
    prompt = ChatPromptTemplate.from_messages(
        [("system", instruction()), ("human", "Review: {description}\n\nOne sentence, please.")]
    )
    model = ChatOpenAI(model=MODEL, base_url=base_url, temperature=0)
    return [dask_llm.Chain(prompt | model | StrOutputParser(), name="note")]


def run(
    url: str, frame: pd.DataFrame, chains: list[dask_llm.Chain], partitions: int, **options: Any
) -> dict[str, Any]:
    reset(url)
    time.sleep(1.5)  # the previous run's window drains
    reset(url)
    ddf = dd.from_pandas(frame, npartitions=partitions)
    start = time.perf_counter()
    out = ddf.llm.enrich(chains, cache=False, progress=False, **options).compute()
    wall = time.perf_counter() - start
    summary = dask_llm.last_run()
    assert summary is not None
    return {
        "wall": wall,
        "cost": float(out["llm_cost_usd"].sum()),
        "cost_known": bool(out["llm_cost_usd"].notna().all()),
        "answered": int(out["llm_error"].isna().sum()),
        "rows": len(out),
        "summary": summary,
        "server": stats(url),
    }


def bill(server: dict[str, Any], tier: str, *, cached: bool = True) -> float:
    """The provider's bill from the simulator's own counts (``cached=False``: every prompt
    token at the input price, as the cost column said before cached tokens had a price)."""
    price = price_of(MODEL, tier="flex" if tier == "flex" else "default")
    assert price is not None
    return cost_usd(
        price,
        server["prompt_tokens"],
        server["completion_tokens"],
        server["cached_tokens"] if cached else 0,
    )


def steady_rate(server: dict[str, Any]) -> float:
    """Median answers a second on the server, its first and last 3 seconds left out (the
    ramp and the tail of dependent chains)."""
    series = [row["successes"] for row in server["series"]]
    while series and series[-1] == 0:
        series.pop()
    while series and series[0] == 0:
        series.pop(0)
    middle = series[3:-3] or series
    return float(statistics.median(middle)) if middle else 0.0


def flex_table(args: argparse.Namespace, frame: pd.DataFrame) -> str:
    sim = (
        *("--latency", str(args.latency), "--rpm", str(int(args.rpm)), "--seed", "1"),
        *("--flex-unavailable", str(args.unavailable), "--flex-slowdown", str(args.flex_slowdown)),
    )
    rate = args.rpm / 60
    with simulator_process(*sim, priority=True) as url:
        listed = run(url, frame, make_chains(MODEL, url), args.partitions, rpm=args.rpm)
        print(f"  list price: {listed['wall']:.1f} s", flush=True)
        flex = run(
            url, frame, make_chains(MODEL, url), args.partitions, rpm=args.rpm, service_tier="flex"
        )
        print(f"  flex: {flex['wall']:.1f} s", flush=True)
    rows = []
    for name, r in (("list price", listed), ("flex", flex)):
        s, server = r["summary"], r["server"]
        answered_per_s = server["successes"] / r["wall"]
        steady = steady_rate(server)
        rows.append(
            (
                name,
                f"{r['answered']}/{r['rows']}",
                f"${r['cost']:.4f}",
                f"{r['cost'] / listed['cost']:.2f}x",
                f"{r['wall']:.1f}",
                f"{r['wall'] / listed['wall']:.2f}x",
                f"{answered_per_s:.1f} ({answered_per_s / rate:.2f}x)",
                f"{steady:.1f} ({steady / rate:.2f}x)",
                str(server["rate_limited"]),
                str(server["faults"]["flex_unavailable"]),
                str(s.retries),
                f"{s.flex_calls}/{s.calls}",
            )
        )
    header = (
        "run",
        "rows answered",
        "cost",
        "vs list",
        "wall s",
        "vs list",
        "answers/s (vs rate)",
        "steady answers/s",
        "quota 429s",
        "flex unavailable",
        "retries",
        "by flex",
    )
    intro = (
        f"{len(frame)} rows x 2 chains, {args.latency} s latency (flex x{args.flex_slowdown}), "
        f"rpm {args.rpm:.0f} ({rate:.0f}/s), {args.unavailable:.0%} of Flex requests "
        "answered 429 resource unavailable"
    )
    return intro + "\n\n" + table(rows, header)


def caching_table(args: argparse.Namespace, frame: pd.DataFrame) -> str:
    with simulator_process("--latency", str(args.cache_latency), "--seed", "2") as url:
        runs = {}
        for tier in ("list price", "flex"):
            options = {"service_tier": "flex"} if tier == "flex" else {}
            runs[tier] = run(url, frame, instructed_chain(url), args.partitions, **options)
            print(f"  cached prompts, {tier}: {runs[tier]['wall']:.1f} s", flush=True)
    rows = []
    for tier, r in runs.items():
        server = r["server"]
        exact = bill(server, tier)
        before = bill(server, tier, cached=False)
        share = server["cached_tokens"] / server["prompt_tokens"]
        rows.append(
            (
                tier,
                f"{r['answered']}/{r['rows']}",
                f"{server['prompt_tokens']:,}",
                f"{server['cached_tokens']:,} ({share:.0%})",
                f"${r['cost']:.5f}",
                f"${exact:.5f}",
                f"{abs(r['cost'] / exact - 1):.4%}",
                f"${before:.5f} (+{before / exact - 1:.0%})",
                f"${r['summary'].caching_saved_usd:.5f}",
                f"{r['cost'] / runs['list price']['cost']:.2f}x",
            )
        )
    header = (
        "run",
        "rows answered",
        "prompt tokens",
        "cached (share)",
        "llm_cost_usd sum",
        "bill from server",
        "difference",
        "before (overstated)",
        "caching saved",
        "vs list",
    )
    intro = (
        f"{len(frame)} rows x 1 chain, a fixed ~1,500-token instruction before each row's "
        f"text, {args.cache_latency} s latency"
    )
    return intro + "\n\n" + table(rows, header)


def deadline_table(args: argparse.Namespace, frame: pd.DataFrame) -> str:
    flex_latency = args.latency * args.deadline_flex_slowdown
    turnaround = args.batch_delay + 0.2  # validating and finalizing 0.1 s each
    sim = (
        *("--latency", str(args.latency), "--rpm", str(int(args.rpm)), "--seed", "3"),
        *("--flex-unavailable", str(args.unavailable)),
        *("--flex-slowdown", str(args.deadline_flex_slowdown)),
        *("--batch-delay", str(args.batch_delay)),
    )
    partitions = 2  # a local scheduler's batch waits overlap only as many as its threads
    runs: list[tuple[str, float, dict[str, Any]]] = []

    def with_deadline(url: str, name: str, seconds: float) -> None:
        deadline = dask_llm.Deadline(
            at=time.time() + 1.5 + seconds,  # run() lets the window drain 1.5 s first
            batch_turnaround=turnaround + 1.0,  # what was measured, with a margin
            flex_latency=1.2 * flex_latency,
            latency=1.5 * args.latency,
            flex_unavailable=args.unavailable,
        )
        chains = make_chains(MODEL, url)
        r = run(url, frame, chains, partitions, rpm=args.rpm, deadline=deadline)
        r["spare"] = deadline.at - time.time()
        print(f"  {name}: {r['wall']:.1f} s of {seconds:.1f} s", flush=True)
        runs.append((name, seconds, r))

    with simulator_process(*sim, priority=True) as url:
        listed = run(url, frame, make_chains(MODEL, url), partitions, rpm=args.rpm)
        wall = listed["wall"]
        print(f"  list price: {wall:.1f} s", flush=True)
        batch_meets = 4 * wall + 3 * turnaround
        with_deadline(url, "Batch API can meet", batch_meets)
        with_deadline(url, "only Flex can meet", wall + 4 * flex_latency + 2.0)
        with_deadline(url, "needs list price for part", wall + 1.0)
    slow_delay = args.slow_batch_delay or 10 * args.batch_delay
    slow = (*sim[: sim.index("--batch-delay")], "--batch-delay", str(slow_delay))
    with simulator_process(*slow, priority=True) as url:
        with_deadline(
            url, f"batch {slow_delay / args.batch_delay:.0f}x slower than told", batch_meets
        )
    rows = [
        (
            "list price (no deadline)",
            "-",
            f"{wall:.1f}",
            "-",
            f"0 / 0 / {listed['summary'].calls}",
            "-",
            f"${listed['cost']:.4f}",
            "1.00x",
            "1.00x",
            str(listed["server"]["successes"] - listed["summary"].calls),
        )
    ]
    for name, seconds, r in runs:
        s = r["summary"]
        rows.append(
            (
                name,
                f"{seconds:.1f}",
                f"{r['wall']:.1f}",
                f"{r['spare']:.1f}",
                f"{s.batch_calls} / {s.flex_calls} / {s.list_price_calls}",
                f"{s.batches_late} of {s.batches}",
                f"${r['cost']:.4f}",
                f"{r['cost'] / listed['cost']:.2f}x",
                f"{r['wall'] / wall:.2f}x",
                str(r["server"]["successes"] + r["server"]["batch_lines_ok"] - s.calls),
            )
        )
    header = (
        "run",
        "deadline s",
        "wall s",
        "spare s",
        "answers by batch / flex / list",
        "batches cancelled early",
        "cost",
        "vs list",
        "wall vs list",
        "paid, not used",
    )
    intro = (
        f"{len(frame)} rows x 2 chains, {partitions} partitions, {args.latency} s latency "
        f"(flex x{args.deadline_flex_slowdown}), rpm {args.rpm:.0f}, batches of "
        f"{args.batch_delay} s (told {turnaround + 1.0:.1f} s; the last row's: "
        f"{slow_delay} s), {args.unavailable:.0%} of Flex requests unavailable"
    )
    return intro + "\n\n" + table(rows, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="wine reviews CSV (default: the demo data)")
    parser.add_argument("--rows", type=int, default=1000, help="rows of the Flex workload")
    parser.add_argument("--cache-rows", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rpm", type=float, default=3000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--cache-latency", type=float, default=0.05)
    parser.add_argument("--flex-slowdown", type=float, default=3.0)
    parser.add_argument("--unavailable", type=float, default=0.10)
    parser.add_argument("--deadline-rows", type=int, default=200)
    parser.add_argument("--batch-delay", type=float, default=5.0)
    parser.add_argument("--deadline-flex-slowdown", type=float, default=10.0)
    parser.add_argument(
        "--slow-batch-delay",
        type=float,
        default=None,
        help="the fourth deadline case's batches (default: 10x --batch-delay)",
    )
    parser.add_argument("--only", choices=["flex", "caching", "deadline"], default=None)
    args = parser.parse_args()
    load_avg = os.getloadavg()
    parts = []
    if args.only in (None, "flex"):
        parts.append(flex_table(args, load(args.input, args.rows)))
    if args.only in (None, "caching"):
        parts.append(caching_table(args, load(args.input, args.cache_rows)))
    if args.only in (None, "deadline"):
        parts.append(deadline_table(args, load(args.input, args.deadline_rows)))
    print()
    print("\n\n".join(parts))
    print(f"\nload average at start {load_avg[0]:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
