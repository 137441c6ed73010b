"""Customer value over a scope of 20,000 accounts on PostgreSQL, which takes at most 32,767 bind
parameters in a statement: the report reads each account's figures for the accounts of its own
query, whatever their number, and ranks and pages them as in any scope."""

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import CustomerValuePage, ReportFilter, Reports
from analytics.testing import deliver
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.db import transaction
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import to_timestamp, utcnow
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
ACCOUNTS = 20_000
ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)
NOW = utcnow()


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    async with migrated_engine(postgres_url, MIGRATIONS) as engine:
        yield engine


def account_id(n: int) -> str:
    return f"acc-{n:05d}"


async def seed_accounts(engine: AsyncEngine) -> None:
    """The accounts as their events would leave them (active today), written at once: delivering
    20,000 events would take most of a minute."""
    rows = [
        {
            "id": account_id(n),
            "name": f"Account {n}",
            "owner_id": "r1",
            "team": "east",
            "region": "cn",
            "created_at": NOW,
            "last_activity_at": NOW,
            "filled": [],
            "completeness": 0,
            "version": 1,
        }
        for n in range(ACCOUNTS)
    ]
    async with transaction(engine) as conn:
        await conn.execute(insert(repo.accounts), rows)


def cny(amount: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount, currency="CNY")


async def page(reports: Reports, *, limit: int, cursor: str = "", at_risk_only: bool = False) -> CustomerValuePage:
    with acting_as(*ADMIN):
        return await reports.customer_value(ReportFilter(), at_risk_only=at_risk_only, limit=limit, cursor=cursor)


async def test_customer_value_ranks_and_pages_a_scope_of_more_accounts_than_a_statement_takes_parameters(
    engine: AsyncEngine,
) -> None:
    await seed_accounts(engine)
    await deliver(
        engine,
        [
            sales_events.OpportunityWon(
                opportunity=sales_pb2.Opportunity(
                    id="O-1", account_id=account_id(19_999), status="won", stage="won", amount=cny("5000"),
                    owner_id="r1", team="east", region="cn", created_at=to_timestamp(NOW), closed_at=to_timestamp(NOW),
                    close_date=NOW.date().isoformat(), version=2,
                )
            ),
            sales_events.ContractSigned(
                contract=sales_pb2.Contract(
                    id="K-1", account_id=account_id(42), owner_id="r1", team="east", region="cn", status="signed",
                    version=3,
                )
            ),
            sales_events.PaymentReceived(
                payment=sales_pb2.Payment(id="P-1", contract_id="K-1", amount=cny("800"), received_at=to_timestamp(NOW))
            ),
            service_events.TicketCreated(
                ticket=servicedesk_pb2.Ticket(
                    id="T-1", account_id=account_id(7), assignee_id="r1", team="east", region="cn",
                    priority="urgent", status="assigned", created_at=to_timestamp(NOW), version=1,
                )
            ),
        ],
    )  # fmt: skip
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy(), clock=lambda: NOW)

    first = await page(reports, limit=3)
    second = await page(reports, limit=3, cursor=first.next_cursor)
    at_risk = await page(reports, limit=50, at_risk_only=True)

    # Paid first, then won, then by account.
    assert [(row.account_id, row.paid_amount, row.won_amount) for row in first.rows] == [
        ("acc-00042", Decimal(800), Decimal(0)),
        ("acc-19999", Decimal(0), Decimal(5000)),
        ("acc-00000", Decimal(0), Decimal(0)),
    ]
    assert [row.account_id for row in second.rows] == ["acc-00001", "acc-00002", "acc-00003"]
    assert [(row.account_id, row.churn_risk, [reason.code for reason in row.reasons]) for row in at_risk.rows] == [
        ("acc-00007", "medium", ["OPEN_URGENT_TICKETS"])
    ]
