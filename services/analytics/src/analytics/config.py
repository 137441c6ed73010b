"""Settings of the analytics service (environment variables `CRM_ANALYTICS_*`)."""

from decimal import Decimal

from crm_platform.config import ServiceSettings
from pydantic_settings import SettingsConfigDict

from analytics.domain import ChurnPolicy


class AnalyticsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_ANALYTICS_")

    service_name: str = "analytics"
    grpc_port: int = 50055
    metrics_port: int = 9105
    # Consumer group of the projection (a generation suffix is added; `rebuild` moves to the next one).
    projection_group: str = "analytics-projection"
    # The projection's fetch wait (ms): reports should reflect an event within a second, so the
    # consumer asks the broker again quickly rather than sharing CRM_KAFKA_FETCH_MAX_WAIT_MS.
    projection_fetch_max_wait_ms: int = 20
    # Money aggregates of a report without a currency filter count records in this currency.
    reporting_currency: str = "CNY"
    # Churn risk: days without activity, and the average CSAT below which an account is at risk.
    churn_no_activity_days: int = 30
    churn_low_csat_below: Decimal = Decimal(3)
    churn_min_csat_responses: int = 1

    def churn_policy(self) -> ChurnPolicy:
        return ChurnPolicy(
            no_activity_days=self.churn_no_activity_days,
            low_csat_below=self.churn_low_csat_below,
            min_csat_responses=self.churn_min_csat_responses,
        )
