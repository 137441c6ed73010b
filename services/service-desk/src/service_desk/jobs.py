"""Timers of the service desk: SLA warnings and breaches, and re-dispatch of queued tickets.

Both claim the tickets they change with FOR UPDATE SKIP LOCKED in the changing transaction (see
`handlers.run_sla_timer` / `handlers.dispatch_queued`), so every replica may run them.
"""

from crm_platform.jobs import PeriodicJob
from crm_platform.principal import ALL_RECORDS, SYSTEM, acting_as

from service_desk import handlers
from service_desk.config import ServiceDeskSettings
from service_desk.handlers import DISPATCH_JOB, SLA_JOB, Context


def build_jobs(ctx: Context, settings: ServiceDeskSettings) -> list[PeriodicJob]:
    batch = settings.job_batch_size

    async def sla() -> int:
        with acting_as(SYSTEM, ALL_RECORDS):
            return await handlers.run_sla_timer(ctx, batch_size=batch)

    async def dispatch() -> int:
        with acting_as(SYSTEM, ALL_RECORDS):
            return await handlers.dispatch_queued(ctx, batch_size=batch)

    return [
        PeriodicJob(SLA_JOB, settings.sla_job_interval_seconds, sla, batch_size=batch),
        PeriodicJob(DISPATCH_JOB, settings.dispatch_job_interval_seconds, dispatch, batch_size=batch),
    ]
