"""A ticket's SLA targets in the service report on PostgreSQL, events applied through the consumer's
handlers (no broker), judged as the service desk judges them (its SLA clocks and breach timer, SPEC
§7): a ticket closed short of its targets stopped their clocks, so they are met unless the desk
reported a breach before; the resolution clock of a ticket waiting for the customer stands still, so
the original due time passing breaches nothing, whether the ticket is resolved from there or runs
again until the due time the desk moved by the wait."""

from datetime import datetime, timedelta

import pytest
from analytics.domain import ChurnPolicy, ServiceSummary
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.ids import new_id
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = Principal(user_id="admin", roles=("admin",))
T0 = utcnow() - timedelta(days=7)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def ticket(ticket_id: str, team: str, version: int, status: str, **hours: float) -> servicedesk_pb2.Ticket:
    """A high-priority ticket created at T0, its first response due at 1 h and its resolution at 8 h
    unless `hours` (after T0) say otherwise."""
    times = {"created_at": 0.0, "first_response_due_at": 1.0, "resolution_due_at": 8.0} | hours
    return servicedesk_pb2.Ticket(
        id=ticket_id, assignee_id="ag-1", team=team, region="north", priority="high", effective_priority="high",
        status=status, version=version,
        **{name: to_timestamp(at(h)) for name, h in times.items()},  # type: ignore[arg-type]
    )  # fmt: skip


async def service_report(engine: AsyncEngine, team: str, *, hours: float) -> ServiceSummary:
    """The team's service report as it reads `hours` after T0."""
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy(), clock=lambda: at(hours))
    with acting_as(ADMIN, ALL_RECORDS):
        return await reports.service(ReportFilter(team=team))


def sla(summary: ServiceSummary) -> tuple[tuple[int, int], tuple[int, int]]:
    """(met, breached) of the first responses and of the resolutions."""
    return (
        (summary.first_response_met, summary.first_response_breached),
        (summary.resolution_met, summary.resolution_breached),
    )


async def test_a_ticket_closed_short_of_its_targets_met_them_unless_the_service_desk_reported_a_breach(
    engine: AsyncEngine,
) -> None:
    team = f"desk-{new_id()}"
    # Spam, closed unanswered after 30 minutes: the desk stopped both clocks in time.
    spam = ticket("T-SPAM", team, 2, "closed", closed_at=0.5)
    # Left unanswered past its first-response due time: the desk's timer reported the breach and
    # escalated the ticket; it was closed (with its account) at the 3rd hour.
    late = ticket("T-LATE", team, 1, "new")
    late.escalated, late.escalation_reason = True, "sla_breached_first_response"
    late_closed = ticket("T-LATE", team, 2, "closed", closed_at=3)
    late_closed.escalated, late_closed.escalation_reason = late.escalated, late.escalation_reason
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket("T-SPAM", team, 1, "new")),
            service_events.TicketStatusChanged(ticket=spam, from_status="new", to_status="closed"),
            service_events.TicketClosed(ticket=spam),
            service_events.TicketCreated(ticket=ticket("T-LATE", team, 1, "new")),
            service_events.TicketSlaBreached(ticket=late, target="first_response", due_at=to_timestamp(at(1))),
            service_events.TicketEscalated(ticket=late, reason=late.escalation_reason),
            service_events.TicketStatusChanged(ticket=late_closed, from_status="new", to_status="closed"),
            service_events.TicketClosed(ticket=late_closed),
        ],
    )

    # Days after every due time: only the reported breach counts; no resolution ran late.
    assert sla(await service_report(engine, team, hours=48)) == ((1, 1), (2, 0))


async def test_a_ticket_waiting_for_the_customer_is_not_breached_by_the_original_due_time_passing(
    engine: AsyncEngine,
) -> None:
    team = f"desk-{new_id()}"
    answered = {"first_responded_at": 0.5}
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket("T-WAIT", team, 1, "new")),
            service_events.TicketStatusChanged(
                ticket=ticket("T-WAIT", team, 2, "in_progress", **answered), from_status="new", to_status="in_progress"
            ),
            # Waiting for the customer from the 2nd hour, before the resolution due at 8 h.
            service_events.TicketStatusChanged(
                ticket=ticket("T-WAIT", team, 3, "waiting_customer", **answered),
                from_status="in_progress",
                to_status="waiting_customer",
            ),
        ],
    )
    # The 8 hours are long past, but the resolution clock has stood still since the 2nd hour.
    assert sla(await service_report(engine, team, hours=30)) == ((1, 0), (0, 0))

    # The customer answers at the 30th hour: the desk moves the due time by the 28 hours waited.
    running = {**answered, "resolution_due_at": 36.0}
    await deliver(
        engine,
        [
            service_events.TicketStatusChanged(
                ticket=ticket("T-WAIT", team, 4, "in_progress", **running),
                from_status="waiting_customer",
                to_status="in_progress",
            ),
        ],
    )
    assert sla(await service_report(engine, team, hours=31)) == ((1, 0), (0, 0))

    # Waiting again from the 32nd hour, then resolved at the 40th: the clock stood still from the
    # 32nd hour on (the desk reported no breach), so the resolution came in time.
    resolved = ticket("T-WAIT", team, 6, "resolved", **running, resolved_at=40)
    await deliver(
        engine,
        [
            service_events.TicketStatusChanged(
                ticket=ticket("T-WAIT", team, 5, "waiting_customer", **running),
                from_status="in_progress",
                to_status="waiting_customer",
            ),
            service_events.TicketStatusChanged(ticket=resolved, from_status="waiting_customer", to_status="resolved"),
            service_events.TicketResolved(ticket=resolved),
        ],
    )
    assert sla(await service_report(engine, team, hours=41)) == ((1, 0), (1, 0))
