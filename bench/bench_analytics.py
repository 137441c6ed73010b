"""Analytics freshness: how long from an event produced to the read model showing it (SPEC §8:
within 1 s at p99 under normal load), on PostgreSQL and a local tansu broker.

The running analytics service (its real projection consumer, inbox and upserts) receives a
background load of BENCH_ANALYTICS_LOAD_RPS events per second (default 100: leads, deals and
tickets of other keys), while BENCH_ANALYTICS_SAMPLES (default 200) probe events are produced one
at a time and the read model is polled until each shows up. Baseline in the same run: the bare
broker round trip (produce → a plain consumer with the same fetch wait receives it); the analytics
figure is also given as a ratio to it.

Catch-up: BENCH_ANALYTICS_BACKLOG (default 20,000) lead events produced at once, timed from the
first send until the read model holds them all. Baseline in the same run: the same events through
a plain consumer that COPYs each fetch into a table (no group, inbox, upsert or version check).

    .venv/bin/python bench/bench_analytics.py
    BENCH_ANALYTICS_LOAD_RPS=500 BENCH_ANALYTICS_SAMPLES=1000 .venv/bin/python bench/bench_analytics.py
"""

import asyncio
import contextlib
import os
import sys
import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from analytics.__main__ import MIGRATIONS, build
from analytics.config import AnalyticsSettings
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform import migrations
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.ids import new_id
from crm_platform.kafka import ensure_topics
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf.message import Message

SAMPLES = int(os.environ.get("BENCH_ANALYTICS_SAMPLES", "200"))
LOAD_RPS = int(os.environ.get("BENCH_ANALYTICS_LOAD_RPS", "100"))
FETCH_WAIT_MS = int(os.environ.get("BENCH_ANALYTICS_FETCH_WAIT_MS", "20"))
BACKLOG = int(os.environ.get("BENCH_ANALYTICS_BACKLOG", "20000"))
BACKLOG_TOPIC = "bench.analytics.backlog"
POLL_SECONDS = 0.002
BASELINE_TOPIC = "bench.analytics.baseline"


def _record(message: Message, key: str) -> dict[str, Any]:
    spec = spec_of(message)
    headers = CloudEventHeaders(
        id=new_id(), type=spec.type, source="/bench", time=utcnow(), subject=key, dataschema=spec.schema
    ).encode()
    return {"topic": spec.topic, "value": message.SerializeToString(), "key": key.encode(), "headers": headers}


def _lead(lead_id: str) -> Message:
    lead = leads_pb2.Lead(
        id=lead_id,
        name="Bench",
        source="webform",
        owner_id="rep-1",
        team="bench",
        version=1,
        created_at=to_timestamp(utcnow()),
    )
    return leads_events.LeadCreated(lead=lead)


def _ticket(ticket_id: str) -> Message:
    ticket = servicedesk_pb2.Ticket(
        id=ticket_id, priority="normal", status="new", team="bench", version=1, created_at=to_timestamp(utcnow())
    )
    return service_events.TicketCreated(ticket=ticket)


async def background_load(producer: AIOKafkaProducer, stop: asyncio.Event) -> int:
    """LOAD_RPS events per second on other keys, until stopped; returns how many were sent."""
    sent = 0
    started = time.perf_counter()
    while not stop.is_set():
        due = int((time.perf_counter() - started) * LOAD_RPS)
        for _ in range(due - sent):
            message = _lead(new_id()) if sent % 2 else _ticket(new_id())
            await producer.send(**_record(message, new_id()))
            sent += 1
        await asyncio.sleep(0.01)
    return sent


async def baseline(bootstrap: str, producer: AIOKafkaProducer) -> list[float]:
    """Produce → receive on a plain assigned consumer (no group, no database)."""
    await ensure_topics(KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=1), [BASELINE_TOPIC])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=FETCH_WAIT_MS)
    await consumer.start()
    try:
        partition = TopicPartition(BASELINE_TOPIC, 0)
        consumer.assign([partition])
        await consumer.seek_to_end(partition)
        samples = []
        for index in range(SAMPLES):
            payload = f"probe-{index}".encode()
            started = time.perf_counter()
            await producer.send_and_wait(BASELINE_TOPIC, value=payload, key=b"probe")
            while True:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                if any(record.value == payload for record in batch.get(partition, [])):
                    break
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await consumer.stop()


async def projection(url: str, producer: AIOKafkaProducer) -> list[float]:
    """Produce a LeadCreated → the row is visible in rm_leads."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        samples = []
        for _ in range(SAMPLES):
            lead_id = new_id()
            started = time.perf_counter()
            await producer.send_and_wait(**_record(_lead(lead_id), lead_id))
            while not await connection.fetchval("SELECT 1 FROM rm_leads WHERE id = $1", lead_id):
                await asyncio.sleep(POLL_SECONDS)
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await connection.close()


async def produce_backlog(producer: AIOKafkaProducer, topic: str | None = None) -> None:
    """BACKLOG new leads, sent as fast as the producer takes them."""
    for _ in range(BACKLOG):
        lead_id = new_id()
        record = _record(_lead(lead_id), lead_id)
        await producer.send(**{**record, "topic": topic or record["topic"]})
    await producer.flush()


async def backlog_baseline(url: str, kafka: KafkaSettings, producer: AIOKafkaProducer) -> float:
    """Seconds for a plain consumer to COPY the backlog into a table, from the first send."""
    await ensure_topics(kafka, [BACKLOG_TOPIC])
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=FETCH_WAIT_MS
    )
    await consumer.start()
    try:
        await connection.execute("CREATE TABLE bench_backlog (id text PRIMARY KEY, source text, version bigint)")
        partitions = [TopicPartition(BACKLOG_TOPIC, p) for p in consumer.partitions_for_topic(BACKLOG_TOPIC) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        started = time.perf_counter()
        sending = asyncio.create_task(produce_backlog(producer, BACKLOG_TOPIC))
        received = 0
        while received < BACKLOG:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            rows = []
            for records in batches.values():
                for record in records:
                    lead = leads_events.LeadCreated.FromString(record.value).lead
                    rows.append((lead.id, lead.source, lead.version))
            if rows:
                await connection.copy_records_to_table("bench_backlog", records=rows)
            received += len(rows)
        elapsed = time.perf_counter() - started
        await sending
        return elapsed
    finally:
        await consumer.stop()
        await connection.close()


async def backlog_projection(url: str, producer: AIOKafkaProducer) -> float:
    """Seconds for the analytics service to show the backlog in its read model, from the first send."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        before = await connection.fetchval("SELECT count(*) FROM rm_leads")
        started = time.perf_counter()
        sending = asyncio.create_task(produce_backlog(producer))
        while await connection.fetchval("SELECT count(*) FROM rm_leads") < before + BACKLOG:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        await sending
        return elapsed
    finally:
        await connection.close()


async def main(admin_url: str) -> int:
    url = await infra.create_database(admin_url, prefix="crm_bench_analytics")
    broker = infra.TansuBroker()
    broker.start()
    app = None
    try:
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, url)
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        settings = AnalyticsSettings(
            database_url=url, grpc_port=0, kafka=kafka, projection_fetch_max_wait_ms=FETCH_WAIT_MS
        )
        app = build(settings, create_engine(url))
        await app.start()
        await asyncio.wait_for(app.consumers[0].ready.wait(), 60)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks="all")
        await producer.start()
        stop = asyncio.Event()
        load = asyncio.create_task(background_load(producer, stop))
        try:
            try:
                await asyncio.sleep(1.0)  # the load is flowing before the first probe
                bare = await baseline(broker.bootstrap, producer)
                applied = await projection(url, producer)
            finally:
                stop.set()
                sent = await load
            bare_seconds = await backlog_baseline(url, kafka, producer)
            projected_seconds = await backlog_projection(url, producer)
        finally:
            await producer.stop()
        bare_ms, applied_ms = summary_ms(bare), summary_ms(applied)
        rows: list[dict[str, object]] = [
            {"path": "broker round trip (baseline)", **bare_ms, "p99 ratio": 1.0},
            {
                "path": "event → analytics read model",
                **applied_ms,
                "p99 ratio": applied_ms["p99_ms"] / bare_ms["p99_ms"],
            },
        ]
        print_table(
            f"Freshness: {SAMPLES} probes, background load {LOAD_RPS} events/s ({sent} sent), "
            f"fetch wait {FETCH_WAIT_MS} ms",
            rows,
        )
        print_table(
            f"Catch-up: {BACKLOG:,} lead events produced at once, until all are stored",
            [
                {
                    "path": "plain consumer + COPY (baseline)",
                    "seconds": bare_seconds,
                    "events/s": BACKLOG / bare_seconds,
                    "ratio": 1.0,
                },
                {
                    "path": "analytics projection",
                    "seconds": projected_seconds,
                    "events/s": BACKLOG / projected_seconds,
                    "ratio": bare_seconds / projected_seconds,
                },
            ],
        )
        if applied_ms["p99_ms"] > 1000:
            print(f"ERROR: p99 {applied_ms['p99_ms']:.0f} ms exceeds the 1 s target", file=sys.stderr)
            return 1
        return 0
    finally:
        if app is not None:
            with contextlib.suppress(Exception):
                await app.stop()
        broker.stop()
        await infra.drop_database(admin_url, url)


if __name__ == "__main__":
    admin = infra.postgres_admin_url()
    if admin is None:
        print("PostgreSQL is required (CRM_TEST_POSTGRES_URL or 127.0.0.1:5432)", file=sys.stderr)
        sys.exit(1)
    sys.exit(asyncio.run(main(admin)))
