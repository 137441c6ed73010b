"""Work of one statement skips the BEGIN and COMMIT/ROLLBACK round trips of a transaction, on the same pool."""

import pytest
from crm_platform.db import create_engine, single_statements
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


async def _read_in_transaction(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT 1")) == 1
        raw = await conn.get_raw_connection()
        return bool(raw.driver_connection.is_in_transaction())  # type: ignore[union-attr]


async def test_a_single_statement_opens_no_transaction(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        assert await _read_in_transaction(single_statements(engine)) is False
        assert await _read_in_transaction(engine) is True  # what a plain connect() costs
        assert single_statements(engine).pool is engine.pool
    finally:
        await engine.dispose()
