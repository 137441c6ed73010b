"""Settings of the sales service (environment variables `CRM_SALES_*`)."""

from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from crm_platform.config import ServiceSettings
from pydantic import AfterValidator, Field, StringConstraints, model_validator
from pydantic_settings import SettingsConfigDict

from sales.domain import ContractThresholds, QuoteThresholds

# As contracts carry them: the API upper-cases the ISO 4217 codes clients send.
CurrencyCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
ExchangeRate = Annotated[Decimal, Field(gt=0)]


def _known_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. Asia/Shanghai, UTC)") from None
    return name


BusinessTimezone = Annotated[str, AfterValidator(_known_timezone)]


class SalesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_SALES_")

    service_name: str = "sales"
    grpc_port: int = 50053
    metrics_port: int = 9103
    # Currency of deals created without an amount or line items.
    default_currency: str = "CNY"
    # Quote discounts (percent) above which a sales manager, then finance, must approve.
    quote_manager_discount_percent: Decimal = Decimal(15)
    quote_finance_discount_percent: Decimal = Decimal(30)
    # Contract amounts from which finance, then admin, join the approval chain (after the manager).
    contract_finance_amount: Decimal = Decimal(100_000)
    contract_admin_amount: Decimal = Decimal(1_000_000)
    # The currency of those two amounts (empty: DEFAULT_CURRENCY, so a deployment that runs in one
    # currency needs no rates), and what one unit of each other contract currency is worth in it
    # (JSON, e.g. {"USD": "7.10"}). A contract in a currency without a rate cannot be submitted.
    contract_threshold_currency: CurrencyCode | Literal[""] = ""
    contract_exchange_rates: dict[CurrencyCode, ExchangeRate] = {}
    # The time zone of the business's calendar (IANA name, e.g. Asia/Shanghai): the month of a
    # contract's number, the day an installment turns overdue, the day a deal closes by default.
    business_timezone: BusinessTimezone = "UTC"
    # How often the overdue-installment timer runs and how many installments it claims per pass.
    overdue_interval_seconds: float = 60.0
    overdue_batch_size: int = 500
    # Rows per ImportOpportunities call.
    import_max_rows: int = 5_000

    @model_validator(mode="after")
    def _base_currency_has_no_rate(self) -> "SalesSettings":
        self.contract_threshold_currency = self.contract_threshold_currency or self.default_currency
        # Catches rates left over from another threshold currency (they would be inverted).
        if self.contract_threshold_currency in self.contract_exchange_rates:
            raise ValueError(
                f"contract_exchange_rates converts to {self.contract_threshold_currency}, so it has no rate of its own"
            )
        return self

    def quote_thresholds(self) -> QuoteThresholds:
        return QuoteThresholds(
            sales_manager=self.quote_manager_discount_percent, finance=self.quote_finance_discount_percent
        )

    def contract_thresholds(self) -> ContractThresholds:
        return ContractThresholds(
            finance=self.contract_finance_amount,
            admin=self.contract_admin_amount,
            currency=self.contract_threshold_currency,
            exchange_rates=self.contract_exchange_rates,
        )
