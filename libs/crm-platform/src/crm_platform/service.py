"""A service process: gRPC server + outbox relay + consumers + jobs, with graceful shutdown.

Every service's `__main__.py` builds a `ServiceApp` and hands it to `run_cli`, which offers
`serve` (the default) and `migrate` (what the Kubernetes migration Job runs).
"""

import argparse
import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import uvloop
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from crm_platform import idempotency, migrations
from crm_platform.config import ServiceSettings
from crm_platform.consumer import EventConsumer, consumed_topics
from crm_platform.db import create_engine, probe_engine
from crm_platform.grpc_server import GrpcServer
from crm_platform.jobs import PeriodicJob, expiry_job, inbox_expiry_job
from crm_platform.kafka import ensure_topics_or_wait
from crm_platform.logging import configure_logging
from crm_platform.metrics import serve_metrics
from crm_platform.outbox import OutboxRelay, UnitOfWork
from crm_platform.telemetry import configure_telemetry, instrument_engine, shutdown_telemetry

log = logging.getLogger(__name__)


class BackgroundTaskEnded(RuntimeError):
    """A relay, consumer or job ended while its service was serving (`ServiceApp.serve`)."""


@dataclass
class ServiceApp:
    settings: ServiceSettings
    engine: AsyncEngine
    metadata: MetaData
    uow: UnitOfWork
    # Full gRPC service names, e.g. "crm.leads.v1.LeadsService" (health and reflection).
    service_names: list[str]
    register: Callable[[grpc.aio.Server], None]
    # Topics this service publishes to (created on local brokers).
    topics: list[str] = field(default_factory=list)
    consumers: list[EventConsumer] = field(default_factory=list)
    jobs: list[PeriodicJob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._probe = probe_engine(self.engine)
        self.relay = OutboxRelay(
            self.engine,
            self.metadata,
            self.settings.kafka,
            service=self.settings.service_name,
            batch_size=self.settings.outbox_batch_size,
            poll_seconds=self.settings.outbox_poll_seconds,
            linger_seconds=self.settings.outbox_linger_seconds,
        )
        self.uow.on_commit(self.relay.wake)
        keys = self.metadata.tables.get(idempotency.TABLE_NAME)
        if keys is not None:
            retention = timedelta(hours=self.settings.idempotency_retention_hours)
            interval = self.settings.idempotency_expiry_interval_seconds
            self.jobs = [
                *self.jobs,
                expiry_job(self.engine, "idempotency-key-expiry", keys, "created_at", retention, interval),
            ]
        if self.consumers:  # they share one inbox table
            self.jobs = [*self.jobs, inbox_expiry_job(self.engine, self.consumers[0].inbox, self.settings)]
        self.server = GrpcServer(
            service=self.settings.service_name,
            service_names=self.service_names,
            register=self.register,
            default_deadline_seconds=self.settings.default_deadline_seconds,
            max_connection_age_seconds=self.settings.max_connection_age_seconds,
            readiness=self._database_answers,
            call_secret=self.settings.internal_calls.secret,
        )
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    async def start(self) -> int:
        """Starts everything and returns the bound gRPC port."""
        await self._create_topics()
        self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        for consumer in self.consumers:
            self._tasks.append(asyncio.create_task(consumer.run(), name=f"consumer-{consumer.name}"))
        for job in self.jobs:
            self._tasks.append(asyncio.create_task(job.run(self._stopping), name=f"job-{job.name}"))
        self.port = await self.server.start(self.settings.grpc_host, self.settings.grpc_port)
        log.info("%s serving gRPC on %s:%d", self.settings.service_name, self.settings.grpc_host, self.port)
        return self.port

    async def _database_answers(self) -> None:
        """Readiness: every call needs the database, so a service whose database does not answer
        (down, unreachable, refusing connections) takes no calls until it does. On a connection of
        its own, not one of the requests' pool (`probe_engine`). Plumbing, not a request: no trace
        every few seconds."""
        with suppress_instrumentation():
            async with self._probe.connect() as conn:
                await conn.execute(text("SELECT 1"))

    async def stop(self) -> None:
        """SIGTERM path: NOT_SERVING, drain in-flight RPCs, stop consumers and jobs, flush the outbox."""
        await self.server.stop(self.settings.shutdown_grace_seconds)
        self._stopping.set()
        for consumer in self.consumers:
            await consumer.stop()
        await self.relay.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = await self.relay.drain(self.settings.shutdown_grace_seconds)
        if left:
            log.warning("%d outbox rows left for the next start to publish", left)
        await self._probe.dispose()
        await self.engine.dispose()

    async def serve(self) -> None:
        """Runs until SIGTERM or SIGINT. The relay, consumers and jobs retry what fails inside them:
        one that ends anyway stops the process with an error, so that it is restarted rather than
        left serving without it (a consumer gone, its read models frozen, and nothing to tell)."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await self.start()
        requested = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait({requested, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
        requested.cancel()
        ended = [task for task in self._tasks if task in done]
        for task in ended:
            error = task.exception() if not task.cancelled() else None
            log.error("%s: %s ended on its own (%r); stopping", self.settings.service_name, task.get_name(), error)
        log.info("%s shutting down", self.settings.service_name)
        await self.stop()
        if ended:
            raise BackgroundTaskEnded(", ".join(task.get_name() for task in ended))

    async def _create_topics(self) -> None:
        await ensure_topics_or_wait(self.settings.kafka, [*self.topics, *consumed_topics(self.consumers)])


# The cyclic collector runs after this many container allocations net of frees (CPython's default is
# 700). A request allocates thousands, so at the default a busy service collects several times per
# request, and the older generations (everything a service holds) far more often than they change.
GC_ALLOCATIONS_PER_COLLECTION = 20_000


def freeze_startup_objects() -> None:
    """Moves what start-up made (modules, classes, settings) out of the collector's reach: the
    full collections of a busy service otherwise scan them again and again for nothing. Then
    collects less often (`GC_ALLOCATIONS_PER_COLLECTION`): request data is mostly freed by
    reference counting, not by the collector."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_ALLOCATIONS_PER_COLLECTION, older, oldest)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs a service's main coroutine on uvloop, the loop uvicorn gives the gateway: the loop's
    own work under every RPC costs less than on asyncio's default loop."""
    freeze_startup_objects()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run_cli(
    *,
    settings: ServiceSettings,
    build: Callable[[ServiceSettings, AsyncEngine], ServiceApp],
    migrations_dir: Path,
) -> None:
    """`crm-<service> [serve|migrate]`."""
    parser = argparse.ArgumentParser(prog=f"crm-{settings.service_name}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args()
    configure_logging(settings.service_name, settings.log_level)
    url = settings.resolved_database_url()
    if args.command == "migrate" or settings.migrate_on_start:
        migrations.upgrade(migrations_dir, url)
        log.info("%s database migrated", settings.service_name)
        if args.command == "migrate":
            return
    configure_telemetry(settings.service_name)
    serve_metrics(settings.metrics_port)

    async def serve() -> None:
        engine = create_engine(url, pool_size=settings.database_pool_size, max_overflow=settings.database_max_overflow)
        instrument_engine(engine)
        await build(settings, engine).serve()

    try:
        run_event_loop(serve())
    finally:
        shutdown_telemetry()
