"""An activity corrected or deleted where it was logged (a lead's in the leads service, an account's
in the accounts service) is corrected or dropped in the read model: the reports count it at its
corrected time, or no longer. A lead's notes count as its calls do (events applied through the
consumer's handlers, no broker)."""

from datetime import timedelta

import pytest
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import from_timestamp, to_timestamp, utcnow
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

EAST_MANAGER = (
    Principal(user_id="mgr", roles=("sales_manager",), team="east"),
    RecordScope(ScopeKind.TEAM, team="east"),
)
LEAD = leads_pb2.Lead(id="L1", source="event", owner_id="r1", team="east", region="cn-east", status="contacted")
ACCOUNT = accounts_pb2.Account(id="A1", name="Acme", owner_id="r1", team="east", region="cn-east", version=1)


def days_ago(days: float) -> Timestamp:
    stamp = to_timestamp(utcnow() - timedelta(days=days))
    assert stamp is not None
    return stamp


def lead_activity(activity_id: str, kind: str, days: float, version: int = 1) -> leads_pb2.LeadActivity:
    return leads_pb2.LeadActivity(
        id=activity_id, lead_id="L1", kind=kind, actor_id="r1", occurred_at=days_ago(days), version=version
    )


def account_activity(
    activity_id: str, kind: str, days: float, version: int = 1, account_id: str = "A1"
) -> accounts_pb2.Activity:
    return accounts_pb2.Activity(
        id=activity_id, account_id=account_id, kind=kind, actor_id="r1", occurred_at=days_ago(days), version=version
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
            leads_events.LeadContacted(lead=LEAD, activity=lead_activity("X", "call", 2)),
            leads_events.LeadContacted(lead=LEAD, activity=lead_activity("Y", "call", 1)),
            # A note is a follow-up too (跟进记录); it comes with the lead's update.
            leads_events.LeadUpdated(lead=LEAD, activity=lead_activity("N", "note", 1)),
        ],
    )
    assert await activities_counted(engine) == 3

    # X really happened three weeks ago, at a meeting.
    corrected = lead_activity("X", "meeting", 21, version=2)
    await deliver(
        engine,
        [leads_events.LeadActivityUpdated(lead=LEAD, activity=corrected, changed_fields=["kind", "occurred_at"])],
    )
    assert await activities_counted(engine) == 2
    assert (await stored(engine))["X"] == ("meeting", from_timestamp(corrected.occurred_at))

    gone = leads_events.LeadActivityDeleted(lead_id="L1", activity_id="Y")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more
    assert await activities_counted(engine) == 1
    assert sorted(await stored(engine)) == ["N", "X"]


async def test_a_lead_note_logged_before_notes_were_sent_counts_once_corrected(engine: AsyncEngine) -> None:
    """Before `lead.updated` carried the note it was logged with, analytics never saw a lead's notes:
    a correction of one brings it in, as it is now."""
    corrected = lead_activity("OLD", "call", 1, version=2)
    await deliver(
        engine,
        [
            leads_events.LeadUpdated(lead=LEAD, changed_fields=["last_activity_at"]),  # the note, as it came then
            leads_events.LeadActivityUpdated(lead=LEAD, activity=corrected, changed_fields=["kind"]),
        ],
    )
    assert (await stored(engine))["OLD"] == ("call", from_timestamp(corrected.occurred_at))
    assert await activities_counted(engine) == 1


async def test_a_lead_activity_deleted_stays_out_when_a_correction_of_it_comes_after(engine: AsyncEngine) -> None:
    """A rebuild or a late redelivery must not bring back what was deleted."""
    await deliver(engine, [leads_events.LeadActivityDeleted(lead_id="L1", activity_id="Z")])
    await deliver(engine, [leads_events.LeadActivityUpdated(lead=LEAD, activity=lead_activity("Z", "call", 1, 2))])
    assert "Z" not in await stored(engine)
    assert await activities_counted(engine) == 0


async def test_a_corrected_account_activity_counts_at_its_new_time_and_a_deleted_one_no_more(
    engine: AsyncEngine,
) -> None:
    await deliver(
        engine,
        [
            accounts_events.AccountCreated(account=ACCOUNT),
            accounts_events.ActivityLogged(activity=account_activity("X", "call", 2)),
            accounts_events.ActivityLogged(activity=account_activity("Y", "call", 1)),
        ],
    )
    assert await activities_counted(engine) == 2

    # X really happened three weeks ago, at a meeting.
    corrected = account_activity("X", "meeting", 21, version=2)
    await deliver(engine, [accounts_events.ActivityUpdated(activity=corrected, changed_fields=["kind", "occurred_at"])])
    assert await activities_counted(engine) == 1
    assert (await stored(engine))["X"] == ("meeting", from_timestamp(corrected.occurred_at))

    gone = accounts_events.ActivityDeleted(activity_id="Y", account_id="A1")
    await deliver(engine, [gone, gone])  # a redelivery under another event id deletes nothing more
    assert await activities_counted(engine) == 0
    assert list(await stored(engine)) == ["X"]


async def test_an_account_activity_deleted_stays_out_when_its_earlier_events_come_after(engine: AsyncEngine) -> None:
    """After a merge, an activity's `activity.logged` is keyed by the duplicate and its deletion by the
    survivor: in different partitions, the deletion may be applied first (late, or on a rebuild)."""
    await deliver(engine, [accounts_events.AccountCreated(account=ACCOUNT)])
    await deliver(engine, [accounts_events.ActivityDeleted(activity_id="Z", account_id="A1")])

    await deliver(
        engine,
        [
            accounts_events.ActivityLogged(activity=account_activity("Z", "call", 1)),
            accounts_events.ActivityUpdated(activity=account_activity("Z", "visit", 1, version=2)),
        ],
    )

    assert await activities_counted(engine) == 0
    assert await stored(engine) == {}


async def test_an_account_activity_corrected_after_a_merge_keeps_its_correction_when_it_was_logged_later(
    engine: AsyncEngine,
) -> None:
    """After a merge, an activity's `activity.logged` is keyed by the duplicate and its correction by
    the survivor: in different partitions, the correction may be applied first (the survivor's
    partition ahead, or on a rebuild). The older snapshot does not undo it."""
    duplicate = accounts_pb2.Account(
        id="A2", name="Acme (dup)", owner_id="r1", team="east", region="cn-east", version=1
    )
    await deliver(
        engine, [accounts_events.AccountCreated(account=ACCOUNT), accounts_events.AccountCreated(account=duplicate)]
    )
    # Logged yesterday on the duplicate, moved to the survivor by the merge (version 2), then
    # corrected there: it was a meeting three weeks ago (version 3).
    corrected = account_activity("X", "meeting", 21, version=3)
    await deliver(engine, [accounts_events.ActivityUpdated(activity=corrected, changed_fields=["kind", "occurred_at"])])

    await deliver(
        engine,
        [
            accounts_events.ActivityLogged(activity=account_activity("X", "call", 1, account_id="A2")),
            accounts_events.AccountMerged(duplicate_id="A2", survivor_id="A1"),
        ],
    )

    assert (await stored(engine))["X"] == ("meeting", from_timestamp(corrected.occurred_at))
    assert await activities_counted(engine) == 0
