"""The shared custom-field engine: definitions, validation naming the field, canonical values, filters."""

import pytest
from crm_platform.custom_fields import (
    FieldDefinition,
    FieldType,
    check_definition,
    coerce,
    parse_filter,
    pii_keys,
    validate,
)
from crm_platform.errors import FieldError

pytestmark = pytest.mark.unit


def d(key: str, type_: FieldType, **kw: object) -> FieldDefinition:
    return FieldDefinition(entity="account", key=key, label=key.title(), type=type_, **kw)  # type: ignore[arg-type]


DEFS = [
    d("note", FieldType.TEXT),
    d("seats", FieldType.NUMBER, required=True),
    d("budget", FieldType.DECIMAL),
    d("renewal", FieldType.DATE),
    d("vip", FieldType.BOOL),
    d("channel", FieldType.ENUM, options=("direct", "partner")),
    d("products", FieldType.MULTI_ENUM, options=("crm", "erp", "bi")),
    d("billing_email", FieldType.EMAIL, pii=True),
    d("hotline", FieldType.PHONE, pii=True),
    d("homepage", FieldType.URL),
]


def test_valid_values_pass_and_are_canonicalised() -> None:
    values = {
        "note": " hello ",
        "seats": 12.0,
        "budget": "1200.50",
        "renewal": "2026-12-01",
        "vip": True,
        "channel": "partner",
        "products": ["bi", "crm", "bi"],
        "billing_email": " Ops@Example.COM ",
        "hotline": "+86 138-0013-8000",
        "homepage": "https://example.com/x",
    }
    assert validate(DEFS, values) == []
    stored = coerce(DEFS, values)
    assert stored["seats"] == 12 and isinstance(stored["seats"], int)
    assert stored["budget"] == "1200.50"
    assert stored["products"] == ["crm", "bi"]
    assert stored["billing_email"] == "ops@example.com"
    assert stored["note"] == "hello"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("seats", "12", "must be a number"),
        ("seats", True, "must be a number"),
        ("budget", "12,5", "not a decimal"),
        ("budget", 1.5, "decimal string"),
        ("renewal", "2026-13-01", "not a date"),
        ("vip", "yes", "true or false"),
        ("channel", "retail", "must be one of direct, partner"),
        ("products", ["crm", "hr"], "unknown options hr"),
        ("products", "crm", "list of options"),
        ("billing_email", "not-an-email", "email"),
        ("hotline", "call me", "phone"),
        ("homepage", "ftp://example.com", "http(s) URL"),
        ("note", 5, "string"),
        ("nope", "x", "not a defined custom field"),
    ],
)
def test_invalid_values_name_the_field(key: str, value: object, fragment: str) -> None:
    errors = validate(DEFS, {"seats": 1, key: value} if key != "seats" else {key: value})
    assert len(errors) == 1
    assert errors[0].field == f"custom.{key}"
    assert fragment in errors[0].message


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (1000.0, 1000),  # as a JSON 1000 arrives through a Struct
        (1000, 1000),
        (-0.0, 0),
        (2.5, 2.5),
        (float(2**53), 2**53),
        (-float(2**53), -(2**53)),
        # Beyond ±2**53 a double no longer holds every integer: the value is the double it travels as.
        (2**53 + 1, float(2**53)),
        (1e20, 1e20),
        (-1e20, -1e20),
    ],
)
def test_a_number_is_stored_as_an_int_when_integral_and_exact_in_a_double(given: float, stored: float) -> None:
    [value] = coerce(DEFS, {"seats": given}).values()
    assert value == stored
    assert type(value) is type(stored)


def test_required_field_missing_on_create_but_not_on_partial_update() -> None:
    assert validate(DEFS, {}) == [FieldError("custom.seats", "is required")]
    assert validate(DEFS, {"note": "x"}, partial=True) == []
    assert validate(DEFS, {"seats": None}, partial=True) == [FieldError("custom.seats", "is required")]


def test_empty_optional_values_are_dropped() -> None:
    assert validate(DEFS, {"seats": 1, "note": "  ", "products": []}) == []
    assert coerce(DEFS, {"seats": 1, "note": "  ", "products": []}) == {"seats": 1}


def test_definition_checks() -> None:
    assert check_definition("account", "tier_note", "Tier note", "text", []) == []
    fields = {e.field for e in check_definition("invoice", "Bad Key", " ", "colour", [])}
    assert fields == {"entity", "key", "label", "type"}
    assert check_definition("lead", "src", "Src", "enum", [])[0].field == "options"
    assert check_definition("lead", "src", "Src", "enum", ["a", "a"])[0].field == "options"
    assert check_definition("lead", "src", "Src", "text", ["a"])[0].field == "options"


def test_definitions_the_tables_cannot_store_are_refused() -> None:
    # Each is a 422 naming the field instead of a database error (VARCHAR(200), NUL in PostgreSQL).
    assert check_definition("lead", "src", "x" * 201, "text", [])[0].field == "label"
    assert check_definition("lead", "src", "Src\x00", "text", [])[0].field == "label"
    assert check_definition("lead", "src", "Src", "enum", ["a", "b\x00"])[0].field == "options"
    assert check_definition("lead", "src\n", "Src", "text", [])[0].field == "key"


def test_filters_parse_to_stored_form() -> None:
    by_key = {x.key: x for x in DEFS}
    assert parse_filter(by_key["seats"], "12") == 12
    assert parse_filter(by_key["vip"], "TRUE") is True
    assert parse_filter(by_key["products"], "erp") == "erp"
    assert parse_filter(by_key["billing_email"], "A@B.io") == "a@b.io"
    with pytest.raises(ValueError, match="not a number"):
        parse_filter(by_key["seats"], "many")
    with pytest.raises(ValueError, match="one of"):
        parse_filter(by_key["channel"], "retail")


def test_pii_keys() -> None:
    assert pii_keys(DEFS) == {"billing_email", "hotline"}
