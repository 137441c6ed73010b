"""Settings of the accounts service (environment variables `CRM_ACCOUNTS_*`)."""

from datetime import timedelta

from crm_platform.config import ServiceSettings
from pydantic_settings import SettingsConfigDict

from accounts.domain import PoolPolicy


class AccountsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_ACCOUNTS_")

    service_name: str = "accounts"
    grpc_port: int = 50052
    metrics_port: int = 9102
    # Days without activity before an owned account returns to the public pool, per tier (0 = never).
    pool_days_a: int = 30
    pool_days_b: int = 15
    pool_days_c: int = 7
    pool_days_d: int = 7
    claim_limit_per_day: int = 20
    claim_cooldown_hours: float = 72.0
    # How often the timers look for accounts to return to the pool and reminders to raise.
    pool_job_interval_seconds: float = 60.0
    reminder_job_interval_seconds: float = 300.0
    job_batch_size: int = 500
    # Country code given to national phone numbers when normalising for contact matching.
    default_country_code: str = "86"

    def pool_policy(self) -> PoolPolicy:
        return PoolPolicy(
            inactivity_days={
                "A": self.pool_days_a,
                "B": self.pool_days_b,
                "C": self.pool_days_c,
                "D": self.pool_days_d,
            },
            claim_limit_per_day=self.claim_limit_per_day,
            cooldown=timedelta(hours=self.claim_cooldown_hours),
        )
