"""``Chain``: one LangChain runnable, where its inputs come from and which columns it makes.

A chain's inputs are the runnable's input variables (a prompt's
``{placeholders}``), each read from the frame column of the same name, from a
column named in ``inputs=``, or from another chain's output of that name: that
is how chains depend on each other. Its outputs are one column for a runnable
that returns text, one column per field for one that returns a Pydantic model
or a dict. Columns and dtypes come from the runnable's declared output schema
where it has one, so ``enrich`` can give dask an explicit ``meta`` without
calling the model.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda

from dask_llm.chains import shipping as _shipping
from dask_llm.chains.fingerprint import Analysis, analyse, fingerprint
from dask_llm.chains.outputs import OutputSpec, json_schema_of, output_spec

OutputsArg = str | Sequence[str] | Mapping[str, str] | None
_Outputs = str | list[str] | dict[str, str] | None


class Chain:
    """A runnable with its column wiring; ``Chain.from_factory(make)`` for one built per process.

    Args:
        runnable: a LangChain ``Runnable``, or a function of the row's input dict
            (wrapped in ``RunnableLambda``). Chains that cannot be pickled to workers
            (custom clients) are built by a factory instead: ``Chain.from_factory``.
        inputs: ``{variable: column}`` for variables whose column has another name.
            Variables not listed read the column (or another chain's output) of the
            same name.
        outputs: the columns the chain makes: a name (one column), a list of field
            names (one column each), or ``{field: column}`` to rename. Default: taken
            from the runnable's output schema; a text chain gives one column named
            after the chain.
        name: the chain's name in ``llm_error`` and, for text chains, its output column.
    """

    __slots__ = (
        "_analysis",
        "_factory",
        "_inputs",
        "_lock",
        "_outputs_arg",
        "_runnable",
        "name",
    )

    def __init__(
        self,
        runnable: Any,
        /,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: OutputsArg = None,
        name: str | None = None,
    ) -> None:
        self._runnable: Runnable | None = None
        self._factory: Callable[[], Any] | None = None
        if isinstance(runnable, Runnable):
            self._runnable = runnable
        elif callable(runnable):
            if _has_no_parameters(runnable):
                # 0.1 took any function without required arguments for a factory, which
                # mistook ``def f(d=None)`` for one. A function with no parameters at all
                # still is, for one release, with a warning.
                warnings.warn(
                    "Chain(make) with a zero-argument function is deprecated and will be "
                    "removed in dask-llm 0.3; use Chain.from_factory(make)",
                    FutureWarning,
                    stacklevel=2,
                )
                self._factory = runnable
            else:
                self._runnable = RunnableLambda(runnable)
        else:
            raise TypeError(
                "Chain() takes a LangChain Runnable or a function of the row's inputs, "
                f"not {type(runnable).__name__}; for a factory use Chain.from_factory(make)"
            )
        self._lock = threading.Lock()
        self._analysis: Analysis | None = None
        self._wire(inputs, outputs, name)

    @classmethod
    def from_factory(
        cls,
        factory: Callable[[], Any],
        /,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: OutputsArg = None,
        name: str | None = None,
    ) -> Chain:
        """A chain built by ``factory()`` in each process that runs it.

        For chains that cannot be pickled to workers (a model with its own HTTP
        client, tools holding connections). The factory itself is pickled (with
        cloudpickle) and called once per worker process, and once here, so that the
        chain's variables, outputs and fingerprint are known before any request.
        """
        if not callable(factory) or isinstance(factory, Runnable):
            raise TypeError(
                f"Chain.from_factory() takes a function that builds the chain, "
                f"not {type(factory).__name__}"
            )
        chain = cls.__new__(cls)
        chain._runnable = None
        chain._factory = factory
        chain._inputs = {}
        chain._outputs_arg = None
        chain.name = None
        chain._lock = threading.Lock()
        chain._analysis = None
        chain._wire(inputs, outputs, name)
        return chain

    def _wire(
        self, inputs: Mapping[str, str] | None, outputs: OutputsArg, name: str | None
    ) -> None:
        if inputs is not None and not isinstance(inputs, Mapping):
            raise TypeError("inputs= must be a mapping {prompt_variable: column}")
        self._inputs = dict(inputs or {})
        if isinstance(outputs, Mapping):
            outputs = dict(outputs)
        elif outputs is not None and not isinstance(outputs, str):
            outputs = list(outputs)
        self._outputs_arg = outputs
        if name is None and self._factory is not None:
            name = getattr(self._factory, "__name__", None)
            if name == "<lambda>":
                name = None
        self.name = name

    def __repr__(self) -> str:
        return f"Chain(name={self.name!r}, inputs={self._inputs!r}, outputs={self._outputs_arg!r})"

    # -- the runnable -----------------------------------------------------------------
    @property
    def runnable(self) -> Runnable:
        """The runnable, built from the factory on first use in this process."""
        if self._runnable is None:
            assert self._factory is not None
            with self._lock:
                if self._runnable is None:
                    built = self._factory()
                    if not isinstance(built, Runnable):
                        if callable(built):
                            built = RunnableLambda(built)
                        else:
                            raise TypeError(
                                f"chain {self.name!r}: the factory returned "
                                f"{type(built).__name__}, not a LangChain Runnable"
                            )
                    self._runnable = built
        return self._runnable

    @property
    def fingerprint(self) -> str:
        """Stable hash of the chain's definition (dask's token for it)."""
        return self._analyse().fingerprint

    @property
    def memo_fingerprint(self) -> str | None:
        """Hash of everything that decides the chain's answers, or None when it holds code.

        It keys the row memo of the cache. For a factory it is taken of the chain
        the factory builds here (in the client), so a factory that reads a global
        model name or a closure's prompt gets a new one when those change.
        """
        return self._analyse().memo

    @property
    def legacy_fingerprint(self) -> str | None:
        """The key of this chain's answers in caches written before the row memo (0.1.0.dev0)."""
        return None if self._is_factory_chain() else self.fingerprint

    @property
    def opaque(self) -> tuple[str, ...]:
        """Why the chain has no memo fingerprint (Python code in it), if it has none."""
        return self._analyse().opaque

    @property
    def is_factory(self) -> bool:
        """Built by a factory in each process (``Chain.from_factory``)."""
        return self._is_factory_chain()

    def _is_factory_chain(self) -> bool:
        return self._factory is not None and not isinstance(self._factory, _LazyRunnable)

    def _analyse(self) -> Analysis:
        if self._analysis is None:
            wiring = {"inputs": self._inputs, "outputs": self._outputs_arg}
            if self._is_factory_chain():
                token = fingerprint({"chain": self._factory, **wiring})
                try:
                    built = analyse({"chain": self.runnable, **wiring})
                except Exception as exc:  # a factory that cannot run here: opaque
                    reason = f"its factory failed here ({type(exc).__name__})"
                    built = Analysis(token, None, (reason,))
                self._analysis = Analysis(token, built.memo, built.opaque)
            else:
                self._analysis = analyse({"chain": self.runnable, **wiring})
        return self._analysis

    def __dask_tokenize__(self) -> Any:
        return ("dask_llm.Chain", self.name, self.fingerprint)

    def __reduce__(self) -> Any:
        # The factory travels as it is (cloudpickle); a runnable travels as a
        # recipe, without its clients and secrets (see _shipping).
        if self._factory is not None:
            payload: Any = ("factory", self._factory)
        else:
            payload = ("runnable", _shipping.dumps(self._runnable))
        # The fingerprints are computed here, from the real runnable: a worker only
        # sees the recipe, and cache keys must be the same everywhere.
        return (_rebuild, (payload, self._inputs, self._outputs_arg, self.name, self._analyse()))

    def named(self, name: str) -> Chain:
        """A copy under another name (the user's object is never changed)."""
        copy = Chain.__new__(Chain)
        for slot in Chain.__slots__:
            setattr(copy, slot, getattr(self, slot))
        copy._lock = threading.Lock()
        copy.name = name
        return copy

    # -- wiring ------------------------------------------------------------------------
    def variables(self) -> list[str]:
        """The runnable's input variables (the keys of its input dict)."""
        if self._factory is not None and self._inputs and self._outputs_arg is not None:
            return list(self._inputs)
        schema = json_schema_of(self.runnable.input_schema)
        props = list((schema or {}).get("properties", {}))
        if not props:
            if self._inputs:
                return list(self._inputs)
            raise ValueError(
                f"chain {self.name!r}: cannot tell which input variables the runnable takes; "
                "give inputs={variable: column}"
            )
        # Explicit inputs may add variables the schema did not show.
        return props + [v for v in self._inputs if v not in props]

    def column_for(self, variable: str) -> str:
        return self._inputs.get(variable, variable)

    def output_columns(self) -> OutputSpec:
        """Which fields of the result go to which columns, and their dtypes (``chains.outputs``)."""
        assert self.name is not None
        unbuilt = self._factory is not None and self._outputs_arg is not None
        return output_spec(self.name, None if unbuilt else self.runnable, self._outputs_arg)


def _rebuild(
    payload: tuple[str, Any],
    inputs: dict[str, str],
    outputs: _Outputs,
    name: str | None,
    analysis: Analysis,
) -> Chain:
    kind, value = payload
    runnable = value if kind == "factory" else _LazyRunnable(value)
    chain = Chain.__new__(Chain)
    chain._runnable = None
    chain._factory = runnable
    chain._inputs = inputs
    chain._outputs_arg = outputs
    chain.name = name
    chain._lock = threading.Lock()
    chain._analysis = analysis
    return chain


class _LazyRunnable:
    """A shipped runnable, rebuilt (models and all) on first use in the worker."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __call__(self) -> Any:
        return _shipping.loads(self.data)

    def __reduce__(self) -> Any:
        return (_LazyRunnable, (self.data,))


def _has_no_parameters(fn: Callable[..., Any]) -> bool:
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    """Whether ``fn()`` can be called (every parameter has a default or is variadic)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty
        or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in sig.parameters.values()
    )
