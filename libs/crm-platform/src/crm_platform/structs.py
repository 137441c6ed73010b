"""google.protobuf.Struct to and from plain values."""

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from crm_platform.errors import FieldError, ValidationFailed

# How deep a free-form JSON value (`custom`) may nest. Protobuf parsers refuse a message nested
# deeper than 100 levels, and each JSON level is two in a Struct (Value, then Struct or
# ListValue): a deeper value could be stored, but its event could not be read by any consumer.
MAX_NESTING = 32
TOO_DEEP = f"nests deeper than {MAX_NESTING} levels"


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
        raise ValidationFailed([FieldError(path, "must be a finite number (JSON has no NaN or Infinity)")]) from None


def _first_not_finite(message: struct_pb2.Struct | struct_pb2.ListValue, path: str) -> str | None:
    """The path of the first number in a Struct or list that is not finite."""
    items = message.fields.items() if isinstance(message, struct_pb2.Struct) else enumerate(message.values)
    for key, value in items:
        kind = value.WhichOneof("kind")
        inner = f"{path}.{key}"
        if kind == "number_value" and not math.isfinite(value.number_value):
            return inner
        if kind in ("struct_value", "list_value"):
            found = _first_not_finite(getattr(value, kind), inner)
            if found:
                return found
    return None
