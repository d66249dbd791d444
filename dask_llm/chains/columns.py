"""From a chain's result to typed columns: what is kept of an answer, and how columns are built.

``normalize`` turns a chain's result into the plain data that goes to its
columns (and to the row memo of the cache): a message's text, a Pydantic
model's fields, a dict's fields. ``column`` builds a column of the plan's
dtype, keeping each value that converts and nulling the others rather than
failing the partition.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import pydantic
from langchain_core.messages import BaseMessage

from dask_llm.chains.outputs import RAW, is_nested, object_dtype
from dask_llm.chains.plan import PlannedChain


class RowFailed(Exception):
    """A chain failed for a row; ``message`` goes to the error column."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause


def is_missing(value: Any) -> bool:
    """None, NA, NaN, NaT or blank text: an input that skips the chain for its row."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def normalize(pc: PlannedChain, result: Any) -> Any:
    """The part of a chain's result that goes to its columns, as plain data."""
    spec = pc.outputs
    raw_text = None
    if spec.include_raw and isinstance(result, dict) and "parsed" in result:
        # with_structured_output(..., include_raw=True) caught its own parsing error:
        # the answer was paid for and is in the cache; a retry would pay again.
        error = result.get("parsing_error")
        if error is not None:
            raise RowFailed(f"{pc.name}: {type(error).__name__}: {_one_line(error)}")
        raw = result.get("raw")
        raw_text = raw.content if isinstance(raw, BaseMessage) else raw
        result = result.get("parsed")
    if spec.scalar:
        if isinstance(result, BaseMessage):
            return result.content
        if isinstance(result, pydantic.BaseModel):
            return result.model_dump(mode="json")
        return result
    if isinstance(result, pydantic.BaseModel):
        result = result.model_dump(mode="json")
    if not isinstance(result, dict):
        raise RowFailed(
            f"{pc.name}: returned {type(result).__name__}, expected fields {', '.join(spec.fields)}"
        )
    if spec.include_raw and RAW in spec.fields:
        result = {**result, RAW: raw_text}
    missing = [f for f in spec.fields if f not in result]
    if missing:
        raise RowFailed(f"{pc.name}: output missing from the result: {', '.join(missing)}")
    return {f: result[f] for f in spec.fields}


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_json(value: Any) -> str | None:
    """A value of a field of no fixed type as JSON text (``chains.outputs``); null stays null."""
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, default=str)


def column(values: list[Any], dtype: Any, index: pd.Index) -> pd.Series:
    """A column of ``dtype``; values that do not convert become null.

    Lists and nested objects (an Arrow list or struct in the plan) are kept as
    Python objects in an object column (see ``chains.outputs``).
    """
    if dtype == object_dtype() or is_nested(dtype):
        return pd.Series(values, dtype=object, index=index)
    try:
        return pd.Series(values, dtype=dtype, index=index)
    except (TypeError, ValueError, OverflowError):
        # A value of the wrong type (text where the schema said a number): keep
        # each value that converts, null the rest, rather than fail the partition.
        return pd.Series([_convert(v, dtype) for v in values], dtype=dtype, index=index)


def _convert(value: Any, dtype: Any) -> Any:
    try:
        return pd.array([value], dtype=dtype)[0]
    except (TypeError, ValueError, OverflowError):
        return None
