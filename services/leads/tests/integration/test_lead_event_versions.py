"""Every version of a lead is published: a request that changes a lead and its score writes them as
one version, and one that also gives it a new owner publishes each of its two versions, so a
consumer checking versions never sees a gap that looks like a lost event."""

from typing import Any

import pytest
from crm.leads.v1 import events_pb2
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
from leads.domain import ScoringRule
from leads.handlers import ActivityInput

pytestmark = pytest.mark.integration

SNAPSHOTS = {
    "crm.leads.lead.created": events_pb2.LeadCreated,
    "crm.leads.lead.updated": events_pb2.LeadUpdated,
    "crm.leads.lead.assigned": events_pb2.LeadAssigned,
    "crm.leads.lead.contacted": events_pb2.LeadContacted,
}


async def published_versions(env: Any, lead_id: str) -> list[int]:
    events = await outbox_events(env.engine, repo.metadata, key=lead_id)
    return sorted({SNAPSHOTS[t].FromString(p).lead.version for t, p in events if t in SNAPSHOTS})


async def test_a_change_and_the_score_it_brings_are_one_version(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(ScoringRule(id="", activity_kind="call", min_count=1, points=30), "c", "")
        await env.service.create_scoring_rule(
            ScoringRule(id="", field="industry", operator="equals", value="software", points=20), "s", ""
        )
        lead, _ = await env.service.create_lead({"name": "Li", "owner_id": "u1"})
        _, called = await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="call"))
        updated = (await env.service.update_lead(lead["id"], {"industry": "software"}, ["industry"], 0)).record
        other, _ = await env.service.create_lead({"name": "Wu", "email": "wu@x.cn", "owner_id": "u1"})
        merged, _ = await env.service.create_lead(
            {"name": "Wu", "email": "wu@x.cn", "industry": "software"}, on_duplicate="merge"
        )
    assert (called["score"], called["version"]) == (30, lead["version"] + 1)
    assert (updated["score"], updated["version"]) == (50, called["version"] + 1)
    assert await published_versions(env, lead["id"]) == list(range(1, updated["version"] + 1))
    assert (merged["id"], merged["score"], merged["version"]) == (other["id"], 20, other["version"] + 1)
    assert await published_versions(env, other["id"]) == list(range(1, merged["version"] + 1))


async def test_a_change_with_a_new_owner_publishes_both_versions(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "Li", "owner_id": "u1"})
        moved = (
            await env.service.update_lead(lead["id"], {"company": "Acme", "owner_id": "u2"}, ["company", "owner_id"], 0)
        ).record
    assert (moved["company"], moved["owner_id"], moved["version"]) == ("Acme", "u2", lead["version"] + 2)
    assert await published_versions(env, lead["id"]) == list(range(1, moved["version"] + 1))
