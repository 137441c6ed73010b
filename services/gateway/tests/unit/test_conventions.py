"""The REST conventions every router shares: If-Match versions and money input."""

import pytest
from crm_platform.errors import EXPECTED_VERSION_ZERO
from fastapi import Response
from fastapi.exceptions import RequestValidationError
from gateway.conventions import FigureIn, MoneyIn, expected_version, with_etag
from pydantic import ValidationError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("if_match", "version"),
    [
        (None, 0),
        ("", 0),
        ('"3"', 3),
        ('W/"12"', 12),
        ("7", 7),
        (' "5" ', 5),
        ('"9223372036854775807"', 2**63 - 1),
        ("*", 0),  # any current version: the record must exist, which the write checks anyway
        ('"0"', EXPECTED_VERSION_ZERO),  # a version no stored record has: never unconditional
        ('W/"0"', EXPECTED_VERSION_ZERO),
    ],
)
def test_if_match_becomes_the_expected_version(if_match: str | None, version: int) -> None:
    assert expected_version(if_match) == version


@pytest.mark.parametrize(
    "if_match",
    [
        '"abc"',
        '"-2"',
        '"3',
        '"²"',  # a digit to str.isdigit(), not to int(): it was a 500
        '"' + "9" * 5000 + '"',  # more digits than int() reads: it was a 500
        '"9223372036854775808"',  # wider than int64
        "W/",
    ],
)
def test_a_malformed_if_match_is_a_422_naming_the_header(if_match: str) -> None:
    with pytest.raises(RequestValidationError) as error:
        expected_version(if_match)
    assert [e["loc"] for e in error.value.errors()] == [("header", "If-Match")]


def test_an_if_match_listing_several_versions_is_refused_rather_than_half_honoured() -> None:
    with pytest.raises(RequestValidationError) as error:
        expected_version('"1", "2"')
    assert "one version" in error.value.errors()[0]["msg"]


def test_the_etag_carries_the_version_back() -> None:
    response = Response()
    body = with_etag(response, {"id": "x", "version": 4})
    assert body == {"id": "x", "version": 4}
    assert response.headers["ETag"] == '"4"'
    assert expected_version(response.headers["ETag"]) == 4


def test_money_is_a_decimal_string_with_an_upper_cased_currency() -> None:
    money = MoneyIn(amount="12500.50", currency="cny").proto()
    assert (money.amount, money.currency) == ("12500.50", "CNY")


@pytest.mark.parametrize(
    ("amount", "currency", "sent"),
    [
        ("100", "CNY", "100.00"),
        ("100.0", "CNY", "100.00"),
        ("849.00", "JPY", "849"),
        ("12.345", "KWD", "12.345"),
        ("12.3", "KWD", "12.300"),
    ],
)
def test_money_goes_to_the_services_in_the_currencys_minor_unit(amount: str, currency: str, sent: str) -> None:
    # One amount written two ways is one request (an Idempotency-Key's fingerprint compares them).
    assert MoneyIn(amount=amount, currency=currency).proto().amount == sent


@pytest.mark.parametrize("amount", ["abc", "NaN", "Infinity", "", "1e5", "1E+2", " 100", "+5", "1_000", ".5", "5."])
def test_money_refuses_what_is_not_a_decimal_written_as_digits(amount: str) -> None:
    # SPEC §3: money is a decimal string like "12500.00"; "1e5" was taken as 100000.00.
    with pytest.raises(ValidationError) as error:
        MoneyIn(amount=amount, currency="CNY")
    assert error.value.errors()[0]["loc"] == ("amount",)
    assert "is not a decimal number written as digits" in error.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("1" * 40, "must not exceed 999999999999.99"),
        ("0.129", "at most 2 decimal places"),
        ("-5", "must not be negative"),
    ],
)
def test_money_refuses_amounts_no_service_takes(amount: str, message: str) -> None:
    # The services' own rule (crm_platform.money), applied before any call: 1e400 overflowed the
    # accounts' rounding (500), campaigns stored it as Infinity, 0.129 was rounded to 0.13.
    with pytest.raises(ValidationError) as error:
        MoneyIn(amount=amount, currency="CNY")
    [problem] = error.value.errors()
    assert problem["loc"] == ("amount",)
    assert message in problem["msg"]


@pytest.mark.parametrize("currency", ["ZZZ", "XXX", "C1Y"])
def test_money_refuses_what_is_not_an_iso_4217_currency(currency: str) -> None:
    with pytest.raises(ValidationError) as error:
        MoneyIn(amount="1.00", currency=currency)
    assert [problem["loc"] for problem in error.value.errors()] == [("currency",)]


def test_money_upper_cases_the_currency_it_takes() -> None:
    assert MoneyIn(amount="0.10", currency="usd").currency == "USD"


@pytest.mark.parametrize("model", [MoneyIn, FigureIn])
def test_money_in_a_currency_without_minor_units_is_whole(model: type[MoneyIn]) -> None:
    assert model(amount="849", currency="jpy").amount == "849"
    with pytest.raises(ValidationError) as error:
        model(amount="849.15", currency="JPY")
    [problem] = error.value.errors()
    assert problem["loc"] == ("amount",)
    assert "JPY has no minor unit" in problem["msg"]


@pytest.mark.parametrize("model", [MoneyIn, FigureIn])
def test_money_in_a_three_decimal_currency_takes_thousandths(model: type[MoneyIn]) -> None:
    assert model(amount="12.345", currency="kwd").amount == "12.345"
    with pytest.raises(ValidationError) as error:
        model(amount="12.3456", currency="KWD")
    [problem] = error.value.errors()
    assert problem["loc"] == ("amount",)
    assert "at most 3 decimal places" in problem["msg"]


@pytest.mark.parametrize("model", [MoneyIn, FigureIn])
def test_the_openapi_description_of_an_amount_states_each_currencys_places(model: type[MoneyIn]) -> None:
    description = model.model_json_schema()["properties"]["amount"]["description"]
    assert "at most 2 decimal places (3 in BHD, IQD, JOD, KWD, LYD, OMR, TND; none in a currency without" in description
