"""Sales handlers on a real, migrated PostgreSQL database (one per test)."""

from collections.abc import AsyncIterator

import pytest
from sales.handlers import SalesHandlers
from sales.testing import Clock, make_handlers, migrated_engine
from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await migrated_engine(postgres_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sales(engine: AsyncEngine, clock: Clock) -> SalesHandlers:
    return make_handlers(engine, clock)


@pytest.fixture
async def sales_each_database(each_database_url: str, clock: Clock) -> AsyncIterator[SalesHandlers]:
    """The same handlers, once on a SQLite file (the embedded default) and once on PostgreSQL."""
    engine = await migrated_engine(each_database_url)
    yield make_handlers(engine, clock)
    await engine.dispose()
