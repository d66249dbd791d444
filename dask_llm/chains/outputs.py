"""Which columns a chain makes, and their dtypes, known before any request.

``enrich`` gives Dask an explicit ``meta``, so the columns of every chain
must be known from its definition. They are read from the chain's output
schema, whatever shape the chain has:

==============================================  =========================================
chain                                           columns
==============================================  =========================================
``prompt | model`` / ``| StrOutputParser()``    one text column, named after the chain
``with_structured_output(PydanticModel)``       one column per field, dtypes from the
                                                field types (any ``method``)
``with_structured_output(TypedDict or dict)``   the same, from the TypedDict or JSON schema
``... include_raw=True``                        the parsed fields; ``outputs=[..., "raw"]``
                                                adds the raw answer's text; a parsing
                                                error is the row's ``llm_error`` (no retry)
``| PydanticOutputParser(pydantic_object=M)``   one column per field of ``M``
``| JsonOutputParser(pydantic_object=M)``        one column per field of ``M``
a configurable ``init_chat_model``              as the model it builds: text, or the fields
                                                of its ``with_structured_output``
anything else                                   ``outputs=`` says which columns
==============================================  =========================================

``outputs=`` picks or renames: a name (one column), a list of field names,
or ``{field: column}``. A one-name list on a text chain is that column.
Fields the schema does not have, or several columns from a text chain, are a
``ValueError`` here, before anything is paid for.

Dtypes: text is the frame's text dtype; integers ``Int64``, numbers
``Float64``, booleans ``boolean`` (nullable: a failed row is null);
lists and nested objects are declared as Arrow types (``list<string>``,
``struct<...>``) so that ``to_parquet`` writes typed columns, and computed as
Python lists and dicts in object columns, which every Parquet reader reads
back (pandas 3 cannot parse a nested Arrow dtype recorded in a file's pandas
metadata, and Dask cannot write an untyped object column). A field of no
fixed type (``dict[str, int]``, ``Any``, a union) is JSON text: a text column
holding each value's ``json.dumps`` (null stays null), which Parquet writes and
every reader reads back (a dict with no declared keys has no Arrow struct, and
an object column of them wrote on neither pandas nor Dask). Only a chain of no
known schema (a function with ``outputs=``) keeps its values in an ``object``
column as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pydantic
from langchain_core.runnables import Runnable

from dask_llm.chains.graph import find


class _Text:
    """Placeholder dtype for text columns, resolved by the plan to the frame's own text dtype."""

    def __repr__(self) -> str:
        return "TEXT"

    def __reduce__(self) -> str:
        return "TEXT"


TEXT: Any = _Text()


class _Json:
    """Placeholder dtype for JSON text columns (a field of no fixed type: ``dict``, ``Any``)."""

    def __repr__(self) -> str:
        return "JSON"

    def __reduce__(self) -> str:
        return "JSON"


JSON: Any = _Json()

#: What the raw answer's column is called in ``outputs=`` of an ``include_raw`` chain.
RAW = "raw"


class OutputSpec:
    """``fields``: result field -> column (for a scalar chain, one entry); ``dtypes`` by column.

    ``include_raw``: the chain returns ``{"raw", "parsed", "parsing_error"}``.
    """

    __slots__ = ("dtypes", "fields", "include_raw", "scalar")

    def __init__(
        self,
        *,
        scalar: bool,
        fields: dict[str, str],
        dtypes: dict[str, Any],
        include_raw: bool = False,
    ) -> None:
        self.scalar = scalar
        self.fields = fields
        self.dtypes = dtypes
        self.include_raw = include_raw


def output_spec(name: str, runnable: Runnable | None, outputs: Any) -> OutputSpec:
    """The columns of chain ``name`` (``runnable`` may be None for an unbuilt factory)."""
    shape = _Shape.of(runnable) if runnable is not None else _Shape(None, False, False)
    props = shape.properties
    defs = shape.defs
    if isinstance(outputs, str):
        if shape.text:
            return OutputSpec(scalar=True, fields={outputs: outputs}, dtypes={outputs: TEXT})
        dtype = dtype_for(shape.schema, defs) if shape.schema and not props else _whole(shape)
        return OutputSpec(
            scalar=True,
            fields={outputs: outputs},
            dtypes={outputs: dtype},
            include_raw=shape.include_raw,
        )
    if outputs is not None:
        mapping = dict(outputs) if isinstance(outputs, Mapping) else {f: f for f in outputs}
        if not mapping:
            raise ValueError(f"chain {name!r}: outputs= is empty")
        if shape.text:
            if len(mapping) != 1:
                raise ValueError(
                    f"chain {name!r} returns text (one value), so it makes one column; "
                    f"outputs= names {len(mapping)}: {', '.join(mapping)}"
                )
            ((_, column),) = mapping.items()
            return OutputSpec(scalar=True, fields={column: column}, dtypes={column: TEXT})
        known = set(props) | ({RAW} if shape.include_raw else set())
        if props and not set(mapping) <= known:
            unknown = ", ".join(f for f in mapping if f not in known)
            raise ValueError(
                f"chain {name!r}: outputs= names fields the chain does not return: {unknown}; "
                f"it returns: {', '.join(sorted(known))}"
            )
        dtypes = {
            col: TEXT if field == RAW and shape.include_raw else dtype_for(props.get(field), defs)
            for field, col in mapping.items()
        }
        return OutputSpec(
            scalar=False, fields=mapping, dtypes=dtypes, include_raw=shape.include_raw
        )
    if shape.text:
        return OutputSpec(scalar=True, fields={name: name}, dtypes={name: TEXT})
    if props:
        return OutputSpec(
            scalar=False,
            fields={f: f for f in props},
            dtypes={f: dtype_for(p, defs) for f, p in props.items()},
            include_raw=shape.include_raw,
        )
    raise ValueError(
        f"chain {name!r}: cannot tell which columns the runnable returns (its output "
        "schema is not text, a Pydantic model, a TypedDict or a JSON schema); give "
        "outputs='column' for one column or outputs=['field', ...] for one column per field"
    )


def _whole(shape: _Shape) -> Any:
    """The dtype of a column holding a chain's whole structured result."""
    if shape.schema and shape.properties:
        arrow = arrow_type(shape.schema, shape.defs)
        if arrow is not None:
            return pd.ArrowDtype(arrow)
    return JSON if shape.schema else object_dtype()


class _Shape:
    """What a runnable returns: text, or an object with a JSON schema (and whether raw)."""

    __slots__ = ("defs", "include_raw", "properties", "schema", "text")

    def __init__(self, schema: dict[str, Any] | None, text: bool, include_raw: bool) -> None:
        self.schema = schema
        self.text = text
        self.include_raw = include_raw
        self.properties: dict[str, Any] = (schema or {}).get("properties") or {}
        self.defs: dict[str, Any] = {
            **(schema or {}).get("definitions", {}),
            **(schema or {}).get("$defs", {}),
        }

    @classmethod
    def of(cls, runnable: Runnable) -> _Shape:
        declared = _json_schema(runnable.output_schema)
        declared_props = set((declared or {}).get("properties") or {})
        include_raw = {"raw", "parsed", "parsing_error"} <= declared_props
        structured = _structured_schema(runnable)
        if structured is not None:
            return cls(structured, False, include_raw)
        if declared and declared.get("type") == "string" and not declared_props:
            return cls(declared, True, False)
        if _returns_message(runnable):
            return cls(None, True, False)
        parser_schema = _parser_schema(runnable)
        if parser_schema is not None:
            return cls(parser_schema, False, False)
        return cls(declared, False, include_raw)


def _structured_schema(runnable: Runnable) -> dict[str, Any] | None:
    """The schema a ``with_structured_output`` inside the chain asked for, if any."""
    last = _last(runnable)
    queued = getattr(last, "_queued_declarative_operations", None)
    if queued:  # a configurable init_chat_model: its operations run at call time
        for op, args, kwargs in reversed(queued):
            if op == "with_structured_output":
                schema = args[0] if args else kwargs.get("schema")
                return to_json_schema(schema)
        return None
    for binding in find(runnable, lambda x: hasattr(x, "kwargs") and hasattr(x, "bound")):
        fmt = binding.kwargs.get("ls_structured_output_format")
        if isinstance(fmt, dict) and fmt.get("schema") is not None:
            # A tool-calling chain names its one tool's model on its parser; prefer the
            # class (its $defs are intact) over the tool dict the binding carries.
            tools = getattr(last, "tools", None)
            if isinstance(tools, list) and len(tools) == 1 and _is_model(tools[0]):
                return to_json_schema(tools[0])
            return to_json_schema(fmt["schema"])
    return None


def _parser_schema(runnable: Runnable) -> dict[str, Any] | None:
    """``JsonOutputParser(pydantic_object=M)`` / ``PydanticOutputParser``: ``M``'s schema."""
    last = _last(runnable)
    model = getattr(last, "pydantic_object", None)
    if model is not None:
        return to_json_schema(model)
    return None


def to_json_schema(schema: Any) -> dict[str, Any] | None:
    """A JSON schema from a Pydantic class, a TypedDict, a JSON schema or an OpenAI tool dict."""
    if _is_model(schema):
        return _json_schema(schema)
    if isinstance(schema, dict):
        if schema.get("type") == "function" and isinstance(schema.get("function"), dict):
            params = schema["function"].get("parameters")
            return params if isinstance(params, dict) else None
        if isinstance(schema.get("json_schema"), dict):  # a response_format
            inner = schema["json_schema"].get("schema")
            return inner if isinstance(inner, dict) else None
        if "parameters" in schema and isinstance(schema["parameters"], dict):
            return schema["parameters"]
        return schema
    try:
        from langchain_core.utils.function_calling import convert_to_json_schema

        converted: dict[str, Any] = convert_to_json_schema(schema)
        return converted
    except (TypeError, ValueError):
        return None


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)


def json_schema_of(model: Any) -> dict[str, Any] | None:
    """``model.model_json_schema()``, or None when it has none."""
    return _json_schema(model)


def _json_schema(model: Any) -> dict[str, Any] | None:
    try:
        schema: dict[str, Any] = model.model_json_schema()
        return schema
    except (AttributeError, TypeError, ValueError, pydantic.PydanticUserError):
        return None


def _last(runnable: Runnable) -> Any:
    last = getattr(runnable, "last", runnable)
    while hasattr(last, "bound") and not hasattr(last, "_queued_declarative_operations"):
        last = last.bound  # .bind(...) / .with_config(...)
    return last


def _returns_message(runnable: Runnable) -> bool:
    """A chain ending in a chat model (no parser) returns a message: its text is the output."""
    from langchain_core.language_models import BaseLanguageModel

    last = _last(runnable)
    if isinstance(last, BaseLanguageModel):
        return True
    # A configurable init_chat_model (langchain's _ConfigurableModel) builds a chat model
    # per call; without queued structured output it returns a message too.
    return type(last).__name__ == "_ConfigurableModel" and not getattr(
        last, "_queued_declarative_operations", None
    )


def is_configurable_model(obj: Any) -> bool:
    """A configurable ``init_chat_model`` (it builds its chat model at call time)."""
    return type(obj).__name__ == "_ConfigurableModel" and hasattr(obj, "_model")


# -- dtypes ---------------------------------------------------------------------------------
def object_dtype() -> Any:
    return np.dtype(object)


def string_dtype() -> Any:
    """The dtype pandas gives text columns here (``str`` on pandas 3, ``object`` before)."""
    return pd.Series(["x"]).dtype


def dtype_for(prop: dict[str, Any] | None, defs: dict[str, Any]) -> Any:
    """The column dtype of one JSON-schema property (see the module docstring).

    None (no schema says what the field is): ``object``, the chain's own values.
    """
    if prop is None:
        return object_dtype()
    prop = _resolve(prop, defs)
    if not prop:
        return JSON
    kind = prop.get("type")
    if kind == "string" or (kind is None and _all_strings(prop.get("enum"))):
        return TEXT
    if kind == "integer":
        return pd.Int64Dtype()
    if kind == "number":
        return pd.Float64Dtype()
    if kind == "boolean":
        return pd.BooleanDtype()
    arrow = arrow_type(prop, defs)
    return pd.ArrowDtype(arrow) if arrow is not None else JSON


def arrow_type(prop: dict[str, Any] | None, defs: dict[str, Any], depth: int = 0) -> Any:
    """The Arrow type of a JSON-schema property, or None when it has no fixed one."""
    prop = _resolve(prop, defs)
    if not prop or depth > 8:
        return None
    kind = prop.get("type")
    if kind == "string" or (kind is None and _all_strings(prop.get("enum"))):
        return pa.string()
    if kind in _ARROW_SCALARS:
        return _ARROW_SCALARS[kind]
    if kind == "array":
        item = arrow_type(prop.get("items") or {}, defs, depth + 1)
        return pa.list_(item) if item is not None else None
    if kind == "object" or (kind is None and "properties" in prop):
        fields = []
        for key, sub in (prop.get("properties") or {}).items():
            sub_type = arrow_type(sub, defs, depth + 1)
            if sub_type is None:
                return None
            fields.append(pa.field(key, sub_type))
        return pa.struct(fields) if fields else None
    return None


_ARROW_SCALARS = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def _resolve(prop: dict[str, Any] | None, defs: dict[str, Any]) -> dict[str, Any] | None:
    """Follow ``$ref`` and drop a null option of ``anyOf`` (an optional field)."""
    for _ in range(10):
        if not prop:
            return prop
        if "$ref" in prop:
            prop = defs.get(str(prop["$ref"]).rsplit("/", 1)[-1])
            continue
        options = prop.get("anyOf") or prop.get("oneOf")
        if options:
            non_null = [o for o in options if o.get("type") != "null"]
            if len(non_null) != 1:
                return None
            prop = non_null[0]
            continue
        return prop
    return None


def _all_strings(values: Any) -> bool:
    return isinstance(values, list) and bool(values) and all(isinstance(v, str) for v in values)


def is_nested(dtype: Any) -> bool:
    """Declared as a nested Arrow type (list, struct): computed as Python objects."""
    return isinstance(dtype, pd.ArrowDtype) and pa.types.is_nested(dtype.pyarrow_dtype)
