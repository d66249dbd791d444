"""The simulator's Flex processing and automatic prompt caching, through the openai SDK."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from dask_llm.simulator import Simulator, SimulatorConfig
from dask_llm.simulator._prompt_cache import PromptCache

INSTRUCTION = "Follow the house style guide to the letter. " * 150  # ~1,690 tokens


def chat(sim: Simulator, text: str, **kwargs: Any) -> Any:
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        return c.chat.completions.create(
            model=kwargs.pop("model", "gpt-4o-mini"),
            messages=[
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": text},
            ],
            **kwargs,
        )


# -- Flex ------------------------------------------------------------------------------------
def test_flex_is_echoed_and_counted(sim: Simulator) -> None:
    flex = chat(sim, "A crisp Riesling.", service_tier="flex")
    listed = chat(sim, "A crisp Riesling.")
    assert flex.service_tier == "flex" and listed.service_tier == "default"
    assert flex.choices[0].message.content == listed.choices[0].message.content
    stats = sim.stats()
    assert (stats["flex_requests"], stats["flex_answered"], stats["successes"]) == (1, 1, 2)


def test_flex_is_slower_by_its_factor(make_simulator: Any) -> None:
    sim = make_simulator(latency=0.05, flex_slowdown=6.0)
    took = []
    for tier in ("default", "flex"):
        start = time.perf_counter()
        chat(sim, "A round Merlot.", service_tier=tier)
        took.append(time.perf_counter() - start)
    assert took[1] >= 0.3 > took[0]


def test_resource_unavailable_is_a_429_that_uses_no_quota(make_simulator: Any) -> None:
    sim = make_simulator(flex_unavailable=1.0, rpm=60)
    for _ in range(3):  # more than the second's quota of 1: none of them is the quota's
        with pytest.raises(openai.RateLimitError) as caught:
            chat(sim, "A dry Fino.", service_tier="flex")
        assert caught.value.code == "resource_unavailable"
        remaining = caught.value.response.headers["x-ratelimit-remaining-requests"]
        assert int(remaining) > 0
    chat(sim, "A dry Fino.")  # the quota is untouched
    stats = sim.stats()
    assert stats["faults"]["flex_unavailable"] == 3 and stats["rate_limited"] == 0
    assert stats["flex_answered"] == 0 and stats["successes"] == 1


def test_flex_unavailability_follows_its_rate(make_simulator: Any) -> None:
    sim = make_simulator(flex_unavailable=0.25, seed=5)
    refused = 0
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        for k in range(100):
            try:
                c.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"Row {k}."}],
                    service_tier="flex",
                    max_tokens=2,
                )
            except openai.RateLimitError:
                refused += 1
    assert 10 <= refused <= 40
    assert sim.stats()["faults"]["flex_unavailable"] == refused


# -- prompt caching ----------------------------------------------------------------------------
def cached(answer: Any) -> int:
    return answer.usage.prompt_tokens_details.cached_tokens


def test_a_repeated_prefix_is_cached_in_steps_of_128_tokens(sim: Simulator) -> None:
    first = chat(sim, "Row one: a ripe Malbec.")
    second = chat(sim, "Row two: a lean Chablis.")
    assert cached(first) == 0
    assert cached(second) > 0 and (cached(second) - 1024) % 128 == 0
    assert cached(second) <= len(INSTRUCTION) / 4 < cached(second) + 128 + 16
    assert sim.stats()["cached_tokens"] == cached(second)


def test_short_prompts_and_other_models_are_not_cached(sim: Simulator) -> None:
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        for _ in range(2):
            short = c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x " * 1500}]
            )
        assert cached(short) == 0  # ~750 tokens: below 1,024
    chat(sim, "Row one.")
    assert cached(chat(sim, "Row one.", model="gpt-4o")) == 0


def test_row_text_before_the_instruction_cannot_be_cached(sim: Simulator) -> None:
    def ask(text: str) -> Any:
        with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
            return c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "user", "content": text},
                    {"role": "system", "content": INSTRUCTION},
                ],
            )

    ask("Row one: a ripe Malbec.")
    assert cached(ask("Row two: a lean Chablis.")) == 0


def test_a_prefix_expires_after_its_ttl() -> None:
    cache = PromptCache(ttl=300)
    payload = {"messages": [{"role": "system", "content": "y" * 5000}]}
    assert cache.cached_tokens("m", payload, 1250, now=0.0) == 0
    assert cache.cached_tokens("m", payload, 1250, now=299.0) == 1152
    assert cache.cached_tokens("m", payload, 1250, now=598.0) == 1152  # refreshed at 299
    assert cache.cached_tokens("m", payload, 1250, now=1000.0) == 0
    assert PromptCache(ttl=0).cached_tokens("m", payload, 1250, now=0.0) == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="flex_unavailable"):
        SimulatorConfig(flex_unavailable=1.5)
    with pytest.raises(ValueError, match="prompt_cache_ttl"):
        SimulatorConfig(prompt_cache_ttl=-1)
