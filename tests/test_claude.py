"""Claude chains (``ChatAnthropic``) get what OpenAI chains get (issue 26).

Every test drives the simulator's ``/v1/messages`` through the real anthropic
SDK and ``ChatAnthropic``: structured output by tool use, plain text and
``| parser`` chains, the request cache, pacing to a told limit, the budget,
the breaker, and a LocalCluster whose workers read ``ANTHROPIC_API_KEY`` from
their own environment.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import anthropic
import cloudpickle
import dask.dataframe as dd
import distributed
import pandas as pd
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_core.output_parsers import PydanticOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from pydantic import BaseModel

import dask_llm
from dask_llm.core.usage import price_of
from dask_llm.limits.coordinator import MARGIN
from tests import chains
from tests.helpers import ROOT, provider_ledger_rates, requests

MODEL = "claude-haiku-4-5"


class Tasting(BaseModel):
    grape: str
    score: int
    style: Literal["red", "white", "rose"]


def claude(sim: Any, **kwargs: Any) -> ChatAnthropic:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("max_tokens", 200)
    return ChatAnthropic(base_url=sim.anthropic_base_url, **kwargs)


def tasting_chain(sim: Any, **kwargs: Any) -> Runnable:
    prompt = ChatPromptTemplate.from_template("Taste this wine: {description}")
    return prompt | claude(sim, **kwargs).with_structured_output(Tasting)


def text_chain(sim: Any, **kwargs: Any) -> Runnable:
    prompt = ChatPromptTemplate.from_template("One word for {description}")
    return prompt | claude(sim, **kwargs) | StrOutputParser()


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"description": [f"Review {i}: cassis, cedar and graphite" for i in range(n)]}
    )


def paid(sim: Any, model: str = MODEL) -> float:
    """What the simulator was paid, at the price table's rates (no prompt caching here)."""
    stats = sim.stats()
    price = price_of(model)
    assert price is not None
    return (stats["prompt_tokens"] * price.input + stats["completion_tokens"] * price.output) / 1e6


def check_answered(out: pd.DataFrame, sim: Any, rows: int) -> None:
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    assert len(out) == rows
    assert out["grape"].dtype == "string" and out["score"].dtype == "Int64"
    assert set(out["style"]) <= {"red", "white", "rose"}
    assert out["llm_input_tokens"].notna().all() and (out["llm_input_tokens"] > 0).all()
    assert out["llm_output_tokens"].notna().all()
    # Every row's cost is its tokens at Claude's prices; together, what the provider was paid.
    price = price_of(MODEL)
    assert price is not None
    expected = (
        out["llm_input_tokens"] * price.input + out["llm_output_tokens"] * price.output
    ) / 1e6
    pd.testing.assert_series_equal(out["llm_cost_usd"], expected, check_names=False, rtol=1e-9)
    assert out["llm_cost_usd"].sum() == pytest.approx(paid(sim), rel=1e-9)


def test_a_structured_claude_chain_on_threads_then_again_from_the_cache(sim: Any) -> None:
    ddf = dd.from_pandas(frame(300), npartitions=4)
    out = ddf.llm.enrich({"tasting": tasting_chain(sim)}).compute(scheduler="threads")
    check_answered(out, sim, 300)
    assert requests(sim) == 300
    assert sim.stats()["duplicate_requests"] == 0

    again = ddf.llm.enrich({"tasting": tasting_chain(sim)}).compute(scheduler="threads")
    assert requests(sim) == 300  # a rerun sends nothing: the request cache answers it all
    pd.testing.assert_frame_equal(
        again.drop(columns=["llm_cost_usd", "llm_input_tokens", "llm_output_tokens"]),
        out.drop(columns=["llm_cost_usd", "llm_input_tokens", "llm_output_tokens"]),
    )
    assert (again["llm_cost_usd"] == 0).all()  # served from the cache: nothing paid


@pytest.mark.slow  # a LocalCluster
@pytest.mark.parametrize("rows", [40, 300])
def test_a_structured_claude_chain_on_a_local_cluster(
    sim: Any, shared_cluster: Any, rows: int
) -> None:
    # Two worker processes: each rebuilds the model from its recipe, reading
    # ANTHROPIC_API_KEY from its own environment, and opens its own clients per loop.
    ddf = dd.from_pandas(frame(rows), npartitions=4)
    with distributed.Client(shared_cluster) as client:
        out = client.compute(ddf.llm.enrich({"tasting": tasting_chain(sim)})).result()
        check_answered(out, sim, rows)
        assert requests(sim) == rows
        again = client.compute(ddf.llm.enrich({"tasting": tasting_chain(sim)})).result()
    assert requests(sim) == rows  # the rerun is answered by the cache
    assert again["llm_error"].isna().all()


def test_the_anthropic_key_is_not_in_the_task_graph(sim: Any) -> None:
    key = os.environ["ANTHROPIC_API_KEY"]
    explicit = tasting_chain(sim, api_key="sk-ant-explicit-SECRET")
    for chain in (tasting_chain(sim), explicit):
        out = dd.from_pandas(frame(10), npartitions=2).llm.enrich({"tasting": chain})
        blob = cloudpickle.dumps(dict(out.__dask_graph__()))
        assert key.encode() not in blob and b"SECRET" not in blob
        assert pickle.loads(blob)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("text", id="text"),
        pytest.param("pydantic-parser", id="pydantic-parser"),
    ],
)
def test_plain_text_and_parser_chains(sim: Any, shape: str) -> None:
    if shape == "text":
        chain = text_chain(sim)
    else:
        parser = PydanticOutputParser(pydantic_object=Tasting)
        prompt = ChatPromptTemplate.from_template(
            "Taste this wine: {description}\n{format}"
        ).partial(format=parser.get_format_instructions())
        chain = prompt | claude(sim) | parser
    out = frame(40).llm.enrich({"answer": chain}, cache=False)
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    column = "answer" if shape == "text" else "grape"
    assert out[column].notna().all()
    assert requests(sim) == 40
    assert out["llm_cost_usd"].sum() == pytest.approx(paid(sim), rel=1e-9)


def test_the_budget_stops_a_claude_job_at_its_bound(make_simulator: Any) -> None:
    full = make_simulator()
    frame(120).llm.enrich({"tasting": tasting_chain(full, max_tokens=60)}, cache=False)
    budget = paid(full) / 2
    sim = make_simulator(latency=0.02)
    out = frame(120).llm.enrich(
        {"tasting": tasting_chain(sim, max_tokens=60)}, cache=False, budget_usd=budget
    )
    spent = paid(sim)
    assert spent <= budget * (1 + 1e-9)  # the stated bound
    assert spent >= 0.7 * budget
    stopped = out["llm_error"].dropna()
    assert len(stopped) > 0 and stopped.str.contains("budget reached").all()


def test_a_bad_key_stops_the_job_and_overload_is_retried(make_simulator: Any) -> None:
    sim = make_simulator(api_key="the-right-key")
    out = frame(50).llm.enrich({"tasting": tasting_chain(sim)}, cache=False)
    errors = out["llm_error"]
    sent = errors.str.contains("AuthenticationError")
    # The breaker: rows whose turn came after the first 401 were not sent.
    assert sent.any() and (sent | errors.str.contains("not sent: the provider refused")).all()
    assert errors.str.contains("401").all()
    assert requests(sim) == sent.sum() < 50  # a 401 is not retried

    busy = make_simulator(overloaded=0.2, seed=1)
    out = frame(50).llm.enrich(
        {"tasting": tasting_chain(busy)},
        cache=False,
        retry=dask_llm.RetryPolicy(attempts=8, wait_initial=0.01, wait_max=0.05),
    )
    assert out["llm_error"].isna().all()
    assert busy.stats()["faults"]["overloaded"] > 0


@pytest.mark.slow
def test_a_strict_limit_told_holds_with_few_429s(make_simulator: Any) -> None:
    # 20 requests/s, Anthropic-style: a bucket of one second's requests, refilled continuously.
    sim = make_simulator(rpm=1200, latency=0.05)
    ddf = dd.from_pandas(frame(300), npartitions=4)
    out = ddf.llm.enrich({"tasting": tasting_chain(sim)}, rpm=1200, cache=False).compute(
        scheduler="threads"
    )
    assert out["llm_error"].isna().all()
    stats = sim.stats()
    assert stats["successes"] == 300
    assert stats["rate_limited"] <= 0.005 * stats["requests"], stats["rate_limited"]
    # The report's limit line: Anthropic's own header read (it was OpenAI's name only).
    summary = dask_llm.last_run()
    assert summary is not None and summary.record is not None
    assert summary.record.limit_rpm == 1200


def output_per_second(sim: Any) -> tuple[float, int]:
    """Output tokens a second the simulator answered with over the job's whole seconds (its
    first and last, partial, left out), and how many seconds those are."""
    rows = sim.stats()["series"]
    busy = [k for k, row in enumerate(rows) if row["successes"]]
    inner = rows[busy[0] + 1 : busy[-1]]
    return sum(row["completion_tokens"] for row in inner) / max(1, len(inner)), len(inner)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("told", "window"),
    [
        # Learned from the first answers: the 16 requests sent before (at 32 tokens each)
        # fit in a bucket of two seconds' output.
        pytest.param(False, 2.0, id="learned"),
        pytest.param(True, 1.0, id="told"),  # told: a bucket of one second's, from the start
    ],
)
def test_a_claude_job_bound_by_its_output_limit_paces_to_it(
    make_simulator: Any, told: bool, window: float
) -> None:
    """Output tokens per minute bind (requests and input tokens do not): the job books each
    request's max_tokens from a bucket of its own and gets back what the answer did not use,
    so it runs near the output limit without 429s."""
    otpm = 18_000  # 300 output tokens/s; each answer uses ~26 of its 32: ~11 requests/s
    sim = make_simulator(
        output_tpm=otpm, rpm=60_000, limit_window=window, latency=0.05, completion_tokens=20
    )
    told_limit: dict[str, Any] = {"output_tpm": otpm} if told else {}
    out = frame(120).llm.enrich({"word": text_chain(sim, max_tokens=32)}, cache=False, **told_limit)
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    stats = sim.stats()
    assert stats["successes"] == 120
    assert stats["rate_limited"] <= 0.005 * stats["requests"], stats["rate_limited"]
    rate, seconds = output_per_second(sim)
    assert seconds >= 5 and rate >= 0.7 * otpm / 60, (rate, seconds)


def requests_per_second(sim: Any) -> float:
    """Requests a second the simulator saw over the job's whole seconds."""
    rows = sim.stats()["series"]
    busy = [k for k, row in enumerate(rows) if row["requests"]]
    inner = rows[busy[0] + 1 : busy[-1]]
    return sum(row["requests"] for row in inner) / max(1, len(inner))


@pytest.mark.slow
def test_a_job_with_an_openai_and_a_claude_chain_paces_each_to_its_own_limit(
    make_simulator: Any,
) -> None:
    """Each provider's requests are paced to the limits its own headers announce: Claude's
    5 requests/s are not a share of one pace for the whole job (the lower of the two limits,
    split between both providers), and OpenAI's 15/s are OpenAI's."""
    # 15 and 5 requests/s; the 16 requests each sends before it knows its limit fit in its
    # window (two seconds of OpenAI's, a bucket of four of Anthropic's).
    openai = make_simulator(rpm=900, limit_window=2.0, latency=0.05)
    anthropic_ = make_simulator(rpm=300, limit_window=4.0, latency=0.05)
    out = frame(50).llm.enrich(
        {"gpt": chains.text_chain(openai.base_url), "claude": text_chain(anthropic_)},
        cache=False,
    )
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    for sim in (openai, anthropic_):
        stats = sim.stats()
        assert stats["successes"] == 50
        # At most one 429 each: a machine busy elsewhere delays a request past its slot.
        assert stats["rate_limited"] <= 1, (sim, stats["rate_limited"])
    # Claude at its own limit (each row waits for its Claude call: OpenAI's follow); one
    # pace for the job gave it half (2.4-3.1/s measured); 0.7x leaves a busy machine room.
    assert 0.7 * 5 <= requests_per_second(anthropic_) <= 5.0
    # OpenAI's requests follow Claude's rows; a busy machine bunched one over (16 seen).
    assert openai.stats()["peak_requests_1s"] <= 16
    # Each provider's requests were lent from a ledger of its own, at that provider's limit.
    openai_rate, anthropic_rate = provider_ledger_rates()
    assert openai_rate == pytest.approx(15 * (1 - MARGIN))
    assert anthropic_rate == pytest.approx(5 * (1 - MARGIN))


def test_estimate_prices_a_claude_chain(sim: Any) -> None:
    estimate = frame(50).llm.estimate({"tasting": tasting_chain(sim, max_tokens=40)})
    price = price_of(MODEL)
    assert price is not None
    assert estimate.cost_usd == pytest.approx(
        (estimate.input_tokens * price.input + estimate.output_tokens * price.output) / 1e6
    )
    assert requests(sim) == 0


# -- the Message Batches API -------------------------------------------------------------------
FAST = {"batch_delay": 0.3, "batch_cancel_delay": 0.05}
POLL = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1)


def batch_stats(sim: Any) -> dict[str, int]:
    return {k: v for k, v in sim.stats().items() if k.startswith("message_batch")}


def test_batch_goes_through_message_batches_at_half_the_price(make_simulator: Any) -> None:
    sim = make_simulator(seed=3, **FAST)
    ddf = dd.from_pandas(frame(30), npartitions=2)
    batched = ddf.llm.enrich({"tasting": tasting_chain(sim)}, cache=False, batch=POLL).compute(
        scheduler="threads"
    )
    assert requests(sim) == 0  # not one online request
    stats = batch_stats(sim)
    assert stats["message_batches_created"] == 2  # one per partition
    assert stats["message_batch_requests"] == stats["message_batch_succeeded"] == 30
    online = ddf.llm.enrich({"tasting": tasting_chain(sim)}, cache=False).compute(
        scheduler="threads"
    )
    assert requests(sim) == 30
    same = [c for c in batched.columns if c != "llm_cost_usd"]
    pd.testing.assert_frame_equal(batched[same], online[same])
    assert batched["llm_cost_usd"].sum() / online["llm_cost_usd"].sum() == pytest.approx(0.5)


def test_an_expired_message_batch_keeps_its_done_lines_and_resubmits_the_rest(
    make_simulator: Any,
) -> None:
    sim = make_simulator(batch_delay=1.0, batch_expire_after=0.3, batch_expire_count=1)
    out = frame(20).llm.enrich({"tasting": tasting_chain(sim)}, cache=False, batch=POLL)
    assert out["llm_error"].isna().all()
    stats = batch_stats(sim)
    assert stats["message_batches_created"] == 2
    assert stats["message_batch_succeeded"] == 20  # each row paid once
    assert stats["message_batch_duplicates"] == 0
    assert 20 < stats["message_batch_requests"] < 40  # the second batch: what did not run


def test_an_expired_message_batch_sends_the_rest_online_with_the_online_fallback(
    make_simulator: Any,
) -> None:
    sim = make_simulator(batch_delay=1.0, batch_expire_after=0.3)
    policy = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1, fallback="online")
    out = frame(20).llm.enrich({"tasting": tasting_chain(sim)}, cache=False, batch=policy)
    assert out["llm_error"].isna().all()
    stats = batch_stats(sim)
    assert stats["message_batches_created"] == 1
    assert requests(sim) == 20 - stats["message_batch_succeeded"] > 0
    # Online answers cost the online price, batch answers half: each row's cost says which.
    price = dask_llm.PRICES[MODEL]
    online = (out["llm_input_tokens"] * price.input + out["llm_output_tokens"] * price.output) / 1e6
    share = (out["llm_cost_usd"] / online).round(6)
    assert set(share) == {0.5, 1.0}
    assert (share == 1.0).sum() == requests(sim)


KILL_SCRIPT = """
import sys
import pandas as pd
import dask_llm
from tests.test_claude import frame, tasting_chain

class Sim:
    anthropic_base_url = sys.argv[1]

policy = dask_llm.BatchPolicy(poll_initial=0.05, poll_max=0.1)
frame(int(sys.argv[2])).llm.enrich(
    {"tasting": tasting_chain(Sim())}, batch=policy, progress=False
)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_a_message_batch_is_in_flight_then_rerun_pays_nothing_twice(
    make_simulator: Any, tmp_path: Path
) -> None:
    rows = 12
    sim = make_simulator(batch_delay=1.5, seed=5)
    cache = tmp_path / "cache.sqlite"
    proc = start_claude_job(sim, cache, rows)
    deadline = time.monotonic() + 60
    while batch_stats(sim)["message_batches_created"] < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # the batch's id is recorded in the cache right after its create call
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)

    out = frame(rows).llm.enrich({"tasting": tasting_chain(sim)}, cache=cache, batch=POLL)
    assert out["llm_error"].isna().all()
    stats = batch_stats(sim)
    assert stats["message_batches_created"] == 1  # the rerun re-attached to the killed run's
    assert stats["message_batch_requests"] == stats["message_batch_succeeded"] == rows
    assert stats["message_batch_duplicates"] == 0  # nothing paid twice
    assert requests(sim) == 0
    # Each row paid once, at the batch price, and reported by the run that read its answer.
    price = price_of(MODEL, batch=True)
    assert price is not None
    expected = (
        out["llm_input_tokens"] * price.input + out["llm_output_tokens"] * price.output
    ) / 1e6
    pd.testing.assert_series_equal(out["llm_cost_usd"], expected, check_names=False, rtol=1e-9)


def start_claude_job(sim: Any, cache: Path, rows: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_LLM_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, sim.anthropic_base_url, str(rows)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_ctrl_c_names_the_message_batches_and_they_can_be_cancelled(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = make_simulator(batch_delay=30.0, batch_cancel_delay=0.05)
    proc = start_claude_job(sim, tmp_path / "cache.sqlite", 6)
    deadline = time.monotonic() + 60
    while batch_stats(sim)["message_batches_created"] < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "batches still running: msgbatch_" in err, err
    batch_id = err.split("batches still running: ", 1)[1].split()[0].rstrip(",")
    with anthropic.Anthropic(base_url=sim.anthropic_base_url, api_key="k") as client:
        statuses = dask_llm.cancel_batches(batch_id, client=client)
    assert statuses[batch_id] in ("cancelling", "cancelled")
