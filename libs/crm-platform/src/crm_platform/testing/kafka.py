"""Observing and producing events in tests: read a topic from its start without a consumer group
(no group join delay) and wait until what a test expects has arrived."""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.message import Message

from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.consumer import EventConsumer
from crm_platform.ids import new_id
from crm_platform.timeutil import utcnow

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class ObservedRecord:
    topic: str
    partition: int
    offset: int
    key: str
    value: bytes
    headers: dict[str, str]
    # As sent, in order, repeats included (`headers` keeps the last value of each name).
    raw_headers: tuple[tuple[str, str], ...] = ()

    @property
    def event_type(self) -> str:
        return self.headers.get("ce_type", "")

    def decode(self, message_type: type[M]) -> M:
        return message_type.FromString(self.value)


class EventCollector:
    """Collects every record of some topics, from the beginning, in the background."""

    def __init__(self, bootstrap_servers: str, topics: list[str]) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topics = topics
        self.records: list[ObservedRecord] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Condition()

    async def __aenter__(self) -> "EventCollector":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await consumer.start()
        partitions: list[TopicPartition] = []
        for topic in self.topics:
            found = await _partitions_of(consumer, topic)
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._consumer = consumer
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            if not batches:
                continue
            async with self._arrived:
                for records in batches.values():
                    for record in records:
                        self.records.append(
                            ObservedRecord(
                                topic=record.topic,
                                partition=record.partition,
                                offset=record.offset,
                                key=_text(record.key),
                                value=record.value or b"",
                                headers={name: _text(value) for name, value in record.headers},
                                raw_headers=tuple((name, _text(value)) for name, value in record.headers),
                            )
                        )
                self._arrived.notify_all()

    async def wait_for(
        self, predicate: Callable[[list[ObservedRecord]], bool], timeout: float = 30.0
    ) -> list[ObservedRecord]:
        """Waits until `predicate(all records so far)` holds; returns the records."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: predicate(self.records))
        return list(self.records)

    def of_type(self, event_type: str) -> list[ObservedRecord]:
        return [record for record in self.records if record.event_type == event_type]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def _partitions_of(consumer: AIOKafkaConsumer, topic: str, timeout: float = 15.0) -> set[int]:
    async with asyncio.timeout(timeout):
        while True:
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                return set(partitions)
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)


async def produce_event(
    bootstrap_servers: str,
    message: Message,
    *,
    key: str,
    source: str = "/tests",
    event_id: str | None = None,
    extra_headers: list[tuple[str, bytes]] | None = None,
) -> str:
    """Publishes one event exactly as a CRM service would (CloudEvents headers); returns its id."""
    [sent] = await produce_events(
        bootstrap_servers,
        [message],
        key=key,
        source=source,
        event_ids=[event_id or new_id()],
        extra_headers=extra_headers,
    )
    return sent


async def produce_events(
    bootstrap_servers: str,
    messages: Sequence[Message],
    *,
    key: str,
    source: str = "/tests",
    event_ids: list[str] | None = None,
    extra_headers: list[tuple[str, bytes]] | None = None,
) -> list[str]:
    """Publishes events of one key, in order, with one producer (a backlog); returns their ids."""
    event_ids = event_ids or [new_id() for _ in messages]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for message, event_id in zip(messages, event_ids, strict=True):
            spec = spec_of(message)
            headers = CloudEventHeaders(
                id=event_id, type=spec.type, source=source, time=utcnow(), subject=key, dataschema=spec.schema
            ).encode()
            await producer.send(
                spec.topic, value=message.SerializeToString(), key=key.encode(), headers=headers + (extra_headers or [])
            )
        await producer.flush()
    finally:
        await producer.stop()
    return event_ids


async def produce_raw(bootstrap_servers: str, topic: str, *, key: str | bytes, value: bytes, headers: Any = ()) -> None:
    """Publishes bytes as they are (a key given as bytes too): for poison-message tests."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        raw_key = key if isinstance(key, bytes) else key.encode()
        await producer.send_and_wait(topic, value=value, key=raw_key, headers=list(headers))
    finally:
        await producer.stop()


async def consume_until(consumer: EventConsumer, done: Callable[[], bool], timeout: float = 60) -> None:
    """Runs the consumer until `done()` holds, then stops it."""
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await task


def _text(raw: bytes | None) -> str:
    """Keys and header values as text; what is not UTF-8 (a poison record's) shows as its repr."""
    try:
        return (raw or b"").decode()
    except UnicodeDecodeError:
        return repr(raw)
