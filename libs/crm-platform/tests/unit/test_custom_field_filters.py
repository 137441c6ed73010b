"""The shared custom field filters: typed by the definitions (errors naming `custom.<key>`) and
compiled to JSONB containment on PostgreSQL and JSON1 on SQLite. Run against both databases in
tests/integration/test_custom_field_filters_db.py."""

from types import SimpleNamespace
from typing import Any

import pytest
from crm_platform.custom_field_filters import CustomFilter, custom_clauses, custom_equals, typed_filters
from crm_platform.custom_fields import FieldDefinition, FieldType, parse_filter
from crm_platform.errors import FieldError, ValidationFailed
from sqlalchemy import JSON, Column, MetaData, String, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

pytestmark = pytest.mark.unit


def d(key: str, type_: FieldType, **kw: Any) -> FieldDefinition:
    return FieldDefinition(entity="lead", key=key, label=key.title(), type=type_, **kw)


DEFS = [
    d("note", FieldType.TEXT),
    d("seats", FieldType.NUMBER),
    d("budget", FieldType.DECIMAL),
    d("renewal", FieldType.DATE),
    d("vip", FieldType.BOOL),
    d("channel", FieldType.ENUM, options=("direct", "partner")),
    d("products", FieldType.MULTI_ENUM, options=("crm", "erp")),
    d("billing_email", FieldType.EMAIL, pii=True),
]

records = Table(
    "records",
    MetaData(),
    Column("id", String(36), primary_key=True),
    Column("custom", JSON().with_variant(JSONB(), "postgresql")),
)


def bind(name: str) -> Any:
    """Stands in for an AsyncConnection or AsyncEngine: only its dialect is read."""
    return SimpleNamespace(dialect=postgresql.dialect() if name == "postgresql" else sqlite.dialect())


def sql(name: str, clause: Any) -> tuple[str, dict[str, Any]]:
    compiled = clause.compile(dialect=bind(name).dialect)
    return str(compiled), dict(compiled.params)


def test_pairs_become_filters_in_the_stored_form_of_their_type() -> None:
    pairs = [
        ("note", "hello"),
        ("seats", "12.0"),
        ("budget", "12.50"),
        ("renewal", "2026-12-01"),
        ("vip", "TRUE"),
        ("channel", "partner"),
        ("products", "erp"),
        ("billing_email", " Ops@Example.COM "),
    ]
    assert typed_filters(DEFS, pairs) == [
        CustomFilter("note", "hello"),
        CustomFilter("seats", 12),
        CustomFilter("budget", "12.50"),
        CustomFilter("renewal", "2026-12-01"),
        CustomFilter("vip", True),
        CustomFilter("channel", "partner"),
        CustomFilter("products", "erp", multi=True),
        CustomFilter("billing_email", "ops@example.com"),
    ]
    assert typed_filters(DEFS, []) == []


def test_every_unknown_key_and_ill_typed_value_is_named_at_once() -> None:
    pairs = [("nope", "x"), ("seats", "many"), ("vip", "yes"), ("products", "hr"), ("note", "fine")]
    with pytest.raises(ValidationFailed) as caught:
        typed_filters(DEFS, pairs)
    assert [e.field for e in caught.value.errors] == ["custom.nope", "custom.seats", "custom.vip", "custom.products"]
    assert caught.value.errors[0] == FieldError("custom.nope", "is not a defined custom field")
    assert "not a number" in caught.value.errors[1].message


def test_the_prefix_names_where_the_filter_came_from() -> None:
    with pytest.raises(ValidationFailed) as caught:
        typed_filters(DEFS, [("renewal", "2026-13-01")], prefix="filters.custom")
    assert [e.field for e in caught.value.errors] == ["filters.custom.renewal"]


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_not_sent_to_the_database(text: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_filter(DEFS[1], text)


def test_postgresql_uses_jsonb_containment_which_the_gin_index_serves() -> None:
    text, params = sql("postgresql", custom_equals(bind("postgresql"), records.c.custom, "seats", 12, multi=False))
    assert text == "records.custom @> %(param_1)s::JSONB"
    assert params == {"param_1": {"seats": 12}}
    text, params = sql("postgresql", custom_equals(bind("postgresql"), records.c.custom, "products", "erp", multi=True))
    assert text == "records.custom @> %(param_1)s::JSONB" and params == {"param_1": {"products": ["erp"]}}


def test_sqlite_compares_the_extracted_value_and_searches_lists() -> None:
    text, params = sql("sqlite", custom_equals(bind("sqlite"), records.c.custom, "channel", "partner", multi=False))
    assert text == "json_extract(records.custom, ?) = ?"
    assert list(params.values()) == ['$."channel"', "partner"]
    _, params = sql("sqlite", custom_equals(bind("sqlite"), records.c.custom, "vip", True, multi=False))
    assert list(params.values()) == ['$."vip"', 1]
    _, params = sql("sqlite", custom_equals(bind("sqlite"), records.c.custom, "seats", 2**70, multi=False))
    assert list(params.values()) == ['$."seats"', float(2**70)]
    text, params = sql("sqlite", custom_equals(bind("sqlite"), records.c.custom, "products", "erp", multi=True))
    expected = "EXISTS (SELECT ? AS anon_1 FROM json_each(records.custom, ?) AS anon_2 WHERE value = ?)"
    assert " ".join(text.split()) == expected
    assert list(params.values()) == [1, '$."products"', "erp"]


def test_one_clause_per_filter() -> None:
    filters = typed_filters(DEFS, [("vip", "false"), ("channel", "direct")])
    clauses = custom_clauses(bind("postgresql"), records.c.custom, filters)
    assert [sql("postgresql", c)[1]["param_1"] for c in clauses] == [{"vip": False}, {"channel": "direct"}]
