"""The pool and a lead's scope are one rule (`repository.lead_scope_clause`): a lead the pool lists
is one its caller reads (GET, the list with `in_pool=true`) and acts on, a team manager on the
team-less ones too (web-form spam with no team); a rep reads their pool and works a pool lead by
claiming it. A rep's import is theirs, as a lead they enter is."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from crm_platform.errors import Conflict, NotFound
from crm_platform.principal import ScopeKind, current_scope
from leads import repository as repo
from leads.domain import ScoringRule
from leads.handlers import ImportOptions, ImportPartResult, ImportSpec, LeadFilters
from leads.importing import RowMapper
from sqlalchemy import select

pytestmark = pytest.mark.integration


async def _pool_leads(env: Any) -> dict[str, dict[str, Any]]:
    """Pool leads by name: three team-less (a web form without a team), one of east, one of west."""
    made: dict[str, dict[str, Any]] = {}
    for name, team in (("spam1", ""), ("spam2", ""), ("spam3", ""), ("east lead", "east"), ("west lead", "west")):
        with env.acting("admin", roles=("admin",), team=team):
            lead, _ = await env.service.create_lead({"name": name, "team": team})
        assert (lead["team"], lead["owner_id"], lead["in_pool"]) == (team, "", True)
        made[name] = dict(lead)
    return made


async def _pool_and_list(env: Any) -> tuple[set[str], set[str]]:
    pool, _ = await env.service.list_pool(region="", industry="", source="", limit=100, cursor="")
    listed, _ = await env.service.list_leads(LeadFilters(in_pool=True), limit=100, cursor="", sort="")
    return {r["name"] for r in pool}, {r["name"] for r in listed}


async def test_a_team_manager_reads_and_acts_on_the_team_less_leads_the_pool_shows(env: Any) -> None:
    made = await _pool_leads(env)
    with env.acting("manager", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        pool, listed = await _pool_and_list(env)
        assert pool == listed == {"spam1", "spam2", "spam3", "east lead"}
        assert (await env.service.get_lead(made["spam1"]["id"]))["name"] == "spam1"
        assigned = (await env.service.assign(made["spam1"]["id"], "rep1", "east", 0)).record
        disqualified = (await env.service.disqualify(made["spam2"]["id"], "spam", 0)).record
        await env.service.delete_lead(made["spam3"]["id"], 0)
        west = made["west lead"]["id"]
        for action in (
            env.service.get_lead(west),
            env.service.assign(west, "rep1", "east", 0),
            env.service.disqualify(west, "spam", 0),
            env.service.delete_lead(west, 0),
        ):
            with pytest.raises(NotFound):  # another team's pool: as before, it does not exist
                await action
    assert (assigned["owner_id"], assigned["team"], assigned["in_pool"]) == ("rep1", "east", False)
    assert (disqualified["status"], disqualified["in_pool"]) == ("unqualified", False)
    async with env.engine.connect() as conn:
        assert await conn.scalar(select(repo.leads.c.id).where(repo.leads.c.id == made["spam3"]["id"])) is None


async def test_a_rep_reads_the_pool_they_may_claim_and_works_a_pool_lead_once_claimed(env: Any) -> None:
    made = await _pool_leads(env)
    spam = made["spam1"]["id"]
    with env.acting("rep1", team="east", scope=ScopeKind.OWN):
        pool, listed = await _pool_and_list(env)
        assert pool == listed == {"spam1", "spam2", "spam3", "east lead"}
        assert (await env.service.get_lead(spam))["name"] == "spam1"
        with pytest.raises(Conflict) as unclaimed:  # seen, not theirs: a claim first (within its limit)
            await env.service.disqualify(spam, "spam", 0)
        with pytest.raises(NotFound):
            await env.service.get_lead(made["west lead"]["id"])
        claimed = await env.service.claim(spam)
        worked = (await env.service.disqualify(spam, "spam", 0)).record
    assert unclaimed.value.reason == "IN_POOL"
    assert (claimed["owner_id"], claimed["team"]) == ("rep1", "east")  # a team-less lead takes the claimer's team
    assert worked["status"] == "unqualified"


async def test_the_in_memory_scope_agrees_with_the_clause(env: Any) -> None:
    """`lead_in_scope` (leads loaded without the clause, as a merge's) is `lead_scope_clause`."""
    await _pool_leads(env)
    with env.acting("manager", roles=("sales_manager",)):
        await env.service.create_lead({"name": "held", "owner_id": "rep1", "team": "east"})
        await env.service.create_lead({"name": "held west", "owner_id": "rep2", "team": "west"})
    async with env.engine.connect() as conn:
        rows = list((await conn.execute(select(repo.leads))).mappings())
        for kind in ScopeKind:
            for team in ("east", ""):
                with env.acting("rep1", team=team, scope=kind):
                    scope = current_scope()
                    clause = repo.lead_scope_clause(scope)
                    selected = set(await conn.scalars(select(repo.leads.c.id).where(clause)))
                    assert selected == {r["id"] for r in rows if repo.lead_in_scope(scope, r)}, (kind, team)


async def _import(env: Any, body: bytes, import_id: str) -> ImportPartResult:
    async def chunks() -> AsyncIterator[bytes]:
        yield body

    options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}, campaign_id=""), on_duplicate="reject")
    return await env.service.import_part(ImportSpec(import_id=import_id, format="csv", options=options), chunks())


async def _tasks(env: Any, lead_ids: list[str]) -> list[tuple[str, str, str]]:
    t = repo.tasks.c
    async with env.engine.connect() as conn:
        rows = await conn.execute(select(t.kind, t.owner_id, t.status).where(t.lead_id.in_(lead_ids)))
    return sorted(tuple(row) for row in rows)


async def test_a_reps_import_is_theirs_and_a_managers_goes_to_the_pool(env: Any) -> None:
    with env.acting("rep1", team="east", scope=ScopeKind.OWN):
        mine = await _import(env, b"name,owner_id\nAnn,\nBob,\n", "rep-import")
        ids = [o.lead_id for o in mine.outcomes]
        leads = [await env.service.get_lead(lead_id) for lead_id in ids]  # opened, not lost to the pool
    assert [(r["owner_id"], r["team"], r["in_pool"]) for r in leads] == [("rep1", "east", False)] * 2
    assert all(r["first_contact_due_at"] is not None and r["assigned_at"] is not None for r in leads)
    assert await _tasks(env, ids) == [("first_contact", "rep1", "open")] * 2
    assert (await env.loads_kept()).get("rep1") == 2 == (await env.loads_counted()).get("rep1")
    with env.acting("manager", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        theirs = await _import(env, b"name\nCarl\n", "manager-import")
        pooled = await env.service.get_lead(theirs.outcomes[0].lead_id)
    assert (pooled["owner_id"], pooled["team"], pooled["in_pool"]) == ("", "east", True)
    assert await _tasks(env, [pooled["id"]]) == []


async def test_a_rep_pages_through_the_pool_best_scored_first(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(
            ScoringRule(id="", field="company", operator="contains", value="Inc", points=40), "inc", ""
        )
        await env.service.create_scoring_rule(
            ScoringRule(id="", field="title", operator="present", points=20), "title", ""
        )
        for name, company, title in (("low", "", ""), ("top", "Big Inc", "CTO"), ("mid", "Mid Inc", ""),
                                     ("some", "", "CEO")):  # fmt: skip
            await env.service.create_lead({"name": name, "company": company, "title": title})
    with env.acting("rep", roles=("sales_rep",)):
        first, cursor = await env.service.list_pool(
            region="", industry="", source="", limit=2, cursor="", sort="-score"
        )
        rest, end = await env.service.list_pool(
            region="", industry="", source="", limit=2, cursor=cursor, sort="-score"
        )
    assert [(r["name"], r["score"]) for r in first + rest] == [("top", 60), ("mid", 40), ("some", 20), ("low", 0)]
    assert end == ""


async def test_the_pool_is_sorted_through_the_gateway_as_the_lead_list_is(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(
            ScoringRule(id="", field="company", operator="contains", value="Inc", points=40), "inc", ""
        )
        for name, company in (("b", "B Inc"), ("a", ""), ("c", "")):
            await env.service.create_lead({"name": name, "company": company})
    rep = bearer("rep1", "sales_rep")

    by_name = await admin.get("/api/v1/lead-pool", params={"sort": "name"}, headers=rep)
    by_score = await admin.get("/api/v1/lead-pool", params={"sort": "-score", "limit": 1}, headers=rep)
    unknown = await admin.get("/api/v1/lead-pool", params={"sort": "owner_id"}, headers=rep)

    assert [lead["name"] for lead in by_name.json()["items"]] == ["a", "b", "c"], by_name.text
    assert [lead["name"] for lead in by_score.json()["items"]] == ["b"] and by_score.json()["next_cursor"]
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "sort", unknown.text


async def test_a_lead_entered_by_someone_who_works_no_team_goes_to_the_pool_every_team_sees(env: Any) -> None:
    with env.acting("mkt1", roles=("marketing",), team="mkt"):  # marketing sees leads across teams
        captured, _ = await env.service.create_lead({"name": "Expo visitor"})
    with env.acting("rep9", team="east", scope=ScopeKind.OWN):  # a rep's own lead is their team's
        own, _ = await env.service.create_lead({"name": "Walk-in"})
    with env.acting("lead-of-east", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        entered, _ = await env.service.create_lead({"name": "Referral"})
    assert (captured["team"], captured["in_pool"]) == ("", True)
    assert (own["team"], own["owner_id"]) == ("east", "rep9")
    assert entered["team"] == "east"
    with env.acting("rep1", team="west", scope=ScopeKind.OWN):
        pool, _ = await env.service.list_pool(region="", industry="", source="", limit=10, cursor="")
    assert [lead["name"] for lead in pool] == ["Expo visitor"]
