"""Idempotent Kafka consumers: an event is applied in a DB transaction that also records its id in
the inbox, and the offset is committed only after that transaction. Redeliveries are no-ops;
poison messages go to `<topic>.dlt` with the error, and the partition keeps moving.

The records of a partition that one fetch returns are applied together, in one transaction (a
backlog costs a commit per fetch, not per event). When one of them fails, the ones before it are
applied together again and it is applied alone, with its retries and its dead letter."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from google.protobuf.message import DecodeError, Message
from opentelemetry import propagate, trace
from sqlalchemy import Insert, MetaData, String, Table, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from crm_platform import metrics
from crm_platform.cloudevents import (
    DLT_ERROR,
    DLT_ERROR_TYPE,
    DLT_ORIGINAL_OFFSET,
    DLT_ORIGINAL_PARTITION,
    DLT_ORIGINAL_TOPIC,
    CloudEventHeaders,
    MalformedEvent,
    spec_of,
)
from crm_platform.config import KafkaSettings
from crm_platform.db import database_unavailable, driver_statement
from crm_platform.errors import CrmError, Unavailable
from crm_platform.kafka import client_options, create_producer, stop_quietly
from crm_platform.outbox import Transaction, UnitOfWork, backoff_seconds
from crm_platform.timeutil import utcnow

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

M = TypeVar("M", bound=Message)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ReceivedEvent(Generic[M]):
    headers: CloudEventHeaders
    message: M
    key: str
    topic: str
    partition: int
    offset: int


Handler = Callable[[Transaction, ReceivedEvent[Any]], Awaitable[None]]


class PoisonMessage(Exception):
    """A message that can never be applied; it goes straight to the dead-letter topic."""


class _BatchFailed(Exception):
    """Event `index` of a batch failed, and the batch's transaction rolled back."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index


def _record_processed(inbox: Table) -> Insert:
    """Records any number of events as processed (an array of ids), returning the ids not seen yet."""
    event_ids = func.unnest(bindparam("event_ids", type_=postgresql.ARRAY(String)))
    rows = select(bindparam("consumer", type_=String), event_ids, bindparam("now", type_=inbox.c.processed_at.type))
    statement = postgresql.insert(inbox).from_select(["consumer", "event_id", "processed_at"], rows)
    return statement.on_conflict_do_nothing(index_elements=["consumer", "event_id"]).returning(inbox.c.event_id)


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlt"


def consumed_topics(consumers: "Iterable[EventConsumer]") -> list[str]:
    """The topics the consumers read, and their dead-letter topics (to create at start-up)."""
    return [topic for c in consumers for read in c.topics for topic in (read, dead_letter_topic(read))]


def _source_of(record: ConsumerRecord[Any, Any]) -> bytes | None:
    """The record's `ce_source` header, undecoded."""
    return next((value for name, value in record.headers or () if name == "ce_source"), None)


def is_infrastructure_failure(error: BaseException) -> bool:
    """The database, the network or a called service is down: worth waiting for, not a bad event."""
    # ConnectionError, not OSError: a handler's FileNotFoundError is a bug, not an outage.
    infrastructure = (Unavailable, OperationalError, InterfaceError, PoolTimeout, ConnectionError, TimeoutError)
    if isinstance(error, infrastructure) or database_unavailable(error):  # the latter raised as it is at connect
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


# What a patient consumer's fetch waits to fill: aiokafka's default maximum per partition.
_PATIENT_FETCH_BYTES = 1024 * 1024


class EventConsumer:
    """Consumes the topics of the given event messages in one consumer group."""

    def __init__(
        self,
        *,
        name: str,
        uow: UnitOfWork,
        metadata: MetaData,
        kafka: KafkaSettings,
        handlers: Mapping[type[Message], Handler],
        service: str,
        max_attempts: int = 5,
        retry_base_seconds: float = 0.2,
        only_these_types: bool = False,
        ignored_sources: Collection[str] = (),
        patient_fetch_ms: int = 0,
    ) -> None:
        """`only_these_types`: its topics carry no other event type (the inbound topics an outside
        system writes by our contract), so any other is a poison message, not another consumer's
        event to pass over (a CRM topic's new type during a rolling upgrade).
        `ignored_sources`: events from these sources (`ce_source`) are passed over, as those of a
        type it does not need are (its own process's events on a topic it also reads).
        `patient_fetch_ms`: a consumer that need not be prompt asks the broker to hold each fetch
        this long (or until a full one is ready), so a busy topic is read in a few large fetches
        instead of many small ones (0: `KafkaSettings.fetch_max_wait_ms`, answered with any data)."""
        self.name = name
        self.patient_fetch_ms = patient_fetch_ms
        self.only_these_types = only_these_types
        # As the header's bytes: a record is passed over before its headers are decoded (a gateway
        # passes over its own audit record of every request).
        self._ignored_sources = frozenset(source.encode() for source in ignored_sources)
        self.uow = uow
        self.inbox = metadata.tables["processed_events"]
        self.kafka = kafka
        self.service = service
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.handlers: dict[str, tuple[type[Message], Handler]] = {
            spec_of(message_type).type: (message_type, handler) for message_type, handler in handlers.items()
        }
        self.topics = sorted({spec_of(message_type).topic for message_type in handlers})
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._dlt_producer: Any = None
        self._processed: dict[TopicPartition, int] = {}  # applied, not yet committed
        self._next_offsets: dict[TopicPartition, int] = {}  # per owned partition: the next record to apply
        # Held while a fetched batch is applied and committed: a rebalance waits for it, so no
        # partition is handed over while its records are still being applied here.
        self._batch_lock = asyncio.Lock()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._before_consuming()
                await self._consume()
            except Exception:
                log.exception("consumer %s failed; restarting", self.name)
                await self._close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 2.0)
        await self._close()

    async def stop(self) -> None:
        self._stopping.set()

    async def _before_consuming(self) -> None:
        """What a consumer of its own kind reads before it joins its group, at each (re)start: a
        failure (the database not there yet) is retried as a failed consumption is."""

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            group_id=self.name,
            client_id=f"{self.service}-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.patient_fetch_ms or self.kafka.fetch_max_wait_ms,
            fetch_min_bytes=_PATIENT_FETCH_BYTES if self.patient_fetch_ms else 1,
            **client_options(self.kafka),
        )
        self._consumer = consumer
        started = await self._unless_stopped(asyncio.wait_for(consumer.start(), self.kafka.send_timeout_seconds))
        if started is None:
            return
        started.result()
        consumer.subscribe(self.topics, listener=_CommitOnRevoke(self))
        while not self._stopping.is_set():
            fetch = await self._unless_stopped(consumer.getmany(timeout_ms=500, max_records=500))
            if fetch is None:
                return
            batches = fetch.result()
            if consumer.assignment():
                self.ready.set()
            # Partitions are independent (order is per key, and a key lives in one partition):
            # apply them concurrently, each in order, then commit what was applied.
            async with self._batch_lock:
                await asyncio.gather(
                    *(self._apply_partition(consumer, partition, records) for partition, records in batches.items())
                )
                await self._commit()
            self._report_lag(consumer)

    async def _unless_stopped(self, work: Awaitable[R]) -> "asyncio.Future[R] | None":
        """`work`, finished, or None when a stop came first and cancelled it: a stop (SIGTERM)
        must not wait out a group join (seconds, and during a rebalance as long as the slowest
        member takes) or a broker that does not answer. Records a cancelled fetch had taken are
        not committed, so the next owner of their partitions gets them."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopping.cancel()
        if task.done():
            return task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _apply_partition(
        self, consumer: AIOKafkaConsumer, partition: TopicPartition, records: list[ConsumerRecord[Any, Any]]
    ) -> None:
        start = 0
        while start < len(records) and not self._stopping.is_set():
            start += await self._apply_together(records[start:])
            if start < len(records):  # it failed in a batch, or cannot be read: alone, with its retries
                await self._handle(records[start])
                start += 1
            self._processed[partition] = records[start - 1].offset + 1
            self._next_offsets[partition] = records[start - 1].offset + 1

    async def _apply_together(self, records: list[ConsumerRecord[Any, Any]]) -> int:
        """Applies the records from the first on, up to the first that cannot be read, in one
        transaction; returns how many it committed (0: the first is left to `_handle`). When one
        fails, the transaction rolls back and the records before it are applied together again."""
        if len(records) < 2:  # a lone record gains nothing from a batch (the usual fetch when idle)
            return 0
        events: list[ReceivedEvent[Any] | None] = []  # None: a type this consumer does not need
        for record in records:
            try:
                events.append(self._decode(record))
            except Exception:  # noqa: BLE001 - `_handle` dead-letters it
                break
        if len(events) < 2:
            return 0
        if all(event is None for event in events):  # nothing this consumer needs: no transaction
            applied = [False] * len(events)
        else:
            try:
                applied = await self._apply_batch(events)
            except _BatchFailed as failed:
                log.info(
                    "consumer %s: event %d of a batch of %d failed: %s", self.name, failed.index, len(events), failed
                )
                return await self._apply_together(records[: failed.index]) if failed.index > 1 else 0
        for record, event, fresh in zip(records, events, applied, strict=False):
            outcome = "ignored" if event is None else "applied" if fresh else "duplicate"
            metrics.CONSUMER_PROCESSED.labels(self.service, record.topic, outcome).inc()
        return len(events)

    async def _apply_batch(self, events: list[ReceivedEvent[Any] | None]) -> list[bool]:
        """The events, in order, in one transaction: whether each was applied (not a duplicate)."""
        applied = [False] * len(events)
        index = 0
        try:
            async with self.uow.begin() as tx:
                fresh = await self._record_in_inbox(tx, [e.headers.id for e in events if e is not None])
                for index, event in enumerate(events):
                    if event is None or event.headers.id not in fresh:
                        continue
                    fresh.discard(event.headers.id)  # the same event twice in one batch: applied once
                    _, handler = self.handlers[event.headers.type]
                    with self._span(event):
                        await handler(tx, event)
                    applied[index] = True
        except Exception as error:
            raise _BatchFailed(index, error) from error
        return applied

    def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Lag of every partition this replica owns, after each fetch: an idle partition reports
        0 rather than its last busy value."""
        for partition in consumer.assignment():
            highwater, next_offset = consumer.highwater(partition), self._next_offsets.get(partition)
            if highwater is not None and next_offset is not None:
                metrics.CONSUMER_LAG.labels(self.service, partition.topic, str(partition.partition)).set(
                    max(0, highwater - next_offset)
                )

    def _forget_partitions(self, partitions: list[TopicPartition]) -> None:
        """Partitions moved to another replica: it reports their lag from now on, not this one."""
        for partition in partitions:
            self._next_offsets.pop(partition, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.service, partition.topic, str(partition.partition))

    async def _commit(self) -> None:
        if self._consumer is None or not self._processed:
            return
        # Only partitions still ours: another owner re-reads the rest, and the inbox skips them.
        assigned = self._consumer.assignment()
        offsets = {partition: offset for partition, offset in self._processed.items() if partition in assigned}
        self._processed = {}
        if offsets:
            await asyncio.wait_for(self._consumer.commit(offsets), self.kafka.send_timeout_seconds)

    async def _handle(self, record: ConsumerRecord[Any, Any]) -> None:
        try:
            event = self._decode(record)
        except Exception as error:  # noqa: BLE001 - reading a record is pure: what fails once fails always
            await self._dead_letter(record, error if isinstance(error, PoisonMessage) else PoisonMessage(repr(error)))
            return
        if event is None:
            metrics.CONSUMER_PROCESSED.labels(self.service, record.topic, "ignored").inc()
            return
        _, handler = self.handlers[event.headers.type]
        attempt = 0  # failures of the event's own, not the waits for a dependency
        waits = 0
        while True:
            try:
                with self._span(event):
                    applied = await self._apply(handler, event)
                metrics.CONSUMER_PROCESSED.labels(
                    self.service, record.topic, "applied" if applied else "duplicate"
                ).inc()
                return
            except Exception as error:
                if is_infrastructure_failure(error):
                    # The event is fine, a dependency is not: never dead-letter it. The partition
                    # waits (its order matters); a stop leaves the offset uncommitted for a redelivery.
                    if self._stopping.is_set():
                        raise
                    log.warning("consumer %s: %s waits for a dependency: %s", self.name, event.headers.id, error)
                    waits += 1
                    await asyncio.sleep(backoff_seconds(min(waits, 8), base=self.retry_base_seconds, cap=30.0))
                    continue
                attempt += 1
                if isinstance(error, CrmError) or attempt >= self.max_attempts:
                    # A business rule said no (retrying cannot change the answer), or a bug.
                    await self._dead_letter(record, error)
                    return
                log.warning("consumer %s: attempt %d for %s failed: %s", self.name, attempt, event.headers.id, error)
                await asyncio.sleep(backoff_seconds(attempt, base=self.retry_base_seconds, cap=5.0))

    def _decode(self, record: ConsumerRecord[Any, Any]) -> ReceivedEvent[Any] | None:
        if self._ignored_sources and _source_of(record) in self._ignored_sources:
            return None
        try:
            headers = CloudEventHeaders.decode(record.headers)
        except MalformedEvent as error:
            raise PoisonMessage(str(error)) from None
        entry = self.handlers.get(headers.type)
        if entry is None:
            if self.only_these_types:
                topic_types = [name for name, (kind, _) in self.handlers.items() if spec_of(kind).topic == record.topic]
                known = ", ".join(sorted(topic_types))
                raise PoisonMessage(f"{headers.type!r} is not an event type of {record.topic} ({known})")
            return None  # another event type on the same topic that this consumer does not need
        message_type, _ = entry
        topic = spec_of(message_type).topic
        if record.topic != topic:  # each type has its topic: one elsewhere was sent to the wrong one
            raise PoisonMessage(f"{headers.type} events belong on {topic}, not on {record.topic}")
        try:
            message = message_type.FromString(record.value or b"")
        except DecodeError as error:
            raise PoisonMessage(
                f"cannot decode {headers.type} as {message_type.DESCRIPTOR.full_name}: {error}"
            ) from None
        try:
            key = record.key.decode() if isinstance(record.key, bytes) else str(record.key or "")
        except UnicodeDecodeError:
            raise PoisonMessage(f"the key {record.key!r} is not UTF-8 text") from None
        return ReceivedEvent(
            headers=headers,
            message=message,
            key=key,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )

    @contextlib.contextmanager
    def _span(self, event: ReceivedEvent[Any]) -> Iterator[None]:
        """The event's consumer span, in the trace of the request that published it."""
        context = propagate.extract({"traceparent": event.headers.traceparent, "tracestate": event.headers.tracestate})
        with tracer.start_as_current_span(
            f"consume {event.topic}", context=context, kind=trace.SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.message.id", event.headers.id)
            span.set_attribute("cloudevents.event_type", event.headers.type)
            yield

    async def _apply(self, handler: Handler, event: ReceivedEvent[Any]) -> bool:
        async with self.uow.begin() as tx:
            if not await self._record_in_inbox(tx, [event.headers.id]):
                return False
            await handler(tx, event)
        return True

    async def _record_in_inbox(self, tx: Transaction, event_ids: list[str]) -> set[str]:
        """Records the events as processed by this consumer; returns those it had not processed yet."""
        if not event_ids:
            return set()
        now = utcnow()
        if tx.conn.dialect.name == "postgresql":
            params = {"consumer": self.name, "event_ids": event_ids, "now": now}
            recorded = driver_statement((self.inbox, "record processed"), lambda: _record_processed(self.inbox))
            return {row[0] for row in await recorded.fetch(tx.conn, params)}
        rows = [{"consumer": self.name, "event_id": event_id, "processed_at": now} for event_id in event_ids]
        statement = (
            sqlite.insert(self.inbox)
            .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            .returning(self.inbox.c.event_id)
        )
        return set((await tx.conn.execute(statement, rows)).scalars().all())

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], error: BaseException) -> None:
        headers = [
            *(record.headers or ()),
            (DLT_ERROR, str(error)[:4000].encode()),
            (DLT_ERROR_TYPE, type(error).__name__.encode()),
            (DLT_ORIGINAL_TOPIC, record.topic.encode()),
            (DLT_ORIGINAL_PARTITION, str(record.partition).encode()),
            (DLT_ORIGINAL_OFFSET, str(record.offset).encode()),
        ]
        # Until the dead letter is stored, the offset must not move past the message.
        while True:
            try:
                producer = await self._ensure_dlt_producer()
                await asyncio.wait_for(
                    producer.send_and_wait(
                        dead_letter_topic(record.topic), value=record.value, key=record.key, headers=headers
                    ),
                    self.kafka.send_timeout_seconds,
                )
                break
            except Exception:
                log.exception("consumer %s: could not dead-letter offset %d", self.name, record.offset)
                await self._reset_dlt_producer()
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(1.0)
        metrics.DEAD_LETTERS.labels(self.service, record.topic).inc()
        log.error(
            "consumer %s: dead-lettered %s[%d]@%d: %s", self.name, record.topic, record.partition, record.offset, error
        )

    async def _ensure_dlt_producer(self) -> Any:
        if self._dlt_producer is None:
            producer = create_producer(self.kafka, client_id=f"{self.service}-{self.name}-dlt")
            await asyncio.wait_for(producer.start(), self.kafka.send_timeout_seconds)
            self._dlt_producer = producer
        return self._dlt_producer

    async def _reset_dlt_producer(self) -> None:
        producer, self._dlt_producer = self._dlt_producer, None
        if producer is not None:
            await stop_quietly(producer)

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await self._commit_with(consumer)
            finally:
                await stop_quietly(consumer)
        self._forget_partitions(list(self._next_offsets))  # a restart or a stop: none is ours now
        await self._reset_dlt_producer()

    async def _commit_with(self, consumer: AIOKafkaConsumer) -> None:
        if self._processed:
            offsets, self._processed = dict(self._processed), {}
            try:
                await asyncio.wait_for(consumer.commit(offsets), self.kafka.send_timeout_seconds)
            except Exception:
                log.warning("consumer %s: final commit failed", self.name, exc_info=True)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what was applied before partitions move to another replica."""

    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Called from aiokafka's coordinator task, possibly mid-batch: let the batch finish first.
        async with self.owner._batch_lock:
            try:
                await self.owner._commit()
            except Exception:
                log.warning("consumer %s: commit on revoke failed", self.owner.name, exc_info=True)
            self.owner._forget_partitions(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("consumer %s: assigned %s", self.owner.name, sorted(str(tp) for tp in assigned))
