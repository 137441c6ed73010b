"""Settings of the sales service (environment variables `CRM_SALES_*`)."""

from decimal import Decimal

from crm_platform.config import ServiceSettings
from pydantic_settings import SettingsConfigDict

from sales.domain import ContractThresholds, QuoteThresholds


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
    # How often the overdue-installment timer runs and how many installments it claims per pass.
    overdue_interval_seconds: float = 60.0
    overdue_batch_size: int = 500
    # Rows per ImportOpportunities call.
    import_max_rows: int = 5_000

    def quote_thresholds(self) -> QuoteThresholds:
        return QuoteThresholds(
            sales_manager=self.quote_manager_discount_percent, finance=self.quote_finance_discount_percent
        )

    def contract_thresholds(self) -> ContractThresholds:
        return ContractThresholds(finance=self.contract_finance_amount, admin=self.contract_admin_amount)
