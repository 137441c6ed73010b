"""A write answers with the lead as it was before it (`previous`), read under the lead's row lock in
the write's transaction: the gateway audits exactly what this write changed, even when other writes
to the same lead run at the same time. A repeat of an Idempotency-Key changed nothing and has none.
A caller who may not assign leads releases only their own (`own_only`), checked under the same lock.
Campaigns, web forms and rules answer so too."""

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from crm_platform.errors import PermissionDenied
from crm_platform.principal import ScopeKind
from crm_platform.testing.changes import assert_one_after_another
from leads.domain import ScoringRule
from leads.handlers import ConvertRequest

pytestmark = pytest.mark.integration

_INC_RULE = ScoringRule(id="", points=5, field="company", operator="contains", value="Inc")


async def _lead(env: Any, **fields: Any) -> dict[str, Any]:
    with env.acting("manager", roles=("sales_manager",)):
        lead, _ = await env.service.create_lead({"name": "Li Lei", "owner_id": "rep1", "team": "east", **fields})
    return dict(lead)


async def test_concurrent_updates_each_answer_the_version_they_changed(env: Any) -> None:
    lead = await _lead(env)

    with env.acting("manager", roles=("sales_manager",)):
        changes = await asyncio.gather(
            *(env.service.update_lead(lead["id"], {"title": f"T{n}"}, ["title"], 0) for n in range(8))
        )

    assert_one_after_another(changes, "title", first="")


async def test_an_update_that_changes_nothing_answers_the_lead_as_before_and_after(env: Any) -> None:
    lead = await _lead(env, title="CEO")

    with env.acting("manager", roles=("sales_manager",)):
        change = await env.service.update_lead(lead["id"], {"title": "CEO"}, ["title"], 0)

    assert change.previous == change.record
    assert change.record["version"] == lead["version"]


async def test_assign_disqualify_and_delete_answer_the_lead_as_it_was(env: Any) -> None:
    lead = await _lead(env)

    with env.acting("manager", roles=("sales_manager",)):
        assigned = await env.service.assign(lead["id"], "rep2", "east", 0)
        disqualified = await env.service.disqualify(lead["id"], "no budget", 0)
        deleted = await env.service.delete_lead(lead["id"], 0)

    assert (assigned.previous["owner_id"], assigned.record["owner_id"]) == ("rep1", "rep2")
    assert (disqualified.previous["status"], disqualified.record["status"]) == ("new", "unqualified")
    assert (deleted["status"], deleted["version"]) == ("unqualified", disqualified.record["version"])


async def test_a_repeat_of_an_idempotency_key_changed_nothing_and_has_no_previous(env: Any) -> None:
    lead = await _lead(env)

    with env.acting("manager", roles=("sales_manager",)):
        first = await env.service.disqualify(lead["id"], "spam", 0, "dq-1")
        repeated = await env.service.disqualify(lead["id"], "spam", 0, "dq-1")

    assert first.previous is not None and first.previous["status"] == "new"
    assert (repeated.previous, repeated.record["version"]) == (None, first.record["version"])


async def test_a_conversion_answers_the_lead_before_it_and_its_repeat_none(env: Any) -> None:
    lead = await _lead(env, company="Acme")

    with env.acting("manager", roles=("sales_manager",)):
        converted = await env.service.convert(ConvertRequest(lead["id"], idempotency_key="conv-1"))
        repeated = await env.service.convert(ConvertRequest(lead["id"], idempotency_key="conv-1"))

    assert converted.previous is not None
    assert (converted.previous["status"], converted.lead["status"]) == ("new", "converted")
    assert repeated.previous is None


async def test_a_caller_who_may_not_assign_releases_only_their_own_lead(env: Any) -> None:
    theirs = await _lead(env)
    mine = await _lead(env, owner_id="rep2", name="Han Meimei")

    with env.acting("rep2", scope=ScopeKind.TEAM), pytest.raises(PermissionDenied) as refused:
        await env.service.release(theirs["id"], "not mine", own_only=True)
    with env.acting("rep2", scope=ScopeKind.TEAM):
        released = await env.service.release(mine["id"], "not my region", own_only=True)
    with env.acting("manager", roles=("sales_manager",)):
        given_back = await env.service.release(theirs["id"], "rep1 is away")

    assert "grant to assign leads" in refused.value.detail
    assert (released.previous["owner_id"], released.record["in_pool"]) == ("rep2", True)
    assert (given_back.previous["owner_id"], given_back.record["owner_id"]) == ("rep1", "")


async def test_campaign_web_form_and_rule_writes_answer_the_record_as_it_was(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        form = await env.service.create_webform({"name": "Expo form"}, "")
        rule = await env.service.create_scoring_rule(_INC_RULE, "Inc", "")

        renamed = await env.service.update_campaign(campaign["id"], {"name": "Expo 2026"}, ["name"], 0)
        turned_off = await env.service.update_webform(form["id"], {"enabled": False}, ["enabled"], 0)
        repointed = await env.service.update_scoring_rule(replace(_INC_RULE, id=rule["id"], points=9), "Inc", 0)
        deleted_rule = await env.service.delete_scoring_rule(rule["id"], 0)
        deleted_campaign = await env.service.delete_campaign(campaign["id"], 0)

    assert (renamed.previous["name"], renamed.record["name"]) == ("Expo", "Expo 2026")
    assert (turned_off.previous["enabled"], turned_off.record["enabled"]) == (True, False)
    assert (repointed.previous["points"], repointed.record["points"]) == (5, 9)
    assert (deleted_rule["points"], deleted_rule["version"]) == (9, repointed.record["version"])
    assert (deleted_campaign["name"], deleted_campaign["version"]) == ("Expo 2026", renamed.record["version"])
