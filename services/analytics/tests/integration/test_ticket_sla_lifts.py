"""A breach the service desk reported leaves the service report when the desk lifts it: a priority
(or account tier) change moves the due time, and the desk keeps a breach only where its clock, where
it stands at the change (now while it runs, where it stopped while the ticket waits for the customer
or is resolved), has reached the new due time, and a target met for good keeps its verdict
(docs/service-desk.md). The desk then publishes the ticket's new version (`ticket.updated`), which the
projection judges the breach with as the desk did. A breach of the new due time is reported again,
and a due time moved on by a wait for the customer lifts nothing. Events applied through the
consumer's handlers (no broker), in the order the desk publishes them, each ticket's under its key."""

from datetime import datetime, timedelta

import pytest
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = Principal(user_id="admin", roles=("admin",))
T0 = utcnow() - timedelta(days=7)
# The due times (hours after creation) of the desk's default SLA targets.
URGENT = {"first_response_due_at": 0.25, "resolution_due_at": 4.0}
HIGH = {"first_response_due_at": 1.0, "resolution_due_at": 8.0}
NORMAL = {"first_response_due_at": 4.0, "resolution_due_at": 24.0}


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def ticket(version: int, status: str, priority: str, **hours: float) -> servicedesk_pb2.Ticket:
    """Ticket T-1 of `priority`, created at T0; `hours` (after T0) give its due times, the time of
    this version (`updated_at`) and the others set."""
    return servicedesk_pb2.Ticket(
        id="T-1", assignee_id="ag-1", team="desk", region="north", priority=priority, effective_priority=priority,
        status=status, version=version, created_at=to_timestamp(T0),
        **{name: to_timestamp(at(h)) for name, h in hours.items()},  # type: ignore[arg-type]
    )  # fmt: skip


def breach(version: int, target: str, due: float, status: str, priority: str, **hours: float) -> list[Message]:
    """What the desk publishes when a target runs out: the breach, with the ticket it escalates."""
    escalated = ticket(version, status, priority, **hours)
    escalated.escalated, escalated.escalation_reason = True, f"sla_breached_{target}"
    return [
        service_events.TicketSlaBreached(ticket=escalated, target=target, due_at=to_timestamp(at(due))),
        service_events.TicketEscalated(ticket=escalated, reason=escalated.escalation_reason),
    ]


def retimed(version: int, status: str, priority: str, **hours: float) -> service_events.TicketUpdated:
    return service_events.TicketUpdated(
        ticket=ticket(version, status, priority, **hours),
        changed_fields=["priority", "effective_priority", "first_response_due_at", "resolution_due_at"],
    )


async def sla(engine: AsyncEngine, *, hours: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(met, breached) of the first responses and of the resolutions, as the report reads `hours`
    after T0."""
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy(), clock=lambda: at(hours))
    with acting_as(ADMIN, ALL_RECORDS):
        s = await reports.service(ReportFilter())
    return (s.first_response_met, s.first_response_breached), (s.resolution_met, s.resolution_breached)


async def test_a_breach_lifted_by_a_lower_priority_leaves_the_report(engine: AsyncEngine) -> None:
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket(1, "assigned", "urgent", **URGENT, updated_at=0)),
            *breach(2, "first_response", 0.25, "assigned", "urgent", **URGENT, updated_at=0.25),
            # At minute 20 a manager corrects the priority to normal: the first response is due at
            # the 4th hour now, which the clock has not reached: the desk lifts the breach.
            retimed(3, "assigned", "normal", **NORMAL, updated_at=1 / 3),
        ],
    )
    assert await sla(engine, hours=0.5) == ((0, 0), (0, 0))

    answered = ticket(4, "in_progress", "normal", **NORMAL, first_responded_at=1, updated_at=1)
    await deliver(
        engine,
        [service_events.TicketStatusChanged(ticket=answered, from_status="assigned", to_status="in_progress")],
    )
    assert await sla(engine, hours=2) == ((1, 0), (0, 0))


async def test_a_lifted_breach_is_reported_again_when_the_new_due_time_passes(engine: AsyncEngine) -> None:
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket(1, "assigned", "urgent", **URGENT, updated_at=0)),
            *breach(2, "first_response", 0.25, "assigned", "urgent", **URGENT, updated_at=0.25),
            retimed(3, "assigned", "normal", **NORMAL, updated_at=1 / 3),
            # Still unanswered at the 4th hour.
            *breach(4, "first_response", 4, "assigned", "normal", **NORMAL, updated_at=4),
        ],
    )
    assert await sla(engine, hours=5) == ((0, 1), (0, 0))


async def test_a_breach_the_new_due_time_still_reaches_stays(engine: AsyncEngine) -> None:
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket(1, "assigned", "urgent", **URGENT, updated_at=0)),
            *breach(2, "first_response", 0.25, "assigned", "urgent", **URGENT, updated_at=0.25),
            # Lowered to high at the 3rd hour: its first response was due at the 1st, long passed.
            retimed(3, "assigned", "high", **HIGH, updated_at=3),
        ],
    )
    assert await sla(engine, hours=3.5) == ((0, 1), (0, 0))


async def test_a_resolution_breach_stays_when_a_wait_for_the_customer_moves_the_due_time(
    engine: AsyncEngine,
) -> None:
    answered = {**HIGH, "first_responded_at": 0.5}
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket(1, "in_progress", "high", **answered, updated_at=0.5)),
            *breach(2, "resolution", 8, "in_progress", "high", **answered, updated_at=8),
            service_events.TicketStatusChanged(
                ticket=ticket(3, "waiting_customer", "high", **answered, updated_at=9),
                from_status="in_progress",
                to_status="waiting_customer",
            ),
            # The customer answers at the 12th hour: the desk moves the due time by the 3 hours waited
            # (to the 11th hour), which lifts no breach.
            service_events.TicketStatusChanged(
                ticket=ticket(4, "in_progress", "high", **{**answered, "resolution_due_at": 11}, updated_at=12),
                from_status="waiting_customer",
                to_status="in_progress",
            ),
        ],
    )
    assert await sla(engine, hours=13) == ((1, 0), (0, 1))


async def test_a_resolved_tickets_breach_is_judged_where_its_clock_stopped(engine: AsyncEngine) -> None:
    answered = {**URGENT, "first_responded_at": 0.1}
    resolved = ticket(4, "resolved", "urgent", **answered, resolved_at=6, updated_at=6)
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=ticket(1, "in_progress", "urgent", **answered, updated_at=0.1)),
            *breach(2, "resolution", 4, "in_progress", "urgent", **answered, updated_at=4),
            service_events.TicketStatusChanged(ticket=resolved, from_status="in_progress", to_status="resolved"),
            service_events.TicketResolved(ticket=resolved),
            # Corrected to high at the 10th hour: resolved at the 6th, before the 8 hours of high, so
            # the resolution met its new target (the first response, met for good, keeps its own).
            retimed(5, "resolved", "high", **{**answered, "resolution_due_at": 8}, resolved_at=6, updated_at=10),
        ],
    )
    assert await sla(engine, hours=11) == ((1, 0), (1, 0))
