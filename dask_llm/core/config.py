"""The options of one ``enrich`` job: validated once, frozen, each default written once.

The configuration leaf of the package: every option and policy of a job
(``EnrichOptions``, ``RetryPolicy``, ``BatchPolicy``, ``QualityGate``) and
every default lives here, as plain frozen data. Nothing here does I/O or
imports the rest of dask-llm: pickling options for a worker sends values,
and the way back to the client travels separately (``JobHandle``).

``enrich`` builds an ``EnrichOptions`` and ships it with every partition.
The defaults below are the only place a default is written; ``enrich``'s
signature, the accessor, the CLI and the docs all read them from here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from dask_llm.core.deadline import Deadline
from dask_llm.core.usage import Price, check_prices

if TYPE_CHECKING:
    from dask_llm.cache import ResultCache
    from dask_llm.observe.record import ChainCounts, RowCounts

#: Requests in flight per process, at most: None for "auto" (``limits.pacer``): with a
#: known rate, what the process's share of it keeps on the wire (rate x latency, with
#: headroom); without one, ``UNPACED_MAX_CONCURRENCY``.
DEFAULT_MAX_CONCURRENCY: Final = None
#: Requests in flight per process while no rate is known (told or learned), under "auto".
UNPACED_MAX_CONCURRENCY: Final = 256
#: Requests in flight per process at the start, before the limit is known.
DEFAULT_INITIAL_CONCURRENCY: Final = 16
#: Seconds one HTTP request may take, unless the model sets its own ``timeout``.
DEFAULT_REQUEST_TIMEOUT: Final = 60.0
#: The same for a Flex request: OpenAI advises 15 minutes (Flex answers slowly, or 429s).
FLEX_REQUEST_TIMEOUT: Final = 900.0
#: Threads per process for chains that have only a synchronous implementation.
DEFAULT_SYNC_THREADS: Final = 16
#: What a failed row does: recorded in the error column, or raised.
DEFAULT_ERRORS: Final = "column"
#: Name of the column that explains failed rows.
DEFAULT_ERROR_COLUMN: Final = "llm_error"

Errors = Literal["column", "raise"]
#: The service tiers ``enrich(service_tier=...)`` takes (priced by ``core.usage``).
ServiceTier = Literal["flex", "default"]
SERVICE_TIERS: Final = ("flex", "default")
#: A limit told (``rpm=``, ``tpm=``, ``output_tpm=``): per minute for every provider of the
#: job apart (a number), or by provider name (``{"openai": 30_000, "anthropic": 50}``: a
#: provider not named is unlimited until its headers announce one); None: none told.
Told = float | Mapping[str, float] | None


def told(value: Told, provider: str) -> float | None:
    """The limit ``value`` tells for ``provider``'s requests, per minute (None: none)."""
    if value is None or not isinstance(value, Mapping):
        return value
    return value.get(provider)


def told_names(*values: Told) -> set[str]:
    """The providers named by limits told by provider (a number names none)."""
    return {name for value in values if isinstance(value, Mapping) for name in value}


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How failed calls are retried (``enrich(..., retry=RetryPolicy(...))``).

    Args:
        attempts: most attempts per call, the first included.
        timeout: most seconds from a call's first attempt to the start of its last.
        wait_initial: backoff cap before the first retry, in seconds; doubles per retry.
        wait_max: largest backoff cap, in seconds.
        parse_attempts: most attempts for answers that do not fit the output schema.
    """

    attempts: int = 8
    timeout: float = 600.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    parse_attempts: int = 3

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry attempts must be >= 1")
        if self.timeout < 0 or self.wait_initial < 0 or self.wait_max < 0:
            raise ValueError("retry times must be >= 0 seconds")
        if self.parse_attempts < 1:
            raise ValueError("parse_attempts must be >= 1")

    def backoff(self, retry_number: int, rng: Callable[[], float] = random.random) -> float:
        """Full-jitter wait before retry ``retry_number`` (1 for the first retry)."""
        cap = min(self.wait_max, self.wait_initial * 2 ** (retry_number - 1))
        return cap * rng()


#: The default policy, written once.
DEFAULT_RETRY: Final = RetryPolicy()


#: OpenAI's limits on one batch input file, with a margin for the JSONL framing.
MAX_LINES: Final = 50_000
MAX_BYTES: Final = 200 * 1024 * 1024 - 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPolicy:
    """How ``enrich(..., batch=...)`` uses the Batch API (``batch=True`` is the default policy).

    Args:
        poll_initial: seconds before a batch is first polled; the interval grows 1.5x per poll.
        poll_max: longest interval between polls, in seconds.
        fallback: what happens to lines that failed or that an expired batch never ran:
            ``"retry"`` resubmits them in the next round (within the retry policy's
            ``attempts``); ``"online"`` sends them online at once.
        deadline: seconds from the partition's first submission by which whatever is not
            back goes online (None: wait for the batches' own window). Its batches are
            cancelled ``min(deadline / 4, 600)`` seconds before, so that the lines they
            finished are read by then; lines of a cancel still under way at the deadline
            go online too (and a line that batch finished is paid twice). Wall time is
            at most the deadline plus the online calls of what was not back.
        completion_window: the batches' window (the API accepts ``"24h"``).
        max_lines: most lines per batch (the API's limit is 50,000).
        max_bytes: most bytes per input file (the API's limit is 200 MB).
    """

    poll_initial: float = 5.0
    poll_max: float = 60.0
    fallback: Literal["retry", "online"] = "retry"
    deadline: float | None = None
    completion_window: str = "24h"
    max_lines: int = MAX_LINES
    max_bytes: int = MAX_BYTES

    def __post_init__(self) -> None:
        if self.poll_initial <= 0 or self.poll_max <= 0:
            raise ValueError("batch poll intervals must be > 0 seconds")
        if self.fallback not in ("retry", "online"):
            raise ValueError(f"batch fallback must be 'retry' or 'online', not {self.fallback!r}")
        if self.completion_window != "24h":
            raise ValueError(
                f"batch completion_window must be '24h' (the only window the Batch API "
                f"takes), not {self.completion_window!r}"
            )
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("batch deadline must be > 0 seconds")
        if not 1 <= self.max_lines <= MAX_LINES:
            raise ValueError(f"batch max_lines must be in 1..{MAX_LINES}")
        if self.max_bytes < 1024:
            raise ValueError("batch max_bytes must be >= 1024")


#: The default policy, written once.
DEFAULT_BATCH: Final = BatchPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityGate:
    """Thresholds that stop a job early (``enrich(..., quality_gate=QualityGate())``).

    Args:
        max_error_rate: most rows with ``llm_error``, as a fraction of rows finished.
        max_truncation_rate: most answers cut at ``max_tokens`` (``finish_reason="length"``),
            as a fraction of answers.
        max_refusal_rate: most answers that are refusals, as a fraction of answers.
        max_parse_failure_rate: most answers that did not fit the output schema (each
            failed attempt counts), as a fraction of answers.
        min_rows: rows finished in a process before it judges them.

    ``None`` switches a check off. Raises ``ValueError`` for a rate outside [0, 1]
    or ``min_rows`` < 1.
    """

    max_error_rate: float | None = 0.05
    max_truncation_rate: float | None = 0.05
    max_refusal_rate: float | None = 0.05
    max_parse_failure_rate: float | None = 0.10
    min_rows: int = 100

    def __post_init__(self) -> None:
        for name in (
            "max_error_rate",
            "max_truncation_rate",
            "max_refusal_rate",
            "max_parse_failure_rate",
        ):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"QualityGate({name}=) is a fraction in [0, 1], not {value!r}")
        if self.min_rows < 1:
            raise ValueError(f"QualityGate(min_rows=) must be >= 1, not {self.min_rows!r}")

    def breach(self, rows: RowCounts, chains: Iterable[ChainCounts]) -> str | None:
        """Why the rows so far fail this gate (a sentence naming the rate), or None."""
        if rows.n < self.min_rows:
            return None
        answers = truncated = refused = parse = 0
        for c in chains:
            answers += c.ok
            truncated += c.truncated
            refused += c.refused
            parse += c.parse_failures
        checks = (
            ("max_error_rate", rows.failed, rows.n, "rows failed"),
            (
                "max_truncation_rate",
                truncated,
                answers,
                "answers were truncated (finish_reason=length)",
            ),
            ("max_refusal_rate", refused, answers, "answers were refusals"),
            ("max_parse_failure_rate", parse, answers, "answers did not parse"),
        )
        for name, count, total, what in checks:
            limit = getattr(self, name)
            if limit is None or total == 0:
                continue
            rate = count / total
            if rate > limit:
                return (
                    f"quality gate: {rate:.1%} of {what} ({count:,} of {total:,}) after "
                    f"{rows.n:,} rows, above {name}={limit:.1%}"
                )
        return None


def _told_option(name: str, value: Any) -> Told:
    """``value`` of the limit option ``name`` checked: a number > 0, a mapping of provider
    names to numbers > 0 (copied; empty: None), or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        limits: dict[str, float] = {}
        for provider, limit in value.items():
            if not isinstance(provider, str):
                raise TypeError(
                    f"{name}= by provider takes provider names (str) as keys, not {provider!r}"
                )
            if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
                raise ValueError(
                    f"{name}={{{provider!r}: {limit!r}}}: each provider's limit must be a "
                    "number > 0 (leave a provider out for no limit)"
                )
            limits[provider] = float(limit)
        return limits or None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name}= takes a number, a mapping of provider names to numbers "
            f'({name}={{"openai": 30000, "anthropic": 50}}) or None, not {value!r}'
        )
    if value <= 0:
        raise ValueError(f"{name}= must be > 0, or None for no limit")
    return value


@dataclass(frozen=True, kw_only=True)
class EnrichOptions:
    """Options of one ``enrich`` job (see ``enrich`` for their meaning)."""

    job: str
    max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY
    initial_concurrency: int = DEFAULT_INITIAL_CONCURRENCY
    #: Limits told, per minute: a number for each provider apart, or a dict by provider
    #: name (``told`` reads one provider's); None for none.
    rpm: Told = None
    tpm: Told = None
    #: Output tokens per minute, for providers that limit them apart (Anthropic).
    output_tpm: Told = None
    budget_usd: float | None = None
    processes: int = 1
    errors: Errors = DEFAULT_ERRORS
    request_timeout: float | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    sync_threads: int = DEFAULT_SYNC_THREADS
    #: ``(model, Price)`` pairs over the built-in table (``api`` turns each entry into a Price).
    prices: tuple[tuple[str, Price], ...] = ()
    cache: ResultCache | None = None
    partitions: int = 1
    total_rows: int | None = None
    progress: bool = False
    #: The Batch API (``batch=True``: ``BatchPolicy()``); None for online calls.
    batch: BatchPolicy | None = None
    quality_gate: QualityGate | None = None
    #: Set on every OpenAI model of the job (None: each model keeps its own).
    service_tier: ServiceTier | None = None
    #: Compiled calls for the chains that have them (``dask_llm.compiled``).
    compiled: bool = True
    #: Finish by then at the least cost, choosing the tiers (``core.deadline``).
    deadline: Deadline | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(
                f"max_concurrency= must be >= 1, or None to follow the rate, "
                f"not {self.max_concurrency}"
            )
        if self.errors not in ("column", "raise"):
            raise ValueError(f"errors= must be 'column' or 'raise', not {self.errors!r}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout= must be > 0 seconds, or None")
        if self.sync_threads < 1:
            raise ValueError(f"sync_threads= must be >= 1, not {self.sync_threads}")
        if self.batch is not None and not isinstance(self.batch, BatchPolicy):
            raise TypeError("batch= takes True, False or a BatchPolicy")
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError("retry= takes a RetryPolicy or a number of attempts")
        if self.quality_gate is not None and not isinstance(self.quality_gate, QualityGate):
            raise TypeError(
                f"quality_gate= takes a dask_llm.QualityGate or None, not {self.quality_gate!r}"
            )
        for name in ("rpm", "tpm", "output_tpm"):
            # A copy, never the user's mapping (frozen options pickle as values).
            object.__setattr__(self, name, _told_option(name, getattr(self, name)))
        if self.budget_usd is not None and self.budget_usd <= 0:
            raise ValueError("budget_usd= must be > 0, or None for no limit")
        if self.service_tier is not None and self.service_tier not in SERVICE_TIERS:
            raise ValueError(
                f"service_tier= must be 'flex', 'default' or None, not {self.service_tier!r}"
            )
        if self.service_tier == "flex" and self.batch is not None:
            raise ValueError(
                "service_tier='flex' and batch= are two ways to the Batch API's price: "
                "choose one (Flex answers online in seconds to minutes; a batch within its window)"
            )
        if self.deadline is not None and (self.batch is not None or self.service_tier):
            raise ValueError(
                "deadline= chooses among the Batch API, Flex and list price itself: "
                "leave out batch= and service_tier="
            )
        check_prices(dict(self.prices))

    @property
    def price_table(self) -> Mapping[str, Price]:
        return dict(self.prices)

    @property
    def cache_label(self) -> str | None:
        """Where answers are kept, for messages (a path, or the cache's repr)."""
        if self.cache is None:
            return None
        return str(getattr(self.cache, "path", None) or repr(self.cache))

    def __repr__(self) -> str:  # never the keys
        return f"EnrichOptions(job={self.job!r}, cache={self.cache!r})"

    def __dask_tokenize__(self) -> Any:
        # Each enrich() call is its own job (its own throttle); the cache object is
        # named by its type and location, not by content.
        return ("dask_llm.EnrichOptions", self.job, repr(self.cache))
