"""A lead's activity corrected or deleted in the leads service is corrected or dropped in the read
model: the reports count it at its corrected time, or no longer; an edit of an activity the read
model never held (a note: only contact activities come with `lead.contacted`) adds none (events
applied through the consumer's handlers, no broker)."""

from datetime import timedelta

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import from_timestamp, to_timestamp, utcnow
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

EAST_MANAGER = (
    Principal(user_id="mgr", roles=("sales_manager",), team="east"),
    RecordScope(ScopeKind.TEAM, team="east"),
)
LEAD = leads_pb2.Lead(id="L1", source="event", owner_id="r1", team="east", region="cn-east", status="contacted")


def activity(activity_id: str, kind: str, days_ago: float, version: int = 1) -> leads_pb2.LeadActivity:
    return leads_pb2.LeadActivity(
        id=activity_id,
        lead_id="L1",
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


async def stored(engine: AsyncEngine) -> dict[str, tuple[str, object]]:
    """Kind and time of each activity in the read model, by id."""
    a = repo.activities
    async with engine.connect() as conn:
        rows = await conn.execute(select(a.c.id, a.c.kind, a.c.occurred_at))
    return {row.id: (row.kind, row.occurred_at) for row in rows}


async def test_a_corrected_lead_activity_counts_at_its_new_time_and_a_deleted_one_no_more(engine: AsyncEngine) -> None:
    await deliver(
        engine,
        [
            leads_events.LeadContacted(lead=LEAD, activity=activity("X", "call", days_ago=2)),
            leads_events.LeadContacted(lead=LEAD, activity=activity("Y", "call", days_ago=1)),
        ],
    )
    assert await activities_counted(engine) == 2

    # X really happened three weeks ago, at a meeting; a note's typo is fixed (notes never counted).
    corrected = activity("X", "meeting", days_ago=21, version=2)
    await deliver(
        engine,
        [
            leads_events.LeadActivityUpdated(lead=LEAD, activity=corrected, changed_fields=["kind", "occurred_at"]),
            leads_events.LeadActivityUpdated(lead=LEAD, activity=activity("N", "note", 1, 2), changed_fields=["notes"]),
        ],
    )
    assert await activities_counted(engine) == 1
    assert (await stored(engine))["X"] == ("meeting", from_timestamp(corrected.occurred_at))

    gone = leads_events.LeadActivityDeleted(lead_id="L1", activity_id="Y")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more
    assert await activities_counted(engine) == 0
    assert list(await stored(engine)) == ["X"]
