"""Outbox relay vs a plain aiokafka producer, same messages, same broker, same run.

Latency: events are written at a steady pace; for the outbox the clock runs from the business
transaction's commit to the broker's acknowledgement (the row's published_at); for the baseline
from the send call to the acknowledgement. Throughput: events written (each in its own business
transaction) as fast as 8 writers can, until the broker acknowledged the last one; and the relay
alone, draining a backlog of already committed rows.

    .venv/bin/python bench/bench_outbox.py        (BENCH_EVENTS, BENCH_RATE to change the sizes)
"""

import asyncio
import os
import sys
import time
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from crm.audit.v1 import events_pb2
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.ids import new_id
from crm_platform.kafka import ensure_topics
from crm_platform.outbox import OutboxRelay, UnitOfWork
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from crm_platform.testing.sample_service import add_note, create_schema, metadata
from crm_platform.timeutil import utcnow

EVENTS = int(os.environ.get("BENCH_EVENTS", "5000"))
LATENCY_EVENTS = int(os.environ.get("BENCH_LATENCY_EVENTS", "1000"))
RATE = float(os.environ.get("BENCH_RATE", "250"))  # events per second in the latency runs
WRITERS = 8
TOPIC = spec_of(events_pb2.AuditRecorded).topic


def message(key: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    event = events_pb2.AuditRecorded(id=new_id(), record_id=key, action="create")
    spec = spec_of(event)
    headers = CloudEventHeaders(
        id=new_id(), type=spec.type, source="/bench", time=utcnow(), subject=key, dataschema=spec.schema
    ).encode()
    return event.SerializeToString(), headers


async def baseline(kafka: KafkaSettings) -> dict[str, object]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=2)
    await producer.start()
    latencies: list[float] = []
    try:
        pending = []
        for index in range(LATENCY_EVENTS):
            value, headers = message(f"key-{index % 50}")
            sent = time.perf_counter()
            future = await producer.send(TOPIC, value=value, key=f"key-{index % 50}".encode(), headers=headers)
            future.add_done_callback(lambda _, sent=sent: latencies.append(time.perf_counter() - sent))
            pending.append(future)
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*pending)
        started = time.perf_counter()
        futures = []
        for index in range(EVENTS):
            value, headers = message(f"key-{index % 50}")
            futures.append(await producer.send(TOPIC, value=value, key=f"key-{index % 50}".encode(), headers=headers))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    rate = EVENTS / elapsed
    return {
        "path": "plain aiokafka producer",
        **summary_ms(latencies),
        "events_per_s": rate,
        "relay_drain_events_per_s": rate,
    }


async def outbox(postgres_url: str, kafka: KafkaSettings, *, in_process_wake: bool) -> dict[str, object]:
    engine = create_engine(postgres_url, pool_size=WRITERS)
    await create_schema(engine)
    uow = UnitOfWork(engine, metadata, source="/bench")
    relay = TimedRelay(engine, metadata, kafka, service="bench")
    if in_process_wake:
        uow.on_commit(relay.wake)
    relay_task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.5)  # LISTEN connection up
    committed: dict[str, datetime] = {}
    for index in range(LATENCY_EVENTS):
        async with uow.begin() as tx:
            note_id = await add_note(tx, f"key-{index % 50}")
        committed[note_id] = utcnow()
        await asyncio.sleep(1 / RATE)
    await _until_published(relay)
    latencies = publish_latencies(relay, committed)

    async def writer(worker: int) -> None:
        for index in range(worker, EVENTS, WRITERS):
            async with uow.begin() as tx:
                await add_note(tx, f"key-{index % 50}")

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    await _until_published(relay)
    elapsed = time.perf_counter() - started
    await relay.stop()
    await relay_task
    # The relay alone: a backlog committed while it was stopped, drained by a fresh relay.
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    drainer = OutboxRelay(engine, metadata, kafka, service="bench")
    drain_started = time.perf_counter()
    left = await drainer.drain(300)
    drain_elapsed = time.perf_counter() - drain_started
    assert left == 0, f"{left} rows not drained"
    await engine.dispose()
    wake = "in-process wake" if in_process_wake else "LISTEN/NOTIFY only"
    return {
        "path": f"outbox relay ({wake})",
        **summary_ms(latencies),
        "events_per_s": EVENTS / elapsed,
        "relay_drain_events_per_s": EVENTS / drain_elapsed,
    }


async def _until_published(relay: OutboxRelay) -> None:
    while await relay.backlog():
        await asyncio.sleep(0.01)


class TimedRelay(OutboxRelay):
    """The relay, noting when the broker acknowledged each note's event (the relay deletes its rows
    then, so the outbox itself no longer holds the time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acknowledged: dict[str, datetime] = {}

    async def _send(self, rows: list[Any]) -> tuple[list[Any], list[Any], str]:
        sent, failed, error = await super()._send(rows)
        acknowledged_at = utcnow()
        for row in sent:
            self.acknowledged[events_pb2.AuditRecorded.FromString(row.payload).id] = acknowledged_at
        return sent, failed, error


def publish_latencies(relay: TimedRelay, committed: dict[str, datetime]) -> list[float]:
    """Broker acknowledgement minus commit, per event."""
    return [max(0.0, (relay.acknowledged[note_id] - at).total_seconds()) for note_id, at in committed.items()]


async def main(admin_url: str) -> None:
    broker = infra.TansuBroker()
    broker.start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_partitions=6)
    await ensure_topics(kafka, [TOPIC])
    results = [await baseline(kafka)]
    for in_process_wake in (True, False):
        url = await infra.create_database(admin_url, prefix="crm_bench")
        try:
            results.append(await outbox(url, kafka, in_process_wake=in_process_wake))
        finally:
            await infra.drop_database(admin_url, url)
    broker.stop()
    base = results[0]
    for row in results:
        row["p50_ratio"] = float(row["p50_ms"]) / float(base["p50_ms"])  # type: ignore[arg-type]
        row["throughput_ratio"] = float(row["events_per_s"]) / float(base["events_per_s"])  # type: ignore[arg-type]
        row["drain_ratio"] = float(row["relay_drain_events_per_s"]) / float(base["events_per_s"])  # type: ignore[arg-type]
    print_table(
        f"Outbox publish latency (commit → broker ack, {LATENCY_EVENTS} events at {RATE:.0f}/s) and throughput "
        f"({EVENTS} events, {WRITERS} writers), PostgreSQL + tansu",
        results,
    )


if __name__ == "__main__":
    postgres = infra.postgres_admin_url()
    if postgres is None:
        sys.exit("bench_outbox needs PostgreSQL (CRM_TEST_POSTGRES_URL or 127.0.0.1:5432)")
    asyncio.run(main(postgres))
