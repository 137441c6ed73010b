"""Assignment rules are held to the caller's scope on assigning leads, as `/assign` is: a team
manager manages the rules of their team and no other, so a rule cannot route another team's leads
to them. Assigning a lead to the owner it has is no new assignment, and a team is given with its
owner, never dropped."""

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from crm_platform.errors import PermissionDenied, ValidationFailed
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.domain import AssignmentRule
from leads.handlers import ImportOptions, ImportSpec
from leads.importing import RowMapper

pytestmark = pytest.mark.integration


async def _import_assigned(env: Any, rows: list[dict[str, str]]) -> str:
    """Imports `rows` (JSON) with `assign=true`; the first row's lead id."""

    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps(rows).encode()

    options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}), assign=True)
    result = await env.service.import_part(ImportSpec(import_id="imp-team", format="json", options=options), chunks())
    return str(result.outcomes[0].lead_id)


def rule(team: str, *users: str, region: str = "west") -> AssignmentRule:
    return AssignmentRule(id="", position=1, user_ids=users, team=team, regions=frozenset({region}))


async def test_a_team_manager_manages_the_rules_of_their_team_only(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        wests = await env.service.create_assignment_rule(rule("west", "w1"), "west leads", "")
    with env.acting("m-east", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        easts = await env.service.create_assignment_rule(rule("east", "e1", region="east"), "east leads", "")
        with pytest.raises(PermissionDenied) as created:
            await env.service.create_assignment_rule(rule("west", "e1"), "into west", "")
        with pytest.raises(PermissionDenied) as taken_over:
            await env.service.update_assignment_rule(replace(rule("east", "e1"), id=wests["id"]), "hijack", 0)
        with pytest.raises(PermissionDenied) as deleted:
            await env.service.delete_assignment_rule(wests["id"])
        with pytest.raises(PermissionDenied) as moved_away:
            await env.service.update_assignment_rule(replace(rule("west", "e1"), id=easts["id"]), "east leads", 0)
    for refusal in (created, taken_over, deleted, moved_away):
        assert (refusal.value.field, refusal.value.detail) == ("team", "you may manage only rules of team east")
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Wang", "region": "west"})
    assert (lead["owner_id"], lead["team"]) == ("w1", "west")  # the west rule routes as the admin made it


async def test_assigning_a_lead_to_its_owner_again_changes_nothing(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Li", "owner_id": "u1", "team": "east"})
        env.clock.advance(hours=3)
        again = (await env.service.assign(lead["id"], "u1", "", 0)).record
        same_team = (await env.service.assign(lead["id"], "u1", "east", 0)).record
    assert again["version"] == same_team["version"] == lead["version"]
    assert again["first_contact_due_at"] == lead["first_contact_due_at"]  # the SLA is not restarted
    types = [event_type for event_type, _ in await outbox_events(env.engine, repo.metadata, key=lead["id"])]
    assert types.count("crm.leads.lead.assigned") == 1


async def test_a_team_without_an_owner_is_refused_not_dropped(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Li"})
        with pytest.raises(ValidationFailed) as refused:
            await env.service.assign(lead["id"], "", "west", 0)
    assert [e.field for e in refused.value.errors] == ["team"]


async def test_a_rule_without_reps_routes_its_leads_to_its_teams_pool(env: Any) -> None:
    """SPEC §4: a rule routes to a team or a user list. A team's rule puts its leads in the team's
    pool, where the team's reps claim them, whether captured, imported or assigned by the rules."""
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=(), team="west", regions=frozenset({"west"})), "west queue", ""
        )
        created, _ = await env.service.create_lead({"name": "Created", "region": "west"})
        later, _ = await env.service.create_lead({"name": "Later", "region": "north", "team": "north"})
        moved = (
            await env.service.assign(
                (await env.service.update_lead(later["id"], {"region": "west"}, ["region"], 0)).record["id"], "", "", 0
            )
        ).record
        imported = await _import_assigned(env, [{"name": "Imported", "region": "west"}])
        imported_lead = await env.service.get_lead(imported)
    with env.acting("w-rep", roles=("sales_rep",), team="west", scope=ScopeKind.OWN):
        pool, _ = await env.service.list_pool(region="", industry="", source="", limit=50, cursor="")
    for lead in (created, moved, imported_lead):
        assert (lead["owner_id"], lead["team"], lead["in_pool"]) == ("", "west", True)
    assert {lead["name"] for lead in pool} == {"Created", "Later", "Imported"}


async def test_running_the_rules_again_on_a_lead_they_would_give_the_same_place_changes_nothing(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(rule("east", "e1", region="east"), "east leads", "")
        routed, _ = await env.service.create_lead({"name": "Routed", "region": "east"})
        pooled, _ = await env.service.create_lead({"name": "Pooled", "region": "nowhere"})
        env.clock.advance(hours=3)
        again = (await env.service.assign(routed["id"], "", "", 0)).record
        still = (await env.service.assign(pooled["id"], "", "", 0)).record
    assert (again["owner_id"], again["version"]) == ("e1", routed["version"])
    assert again["first_contact_due_at"] == routed["first_contact_due_at"]
    assert (still["in_pool"], still["version"]) == (True, pooled["version"])
