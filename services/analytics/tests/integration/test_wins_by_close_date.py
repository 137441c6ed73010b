"""A win counts in rep performance and customer value in the period of its close date (the date the
deal was won, which sales may back-date and by which its attainment counts the win), not of when the
win was recorded: a close date is in a period when it begins in it (00:00 UTC), so a month asked
from its first day to the next month's first day, in UTC or a time zone east of it (Asia/Shanghai),
holds the wins sales counts in that month. A deal projected before close dates were kept counts by
when its win was recorded, until its next event."""

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import to_timestamp
from google.protobuf.message import Message
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)
SHANGHAI = timezone(timedelta(hours=8))


def month(number: int, zone: timezone = UTC) -> ReportFilter:
    """The month of 2026 from its first day to the next month's first, in `zone`."""
    return ReportFilter(datetime(2026, number, 1, tzinfo=zone), datetime(2026, number + 1, 1, tzinfo=zone))


ACCOUNT = accounts_events.AccountCreated(
    account=accounts_pb2.Account(id="A1", name="Initech", owner_id="r1", team="east", region="cn", version=1)
)


def won(deal_id: str, amount: str, close_date: str, recorded: datetime, version: int = 3) -> Message:
    return sales_events.OpportunityWon(
        opportunity=sales_pb2.Opportunity(
            id=deal_id, account_id="A1", owner_id="r1", team="east", region="cn", status="won", stage="won",
            amount=common_pb2.Money(amount=amount, currency="CNY"),
            created_at=to_timestamp(datetime(2026, 1, 5, tzinfo=UTC)),
            close_date=close_date, closed_at=to_timestamp(recorded), version=version,
        )
    )  # fmt: skip


async def wins(engine: AsyncEngine, period: ReportFilter) -> tuple[tuple[int, Decimal], Decimal]:
    """(deals won, their amount) in rep performance and the won amount in customer value."""
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())
    with acting_as(*ADMIN):
        reps = await reports.rep_performance(period)
        accounts = await reports.customer_value(period, at_risk_only=False, limit=50, cursor="")
    won_by_reps = (sum(row.won_count for row in reps), sum((row.won_amount for row in reps), Decimal(0)))
    return won_by_reps, sum((row.won_amount for row in accounts.rows), Decimal(0))


async def test_a_win_counts_in_the_month_of_its_close_date(engine: AsyncEngine) -> None:
    await deliver(
        engine,
        [
            ACCOUNT,
            # Signed on Friday 30 January, entered on Monday 2 February.
            won("O-BACKDATED", "50000", "2026-01-30", datetime(2026, 2, 2, 1, 0, tzinfo=UTC)),
            # Won on 1 February in Shanghai, recorded at 07:00 there: still 31 January in UTC.
            won("O-SHANGHAI", "700", "2026-02-01", datetime(2026, 1, 31, 23, 0, tzinfo=UTC)),
        ],
    )

    for zone in (UTC, SHANGHAI):
        assert await wins(engine, month(1, zone)) == ((1, Decimal(50000)), Decimal(50000))
        assert await wins(engine, month(2, zone)) == ((1, Decimal(700)), Decimal(700))


async def test_a_deal_projected_without_its_close_date_counts_by_when_its_win_was_recorded(
    engine: AsyncEngine,
) -> None:
    recorded = datetime(2026, 2, 2, 1, 0, tzinfo=UTC)
    await deliver(engine, [ACCOUNT, won("O-1", "50000", "2026-01-30", recorded)])
    # As a deal projected before the read model kept close dates.
    async with engine.begin() as conn:
        await conn.execute(update(repo.opportunities).values(close_date=None))
    assert await wins(engine, month(2)) == ((1, Decimal(50000)), Decimal(50000))

    # Its next event brings the date.
    await deliver(engine, [won("O-1", "50000", "2026-01-30", recorded, version=4)])
    assert await wins(engine, month(1)) == ((1, Decimal(50000)), Decimal(50000))
    assert await wins(engine, month(2)) == ((0, Decimal(0)), Decimal(0))
