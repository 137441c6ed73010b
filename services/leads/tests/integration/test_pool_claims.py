"""Claiming from and releasing to the lead pool (SPEC §4). A lead recycled from a rep (it went idle,
or they released it) goes to someone else: its previous owner may not claim it back for a
cool-down, which would give it fresh SLA and recycling clocks without it being worked; a manager may
still assign it to anyone. A claim or release repeated with its Idempotency-Key answers with the
first result, and `lead.recycled` says who released the lead (the system, for the timer)."""

from typing import Any

import httpx
import pytest
from crm.leads.v1 import events_pb2
from crm_platform.errors import Conflict
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo

pytestmark = pytest.mark.integration

REUSED_KEY = {"field": "Idempotency-Key", "message": "was used with a different request"}


async def _held_by_rep1(env: Any, name: str = "Li Lei") -> dict[str, Any]:
    with env.acting("manager", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        lead, _ = await env.service.create_lead({"name": name, "owner_id": "rep1", "team": "east"})
    return dict(lead)


async def _pool_lead(env: Any, name: str = "Han Meimei") -> dict[str, Any]:
    with env.acting("manager", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        lead, _ = await env.service.create_lead({"name": name, "team": "east"})
    return dict(lead)


def _rep(env: Any, user: str = "rep1") -> Any:
    return env.acting(user, team="east", scope=ScopeKind.OWN)


async def _recycled_events(env: Any, lead_id: str) -> list[events_pb2.LeadRecycled]:
    events = await outbox_events(env.engine, repo.metadata, key=lead_id)
    return [events_pb2.LeadRecycled.FromString(payload) for kind, payload in events if kind.endswith(".recycled")]


async def test_a_lead_recycled_by_the_timer_goes_to_another_rep_and_back_to_its_owner_only_after_the_cool_down(
    env: Any,
) -> None:
    lead = await _held_by_rep1(env)
    env.clock.advance(days=3, minutes=1)
    assert await env.service.recycle_idle_leads() == 1

    with _rep(env), pytest.raises(Conflict) as refused:
        await env.service.claim(lead["id"])
    env.clock.advance(hours=23)
    with _rep(env, "rep2"):
        taken = await env.service.claim(lead["id"])  # anyone else at once

    assert refused.value.reason == "RECLAIM_COOLDOWN"
    assert "you may claim it again from 2026-03-06T09:01:00+00:00" in refused.value.detail
    assert (taken["owner_id"], taken["in_pool"]) == ("rep2", False)


async def test_a_rep_may_claim_back_a_lead_recycled_from_them_once_the_cool_down_is_over(
    env_each_database: Any,
) -> None:
    env = env_each_database  # on SQLite too, which stores times without their offset
    env.service.policy = type(env.service.policy)(pool_reclaim_cooldown_hours=24)
    lead = await _held_by_rep1(env)
    env.clock.advance(days=3, minutes=1)
    await env.service.recycle_idle_leads()

    env.clock.advance(hours=23, minutes=59)
    with _rep(env), pytest.raises(Conflict):
        await env.service.claim(lead["id"])
    env.clock.advance(minutes=1)
    with _rep(env):
        claimed = await env.service.claim(lead["id"])

    assert (claimed["owner_id"], claimed["status"]) == ("rep1", "new")


async def test_a_rep_who_released_a_lead_may_not_claim_it_back_but_a_manager_may_give_it_to_them(env: Any) -> None:
    """Release and claim would otherwise restart the lead's clocks as a recycle and claim would."""
    lead = await _held_by_rep1(env)
    with _rep(env):
        await env.service.release(lead["id"], "")
        with pytest.raises(Conflict) as refused:
            await env.service.claim(lead["id"])
    with env.acting("manager", roles=("sales_manager",), team="east", scope=ScopeKind.TEAM):
        assigned = (await env.service.assign(lead["id"], "rep1", "", 0)).record

    assert refused.value.reason == "RECLAIM_COOLDOWN"
    assert (assigned["owner_id"], assigned["in_pool"]) == ("rep1", False)


async def test_a_claim_and_a_release_repeated_with_their_keys_answer_with_the_first_result(env: Any) -> None:
    lead = await _pool_lead(env)
    with _rep(env):
        claimed = await env.service.claim(lead["id"], "claim-1")
        claimed_again = await env.service.claim(lead["id"], "claim-1")  # not NOT_IN_POOL
        released = (await env.service.release(lead["id"], "wrong region", "release-1")).record
        released_again = (await env.service.release(lead["id"], "wrong region", "release-1")).record  # not IN_POOL
        claimed_late = await env.service.claim(lead["id"], "claim-1")  # not RECLAIM_COOLDOWN
        with pytest.raises(Conflict) as other_lead:
            await env.service.claim((await _pool_lead(env, "Wei"))["id"], "claim-1")

    assert (claimed_again["id"], claimed_again["version"]) == (claimed["id"], claimed["version"])
    assert (released_again["version"], released_again["in_pool"]) == (released["version"], True)
    assert (claimed_late["version"], claimed_late["in_pool"]) == (released["version"], True)  # as it is now
    assert other_lead.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(await _recycled_events(env, lead["id"])) == 1


async def test_lead_recycled_names_the_rep_who_released_it_and_the_system_for_the_timer(env: Any) -> None:
    released = await _held_by_rep1(env, "released")
    idle = await _held_by_rep1(env, "idle")
    with _rep(env):
        await env.service.release(released["id"], "not mine")
    env.clock.advance(days=3, minutes=1)
    await env.service.recycle_idle_leads()

    (by_rep,) = await _recycled_events(env, released["id"])
    (by_timer,) = await _recycled_events(env, idle["id"])
    assert (by_rep.actor.user_id, by_rep.actor.kind, by_rep.previous_owner_id) == ("rep1", "user", "rep1")
    assert (by_timer.actor.user_id, by_timer.actor.kind, by_timer.previous_owner_id) == ("system", "system", "rep1")


# --- through the gateway ---------------------------------------------------------------------


async def test_a_claim_repeated_with_its_key_is_the_first_and_the_key_for_another_lead_is_refused(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    lead, other = await _pool_lead(env), await _pool_lead(env, "Wei")
    headers = {**bearer("rep1", "sales_rep"), "Idempotency-Key": "claim-1"}

    first = await admin.post(f"/api/v1/leads/{lead['id']}/claim", headers=headers)
    again = await admin.post(f"/api/v1/leads/{lead['id']}/claim", headers=headers)
    reused = await admin.post(f"/api/v1/leads/{other['id']}/claim", headers=headers)

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["owner_id"] == "rep1"
    assert reused.status_code == 422, reused.text
    assert reused.json()["errors"] == [REUSED_KEY]


async def test_a_release_repeated_with_its_key_is_the_first_and_needs_no_body(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    lead = await _held_by_rep1(env)
    headers = {**bearer("rep1", "sales_rep"), "Idempotency-Key": "release-1"}

    first = await admin.post(f"/api/v1/leads/{lead['id']}/release", headers=headers)
    again = await admin.post(f"/api/v1/leads/{lead['id']}/release", headers=headers)

    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json()["version"] == first.json()["version"] and again.json()["in_pool"] is True
    (recycled,) = await _recycled_events(env, lead["id"])
    assert recycled.reason == "released: no reason given"


async def test_a_rep_releasing_a_lead_of_the_pool_hears_it_is_there_already(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    lead = await _pool_lead(env)

    refused = await admin.post(f"/api/v1/leads/{lead['id']}/release", headers=bearer("rep1", "sales_rep"))

    assert refused.status_code == 409, refused.text
    assert refused.json()["reason"] == "IN_POOL"


async def test_a_rep_claiming_back_a_lead_they_released_hears_until_when_they_may_not(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    lead = await _held_by_rep1(env)
    rep = bearer("rep1", "sales_rep")
    await admin.post(f"/api/v1/leads/{lead['id']}/release", json={"reason": "busy"}, headers=rep)

    refused = await admin.post(f"/api/v1/leads/{lead['id']}/claim", headers=rep)

    assert refused.status_code == 409, refused.text
    assert refused.json()["reason"] == "RECLAIM_COOLDOWN"
    assert "you may claim it again from 2026-03-03T09:00:00+00:00" in refused.json()["detail"]


async def test_marketing_may_not_claim_a_lead_it_could_not_log_the_first_contact_of(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    lead = await _pool_lead(env)

    refused = await admin.post(f"/api/v1/leads/{lead['id']}/claim", headers=bearer("mk1", "marketing"))

    assert refused.status_code == 403, refused.text
    assert "create activities" in refused.json()["detail"]
    with env.acting("admin", roles=("admin",)):
        assert (await env.service.get_lead(lead["id"]))["in_pool"] is True
