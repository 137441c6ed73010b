"""Correcting and deleting a lead's activities, on SQLite and PostgreSQL: an edit writes the fields it
names, checked as a logged activity is, under the activity's version; what the lead derives from its
activities follows in the same transaction (the score with its history and `lead.scored`, the
follow-up task the activity planned, `last_activity_at` only ever forward), while the record of the
first contact stays; `lead.activity_updated` / `lead.activity_deleted` announce it. The call's scope
is the caller's on activities (an activity is its actor's, in its lead's team and region); the lead
must be in the caller's scope on leads, sent beside it as the gateway does."""

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from crm.leads.v1 import events_pb2, leads_pb2
from crm.leads.v1 import leads_service_pb2 as pb
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.errors import Conflict, NotFound, StaleVersion, ValidationFailed
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata, resource_scope_key
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import CLOCK_SKEW, as_utc
from google.protobuf.field_mask_pb2 import FieldMask
from leads import repository as repo
from leads.domain import ScoringRule
from leads.handlers import ActivityInput
from sqlalchemy import insert, select

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def scope(kind: ScopeKind, user: str = "rep1", team: str = "east") -> RecordScope:
    return RecordScope(kind, owner_id=user, team=team, region="cn-east")


async def new_lead(env: Any, owner_id: str = "rep1") -> Any:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead(
            {"name": "Li Lei", "owner_id": owner_id, "team": "east", "region": "cn-east"}
        )
    return lead


async def log(
    env: Any, lead_id: str, user: str = "rep1", kind_of_scope: ScopeKind = ScopeKind.OWN, **values: Any
) -> Any:
    with env.acting(user, scope=kind_of_scope):
        activity, _ = await env.service.log_activity(ActivityInput(lead_id=lead_id, **values))
    return activity


async def lead_now(env: Any, lead_id: str) -> Any:
    with env.acting("admin", roles=("admin",)):
        return await env.service.get_lead(lead_id)


async def test_an_activity_logged_again_under_its_key_after_its_deletion_is_a_404_and_not_brought_back(
    env_each_database: Any,
) -> None:
    env = env_each_database
    lead = await new_lead(env)
    call = await log(env, lead["id"], kind="call", idempotency_key="call-1")
    assert (await log(env, lead["id"], kind="call", idempotency_key="call-1"))["id"] == call["id"]
    with env.acting("rep1", scope=ScopeKind.OWN):
        await env.service.delete_activity(lead["id"], call["id"], 0, leads_scope=scope(ScopeKind.OWN))

    with pytest.raises(NotFound):
        await log(env, lead["id"], kind="call", idempotency_key="call-1")
    with env.acting("rep1", scope=ScopeKind.OWN):
        remaining, _ = await env.service.list_activities(lead["id"], limit=50, cursor="")
    assert list(remaining) == []


async def test_a_corrected_note_leaves_the_lead_as_it_was(env_each_database: Any) -> None:
    """Neither its score nor its last activity moves: the lead keeps its version, so an edit form of
    it that is open meanwhile is not made stale by a typo fixed in a call's notes."""
    env = env_each_database
    lead = await new_lead(env)
    logged = await log(env, lead["id"], kind="call", notes="tlaked about pricing")
    before = await lead_now(env, lead["id"])

    with env.acting("rep1", scope=ScopeKind.OWN):
        _, after = await env.service.update_activity(
            lead["id"], logged["id"], {"notes": "talked about pricing"}, ["notes"], 1, leads_scope=scope(ScopeKind.OWN)
        )

    assert after["notes"] == "talked about pricing" and after["version"] == 2
    assert (await lead_now(env, lead["id"]))["version"] == before["version"]


async def follow_ups(env: Any, lead_id: str) -> list[tuple[str, str, datetime]]:
    """(activity id, status, due time) of the lead's follow-up tasks, oldest first."""
    t = repo.tasks
    query = select(t.c.activity_id, t.c.status, t.c.due_at).where(t.c.lead_id == lead_id, t.c.kind == "follow_up")
    async with env.engine.connect() as conn:
        return [(a, s, as_utc(d)) for a, s, d in await conn.execute(query.order_by(t.c.id))]


async def test_an_edit_writes_the_fields_it_names_rescores_the_lead_and_is_announced(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(
            ScoringRule(id="", activity_kind="meeting", min_count=1, points=30), "met", ""
        )
    lead = await new_lead(env)
    logged = await log(env, lead["id"], kind="call", outcome="reached", notes="tlaked about pricing")
    assert (logged["version"], (await lead_now(env, lead["id"]))["score"]) == (1, 0)
    env.clock.advance(minutes=5)

    with env.acting("rep1", scope=ScopeKind.OWN):
        before, after = await env.service.update_activity(
            lead["id"],
            logged["id"],
            {"kind": "meeting", "notes": "talked about pricing", "outcome": "not in the mask"},
            ["kind", "notes"],
            1,
            leads_scope=scope(ScopeKind.OWN),
        )
        unchanged, same = await env.service.update_activity(
            lead["id"], logged["id"], {"notes": "talked about pricing"}, ["notes"], 2, leads_scope=scope(ScopeKind.OWN)
        )

    assert (before["kind"], before["notes"], before["version"]) == ("call", "tlaked about pricing", 1)
    assert (after["kind"], after["notes"], after["outcome"], after["version"]) == (
        "meeting", "talked about pricing", "reached", 2,
    )  # fmt: skip
    assert unchanged == same and same["version"] == 2  # nothing to correct: no new version, no event
    scored = await lead_now(env, lead["id"])
    assert scored["score"] == 30 and as_utc(scored["updated_at"]) == env.clock.now
    with env.acting("admin", roles=("admin",)):
        history, _ = await env.service.score_history(lead["id"], limit=50, cursor="")
    assert [(h["previous_score"], h["score"]) for h in history][-1] == (0, 30)
    events = await outbox_events(env.engine, repo.metadata, key=lead["id"])
    assert [t for t, _ in events[-2:]] == ["crm.leads.lead.scored", "crm.leads.lead.activity_updated"]
    updated = events_pb2.LeadActivityUpdated.FromString(events[-1][1])
    assert list(updated.changed_fields) == ["kind", "notes"]
    assert (updated.activity.id, updated.activity.kind, updated.activity.version) == (logged["id"], "meeting", 2)
    assert (updated.lead.id, updated.lead.score, updated.actor.user_id) == (lead["id"], 30, "rep1")


async def test_last_activity_at_only_moves_forward_and_the_first_contact_stays(env_each_database: Any) -> None:
    env = env_each_database
    start = env.clock.now
    lead = await new_lead(env)
    env.clock.advance(hours=2)
    call = await log(env, lead["id"], kind="call", occurred_at=start + timedelta(minutes=30))
    contacted = await lead_now(env, lead["id"])
    first_contact = start + timedelta(minutes=30)
    assert (contacted["status"], as_utc(contacted["first_contacted_at"])) == ("contacted", first_contact)

    async def occurred(at: datetime, version: int) -> Any:
        with env.acting("rep1", scope=ScopeKind.OWN):
            await env.service.update_activity(
                lead["id"], call["id"], {"occurred_at": at}, ["occurred_at"], version, leads_scope=scope(ScopeKind.OWN)
            )
        return as_utc((await lead_now(env, lead["id"]))["last_activity_at"])

    assert await occurred(start + timedelta(minutes=45), 1) == start + timedelta(minutes=45)  # later: advances
    assert await occurred(start + timedelta(minutes=10), 2) == start + timedelta(minutes=45)  # earlier: stays
    with env.acting("rep1", scope=ScopeKind.OWN):
        await env.service.delete_activity(lead["id"], call["id"], 3, leads_scope=scope(ScopeKind.OWN))

    after = await lead_now(env, lead["id"])
    assert as_utc(after["last_activity_at"]) == start + timedelta(minutes=45)
    assert (after["status"], as_utc(after["first_contacted_at"])) == ("contacted", first_contact)


async def test_the_follow_up_task_an_activity_planned_follows_it(env_each_database: Any) -> None:
    env = env_each_database
    day = timedelta(days=1)
    now = env.clock.now
    lead = await new_lead(env)
    call = await log(env, lead["id"], kind="call", next_follow_up_at=now + day)
    note = await log(env, lead["id"], kind="note", notes="asked for a quote")
    visit = await log(env, lead["id"], kind="note", next_follow_up_at=now + 3 * day)
    assert await follow_ups(env, lead["id"]) == [(call["id"], "open", now + day), (visit["id"], "open", now + 3 * day)]

    async def plan(activity: Any, at: datetime | None, version: int) -> None:
        with env.acting("rep1", scope=ScopeKind.OWN):
            await env.service.update_activity(
                lead["id"], activity["id"], {"next_follow_up_at": at}, ["next_follow_up_at"], version,
                leads_scope=scope(ScopeKind.OWN),
            )  # fmt: skip

    await plan(call, now + 2 * day, 1)  # moved
    await plan(note, now + 4 * day, 1)  # planned now: a task, as logging it with that time makes
    await plan(call, None, 2)  # cleared: its task is cancelled
    with env.acting("rep1", scope=ScopeKind.OWN):
        await env.service.delete_activity(lead["id"], visit["id"], 1, leads_scope=scope(ScopeKind.OWN))

    assert await follow_ups(env, lead["id"]) == [
        (call["id"], "cancelled", now + 2 * day),
        (visit["id"], "cancelled", now + 3 * day),
        (note["id"], "open", now + 4 * day),
    ]
    with env.acting("admin", roles=("admin",)):
        tasks, _ = await env.service.list_tasks(lead["id"], "open", limit=50, cursor="")
    assert [(t["kind"], t["owner_id"]) for t in tasks] == [("follow_up", "rep1")]


async def test_an_edit_is_checked_as_a_logged_activity_is_and_refused_whole(env_each_database: Any) -> None:
    env = env_each_database
    now = env.clock.now
    lead = await new_lead(env)
    call = await log(env, lead["id"], kind="call", occurred_at=now - timedelta(hours=2), next_follow_up_at=now)

    async def refused(data: dict[str, Any], paths: list[str]) -> list[str]:
        with env.acting("rep1", scope=ScopeKind.OWN), pytest.raises(ValidationFailed) as caught:
            await env.service.update_activity(lead["id"], call["id"], data, paths, 0, leads_scope=scope(ScopeKind.OWN))
        return [e.field for e in caught.value.errors]

    assert await refused({"kind": "fax", "notes": "ok"}, ["kind", "notes"]) == ["kind"]
    assert await refused({"occurred_at": now + CLOCK_SKEW + timedelta(minutes=1)}, ["occurred_at"]) == ["occurred_at"]
    assert await refused({"occurred_at": None}, ["occurred_at"]) == ["occurred_at"]
    # Each field is checked with the others as stored: the follow-up must stay after the activity.
    assert await refused({"next_follow_up_at": now - timedelta(hours=3)}, ["next_follow_up_at"]) == [
        "next_follow_up_at"
    ]
    assert await refused({"occurred_at": now}, ["occurred_at"]) == ["next_follow_up_at"]
    assert await refused({"actor_id": "rep2"}, ["actor_id"]) == ["actor_id"]
    assert await refused({}, []) == ["update_mask"]
    async with env.engine.connect() as conn:
        stored = (await conn.execute(select(repo.activities))).mappings().one()
    assert (stored["kind"], stored["version"], stored["actor_id"]) == ("call", 1, "rep1")


async def test_an_activity_is_corrected_only_in_the_callers_scopes_and_at_its_version(env_each_database: Any) -> None:
    env = env_each_database
    lead = await new_lead(env, owner_id="rep1")
    other_lead = await new_lead(env, owner_id="rep1")
    mine = await log(env, lead["id"], kind="call")
    managers = await log(env, lead["id"], "mgr", ScopeKind.TEAM, kind="note")

    async def edit(user: str, activity: Any, activities: RecordScope, leads: RecordScope, lead_id: str = "") -> Any:
        with env.acting(user, scope=activities.kind, team=activities.team):
            _, after = await env.service.update_activity(
                lead_id or lead["id"], activity["id"], {"notes": f"by {user}"}, ["notes"], 0, leads_scope=leads
            )
        return after

    assert (await edit("rep1", mine, scope(ScopeKind.OWN), scope(ScopeKind.OWN)))["notes"] == "by rep1"
    manager = scope(ScopeKind.TEAM, "mgr")
    assert (await edit("mgr", mine, manager, manager))["notes"] == "by mgr"  # a teammate's, in the team
    hidden = [
        ("rep1", managers, scope(ScopeKind.OWN), scope(ScopeKind.OWN), ""),  # on their lead, but not theirs
        ("rep2", mine, scope(ScopeKind.ALL, "rep2"), scope(ScopeKind.OWN, "rep2"), ""),  # not their lead
        ("west", mine, scope(ScopeKind.TEAM, "west", "west"), scope(ScopeKind.ALL, "west", "west"), ""),
        ("rep1", mine, scope(ScopeKind.OWN), scope(ScopeKind.OWN), other_lead["id"]),  # under another lead
    ]
    for user, activity, activities, leads, lead_id in hidden:
        with pytest.raises(NotFound):
            await edit(user, activity, activities, leads, lead_id)

    with env.acting("rep1", scope=ScopeKind.OWN):
        with pytest.raises(StaleVersion) as stale:
            await env.service.update_activity(
                lead["id"], mine["id"], {"notes": "late"}, ["notes"], 1, leads_scope=scope(ScopeKind.OWN)
            )
        assert stale.value.current_version == 3
        with pytest.raises(StaleVersion):
            await env.service.delete_activity(lead["id"], mine["id"], 2, leads_scope=scope(ScopeKind.OWN))
    with env.acting("admin", roles=("admin",)):
        rows, _ = await env.service.list_activities(lead["id"], limit=9, cursor="")
    notes = {a["id"]: (a["notes"], a["version"]) for a in rows}
    assert notes == {mine["id"]: ("by mgr", 3), managers["id"]: ("", 1)}


async def test_the_activities_of_a_closed_lead_stay_as_they_are(env_each_database: Any) -> None:
    env = env_each_database
    lead = await new_lead(env)
    call = await log(env, lead["id"], kind="call")
    with env.acting("admin", roles=("admin",)):
        await env.service.disqualify(lead["id"], "no budget", 0)
        with pytest.raises(Conflict) as edit:
            await env.service.update_activity(
                lead["id"], call["id"], {"notes": "x"}, ["notes"], 0, leads_scope=scope(ScopeKind.ALL)
            )
        with pytest.raises(Conflict) as deletion:
            await env.service.delete_activity(lead["id"], call["id"], 0, leads_scope=scope(ScopeKind.ALL))
    assert edit.value.reason == deletion.value.reason == "ILLEGAL_TRANSITION"
    assert len(await follow_ups(env, lead["id"])) == 0


async def test_a_deleted_activity_leaves_the_score_and_is_announced(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(ScoringRule(id="", activity_kind="call", min_count=2, points=25), "2", "")
    lead = await new_lead(env)
    first = await log(env, lead["id"], kind="call")
    await log(env, lead["id"], kind="call")
    assert (await lead_now(env, lead["id"]))["score"] == 25

    with env.acting("rep1", scope=ScopeKind.OWN):
        deleted = await env.service.delete_activity(lead["id"], first["id"], 1, leads_scope=scope(ScopeKind.OWN))
        with pytest.raises(NotFound):  # gone
            await env.service.delete_activity(lead["id"], first["id"], 0, leads_scope=scope(ScopeKind.OWN))

    assert (deleted["id"], deleted["kind"]) == (first["id"], "call")
    assert (await lead_now(env, lead["id"]))["score"] == 0
    with env.acting("admin", roles=("admin",)):
        history, _ = await env.service.score_history(lead["id"], limit=50, cursor="")
        left, _ = await env.service.list_activities(lead["id"], limit=9, cursor="")
    assert [(h["previous_score"], h["score"]) for h in history][-1] == (25, 0)
    assert len(left) == 1 and left[0]["id"] != first["id"]
    events = await outbox_events(env.engine, repo.metadata, key=lead["id"])
    assert [t for t, _ in events[-2:]] == ["crm.leads.lead.scored", "crm.leads.lead.activity_deleted"]
    message = events_pb2.LeadActivityDeleted.FromString(events[-1][1])
    assert (message.lead_id, message.activity_id, message.actor.user_id) == (lead["id"], first["id"], "rep1")


async def test_over_grpc_the_call_carries_the_activities_scope_and_the_leads_scope_beside_it(
    env: Any, stub: Any
) -> None:
    lead = await new_lead(env)
    call = await log(env, lead["id"], kind="call", notes="tlak")
    manager = Principal(user_id="mgr", roles=("sales_manager",), team="east", region="cn-east")

    def metadata(who: Principal, activities: RecordScope, leads: RecordScope | None) -> Any:
        sent = outgoing_metadata(who, activities)
        return sent if leads is None else (*sent, (resource_scope_key("leads"), leads.to_proto().SerializeToString()))

    team = scope(ScopeKind.TEAM, "mgr")
    corrected = await stub.UpdateLeadActivity(
        pb.UpdateLeadActivityRequest(
            lead_id=lead["id"],
            activity_id=call["id"],
            activity=leads_pb2.LeadActivity(notes="talk", kind="note"),
            update_mask=FieldMask(paths=["notes"]),
            expected_version=1,
        ),
        metadata=metadata(manager, team, team),
    )
    assert (corrected.previous.notes, corrected.activity.notes) == ("tlak", "talk")
    assert (corrected.activity.kind, corrected.activity.version) == ("call", 2)

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.DeleteLeadActivity(
            pb.DeleteLeadActivityRequest(lead_id=lead["id"], activity_id=call["id"], expected_version=1),
            metadata=metadata(manager, team, team),
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    # Without their scope on leads, a caller has their own leads only: rep1's lead is not the manager's.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await stub.DeleteLeadActivity(
            pb.DeleteLeadActivityRequest(lead_id=lead["id"], activity_id=call["id"]),
            metadata=metadata(manager, team, None),
        )
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND

    deleted = await stub.DeleteLeadActivity(
        pb.DeleteLeadActivityRequest(lead_id=lead["id"], activity_id=call["id"], expected_version=2),
        metadata=metadata(manager, team, team),
    )
    assert (deleted.activity.id, deleted.activity.notes) == (call["id"], "talk")


async def test_the_migration_links_existing_follow_up_tasks_to_the_activities_that_planned_them(
    each_database_url: str,
) -> None:
    """Logging made an activity and its follow-up task together; two activities of one lead that
    planned the same time each get their own task."""
    url = each_database_url
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, url, "0013")
    due = datetime(2026, 3, 9, 9, 0, tzinfo=UTC)

    def activity(activity_id: str, kind: str) -> dict[str, Any]:
        return {"id": activity_id, "lead_id": "L1", "kind": kind, "occurred_at": due - timedelta(days=2),
                "next_follow_up_at": due}  # fmt: skip

    def task(task_id: str, kind: str) -> dict[str, Any]:
        return {"id": task_id, "lead_id": "L1", "kind": kind, "due_at": due, "status": "open", "created_at": due}

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:  # the columns of revision 0013 only
            await conn.execute(insert(repo.activities), [activity("01-a", "call"), activity("03-a", "note")])
            await conn.execute(insert(repo.tasks), [task("02-t", "follow_up"), task("04-t", "follow_up")])
            await conn.execute(insert(repo.tasks), [task("05-t", "first_contact")])
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, url)
        async with engine.connect() as conn:
            linked = list(await conn.execute(select(repo.tasks.c.id, repo.tasks.c.activity_id).order_by("id")))
            versions = set((await conn.execute(select(repo.activities.c.version))).scalars())
    finally:
        await engine.dispose()
    assert [tuple(row) for row in linked] == [("02-t", "01-a"), ("04-t", "03-a"), ("05-t", "")]
    assert versions == {1}
