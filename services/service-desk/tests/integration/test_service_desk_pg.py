"""The service desk over gRPC on PostgreSQL with a real broker: dispatch, VIP raise from the
accounts projection, status machine, CSAT, return visits, KB search, and the SLA timer racing."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as account_events
from crm.servicedesk.v1 import events_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.grpc_errors import RemoteError, from_rpc_error
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as, outgoing_metadata
from crm_platform.service import ServiceApp
from crm_platform.testing.database import migrate_to_head
from crm_platform.testing.kafka import EventCollector, produce_event
from crm_platform.testing.polling import eventually
from crm_platform.timeutil import utcnow
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS, build_with_context
from service_desk.config import ServiceDeskSettings
from service_desk.handlers import Context
from sqlalchemy import func, select

pytestmark = pytest.mark.integration

TOPIC = "crm.service.v1"
ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


def agent_caller(user_id: str) -> tuple[Principal, RecordScope]:
    principal = Principal(user_id=user_id, roles=("service_agent",), team="desk", region="east")
    return principal, RecordScope(ScopeKind.OWN, owner_id=user_id)


@dataclass
class Running:
    app: ServiceApp
    stub: ServiceDeskServiceStub
    ctx: Context
    events: EventCollector

    async def call(self, method: str, request: Any, who: tuple[Principal, RecordScope] = ADMIN) -> Any:
        return await getattr(self.stub, method)(request, metadata=outgoing_metadata(*who), timeout=15)

    async def fails(self, method: str, request: Any, who: tuple[Principal, RecordScope] = ADMIN) -> RemoteError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call(method, request, who)
        return from_rpc_error(caught.value)


@pytest.fixture
async def desk(postgres_url: str, kafka_settings: KafkaSettings) -> AsyncIterator[Running]:
    await migrate_to_head(postgres_url, MIGRATIONS)
    settings = ServiceDeskSettings(
        database_url=postgres_url,
        grpc_port=0,
        kafka=kafka_settings,
        sla_job_interval_seconds=3600,
        dispatch_job_interval_seconds=3600,
    )
    app, ctx = build_with_context(settings, create_engine(postgres_url))
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    collector = EventCollector(kafka_settings.bootstrap_servers, [TOPIC])
    await collector.start()
    try:
        yield Running(app=app, stub=ServiceDeskServiceStub(channel), ctx=ctx, events=collector)
    finally:
        await collector.stop()
        await channel.close()
        await app.stop()


async def _tier(engine: Any, account_id: str) -> str | None:
    async with engine.connect() as conn:
        tier: str | None = await conn.scalar(
            select(repo.account_tiers.c.tier).where(repo.account_tiers.c.account_id == account_id)
        )
    return tier


async def test_ticket_dispatch_vip_raise_lifecycle_and_csat(desk: Running, kafka_settings: KafkaSettings) -> None:
    svc = desk
    for agent_id, skills in (("agent-1", ["billing"]), ("agent-2", ["billing", "network"]), ("agent-3", ["network"])):
        await svc.call(
            "CreateAgent",
            pb.CreateAgentRequest(
                agent=pb.AgentInput(
                    id=agent_id, name=agent_id, skills=skills, region="east", capacity=3, available=True
                )
            ),
        )
    await svc.call(
        "CreateKbArticle",
        pb.CreateKbArticleRequest(
            article=pb.KbArticleInput(
                title="Invoice shows the wrong amount",
                body="How to correct an invoice amount and resend the invoice.",
                category="billing",
                published=True,
            )
        ),
    )

    # The accounts context announces a tier-A account; the desk learns it from the event only.
    vip = accounts_pb2.Account(id="acc-vip", name="Big Customer", tier="A", region="east")
    await produce_event(kafka_settings.bootstrap_servers, account_events.AccountCreated(account=vip), key=vip.id)
    tier = await eventually(lambda: _tier(svc.app.engine, "acc-vip"), lambda found: found == "A", timeout=40)
    assert tier == "A"

    create = pb.CreateTicketRequest(
        ticket=pb.TicketInput(
            account_id="acc-vip", subject="Invoice amount is wrong", channel="phone", category="billing",
            priority="normal",
        ),
        idempotency_key="t-1",
    )  # fmt: skip
    created = await svc.call("CreateTicket", create)
    ticket = created.ticket
    assert ticket.status == "assigned" and ticket.assignee_id == "agent-1"  # least loaded, lowest id
    assert ticket.priority == "normal" and ticket.effective_priority == "high" and ticket.account_tier == "A"
    assert ticket.region == "east"  # from the account projection
    due = ticket.first_response_due_at.ToDatetime() - ticket.created_at.ToDatetime()
    assert due == timedelta(hours=1)  # the high targets
    assert [a.title for a in created.suggested_articles] == ["Invoice shows the wrong amount"]

    again = await svc.call("CreateTicket", create)
    assert again.ticket.id == ticket.id
    with pytest.raises(grpc.aio.AioRpcError) as reused:  # the key of another request
        await svc.call(
            "CreateTicket",
            pb.CreateTicketRequest(ticket=pb.TicketInput(subject="x", channel="web"), idempotency_key="t-1"),
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The next billing ticket goes to agent-2 (agent-1 now holds one).
    second = (
        await svc.call(
            "CreateTicket",
            pb.CreateTicketRequest(
                ticket=pb.TicketInput(subject="Refund", channel="email", category="billing", region="east")
            ),
        )
    ).ticket
    assert second.assignee_id == "agent-2"

    # Nobody has the skill: queued (still new) and escalated.
    queued = (
        await svc.call(
            "CreateTicket",
            pb.CreateTicketRequest(ticket=pb.TicketInput(subject="Printer", channel="web", category="hardware")),
        )
    ).ticket
    assert queued.status == "new" and not queued.assignee_id and queued.escalated
    assert queued.escalation_reason == "no_agent_available"

    # Record scope: agent-2 cannot see agent-1's ticket.
    hidden = await svc.fails("GetTicket", pb.GetTicketRequest(ticket_id=ticket.id), agent_caller("agent-2"))
    assert hidden.code == grpc.StatusCode.NOT_FOUND

    me = agent_caller("agent-1")
    illegal = await svc.fails(
        "ChangeTicketStatus", pb.ChangeTicketStatusRequest(ticket_id=ticket.id, status="reopened"), me
    )
    assert illegal.code == grpc.StatusCode.FAILED_PRECONDITION and illegal.reason == "ILLEGAL_TRANSITION"
    early = await svc.fails("SubmitCsat", pb.SubmitCsatRequest(ticket_id=ticket.id, score=5), me)
    assert early.code == grpc.StatusCode.FAILED_PRECONDITION

    await svc.call(
        "AddTicketComment", pb.AddTicketCommentRequest(ticket_id=ticket.id, body="Looking into it", public=True), me
    )
    await svc.call("LogWork", pb.LogWorkRequest(ticket_id=ticket.id, minutes=25, note="checked ERP"), me)
    await svc.call("ChangeTicketStatus", pb.ChangeTicketStatusRequest(ticket_id=ticket.id, status="in_progress"), me)
    resolved = (
        await svc.call("ChangeTicketStatus", pb.ChangeTicketStatusRequest(ticket_id=ticket.id, status="resolved"), me)
    ).ticket
    assert resolved.status == "resolved" and resolved.HasField("resolved_at")

    bad = await svc.fails("SubmitCsat", pb.SubmitCsatRequest(ticket_id=ticket.id, score=9), me)
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "score" in bad.message
    csat = await svc.call("SubmitCsat", pb.SubmitCsatRequest(ticket_id=ticket.id, score=4, comment="quick"), me)
    assert csat.response.score == 4 and csat.response.account_id == "acc-vip"
    twice = await svc.fails("SubmitCsat", pb.SubmitCsatRequest(ticket_id=ticket.id, score=5), me)
    assert twice.code == grpc.StatusCode.ALREADY_EXISTS

    detail = await svc.call("GetTicket", pb.GetTicketRequest(ticket_id=ticket.id), me)
    assert [c.body for c in detail.comments] == ["Looking into it"]
    assert detail.work_log[0].minutes == 25 and detail.csat.score == 4
    assert detail.ticket.HasField("first_responded_at")

    # Tier A: a return visit three days after resolution.
    visits = (await svc.call("ListReturnVisits", pb.ListReturnVisitsRequest(account_id="acc-vip"))).items
    assert len(visits) == 1 and visits[0].ticket_id == ticket.id and visits[0].assignee_id == "agent-1"
    gap = visits[0].due_at.ToDatetime() - resolved.resolved_at.ToDatetime()
    assert abs(gap - timedelta(days=3)) < timedelta(seconds=1)

    # The 360 view's call: open tickets of an account.
    open_statuses = ["new", "assigned", "in_progress", "waiting_customer", "reopened"]
    open_of_vip = await svc.call("ListTickets", pb.ListTicketsRequest(account_id="acc-vip", statuses=open_statuses))
    assert list(open_of_vip.items) == []
    assert len((await svc.call("ListTickets", pb.ListTicketsRequest(account_id="acc-vip"))).items) == 1
    mine = await svc.call("ListTickets", pb.ListTicketsRequest(), agent_caller("agent-2"))
    assert [t.id for t in mine.items] == [second.id]

    # The agent list reports loads; an agent joining with the skill picks up the queued ticket.
    await svc.call(
        "CreateAgent",
        pb.CreateAgentRequest(
            agent=pb.AgentInput(id="agent-4", name="Hw", skills=["hardware"], region="", capacity=2, available=True)
        ),
    )
    with acting_as(*ADMIN):
        assert await handlers.dispatch_queued(svc.ctx, batch_size=10) == 1
    picked = (await svc.call("GetTicket", pb.GetTicketRequest(ticket_id=queued.id))).ticket
    assert picked.assignee_id == "agent-4" and picked.status == "assigned"

    def types_of(ticket_id: str, records: list[Any]) -> list[str]:
        return [r.event_type for r in records if r.key == ticket_id]

    records = await svc.events.wait_for(
        lambda rs: (
            "crm.service.csat.submitted" in types_of(ticket.id, rs)
            and "crm.service.ticket.assigned" in types_of(queued.id, rs)
        )
    )
    assert types_of(ticket.id, records) == [
        "crm.service.ticket.created",
        "crm.service.ticket.assigned",
        "crm.service.ticket.status_changed",
        "crm.service.ticket.updated",  # the agent's public comment: the first response
        "crm.service.ticket.status_changed",
        "crm.service.ticket.status_changed",
        "crm.service.ticket.resolved",
        "crm.service.return_visit.scheduled",
        "crm.service.csat.submitted",
    ]
    assert types_of(queued.id, records) == [
        "crm.service.ticket.created",
        "crm.service.ticket.escalated",
        "crm.service.ticket.assigned",
        "crm.service.ticket.status_changed",
    ]
    assigned = next(r for r in records if r.key == ticket.id and r.event_type == "crm.service.ticket.assigned").decode(
        events_pb2.TicketAssigned
    )
    assert assigned.ticket.assignee_id == "agent-1"


async def test_kb_full_text_search_on_postgres(desk: Running) -> None:
    svc = desk
    for title, body, published in (
        ("Reset a password", "Open settings, choose security and reset the password.", True),
        ("VPN drops every hour", "Renew the VPN certificate on the gateway.", True),
        ("Draft: password policy", "Passwords expire after 90 days.", False),
    ):
        await svc.call(
            "CreateKbArticle",
            pb.CreateKbArticleRequest(article=pb.KbArticleInput(title=title, body=body, published=published)),
        )
    found = await svc.call("SearchKbArticles", pb.SearchKbArticlesRequest(q="password reset"))
    assert [a.title for a in found.items] == ["Reset a password"]
    drafts = await svc.call("SearchKbArticles", pb.SearchKbArticlesRequest(q="password", include_unpublished=True))
    assert {a.title for a in drafts.items} == {"Reset a password", "Draft: password policy"}
    async with svc.app.engine.connect() as conn:
        await conn.exec_driver_sql("SET enable_seqscan = off")  # 3 rows: make the planner show the index
        plan = "\n".join(
            row[0]
            for row in await conn.exec_driver_sql(
                f"EXPLAIN SELECT id FROM kb_articles WHERE {repo.KB_SEARCH_COLUMN} @@ to_tsquery('simple', 'password')"
            )
        )
    assert "ix_kb_articles_search" in plan
    bad = await svc.fails("SearchKbArticles", pb.SearchKbArticlesRequest(q="!!! ???"))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "q" in bad.message


async def test_sla_timer_warns_then_breaches_exactly_once_with_racing_replicas(postgres_url: str) -> None:
    await migrate_to_head(postgres_url, MIGRATIONS)
    engines = [create_engine(postgres_url), create_engine(postgres_url)]
    replicas = [Context(uow=UnitOfWork(engine, repo.metadata, source="/crm/service-desk")) for engine in engines]
    start = utcnow()
    for ctx in replicas:
        ctx.clock = lambda: start
    tickets = 40
    try:
        with acting_as(*ADMIN):
            for i in range(tickets):
                await handlers.create_ticket(
                    replicas[0], {"subject": f"t{i}", "channel": "web", "priority": "urgent"}, idempotency_key="",
                    skip_dispatch=True,
                )  # fmt: skip

            async def race(at: Any) -> list[int]:
                for ctx in replicas:
                    ctx.clock = lambda: at
                return list(
                    await asyncio.gather(
                        *(handlers.run_sla_timer(ctx, batch_size=7) for ctx in replicas for _ in range(4))
                    )
                )

            async def count(event_type: str) -> int:
                async with engines[0].connect() as conn:
                    n = await conn.scalar(
                        select(func.count())
                        .select_from(repo.metadata.tables["outbox"])
                        .where(repo.metadata.tables["outbox"].c.type == event_type)
                    )
                return int(n or 0)

            # Before 80 % of the 15 minutes: nothing.
            assert sum(await race(start + timedelta(minutes=11))) == 0
            # 12 minutes = 80 % of the first-response target: one warning per ticket.
            while sum(await race(start + timedelta(minutes=12, seconds=1))):
                pass
            assert await count("crm.service.ticket.sla_warning") == tickets
            assert await count("crm.service.ticket.sla_breached") == 0
            # Past the due time: one breach per ticket, and escalation.
            while sum(await race(start + timedelta(minutes=16))):
                pass
            assert await count("crm.service.ticket.sla_warning") == tickets
            assert await count("crm.service.ticket.sla_breached") == tickets
            assert await count("crm.service.ticket.escalated") == tickets
            # Running again changes nothing: each announcement happened once.
            assert sum(await race(start + timedelta(minutes=17))) == 0
            assert await count("crm.service.ticket.sla_breached") == tickets
            async with engines[0].connect() as conn:
                escalated = await conn.scalar(
                    select(func.count()).select_from(repo.tickets).where(repo.tickets.c.escalated.is_(True))
                )
            assert escalated == tickets
    finally:
        for engine in engines:
            await engine.dispose()


async def test_tickets_are_filtered_by_custom_fields(postgres_url: str) -> None:
    """`ListTickets(custom=[...])` through the servicer: typed by the definitions, on the jsonb
    column (migration 0005) with its GIN index; an undefined key or an ill-typed value is refused
    naming `custom.<key>`."""
    from crm.common.v1 import custom_fields_pb2 as cf_pb
    from crm_platform.custom_fields_service import CustomFieldServicer
    from crm_platform.errors import ValidationFailed
    from service_desk.servicer import ServiceDeskServicer
    from sqlalchemy import text

    await migrate_to_head(postgres_url, MIGRATIONS)
    engine = create_engine(postgres_url)
    try:
        ctx = Context(uow=UnitOfWork(engine, repo.metadata, source="/test"), return_visit_days=2)
        definitions = CustomFieldServicer(
            engine, repo.custom_fields, keys=repo.idempotency_keys, entities=(handlers.TICKET_ENTITY,)
        )
        for key, kind in (("serial", "text"), ("under_warranty", "bool"), ("units", "number")):
            definition = cf_pb.CustomFieldDefinition(entity="ticket", key=key, label=key, type=kind)
            await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)
        servicer = ServiceDeskServicer(ctx)

        async def listed(*pairs: tuple[str, str], **filters: Any) -> list[str]:
            custom = [cf_pb.CustomFieldFilter(key=key, value=value) for key, value in pairs]
            reply = await servicer.ListTickets(pb.ListTicketsRequest(custom=custom, **filters), None)
            return sorted(t.subject for t in reply.items)

        with acting_as(*ADMIN):
            for subject, custom in (
                ("drone", {"serial": "SN-1", "under_warranty": True, "units": 2}),
                ("router", {"serial": "SN-2", "under_warranty": False, "units": 2}),
                ("question", {}),
            ):
                await handlers.create_ticket(
                    ctx,
                    {"subject": subject, "channel": "web", "custom": custom},
                    idempotency_key="",
                    skip_dispatch=True,
                )
            assert await listed(("serial", "SN-2")) == ["router"]
            assert await listed(("under_warranty", "true")) == ["drone"]
            assert await listed(("units", "2")) == ["drone", "router"]
            assert await listed(("units", "2"), ("under_warranty", "false")) == ["router"]
            assert await listed(("serial", "SN-1"), q="router") == []
            assert await listed() == ["drone", "question", "router"]
            with pytest.raises(ValidationFailed) as refused:
                await listed(("colour", "red"), ("units", "two"), ("under_warranty", "maybe"))
            assert [e.field for e in refused.value.errors] == ["custom.colour", "custom.units", "custom.under_warranty"]
        async with engine.connect() as conn:
            kind = await conn.scalar(
                text(
                    "SELECT data_type FROM information_schema.columns"
                    " WHERE table_name = 'tickets' AND column_name = 'custom'"
                )
            )
            index = await conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_tickets_custom_gin'"))
        assert kind == "jsonb" and index is not None and "jsonb_path_ops" in index
    finally:
        await engine.dispose()
