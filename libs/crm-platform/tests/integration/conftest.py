"""Fixtures the event-plumbing tests share: the sample service's schema on PostgreSQL, and a broker
of the test's own (outage tests stop and start it)."""

from collections.abc import AsyncIterator

import pytest
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.testing.infra import TansuBroker
from crm_platform.testing.sample_service import create_schema
from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    await create_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def broker_settings(own_broker: TansuBroker) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=own_broker.bootstrap, topic_partitions=6, send_timeout_seconds=3.0, fetch_max_wait_ms=50
    )
