"""The exchange rates of the contract approval thresholds, as operators configure them
(`CRM_SALES_CONTRACT_EXCHANGE_RATES`, JSON): a mistake stops the service at start-up instead of
choosing wrong approval chains."""

from decimal import Decimal

import pytest
from pydantic import ValidationError
from sales.config import SalesSettings

pytestmark = pytest.mark.unit


def test_exchange_rates_are_read_as_json_into_the_contract_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_SALES_CONTRACT_THRESHOLD_CURRENCY", "USD")
    monkeypatch.setenv("CRM_SALES_CONTRACT_EXCHANGE_RATES", '{"CNY": "0.1408", "JPY": 0.0066}')
    thresholds = SalesSettings().contract_thresholds()
    assert (thresholds.currency, dict(thresholds.exchange_rates)) == (
        "USD",
        {"CNY": Decimal("0.1408"), "JPY": Decimal("0.0066")},
    )


def test_the_thresholds_are_in_the_default_currency_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment that runs in USD needs no exchange rate to submit its USD contracts."""
    monkeypatch.setenv("CRM_SALES_DEFAULT_CURRENCY", "USD")
    assert SalesSettings().contract_thresholds().currency == "USD"
    monkeypatch.setenv("CRM_SALES_CONTRACT_THRESHOLD_CURRENCY", "EUR")
    assert SalesSettings().contract_thresholds().currency == "EUR"


@pytest.mark.parametrize(
    ("rates", "currency"),
    [
        ({"USD": Decimal(0)}, "CNY"),  # a rate is above zero
        ({"USD": Decimal("-7.1")}, "CNY"),
        ({"usd": Decimal("7.1")}, "CNY"),  # contracts carry upper-case codes: this key would never match
        ({"DOLLAR": Decimal("7.1")}, "CNY"),
        ({}, "cny"),
        # Rates left over from CNY thresholds would be read the wrong way round.
        ({"USD": Decimal("7.1"), "EUR": Decimal("7.8")}, "USD"),
    ],
)
def test_unusable_exchange_rates_are_refused_at_start_up(rates: dict[str, Decimal], currency: str) -> None:
    with pytest.raises(ValidationError):
        SalesSettings(contract_exchange_rates=rates, contract_threshold_currency=currency)


def test_the_business_time_zone_is_utc_unless_told_and_a_name_it_does_not_know_stops_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert SalesSettings().business_timezone == "UTC"
    monkeypatch.setenv("CRM_SALES_BUSINESS_TIMEZONE", "Asia/Shanghai")
    assert SalesSettings().business_timezone == "Asia/Shanghai"
    monkeypatch.setenv("CRM_SALES_BUSINESS_TIMEZONE", "Beijing")
    with pytest.raises(ValidationError, match="not an IANA time zone"):
        SalesSettings()
