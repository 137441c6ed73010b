"""The whole system as child processes, for end-to-end tests and benchmarks: fresh PostgreSQL
databases, a broker, every service and the gateway on free ports."""

import asyncio
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from crm_platform.testing import infra
from gateway.token_cli import issue_dev_token

from crm_devstack.components import GATEWAY_METRICS_PORT, installed_services, processes, stack_environment


@dataclass
class RunningStack:
    base_url: str
    bootstrap: str
    secret: str
    log_dir: Path
    children: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    def token(self, sub: str, roles: list[str], *, team: str = "", region: str = "", name: str = "") -> str:
        return issue_dev_token(secret=self.secret, sub=sub, roles=roles, team=team, region=region, name=name)

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=60)

    def logs(self, lines: int = 40) -> str:
        parts = []
        for name, _, _ in self.children:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        for _, process, _ in reversed(self.children):
            if process.poll() is None:
                process.terminate()
        for _, process, output in reversed(self.children):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            output.close()


def _free_offset() -> int:
    """A port offset at which every service port is free (a `make run` may hold the defaults)."""
    # A random start: several stacks (parallel test runs) starting at once rarely pick the same range.
    start: int = random.randrange(11000, 14000)
    candidates: list[int] = [*range(start, 14000, 37), *range(11000, start, 37)]
    for offset in candidates:
        ports = (
            [s.grpc_port + offset for s in installed_services()]
            + [s.metrics_port + offset for s in installed_services()]
            + [GATEWAY_METRICS_PORT + offset]
        )
        if not any(infra.port_open("127.0.0.1", port) for port in ports):
            return offset
    raise RuntimeError("no free port range for the stack")


def start_stack(*, postgres_admin_url: str, work_dir: Path, ready_timeout: float = 120.0) -> RunningStack:
    work_dir.mkdir(parents=True, exist_ok=True)
    databases = {
        name: asyncio.run(infra.create_database(postgres_admin_url, prefix=f"crm_e2e_{name.replace('-', '_')}"))
        for name in [*(s.name for s in installed_services()), "gateway"]
    }
    broker_port = infra.free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    gateway_port = infra.free_port()
    env = {
        **os.environ,
        **stack_environment(
            data_dir=work_dir / "data",
            bootstrap=bootstrap,
            gateway_port=gateway_port,
            database_urls=databases,
            port_offset=_free_offset(),
        ),
        # Tests run many requests per principal in a short time.
        "CRM_GATEWAY_RATE_LIMIT_PER_SECOND": "1000",
        "CRM_GATEWAY_RATE_LIMIT_BURST": "5000",
    }
    stack = RunningStack(
        base_url=f"http://127.0.0.1:{gateway_port}",
        bootstrap=bootstrap,
        secret=env["CRM_GATEWAY_DEV_JWT_SECRET"],
        log_dir=work_dir,
        databases=list(databases.values()),
    )
    try:
        for process in processes(bootstrap):
            output = open(work_dir / f"{process.name}.log", "wb")  # noqa: SIM115 - closed in stop()
            child = subprocess.Popen(
                process.command, env={**env, **process.env}, stdout=output, stderr=subprocess.STDOUT
            )
            stack.children.append((process.name, child, output))
            if process.name == "broker":
                _wait_for_port(broker_port, 20)
        _wait_until_ready(stack, ready_timeout)
    except Exception:  # noqa: BLE001 - whatever failed, stop what started and show its logs
        logs = stack.logs()
        stop_stack(stack, postgres_admin_url)
        raise RuntimeError(f"the stack did not come up:\n{logs}") from None
    return stack


def stop_stack(stack: RunningStack, postgres_admin_url: str) -> None:
    stack.stop()
    for url in stack.databases:
        asyncio.run(infra.drop_database(postgres_admin_url, url))


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not infra.port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.05)


def _wait_until_ready(stack: RunningStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for name, process, _ in stack.children:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            response = httpx.get(f"{stack.base_url}/readyz", timeout=2)
            if response.status_code == 200 and response.json()["status"] == "ready":
                return
            last = response.text
        except httpx.HTTPError as error:
            last = str(error)
        time.sleep(0.3)
    raise TimeoutError(f"not ready within {timeout}s: {last}")
