"""A ticket's SLA after its targets move (a priority change, an account's tier change), on SQLite and
PostgreSQL: its warnings, breaches and breach escalation hold against the current targets only; the
breach events already published stay as history; the timer announces what the new targets make due,
once, and again what comes true later under them. Each change is published as ticket.updated, with
what followed from it (an escalation lifted), so consumers keep the ticket's targets current."""

from datetime import datetime, timedelta
from typing import Any

import pytest
from crm.audit.v1.events_pb2 import AuditRecorded
from crm.servicedesk.v1 import events_pb2 as desk_events
from crm_platform.errors import StaleVersion
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import from_timestamp, utcnow
from service_desk import handlers
from service_desk import repository as repo
from service_desk.handlers import Context, Page
from service_desk.repository import TicketFilter

pytestmark = pytest.mark.integration

WARNING = "crm.service.ticket.sla_warning"
BREACHED = "crm.service.ticket.sla_breached"
ESCALATED = "crm.service.ticket.escalated"
UPDATED = "crm.service.ticket.updated"
REOPENED = "crm.service.ticket.reopened"
VISIT_SCHEDULED = "crm.service.return_visit.scheduled"
AUDITED = "crm.audit.record.recorded"


async def _row(ctx: Context, ticket_id: str) -> Any:
    row, _, _, _ = await handlers.get_ticket(ctx, ticket_id)
    return row


async def _events(ctx: Context, key: str) -> list[tuple[str, bytes]]:
    return await outbox_events(ctx.uow.engine, repo.metadata, key)


def at(ctx: Context, moment: datetime) -> None:
    ctx.clock = lambda: moment


async def _ticket(ctx: Context, priority: str, **values: Any) -> Any:
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Line down", "priority": priority, **values}, idempotency_key="", skip_dispatch=True
    )
    return ticket


async def _types(ctx: Context, key: str) -> list[str]:
    return [event_type for event_type, _ in await _events(ctx, key)]


async def _escalated_ids(ctx: Context) -> list[str]:
    rows, _ = await handlers.list_tickets(ctx, TicketFilter(escalated=True), Page())
    return [row.id for row in rows]


async def test_lowering_the_priority_lifts_a_breach_that_no_longer_holds(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    ticket = await _ticket(ctx, "urgent")
    at(ctx, start + timedelta(minutes=20))  # 15 minutes to first response, as urgent: late
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert await _escalated_ids(ctx) == [ticket["id"]]

    lowered = (await handlers.update_ticket(ctx, ticket["id"], {"priority": "low"}, expected_version=0)).record
    # As low, 8 h to first response: not late, not even at 80 %.
    assert lowered["first_response_due_at"] == start + timedelta(hours=8)
    row = await _row(ctx, ticket["id"])
    assert (row.first_response_warned_at, row.first_response_breached_at) == (None, None)
    assert (row.escalated, row.escalation_reason) == (False, "")
    assert await _escalated_ids(ctx) == []
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0  # nothing re-fires
    # The breach published as urgent stays as history; under the low targets the timer speaks again.
    assert (await _types(ctx, ticket["id"])).count(BREACHED) == 1
    at(ctx, start + timedelta(hours=6, minutes=25))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert (await _types(ctx, ticket["id"]))[-1] == WARNING
    at(ctx, start + timedelta(hours=8, minutes=1))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    events = await _events(ctx, ticket["id"])
    assert [event_type for event_type, _ in events].count(BREACHED) == 2
    assert [event_type for event_type, _ in events[-3:]] == [BREACHED, ESCALATED, AUDITED]
    breach = desk_events.TicketSlaBreached.FromString(events[-3][1])
    assert (breach.target, from_timestamp(breach.due_at)) == ("first_response", start + timedelta(hours=8))
    assert await _escalated_ids(ctx) == [ticket["id"]]
    # Each escalation by the timer is in the audit trail (a warning, which changes nothing a reader
    # sees, is not): no request made it for the gateway to audit.
    audits = [AuditRecorded.FromString(payload) for event_type, payload in events if event_type == AUDITED]
    assert len(audits) == 2
    audit = audits[-1]
    assert (audit.actor.user_id, audit.action, audit.resource, audit.record_id) == (
        "system",
        "escalate",
        "tickets",
        ticket["id"],
    )
    assert (audit.method, audit.path) == ("JOB", "sla-timer")
    assert audit.reason == f"first_response SLA breached (due {(start + timedelta(hours=8)).isoformat()})"
    assert audit.fields == ["escalated", "escalation_reason", "updated_at", "version"]  # a new version of it
    assert (audit.before["escalated"], audit.after["escalated"]) == (None, True)
    assert audit.after["escalation_reason"] == "sla_breached_first_response"


async def test_lowering_the_priority_keeps_a_breach_that_still_holds(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    ticket = await _ticket(ctx, "urgent")
    at(ctx, start + timedelta(hours=2))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    breached = await _row(ctx, ticket["id"])
    # As high, 1 h to first response: two hours in, still late.
    await handlers.update_ticket(ctx, ticket["id"], {"priority": "high"}, expected_version=0)
    row = await _row(ctx, ticket["id"])
    assert row.first_response_breached_at == breached.first_response_breached_at
    assert (row.escalated, row.escalation_reason) == (True, "sla_breached_first_response")
    at(ctx, start + timedelta(hours=3))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    assert (await _types(ctx, ticket["id"])).count(BREACHED) == 1


async def test_raising_the_priority_breaches_at_the_timers_next_run_once(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    ticket = await _ticket(ctx, "low")
    at(ctx, start + timedelta(minutes=30))
    raised = (await handlers.update_ticket(ctx, ticket["id"], {"priority": "urgent"}, expected_version=0)).record
    assert raised["next_sla_check_at"] <= start + timedelta(minutes=30)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert (await _types(ctx, ticket["id"]))[-4:] == [WARNING, BREACHED, ESCALATED, AUDITED]
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    assert (await _types(ctx, ticket["id"])).count(BREACHED) == 1
    assert await _escalated_ids(ctx) == [ticket["id"]]


async def test_a_resolution_breach_is_judged_where_the_clock_paused(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Bo"}, idempotency_key="")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Outage", "priority": "urgent"}, idempotency_key="")
    at(ctx, start + timedelta(minutes=5))
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    at(ctx, start + timedelta(hours=4, minutes=1))  # 4 h to resolve, as urgent
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    at(ctx, start + timedelta(hours=4, minutes=30))
    await handlers.change_status(ctx, ticket["id"], "waiting_customer", expected_version=0, note="")
    at(ctx, start + timedelta(hours=5))
    await handlers.update_ticket(ctx, ticket["id"], {"priority": "low"}, expected_version=0)
    # 4.5 h worked when the clock paused; as low, 72 h to resolve: not late.
    row = await _row(ctx, ticket["id"])
    assert (row.resolution_warned_at, row.resolution_breached_at, row.escalated) == (None, None, False)
    at(ctx, start + timedelta(hours=6))
    resumed = (await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")).record
    assert resumed["resolution_due_at"] == start + timedelta(hours=72 + 1.5)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0


async def test_an_account_dropping_out_of_vip_lifts_a_breach_too(ctx: Context) -> None:
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "acme", "A", "east")
    start = utcnow()
    at(ctx, start)
    ticket = await _ticket(ctx, "normal", account_id="acme")  # served as high: 1 h to first response
    at(ctx, start + timedelta(minutes=61))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert await _escalated_ids(ctx) == [ticket["id"]]
    async with ctx.uow.begin() as tx:
        assert await handlers.apply_account(tx, "acme", "B", "east") == 1
    row = await _row(ctx, ticket["id"])
    assert (row.effective_priority, row.first_response_breached_at, row.escalated) == ("normal", None, False)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0


async def test_an_update_is_published_with_the_ticket_after_it_and_what_it_changed(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    ticket = await _ticket(ctx, "urgent")
    at(ctx, start + timedelta(minutes=20))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1  # breached and escalated as urgent

    with acting_as(Principal(user_id="lead-1", roles=("admin",)), ALL_RECORDS):
        lowered = (
            await handlers.update_ticket(
                ctx, ticket["id"], {"priority": "low", "subject": "Line slow"}, expected_version=0
            )
        ).record
    event_type, payload = (await _events(ctx, ticket["id"]))[-1]
    assert event_type == UPDATED
    update = desk_events.TicketUpdated.FromString(payload)
    # Version 2 was the breach's escalation.
    assert (update.ticket.priority, update.ticket.subject, update.ticket.version) == ("low", "Line slow", 3)
    assert from_timestamp(update.ticket.first_response_due_at) == start + timedelta(hours=8)
    # The breach escalation lifted by the change is announced with it.
    assert (update.ticket.escalated, update.ticket.escalation_reason) == (False, "")
    assert list(update.changed_fields) == [
        "effective_priority", "escalated", "escalation_reason", "first_response_due_at", "priority",
        "resolution_due_at", "subject",
    ]  # fmt: skip
    assert update.actor.user_id == "lead-1"
    assert lowered["version"] == 3

    # An update that changes nothing publishes nothing.
    await handlers.update_ticket(ctx, ticket["id"], {"priority": "low"}, expected_version=0)
    assert (await _types(ctx, ticket["id"])).count(UPDATED) == 1


async def test_a_tier_change_publishes_each_retimed_ticket_as_updated_by_the_system(ctx: Context) -> None:
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "acme", "A", "east")
    ticket = await _ticket(ctx, "normal", account_id="acme")
    async with ctx.uow.begin() as tx:
        assert await handlers.apply_account(tx, "acme", "B", "east") == 1
    event_type, payload = (await _events(ctx, ticket["id"]))[-1]
    assert event_type == UPDATED
    update = desk_events.TicketUpdated.FromString(payload)
    row = await _row(ctx, ticket["id"])
    assert (update.ticket.account_tier, update.ticket.effective_priority) == ("B", "normal")
    assert update.ticket.version == row.version == 2
    assert from_timestamp(update.ticket.resolution_due_at) == row.resolution_due_at
    changed = ["account_tier", "effective_priority", "first_response_due_at", "resolution_due_at"]
    assert (list(update.changed_fields), update.actor.kind) == (changed, "system")
    # Applied again, the tier changes nothing: nothing more is published.
    async with ctx.uow.begin() as tx:
        assert await handlers.apply_account(tx, "acme", "B", "east") == 0
    assert (await _types(ctx, ticket["id"])).count(UPDATED) == 1


async def _resolved_ticket_of_a_tier_b_account(ctx: Context, start: datetime, resolved_after: timedelta) -> Any:
    """A normal ticket of tier-B acme (24 h to resolve), answered at once and resolved after `resolved_after`."""
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "acme", "B", "east")
    at(ctx, start)
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Bo", "region": "east"}, idempotency_key="")
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Slow portal", "priority": "normal", "account_id": "acme"}, idempotency_key=""
    )
    at(ctx, start + timedelta(minutes=10))
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    at(ctx, start + resolved_after)
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    return ticket


async def test_a_resolved_ticket_takes_its_accounts_new_tier_and_is_worked_at_it_when_reopened(ctx: Context) -> None:
    """A resolved ticket may be reopened, so it takes its account's new tier as an open one does,
    published as updated by the system. It keeps the due times its resolution was judged against
    while it stays resolved; reopened, it is served at the new tier, and its next resolution
    schedules the return visit of a tier-A account."""
    start = utcnow()
    ticket = await _resolved_ticket_of_a_tier_b_account(ctx, start, resolved_after=timedelta(hours=2))
    assert VISIT_SCHEDULED not in await _types(ctx, ticket["id"])  # tier B: no return visit

    async with ctx.uow.begin() as tx:
        assert await handlers.apply_account(tx, "acme", "A", "east") == 1
    row = await _row(ctx, ticket["id"])
    assert (row.account_tier, row.effective_priority) == ("A", "normal")
    assert row.resolution_due_at == start + timedelta(hours=24)  # the target its resolution met
    event_type, payload = (await _events(ctx, ticket["id"]))[-1]
    update = desk_events.TicketUpdated.FromString(payload)
    assert (event_type, list(update.changed_fields), update.actor.kind) == (UPDATED, ["account_tier"], "system")

    at(ctx, start + timedelta(hours=3))  # the customer says it is not fixed
    reopened = (await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")).record
    # Served as high: 8 h to resolve, and the hour it spent resolved is not the team's.
    assert (reopened["effective_priority"], reopened["resolution_due_at"]) == ("high", start + timedelta(hours=9))
    [published] = [
        desk_events.TicketReopened.FromString(value)
        for event_type, value in await _events(ctx, ticket["id"])
        if event_type == REOPENED
    ]
    assert (published.ticket.effective_priority, from_timestamp(published.ticket.resolution_due_at)) == (
        "high",
        start + timedelta(hours=9),
    )
    at(ctx, start + timedelta(hours=4))
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    assert (await _types(ctx, ticket["id"])).count(VISIT_SCHEDULED) == 1


async def test_a_resolved_ticket_closed_after_its_account_became_vip_keeps_the_verdict_it_was_resolved_with(
    ctx: Context,
) -> None:
    """Resolved in 10 h, in time for normal's 24 h: that the account is tier A by the time the
    customer accepts the resolution (8 h, as high) does not make it late after the fact."""
    start = utcnow()
    ticket = await _resolved_ticket_of_a_tier_b_account(ctx, start, resolved_after=timedelta(hours=10))
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "acme", "A", "east")
    at(ctx, start + timedelta(days=1))
    closed = (await handlers.change_status(ctx, ticket["id"], "closed", expected_version=0, note="")).record
    assert (closed["resolution_due_at"], closed["resolution_breached_at"]) == (start + timedelta(hours=24), None)
    assert closed["resolved_at"] < closed["resolution_due_at"]
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    assert BREACHED not in await _types(ctx, ticket["id"])


async def test_an_answer_or_resolution_past_due_is_a_breach_though_the_timer_had_not_run(ctx: Context) -> None:
    start = utcnow()
    at(ctx, start)
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Bo"}, idempotency_key="")
    answered, _ = await handlers.create_ticket(ctx, {"subject": "Outage", "priority": "urgent"}, idempotency_key="")
    resolved, _ = await handlers.create_ticket(ctx, {"subject": "Slow", "priority": "urgent"}, idempotency_key="")
    at(ctx, start + timedelta(minutes=5))
    await handlers.change_status(ctx, resolved["id"], "in_progress", expected_version=0, note="")  # in time

    at(ctx, start + timedelta(minutes=15, seconds=10))  # 15 minutes to answer, as urgent; no timer run since
    agent = Principal(user_id="ag-1", roles=("service_agent",))
    with acting_as(agent, ALL_RECORDS):
        await handlers.add_comment(ctx, answered["id"], "Looking into it", public=True, idempotency_key="")
    at(ctx, start + timedelta(minutes=16))
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0  # announced once, by the answer
    at(ctx, start + timedelta(hours=4, seconds=5))  # 4 h to resolve
    await handlers.change_status(ctx, resolved["id"], "resolved", expected_version=0, note="")

    late_answer = await _row(ctx, answered["id"])
    assert late_answer.first_response_breached_at == start + timedelta(minutes=15, seconds=10)
    assert (late_answer.escalated, late_answer.escalation_reason) == (False, "")  # answered: nobody to chase
    late_resolution = await _row(ctx, resolved["id"])
    assert (late_resolution.first_response_breached_at, late_resolution.resolution_breached_at) == (
        None,
        start + timedelta(hours=4, seconds=5),
    )
    breaches = [
        (key, desk_events.TicketSlaBreached.FromString(value))
        for key in (answered["id"], resolved["id"])
        for event_type, value in await _events(ctx, key)
        if event_type == BREACHED
    ]
    assert [(key, event.target, from_timestamp(event.due_at)) for key, event in breaches] == [
        (answered["id"], "first_response", start + timedelta(minutes=15)),
        (resolved["id"], "resolution", start + timedelta(hours=4)),
    ]


async def test_each_escalation_is_a_new_version_of_the_ticket_published_as_stored(ctx: Any) -> None:
    """Filed with no agent free, then late for its first response and its resolution: each
    escalation changes what a reader sees, so each is a version of its own, and the breach and
    escalation events carry the ticket in it (an If-Match from before is stale)."""
    start = utcnow()
    at(ctx, start)
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Line down", "priority": "urgent"}, idempotency_key="")
    at(ctx, start + timedelta(days=3))  # past both targets at once
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1

    versions = []
    for event_type, payload in await _events(ctx, ticket["id"]):
        if event_type == ESCALATED:
            event = desk_events.TicketEscalated.FromString(payload)
            versions.append((event.reason, event.ticket.version, event.ticket.escalated))
        elif event_type == BREACHED:
            breach = desk_events.TicketSlaBreached.FromString(payload)
            versions.append((breach.target, breach.ticket.version, breach.ticket.escalated))
    assert versions == [
        ("no_agent_available", 2, True),
        ("first_response", 3, True),
        ("sla_breached_first_response", 3, True),
        ("resolution", 4, True),
        ("sla_breached_resolution", 4, True),
    ]
    assert (await _row(ctx, ticket["id"])).version == 4
    with pytest.raises(StaleVersion):
        await handlers.update_ticket(ctx, ticket["id"], {"subject": "Still down"}, expected_version=3)
