"""Usage and cost are exact or null; ``last_run()`` is the run just finished (issue 9, case 4)."""

from __future__ import annotations

from typing import Any

import dask.dataframe as dd
import httpx2
import pandas as pd
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import dask_llm
from dask_llm.core.usage import price_of
from tests.chains import llm, summary_chain

PROMPT = ChatPromptTemplate.from_template("Describe {description}")
USAGE = ("llm_input_tokens", "llm_output_tokens", "llm_cost_usd")
ROWS = pd.DataFrame({"description": [f"Review {i}: plum and tobacco" for i in range(8)]})


def usage_of(out: pd.DataFrame) -> tuple[Any, Any, Any]:
    return (
        out["llm_input_tokens"].tolist(),
        out["llm_output_tokens"].tolist(),
        out["llm_cost_usd"].tolist(),
    )


def test_tokens_and_cost_equal_what_the_provider_reported(sim: Any) -> None:
    out = ROWS.llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    stats = sim.stats()
    assert int(out["llm_input_tokens"].sum()) == stats["prompt_tokens"]
    assert int(out["llm_output_tokens"].sum()) == stats["completion_tokens"]
    price = price_of("gpt-4o-mini")
    assert price is not None
    expected = (stats["prompt_tokens"] * price[0] + stats["completion_tokens"] * price[1]) / 1e6
    assert abs(float(out["llm_cost_usd"].sum()) - expected) < 1e-9


def test_a_model_that_reports_no_usage_gets_null_not_zero() -> None:
    model = FakeListChatModel(responses=["ripe and round"] * len(ROWS))
    chains = [dask_llm.Chain(PROMPT | model | StrOutputParser(), name="d")]
    out = ROWS.llm.enrich(chains, cache=False)  # not cached: dask-llm does not see its requests
    assert out["d"].eq("ripe and round").all()
    tokens_in, tokens_out, cost = usage_of(out)
    assert all(v is pd.NA for v in tokens_in + tokens_out + cost)
    summary = dask_llm.last_run()
    assert summary is not None and summary.cost_usd is None
    assert summary.rows_without_usage == len(ROWS)


def test_a_model_with_its_own_http_client_reports_through_langchain(sim: Any) -> None:
    """Its requests bypass our transport; LangChain's usage_metadata has the exact counts."""
    # No kept-alive connections: this client outlives the partition's event loop.
    own = httpx2.AsyncClient(limits=httpx2.Limits(max_keepalive_connections=0))
    model = llm(sim.base_url, http_async_client=own)
    chains = [dask_llm.Chain(PROMPT | model | StrOutputParser(), name="d")]
    with pytest.warns(UserWarning, match=r"chain 'd' \(ChatOpenAI\('gpt-4o-mini'\)\).*not cached"):
        out = ROWS.llm.enrich(chains)
    stats = sim.stats()
    assert int(out["llm_input_tokens"].sum()) == stats["prompt_tokens"]
    assert int(out["llm_output_tokens"].sum()) == stats["completion_tokens"]
    assert out["llm_cost_usd"].notna().all()


def test_a_stream_without_usage_is_null(sim: Any) -> None:
    model = llm(sim.base_url, streaming=True, stream_usage=False)
    out = ROWS.llm.enrich([dask_llm.Chain(PROMPT | model | StrOutputParser(), name="d")])
    assert out["d"].notna().all()
    tokens_in, _, cost = usage_of(out)
    assert all(v is pd.NA for v in tokens_in + cost)


def test_answers_from_the_cache_cost_nothing_in_this_run(sim: Any, tmp_path: Any) -> None:
    chains = [dask_llm.Chain(summary_chain(sim.base_url), name="s")]
    ROWS.llm.enrich(chains, cache=tmp_path / "c.sqlite")
    again = ROWS.llm.enrich(chains, cache=tmp_path / "c.sqlite")
    tokens_in, tokens_out, cost = usage_of(again)
    assert set(tokens_in) == {0} and set(tokens_out) == {0} and set(cost) == {0.0}
    summary = dask_llm.last_run()
    assert summary is not None and summary.cache_hits == len(ROWS) and summary.calls == 0


def test_a_row_that_got_no_answer_in_time_has_null_usage(make_simulator: Any) -> None:
    """Issue 28: a timed-out row said 0 tokens and $0, as if an answer had cost nothing; a
    request that timed out may be billed, and no provider reports what it cost."""
    hanging = make_simulator(hang=1.0, hang_seconds=1.0)
    answering = make_simulator()
    too_short = make_simulator(context_tokens=5)  # a 400: never billed, exactly 0
    chains = {
        "late": PROMPT | llm(hanging.base_url) | StrOutputParser(),
        "refused": PROMPT | llm(too_short.base_url) | StrOutputParser(),
    }
    options: dict[str, Any] = {
        "cache": False,
        "request_timeout": 0.2,
        "retry": dask_llm.RetryPolicy(attempts=2, wait_initial=0.01, wait_max=0.02),
    }
    rows = ROWS.head(3)
    late = rows.llm.enrich({"late": chains["late"]}, **options)
    assert late["llm_error"].str.contains("Timeout").all()
    assert late[list(USAGE)].isna().all().all()  # unknown: null, not a guessed zero
    refused = rows.llm.enrich({"refused": chains["refused"]}, **options)
    assert refused["llm_error"].str.contains("400").all()
    assert usage_of(refused) == ([0, 0, 0], [0, 0, 0], [0.0, 0.0, 0.0])  # exact: not billed
    # A row with a paid answer shows what was paid, beside the chain that timed out.
    both = rows.llm.enrich(
        {"late": chains["late"], "ok": PROMPT | llm(answering.base_url) | StrOutputParser()},
        **options,
    )
    assert both["llm_error"].str.contains("late: ").all()
    assert (both["llm_input_tokens"] > 0).all() and (both["llm_cost_usd"] > 0).all()


@pytest.mark.slow
def test_last_run_after_the_process_pool_is_that_run(sim: Any) -> None:
    """Children of dask's process pool report through the client's hub: no stale summary."""
    ROWS.head(2).llm.enrich([dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False)
    sim.reset()
    frame = pd.DataFrame({"description": [f"Review {i}" for i in range(30)]})
    out = dd.from_pandas(frame, npartitions=3).llm.enrich(
        [dask_llm.Chain(summary_chain(sim.base_url), name="s")], cache=False
    )
    out.compute(scheduler="processes", num_workers=2)
    summary = dask_llm.last_run()
    assert summary is not None
    assert summary.rows == 30 and summary.calls == 30
    assert summary.status == "completed"
    assert summary.input_tokens == sim.stats()["prompt_tokens"]
