"""Service desk through the gateway: a service agent logs a ticket that auto-dispatches to them,
works and resolves it, and the customer's CSAT lands, with the events on Kafka; permissions per
role; and a slice of the public customer-support-tickets dataset imported with counts checked."""

import asyncio
import csv
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.servicedesk.v1 import events_pb2
from crm_devstack.stack import RunningStack
from crm_platform.ids import new_id
from crm_platform.testing.kafka import EventCollector
from crm_platform.testing.polling import eventually

pytestmark = pytest.mark.e2e

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
TOPIC = "crm.service.v1"


def _client(stack: RunningStack, sub: str, roles: list[str], region: str, team: str = "desk") -> httpx.AsyncClient:
    return stack.client(stack.token(sub, roles, team=team, region=region))


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def test_ticket_created_dispatched_resolved_and_rated(stack: RunningStack) -> None:
    run = new_id()[-8:]
    region = f"east-{run}"
    agent, other = f"agent-{run}", f"other-{run}"
    async with (
        EventCollector(stack.bootstrap, [TOPIC]) as events,
        _client(stack, f"mgr-{run}", ["service_manager"], region) as mgr,
        _client(stack, f"admin-{run}", ["admin"], region) as admin,
        _client(stack, agent, ["service_agent"], region) as me,
        _client(stack, other, ["service_agent"], region) as them,
    ):
        # The manager registers the engineers; only one has the billing skill.
        for agent_id, skills in ((agent, ["billing"]), (other, ["network"])):
            _ok(
                await mgr.post(
                    "/api/v1/agents",
                    json={"id": agent_id, "name": agent_id, "skills": skills, "region": region, "capacity": 5},
                ),
                201,
            )
        no_agents = await me.post("/api/v1/agents", json={"id": f"x-{run}", "name": "x"})
        assert no_agents.status_code == 403

        created = await me.post(
            "/api/v1/tickets",
            json={"subject": "Invoice total is wrong", "channel": "phone", "category": "billing", "region": region,
                  "priority": "high"},
            headers={"Idempotency-Key": f"ticket-{run}"},
        )  # fmt: skip
        ticket = _ok(created, 201)
        assert created.headers["etag"] == f'"{ticket["version"]}"'
        assert ticket["status"] == "assigned" and ticket["assignee_id"] == agent
        assert ticket["first_response_due_at"] and ticket["resolved_at"] is None
        ticket_body = {"subject": "Invoice total is wrong", "channel": "phone", "category": "billing",
                       "region": region, "priority": "high"}  # fmt: skip
        replay = _ok(
            await me.post("/api/v1/tickets", json=ticket_body, headers={"Idempotency-Key": f"ticket-{run}"}), 201
        )
        assert replay["id"] == ticket["id"]
        reused = await me.post(
            "/api/v1/tickets", json={"subject": "again", "channel": "web"}, headers={"Idempotency-Key": f"ticket-{run}"}
        )
        assert reused.status_code == 422, reused.text
        assert reused.json()["errors"] == [{"field": "Idempotency-Key", "message": "was used with a different request"}]
        tid = ticket["id"]
        # The repeat is audited as what it was: the ticket was created once.
        trail = _ok(await admin.get("/api/v1/audit-events", params={"resource": "tickets", "record_id": tid}))
        assert [(row["action"], row["fields"] == []) for row in trail["items"]] == [("replay", True), ("create", False)]

        # Out of the other agent's scope: 404, never 403.
        assert (await them.get(f"/api/v1/tickets/{tid}")).status_code == 404
        assert (await me.post(f"/api/v1/tickets/{tid}/assign", json={"assignee_id": other})).status_code == 403

        illegal = await me.post(f"/api/v1/tickets/{tid}/status", json={"status": "reopened"})
        assert illegal.status_code == 409, illegal.text
        assert illegal.headers["content-type"].startswith("application/problem+json")

        _ok(await me.post(f"/api/v1/tickets/{tid}/comments", json={"body": "On it", "public": True}), 201)
        _ok(await me.post(f"/api/v1/tickets/{tid}/work-log", json={"minutes": 20, "note": "checked"}), 201)
        _ok(await me.post(f"/api/v1/tickets/{tid}/status", json={"status": "in_progress"}))
        early = await me.post(f"/api/v1/tickets/{tid}/csat", json={"score": 5})
        assert early.status_code == 409
        resolved = _ok(await me.post(f"/api/v1/tickets/{tid}/status", json={"status": "resolved"}))
        assert resolved["status"] == "resolved" and resolved["resolved_at"]

        bad = await me.post(f"/api/v1/tickets/{tid}/csat", json={"score": 9})
        assert bad.status_code == 422 and any(e["field"].endswith("score") for e in bad.json()["errors"])
        csat = _ok(await me.post(f"/api/v1/tickets/{tid}/csat", json={"score": 5, "comment": "fast"}), 201)
        assert csat["score"] == 5 and csat["ticket_id"] == tid
        assert (await me.post(f"/api/v1/tickets/{tid}/csat", json={"score": 4})).status_code == 409

        detail = _ok(await me.get(f"/api/v1/tickets/{tid}"))
        assert detail["csat"]["score"] == 5 and [c["body"] for c in detail["comments"]] == ["On it"]
        assert detail["first_responded_at"] is not None and detail["work_log"][0]["minutes"] == 20
        mine = _ok(await me.get("/api/v1/tickets", params={"status": "resolved"}))
        assert [t["id"] for t in mine["items"]] == [tid]
        open_ones = _ok(await mgr.get("/api/v1/tickets", params={"open": "true", "region": region}))
        assert open_ones["items"] == []

        records = await events.wait_for(
            lambda rs: any(r.key == tid and r.event_type == "crm.service.csat.submitted" for r in rs), timeout=60
        )
        types = [r.event_type for r in records if r.key == tid]
        assert types[:2] == ["crm.service.ticket.created", "crm.service.ticket.assigned"]
        assert "crm.service.ticket.resolved" in types and types[-1] == "crm.service.csat.submitted"
        submitted = next(r for r in records if r.key == tid and r.event_type == "crm.service.csat.submitted")
        assert submitted.decode(events_pb2.CsatSubmitted).response.score == 5


async def test_a_spam_ticket_is_deleted_at_its_etag_and_leaves_the_service_report(stack: RunningStack) -> None:
    run = new_id()[-8:]
    region = f"spam-{run}"
    manager_id = f"mgr-{run}"
    async with (
        EventCollector(stack.bootstrap, [TOPIC]) as events,
        _client(stack, manager_id, ["service_manager"], region) as mgr,
        _client(stack, f"far-{run}", ["service_manager"], f"far-{run}") as far,
        _client(stack, f"agent-{run}", ["service_agent"], region) as agent,
    ):
        created = await mgr.post(
            "/api/v1/tickets", json={"subject": "WIN A PRIZE", "channel": "email", "region": region}
        )
        spam = _ok(created, 201)
        kept = _ok(
            await mgr.post("/api/v1/tickets", json={"subject": "Printer", "channel": "phone", "region": region}), 201
        )
        path = f"/api/v1/tickets/{spam['id']}"
        _ok(await mgr.post(f"{path}/comments", json={"body": "Spam: deleting it"}), 201)

        async def counted() -> tuple[int, int]:
            report = _ok(await mgr.get("/api/v1/reports/service"))  # the manager's region
            return int(report["tickets"]), int(report["backlog"])

        async def until_counted(want: tuple[int, int]) -> None:
            # One analytics consumer projects every topic: the thousands of leads and deals the
            # e2e tests before imported may come first (seconds, with a backlog applied by the batch).
            assert await eventually(counted, lambda got: got == want, timeout=180, interval=0.3) == want

        await until_counted((2, 2))
        assert (await agent.delete(path)).status_code == 403
        assert (await far.delete(path)).status_code == 404  # another region's ticket is not there for them
        stale = await mgr.delete(path, headers={"If-Match": f'"{spam["version"] + 1}"'})
        assert stale.status_code == 412, stale.text
        deleted = await mgr.delete(path, headers={"If-Match": created.headers["etag"]})
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert (await mgr.get(path)).status_code == 404

        # A resolved ticket is a service record: kept, 409 naming why.
        _ok(await mgr.post(f"/api/v1/tickets/{kept['id']}/status", json={"status": "resolved"}))
        refused = await mgr.delete(f"/api/v1/tickets/{kept['id']}")
        assert refused.status_code == 409 and refused.json()["reason"] == "TICKET_ON_RECORD", refused.text

        records = await events.wait_for(
            lambda rs: any(r.key == spam["id"] and r.event_type == "crm.service.ticket.deleted" for r in rs), 60
        )
        event = next(r for r in records if r.key == spam["id"] and r.event_type == "crm.service.ticket.deleted")
        message = event.decode(events_pb2.TicketDeleted)
        assert (message.ticket_id, message.actor.user_id) == (spam["id"], manager_id)
        await until_counted((1, 0))  # analytics dropped it: only the resolved ticket is left


async def test_drafts_are_their_editors_and_patches_say_what_they_refuse(stack: RunningStack) -> None:
    """A knowledge-base draft reads as missing to an agent, who may not edit articles; a PATCH null
    empties a field (the service names one that must keep a value) and a body that changes nothing
    is a 422 saying so; the audit rows of the writes carry the status they answered."""
    run = new_id()[-8:]
    region = f"edit-{run}"
    async with (
        _client(stack, f"mgr-{run}", ["service_manager"], region) as mgr,
        _client(stack, f"agent-{run}", ["service_agent"], region) as agent,
        _client(stack, f"admin-{run}", ["admin"], region) as admin,
    ):
        draft = _ok(await mgr.post("/api/v1/kb-articles", json={"title": f"VPN {run}", "body": "Not ready"}), 201)
        assert draft["published"] is False
        assert (await agent.get(f"/api/v1/kb-articles/{draft['id']}")).status_code == 404
        assert _ok(await mgr.get(f"/api/v1/kb-articles/{draft['id']}"))["body"] == "Not ready"

        body = {"subject": "Printer", "description": "Jams", "channel": "web", "region": region}
        path = f"/api/v1/tickets/{_ok(await mgr.post('/api/v1/tickets', json=body), 201)['id']}"
        subjectless = await mgr.patch(path, json={"subject": None})
        assert subjectless.status_code == 422, subjectless.text
        assert [error["field"] for error in subjectless.json()["errors"]] == ["subject"]
        nothing = await mgr.patch(path, json={})
        assert nothing.status_code == 422, nothing.text
        assert nothing.json()["errors"] == [{"field": "body", "message": "names no field to change"}]
        assert _ok(await mgr.patch(path, json={"description": None}))["description"] == ""

        _ok(await mgr.post(f"{path}/comments", json={"body": "On it"}), 201)
        _ok(await mgr.post(f"{path}/status", json={"status": "resolved"}))
        _ok(await mgr.post(f"{path}/csat", json={"score": 4}), 201)
        trail = _ok(await admin.get("/api/v1/audit-events", params={"actor": f"mgr-{run}"}))
        audited = {(row["resource"], row["action"], row["status_code"]) for row in trail["items"]}
        assert audited == {
            ("kb_articles", "create", 201),
            ("tickets", "create", 201),
            ("tickets", "update", 200),
            ("tickets", "comment", 201),
            ("csat", "create", 201),
        }


PRIORITY = {"Critical": "urgent", "High": "high", "Medium": "normal", "Low": "low"}
CHANNEL = {"Email": "email", "Phone": "phone", "Social media": "wechat", "Chat": "web"}
SAMPLE = 300


async def test_customer_support_tickets_import_counts(stack: RunningStack) -> None:
    """The first 300 tickets of the public dataset, imported through the API: counts per priority
    and channel read back through the filters equal the counts in the file."""
    path = DATASETS / "customer-support-tickets" / "customer_support_tickets.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for _, row in zip(range(SAMPLE), csv.DictReader(handle), strict=False)]
    assert len(rows) == SAMPLE
    run = new_id()[-8:]
    region = f"ds-{run}"
    async with _client(stack, f"mgr-{run}", ["service_manager"], region) as mgr:
        semaphore = asyncio.Semaphore(16)

        async def create(row: dict[str, str]) -> None:
            body = {
                "subject": row["Ticket Subject"],
                "description": row["Ticket Description"],
                "channel": CHANNEL[row["Ticket Channel"]],
                "priority": PRIORITY[row["Ticket Priority"]],
                "category": row["Ticket Type"],
                "region": region,
            }
            async with semaphore:
                response = await mgr.post(
                    "/api/v1/tickets", json=body, headers={"Idempotency-Key": f"{run}-{row['Ticket ID']}"}
                )
            assert response.status_code == 201, response.text

        await asyncio.gather(*(create(row) for row in rows))

        async def count(**params: str) -> int:
            total, cursor = 0, ""
            while True:
                page = _ok(
                    await mgr.get(
                        "/api/v1/tickets", params={"region": region, "limit": "100", **params, "cursor": cursor}
                    )
                )
                total += len(page["items"])
                cursor = page["next_cursor"] or ""
                if not cursor:
                    return total

        assert await count() == SAMPLE
        for source, priority in PRIORITY.items():
            expected = Counter(row["Ticket Priority"] for row in rows)[source]
            assert await count(priority=priority) == expected, priority
        for source, channel in CHANNEL.items():
            expected = Counter(row["Ticket Channel"] for row in rows)[source]
            assert await count(channel=channel) == expected, channel
        # No agent serves this region: every ticket is queued (new) and escalated.
        assert await count(status="new", escalated="true") == SAMPLE


async def test_ticket_custom_fields_through_the_gateway(stack: RunningStack) -> None:
    run = new_id()[-8:]
    key = f"serial_{run}"
    async with (
        _client(stack, f"admin-{run}", ["admin"], "any") as admin,
        _client(stack, f"mgr-{run}", ["service_manager"], f"cf-{run}") as mgr,
    ):
        definition = _ok(
            await admin.post("/api/v1/custom-fields/ticket", json={"key": key, "label": "Serial", "type": "text"}), 201
        )
        assert definition["entity"] == "ticket" and definition["key"] == key
        listed = _ok(await mgr.get("/api/v1/custom-fields/ticket"))
        assert key in [d["key"] for d in listed["items"]]

        unknown = await mgr.post(
            "/api/v1/tickets", json={"subject": "s", "channel": "web", "custom": {f"nope_{run}": "x"}}
        )
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == f"custom.nope_{run}"

        # A second definition, changed under If-Match: the service desk validates values against it.
        severity = f"severity_{run}"
        created = _ok(
            await admin.post(
                "/api/v1/custom-fields/ticket",
                json={"key": severity, "label": "Severity", "type": "enum", "options": ["minor"]},
            ),
            201,
        )
        body = {"key": severity, "label": "Severity", "type": "enum", "options": ["minor", "major"]}
        changed = _ok(
            await admin.put(
                f"/api/v1/custom-fields/ticket/{severity}", json=body, headers={"If-Match": f'"{created["version"]}"'}
            )
        )
        assert changed["version"] == created["version"] + 1 and changed["options"] == ["minor", "major"]
        lost = await admin.put(
            f"/api/v1/custom-fields/ticket/{severity}", json=body, headers={"If-Match": f'"{created["version"]}"'}
        )
        assert lost.status_code == 412
        invalid = await mgr.post(
            "/api/v1/tickets",
            json={"subject": "s", "channel": "web", "region": f"cf-{run}", "custom": {key: "SN-0", severity: "huge"}},
        )
        assert invalid.status_code == 422, invalid.text
        assert [e["field"] for e in invalid.json()["errors"]] == [f"custom.{severity}"]
        assert (await admin.delete(f"/api/v1/custom-fields/ticket/{severity}")).status_code == 204
        ticket = _ok(
            await mgr.post(
                "/api/v1/tickets",
                json={"subject": "Broken drone", "channel": "web", "region": f"cf-{run}", "custom": {key: "SN-1"}},
            ),
            201,
        )
        assert ticket["custom"] == {key: "SN-1"}
        patched = _ok(
            await mgr.patch(
                f"/api/v1/tickets/{ticket['id']}",
                json={"custom": {key: "SN-2"}, "priority": "urgent"},
                headers={"If-Match": f'"{ticket["version"]}"'},
            )
        )
        assert patched["custom"] == {key: "SN-2"} and patched["priority"] == "urgent"
        stale = await mgr.patch(
            f"/api/v1/tickets/{ticket['id']}", json={"priority": "low"}, headers={"If-Match": f'"{ticket["version"]}"'}
        )
        assert stale.status_code == 412
        assert (await admin.delete(f"/api/v1/custom-fields/ticket/{key}")).status_code == 204


async def test_ticket_custom_pii_values_are_masked_for_analysts(stack: RunningStack) -> None:
    """SPEC §5/§9: a custom field defined as pii is masked like phone and email. The analyst, who
    sees contact details masked, reads tickets: their pii custom values masked in every read (get,
    list, the 360° view) and filtering by them is refused; the service manager reads and filters by them."""
    run = new_id()[-8:]
    region = f"pii-{run}"
    caller, serial = f"caller_{run}", f"serial_{run}"
    secret = "zhang.san@example.com"
    async with (
        _client(stack, f"admin-{run}", ["admin"], region) as admin,
        _client(stack, f"mgr-{run}", ["service_manager"], region) as mgr,
        _client(stack, f"analyst-{run}", ["analyst"], region) as analyst,
    ):
        _ok(
            await admin.post(
                "/api/v1/custom-fields/ticket",
                json={"key": caller, "label": "Caller's email", "type": "email", "pii": True},
            ),
            201,
        )
        _ok(
            await admin.post("/api/v1/custom-fields/ticket", json={"key": serial, "label": "Serial", "type": "text"}),
            201,
        )
        account = _ok(await admin.post("/api/v1/accounts", json={"name": f"Masked {run}", "region": region}), 201)
        custom = {caller: secret, serial: "SN-7"}
        body = {"subject": "Drone lost", "channel": "email", "region": region, "account_id": account["id"]}
        ticket = _ok(await mgr.post("/api/v1/tickets", json={**body, "custom": custom}), 201)
        assert ticket["custom"] == custom

        def masked(record: dict[str, Any]) -> bool:
            return record["custom"][serial] == "SN-7" and "*" in record["custom"][caller] and secret not in str(record)

        assert masked(_ok(await analyst.get(f"/api/v1/tickets/{ticket['id']}")))
        listed = _ok(await analyst.get("/api/v1/tickets", params={"account_id": account["id"]}))
        assert [t["id"] for t in listed["items"]] == [ticket["id"]] and masked(listed["items"][0])
        view = _ok(await analyst.get(f"/api/v1/accounts/{account['id']}/360"))
        assert [masked(t) for t in view["open_tickets"]["items"]] == [True]
        leak = await analyst.get("/api/v1/tickets", params={f"custom.{caller}": secret})
        assert leak.status_code == 403 and leak.json()["errors"][0]["field"] == f"custom.{caller}"

        assert _ok(await mgr.get(f"/api/v1/tickets/{ticket['id']}"))["custom"] == custom
        listed = _ok(await mgr.get("/api/v1/tickets", params={"account_id": account["id"]}))
        assert listed["items"][0]["custom"] == custom
        # Filtering by custom fields the manager reads in clear, the pii one too.
        _ok(await mgr.post("/api/v1/tickets", json={**body, "subject": "Other drone", "custom": {serial: "SN-8"}}), 201)
        for params, expected in (
            ({f"custom.{serial}": "SN-7"}, [ticket["id"]]),
            ({f"custom.{serial}": "SN-7", f"custom.{caller}": secret.upper()}, [ticket["id"]]),  # emails: any case
            ({f"custom.{serial}": "SN-9"}, []),
        ):
            found = _ok(await mgr.get("/api/v1/tickets", params={"account_id": account["id"], **params}))
            assert [t["id"] for t in found["items"]] == expected, params
        unknown = await mgr.get("/api/v1/tickets", params={f"custom.nope_{run}": "x"})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == f"custom.nope_{run}"
        for key in (caller, serial):
            assert (await admin.delete(f"/api/v1/custom-fields/ticket/{key}")).status_code == 204
