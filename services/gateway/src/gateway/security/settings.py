"""Security settings, read from `CRM_GATEWAY_*` environment variables (the gateway's `Settings`
inherits them)."""

from crm_platform.config import InboxSettings
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

DEV_ISSUER = "crm-dev"
DEV_AUDIENCE = "crm"


class SecuritySettings(InboxSettings):  # the inbox of its audit consumer, as the services'
    model_config = SettingsConfigDict(env_prefix="CRM_GATEWAY_", extra="ignore")

    # Dev mode accepts HS256 tokens signed with the shared secret (issuer crm-dev, audience crm).
    dev_mode: bool = False
    dev_jwt_secret: str = ""
    # Production: tokens from an OIDC provider, verified with its JWKS. The algorithm is pinned
    # here and never taken from the token.
    jwt_algorithm: str = "RS256"
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwks_url: str = ""
    jwks_cache_seconds: float = 600.0
    # An unknown `kid` triggers at most one JWKS refetch per this many seconds.
    jwks_refetch_min_seconds: float = 30.0
    jwks_timeout_seconds: float = 5.0
    jwt_leeway_seconds: float = 30.0
    # Claim names, for identity providers that use others (dotted paths reach nested claims,
    # e.g. `realm_access.roles`).
    claim_sub: str = "sub"
    claim_name: str = "name"
    claim_roles: str = "roles"
    claim_team: str = "team"
    claim_region: str = "region"

    # The policy file (YAML); empty = the default policy shipped with the gateway.
    policy_path: str = ""
    # The gateway's own database (audit store, API keys, outbox); empty = SQLite under the data folder.
    database_url: str = ""
    # Migrate that database at start (embedded default); in Kubernetes the migration Job does it.
    migrate_on_start: bool = True
    # Publish audit events to Kafka (crm.audit.v1) from the outbox; rows wait in the table when off.
    audit_relay_enabled: bool = True
    # Store the audit records services publish on crm.audit.v1 (an ERP's postings, which reach the
    # sales service without a request) in the audit trail; one consumer group for all replicas.
    audit_ingest_enabled: bool = True

    # Requests per principal: a token bucket refilled at `rate_limit_per_second` up to `rate_limit_burst`.
    rate_limit_per_second: float = 20.0
    rate_limit_burst: int = 100
    # Failed authentications per client address (brute force, audit flooding).
    auth_failure_rate_per_second: float = 2.0
    auth_failure_burst: int = 30
    # Exports have their own, much lower limit.
    export_rate_limit_per_minute: float = 2.0
    export_rate_limit_burst: int = 5
    export_max_rows: int = 100_000
    max_body_bytes: int = 1_048_576
    max_page_size: int = 500
    # How long the answer of a write sent with Idempotency-Key is kept for a retry (gateway.replays).
    idempotency_retention_hours: int = Field(default=24, ge=1)
    cors_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _keys_configured(self) -> "SecuritySettings":
        if self.dev_mode:
            if len(self.dev_jwt_secret) < 32:
                raise ValueError("CRM_GATEWAY_DEV_JWT_SECRET must be at least 32 characters in dev mode")
        elif self.jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError(
                "CRM_GATEWAY_JWT_ISSUER and CRM_GATEWAY_JWT_AUDIENCE are required with CRM_GATEWAY_JWKS_URL"
            )
        if self.jwt_algorithm.upper() in ("NONE", "") or (self.jwt_algorithm.startswith("HS") and not self.dev_mode):
            raise ValueError("CRM_GATEWAY_JWT_ALGORITHM must be an asymmetric algorithm (RS256, ES256, ...)")
        return self

    @property
    def algorithm(self) -> str:
        return "HS256" if self.dev_mode else self.jwt_algorithm

    @property
    def issuer(self) -> str:
        return DEV_ISSUER if self.dev_mode else self.jwt_issuer

    @property
    def audience(self) -> str:
        return DEV_AUDIENCE if self.dev_mode else self.jwt_audience
