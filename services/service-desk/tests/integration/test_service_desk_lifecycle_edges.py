"""Service-desk rules at the edges a review found: a reopened ticket's SLA, merged accounts' tiers,
manual assignment to an agent away or full, and surveys of tickets closed without a resolution."""

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from crm_platform.errors import Conflict, ValidationFailed
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, SYSTEM, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import utcnow
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context
from sqlalchemy import select

pytestmark = pytest.mark.integration


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
