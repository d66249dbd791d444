"""A pilot before the full job, and a quality gate during it.

A prompt that is broken for some rows (answers refused, cut at
``max_tokens``, JSON that does not parse) looks fine on five test rows and
costs the whole job's money at 130,000. Two guards:

* **``pilot(frame, chains, n=200)``** runs the chains on ``n`` rows spread
  over the whole frame (stratified: each partition gives rows in proportion
  to its length, evenly spaced within it, so a frame sorted by country or by
  date is sampled across it) and reports the rates of errors, refusals,
  truncations and parse failures, tokens per call, and the full job's
  projected cost and wall time with a 95% interval. The projection treats
  the sample's per-row cost as a simple random sample of the frame's
  (normal interval on the mean, finite-population corrected), which the
  even spacing approximates; it counts rows as if none were cached. Time is
  the larger of requests / rpm (the pilot's requests per answer included:
  429s, errors and retries take turns too) and tokens / tpm, at the limits
  given or those the provider announced; without either, at the pilot's own pace. The
  pilot's answers go to the cache like any run's: the full job does not pay
  for them again. Its cost is what the provider billed the sample: prompt
  tokens read from the provider's prompt cache at the cached-input price, Flex
  answers at the Flex price (``enrich(service_tier="flex")``, or a model that
  asks for it), so the projection carries the cached share and the tier the
  pilot measured (``Pilot.cached_share``, ``Pilot.flex_share``). A sample's
  first calls write the prompt cache that later calls read: a short pilot
  under-states the share a long job gets, and ``estimate()`` projects it
  from the chain's fixed prefix.
* **``enrich(..., quality_gate=QualityGate(...))``** checks the same rates as
  rows finish, once ``min_rows`` rows have finished in a process, and stops
  the job (stop kind ``quality``, ``engine.job``) when one crosses its threshold:
  what was paid is kept (cache, rows done), and the rows not done get
  ``llm_error`` naming the rate. Each process judges the rows it ran itself
  (on the threaded and synchronous schedulers, and for a pandas frame, that
  is the whole job; dask's process pool passes the stop to every process
  through the job hub; on ``distributed`` each worker stops on its own
  sample), so no round trip to the client sits in the row path.

Rates: errors over rows; truncations (``finish_reason="length"``), refusals
(a non-null ``refusal``) and parse failures (attempts whose answer did not
fit the chain's output schema) over the answers received.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_llm.preview.estimate import significant

if TYPE_CHECKING:
    from dask_llm.observe.progress import RunSummary

_Z95 = 1.959964


@dataclass
class Pilot:
    """What a pilot run saw, and what it projects for the full job (``ddf.llm.pilot``).

    Rates are fractions; costs US dollars; times seconds; intervals 95%. A projection
    is None when unknown (a model without a price, no limit and no pace).
    """

    rows: int
    sample_rows: int
    error_rate: float
    truncation_rate: float
    refusal_rate: float
    parse_failure_rate: float
    calls_per_row: float
    input_tokens_per_call: float
    output_tokens_per_call: float
    cost_usd: float | None
    projected_cost_usd: float | None
    projected_cost_interval: tuple[float, float] | None
    projected_wall_s: float | None
    projected_wall_interval: tuple[float, float] | None
    paced_by: str
    cached_rows: int = 0
    #: Rows that failed before any request (the pilot stopped: budget, a fatal answer):
    #: left out of the projection, which is made from the rows that were sent.
    unsent_rows: int = 0
    #: Of the pilot's prompt tokens, the share read from the provider's prompt cache; of its
    #: paid answers, the share served by Flex processing.
    cached_share: float = 0.0
    flex_share: float = 0.0
    run: RunSummary | None = field(default=None, repr=False)

    def __str__(self) -> str:
        def money(x: float | None) -> str:
            return "unknown" if x is None else f"${significant(x)}"

        cost = money(self.projected_cost_usd)
        if self.projected_cost_interval is not None:
            lo, hi = self.projected_cost_interval
            cost += f" ({money(lo)}-{money(hi)})"
        wall = "unknown"
        if self.projected_wall_s is not None:
            wall = f"{self.projected_wall_s / 60:,.1f} min"
            if self.projected_wall_interval is not None:
                lo, hi = self.projected_wall_interval
                wall += f" ({lo / 60:,.1f}-{hi / 60:,.1f})"
            wall += f" at {self.paced_by}"
        return (
            f"pilot of {self.sample_rows:,} of {self.rows:,} rows: errors {self.error_rate:.1%}, "
            f"truncated {self.truncation_rate:.1%}, refusals {self.refusal_rate:.1%}, "
            f"parse failures {self.parse_failure_rate:.1%}; {self.calls_per_row:.2f} calls/row, "
            f"{self.input_tokens_per_call:,.0f} + {self.output_tokens_per_call:,.0f} tokens/call"
            f"{self._cached()}; pilot cost {money(self.cost_usd)}{self._flex()}; "
            f"full job ~{cost}, ~{wall}"
        ) + self._unsent()

    def _cached(self) -> str:
        if not self.cached_share:
            return ""
        return f" ({self.cached_share:.0%} of input tokens from the prompt cache)"

    def _flex(self) -> str:
        if not self.flex_share:
            return ""
        return " (Flex)" if self.flex_share == 1 else f" ({self.flex_share:.0%} by Flex)"

    def _unsent(self) -> str:
        if not self.unsent_rows:
            return ""
        sent = self.sample_rows - self.unsent_rows - self.cached_rows
        return (
            f" ({self.unsent_rows:,} pilot rows failed before any request, the run having "
            f"stopped: projected from the {sent:,} rows sent)"
            if sent > 0
            else f" ({self.unsent_rows:,} pilot rows failed before any request: nothing to "
            "project from)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "run"}


def stratified_sample(frame: Any, n: int) -> pd.DataFrame:
    """``n`` rows of ``frame`` spread over its partitions and evenly within each (in order)."""
    if isinstance(frame, pd.DataFrame):
        return _evenly(frame, n)
    assert isinstance(frame, dd.DataFrame)
    lengths = [int(x) for x in frame.map_partitions(len).compute()]
    total = sum(lengths)
    if total == 0:
        return frame._meta.copy()
    wanted = _allocate(lengths, min(n, total))
    parts = [frame.partitions[i] for i, k in enumerate(wanted) if k > 0]
    takes = [k for k in wanted if k > 0]
    frames = dask.compute(*parts)
    return pd.concat([_evenly(df, k) for df, k in zip(frames, takes, strict=True)])


def _allocate(lengths: list[int], n: int) -> list[int]:
    """``n`` split in proportion to ``lengths`` (largest remainders)."""
    total = sum(lengths)
    exact = [n * length / total for length in lengths]
    counts = [min(int(x), length) for x, length in zip(exact, lengths, strict=True)]
    order = sorted(range(len(lengths)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order:
        if sum(counts) >= n:
            break
        if counts[i] < lengths[i]:
            counts[i] += 1
    return counts


def _evenly(df: pd.DataFrame, k: int) -> pd.DataFrame:
    if k >= len(df):
        return df
    positions = np.unique(np.linspace(0, len(df) - 1, k).round().astype(int))
    return df.iloc[positions]


def run_pilot(
    frame: Any,
    run: Callable[[pd.DataFrame], RunSummary],
    *,
    n: int,
    tpm: float | None = None,
) -> Pilot:
    """Enrich a stratified sample of ``frame`` now and project the full job (see ``Pilot``).

    ``run`` enriches a pandas frame as the full job would and returns that run's
    summary (``api.pilot`` gives one that calls ``enrich``).
    """
    if n < 1:
        raise ValueError(f"pilot(n=) must be >= 1, not {n!r}")
    total = len(frame) if isinstance(frame, pd.DataFrame | dd.DataFrame) else 0
    sample = stratified_sample(frame, n)
    started = time.monotonic()
    summary = run(sample)
    wall = time.monotonic() - started
    if summary.record is None:
        raise RuntimeError("the pilot's run kept no record")  # a run here always does
    return project(summary, rows=total, wall_s=wall, tpm=tpm)


def project(run: RunSummary, *, rows: int, wall_s: float, tpm: float | None) -> Pilot:
    """The ``Pilot`` of a finished sample ``run``, projected to ``rows`` rows."""
    record = run.record
    assert record is not None
    r = record.rows
    answers = sum(c.ok for c in record.chains.values())
    truncated = sum(c.truncated for c in record.chains.values())
    refused = sum(c.refused for c in record.chains.values())
    parse = sum(c.parse_failures for c in record.chains.values())
    tokens_in = sum(c.input_tokens for c in record.chains.values())
    tokens_out = sum(c.output_tokens for c in record.chains.values())
    unpriced = sum(c.unpriced for c in record.chains.values())
    cached = sum(c.cached_tokens for c in record.chains.values())
    flex = sum(c.flex for c in record.chains.values())
    sent_rows = r.n - r.cached - r.unsent
    paid_rows = max(1, sent_rows)

    def rate(count: int, of: int) -> float:
        return count / of if of else 0.0

    cost = None if unpriced else sum(c.cost_usd for c in record.chains.values())
    projected_cost = cost_interval = None
    if not unpriced and r.priced:
        projected_cost, cost_interval = _total(r.cost, r.cost_sq, r.priced, rows)
    calls_total, calls_interval = _total(float(r.calls), float(r.calls_sq), paid_rows, rows)
    if sent_rows <= 0:  # nothing was sent (stopped at once, or all cached): no projection
        projected_cost = cost_interval = None
    # Limits pace requests, not answers: the pilot's 429s, 5xx and retries count too.
    requests_per_answer = sum(c.calls for c in record.chains.values()) / answers if answers else 1
    calls_total *= requests_per_answer
    calls_interval = (
        calls_interval[0] * requests_per_answer,
        calls_interval[1] * requests_per_answer,
    )
    limit = record.limit_per_s
    wall = wall_interval = None
    paced_by = "unknown"
    if limit:
        wall = calls_total / limit
        wall_interval = (calls_interval[0] / limit, calls_interval[1] / limit)
        paced_by = f"{limit * 60:,.0f} requests/min"
    if tpm:
        tokens_total, tokens_interval = _total(
            float(r.input_tokens + r.output_tokens), float(r.tokens_sq), paid_rows, rows
        )
        by_tokens = tokens_total / (tpm / 60)
        if wall is None or by_tokens > wall:
            wall = by_tokens
            wall_interval = (tokens_interval[0] / (tpm / 60), tokens_interval[1] / (tpm / 60))
            paced_by = f"{tpm:,.0f} tokens/min"
    if sent_rows <= 0:
        wall = wall_interval = None
        paced_by = "unknown"
    if wall is None and sent_rows > 0 and wall_s > 0:
        wall = wall_s * rows / sent_rows
        spread = (calls_interval[1] - calls_interval[0]) / 2 / calls_total if calls_total else 0
        wall_interval = (wall * (1 - spread), wall * (1 + spread))
        paced_by = "the pilot's pace (no rpm/tpm known)"
    return Pilot(
        rows=rows,
        sample_rows=r.n,
        error_rate=rate(r.failed, r.n),
        truncation_rate=rate(truncated, answers),
        refusal_rate=rate(refused, answers),
        parse_failure_rate=rate(parse, answers),
        calls_per_row=rate(r.calls, paid_rows),
        input_tokens_per_call=rate(tokens_in, answers),
        output_tokens_per_call=rate(tokens_out, answers),
        cost_usd=cost,
        projected_cost_usd=projected_cost,
        projected_cost_interval=cost_interval,
        projected_wall_s=wall,
        projected_wall_interval=wall_interval,
        paced_by=paced_by,
        cached_rows=r.cached,
        unsent_rows=r.unsent,
        cached_share=rate(cached, tokens_in),
        flex_share=rate(flex, answers),
        run=run,
    )


def _total(
    total: float, squares: float, n: int, population: int
) -> tuple[float, tuple[float, float]]:
    """Projected population total from a sample's sum and sum of squares, with a 95% interval."""
    mean = total / n
    variance = max(0.0, squares / n - mean * mean) * n / max(1, n - 1)
    correction = math.sqrt(max(0.0, 1 - n / population)) if population > n else 0.0
    half = _Z95 * math.sqrt(variance / n) * correction * population
    projected = mean * population
    return projected, (max(0.0, projected - half), projected + half)
