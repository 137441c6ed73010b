"""The audit trail: one row per write with the right before/after (PII masked), rows for denied
requests, exports and sensitive reads, an outbox event per row, the admin query API, and a table
the database itself keeps append-only (SQLite and PostgreSQL)."""

import csv
import io
import json
import random
from datetime import timedelta
from typing import Any

import httpx
import pytest
from crm.audit.v1 import events_pb2
from crm_platform.audit import audit_recorded
from crm_platform.config import KafkaSettings
from crm_platform.ids import new_id
from crm_platform.kafka import ensure_topics
from crm_platform.outbox import MAX_EVENT_BYTES
from crm_platform.pagination import encode_cursor
from crm_platform.principal import Principal
from crm_platform.testing.kafka import EventCollector, produce_event
from crm_platform.testing.polling import eventually
from crm_platform.timeutil import utcnow
from gateway.security import exports as exports_registry
from gateway.security.audit import AuditEntry, AuditQuery
from gateway.security.masking import mask_value
from gateway.security.policy import Policy, parse_policy
from gateway.security.store import audit_events, outbox
from gateway.security.store import metadata as store_metadata
from gateway.testing import default_policy_document, policy_text
from gateway.upstreams import UpstreamNotConfigured
from prometheus_client import REGISTRY
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

pytestmark = pytest.mark.integration

ME, TEAM, REGION = "u-me", "team-a", "north"


async def all_audit_rows(gateway: Any, **filters: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page, cursor = await gateway.runtime.audit.query(AuditQuery(limit=500, cursor=cursor, **filters))
        rows += page
        if cursor is None:
            return rows


async def random_writes(gateway: Any, headers: dict[str, str], count: int, seed: int) -> list[dict[str, Any]]:
    """Creates, updates and deletes leads at random; returns what each write should have audited."""
    rng = random.Random(seed)
    expected: list[dict[str, Any]] = []
    live: list[str] = []
    for step in range(count):
        choice = rng.choice(["create", "update", "update", "delete"]) if live else "create"
        if choice == "create":
            body = {"name": f"lead {step}", "phone": f"1381234{step:04d}", "company": rng.choice(["A", "B"])}
            response = await gateway.client.post("/api/v1/fake/leads", json=body, headers=headers)
            assert response.status_code == 201, response.text
            record_id = response.json()["id"]
            live.append(record_id)
            expected.append({"action": "create", "record_id": record_id, "after": body})
        elif choice == "update":
            record_id = rng.choice(live)
            before = dict(gateway.store.get("leads", record_id))
            body = {"company": f"C{step}", "email": f"person{step}@example.com"}
            response = await gateway.client.patch(f"/api/v1/fake/leads/{record_id}", json=body, headers=headers)
            assert response.status_code == 200, response.text
            changed = {k: v for k, v in body.items() if before.get(k) != v}
            expected.append(
                {
                    "action": "update",
                    "record_id": record_id,
                    "before": {k: before.get(k) for k in changed},
                    "after": changed,
                }
            )
        else:
            record_id = live.pop(rng.randrange(len(live)))
            response = await gateway.client.delete(f"/api/v1/fake/leads/{record_id}", headers=headers)
            assert response.status_code == 204, response.text
            expected.append({"action": "delete", "record_id": record_id})
    return expected


def masked(values: dict[str, Any]) -> dict[str, Any]:
    from gateway.security.masking import mask_email, mask_phone

    result = dict(values)
    if result.get("phone"):
        result["phone"] = mask_phone(result["phone"])
    if result.get("email"):
        result["email"] = mask_email(result["email"])
    return result


async def check_random_writes(gateway: Any, auth_headers: Any, count: int) -> None:
    headers = auth_headers("sales_manager", sub=ME, team=TEAM, region=REGION)
    expected = await random_writes(gateway, headers, count, seed=count)
    rows = await all_audit_rows(gateway, resource="leads")
    writes = [row for row in rows if row["action"] in ("create", "update", "delete")]
    assert len(writes) == count == len(rows)
    writes.reverse()  # the API answers newest first
    for want, row in zip(expected, writes, strict=True):
        assert row["action"] == want["action"] and row["record_id"] == want["record_id"]
        assert row["actor"]["user_id"] == ME and row["actor"]["roles"] == ["sales_manager"]
        assert row["outcome"] == "allowed"
        assert row["request_id"] and row["method"] in ("POST", "PATCH", "DELETE")
        # The status the write answered: the row is written before the answer, as the route declares it.
        assert row["status_code"] == {"create": 201, "update": 200, "delete": 204}[want["action"]]
        if want["action"] == "create":
            assert row["before"] is None
            assert {k: row["after"][k] for k in want["after"]} == masked(want["after"])
        elif want["action"] == "update":
            assert row["before"] == masked(want["before"])
            assert row["after"] == masked(want["after"])
            assert row["fields"] == sorted(want["after"])
        else:
            assert row["after"] is None and row["before"]["id"] == want["record_id"]
        # PII never appears in clear.
        for side in (row["before"] or {}, row["after"] or {}):
            assert "@example.com" not in str(side.get("email", "")) or "***@" in side["email"]
            assert "****" in side.get("phone", "****") or not side.get("phone")
    # Every audit row has its event in the outbox, in the same transaction.
    async with gateway.runtime.engine.connect() as conn:
        payloads = [row.payload for row in await conn.execute(select(outbox.c.payload, outbox.c.topic))]
        topics = set((await conn.execute(select(outbox.c.topic).distinct())).scalars())
    assert topics == {"crm.audit.v1"}
    events = [events_pb2.AuditRecorded.FromString(payload) for payload in payloads]
    assert sorted(event.id for event in events) == sorted(row["id"] for row in rows)


async def test_n_random_writes_give_n_audit_rows(gateway: Any, auth_headers: Any) -> None:
    await check_random_writes(gateway, auth_headers, 40)


async def test_n_random_writes_on_postgresql(make_gateway: Any, postgres_url: str, auth_headers: Any) -> None:
    gateway = await make_gateway(database_url=postgres_url)
    await check_random_writes(gateway, auth_headers, 25)
    await check_append_only(gateway)
    with pytest.raises(DBAPIError, match="append-only"):
        async with gateway.runtime.engine.begin() as conn:
            await conn.execute(text("TRUNCATE audit_events"))


async def test_a_request_naming_an_overlong_id_is_audited_with_the_ids_start(
    make_gateway: Any, postgres_url: str
) -> None:
    # A refused request's path can name any id; no record has one longer than the trail keeps.
    gateway = await make_gateway(database_url=postgres_url)
    long_id = "c" * 300
    refused = AuditEntry(actor=Principal(user_id="rep-7", kind="user"), action="denied", resource="leads",
                         record_id=long_id, outcome="denied", status_code=404)  # fmt: skip
    await gateway.runtime.audit.record([refused])
    rows, _ = await gateway.runtime.audit.query(AuditQuery(action="denied"))
    assert [row["record_id"] for row in rows] == [long_id[:200]]
    async with gateway.runtime.engine.connect() as conn:
        assert await conn.scalar(select(outbox.c.key)) == long_id[:200]


async def check_append_only(gateway: Any) -> None:
    async with gateway.runtime.engine.connect() as conn:
        before = await conn.scalar(select(func.count()).select_from(audit_events))
    assert before
    for statement in (update(audit_events).values(reason="tampered"), delete(audit_events)):
        with pytest.raises(DBAPIError, match="append-only"):
            async with gateway.runtime.engine.begin() as conn:
                await conn.execute(statement)
    async with gateway.runtime.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(audit_events)) == before
        assert not await conn.scalar(select(func.count()).where(audit_events.c.reason == "tampered"))


async def test_audit_table_refuses_update_and_delete_on_sqlite(gateway: Any, auth_headers: Any) -> None:
    await random_writes(gateway, auth_headers("admin"), 3, seed=1)
    await check_append_only(gateway)


async def test_denied_requests_exports_and_sensitive_reads_are_audited(gateway: Any, auth_headers: Any) -> None:
    gateway.store.put("quotes", {"id": "q1", "owner_id": "x", "discount_total": {"amount": "5", "currency": "CNY"}})
    gateway.store.put("leads", {"id": "l1", "owner_id": "x", "name": "n"})
    rep = auth_headers("sales_rep", sub=ME)
    assert (await gateway.client.delete("/api/v1/fake/leads/l1", headers=rep)).status_code == 403
    assert (await gateway.client.patch("/api/v1/fake/leads/l1", json={}, headers=rep)).status_code == 404
    assert (await gateway.client.get("/api/v1/exports/leads", headers=rep)).status_code == 403
    admin = auth_headers("admin", sub="boss")
    assert (await gateway.client.get("/api/v1/fake/quotes/q1", headers=admin)).status_code == 200
    assert (await gateway.client.get("/api/v1/exports/leads", headers=admin)).status_code == 200
    marketing = auth_headers("marketing", sub="m1")
    leads = await gateway.client.get("/api/v1/fake/leads?email=x", headers=marketing)
    assert leads.status_code == 403

    rows = await all_audit_rows(gateway)
    denied = [row for row in rows if row["action"] == "denied"]
    assert {(row["actor"]["user_id"], row["resource"], row["status_code"]) for row in denied} == {
        (ME, "leads", 403),
        ("m1", "leads", 403),
    }
    assert len(denied) == 3  # delete and export by the rep, the filter by marketing
    assert sorted(row["record_id"] for row in denied) == ["", "", "l1"]  # a refusal names its record
    assert any(row["fields"] == ["email"] for row in denied)
    exports = [row for row in rows if row["action"] == "export"]
    assert len(exports) == 1 and exports[0]["actor"]["user_id"] == "boss" and "name" in exports[0]["fields"]
    sensitive = [row for row in rows if row["action"] == "read_sensitive"]
    assert [(row["record_id"], row["fields"]) for row in sensitive] == [("q1", ["discount_total"])]
    assert exports[0]["status_code"] == sensitive[0]["status_code"] == 200


async def test_a_page_of_sensitive_reads_is_one_audit_row(gateway: Any, auth_headers: Any) -> None:
    for number in range(5):
        gateway.store.put(
            "accounts", {"id": f"a{number}", "owner_id": "x", "credit_limit": {"amount": "1", "currency": "CNY"}}
        )
    gateway.store.put("accounts", {"id": "a-no-limit", "owner_id": "x"})
    response = await gateway.client.get("/api/v1/fake/accounts", headers=auth_headers("admin"))
    assert len(response.json()["items"]) == 6
    rows = [row for row in await all_audit_rows(gateway) if row["action"] == "read_sensitive"]
    assert len(rows) == 1
    assert rows[0]["fields"] == ["credit_limit"] and rows[0]["record_id"] == ""
    assert sorted(rows[0]["after"]["record_ids"]) == [f"a{n}" for n in range(5)]


async def test_an_export_of_thousands_of_sensitive_records_is_audited_in_rows_each_event_publishable(
    gateway: Any, auth_headers: Any
) -> None:
    for number in range(12_000):
        record_id = f"{number:032d}-acct"  # as long as the CRM's ids
        gateway.store.put(
            "accounts", {"id": record_id, "owner_id": "x", "credit_limit": {"amount": "1", "currency": "CNY"}}
        )

    exported = await gateway.client.get("/api/v1/exports/accounts", headers=auth_headers("admin"))

    assert exported.status_code == 200
    rows = [row for row in await all_audit_rows(gateway) if row["action"] == "read_sensitive"]
    assert sorted(len(row["after"]["record_ids"]) for row in rows) == [2_000, 5_000, 5_000]
    assert len({record_id for row in rows for record_id in row["after"]["record_ids"]}) == 12_000
    async with gateway.runtime.engine.connect() as conn:
        largest = await conn.scalar(select(func.max(func.length(outbox.c.payload))))
    assert largest < MAX_EVENT_BYTES  # the broker takes each, and the actor's later events follow


async def test_custom_values_defined_as_personal_data_are_masked_in_the_audit_trail(
    gateway: Any, auth_headers: Any
) -> None:
    gateway.store.define("lead", "private_mobile", pii=True)
    headers = auth_headers("sales_manager", sub=ME, team=TEAM, region=REGION)
    custom = {"private_mobile": "13812345678", "shoe_size": "42"}
    created = await gateway.client.post("/api/v1/fake/leads", json={"name": "Li", "custom": custom}, headers=headers)
    lead_id = created.json()["id"]
    changed = {"private_mobile": "13987654321", "shoe_size": "43"}
    await gateway.client.patch(f"/api/v1/fake/leads/{lead_id}", json={"custom": changed}, headers=headers)

    create, update = reversed(await all_audit_rows(gateway, record_id=lead_id))
    assert create["after"]["custom"] == {"private_mobile": "1***", "shoe_size": "42"}
    assert (update["before"]["custom"], update["after"]["custom"]) == (
        {"private_mobile": "1***", "shoe_size": "42"},
        {"private_mobile": "1***", "shoe_size": "43"},
    )


async def test_every_custom_value_is_masked_when_the_definitions_cannot_be_read(
    gateway: Any, auth_headers: Any
) -> None:
    gateway.app.state.upstreams = RefusingUpstreams()  # the owning service is down
    headers = auth_headers("sales_manager", sub=ME, team=TEAM, region=REGION)
    body = {"name": "Li", "custom": {"shoe_size": "42"}}
    lead_id = (await gateway.client.post("/api/v1/fake/leads", json=body, headers=headers)).json()["id"]

    [row] = await all_audit_rows(gateway, record_id=lead_id)
    assert row["after"]["custom"] == {"shoe_size": "4***"}


class RefusingUpstreams:
    def stub(self, name: str, stub_type: Any) -> Any:
        raise UpstreamNotConfigured(name)


async def test_audit_events_api_is_admin_only_and_filters(gateway: Any, auth_headers: Any) -> None:
    await random_writes(gateway, auth_headers("sales_manager", sub="u-a", team="t-a"), 6, seed=3)
    await random_writes(gateway, auth_headers("sales_manager", sub="u-b", team=TEAM), 4, seed=4)
    admin = auth_headers("admin", sub="root")
    for role in ("sales_manager", "analyst", "finance", "sales_rep"):
        refused = await gateway.client.get("/api/v1/audit-events", headers=auth_headers(role))
        assert refused.status_code == 403
    everything = await gateway.client.get("/api/v1/audit-events?limit=500", headers=admin)
    assert everything.status_code == 200
    items = everything.json()["items"]
    by_a = await gateway.client.get("/api/v1/audit-events?actor=u-a", headers=admin)
    assert {item["actor"]["user_id"] for item in by_a.json()["items"]} == {"u-a"}
    assert len(by_a.json()["items"]) == 6
    first = items[-1]
    by_record = await gateway.client.get(
        f"/api/v1/audit-events?resource=leads&record_id={first['record_id']}", headers=admin
    )
    assert by_record.json()["items"] and {i["record_id"] for i in by_record.json()["items"]} == {first["record_id"]}
    creates = await gateway.client.get("/api/v1/audit-events?action=create", headers=admin)
    assert {i["action"] for i in creates.json()["items"]} == {"create"}
    future = await gateway.client.get("/api/v1/audit-events?since=2999-01-01T00:00:00Z", headers=admin)
    assert future.json()["items"] == []
    past = await gateway.client.get("/api/v1/audit-events?until=2000-01-01T00:00:00Z", headers=admin)
    assert past.json()["items"] == []
    # Paging: pages of 3 add up to everything, newest first, no repeats.
    seen: list[str] = []
    cursor = ""
    while True:
        page = await gateway.client.get(f"/api/v1/audit-events?limit=3&cursor={cursor}", headers=admin)
        body = page.json()
        seen += [item["id"] for item in body["items"]]
        if not body["next_cursor"]:
            break
        cursor = body["next_cursor"]
    assert seen == [item["id"] for item in items if item["id"] in seen]
    assert len(seen) == len(set(seen)) >= 10


async def test_audit_events_page_only_from_the_cursors_they_gave(gateway: Any, auth_headers: Any) -> None:
    await random_writes(gateway, auth_headers("sales_manager", sub="u-a", team="t-a"), 5, seed=5)
    admin = auth_headers("admin", sub="root")
    first = (await gateway.client.get("/api/v1/audit-events", params={"limit": 2}, headers=admin)).json()
    issued = first["next_cursor"]
    second = await gateway.client.get("/api/v1/audit-events", params={"limit": 2, "cursor": issued}, headers=admin)
    assert second.status_code == 200, second.text
    assert second.json()["items"][0]["id"] < first["items"][-1]["id"]
    # The cursor was the last event's id, compared as it came: garbage started at the first page,
    # an edited id somewhere else. Edited ids are also tried bound to the listing's filters, as
    # the cursors it issues are.
    last_id = first["items"][-1]["id"]
    bound_to = issued.partition(".")[0]
    edited = [encode_cursor([last_id[::-1]]), encode_cursor([last_id, last_id]), encode_cursor([7])]
    for cursor in [
        "garbage",
        issued + "x",
        issued[::-1],
        issued[:-4],
        last_id,
        *edited,
        *(f"{bound_to}.{inner}" for inner in edited),
    ]:
        refused = await gateway.client.get("/api/v1/audit-events", params={"limit": 2, "cursor": cursor}, headers=admin)
        assert refused.status_code == 422, (cursor, refused.text)
        assert [error["field"] for error in refused.json()["errors"]] == ["cursor"]


async def test_an_audit_cursor_pages_only_the_filters_it_came_from(gateway: Any, auth_headers: Any) -> None:
    await random_writes(gateway, auth_headers("sales_manager", sub="u-a", team="t-a"), 5, seed=5)
    admin = auth_headers("admin", sub="root")
    first = (await gateway.client.get("/api/v1/audit-events", params={"limit": 1}, headers=admin)).json()
    action = first["items"][0]["action"]

    same = await gateway.client.get(
        "/api/v1/audit-events", params={"limit": 1, "cursor": first["next_cursor"]}, headers=admin
    )
    other = await gateway.client.get(
        "/api/v1/audit-events", params={"limit": 1, "cursor": first["next_cursor"], "action": action}, headers=admin
    )

    assert same.status_code == 200, same.text
    assert other.status_code == 422 and [e["field"] for e in other.json()["errors"]] == ["cursor"], other.text


async def test_audit_events_reach_kafka(make_gateway: Any, kafka_settings: KafkaSettings, auth_headers: Any) -> None:
    await ensure_topics(kafka_settings, ["crm.audit.v1"])
    gateway = await make_gateway()
    runtime = gateway.runtime
    runtime.kafka = kafka_settings
    await runtime.start(migrate=False, relay=True)
    response = await gateway.client.post(
        "/api/v1/fake/leads", json={"name": "via kafka"}, headers=auth_headers("sales_rep", sub="u-kafka")
    )
    record_id = response.json()["id"]
    async with EventCollector(kafka_settings.bootstrap_servers, ["crm.audit.v1"]) as collector:
        records = await collector.wait_for(lambda got: any(r.key == record_id for r in got), timeout=30)
    record = next(r for r in records if r.key == record_id)
    assert record.event_type == "crm.audit.record.recorded"
    event = record.decode(events_pb2.AuditRecorded)
    assert (event.action, event.resource, event.actor.user_id) == ("create", "leads", "u-kafka")


def consumed(outcome: str) -> float:
    """How many crm.audit.v1 events the gateway's consumers have had with this outcome."""
    labels = {"service": "gateway", "topic": "crm.audit.v1", "outcome": outcome}
    return REGISTRY.get_sample_value("crm_consumer_processed_total", labels) or 0.0


def dead_letters() -> float:
    labels = {"service": "gateway", "topic": "crm.audit.v1"}
    return REGISTRY.get_sample_value("crm_dead_letters_total", labels) or 0.0


async def test_the_audit_records_services_publish_join_the_trail_once_and_the_gateways_own_are_not_stored_again(
    make_gateway: Any, kafka_settings: KafkaSettings, auth_headers: Any
) -> None:
    """A write that reaches a service without a request (an ERP's posting on Kafka) is audited by
    the service on crm.audit.v1; the gateway stores those records in its trail, each once, and passes
    over its own records there (they are in the trail already)."""
    await ensure_topics(kafka_settings, ["crm.audit.v1", "crm.audit.v1.dlt"])
    gateway = await make_gateway()
    runtime = gateway.runtime
    runtime.kafka = kafka_settings
    before = {"ignored": consumed("ignored"), "duplicate": consumed("duplicate"), "dead": dead_letters()}
    await runtime.start(migrate=False, relay=True, ingest=True)
    response = await gateway.client.post(
        "/api/v1/fake/leads", json={"name": "own"}, headers=auth_headers("sales_rep", sub="u-own")
    )
    record_id = response.json()["id"]
    async with EventCollector(kafka_settings.bootstrap_servers, ["crm.audit.v1"]) as collector:
        await collector.wait_for(lambda got: any(r.key == record_id for r in got), timeout=30)
    erp = Principal(user_id="erp", roles=("erp_integration",), kind="api_key")
    payment_id, last_id = f"pay-{new_id()}", f"pay-{new_id()}"

    def service_record(paid: str) -> events_pb2.AuditRecorded:
        return audit_recorded(
            id=new_id(),
            occurred_at=utcnow(),
            actor=erp,
            action="create",
            resource="payments",
            record_id=paid,
            fields=["amount"],
            after={"amount": {"amount": "250.00", "currency": "CNY"}},
            request_id="evt-1",
            method="KAFKA",
            path="erp.payments.v1/3/41",
            client_address="/erp/sap",
        )

    posted = service_record(payment_id)
    # Keyed as the gateway's own record, so that they land behind it in its partition, in this
    # order: the first one twice (a redelivery), again under another event id (read again after
    # the inbox forgot it), then another. Once the last is stored, the consumer has had them all.
    deliveries = [(posted, f"e-{payment_id}"), (posted, f"e-{payment_id}"), (posted, f"e2-{payment_id}")]
    for message, event_id in [*deliveries, (service_record(last_id), new_id())]:
        await produce_event(
            kafka_settings.bootstrap_servers, message, key=record_id, source="/crm/sales", event_id=event_id
        )
    assert await eventually(lambda: all_audit_rows(gateway, record_id=last_id)), "the service's record was not stored"

    [row] = await all_audit_rows(gateway, record_id=payment_id)
    assert {k: row[k] for k in ("id", "action", "resource", "fields", "before", "after", "method", "path")} == {
        "id": posted.id,
        "action": "create",
        "resource": "payments",
        "fields": ["amount"],
        "before": None,
        "after": {"amount": {"amount": "250.00", "currency": "CNY"}},
        "method": "KAFKA",
        "path": "erp.payments.v1/3/41",
    }
    assert (row["request_id"], row["client_address"]) == ("evt-1", "/erp/sap")
    assert row["actor"] == {"user_id": "erp", "kind": "api_key", "roles": ["erp_integration"], "team": "", "region": ""}
    assert [r["action"] for r in await all_audit_rows(gateway, record_id=record_id)] == ["create"]
    # Its own record passed over (not stored again), the redelivery known by its event id, and the
    # record under another event id kept once, not refused as a duplicate row and dead-lettered.
    assert consumed("ignored") > before["ignored"] and consumed("duplicate") == before["duplicate"] + 1
    assert dead_letters() == before["dead"]


async def test_the_audit_consumer_forgets_the_records_it_stored_after_the_inbox_retention(
    make_gateway: Any, kafka_settings: KafkaSettings
) -> None:
    """As the services' consumers do: its inbox keeps a record's event id for the retention (a
    redelivery within it is skipped), then the expiry job deletes it."""
    gateway = await make_gateway(inbox_retention_hours=1.0, inbox_expiry_interval_seconds=0.2)
    runtime = gateway.runtime
    runtime.kafka = kafka_settings
    inbox = store_metadata.tables["processed_events"]
    now = utcnow()
    async with runtime.engine.begin() as conn:
        await conn.execute(
            inbox.insert(),
            [
                {"consumer": "gateway-audit", "event_id": "old", "processed_at": now - timedelta(hours=2)},
                {"consumer": "gateway-audit", "event_id": "recent", "processed_at": now - timedelta(minutes=50)},
            ],
        )

    async def remembered() -> list[str]:
        async with runtime.engine.connect() as conn:
            return list((await conn.execute(select(inbox.c.event_id).order_by(inbox.c.event_id))).scalars())

    await runtime.start(migrate=False, relay=False, ingest=True)
    assert await eventually(remembered, lambda ids: ids == ["recent"], timeout=10) == ["recent"]


async def test_export_audit_masks_personal_data_in_filters(gateway: Any, auth_headers: Any) -> None:
    response = await gateway.client.get(
        "/api/v1/exports/leads?phone=13812345678&status=new", headers=auth_headers("admin")
    )
    assert response.status_code == 200
    (row,) = [row for row in await all_audit_rows(gateway) if row["action"] == "export"]
    assert "13812345678" not in row["reason"]
    assert "phone=138****5678" in row["reason"] and "status=new" in row["reason"]


def audit_readers(**scopes: str) -> Policy:
    """The default policy, where the roles named may also read and export the audit trail, each in
    the record scope given."""
    data = default_policy_document()
    for role, scope in scopes.items():
        data["roles"][role]["grants"]["audit_events"] = {"actions": ["read", "export"], "scope": scope}
    return parse_policy(policy_text(data))


async def test_a_policy_that_hides_or_masks_fields_of_the_trail_leaves_them_out_of_its_readers_page(
    make_gateway: Any, auth_headers: Any
) -> None:
    data = default_policy_document()
    data["roles"]["sales_manager"]["grants"]["audit_events"] = {
        "actions": ["read"],
        "scope": "team",
        "fields": {"client_address": "hidden", "status_code": "masked"},
    }
    gateway = await make_gateway(policy=parse_policy(policy_text(data)))
    rep = auth_headers("sales_rep", sub="u-rep", team="t-a")
    assert (await gateway.client.post("/api/v1/fake/leads", json={"name": "Ada"}, headers=rep)).status_code == 201

    listed = await gateway.client.get("/api/v1/audit-events", headers=auth_headers("sales_manager", team="t-a"))

    assert listed.status_code == 200, listed.text
    [event] = listed.json()["items"]
    assert "client_address" not in event and event["status_code"] is None
    assert event["actor"]["user_id"] == "u-rep" and event["action"] == "create"


# Who writes (sub, team, region), oldest first.
WRITERS = [("u-a", "t-a", "north"), ("u-b", "t-b", "north"), ("u-c", "t-b", "south"), ("u-none", "", "")]


@pytest.mark.parametrize(
    ("role", "team", "region", "actors"),
    [
        ("sales_rep", "t-b", "north", {"u-b"}),  # own: the caller's own actions
        ("sales_manager", "t-b", "west", {"u-b", "u-c"}),  # team: the actions of the caller's team
        ("service_manager", "t-z", "south", {"u-c"}),  # region: the actions of the caller's region
        ("sales_manager", "", "north", set()),  # no team: nobody's, not those of actors without one
        ("admin", "t-z", "west", {"u-a", "u-b", "u-c", "u-none"}),
    ],
)
async def test_a_custom_policy_lets_a_role_read_the_audit_events_of_the_actors_its_scope_covers(
    make_gateway: Any, auth_headers: Any, role: str, team: str, region: str, actors: set[str]
) -> None:
    audit_export = exports_registry.export_source("audit_events")  # the audit router's
    gateway = await make_gateway(policy=audit_readers(sales_rep="own", sales_manager="team", service_manager="region"))
    # The fake routes export every resource from their store: the trail's own export back (the
    # fixture puts every source back after the test).
    assert audit_export is not None
    exports_registry._sources["audit_events"] = audit_export
    for sub, writer_team, writer_region in WRITERS:
        headers = auth_headers("sales_rep", sub=sub, team=writer_team, region=writer_region)
        for number in range(2):
            created = await gateway.client.post("/api/v1/fake/leads", json={"name": f"{sub} {number}"}, headers=headers)
            assert created.status_code == 201, created.text
    # The caller is u-b for `own`, someone else otherwise.
    caller = auth_headers(role, sub="u-b" if role == "sales_rep" else "u-reader", team=team, region=region)

    listed = await gateway.client.get("/api/v1/audit-events?action=create", headers=caller)
    assert listed.status_code == 200, listed.text
    assert {item["actor"]["user_id"] for item in listed.json()["items"]} == actors
    assert len(listed.json()["items"]) == 2 * len(actors)
    # A page holds `limit` events of the scope, however many newer ones are outside it.
    first_page = await gateway.client.get("/api/v1/audit-events?action=create&limit=1", headers=caller)
    assert first_page.json()["items"] == listed.json()["items"][:1]
    assert bool(first_page.json()["next_cursor"]) == bool(actors)
    # Asking for an actor outside the scope finds nothing either.
    asked = await gateway.client.get("/api/v1/audit-events?actor=u-a", headers=caller)
    assert {item["actor"]["user_id"] for item in asked.json()["items"]} <= actors

    exported = await gateway.client.get("/api/v1/exports/audit_events?action=create", headers=caller)
    assert exported.status_code == 200, exported.text
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["id"] for row in rows] == [item["id"] for item in listed.json()["items"]]
    assert {json.loads(row["actor"])["user_id"] for row in rows} == actors


async def test_every_audit_row_says_where_its_request_came_from(gateway: Any, auth_headers: Any) -> None:
    """Behind a trusted proxy the server takes the client from X-Forwarded-For (uvicorn's proxy
    headers); here the connection's peer is the client."""
    gateway.store.put("leads", {"id": "l1", "owner_id": "x", "name": "n"})
    transport = httpx.ASGITransport(app=gateway.app, client=("203.0.113.7", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        unknown = await client.get("/api/v1/me", headers={"Authorization": "Bearer not.a.token"})
        refused = await client.delete("/api/v1/fake/leads/l1", headers=auth_headers("sales_rep", sub=ME))
        exported = await client.get("/api/v1/exports/leads", headers=auth_headers("admin", sub="boss"))

    assert (unknown.status_code, refused.status_code, exported.status_code) == (401, 403, 200)
    rows = await all_audit_rows(gateway)
    assert sorted(row["action"] for row in rows) == ["denied", "denied", "export"]
    assert {row["client_address"] for row in rows} == {"203.0.113.7"}


async def test_a_reader_of_the_trail_sees_the_audited_values_as_they_see_the_records(
    make_gateway: Any, auth_headers: Any
) -> None:
    """A policy may let a manager read the trail; its values are then shown as the manager sees the
    audited records' fields (a hidden credit limit is left out, a masked industry masked), and nothing of a
    resource they may not read. An admin sees them all."""
    document = default_policy_document()
    grants = document["roles"]["sales_manager"]["grants"]
    grants["audit_events"] = {"actions": ["read", "export"], "scope": "all"}
    hidden_and_masked = {"*": "write", "credit_limit": "hidden", "industry": "masked"}
    grants["accounts"] = {**grants["accounts"], "fields": hidden_and_masked}
    grants.pop("tickets", None)
    audit_export = exports_registry.export_source("audit_events")
    gateway = await make_gateway(policy=parse_policy(policy_text(document)))
    assert audit_export is not None
    exports_registry._sources["audit_events"] = audit_export  # the trail's own export, not the fake routes'
    admin = Principal(user_id="root", roles=("admin",))
    changed = {"credit_limit": {"amount": "900000.00", "currency": "CNY"}, "industry": "Semiconductors", "tier": "A"}
    await gateway.runtime.audit.record(
        [
            AuditEntry(actor=admin, action="update", resource="accounts", record_id="acc-1", fields=sorted(changed),
                       before={"tier": "B", "industry": "Retail"}, after=changed),
            AuditEntry(actor=admin, action="update", resource="tickets", record_id="t-1", fields=["subject"],
                       before={"subject": "Printer"}, after={"subject": "Printer on fire"}),
        ]
    )  # fmt: skip

    async def trail(role: str) -> dict[str, dict[str, Any]]:
        headers = auth_headers(role, sub=f"{role}-1")
        response = await gateway.client.get("/api/v1/audit-events", params={"action": "update"}, headers=headers)
        assert response.status_code == 200, response.text
        return {row["record_id"]: row for row in response.json()["items"]}

    managers = await trail("sales_manager")
    assert managers["acc-1"]["after"] == {"industry": mask_value("Semiconductors", "text"), "tier": "A"}
    assert managers["acc-1"]["before"] == {"tier": "B", "industry": mask_value("Retail", "text")}
    assert "Semiconductors" not in str(managers)
    assert managers["t-1"]["before"] == managers["t-1"]["after"] == {}  # tickets: not theirs to read
    admins = await trail("admin")
    assert admins["acc-1"]["after"] == changed and admins["t-1"]["after"] == {"subject": "Printer on fire"}
    exported = await gateway.client.get(
        "/api/v1/exports/audit_events", params={"action": "update"}, headers=auth_headers("sales_manager")
    )
    assert exported.status_code == 200, exported.text
    assert "900000" not in exported.text and "Semiconductors" not in exported.text
