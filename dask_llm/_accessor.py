"""``df.llm``: the accessor on Dask and pandas DataFrames, and ``enrich`` itself.

The accessors only store the frame (Dask's ``__getattr__`` would swallow an
``AttributeError`` raised while building one into a confusing "no attribute
'llm'"); everything is validated in ``enrich``, before any request.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor as register_dask_accessor

from dask_llm._cache import open_cache
from dask_llm._chain import string_dtype
from dask_llm._estimate import Estimate
from dask_llm._plan import Plan, make_plan
from dask_llm._progress import interactive, listen_on_client, progress_for
from dask_llm._retry import RetryPolicy
from dask_llm._runner import EnrichOptions, PartitionRun, enrich_partition
from dask_llm._usage import USAGE_COLUMNS


def _options(
    *,
    max_concurrency: int,
    rpm: float | None,
    tpm: float | None,
    errors: Literal["column", "raise"],
    timeout: float | None,
    attempts: int,
    retry_timeout: float,
    sync_threads: int,
    prices: Mapping[str, tuple[float, float]] | None,
    cache: Any,
    partitions: int,
    total_rows: int | None,
    progress: bool | None,
) -> EnrichOptions:
    return EnrichOptions(
        job=uuid.uuid4().hex,
        max_concurrency=max_concurrency,
        rpm=rpm,
        tpm=tpm,
        processes=_cluster_processes(),
        errors=errors,
        timeout=timeout,
        retry=RetryPolicy(attempts=attempts, timeout=retry_timeout),
        sync_threads=sync_threads,
        prices=tuple(sorted((prices or {}).items())),
        cache=open_cache(cache, default_path=default_cache_path()),
        partitions=partitions,
        total_rows=total_rows,
        progress=interactive() if progress is None else bool(progress),
    )


def _usage_columns(usage: bool | Sequence[str]) -> tuple[str, str, str] | None:
    if usage is True:
        return USAGE_COLUMNS
    if usage is False or usage is None:
        return None
    names = tuple(usage)
    if len(names) != 3 or not all(isinstance(n, str) for n in names):
        raise ValueError(
            "usage= takes True, False, or three column names (input tokens, output tokens, cost)"
        )
    return names


def enrich(
    frame: Any,
    chains: Any,
    *,
    max_concurrency: int = 256,
    rpm: float | None = None,
    tpm: float | None = None,
    errors: Literal["column", "raise"] = "column",
    timeout: float | None = 60.0,
    attempts: int = 8,
    retry_timeout: float = 600.0,
    sync_threads: int = 16,
    error_column: str = "llm_error",
    usage: bool | Sequence[str] = True,
    prices: Mapping[str, tuple[float, float]] | None = None,
    cache: Any = True,
    progress: bool | None = None,
) -> Any:
    """Add the outputs of ``chains`` to every row of ``frame``.

    Args:
        frame: a Dask or pandas DataFrame. A Dask frame gives a lazy Dask frame
            (nothing is called until it is computed); a pandas frame is enriched now.
        chains: a ``Chain``, a list of them, or ``{name: runnable}``.
        max_concurrency: hard cap on HTTP requests in flight per process (shared by the
            partitions running in it). Below it, concurrency adapts on its own: it grows
            while responses are clean and halves on a 429.
        rpm: requests per minute for the whole job, across all processes and workers.
            Default: what the provider announces in its ``x-ratelimit-*`` headers.
        tpm: tokens per minute for the whole job, likewise.
        errors: ``"column"`` records a row's failure in ``error_column`` and goes on;
            ``"raise"`` raises ``ChainError`` naming the row's index.
        timeout: seconds one HTTP call may take before it is abandoned (and retried).
        attempts: most attempts per call, the first included.
        retry_timeout: most seconds spent retrying one call.
        sync_threads: threads per partition for chains with only a sync implementation.
        error_column: name of the column that explains failed rows (null where all
            chains succeeded).
        usage: add per-row ``llm_input_tokens``, ``llm_output_tokens`` and ``llm_cost_usd``
            (totals over the row's chains and attempts); three names rename them; False
            leaves them out.
        cache: where paid answers are kept, so a rerun (after a crash, or with more
            rows) pays only for calls it has not made yet: ``True`` (default) for
            ``$DASK_LLM_CACHE`` or ``./.dask-llm-cache/results.sqlite``, a path, a
            ``ResultCache`` object, or ``False``.
        progress: show a progress bar (rows, calls/s, retries, 429s, tokens, cost, ETA);
            default: when a person is probably watching (a terminal or a notebook). On
            ``distributed`` the client draws it from the workers' row counts. After the
            run, ``dask_llm.last_run()`` holds its summary either way.
        prices: ``{model: (input, output)}`` US dollars per million tokens, over the
            built-in table (``dask_llm.PRICES``). Models in neither get a null cost.

    Returns:
        The frame's columns, then each chain's output columns, then ``error_column``.

    Raises:
        ValueError: an input that resolves to no column, clashing output columns,
            a dependency cycle, a bad option.
        TypeError: something that is not a chain.
    """
    if not isinstance(frame, dd.DataFrame | pd.DataFrame):
        raise TypeError(f"enrich() takes a Dask or pandas DataFrame, not {type(frame).__name__}")
    is_dask = isinstance(frame, dd.DataFrame)
    # Everything that can be checked is checked before anything is opened or sent.
    plan = make_plan(
        chains,
        list(frame.columns),
        text_dtype=_dask_text_dtype() if is_dask else string_dtype(),
        error_column=error_column,
        usage_columns=_usage_columns(usage),
    )
    options = _options(
        max_concurrency=max_concurrency,
        rpm=rpm,
        tpm=tpm,
        errors=errors,
        timeout=timeout,
        attempts=attempts,
        retry_timeout=retry_timeout,
        sync_threads=sync_threads,
        prices=prices,
        cache=cache,
        partitions=frame.npartitions if is_dask else 1,
        total_rows=None if is_dask else len(frame),
        progress=progress,
    )
    if is_dask:
        listen_on_client(
            options.job,
            progress_for(
                options.job,
                partitions=options.partitions,
                total_rows=None,
                show=options.progress,
            ),
        )
        return frame.map_partitions(
            enrich_partition,
            plan,
            options,
            meta=plan.meta(frame._meta),
            enforce_metadata=False,
            align_dataframes=False,
        )
    return _enrich_pandas(frame, plan, options)


def default_cache_path() -> str:
    """``$DASK_LLM_CACHE``, else ``./.dask-llm-cache/results.sqlite``, made absolute here
    so that workers with another working directory use the same file."""
    path = os.environ.get("DASK_LLM_CACHE") or os.path.join(".dask-llm-cache", "results.sqlite")
    return os.path.abspath(path)


def _cluster_processes() -> int:
    """Worker processes of the ``distributed`` client in use, if any (they split rpm/tpm)."""
    if "distributed" not in sys.modules:  # no client without it; importing it costs ~1 s
        return 1
    from distributed import default_client

    try:
        return max(1, len(default_client().nthreads()))
    except ValueError:
        return 1


def _dask_text_dtype() -> Any:
    """The dtype dask gives text columns: pyarrow strings unless the user turned that off."""
    import dask

    if dask.config.get("dataframe.convert-string", True) is not False:
        return pd.StringDtype("pyarrow")
    return string_dtype()


def _enrich_pandas(df: pd.DataFrame, plan: Plan, options: EnrichOptions) -> pd.DataFrame:
    from dask_llm._loop import run_sync

    return run_sync(lambda: PartitionRun(df, plan, options).run())


def estimate(
    frame: Any,
    chains: Any,
    *,
    rpm: float | None = None,
    tpm: float | None = None,
    cache: Any = True,
    prices: Mapping[str, tuple[float, float]] | None = None,
) -> Estimate:
    """What ``enrich(frame, chains)`` would do, without any request: see ``Estimate``.

    Args:
        rpm, tpm: the limits to project the wall time at.
        cache: the cache ``enrich`` would use (answers in it are not counted), or False.
        prices: as for ``enrich``.
    """
    import dask

    from dask_llm._estimate import partition_counts, summarize

    if not isinstance(frame, dd.DataFrame | pd.DataFrame):
        raise TypeError(f"estimate() takes a Dask or pandas DataFrame, not {type(frame).__name__}")
    plan = make_plan(chains, list(frame.columns), text_dtype=string_dtype())
    store = open_cache(cache, default_path=default_cache_path())
    if isinstance(frame, dd.DataFrame):
        meta = partition_counts(frame._meta, plan, None)
        counts_lazy = frame.map_partitions(partition_counts, plan, store, meta=meta)
        counts, rows = dask.compute(counts_lazy, frame.map_partitions(len).sum())
    else:
        counts, rows = partition_counts(frame, plan, store), len(frame)
    return summarize(counts, rows=int(rows), plan=plan, rpm=rpm, tpm=tpm, prices=dict(prices or {}))


class _LLMAccessor:
    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def enrich(self, chains: Any, **options: Any) -> Any:
        """Add the outputs of ``chains`` to every row; see ``dask_llm.enrich``."""
        return enrich(self._obj, chains, **options)

    def estimate(self, chains: Any, **options: Any) -> Estimate:
        """Calls, tokens, cost and wall time ``enrich`` would take; see ``dask_llm.estimate``."""
        return estimate(self._obj, chains, **options)


@register_dask_accessor("llm")
class DaskLLMAccessor(_LLMAccessor):
    """``ddf.llm``: LLM enrichment of a Dask DataFrame (lazy)."""


@pd.api.extensions.register_dataframe_accessor("llm")
class PandasLLMAccessor(_LLMAccessor):
    """``df.llm``: LLM enrichment of a pandas DataFrame (runs now)."""
