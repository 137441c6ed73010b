"""The embedded default: the same handlers on SQLite (no PostgreSQL-only SQL on any path): tickets,
dispatch, status machine, VIP raise, return visits, CSAT, the SLA timer and the LIKE-based KB search."""

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm_platform.custom_fields_service import CustomFieldServicer
from crm_platform.errors import AlreadyExists, Conflict, NotFound, StaleVersion, ValidationFailed
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.principal import ALL_RECORDS, SYSTEM, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import utcnow
from service_desk import handlers
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import TICKET_ENTITY, Context, Page
from service_desk.repository import TicketFilter, custom_fields, idempotency_keys, metadata
from sqlalchemy import select

pytestmark = pytest.mark.integration

AGENT = Principal(user_id="ag-1", roles=("service_agent",), team="desk", region="north")
AGENT_SCOPE = RecordScope(ScopeKind.OWN, owner_id="ag-1")


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'desk.db'}"
    async with migrated_engine(url, MIGRATIONS) as engine:
        yield Context(uow=UnitOfWork(engine, metadata, source="/test"), return_visit_days=2)


async def test_sqlite_ticket_lifecycle_dispatch_and_kb(ctx: Context) -> None:
    with acting_as(SYSTEM, ALL_RECORDS):
        async with ctx.uow.begin() as tx:
            await handlers.apply_account(tx, "acc-1", "A", "north")
        async with ctx.uow.begin() as tx:  # a later AccountUpdated overwrites the projection
            await handlers.apply_account(tx, "acc-1", "A", "north")
        await handlers.create_agent(
            ctx, {"id": "ag-1", "name": "Ann", "skills": ["network"], "region": "north", "capacity": 1},
            idempotency_key="",
        )  # fmt: skip
        with pytest.raises(AlreadyExists):
            await handlers.create_agent(ctx, {"id": "ag-1", "name": "Ann again"}, idempotency_key="")
        await handlers.create_article(
            ctx, {"title": "Router keeps rebooting", "body": "Update the router firmware.", "published": True},
            idempotency_key="",
        )  # fmt: skip

        ticket, suggested = await handlers.create_ticket(
            ctx,
            {"subject": "Router rebooting every hour", "channel": "wechat", "category": "network",
             "account_id": "acc-1", "priority": "low"},
            idempotency_key="k1",
        )  # fmt: skip
        assert ticket["assignee_id"] == "ag-1" and ticket["status"] == "assigned"
        assert ticket["effective_priority"] == "normal" and ticket["region"] == "north"
        assert [a.title for a in suggested] == ["Router keeps rebooting"]
        found, _ = await handlers.search_articles(ctx, "firmware", category="", limit=10, include_unpublished=False)
        assert [a.title for a in found] == ["Router keeps rebooting"]

        # Capacity 1 is full: the next network ticket is queued and escalated.
        queued, _ = await handlers.create_ticket(
            ctx, {"subject": "VPN down", "channel": "web", "category": "network"}, idempotency_key=""
        )
        assert queued["status"] == "new" and queued["escalated"]

    with acting_as(AGENT, AGENT_SCOPE):
        with pytest.raises(NotFound):
            await handlers.get_ticket(ctx, queued["id"])  # not theirs
        with pytest.raises(StaleVersion):
            await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=99, note="")
        # Created (version 1) and given to the agent (2) in one request.
        await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=2, note="started")
        resolved = (await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")).record
        with pytest.raises(Conflict):
            await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
        csat = await handlers.submit_csat(ctx, ticket["id"], 3, "ok", idempotency_key="c1")
        again = await handlers.submit_csat(ctx, ticket["id"], 3, "ok", idempotency_key="c1")
        assert again.id == csat["id"]  # the idempotency key replays the first answer
        visits, _ = await handlers.list_return_visits(
            ctx, account_id="", status="open", assignee_id="", due_before=None, page=Page()
        )
        assert len(visits) == 1
        assert visits[0].due_at.replace(tzinfo=None) == (resolved["resolved_at"] + timedelta(days=2)).replace(
            tzinfo=None
        )
        rows, _ = await handlers.list_tickets(ctx, TicketFilter(statuses=["resolved"]), Page())
        assert [r.id for r in rows] == [ticket["id"]]

    with acting_as(SYSTEM, ALL_RECORDS):
        # The agent is free again: the queue dispatch picks the waiting ticket.
        assert await handlers.dispatch_queued(ctx, batch_size=10) == 1
        ctx.clock = lambda: utcnow() + timedelta(days=2)
        assert await handlers.run_sla_timer(ctx, batch_size=10) == 1  # only the open one is due
        async with ctx.uow.engine.connect() as conn:
            outbox = metadata.tables["outbox"]
            types = [t for (t,) in await conn.execute(select(outbox.c.type).order_by(outbox.c.seq))]
        assert types.count("crm.service.ticket.sla_breached") == 2  # first response and resolution
        assert "crm.service.return_visit.scheduled" in types and "crm.service.csat.submitted" in types


async def test_tier_projection_update_raises_the_priority(ctx: Context) -> None:
    async with ctx.uow.begin() as tx:
        assert isinstance(tx, Transaction)
        await handlers.apply_account(tx, "acc-2", "B", "west")
    async with ctx.uow.begin() as tx:
        await handlers.apply_account(tx, "acc-2", "A", "west")
    with acting_as(SYSTEM, ALL_RECORDS):
        ticket, _ = await handlers.create_ticket(
            ctx, {"subject": "Upgrade", "channel": "email", "account_id": "acc-2", "priority": "high"},
            idempotency_key="", skip_dispatch=True,
        )  # fmt: skip
    assert ticket["account_tier"] == "A" and ticket["effective_priority"] == "urgent"
    assert not ticket["escalated"]  # skip_dispatch queues without escalating

    # The account drops to tier B: its open ticket gets the high targets back (1 h / 8 h).
    async with ctx.uow.begin() as tx:
        assert await handlers.apply_account(tx, "acc-2", "B", "west") == 1
    with acting_as(SYSTEM, ALL_RECORDS):
        row, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
        assert row.effective_priority == "high" and row.account_tier == "B"
        assert row.first_response_due_at - row.created_at == timedelta(hours=1)
        assert row.resolution_due_at - row.created_at == timedelta(hours=8)
    # Merged into another account: the ticket follows the survivor.
    async with ctx.uow.begin() as tx:
        await handlers.apply_account_merge(tx, "acc-9", "acc-2")
    with acting_as(SYSTEM, ALL_RECORDS):
        row, _, _, _ = await handlers.get_ticket(ctx, ticket["id"])
    assert row.account_id == "acc-9"


async def test_ticket_custom_fields_validated_and_merged(ctx: Context) -> None:
    definitions = CustomFieldServicer(ctx.uow.engine, custom_fields, keys=idempotency_keys, entities=(TICKET_ENTITY,))

    async def upsert(**fields: Any) -> None:
        definition = cf_pb.CustomFieldDefinition(**fields)
        await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)

    with acting_as(SYSTEM, ALL_RECORDS):
        await upsert(entity="ticket", key="serial_no", label="Serial", type="text", required=True)
        await upsert(entity="ticket", key="severity", label="Severity", type="enum", options=["minor", "major"])
        with pytest.raises(ValidationFailed) as caught:
            await upsert(entity="account", key="x", label="X", type="text")
        assert caught.value.errors[0].field == "entity"
        with pytest.raises(ValidationFailed) as caught:
            await handlers.create_ticket(ctx, {"subject": "s", "channel": "web"}, idempotency_key="")
        assert caught.value.errors[0].field == "custom.serial_no"  # required
        with pytest.raises(ValidationFailed) as caught:
            await handlers.create_ticket(
                ctx, {"subject": "s", "channel": "web", "custom": {"serial_no": "A1", "severity": "huge"}},
                idempotency_key="",
            )  # fmt: skip
        assert caught.value.errors[0].field == "custom.severity"
        ticket, _ = await handlers.create_ticket(
            ctx, {"subject": "s", "channel": "web", "custom": {"serial_no": "A1", "severity": "minor"}},
            idempotency_key="", skip_dispatch=True,
        )  # fmt: skip
        updated = (
            await handlers.update_ticket(ctx, ticket["id"], {"custom": {"severity": "major"}}, expected_version=1)
        ).record
        assert updated["custom"] == {"serial_no": "A1", "severity": "major"} and updated["version"] == 2
        # List filters by custom field (JSON1 on SQLite), typed by the definitions.
        for pairs, expected in (([("severity", "major")], [ticket["id"]]), ([("severity", "minor")], [])):
            rows, _ = await handlers.list_tickets(ctx, TicketFilter(), Page(), pairs)
            assert [r.id for r in rows] == expected
        with pytest.raises(ValidationFailed) as caught:
            await handlers.list_tickets(ctx, TicketFilter(), Page(), [("severity", "huge")])
        assert caught.value.errors[0].field == "custom.severity"
        listed = await definitions.ListCustomFields(cf_pb.ListCustomFieldsRequest(entity="ticket"), None)
        assert [d.key for d in listed.items] == ["serial_no", "severity"]
        severity = cf_pb.DeleteCustomFieldRequest(entity="ticket", key="severity")
        await definitions.DeleteCustomField(severity, None)
        with pytest.raises(NotFound):
            await definitions.DeleteCustomField(severity, None)


async def test_waiting_for_the_customer_pauses_the_resolution_clock(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    with acting_as(SYSTEM, ALL_RECORDS):
        await handlers.create_agent(ctx, {"id": "ag-9", "name": "Bo"}, idempotency_key="")
        ticket, _ = await handlers.create_ticket(
            ctx, {"subject": "Replace part", "channel": "phone", "priority": "high"}, idempotency_key=""
        )
        assert ticket["assignee_id"] == "ag-9"
        assert ticket["resolution_due_at"] == start + timedelta(hours=8)
        await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
        ctx.clock = lambda: start + timedelta(hours=1)
        await handlers.change_status(ctx, ticket["id"], "waiting_customer", expected_version=0, note="")
        # Paused: even long past the original target, the timer has nothing to say.
        ctx.clock = lambda: start + timedelta(hours=9)
        assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
        resumed = (await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")).record
        assert resumed["resolution_due_at"] == start + timedelta(hours=16)  # 8 h target + 8 h waited
        assert resumed["sla_paused_at"] is None and resumed["sla_paused_seconds"] == 8 * 3600
        # A later priority change keeps the waited time.
        urgent = (await handlers.update_ticket(ctx, ticket["id"], {"priority": "urgent"}, expected_version=0)).record
        assert urgent["resolution_due_at"] == start + timedelta(hours=12)  # 4 h target + 8 h waited
        # 80 % of the 4 h of working time is 3.2 h: with 8 h waited, 11.2 h after creation.
        ctx.clock = lambda: start + timedelta(hours=11, minutes=10)
        assert await handlers.run_sla_timer(ctx, batch_size=10) == 0
        ctx.clock = lambda: start + timedelta(hours=11, minutes=15)
        assert await handlers.run_sla_timer(ctx, batch_size=10) == 1
