"""``enrich`` end to end through ChatOpenAI and the simulator: wiring, outputs, errors, loops."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import time
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

import dask_llm
from dask_llm.engine.runner import PartitionRun
from dask_llm.transport.pipeline import JobTransport
from tests.chains import Summary, features_chain, llm, summary_chain, text_chain
from tests.chains import wine_chains as two_chains


@pytest.fixture
def reviews() -> pd.DataFrame:
    n = 24
    return pd.DataFrame(
        {
            "description": [f"Review {i}: cherry, oak and a long finish" for i in range(n)],
            "title": [f"Wine {i}" for i in range(n)],
            "country": ["Italy", "France", "Spain", "Chile"] * (n // 4),
        },
        index=pd.RangeIndex(100, 100 + n, name="id"),
    )


def test_public_api() -> None:
    """``__all__`` is exactly the public names the package defines (httpx's check)."""
    public = {name for name in vars(dask_llm) if not name.startswith("_")}
    modules = {name for name, value in vars(dask_llm).items() if inspect.ismodule(value)}
    assert set(dask_llm.__all__) == public - modules
    assert hasattr(dd.from_pandas(pd.DataFrame({"a": [1]}), npartitions=1), "llm")
    assert hasattr(pd.DataFrame({"a": [1]}), "llm")


def test_lazy_until_compute_and_outputs_typed_from_the_schemas(
    sim: Any, reviews: pd.DataFrame
) -> None:
    ddf = dd.from_pandas(reviews, npartitions=3)
    out = ddf.llm.enrich(two_chains(sim.base_url))
    assert sim.stats()["requests"] == 0, "graph construction must not call the model"
    assert list(out.columns) == [
        *reviews.columns,
        "summary",
        "sentiment",
        "features",
        "score",
        "llm_input_tokens",
        "llm_output_tokens",
        "llm_cost_usd",
        "llm_error",
    ]
    assert out.dtypes["score"] == pd.Int64Dtype()
    result = out.compute()
    assert sim.stats()["requests"] == 2 * len(reviews)
    assert result["llm_error"].isna().all(), result["llm_error"].dropna().tolist()
    assert set(result["sentiment"]) <= {"positive", "neutral", "negative"}
    assert all(len(f) == 5 for f in result["features"])
    # The index, the row order and the declared dtypes are those of the input and the meta;
    # lists are declared as Arrow lists (typed Parquet) and computed as Python lists
    # (readable by every Parquet reader): see docs/chains.md.
    pd.testing.assert_index_equal(result.index, reviews.index)
    assert str(out.dtypes["features"]).startswith("list<")
    assert result["features"].dtype == object
    same = [c for c in out.columns if c != "features"]
    assert (result.dtypes[same] == out.dtypes[same]).all()
    assert (result["llm_input_tokens"] > 0).all()
    assert result["llm_cost_usd"].gt(0).all()


def test_text_chain_gives_one_column_named_after_the_chain(sim: Any, reviews: pd.DataFrame) -> None:
    out = reviews.llm.enrich({"word": text_chain(sim.base_url)}, usage=False)
    assert list(out.columns) == [*reviews.columns, "word", "llm_error"]
    assert out["word"].str.len().gt(0).all()


def test_inputs_map_variables_to_other_columns(sim: Any, reviews: pd.DataFrame) -> None:
    frame = reviews.rename(columns={"description": "review_text"})
    chain = dask_llm.Chain(summary_chain(sim.base_url), inputs={"description": "review_text"})
    out = frame.llm.enrich([chain])
    assert out["llm_error"].isna().all()


def test_outputs_rename_fields(sim: Any, reviews: pd.DataFrame) -> None:
    chain = dask_llm.Chain(
        summary_chain(sim.base_url), outputs={"summary": "tasting_note", "sentiment": "mood"}
    )
    out = reviews.head(3).llm.enrich([chain], usage=False)
    assert list(out.columns) == [*reviews.columns, "tasting_note", "mood", "llm_error"]


def test_a_dict_chain_without_a_schema_asks_for_outputs() -> None:
    chain = dask_llm.Chain(RunnableLambda(lambda d: {"n": len(d["description"])}))
    frame = pd.DataFrame({"description": ["abc", "de"]})
    with pytest.raises(ValueError, match="outputs="):
        frame.llm.enrich([chain])
    chain = dask_llm.Chain(
        RunnableLambda(lambda d: {"n": len(d["description"])}),
        inputs={"description": "description"},
        outputs=["n"],
    )
    assert frame.llm.enrich([chain], usage=False)["n"].tolist() == [3, 2]


@pytest.mark.parametrize(
    ("chains", "match"),
    [
        pytest.param(
            lambda url: [dask_llm.Chain(summary_chain(url), inputs={"description": "nope"})],
            "'nope'",
            id="missing-input-column",
        ),
        pytest.param(lambda url: [features_chain(url)], "'summary'", id="missing-upstream-output"),
        pytest.param(
            lambda url: {"a": summary_chain(url), "b": summary_chain(url)},
            "both write column 'summary'",
            id="clashing-outputs",
        ),
        pytest.param(lambda url: [], "at least one chain", id="no-chains"),
        pytest.param(lambda url: ["not a chain"], "Runnable", id="not-a-runnable"),
    ],
)
def test_bad_wiring_fails_at_enrich_before_any_request(
    sim: Any, reviews: pd.DataFrame, chains: Any, match: str
) -> None:
    ddf = dd.from_pandas(reviews, npartitions=2)
    with pytest.raises((ValueError, TypeError), match=match):
        ddf.llm.enrich(chains(sim.base_url))
    assert sim.stats()["requests"] == 0


def test_a_cycle_is_refused() -> None:
    a = dask_llm.Chain(RunnableLambda(lambda d: d["y"]), inputs={"y": "y"}, outputs="x", name="a")
    b = dask_llm.Chain(RunnableLambda(lambda d: d["x"]), inputs={"x": "x"}, outputs="y", name="b")
    with pytest.raises(ValueError, match="cycle"):
        pd.DataFrame({"z": [1]}).llm.enrich([a, b])


def test_null_input_skips_the_row_and_its_dependents(sim: Any, reviews: pd.DataFrame) -> None:
    frame = reviews.head(4).copy()
    frame.loc[101, "description"] = None
    out = frame.llm.enrich(two_chains(sim.base_url))
    assert out.loc[101, "llm_error"] == "summarize: missing input description"
    assert pd.isna(out.loc[101, "features"])
    assert out.drop(index=101)["llm_error"].isna().all()
    assert sim.stats()["requests"] == 2 * 3


def test_a_missing_output_field_is_that_rows_error() -> None:
    chain = dask_llm.Chain(
        RunnableLambda(lambda d: {"a": 1} if d["x"] else {"b": 2}),
        inputs={"x": "x"},
        outputs=["a"],
        name="pick",
    )
    out = pd.DataFrame({"x": [True, False]}).llm.enrich([chain], usage=False)
    assert out["a"].tolist()[0] == 1
    assert out["llm_error"].tolist()[1] == "pick: output missing from the result: a"


def test_errors_raise_names_the_row(reviews: pd.DataFrame) -> None:
    def boom(d: dict[str, Any]) -> str:
        if d["title"] == "Wine 5":
            raise RuntimeError("bad row")
        return "ok"

    chain = dask_llm.Chain(boom, inputs={"title": "title"}, outputs="x", name="boom")
    with pytest.raises(dask_llm.ChainError, match=r"row 105: boom: RuntimeError: bad row") as info:
        reviews.llm.enrich([chain], errors="raise")
    assert info.value.index == 105 and info.value.chain == "boom"
    out = reviews.llm.enrich([chain])
    assert out.loc[105, "llm_error"] == "boom: RuntimeError: bad row"


def test_empty_partitions_and_zero_rows(sim: Any, reviews: pd.DataFrame) -> None:
    ddf = dd.from_pandas(reviews, npartitions=4)
    only_some = ddf[ddf.country == "Italy"]  # some partitions keep rows, the filter is lazy
    out = only_some.llm.enrich(two_chains(sim.base_url)).compute()
    assert len(out) == 6 and out["llm_error"].isna().all()
    empty = reviews.iloc[:0]
    out = dd.from_pandas(empty, npartitions=1).llm.enrich(two_chains(sim.base_url)).compute()
    assert len(out) == 0 and "features" in out.columns
    assert len(empty.llm.enrich(two_chains(sim.base_url))) == 0


def test_duplicate_index_and_order_are_preserved(sim: Any) -> None:
    frame = pd.DataFrame({"description": ["b", "a", "c", "a"]}, index=pd.Index([3, 1, 3, 2]))
    out = frame.llm.enrich({"word": text_chain(sim.base_url)})
    pd.testing.assert_index_equal(out.index, frame.index)
    assert out["description"].tolist() == ["b", "a", "c", "a"]


@pytest.mark.parametrize(
    "scheduler", ["sync", "threads", pytest.param("processes", marks=pytest.mark.slow)]
)
def test_schedulers_with_one_shared_chain_object(
    sim: Any, reviews: pd.DataFrame, scheduler: str
) -> None:
    chains = two_chains(sim.base_url)
    ddf = dd.from_pandas(reviews, npartitions=6)
    out = ddf.llm.enrich(chains, cache=False)
    first = out.compute(scheduler=scheduler)
    second = out.compute(scheduler=scheduler)  # a second run on fresh loops, calling again
    assert first["llm_error"].isna().all()
    pd.testing.assert_frame_equal(first, second)


def test_the_simulator_answers_deterministically_so_schedulers_agree(
    sim: Any, reviews: pd.DataFrame
) -> None:
    out = dd.from_pandas(reviews, npartitions=4).llm.enrich(two_chains(sim.base_url), cache=False)
    pd.testing.assert_frame_equal(out.compute(scheduler="threads"), out.compute(scheduler="sync"))


@pytest.mark.slow
def test_factory_chains_are_built_on_the_worker(sim: Any, reviews: pd.DataFrame) -> None:
    url = sim.base_url

    def make_summary() -> Any:
        return summary_chain(url)

    out = dd.from_pandas(reviews, npartitions=2).llm.enrich(
        [
            dask_llm.Chain.from_factory(
                make_summary,
                outputs=["summary", "sentiment"],
                inputs={"description": "description"},
            )
        ]
    )
    assert out.compute(scheduler="processes")["llm_error"].isna().all()


@pytest.mark.parametrize("kind", ["pandas", "dask"])
def test_a_factory_that_fails_where_it_runs_is_reported_once_per_job(
    sim: Any, reviews: pd.DataFrame, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 28: a factory failing on workers flooded the log with ~20 tracebacks, one per
    row task whose exception nobody read, and ran again for every row."""
    calls: list[int] = []

    def no_credentials_here() -> Any:
        calls.append(1)
        raise RuntimeError("no credentials here")

    chain = dask_llm.Chain.from_factory(
        no_credentials_here, inputs={"description": "description"}, outputs="note", name="s"
    )
    data: Any = dd.from_pandas(reviews, npartitions=4) if kind == "dask" else reviews
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(dask_llm.WorkerSetupError, match="chain 's' cannot be built") as info:
            out = data.llm.enrich([chain], cache=False)
            if kind == "dask":
                out.compute(scheduler="threads")
        gc.collect()  # asyncio logs an unread task exception when the task is collected
    assert isinstance(info.value.__cause__, RuntimeError) or kind == "dask"
    assert "RuntimeError: no credentials here" in str(info.value)
    # At most twice here (its fingerprint, the prompt-order check: a failure is not kept
    # on the chain), then once where it runs: not once per row, nor per partition.
    assert 1 <= len(calls) <= 3
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "chain 's' cannot be built" in tracebacks[0].getMessage()
    assert requests_of(sim) == 0


def requests_of(sim: Any) -> int:
    return int(sim.stats()["requests"])


def test_a_function_with_defaults_is_a_row_function_not_a_factory() -> None:
    def shout(d: dict[str, Any] | None = None) -> str:
        return str((d or {}).get("x", "")).upper()

    out = pd.DataFrame({"x": ["a", "b"]}).llm.enrich(
        [dask_llm.Chain(shout, inputs={"x": "x"}, outputs="y")], usage=False, cache=False
    )
    assert out["y"].tolist() == ["A", "B"]


def test_a_bare_zero_argument_function_is_still_a_factory_with_a_warning(sim: Any) -> None:
    url = sim.base_url

    def make() -> Any:
        return summary_chain(url)

    with pytest.warns(FutureWarning, match="Chain.from_factory"):
        chain = dask_llm.Chain(make)
    out = pd.DataFrame({"description": ["x"]}).llm.enrich([chain], cache=False)
    assert out["llm_error"].isna().all()


def test_inside_a_running_event_loop(sim: Any, reviews: pd.DataFrame) -> None:
    """A Jupyter cell: the caller's thread already runs a loop."""
    chains = two_chains(sim.base_url)
    ddf = dd.from_pandas(reviews, npartitions=2)

    async def cell() -> tuple[pd.DataFrame, pd.DataFrame]:
        lazy = ddf.llm.enrich(chains).compute(scheduler="sync")
        eager = reviews.llm.enrich(chains)
        return lazy, eager

    lazy, eager = asyncio.run(cell())
    assert lazy["llm_error"].isna().all() and eager["llm_error"].isna().all()


@pytest.mark.parametrize("which", ["same-chain", "new-model-same-url"])
def test_users_own_loops_still_work_after_a_job(
    make_simulator: Any, reviews: pd.DataFrame, which: str
) -> None:
    """langchain-openai caches one httpx client per base URL; our loops must never bind it.

    (Each case gets its own simulator URL: two ``asyncio.run`` calls of the user's own on one
    cached client fail in langchain-openai itself, engine or not.)
    """
    url = make_simulator().base_url
    chain = summary_chain(url)
    reviews.llm.enrich([dask_llm.Chain(chain)], cache=False)
    dd.from_pandas(reviews, npartitions=2).llm.enrich(
        [dask_llm.Chain(chain)], cache=False
    ).compute()
    target = chain if which == "same-chain" else summary_chain(url)
    assert isinstance(asyncio.run(target.ainvoke({"description": "x"})), Summary)


def test_sync_only_chains_run_in_a_bounded_pool_off_the_loop() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    def slow(d: dict[str, Any]) -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return d["x"].upper()

    frame = pd.DataFrame({"x": [f"v{i}" for i in range(40)]})
    out = frame.llm.enrich(
        [dask_llm.Chain(slow, inputs={"x": "x"}, outputs="y")], sync_threads=4, usage=False
    )
    assert out["y"].tolist() == [f"V{i}" for i in range(40)]
    assert peak == 4  # in parallel, and no more than the pool allows


def test_chains_tokenize_deterministically(sim: Any) -> None:
    a = dask_llm.Chain(summary_chain(sim.base_url), name="s")
    b = dask_llm.Chain(summary_chain(sim.base_url), name="s")
    c = dask_llm.Chain(summary_chain(sim.base_url, temperature=0.9), name="s")
    assert dask.base.tokenize(a) == dask.base.tokenize(b)
    assert dask.base.tokenize(a) != dask.base.tokenize(c)


def test_prompt_change_changes_the_fingerprint(sim: Any) -> None:
    p1 = ChatPromptTemplate.from_template("A {description}") | llm(sim.base_url)
    p2 = ChatPromptTemplate.from_template("B {description}") | llm(sim.base_url)
    assert dask_llm.Chain(p1).fingerprint != dask_llm.Chain(p2).fingerprint


@pytest.mark.parametrize("errors", ["column", "raise"])
def test_a_row_whose_text_cannot_be_sent_fails_alone(sim: Any, errors: str) -> None:
    """A lone surrogate (from a bad decode upstream) is no UTF-8: that row fails, not the job."""
    texts = [f"Review {i}: plum" for i in range(6)]
    texts[2] = "Review 2: pl\ud800um"
    df = pd.DataFrame({"description": pd.Series(texts, dtype=object, index=list("abcdef"))})
    chains = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    if errors == "raise":
        with pytest.raises(dask_llm.ChainError, match=r"row 'c'.*description.*surrogate"):
            df.llm.enrich(chains, errors="raise", cache=False)
        return
    out = df.llm.enrich(chains)
    assert out["llm_error"].notna().tolist() == [False, False, True, False, False, False]
    assert "s: input description is not valid text" in out.loc["c", "llm_error"]
    assert out.drop(index="c")["summary"].notna().all()


def test_an_error_out_of_a_pandas_job_has_no_event_loop_noise_before_it() -> None:
    """The traceback of a Ctrl-C or a raised row starts with it, not with "RuntimeError: no
    running event loop" (the probe for a running loop must not be its context)."""

    def broken(row: dict[str, Any]) -> str:
        raise KeyError("x")

    chain = dask_llm.Chain(RunnableLambda(broken), name="s", inputs={"text": "description"})
    with pytest.raises(dask_llm.ChainError) as info:
        pd.DataFrame({"description": ["plum"]}).llm.enrich([chain], errors="raise", cache=False)
    context = info.value.__context__
    assert not isinstance(context, RuntimeError), context


def test_an_ended_partition_leaves_no_rows_for_the_collector(
    sim: Any, reviews: pd.DataFrame
) -> None:
    """While partitions run, the collector runs rarely (``engine.job``): what an ended
    partition leaves in reference cycles stays until the job ends. Its run (input frame,
    values, usage per row) and the answers its transports kept for repeats held ~3.5 KB
    per call in a worker (318 -> 583 MB over the full-size job); now the run is freed
    when the partition ends (3.11; on 3.13 a finished frame may hold it, rowless) and
    the kept answers are dropped. The connections of the partition's closed loop are
    in cycles of asyncio's own (on 3.11 a socket transport holds a bound method of
    itself): the partition's end collects them."""
    gc.collect()
    gc.disable()  # what only the collector would free stays visible
    try:
        out = dd.from_pandas(reviews, npartitions=2).llm.enrich(
            two_chains(sim.base_url), cache=False, progress=False
        )
        assert out.compute(scheduler="sync")["llm_error"].isna().all()
        alive = gc.get_objects()
        rows = [len(o.df) + len(o.row_usage) for o in alive if isinstance(o, PartitionRun)]
        kept = [len(o._answers) for o in alive if isinstance(o, JobTransport)]
        # The job's side of its connections: the in-process simulator's side closes on
        # its own loop, in its own time.
        closed = [
            o
            for o in alive
            if isinstance(o, asyncio.Transport)
            and o.is_closing()
            and (o.get_extra_info("peername") or ("", 0))[1] == sim.port
        ]
        del alive
        assert sum(rows) == 0 and sum(kept) == 0, (rows, kept)
        assert not closed, f"{len(closed)} closed connections wait for a collection"
    finally:
        gc.enable()
