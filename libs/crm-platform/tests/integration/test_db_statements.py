"""Statement helpers on PostgreSQL: work of one statement skips the BEGIN and COMMIT/ROLLBACK round
trips of a transaction, and any number of rows go in as one JSON parameter, in order."""

from datetime import UTC, datetime

import pytest
from crm_platform.db import create_engine, insert_from_json, json_rows, single_statements
from sqlalchemy import JSON, Column, DateTime, Integer, LargeBinary, MetaData, String, Table, select, text
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


metadata = MetaData()
things = Table(
    "json_rows_things",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("name", String(50), nullable=False),
    Column("payload", LargeBinary),
    Column("attributes", JSON),
    Column("at", DateTime(timezone=True)),
)


async def test_rows_given_as_one_json_parameter_are_stored_as_given_in_order(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    at = datetime(2026, 12, 5, 3, 4, 5, 123456, tzinfo=UTC)
    given = [
        {"name": "第一", "payload": b"\x00\xffbinary", "attributes": {"tags": ["a"], "n": 1}, "at": at},
        {"name": "second", "payload": None, "attributes": None, "at": None},
        {"name": "third", "payload": b"", "attributes": [1, "two"], "at": at},
    ]
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        statement = insert_from_json(things, "rows", ["name", "payload", "attributes", "at"])
        async with single_statements(engine).connect() as conn:
            await conn.execute(statement, {"rows": json_rows(given)})
        async with engine.connect() as conn:
            stored = (await conn.execute(select(things).order_by(things.c.seq))).mappings().all()
        assert [{k: row[k] for k in ("name", "payload", "attributes", "at")} for row in stored] == given
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
        await engine.dispose()
