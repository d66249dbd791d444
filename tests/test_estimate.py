"""Dry runs: ``estimate`` sends nothing, and its calls are the calls ``enrich`` makes."""

from __future__ import annotations

from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest

import dask_llm
from tests.chains import summary_chain
from tests.chains import wine_chains as chains


def frame() -> pd.DataFrame:
    descriptions = [f"Review {i}: cassis, cedar, graphite" for i in range(20)]
    descriptions[3] = None  # skipped by enrich, not counted
    descriptions[7] = descriptions[6]  # a repeat: called once
    return pd.DataFrame(
        {
            "description": descriptions,
            "title": [f"Wine {i // 2 * 2}" for i in range(20)],
            "country": ["Chile"] * 20,
        }
    )


@pytest.mark.parametrize("kind", ["pandas", "dask"])
def test_estimate_sends_nothing_and_its_calls_are_the_real_ones(
    sim: Any, kind: str, tmp_path: Any
) -> None:
    df = frame()
    data: Any = dd.from_pandas(df, npartitions=3) if kind == "dask" else df
    cache = tmp_path / "c.sqlite"  # the repeat falls in another partition: the cache dedups it
    est = data.llm.estimate(chains(sim.base_url), rpm=600, cache=cache)
    assert sim.stats()["requests"] == 0
    assert est.rows == 20
    out = data.llm.enrich(chains(sim.base_url), cache=cache)
    if kind == "dask":
        out = out.compute(scheduler="sync")
    real = sim.stats()
    assert est.calls == real["requests"], (est, real)
    assert est.calls_by_chain == {"summarize": 18, "features": 18}
    assert est.wall_s == pytest.approx(est.calls / 10)
    # Tokens are an estimate: within a factor of the provider's count.
    assert 0.5 < est.input_tokens / real["prompt_tokens"] < 2.0
    assert est.cost_usd is not None and est.cost_usd > 0
    assert "calls" in str(est)


def test_estimate_skips_what_the_cache_already_holds(sim: Any, tmp_path: Any) -> None:
    cache = tmp_path / "c.sqlite"
    df = frame()
    df.head(10).llm.enrich(chains(sim.base_url), cache=cache)
    est = df.llm.estimate(chains(sim.base_url), cache=cache)
    before = sim.stats()["requests"]
    df.llm.enrich(chains(sim.base_url), cache=cache)
    new_rows = 10  # rows 10..19; the first ten are answered already
    assert est.calls_by_chain["summarize"] == new_rows
    assert sim.stats()["requests"] - before == 2 * new_rows
    # Dependent chains are looked up with their upstream's cached answers.
    assert est.calls_by_chain["features"] == new_rows


def test_estimate_without_limits_has_no_wall_time(sim: Any) -> None:
    assert frame().llm.estimate(chains(sim.base_url), cache=False).wall_s is None


def test_rows_of_different_partitions_with_the_same_index_are_counted_apart(sim: Any) -> None:
    """Each partition of a CSV read has its own 0..n index: the count is per global row."""
    parts = [  # inputs that cannot key the cache (int keys) are told apart by their row
        pd.DataFrame({"description": [{1: "a"}, {2: "b"}]}),
        pd.DataFrame({"description": [{3: "c"}, {4: "d"}]}),
    ]
    ddf = dd.concat([dd.from_pandas(p, npartitions=1) for p in parts])
    assert ddf.npartitions == 2
    est = ddf.llm.estimate([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    assert est.calls == 4


def test_the_cost_is_shown_to_four_significant_digits(sim: Any) -> None:
    est = frame().llm.estimate(chains(sim.base_url), cache=False)
    assert est.cost_usd is not None and 0 < est.cost_usd < 0.01
    shown = str(est).split("cost ~$")[1].split(";")[0]
    assert float(shown) > 0
    assert len(shown.replace("0.", "", 1).lstrip("0")) == 4


def test_estimate_writes_nothing(sim: Any, tmp_path: Any) -> None:
    cache = tmp_path / "sub" / "cache.sqlite"
    frame().llm.estimate(chains(sim.base_url), cache=cache)
    assert not (tmp_path / "sub").exists()
    assert requests_of(sim) == 0


def requests_of(sim: Any) -> int:
    return int(sim.stats()["requests"])


def test_a_batch_estimate_says_where_partitions_wait_one_after_another(sim: Any) -> None:
    # Issue 28: "within the batch window" while 8 partitions on 2 local threads
    # waited four windows one after another. They now wait at once on threads and on
    # the process pool too (engine.handoff): the estimate says so, and no more.
    text = str(
        dd.from_pandas(frame(), npartitions=8).llm.estimate(
            chains(sim.base_url), cache=False, batch=True
        )
    )
    assert "all 8 partitions waiting at once" in text
    assert "one after another" not in text
    single = str(frame().llm.estimate(chains(sim.base_url), cache=False, batch=True))
    assert "partitions" not in single
