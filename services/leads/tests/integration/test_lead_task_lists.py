"""The lead tasks across leads (`GET /lead-tasks`, `SearchLeadTasks`): a rep's list of their
first-contact and follow-up tasks, in the caller's record scope on the tasks' leads (and only their
own tasks when their scope on tasks is `own`), filtered by owner, status, kind and due time
(overdue, today), by due time and keyset paged, each with its lead's name; and
`GET /leads?follow_up_overdue=` for the leads the first-contact SLA flagged."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from crm_platform.errors import ValidationFailed
from crm_platform.principal import RecordScope, ScopeKind
from leads.domain import TaskFilters
from leads.handlers import ActivityInput, LeadFilters

pytestmark = pytest.mark.integration


async def new_lead(env: Any, name: str, owner_id: str, team: str = "east") -> Any:
    """A lead assigned to `owner_id`: its first-contact task is due in 2 hours (the SLA)."""
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": name, "owner_id": owner_id, "team": team})
    return lead


async def plan_follow_up(env: Any, lead: Any, due_in: timedelta) -> None:
    """A note by the lead's owner planning a follow-up task (a note is no contact: the first-contact
    task stays open)."""
    with env.acting(lead["owner_id"], team=lead["team"], scope=ScopeKind.OWN):
        await env.service.log_activity(
            ActivityInput(lead_id=lead["id"], kind="note", next_follow_up_at=env.clock() + due_in)
        )


def tasks_scope(user: str, kind: ScopeKind = ScopeKind.OWN) -> RecordScope:
    """`user`'s scope on tasks as the gateway sends it, of the kind of their scope on leads (as the
    default policy grants both: a rep's own, a manager's team's)."""
    return RecordScope(kind, owner_id=user, team="east", region="cn-east")


async def listed(
    env: Any, user: str = "rep1", scope: ScopeKind = ScopeKind.OWN, *, limit: int = 50, cursor: str = "", **filters: Any
) -> tuple[list[tuple[str, str, str]], str]:
    """(lead name, task kind, task owner) of the tasks `user` lists, and the next page's cursor."""
    with env.acting(user, scope=scope):
        rows, next_page = await env.service.list_scoped_tasks(
            TaskFilters(**filters), tasks_scope=tasks_scope(user, scope), limit=limit, cursor=cursor
        )
    return [(row["lead_name"], row["kind"], row["owner_id"]) for row in rows], next_page


async def test_a_rep_lists_the_tasks_of_their_own_leads_and_a_team_manager_those_of_the_team(env: Any) -> None:
    await new_lead(env, "Mine", "rep1")
    await new_lead(env, "Teammate's", "rep2")
    await new_lead(env, "Other team's", "rep3", team="west")

    mine, _ = await listed(env, "rep1", ScopeKind.OWN)
    team, _ = await listed(env, "manager", ScopeKind.TEAM)

    assert mine == [("Mine", "first_contact", "rep1")]
    assert sorted(team) == [("Mine", "first_contact", "rep1"), ("Teammate's", "first_contact", "rep2")]
    teammates, _ = await listed(env, "manager", ScopeKind.TEAM, owner_id="rep2")
    assert teammates == [("Teammate's", "first_contact", "rep2")]


async def test_a_rep_lists_only_their_own_tasks_of_the_pool_leads_they_see(env: Any) -> None:
    """A rep's scope on leads takes in their team's pool, whose leads carry other people's tasks (a
    manager's follow-up on a lead nobody has claimed): their worklist holds only the tasks they own,
    as their scope on tasks (`own`) says, while the team manager's lists every task of the team's
    leads. The lead's own task list (its history) still shows the rep what was planned on it."""
    with env.acting("admin", roles=("admin",)):
        pooled, _ = await env.service.create_lead({"name": "Pooled", "owner_id": "", "team": "east"})
    with env.acting("manager", roles=("sales_manager",), scope=ScopeKind.TEAM):
        await env.service.log_activity(
            ActivityInput(lead_id=pooled["id"], kind="call", next_follow_up_at=env.clock() + timedelta(days=2))
        )
    await new_lead(env, "Mine", "rep1")

    mine, _ = await listed(env, "rep1", ScopeKind.OWN)
    team, _ = await listed(env, "manager", ScopeKind.TEAM)

    assert mine == [("Mine", "first_contact", "rep1")]
    assert sorted(team) == [("Mine", "first_contact", "rep1"), ("Pooled", "follow_up", "manager")]
    with env.acting("rep1", scope=ScopeKind.OWN):
        history, _ = await env.service.list_tasks(pooled["id"], "open", limit=50, cursor="")
    assert [(task["kind"], task["owner_id"]) for task in history] == [("follow_up", "manager")]


async def test_overdue_tasks_are_the_open_ones_due_before_now_and_the_sla_flags_their_leads(env: Any) -> None:
    late = await new_lead(env, "Late", "rep1")
    await plan_follow_up(env, late, timedelta(days=1))
    env.clock.advance(hours=3)  # past the 2-hour first-contact SLA, before tomorrow's follow-up
    await env.service.flag_overdue_first_contacts()

    overdue, _ = await listed(env, due="overdue")

    assert overdue == [("Late", "first_contact", "rep1")]
    with env.acting("rep1", scope=ScopeKind.OWN):
        flagged, _ = await env.service.list_leads(LeadFilters(follow_up_overdue=True), limit=50, cursor="", sort="")
        unflagged, _ = await env.service.list_leads(LeadFilters(follow_up_overdue=False), limit=50, cursor="", sort="")
    assert [lead["id"] for lead in flagged] == [late["id"]]
    assert unflagged == []


async def test_tasks_due_today_are_those_due_by_the_end_of_the_utc_day_those_overdue_included(env: Any) -> None:
    """As an account's task list means `today`: what was due yesterday and is still open is on it."""
    await new_lead(env, "Late", "rep1")  # the clock is 09:00 UTC: first contact due at 11:00
    env.clock.advance(days=1)  # yesterday's first contact, still not made
    lead = await new_lead(env, "Busy", "rep1")
    await plan_follow_up(env, lead, timedelta(hours=10))  # 19:00 today
    await plan_follow_up(env, lead, timedelta(hours=16))  # 01:00 tomorrow

    today, _ = await listed(env, due="today")
    follow_ups, _ = await listed(env, kind="follow_up")

    assert today == [
        ("Late", "first_contact", "rep1"),
        ("Busy", "first_contact", "rep1"),
        ("Busy", "follow_up", "rep1"),
    ]
    assert follow_ups == [("Busy", "follow_up", "rep1"), ("Busy", "follow_up", "rep1")]


async def test_done_tasks_are_listed_only_when_asked_for(env: Any) -> None:
    lead = await new_lead(env, "Called", "rep1")
    with env.acting("rep1", scope=ScopeKind.OWN):
        await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="call"))

    assert (await listed(env))[0] == []
    assert (await listed(env, status="done"))[0] == [("Called", "first_contact", "rep1")]


async def test_pages_follow_the_due_time_and_end_without_a_cursor(env: Any) -> None:
    lead = await new_lead(env, "Paged", "rep1")
    for days in (3, 1, 2):
        await plan_follow_up(env, lead, timedelta(days=days))
    mine = tasks_scope("rep1")
    with env.acting("rep1", scope=ScopeKind.OWN):
        everything, _ = await env.service.list_scoped_tasks(TaskFilters(), tasks_scope=mine, limit=50, cursor="")
        first, cursor = await env.service.list_scoped_tasks(TaskFilters(), tasks_scope=mine, limit=3, cursor="")
        rest, end = await env.service.list_scoped_tasks(TaskFilters(), tasks_scope=mine, limit=3, cursor=cursor)

    assert [row["due_at"] for row in everything] == sorted(row["due_at"] for row in everything)
    assert [row["id"] for row in first + rest] == [row["id"] for row in everything]
    assert (len(first), len(rest), end) == (3, 1, "")


async def test_overdue_done_tasks_or_unknown_filters_are_refused(env: Any) -> None:
    for filters in ({"status": "done", "due": "overdue"}, {"kind": "call"}, {"due": "tomorrow"}, {"status": ""}):
        with env.acting("rep1", scope=ScopeKind.OWN), pytest.raises(ValidationFailed):
            await env.service.list_scoped_tasks(
                TaskFilters(**filters), tasks_scope=tasks_scope("rep1"), limit=50, cursor=""
            )


async def test_the_gateway_lists_the_callers_lead_tasks_and_filters_leads_by_the_overdue_flag(
    env: Any, admin: httpx.AsyncClient
) -> None:
    created = await admin.post("/api/v1/leads", json={"name": "Wang Fang", "owner_id": "u-1"})
    await new_lead(env, "Someone else's", "rep1")
    env.clock.advance(hours=3)
    await env.service.flag_overdue_first_contacts()

    mine = await admin.get("/api/v1/lead-tasks", params={"owner_id": "me", "due": "overdue", "limit": 1})
    overdue = await admin.get("/api/v1/leads", params={"follow_up_overdue": "true", "owner_id": "me"})
    on_time = await admin.get("/api/v1/leads", params={"follow_up_overdue": "false"})
    exported = await admin.get("/api/v1/exports/leads", params={"follow_up_overdue": "true", "owner_id": "u-1"})

    assert mine.status_code == 200, mine.text
    assert [(t["lead_id"], t["lead_name"], t["kind"], t["status"]) for t in mine.json()["items"]] == [
        (created.json()["id"], "Wang Fang", "first_contact", "open")
    ]
    assert mine.json()["items"][0]["due_at"] == "2026-03-02T11:00:00Z"
    assert mine.json()["next_cursor"] is None
    assert [lead["name"] for lead in overdue.json()["items"]] == ["Wang Fang"]
    assert on_time.json()["items"] == []  # both leads are past their SLA: flagged
    assert exported.status_code == 200, exported.text
    assert "Wang Fang" in exported.text
    assert (await admin.get("/api/v1/lead-tasks", params={"due": "yesterday"})).status_code == 422


async def test_through_the_gateway_a_rep_lists_their_own_tasks_not_others_on_their_pool_leads(
    env: Any, admin: httpx.AsyncClient, bearer: Callable[[str, str], dict[str, str]]
) -> None:
    """The gateway sends the rep's scope on tasks (`own`) along with their scope on leads."""
    with env.acting("admin", roles=("admin",)):
        pooled, _ = await env.service.create_lead({"name": "Pooled", "owner_id": "", "team": "east"})
    planned = await admin.post(
        f"/api/v1/leads/{pooled['id']}/activities",
        json={"kind": "call", "next_follow_up_at": (env.clock() + timedelta(days=2)).isoformat()},
        headers=bearer("manager", "sales_manager"),
    )
    assert planned.status_code == 201, planned.text
    await new_lead(env, "Mine", "rep-1")

    as_rep = await admin.get("/api/v1/lead-tasks", headers=bearer("rep-1", "sales_rep"))
    as_manager = await admin.get("/api/v1/lead-tasks", headers=bearer("manager", "sales_manager"))

    assert as_rep.status_code == 200, as_rep.text
    assert [(t["lead_name"], t["owner_id"]) for t in as_rep.json()["items"]] == [("Mine", "rep-1")]
    assert sorted((t["lead_name"], t["owner_id"]) for t in as_manager.json()["items"]) == [
        ("Mine", "rep-1"),
        ("Pooled", "manager"),
    ]


async def test_a_contact_does_the_follow_ups_due_by_then_not_one_planned_for_later(env: Any) -> None:
    """Monday's call plans Friday's follow-up; Tuesday's WeChat leaves it open; Saturday's call does it."""
    lead = await new_lead(env, "Planned", "rep1")
    friday = env.clock() + timedelta(days=4)

    def contact(kind: str, **planned: Any) -> Any:
        with env.acting("rep1", scope=ScopeKind.OWN):
            return env.service.log_activity(ActivityInput(lead_id=lead["id"], kind=kind, **planned))

    await contact("call", next_follow_up_at=friday)
    env.clock.advance(days=1)
    await contact("wechat")
    assert (await listed(env))[0] == [("Planned", "follow_up", "rep1")]  # the first contact is done

    env.clock.advance(days=4)
    await contact("call")
    assert (await listed(env))[0] == []
    assert sorted((await listed(env, status="done"))[0]) == [
        ("Planned", "first_contact", "rep1"), ("Planned", "follow_up", "rep1"),
    ]  # fmt: skip
