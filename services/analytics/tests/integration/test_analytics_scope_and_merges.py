"""The projection and the reports on PostgreSQL, events applied through the consumer's handlers
(no broker): reports count only the caller's in-scope records (SPEC §9); an account merge brings the
duplicate's records to the survivor in any order of the topics, even while partitions are applied
concurrently (SPEC §10: a replay converges); an overdue installment owes what neither money
received before its plan nor later payments paid, and nothing once its contract is terminated; an
updated ticket counts at its current priority and due times, a breach the service desk reported
staying a breach while it holds at them."""

import asyncio
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics import repository as repo
from analytics.consumers import apply_account_merged, apply_contract
from analytics.domain import ChurnPolicy
from analytics.handlers import CustomerValueRow, ReportFilter, Reports
from analytics.testing import deliver
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.ids import new_id
from crm_platform.pagination import decode_cursor
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


def team_scope(team: str) -> RecordScope:
    return RecordScope(ScopeKind.TEAM, team=team)


def money(amount: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount, currency="CNY")


def days_ago(days: float) -> Any:
    return to_timestamp(utcnow() - timedelta(days=days))


@pytest.fixture
def reports(engine: AsyncEngine) -> Reports:
    return Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())


async def rep_rows(reports: Reports, scope: RecordScope, f: ReportFilter) -> list[tuple[Any, ...]]:
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), scope):
        rows = await reports.rep_performance(f)
    return [
        (row.owner_id, row.team, row.activities, row.tasks_completed, row.won_count, row.won_amount, row.csat.responses)
        for row in rows
    ]


async def value_rows(reports: Reports, scope: RecordScope, f: ReportFilter) -> list[CustomerValueRow]:
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), scope):
        page = await reports.customer_value(f, at_risk_only=False, limit=50, cursor="")
    return page.rows


def value(row: CustomerValueRow) -> tuple[str, Decimal, Decimal, set[str]]:
    return row.account_id, row.won_amount, row.paid_amount, {reason.code for reason in row.reasons}


def account(account_id: str, owner: str, team: str) -> accounts_events.AccountCreated:
    return accounts_events.AccountCreated(
        account=accounts_pb2.Account(
            id=account_id,
            name=account_id,
            owner_id=owner,
            team=team,
            region="east",
            version=1,
            created_at=days_ago(5),
            last_activity_at=days_ago(1),
        )
    )


def won(deal_id: str, account_id: str, owner: str, team: str, amount: str, version: int = 2) -> Message:
    return sales_events.OpportunityWon(
        opportunity=sales_pb2.Opportunity(
            id=deal_id,
            account_id=account_id,
            owner_id=owner,
            team=team,
            region="east",
            status="won",
            stage="won",
            amount=money(amount),
            created_at=days_ago(4),
            closed_at=days_ago(2),
            version=version,
        )
    )


def contract(contract_id: str, account_id: str, owner: str, team: str) -> Message:
    return sales_events.ContractCreated(
        contract=sales_pb2.Contract(
            id=contract_id, account_id=account_id, owner_id=owner, team=team, region="east", version=1
        )
    )


def payment(contract_id: str, amount: str, allocations: Sequence[tuple[str, str]] = ()) -> Message:
    return sales_events.PaymentReceived(
        payment=sales_pb2.Payment(
            id=new_id(),
            contract_id=contract_id,
            amount=money(amount),
            received_at=days_ago(1),
            allocations=[sales_pb2.Allocation(installment_id=i, amount=money(a)) for i, a in allocations],
        )
    )


def urgent_ticket(ticket_id: str, account_id: str, assignee: str, team: str) -> Message:
    return service_events.TicketCreated(
        ticket=servicedesk_pb2.Ticket(
            id=ticket_id,
            account_id=account_id,
            assignee_id=assignee,
            team=team,
            region="east",
            priority="urgent",
            status="in_progress",
            created_at=days_ago(1),
            version=1,
        )
    )


def csat(ticket_id: str, account_id: str, score: int) -> Message:
    return service_events.CsatSubmitted(
        response=servicedesk_pb2.CsatResponse(
            id=new_id(), ticket_id=ticket_id, account_id=account_id, score=score, submitted_at=days_ago(1)
        )
    )


def installment(installment_id: str, amount: str, paid: str, status: str) -> sales_pb2.Installment:
    return sales_pb2.Installment(
        id=installment_id, sequence=1, due_date="2026-01-01", amount=money(amount), paid=money(paid), status=status
    )


def plan(contract_id: str, *installments: sales_pb2.Installment) -> Message:
    return sales_events.PaymentPlanCreated(
        payment_plan=sales_pb2.PaymentPlan(id=new_id(), contract_id=contract_id, installments=installments)
    )


def overdue(contract_id: str, account_id: str, item: sales_pb2.Installment) -> Message:
    return sales_events.InstallmentOverdue(contract_id=contract_id, account_id=account_id, installment=item)


def merged(duplicate_id: str, survivor_id: str) -> Message:
    return accounts_events.AccountMerged(duplicate_id=duplicate_id, survivor_id=survivor_id)


# ---------------------------------------------------------------------------------- record scope


async def test_a_rep_who_moved_teams_shows_under_each_team_with_that_teams_records_only(
    engine: AsyncEngine, reports: Reports
) -> None:
    # The same events applied in two orders (a rebuild consumes the topics side by side): the rows
    # never depend on which event came last.
    for run, order in (("fwd", 1), ("rev", -1)):
        rep, team_a, team_b = f"r1-{run}", f"A-{run}", f"B-{run}"
        lead = {"id": f"L1-{run}", "owner_id": rep, "team": team_a, "region": "east", "created_at": days_ago(9)}
        task = accounts_pb2.Task(id=f"tk-{run}", owner_id=rep, team=team_b, status="done", due_at=days_ago(1))
        events: list[Message] = [
            # Team B's won deal of r1 (1000), then an older lead of r1 from when r1 was in team A.
            won(f"O1-{run}", f"X-{run}", rep, team_b, "1000"),
            leads_events.LeadCreated(lead=leads_pb2.Lead(**lead, version=1)),
            leads_events.LeadContacted(
                lead=leads_pb2.Lead(**lead, version=2),
                activity=leads_pb2.LeadActivity(
                    id=f"la-{run}", lead_id=f"L1-{run}", actor_id=rep, occurred_at=days_ago(8)
                ),
            ),
            accounts_events.TaskCompleted(task=task),
            urgent_ticket(f"T1-{run}", f"X-{run}", rep, team_b),
            csat(f"T1-{run}", f"X-{run}", 5),
        ]
        await deliver(engine, events[::order])
        mine = ReportFilter(owner_id=rep)

        assert await rep_rows(reports, team_scope(team_a), mine) == [(rep, team_a, 1, 0, 0, Decimal(0), 0)]
        assert await rep_rows(reports, team_scope(team_b), mine) == [(rep, team_b, 0, 1, 1, Decimal(1000), 1)]
        assert await rep_rows(reports, team_scope(f"C-{run}"), mine) == []
        assert await rep_rows(reports, ALL_RECORDS, mine) == [
            (rep, team_a, 1, 0, 0, Decimal(0), 0),
            (rep, team_b, 0, 1, 1, Decimal(1000), 1),
        ]


async def test_customer_value_counts_only_the_callers_records_of_an_account_in_scope(
    engine: AsyncEngine, reports: Reports
) -> None:
    # An account of team A with business of team B on it: team B's deal, contract, payment, overdue
    # installment, urgent ticket and poor CSAT are not team A's to see.
    await deliver(
        engine,
        [
            account("ACC", "a1", "A"),
            won("OA", "ACC", "a1", "A", "500"),
            won("OB", "ACC", "b1", "B", "700"),
            contract("KA", "ACC", "a1", "A"),
            payment("KA", "100"),
            contract("KB", "ACC", "b1", "B"),
            plan("KB", installment("IB", "900", "0", "pending")),
            payment("KB", "300", [("IB", "300")]),
            overdue("KB", "ACC", installment("IB", "900", "300", "overdue")),
            urgent_ticket("TB", "ACC", "b1", "B"),
            csat("TB", "ACC", 1),
        ],
    )
    assert [value(row) for row in await value_rows(reports, team_scope("A"), ReportFilter())] == [
        ("ACC", Decimal(500), Decimal(100), set())
    ]
    assert [value(row) for row in await value_rows(reports, ALL_RECORDS, ReportFilter())] == [
        ("ACC", Decimal(1200), Decimal(400), {"OVERDUE_INSTALLMENTS", "OPEN_URGENT_TICKETS", "LOW_CSAT"})
    ]
    # Team B's records alone do not put team A's account in team B's list.
    assert await value_rows(reports, team_scope("B"), ReportFilter()) == []


async def test_a_lead_in_scope_brings_no_revenue_of_a_deal_out_of_scope(engine: AsyncEngine, reports: Reports) -> None:
    # Team A's lead became team B's won deal (900).
    lead = leads_pb2.Lead(
        id="L1", source="web_form", owner_id="a1", team="A", region="east", status="converted",
        converted_opportunity_id="O1", created_at=days_ago(3), version=3,
    )  # fmt: skip
    deal = sales_pb2.Opportunity(
        id="O1", source_lead_id="L1", owner_id="b1", team="B", region="east", status="won", stage="won",
        amount=money("900"), created_at=days_ago(2), closed_at=days_ago(1), version=2,
    )  # fmt: skip
    await deliver(engine, [leads_events.LeadConverted(lead=lead), sales_events.OpportunityWon(opportunity=deal)])

    async def revenue(scope: RecordScope) -> list[tuple[str, int, Decimal]]:
        with acting_as(Principal(user_id="caller", roles=("sales_manager",)), scope):
            rows = await reports.lead_sources(ReportFilter(), by_campaign=False)
        return [(row.key, row.leads, row.won_revenue) for row in rows]

    assert await revenue(team_scope("A")) == [("web_form", 1, Decimal(0))]
    assert await revenue(ALL_RECORDS) == [("web_form", 1, Decimal(900))]


async def test_a_deleted_lead_and_a_deleted_deal_leave_the_reports_even_when_redelivered(
    engine: AsyncEngine, reports: Reports
) -> None:
    def lead(lead_id: str, source: str) -> leads_pb2.Lead:
        return leads_pb2.Lead(
            id=lead_id, source=source, owner_id="r1", team="A", region="east", status="contacted",
            first_contacted_at=days_ago(2), created_at=days_ago(3), version=2,
        )  # fmt: skip

    def call(activity_id: str, lead_id: str) -> leads_pb2.LeadActivity:
        return leads_pb2.LeadActivity(
            id=activity_id, lead_id=lead_id, kind="call", actor_id="r1", occurred_at=days_ago(2)
        )

    kept, deleted = lead("L1", "web_form"), lead("L2", "trade_show")
    await deliver(
        engine,
        [
            leads_events.LeadContacted(lead=kept, activity=call("LA1", "L1")),
            leads_events.LeadContacted(lead=deleted, activity=call("LA2", "L2")),
            won("O1", "A1", "r1", "A", "900"),
            won("O2", "A1", "r1", "A", "300"),
        ],
    )
    gone = [
        leads_events.LeadDeleted(lead_id="L2"),
        sales_events.OpportunityDeleted(opportunity_id="O2", account_id="A1"),
    ]
    await deliver(engine, gone + gone)  # a redelivery under another event id deletes nothing more

    with acting_as(*ADMIN):
        sources = await reports.lead_sources(ReportFilter(), by_campaign=False)
        funnel = await reports.sales_funnel(ReportFilter())
    assert [(row.key, row.leads, row.contacted) for row in sources] == [("web_form", 1, 1)]
    assert (funnel.opportunities, funnel.won_count, funnel.won_amount) == (1, 1, Decimal(900))
    assert await rep_rows(reports, ALL_RECORDS, ReportFilter()) == [("r1", "A", 1, 0, 1, Decimal(900), 0)]


async def test_a_deleted_campaign_leaves_the_read_model_even_when_redelivered(engine: AsyncEngine) -> None:
    def campaign(campaign_id: str) -> Message:
        return leads_events.CampaignCreated(
            campaign=leads_pb2.Campaign(id=campaign_id, name=campaign_id, cost=money("5000"), version=1)
        )

    await deliver(engine, [campaign("C1"), campaign("C2")])
    gone = leads_events.CampaignDeleted(campaign_id="C2")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more

    async with engine.connect() as conn:
        assert list(await conn.scalars(select(repo.campaigns.c.id))) == ["C1"]


async def test_a_campaign_in_scope_that_ran_in_the_period_is_reported_without_a_lead(
    engine: AsyncEngine, reports: Reports
) -> None:
    def campaign(campaign_id: str, team: str, starts_on: str, ends_on: str) -> Message:
        return leads_events.CampaignCreated(
            campaign=leads_pb2.Campaign(
                id=campaign_id, name=campaign_id, cost=money("500"), team=team, owner_id=f"m-{team}",
                starts_on=starts_on, ends_on=ends_on, version=1,
            )
        )  # fmt: skip

    lead = leads_pb2.Lead(
        id="L1", source="ad", campaign_id="C-LEADS", owner_id="r1", team="A", region="east", status="new",
        created_at=to_timestamp(datetime(2026, 11, 10, tzinfo=UTC)), version=1,
    )  # fmt: skip
    await deliver(
        engine,
        [
            campaign("C-LEADS", "A", "2026-11-01", "2026-11-30"),
            campaign("C-IDLE", "A", "2026-11-01", "2026-11-30"),
            campaign("C-OCTOBER", "A", "2026-10-01", "2026-10-31"),
            campaign("C-TEAM-B", "B", "2026-11-01", "2026-11-30"),
            leads_events.LeadCreated(lead=lead),
        ],
    )
    november = ReportFilter(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))

    async def rows(scope: RecordScope, f: ReportFilter) -> list[tuple[str, int, Decimal | None]]:
        with acting_as(Principal(user_id="caller", roles=("sales_manager",)), scope):
            report = await reports.lead_sources(f, by_campaign=True)
        return [(row.key, row.leads, row.roi) for row in report]

    assert await rows(team_scope("A"), november) == [("C-IDLE", 0, Decimal(-1)), ("C-LEADS", 1, Decimal(-1))]
    assert [key for key, _, _ in await rows(ALL_RECORDS, november)] == ["C-IDLE", "C-LEADS", "C-TEAM-B"]
    assert [key for key, _, _ in await rows(ALL_RECORDS, ReportFilter())] == [
        "C-IDLE", "C-LEADS", "C-OCTOBER", "C-TEAM-B",
    ]  # fmt: skip
    narrowed = ReportFilter(november.period_from, november.period_to, source="ad")  # about some leads only
    assert await rows(ALL_RECORDS, narrowed) == [("C-LEADS", 1, Decimal(-1))]


async def test_a_deleted_contract_leaves_the_read_model_even_when_redelivered(engine: AsyncEngine) -> None:
    def draft(contract_id: str) -> Message:
        return sales_events.ContractCreated(
            contract=sales_pb2.Contract(id=contract_id, account_id="A1", status="draft", version=1)
        )

    await deliver(engine, [draft("K1"), draft("K2")])
    gone = sales_events.ContractDeleted(contract_id="K2", account_id="A1")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more

    async with engine.connect() as conn:
        assert list(await conn.scalars(select(repo.contracts.c.id))) == ["K1"]


# -------------------------------------------------------------------------------- account merges


def merge_scenario(run: str) -> dict[str, list[Message]]:
    """The duplicate A2's won deal, contract, payment, overdue installment, urgent ticket and CSAT,
    then A2 merged into A1; per topic, in the order each topic holds them."""
    team = f"T-{run}"
    a1, a2, k2, i2 = f"A1-{run}", f"A2-{run}", f"K2-{run}", f"I2-{run}"
    return {
        "accounts": [account(a1, "r9", team), account(a2, "r9", team), merged(a2, a1)],
        "sales": [
            contract(k2, a2, "r9", team),
            plan(k2, installment(i2, "1000", "0", "pending")),
            payment(k2, "500", [(i2, "500")]),
            overdue(k2, a2, installment(i2, "1000", "500", "overdue")),
            won(f"O2-{run}", a2, "r9", team, "500", version=2),
            # Sales re-points its deal on the merge and says so; its contracts and payments it does not.
            won(f"O2-{run}", a1, "r9", team, "500", version=3),
        ],
        "service": [urgent_ticket(f"T2-{run}", a2, "r9", team), csat(f"T2-{run}", a2, 1)],
    }


async def test_a_merged_accounts_records_count_for_the_survivor_in_any_order_of_the_topics(
    engine: AsyncEngine, reports: Reports
) -> None:
    for number, topics in enumerate(itertools.permutations(("accounts", "sales", "service"))):
        run = f"p{number}"
        scenario = merge_scenario(run)
        await deliver(engine, [message for topic in topics for message in scenario[topic]])
        rows = await value_rows(reports, ALL_RECORDS, ReportFilter(team=f"T-{run}"))
        assert [value(row) for row in rows] == [
            (f"A1-{run}", Decimal(500), Decimal(500), {"OVERDUE_INSTALLMENTS", "OPEN_URGENT_TICKETS", "LOW_CSAT"})
        ], topics
        assert "500.00 CNY" in rows[0].reasons[0].detail, topics


async def test_records_arriving_with_a_merged_accounts_id_land_on_the_survivor(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(
        engine,
        [
            account("A1", "r9", "T"),
            account("A2", "r9", "T"),
            account("A3", "r9", "T"),
            contract("K3", "A3", "r9", "T"),
            payment("K3", "50"),
            # A3 was merged into A2 before A2 into A1, but the two merges are keyed by different
            # accounts and a replay may apply them the other way round.
            merged("A2", "A1"),
            merged("A3", "A2"),
            # Late events still carrying a duplicate's id.
            contract("K2", "A2", "r9", "T"),
            payment("K2", "200"),
            urgent_ticket("T2", "A2", "r9", "T"),
            csat("T2", "A3", 1),
            won("O3", "A3", "r9", "T", "300"),
        ],
    )
    rows = await value_rows(reports, ALL_RECORDS, ReportFilter())
    assert [value(row) for row in rows] == [("A1", Decimal(300), Decimal(250), {"OPEN_URGENT_TICKETS", "LOW_CSAT"})]


async def contract_account(engine: AsyncEngine, contract_id: str) -> str:
    async with engine.connect() as conn:
        found = await conn.execute(select(repo.contracts.c.account_id).where(repo.contracts.c.id == contract_id))
        return str(found.scalar_one())


async def test_a_record_of_the_duplicate_applied_while_its_merge_commits_lands_on_the_survivor(
    engine: AsyncEngine,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one writing transaction at a time")
    await deliver(engine, [account("A1", "r9", "T"), account("A2", "r9", "T")])
    # Partitions are applied concurrently: the merge is applied, not yet committed, when a contract
    # of the duplicate (another topic) is applied. The contract waits for the merge.
    async with engine.connect() as conn:
        merging = await conn.begin()
        await apply_account_merged(conn, "A2", "A1")
        late = asyncio.create_task(deliver(engine, [contract("K2", "A2", "r9", "T")]))
        done, _ = await asyncio.wait({late}, timeout=0.5)
        assert not done
        await merging.commit()
    await late
    assert await contract_account(engine, "K2") == "A1"
    # The other way round: the contract is applied, not yet committed, when the merge comes; the merge
    # waits for it, then moves it.
    await deliver(engine, [account("A3", "r9", "T")])
    async with engine.connect() as conn:
        applying = await conn.begin()
        await apply_contract(conn, sales_pb2.Contract(id="K3", account_id="A3", team="T", version=1))
        merge = asyncio.create_task(deliver(engine, [merged("A3", "A1")]))
        done, _ = await asyncio.wait({merge}, timeout=0.5)
        assert not done
        await applying.commit()
    await merge
    assert await contract_account(engine, "K3") == "A1"


# --------------------------------------------------------------------------- overdue installments


async def test_an_overdue_installment_owes_what_neither_earlier_money_nor_later_payments_paid(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(
        engine,
        [
            account("ACC1", "r9", "T"),
            contract("K1", "ACC1", "r9", "T"),
            # 50 received before the plan existed: sales applies it when it creates the plan.
            plan("K1", installment("I1", "100", "50", "partially_paid")),
            overdue("K1", "ACC1", installment("I1", "100", "50", "overdue")),
            payment("K1", "30", [("I1", "30")]),
            account("ACC2", "r9", "T"),
            contract("K2", "ACC2", "r9", "T"),
            # 30 paid after the plan and before the installment fell due, 20 after: the overdue
            # snapshot's paid amount already holds the 30, which must not count twice.
            plan("K2", installment("I2", "100", "0", "pending")),
            payment("K2", "30", [("I2", "30")]),
            overdue("K2", "ACC2", installment("I2", "100", "30", "overdue")),
            payment("K2", "20", [("I2", "20")]),
        ],
    )
    rows = {row.account_id: row for row in await value_rows(reports, ALL_RECORDS, ReportFilter())}
    details = {account_id: [r.detail for r in row.reasons] for account_id, row in rows.items()}
    assert details == {
        "ACC1": ["1 overdue installment(s), 20.00 CNY"],
        "ACC2": ["1 overdue installment(s), 50.00 CNY"],
    }


async def test_a_terminated_contracts_overdue_installments_are_no_churn_reason(
    engine: AsyncEngine, reports: Reports
) -> None:
    """A terminated contract is written off: sales no longer counts what it owes as a receivable. Its
    installments that fell overdue before the termination no longer count, just as those falling due
    after it never do (sales reports no installment of a terminated contract overdue)."""

    def sales_contract(contract_id: str, account_id: str, status: str, version: int) -> sales_pb2.Contract:
        return sales_pb2.Contract(
            id=contract_id,
            account_id=account_id,
            owner_id="r9",
            team="T",
            region="east",
            status=status,
            version=version,
        )

    signed = sales_events.ContractSigned(contract=sales_contract("K1", "ACC1", "signed", 4))
    await deliver(
        engine,
        [
            account("ACC1", "r9", "T"),
            signed,
            plan("K1", installment("I1", "100", "0", "pending")),
            overdue("K1", "ACC1", installment("I1", "100", "0", "overdue")),
            account("ACC2", "r9", "T"),
            sales_events.ContractSigned(contract=sales_contract("K2", "ACC2", "signed", 4)),
            plan("K2", installment("I2", "100", "0", "pending")),
            overdue("K2", "ACC2", installment("I2", "100", "0", "overdue")),
        ],
    )
    terminated = sales_events.ContractTerminated(
        contract=sales_contract("K1", "ACC1", "terminated", 5), reason="the customer went bankrupt"
    )
    # A redelivered signature (an older snapshot) does not bring the debt back.
    await deliver(engine, [terminated, signed])

    rows = await value_rows(reports, ALL_RECORDS, ReportFilter())
    assert {row.account_id: {reason.code for reason in row.reasons} for row in rows} == {
        "ACC1": set(),
        "ACC2": {"OVERDUE_INSTALLMENTS"},
    }


# ----------------------------------------------------------------------------------- service tickets


def assigned_ticket(ticket_id: str, priority: str, version: int, first_response_due: Any) -> servicedesk_pb2.Ticket:
    return servicedesk_pb2.Ticket(
        id=ticket_id,
        assignee_id="r9",
        team="T",
        region="east",
        priority=priority,
        effective_priority=priority,
        status="assigned",
        created_at=days_ago(1),
        first_response_due_at=first_response_due,
        resolution_due_at=days_ago(-2),
        version=version,
    )


async def test_an_updated_ticket_counts_at_its_new_priority_and_due_times_and_a_breach_holding_at_them_stays(
    engine: AsyncEngine, reports: Reports
) -> None:
    past, future = days_ago(0.9), days_ago(-0.1)
    reported = assigned_ticket("T-REPORTED", "urgent", 1, past)
    await deliver(
        engine,
        [
            service_events.TicketCreated(ticket=assigned_ticket("T-LATE", "urgent", 1, past)),
            service_events.TicketCreated(ticket=reported),
            service_events.TicketSlaBreached(ticket=reported, target="first_response", due_at=past),
        ],
    )
    with acting_as(*ADMIN):
        before = await reports.service(ReportFilter(team="T"))
    assert (before.open_urgent, before.first_response_breached) == (2, 2)

    # The late one lowered to low, its first response now due tomorrow; the reported one to high, its
    # first response due hours before this change still: the service desk keeps that breach.
    late = assigned_ticket("T-LATE", "low", 2, future)
    high = assigned_ticket("T-REPORTED", "high", 2, days_ago(0.8))
    high.updated_at.CopyFrom(days_ago(0))
    await deliver(engine, [service_events.TicketUpdated(ticket=late), service_events.TicketUpdated(ticket=high)])
    with acting_as(*ADMIN):
        after = await reports.service(ReportFilter(team="T"))
    # Not urgent any more; the late one is pending now, the reported breach stays.
    assert (after.open_urgent, after.first_response_breached, after.first_response_met) == (0, 1, 0)


async def test_customer_value_pages_through_every_account_once_with_cursors_that_hold_no_amounts(
    engine: AsyncEngine, reports: Reports
) -> None:
    """Highest value first, a page at a time; a cursor is readable by whoever holds it, and who may
    not see what accounts are worth reads pages of this report too."""
    await deliver(
        engine,
        [
            *(account(f"ACC{n}", "a1", "A") for n in range(5)),
            *(won(f"O{n}", f"ACC{n}", "a1", "A", f"{(n + 1) * 1111}") for n in range(5)),
        ],
    )
    seen: list[str] = []
    cursor = ""
    with acting_as(Principal(user_id="caller", roles=("sales_manager",)), ALL_RECORDS):
        while True:
            page = await reports.customer_value(ReportFilter(), at_risk_only=False, limit=2, cursor=cursor)
            seen += [row.account_id for row in page.rows]
            if not page.next_cursor:
                break
            cursor = page.next_cursor
            assert not any(f"{(n + 1) * 1111}" in str(decode_cursor(cursor)) for n in range(5))
    assert seen == ["ACC4", "ACC3", "ACC2", "ACC1", "ACC0"]


async def test_customer_value_by_name_follows_the_names_not_the_amounts(engine: AsyncEngine, reports: Reports) -> None:
    """For a caller not shown the amounts: the order alone must not tell which accounts paid more."""
    names = ["delta", "Alpha", "charlie", "Bravo"]  # worth most to least
    await deliver(
        engine,
        [
            *(account(name, "a1", "A") for name in names),
            *(won(f"O-{name}", name, "a1", "A", f"{(4 - n) * 1000}") for n, name in enumerate(names)),
        ],
    )
    seen: list[str] = []
    cursor = ""
    with acting_as(Principal(user_id="caller", roles=("marketing",)), ALL_RECORDS):
        while True:
            page = await reports.customer_value(
                ReportFilter(), at_risk_only=False, limit=3, cursor=cursor, by_name=True
            )
            seen += [row.account_name for row in page.rows]
            if not page.next_cursor:
                break
            cursor = page.next_cursor
    assert seen == ["Alpha", "Bravo", "charlie", "delta"]
    by_value = await value_rows(reports, ALL_RECORDS, ReportFilter())
    assert [row.account_name for row in by_value] == names
