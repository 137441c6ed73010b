"""Deleting a ticket, on SQLite and PostgreSQL: an open ticket never resolved (spam, a test, a
duplicate) goes with its comments and work log under its version, in the caller's region only, and is
announced as ticket.deleted; the SLA timer announces nothing more of it, the dispatch queue offers it
to nobody, and its agent's open-ticket load drops for least-loaded dispatch. A ticket resolved or
closed, now or before a reopening, is a service record and stays (409 TICKET_ON_RECORD)."""

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from alembic import command
from crm.servicedesk.v1 import events_pb2
from crm_platform.errors import Conflict, NotFound, StaleVersion
from crm_platform.migrations import alembic_config
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import utcnow
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context
from sqlalchemy import func, select

pytestmark = pytest.mark.integration

DELETED = "crm.service.ticket.deleted"


@pytest.fixture
def manager() -> Iterator[None]:
    """A service manager of the north region, whose record scope is the region's tickets."""
    principal = Principal(user_id="mgr-north", roles=("service_manager",), region="north")
    with acting_as(principal, RecordScope(ScopeKind.REGION, region="north")):
        yield


def manager_of(region: str) -> Any:
    principal = Principal(user_id=f"mgr-{region}", roles=("service_manager",), region=region)
    return acting_as(principal, RecordScope(ScopeKind.REGION, region=region))


async def _agent(ctx: Context, agent_id: str, capacity: int = 5) -> None:
    values = {"id": agent_id, "name": agent_id, "skills": ["billing"], "region": "north", "capacity": capacity}
    await handlers.create_agent(ctx, values, idempotency_key="")


async def _ticket(ctx: Context, subject: str, *, key: str = "", **values: Any) -> Any:
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": subject, "category": "billing", "region": "north", **values}, idempotency_key=key
    )
    return ticket


async def _types(ctx: Context, ticket_id: str) -> list[str]:
    return [event_type for event_type, _ in await outbox_events(ctx.uow.engine, repo.metadata, ticket_id)]


async def _open_tickets(ctx: Context, agent_id: str) -> int:
    _, open_tickets = await handlers.get_agent(ctx, agent_id)
    return open_tickets


async def test_an_open_ticket_goes_with_its_comments_and_work_log_at_its_version(ctx: Context, manager: None) -> None:
    await _agent(ctx, "ag-1")
    spam = await _ticket(ctx, "Win a prize", key="spam-1", account_id="acc-1")
    kept = await _ticket(ctx, "Printer jams")
    await handlers.add_comment(ctx, spam["id"], "Looks like spam", public=False, idempotency_key="note-1")
    await handlers.log_work(ctx, spam["id"], 5, "checked the sender", idempotency_key="log-1")
    for ticket in (spam, kept):
        await handlers.add_comment(ctx, ticket["id"], "Seen", public=False, idempotency_key="")
    with manager_of("south"), pytest.raises(NotFound):  # outside the caller's region: not there
        await handlers.delete_ticket(ctx, spam["id"], expected_version=0)
    with pytest.raises(StaleVersion):
        await handlers.delete_ticket(ctx, spam["id"], expected_version=spam["version"] + 1)

    await handlers.delete_ticket(ctx, spam["id"], expected_version=spam["version"])

    with pytest.raises(NotFound):
        await handlers.get_ticket(ctx, spam["id"])
    with pytest.raises(NotFound):
        await handlers.delete_ticket(ctx, spam["id"], expected_version=0)
    async with ctx.uow.engine.connect() as conn:
        for table in (repo.ticket_comments, repo.work_log):
            assert await conn.scalar(select(func.count()).where(table.c.ticket_id == spam["id"])) == 0
    _, comments, _, _ = await handlers.get_ticket(ctx, kept["id"])
    assert [c.body for c in comments] == ["Seen"]
    # Requests repeated under their keys answer that the ticket is gone, and bring nothing back.
    with pytest.raises(NotFound):
        await _ticket(ctx, "Win a prize", key="spam-1", account_id="acc-1")
    with pytest.raises(NotFound):
        await handlers.add_comment(ctx, spam["id"], "Looks like spam", public=False, idempotency_key="note-1")
    with pytest.raises(NotFound):
        await handlers.log_work(ctx, spam["id"], 5, "checked the sender", idempotency_key="log-1")
    assert (await _types(ctx, spam["id"]))[-1] == DELETED
    _, payload = (await outbox_events(ctx.uow.engine, repo.metadata, spam["id"]))[-1]
    event = events_pb2.TicketDeleted.FromString(payload)
    assert (event.ticket_id, event.account_id, event.actor.user_id) == (spam["id"], "acc-1", "mgr-north")
    assert DELETED not in await _types(ctx, kept["id"])


async def test_no_sla_warning_or_breach_fires_for_a_deleted_ticket(ctx: Context, manager: None) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    spam = await _ticket(ctx, "Test ticket, please ignore", priority="urgent")
    kept = await _ticket(ctx, "Line down", priority="urgent")
    ctx.clock = lambda: start + timedelta(minutes=5)
    await handlers.delete_ticket(ctx, spam["id"], expected_version=0)

    # Past both urgent targets (15 min, 4 h): the kept ticket is warned, breached and escalated twice.
    ctx.clock = lambda: start + timedelta(hours=5)
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
    assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
    assert (await _types(ctx, kept["id"])).count("crm.service.ticket.sla_breached") == 2
    assert await _types(ctx, spam["id"]) == [
        "crm.service.ticket.created",
        "crm.service.ticket.escalated",  # no agent in the region when it came in
        DELETED,
    ]


async def test_a_deleted_queued_ticket_is_offered_to_nobody(ctx: Context, manager: None) -> None:
    duplicate = await _ticket(ctx, "Invoice wrong (sent twice)")
    original = await _ticket(ctx, "Invoice wrong")
    await handlers.delete_ticket(ctx, duplicate["id"], expected_version=0)
    await _agent(ctx, "ag-1")

    assert await handlers.dispatch_queued(ctx, batch_size=10) == 1
    assert await _open_tickets(ctx, "ag-1") == 1
    row, _, _, _ = await handlers.get_ticket(ctx, original["id"])
    assert (row.status, row.assignee_id) == ("assigned", "ag-1")


async def test_deleting_an_agents_tickets_lowers_the_load_least_loaded_dispatch_compares(
    ctx: Context, manager: None
) -> None:
    await _agent(ctx, "ag-a", capacity=2)
    await _agent(ctx, "ag-b", capacity=2)
    first, second, third = [await _ticket(ctx, f"Invoice {n}") for n in (1, 2, 3)]
    assert [t["assignee_id"] for t in (first, second, third)] == ["ag-a", "ag-b", "ag-a"]
    assert (await _open_tickets(ctx, "ag-a"), await _open_tickets(ctx, "ag-b")) == (2, 1)

    for duplicate in (first, third):
        await handlers.delete_ticket(ctx, duplicate["id"], expected_version=0)

    assert (await _open_tickets(ctx, "ag-a"), await _open_tickets(ctx, "ag-b")) == (0, 1)
    # ag-a, full before, now has fewer open tickets than ag-b.
    assert (await _ticket(ctx, "Invoice 4"))["assignee_id"] == "ag-a"


async def test_a_ticket_resolved_or_closed_now_or_before_a_reopening_is_kept(ctx: Context, manager: None) -> None:
    await _agent(ctx, "ag-1")
    resolved, closed, reopened, rated = [await _ticket(ctx, f"Issue {n}") for n in (1, 2, 3, 4)]
    for ticket in (resolved, reopened, rated):
        await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    await handlers.change_status(ctx, closed["id"], "closed", expected_version=0, note="spam")
    await handlers.submit_csat(ctx, rated["id"], 2, "came back", idempotency_key="")
    for ticket in (reopened, rated):  # reopened, then worked on again as if never resolved
        await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")
        await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")

    refusals = {}
    for name, ticket in (("resolved", resolved), ("closed", closed), ("reopened", reopened), ("rated", rated)):
        with pytest.raises(Conflict) as caught:
            await handlers.delete_ticket(ctx, ticket["id"], expected_version=0)
        refusals[name] = (caught.value.reason, caught.value.detail.split(":")[0])
        assert DELETED not in await _types(ctx, ticket["id"])

    assert refusals == {
        "resolved": ("TICKET_ON_RECORD", f"ticket {resolved['id']} is resolved"),
        "closed": ("TICKET_ON_RECORD", f"ticket {closed['id']} is closed"),
        "reopened": ("TICKET_ON_RECORD", f"ticket {reopened['id']} is in_progress after it was resolved and reopened"),
        "rated": ("TICKET_ON_RECORD", f"ticket {rated['id']} is in_progress after it was resolved and reopened"),
    }
    _, _, _, csat = await handlers.get_ticket(ctx, rated["id"])
    assert csat.score == 2


async def test_tickets_resolved_before_the_first_resolution_was_kept_are_kept_too(
    ctx: Context, each_database_url: str, manager: None
) -> None:
    """Migration 0012 takes an existing ticket's first resolution from the return visit it scheduled,
    its current resolution, or the survey that followed one."""
    start = utcnow()
    ctx.clock = lambda: start
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "vip", "A", "north")
    await _agent(ctx, "ag-1")
    visited = await _ticket(ctx, "Robot arm stuck", account_id="vip")
    resolved, rated, untouched = [await _ticket(ctx, f"Issue {n}") for n in (1, 2, 3)]
    for ticket in (visited, resolved, rated):
        await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    ctx.clock = lambda: start + timedelta(hours=1)
    await handlers.submit_csat(ctx, rated["id"], 1, "not fixed", idempotency_key="")
    ctx.clock = lambda: start + timedelta(hours=2)
    for ticket in (visited, rated):
        await handlers.change_status(ctx, ticket["id"], "reopened", expected_version=0, note="")
        await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")

    config = alembic_config(MIGRATIONS, each_database_url)
    await asyncio.to_thread(command.downgrade, config, "0011")
    await asyncio.to_thread(command.upgrade, config, "head")

    t = repo.tickets
    async with ctx.uow.engine.connect() as conn:
        kept = {row.id: row.first_resolved_at for row in await conn.execute(select(t))}
    assert kept == {
        visited["id"]: start,
        resolved["id"]: start,
        rated["id"]: start + timedelta(hours=1),  # no later than the survey's answer
        untouched["id"]: None,
    }
    for ticket in (visited, rated):
        with pytest.raises(Conflict):
            await handlers.delete_ticket(ctx, ticket["id"], expected_version=0)
    await handlers.delete_ticket(ctx, untouched["id"], expected_version=0)
