"""One rule for money input in every service and in the gateway: a decimal written as digits, not negative,
at most MAX_AMOUNT (what every money column holds), in whole minor units of its ISO 4217 currency:
cents, thousandths (BHD, IQD, JOD, KWD, LYD, OMR, TND) or whole units (JPY, KRW...)."""

from decimal import Decimal

import pytest
from crm.common.v1 import common_pb2
from crm_platform.errors import ValidationFailed
from crm_platform.money import (
    ISO_4217_CURRENCIES,
    MAX_AMOUNT,
    MAX_FIGURE,
    amount_text,
    check_amount,
    minor_unit,
    money_from_proto,
    parse_amount,
    parse_currency,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("amount", ["0", "0.1", "12500.00", "999999999999.99", "7.50", "-0"])
def test_amounts_in_whole_cents_up_to_the_maximum_are_taken(amount: str) -> None:
    assert parse_amount(amount, field="cost.amount", currency="CNY") == Decimal(amount)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("1" * 40, f"must not exceed {MAX_AMOUNT}"),
        ("1000000000000", f"must not exceed {MAX_AMOUNT}"),
        ("0.129", "at most 2 decimal places"),
        ("-1", "must not be negative"),
    ],
)
def test_other_amounts_are_refused_naming_the_field(amount: str, message: str) -> None:
    # 40 digits overflowed the accounts' rounding (HTTP 500) and were rounded in campaigns;
    # 0.129 was rounded to 0.13 without a word.
    with pytest.raises(ValidationFailed) as caught:
        parse_amount(amount, field="annual_revenue.amount", currency="CNY")
    assert [(e.field, e.message) for e in caught.value.errors] == [("annual_revenue.amount", message)]


@pytest.mark.parametrize(
    "amount",
    ["1e5", "1E+3", "1e-3", "1e400", "-1e400", "Infinity", "NaN", "twelve", "", " 12", "12 ", "+1", "1_000", ".5",
     "5.", "--1", "١٢"],
)  # fmt: skip
def test_an_amount_not_written_as_digits_is_refused_naming_the_field(amount: str) -> None:
    # SPEC §3: money is a decimal string like "12500.00". Decimal() took "1e5" as 100000.00, and
    # blanks, "_", "+" and other scripts' digits too.
    with pytest.raises(ValidationFailed) as caught:
        parse_amount(amount, field="cost.amount", currency="CNY")
    message = f'{amount!r} is not a decimal number written as digits, such as "12500.00"'
    assert [(e.field, e.message) for e in caught.value.errors] == [("cost.amount", message)]


def test_an_amount_that_must_be_positive_refuses_zero() -> None:
    assert (
        check_amount(Decimal(0), field="amount", currency="CNY", allow_zero=False)[0].message
        == "must be greater than zero"
    )
    assert (
        check_amount(Decimal(-1), field="amount", currency="CNY", allow_zero=False)[0].message
        == "must be greater than zero"
    )
    assert check_amount(Decimal(0), field="amount", currency="CNY") == []


@pytest.mark.parametrize(
    ("text", "code"), [("CNY", "CNY"), ("cny", "CNY"), (" usd ", "USD"), ("ZWG", "ZWG"), ("cnh", "CNH")]
)
def test_iso_4217_codes_are_taken_upper_cased(text: str, code: str) -> None:
    assert parse_currency(text, field="cost.currency") == code


@pytest.mark.parametrize("text", ["ZZZ", "XXX", "XTS", "XAU", "HRK", "", "CN", "CNYY", "¥", "RMB"])
def test_anything_but_a_currency_in_use_is_refused(text: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_currency(text, field="cost.currency")
    assert [e.field for e in caught.value.errors] == ["cost.currency"]


def test_the_currency_list_holds_three_letter_codes_only() -> None:
    assert len(ISO_4217_CURRENCIES) > 150
    assert all(len(code) == 3 and code.isascii() and code.isupper() for code in ISO_4217_CURRENCIES)
    assert {"CNY", "USD", "EUR", "JPY", "HKD", "GBP"} <= ISO_4217_CURRENCIES


def test_money_from_a_message_names_the_fields_of_the_money() -> None:
    with pytest.raises(ValidationFailed) as caught:
        money_from_proto(common_pb2.Money(amount="1", currency="ZZZ"), field="cost")
    assert [e.field for e in caught.value.errors] == ["cost.currency"]


def test_a_companys_figure_may_exceed_the_cap_on_amounts_up_to_what_its_column_holds() -> None:
    assert (
        check_amount(Decimal("3546000000000.00"), field="annual_revenue.amount", currency="CNY", maximum=MAX_FIGURE)
        == []
    )
    assert (
        check_amount(Decimal("3546000000000.00"), field="amount", currency="CNY")[0].message
        == f"must not exceed {MAX_AMOUNT}"
    )
    too_big = check_amount(MAX_FIGURE + 1, field="annual_revenue.amount", currency="CNY", maximum=MAX_FIGURE)
    assert [e.message for e in too_big] == [f"must not exceed {MAX_FIGURE}"]


@pytest.mark.parametrize("currency", ["JPY", "KRW", "VND", "CLP", "XOF"])
def test_currencies_without_minor_units_take_whole_amounts_only(currency: str) -> None:
    assert parse_amount("849", field="amount", currency=currency) == Decimal(849)
    assert parse_amount("849.00", field="amount", currency=currency) == Decimal(849)  # the same value
    with pytest.raises(ValidationFailed) as caught:
        parse_amount("849.15", field="amount", currency=currency)
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("amount", f"{currency} has no minor unit: a whole amount, without decimal places")
    ]


@pytest.mark.parametrize("currency", ["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"])
def test_three_decimal_currencies_take_thousandths(currency: str) -> None:
    assert minor_unit(currency) == Decimal("0.001")
    assert parse_amount("12.345", field="amount", currency=currency) == Decimal("12.345")
    assert parse_amount("12.3450", field="amount", currency=currency) == Decimal("12.345")  # the same value
    with pytest.raises(ValidationFailed) as caught:
        parse_amount("12.3456", field="amount", currency=currency)
    assert [(e.field, e.message) for e in caught.value.errors] == [("amount", "at most 3 decimal places")]


@pytest.mark.parametrize(
    ("currency", "amount", "message"),
    [
        ("EUR", "12.345", "at most 2 decimal places"),
        ("KWD", "12.3456", "at most 3 decimal places"),
        ("JPY", "12.3", "JPY has no minor unit: a whole amount, without decimal places"),
    ],
)
def test_a_too_precise_amount_is_told_how_many_places_its_currency_takes(
    currency: str, amount: str, message: str
) -> None:
    assert [e.message for e in check_amount(Decimal(amount), field="amount", currency=currency)] == [message]


def test_amounts_are_shown_in_the_currencys_minor_unit() -> None:
    assert minor_unit("CNY") == Decimal("0.01")
    assert minor_unit("JPY") == Decimal(1)
    assert minor_unit("KWD") == Decimal("0.001")
    assert amount_text(Decimal("12500.0000"), "CNY") == "12500.00"
    assert amount_text(Decimal("849.0000"), "JPY") == "849"
    assert amount_text(Decimal("849.0000"), "KWD") == "849.000"  # a dinar has 1000 fils
    assert amount_text(Decimal("12.3450"), "KWD") == "12.345"
