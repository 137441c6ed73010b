"""Group commit of the audit trail: concurrent `AuditLog.record` calls share transactions, every
row (and its outbox event) is committed when its call returns, a failed write reaches every caller
it concerns, and an entry the database refuses fails only its own caller (SQLite and PostgreSQL)."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from crm.audit.v1 import events_pb2
from crm_platform.db import create_engine
from crm_platform.principal import Principal
from gateway.security.audit import AuditEntry, AuditLog, AuditQuery
from gateway.security.store import audit_events, migrate_async, outbox
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

CALLERS = 16


def entry(record_id: str, user_id: str = "u-1") -> AuditEntry:
    return AuditEntry(
        actor=Principal(user_id=user_id, roles=("admin",)),
        action="create",
        resource="leads",
        record_id=record_id,
        fields=["name"],
        after={"name": record_id},
    )


class Commits:
    """Counts the audit writes committed: the log tells its listeners after each."""

    def __init__(self, audit: AuditLog) -> None:
        self.count = 0
        audit.on_commit(self._committed)

    def _committed(self) -> None:
        self.count += 1


@pytest.fixture
async def engine(each_database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate_async(each_database_url)
    engine = create_engine(each_database_url)
    yield engine
    await engine.dispose()


async def stored(engine: AsyncEngine) -> tuple[list[str], list[str]]:
    """The audit rows' record ids and the outbox rows' keys."""
    async with engine.connect() as conn:
        rows = list(await conn.scalars(select(audit_events.c.record_id).order_by(audit_events.c.record_id)))
        keys = list(await conn.scalars(select(outbox.c.key).order_by(outbox.c.key)))
    return rows, keys


async def test_concurrent_records_share_transactions_and_are_committed_when_they_return(
    engine: AsyncEngine,
) -> None:
    audit = AuditLog(engine)
    commits = Commits(audit)
    wakes: list[None] = []
    audit.on_commit(lambda: wakes.append(None))

    async def record(record_id: str) -> None:
        await audit.record([entry(record_id)])
        # Committed on return: another connection sees the row.
        async with engine.connect() as conn:
            found = await conn.scalar(select(func.count()).where(audit_events.c.record_id == record_id))
        assert found == 1

    ids = [f"r-{i:03d}" for i in range(CALLERS * 4)]
    for start in range(0, len(ids), CALLERS):
        await asyncio.gather(*(record(record_id) for record_id in ids[start : start + CALLERS]))

    assert await stored(engine) == (ids, ids)
    # 16 callers at once are one transaction, or two when the first is written before the rest arrive.
    assert commits.count <= 2 * 4
    assert len(wakes) == commits.count


async def test_a_caller_alone_is_written_at_once(engine: AsyncEngine) -> None:
    audit = AuditLog(engine)
    commits = Commits(audit)
    await audit.record([entry("alone-1"), entry("alone-2")])
    assert commits.count == 1
    assert await stored(engine) == (["alone-1", "alone-2"], ["alone-1", "alone-2"])
    await audit.record([])
    assert commits.count == 1


async def test_a_failed_write_fails_every_caller_of_the_batch(engine: AsyncEngine) -> None:
    # The database is gone for everyone: each caller gets the error, none is left waiting.
    audit = AuditLog(unreachable(engine))
    callers = [audit.record([entry(f"lost-{i}")]) for i in range(CALLERS)]
    results = await asyncio.gather(*callers, return_exceptions=True)
    # The driver's error (connecting fails before SQLAlchemy wraps anything), the same for all.
    assert len(results) == CALLERS
    assert all(isinstance(result, Exception) for result in results), results
    assert len({type(result) for result in results}) == 1, results
    await audit.engine.dispose()
    # The writer recovers with the database.
    audit.engine = engine
    await asyncio.gather(*(audit.record([entry(f"after-{i}")]) for i in range(3)))
    assert await stored(engine) == (["after-0", "after-1", "after-2"],) * 2


def unreachable(engine: AsyncEngine) -> AsyncEngine:
    """An engine for a database that does not exist."""
    missing = "crm_no_such_database" if engine.dialect.name == "postgresql" else "/nonexistent/gateway.db"
    return create_engine(engine.url.set(database=missing).render_as_string(hide_password=False))


async def test_an_entry_the_database_refuses_fails_only_its_caller(engine: AsyncEngine) -> None:
    audit = AuditLog(engine)
    duplicate = entry("dup")
    await audit.record([duplicate])
    # The same entry again (its id is the primary key) among others written at the same time.
    callers = [audit.record([entry(f"ok-{i:02d}")]) for i in range(CALLERS - 1)]
    callers.insert(7, audit.record([duplicate]))
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[7], DBAPIError)
    assert [result for i, result in enumerate(results) if i != 7] == [None] * (CALLERS - 1)
    written = ["dup", *(f"ok-{i:02d}" for i in range(CALLERS - 1))]
    assert await stored(engine) == (written, written)


async def test_each_event_carries_the_trace_of_its_own_caller(engine: AsyncEngine) -> None:
    audit = AuditLog(engine)

    async def record_in_trace(number: int) -> str:
        span = SpanContext(trace_id=number, span_id=number, is_remote=False, trace_flags=TraceFlags(1))
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(span)))
        try:
            await audit.record([entry(f"traced-{number}")])
        finally:
            context.detach(token)
        return f"00-{number:032x}-{number:016x}-01"

    expected = await asyncio.gather(*(record_in_trace(number) for number in range(1, CALLERS + 1)))
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.key, outbox.c.headers))).all()
    traceparents = {key: dict(headers)["traceparent"] for key, headers in rows}
    assert traceparents == {f"traced-{n}": parent for n, parent in zip(range(1, CALLERS + 1), expected, strict=True)}


async def test_a_cancelled_caller_leaves_the_others_and_close_waits_for_the_write(engine: AsyncEngine) -> None:
    audit = AuditLog(engine)
    first = asyncio.create_task(audit.record([entry("first")]))
    others = [asyncio.create_task(audit.record([entry(f"other-{i}")])) for i in range(3)]
    await asyncio.sleep(0)  # every call is queued
    first.cancel()
    await audit.close()
    assert [task.result() for task in others] == [None, None, None]
    assert first.cancelled()
    # Its entry was queued: it is written all the same (an audit row too many, never one too few).
    assert await stored(engine) == (["first", "other-0", "other-1", "other-2"],) * 2


async def test_an_entry_and_its_event_are_stored_as_given(engine: AsyncEngine) -> None:
    audit = AuditLog(engine)
    given = AuditEntry(
        actor=Principal(user_id="u-9", roles=("admin", "sales_manager"), team="t", region="north"),
        action="update",
        resource="leads",
        record_id="lead-1",
        fields=["name", "phone"],
        before={"name": "Old", "tags": ["a"]},
        after={"name": "新名字", "tags": []},
    )
    await audit.record([given])

    [row], _ = await audit.query(AuditQuery(record_id="lead-1"))
    async with engine.connect() as conn:
        stored_event = (await conn.execute(select(outbox))).mappings().one()
    event = events_pb2.AuditRecorded.FromString(stored_event["payload"])
    assert (row["action"], row["actor"]["roles"], row["fields"]) == (
        "update",
        ["admin", "sales_manager"],
        ["name", "phone"],
    )
    assert (row["before"], row["after"]) == ({"name": "Old", "tags": ["a"]}, {"name": "新名字", "tags": []})
    assert (event.id, event.record_id, event.after["name"]) == (row["id"], "lead-1", "新名字")
    assert stored_event["key"] == "lead-1" and dict(stored_event["headers"])["ce_type"] == "crm.audit.record.recorded"
    assert stored_event["published_at"] is None
