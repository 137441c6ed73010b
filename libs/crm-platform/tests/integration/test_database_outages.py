"""What the event plumbing does when PostgreSQL goes away and comes back: a connection the database
dropped is thrown away, not handed out again; a database that refuses connections is waited for; and
waiting for it costs an event none of the retries its own failures get. A good event is never
dead-lettered for an outage."""

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from crm.audit.v1 import events_pb2
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, Handler, ReceivedEvent
from crm_platform.db import create_engine
from crm_platform.kafka import ensure_topics
from crm_platform.outbox import OutboxRelay, Transaction, UnitOfWork
from crm_platform.testing.kafka import EventCollector, consume_until, produce_event
from crm_platform.testing.sample_service import add_note, create_schema, metadata, notes
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

TOPIC = "crm.audit.v1"


async def _as_admin(postgres_url: str, sql: str, *args: Any) -> None:
    admin = await asyncpg.connect(make_url(postgres_url).set(database="postgres").render_as_string(False))
    try:
        await admin.execute(sql, *args)
    finally:
        await admin.close()


async def _drop_connections(postgres_url: str, user: str = "") -> None:
    """What a restart, a failover or a proxy's idle timeout does to the pooled connections."""
    await _as_admin(
        postgres_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid() AND ($2 = '' OR usename = $2)",
        make_url(postgres_url).database,
        user,
    )
    await asyncio.sleep(0.3)  # the backends are gone; the database takes new connections at once


def _consumer(engine: AsyncEngine, kafka: KafkaSettings, name: str, handler: Handler) -> EventConsumer:
    """A consumer of AuditRecorded events that retries quickly."""
    return EventConsumer(
        name=name,
        uow=UnitOfWork(engine, metadata, source="/crm/test"),
        metadata=metadata,
        kafka=kafka,
        handlers={events_pb2.AuditRecorded: handler},
        service="test",
        retry_base_seconds=0.05,
    )


def _recording_consumer(engine: AsyncEngine, kafka: KafkaSettings, applied: list[str], name: str) -> EventConsumer:
    async def on_recorded(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
        await tx.conn.execute(
            insert(notes).values(id=event.headers.id, key=event.message.record_id, created_at=event.headers.time)
        )
        applied.append(event.message.record_id)

    return _consumer(engine, kafka, name, on_recorded)


async def _dead_letters(kafka: KafkaSettings) -> list[Any]:
    async with EventCollector(kafka.bootstrap_servers, [f"{TOPIC}.dlt"]) as dead_letters:
        await asyncio.sleep(1.0)
    return dead_letters.records


async def test_an_event_after_the_database_dropped_its_connections_is_applied(
    postgres_url: str, engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    applied: list[str] = []
    consumer = _recording_consumer(engine, broker_settings, applied, "dropped")
    task = asyncio.create_task(consumer.run())
    try:
        await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="before"), key="k")
        async with asyncio.timeout(30):
            while not applied:
                await asyncio.sleep(0.05)
        await _drop_connections(postgres_url)  # the connection the consumer used is in the pool, dead
        await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="after"), key="k")
        async with asyncio.timeout(30):
            while "after" not in applied:
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await task
    assert applied == ["before", "after"]
    assert await _dead_letters(broker_settings) == []


async def test_the_relay_publishes_again_once_the_database_dropped_its_connections(
    postgres_url: str, engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    relay = OutboxRelay(engine, metadata, broker_settings, service="test")
    async with UnitOfWork(engine, metadata, source="/crm/test").begin() as tx:
        await add_note(tx, "first")
    assert await relay.publish_pending() == 1
    await _drop_connections(postgres_url)
    other_replica = create_engine(postgres_url)
    try:
        async with UnitOfWork(other_replica, metadata, source="/crm/test").begin() as tx:
            await add_note(tx, "written-after-the-restart")
    finally:
        await other_replica.dispose()
    passes: list[int | str] = []
    for _ in range(3):  # the pass that meets a dead connection fails, and throws it away
        try:
            passes.append(await relay.publish_pending())
        except Exception as error:  # noqa: BLE001 - the relay's loop retries a failed pass
            passes.append(type(error).__name__)
        if 1 in passes:
            break
    await relay.drain(0.1)
    assert 1 in passes, passes


async def test_an_event_waits_while_the_database_refuses_connections_and_is_applied_after(
    postgres_url: str, broker_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """`too many connections` (53300) comes from PostgreSQL as a connection opens: the driver's own
    error, not SQLAlchemy's. The database is full, the event is fine."""
    role = f"crm_outage_{uuid.uuid4().hex[:8]}"
    database = make_url(postgres_url).database
    await _as_admin(postgres_url, f"CREATE ROLE {role} LOGIN")
    await _as_admin(postgres_url, f'GRANT ALL ON DATABASE "{database}" TO {role}')
    owner = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    try:
        await owner.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    finally:
        await owner.close()
    engine = create_engine(make_url(postgres_url).set(username=role).render_as_string(False))
    try:
        await create_schema(engine)
        await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
        applied: list[str] = []
        consumer = _recording_consumer(engine, broker_settings, applied, "refused")
        task = asyncio.create_task(consumer.run())
        try:
            await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="in"), key="k")
            async with asyncio.timeout(30):
                while not applied:  # the consumer is running
                    await asyncio.sleep(0.05)
            await _as_admin(postgres_url, f"ALTER ROLE {role} CONNECTION LIMIT 0")
            await _drop_connections(postgres_url, role)
            await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="waits"), key="k")
            await asyncio.sleep(4)  # longer than the five quick retries of a failing event take
            assert applied == ["in"]
            assert "too many connections" in caplog.text  # refused, and waiting
            await _as_admin(postgres_url, f"ALTER ROLE {role} CONNECTION LIMIT -1")
            async with asyncio.timeout(30):
                while "waits" not in applied:
                    await asyncio.sleep(0.05)
        finally:
            await consumer.stop()
            await task
        assert await _dead_letters(broker_settings) == []
    finally:
        await engine.dispose()
        owner = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
        try:
            await owner.execute(f"DROP OWNED BY {role}")
        finally:
            await owner.close()
        await _as_admin(postgres_url, f"DROP ROLE {role}")


async def test_waiting_out_an_outage_leaves_an_event_all_its_retries(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="payment"), key="k")
    calls = 0
    applied: list[str] = []

    async def handler(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 7:  # the database is down for longer than an event's five attempts
            raise OperationalError("INSERT ...", {}, ConnectionRefusedError("the database is restarting"))
        if calls == 8:  # back, and this transaction loses a deadlock: run again, it succeeds
            raise DatabaseError("UPDATE ...", {}, asyncpg.DeadlockDetectedError("deadlock detected"))
        applied.append(event.message.record_id)

    await consume_until(_consumer(engine, broker_settings, "attempts", handler), lambda: "payment" in applied)
    assert calls == 9
    assert await _dead_letters(broker_settings) == []


async def test_an_event_waits_out_a_database_outage_instead_of_going_to_the_dead_letter_topic(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    for record_id in ("during-outage", "after-outage"):
        await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id=record_id), key="k")
    applied: list[str] = []
    failures = 0

    async def flaky(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
        nonlocal failures
        if failures < 7:  # more than the 5 attempts a faulty event gets
            failures += 1
            raise OperationalError("INSERT ...", {}, ConnectionRefusedError("database is restarting"))
        applied.append(event.message.record_id)

    await consume_until(_consumer(engine, broker_settings, "outage", flaky), lambda: "after-outage" in applied)
    assert applied == ["during-outage", "after-outage"]  # in order, nothing skipped
    assert await _dead_letters(broker_settings) == []
