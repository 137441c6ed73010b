"""The read models' database, migrated, for the tests that apply events to it (`analytics.testing`)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from crm_platform.testing.database import migrated_engine
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with migrated_engine(database_url, MIGRATIONS) as engine:
        yield engine
