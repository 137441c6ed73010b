"""Engines and statement helpers on PostgreSQL: a pool keeps its connections through bursts; work of
one statement skips the BEGIN and COMMIT/ROLLBACK round trips of a transaction; any number of rows go
in as one JSON parameter, in order. Writing transactions lose no update, on SQLite too."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from crm_platform.config import ServiceSettings
from crm_platform.db import (
    DriverStatement,
    create_engine,
    insert_from_json,
    json_rows,
    single_statements,
    transaction,
)
from sqlalchemy import JSON, Column, DateTime, Integer, LargeBinary, MetaData, String, Table, bindparam, select, text
from sqlalchemy.exc import IntegrityError
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


async def _backends_of_a_burst(engine: AsyncEngine, concurrency: int) -> set[int]:
    """The server processes that `concurrency` transactions, all open at once, ran on."""
    everyone_in = asyncio.Barrier(concurrency)

    async def one() -> int:
        async with engine.begin() as conn:
            pid = int(await conn.scalar(text("SELECT pg_backend_pid()")))
            await everyone_in.wait()
            return pid

    return set(await asyncio.gather(*(one() for _ in range(concurrency))))


async def test_bursts_within_the_pool_size_reuse_their_connections(postgres_url: str) -> None:
    settings = ServiceSettings(database_url=postgres_url)
    assert (settings.database_pool_size, settings.database_max_overflow) == (20, 10)
    engine = create_engine(postgres_url, pool_size=settings.database_pool_size)
    try:
        first = await _backends_of_a_burst(engine, 16)
        assert len(first) == 16
        assert await _backends_of_a_burst(engine, 16) == first  # no reconnect: no new backend
    finally:
        await engine.dispose()


async def test_overflow_connections_are_closed_after_a_burst(postgres_url: str) -> None:
    engine = create_engine(postgres_url, pool_size=2, max_overflow=4)
    try:
        first = await _backends_of_a_burst(engine, 6)
        second = await _backends_of_a_burst(engine, 6)
        assert len(first & second) == 2  # the pool kept two; the burst opened four new ones again
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
AT = datetime(2026, 12, 5, 3, 4, 5, 123456, tzinfo=UTC)


@pytest.fixture
async def things_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a database with the `things` table."""
    engine = create_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def stored_things(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(select(things).order_by(things.c.seq))).mappings()]


async def test_rows_given_as_one_json_parameter_are_stored_as_given_in_order(things_engine: AsyncEngine) -> None:
    given: list[dict[str, Any]] = [
        {"name": "第一", "payload": b"\x00\xffbinary", "attributes": {"tags": ["a"], "n": 1}, "at": AT},
        {"name": "second", "payload": None, "attributes": None, "at": None},
        {"name": "third", "payload": b"", "attributes": [1, "two"], "at": AT},
    ]
    statement = insert_from_json(things, "rows", ["name", "payload", "attributes", "at"])
    async with single_statements(things_engine).connect() as conn:
        await conn.execute(statement, {"rows": json_rows(given)})
    assert [
        {k: row[k] for k in ("name", "payload", "attributes", "at")} for row in await stored_things(things_engine)
    ] == given


async def test_a_driver_statement_runs_in_the_transaction_with_sqlalchemys_parameter_types(
    things_engine: AsyncEngine,
) -> None:
    statement = DriverStatement(
        things.insert()
        .values(
            name=bindparam("name"), payload=bindparam("payload"), attributes=bindparam("attributes"), at=bindparam("at")
        )
        .returning(things.c.seq, things.c.attributes)
    )
    given = {"name": "第一", "payload": b"\x00\xff", "attributes": {"tags": ["a"], "n": 1}, "at": AT}
    with pytest.raises(RuntimeError):
        async with things_engine.begin() as conn:  # the first statement: it begins the transaction itself
            await statement.fetchrow(conn, given)
            raise RuntimeError("roll back")
    async with things_engine.begin() as conn:
        row = await statement.fetchrow(conn, given)
        await statement.execute(conn, {**given, "name": "second", "attributes": None, "at": None})
    assert row["attributes"] == {"tags": ["a"], "n": 1}
    assert await stored_things(things_engine) == [
        {"seq": row["seq"], **given},
        {"seq": row["seq"] + 1, **given, "name": "second", "attributes": None, "at": None},
    ]  # the rolled-back row is not there


async def test_a_driver_statement_raises_the_errors_sqlalchemy_would(things_engine: AsyncEngine) -> None:
    statement = DriverStatement(things.insert().values(seq=bindparam("seq"), name=bindparam("name")))
    async with single_statements(things_engine).connect() as conn:
        await statement.execute(conn, {"seq": 1, "name": "first"})
        with pytest.raises(IntegrityError) as caught:
            await statement.execute(conn, {"seq": 1, "name": "secret value"})
    assert "secret value" not in str(caught.value)  # parameters stay out of logs


counters = Table("counters", MetaData(), Column("id", Integer, primary_key=True), Column("value", Integer))


async def test_transactions_that_read_then_write_lose_no_update_on_either_database(each_database_url: str) -> None:
    """What a use case reads under FOR UPDATE is still true when it writes: on PostgreSQL by the row
    lock, on SQLite (which ignores FOR UPDATE) by `transaction` taking the write lock first."""
    engine = create_engine(each_database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(counters.metadata.create_all)
            await conn.execute(counters.insert().values(id=1, value=0))

        async def increment() -> None:
            async with transaction(engine) as conn:
                query = select(counters.c.value).where(counters.c.id == 1).with_for_update()
                value = await conn.scalar(query)
                await asyncio.sleep(0.01)  # the others read meanwhile, unless held off
                await conn.execute(counters.update().values(value=value + 1))

        await asyncio.gather(*(increment() for _ in range(8)))
        async with engine.connect() as conn:
            assert await conn.scalar(select(counters.c.value)) == 8
    finally:
        await engine.dispose()
