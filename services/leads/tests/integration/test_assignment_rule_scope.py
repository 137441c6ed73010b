"""Assignment rules are held to the caller's scope on assigning leads, as `/assign` is: a team
manager manages the rules of their team and no other, so a rule cannot route another team's leads
to them. Assigning a lead to the owner it has is no new assignment, and a team is given with its
owner, never dropped."""

from dataclasses import replace
from typing import Any

import pytest
from crm_platform.errors import PermissionDenied, ValidationFailed
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.domain import AssignmentRule

pytestmark = pytest.mark.integration


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
        again = await env.service.assign(lead["id"], "u1", "", 0)
        same_team = await env.service.assign(lead["id"], "u1", "east", 0)
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
