"""An assignment and a disqualification take an Idempotency-Key, as creates, claims and releases do
(SPEC §3: a repeated key returns the first result). A client retrying after a lost answer gets the
lead as the first request left it: the rules do not run again (round robin would hand the lead to
the next rep), no second event is written, and a disqualified lead is not refused as closed. Keys
are the caller's own; another request under a used key is a 422 naming the header, and does nothing."""

from typing import Any

import httpx
import pytest
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.domain import AssignmentRule

pytestmark = pytest.mark.integration

REUSED_KEY = {"field": "Idempotency-Key", "message": "was used with a different request"}
ASSIGNED = "crm.leads.lead.assigned"
DISQUALIFIED = "crm.leads.lead.disqualified"


def _manager(env: Any, user: str = "manager") -> Any:
    return env.acting(user, roles=("sales_manager",), team="east", scope=ScopeKind.TEAM)


async def _round_robin_lead(env: Any) -> dict[str, Any]:
    """A lead the round-robin rule of region reg-x gave to u1; the rules would give it to u2 next."""
    with env.acting("admin", roles=("admin",)):
        rule = AssignmentRule(id="", position=1, user_ids=("u1", "u2"), team="east", regions=frozenset({"reg-x"}))
        await env.service.create_assignment_rule(rule, "reg-x round robin", "")
        lead, _ = await env.service.create_lead({"name": "Li Lei", "region": "reg-x"})
    assert lead["owner_id"] == "u1"
    return dict(lead)


async def _event_types(env: Any, lead_id: str) -> list[str]:
    return [event_type for event_type, _ in await outbox_events(env.engine, repo.metadata, key=lead_id)]


async def test_an_assignment_by_the_rules_repeated_with_its_key_keeps_the_first_rep(env: Any) -> None:
    lead = await _round_robin_lead(env)
    with _manager(env):
        assigned = (await env.service.assign(lead["id"], "", "", lead["version"], "assign-1")).record
        env.clock.advance(minutes=5)
        repeated = (await env.service.assign(lead["id"], "", "", lead["version"], "assign-1")).record  # not 412 either

    assert (assigned["owner_id"], repeated["owner_id"]) == ("u2", "u2")
    assert repeated["version"] == assigned["version"]
    assert (await _event_types(env, lead["id"])).count(ASSIGNED) == 2  # at creation, and once by the key


async def test_an_assignment_key_is_the_callers_own(env: Any) -> None:
    lead = await _round_robin_lead(env)
    with _manager(env):
        first = (await env.service.assign(lead["id"], "", "", 0, "assign-1")).record
    with _manager(env, "another-manager"):
        theirs = (await env.service.assign(lead["id"], "", "", 0, "assign-1")).record

    assert (first["owner_id"], theirs["owner_id"]) == ("u2", "u1")  # a request of its own: the rules ran


async def test_a_disqualification_repeated_with_its_key_answers_with_the_disqualified_lead(env: Any) -> None:
    with _manager(env):
        lead, _ = await env.service.create_lead({"name": "Spam", "owner_id": "rep1", "team": "east"})
        disqualified = (await env.service.disqualify(lead["id"], "spam", lead["version"], "dq-1")).record
        # Neither ILLEGAL_TRANSITION (the lead is closed now) nor 412 (its version moved on).
        repeated = (await env.service.disqualify(lead["id"], "spam", lead["version"], "dq-1")).record

    assert (repeated["status"], repeated["version"]) == ("unqualified", disqualified["version"])
    assert (await _event_types(env, lead["id"])).count(DISQUALIFIED) == 1


# --- through the gateway ---------------------------------------------------------------------


async def test_an_assignment_repeated_through_the_gateway_answers_as_the_first_and_another_is_refused(
    env: Any, admin: httpx.AsyncClient
) -> None:
    lead = await _round_robin_lead(env)
    path = f"/api/v1/leads/{lead['id']}/assign"
    keyed = {"Idempotency-Key": "assign-1"}

    first = await admin.post(path, json={}, headers=keyed)
    again = await admin.post(path, json={}, headers=keyed)
    other = await admin.post(path, json={"owner_id": "rep-9"}, headers=keyed)

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert first.json()["owner_id"] == "u2"
    assert (again.json(), again.headers["ETag"]) == (first.json(), first.headers["ETag"])
    assert other.status_code == 422, other.text
    assert other.json()["errors"] == [REUSED_KEY]
    with env.acting("admin", roles=("admin",)):
        assert (await env.service.get_lead(lead["id"]))["owner_id"] == "u2"
    assert (await _event_types(env, lead["id"])).count(ASSIGNED) == 2  # at creation, and once by the key
    audited = (await admin.get("/api/v1/audit-events", params={"resource": "leads"})).json()["items"]
    assert [e["action"] for e in reversed(audited) if e["record_id"] == lead["id"]] == ["assign", "replay"]


async def test_a_disqualification_repeated_through_the_gateway_answers_as_the_first_and_another_is_refused(
    env: Any, admin: httpx.AsyncClient
) -> None:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Spam", "owner_id": "rep1"})
    path = f"/api/v1/leads/{lead['id']}/disqualify"
    keyed = {"Idempotency-Key": "dq-1"}

    first = await admin.post(path, json={"reason": "spam"}, headers=keyed)
    again = await admin.post(path, json={"reason": "spam"}, headers=keyed)
    other = await admin.post(path, json={"reason": "no budget"}, headers=keyed)

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json() == first.json()
    assert (again.json()["status"], again.json()["disqualified_reason"]) == ("unqualified", "spam")
    assert other.status_code == 422, other.text
    assert other.json()["errors"] == [REUSED_KEY]
    assert (await _event_types(env, lead["id"])).count(DISQUALIFIED) == 1
