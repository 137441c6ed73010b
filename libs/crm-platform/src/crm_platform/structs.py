"""google.protobuf.Struct to and from plain values, and which JSON values the system can carry.

A value from outside (a request body, an imported row) must be storable and fit a Struct:
- text without U+0000 (PostgreSQL text and JSONB cannot hold it) and valid UTF-8 (JSON allows lone
  surrogates, protobuf strings do not);
- finite numbers: Python's JSON parser takes NaN and Infinity (and reads 1e999 as Infinity), which
  JSON does not have and neither JSONB nor a Struct's JSON form can carry; an integer travels as a
  protobuf double, so it must be one a double holds exactly (2^53 at most: a larger one, an ERP
  id say, would come back as another number);
- at most `MAX_NESTING` levels of objects and arrays.
`unstorable_values` names every place that breaks a rule; the gateway and the lead import ask it.
"""

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from crm_platform.errors import FieldError, ValidationFailed

# How deep a free-form JSON value (`custom`) may nest. Protobuf parsers refuse a message nested
# deeper than 100 levels, and each JSON level is two in a Struct (Value, then Struct or
# ListValue): a deeper value could be stored, but its event could not be read by any consumer.
MAX_NESTING = 32
TOO_DEEP = f"nests deeper than {MAX_NESTING} levels"
NOT_FINITE = "must be a finite number (JSON has no NaN or Infinity)"
OUT_OF_RANGE = "is out of range for a number"
# The largest integer a double holds exactly, with every integer below it.
MAX_EXACT_INTEGER = 2**53
INEXACT_INTEGER = (
    f"is an integer larger than {MAX_EXACT_INTEGER} (2^53), which would not be kept exactly: send it as text"
)

Location = tuple[str | int, ...]


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored, or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    return None


def unstorable_values(value: Any, loc: Location = (), *, level: int = 1) -> Iterator[tuple[Location, str]]:
    """(location, problem) of every string (keys included), number and nesting in a JSON value that
    breaks the rules above. `level` is the nesting level of `value` itself (a body or a row is 1)."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            yield loc, problem
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield loc, NOT_FINITE
    elif isinstance(value, int):
        if abs(value) > sys.float_info.max:
            yield loc, OUT_OF_RANGE
        elif abs(value) > MAX_EXACT_INTEGER:
            yield loc, INEXACT_INTEGER
    elif isinstance(value, dict):
        if level > MAX_NESTING:
            yield loc, TOO_DEEP
        elif not (_storable_strings(value.keys()) and _storable_strings(value.values())):
            for key, item in value.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    yield loc, f"has a key that {problem}"
                    continue
                yield from unstorable_values(item, (*loc, key), level=level + 1)
    elif isinstance(value, list):
        if level > MAX_NESTING:
            yield loc, TOO_DEEP
        elif not _storable_strings(value):
            for index, item in enumerate(value):
                yield from unstorable_values(item, (*loc, index), level=level + 1)


def _storable_strings(items: Iterable[Any]) -> bool:
    """True when every item is a string and none holds a NUL or a lone surrogate (False decides
    nothing: the caller then looks at each item). One join instead of a call per value: a CSV
    row, and most JSON ones, are checked in one pass."""
    try:
        text = "".join(items)
    except TypeError:  # not only strings
        return False
    return text_problem(text) is None


def fill_struct(message: struct_pb2.Struct, values: Mapping[str, Any]) -> None:
    """`message.update(values)`, with text set directly: `update` converts every value in Python,
    which costs twice as much for records that are mostly text (imports, audit snapshots)."""
    fields = message.fields
    rest = {}
    for key, value in values.items():
        if isinstance(value, str):
            fields[key].string_value = value
        else:
            rest[key] = value
    if rest:
        message.update(rest)


def struct_values(message: struct_pb2.Struct, *, field: str = "custom") -> dict[str, Any]:
    """A Struct's values as plain JSON values. A number that is not finite (NaN, Infinity) has no
    JSON form and cannot be stored: the caller gets INVALID_ARGUMENT naming the field."""
    try:
        return json_format.MessageToDict(message)  # type: ignore[no-any-return]
    except ValueError:  # json_format refuses NaN and Infinity
        path = _first_not_finite(message, field) or field
        raise ValidationFailed([FieldError(path, NOT_FINITE)]) from None


def _first_not_finite(message: struct_pb2.Struct | struct_pb2.ListValue, path: str) -> str | None:
    """The path of the first number in a Struct or list that is not finite."""
    items = message.fields.items() if isinstance(message, struct_pb2.Struct) else enumerate(message.values)
    for key, value in items:
        kind = value.WhichOneof("kind")
        inner = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
        if kind == "number_value" and not math.isfinite(value.number_value):
            return inner
        if kind in ("struct_value", "list_value"):
            found = _first_not_finite(getattr(value, kind), inner)
            if found:
                return found
    return None
