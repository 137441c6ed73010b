"""An account's activity corrected or deleted in the accounts service is corrected or dropped in the
read model: the reports count it at its corrected time, or no longer (events applied through the
consumer's handlers on PostgreSQL, no broker)."""

from datetime import timedelta

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import from_timestamp, to_timestamp, utcnow
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

EAST_MANAGER = (
    Principal(user_id="mgr", roles=("sales_manager",), team="east"),
    RecordScope(ScopeKind.TEAM, team="east"),
)


def activity(activity_id: str, kind: str, days_ago: float, version: int) -> accounts_pb2.Activity:
    return accounts_pb2.Activity(
        id=activity_id,
        account_id="A1",
        kind=kind,
        actor_id="r1",
        occurred_at=to_timestamp(utcnow() - timedelta(days=days_ago)),
        version=version,
    )


async def activities_counted(engine: AsyncEngine) -> int:
    """Activities of the last week the east team's manager sees in the rep performance report."""
    reports = Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())
    with acting_as(*EAST_MANAGER):
        rows = await reports.rep_performance(ReportFilter(period_from=utcnow() - timedelta(days=7)))
    return sum(row.activities for row in rows)


async def test_a_corrected_activity_counts_at_its_new_time_and_a_deleted_one_no_more(engine: AsyncEngine) -> None:
    account = accounts_pb2.Account(id="A1", name="Acme", owner_id="r1", team="east", region="cn-east", version=1)
    await deliver(
        engine,
        [
            accounts_events.AccountCreated(account=account),
            accounts_events.ActivityLogged(activity=activity("X", "call", days_ago=2, version=1)),
            accounts_events.ActivityLogged(activity=activity("Y", "call", days_ago=1, version=1)),
        ],
    )
    assert await activities_counted(engine) == 2

    # X really happened three weeks ago, at a meeting.
    corrected = activity("X", "meeting", days_ago=21, version=2)
    await deliver(engine, [accounts_events.ActivityUpdated(activity=corrected, changed_fields=["kind", "occurred_at"])])
    assert await activities_counted(engine) == 1
    async with engine.connect() as conn:
        row = (await conn.execute(select(repo.activities).where(repo.activities.c.id == "X"))).one()
    assert (row.kind, row.account_id, row.occurred_at) == ("meeting", "A1", from_timestamp(corrected.occurred_at))

    gone = accounts_events.ActivityDeleted(activity_id="Y", account_id="A1")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more
    assert await activities_counted(engine) == 0
    async with engine.connect() as conn:
        assert list(await conn.scalars(select(repo.activities.c.id))) == ["X"]
