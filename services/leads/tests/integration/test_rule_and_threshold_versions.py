"""Deleting a scoring or assignment rule, and setting the grade thresholds, honour If-Match (SPEC §3),
as replacing a rule does: a write based on a stale read is refused (412 with the current version)
and changes nothing, instead of undoing a change another admin just made. The thresholds carry a
version of their own (1 while the defaults hold), sent as the `ETag` of the rule listing and of
their PUT."""

from typing import Any

import httpx
import pytest
from crm_platform.errors import StaleVersion
from leads.domain import AssignmentRule, ScoringRule, Thresholds

pytestmark = pytest.mark.integration

RULES = {
    "/api/v1/lead-scoring-rules": {
        "name": "Inc",
        "field": "company",
        "operator": "contains",
        "value": "Inc",
        "points": 5,
    },
    "/api/v1/lead-assignment-rules": {"name": "North", "regions": ["north"], "user_ids": ["u-2"]},
}


def _admin(env: Any) -> Any:
    return env.acting("admin", roles=("admin",))


async def _rule_counts(env: Any) -> tuple[int, int]:
    """(scoring rules, assignment rules) on their first pages."""
    scoring, *_ = await env.service.list_scoring_rules(limit=50, cursor="")
    assignment, _ = await env.service.list_assignment_rules(limit=50, cursor="")
    return len(scoring), len(assignment)


async def test_a_rule_is_deleted_only_at_its_current_version(env: Any) -> None:
    scoring = ScoringRule(id="", points=5, field="company", operator="contains", value="Inc")
    assignment = AssignmentRule(id="", position=1, user_ids=("u1",), regions=frozenset({"north"}))
    with _admin(env):
        scoring_rule = await env.service.create_scoring_rule(scoring, "Inc", "")
        assignment_rule = await env.service.create_assignment_rule(assignment, "North", "")
        with pytest.raises(StaleVersion) as scoring_stale:
            await env.service.delete_scoring_rule(scoring_rule["id"], scoring_rule["version"] + 1)
        with pytest.raises(StaleVersion) as assignment_stale:
            await env.service.delete_assignment_rule(assignment_rule["id"], assignment_rule["version"] + 1)
        rules_kept = await _rule_counts(env)
        await env.service.delete_scoring_rule(scoring_rule["id"], scoring_rule["version"])
        await env.service.delete_assignment_rule(assignment_rule["id"], assignment_rule["version"])
        rules_left = await _rule_counts(env)

    assert (scoring_stale.value.current_version, assignment_stale.value.current_version) == (1, 1)
    assert rules_kept == (1, 1)
    assert rules_left == (0, 0)


async def test_the_grade_thresholds_are_set_only_at_their_current_version(env_each_database: Any) -> None:
    env = env_each_database  # the version column is migration 0021's, on SQLite as on PostgreSQL
    with _admin(env):
        _, _, defaults, first_version = await env.service.list_scoring_rules(limit=50, cursor="")
        first = await env.service.set_thresholds(Thresholds(a=85, b=50, c=30), first_version)
        with pytest.raises(StaleVersion) as stale:
            await env.service.set_thresholds(Thresholds(a=70, b=40, c=20), first_version)
        _, _, kept, kept_version = await env.service.list_scoring_rules(limit=50, cursor="")
        unconditional = await env.service.set_thresholds(Thresholds(a=70, b=40, c=20))

    assert (defaults, first_version) == (Thresholds(), 1)
    assert (first.previous, first.record) == ((Thresholds(), 1), (Thresholds(a=85, b=50, c=30), 2))
    assert stale.value.current_version == 2
    assert (kept, kept_version) == (Thresholds(a=85, b=50, c=30), 2)
    assert unconditional.previous == (Thresholds(a=85, b=50, c=30), 2)
    assert unconditional.record == (Thresholds(a=70, b=40, c=20), 3)


# --- through the gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("route", list(RULES))
async def test_a_rule_deleted_with_a_stale_if_match_is_refused_and_kept(admin: httpx.AsyncClient, route: str) -> None:
    created = await admin.post(route, json=RULES[route])
    rule_path = f"{route}/{created.json()['id']}"
    renamed = await admin.put(rule_path, json={**RULES[route], "name": "Renamed"})  # by another admin

    stale = await admin.delete(rule_path, headers={"If-Match": created.headers["ETag"]})
    kept = await admin.get(rule_path)
    current = await admin.delete(rule_path, headers={"If-Match": renamed.headers["ETag"]})

    assert stale.status_code == 412, stale.text
    assert stale.json()["current_version"] == renamed.json()["version"]
    assert (kept.status_code, kept.json()["name"]) == (200, "Renamed")
    assert current.status_code == 204, current.text
    assert (await admin.get(rule_path)).status_code == 404


async def test_the_grade_thresholds_carry_an_etag_that_if_match_sends_back(admin: httpx.AsyncClient) -> None:
    path = "/api/v1/lead-scoring-rules/thresholds"
    listed = await admin.get("/api/v1/lead-scoring-rules")
    read = listed.json()["thresholds"]

    first = await admin.put(path, json={**read, "a": 85}, headers={"If-Match": listed.headers["ETag"]})
    stale = await admin.put(path, json={**read, "a": 70}, headers={"If-Match": listed.headers["ETag"]})
    after = await admin.get("/api/v1/lead-scoring-rules")

    assert (listed.headers["ETag"], read) == ('"1"', {"a": 80, "b": 60, "c": 40, "version": 1})
    assert first.status_code == 200, first.text  # the version read is sent back, and ignored
    assert (first.json(), first.headers["ETag"]) == ({"a": 85, "b": 60, "c": 40, "version": 2}, '"2"')
    assert stale.status_code == 412, stale.text
    assert stale.json()["current_version"] == 2
    assert (after.json()["thresholds"], after.headers["ETag"]) == (first.json(), '"2"')
