"""Timers of the accounts service: the public pool's automatic return and reminder rules.

Both claim the rows they change with FOR UPDATE SKIP LOCKED in the changing transaction (see
`handlers.return_inactive_accounts` / `handlers.raise_reminders`), so every replica may run them.
"""

from crm_platform.jobs import PeriodicJob
from crm_platform.principal import ALL_RECORDS, SYSTEM, acting_as

from accounts import handlers
from accounts.config import AccountsSettings
from accounts.handlers import Context


def build_jobs(ctx: Context, settings: AccountsSettings) -> list[PeriodicJob]:
    batch = settings.job_batch_size

    async def return_to_pool() -> int:
        with acting_as(SYSTEM, ALL_RECORDS):
            return await handlers.return_inactive_accounts(ctx, batch_size=batch)

    async def reminders() -> int:
        with acting_as(SYSTEM, ALL_RECORDS):
            return await handlers.raise_reminders(ctx, batch_size=batch)

    return [
        PeriodicJob("pool-return", settings.pool_job_interval_seconds, return_to_pool, batch_size=batch),
        PeriodicJob("reminder-rules", settings.reminder_job_interval_seconds, reminders, batch_size=batch),
    ]
