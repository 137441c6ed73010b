"""Timers of the leads service: the first-contact SLA, recycling into the pool, rescoring the open
leads after a scoring rule or the grade thresholds changed, and forgetting past web form windows.

Every replica runs them all; each pass claims due leads with FOR UPDATE SKIP LOCKED in the
transaction that changes them (see handlers), so one replica acts on a given lead.
"""

from crm_platform.jobs import PeriodicJob

from leads.handlers import FIRST_CONTACT_JOB, RECYCLE_JOB, LeadsService


def build_jobs(service: LeadsService) -> list[PeriodicJob]:
    settings = service.settings
    return [
        PeriodicJob(
            name=FIRST_CONTACT_JOB,
            interval_seconds=settings.jobs_interval_seconds,
            run_once=service.flag_overdue_first_contacts,
            batch_size=settings.jobs_batch_size,
        ),
        PeriodicJob(
            name=RECYCLE_JOB,
            interval_seconds=settings.jobs_interval_seconds,
            run_once=service.recycle_idle_leads,
            batch_size=settings.jobs_batch_size,
        ),
        PeriodicJob(
            name="rescore-stale-leads",
            interval_seconds=settings.jobs_interval_seconds,
            run_once=service.rescore_stale_leads,
            batch_size=settings.jobs_batch_size,
        ),
        PeriodicJob(
            name="forget-past-webform-windows",
            interval_seconds=settings.jobs_interval_seconds,
            run_once=service.forget_past_webform_windows,
            batch_size=settings.jobs_batch_size,
        ),
    ]
