"""Settings read from environment variables (pydantic-settings).

Each service subclasses `ServiceSettings` with its own prefix (`CRM_LEADS_`, ...); Kafka settings are
shared by every process under `CRM_KAFKA_`, the internal calls' secret under `CRM_INTERNAL_CALL_`.
"""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def data_dir() -> Path:
    """Folder for the embedded defaults (SQLite files); `CRM_DATA_DIR`, default `.data`."""
    return Path(DataDirSettings().data_dir)


class DataDirSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_")
    data_dir: str = ".data"


def database_url_or_embedded(settings: BaseSettings, database_url: str, name: str) -> str:
    """`database_url`, or a SQLite file `<name>.db` under the data folder (the embedded default)
    when no URL is configured. One configured empty (a Secret whose value is missing) is refused:
    the component would keep its data in a throwaway file of its pod, each replica its own, and its
    migration Job would report success."""
    if database_url:
        return database_url
    if "database_url" in settings.model_fields_set:
        variable = f"{settings.model_config.get('env_prefix', '')}DATABASE_URL"
        raise ValueError(f"{variable} is set but empty: give the database URL, or leave it out for the embedded SQLite")
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{folder / (name + '.db')}"


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_KAFKA_")

    bootstrap_servers: str = "127.0.0.1:9092"
    # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    security_protocol: str = "PLAINTEXT"
    # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    # mTLS, for brokers that authenticate clients by certificate: the CRM's client certificate (PEM,
    # with its chain) and its unencrypted private key. Both or neither, with SSL or SASL_SSL.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # On for real Kafka; tansu (the local broker) does not support InitProducerId.
    enable_idempotence: bool = False
    # Create the service's topics at start-up (local and test brokers); off where a platform team owns topics.
    create_topics: bool = True
    topic_partitions: int = 6
    replication_factor: int = 1
    send_timeout_seconds: float = 10.0
    # How long a consumer waits for more data before returning a fetch: the main driver of event latency.
    fetch_max_wait_ms: int = 100

    @model_validator(mode="after")
    def _client_certificate(self) -> "KafkaSettings":
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together: the client certificate and its private key")
        if self.ssl_certfile and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(
                f"a client certificate needs security_protocol SSL or SASL_SSL, not {self.security_protocol}"
            )
        return self


class InternalCallSettings(BaseSettings):
    """Shared by the gateway and every service (`crm_platform.call_auth`)."""

    model_config = SettingsConfigDict(env_prefix="CRM_INTERNAL_CALL_")

    # Callers sign the principal and scope of each gRPC call with it and services refuse calls not
    # signed with it. Empty: calls are not signed and services believe any caller (local runs, tests).
    secret: str = ""


# Connections per replica (see ServiceSettings); also create_engine's defaults.
DATABASE_POOL_SIZE = 20
DATABASE_MAX_OVERFLOW = 10
# The least time between two outbox relay passes (`OutboxRelay._linger`): an event waits at most this
# long for the pass that publishes it, well inside the second within which consumers must see it.
OUTBOX_LINGER_SECONDS = 0.05


class InboxSettings(BaseSettings):
    """Settings of a process whose consumers keep an inbox (the services, the gateway)."""

    # Consumers remember the events they applied (the inbox) for this long: a redelivery comes
    # within seconds of the offset commit it missed, and the read models and business keys make a
    # replay of older events converge anyway. Then the expiry job (`jobs.inbox_expiry_job`) deletes them.
    inbox_retention_hours: float = Field(default=168.0, gt=0)
    inbox_expiry_interval_seconds: float = Field(default=600.0, gt=0)


class ServiceSettings(InboxSettings):
    """Settings every gRPC service has. Subclasses set `env_prefix` and `service_name`."""

    service_name: str = "crm"
    database_url: str = ""
    # Connections kept open to PostgreSQL per replica, and how many more a burst may open (closed
    # again after use). Ignored for SQLite.
    database_pool_size: int = Field(default=DATABASE_POOL_SIZE, ge=1)
    database_max_overflow: int = Field(default=DATABASE_MAX_OVERFLOW, ge=0)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50050
    metrics_port: int = 0
    log_level: str = "INFO"
    # Graceful shutdown: time for in-flight RPCs to finish after SIGTERM.
    shutdown_grace_seconds: float = 10.0
    # Upper bound for any RPC whose caller sent no deadline.
    default_deadline_seconds: float = 30.0
    # Clients are told to reconnect (GOAWAY) after this long, so a Kubernetes Service spreads their
    # HTTP/2 connections over replicas added since; 0 keeps connections for ever.
    max_connection_age_seconds: float = 300.0
    outbox_poll_seconds: float = 0.05
    outbox_batch_size: int = 500
    # Relay passes start at least this long apart, so concurrent commits share one pass.
    outbox_linger_seconds: float = Field(default=OUTBOX_LINGER_SECONDS, ge=0)
    # Run Alembic migrations at start (embedded defaults); in Kubernetes a Job runs them instead.
    migrate_on_start: bool = False
    # A repeated Idempotency-Key answers with the first result for this long; then the key expires.
    idempotency_retention_hours: float = Field(default=24.0, gt=0)
    idempotency_expiry_interval_seconds: float = Field(default=600.0, gt=0)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    # The service's server checks calls with this secret, and its channels to other services sign with it.
    internal_calls: InternalCallSettings = Field(default_factory=InternalCallSettings)

    def resolved_database_url(self) -> str:
        """The configured URL, or a SQLite file under the data folder (the embedded default)."""
        return database_url_or_embedded(self, self.database_url, self.service_name)
