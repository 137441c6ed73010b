"""Scoring and assignment rules over REST: each rule is readable on its own, and every answer that
holds one carries its version as `ETag`, which `If-Match` sends back (SPEC §3)."""

import httpx
import pytest

pytestmark = pytest.mark.integration

RULES = {
    "/api/v1/lead-scoring-rules": {
        "name": "Big companies",
        "field": "company",
        "operator": "contains",
        "value": "Inc",
        "points": 10,
    },
    "/api/v1/lead-assignment-rules": {"name": "North", "regions": ["north"], "user_ids": ["u-2"]},
}


@pytest.mark.parametrize("route", list(RULES))
async def test_a_rule_is_read_and_replaced_at_its_etag(admin: httpx.AsyncClient, route: str) -> None:
    created = await admin.post(route, json=RULES[route])
    assert created.status_code == 201, created.text
    rule = created.json()
    assert created.headers["ETag"] == f'"{rule["version"]}"'

    read = await admin.get(f"{route}/{rule['id']}")
    assert read.status_code == 200
    assert read.json() == rule
    assert read.headers["ETag"] == created.headers["ETag"]

    renamed = {**RULES[route], "name": "Renamed"}
    replaced = await admin.put(f"{route}/{rule['id']}", json=renamed, headers={"If-Match": read.headers["ETag"]})
    assert replaced.status_code == 200, replaced.text
    assert replaced.headers["ETag"] == f'"{rule["version"] + 1}"'
    stale = await admin.put(f"{route}/{rule['id']}", json=RULES[route], headers={"If-Match": read.headers["ETag"]})
    assert stale.status_code == 412
    assert (await admin.get(f"{route}/{rule['id']}")).json()["name"] == "Renamed"


@pytest.mark.parametrize("route", list(RULES))
async def test_an_unknown_rule_is_not_found(admin: httpx.AsyncClient, route: str) -> None:
    missing = await admin.get(f"{route}/no-such-rule")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    kind = "scoring" if "scoring" in route else "assignment"
    assert missing.json()["detail"] == f"{kind} rule no-such-rule not found"
    patched = await admin.patch(f"{route}/no-such-rule", json={"name": "Renamed"})
    assert (patched.status_code, patched.json()["detail"]) == (404, f"{kind} rule no-such-rule not found")
