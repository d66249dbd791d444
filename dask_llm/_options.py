"""The options of one ``enrich`` job: validated once, frozen, each default written once.

``enrich`` builds an ``EnrichOptions`` and ships it with every partition.
The defaults below are the only place a default is written; ``enrich``'s
signature, the accessor, the CLI and the docs all read them from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from dask_llm import _cluster
from dask_llm._batch import BatchPolicy
from dask_llm._cache import ResultCache
from dask_llm._retry import DEFAULT_RETRY, RetryPolicy
from dask_llm._usage import check_prices

if TYPE_CHECKING:
    from dask_llm._pilot import QualityGate

#: Requests in flight per process, at most.
DEFAULT_MAX_CONCURRENCY: Final = 256
#: Requests in flight per process at the start, before the limit is known.
DEFAULT_INITIAL_CONCURRENCY: Final = 16
#: Seconds one HTTP request may take, unless the model sets its own ``timeout``.
DEFAULT_REQUEST_TIMEOUT: Final = 60.0
#: Threads per process for chains that have only a synchronous implementation.
DEFAULT_SYNC_THREADS: Final = 16
#: What a failed row does: recorded in the error column, or raised.
DEFAULT_ERRORS: Final = "column"
#: Name of the column that explains failed rows.
DEFAULT_ERROR_COLUMN: Final = "llm_error"

Errors = Literal["column", "raise"]


@dataclass(frozen=True, kw_only=True)
class EnrichOptions:
    """Options of one ``enrich`` job (see ``enrich`` for their meaning)."""

    job: str
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    initial_concurrency: int = DEFAULT_INITIAL_CONCURRENCY
    rpm: float | None = None
    tpm: float | None = None
    budget_usd: float | None = None
    processes: int = 1
    errors: Errors = DEFAULT_ERRORS
    request_timeout: float | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    sync_threads: int = DEFAULT_SYNC_THREADS
    prices: tuple[tuple[str, tuple[float, ...]], ...] = ()
    cache: ResultCache | None = None
    partitions: int = 1
    total_rows: int | None = None
    progress: bool = False
    #: The Batch API (``batch=True``: ``BatchPolicy()``); None for online calls.
    batch: BatchPolicy | None = None
    quality_gate: QualityGate | None = None
    #: The client's job hub (address, key), filled in when pickled for a pool child.
    hub: tuple[tuple[str, int], bytes] | None = field(default=None, repr=False)
    #: The client's run (one local computation) this copy was pickled for (``_hub``).
    run: int | None = field(default=None, repr=False)
    #: Explicit API keys to give recipes on workers (ship_api_keys=True): (key_ref, key).
    keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency= must be >= 1, not {self.max_concurrency}")
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
        from dask_llm._pilot import QualityGate

        if self.quality_gate is not None and not isinstance(self.quality_gate, QualityGate):
            raise TypeError(
                f"quality_gate= takes a dask_llm.QualityGate or None, not {self.quality_gate!r}"
            )
        for name in ("rpm", "tpm", "budget_usd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}= must be > 0, or None for no limit")
        check_prices(dict(self.prices))

    @property
    def price_table(self) -> Mapping[str, tuple[float, ...]]:
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

    def __reduce__(self) -> Any:
        # Options are pickled in the client when a computation is submitted: the
        # moment to open the way back from the processes that will run the job.
        # For dask's process pool that is the client's job hub (stops, progress);
        # for distributed, a subscription to the workers' events (the client may
        # have been created after enrich() was called).
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not _cluster.in_pool_child() and _cluster.distributed_worker() is None:
            client = _cluster.distributed_client()
            if client is not None:
                from dask_llm._coordinator import register
                from dask_llm._progress import listen_on_client

                listen_on_client(client)
                register(client)
                if self.keys and _cluster.remote_worker(client) is not None:
                    # Checked at enrich() too; the cluster may have grown since.
                    raise ValueError(
                        "ship_api_keys=True: a worker of this cluster runs on another host "
                        f"({_cluster.remote_worker(client)}); keys are only sent to workers "
                        "on this machine"
                    )
            else:
                from dask_llm import _hub

                if values["hub"] is None:
                    values["hub"] = _hub.hub_address()
                values["run"] = _hub.current_run()
                _hub.run_holds(values["run"], self.job)
        return (_rebuild, (values,))


def _rebuild(values: dict[str, Any]) -> EnrichOptions:
    return EnrichOptions(**values)
