"""Deleting a campaign, on SQLite and PostgreSQL: only at the version given, and only while no lead
or web form links to it (their links would dangle and its ROI history would change: it is ended
instead); `campaign.deleted` names it. On PostgreSQL a lead or form linked meanwhile is counted, not
lost."""

import asyncio
from typing import Any

import pytest
from crm.leads.v1 import events_pb2
from crm_platform.errors import Conflict, NotFound, StaleVersion
from crm_platform.principal import ScopeKind
from crm_platform.testing.outbox import outbox_events
from leads import handlers
from leads import repository as repo

pytestmark = pytest.mark.integration


async def test_an_unused_campaign_is_deleted_and_announced(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo", "channel": "event"}, "")

        await env.service.delete_campaign(campaign["id"], campaign["version"])

        with pytest.raises(NotFound):
            await env.service.get_campaign(campaign["id"])
        with pytest.raises(NotFound):
            await env.service.delete_campaign(campaign["id"], 0)
    events = await outbox_events(env.engine, repo.metadata, key=campaign["id"])
    assert [event_type for event_type, _ in events] == ["crm.leads.campaign.created", "crm.leads.campaign.deleted"]
    deleted = events_pb2.CampaignDeleted.FromString(events[-1][1])
    assert (deleted.campaign_id, deleted.actor.user_id) == (campaign["id"], "mkt")


async def test_a_campaign_is_deleted_only_at_the_version_given(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        updated = (await env.service.update_campaign(campaign["id"], {"channel": "event"}, ["channel"], 0)).record

        with pytest.raises(StaleVersion):
            await env.service.delete_campaign(campaign["id"], campaign["version"])
        assert await env.service.get_campaign(campaign["id"])

        await env.service.delete_campaign(campaign["id"], updated["version"])
        with pytest.raises(NotFound):
            await env.service.get_campaign(campaign["id"])


async def test_a_campaign_a_lead_links_to_stays_even_out_of_the_callers_sight(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        await env.service.create_lead({"name": "Li Lei", "campaign_id": campaign["id"], "owner_id": "rep9"})
    with env.acting("mkt", roles=("marketing",), scope=ScopeKind.OWN):
        with pytest.raises(Conflict) as refused:
            await env.service.delete_campaign(campaign["id"], 0)

        assert refused.value.reason == "CAMPAIGN_IN_USE"
        assert "in use by 1 lead:" in refused.value.detail and "end it" in refused.value.detail
        assert await env.service.get_campaign(campaign["id"])
    events = await outbox_events(env.engine, repo.metadata, key=campaign["id"])
    assert "crm.leads.campaign.deleted" not in [event_type for event_type, _ in events]


async def test_a_campaign_a_web_form_links_to_stays(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        form = await env.service.create_webform({"name": "Expo form", "campaign_id": campaign["id"]}, "")

        with pytest.raises(Conflict) as refused:
            await env.service.delete_campaign(campaign["id"], 0)

        assert refused.value.reason == "CAMPAIGN_IN_USE"
        assert f"web form {form['id']}" in refused.value.detail
        assert await env.service.get_campaign(campaign["id"])


async def test_a_lead_created_while_its_campaign_is_deleted_keeps_it(env: Any, monkeypatch: Any) -> None:
    """PostgreSQL: the create has checked the campaign but not yet written the lead when the delete
    counts the campaign's leads. The delete waits for the create and then refuses."""
    checked, go_on = asyncio.Event(), asyncio.Event()
    probe = repo.probe_for_create

    async def probe_after_a_pause(*args: Any, **kwargs: Any) -> Any:
        checked.set()
        await go_on.wait()
        return await probe(*args, **kwargs)

    with env.acting("admin", roles=("admin",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        monkeypatch.setattr(repo, "probe_for_create", probe_after_a_pause)
        creating = asyncio.create_task(env.service.create_lead({"name": "Li Lei", "campaign_id": campaign["id"]}))
        await checked.wait()
        deleting = asyncio.create_task(env.service.delete_campaign(campaign["id"], 0))
        await asyncio.sleep(0.3)
        assert not deleting.done()  # it waits for the campaign's row, which the create holds

        go_on.set()
        lead, _ = await creating
        with pytest.raises(Conflict) as refused:
            await deleting
    assert refused.value.reason == "CAMPAIGN_IN_USE"
    assert lead["campaign_id"] == campaign["id"]


async def test_a_web_form_linked_while_its_campaign_is_deleted_keeps_it(env: Any, monkeypatch: Any) -> None:
    """PostgreSQL: as for a lead, a form changed to name the campaign has checked it but not yet
    written the link when the delete looks for the campaign's forms."""
    checked, go_on = asyncio.Event(), asyncio.Event()
    write = handlers._versioned_write

    async def write_after_a_pause(*args: Any, **kwargs: Any) -> Any:
        checked.set()
        await go_on.wait()
        return await write(*args, **kwargs)

    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        form = await env.service.create_webform({"name": "Expo form"}, "")
        monkeypatch.setattr(handlers, "_versioned_write", write_after_a_pause)
        linking = asyncio.create_task(
            env.service.update_webform(form["id"], {"campaign_id": campaign["id"]}, ["campaign_id"], 0)
        )
        await checked.wait()
        deleting = asyncio.create_task(env.service.delete_campaign(campaign["id"], 0))
        await asyncio.sleep(0.3)
        assert not deleting.done()

        go_on.set()
        linked = (await linking).record
        with pytest.raises(Conflict) as refused:
            await deleting
    assert f"web form {form['id']}" in refused.value.detail
    assert linked["campaign_id"] == campaign["id"]


async def test_a_web_form_submission_whose_campaign_went_meanwhile_is_captured_without_it(
    env: Any, monkeypatch: Any
) -> None:
    """PostgreSQL: the form is read with its campaign; before the lead is written, the form is
    changed to name none and the campaign deleted. The submission is a lead all the same, linked to
    no campaign rather than to one that is gone; with the campaign still there, it is linked."""
    count = repo.count_submission
    meanwhile: list[Any] = []

    async def count_then_let_others_run(*args: Any, **kwargs: Any) -> Any:
        used = await count(*args, **kwargs)
        for step in meanwhile:
            await step()
        return used

    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "")
        form = await env.service.create_webform({"name": "Expo form", "campaign_id": campaign["id"]}, "")
        linked, _ = await env.service.submit_webform(form["form_key"], {"name": "Zhao", "email": "z@x.cn"}, "")

        async def unlink_the_form() -> None:
            await env.service.update_webform(form["id"], {"campaign_id": ""}, ["campaign_id"], 0)

        async def delete_a_fresh_campaign() -> None:
            await env.service.delete_campaign(fresh["id"], 0)

        fresh = await env.service.create_campaign({"name": "Roadshow"}, "")
        await env.service.update_webform(form["id"], {"campaign_id": fresh["id"]}, ["campaign_id"], 0)
        meanwhile.extend([unlink_the_form, delete_a_fresh_campaign])
        monkeypatch.setattr(repo, "count_submission", count_then_let_others_run)
        captured, _ = await env.service.submit_webform(form["form_key"], {"name": "Qian", "email": "q@x.cn"}, "")

    assert linked["campaign_id"] == campaign["id"]
    assert captured["campaign_id"] == "" and captured["source"] == "webform"
    with env.acting("mkt", roles=("marketing",)), pytest.raises(NotFound):
        await env.service.get_campaign(fresh["id"])


async def test_a_campaign_created_again_under_its_key_after_its_deletion_is_a_404(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Expo"}, "expo-key")
        assert (await env.service.create_campaign({"name": "Expo"}, "expo-key"))["id"] == campaign["id"]
        await env.service.delete_campaign(campaign["id"], 0)

        with pytest.raises(NotFound) as gone:
            await env.service.create_campaign({"name": "Expo"}, "expo-key")

    assert gone.value.resource == "campaign" and gone.value.record_id == campaign["id"]
