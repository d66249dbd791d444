"""Faults that matter to a client's retry logic, and the per-second series of the stats."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import openai
import pytest

from dask_llm.simulator import Simulator, fetch_stats
from dask_llm.simulator._stats import SERIES_SECONDS, Series


def client(sim: Simulator, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", **kwargs)


def ask(c: openai.OpenAI, content: str = "A ripe Zinfandel.") -> Any:
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )


def no_rate_limit_headers(headers: Any) -> bool:
    return not any(k.lower().startswith("x-ratelimit") for k in headers)


# -- spurious 429 ------------------------------------------------------------------------------
def test_a_spurious_429_is_not_the_quota(make_simulator: Any) -> None:
    sim = make_simulator(spurious_429=1.0, spurious_retry_after=0.25, rpm=600)
    with client(sim) as c, pytest.raises(openai.RateLimitError) as info:
        ask(c)
    err = info.value
    assert err.code == "server_overloaded"
    assert err.body == {  # the SDK hands over the inner error object
        "message": "The server is currently overloaded, please try again later.",
        "type": "server_error",
        "param": None,
        "code": "server_overloaded",
    }
    headers = err.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "250")
    assert headers["x-request-id"].startswith("req_")
    assert no_rate_limit_headers(headers)
    stats = sim.stats()
    assert stats["faults"]["spurious_429"] == 1 and stats["rate_limited"] == 0


def test_spurious_429s_consume_no_quota(make_simulator: Any) -> None:
    sim = make_simulator(spurious_429=0.5, rpm=600, seed=3)  # 10 requests per second
    ok = spurious = 0
    with client(sim) as c:
        while ok < 10:
            try:
                ask(c, f"row {ok + spurious}")
                ok += 1
            except openai.RateLimitError as exc:
                assert exc.code == "server_overloaded"
                spurious += 1
        with pytest.raises(openai.RateLimitError) as info:
            for k in range(20):  # the quota is spent: the next non-spurious request is refused
                ask(c, f"extra {k}")
    assert spurious >= 3
    stats = sim.stats()
    assert stats["faults"]["spurious_429"] >= spurious
    assert stats["rate_limited"] == 1 and info.value.code == "rate_limit_exceeded"


def test_the_sdk_retries_a_spurious_429_after_its_retry_after(make_simulator: Any) -> None:
    sim = make_simulator(spurious_429=0.6, spurious_retry_after=0.05, seed=1)
    with client(sim, max_retries=8) as c:
        for k in range(5):
            assert ask(c, f"retried {k}").parse().choices
    stats = sim.stats()
    assert stats["successes"] == 5 and stats["faults"]["spurious_429"] > 0


# -- billing, permission -----------------------------------------------------------------------
def test_insufficient_quota_gets_the_billing_body(make_simulator: Any) -> None:
    sim = make_simulator(insufficient_quota=True, rpm=600)
    with client(sim) as c, pytest.raises(openai.RateLimitError) as info:
        ask(c)
    err = info.value
    assert err.code == "insufficient_quota"
    assert err.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert err.body["message"].startswith(  # type: ignore[index]
        "You exceeded your current quota, please check your plan and billing details."
    )
    assert "retry-after" not in err.response.headers
    assert no_rate_limit_headers(err.response.headers)
    stats = sim.stats()
    assert stats["faults"]["insufficient_quota"] == 1 and stats["rate_limited"] == 0


def test_quota_after_n_answers(make_simulator: Any) -> None:
    sim = make_simulator(quota_after=3)
    with client(sim) as c:
        for k in range(3):
            ask(c, f"paid {k}")
        for k in range(2):
            with pytest.raises(openai.RateLimitError) as info:
                ask(c, f"unpaid {k}")
            assert info.value.code == "insufficient_quota"
    stats = sim.stats()
    assert stats["successes"] == 3 and stats["faults"]["insufficient_quota"] == 2
    sim.reset()
    with client(sim) as c:
        assert ask(c).parse().choices  # a reset gives the quota back


def test_forbidden_gets_a_403(make_simulator: Any) -> None:
    sim = make_simulator(forbidden=1.0)
    with client(sim, max_retries=2) as c, pytest.raises(openai.PermissionDeniedError) as info:
        ask(c)
    assert info.value.status_code == 403 and info.value.code == "permission_denied"
    stats = sim.stats()
    assert stats["requests"] == 1, "403 is not retried"
    assert stats["faults"]["forbidden"] == 1 and stats["rate_limited"] == 0


def test_fault_draws_are_seeded(make_simulator: Any) -> None:
    def outcomes(seed: int) -> list[str]:
        sim = make_simulator(forbidden=0.2, spurious_429=0.3, error_rate=0.2, seed=seed)
        result = []
        with client(sim) as c:
            for k in range(40):
                try:
                    ask(c, f"row {k}")
                    result.append("ok")
                except openai.APIStatusError as exc:
                    result.append(str(exc.status_code))
        return result

    first = outcomes(5)
    assert first == outcomes(5) != outcomes(6)
    assert {"ok", "403", "429", "500"} <= set(first)


# -- the series --------------------------------------------------------------------------------
def test_series_counts_each_second_as_documented(make_simulator: Any) -> None:
    sim = make_simulator(rpm=180, api_key="sk-test")  # 3 requests per second
    sim.reset()  # t = 0 starts now
    with client(sim) as c:
        for k in range(5):  # 3 answered, 2 refused by the quota
            with contextlib.suppress(openai.RateLimitError):
                ask(c, f"first second {k}")
    wrong = openai.OpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        ask(wrong)
    time.sleep(max(0.0, 1.05 - (time.monotonic() - sim.app.stats.series.origin)))
    with client(sim) as c:
        ask(c, "second second")
    stats = fetch_stats(sim.base_url)
    series = stats["series"]
    assert [row["t"] for row in series] == list(range(len(series)))
    totals = {k: sum(row[k] for row in series) for k in series[0] if k != "t"}
    assert totals == {
        "requests": 7,
        "successes": 4,
        "rate_limited": 2,
        "spurious_429": 0,
        "faults": 1,
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "cached_tokens": 0,
    }
    first, last = series[0], series[-1]
    assert (first["requests"], first["successes"], first["rate_limited"]) == (6, 3, 2)
    assert first["faults"] == 1
    assert last["requests"] == last["successes"] == 1 and last["t"] >= 1
    assert abs(stats["series_origin"] - time.time()) < 60


def test_series_counts_concurrent_arrivals_and_restarts_on_reset(sim: Simulator) -> None:
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
            await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"wine {k}"}]
                    )
                    for k in range(50)
                )
            )

    asyncio.run(main())
    stats = sim.stats()
    assert sum(row["requests"] for row in stats["series"]) == 50
    assert sum(row["successes"] for row in stats["series"]) == 50
    sim.reset()
    series = sim.stats()["series"]
    assert len(series) == 1 and series[0]["t"] == 0 and series[0]["requests"] == 0


def test_series_is_dense_and_bounded() -> None:
    series = Series(origin=1000.0, origin_unix=0.0)
    for now in (1000.2, 1000.7, 1003.1):
        row = series.row(now)
        assert row is not None
        row[0] += 1
    rows = series.snapshot(1004.5)
    assert [(r["t"], r["requests"]) for r in rows] == [(0, 2), (1, 0), (2, 0), (3, 1), (4, 0)]
    assert series.row(999.0) is None  # before the origin (arrived before a reset)
    rows = series.snapshot(1000.0 + 5000.5)
    assert len(rows) == SERIES_SECONDS
    assert (rows[0]["t"], rows[-1]["t"]) == (5000 - SERIES_SECONDS + 1, 5000)
    assert series.row(1000.0 + 1000.0) is None  # dropped: older than the last hour
    late = series.row(1000.0 + 4999.5)
    assert late is not None
    late[1] += 1
    assert series.snapshot(1000.0 + 5000.9)[-2]["successes"] == 1
