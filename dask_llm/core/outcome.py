"""One answer, read once: what every stage that acts on an answer needs from it.

The transport reads each HTTP answer (online, or a Batch API line) exactly
once into an ``Outcome`` (``transport.wire.outcome_of``) and hands it to the
stages that act on it: the breaker (``fatal``), the throttle (status,
headers, ``quota``), the budget (the cost), the chain call's usage
(``Attempt``), the cache (the answer's bytes) and the run record (counts,
tokens, cached tokens, the tier that served it, truncations, refusals).
Before, the body was searched for usage in the transport and again in the
recorder.

The tier an answer is priced at: a Batch API line's is ``"batch"``; an
online answer's is the ``service_tier`` it reports (OpenAI says which tier
served it), else the one the request asked for. A Flex request's 429 that
is not the quota's is ``unavailable`` (OpenAI's "Resource Unavailable": not
billed, retried with backoff, and no reason to pace slower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from dask_llm.core.usage import PriceEntry, Reported, Tier, cost_usd, price_of

#: What an answer that reported no usage reads as.
NOTHING_REPORTED: Final = Reported(None, None, None, None, None)


class Announced(NamedTuple):
    """The limits an answer's headers announce, per minute (None: not said).

    ``tpm``: the tokens its provider counts against its token limit (OpenAI: prompt and
    output; Anthropic: input tokens); ``otpm``: output tokens, where the provider limits
    them apart (Anthropic); ``otpm_left``: what its output bucket held as it answered
    (``anthropic-ratelimit-output-tokens-remaining``; 0 included).
    """

    rpm: float | None = None
    tpm: float | None = None
    otpm: float | None = None
    otpm_left: float | None = None


#: What an answer without limit headers announces.
NOTHING_ANNOUNCED: Final = Announced()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one request got back (``status`` None: no answer came)."""

    status: int | None
    headers: Mapping[str, str] | None = None
    body: bytes = b""
    #: A Batch API line (priced at the batch price).
    batch: bool = False
    #: A 429 that says the quota is spent (pace slower), not a busy server.
    quota: bool = False
    #: Why no request of the job can succeed, for ``llm_error``; None for any other answer.
    fatal: str | None = None
    model: str | None = None
    #: Tokens the answer reported (None: it reported no usage).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Prompt tokens read from the provider's prompt cache (of ``prompt_tokens``).
    cached_tokens: int | None = None
    #: Prompt tokens written to the provider's prompt cache (of ``prompt_tokens``).
    cache_write_tokens: int | None = None
    #: The limits its headers announce (the throttle learns them).
    announced: Announced = NOTHING_ANNOUNCED
    #: How the answer was served, for its price.
    tier: Tier = "default"
    #: A Flex request's 429 "resource unavailable": not the quota, not billed.
    unavailable: bool = False
    #: Cut at ``max_tokens`` (``finish_reason="length"``).
    truncated: bool = False
    #: A refusal (a non-null ``refusal``).
    refused: bool = False

    @property
    def ok(self) -> bool:
        """An answer with a status below 400 (paid for)."""
        return self.status is not None and self.status < 400

    def cost(self, prices: Mapping[str, PriceEntry] | None) -> float | None:
        """US dollars this answer cost at ``prices`` over the built-in table: 0 for an error
        answer (not billed); None when it reported no usage or its model has no price."""
        if not self.ok:
            return 0.0
        if self.prompt_tokens is None:
            return None
        price = price_of(self.model, prices, tier=self.tier)
        if price is None:
            return None
        return cost_usd(
            price,
            self.prompt_tokens,
            self.completion_tokens or 0,
            self.cached_tokens or 0,
            self.cache_write_tokens or 0,
        )


def read_outcome(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    reported: Reported = NOTHING_REPORTED,
    announced: Announced = NOTHING_ANNOUNCED,
    batch: bool = False,
    flex: bool = False,
    quota: bool = False,
    fatal: str | None = None,
) -> Outcome:
    """The ``Outcome`` of an answer whose readings are known: its usage (``reported``), the
    limits its headers announce, and for an error whether it is the quota's or fatal (the
    transport's ``outcome_of`` has the answer's provider read them).

    ``flex``: the request asked for Flex processing.
    """
    asked: Tier = "batch" if batch else "flex" if flex else "default"
    if status is None or status >= 400:
        return Outcome(
            status=status,
            headers=headers,
            body=body,
            batch=batch,
            tier=asked,
            quota=quota,
            unavailable=flex and status == 429 and not quota and fatal is None,
            fatal=fatal,
            announced=announced,
        )
    served = reported.service_tier  # the answer's word beats the request's
    flex_served = served == "flex" if served is not None else flex
    tier: Tier = "batch" if batch else "flex" if flex_served else "default"
    return Outcome(
        status=status,
        headers=headers,
        body=body,
        batch=batch,
        tier=tier,
        model=reported.model,
        prompt_tokens=reported.prompt_tokens,
        completion_tokens=reported.completion_tokens,
        cached_tokens=reported.cached_tokens,
        cache_write_tokens=reported.cache_write_tokens,
        truncated=reported.truncated,
        refused=reported.refused,
        announced=announced,
    )
