"""The wine demo: enrich wine reviews with two dependent LLM chains.

Run it as ``dask-llm demo`` or ``python examples/wine_reviews.py`` (same options).

Chain 1 reads a review and returns a one-sentence summary and its sentiment
(structured output). Chain 2 reads the wine's title, its country and chain
1's summary and returns five features. Each row's chain 2 starts the moment
its own summary is back.

    dask-llm demo                                      # built-in simulator, shipped sample
    dask-llm demo --input ../shared/data/wine_reviews_sample.csv --rows 200
    OPENAI_API_KEY=sk-... dask-llm demo --model gpt-4o-mini   # the real API

With no ``OPENAI_API_KEY`` and no ``--base-url`` it starts dask-llm's
OpenAI-compatible simulator at about 2.2 s per call (what one call took in
the article this workload comes from), so the timings mean something and
nothing is paid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal, NoReturn

import dask.dataframe as dd
import pandas as pd
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

import dask_llm
from dask_llm.simulator import Simulator


class Summary(BaseModel):
    """What chain 1 returns."""

    summary: str = Field(description="One sentence on how the wine tastes and feels.")
    sentiment: Literal["positive", "neutral", "negative"] = Field(
        description="The reviewer's overall opinion."
    )


class Features(BaseModel):
    """What chain 2 returns."""

    features: list[str] = Field(
        description="The wine's five most distinctive features, a few words each.",
        min_length=5,
        max_length=5,
    )


SUMMARY_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You are a sommelier who writes short, precise tasting notes."),
        (
            "human",
            "Summarise this wine review in one sentence and judge its sentiment.\n\n{description}",
        ),
    ]
)

FEATURES_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You are a sommelier who writes short, precise tasting notes."),
        (
            "human",
            "Wine: {title} ({country}).\nTasting summary: {summary}\n\n"
            "List the five features a buyer should know about.",
        ),
    ]
)


_COLUMNS = ("country", "description", "points", "price", "title", "variety")


def make_chains(model: str, base_url: str | None, **llm_options: Any) -> list[dask_llm.Chain]:
    """The two chains, sharing one ``ChatOpenAI`` (dask-llm gives each loop its own client)."""
    llm = ChatOpenAI(model=model, base_url=base_url, temperature=0, **llm_options)
    summarize: Runnable = SUMMARY_PROMPT | llm.with_structured_output(Summary)
    features: Runnable = FEATURES_PROMPT | llm.with_structured_output(Features)
    return [dask_llm.Chain(summarize, name="summarize"), dask_llm.Chain(features, name="features")]


def sequential(chains: list[dask_llm.Chain], rows: pd.DataFrame) -> float:
    """The baseline: one call after another with ``invoke``. Returns seconds per row."""
    summarize, features = (c.runnable for c in chains)
    start = time.perf_counter()
    for row in rows.itertuples():
        first = summarize.invoke({"description": row.description})
        features.invoke({"title": row.title, "country": row.country, "summary": first.summary})
    return (time.perf_counter() - start) / max(1, len(rows))


@contextlib.contextmanager
def backend(args: argparse.Namespace) -> Iterator[str | None]:
    """The base URL to call: the user's, the real API's (None), or a simulator's."""
    if args.base_url or os.environ.get("OPENAI_API_KEY"):
        yield args.base_url
        return
    # Workers read the key from their environment; the simulator accepts any.
    os.environ["OPENAI_API_KEY"] = "sk-dask-llm-simulator"
    with Simulator(latency=args.latency, jitter=0.1, seed=7) as sim:
        print(
            f"No OPENAI_API_KEY: using the built-in simulator at {sim.base_url} "
            f"({args.latency} s per call)"
        )
        yield sim.base_url


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as the ``dask-llm`` command has them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = _Parser(prog=prog, description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--input", help="CSV of reviews (default: the sample dask-llm ships)")
    parser.add_argument("--rows", type=_count, default=40, help="rows to enrich (default 40)")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument(
        "--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--partitions", type=_count, default=2)
    parser.add_argument(
        "--sequential-rows",
        type=int,
        default=5,
        help="rows timed one call at a time for the baseline (0 skips it)",
    )
    parser.add_argument("--latency", type=_seconds, default=2.2, help="simulator seconds per call")
    parser.add_argument("--output", default="enriched_wine_reviews.parquet")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when interactive)",
    )
    args = parser.parse_args(argv)

    source = args.input or str(resources.files("dask_llm") / "data" / "wine_reviews_demo.csv")
    if not os.path.isfile(source):
        parser.error(f"--input: no such file: {source}")
    try:
        frame = pd.read_csv(source, nrows=args.rows)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        parser.error(f"--input: cannot read {source}: {exc}")
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        parser.error(f"--input: {source} has no column {', '.join(missing)}")
    frame = frame[list(_COLUMNS)]
    print(f"{len(frame)} reviews from {source}")

    with backend(args) as base_url:
        chains = make_chains(args.model, base_url)
        per_row = None
        if args.sequential_rows > 0:
            sample = frame.head(args.sequential_rows)
            per_row = sequential(chains, sample)
            basis = (
                f"extrapolated from {len(sample)} rows"
                if len(sample) < len(frame)
                else f"timed on {len(sample)} rows"
            )
            print(
                f"sequential invoke: {per_row:.2f} s per row (timed on {len(sample)} rows), "
                f"so ~{per_row * len(frame):.1f} s for {len(frame)} rows ({basis})"
            )

        ddf = dd.from_pandas(frame, npartitions=args.partitions)
        enriched = ddf.llm.enrich(chains, cache=False, progress=args.progress)
        start = time.perf_counter()
        with warnings.catch_warnings():  # dask's writer uses pandas 3.1's deprecated inplace=
            warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame")
            enriched.to_parquet(args.output, write_index=False)
        took = time.perf_counter() - start

    result = pd.read_parquet(args.output)
    failed = int(result["llm_error"].notna().sum())
    print(f"enrich: {took:.1f} s for {len(result)} rows ({failed} failed) -> {args.output}")
    if per_row is not None:
        print(f"speedup over sequential ({basis}): {per_row * len(frame) / took:.1f}x")
    cost = result["llm_cost_usd"].sum()
    print(
        f"tokens in/out: {int(result['llm_input_tokens'].sum())}/"
        f"{int(result['llm_output_tokens'].sum())}, cost ${cost:.4f} at {args.model} prices"
    )
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(result[["title", "sentiment", "summary", "features"]].head(5).to_string(index=False))


if __name__ == "__main__":
    main()
