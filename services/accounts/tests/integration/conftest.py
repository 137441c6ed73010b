"""The accounts use cases over a freshly migrated database: `ctx` once on each database (SQLite, the
embedded default, and PostgreSQL), `pg_ctx` on PostgreSQL only (row locks, concurrency)."""

from collections.abc import AsyncIterator

import pytest
from accounts import repository as repo
from accounts.__main__ import MIGRATIONS
from accounts.domain import PoolPolicy
from accounts.handlers import Context
from crm_platform.outbox import UnitOfWork
from crm_platform.testing.database import migrated_engine


async def _context(url: str) -> AsyncIterator[Context]:
    async with migrated_engine(url, MIGRATIONS) as engine:
        yield Context(uow=UnitOfWork(engine, repo.metadata, source="/test"), policy=PoolPolicy())


@pytest.fixture
async def ctx(each_database_url: str) -> AsyncIterator[Context]:
    async for made in _context(each_database_url):
        yield made


@pytest.fixture
async def pg_ctx(postgres_url: str) -> AsyncIterator[Context]:
    async for made in _context(postgres_url):
        yield made
