"""The shared idempotency keys on real databases (SQLite and PostgreSQL): a remembered result is
recalled, keys are independent per operation and caller, and of concurrent identical requests
exactly one wins."""

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from crm_platform import idempotency
from crm_platform.config import ServiceSettings
from crm_platform.db import create_engine
from crm_platform.errors import ValidationFailed
from crm_platform.outbox import UnitOfWork, add_messaging_tables
from crm_platform.service import ServiceApp
from crm_platform.timeutil import utcnow
from sqlalchemy import Column, MetaData, String, Table, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = MetaData()
keys = idempotency.idempotency_table(metadata)
things = Table("things", metadata, Column("id", String(36), primary_key=True))
add_messaging_tables(metadata)  # as in every service


@pytest.fixture
async def engine(each_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(each_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_a_remembered_result_is_recalled(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="k1", result="id-1", now=now)
        await idempotency.remember(
            conn, keys, operation="convert", caller="u1", key="k1", result={"lead_id": "L", "merged": True}, now=now
        )
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="k1") == "id-1"
        recalled = await idempotency.recall(conn, keys, operation="convert", caller="u1", key="k1")
        assert recalled == {"lead_id": "L", "merged": True}
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="other") is None


async def test_an_empty_key_asks_for_no_idempotency(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="", result="x", now=utcnow())
        assert (
            await idempotency.claim(conn, keys, operation="create", caller="u1", key="", result="y", now=utcnow())
            is None
        )
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="") is None
        assert await conn.scalar(select(func.count()).select_from(keys)) == 0


async def test_the_same_key_of_another_caller_or_operation_is_independent(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        for operation, caller, result in [("create", "u1", "a"), ("create", "u2", "b"), ("update", "u1", "c")]:
            earlier = await idempotency.claim(
                conn, keys, operation=operation, caller=caller, key="same", result=result, now=now
            )
            assert earlier is None
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="same") == "a"
        assert await idempotency.recall(conn, keys, operation="create", caller="u2", key="same") == "b"
        assert await idempotency.recall(conn, keys, operation="update", caller="u1", key="same") == "c"


async def test_a_claimed_key_answers_with_the_first_result(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        assert await idempotency.claim(conn, keys, operation="op", caller="", key="k", result="first", now=now) is None
    async with engine.begin() as conn:
        assert await idempotency.claim(conn, keys, operation="op", caller="", key="k", result="second", now=now) == (
            "first"
        )


async def test_remembering_a_used_key_again_fails_and_rolls_back(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(conn, keys, operation="op", caller="u", key="k", result="t1", now=now)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(insert(things).values(id="t2"))
            await idempotency.remember(conn, keys, operation="op", caller="u", key="k", result="t2", now=now)
    async with engine.connect() as conn:
        assert list((await conn.execute(select(things.c.id))).scalars()) == []


async def _create(engine: AsyncEngine, thing_id: str, *, claim_first: bool) -> str:
    """What a creating handler does: claim (or remember) the key in the creating transaction."""
    now = utcnow()
    try:
        async with engine.begin() as conn:
            if claim_first:
                earlier = await idempotency.claim(
                    conn, keys, operation="create", caller="u", key="dup", result=thing_id, now=now
                )
                if earlier is not None:
                    return str(earlier)
            await conn.execute(insert(things).values(id=thing_id))
            await asyncio.sleep(0.05)  # hold the transaction open while the others arrive
            if not claim_first:
                await idempotency.remember(
                    conn, keys, operation="create", caller="u", key="dup", result=thing_id, now=now
                )
            return thing_id
    except IntegrityError:
        async with engine.connect() as conn:
            earlier = await idempotency.recall(conn, keys, operation="create", caller="u", key="dup")
        assert earlier is not None
        return str(earlier)


@pytest.mark.parametrize("claim_first", [True, False], ids=["claim", "remember"])
async def test_of_concurrent_duplicates_one_wins(engine: AsyncEngine, claim_first: bool) -> None:
    answers = await asyncio.gather(*(_create(engine, f"t{n}", claim_first=claim_first) for n in range(5)))
    async with engine.connect() as conn:
        created = list((await conn.execute(select(things.c.id))).scalars())
    assert len(created) == 1
    assert set(answers) == set(created)


async def test_keys_past_the_retention_expire_in_batches_and_newer_ones_stay(engine: AsyncEngine) -> None:
    now = utcnow()
    async with engine.begin() as conn:
        for n in range(5):
            await idempotency.remember(
                conn, keys, operation="create", caller="u1", key=f"old-{n}", result="x", now=now - timedelta(days=2)
            )
        await idempotency.remember(conn, keys, operation="create", caller="u1", key="new", result="y", now=now)
    cutoff = now - timedelta(days=1)

    first = await idempotency.expire_keys(engine, keys, before=cutoff, limit=3)
    second = await idempotency.expire_keys(engine, keys, before=cutoff, limit=3)
    third = await idempotency.expire_keys(engine, keys, before=cutoff, limit=3)

    assert (first, second, third) == (3, 2, 0)
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="new") == "y"
        assert await idempotency.recall(conn, keys, operation="create", caller="u1", key="old-0") is None


async def test_every_service_with_idempotency_keys_runs_their_expiry(engine: AsyncEngine) -> None:
    app = ServiceApp(
        settings=ServiceSettings(service_name="probe", idempotency_retention_hours=1),
        engine=engine,
        metadata=metadata,
        uow=UnitOfWork(engine, metadata, source="/crm/probe"),
        service_names=[],
        register=lambda server: None,
    )
    [expiry] = [job for job in app.jobs if job.name == "idempotency-key-expiry"]
    now = utcnow()
    async with engine.begin() as conn:
        await idempotency.remember(
            conn, keys, operation="op", caller="", key="hour-old", result="a", now=now - timedelta(minutes=61)
        )
        await idempotency.remember(conn, keys, operation="op", caller="", key="fresh", result="b", now=now)

    assert await expiry.run_once() == 1
    async with engine.connect() as conn:
        assert await idempotency.recall(conn, keys, operation="op", caller="", key="fresh") == "b"


async def test_a_key_longer_than_the_table_holds_is_the_callers_error(engine: AsyncEngine) -> None:
    """A 422 naming the key, whichever service and call: PostgreSQL would refuse it with a 500."""
    long_key = "k" * (idempotency.KEY_LENGTH + 1)
    async with engine.begin() as conn:
        with pytest.raises(ValidationFailed) as claimed:
            await idempotency.claim(conn, keys, operation="op", caller="u1", key=long_key, result="x", now=utcnow())
        with pytest.raises(ValidationFailed) as recalled:
            await idempotency.recall(conn, keys, operation="op", caller="u1", key=long_key)
    assert claimed.value.errors[0].field == recalled.value.errors[0].field == "idempotency_key"
