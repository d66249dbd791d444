"""The exceptions dask-llm raises.

    DaskLLMError                 root: catch this to catch everything below
    ├── ChainError               a chain failed for one row (``errors="raise"``)
    ├── JobStopped               the job stopped before this partition finished
    ├── BudgetExceeded           the job's budget_usd was reached (errors="raise")
    └── WorkerSetupError         a chain could not be rebuilt on a worker

And one warning, about a job that will pay more than it needs to:

    UserWarning
    └── PromptCacheWarning       a chain's prompt keeps a long fixed block out of the cache

Misuse of arguments (a missing column, an unknown option) raises plain
``ValueError`` / ``TypeError`` at ``enrich()`` time, before any request.
"""

from __future__ import annotations

from typing import Any


class DaskLLMError(Exception):
    """Root of every error dask-llm raises on its own account."""


class ChainError(DaskLLMError):
    """A chain failed for one row; carries the row's index label and the chain's name."""

    def __init__(self, message: str, *, index: Any, chain: str) -> None:
        super().__init__(message)
        self.index = index
        self.chain = chain

    def __reduce__(self) -> Any:
        return (_chain_error, (str(self), self.index, self.chain))


def _chain_error(message: str, index: Any, chain: str) -> ChainError:
    return ChainError(message, index=index, chain=chain)


class JobStopped(DaskLLMError):
    """The job was stopped (interrupt, a failure elsewhere) before this partition finished.

    ``kind`` is ``"interrupted"`` or ``"raised"``. Every answer paid for before the
    stop is in the cache: running the job again pays only for what is missing.
    """

    def __init__(self, message: str, *, kind: str = "interrupted") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> Any:
        return (_job_stopped, (str(self), self.kind))


def _job_stopped(message: str, kind: str) -> JobStopped:
    return JobStopped(message, kind=kind)


class BudgetExceeded(DaskLLMError):
    """The job reached its ``budget_usd`` (with ``errors="raise"``); the message names the spend.

    Every answer paid for is in the cache: a rerun with a larger budget pays only for
    what is missing.
    """


class WorkerSetupError(DaskLLMError):
    """A chain could not be rebuilt where it runs (e.g. no API key in the worker's environment)."""


class PromptCacheWarning(UserWarning):
    """A chain's prompt puts a row's values before a fixed block long enough to be cached
    (``enrich`` warns, naming the chain): in that order no prompt cache can reuse it."""
