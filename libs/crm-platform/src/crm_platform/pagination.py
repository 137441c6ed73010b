"""Keyset paging: the cursor is the sort key of the last row, so pages stay fast and stable.

A cursor names the sort it was made for (its column, `-` before it when descending) and carries
the last row's value and id as JSON (times, dates and decimals as strings). `keyset_page` checks it
against the list before any SQL runs: a cursor of another sort or direction, or one that was
edited, is a ValidationFailed on `cursor` (HTTP 422), never a database error (HTTP 500) or a page
from the wrong end. Cursors issued before they named their sort, a bare [value, id], are taken
when their values fit the sort column (by callers of the handlers; over gRPC see below).

The gRPC server binds every list's cursors to the list: the RPC and its request's filters
(`page_fingerprint`, `bind_cursor`). A cursor of another list, or of the same list with other
filters, is refused on `cursor` as well, where it would otherwise start a page at a row of the
list it came from. So is a cursor issued before cursors were bound (a client paging across that
upgrade starts its list again)."""

import base64
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import BigInteger, Column, ColumnElement, Integer, Numeric, Select, SmallInteger, and_, or_
from sqlalchemy.types import TypeDecorator, TypeEngine

from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.structs import text_problem

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

NOT_ISSUED = "is not a cursor this API issued"
NOT_THIS_LIST = "does not fit this list and sort; start again without a cursor"
OTHER_LIST = "belongs to another list or other filters; start again without a cursor"

# The range PostgreSQL gives each integer type; the driver refuses a bigger number with an error.
_INTEGER_BITS = ((SmallInteger, 16), (BigInteger, 64), (Integer, 32))


def page_limit(requested: int) -> int:
    if requested < 0:
        raise ValidationFailed([FieldError("limit", "must not be negative")])
    return min(requested or DEFAULT_LIMIT, MAX_LIMIT)


def encode_cursor(values: Sequence[Any]) -> str:
    return _encode(list(values))


def decode_cursor(cursor: str) -> list[Any]:
    values = decode_cursor_json(cursor)
    if not isinstance(values, list):
        raise _refused(NOT_ISSUED)
    return values


def decode_cursor_json(cursor: str) -> Any:
    """What a cursor made by base64url-encoding JSON carries; a ValidationFailed on `cursor` unless
    `cursor` is exactly what encoding that JSON gave. base64 decoding alone is lenient: it skips
    characters outside its alphabet and anything after the padding, so an edited cursor would
    still be read, as another one."""
    try:
        data = base64.urlsafe_b64decode(cursor.encode())
        if base64.urlsafe_b64encode(data).decode() != cursor:
            raise ValueError("not the cursor's own encoding")
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested a few thousand deep
        raise _refused(NOT_ISSUED) from None


def sort_field(sort: str) -> tuple[str, bool]:
    """`-name` → ("name", True), `name` → ("name", False). One `-` at most: of `--name` or `-` the
    field left is `-name` or '', which no list sorts by."""
    descending = sort.startswith("-")
    return sort.removeprefix("-"), descending


def parse_sort(sort: str, allowed: dict[str, Column[Any]], *, default: str) -> tuple[Column[Any], bool]:
    """`-created_at` → (column, descending). Unknown fields are a validation error."""
    name, descending = sort_field(sort or default)
    if name not in allowed:
        raise ValidationFailed([FieldError("sort", f"cannot sort by {name!r}; allowed: {', '.join(sorted(allowed))}")])
    return allowed[name], descending


def page_fingerprint(method: str, request: Message) -> str:
    """What a list's cursors are bound to: the RPC and its request without the page (the filters,
    the parent record, the scope asked for). Stable across processes and replicas. A repeated
    filter is a set of values: given in another order, it is the same list."""
    filters = type(request)()
    filters.CopyFrom(request)
    filters.ClearField("page")
    for field, values in filters.ListFields():
        if field.is_repeated and field.message_type is None:
            ordered = sorted(values)
            del values[:]
            values.extend(ordered)
    return list_fingerprint(method, filters.SerializeToString(deterministic=True))


def list_fingerprint(list_name: str, filters: bytes) -> str:
    """The fingerprint `bind_cursor` binds a cursor to: a list and its filters, however encoded."""
    digest = hashlib.blake2b(list_name.encode(), digest_size=8)
    digest.update(filters)
    return digest.hexdigest()


def bind_cursor(cursor: str, fingerprint: str) -> str:
    """A list's next cursor as handed out: prefixed with its list's fingerprint. base64url text has
    no `.`, so the prefix is read back unambiguously."""
    return f"{fingerprint}.{cursor}" if cursor else ""


def unbind_cursor(cursor: str, fingerprint: str) -> str:
    """The cursor `bind_cursor` bound to `fingerprint`. Another list's cursor, or one made for other
    filters, would page from a row of that list: a ValidationFailed on `cursor`, not a wrong page."""
    if not cursor:
        return ""
    bound_to, dot, inner = cursor.partition(".")
    if not (bound_to and dot and inner):
        raise _refused(NOT_ISSUED)
    if bound_to != fingerprint:
        raise _refused(OTHER_LIST)
    return inner


def keyset_page(
    query: Select[Any],
    *,
    sort_column: Column[Any],
    id_column: Column[Any],
    descending: bool,
    cursor: str,
    limit: int,
) -> Select[Any]:
    """Orders by (sort column, id), starts after the cursor, fetches one extra row to know if more follow.
    NULLs of a nullable sort column come last ascending and first descending, where PostgreSQL's
    indexes keep them; SQLite, which sorts them the other way, is told so in ORDER BY."""
    if cursor:
        after_value, after_id = _after(cursor, sort_column, id_column, descending)
        query = query.where(_rows_after(sort_column, id_column, descending, after_value, after_id))
    if descending:
        first = sort_column.desc().nulls_first() if sort_column.nullable else sort_column.desc()
        return query.order_by(first, id_column.desc()).limit(limit + 1)
    first = sort_column.asc().nulls_last() if sort_column.nullable else sort_column.asc()
    return query.order_by(first, id_column.asc()).limit(limit + 1)


def _rows_after(
    sort_column: Column[Any], id_column: Column[Any], descending: bool, value: Any, after_id: Any
) -> ColumnElement[bool]:
    """The rows past (value, id) in `keyset_page`'s order; `value` is None only for a nullable column."""
    if descending:
        if value is None:
            return or_(sort_column.is_not(None), id_column < after_id)
        return or_(sort_column < value, and_(sort_column == value, id_column < after_id))
    if value is None:
        return and_(sort_column.is_(None), id_column > after_id)
    later = or_(sort_column > value, and_(sort_column == value, id_column > after_id))
    return or_(later, sort_column.is_(None)) if sort_column.nullable else later


def next_cursor(rows: Sequence[Any], *, sort_key: str, descending: bool, limit: int, id_key: str = "id") -> str:
    """The cursor for the page after `rows` (fetched with limit + 1), or '' when this was the last.
    `sort_key` names the sort column; the cursor keeps it and the direction, to refuse being used
    with another sort (the other direction would page from the wrong end). `id_key` names the
    column that breaks ties (`keyset_page`'s id column)."""
    if len(rows) <= limit:
        return ""
    last = rows[limit - 1]
    value, tie = getattr(last, sort_key), getattr(last, id_key)
    return _encode({"sort": _sort_name(sort_key, descending), "value": value, "id": tie})


def _sort_name(column: str, descending: bool) -> str:
    return f"-{column}" if descending else column


def _encode(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, default=str).encode()).decode()


def _refused(message: str) -> ValidationFailed:
    return ValidationFailed([FieldError("cursor", message)])


def _after(cursor: str, sort_column: Column[Any], id_column: Column[Any], descending: bool) -> tuple[Any, Any]:
    """The sort value and id a cursor starts after, typed as their columns, if it fits this list."""
    payload = decode_cursor_json(cursor)
    if isinstance(payload, dict) and set(payload) == {"sort", "value", "id"}:
        made_for = payload["sort"]
        if made_for not in (_sort_name(sort_column.name, descending), _sort_name(sort_column.key, descending)):
            if isinstance(made_for, str) and made_for.removeprefix("-").isidentifier():
                raise _refused(f"belongs to a list sorted by {made_for}; start again without a cursor")
            raise _refused(NOT_ISSUED)
        value, after_id = payload["value"], payload["id"]
    elif isinstance(payload, list) and len(payload) == 2:
        value, after_id = payload  # issued before cursors named their sort: only the types can be checked
    else:
        raise _refused(NOT_ISSUED)
    return cursor_value(sort_column, value), cursor_value(id_column, after_id)


def cursor_value(column: Column[Any], value: Any) -> Any:
    """A cursor value as its column's type, as `next_cursor` wrote it; refused when the database
    could not compare it with the column (an error) or would compare it wrongly (SQLite)."""
    if value is None and column.nullable:
        return None
    try:
        return _typed(column.type, value)
    except (TypeError, ValueError, ArithmeticError):
        raise _refused(NOT_THIS_LIST) from None


def _typed(column_type: TypeEngine[Any], value: Any) -> Any:
    """Raises TypeError, ValueError or ArithmeticError when `value` cannot be one of the column's."""
    sql_type = column_type
    while isinstance(sql_type, TypeDecorator):
        sql_type = sql_type.impl_instance
    try:
        python_type = column_type.python_type
    except NotImplementedError:
        python_type = object
    if python_type is datetime:
        moment = datetime.fromisoformat(_text(value))
        zoned = bool(getattr(sql_type, "timezone", False))
        if zoned and moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)  # read from SQLite without an offset; stored as UTC
        if not zoned and moment.tzinfo is not None:
            raise ValueError("an aware time for a column without time zones")
        return moment
    if python_type is date:
        return date.fromisoformat(_text(value))
    if python_type is Decimal:
        number = Decimal(_text(value))
        if not number.is_finite():
            raise ValueError("not a finite number")
        if isinstance(sql_type, Numeric) and sql_type.precision is not None:
            scale = sql_type.scale or 0
            held = number.quantize(Decimal(1).scaleb(-scale))
            if held != number or abs(held) >= Decimal(10) ** (sql_type.precision - scale):
                raise ValueError("more digits than the column has")
        elif not -1000 < number.as_tuple().exponent < 1000:  # type: ignore[operator]
            raise ValueError("an exponent no database column holds")
        return number
    if python_type is int:
        if type(value) is not int:  # not a bool or a float either
            raise TypeError("not an integer")
        bits = next((bits for kind, bits in _INTEGER_BITS if isinstance(sql_type, kind)), 64)
        if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise ValueError("out of the column's range")
        return value
    if python_type is str:
        if text_problem(_text(value)):
            raise ValueError("not text PostgreSQL can compare")
        return value
    # No list sorts by other types yet: their scalars go to the database as JSON gave them.
    if isinstance(value, list | dict):
        raise TypeError("not a scalar")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value
