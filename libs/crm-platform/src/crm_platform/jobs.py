"""Timers that run inside a service (recycling, SLA checks, overdue detection).

Every replica runs every job; a job claims the rows it acts on with `claim_due` (FOR UPDATE SKIP
LOCKED on PostgreSQL) inside the transaction that changes them, so no two replicas act on one record.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from opentelemetry import trace
from sqlalchemy import Select, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from crm_platform.config import InboxSettings
from crm_platform.db import delete_expired
from crm_platform.timeutil import utcnow

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def claim_due(query: Select[tuple[object, ...]]) -> Select[tuple[object, ...]]:
    """Rows another replica is working on are skipped, not waited for (SQLite ignores the clause)."""
    return query.with_for_update(skip_locked=True)


@dataclass
class PeriodicJob:
    name: str
    interval_seconds: float
    # Returns how many records it acted on; a full batch runs again at once.
    run_once: Callable[[], Awaitable[int]]
    batch_size: int = 500

    async def run(self, stopping: asyncio.Event) -> None:
        # Jitter spreads replicas started together.
        delay = random.uniform(0, min(self.interval_seconds, 5.0))
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = self.interval_seconds
            try:
                # A pass is a trace of its own: the events it writes carry its traceparent, so a
                # consumer's work on a timer's event is traced back to the pass that caused it.
                with tracer.start_as_current_span(f"job {self.name}"):
                    acted = await self.run_once()
                if acted >= self.batch_size:
                    delay = 0
                elif acted:
                    log.info("job %s acted on %d records", self.name, acted)
            except Exception:
                log.exception("job %s failed", self.name)


def expiry_job(
    engine: AsyncEngine, name: str, table: Table, stamp: str, retention: timedelta, interval: float
) -> PeriodicJob:
    """A job deleting the rows of `table` older than `retention` by their `stamp` column, a batch
    at a time (replicas may run it at once)."""
    batch = 1000

    async def expire() -> int:
        return await delete_expired(engine, table, stamp, before=utcnow() - retention, limit=batch)

    return PeriodicJob(name, interval, expire, batch_size=batch)


def inbox_expiry_job(engine: AsyncEngine, inbox: Table, settings: InboxSettings) -> PeriodicJob:
    """Forgets the events the consumers applied, once past the inbox retention."""
    retention = timedelta(hours=settings.inbox_retention_hours)
    return expiry_job(
        engine, "processed-events-expiry", inbox, "processed_at", retention, settings.inbox_expiry_interval_seconds
    )
