"""Limits told per provider, and Claude's output limit in the estimate (issue 26).

``rpm=``, ``tpm=`` and ``output_tpm=`` take a number (every provider apart) or a
mapping by provider name; ``estimate()`` projects each chain's calls at its
provider's limits, Claude's output tokens included. Every job here runs
against the simulator's ``/v1/chat/completions`` and ``/v1/messages`` through
the real ``ChatOpenAI`` and ``ChatAnthropic``.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.output_remaining import competitor
from dask_llm.cli import limit_of
from dask_llm.core.config import EnrichOptions, told
from dask_llm.limits.coordinator import MARGIN
from tests import chains
from tests.helpers import provider_ledger_rates, requests
from tests.test_claude import frame, requests_per_second, tasting_chain, text_chain


# -- the estimate: each chain at its provider's limits ------------------------------------------
def test_the_estimate_of_a_claude_chain_bound_by_its_output_limit_says_so(sim: Any) -> None:
    """50 calls of max_tokens=200 at 3,000 output tokens a minute: 200 s, where the
    requests alone (600 a minute) would take 5 s; the text names the output limit."""
    claude = {"tasting": tasting_chain(sim, max_tokens=200)}
    by_requests = frame(50).llm.estimate(claude, rpm=600, cache=False)
    by_output = frame(50).llm.estimate(claude, rpm=600, output_tpm=3_000, cache=False)
    assert by_requests.wall_s == pytest.approx(5.0)
    assert by_requests.bound_by == "anthropic's rpm=600"
    assert by_output.output_tokens == 50 * 200
    assert by_output.wall_s == pytest.approx(200.0)
    assert by_output.bound_by == "anthropic's output_tpm=3,000"
    assert "wall time ~3.3 min (bound by anthropic's output_tpm=3,000)" in str(by_output)
    assert requests(sim) == 0


def test_the_estimate_counts_anthropics_tpm_as_input_tokens_and_openais_as_both(sim: Any) -> None:
    claude = frame(20).llm.estimate(
        {"t": tasting_chain(sim, max_tokens=200)}, tpm=60_000, cache=False
    )
    assert claude.wall_s == pytest.approx(claude.input_tokens / 1_000)
    gpt = frame(20).llm.estimate({"t": chains.text_chain(sim.base_url)}, tpm=60_000, cache=False)
    assert gpt.wall_s == pytest.approx((gpt.input_tokens + gpt.output_tokens) / 1_000)


def test_the_estimate_takes_each_providers_own_limit(sim: Any) -> None:
    both = {"gpt": chains.text_chain(sim.base_url), "claude": text_chain(sim)}
    est = frame(30).llm.estimate(both, rpm={"openai": 600, "anthropic": 60}, cache=False)
    assert est.wall_s == pytest.approx(30.0)  # Claude's 30 calls at 1 a second
    assert est.bound_by == "anthropic's rpm=60"
    # A provider not named is not limited: the other's limit is the bound.
    est = frame(30).llm.estimate(both, rpm={"openai": 60}, cache=False)
    assert est.wall_s == pytest.approx(30.0) and est.bound_by == "openai's rpm=60"


# -- told per provider: checked before any request -----------------------------------------------
@pytest.mark.parametrize(
    ("limits", "error", "match"),
    [
        pytest.param(
            {"rpm": {"anthropc": 50}},
            ValueError,
            r"'anthropc', which is no provider dask-llm knows: use one of 'openai', 'anthropic'",
            id="unknown-provider",
        ),
        pytest.param(
            {"tpm": {"openai": 1_000, "anthropic": 500}},
            ValueError,
            r"names 'openai', but no chain of this job calls it \(they call: 'anthropic'\)",
            id="provider-no-chain-calls",
        ),
        pytest.param(
            {"output_tpm": {"anthropic": 0}}, ValueError, r"must be a number > 0", id="zero"
        ),
        pytest.param({"rpm": {"anthropic": "50"}}, ValueError, r"number > 0", id="text-limit"),
        pytest.param({"rpm": "fast"}, TypeError, r"a mapping of provider names", id="text"),
        pytest.param({"rpm": -5}, ValueError, r"rpm= must be > 0", id="negative"),
    ],
)
def test_a_limit_told_by_provider_is_checked_before_any_request(
    sim: Any, limits: dict[str, Any], error: type[Exception], match: str
) -> None:
    claude = {"word": text_chain(sim)}
    with pytest.raises(error, match=match):
        frame(3).llm.enrich(claude, cache=False, **limits)
    with pytest.raises(error, match=match):
        frame(3).llm.estimate(claude, cache=False, **limits)
    assert requests(sim) == 0


def test_options_keep_a_copy_of_the_mapping_and_read_each_providers_limit() -> None:
    given = {"anthropic": 50}
    options = EnrichOptions(job="j", rpm=given, tpm=90_000, output_tpm={})
    given["anthropic"] = 1
    assert options.rpm == {"anthropic": 50.0} and options.output_tpm is None
    assert told(options.rpm, "anthropic") == 50.0 and told(options.rpm, "openai") is None
    assert told(options.tpm, "anthropic") == told(options.tpm, "openai") == 90_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("600", 600.0, id="number"),
        pytest.param("anthropic=50,openai=30000", {"anthropic": 50, "openai": 30_000}, id="both"),
        pytest.param(" anthropic = 50 ", {"anthropic": 50}, id="spaces"),
    ],
)
def test_the_cli_reads_a_limit_for_every_provider_or_by_provider(
    text: str, expected: object
) -> None:
    assert limit_of(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "fast", "anthropic", "anthropic=0", "anthropic=x,"])
def test_the_cli_refuses_a_limit_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="above 0"):
        limit_of(text)


# -- a two-provider job, each at its own limit told ----------------------------------------------
@pytest.mark.slow
def test_a_two_provider_job_holds_each_providers_own_limit_told(make_simulator: Any) -> None:
    """OpenAI told 900 a minute, Claude 180 (3 a second), each provider's simulator allowing
    twice that (and saying so in its headers): each provider's requests keep to its own
    limit told, lent from a ledger of its own, with no 429."""
    openai = make_simulator(rpm=1800, limit_window=1.0, latency=0.05)
    anthropic_ = make_simulator(rpm=360, limit_window=1.0, latency=0.05)
    out = frame(36).llm.enrich(
        {"gpt": chains.text_chain(openai.base_url), "claude": text_chain(anthropic_)},
        cache=False,
        rpm={"openai": 900, "anthropic": 180},
    )
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    for sim in (openai, anthropic_):
        stats = sim.stats()
        assert stats["successes"] == 36 and stats["rate_limited"] == 0, (sim, stats)
    # Claude at its own limit told, not at its simulator's 6/s nor at OpenAI's 15/s (0.7x
    # leaves a busy machine room); OpenAI's requests follow Claude's rows, within their own.
    assert 0.7 * 3 <= requests_per_second(anthropic_) <= 3.0 + 1e-9
    assert anthropic_.stats()["peak_requests_1s"] <= 4
    assert openai.stats()["peak_requests_1s"] <= 15
    openai_rate, anthropic_rate = provider_ledger_rates()
    assert openai_rate == pytest.approx(15 * (1 - MARGIN))
    assert anthropic_rate == pytest.approx(3 * (1 - MARGIN))


def test_a_provider_not_named_is_paced_to_what_its_headers_announce(make_simulator: Any) -> None:
    """rpm={"openai": 120}: OpenAI's requests at 2 a second; Claude's not at OpenAI's
    limit, but at what its own headers announce (10 a second), as with none told."""
    sim = make_simulator(rpm=600, limit_window=2.0, latency=0.02)
    out = frame(8).llm.enrich(
        {"word": text_chain(sim), "gpt": chains.text_chain(sim.base_url)},
        cache=False,
        rpm={"openai": 120},
    )
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    openai_rate, anthropic_rate = provider_ledger_rates()
    assert openai_rate == pytest.approx(2 * (1 - MARGIN))
    assert anthropic_rate == pytest.approx(10 * (1 - MARGIN))


# -- Claude's output bucket follows what the provider says is left -------------------------------
@pytest.mark.slow
def test_a_claude_job_sharing_its_output_limit_follows_what_is_left(make_simulator: Any) -> None:
    """Another client of the account takes a third of the output limit: the job's bucket
    follows ``anthropic-ratelimit-output-tokens-remaining`` down and meets few 429s (it
    met one on 12-17% of its requests when its bucket knew only the limit)."""
    otpm = 18_000  # 300 output tokens/s; the other client takes ~100/s of them
    sim = make_simulator(
        output_tpm=otpm, rpm=60_000, limit_window=1.0, latency=0.05, completion_tokens=20
    )
    with competitor(sim.base_url, 100.0) as other:
        out = frame(120).llm.enrich(
            {"word": text_chain(sim, max_tokens=32)}, cache=False, output_tpm=otpm
        )
    assert out["llm_error"].isna().all(), out["llm_error"].dropna().head().tolist()
    stats = sim.stats()
    sent, limited = stats["requests"] - other["sent"], stats["rate_limited"] - other["limited"]
    assert sent >= 120 and limited <= 0.05 * sent, (limited, sent)
