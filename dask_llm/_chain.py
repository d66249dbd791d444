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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pydantic
from langchain_core.runnables import Runnable, RunnableLambda

from dask_llm import _shipping
from dask_llm._fingerprint import fingerprint

OutputsArg = str | Sequence[str] | Mapping[str, str] | None
_Outputs = str | list[str] | dict[str, str] | None


class Chain:
    """A runnable (or a zero-argument factory that builds one) with its column wiring.

    Args:
        runnable: a LangChain ``Runnable``, a function of the input dict (wrapped in
            ``RunnableLambda``), or a zero-argument factory returning a ``Runnable``.
            Use a factory for chains that cannot be pickled to workers (custom clients);
            it is called once per process (and once here, to read the chain's variables,
            unless both ``inputs`` and ``outputs`` are given).
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
        "_factory",
        "_fingerprint",
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
            if _takes_no_arguments(runnable):
                self._factory = runnable
            else:
                self._runnable = RunnableLambda(runnable)
        else:
            raise TypeError(
                f"Chain() takes a LangChain Runnable or a zero-argument factory, "
                f"not {type(runnable).__name__}"
            )
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
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

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
        """Stable hash of what determines this chain's answers (prompts, model, params)."""
        if self._fingerprint is None:
            what: Any = self._factory if self._factory is not None else self._runnable
            self._fingerprint = fingerprint(
                {"chain": what, "inputs": self._inputs, "outputs": self._outputs_arg}
            )
        return self._fingerprint

    def __dask_tokenize__(self) -> Any:
        return ("dask_llm.Chain", self.name, self.fingerprint)

    def __reduce__(self) -> Any:
        # The factory travels as it is (cloudpickle); a runnable travels as a
        # recipe, without its clients and secrets (see _shipping).
        if self._factory is not None:
            payload: Any = ("factory", self._factory)
        else:
            payload = ("runnable", _shipping.dumps(self._runnable))
        # The fingerprint is computed here, from the real runnable: a worker only
        # sees the recipe, and cache keys must be the same everywhere.
        return (_rebuild, (payload, self._inputs, self._outputs_arg, self.name, self.fingerprint))

    # -- wiring ------------------------------------------------------------------------
    @property
    def explicit_inputs(self) -> dict[str, str]:
        return dict(self._inputs)

    def variables(self) -> list[str]:
        """The runnable's input variables (the keys of its input dict)."""
        if self._factory is not None and self._inputs and self._outputs_arg is not None:
            return list(self._inputs)
        schema = _json_schema(self.runnable.input_schema)
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
        """Which fields of the result go to which columns, and their dtypes."""
        arg = self._outputs_arg
        schema = None
        if not (self._factory is not None and arg is not None):
            schema = _output_json_schema(self.runnable)
        props = (schema or {}).get("properties") or {}
        defs = (schema or {}).get("$defs") or {}
        if isinstance(arg, str):
            dtype = _dtype_for(schema, defs) if schema and not props else object_dtype()
            return OutputSpec(scalar=True, fields={arg: arg}, dtypes={arg: dtype})
        if arg is not None:
            mapping = dict(arg) if isinstance(arg, Mapping) else {f: f for f in arg}
            if not mapping:
                raise ValueError(f"chain {self.name!r}: outputs= is empty")
            dtypes = {
                col: _dtype_for(props.get(field), defs) if field in props else object_dtype()
                for field, col in mapping.items()
            }
            return OutputSpec(scalar=False, fields=mapping, dtypes=dtypes)
        if (schema and schema.get("type") == "string" and not props) or _returns_message(
            self.runnable
        ):
            assert self.name is not None
            return OutputSpec(scalar=True, fields={self.name: self.name}, dtypes={self.name: TEXT})
        if props:
            return OutputSpec(
                scalar=False,
                fields={f: f for f in props},
                dtypes={f: _dtype_for(p, defs) for f, p in props.items()},
            )
        raise ValueError(
            f"chain {self.name!r}: cannot tell which columns the runnable returns (its output "
            "schema is not text, a Pydantic model or a typed dict); give outputs='column' "
            "for one column or outputs=['field', ...] for one column per field"
        )


class OutputSpec:
    """``fields``: result field -> column (for a scalar chain, one entry); ``dtypes`` by column."""

    __slots__ = ("dtypes", "fields", "scalar")

    def __init__(self, *, scalar: bool, fields: dict[str, str], dtypes: dict[str, Any]) -> None:
        self.scalar = scalar
        self.fields = fields
        self.dtypes = dtypes


def _rebuild(
    payload: tuple[str, Any],
    inputs: dict[str, str],
    outputs: _Outputs,
    name: str | None,
    fp: str,
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
    chain._fingerprint = fp
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


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty
        or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in sig.parameters.values()
    )


def _json_schema(model: Any) -> dict[str, Any] | None:
    try:
        schema: dict[str, Any] = model.model_json_schema()
        return schema
    except Exception:
        return None


def _returns_message(runnable: Runnable) -> bool:
    """A chain ending in a chat model (no parser) returns a message: its text is the output."""
    from langchain_core.language_models import BaseLanguageModel

    last = getattr(runnable, "last", runnable)
    while hasattr(last, "bound"):  # .bind(...) / .with_config(...)
        last = last.bound
    return isinstance(last, BaseLanguageModel)


def _output_json_schema(runnable: Runnable) -> dict[str, Any] | None:
    # A tool-calling structured-output chain ends in PydanticToolsParser, whose
    # declared output is "Any": its one tool's model is the real output.
    last = getattr(runnable, "last", runnable)
    tools = getattr(last, "tools", None)
    if getattr(last, "first_tool_only", False) and isinstance(tools, list) and len(tools) == 1:
        tool = tools[0]
        if isinstance(tool, type) and issubclass(tool, pydantic.BaseModel):
            return tool.model_json_schema()
    return _json_schema(runnable.output_schema)


# -- dtypes -----------------------------------------------------------------------------
class _Text:
    """Placeholder dtype for text columns, resolved by the plan to the frame's own text dtype."""

    def __repr__(self) -> str:
        return "TEXT"

    def __reduce__(self) -> str:
        return "TEXT"


TEXT: Any = _Text()


def string_dtype() -> Any:
    """The dtype pandas gives text columns here (``str`` on pandas 3, ``object`` before)."""
    return pd.Series(["x"]).dtype


def object_dtype() -> Any:
    return np.dtype(object)


def _dtype_for(prop: dict[str, Any] | None, defs: dict[str, Any]) -> Any:
    if not prop:
        return object_dtype()
    if "$ref" in prop:
        return object_dtype()
    options = prop.get("anyOf")
    if options:
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1:
            return _dtype_for(non_null[0], defs)
        return object_dtype()
    kind = prop.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        return pd.Int64Dtype()
    if kind == "number":
        return pd.Float64Dtype()
    if kind == "boolean":
        return pd.BooleanDtype()
    if kind == "array":
        # Lists of plain values get an Arrow list dtype: typed in memory, and
        # writable to Parquet (dask cannot infer a schema for object columns).
        item = _ARROW_ITEMS.get(str((prop.get("items") or {}).get("type")))
        if item is not None:
            return pd.ArrowDtype(pa.list_(item))
    return object_dtype()


_ARROW_ITEMS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
