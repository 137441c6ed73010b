"""A team manager's assignment rules are their team's queue: they match only the leads of the
manager's team (`lead_team`), so no rule of theirs, however early or broad, takes another team's
leads. The scoring rules and grade thresholds score every lead of the company: only a caller
assigning leads in every scope changes them. A blank user of a rule is refused, not dropped."""

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from crm_platform.errors import PermissionDenied
from crm_platform.principal import ScopeKind
from leads.domain import AssignmentRule, ScoringRule, Thresholds
from leads.handlers import ImportOptions, ImportSpec
from leads.importing import RowMapper

pytestmark = pytest.mark.integration

CATCH_ALL = AssignmentRule(id="", position=-1000, user_ids=("e1",), team="east")
EAST_LEADS_ONLY = ("lead_team", "you may manage only rules for the leads of team east")
SCORING_REFUSED = "scoring rules apply to every lead: you may manage them only with the assign permission on all leads"


def _manager(env: Any, team: str) -> Any:
    return env.acting(f"m-{team}", roles=("sales_manager",), team=team, scope=ScopeKind.TEAM)


async def _import_assigned(env: Any, name: str) -> dict[str, Any]:
    """The lead of a one-row import with `assign=true`."""

    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps([{"name": name, "region": "cn-west"}]).encode()

    options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}), assign=True)
    result = await env.service.import_part(
        ImportSpec(import_id=f"imp-{name}", format="json", options=options), chunks()
    )
    return dict(await env.service.get_lead(str(result.outcomes[0].lead_id)))


async def test_a_team_managers_catch_all_rule_takes_only_their_teams_leads(env: Any) -> None:
    """Review J-1: the east manager's rule, first and without conditions, or naming the west's
    region, took the leads the west manager entered, out of the west's sight."""
    with _manager(env, "east"):
        catch_all = await env.service.create_assignment_rule(CATCH_ALL, "grab all", "")
        west_region = await env.service.create_assignment_rule(
            replace(CATCH_ALL, position=-1, regions=frozenset({"cn-west"})), "west region to east", ""
        )
    assert catch_all["lead_team"] == west_region["lead_team"] == "east"
    with _manager(env, "west"):
        entered, _ = await env.service.create_lead({"name": "West lead", "region": "cn-west"})
        imported = await _import_assigned(env, "West import")
        assigned_again = (await env.service.assign(entered["id"], "", "", 0)).record
        seen = await env.service.get_lead(entered["id"])
    with _manager(env, "east"):
        easts, _ = await env.service.create_lead({"name": "East lead", "region": "cn-west"})
    for lead in (entered, imported, assigned_again):
        assert (lead["owner_id"], lead["team"], lead["in_pool"]) == ("", "west", True)  # the west's pool
    assert seen["name"] == "West lead"
    assert (easts["owner_id"], easts["team"]) == ("e1", "east")


async def test_a_team_manager_manages_only_their_teams_queues(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        admins_catch_all = await env.service.create_assignment_rule(CATCH_ALL, "east reps take all", "")
    with _manager(env, "east"):
        with pytest.raises(PermissionDenied) as for_west:
            await env.service.create_assignment_rule(replace(CATCH_ALL, lead_team="west"), "west to east", "")
        with pytest.raises(PermissionDenied) as widened:
            await env.service.update_assignment_rule(replace(CATCH_ALL, id=admins_catch_all["id"]), "mine", 0)
        with pytest.raises(PermissionDenied) as deleted:
            await env.service.delete_assignment_rule(admins_catch_all["id"])
        own = await env.service.create_assignment_rule(CATCH_ALL, "east queue", "")
        updated = (
            await env.service.update_assignment_rule(replace(CATCH_ALL, id=own["id"], capacity=3), "east", 0)
        ).record
        await env.service.delete_assignment_rule(own["id"])
    for refusal in (for_west, widened, deleted):
        assert (refusal.value.field, refusal.value.detail) == EAST_LEADS_ONLY
    assert (updated["lead_team"], updated["capacity"]) == ("east", 3)  # kept their team's without naming it
    rules, _ = await env.service.list_assignment_rules(limit=50, cursor="")
    assert [r["id"] for r in rules] == [admins_catch_all["id"]]


async def test_a_caller_assigning_in_every_scope_routes_any_teams_leads(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(replace(CATCH_ALL, lead_team="WEST"), "west to e1", "")
    with _manager(env, "west"):
        wests, _ = await env.service.create_lead({"name": "West lead"})
    with _manager(env, "east"):
        easts, _ = await env.service.create_lead({"name": "East lead"})
    assert (wests["owner_id"], wests["team"]) == ("e1", "east")  # lead_team matched case-blind
    assert (easts["owner_id"], easts["team"], easts["in_pool"]) == ("", "east", True)


@pytest.mark.parametrize("scope", [ScopeKind.TEAM, ScopeKind.REGION])
async def test_only_a_caller_assigning_in_every_scope_changes_the_scoring(env: Any, scope: ScopeKind) -> None:
    """Review J-2: a team manager rewrote the scoring that rescored every team's leads."""
    points = ScoringRule(id="", field="company", operator="contains", value="a", points=10)
    with env.acting("admin", roles=("admin",)):
        admins = await env.service.create_scoring_rule(points, "admin's", "")
    with env.acting("m-east", roles=("sales_manager",), team="east", scope=scope):
        refusals = []
        for change in (
            env.service.create_scoring_rule(points, "mine", ""),
            env.service.update_scoring_rule(replace(points, id=admins["id"], points=50), "mine", 0),
            env.service.delete_scoring_rule(admins["id"]),
            env.service.set_thresholds(Thresholds(a=99, b=98, c=97)),
        ):
            with pytest.raises(PermissionDenied) as refused:
                await change
            refusals.append(refused.value.detail)
    rules, _, thresholds, version = await env.service.list_scoring_rules(limit=50, cursor="")
    assert refusals == [SCORING_REFUSED] * 3 + [
        "grade thresholds apply to every lead: you may manage them only with the assign permission on all leads"
    ]
    assert [(r["id"], r["points"], r["version"]) for r in rules] == [(admins["id"], 10, 1)]
    assert (thresholds, version) == (Thresholds(), 1)


async def test_team_queues_scoring_and_blank_users_over_rest(
    admin: httpx.AsyncClient, bearer: Callable[[str, str], dict[str, str]]
) -> None:
    """The same through the gateway, as a team manager (team east) and the admin call it."""
    manager = bearer("m-east", "sales_manager")
    route = "/api/v1/lead-assignment-rules"
    rule = {"name": "grab all", "position": -1000, "team": "east", "user_ids": ["r1"]}
    created = await admin.post(route, json=rule, headers=manager)
    for_west = await admin.post(route, json={**rule, "lead_team": "west"}, headers=manager)
    scoring = await admin.post(
        "/api/v1/lead-scoring-rules",
        json={"name": "mgr rule", "field": "company", "operator": "contains", "value": "a", "points": 50},
        headers=manager,
    )
    thresholds = await admin.put(
        "/api/v1/lead-scoring-rules/thresholds", json={"a": 99, "b": 98, "c": 97}, headers=manager
    )
    blank_users = [await admin.post(route, json={**rule, "user_ids": users}) for users in ([" "], ["a", " "])]
    wests = await admin.post("/api/v1/leads", json={"name": "West lead", "team": "west"})
    easts = await admin.post("/api/v1/leads", json={"name": "East lead"}, headers=manager)  # of the manager's team
    assert created.status_code == 201, created.text
    assert created.json()["lead_team"] == "east"
    assert for_west.status_code == 403, for_west.text
    assert "you may manage only rules for the leads of team east" in for_west.json()["detail"]
    assert (scoring.status_code, scoring.json()["detail"]) == (403, SCORING_REFUSED)
    assert thresholds.status_code == 403, thresholds.text
    for refused, field in zip(blank_users, ("user_ids[0]", "user_ids[1]"), strict=True):
        assert refused.status_code == 422, refused.text
        assert [e["field"] for e in refused.json()["errors"]] == [field]
    assert (wests.json()["owner_id"], wests.json()["team"]) == ("", "west")
    assert (easts.json()["owner_id"], easts.json()["team"]) == ("r1", "east")
