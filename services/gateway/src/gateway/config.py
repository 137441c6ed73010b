"""Gateway settings, from `CRM_GATEWAY_*` environment variables."""

from crm_platform.config import InternalCallSettings, KafkaSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gateway.security.settings import SecuritySettings


class Settings(SecuritySettings):
    model_config = SettingsConfigDict(env_prefix="CRM_GATEWAY_", extra="ignore")

    service_name: str = "gateway"
    host: str = "127.0.0.1"
    port: int = 8080
    # Prometheus /metrics on a port of its own (0 = off), never on the public API port.
    metrics_port: int = 9106
    log_level: str = "INFO"
    # SIGTERM: seconds in-flight requests get to finish before connections are closed.
    shutdown_grace_seconds: int = 10
    # Peers whose X-Forwarded-For names the client (comma-separated IPs or CIDRs, "*" for any):
    # behind an ingress controller, its pods; else every client is the controller, to the audit
    # trail and to the per-client limit on failed logins.
    forwarded_allow_ips: str = "127.0.0.1"
    # Upstream gRPC services, host:port. An empty target means the service is not deployed:
    # its routes answer 503 and composed views mark its part unavailable.
    leads_target: str = "127.0.0.1:50051"
    accounts_target: str = "127.0.0.1:50052"
    sales_target: str = "127.0.0.1:50053"
    service_desk_target: str = "127.0.0.1:50054"
    analytics_target: str = "127.0.0.1:50055"
    # Deadline of every upstream call.
    upstream_deadline_seconds: float = 10.0
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    # CRM_INTERNAL_CALL_SECRET, shared with the services: signs every call to them.
    internal_calls: InternalCallSettings = Field(default_factory=InternalCallSettings)

    def upstream_targets(self) -> dict[str, str]:
        targets = {
            "leads": self.leads_target,
            "accounts": self.accounts_target,
            "sales": self.sales_target,
            "service_desk": self.service_desk_target,
            "analytics": self.analytics_target,
        }
        return {name: target for name, target in targets.items() if target}
