"""A service's database for a test: migrated to head, then its engine, disposed afterwards."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from crm_platform import migrations
from crm_platform.db import create_engine


@asynccontextmanager
async def migrated_engine(url: str, migrations_dir: Path) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrations.upgrade, migrations_dir, url)  # Alembic runs its own event loop
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()
