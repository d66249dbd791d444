"""``pilot()`` projects the full job's cost; ``quality_gate=`` stops a job whose answers are bad."""

from __future__ import annotations

from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import dask_llm
from dask_llm.preview.pilot import stratified_sample
from tests.chains import llm, wine_chains
from tests.helpers import ROOT

DEMO = ROOT / "dask_llm" / "data" / "wine_reviews_demo.csv"


def demo_rows(n: int) -> pd.DataFrame:
    """The project's own sample of reviews, cycled to ``n`` distinct rows."""
    demo = pd.read_csv(DEMO)
    rows = pd.concat([demo] * (n // len(demo) + 1), ignore_index=True).head(n)
    rows["description"] = rows["description"] + " (lot " + rows.index.astype(str) + ")"
    return rows


@pytest.mark.slow
def test_the_pilots_projected_cost_is_within_10_percent_of_the_full_run(
    make_simulator: Any,
) -> None:
    sim = make_simulator()
    frame = dd.from_pandas(demo_rows(500), npartitions=8)
    pilot = frame.llm.pilot(wine_chains(sim.base_url), n=50, cache=False)
    assert pilot.sample_rows == 50 and pilot.rows == 500
    assert pilot.error_rate == pilot.truncation_rate == pilot.parse_failure_rate == 0
    assert pilot.calls_per_row == 2 and pilot.input_tokens_per_call > 0
    assert pilot.projected_wall_s is not None and "pilot's pace" in pilot.paced_by
    frame.llm.enrich(wine_chains(sim.base_url), cache=False, progress=False).compute()
    full = dask_llm.last_run()
    assert full is not None and full.cost_usd is not None
    assert pilot.projected_cost_usd is not None and pilot.projected_cost_interval is not None
    ratio = pilot.projected_cost_usd / full.cost_usd
    assert abs(ratio - 1) < 0.10, ratio
    low, high = pilot.projected_cost_interval
    assert low <= full.cost_usd <= high
    assert "full job ~$" in str(pilot)


def test_the_sample_is_spread_over_every_partition() -> None:
    frame = dd.from_pandas(pd.DataFrame({"x": range(1_000)}), npartitions=10)
    sample = stratified_sample(frame, 50)
    assert len(sample) == 50
    assert sorted(set(sample["x"] // 100)) == list(range(10))  # five from each partition
    assert sample["x"].iloc[0] == 0 and sample["x"].iloc[-1] == 999


def truncating_chain(url: str) -> dask_llm.Chain:
    # With the simulator's completion_tokens=80, max_tokens=106 cuts ~30% of answers.
    prompt = ChatPromptTemplate.from_template("Describe {description}")
    return dask_llm.Chain(
        prompt | llm(url, max_tokens=106) | StrOutputParser(), outputs="text", name="describe"
    )


def test_a_prompt_that_truncates_30_percent_stops_after_the_gates_sample(
    make_simulator: Any,
) -> None:
    sim = make_simulator(completion_tokens=80)
    rows = demo_rows(1_000)
    pilot = rows.llm.pilot(truncating_chain(sim.base_url), n=100, cache=False)
    assert 0.2 < pilot.truncation_rate < 0.4 and pilot.error_rate == 0  # parsed, but cut

    sim.reset()
    gate = dask_llm.QualityGate(max_truncation_rate=0.10, min_rows=50)
    out = rows.llm.enrich(
        truncating_chain(sim.base_url), cache=False, progress=False, quality_gate=gate
    )
    sent = sim.stats()["requests"]
    assert 50 <= sent < 300  # of 600: the gate's sample, and the rows already on the wire
    done = out["text"].notna()
    assert done.sum() >= 50
    stopped = out.loc[~done, "llm_error"]
    assert len(stopped) >= 800
    assert stopped.str.contains("not sent: quality gate: ").all()
    assert stopped.str.contains(r"of answers were truncated \(finish_reason=length\)").all()
    assert stopped.str.contains("above max_truncation_rate=10.0%").all()
    summary = dask_llm.last_run()
    assert summary is not None and summary.status.startswith("stopped: quality gate: ")
    assert summary.record is not None and summary.record.stop is not None
    assert summary.record.stop[0] == "quality"


def test_a_gate_is_validated() -> None:
    with pytest.raises(ValueError, match="max_error_rate"):
        dask_llm.QualityGate(max_error_rate=5)
    with pytest.raises(ValueError, match="min_rows"):
        dask_llm.QualityGate(min_rows=0)
    with pytest.raises(TypeError, match="quality_gate= takes"):
        pd.DataFrame({"description": ["a"]}).llm.enrich(
            truncating_chain("http://127.0.0.1:9/v1"),
            quality_gate=0.1,  # type: ignore[typeddict-item]
        )


def test_a_pilot_stopped_by_its_budget_projects_from_the_rows_it_sent(sim: Any) -> None:
    # Issue 28: rows the stop left unsent counted as rows that cost nothing: "$0.00"
    # and zero-width intervals.
    rows = demo_rows(500)
    none_sent = rows.llm.pilot(wine_chains(sim.base_url), n=20, cache=False, budget_usd=1e-6)
    assert none_sent.unsent_rows == 20
    assert none_sent.projected_cost_usd is None and none_sent.projected_cost_interval is None
    assert "nothing to project from" in str(none_sent)

    stopped = rows.llm.pilot(wine_chains(sim.base_url), n=50, cache=False, budget_usd=0.002)
    sent = stopped.sample_rows - stopped.unsent_rows
    assert 0 < stopped.unsent_rows < 50 and stopped.cost_usd
    assert stopped.projected_cost_usd is not None and stopped.projected_cost_interval is not None
    # Rows sent but stopped mid-way cost less than a whole row: at least the spend per sent row.
    assert stopped.projected_cost_usd >= stopped.cost_usd / sent * 500 * 0.99
    low, high = stopped.projected_cost_interval
    assert low < high
    assert f"projected from the {sent} rows sent" in str(stopped)
