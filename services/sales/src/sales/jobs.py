"""Timers of the sales service: overdue installments. Safe with several replicas: the job claims
due installments with FOR UPDATE SKIP LOCKED in the transaction that marks them."""

from crm_platform.jobs import PeriodicJob

from sales.handlers import OVERDUE_JOB, SalesHandlers


def overdue_installments_job(handlers: SalesHandlers, *, interval_seconds: float, batch_size: int) -> PeriodicJob:
    async def run_once() -> int:
        return await handlers.mark_overdue_installments(batch_size)

    return PeriodicJob(name=OVERDUE_JOB, interval_seconds=interval_seconds, run_once=run_once, batch_size=batch_size)
