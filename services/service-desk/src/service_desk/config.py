"""Settings of the service-desk service (environment variables `CRM_SERVICE_DESK_*`)."""

from crm_platform.config import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ServiceDeskSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_SERVICE_DESK_")

    service_name: str = "service-desk"
    grpc_port: int = 50054
    metrics_port: int = 9104
    # Days after resolution when a tier-A account gets its return visit (回访).
    return_visit_days: float = 3.0
    # Days after a ticket's resolution during which its survey link takes the customer's answer.
    survey_valid_days: float = Field(default=30.0, gt=0)
    # How often the SLA timer and the queue re-dispatch run, and how many tickets per pass.
    sla_job_interval_seconds: float = 30.0
    dispatch_job_interval_seconds: float = 60.0
    job_batch_size: int = 200
    # Suggested knowledge-base articles returned with a new ticket.
    suggestions: int = 3
