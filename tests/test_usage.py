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
