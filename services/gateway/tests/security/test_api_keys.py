"""API keys for machine principals: created by admins (plain key shown once, only a hash stored),
accepted as `X-API-Key`, scoped by the roles they carry, refused once revoked; whom a policy lets
manage keys in a narrower scope than `all` makes, lists and revokes only keys of their own."""

from typing import Any

import pytest
from gateway.security.api_keys import hash_key
from gateway.security.policy import parse_policy
from gateway.security.store import api_keys
from gateway.testing import default_policy_document, policy_text
from sqlalchemy import select

pytestmark = pytest.mark.integration


async def create_key(gateway: Any, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    payload = {"name": "SAP ERP", "principal_id": "erp-sap", "roles": ["erp_integration"], **body}
    response = await gateway.client.post("/api/v1/api-keys", json=payload, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_api_key_lifecycle(gateway: Any, auth_headers: Any) -> None:
    admin = auth_headers("admin", sub="root")
    created = await create_key(gateway, admin)
    key = created["key"]
    assert key.startswith("crmk_") and created["api_key"]["prefix"] == key[:11]
    async with gateway.runtime.engine.connect() as conn:
        stored = (await conn.execute(select(api_keys))).mappings().one()
    assert stored["key_hash"] == hash_key(key) and key not in str(dict(stored))

    machine = {"X-API-Key": key}
    me = await gateway.client.get("/api/v1/me", headers=machine)
    assert me.status_code == 200
    assert (me.json()["user_id"], me.json()["kind"], me.json()["roles"]) == ("erp-sap", "api_key", ["erp_integration"])
    # The ERP may post payments but not read leads.
    assert (
        await gateway.client.post("/api/v1/fake/payments", json={"method": "wire"}, headers=machine)
    ).status_code == 201
    assert (await gateway.client.get("/api/v1/fake/leads", headers=machine)).status_code == 403
    # `Authorization: ApiKey ...` works too.
    assert (await gateway.client.get("/api/v1/me", headers={"Authorization": f"ApiKey {key}"})).status_code == 200

    listing = await gateway.client.get("/api/v1/api-keys", headers=admin)
    assert [item["id"] for item in listing.json()["items"]] == [created["api_key"]["id"]]
    assert "key" not in listing.json()["items"][0]

    revoked = await gateway.client.delete(f"/api/v1/api-keys/{created['api_key']['id']}", headers=admin)
    assert revoked.status_code == 204
    assert (await gateway.client.get("/api/v1/me", headers=machine)).status_code == 401
    assert (await gateway.client.delete("/api/v1/api-keys/nope", headers=admin)).status_code == 404


async def test_only_admins_manage_keys(gateway: Any, auth_headers: Any) -> None:
    for role in ("sales_manager", "finance", "erp_integration"):
        headers = auth_headers(role)
        assert (await gateway.client.get("/api/v1/api-keys", headers=headers)).status_code == 403
        body = {"name": "x", "principal_id": "x", "roles": ["admin"]}
        assert (await gateway.client.post("/api/v1/api-keys", json=body, headers=headers)).status_code == 403


async def test_unknown_role_and_bad_keys_are_refused(gateway: Any, auth_headers: Any) -> None:
    admin = auth_headers("admin")
    bad = await gateway.client.post(
        "/api/v1/api-keys", json={"name": "x", "principal_id": "x", "roles": ["god"]}, headers=admin
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "roles[0]"
    for key in ("crmk_made_up", "something-else", "crmk_" + "a" * 43):
        assert (await gateway.client.get("/api/v1/me", headers={"X-API-Key": key})).status_code == 401


async def test_expired_keys_are_refused(gateway: Any, auth_headers: Any) -> None:
    created = await create_key(gateway, auth_headers("admin"), expires_at="2999-01-01T00:00:00Z")
    assert (await gateway.client.get("/api/v1/me", headers={"X-API-Key": created["key"]})).status_code == 200
    past = await gateway.client.post(
        "/api/v1/api-keys",
        json={"name": "x", "principal_id": "x", "roles": ["erp_integration"], "expires_at": "2001-01-01T00:00:00Z"},
        headers=auth_headers("admin"),
    )
    assert past.status_code == 422


async def test_a_create_repeated_under_its_idempotency_key_answers_with_the_key_it_created_not_a_second(
    gateway: Any, auth_headers: Any
) -> None:
    admin = {**auth_headers("admin", sub="root"), "Idempotency-Key": "erp-key-1"}
    payload = {"name": "SAP ERP", "principal_id": "erp-sap", "roles": ["erp_integration"]}

    first = await gateway.client.post("/api/v1/api-keys", json=payload, headers=admin)
    again = await gateway.client.post("/api/v1/api-keys", json=payload, headers=admin)
    other = await gateway.client.post("/api/v1/api-keys", json={**payload, "name": "Other"}, headers=admin)
    another_admin = {**auth_headers("admin", sub="root-2"), "Idempotency-Key": "erp-key-1"}
    by_another_admin = await gateway.client.post("/api/v1/api-keys", json=payload, headers=another_admin)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["api_key"] == first.json()["api_key"]
    assert first.json()["key"].startswith("crmk_") and again.json()["key"] is None  # the secret is shown once
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert by_another_admin.status_code == 201  # a key is its creator's own
    listed = await gateway.client.get("/api/v1/api-keys", headers=admin)
    assert len(listed.json()["items"]) == 2
    trail = await gateway.client.get("/api/v1/audit-events?resource=api_keys", headers=admin)
    assert sorted(row["action"] for row in trail.json()["items"]) == ["create", "create", "replay"]


async def test_the_keys_are_listed_a_page_at_a_time_and_a_foreign_cursor_is_a_422(
    gateway: Any, auth_headers: Any
) -> None:
    admin = auth_headers("admin", sub="root")
    made = [(await create_key(gateway, admin, name=f"Key {n}"))["api_key"]["id"] for n in range(5)]

    pages: list[list[str]] = []
    cursor = ""
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await gateway.client.get("/api/v1/api-keys", params=params, headers=admin)).json()
        pages.append([item["id"] for item in page["items"]])
        if not (cursor := page["next_cursor"]):
            break
    foreign = await gateway.client.get("/api/v1/api-keys", params={"cursor": "abc.def"}, headers=admin)

    assert pages == [made[:2], made[2:4], made[4:]]
    assert foreign.status_code == 422 and foreign.json()["errors"][0]["field"] == "cursor"


async def test_a_manager_a_policy_lets_make_keys_makes_them_only_for_themselves_with_their_roles(
    make_gateway: Any, auth_headers: Any
) -> None:
    document = default_policy_document()
    document["roles"]["sales_manager"]["grants"]["api_keys"] = {"actions": ["read", "create"], "scope": "own"}
    gateway = await make_gateway(policy=parse_policy(policy_text(document)))
    manager = auth_headers("sales_manager", sub="mgr-1")

    async def create(**body: Any) -> Any:
        payload = {"name": "report bot", "principal_id": "mgr-1", "roles": ["sales_manager"], **body}
        return await gateway.client.post("/api/v1/api-keys", json=payload, headers=manager)

    escalated = await create(roles=["sales_manager", "admin"])
    assert escalated.status_code == 403 and escalated.json()["errors"][0]["field"] == "roles[1]"
    as_another = await create(principal_id="ceo")
    assert as_another.status_code == 403 and as_another.json()["errors"][0]["field"] == "principal_id"
    own = await create()
    assert own.status_code == 201, own.text
    assert own.json()["api_key"]["roles"] == ["sales_manager"]


def _managers_may_manage_their_keys(actions: list[str]) -> Any:
    document = default_policy_document()
    document["roles"]["sales_manager"]["grants"]["api_keys"] = {"actions": actions, "scope": "own"}
    return parse_policy(policy_text(document))


async def test_a_managers_key_acts_in_the_managers_team_and_region(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(policy=_managers_may_manage_their_keys(["read", "create"]))
    manager = auth_headers("sales_manager", sub="mgr-1", team="team-a", region="north")
    body = {"name": "report bot", "principal_id": "mgr-1", "roles": ["sales_manager"]}

    other_team = await gateway.client.post("/api/v1/api-keys", json={**body, "team": "team-b"}, headers=manager)
    other_region = await gateway.client.post("/api/v1/api-keys", json={**body, "region": "south"}, headers=manager)
    left_out = await gateway.client.post("/api/v1/api-keys", json=body, headers=manager)

    assert other_team.status_code == 403 and other_team.json()["errors"][0]["field"] == "team"
    assert other_region.status_code == 403 and other_region.json()["errors"][0]["field"] == "region"
    assert left_out.status_code == 201, left_out.text
    assert (left_out.json()["api_key"]["team"], left_out.json()["api_key"]["region"]) == ("team-a", "north")
    me = await gateway.client.get("/api/v1/me", headers={"X-API-Key": left_out.json()["key"]})
    assert (me.json()["team"], me.json()["region"]) == ("team-a", "north")


async def test_a_manager_lists_and_revokes_only_the_keys_they_made(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(policy=_managers_may_manage_their_keys(["read", "create", "delete"]))
    erp = await create_key(gateway, auth_headers("admin", sub="root"))
    manager = auth_headers("sales_manager", sub="mgr-1", team="team-a")
    own = await gateway.client.post(
        "/api/v1/api-keys",
        json={"name": "report bot", "principal_id": "mgr-1", "roles": ["sales_manager"]},
        headers=manager,
    )

    listed = await gateway.client.get("/api/v1/api-keys", headers=manager)
    revoking_the_erps = await gateway.client.delete(f"/api/v1/api-keys/{erp['api_key']['id']}", headers=manager)
    revoking_their_own = await gateway.client.delete(f"/api/v1/api-keys/{own.json()['api_key']['id']}", headers=manager)

    assert [item["name"] for item in listed.json()["items"]] == ["report bot"]
    assert revoking_the_erps.status_code == 404  # as a key that does not exist
    assert (await gateway.client.get("/api/v1/me", headers={"X-API-Key": erp["key"]})).status_code == 200
    assert revoking_their_own.status_code == 204


async def test_a_policy_that_hides_or_masks_fields_of_keys_leaves_them_out_of_its_readers_page(
    make_gateway: Any, auth_headers: Any
) -> None:
    document = default_policy_document()
    document["roles"]["sales_manager"]["grants"]["api_keys"] = {
        "actions": ["read", "create"],
        "scope": "own",
        "fields": {"created_by": "hidden", "created_at": "masked"},
    }
    gateway = await make_gateway(policy=parse_policy(policy_text(document)))
    manager = auth_headers("sales_manager", sub="mgr-1")
    body = {"name": "report bot", "principal_id": "mgr-1", "roles": ["sales_manager"]}
    assert (await gateway.client.post("/api/v1/api-keys", json=body, headers=manager)).status_code == 201

    listed = await gateway.client.get("/api/v1/api-keys", headers=manager)

    assert listed.status_code == 200, listed.text
    [key] = listed.json()["items"]
    assert "created_by" not in key and key["created_at"] is None
    assert key["name"] == "report bot" and key["expires_at"] is None
