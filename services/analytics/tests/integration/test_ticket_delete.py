"""A ticket the service desk deleted (spam, a test, a duplicate: open and never resolved) leaves the
service report on PostgreSQL, events applied through the consumer's handlers (no broker): it no longer
counts as a ticket, in the backlog, among the open urgent ones or against SLA compliance, a breach it
had included; the tickets kept and their CSAT stay as they were, and a redelivered deletion changes
nothing more."""

from datetime import timedelta
from decimal import Decimal

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = Principal(user_id="admin", roles=("admin",))
NOW = utcnow()


def ticket(ticket_id: str, **fields: object) -> servicedesk_pb2.Ticket:
    hours_ago = {"created_at": 30, "first_response_due_at": 29, "resolution_due_at": 6}
    times = {name: to_timestamp(NOW - timedelta(hours=hours)) for name, hours in hours_ago.items()}
    return servicedesk_pb2.Ticket(
        id=ticket_id, assignee_id="ag-1", team="desk", region="north", priority="urgent", version=1,
        **times, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_a_deleted_ticket_leaves_the_service_report_and_its_breach_with_it(engine: AsyncEngine) -> None:
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())
    answered = {"first_responded_at": to_timestamp(NOW - timedelta(hours=29.5))}
    resolved = ticket("T-KEPT", status="resolved", resolved_at=to_timestamp(NOW - timedelta(hours=8)), **answered)
    spam = ticket("T-SPAM", status="assigned")
    survey = servicedesk_pb2.CsatResponse(id="S-1", ticket_id="T-KEPT", score=4, submitted_at=to_timestamp(NOW))
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=resolved),
            service_events.CsatSubmitted(response=survey),
            service_events.TicketCreated(ticket=spam),
            service_events.TicketSlaBreached(ticket=spam, target="first_response", due_at=spam.first_response_due_at),
        ],
    )
    with acting_as(ADMIN, ALL_RECORDS):
        before = await reports.service(ReportFilter(team="desk"))
    assert (before.tickets, before.backlog, before.open_urgent) == (2, 1, 1)
    assert (before.first_response_met, before.first_response_breached) == (1, 1)

    gone = service_events.TicketDeleted(ticket_id="T-SPAM")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more

    with acting_as(ADMIN, ALL_RECORDS):
        after = await reports.service(ReportFilter(team="desk"))
    assert (after.tickets, after.backlog, after.open_urgent) == (1, 0, 0)
    assert (after.first_response_met, after.first_response_breached, after.first_response_compliance) == (
        1, 0, Decimal(1),
    )  # fmt: skip
    assert after.csat == before.csat and after.csat.responses == 1
    async with engine.connect() as conn:
        assert list(await conn.scalars(select(repo.tickets.c.id))) == ["T-KEPT"]
