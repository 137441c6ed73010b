"""The analytics service on PostgreSQL and a broker: a realistic sequence of events from the four
contexts → the reports equal what this test computes by hand; the same events delivered twice →
the same reports; a rebuild from the topics' beginning → the same reports again."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from analytics.__main__ import build
from analytics.config import AnalyticsSettings
from analytics.consumers import rebuild
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.analytics.v1 import analytics_service_pb2 as pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine, transaction
from crm_platform.ids import new_id
from crm_platform.pagination import bind_cursor, encode_cursor, page_fingerprint
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.service import ServiceApp
from crm_platform.testing import polling
from crm_platform.testing.database import migrate_to_head
from crm_platform.testing.kafka import produce_event
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
CUSTOMER_VALUE = "/crm.analytics.v1.AnalyticsService/GetCustomerValue"
TOPICS = ("crm.leads.v1", "crm.accounts.v1", "crm.sales.v1", "crm.service.v1")
ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


def money(amount: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount, currency="CNY")


@dataclass
class Scenario:
    """Events of one team (unique per test, so other tests' events on the shared topics never count)."""

    team: str
    now: datetime
    events: list[tuple[Message, str, str]]  # message, key, event id

    def at(self, days: float = 0, hours: float = 0, minutes: float = 0) -> Any:
        # `base` is 20 days ago: everything happened within the last three weeks.
        return to_timestamp(self.now - timedelta(days=20) + timedelta(days=days, hours=hours, minutes=minutes))

    def add(self, message: Message, key: str) -> None:
        self.events.append((message, key, new_id()))


def scenario() -> Scenario:
    s = Scenario(team=f"team-{new_id()[-8:]}", now=utcnow(), events=[])
    t, region = s.team, "cn-east"

    def lead(lead_id: str, version: int, **fields: Any) -> leads_pb2.Lead:
        return leads_pb2.Lead(id=lead_id, team=t, region=region, version=version, created_at=s.at(), **fields)

    def activity(activity_id: str, lead_id: str, actor: str, hours: float) -> leads_pb2.LeadActivity:
        return leads_pb2.LeadActivity(
            id=activity_id, lead_id=lead_id, kind="call", actor_id=actor, occurred_at=s.at(hours=hours)
        )

    full = {"name": "Li Lei", "company": "Acme", "title": "CTO", "phone": "13800000000", "email": "l@a.cn"}
    full |= {"industry": "manufacturing"}
    s.add(
        leads_events.CampaignCreated(
            campaign=leads_pb2.Campaign(id=f"{t}-c1", name="Spring webinar", cost=money("5000"), team=t, version=1)
        ),
        f"{t}-c1",
    )
    # L1: web form, campaign c1, contacted after 2 h, converted to O1 (won).
    l1 = {"source": "web_form", "campaign_id": f"{t}-c1", "owner_id": "r1", **full}
    s.add(leads_events.LeadCreated(lead=lead(f"{t}-L1", 1, status="new", **l1)), f"{t}-L1")
    contacted = lead(f"{t}-L1", 2, status="contacted", first_contacted_at=s.at(hours=2), **l1)
    s.add(leads_events.LeadContacted(lead=contacted, activity=activity(f"{t}-la1", f"{t}-L1", "r1", 2)), f"{t}-L1")
    converted = lead(
        f"{t}-L1", 3, status="converted", first_contacted_at=s.at(hours=2), converted_opportunity_id=f"{t}-O1", **l1
    )
    s.add(leads_events.LeadConverted(lead=converted, opportunity_id=f"{t}-O1"), f"{t}-L1")
    # L2: web form, campaign c1, half its key fields, contacted after 4 h; then a stale snapshot arrives late.
    l2 = {"source": "web_form", "campaign_id": f"{t}-c1", "owner_id": "r1", "name": "Han Meimei", "phone": "139"}
    s.add(leads_events.LeadCreated(lead=lead(f"{t}-L2", 1, status="new", **l2)), f"{t}-L2")
    contacted = lead(f"{t}-L2", 2, status="contacted", first_contacted_at=s.at(hours=4), **l2)
    s.add(leads_events.LeadContacted(lead=contacted, activity=activity(f"{t}-la2", f"{t}-L2", "r1", 4)), f"{t}-L2")
    s.add(leads_events.LeadUpdated(lead=lead(f"{t}-L2", 1, status="new", **l2)), f"{t}-L2")
    # L3: web form, no campaign, never contacted.
    l3 = {"source": "web_form", "owner_id": "r2", "name": "Wang Wu"}
    s.add(leads_events.LeadCreated(lead=lead(f"{t}-L3", 1, status="new", **l3)), f"{t}-L3")
    # L4: trade show, contacted after 18 h, converted to O2 (lost).
    l4 = {"source": "trade_show", "owner_id": "r2", **full}
    s.add(leads_events.LeadCreated(lead=lead(f"{t}-L4", 1, status="new", **l4)), f"{t}-L4")
    contacted = lead(f"{t}-L4", 2, status="contacted", first_contacted_at=s.at(hours=18), **l4)
    s.add(leads_events.LeadContacted(lead=contacted, activity=activity(f"{t}-la3", f"{t}-L4", "r2", 18)), f"{t}-L4")
    converted = lead(
        f"{t}-L4", 3, status="converted", first_contacted_at=s.at(hours=18), converted_opportunity_id=f"{t}-O2", **l4
    )
    s.add(leads_events.LeadConverted(lead=converted, opportunity_id=f"{t}-O2"), f"{t}-L4")

    # Accounts: A1 complete and active; A2 sparse, 120 days old, never touched.
    a1 = accounts_pb2.Account(
        id=f"{t}-A1", name="Acme", industry="manufacturing", size="200-500", region=region, address="Pudong",
        website="acme.cn", tier="A", annual_revenue=money("1000000"), owner_id="r1", team=t, version=1,
        created_at=s.at(days=-100),
    )  # fmt: skip
    a2 = accounts_pb2.Account(
        id=f"{t}-A2", name="Beta", region=region, owner_id="r2", team=t, version=1, created_at=s.at(days=-100)
    )
    s.add(accounts_events.AccountCreated(account=a1), a1.id)
    s.add(accounts_events.AccountCreated(account=a2), a2.id)

    # Contacts: C1 (r1) 4 of 5 key fields; C2 (r2) its name alone; C3 (r2) created, then deleted.
    def contact(contact_id: str, account: accounts_pb2.Account, **fields: Any) -> accounts_pb2.Contact:
        return accounts_pb2.Contact(
            id=contact_id, account_id=account.id, owner_id=account.owner_id, team=t, region=region, version=1,
            created_at=s.at(days=1), **fields,
        )  # fmt: skip

    c1 = contact(f"{t}-C1", a1, name="Li Lei", title="CTO", mobile="13800000000", email="l@a.cn")
    s.add(accounts_events.ContactCreated(contact=c1), c1.id)
    c2 = contact(f"{t}-C2", a2, name="Han Meimei")
    s.add(accounts_events.ContactCreated(contact=c2), c2.id)
    c3 = contact(f"{t}-C3", a2, name="Wang Wu", title="CFO")
    s.add(accounts_events.ContactCreated(contact=c3), c3.id)
    s.add(accounts_events.ContactDeleted(contact_id=c3.id, account_id=a2.id), c3.id)
    s.add(
        accounts_events.ActivityLogged(
            activity=accounts_pb2.Activity(
                id=f"{t}-act1", account_id=a1.id, kind="visit", actor_id="r1", occurred_at=s.at(days=19)
            )
        ),
        a1.id,
    )
    task = accounts_pb2.Task(id=f"{t}-tk1", owner_id="r1", team=t, status="open", due_at=s.at(days=1), version=1)
    s.add(accounts_events.TaskCreated(task=task), task.id)
    done = accounts_pb2.Task(id=f"{t}-tk1", owner_id="r1", team=t, status="done", due_at=s.at(days=1), version=2)
    s.add(accounts_events.TaskCompleted(task=done), task.id)
    task2 = accounts_pb2.Task(id=f"{t}-tk2", owner_id="r1", team=t, status="open", due_at=s.at(days=2), version=1)
    s.add(accounts_events.TaskCreated(task=task2), task2.id)
    # Cancelled with its deleted account: no longer work the rep owes (not among the 2 tasks below).
    task3 = accounts_pb2.Task(id=f"{t}-tk3", owner_id="r1", team=t, status="open", due_at=s.at(days=2), version=1)
    s.add(accounts_events.TaskCreated(task=task3), task3.id)
    cancelled = accounts_pb2.Task(
        id=f"{t}-tk3", owner_id="r1", team=t, status="cancelled", due_at=s.at(days=2), version=2
    )
    s.add(accounts_events.TaskUpdated(task=cancelled, changed_fields=["status"]), task3.id)

    # Opportunities.
    def deal(deal_id: str, version: int, history: list[tuple[str, float, float | None]], **fields: Any) -> Any:
        entries = [
            sales_pb2.StageEntry(stage=stage, entered_at=s.at(days=start), exited_at=s.at(days=end) if end else None)
            for stage, start, end in history
        ]
        return sales_pb2.Opportunity(
            id=deal_id, team=t, region=region, version=version, stage=history[-1][0], stage_history=entries, **fields
        )

    o1 = {"account_id": a1.id, "owner_id": "r1", "source_lead_id": f"{t}-L1", "amount": money("12000")}
    o1["created_at"] = s.at(days=1)
    # O1 has every key field; O2 its amount alone; O3 its amount and a product line.
    o1 |= {"expected_close_date": "2026-12-31", "primary_contact_id": c1.id, "next_step": "sign"}
    o1["line_items"] = [sales_pb2.LineItem(product_id="p-1", product_name="CRM Pro", quantity="1")]
    s.add(
        sales_events.OpportunityCreated(
            opportunity=deal(f"{t}-O1", 1, [("initial_contact", 1, None)], status="open", **o1)
        ),
        f"{t}-O1",
    )
    moved = deal(f"{t}-O1", 2, [("initial_contact", 1, 3), ("needs_confirmed", 3, None)], status="open", **o1)
    s.add(
        sales_events.OpportunityStageChanged(
            opportunity=moved, from_stage="initial_contact", to_stage="needs_confirmed"
        ),
        f"{t}-O1",
    )
    won = deal(f"{t}-O1", 3, [("initial_contact", 1, 3), ("needs_confirmed", 3, 11), ("won", 11, None)],
               status="won", closed_at=s.at(days=11), **o1)  # fmt: skip
    s.add(sales_events.OpportunityWon(opportunity=won), f"{t}-O1")
    o2 = {"account_id": a2.id, "owner_id": "r2", "source_lead_id": f"{t}-L4", "amount": money("8000")}
    o2["created_at"] = s.at(days=1)
    s.add(
        sales_events.OpportunityCreated(
            opportunity=deal(f"{t}-O2", 1, [("initial_contact", 1, None)], status="open", **o2)
        ),
        f"{t}-O2",
    )
    lost = deal(
        f"{t}-O2", 2, [("initial_contact", 1, 4), ("lost", 4, None)], status="lost", closed_at=s.at(days=4), **o2
    )
    s.add(sales_events.OpportunityLost(opportunity=lost, reason="price"), f"{t}-O2")
    o3 = {"account_id": a1.id, "owner_id": "r1", "amount": money("3000"), "created_at": s.at(days=2)}
    o3["product_line"] = "CRM Pro"
    s.add(
        sales_events.OpportunityCreated(
            opportunity=deal(f"{t}-O3", 1, [("initial_contact", 2, None)], status="open", **o3)
        ),
        f"{t}-O3",
    )
    moved = deal(f"{t}-O3", 2, [("initial_contact", 2, 5), ("solution_demo", 5, None)], status="open", **o3)
    s.add(
        sales_events.OpportunityStageChanged(opportunity=moved, from_stage="initial_contact", to_stage="solution_demo"),
        f"{t}-O3",
    )

    # Contracts, payment plans, a payment, an overdue installment.
    k1 = sales_pb2.Contract(id=f"{t}-K1", account_id=a1.id, opportunity_id=f"{t}-O1", owner_id="r1", team=t, version=1)
    s.add(sales_events.ContractCreated(contract=k1), k1.id)
    i1 = sales_pb2.Installment(id=f"{t}-I1", sequence=1, amount=money("6000"), paid=money("0"), status="pending")
    i2 = sales_pb2.Installment(id=f"{t}-I2", sequence=2, amount=money("6000"), paid=money("0"), status="pending")
    plan = sales_pb2.PaymentPlan(id=f"{t}-P1", contract_id=k1.id, installments=[i1, i2])
    s.add(sales_events.PaymentPlanCreated(payment_plan=plan, contract_amount=money("12000")), k1.id)
    payment = sales_pb2.Payment(
        id=f"{t}-pay1", contract_id=k1.id, amount=money("6000"), received_at=s.at(days=18),
        allocations=[sales_pb2.Allocation(installment_id=i1.id, amount=money("6000"))],
    )  # fmt: skip
    s.add(sales_events.PaymentReceived(payment=payment, contract_outstanding=money("6000")), k1.id)
    k2 = sales_pb2.Contract(id=f"{t}-K2", account_id=a2.id, owner_id="r2", team=t, version=1)
    s.add(sales_events.ContractCreated(contract=k2), k2.id)
    i3 = sales_pb2.Installment(id=f"{t}-I3", sequence=1, amount=money("3000"), paid=money("0"), status="pending")
    s.add(
        sales_events.PaymentPlanCreated(
            payment_plan=sales_pb2.PaymentPlan(id=f"{t}-P2", contract_id=k2.id, installments=[i3])
        ),
        k2.id,
    )
    overdue = sales_pb2.Installment(id=i3.id, sequence=1, amount=money("3000"), paid=money("0"), status="overdue")
    s.add(sales_events.InstallmentOverdue(contract_id=k2.id, installment=overdue, account_id=a2.id), k2.id)

    # Tickets and CSAT.
    def ticket(ticket_id: str, version: int, account: str, assignee: str, priority: str, day: float, **f: Any) -> Any:
        return servicedesk_pb2.Ticket(
            id=ticket_id, account_id=account, assignee_id=assignee, priority=priority, team=t, region=region,
            version=version, created_at=s.at(days=day), **f,
        )  # fmt: skip

    t1 = {"first_response_due_at": s.at(days=1, hours=1), "resolution_due_at": s.at(days=1, hours=8)}
    s.add(
        service_events.TicketCreated(ticket=ticket(f"{t}-T1", 1, a1.id, "r1", "high", 1, status="new", **t1)), f"{t}-T1"
    )
    t1["first_responded_at"] = s.at(days=1, minutes=30)
    s.add(
        service_events.TicketStatusChanged(
            ticket=ticket(f"{t}-T1", 2, a1.id, "r1", "high", 1, status="in_progress", **t1)
        ),
        f"{t}-T1",
    )
    t1["resolved_at"] = s.at(days=1, hours=4)
    s.add(
        service_events.TicketResolved(ticket=ticket(f"{t}-T1", 3, a1.id, "r1", "high", 1, status="resolved", **t1)),
        f"{t}-T1",
    )
    t2 = {"first_response_due_at": s.at(days=2, hours=1), "resolution_due_at": s.at(days=2, hours=4)}
    s.add(
        service_events.TicketCreated(ticket=ticket(f"{t}-T2", 1, a2.id, "r2", "urgent", 2, status="new", **t2)),
        f"{t}-T2",
    )
    t2["first_responded_at"] = s.at(days=2, hours=2)
    s.add(
        service_events.TicketStatusChanged(
            ticket=ticket(f"{t}-T2", 2, a2.id, "r2", "urgent", 2, status="in_progress", **t2)
        ),
        f"{t}-T2",
    )
    # T3: its resolution is due in the future, but the service desk reported a breach: that counts.
    t3 = {"first_response_due_at": s.at(days=3, hours=1), "resolution_due_at": s.at(days=30)}
    s.add(
        service_events.TicketCreated(ticket=ticket(f"{t}-T3", 1, a2.id, "r2", "normal", 3, status="new", **t3)),
        f"{t}-T3",
    )
    s.add(
        service_events.TicketSlaBreached(
            ticket=ticket(f"{t}-T3", 1, a2.id, "r2", "normal", 3, status="new", **t3), target="resolution"
        ),
        f"{t}-T3",
    )
    csat1 = servicedesk_pb2.CsatResponse(
        id=f"{t}-s1", ticket_id=f"{t}-T1", account_id=a1.id, score=5, submitted_at=s.at(days=2)
    )
    csat2 = servicedesk_pb2.CsatResponse(
        id=f"{t}-s2", ticket_id=f"{t}-T2", account_id=a2.id, score=2, submitted_at=s.at(days=3)
    )
    s.add(service_events.CsatSubmitted(response=csat1), f"{t}-T1")
    s.add(service_events.CsatSubmitted(response=csat2), f"{t}-T2")
    return s


def expected(s: Scenario) -> dict[str, Any]:
    """The reports worked out by hand from the scenario above (team filter, CNY)."""
    t = s.team
    cny = lambda amount: {"amount": amount, "currency": "CNY"}  # noqa: E731
    return {
        "funnel": {
            "stages": [
                # O1 2 days, O2 3 days, O3 3 days in initial_contact; O1 and O3 moved on, O2 was lost.
                {"stage": "initial_contact", "amount": cny("0.00"), "reached": "3",
                 "conversionToNext": "0.6667", "meanDaysInStage": "2.67"},
                {"stage": "needs_confirmed", "amount": cny("0.00"), "reached": "1",
                 "conversionToNext": "1.0000", "meanDaysInStage": "8.00"},
                {"stage": "solution_demo", "count": "1", "amount": cny("3000.00"), "reached": "1",
                 "conversionToNext": "0.0000"},
                {"stage": "quote_negotiation", "amount": cny("0.00")},
                {"stage": "contract_signing", "amount": cny("0.00")},
                {"stage": "won", "count": "1", "amount": cny("12000.00"), "reached": "1"},
                {"stage": "lost", "count": "1", "amount": cny("8000.00"), "reached": "1"},
            ],
            "opportunities": "3", "openCount": "1", "wonCount": "1", "lostCount": "1", "winRate": "0.5000",
            "wonAmount": cny("12000.00"), "averageDealSize": cny("12000.00"), "meanSalesCycleDays": "10.00",
        },
        "sources": {
            "rows": [
                {"key": "trade_show", "leads": "1", "contacted": "1", "contactedRate": "1.0000", "converted": "1",
                 "convertedRate": "1.0000", "meanFirstContactHours": "18.00", "wonRevenue": cny("0.00")},
                {"key": "web_form", "leads": "3", "contacted": "2", "contactedRate": "0.6667", "converted": "1",
                 "convertedRate": "0.3333", "meanFirstContactHours": "3.00", "wonRevenue": cny("12000.00")},
            ]
        },
        "campaigns": {
            "rows": [
                {"leads": "2", "contacted": "1", "contactedRate": "0.5000", "converted": "1",
                 "convertedRate": "0.5000", "meanFirstContactHours": "18.00", "wonRevenue": cny("0.00")},
                {"key": f"{t}-c1", "name": "Spring webinar", "leads": "2", "contacted": "2",
                 "contactedRate": "1.0000", "converted": "1", "convertedRate": "0.5000",
                 "meanFirstContactHours": "3.00", "wonRevenue": cny("12000.00"), "cost": cny("5000.00"),
                 "roi": "1.4000"},
            ]
        },
        "reps": {
            "rows": [
                # leads L1 (8/8), L2 (4/8), account A1 (8/8), contact C1 (4/5), deals O1 (5/5) and
                # O3 (2/5): 4.7 / 6
                {"ownerId": "r1", "team": t, "activities": "3", "tasks": "2", "tasksCompleted": "1",
                 "taskCompletionRate": "0.5000", "wonCount": "1", "wonAmount": cny("12000.00"),
                 "csatResponses": "1", "csatAverage": "5.00", "dataCompleteness": "0.7833"},
                # leads L3 (3/8), L4 (8/8), account A2 (2/8), contact C2 (1/5; C3 deleted) and deal
                # O2 (1/5): 2.025 / 5
                {"ownerId": "r2", "team": t, "activities": "1", "wonAmount": cny("0.00"),
                 "csatResponses": "1", "csatAverage": "2.00", "dataCompleteness": "0.4050"},
            ]
        },
        "service": {
            "tickets": "3", "backlog": "2", "openUrgent": "1",
            "firstResponseMet": "1", "firstResponseBreached": "2", "firstResponseCompliance": "0.3333",
            "resolutionMet": "1", "resolutionBreached": "2", "resolutionCompliance": "0.3333",
            "meanFirstResponseMinutes": "75.00", "meanResolutionHours": "4.00",
            "csatResponses": "2", "csatAverage": "3.50", "csatSatisfiedRate": "0.5000",
        },
        "value": [
            (f"{t}-A1", "12000.00", "6000.00", "low", []),
            (f"{t}-A2", "0.00", "0.00", "high",
             ["NO_ACTIVITY", "OVERDUE_INSTALLMENTS", "OPEN_URGENT_TICKETS", "LOW_CSAT"]),
        ],
        "completeness": [
            ("lead", "4", "0.7188"), ("account", "2", "0.6250"), ("contact", "2", "0.5000"),
            ("opportunity", "3", "0.5333"),
        ],
    }  # fmt: skip


@dataclass
class Running:
    app: ServiceApp
    stub: AnalyticsServiceStub
    channel: grpc.aio.Channel

    async def stop(self) -> None:
        await self.channel.close()
        await self.app.stop()


async def start(url: str, settings: AnalyticsSettings) -> Running:
    app = build(settings, create_engine(url))
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    consumer = app.consumers[0]
    # The group join takes a few seconds on tansu; events produced before it are read anyway.
    await asyncio.wait_for(consumer.ready.wait(), 60)
    return Running(app=app, stub=AnalyticsServiceStub(channel), channel=channel)


@pytest.fixture
async def settings(postgres_url: str, kafka_settings: KafkaSettings) -> AnalyticsSettings:
    await migrate_to_head(postgres_url, MIGRATIONS)
    return AnalyticsSettings(
        database_url=postgres_url,
        grpc_port=0,
        kafka=kafka_settings,
        service_name=f"analytics-{new_id()[-6:]}",
        projection_group=f"analytics-test-{new_id()}",
    )


@pytest.fixture
async def service(settings: AnalyticsSettings) -> AsyncIterator[Running]:
    running = await start(settings.database_url, settings)
    try:
        yield running
    finally:
        await running.stop()


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


async def snapshot(stub: AnalyticsServiceStub, team: str, who: tuple[Principal, RecordScope] = ADMIN) -> dict[str, Any]:
    metadata = outgoing_metadata(*who)
    f = pb.ReportFilter(team=team)
    by_campaign = pb.GetLeadSourceReportRequest(filter=f, group_by=pb.LEAD_GROUPING_CAMPAIGN)
    value = await stub.GetCustomerValue(pb.GetCustomerValueRequest(filter=f), metadata=metadata)
    completeness = await stub.GetDataCompleteness(pb.GetDataCompletenessRequest(filter=f), metadata=metadata)
    return {
        "funnel": as_dict(await stub.GetSalesFunnel(pb.GetSalesFunnelRequest(filter=f), metadata=metadata)),
        "sources": as_dict(await stub.GetLeadSourceReport(pb.GetLeadSourceReportRequest(filter=f), metadata=metadata)),
        "campaigns": as_dict(await stub.GetLeadSourceReport(by_campaign, metadata=metadata)),
        "reps": as_dict(await stub.GetRepPerformance(pb.GetRepPerformanceRequest(filter=f), metadata=metadata)),
        "service": as_dict(await stub.GetServiceReport(pb.GetServiceReportRequest(filter=f), metadata=metadata)),
        "value": [
            (
                row.account_id,
                row.won_amount.amount,
                row.paid_amount.amount,
                row.churn_risk,
                [reason.code for reason in row.reasons],
            )
            for row in value.rows
        ],
        "completeness": [(row.entity, str(row.records), row.completeness) for row in completeness.rows],
    }


async def eventually(
    read: Callable[[], Awaitable[dict[str, Any]]], want: dict[str, Any], timeout: float = 45.0
) -> None:
    got = await polling.eventually(read, lambda got: got == want, timeout=timeout, interval=0.25)
    # Report by report, so a failure names the report that differs.
    for name in want:
        assert got.get(name) == want[name], name
    assert got == want


def duplicates(service_name: str) -> float:
    return sum(
        REGISTRY.get_sample_value(
            "crm_consumer_processed_total", {"service": service_name, "topic": topic, "outcome": "duplicate"}
        )
        or 0.0
        for topic in TOPICS
    )


async def publish(bootstrap: str, s: Scenario) -> None:
    for message, key, event_id in s.events:
        await produce_event(bootstrap, message, key=key, event_id=event_id)


async def test_reports_from_events_are_idempotent_and_rebuildable(
    service: Running, settings: AnalyticsSettings, kafka_settings: KafkaSettings
) -> None:
    s = scenario()
    want = expected(s)
    await publish(kafka_settings.bootstrap_servers, s)
    await eventually(lambda: snapshot(service.stub, s.team), want)

    # The record scope: a rep sees only their own deals and their own row.
    rep2 = (Principal(user_id="r2", roles=("sales_rep",), team=s.team), RecordScope(ScopeKind.OWN, owner_id="r2"))
    mine = await snapshot(service.stub, s.team, rep2)
    assert (mine["funnel"]["opportunities"], mine["funnel"]["lostCount"]) == ("1", "1")
    assert "wonCount" not in mine["funnel"]
    assert [row["ownerId"] for row in mine["reps"]["rows"]] == ["r2"]
    assert [row[0] for row in mine["value"]] == [f"{s.team}-A2"]

    # Every event delivered again with its id: recognised as duplicates, the reports do not move.
    before = duplicates(settings.service_name)
    await publish(kafka_settings.bootstrap_servers, s)
    deadline = time.monotonic() + 45
    while duplicates(settings.service_name) - before < len(s.events) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    assert duplicates(settings.service_name) - before == len(s.events)
    assert await snapshot(service.stub, s.team) == want

    # Rebuild: stop, empty the read models, start again: the fresh group replays both deliveries.
    await service.stop()
    engine = create_engine(settings.database_url)
    async with transaction(engine) as conn:
        group = await rebuild(conn, settings.projection_group)
    await engine.dispose()
    assert group == f"{settings.projection_group}-g2"
    again = await start(settings.database_url, settings)
    try:
        assert again.app.consumers[0].name == group
        await eventually(lambda: snapshot(again.stub, s.team), want)
    finally:
        await again.stop()


async def test_a_pod_started_while_its_database_refuses_connections_projects_once_it_answers(
    settings: AnalyticsSettings, postgres_admin_url: str
) -> None:
    """A cluster restart in which PostgreSQL comes up last: the projection consumer waits for it
    (its group name needs the generation stored there), it does not die behind a ready pod."""
    database = make_url(settings.database_url).database
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        app = build(settings, create_engine(settings.database_url))
        await app.start()
        await asyncio.sleep(1.0)  # its first read of the generation is refused
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    try:
        consumer = app.consumers[0]
        await asyncio.wait_for(consumer.ready.wait(), 60)  # joined its group once the database answered
        assert consumer.name.startswith(settings.projection_group)
        assert not any(task.done() for task in app._tasks)
    finally:
        await app.stop()


async def test_bad_filters_name_the_field(service: Running) -> None:
    metadata = outgoing_metadata(*ADMIN)
    now = utcnow()
    reversed_period = pb.ReportFilter(period_from=to_timestamp(now), period_to=to_timestamp(now - timedelta(days=1)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.GetServiceReport(pb.GetServiceReportRequest(filter=reversed_period), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.period_to" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.GetSalesFunnel(
            pb.GetSalesFunnelRequest(filter=pb.ReportFilter(currency="yuan")), metadata=metadata
        )
    assert "filter.currency" in (caught.value.details() or "")
    edited_cursors = [[None, "acc"], [0, "acc"], [True, "acc"], ["1", "acc"], [1, {"id": "acc"}], [1], [1, "a", "b"]]
    # Bound to the list as the server binds the cursors it hands out, so the list's own check sees them.
    fingerprint = page_fingerprint(CUSTOMER_VALUE, pb.GetCustomerValueRequest())
    for cursor in ["nonsense!", *(bind_cursor(encode_cursor(values), fingerprint) for values in edited_cursors)]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.GetCustomerValue(
                pb.GetCustomerValueRequest(page=common_pb2.PageRequest(cursor=cursor)), metadata=metadata
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, cursor
        assert "cursor: is not a cursor this API issued" in (caught.value.details() or "")
