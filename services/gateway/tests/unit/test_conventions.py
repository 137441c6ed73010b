"""The REST conventions every router shares: If-Match versions and money input."""

import pytest
from fastapi import Response
from gateway.conventions import MoneyIn, expected_version, with_etag
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
        ('"abc"', -1),
        ('"-2"', -1),
        ('"99999999999999999999"', -1),  # wider than int64: never matches rather than overflowing
    ],
)
def test_if_match_becomes_the_expected_version(if_match: str | None, version: int) -> None:
    assert expected_version(if_match) == version


def test_the_etag_carries_the_version_back() -> None:
    response = Response()
    body = with_etag(response, {"id": "x", "version": 4})
    assert body == {"id": "x", "version": 4}
    assert response.headers["ETag"] == '"4"'
    assert expected_version(response.headers["ETag"]) == 4


def test_money_is_a_decimal_string_with_an_upper_cased_currency() -> None:
    money = MoneyIn(amount="12500.50", currency="cny").proto()
    assert (money.amount, money.currency) == ("12500.50", "CNY")


@pytest.mark.parametrize("amount", ["abc", "NaN", "Infinity", ""])
def test_money_refuses_what_is_not_a_finite_decimal(amount: str) -> None:
    with pytest.raises(ValidationError) as error:
        MoneyIn(amount=amount, currency="CNY")
    assert error.value.errors()[0]["loc"] == ("amount",)
