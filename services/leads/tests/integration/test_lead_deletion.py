"""Deleting a lead, on SQLite and PostgreSQL: the lead goes with what is only its own (activities,
tasks, score history) and `lead.deleted` names it without its personal data; the caller's scope and
version are checked; a converted lead, or one whose conversion is under way, stays; and what was
derived from the lead follows: its owner's load (a capped rule assigns to the rep again) and its
dedupe keys (a new lead with its email is no duplicate)."""

from typing import Any

import pytest
from crm.leads.v1 import events_pb2
from crm_platform.errors import Conflict, NotFound, StaleVersion, Unavailable
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.domain import AssignmentRule
from leads.handlers import ActivityInput, ConvertRequest
from sqlalchemy import func, select

pytestmark = pytest.mark.integration

DEPENDENTS = (repo.activities, repo.tasks, repo.score_history, repo.conversions)


async def rows_of(env: Any, lead_id: str) -> dict[str, int]:
    """The rows keyed by the lead, per table (the lead itself under `leads`)."""
    async with env.engine.connect() as conn:
        counts = {t.name: await conn.scalar(select(func.count()).where(t.c.lead_id == lead_id)) for t in DEPENDENTS}
        counts["leads"] = await conn.scalar(select(func.count()).where(repo.leads.c.id == lead_id))
    return counts


async def test_a_deleted_lead_goes_with_its_own_rows_and_is_announced_without_personal_data(
    env_each_database: Any,
) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Li Lei", "email": "li@acme.cn", "owner_id": "rep1"})
        await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="note", notes="met at the fair"))
        kept, _ = await env.service.create_lead({"name": "Han Meimei", "owner_id": "rep1"})
        await env.service.log_activity(ActivityInput(lead_id=kept["id"], kind="note"))
        assert (await rows_of(env, lead["id"]))["lead_tasks"] == 1  # its first-contact task
        before = await rows_of(env, kept["id"])

        await env.service.delete_lead(lead["id"], 0)

        with pytest.raises(NotFound):
            await env.service.get_lead(lead["id"])
    assert await rows_of(env, lead["id"]) == {t.name: 0 for t in DEPENDENTS} | {"leads": 0}
    assert await rows_of(env, kept["id"]) == before
    assert await env.loads_kept() == await env.loads_counted() == {"rep1": 1}
    events = await outbox_events(env.engine, repo.metadata, key=lead["id"])
    assert events[-1][0] == "crm.leads.lead.deleted"
    deleted = events_pb2.LeadDeleted.FromString(events[-1][1])
    assert (deleted.lead_id, deleted.actor.user_id) == (lead["id"], "admin")
    assert b"li@acme.cn" not in events[-1][1] and b"Li Lei" not in events[-1][1]


async def test_a_lead_is_deleted_only_at_the_version_given_and_only_in_the_callers_scope(
    env_each_database: Any,
) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Li Lei", "owner_id": "rep1"})
        updated = (await env.service.update_lead(lead["id"], {"title": "CTO"}, ["title"], 0)).record
        with pytest.raises(StaleVersion):
            await env.service.delete_lead(lead["id"], lead["version"])
    with env.acting("rep2", scope=ScopeKind.OWN), pytest.raises(NotFound):
        await env.service.delete_lead(lead["id"], updated["version"])
    assert (await rows_of(env, lead["id"]))["leads"] == 1
    with env.acting("rep1", scope=ScopeKind.OWN):
        await env.service.delete_lead(lead["id"], updated["version"])
    assert (await rows_of(env, lead["id"]))["leads"] == 0


async def test_a_converted_lead_stays(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        converted, _ = await env.service.create_lead({"name": "Li Lei", "company": "Acme"})
        await env.service.convert(ConvertRequest(lead_id=converted["id"]))
        with pytest.raises(Conflict) as refused:
            await env.service.delete_lead(converted["id"], 0)
    assert refused.value.reason == "LEAD_CONVERTED"
    assert (await rows_of(env, converted["id"]))["leads"] == 1


async def test_a_lead_whose_conversion_was_interrupted_goes_once_the_attempt_is_undone(env_each_database: Any) -> None:
    """Accounts went down after the account was created: the saga holds it. Deleting the lead undoes
    the attempt first, so no account is left behind for a conversion that will never finish; while
    the undo cannot be made, the lead stays (Unavailable: 503, retry later)."""
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        converting, _ = await env.service.create_lead({"name": "Han Meimei", "company": "Initech"})
        env.ports.fail["contact"] = Unavailable("accounts down")
        with pytest.raises(Unavailable):
            await env.service.convert(ConvertRequest(lead_id=converting["id"]))
        assert list(env.ports.accounts.values()) == ["Initech"]
        env.ports.fail["delete_account"] = Unavailable("accounts down")
        with pytest.raises(Unavailable):
            await env.service.delete_lead(converting["id"], 0)
        assert (await rows_of(env, converting["id"]))["leads"] == 1

        del env.ports.fail["delete_account"]
        await env.service.delete_lead(converting["id"], 0)
    assert (await rows_of(env, converting["id"]))["leads"] == 0
    assert env.ports.accounts == {}


async def test_a_deleted_lead_no_longer_fills_its_reps_cap_nor_counts_as_a_duplicate(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1",), strategy="round_robin", capacity=1), "u1 only", ""
        )
        first, _ = await env.service.create_lead({"name": "Li Lei", "email": "li@acme.cn"})
        full, _ = await env.service.create_lead({"name": "Han Meimei"})
        assert (first["owner_id"], full["owner_id"]) == ("u1", "")  # u1 is at the cap: the pool

        await env.service.delete_lead(first["id"], first["version"])
        again, merged = await env.service.create_lead({"name": "Li Lei", "email": "li@acme.cn"})
    assert not merged and again["id"] != first["id"]
    assert again["owner_id"] == "u1"
    assert await env.loads_kept() == await env.loads_counted() == {"u1": 1}
