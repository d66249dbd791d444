"""Claude's output limit learned, and read from ``anthropic-ratelimit-output-tokens-remaining``.

A provider that limits output tokens per minute apart (the simulator's
``/v1/messages`` at ``--output-tpm 18000``: 300 output tokens/s, a bucket of
one second's refilled continuously; requests and input tokens far from
binding), 0.05 s latency, answers of ~26 output tokens of their
``max_tokens=32``. A text chain on ``ChatAnthropic`` over ``--rows`` rows, on
threads, the limit *learned* from the headers (no ``output_tpm=``). Two cases:

* alone: the job has the whole limit;
* shared: another client of the same account takes ``--competitor`` output
  tokens/s (requests of ``max_tokens=32`` whatever they are answered), so the
  job has what it leaves.

Two codes in processes of their own against the same simulator, in the same
run: this tree, and ``--baseline`` (default: the commit this work started
from, where the output bucket learns only the ``-limit`` header), checked out
into a temporary git worktree. Reported: the share of the job's requests met
by a 429, and the job's output tokens/s over its steady seconds against the
limit (alone) or against what the other client left (shared).

    python -m benchmarks.output_remaining            # ~2 minutes
    python -m benchmarks.output_remaining --rows 300 --no-shared
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp

# This file is also the job's process, run with the baseline's tree first on the path:
# there ``benchmarks`` is the baseline's, so what it may lack is looked up when used.
from benchmarks import _common, cluster_budget
from benchmarks._common import reset, simulator_process, stats, table
from benchmarks.cluster_budget import ROOT, baseline_tree

#: The commit this work started from: the output bucket learns its limit, not its level.
BASELINE = "66a84db"
OTPM = 18_000
LIMIT = OTPM / 60.0
MAX_TOKENS = 32
MODEL = "claude-haiku-4-5"


def job(url: str, rows: int) -> None:
    """The job itself (``--job``): print its wall time and failed rows as JSON."""
    import pandas as pd
    from langchain_anthropic import ChatAnthropic
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    import dask_llm  # noqa: F401  (registers df.llm)

    model = ChatAnthropic(
        model=MODEL, base_url=url.rsplit("/v1", 1)[0], api_key="sk-ant-x", max_tokens=MAX_TOKENS
    )
    chain = ChatPromptTemplate.from_template("One word for {text}") | model | StrOutputParser()
    frame = pd.DataFrame({"text": [f"wine {i}: cassis and cedar" for i in range(rows)]})
    started = time.monotonic()
    out = frame.llm.enrich({"word": chain}, cache=False, progress=False)
    wall = time.monotonic() - started
    print(json.dumps({"wall": wall, "failed": int(out["llm_error"].notna().sum())}))


def run(url: str, code: str, rows: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--job", url, "--rows", str(rows)]
    return cluster_budget.run_in_tree(cmd, code=code, timeout_s=1800)


@contextlib.contextmanager
def competitor(url: str, tokens_per_s: float) -> Iterator[dict[str, int]]:
    """Another client of the account taking ``tokens_per_s`` output tokens/s of the bucket
    (requests of ``MAX_TOKENS``, whatever they are answered); yields its counts."""
    counts = {"sent": 0, "ok": 0, "limited": 0, "output": 0}
    body = json.dumps(
        {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "x"}]}
    )

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{url}/messages", data=body) as response:
            data = await response.read()
            if response.status == 200:
                counts["ok"] += 1
                counts["output"] += json.loads(data)["usage"]["output_tokens"]
            elif response.status == 429:
                counts["limited"] += 1

    headers = {"x-api-key": "sk-ant-x", "content-type": "application/json"}
    with _common.paced_load(tokens_per_s / MAX_TOKENS, one, headers=headers, counts=counts):
        yield counts


def measure(url: str, code: str, rows: int, other_rate: float) -> dict[str, Any]:
    """One job of ``code``: its 429 share and output tokens/s over its steady seconds."""
    reset(url)
    with competitor(url, other_rate) if other_rate else contextlib.nullcontext() as other:
        r = run(url, code, rows)
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} rows failed: {r}")
    s = stats(url)
    other = other or {"sent": 0, "ok": 0, "limited": 0, "output": 0}
    requests = s["requests"] - other["sent"]
    limited = s["rate_limited"] - other["limited"]
    series = s["series"]
    busy = [row["t"] for row in series if row["requests"]]
    middle = [row for row in series if busy[0] < row["t"] < busy[-1]]
    seconds = max(1, len(middle))
    # The other client's output is steady over the run: its share of the middle seconds.
    other_out = other["output"] / max(1e-9, r["wall"]) if other_rate else 0.0
    output = sum(row["completion_tokens"] for row in middle) / seconds - other_out
    return {
        "requests": requests,
        "limited": limited,
        "output_per_s": output,
        "left_per_s": LIMIT - other_out,
        "wall": r["wall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--competitor", type=float, default=100.0, help="its output tokens/s")
    parser.add_argument("--no-shared", action="store_true", help="skip the shared case")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.job, args.rows)
        return
    sim = ["--latency", "0.05", "--jitter", "0", "--completion-tokens", "20", "--seed", "1"]
    sim += ["--rpm", "60000", "--output-tpm", str(OTPM), "--limit-window", "1"]
    rows: list[tuple[str, ...]] = []
    cases = [("alone", 0.0)] + ([] if args.no_shared else [("shared", args.competitor)])
    with baseline_tree(args.baseline) as old_tree, simulator_process(*sim, priority=True) as url:
        for case, other_rate in cases:
            for name, code in (("this tree", ROOT), (f"baseline {args.baseline}", old_tree)):
                got = measure(url, code, args.rows, other_rate)
                print(case, name, got, flush=True)
                rows.append(
                    (
                        case,
                        name,
                        f"{got['limited']} of {got['requests']} "
                        f"({got['limited'] / max(1, got['requests']):.1%})",
                        f"{got['output_per_s']:.0f}/s "
                        f"({got['output_per_s'] / got['left_per_s']:.0%})",
                        f"{got['wall']:.1f} s",
                    )
                )
    print(
        f"\n{args.rows:,} rows, output limit {OTPM:,}/min ({LIMIT:.0f}/s) learned, a bucket of "
        f"one second; shared: another client takes {args.competitor:g} output tokens/s. One run "
        "on a shared machine: compare the rows, not the absolute rates.\n"
    )
    print(table(rows, ("case", "code", "429s", "output tokens/s (of what is left)", "wall")))


if __name__ == "__main__":
    main()
