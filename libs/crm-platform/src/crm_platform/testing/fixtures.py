"""pytest fixtures (registered by the repository's root conftest.py)."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from crm_platform.config import KafkaSettings
from crm_platform.kafka import ensure_topics
from crm_platform.testing import database, infra


def _missing(what: str) -> None:
    message = f"{what} is not available for this test"
    if infra.in_ci():
        pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
    pytest.skip(message)


@asynccontextmanager
async def _fresh_postgres(admin_url: str | None) -> AsyncIterator[str]:
    """A new PostgreSQL database, dropped afterwards; none here fails in CI and skips elsewhere."""
    if admin_url is None:
        _missing("PostgreSQL")
        raise AssertionError("unreachable")
    url = await infra.create_database(admin_url)
    database.note_test_postgres(admin_url, url)
    try:
        yield url
    finally:
        await infra.drop_database(admin_url, url)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str | None]:
    url = infra.postgres_admin_url()
    yield url
    if url is not None:
        asyncio.run(database.drop_templates())
    infra.stop_containers()


@pytest.fixture
async def postgres_url(postgres_admin_url: str | None) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards. Fails in CI when there is none."""
    async with _fresh_postgres(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def database_url(postgres_admin_url: str | None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """PostgreSQL when there is one (always in CI), otherwise a SQLite file: for tests valid on both."""
    if postgres_admin_url is None:
        if infra.in_ci():
            _missing("PostgreSQL")
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
        return
    async with _fresh_postgres(postgres_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def each_database_url(
    request: pytest.FixtureRequest, postgres_admin_url: str | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Runs the test once on a SQLite file and once on a fresh PostgreSQL database (dropped
    afterwards): for code that must behave the same on both. PostgreSQL missing fails in CI."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
        return
    async with _fresh_postgres(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Kafka-compatible broker shared by the session; every test uses its own topics or groups."""
    try:
        bootstrap, broker = infra.kafka_bootstrap_servers()
    except (OSError, RuntimeError, TimeoutError) as error:
        _missing(f"a Kafka-compatible broker ({error})")
        raise AssertionError("unreachable") from error
    yield bootstrap
    if broker is not None:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        enable_idempotence=False,
        topic_partitions=6,
        send_timeout_seconds=5.0,
        fetch_max_wait_ms=50,
    )


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[infra.TansuBroker]:
    """A broker of this test's own, which the test may stop and start (outage tests)."""
    broker = infra.TansuBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        broker.start()
    except (OSError, RuntimeError, TimeoutError) as error:
        _missing(f"a tansu broker ({error})")
    yield broker
    broker.stop()


async def create_topics(settings: KafkaSettings, *topics: str) -> None:
    await ensure_topics(settings, list(topics))
