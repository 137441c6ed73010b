"""Keyset paging: the cursor is the sort key of the last row, so pages stay fast and stable."""

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, ColumnElement, Select, and_, or_

from crm_platform.errors import FieldError, ValidationFailed

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def page_limit(requested: int) -> int:
    if requested < 0:
        raise ValidationFailed([FieldError("limit", "must not be negative")])
    return min(requested or DEFAULT_LIMIT, MAX_LIMIT)


def encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values), default=str).encode()).decode()


def decode_cursor(cursor: str) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API issued")]) from None
    if not isinstance(values, list):
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API issued")])
    return values


def parse_sort(sort: str, allowed: dict[str, Column[Any]], *, default: str) -> tuple[Column[Any], bool]:
    """`-created_at` → (column, descending). Unknown fields are a validation error."""
    text = sort or default
    descending = text.startswith("-")
    name = text.lstrip("-")
    if name not in allowed:
        raise ValidationFailed([FieldError("sort", f"cannot sort by {name!r}; allowed: {', '.join(sorted(allowed))}")])
    return allowed[name], descending


def keyset_page(
    query: Select[Any],
    *,
    sort_column: Column[Any],
    id_column: Column[Any],
    descending: bool,
    cursor: str,
    limit: int,
) -> Select[Any]:
    """Orders by (sort column, id), starts after the cursor, fetches one extra row to know if more follow."""
    if cursor:
        encoded_value, after_id = decode_cursor(cursor)
        after_value = _restore(sort_column, encoded_value)
        condition: ColumnElement[bool]
        if descending:
            condition = or_(sort_column < after_value, and_(sort_column == after_value, id_column < after_id))
        else:
            condition = or_(sort_column > after_value, and_(sort_column == after_value, id_column > after_id))
        query = query.where(condition)
    order = (sort_column.desc(), id_column.desc()) if descending else (sort_column.asc(), id_column.asc())
    return query.order_by(*order).limit(limit + 1)


def _restore(column: Column[Any], value: Any) -> Any:
    """Cursor values travel as JSON; dates and decimals come back as their column's type."""
    if value is None:
        return None
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return value
    try:
        if python_type is datetime:
            return datetime.fromisoformat(value)
        if python_type is Decimal:
            return Decimal(value)
    except (TypeError, ValueError, ArithmeticError):
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API issued")]) from None
    return value


def next_cursor(rows: Sequence[Any], *, sort_key: str, limit: int) -> str:
    """The cursor for the page after `rows` (fetched with limit + 1), or '' when this was the last."""
    if len(rows) <= limit:
        return ""
    last = rows[limit - 1]
    return encode_cursor([getattr(last, sort_key), last.id])
