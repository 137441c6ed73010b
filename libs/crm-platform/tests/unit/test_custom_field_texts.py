"""Custom values that come as text (CSV cells, web form fields) are read by their field's type the
way a list filter's query string is: one reading (`from_text`) serves filters, imports and forms."""

from collections.abc import Callable

import pytest
from crm_platform.custom_fields import (
    FieldDefinition,
    FieldType,
    coerce,
    from_text,
    parse_filter,
    typed_texts,
    validate,
)
from crm_platform.errors import FieldError

pytestmark = pytest.mark.unit


def d(key: str, type_: FieldType, **kw: object) -> FieldDefinition:
    return FieldDefinition(entity="lead", key=key, label=key.title(), type=type_, **kw)  # type: ignore[arg-type]


VISITS = d("visits", FieldType.NUMBER)
VIP = d("vip", FieldType.BOOL)
DEFS = [
    VISITS,
    VIP,
    d("seats", FieldType.NUMBER, required=True),
    d("note", FieldType.TEXT),
    d("budget", FieldType.DECIMAL),
    d("renewal", FieldType.DATE),
    CHANNEL := d("channel", FieldType.ENUM, options=("direct", "partner")),
    d("products", FieldType.MULTI_ENUM, options=("crm", "erp")),
]


@pytest.mark.parametrize(("text", "number"), [("12", 12), ("3.5", 3.5), (" 12 ", 12), ("12.0", 12), ("-0.25", -0.25)])
def test_a_number_fields_text_is_read_as_the_number(text: str, number: float) -> None:
    value = from_text(VISITS, text)
    assert value == number and type(value) is type(number)  # an integral number is stored as an int


@pytest.mark.parametrize(("text", "reason"), [("12abc", "not a number"), ("", "not a number"), ("nan", "finite")])
def test_text_that_is_not_a_finite_number_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        from_text(VISITS, text)


@pytest.mark.parametrize(("text", "flag"), [("true", True), ("FALSE", False), (" True ", True)])
def test_a_bool_fields_text_is_true_or_false_in_any_case(text: str, flag: bool) -> None:
    assert from_text(VIP, text) is flag


@pytest.mark.parametrize("text", ["1", "0", "yes", "no", "y", ""])
def test_a_bool_is_only_true_or_false_as_filters_take_it(text: str) -> None:
    with pytest.raises(ValueError, match="true or false"):
        from_text(VIP, text)


@pytest.mark.parametrize(
    ("definition", "text"),
    [
        (VISITS, "12"),
        (VISITS, " 3.5 "),
        (VISITS, "1e3"),
        (VIP, "TRUE"),
        (VIP, "false"),
        (VISITS, "x"),
        (VIP, "1"),
    ],
)
def test_a_filter_reads_a_number_or_bool_exactly_as_an_import_or_form_does(
    definition: FieldDefinition, text: str
) -> None:
    def outcome(read: Callable[[FieldDefinition, str], object]) -> object:
        try:
            return read(definition, text)
        except ValueError as error:
            return str(error)

    assert outcome(parse_filter) == outcome(from_text)


@pytest.mark.parametrize(
    ("key", "text"),
    [("note", "12"), ("budget", "12.50"), ("renewal", "2026-12-01"), ("channel", "partner"), ("products", "crm;erp")],
)
def test_the_text_of_other_types_is_left_for_validate(key: str, text: str) -> None:
    definition = next(x for x in DEFS if x.key == key)
    assert from_text(definition, text) == text


def test_a_csv_rows_cells_become_typed_values_that_validate_and_store_typed() -> None:
    row = {
        "visits": "12",
        "vip": "true",
        "seats": " 3.5 ",
        "note": "42",
        "budget": "12.50",
        "renewal": "2026-12-01",
        "channel": "partner",
    }
    typed = typed_texts(DEFS, row)

    assert validate(DEFS, typed) == []
    assert coerce(DEFS, typed) == {
        "visits": 12,
        "vip": True,
        "seats": 3.5,
        "note": "42",  # a text field keeps the digits as text
        "budget": "12.50",
        "renewal": "2026-12-01",
        "channel": "partner",
    }


def test_text_that_does_not_read_is_kept_so_validate_names_the_field() -> None:
    typed = typed_texts(DEFS, {"visits": "12abc", "vip": "yes", "seats": "7"})

    assert typed == {"visits": "12abc", "vip": "yes", "seats": 7}
    assert validate(DEFS, typed) == [
        FieldError("custom.visits", "must be a number"),
        FieldError("custom.vip", "must be true or false"),
    ]


def test_blank_cells_are_no_value_and_a_required_one_is_still_required() -> None:
    typed = typed_texts(DEFS, {"visits": "", "vip": "  ", "seats": ""})

    assert typed == {"visits": "", "vip": "  ", "seats": ""}
    assert validate(DEFS, typed) == [FieldError("custom.seats", "is required")]
    assert coerce(DEFS, {k: v for k, v in typed.items() if k != "seats"}) == {}


def test_values_that_are_not_text_and_undefined_keys_are_as_given() -> None:
    given = {"visits": 12, "vip": False, "seats": 3.0, "colour": "12", "products": ["crm"]}
    assert typed_texts(DEFS, given) == given


def test_a_multi_enum_has_no_text_form_so_a_cell_is_refused_as_before() -> None:
    """Filters name one option, not a list: no separator is defined for a CSV cell (`crm;erp`)."""
    typed = typed_texts(DEFS, {"seats": 1, "products": "crm;erp"})
    assert validate(DEFS, typed) == [FieldError("custom.products", "must be a list of options")]


@pytest.mark.parametrize(("text", "option"), [("Partner", "partner"), ("DIRECT", "direct"), (" partner ", "partner")])
def test_an_enum_option_is_read_from_its_name_in_any_case(text: str, option: str) -> None:
    assert from_text(CHANNEL, text) == option
    assert parse_filter(CHANNEL, text) == option


def test_options_that_differ_only_in_case_are_not_guessed_between() -> None:
    sizes = d("size", FieldType.ENUM, options=("S", "s", "M"))
    assert from_text(sizes, "S") == "S"
    assert from_text(sizes, " m ") == "M"
    typed = typed_texts([sizes], {"size": "  s  "})  # which one? neither: refused, naming the field
    assert validate([sizes], typed) == [FieldError("custom.size", "must be one of S, s, M")]
