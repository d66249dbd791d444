"""The exceptions dask-llm raises.

    DaskLLMError                 root: catch this to catch everything below
    ├── ChainError               a chain failed for one row (``errors="raise"``)
    └── WorkerSetupError         a chain could not be rebuilt on a worker

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


class WorkerSetupError(DaskLLMError):
    """A chain could not be rebuilt where it runs (e.g. no API key in the worker's environment)."""
