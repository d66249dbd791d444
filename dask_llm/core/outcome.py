"""One answer, read once: what every stage that acts on an answer needs from it.

The transport reads each HTTP answer (online, or a Batch API line) exactly
once into an ``Outcome`` (``transport.wire.outcome_of``) and hands it to the
stages that act on it: the breaker (``fatal``), the throttle (status,
headers, ``quota``), the budget (the cost), the chain call's usage
(``Attempt``), the cache (the answer's bytes) and the run record (counts,
tokens, truncations, refusals). Before, the body was searched for usage in
the transport and again in the recorder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from dask_llm.core.usage import cost_usd, price_of, read_usage

_FINISH_LENGTH: Final = re.compile(rb'"finish_reason"\s*:\s*"length"')
_REFUSAL: Final = re.compile(rb'"refusal"\s*:\s*"')


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
    #: Cut at ``max_tokens`` (``finish_reason="length"``).
    truncated: bool = False
    #: A refusal (a non-null ``refusal``).
    refused: bool = False

    @property
    def ok(self) -> bool:
        """An answer with a status below 400 (paid for)."""
        return self.status is not None and self.status < 400

    def cost(self, prices: Mapping[str, tuple[float, ...]] | None) -> float | None:
        """US dollars this answer cost at ``prices`` over the built-in table: 0 for an error
        answer (not billed); None when it reported no usage or its model has no price."""
        if not self.ok:
            return 0.0
        if self.prompt_tokens is None:
            return None
        price = price_of(self.model, prices, batch=self.batch)
        if price is None:
            return None
        return cost_usd(price, self.prompt_tokens, self.completion_tokens or 0)


def read_outcome(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    batch: bool = False,
    quota: bool = False,
    fatal: str | None = None,
) -> Outcome:
    """The ``Outcome`` of an answer whose quota and fatal readings are known (the
    transport's ``outcome_of`` reads those from the provider's headers and error body)."""
    if status is None or status >= 400:
        return Outcome(
            status=status, headers=headers, body=body, batch=batch, quota=quota, fatal=fatal
        )
    model, prompt, completion = read_usage(body)
    return Outcome(
        status=status,
        headers=headers,
        body=body,
        batch=batch,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        truncated=_FINISH_LENGTH.search(body) is not None,
        refused=_REFUSAL.search(body) is not None,
    )
