"""The run record matches what the provider saw, second by second; the report is offline."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import pytest

import dask_llm
from dask_llm.observe.record import MAX_BUCKETS, RunRecord
from tests.chains import summary_chain
from tests.helpers import reviews

FAULTS = {
    "error_rate": 0.1,  # 500s, retried
    "spurious_429": 0.1,  # 429s without x-ratelimit headers
    "spurious_retry_after": 0.05,
    "max_in_flight": 6,  # quota 429s
    "latency": 0.02,
    "jitter": 0.5,
}
FAST_RETRY = dask_llm.RetryPolicy(attempts=10, wait_initial=0.05, wait_max=0.2)


def chains(url: str) -> list[dask_llm.Chain]:
    return [dask_llm.Chain(summary_chain(url), name="summarize")]


def run_with_faults(make_simulator: Any, rows: int = 90, **compute: Any) -> tuple[Any, Any]:
    sim = make_simulator(**FAULTS)
    out = dd.from_pandas(reviews(rows), npartitions=3).llm.enrich(
        chains(sim.base_url), cache=False, progress=False, retry=FAST_RETRY
    )
    out.compute(**compute)
    summary = dask_llm.last_run()
    assert summary is not None and summary.record is not None
    return summary, sim.stats()


def test_the_record_of_a_run_with_faults_matches_the_simulators_counts(
    make_simulator: Any,
) -> None:
    summary, stats = run_with_faults(make_simulator, scheduler="threads")
    record = summary.record
    totals = record.totals()
    faults = stats["faults"]
    assert faults["error_500"] > 0 and faults["spurious_429"] > 0 and stats["rate_limited"] > 0
    assert totals["started"] == totals["finished"] == stats["requests"]
    assert totals["rate_limited"] == stats["rate_limited"]
    assert totals["other_429"] == faults["spurious_429"]
    assert totals["errors"] == faults["error_500"]
    assert totals["retries"] == summary.retries > 0
    assert totals["input_tokens"] == stats["prompt_tokens"]
    assert totals["output_tokens"] == stats["completion_tokens"]
    assert totals["cost_usd"] == pytest.approx(summary.cost_usd)
    by_kind = {k: sum(v) for k, v in record.error_series().items()}
    assert by_kind == {
        "500": faults["error_500"],
        "429 other": faults["spurious_429"],
        "429 rate limit": stats["rate_limited"],
    }
    chain = record.chains["summarize"]
    assert chain.calls == stats["requests"] and chain.ok == stats["successes"] == 90
    p50, p99 = chain.percentile(50), chain.percentile(99)
    assert p50 is not None and p99 is not None and 0 < p50 <= p99

    # Second by second: the requests we sent before each second's end are those the
    # simulator saw arrive by then, within its own (unaligned) second and a 0.1 s hop.
    series = record.series()
    origin = stats["series_origin"]
    sim_rows = [(origin + row["t"], row["requests"]) for row in stats["series"]]
    first = min(record.buckets)
    ours = itertools.accumulate(series["started"])
    for t, sent in zip(series["t"], ours, strict=True):
        end = first + t + 1
        arrived_surely = sum(n for start, n in sim_rows if start + 1 <= end - 0.1)
        arrived_maybe = sum(n for start, n in sim_rows if start < end + 0.1)
        assert arrived_surely <= sent <= arrived_maybe, (t, sent, arrived_surely, arrived_maybe)


@pytest.mark.slow
def test_the_record_is_gathered_from_the_process_pool(make_simulator: Any) -> None:
    summary, stats = run_with_faults(make_simulator, rows=30, scheduler="processes", num_workers=2)
    totals = summary.record.totals()
    assert totals["started"] == stats["requests"]
    assert totals["other_429"] == stats["faults"]["spurious_429"]
    assert totals["output_tokens"] == stats["completion_tokens"]


def test_the_report_is_one_offline_html_file_with_plots_and_sample_rows(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = make_simulator(schema_violation=0.3)
    reviews(20).llm.enrich(
        chains(sim.base_url),
        cache=False,
        progress=False,
        retry=dask_llm.RetryPolicy(parse_attempts=1),
        budget_usd=1.0,
    )
    summary = dask_llm.last_run()
    assert summary is not None and summary.failed_rows > 0
    path = summary.report(tmp_path / "run.html", estimate=0.002)
    text = Path(path).read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 1
    assert "<script" not in text and not re.search(r"""(src|href)=["']?https?:""", text)
    for title in ("Throughput", "in flight", "429s, retries", "Latency", "Cumulative cost"):
        assert title in text
    assert "budget $1" in text and "estimate $0.002" in text
    assert "failed rows, by kind" in text and "sample rows (llm_error)" in text
    assert re.search(r"row \d+: summarize: \w+", text)  # a sample row, with its llm_error
    assert len(text) < 500_000
    html = summary._repr_html_()
    assert "<svg" in html and not html.startswith("<!DOCTYPE")
    png = summary.report(tmp_path / "run.png")
    assert Path(png).read_bytes().startswith(b"\x89PNG")


def test_the_report_of_a_run_of_no_rows_warns_nothing(sim: Any, tmp_path: Path) -> None:
    # Issue 28: matplotlib warned "No artists with labels found to put in legend"
    # (warnings are errors here).
    reviews(0).llm.enrich(chains(sim.base_url), cache=False, progress=False)
    summary = dask_llm.last_run()
    assert summary is not None and summary.rows == 0
    text = Path(summary.report(tmp_path / "empty.html")).read_text()
    assert text.count("<svg") == 1


def test_the_clients_record_stays_bounded_over_a_long_run() -> None:
    record = RunRecord()
    seconds = 3 * MAX_BUCKETS + 5
    for t in range(0, seconds, 100):
        record.merge(
            {
                "seconds": [
                    [1_000_000 + s, 1, 1, 0.5, 0, 0, 0, 0, 10, 2, 0.001]
                    for s in range(t, min(t + 100, seconds))
                ],
                "errors": [[1_000_000 + t, "500", 1]],
            }
        )
    assert len(record.buckets) <= MAX_BUCKETS and record.width == 4
    totals = record.totals()
    assert totals["started"] == seconds and totals["input_tokens"] == 10 * seconds
    series = record.series()
    assert series["in_flight"][0] == pytest.approx(0.5)  # a mean over the bucket, still
    assert sum(record.error_series()["500"]) == len(range(0, seconds, 100))
