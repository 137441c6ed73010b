"""Accounts through the gateway: create → tag → segment → release → claim → transfer → merge with the
events on Kafka; the 360° view per role; activities corrected and deleted; the Maven accounts import;
custom fields (422, pii masking, segments that would test pii values refused)."""

import csv
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.accounts.v1 import events_pb2
from crm_devstack.components import installed_services
from crm_devstack.stack import RunningStack
from crm_platform.ids import new_id
from crm_platform.testing.kafka import EventCollector
from crm_platform.timeutil import isoformat, utcnow

pytestmark = pytest.mark.e2e

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
TOPIC = "crm.accounts.v1"


def _client(
    stack: RunningStack, sub: str, roles: list[str], team: str = "east", region: str = "cn-east"
) -> httpx.AsyncClient:
    return stack.client(stack.token(sub, roles, team=team, region=region))


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def test_account_flow_through_the_gateway_with_events(stack: RunningStack) -> None:
    run = new_id()[-8:]
    rep1, rep2, rep3 = f"rep1-{run}", f"rep2-{run}", f"rep3-{run}"
    async with (
        EventCollector(stack.bootstrap, [TOPIC]) as events,
        _client(stack, rep1, ["sales_rep"]) as r1,
        _client(stack, rep2, ["sales_rep"]) as r2,
        _client(stack, rep3, ["sales_rep"]) as r3,
        _client(stack, f"mgr-{run}", ["sales_manager"]) as mgr,
    ):
        created = await r1.post("/api/v1/accounts", json={"name": f"Acme {run} Ltd", "tier": "B", "tags": ["vip"]})
        acme = _ok(created, 201)
        assert created.headers["etag"] == '"1"' and acme["owner_id"] == rep1

        duplicate = await r1.post("/api/v1/accounts", json={"name": f"ACME {run}"})
        assert duplicate.status_code == 409
        assert duplicate.headers["content-type"].startswith("application/problem+json")
        assert duplicate.json()["existing_id"] == acme["id"]
        # Another rep is refused the name too, without learning which account holds it.
        hidden = await r2.post("/api/v1/accounts", json={"name": f"ACME {run}"})
        assert hidden.status_code == 409 and "existing_id" not in hidden.json()
        assert acme["id"] not in hidden.text

        owner_write = await r1.patch(f"/api/v1/accounts/{acme['id']}", json={"owner_id": rep2})
        assert owner_write.status_code == 403 and owner_write.json()["errors"][0]["field"] == "owner_id"
        tagged = _ok(
            await r1.patch(
                f"/api/v1/accounts/{acme['id']}", json={"tags": ["vip", f"key-{run}"]}, headers={"If-Match": '"1"'}
            )
        )
        assert tagged["tags"] == ["vip", f"key-{run}"]
        stale = await r1.patch(f"/api/v1/accounts/{acme['id']}", json={"tier": "A"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412

        segment = _ok(await r1.post("/api/v1/segments", json={"name": "key", "filters": {"tag": [f"key-{run}"]}}), 201)
        in_segment = _ok(await r1.get("/api/v1/accounts", params={"segment_id": segment["id"]}))
        assert [a["id"] for a in in_segment["items"]] == [acme["id"]]
        by_tag = _ok(await r1.get("/api/v1/accounts", params={"tag": f"key-{run}"}))
        assert [a["id"] for a in by_tag["items"]] == [acme["id"]]
        # The segment changes at the version its ETag carried; a stale one is refused.
        etag = (await r1.get(f"/api/v1/segments/{segment['id']}")).headers["ETag"]
        renamed = await r1.patch(
            f"/api/v1/segments/{segment['id']}", json={"name": "key accounts"}, headers={"If-Match": etag}
        )
        assert _ok(renamed)["name"] == "key accounts" and renamed.headers["ETag"] != etag
        stale_segment = await r1.patch(
            f"/api/v1/segments/{segment['id']}", json={"name": "x"}, headers={"If-Match": etag}
        )
        assert stale_segment.status_code == 412
        kept = await r1.delete(f"/api/v1/segments/{segment['id']}", headers={"If-Match": etag})
        assert kept.status_code == 412  # a delete at a version it no longer has leaves it
        deleted = await r1.delete(f"/api/v1/segments/{segment['id']}", headers={"If-Match": renamed.headers["ETag"]})
        assert deleted.status_code == 204

        released = _ok(await r1.post(f"/api/v1/accounts/{acme['id']}/release", json={"reason": "no budget"}))
        assert released["in_pool"] and released["owner_id"] == ""
        pool = _ok(await r2.get("/api/v1/account-pool", params={"q": f"Acme {run}"}))
        assert [a["id"] for a in pool["items"]] == [acme["id"]]
        cooldown = await r1.post(f"/api/v1/accounts/{acme['id']}/claim")
        assert cooldown.status_code == 409 and cooldown.json()["reason"] == "COOLDOWN"
        claim = await r2.post(f"/api/v1/accounts/{acme['id']}/claim")
        claimed = _ok(claim)
        assert claimed["owner_id"] == rep2 and claim.headers["etag"] == f'"{claimed["version"]}"'
        assert (await r1.get(f"/api/v1/accounts/{acme['id']}")).status_code == 404  # out of rep-1's scope now

        assert (
            await r2.post(f"/api/v1/accounts/{acme['id']}/transfer", json={"new_owner_id": rep3})
        ).status_code == 403
        transfer = await mgr.post(
            f"/api/v1/accounts/{acme['id']}/transfer", json={"new_owner_id": rep3, "reason": "territory"}
        )
        moved = _ok(transfer)
        assert moved["owner_id"] == rep3 and transfer.headers["etag"] == f'"{moved["version"]}"'

        twin = _ok(
            await r3.post("/api/v1/accounts", json={"name": f"Acme {run} Trading", "industry": "retail"}),
            201,
        )
        # Each account has its primary contact: the survivor keeps its own.
        primary = _ok(
            await r3.post(f"/api/v1/accounts/{acme['id']}/contacts", json={"name": "Han Meimei", "is_primary": True}),
            201,
        )
        contact_created = await r3.post(
            f"/api/v1/accounts/{twin['id']}/contacts",
            json={"name": "Li Lei", "email": f"li.{run}@example.com", "is_primary": True},
        )
        contact = _ok(contact_created, 201)
        _ok(await r3.post(f"/api/v1/accounts/{twin['id']}/activities", json={"kind": "visit", "subject": "demo"}), 201)
        merged = _ok(await r3.post(f"/api/v1/accounts/{acme['id']}/merge", json={"duplicate_id": twin["id"]}))
        assert merged["moved_contact_ids"] == [contact["id"]] and merged["survivor"]["industry"] == "retail"
        pointer = await r3.get(f"/api/v1/accounts/{twin['id']}")
        assert pointer.status_code == 301 and pointer.json()["merged_into_id"] == acme["id"]
        assert pointer.headers["location"].endswith(f"/api/v1/accounts/{acme['id']}")
        contacts = _ok(await r3.get(f"/api/v1/accounts/{acme['id']}/contacts"))
        assert {c["id"]: c["is_primary"] for c in contacts["items"]} == {primary["id"]: True, contact["id"]: False}
        # The moved contact changed: a write at the version read before the merge is stale.
        stale_contact = await r3.patch(
            f"/api/v1/contacts/{contact['id']}",
            json={"title": "CTO"},
            headers={"If-Match": contact_created.headers["etag"]},
        )
        assert stale_contact.status_code == 412
        timeline = _ok(await r3.get(f"/api/v1/accounts/{acme['id']}/activities"))
        assert [a["subject"] for a in timeline["items"]] == ["demo"]

        wanted = ["created", "updated", "released", "claimed", "transferred"]
        records = await events.wait_for(
            lambda rs: (
                {f"crm.accounts.account.{w}" for w in wanted} <= {r.event_type for r in rs if r.key == acme["id"]}
                and any(r.event_type == "crm.accounts.account.merged" and r.key == twin["id"] for r in rs)
            ),
            timeout=60,
        )
        order = [r.event_type.rsplit(".", 1)[1] for r in records if r.key == acme["id"]]
        assert order.index("released") < order.index("claimed") < order.index("transferred")
        merged_event = next(r for r in records if r.event_type == "crm.accounts.account.merged")
        assert merged_event.decode(events_pb2.AccountMerged).survivor_id == acme["id"]


async def test_360_view_differs_by_role_exactly_as_the_policy_says(stack: RunningStack) -> None:
    run = new_id()[-8:]
    rep = f"rep-{run}"
    async with (
        _client(stack, "admin", ["admin"]) as admin,
        _client(stack, rep, ["sales_rep"]) as r,
        _client(stack, f"agent-{run}", ["service_agent"], team="support") as agent,
    ):
        account = _ok(await admin.post("/api/v1/accounts", json={
            "name": f"Globex {run}", "region": "cn-east", "tier": "A", "owner_id": rep, "team": "east",
            "annual_revenue": {"amount": "5000000.00", "currency": "CNY"},
            "credit_limit": {"amount": "200000.00", "currency": "CNY"},
        }), 201)  # fmt: skip
        _ok(
            await admin.post(
                f"/api/v1/accounts/{account['id']}/contacts", json={"name": "Han Meimei", "phone": "13800138000"}
            ),
            201,
        )
        _ok(
            await r.post(f"/api/v1/accounts/{account['id']}/activities", json={"kind": "call", "subject": "hello"}), 201
        )
        # Two open tickets on the account: one the agent opened (theirs), one opened by the admin.
        ticket_region = f"t-{run}"  # no registered engineers there: neither ticket is auto-dispatched
        agents_ticket = _ok(await agent.post("/api/v1/tickets", json={
            "subject": "Printer on fire", "account_id": account["id"], "region": ticket_region,
        }), 201)  # fmt: skip
        _ok(await admin.post("/api/v1/tickets", json={
            "subject": "Invoice question", "account_id": account["id"], "region": ticket_region,
        }), 201)  # fmt: skip

        as_rep = _ok(await r.get(f"/api/v1/accounts/{account['id']}/360"))
        as_agent = _ok(await agent.get(f"/api/v1/accounts/{account['id']}/360"))

    sales_running = "sales" in {s.name for s in installed_services()}
    assert as_rep["account"]["annual_revenue"] == {"amount": "5000000.00", "currency": "CNY"}
    assert as_rep["account"]["credit_limit"] == {"amount": "200000.00", "currency": "CNY"}
    assert [c["name"] for c in as_rep["contacts"]["items"]] == ["Han Meimei"]
    assert [a["subject"] for a in as_rep["recent_activities"]["items"]] == ["hello"]
    assert as_rep["open_opportunities"]["status"] == ("ok" if sales_running else "unavailable")
    assert as_rep["contracts_and_receivables"]["status"] == ("ok" if sales_running else "unavailable")
    # sales_rep reads only their own tickets: neither of the two is theirs.
    assert as_rep["open_tickets"] == {"status": "ok", "items": []}

    # service_agent: accounts of the region without amounts, no opportunities or contracts at all,
    # only their own activities.
    assert "annual_revenue" not in as_agent["account"] and "credit_limit" not in as_agent["account"]
    assert as_agent["account"]["name"] == f"Globex {run}"
    assert [c["name"] for c in as_agent["contacts"]["items"]] == ["Han Meimei"]
    assert as_agent["open_opportunities"] == {"status": "forbidden"}
    assert as_agent["contracts_and_receivables"] == {"status": "forbidden"}
    assert as_agent["recent_activities"] == {"status": "ok", "items": []}
    assert [t["id"] for t in as_agent["open_tickets"]["items"]] == [agents_ticket["id"]]
    assert as_agent["open_tickets"]["items"][0]["status"] == "new"


async def test_activities_are_corrected_and_deleted_and_the_360_view_follows(stack: RunningStack) -> None:
    """A rep corrects a call under the ETag its log answered with; their manager deletes a visit
    logged by mistake (a rep may not). The 360° view shows the timeline as corrected, and the
    account's last activity stays the latest touch: nothing moves it back."""
    run = new_id()[-8:]
    async with (
        EventCollector(stack.bootstrap, [TOPIC]) as events,
        _client(stack, f"rep-{run}", ["sales_rep"]) as rep,
        _client(stack, f"mgr-{run}", ["sales_manager"]) as mgr,
    ):
        account = _ok(await rep.post("/api/v1/accounts", json={"name": f"Initech {run}"}), 201)
        activities = f"/api/v1/accounts/{account['id']}/activities"
        logged = await rep.post(activities, json={"kind": "call", "subject": "intro"})
        call = _ok(logged, 201)
        mistake = _ok(await rep.post(activities, json={"kind": "visit", "subject": "wrong account"}), 201)

        earlier = isoformat(utcnow() - timedelta(hours=2))
        body = {"notes": "budget confirmed", "occurred_at": earlier}
        corrected = await rep.patch(
            f"{activities}/{call['id']}", json=body, headers={"If-Match": logged.headers["etag"]}
        )
        assert _ok(corrected)["notes"] == "budget confirmed" and corrected.headers["etag"] == '"2"'
        stale = await rep.patch(f"{activities}/{call['id']}", json={"notes": "x"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412
        assert (await rep.delete(f"{activities}/{mistake['id']}")).status_code == 403
        deleted = await mgr.delete(f"{activities}/{mistake['id']}", headers={"If-Match": '"1"'})
        assert deleted.status_code == 204, deleted.text

        view = _ok(await rep.get(f"/api/v1/accounts/{account['id']}/360"))
        shown = [(a["id"], a["notes"], a["occurred_at"], a["version"]) for a in view["recent_activities"]["items"]]
        assert shown == [(call["id"], "budget confirmed", corrected.json()["occurred_at"], 2)]
        assert view["account"]["last_activity_at"] == mistake["occurred_at"]

        wanted = {"crm.accounts.activity.updated", "crm.accounts.activity.deleted"}
        records = await events.wait_for(
            lambda rs: wanted <= {r.event_type for r in rs if r.key == account["id"]}, timeout=60
        )
        gone = next(r for r in records if r.event_type == "crm.accounts.activity.deleted")
        assert gone.decode(events_pb2.ActivityDeleted).activity_id == mistake["id"]


async def test_import_maven_accounts_through_the_api_keeps_hierarchy(stack: RunningStack) -> None:
    rows = list(csv.DictReader((DATASETS / "maven-crm-sales-opportunities" / "accounts.csv").open()))
    assert len(rows) == 85
    region_suffix = new_id()[-6:]  # the stack is shared by the session: keep names unique per run
    ids: dict[str, str] = {}
    async with _client(stack, "admin", ["admin"]) as admin:
        pending = rows
        while pending:
            ready = [row for row in pending if not row["subsidiary_of"] or row["subsidiary_of"] in ids]
            assert ready, "a subsidiary_of names an account missing from the file"
            for row in ready:
                body = {
                    "name": row["account"],
                    "industry": row["sector"],
                    "size": row["employees"],
                    "region": f"{row['office_location']} {region_suffix}",
                    "annual_revenue": {"amount": str(Decimal(row["revenue"]) * 1_000_000), "currency": "USD"},
                    "parent_id": ids.get(row["subsidiary_of"]),
                    "tags": ["maven"],
                }
                ids[row["account"]] = _ok(await admin.post("/api/v1/accounts", json=body), 201)["id"]
            pending = [row for row in pending if row["account"] not in ids]
        for row in rows:
            got = _ok(await admin.get(f"/api/v1/accounts/{ids[row['account']]}"))
            assert got["parent_id"] == ids.get(row["subsidiary_of"])
            assert got["industry"] == row["sector"]
        acme_children = _ok(await admin.get("/api/v1/accounts", params={"parent_id": ids["Acme Corporation"]}))
        expected = {row["account"] for row in rows if row["subsidiary_of"] == "Acme Corporation"}
        assert {a["name"] for a in acme_children["items"]} == expected
        typo = _ok(await admin.get("/api/v1/accounts", params={"industry": "technolgy", "tag": "maven", "limit": 500}))
        assert len([a for a in typo["items"] if a["region"].endswith(region_suffix)]) == sum(
            1 for row in rows if row["sector"] == "technolgy"
        )


async def test_custom_fields_validate_filter_and_mask_pii(stack: RunningStack) -> None:
    run = new_id()[-8:]
    key = f"hobby_{run}".lower().replace("-", "_")
    async with (
        _client(stack, "admin", ["admin"]) as admin,
        _client(stack, f"mkt-{run}", ["marketing"]) as marketing,
    ):
        _ok(
            await admin.post(
                "/api/v1/custom-fields/contact",
                json={"key": key, "label": "Private phone", "type": "phone", "pii": True},
            ),
            201,
        )
        _ok(await admin.post("/api/v1/custom-fields/account", json={"key": "channel", "label": "Channel",
                                                                     "type": "enum", "options": ["direct", "partner"]}),
            201)  # fmt: skip
        bad = await admin.post("/api/v1/accounts", json={"name": f"Bad {run}", "custom": {"channel": "retail"}})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "custom.channel"
        account = _ok(await admin.post("/api/v1/accounts", json={"name": f"Initech {run}", "region": "cn-east",
                                                                  "custom": {"channel": "partner"}}), 201)  # fmt: skip
        filtered = _ok(await admin.get("/api/v1/accounts", params={"custom.channel": "partner", "q": f"Initech {run}"}))
        assert [a["id"] for a in filtered["items"]] == [account["id"]]
        contact = _ok(await admin.post(f"/api/v1/accounts/{account['id']}/contacts", json={
            "name": "Wang Wu", "email": "wang.wu@example.com", "custom": {key: "+86 138 0013 8000"}}), 201)  # fmt: skip
        assert contact["custom"][key] == "+86 138 0013 8000"
        seen = _ok(await marketing.get(f"/api/v1/contacts/{contact['id']}"))
        assert seen["email"] != "wang.wu@example.com" and "*" in seen["email"]
        assert seen["custom"][key] != "+86 138 0013 8000" and "*" in seen["custom"][key]
        leak = await marketing.get("/api/v1/contacts", params={f"custom.{key}": "+86 138 0013 8000"})
        assert leak.status_code == 403 and leak.json()["errors"][0]["field"] == f"custom.{key}"
        # Every entity's definitions are served by its owning service, tickets by the service desk.
        assert "items" in _ok(await admin.get("/api/v1/custom-fields/ticket"))
        wrong_owner = await admin.get("/api/v1/custom-fields/invoice")
        assert wrong_owner.status_code == 422


async def test_segments_do_not_leak_pii_custom_values(stack: RunningStack) -> None:
    """A segment's filters pass the checks of the list's own: marketing, who sees pii custom values
    masked, can neither save a segment testing a guess nor apply a teammate's segment that filters
    on such a field (nor read its value); the manager who saved it uses it."""
    run = new_id()[-8:]
    national_id, team = f"national_id_{run}", f"seg-{run}"
    secret = "110101199003077777"
    async with (
        _client(stack, "admin", ["admin"]) as admin,
        _client(stack, f"mgr-{run}", ["sales_manager"], team=team) as manager,
        _client(stack, f"mkt-{run}", ["marketing"], team=team) as marketing,
    ):
        _ok(
            await admin.post(
                "/api/v1/custom-fields/account", json={"key": national_id, "label": "ID", "type": "text", "pii": True}
            ),
            201,
        )
        account = _ok(
            await manager.post("/api/v1/accounts", json={"name": f"Holder {run}", "custom": {national_id: secret}}),
            201,
        )
        pii_filter = {f"custom.{national_id}": secret}
        guess = await marketing.post("/api/v1/segments", json={"name": "guess", "filters": pii_filter})
        assert guess.status_code == 403 and guess.json()["errors"][0]["field"] == f"filters.custom.{national_id}"
        body = {"name": f"ids {run}", "filters": pii_filter, "shared_with_team": True}
        segment = _ok(await manager.post("/api/v1/segments", json=body), 201)
        used = _ok(await manager.get("/api/v1/accounts", params={"segment_id": segment["id"]}))
        assert [a["id"] for a in used["items"]] == [account["id"]]

        applied = await marketing.get("/api/v1/accounts", params={"segment_id": segment["id"]})
        assert applied.status_code == 403 and applied.json()["errors"][0]["field"] == f"filters.custom.{national_id}"
        shown = _ok(await marketing.get(f"/api/v1/segments/{segment['id']}"))
        assert shown["filters"][f"custom.{national_id}"] != secret
        assert secret not in (await marketing.get("/api/v1/segments")).text
        assert (await admin.delete(f"/api/v1/custom-fields/account/{national_id}")).status_code == 204


async def test_tasks_due_today_and_overdue(stack: RunningStack) -> None:
    run = new_id()[-8:]
    async with _client(stack, f"rep-{run}", ["sales_rep"]) as rep:
        account = _ok(await rep.post("/api/v1/accounts", json={"name": f"Tasks {run}"}), 201)
        late = _ok(await rep.post("/api/v1/tasks", json={"title": "late", "account_id": account["id"],
                                                         "due_at": "2020-01-01T09:00:00Z"}), 201)  # fmt: skip
        _ok(await rep.post("/api/v1/tasks", json={"title": "someday", "due_at": "2099-01-01T09:00:00Z"}), 201)
        overdue = _ok(await rep.get("/api/v1/tasks", params={"due": "overdue"}))
        assert [t["title"] for t in overdue["items"]] == ["late"]
        today = _ok(await rep.get("/api/v1/tasks", params={"due": "today"}))
        assert [t["title"] for t in today["items"]] == ["late"]
        _ok(await rep.patch(f"/api/v1/tasks/{late['id']}", json={"title": "late: call back"}))
        async with _client(stack, f"admin-{run}", ["admin"]) as admin:
            trail = _ok(await admin.get("/api/v1/audit-events", params={"record_id": late["id"], "action": "update"}))
        # The edit's row says what the task was, as the service read it under its lock.
        [edit] = trail["items"]
        assert (edit["before"]["title"], edit["after"]["title"]) == ("late", "late: call back")
        done = _ok(await rep.post(f"/api/v1/tasks/{late['id']}/complete"))
        assert done["status"] == "done"
        assert _ok(await rep.get("/api/v1/tasks", params={"due": "overdue"}))["items"] == []
        bad = await rep.get("/api/v1/tasks", params={"due": "tomorrow"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "due"
