"""`make run`: the broker, every service and the gateway under honcho, then demo data and a token.

Ctrl-C stops everything (honcho terminates every process and waits for it).
"""

import os
import sys
from pathlib import Path

from crm_platform.testing.infra import port_open
from honcho.manager import Manager
from honcho.printer import Printer

from crm_devstack.components import installed_services, processes, stack_environment


def main() -> None:
    data_dir = Path(os.environ.get("CRM_DATA_DIR", ".data")).resolve()
    bootstrap = os.environ.get("CRM_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    gateway_port = int(os.environ.get("CRM_GATEWAY_PORT", "8080"))
    env = {**os.environ, **stack_environment(data_dir=data_dir, bootstrap=bootstrap, gateway_port=gateway_port)}
    busy = [port for port in _ports(env, bootstrap, gateway_port) if port_open("127.0.0.1", port)]
    if busy:
        sys.exit(f"make run: ports already in use: {', '.join(map(str, busy))} (is another stack running?)")
    manager = Manager(Printer(sys.stdout))
    for process in processes(bootstrap):
        manager.add_process(process.name, process.shell_command, env={**env, **process.env})
    manager.add_process("announce", f"exec {sys.executable} -m crm_devstack.announce", env=env)
    manager.loop()
    sys.exit(manager.returncode)


def _ports(env: dict[str, str], bootstrap: str, gateway_port: int) -> list[int]:
    """Every port the stack listens on: the API, each service's gRPC and metrics, the gateway's metrics."""
    ports = [gateway_port, int(env["CRM_GATEWAY_METRICS_PORT"])]
    for service in installed_services():
        ports += [int(env[f"{service.env_prefix}GRPC_PORT"]), int(env[f"{service.env_prefix}METRICS_PORT"])]
    host, _, broker_port = bootstrap.partition(":")
    if host in ("127.0.0.1", "localhost"):
        ports.append(int(broker_port))
    return ports


if __name__ == "__main__":
    main()
