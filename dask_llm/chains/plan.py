"""Resolving chains against a frame's columns: who reads what, in which order.

Everything that can be checked without calling a model is checked here, at
``enrich()`` time, so a typo fails in a second instead of after an hour of
paid calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from dask_llm.chains.chain import Chain
from dask_llm.chains.outputs import JSON, TEXT, OutputSpec


class PlannedChain:
    """One chain with its wiring resolved: variable -> (column, producing chain or None)."""

    __slots__ = ("chain", "deps", "name", "outputs", "sources")

    def __init__(
        self,
        chain: Chain,
        sources: dict[str, tuple[str, str | None]],
        outputs: OutputSpec,
    ) -> None:
        self.chain = chain
        assert chain.name is not None
        self.name: str = chain.name
        self.sources = sources
        self.outputs = outputs
        self.deps = sorted({p for _, p in sources.values() if p is not None})


class Plan:
    """Chains in dependency order, plus the columns they add."""

    __slots__ = ("chains", "error_column", "json_columns", "new_columns", "usage_columns")

    def __init__(
        self,
        chains: list[PlannedChain],
        error_column: str,
        text_dtype: Any,
        usage_columns: tuple[str, str, str] | None,
    ) -> None:
        self.chains = chains
        self.error_column = error_column
        self.usage_columns = usage_columns
        self.new_columns: dict[str, Any] = {}
        #: Columns of JSON text (fields of no fixed type): each value is ``json.dumps``-ed.
        self.json_columns: frozenset[str] = frozenset(
            col for pc in chains for col, dtype in pc.outputs.dtypes.items() if dtype is JSON
        )
        for pc in chains:
            for col, dtype in pc.outputs.dtypes.items():
                self.new_columns[col] = text_dtype if dtype is TEXT or dtype is JSON else dtype
        if usage_columns is not None:
            tokens_in, tokens_out, cost = usage_columns
            self.new_columns[tokens_in] = pd.Int64Dtype()
            self.new_columns[tokens_out] = pd.Int64Dtype()
            self.new_columns[cost] = pd.Float64Dtype()
        self.new_columns[error_column] = text_dtype

    @property
    def rounds(self) -> int:
        """Dependent levels of the chains: a chain runs once the chains it reads are done."""
        depth: dict[str, int] = {}
        for pc in self.chains:  # in dependency order
            depth[pc.name] = 1 + max((depth.get(d, 0) for d in pc.deps), default=0)
        return max(depth.values(), default=1)

    @property
    def is_path(self) -> bool:
        """True when each chain depends on nothing or on the one before it only."""
        return all(
            not pc.deps or (i > 0 and pc.deps == [self.chains[i - 1].name])
            for i, pc in enumerate(self.chains)
        )

    def meta(self, frame_meta: pd.DataFrame) -> pd.DataFrame:
        """The output's empty frame: the input's columns, then the new ones."""
        new = {
            col: pd.Series([], dtype=dt, index=frame_meta.index[:0])
            for col, dt in self.new_columns.items()
        }
        return frame_meta.iloc[:0].assign(**new)

    def __dask_tokenize__(self) -> Any:
        h = hashlib.sha256()
        for pc in self.chains:
            h.update(repr((pc.name, pc.chain.fingerprint, sorted(pc.sources.items()))).encode())
            h.update(repr(sorted((k, str(v)) for k, v in pc.outputs.dtypes.items())).encode())
        h.update(repr((self.error_column, self.usage_columns)).encode())
        return ("dask_llm.Plan", h.hexdigest())


def as_chains(chains: Any) -> list[Chain]:
    """Accept a ``Chain``, a list of them, or ``{name: runnable_or_chain}``."""
    if isinstance(chains, Chain):
        chains = [chains]
    if isinstance(chains, Mapping):
        out = []
        for name, value in chains.items():
            if isinstance(value, Chain):
                if value.name is None:
                    value = value.named(str(name))
                elif value.name != name:
                    raise ValueError(f"chain named {value.name!r} is given under the key {name!r}")
                out.append(value)
            else:
                out.append(Chain(value, name=str(name)))
        chains = out
    if not isinstance(chains, Sequence) or isinstance(chains, str):
        raise TypeError("chains must be a Chain, a list of Chain, or a {name: runnable} dict")
    result: list[Chain] = []
    for i, c in enumerate(chains):
        if not isinstance(c, Chain):
            c = Chain(c)
        if c.name is None:
            c = c.named(f"chain_{i}")
        result.append(c)
    if not result:
        raise ValueError("enrich() needs at least one chain")
    names = [c.name for c in result]
    dupes = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if dupes:
        raise ValueError(f"chain names must be unique; repeated: {', '.join(dupes)}")
    return result


def make_plan(
    chains: Any,
    columns: Sequence[str],
    *,
    text_dtype: Any,
    error_column: str = "llm_error",
    usage_columns: tuple[str, str, str] | None = None,
) -> Plan:
    """Resolve ``chains`` against ``columns``; raise ``ValueError`` naming what is wrong.

    ``text_dtype`` is the dtype of the text columns the chains add: the one the
    frame's own text columns have.
    """
    chain_list = as_chains(chains)
    columns = [str(c) for c in columns]
    outputs = {c.name: c.output_columns() for c in chain_list}
    producer: dict[str, str] = {}
    for c in chain_list:
        assert c.name is not None
        for col in outputs[c.name].dtypes:
            if col in columns:
                raise ValueError(
                    f"chain {c.name!r} would write column {col!r}, which the frame already has; "
                    "rename it with outputs={field: new_column}"
                )
            if col in producer:
                raise ValueError(
                    f"chains {producer[col]!r} and {c.name!r} both write column {col!r}"
                )
            if col == error_column or col in (usage_columns or ()):
                raise ValueError(f"chain {c.name!r} would write the bookkeeping column {col!r}")
            producer[col] = c.name
    for col in (error_column, *(usage_columns or ())):
        if col in columns:
            raise ValueError(
                f"the frame already has a column {col!r}; pass error_column= / usage= other names"
            )

    planned: dict[str, PlannedChain] = {}
    problems = []
    for c in chain_list:
        assert c.name is not None
        sources: dict[str, tuple[str, str | None]] = {}
        for var in c.variables():
            col = c.column_for(var)
            if col in columns:
                sources[var] = (col, None)
            elif col in producer and producer[col] != c.name:
                sources[var] = (col, producer[col])
            else:
                problems.append(f"chain {c.name!r}: variable {var!r} reads column {col!r}")
        planned[c.name] = PlannedChain(c, sources, outputs[c.name])
    if problems:
        raise ValueError(
            "inputs that resolve to nothing (no such column, and no chain produces it): "
            + "; ".join(problems)
            + f". The frame's columns are: {', '.join(columns) or '(none)'}"
        )

    order: list[PlannedChain] = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(
                f"chains depend on each other in a cycle: {' -> '.join([*path, name])}"
            )
        state[name] = 1
        for dep in planned[name].deps:
            visit(dep, [*path, name])
        state[name] = 2
        order.append(planned[name])

    for c in chain_list:
        assert c.name is not None
        visit(c.name, [])
    return Plan(order, error_column, text_dtype, usage_columns)
