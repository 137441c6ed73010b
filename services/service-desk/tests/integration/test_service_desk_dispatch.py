"""Auto-dispatch under concurrency: the capacity cap holds on both databases, a dispatch whose
agents another dispatch holds waits for them rather than leaving the ticket queued, and the dispatch
timer and a create never wait on each other in a cycle."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm.audit.v1.events_pb2 import AuditRecorded
from crm_platform.db import create_engine
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, SYSTEM, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrate_to_head
from crm_platform.testing.outbox import outbox_events
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = Principal(user_id="admin", roles=("admin",))
BILLING_EAST = {"subject": "Invoice is wrong", "category": "billing", "region": "east"}


async def _desk(url: str) -> tuple[AsyncEngine, Context]:
    await migrate_to_head(url, MIGRATIONS)
    engine = create_engine(url)
    return engine, Context(uow=UnitOfWork(engine, repo.metadata, source="/test"))


@pytest.fixture
async def desk_each_database(each_database_url: str) -> AsyncIterator[Context]:
    engine, ctx = await _desk(each_database_url)
    yield ctx
    await engine.dispose()


@pytest.fixture
async def desk_on_postgres(postgres_url: str) -> AsyncIterator[Context]:
    engine, ctx = await _desk(postgres_url)
    yield ctx
    await engine.dispose()


async def _agents(ctx: Context, *specs: tuple[str, str, int]) -> None:
    for agent_id, region, capacity in specs:
        values = {"id": agent_id, "name": agent_id, "skills": ["billing"], "region": region, "capacity": capacity}
        await handlers.create_agent(ctx, values, idempotency_key="")


async def _create(ctx: Context) -> Any:
    with acting_as(ADMIN, ALL_RECORDS):
        ticket, _ = await handlers.create_ticket(ctx, dict(BILLING_EAST), idempotency_key="")
    return ticket


async def test_concurrent_dispatches_never_fill_an_agent_past_capacity(desk_each_database: Context) -> None:
    ctx = desk_each_database
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("east-1", "east", 2), ("east-2", "east", 2), ("east-3", "east", 2), ("west-1", "west", 9))

    tickets = await asyncio.gather(*(_create(ctx) for _ in range(12)))

    per_agent = Counter(t["assignee_id"] for t in tickets if t["assignee_id"])
    assert per_agent == {"east-1": 2, "east-2": 2, "east-3": 2}
    queued = [t for t in tickets if not t["assignee_id"]]
    assert len(queued) == 6
    assert all(t["status"] == "new" and t["escalation_reason"] == "no_agent_available" for t in queued)
    async with ctx.uow.engine.connect() as conn:
        stored = await repo.open_ticket_counts(conn, ["east-1", "east-2", "east-3", "west-1"])
    assert stored == {"east-1": 2, "east-2": 2, "east-3": 2}


async def test_the_dispatch_timer_assigns_queued_tickets_and_audits_each(desk_each_database: Context) -> None:
    ctx = desk_each_database
    queued = await _create(ctx)  # no agent yet: queued
    assert queued["assignee_id"] == ""
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("east-1", "east", 1))
    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.dispatch_queued(ctx, batch_size=10) == 1
        assert await handlers.dispatch_queued(ctx, batch_size=10) == 0

    # No request made the assignment for the gateway to audit: the service's record goes with it.
    [audit] = [
        AuditRecorded.FromString(payload)
        for event_type, payload in await outbox_events(ctx.uow.engine, repo.metadata, queued["id"])
        if event_type == "crm.audit.record.recorded"
    ]
    assert (audit.actor.user_id, audit.action, audit.resource, audit.record_id) == (
        "system",
        "assign",
        "tickets",
        queued["id"],
    )
    assert (audit.method, audit.path) == ("JOB", "dispatch-queue")
    assert audit.reason.startswith("queued since ") and audit.reason.endswith("agent east-1 had capacity")
    assert {"assignee_id", "status", "version"} <= set(audit.fields) and "subject" not in audit.fields
    assert (audit.before["status"], audit.after["status"], audit.after["assignee_id"]) == ("new", "assigned", "east-1")


async def test_queued_tickets_no_agent_can_take_do_not_hold_up_those_behind(desk_each_database: Context) -> None:
    ctx = desk_each_database
    with acting_as(ADMIN, ALL_RECORDS):
        printers = [
            (await handlers.create_ticket(ctx, {"subject": f"Printer {n}", "category": "printer"}, idempotency_key=""))[
                0
            ]
            for n in range(3)
        ]
        network, _ = await handlers.create_ticket(ctx, {"subject": "VPN", "category": "network"}, idempotency_key="")
        await handlers.create_agent(ctx, {"id": "net-1", "name": "Net", "skills": ["network"]}, idempotency_key="")
    with acting_as(SYSTEM, ALL_RECORDS):
        # Two at a time: the two oldest printer tickets, which nobody can take, go to the back.
        assert await handlers.dispatch_queued(ctx, batch_size=2) == 0
        assert await handlers.dispatch_queued(ctx, batch_size=2) == 1
    async with ctx.uow.engine.connect() as conn:
        t = repo.tickets
        rows = {row.id: row for row in await conn.execute(select(t))}
    assert rows[network["id"]].assignee_id == "net-1"
    assert all(rows[p["id"]].assignee_id == "" and rows[p["id"]].dispatch_offered_at for p in printers)


@pytest.mark.parametrize(
    "pressing",
    [{"priority": "urgent"}, {"priority": "normal", "account_id": "acc-vip"}],
    ids=["urgent", "raised-for-vip"],
)
async def test_a_freed_agent_takes_the_most_urgent_queued_ticket_not_the_oldest(
    desk_each_database: Context, pressing: dict[str, str]
) -> None:
    ctx = desk_each_database
    with acting_as(SYSTEM, ALL_RECORDS):
        async with ctx.uow.begin() as tx:
            await handlers.apply_account(tx, "acc-vip", "A", "east")  # VIP 优先安排: normal is served as high
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("east-1", "east", 1))
        busy = await _create(ctx)
        older, _ = await handlers.create_ticket(ctx, {**BILLING_EAST, "priority": "normal"}, idempotency_key="")
        newer, _ = await handlers.create_ticket(ctx, {**BILLING_EAST, **pressing}, idempotency_key="")
        assert (busy["assignee_id"], older["assignee_id"], newer["assignee_id"]) == ("east-1", "", "")
        await handlers.change_status(ctx, busy["id"], "resolved", expected_version=0, note="")  # east-1 frees up

    with acting_as(SYSTEM, ALL_RECORDS):
        assert await handlers.dispatch_queued(ctx, batch_size=10) == 1
    async with ctx.uow.engine.connect() as conn:
        t = repo.tickets
        rows = {row.id: row for row in await conn.execute(select(t))}
    assert (rows[newer["id"]].assignee_id, rows[older["id"]].assignee_id) == ("east-1", "")


async def _hold(engine: AsyncEngine, *agent_ids: str) -> tuple[Any, Any]:
    """Another dispatch's transaction, holding the agents' rows until it is rolled back."""
    conn = await engine.connect()
    held = await conn.begin()
    a = repo.agents
    await conn.execute(select(a.c.id).where(a.c.id.in_(agent_ids)).with_for_update())
    return conn, held


async def test_a_dispatch_waits_for_an_agent_when_every_candidate_is_held(
    desk_on_postgres: Context,
) -> None:
    ctx = desk_on_postgres
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("east-1", "east", 5), ("east-2", "east", 5))
    conn, held = await _hold(ctx.uow.engine, "east-1", "east-2")  # another dispatch is choosing
    try:
        waiting = asyncio.create_task(_create(ctx))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the agents have room: the ticket waits for one, it is not queued
    finally:
        await held.rollback()
        await conn.close()
    async with asyncio.timeout(5):
        ticket = await waiting
    assert ticket["assignee_id"] == "east-1" and ticket["status"] == "assigned"


async def test_the_dispatch_timer_and_a_create_of_a_ticket_without_region_do_not_deadlock(
    desk_on_postgres: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = desk_on_postgres
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("a1", "east", 50), ("a2", "west", 50))
        for subject, priority, region in (("w", "urgent", "west"), ("e", "low", "east")):  # queued: west first
            values = {"subject": subject, "priority": priority, "region": region}
            await handlers.create_ticket(ctx, values, idempotency_key="", skip_dispatch=True)
    choose_agent = handlers._choose_agent
    west_chosen, go_on = asyncio.Event(), asyncio.Event()

    async def pausing_after_west(conn: Any, category: str, region: str) -> Any:
        chosen = await choose_agent(conn, category, region)
        if region == "west" and not west_chosen.is_set():
            west_chosen.set()
            await go_on.wait()  # the timer, between its two tickets
        return chosen

    monkeypatch.setattr(handlers, "_choose_agent", pausing_after_west)

    async def timer() -> int:
        with acting_as(ADMIN, ALL_RECORDS):
            return await handlers.dispatch_queued(ctx, batch_size=10)

    async def create_without_region() -> Any:  # an admin's ticket for no account: any agent may take it
        with acting_as(ADMIN, ALL_RECORDS):
            ticket, _ = await handlers.create_ticket(ctx, {"subject": "no region"}, idempotency_key="")
        return ticket

    timing = asyncio.create_task(timer())
    await asyncio.wait_for(west_chosen.wait(), 5)
    creating = asyncio.create_task(create_without_region())
    await asyncio.sleep(0.5)  # the create waits for the agents the timer holds
    go_on.set()
    async with asyncio.timeout(10):
        assigned, ticket = await asyncio.gather(timing, creating)  # neither is aborted as a deadlock victim
    assert assigned == 2
    assert ticket["assignee_id"] in ("a1", "a2")


async def test_a_ticket_for_no_account_is_of_its_creators_region_and_read_back_by_them(
    desk_each_database: Context,
) -> None:
    ctx = desk_each_database
    manager = Principal(user_id="m-north", roles=("service_manager",), region="north")
    in_their_region = RecordScope(ScopeKind.REGION, region="north")
    with acting_as(ADMIN, ALL_RECORDS):
        await _agents(ctx, ("north-1", "north", 5), ("south-1", "south", 5))

    with acting_as(manager, in_their_region):
        filed, _ = await handlers.create_ticket(ctx, {"subject": "Printer", "category": "billing"}, idempotency_key="")
        named, _ = await handlers.create_ticket(ctx, dict(BILLING_EAST), idempotency_key="")
        read_back = await handlers.get_ticket(ctx, filed["id"])

    assert (filed["region"], filed["assignee_id"]) == ("north", "north-1")
    assert read_back[0].id == filed["id"]
    assert named["region"] == "east"  # a region the ticket names stays its own
