"""Leads end to end, through the gateway and Kafka: capture -> assign -> activity -> convert (account,
contact and opportunity readable through the gateway, events on the topics); a campaign deleted
by its ETag (one a lead links to stays); the X Education Leads.csv import with per-source counts;
bad input; the public web form with its rate limit."""

import asyncio
import csv
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.leads.v1 import events_pb2
from crm_devstack.stack import RunningStack
from crm_platform.ids import new_id
from crm_platform.testing.kafka import EventCollector
from leads.domain import map_source

pytestmark = pytest.mark.e2e

LEADS_CSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "x-education-leads" / "Leads.csv"
PART_BYTES = 700_000  # below the gateway's 1 MiB request body limit


def client(stack: RunningStack, sub: str, roles: list[str], team: str = "east") -> httpx.AsyncClient:
    return stack.client(stack.token(sub, roles, team=team, region="cn-east"))


async def test_capture_assign_contact_convert_with_events(stack: RunningStack) -> None:
    topics = ["crm.leads.v1", "crm.accounts.v1", "crm.sales.v1"]
    async with (
        EventCollector(stack.bootstrap, topics) as events,
        client(stack, "mgr-e2e", ["sales_manager"]) as manager,
        client(stack, "rep-e2e", ["sales_rep"]) as rep,
    ):
        created = await manager.post(
            "/api/v1/leads",
            json={"name": "Zhou Xun", "company": "Zhou Robotics", "email": "zhou@robotics.cn",
                  "phone": "138 0013 9000", "source": "event", "region": "cn-east", "industry": "manufacturing"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        lead = created.json()
        lead_id = lead["id"]
        assert lead["status"] == "new" and created.headers["etag"] == '"1"'

        duplicate = await manager.post("/api/v1/leads", json={"name": "Zhou again", "phone": "+86 13800139000"})
        assert duplicate.status_code == 409 and duplicate.json()["existing_id"] == lead_id

        assigned = await manager.post(f"/api/v1/leads/{lead_id}/assign", json={"owner_id": "rep-e2e"})
        assert assigned.status_code == 200, assigned.text
        assert assigned.json()["owner_id"] == "rep-e2e" and assigned.json()["first_contact_due_at"]

        called = await rep.post(
            f"/api/v1/leads/{lead_id}/activities",
            json={"kind": "call", "outcome": "interested", "next_follow_up_at": "2099-01-01T09:00:00Z"},
        )
        assert called.status_code == 201, called.text
        contacted = called.json()["lead"]
        assert contacted["status"] == "contacted" and contacted["first_contacted_at"]
        tasks = (await rep.get(f"/api/v1/leads/{lead_id}/tasks")).json()["items"]
        assert {(t["kind"], t["status"]) for t in tasks} == {("first_contact", "done"), ("follow_up", "open")}

        body = {"opportunity": {"name": "Robot arms", "amount": {"amount": "250000.00", "currency": "CNY"}}}
        headers = {"Idempotency-Key": f"convert-{lead_id}"}
        converted = await rep.post(f"/api/v1/leads/{lead_id}/convert", json=body, headers=headers)
        assert converted.status_code == 200, converted.text + stack.logs(20)
        result = converted.json()
        again = await rep.post(f"/api/v1/leads/{lead_id}/convert", json=body, headers=headers)
        assert again.json()["account_id"] == result["account_id"]
        assert result["lead"]["status"] == "converted"
        assert result["lead"]["converted_opportunity_id"] == result["opportunity_id"]

        account = await rep.get(f"/api/v1/accounts/{result['account_id']}")
        assert account.status_code == 200, account.text
        assert account.json()["name"] == "Zhou Robotics"
        contact = await rep.get(f"/api/v1/contacts/{result['contact_id']}")
        assert contact.status_code == 200, contact.text
        assert contact.json()["name"] == "Zhou Xun"
        opportunity = await rep.get(f"/api/v1/opportunities/{result['opportunity_id']}")
        assert opportunity.status_code == 200, opportunity.text
        assert opportunity.json()["amount"] == {"amount": "250000.00", "currency": "CNY"}
        # What the conversion made in the other services is on their trails, once (not again for the repeat).
        async with client(stack, "admin-e2e", ["admin"]) as admin:
            for resource, record_id in (("accounts", result["account_id"]), ("contacts", result["contact_id"]),
                                        ("opportunities", result["opportunity_id"])):  # fmt: skip
                params = {"resource": resource, "record_id": record_id, "action": "create"}
                [made] = (await admin.get("/api/v1/audit-events", params=params)).json()["items"]
                assert (made["actor"]["user_id"], made["reason"]) == ("rep-e2e", f"converted from lead {lead_id}")

        wanted = {"crm.leads.lead.created", "crm.leads.lead.assigned", "crm.leads.lead.contacted",
                  "crm.leads.lead.converted"}  # fmt: skip
        records = await events.wait_for(lambda rs: wanted <= {r.event_type for r in rs if r.key == lead_id}, 60)
        mine = [r.event_type for r in records if r.key == lead_id and r.event_type in wanted]
        assert mine.index("crm.leads.lead.created") < mine.index("crm.leads.lead.converted")
        converted_event = next(r for r in records if r.event_type == "crm.leads.lead.converted" and r.key == lead_id)
        message = converted_event.decode(events_pb2.LeadConverted)
        assert (message.account_id, message.opportunity_id) == (result["account_id"], result["opportunity_id"])
        await events.wait_for(
            lambda rs: (
                any(r.key == result["account_id"] and r.event_type == "crm.accounts.account.created" for r in rs)
                and any(r.key == result["opportunity_id"] for r in rs)
            ),
            60,
        )


async def test_a_conversion_into_a_pipeline_that_does_not_exist_is_a_422_naming_it(stack: RunningStack) -> None:
    """The sales service checks the pipeline: its refusal reaches the caller naming the body's field,
    and the conversion is undone (a retry with a pipeline that exists converts the lead)."""
    async with (
        client(stack, "mgr-pipe", ["sales_manager"]) as manager,
        client(stack, "rep-pipe", ["sales_rep"]) as rep,
    ):
        created = await manager.post("/api/v1/leads", json={"name": "Qian Li", "company": "Qian Valves"})
        assert created.status_code == 201, created.text
        lead_id = created.json()["id"]
        assigned = await manager.post(f"/api/v1/leads/{lead_id}/assign", json={"owner_id": "rep-pipe"})
        assert assigned.status_code == 200, assigned.text

        body = {"opportunity": {"name": "Valves", "pipeline_id": "no-such-pipeline"}}
        refused = await rep.post(f"/api/v1/leads/{lead_id}/convert", json=body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"] == [
            {"field": "opportunity.pipeline_id", "message": "pipeline no-such-pipeline does not exist"}
        ]
        assert (await rep.get(f"/api/v1/leads/{lead_id}")).json()["status"] != "converted"
        converted = await rep.post(f"/api/v1/leads/{lead_id}/convert", json={"opportunity": {"name": "Valves"}})
        assert converted.status_code == 200, converted.text


async def test_a_lead_entered_by_mistake_is_deleted_by_its_etag_and_announced(stack: RunningStack) -> None:
    async with (
        EventCollector(stack.bootstrap, ["crm.leads.v1"]) as events,
        client(stack, "mgr-delete", ["sales_manager"]) as manager,
    ):
        created = await manager.post("/api/v1/leads", json={"name": "Sun Li", "email": "sun@mistake.cn"})
        assert created.status_code == 201, created.text
        lead_id = created.json()["id"]
        renamed = await manager.patch(f"/api/v1/leads/{lead_id}", json={"name": "Sun Li (typo)"})
        assert renamed.status_code == 200, renamed.text

        stale = await manager.delete(f"/api/v1/leads/{lead_id}", headers={"If-Match": created.headers["etag"]})
        assert stale.status_code == 412, stale.text
        deleted = await manager.delete(f"/api/v1/leads/{lead_id}", headers={"If-Match": renamed.headers["etag"]})
        assert deleted.status_code == 204, deleted.text
        assert (await manager.get(f"/api/v1/leads/{lead_id}")).status_code == 404

        records = await events.wait_for(
            lambda rs: any(r.key == lead_id and r.event_type == "crm.leads.lead.deleted" for r in rs), 60
        )
        event = next(r for r in records if r.key == lead_id and r.event_type == "crm.leads.lead.deleted")
        message = event.decode(events_pb2.LeadDeleted)
        assert (message.lead_id, message.actor.user_id) == (lead_id, "mgr-delete")


async def test_a_campaign_no_lead_links_to_is_deleted_by_its_etag_and_one_in_use_stays(stack: RunningStack) -> None:
    async with (
        EventCollector(stack.bootstrap, ["crm.leads.v1"]) as events,
        client(stack, "mkt-delete", ["marketing"]) as marketing,
    ):
        mistake = await marketing.post("/api/v1/campaigns", json={"name": "Expo (typo)", "channel": "event"})
        assert mistake.status_code == 201, mistake.text
        in_use = await marketing.post("/api/v1/campaigns", json={"name": "Expo", "channel": "event"})
        lead = await marketing.post("/api/v1/leads", json={"name": "Zhao Lei", "campaign_id": in_use.json()["id"]})
        assert lead.status_code == 201, lead.text
        campaign_id = mistake.json()["id"]

        deleted = await marketing.delete(
            f"/api/v1/campaigns/{campaign_id}", headers={"If-Match": mistake.headers["etag"]}
        )
        refused = await marketing.delete(f"/api/v1/campaigns/{in_use.json()['id']}")

        assert deleted.status_code == 204, deleted.text
        assert (await marketing.get(f"/api/v1/campaigns/{campaign_id}")).status_code == 404
        assert refused.status_code == 409 and "1 lead" in refused.text, refused.text
        assert (await marketing.get(f"/api/v1/campaigns/{in_use.json()['id']}")).status_code == 200
        records = await events.wait_for(
            lambda rs: any(r.key == campaign_id and r.event_type == "crm.leads.campaign.deleted" for r in rs), 60
        )
        event = next(r for r in records if r.key == campaign_id and r.event_type == "crm.leads.campaign.deleted")
        assert event.decode(events_pb2.CampaignDeleted).actor.user_id == "mkt-delete"


async def test_a_campaign_a_deal_names_stays(stack: RunningStack) -> None:
    """No lead links to it, but a rep's deal names it as its source: it stays, for the deal's ROI."""
    async with (
        client(stack, "mkt-deal-campaign", ["marketing"]) as marketing,
        client(stack, "rep-deal-campaign", ["sales_rep"]) as rep,
    ):
        campaign = await marketing.post("/api/v1/campaigns", json={"name": "Roadshow", "channel": "event"})
        assert campaign.status_code == 201, campaign.text
        account = await rep.post("/api/v1/accounts", json={"name": f"Roadshow buyer {campaign.json()['id'][-8:]}"})
        assert account.status_code == 201, account.text
        body = {"account_id": account.json()["id"], "name": "Roadshow deal", "campaign_id": campaign.json()["id"]}
        deal = await rep.post("/api/v1/opportunities", json=body)
        assert deal.status_code == 201, deal.text

        refused = await marketing.delete(f"/api/v1/campaigns/{campaign.json()['id']}")
        brought = await rep.get("/api/v1/opportunities", params={"campaign_id": campaign.json()["id"]})

        assert refused.status_code == 409, refused.text
        assert (refused.json()["reason"], refused.json()["existing_id"]) == ("CAMPAIGN_IN_USE", deal.json()["id"])
        assert [o["id"] for o in brought.json()["items"]] == [deal.json()["id"]]


async def test_a_mistyped_activity_is_corrected_by_its_etag_and_one_logged_by_mistake_deleted(
    stack: RunningStack,
) -> None:
    async with (
        EventCollector(stack.bootstrap, ["crm.leads.v1"]) as events,
        client(stack, "mgr-activity", ["sales_manager"]) as manager,
        client(stack, "rep-activity", ["sales_rep"]) as rep,
    ):
        created = await manager.post("/api/v1/leads", json={"name": "Wu Fang", "company": "Wu Textiles"})
        assert created.status_code == 201, created.text
        lead_id = created.json()["id"]
        assigned = await manager.post(f"/api/v1/leads/{lead_id}/assign", json={"owner_id": "rep-activity"})
        assert assigned.status_code == 200, assigned.text
        logged = await rep.post(
            f"/api/v1/leads/{lead_id}/activities",
            json={"kind": "note", "notes": "wants a smaple", "next_follow_up_at": "2099-01-01T09:00:00Z"},
        )
        assert logged.status_code == 201, logged.text
        activity = logged.json()["activity"]
        assert activity["version"] == 1
        path = f"/api/v1/leads/{lead_id}/activities/{activity['id']}"

        fix = {"notes": "wants a sample", "next_follow_up_at": "2099-02-01T09:00:00Z"}
        corrected = await rep.patch(path, json=fix, headers={"If-Match": '"1"'})
        assert corrected.status_code == 200, corrected.text
        assert corrected.headers["etag"] == '"2"' and corrected.json()["notes"] == "wants a sample"
        stale = await rep.patch(path, json={"notes": "x"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412, stale.text
        tasks = (await rep.get(f"/api/v1/leads/{lead_id}/tasks", params={"status": "open"})).json()["items"]
        assert [(t["kind"], t["due_at"]) for t in tasks if t["kind"] == "follow_up"] == [
            ("follow_up", "2099-02-01T09:00:00Z")
        ]

        assert (await rep.delete(path)).status_code == 403  # reps correct their activities, managers delete
        deleted = await manager.delete(path, headers={"If-Match": corrected.headers["etag"]})
        assert deleted.status_code == 204, deleted.text
        assert (await manager.get(f"/api/v1/leads/{lead_id}/activities")).json()["items"] == []
        tasks = (await rep.get(f"/api/v1/leads/{lead_id}/tasks", params={"status": "open"})).json()["items"]
        assert [t for t in tasks if t["kind"] == "follow_up"] == []

        wanted = {"crm.leads.lead.activity_updated", "crm.leads.lead.activity_deleted"}
        records = await events.wait_for(lambda rs: wanted <= {r.event_type for r in rs if r.key == lead_id}, 60)
        mine = {r.event_type: r for r in records if r.key == lead_id and r.event_type in wanted}
        updated = mine["crm.leads.lead.activity_updated"].decode(events_pb2.LeadActivityUpdated)
        assert updated.activity.notes == "wants a sample"
        assert list(updated.changed_fields) == ["next_follow_up_at", "notes"]
        gone = mine["crm.leads.lead.activity_deleted"].decode(events_pb2.LeadActivityDeleted)
        assert (gone.activity_id, gone.actor.user_id) == (activity["id"], "mgr-activity")


async def test_bad_input_names_the_field(stack: RunningStack) -> None:
    async with client(stack, "mgr-bad", ["sales_manager"]) as manager:
        bad_email = await manager.post("/api/v1/leads", json={"name": "x", "email": "not-an-email"})
        bad_source = await manager.post("/api/v1/leads", json={"name": "x", "source": "television"})
        bad_phone = await manager.post("/api/v1/leads", json={"name": "x", "phone": "call me maybe"})
        unknown = await manager.post("/api/v1/leads", json={"name": "x", "salary": 5})
        bad_status = await manager.get("/api/v1/leads", params={"status": "sleeping"})
    for response, field in ((bad_email, "email"), (bad_source, "source"), (bad_phone, "phone"),
                            (unknown, "salary"), (bad_status, "status[0]")):  # fmt: skip
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in {e["field"] for e in response.json()["errors"]}


async def test_import_leads_csv_per_source_counts(stack: RunningStack) -> None:
    data = LEADS_CSV.read_bytes()
    with LEADS_CSV.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_detail = Counter(row["Lead Source"] for row in rows)
    by_source = Counter(map_source(row["Lead Source"])[0] for row in rows)
    columns = json.dumps({"Prospect ID": "external_id", "Lead Source": "source", "Country": "region"})
    key = "xeducation-e2e"
    parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    async with client(stack, "mgr-import", ["sales_manager"], team="import-team") as manager:
        for number, part in enumerate(parts, start=1):
            response = await manager.post(
                "/api/v1/leads/import",
                params={"import_key": key, "column_map": columns, "part": number, "final": number == len(parts)},
                content=part,
                headers={"Content-Type": "text/csv"},
            )
            assert response.status_code == 200, response.text
            progress = response.json()["import"]["progress"]
        assert response.json()["import"]["status"] == "completed"
        assert int(progress["rows_seen"]) == len(rows) == 9240
        accepted, rejected = int(progress.get("accepted", 0)), int(progress.get("rejected", 0))
        assert accepted + rejected == len(rows)
        rejected_rows = await rejected_rows_of(manager, key)
        assert len({r["row"] for r in rejected_rows}) == len(rejected_rows) == rejected  # each once
        assert all(r["reason"] for r in rejected_rows)  # each rejection carries its reason
        details = await manager.get("/api/v1/leads/summary", params={"group_by": "source_detail", "import_id": key})
        sources = await manager.get("/api/v1/leads/summary", params={"group_by": "source", "import_id": key})
        listed = await manager.get("/api/v1/leads/imports", params={"status": "completed"})
    # The manager's list of imports holds it, with what the import's own page says.
    assert listed.status_code == 200, listed.text
    mine = [item for item in listed.json()["items"] if item["id"] == key]
    assert [(m["owner_id"], m["format"], m["progress"]) for m in mine] == [("mgr-import", "csv", progress)]
    assert details.json()["counts"] == dict(by_detail)
    assert sources.json()["counts"] == dict(by_source)


async def rejected_rows_of(http: httpx.AsyncClient, import_id: str) -> list[dict[str, Any]]:
    """Every rejected row of an import, collected page after page."""
    rows: list[dict[str, Any]] = []
    params: dict[str, str] = {}
    while True:
        response = await http.get(f"/api/v1/leads/imports/{import_id}", params=params)
        assert response.status_code == 200, response.text
        rows += response.json()["rejected_rows"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return rows
        params = {"cursor": cursor}


async def test_public_webform_intake_is_rate_limited(stack: RunningStack) -> None:
    async with client(stack, "admin-e2e", ["admin"]) as admin:
        defined = await admin.post(
            "/api/v1/custom-fields/lead", json={"key": "interest", "label": "Interest", "type": "text", "pii": True}
        )
        assert defined.status_code == 201, defined.text
    async with client(stack, "mkt-e2e", ["marketing"]) as marketing:
        campaign = await marketing.post(
            "/api/v1/campaigns",
            json={"name": "Spring expo", "channel": "event", "cost": {"amount": "8000.00", "currency": "CNY"},
                  "starts_on": "2026-04-01", "ends_on": "2026-04-03"},
        )  # fmt: skip
        assert campaign.status_code == 201, campaign.text
        form = await marketing.post(
            "/api/v1/webforms",
            json={"name": "Expo form", "campaign_id": campaign.json()["id"], "rate_limit_per_minute": 3,
                  "honeypot_field": "fax"},
        )  # fmt: skip
        assert form.status_code == 201, form.text
        form_key = form.json()["form_key"]
    await _within_one_rate_window()
    async with stack.client() as public:
        url = f"/api/v1/webforms/{form_key}/submissions"
        first = await public.post(url, json={"name": "Visitor", "email": "visitor@expo.cn", "interest": "robots"})
        bot = await public.post(url, json={"name": "Bot", "email": "bot@spam.example", "fax": "http://spam.example"})
        second = await public.post(url, json={"name": "Visitor 2", "email": "visitor2@expo.cn"})
        third = await public.post(url, json={"name": "Visitor 3", "email": "visitor3@expo.cn"})
        wrong = await public.post("/api/v1/webforms/not-a-real-form-key/submissions", json={"name": "x"})
    assert (first.status_code, bot.status_code, second.status_code) == (202, 202, 202)
    assert bot.json() == first.json()  # a bot learns nothing from the answer
    assert third.status_code == 429 and third.headers["retry-after"]
    assert wrong.status_code == 404
    async with client(stack, "mkt-e2e", ["marketing"]) as marketing:
        listed = await marketing.get("/api/v1/leads", params={"campaign_id": campaign.json()["id"]})
    assert {item["name"] for item in listed.json()["items"]} == {"Visitor", "Visitor 2"}  # the bot's made no lead
    visitor = next(item for item in listed.json()["items"] if item["name"] == "Visitor")
    assert visitor["source"] == "webform" and visitor["campaign_id"] == campaign.json()["id"]
    # Masked for marketing: the email, and the custom field defined as personal data.
    assert visitor["email"] != "visitor@expo.cn" and visitor["custom"]["interest"] != "robots"
    async with client(stack, "admin-e2e", ["admin"]) as admin:
        clear = (await admin.get(f"/api/v1/leads/{visitor['id']}")).json()
    assert clear["email"] == "visitor@expo.cn" and clear["custom"] == {"interest": "robots"}


async def test_a_web_form_is_changed_by_its_current_version_and_a_retried_key_rotation_draws_one_key(
    stack: RunningStack,
) -> None:
    async with client(stack, "mkt-e2e", ["marketing"]) as marketing:
        created = await marketing.post("/api/v1/webforms", json={"name": f"Fair {new_id()[-8:]}"})
        assert created.status_code == 201, created.text
        url = f"/api/v1/webforms/{created.json()['id']}"
        read = await marketing.get(url)
        renamed = await marketing.patch(url, json={"name": "Fair 2027"}, headers={"If-Match": read.headers["etag"]})
        stale = await marketing.patch(url, json={"enabled": False}, headers={"If-Match": read.headers["etag"]})
        retry = {"Idempotency-Key": f"rotate-{new_id()}", "If-Match": renamed.headers["etag"]}
        rotated = await marketing.post(f"{url}/rotate-key", headers=retry)
        again = await marketing.post(f"{url}/rotate-key", headers=retry)  # the client timed out and retries
    assert created.headers["etag"] == read.headers["etag"] == '"1"' and read.json()["version"] == 1
    assert renamed.status_code == 200 and renamed.headers["etag"] == '"2"'
    assert stale.status_code == 412 and stale.json()["current_version"] == 2
    assert rotated.status_code == again.status_code == 200
    assert rotated.json()["form_key"] == again.json()["form_key"] != created.json()["form_key"]
    assert rotated.headers["etag"] == again.headers["etag"] == '"3"'
    async with stack.client() as public:
        taken = await public.post(f"/api/v1/webforms/{again.json()['form_key']}/submissions", json={"name": "Visitor"})
    assert taken.status_code == 202  # the key the client holds after its retry works


async def test_leads_are_filtered_by_custom_fields(stack: RunningStack) -> None:
    """`?custom.<key>=` on the lead list: passed to the leads service and typed by the definition;
    refused (403) for a caller who sees the field masked, 422 for a value not of its type."""
    run = new_id()[-8:]
    budget, wechat = f"budget_{run}", f"wechat_{run}"
    async with (
        client(stack, f"admin-{run}", ["admin"]) as admin,
        client(stack, f"mgr-{run}", ["sales_manager"]) as manager,
        client(stack, f"mkt-{run}", ["marketing"]) as marketing,
    ):
        for key, kind, pii in ((budget, "number", False), (wechat, "text", True)):
            defined = await admin.post(
                "/api/v1/custom-fields/lead", json={"key": key, "label": key, "type": kind, "pii": pii}
            )
            assert defined.status_code == 201, defined.text
        ids = {}
        for name, custom in (("big", {budget: 5000, wechat: "zhou-wx"}), ("small", {budget: 50}), ("none", {})):
            created = await manager.post("/api/v1/leads", json={"name": f"{name} {run}", "custom": custom})
            assert created.status_code == 201, created.text
            ids[name] = created.json()["id"]

        async def found(caller: httpx.AsyncClient, **params: str) -> list[str]:
            response = await caller.get("/api/v1/leads", params=params)
            assert response.status_code == 200, response.text
            return sorted(lead["id"] for lead in response.json()["items"])

        assert await found(manager, **{f"custom.{budget}": "5000"}) == [ids["big"]]
        assert await found(manager, **{f"custom.{budget}": "50.0"}) == [ids["small"]]
        assert await found(manager, **{f"custom.{wechat}": "zhou-wx"}) == [ids["big"]]
        assert await found(marketing, **{f"custom.{budget}": "5000"}) == [ids["big"]]
        masked = await marketing.get("/api/v1/leads", params={f"custom.{wechat}": "zhou-wx"})
        assert masked.status_code == 403 and masked.json()["errors"][0]["field"] == f"custom.{wechat}"
        ill_typed = await manager.get("/api/v1/leads", params={f"custom.{budget}": "lots"})
        assert ill_typed.status_code == 422 and ill_typed.json()["errors"][0]["field"] == f"custom.{budget}"
        for key in (budget, wechat):
            assert (await admin.delete(f"/api/v1/custom-fields/lead/{key}")).status_code == 204


async def _within_one_rate_window() -> None:
    """A webform's limit counts per clock minute: three quick submissions must not straddle two."""
    second = datetime.now(UTC).second
    if second >= 45:
        await asyncio.sleep(61 - second)
