"""The service desk's handlers on a migrated database of each kind, acting as the system."""

from collections.abc import AsyncIterator

import pytest
from crm_platform.outbox import UnitOfWork
from crm_platform.testing.database import migrated_engine
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context


async def _desk(url: str) -> AsyncIterator[Context]:
    async with migrated_engine(url, MIGRATIONS) as engine:
        yield Context(uow=UnitOfWork(engine, repo.metadata, source="/test"))  # acting as the system


@pytest.fixture
async def ctx(each_database_url: str) -> AsyncIterator[Context]:
    async for desk in _desk(each_database_url):
        yield desk


@pytest.fixture
async def ctx_on_postgres(postgres_url: str) -> AsyncIterator[Context]:
    async for desk in _desk(postgres_url):
        yield desk
