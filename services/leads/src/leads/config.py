"""Settings of the leads service (environment variables `CRM_LEADS_*`)."""

from crm_platform.config import ServiceSettings
from pydantic_settings import SettingsConfigDict

from leads.domain import FollowUpPolicy


class LeadsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_LEADS_")

    service_name: str = "leads"
    grpc_port: int = 50051
    metrics_port: int = 9101
    # The cap on any RPC's deadline: an import part may run minutes (callers still send their own).
    default_deadline_seconds: float = 300.0
    accounts_target: str = "127.0.0.1:50052"
    sales_target: str = "127.0.0.1:50053"
    # Deadline of each call to accounts/sales during a conversion.
    upstream_deadline_seconds: float = 5.0
    # Country code given to national phone numbers when normalising.
    default_country_code: str = "86"
    first_contact_hours: float = 2.0
    recycle_after_days: float = 3.0
    # Open leads a rep may hold from pool claims at once.
    pool_claim_limit: int = 20
    # Hours before the owner a lead was recycled from (idle, or released) may claim it back.
    pool_reclaim_cooldown_hours: float = 24.0
    # How often the SLA, recycling and rescoring timers look for due leads, and how many per pass (a
    # full pass runs again at once: after a scoring change the open leads are rescored batch by batch).
    jobs_interval_seconds: float = 30.0
    jobs_batch_size: int = 200
    # Scoring and assignment rules are cached this long per replica (changes apply within it).
    rules_cache_seconds: float = 5.0
    import_batch_size: int = 2000
    import_max_rows: int = 500_000
    import_max_bytes: int = 200 * 1024 * 1024
    webform_default_rate_per_minute: int = 60

    def follow_up_policy(self) -> FollowUpPolicy:
        return FollowUpPolicy(
            first_contact_hours=self.first_contact_hours,
            recycle_after_days=self.recycle_after_days,
            pool_claim_limit=self.pool_claim_limit,
            pool_reclaim_cooldown_hours=self.pool_reclaim_cooldown_hours,
        )
