"""Service-desk rules at the edges reviews found: a reopened or closed ticket's SLA, merged accounts' tiers,
manual assignment to an agent away or full, surveys of tickets closed without a resolution, a first
response by comment, due times of targets met, the region of a ticket whose account is not known
yet, assignment ending an escalation for want of an agent, and closing a reopened ticket."""

from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any, TypeVar

import pytest
from crm.servicedesk.v1 import events_pb2
from crm_platform.cloudevents import spec_of
from crm_platform.errors import Conflict, ValidationFailed
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, SYSTEM, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context
from sqlalchemy import select

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=Message)
AGENT_1 = Principal(user_id="ag-1", roles=("service_agent",))


@pytest.fixture
async def ctx(each_database_url: str) -> AsyncIterator[Context]:
    async with migrated_engine(each_database_url, MIGRATIONS) as engine:
        with acting_as(SYSTEM, ALL_RECORDS):
            yield Context(uow=UnitOfWork(engine, repo.metadata, source="/test"))


async def _outbox_types(ctx: Context, key: str) -> list[str]:
    outbox = repo.metadata.tables["outbox"]
    async with ctx.uow.engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.type).where(outbox.c.key == key).order_by(outbox.c.seq))
    return [t for (t,) in rows]


async def _agent(ctx: Context, agent_id: str, **values: Any) -> None:
    await handlers.create_agent(ctx, {"id": agent_id, "name": agent_id, **values}, idempotency_key="")


async def test_a_ticket_reopened_days_after_a_timely_resolution_is_not_late(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Router down", "priority": "urgent"}, idempotency_key="")
    assert ticket["resolution_due_at"] == start + timedelta(hours=4)
    ctx.clock = lambda: start + timedelta(minutes=5)
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")  # answered in time
    ctx.clock = lambda: start + timedelta(hours=1)
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(days=2)
    reopened = (await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")).record
    # The 47 h spent resolved are not the team's: 3 h of the target are left, as at the resolution.
    assert reopened["resolution_due_at"] == start + timedelta(days=2, hours=3)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    # The warning comes at 80 % of the 4 h worked (3.2 h): 2.2 h after the reopening.
    ctx.clock = lambda: start + timedelta(days=2, hours=2, minutes=10)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    ctx.clock = lambda: start + timedelta(days=2, hours=2, minutes=15)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert "crm.service.ticket.sla_breached" not in await _outbox_types(ctx, ticket["id"])
    ctx.clock = lambda: start + timedelta(days=2, hours=3, minutes=1)  # late now, against the moved target
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert (await _outbox_types(ctx, ticket["id"]))[-4:] == [
        "crm.service.ticket.sla_warning",
        "crm.service.ticket.sla_breached",
        "crm.service.ticket.escalated",
        "crm.audit.record.recorded",  # the timer's escalation is audited
    ]


async def test_waiting_for_the_customer_then_resolved_is_one_pause(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Invoice", "priority": "high"}, idempotency_key="")
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=1)
    await handlers.change_status(ctx, ticket["id"], "waiting_customer", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=2)
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=5)
    reopened = (await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")).record
    assert reopened["sla_paused_seconds"] == 4 * 3600  # from waiting (1 h) to reopened (5 h)
    assert reopened["resolution_due_at"] == start + timedelta(hours=8 + 4)


async def test_a_closed_ticket_keeps_the_due_time_its_resolution_was_late_against(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Router down", "priority": "urgent"}, idempotency_key="")
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=6)  # 2 h past the 4 h target
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(days=3)  # accepted by the customer days later
    closed = (await handlers.change_status(ctx, ticket["id"], "closed", expected_version=0, note="")).record
    assert closed["resolution_due_at"] == start + timedelta(hours=4)
    assert closed["resolved_at"] > closed["resolution_due_at"]
    assert closed["sla_paused_at"] is None and closed["sla_paused_seconds"] == 0


async def test_time_waiting_for_the_customer_moves_the_target_a_resolution_is_met_against(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Invoice", "priority": "high"}, idempotency_key="")
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=1)
    await handlers.change_status(ctx, ticket["id"], "waiting_customer", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=10)  # the customer answered after 9 h; resolved at once
    resolved = (await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")).record
    assert resolved["resolution_due_at"] == start + timedelta(hours=8 + 9)  # 1 h of the team's 8 h worked
    ctx.clock = lambda: start + timedelta(days=2)
    closed = (await handlers.change_status(ctx, ticket["id"], "closed", expected_version=0, note="")).record
    assert closed["resolution_due_at"] == start + timedelta(hours=8 + 9)
    assert closed["resolved_at"] < closed["resolution_due_at"]


async def test_tickets_of_a_merged_account_are_served_at_the_survivors_tier(ctx: Context) -> None:
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "plain", "C", "north")
        await handlers.apply_account(tx, "vip", "A", "north")
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Slow portal", "account_id": "plain", "priority": "normal"}, idempotency_key="",
        skip_dispatch=True,
    )  # fmt: skip
    assert ticket["effective_priority"] == "normal"
    async with ctx.uow.begin() as tx:
        await handlers.apply_account_merge(tx, "vip", "plain")
    row, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
    assert (row.account_id, row.account_tier, row.effective_priority) == ("vip", "A", "high")
    assert row.resolution_due_at - row.created_at == timedelta(hours=8)  # the high targets


async def test_a_resolved_ticket_of_a_merged_account_is_worked_at_the_survivors_tier_when_reopened(
    ctx: Context,
) -> None:
    """Moved to a VIP survivor while resolved, the ticket takes its tier: reopened, it is served one
    priority higher, and resolved again, it schedules the survivor's return visit."""
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "plain", "C", "north")
        await handlers.apply_account(tx, "vip", "A", "north")
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1", region="north")
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Slow portal", "account_id": "plain", "priority": "normal"}, idempotency_key=""
    )
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=2)
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")  # tier C: no visit
    async with ctx.uow.begin() as tx:
        await handlers.apply_account_merge(tx, "vip", "plain")

    ctx.clock = lambda: start + timedelta(hours=3)
    reopened = (await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")).record
    assert (reopened["account_id"], reopened["account_tier"], reopened["effective_priority"]) == ("vip", "A", "high")
    assert reopened["resolution_due_at"] == start + timedelta(hours=8 + 1)  # high's 8 h, and the hour resolved
    await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    assert "crm.service.return_visit.scheduled" in await _outbox_types(ctx, ticket["id"])


async def test_a_ticket_is_not_given_by_hand_to_an_agent_away_or_full(ctx: Context) -> None:
    await _agent(ctx, "away", available=False)
    await _agent(ctx, "full", capacity=1)
    await _agent(ctx, "south", region="south", skills=["hardware"])
    first, _ = await handlers.create_ticket(ctx, {"subject": "One"}, idempotency_key="", skip_dispatch=True)
    second, _ = await handlers.create_ticket(
        ctx, {"subject": "Two", "region": "north", "category": "billing"}, idempotency_key="", skip_dispatch=True
    )
    await handlers.assign_ticket(ctx, first["id"], "full", expected_version=0)
    for agent_id, reason in (("away", "AGENT_UNAVAILABLE"), ("full", "AGENT_AT_CAPACITY")):
        with pytest.raises(Conflict) as caught:
            await handlers.assign_ticket(ctx, second["id"], agent_id, expected_version=0)
        assert caught.value.reason == reason
    # Another region or skill is a person's call to make.
    assigned = (await handlers.assign_ticket(ctx, second["id"], "south", expected_version=0)).record
    assert assigned["assignee_id"] == "south"


async def test_a_ticket_given_by_hand_to_someone_who_is_not_an_agent_is_a_422_naming_the_assignee(
    ctx: Context,
) -> None:
    """Agents are not in a record scope: the only way not to be one is not to exist."""
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "One"}, idempotency_key="", skip_dispatch=True)
    with pytest.raises(ValidationFailed) as caught:
        await handlers.assign_ticket(ctx, ticket["id"], "nobody", expected_version=0)
    assert [(e.field, e.message) for e in caught.value.errors] == [("assignee_id", "agent nobody does not exist")]


async def test_a_ticket_closed_without_a_resolution_takes_no_survey(ctx: Context) -> None:
    spam, _ = await handlers.create_ticket(ctx, {"subject": "Win a prize"}, idempotency_key="", skip_dispatch=True)
    await handlers.change_status(ctx, spam["id"], "closed", expected_version=0, note="spam")
    with pytest.raises(Conflict) as caught:
        await handlers.submit_csat(ctx, spam["id"], 5, "", idempotency_key="")
    assert caught.value.reason == "TICKET_NOT_RESOLVED"


async def _events(ctx: Context, key: str, message_type: type[M]) -> list[M]:
    outbox = repo.metadata.tables["outbox"]
    kind = spec_of(message_type).type
    query = select(outbox.c.payload).where(outbox.c.key == key, outbox.c.type == kind).order_by(outbox.c.seq)
    async with ctx.uow.engine.connect() as conn:
        return [message_type.FromString(payload) for payload in await conn.scalars(query)]


async def test_a_first_response_by_comment_is_published_on_time_or_late(ctx: Context) -> None:
    """The SLA reports learn of an answer given as a public comment: on time, nothing else would say it."""
    start = utcnow()
    ctx.clock = lambda: start
    await _agent(ctx, "ag-1")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Line down", "priority": "urgent"}, idempotency_key="")
    ctx.clock = lambda: start + timedelta(minutes=5)
    with acting_as(AGENT_1, ALL_RECORDS):
        await handlers.add_comment(ctx, ticket["id"], "On it", public=True, idempotency_key="")
        await handlers.add_comment(ctx, ticket["id"], "Still on it", public=True, idempotency_key="")  # no news
    [answered] = await _events(ctx, ticket["id"], events_pb2.TicketUpdated)
    assert list(answered.changed_fields) == ["first_responded_at"]
    assert answered.ticket.first_responded_at.ToDatetime(UTC) == start + timedelta(minutes=5)
    row, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
    assert (answered.ticket.version, row.version) == (3, 3)  # created, assigned, answered
    assert await _events(ctx, ticket["id"], events_pb2.TicketSlaBreached) == []


async def test_a_target_met_keeps_its_due_time_when_the_priority_is_raised_afterwards(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Slow portal", "priority": "normal"}, idempotency_key="", skip_dispatch=True
    )
    answered_by = ticket["first_response_due_at"]
    ctx.clock = lambda: start + timedelta(hours=2)
    with acting_as(AGENT_1, ALL_RECORDS):
        await handlers.add_comment(ctx, ticket["id"], "Looking", public=True, idempotency_key="")
    raised = (await handlers.update_ticket(ctx, ticket["id"], {"priority": "urgent"}, expected_version=0)).record
    # Answered in time against the target it had; the urgent target applies to what still runs.
    assert raised["first_response_due_at"] == answered_by
    assert raised["resolution_due_at"] == start + timedelta(hours=4)
    assert raised["first_response_breached_at"] is None


async def test_a_ticket_whose_account_the_desk_does_not_know_yet_is_of_its_creators_region(ctx: Context) -> None:
    manager = Principal(user_id="m-north", roles=("service_manager",), region="north")
    with acting_as(manager, RecordScope(ScopeKind.REGION, region="north")):
        ticket, _ = await handlers.create_ticket(
            ctx, {"subject": "New customer", "account_id": "acc-not-projected-yet"}, idempotency_key="",
            skip_dispatch=True,
        )  # fmt: skip
        read_back, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
    assert (ticket["region"], read_back.id) == ("north", ticket["id"])


async def test_an_assignment_lifts_the_escalation_for_want_of_an_agent_and_is_published_in_its_version(
    ctx: Context,
) -> None:
    queued, _ = await handlers.create_ticket(ctx, {"subject": "VPN down", "category": "network"}, idempotency_key="")
    assert (queued["escalated"], queued["escalation_reason"]) == (True, "no_agent_available")
    await _agent(ctx, "ag-net", skills=["network"])
    assigned = (await handlers.assign_ticket(ctx, queued["id"], "ag-net", expected_version=0)).record
    # Version 2 was its escalation as it was filed.
    assert (assigned["escalated"], assigned["escalation_reason"], assigned["version"]) == (False, "", 3)
    [event] = await _events(ctx, queued["id"], events_pb2.TicketAssigned)
    assert (event.ticket.version, event.ticket.escalated) == (3, False)  # as stored, not as before


async def test_a_reopened_ticket_is_resolved_again_before_it_is_closed_even_once_reassigned(ctx: Context) -> None:
    await _agent(ctx, "ag-1")
    await _agent(ctx, "ag-2")
    ticket, _ = await handlers.create_ticket(ctx, {"subject": "Printer"}, idempotency_key="")
    for status in ("in_progress", "resolved", "reopened"):
        await handlers.change_status(ctx, ticket["id"], status, expected_version=0, note="")
    other = "ag-2" if ticket["assignee_id"] == "ag-1" else "ag-1"
    reassigned = (await handlers.assign_ticket(ctx, ticket["id"], other, expected_version=0)).record
    assert reassigned["status"] == "assigned"
    with pytest.raises(Conflict) as refused:
        await handlers.change_status(ctx, ticket["id"], "closed", expected_version=0, note="")
    assert refused.value.reason == "ILLEGAL_TRANSITION" and "resolved again" in refused.value.detail
    for status in ("in_progress", "resolved", "closed"):
        await handlers.change_status(ctx, ticket["id"], status, expected_version=0, note="")
