"""What runs locally: one definition serves `make run` (under honcho) and the e2e tests."""

import importlib.util
import os
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from crm_platform.testing.infra import tansu_binary


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # component name, e.g. "service-desk"
    module: str  # Python package, e.g. "service_desk"
    env_prefix: str  # e.g. "CRM_SERVICE_DESK_"
    grpc_port: int
    metrics_port: int
    gateway_target_setting: str  # e.g. "CRM_GATEWAY_SERVICE_DESK_TARGET"


SERVICES = (
    Service("leads", "leads", "CRM_LEADS_", 50051, 9101, "CRM_GATEWAY_LEADS_TARGET"),
    Service("accounts", "accounts", "CRM_ACCOUNTS_", 50052, 9102, "CRM_GATEWAY_ACCOUNTS_TARGET"),
    Service("sales", "sales", "CRM_SALES_", 50053, 9103, "CRM_GATEWAY_SALES_TARGET"),
    Service("service-desk", "service_desk", "CRM_SERVICE_DESK_", 50054, 9104, "CRM_GATEWAY_SERVICE_DESK_TARGET"),
    Service("analytics", "analytics", "CRM_ANALYTICS_", 50055, 9105, "CRM_GATEWAY_ANALYTICS_TARGET"),
)


def installed_services() -> list[Service]:
    """The services that exist in this checkout (each is added to the stack once it is built)."""
    return [s for s in SERVICES if _has_entry_point(s.module)]


def _has_entry_point(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    return importlib.util.find_spec(f"{module}.__main__") is not None


@dataclass(frozen=True, slots=True)
class Process:
    name: str
    command: list[str]
    env: dict[str, str]

    @property
    def shell_command(self) -> str:
        # exec: the process replaces honcho's shell, so it gets SIGTERM itself and shuts down gracefully.
        return "exec " + shlex.join(self.command)


def dev_secret(data_dir: Path) -> str:
    """The dev JWT secret, made once per data folder so tokens survive restarts."""
    path = data_dir / "dev-jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


# The gateway's /metrics port (the API port is public; metrics are not).
GATEWAY_METRICS_PORT = 9106


def stack_environment(
    *,
    data_dir: Path,
    bootstrap: str,
    gateway_port: int,
    database_urls: dict[str, str] | None = None,
    port_offset: int = 0,
) -> dict[str, str]:
    """Environment shared by every process of the stack; explicit environment variables win."""
    env: dict[str, str] = {
        "CRM_DATA_DIR": str(data_dir),
        "CRM_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CRM_GATEWAY_PORT": str(gateway_port),
        "CRM_GATEWAY_METRICS_PORT": str(GATEWAY_METRICS_PORT + port_offset),
        "CRM_GATEWAY_DEV_MODE": "true",
        "CRM_GATEWAY_DEV_JWT_SECRET": dev_secret(data_dir),
        # The stack's processes start together: a new secret each time signs their calls to each other.
        "CRM_INTERNAL_CALL_SECRET": secrets.token_urlsafe(32),
    }
    ports: dict[str, int] = {}
    for service in installed_services():
        # A port set in the environment moves the service and every address that points at it.
        port = int(os.environ.get(f"{service.env_prefix}GRPC_PORT", service.grpc_port + port_offset))
        ports[service.name] = port
        env[f"{service.env_prefix}GRPC_PORT"] = str(port)
        env[f"{service.env_prefix}METRICS_PORT"] = str(service.metrics_port + port_offset)
        env[f"{service.env_prefix}MIGRATE_ON_START"] = "true"
        env[service.gateway_target_setting] = f"127.0.0.1:{port}"
        if database_urls and service.name in database_urls:
            env[f"{service.env_prefix}DATABASE_URL"] = database_urls[service.name]
    if database_urls and "gateway" in database_urls:
        env["CRM_GATEWAY_DATABASE_URL"] = database_urls["gateway"]
    # Leads calls accounts and sales during conversion.
    env["CRM_LEADS_ACCOUNTS_TARGET"] = f"127.0.0.1:{ports.get('accounts', 50052 + port_offset)}"
    env["CRM_LEADS_SALES_TARGET"] = f"127.0.0.1:{ports.get('sales', 50053 + port_offset)}"
    return {**env, **{key: os.environ[key] for key in env if key in os.environ}}


def processes(bootstrap: str) -> list[Process]:
    """The broker (when the bootstrap address is local), the services and the gateway."""
    bin_dir = Path(sys.executable).parent
    result: list[Process] = []
    host, _, port = bootstrap.partition(":")
    if host in ("127.0.0.1", "localhost"):
        url = f"tcp://127.0.0.1:{port}"
        result.append(
            Process(
                "broker",
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                {"RUST_LOG": "warn"},
            )
        )
    for service in installed_services():
        result.append(Process(service.name, [str(bin_dir / f"crm-{service.name}"), "serve"], {}))
    result.append(Process("gateway", [str(bin_dir / "crm-gateway")], {}))
    return result
