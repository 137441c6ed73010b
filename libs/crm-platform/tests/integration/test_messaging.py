"""The outbox and the consumer against real PostgreSQL and a real broker."""

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from crm.audit.v1 import events_pb2
from crm.leads.v1 import events_pb2 as lead_events
from crm_platform import outbox as outbox_module
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings, ServiceSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.db import DriverStatement, create_engine, driver_connection
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.kafka import ensure_topics
from crm_platform.outbox import OutboxRelay, Transaction, UnitOfWork, claim_statement
from crm_platform.service import ServiceApp
from crm_platform.testing.infra import TansuBroker, free_port, port_open
from crm_platform.testing.kafka import (
    EventCollector,
    ObservedRecord,
    consume_until,
    produce_event,
    produce_events,
    produce_raw,
)
from crm_platform.testing.plans import sql_literal
from crm_platform.testing.sample_service import SERVICE, add_note, create_schema, metadata, notes
from crm_platform.testing.tracing import record_spans
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import delete, event, func, insert, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

TOPIC = "crm.audit.v1"


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine_each_database(
    request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """The relay's statements differ by dialect (driver statements and row locks on PostgreSQL)."""
    url = postgres_url if request.param == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/outbox.db"
    engine = create_engine(url)
    await create_schema(engine)
    yield engine
    await engine.dispose()


def relay_for(engine: AsyncEngine, kafka: KafkaSettings) -> OutboxRelay:
    return OutboxRelay(engine, metadata, kafka, service="test", poll_seconds=0.02)


async def outbox_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(metadata.tables["outbox"])) or 0)


async def test_a_rolled_back_transaction_leaves_no_outbox_row_and_no_event(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    with pytest.raises(RuntimeError):
        async with uow.begin() as tx:
            await add_note(tx, "rolled-back")
            raise RuntimeError("business rule failed after the write")
    assert await outbox_count(engine) == 0
    relay = relay_for(engine, broker_settings)
    assert await relay.publish_pending() == 0
    await relay.drain(1)
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        await asyncio.sleep(1.0)
        assert collector.records == []


async def test_events_a_handler_wrote_itself_are_not_written_again_and_later_ones_follow_them(
    engine: AsyncEngine,
) -> None:
    outbox = metadata.tables["outbox"]
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    async with uow.begin() as tx:
        await add_note(tx, "k")
        await add_note(tx, "k")
        await tx.conn.execute(insert(outbox), tx.take_outbox_rows(utcnow()))  # in the handler's statement
        assert tx.take_outbox_rows(utcnow()) == []
        await add_note(tx, "k")
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.payload).order_by(outbox.c.seq))).scalars().all()
    published = [event.message.id for event in tx.events]
    assert [events_pb2.AuditRecorded.FromString(payload).id for payload in rows] == published
    assert len(published) == 3


async def test_a_committed_transaction_publishes_exactly_one_event_with_cloudevents_headers(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    async with uow.begin() as tx:
        note_id = await add_note(tx, "account-42")
    relay = relay_for(engine, broker_settings)
    assert await relay.publish_pending() == 1
    assert await outbox_count(engine) == 0  # deleted once the broker acknowledged it
    assert await relay.publish_pending() == 0
    await relay.drain(1)
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        records = await collector.wait_for(lambda r: len(r) >= 1)
        await asyncio.sleep(0.5)
        assert len(collector.records) == 1
    record = records[0]
    assert record.key == "account-42"
    assert record.headers["ce_specversion"] == "1.0"
    assert record.headers["ce_type"] == "crm.audit.record.recorded"
    assert record.headers["ce_source"] == "/crm/test"
    assert record.headers["ce_subject"] == "account-42"
    assert record.headers["ce_dataschema"] == "crm.audit.v1.AuditRecorded"
    assert record.headers["content-type"] == "application/protobuf"
    assert record.headers["ce_id"] and record.headers["ce_time"].endswith("Z")
    assert record.decode(events_pb2.AuditRecorded).id == note_id


async def test_events_written_while_the_broker_is_down_are_all_delivered_after_it_returns(
    engine: AsyncEngine, own_broker: TansuBroker, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    relay = relay_for(engine, broker_settings)
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    uow.on_commit(relay.wake)
    relay_task = asyncio.create_task(relay.run())
    own_broker.stop()
    written: dict[str, list[str]] = defaultdict(list)
    for index in range(200):
        key = f"key-{index % 17}"
        async with uow.begin() as tx:
            written[key].append(await add_note(tx, key))
    await asyncio.sleep(2.0)  # the relay keeps trying against a dead broker
    assert await relay.backlog() == 200
    own_broker.start()  # memory storage: the topic is gone with the old process
    await ensure_topics(broker_settings, [TOPIC])
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        await collector.wait_for(lambda r: len(r) >= 200, timeout=90)
        records = sorted(collector.records, key=lambda r: (r.partition, r.offset))
    await relay.stop()
    await relay_task
    received: dict[str, list[str]] = defaultdict(list)
    for record in records:
        received[record.key].append(record.decode(events_pb2.AuditRecorded).id)
    # All delivered once, and every key in order although its rows failed with different backoffs.
    assert received == written
    assert await relay.backlog() == 0


async def test_a_row_waiting_for_its_retry_holds_back_the_later_rows_of_its_key(
    engine_each_database: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    engine = engine_each_database
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    ids = []
    for key in ("gap", "gap", "gap", "other"):
        async with uow.begin() as tx:
            ids.append(await add_note(tx, key))
    outbox = metadata.tables["outbox"]
    second = select(func.min(outbox.c.seq)).where(outbox.c.key == "gap").scalar_subquery() + 1
    async with engine.begin() as conn:  # as if its first send had failed: due again in an hour
        await conn.execute(
            outbox.update()
            .where(outbox.c.seq == second)
            .values(attempts=1, next_attempt_at=utcnow() + timedelta(hours=1))
        )
    relay = relay_for(engine, broker_settings)
    assert await relay.publish_pending() == 2  # the first "gap" row and "other"; not the third "gap" row
    assert await relay.backlog() == 2
    assert await relay.drain(5) == 0  # shutdown ignores the backoff: the rest go, in order
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        await collector.wait_for(lambda r: len(r) >= 4)
        gap = [
            r.decode(events_pb2.AuditRecorded).id
            for r in sorted(collector.records, key=lambda r: r.offset)
            if r.key == "gap"
        ]
    assert gap == ids[:3]


async def write_a_busy_key_whose_first_row_backs_off(engine: AsyncEngine, behind: int) -> tuple[list[str], str]:
    """Events of key "busy" (the first one failed and is due again in an hour, `behind` more after
    it), then one of key "other": their ids."""
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    async with uow.begin() as tx:
        busy = [await add_note(tx, "busy") for _ in range(1 + behind)]
    async with uow.begin() as tx:
        other = await add_note(tx, "other")
    outbox = metadata.tables["outbox"]
    first = select(func.min(outbox.c.seq)).scalar_subquery()
    async with engine.begin() as conn:  # its partition had no leader
        await conn.execute(
            update(outbox)
            .where(outbox.c.seq == first)
            .values(attempts=1, next_attempt_at=utcnow() + timedelta(hours=1), last_error="NotLeaderForPartitionError")
        )
    return busy, other


async def test_rows_behind_a_row_waiting_for_its_retry_are_not_claimed_so_other_keys_do_not_wait(
    engine_each_database: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """More rows wait behind a key's failed row than a pass claims. Were they claimed (only to be
    held back), every pass would claim nothing else and publish nothing, and every other key's
    events would wait for that key's backoff too. They are not: the other key's event goes now."""
    engine = engine_each_database
    await ensure_topics(broker_settings, [TOPIC])
    _, other = await write_a_busy_key_whose_first_row_backs_off(engine, behind=10)
    relay = OutboxRelay(engine, metadata, broker_settings, service="test", batch_size=10)
    assert await relay.publish_pending() == 1
    assert await relay.publish_pending() == 0  # nothing else is due
    outbox = metadata.tables["outbox"]
    async with engine.connect() as conn:
        left = (await conn.execute(select(outbox.c.key, outbox.c.attempts).order_by(outbox.c.seq))).all()
    assert [tuple(row) for row in left] == [("busy", 1)] + [("busy", 0)] * 10  # the rows behind were never tried
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        (record,) = await collector.wait_for(lambda r: len(r) >= 1)
    assert record.decode(events_pb2.AuditRecorded).id == other
    await relay.drain(5)


async def test_the_shutdown_drain_publishes_rows_waiting_out_a_backoff_and_the_rows_behind_them_in_order(
    engine_each_database: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """At shutdown the relay publishes what it can, backoff or not: a key's failed row and the rows
    behind it (more than a pass claims) all go, in order."""
    engine = engine_each_database
    await ensure_topics(broker_settings, [TOPIC])
    busy, other = await write_a_busy_key_whose_first_row_backs_off(engine, behind=10)
    relay = OutboxRelay(engine, metadata, broker_settings, service="test", batch_size=10)
    assert await relay.drain(10) == 0
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        records = await collector.wait_for(lambda r: len(r) >= 12)
    assert ids_by_key(records) == {"busy": busy, "other": [other]}


async def test_the_relay_listens_with_the_tls_option_of_the_database_url(
    postgres_url: str, broker_settings: KafkaSettings
) -> None:
    """Production URLs carry `?ssl=...` (docs/deploy.md); the LISTEN connection must stand with it."""
    engine = create_engine(f"{postgres_url}?ssl=prefer")  # prefer: this server has no TLS
    relay = relay_for(engine, broker_settings)
    try:
        await relay._listen()
        assert relay._listen_connection is not None
    finally:
        await relay._close()
        await engine.dispose()


async def test_notify_wakes_the_relay_and_a_lost_listen_connection_comes_back(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    relay = relay_for(engine, broker_settings)  # polls every second while LISTEN stands
    uow = UnitOfWork(engine, metadata, source="/crm/test")  # no in-process wake: only NOTIFY

    async def published_within(seconds: float) -> bool:
        async with uow.begin() as tx:
            await add_note(tx, "notified")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            if await relay.backlog() == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    task = asyncio.create_task(relay.run())
    try:
        async with asyncio.timeout(10):
            while relay._listen_connection is None:
                await asyncio.sleep(0.02)
        assert await published_within(0.5)
        first = relay._listen_connection
        async with engine.begin() as conn:  # a failover or an idle-connection reaper drops it
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first.get_server_pid()})
        async with asyncio.timeout(15):
            while relay._listen_connection is None or relay._listen_connection is first:
                await asyncio.sleep(0.05)
        assert await published_within(0.5)
    finally:
        await relay.stop()
        await task


def ids_by_key(records: list[ObservedRecord]) -> dict[str, list[str]]:
    """The event ids of each key, in the order the broker holds them (by partition and offset)."""
    received: dict[str, list[str]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        received[record.key].append(record.decode(events_pb2.AuditRecorded).id)
    return received


async def test_per_key_order_is_kept_across_1000_events_on_6_partitions(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    relays = [relay_for(engine, broker_settings) for _ in range(2)]  # two replicas share the work
    for relay in relays:
        uow.on_commit(relay.wake)
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    keys = [f"order-{k}" for k in range(25)]
    sent: dict[str, list[str]] = defaultdict(list)

    async def writer(worker: int) -> None:
        # Writes to one aggregate are serialised (as a version check or row lock does in a service):
        # each key belongs to one writer, and the writers run concurrently.
        own_keys = keys[worker::4]
        for index in range(250):
            key = own_keys[index % len(own_keys)]
            async with uow.begin() as tx:
                sent[key].append(await add_note(tx, key))

    await asyncio.gather(*(writer(w) for w in range(4)))
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        await collector.wait_for(lambda r: len(r) >= 1000, timeout=90)
        records = list(collector.records)
    for relay in relays:
        await relay.stop()
    await asyncio.gather(*tasks)
    received = ids_by_key(records)
    partitions_of_key: dict[str, set[int]] = defaultdict(set)
    for record in records:
        partitions_of_key[record.key].add(record.partition)
    assert {p for ps in partitions_of_key.values() for p in ps} == set(range(6))
    assert all(len(ps) == 1 for ps in partitions_of_key.values())
    for key in keys:
        assert received[key] == sorted(sent[key]), key


async def test_a_pass_larger_than_a_record_batch_goes_in_several_batches_in_key_order(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """One pass packs its rows into record batches (16 KiB each by default); rows of ~6 KiB fill
    several batches per partition, and each key's rows still arrive in order, on the partition a
    plain producer picks for that key."""
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    keys = [f"big-{new_id()}" for _ in range(3)]
    sent: dict[str, list[str]] = defaultdict(list)
    async with uow.begin() as tx:
        for index in range(30):
            key = keys[index % 3]
            event = events_pb2.AuditRecorded(id=f"{index:03d}", record_id=key, reason="x" * 6000)
            tx.publish(event, key=key)
            sent[key].append(event.id)
    relay = relay_for(engine, broker_settings)
    assert await relay.publish_pending() == 30
    await relay.drain(1)
    await produce_raw(broker_settings.bootstrap_servers, TOPIC, key=keys[0], value=b"marker")
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        records = await collector.wait_for(lambda r: sum(x.key in keys for x in r) >= 31)
    ours = [r for r in records if r.key in keys]
    marker = next(r for r in ours if r.value == b"marker")
    assert ids_by_key([r for r in ours if r is not marker]) == sent
    assert {r.partition for r in ours if r.key == keys[0]} == {marker.partition}


async def test_after_a_batch_fails_the_later_batches_of_its_partition_wait_instead_of_overtaking_it(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """A key's events fill three record batches of one partition. The broker refuses the first (a
    non-retriable error): the two after it are not sent, and the retry delivers all three, in order,
    once each."""
    await ensure_topics(broker_settings, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    key = f"refused-{new_id()}"
    async with uow.begin() as tx:
        for index in range(3):  # 10 KB each: one event per 16 KiB batch
            tx.publish(events_pb2.AuditRecorded(id=f"{index}", record_id=key, reason="x" * 10_000), key=key)
    relay = relay_for(engine, broker_settings)
    sent_batches: list[int] = []
    connect = relay._ensure_producer

    class RefusesTheFirstBatch:
        """The relay's producer, except that the broker refuses the first batch it is given."""

        def __init__(self, producer: Any) -> None:
            self.producer = producer

        def __getattr__(self, name: str) -> Any:
            return getattr(self.producer, name)

        async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
            sent_batches.append(partition)
            if len(sent_batches) == 1:
                refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                refused.set_exception(KafkaError("refused by the test"))
                return refused
            return await self.producer.send_batch(batch, topic, partition=partition)

    async def refusing_producer() -> Any:
        return RefusesTheFirstBatch(await connect())

    relay._ensure_producer = refusing_producer  # type: ignore[method-assign]
    assert await relay.publish_pending() == 0
    assert len(sent_batches) == 1  # the second and third batch were held back
    assert await relay.backlog() == 3
    assert await relay.drain(5) == 0
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        records = await collector.wait_for(lambda r: sum(x.key == key for x in r) >= 3)
    assert ids_by_key([r for r in records if r.key == key]) == {key: ["0", "1", "2"]}


MISSING_TOPIC = "crm.notcreated.v1"


@pytest.mark.parametrize("answer", ["unknown topic", "no answer"])
async def test_a_topic_the_broker_cannot_resolve_fails_only_its_own_rows(
    engine: AsyncEngine, broker_settings: KafkaSettings, answer: str
) -> None:
    """A topic whose partitions the broker does not tell (not created where a platform team owns the
    topics, no ACL for it, or no answer within the send timeout): its rows wait out a backoff with
    that error, and the other topics' rows are published in the same pass."""
    kafka = broker_settings.model_copy(update={"send_timeout_seconds": 1.0})
    await ensure_topics(kafka, [TOPIC])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    async with uow.begin() as tx:
        await add_note(tx, "on-a-missing-topic")
    async with uow.begin() as tx:
        healthy = await add_note(tx, "healthy")
    outbox = metadata.tables["outbox"]
    async with engine.begin() as conn:
        await conn.execute(update(outbox).where(outbox.c.key == "on-a-missing-topic").values(topic=MISSING_TOPIC))
    relay = relay_for(engine, kafka)
    connect = relay._ensure_producer

    class CannotResolveTheMissingTopic:
        """The relay's producer, except for the missing topic's partitions: a broker that does not
        create topics answers as aiokafka raises it, or a broker that does not answer in time."""

        def __init__(self, producer: Any) -> None:
            self.producer = producer

        def __getattr__(self, name: str) -> Any:
            return getattr(self.producer, name)

        async def partitions_for(self, topic: str) -> set[int]:
            if topic == MISSING_TOPIC:
                if answer == "unknown topic":
                    raise UnknownTopicOrPartitionError()
                await asyncio.Event().wait()
            return await self.producer.partitions_for(topic)  # type: ignore[no-any-return]

    async def producer_without_the_missing_topic() -> Any:
        return CannotResolveTheMissingTopic(await connect())

    relay._ensure_producer = producer_without_the_missing_topic  # type: ignore[method-assign]
    assert await relay.publish_pending() == 1
    async with engine.connect() as conn:
        (left,) = (
            await conn.execute(select(outbox.c.key, outbox.c.attempts, outbox.c.next_attempt_at, outbox.c.last_error))
        ).all()
    assert (left.key, left.attempts) == ("on-a-missing-topic", 1) and left.next_attempt_at is not None
    error = "UnknownTopicOrPartitionError" if answer == "unknown topic" else "TimeoutError"
    assert left.last_error.startswith(error), left.last_error
    async with EventCollector(kafka.bootstrap_servers, [TOPIC]) as collector:
        (record,) = await collector.wait_for(lambda r: len(r) >= 1)
    assert record.decode(events_pb2.AuditRecorded).id == healthy
    assert await relay.drain(0) == 1  # stops the relay; the missing topic's row waits for the next start


def consumer_for(
    engine: AsyncEngine,
    kafka: KafkaSettings,
    applied: list[str],
    *,
    fail_on: set[str] | None = None,
    also_on: tuple[type[Message], ...] = (),
    only_these_types: bool = False,
) -> EventConsumer:
    """Applies AuditRecorded events (noting their record ids in `applied`); `also_on`: other event
    types it takes (and passes over)."""

    async def passed_over(tx: Transaction, event: ReceivedEvent[Any]) -> None:
        return None

    async def on_recorded(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
        if event.message.record_id in (fail_on or set()):
            raise ValidationFailed([FieldError("record_id", "refused by the test")])
        await tx.conn.execute(
            insert(notes).values(id=event.headers.id, key=event.message.record_id, created_at=event.headers.time)
        )
        applied.append(event.message.record_id)

    return EventConsumer(
        name="test-consumer",
        uow=UnitOfWork(engine, metadata, source="/crm/test"),
        metadata=metadata,
        kafka=kafka,
        handlers={events_pb2.AuditRecorded: on_recorded, **dict.fromkeys(also_on, passed_over)},
        service="test",
        only_these_types=only_these_types,
    )


async def test_a_redelivered_event_is_applied_once(engine: AsyncEngine, broker_settings: KafkaSettings) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    event = events_pb2.AuditRecorded(id="a1", record_id="applied-once")
    event_id = await produce_event(broker_settings.bootstrap_servers, event, key="k1")
    await produce_event(broker_settings.bootstrap_servers, event, key="k1", event_id=event_id)  # redelivery
    await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="last"), key="k1")
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    await consume_until(consumer, lambda: "last" in applied)
    assert applied == ["applied-once", "last"]
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(notes).where(notes.c.key == "applied-once")) == 1


async def applied_keys(engine: AsyncEngine) -> list[str]:
    """The record ids the test handler stored, in the order of their events."""
    async with engine.connect() as conn:
        return list(await conn.scalars(select(notes.c.key).order_by(notes.c.created_at, notes.c.key)))


async def test_a_backlog_is_applied_in_a_transaction_per_fetch_not_per_event(
    engine_each_database: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    engine = engine_each_database
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    backlog = [events_pb2.AuditRecorded(record_id=f"r{n:03d}") for n in range(60)]
    await produce_events(broker_settings.bootstrap_servers, backlog, key="one-key")
    commits = 0

    def count_commit(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine.sync_engine, "commit", count_commit)
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    await consume_until(consumer, lambda: len(applied) >= len(backlog))
    assert applied == [m.record_id for m in backlog]  # in order, each once
    assert commits <= 10, commits  # a fetch returns up to 500 records: a handful of transactions


async def test_an_event_failing_in_a_batch_is_dead_lettered_alone_and_the_others_are_applied(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    bootstrap = broker_settings.bootstrap_servers
    ids = ["a", "b", "c", "refused", "d", "e"]
    await produce_events(bootstrap, [events_pb2.AuditRecorded(record_id=i) for i in ids], key="k")
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied, fail_on={"refused"})
    async with EventCollector(bootstrap, [f"{TOPIC}.dlt"]) as dead_letters:
        await consume_until(consumer, lambda: "e" in applied and len(dead_letters.records) >= 1)
    # The batch rolled back at "refused": the events before it were applied again, once in the end.
    assert await applied_keys(engine) == ["a", "b", "c", "d", "e"]
    assert [r.headers["dlt_error_type"] for r in dead_letters.records] == ["ValidationFailed"]
    async with engine.connect() as conn:
        inbox = metadata.tables["processed_events"]
        assert await conn.scalar(select(func.count()).select_from(inbox)) == 5  # the dead letter is not applied


async def test_processed_events_past_the_retention_are_deleted_and_a_recent_redelivery_is_still_skipped(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    app = ServiceApp(
        settings=ServiceSettings(service_name="probe", inbox_retention_hours=1, kafka=broker_settings),
        engine=engine,
        metadata=metadata,
        uow=consumer.uow,
        service_names=[],
        register=lambda server: None,
        consumers=[consumer],
    )
    [expiry] = [job for job in app.jobs if job.name == "processed-events-expiry"]
    inbox = metadata.tables["processed_events"]
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(
            insert(inbox),
            [
                {"consumer": consumer.name, "event_id": "two-hours-old", "processed_at": now - timedelta(hours=2)},
                {"consumer": consumer.name, "event_id": "recent", "processed_at": now - timedelta(minutes=10)},
            ],
        )

    assert await expiry.run_once() == 1
    redelivered = events_pb2.AuditRecorded(record_id="redelivered")
    await produce_event(broker_settings.bootstrap_servers, redelivered, key="k", event_id="recent")
    await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id="next"), key="k")
    await consume_until(consumer, lambda: "next" in applied)
    assert applied == ["next"]  # the event processed ten minutes ago is still known
    async with engine.connect() as conn:
        kept = set(await conn.scalars(select(inbox.c.event_id)))
    assert "two-hours-old" not in kept and "recent" in kept


async def test_a_second_replica_joining_mid_batch_takes_partitions_without_a_restart(
    engine: AsyncEngine, broker_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_topics(broker_settings, [TOPIC])
    bootstrap = broker_settings.bootstrap_servers

    def replica(applied: list[str]) -> EventConsumer:
        async def slowly(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
            await asyncio.sleep(0.01)  # batches take a while: the rebalance may land in the middle of one
            await tx.conn.execute(insert(notes).values(id=event.headers.id, key=event.message.record_id,
                                                       created_at=event.headers.time))  # fmt: skip
            applied.append(event.message.record_id)

        return EventConsumer(
            name="rebalancing",
            uow=UnitOfWork(engine, metadata, source="/crm/test"),
            metadata=metadata,
            kafka=broker_settings,
            handlers={events_pb2.AuditRecorded: slowly},
            service="test",
        )

    async def produce(wave: str) -> list[str]:
        ids = [f"{wave}-{n}" for n in range(150)]
        for record_id in ids:
            await produce_event(bootstrap, events_pb2.AuditRecorded(record_id=record_id), key=f"k{record_id[-2:]}")
        return ids

    first_applied: list[str] = []
    second_applied: list[str] = []
    expected = await produce("one")
    first = replica(first_applied)
    tasks = [asyncio.create_task(first.run())]
    async with asyncio.timeout(60):
        while len(first_applied) < 10:
            await asyncio.sleep(0.01)
    second = replica(second_applied)
    tasks.append(asyncio.create_task(second.run()))
    await asyncio.wait_for(second.ready.wait(), 60)
    expected += await produce("two")
    async with asyncio.timeout(90):
        while set(first_applied) | set(second_applied) != set(expected):
            await asyncio.sleep(0.05)
    for consumer in (first, second):
        await consumer.stop()
    await asyncio.gather(*tasks)
    assert second_applied  # the new replica took partitions of its own
    assert sorted(first_applied + second_applied) == sorted(expected)  # each event applied once
    assert not [r for r in caplog.records if "restarting" in r.getMessage()]  # no consumer was torn down


async def test_a_consumer_stopped_while_the_broker_does_not_answer_stops_at_once(engine: AsyncEngine) -> None:
    """A stop (SIGTERM) must not wait out the client's start, which waits for the broker up to the
    send timeout."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # holds the connection open and says nothing

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", send_timeout_seconds=60.0)
    consumer = consumer_for(engine, kafka, [])
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.5)

    stopped_at = asyncio.get_running_loop().time()
    await consumer.stop()
    await asyncio.wait_for(task, 90)
    assert asyncio.get_running_loop().time() - stopped_at < 1.0
    silent.close()


async def test_a_poison_message_goes_to_the_dead_letter_topic_and_the_partition_keeps_moving(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    bootstrap = broker_settings.bootstrap_servers
    await produce_raw(bootstrap, TOPIC, key="k", value=b"\xff\x00not protobuf", headers=[("ce_type", b"x")])
    await produce_event(bootstrap, events_pb2.AuditRecorded(record_id="refused"), key="k")
    await produce_event(bootstrap, events_pb2.AuditRecorded(record_id="after-poison"), key="k")
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied, fail_on={"refused"})
    async with EventCollector(bootstrap, [f"{TOPIC}.dlt"]) as dead_letters:
        await consume_until(consumer, lambda: "after-poison" in applied and len(dead_letters.records) >= 2)
    assert applied == ["after-poison"]
    reasons = sorted(r.headers["dlt_error_type"] for r in dead_letters.records)
    assert reasons == ["PoisonMessage", "ValidationFailed"]
    assert all(r.headers["dlt_original_topic"] == TOPIC for r in dead_letters.records)
    assert any("refused by the test" in r.headers["dlt_error"] for r in dead_letters.records)


async def test_a_record_the_consumer_cannot_read_is_dead_lettered_and_the_partition_moves_on(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """Outside producers (the ERP topics) may send what Kafka allows and we cannot read: a header
    without a value, a key that is not text. Such a record must not stop its partition."""
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    bootstrap = broker_settings.bootstrap_servers

    def headers(*extra: tuple[str, bytes | None]) -> list[tuple[str, bytes | None]]:
        spec = spec_of(events_pb2.AuditRecorded)
        good = CloudEventHeaders(id=new_id(), type=spec.type, source="/erp", time=utcnow(), subject="k").encode()
        return [*good, *extra]

    def payload(record_id: str) -> bytes:
        return events_pb2.AuditRecorded(record_id=record_id).SerializeToString()

    await produce_raw(bootstrap, TOPIC, key=b"\xff\xfe", value=payload("key-not-text"), headers=headers())
    null_id = [(name, None if name == "ce_id" else value) for name, value in headers()]
    await produce_raw(bootstrap, TOPIC, key="k", value=payload("id-without-value"), headers=null_id)
    # A header without a value that the event does not need is read as empty: the event applies.
    await produce_raw(bootstrap, TOPIC, key="k", value=payload("odd-header"), headers=headers(("x-erp", None)))
    await produce_event(bootstrap, events_pb2.AuditRecorded(record_id="after"), key="k")
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    async with EventCollector(bootstrap, [f"{TOPIC}.dlt"]) as dead_letters:
        await consume_until(consumer, lambda: "after" in applied and len(dead_letters.records) >= 2)
    assert applied == ["odd-header", "after"]
    errors = sorted(r.headers["dlt_error"] for r in dead_letters.records)
    assert errors == ["missing CloudEvents headers: ce_id", "the key b'\\xff\\xfe' is not UTF-8 text"]


async def test_consumer_lag_is_reported_by_the_replica_that_owns_the_partition_while_it_owns_it(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    from prometheus_client import REGISTRY

    def lag_series() -> dict[str, float]:
        return {
            sample.labels["partition"]: sample.value
            for metric in REGISTRY.collect()
            if metric.name == "crm_consumer_lag"
            for sample in metric.samples
            if sample.labels["service"] == "test" and sample.labels["topic"] == TOPIC
        }

    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    for n in range(3):
        await produce_event(broker_settings.bootstrap_servers, events_pb2.AuditRecorded(record_id=f"lag-{n}"), key="k")
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    task = asyncio.create_task(consumer.run())
    async with asyncio.timeout(30):
        while len(applied) < 3 or not lag_series():
            await asyncio.sleep(0.05)
    assert set(lag_series().values()) == {0.0}  # caught up, and said so while idle
    await consumer.stop()
    await task
    assert lag_series() == {}  # no longer this replica's to report


async def test_sigterm_under_load_loses_no_accepted_request(postgres_url: str, own_broker: TansuBroker) -> None:
    engine = create_engine(postgres_url)
    await create_schema(engine)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "crm_platform.testing.sample_service", postgres_url, own_broker.bootstrap, str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with asyncio.timeout(30):
            while not port_open("127.0.0.1", port):
                await asyncio.sleep(0.05)
        accepted: list[tuple[str, str]] = []
        refused = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            add = channel.unary_unary(f"/{SERVICE}/AddNote")

            async def client(worker: int) -> None:
                nonlocal refused
                for index in range(10_000):
                    key = f"w{worker}-{index}"
                    try:
                        note_id = await add(key.encode(), timeout=5)
                    except grpc.aio.AioRpcError:
                        refused += 1
                        return
                    accepted.append((key, note_id.decode()))

            clients = [asyncio.create_task(client(w)) for w in range(8)]
            await asyncio.sleep(1.5)
            process.send_signal(signal.SIGTERM)
            await asyncio.gather(*clients)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert len(accepted) > 50 and refused > 0
    async with engine.connect() as conn:
        stored = {row.id for row in await conn.execute(select(notes.c.id))}
    assert {note_id for _, note_id in accepted} <= stored
    async with EventCollector(own_broker.bootstrap, [TOPIC]) as collector:
        await collector.wait_for(lambda r: len(r) >= len(stored), timeout=60)
        published = {r.decode(events_pb2.AuditRecorded).id for r in collector.records}
    assert {note_id for _, note_id in accepted} <= published
    await engine.dispose()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = record_spans()
    # As in the services (crm_platform.telemetry): aiokafka instrumented, adding its own headers.
    instrumentor = AIOKafkaInstrumentor()
    instrumentor.instrument()
    yield exporter
    instrumentor.uninstrument()


async def test_the_trace_continues_from_the_publisher_to_the_consumer(
    engine: AsyncEngine, broker_settings: KafkaSettings, spans: InMemorySpanExporter
) -> None:
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt"])
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    with trace.get_tracer("test").start_as_current_span("handle request") as request_span:
        async with uow.begin() as tx:
            await add_note(tx, "traced")
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    relay = relay_for(engine, broker_settings)
    assert await relay.publish_pending() == 1
    await relay.drain(1)
    async with EventCollector(broker_settings.bootstrap_servers, [TOPIC]) as collector:
        (record,) = await collector.wait_for(lambda r: len(r) >= 1)
    assert record.headers["traceparent"].split("-")[1] == trace_id
    assert [name for name, _ in record.raw_headers].count("traceparent") == 1
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied)
    await consume_until(consumer, lambda: "traced" in applied)
    consumed = [span for span in spans.get_finished_spans() if span.name == f"consume {TOPIC}"]
    assert consumed and format(consumed[0].context.trace_id, "032x") == trace_id


async def test_a_pass_claims_a_burst_of_pending_rows_in_seq_order_without_sorting_them(engine: AsyncEngine) -> None:
    # Statistics taken while few rows were pending, then a burst of pending rows (an import): the
    # claim must still walk ix_outbox_pending in seq order, not fetch and sort the whole burst.
    outbox = metadata.tables["outbox"]
    published = utcnow()

    def rows(start: int, count: int, published_at: object) -> list[dict[str, object]]:
        return [
            {"id": new_id(), "topic": TOPIC, "key": f"k{n % 97}", "type": "t", "payload": b"x", "headers": [],
             "created_at": published, "published_at": published_at}
            for n in range(start, start + count)
        ]  # fmt: skip

    async with engine.begin() as conn:  # statistics taken with a few rows pending
        await conn.execute(insert(outbox), rows(0, 20000, published) + rows(20000, 10, None))
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE outbox"))
        await conn.commit()
    async with engine.begin() as conn:  # then a burst: most rows pending
        await conn.execute(update(outbox).where(outbox.c.seq > 8000).values(published_at=None))
    claim = DriverStatement(claim_statement(outbox, limit=500, due_only=True))
    async with engine.begin() as conn:
        driver = await driver_connection(conn)
        plan = "\n".join(row[0] for row in await driver.fetch("EXPLAIN " + claim.sql, *claim.args({"now": utcnow()})))
        claimed = await claim.fetch(conn, {"now": utcnow()})
    assert "ix_outbox_pending" in plan and "Sort Key: outbox.seq" not in plan, plan
    assert [row["seq"] for row in claimed] == sorted(row["seq"] for row in claimed)
    assert len(claimed) == 500 and not any(row["held_back"] for row in claimed)


async def test_a_pass_plans_for_the_outbox_as_it_is_not_as_it_was_when_its_statements_were_prepared(
    engine: AsyncEngine,
) -> None:
    # The usual state: earlier events published and deleted, vacuumed, statistics of an empty
    # outbox, and the relay's statements prepared on its connection while few rows were pending
    # (PostgreSQL keeps a generic plan from their sixth run on). Then a burst (an import): after its
    # first pass, it must be claimed, checked for held-back keys (a probe of the key's index per
    # row, not a walk over every older pending row) and deleted through the indexes.
    outbox = metadata.tables["outbox"]
    now = utcnow()

    def rows(count: int, prefix: str) -> list[dict[str, object]]:
        return [
            {"id": new_id(), "topic": TOPIC, "key": f"{prefix}{n // 2}", "type": "t", "payload": b"x", "headers": [],
             "created_at": now}
            for n in range(count)
        ]  # fmt: skip

    async with engine.begin() as conn:
        await conn.execute(insert(outbox), rows(6000, "published-"))
        await conn.execute(delete(outbox))
    async with engine.connect() as conn:
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("VACUUM ANALYZE outbox"))
    async with engine.begin() as conn:
        await conn.execute(insert(outbox), rows(2, "few-"))
    relay = OutboxRelay(engine, metadata, KafkaSettings(), service="test")
    statements = {"claim": relay._driver_claim_due, "remove": relay._driver_delete_published}
    async with engine.connect() as conn:
        driver = await driver_connection(conn)
        for name, statement in statements.items():
            await driver.execute(f"PREPARE {name} AS {statement.sql}")
        few = relay._driver_claim_due.args({"now": now})
        # The plan PostgreSQL keeps for them once a generic plan looks no dearer than a custom one.
        await driver.execute("SET plan_cache_mode = force_generic_plan")
        for _ in range(8):
            async with conn.begin():  # a small pass, and the test's statement under its settings
                await relay._claim(conn, ignore_backoff=False)
                await driver.fetch(f"EXECUTE claim({', '.join(sql_literal(value) for value in few)})")
        async with conn.begin():
            await conn.execute(insert(outbox), rows(20000, "burst-"))
        async with conn.begin():  # the burst's first pass: the cached plans
            first = await relay._claim(conn, ignore_backoff=False)
            await relay._delete(conn, [row.seq for row in first])
        async with conn.begin():  # the next passes: planned for the outbox as it is
            claimed = await relay._claim(conn, ignore_backoff=False)
            plans = {}
            for name, params in (("claim", {"now": now}), ("remove", {"seqs": [row.seq for row in claimed]})):
                values = ", ".join(sql_literal(value) for value in statements[name].args(params))
                plans[name] = "\n".join(row[0] for row in await driver.fetch(f"EXPLAIN EXECUTE {name}({values})"))
            custom_plans = await driver.fetchval("SELECT custom_plans FROM pg_prepared_statements WHERE name = 'claim'")
    assert custom_plans == 1  # this pass planned the claim for the burst; the small passes did not
    for name, plan in plans.items():
        assert "Seq Scan" not in plan and "Bitmap" not in plan and "Sort Key: outbox.seq" not in plan, (name, plan)
    assert "ix_outbox_key_pending on outbox older" in plans["claim"], plans["claim"]
    assert [row.seq for row in claimed] == sorted(row.seq for row in claimed)
    assert len(claimed) == 500 and [row.held_back for row in claimed] == [False] * 500


async def test_a_pass_looks_up_each_rows_key_among_the_rows_backing_off_and_never_reads_them_all(
    engine: AsyncEngine,
) -> None:
    # Statistics taken while two rows backed off; then the first rows of half the keys fail (their
    # partitions lost their leader). For each row it looks at, a pass must look its key up in
    # ix_outbox_retrying (the rows that failed), under a custom plan and the generic one alike: not
    # read every row backing off and compare each row with all of them (390 ms a pass, not 3 ms).
    outbox = metadata.tables["outbox"]
    now = utcnow()
    later = now + timedelta(hours=1)
    async with engine.begin() as conn:  # two rows to a key: seqs 1 and 2 of key k0, 3 and 4 of k1, ...
        await conn.execute(
            insert(outbox),
            [
                {"id": new_id(), "topic": TOPIC, "key": f"k{n // 2}", "type": "t", "payload": b"x", "headers": [],
                 "created_at": now}
                for n in range(20000)
            ],
        )  # fmt: skip
        await conn.execute(update(outbox).where(outbox.c.seq.in_([5, 17])).values(attempts=1, next_attempt_at=later))
    async with engine.connect() as conn:
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("VACUUM ANALYZE outbox"))
    async with engine.begin() as conn:  # the first row of k0, k2, k4, ...
        await conn.execute(update(outbox).where(outbox.c.seq % 4 == 1).values(attempts=1, next_attempt_at=later))
    relay = OutboxRelay(engine, metadata, KafkaSettings(), service="test")
    claim = relay._driver_claim_due
    plans = {}
    async with engine.connect() as conn:
        driver = await driver_connection(conn)
        await driver.execute(f"PREPARE claim AS {claim.sql}")
        values = ", ".join(sql_literal(value) for value in claim.args({"now": utcnow()}))
        for mode in ("force_custom_plan", "force_generic_plan"):
            async with conn.begin():
                await relay._driver_pass_planning.execute(conn, {})  # the relay's settings for a pass
                await driver.execute(f"SET LOCAL plan_cache_mode = {mode}")
                plans[mode] = "\n".join(row[0] for row in await driver.fetch(f"EXPLAIN EXECUTE claim({values})"))
        async with conn.begin():
            claimed = await relay._claim(conn, ignore_backoff=False)
    for mode, plan in plans.items():
        assert "Index Scan using ix_outbox_pending on outbox" in plan, (mode, plan)
        assert "Index Scan using ix_outbox_retrying on outbox retrying" in plan, (mode, plan)
        assert "Materialize" not in plan and "Anti Join" not in plan, (mode, plan)
    assert len(claimed) == 500 and not any(row.held_back for row in claimed)
    assert all(int(row.key[1:]) % 2 == 1 for row in claimed)  # both rows of k1, k3, k5, ...


async def test_a_relay_without_its_database_backs_off_logs_one_traceback_and_its_drain_still_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without LISTEN the relay polls every 20 ms here: a pass failing at that pace made a traceback
    each. Failed passes are retried after 0.1, 0.2, 0.4, 0.8 s ... (at most 5 s), and a shutdown
    that cannot count what is left logs it instead of raising."""
    caplog.set_level(logging.INFO, logger="crm_platform.outbox")
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/crm")
    relay = relay_for(engine, KafkaSettings())
    passes = 0
    publish = relay.publish_pending

    async def counted(*, ignore_backoff: bool = False) -> int:
        nonlocal passes
        passes += 1
        return await publish(ignore_backoff=ignore_backoff)

    relay.publish_pending = counted  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(2.0)
    await relay.stop()
    await asyncio.wait_for(task, 5)

    assert 3 <= passes <= 6, passes  # at 0, 0.1, 0.3, 0.7 and 1.5 s
    assert await relay.drain(0.5) is None  # the rows left are unknown; the next start publishes them
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.getMessage(), bool(r.exc_info)) for r in failures] == [
        ("outbox relay pass failed; retrying with backoff", True)
    ]
    await engine.dispose()


async def test_a_relay_logs_an_outage_once_then_rarely_and_its_end_and_backs_off_anew_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_platform.outbox")
    monkeypatch.setattr(outbox_module, "FAILED_PASS_LOG_SECONDS", 0.25)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    await create_schema(engine)
    relay = relay_for(engine, KafkaSettings())
    loop = asyncio.get_running_loop()
    outcomes = iter([False, False, False, False, True, False])  # two outages; then the passes succeed
    passes: list[float] = []

    async def flaky(*, ignore_backoff: bool = False) -> int:
        passes.append(loop.time())
        if next(outcomes, True):
            return 0
        raise OperationalError("SELECT ...", {}, ConnectionRefusedError("database is restarting"))

    relay.publish_pending = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    async with asyncio.timeout(10):
        while len(passes) < 7:
            await asyncio.sleep(0.01)
    await relay.stop()
    await asyncio.wait_for(task, 5)
    await engine.dispose()

    gaps = [later - earlier for earlier, later in itertools.pairwise(passes)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4 and gaps[3] >= 0.8, gaps  # doubling
    assert gaps[5] < 0.5, gaps  # the second outage starts over at 0.1 s, not at 1.6 s
    logged = [(r.levelname, r.getMessage().split(":")[0], bool(r.exc_info)) for r in caplog.records]
    assert logged == [
        ("ERROR", "outbox relay pass failed; retrying with backoff", True),
        # the second failure is within FAILED_PASS_LOG_SECONDS of the first: not logged
        ("WARNING", "outbox relay passes still failing (3 in a row)", False),
        ("WARNING", "outbox relay passes still failing (4 in a row)", False),
        ("INFO", "outbox relay passes succeed again after 4 failed", False),
        ("ERROR", "outbox relay pass failed; retrying with backoff", True),
        ("INFO", "outbox relay passes succeed again after 1 failed", False),
    ]


async def test_a_commit_during_a_relays_backoff_is_published_without_waiting_the_rest_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit says the database answers again: the relay tries at once, not after its backoff."""
    monkeypatch.setattr(outbox_module, "FAILED_PASS_RETRY_SECONDS", (5.0, 5.0))
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    await create_schema(engine)
    relay = relay_for(engine, KafkaSettings())
    loop = asyncio.get_running_loop()
    outcomes = iter([False, True])
    passes: list[float] = []

    async def down_once(*, ignore_backoff: bool = False) -> int:
        passes.append(loop.time())
        if next(outcomes, True):
            return 0
        raise OperationalError("SELECT ...", {}, ConnectionRefusedError("database is restarting"))

    relay.publish_pending = down_once  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    async with asyncio.timeout(10):
        while len(passes) < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        relay.wake()  # a row committed
        while len(passes) < 2:
            await asyncio.sleep(0.01)
    await relay.stop()
    await asyncio.wait_for(task, 5)
    await engine.dispose()

    assert passes[1] - passes[0] < 1.0, passes  # not the 5 s backoff


async def test_rows_that_an_earlier_relay_marked_published_are_deleted_by_housekeeping(
    engine_each_database: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    # Relays before 2026-12 marked acknowledged rows instead of deleting them.
    engine = engine_each_database
    uow = UnitOfWork(engine, metadata, source="/crm/test")
    for key in ("marked", "pending"):
        async with uow.begin() as tx:
            await add_note(tx, key)
    outbox = metadata.tables["outbox"]
    async with engine.begin() as conn:
        await conn.execute(update(outbox).where(outbox.c.key == "marked").values(published_at=utcnow()))
    relay = relay_for(engine, broker_settings)
    await relay._housekeeping()
    async with engine.connect() as conn:
        assert list(await conn.scalars(select(outbox.c.key))) == ["pending"]
    assert await relay.drain(0) == 1  # closes the relay; the pending row waits for the next one


async def test_an_event_on_a_topic_not_its_own_or_of_a_type_an_inbound_topic_does_not_carry_is_dead_lettered(
    engine: AsyncEngine, broker_settings: KafkaSettings
) -> None:
    """An outside producer's mistakes (the ERP topics): a mistyped `ce_type`, an event sent to
    another topic. Passed over, the posting would be lost without a trace."""
    leads_topic = spec_of(lead_events.LeadCreated).topic
    await ensure_topics(broker_settings, [TOPIC, f"{TOPIC}.dlt", leads_topic, f"{leads_topic}.dlt"])
    bootstrap = broker_settings.bootstrap_servers

    def sent_as(event_type: str, record_id: str) -> dict[str, Any]:
        headers = CloudEventHeaders(id=new_id(), type=event_type, source="/erp", time=utcnow(), subject="k").encode()
        return {
            "key": "k",
            "value": events_pb2.AuditRecorded(record_id=record_id).SerializeToString(),
            "headers": headers,
        }

    audit_type = spec_of(events_pb2.AuditRecorded).type
    await produce_raw(bootstrap, TOPIC, **sent_as(audit_type + "d", "mistyped"))
    await produce_raw(bootstrap, leads_topic, **sent_as(audit_type, "wrong-topic"))
    await produce_raw(bootstrap, TOPIC, **sent_as(audit_type, "after"))
    applied: list[str] = []
    consumer = consumer_for(engine, broker_settings, applied, also_on=(lead_events.LeadCreated,), only_these_types=True)
    async with EventCollector(bootstrap, [f"{TOPIC}.dlt", f"{leads_topic}.dlt"]) as dead_letters:
        await consume_until(consumer, lambda: "after" in applied and len(dead_letters.records) >= 2)

    assert applied == ["after"]
    errors = sorted(record.headers["dlt_error"] for record in dead_letters.records)
    assert errors == [
        f"'{audit_type}d' is not an event type of {TOPIC} ({audit_type})",
        f"{audit_type} events belong on {TOPIC}, not on {leads_topic}",
    ]
