"""List filters on custom fields (`?custom.<key>=value`, crm.common.v1.CustomFieldFilter), one
implementation for every service that owns entities with custom fields (lead, account, contact,
opportunity, ticket).

A list use case turns the request's (key, value) pairs into typed filters with the entity's
definitions, then into SQL conditions on the table's `custom` column:

    filters = await load_filters(conn, custom_fields, "lead", [(f.key, f.value) for f in request.custom])
    query = query.where(*custom_clauses(conn, leads.c.custom, filters))

A key without a definition, or a value not of the field's type, is a ValidationFailed naming
`custom.<key>` (INVALID_ARGUMENT, 422 at the gateway). The value is parsed by the definition's type
into the stored form (crm_platform.custom_fields.parse_filter): a number matches 12 and 12.0, a bool
true/false, an email case-insensitively; a multi_enum filter matches records whose list contains
the option. On PostgreSQL the comparison is JSONB containment (`custom @> '{"key": value}'`), which
a GIN index `USING gin (custom jsonb_path_ops)` serves; on SQLite it is JSON1 (`json_extract`, and
`json_each` for multi_enum).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam, column, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crm_platform import custom_fields as cf
from crm_platform.custom_fields_service import load_definitions
from crm_platform.errors import FieldError, ValidationFailed

# SQLite stores integers in 64 bits: a larger filter number is compared as a float instead of
# failing to bind (JSON numbers that large are read back as floats by json_extract anyway).
_SQLITE_INT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class CustomFilter:
    """One custom field filter in the stored form of its definition's type."""

    key: str
    value: cf.JsonValue
    # multi_enum: the stored list contains `value`; otherwise the stored value equals it.
    multi: bool = False


def typed_filters(
    definitions: Iterable[cf.FieldDefinition], pairs: Iterable[tuple[str, str]], *, prefix: str = "custom"
) -> list[CustomFilter]:
    """The (key, query-string value) pairs as typed filters; ValidationFailed naming `<prefix>.<key>`
    for every key without a definition and every value not of its field's type."""
    by_key = {d.key: d for d in definitions}
    result: list[CustomFilter] = []
    errors: list[FieldError] = []
    for key, text in pairs:
        name = f"{prefix}.{key}"
        definition = by_key.get(key)
        if definition is None:
            errors.append(FieldError(name, "is not a defined custom field"))
            continue
        try:
            value = cf.parse_filter(definition, text)
        except ValueError as error:
            errors.append(FieldError(name, str(error)))
            continue
        result.append(CustomFilter(key, value, multi=definition.type == cf.FieldType.MULTI_ENUM))
    if errors:
        raise ValidationFailed(errors)
    return result


async def load_filters(
    conn: AsyncConnection, table: Table, entity: str, pairs: Iterable[tuple[str, str]], *, prefix: str = "custom"
) -> list[CustomFilter]:
    """`typed_filters` with the entity's definitions read from the service's definitions table
    (crm_platform.custom_fields_service); without pairs, the common case, nothing is read."""
    pairs = list(pairs)
    if not pairs:
        return []
    return typed_filters(await load_definitions(conn, table, entity), pairs, prefix=prefix)


def custom_equals(
    bind: AsyncConnection | AsyncEngine, custom: ColumnElement[Any], key: str, value: cf.JsonValue, *, multi: bool
) -> ColumnElement[bool]:
    """custom[key] equals the value (multi: the stored list contains it). `key` must be a defined
    key (crm_platform.custom_fields.KEY_PATTERN), as `typed_filters` ensures: it is part of a path."""
    if bind.dialect.name == "postgresql":
        document = {key: [value] if multi else value}
        return custom.op("@>", is_comparison=True)(bindparam(None, document, type_=JSONB()))
    path = f'$."{key}"'
    if isinstance(value, bool):
        value = 1 if value else 0  # SQLite's json_extract yields 1/0 for JSON booleans
    elif isinstance(value, int) and abs(value) > _SQLITE_INT_MAX:
        value = float(value)
    if multi:
        return (
            select(literal(1))
            .select_from(func.json_each(custom, path).table_valued("value"))
            .where(column("value") == value)
            .exists()
        )
    extracted: ColumnElement[Any] = func.json_extract(custom, path)
    return extracted.__eq__(value)  # typed as ColumnElement[bool]


def custom_clauses(
    bind: AsyncConnection | AsyncEngine, custom: ColumnElement[Any], filters: Sequence[CustomFilter]
) -> list[ColumnElement[bool]]:
    """One condition per filter (all must hold) on the table's `custom` column."""
    return [custom_equals(bind, custom, f.key, f.value, multi=f.multi) for f in filters]
