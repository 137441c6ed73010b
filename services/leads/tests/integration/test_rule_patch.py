"""Rules are updated with PATCH as every record is (SPEC §3): the given fields change, the others
stay, the new version is the ETag; a bad or unknown field is a 422 naming it and changes nothing;
a stale If-Match is a 412; the audit row holds what changed. Through the real gateway."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

SCORING_RULE = {"name": "Inc", "field": "company", "operator": "contains", "value": "Inc", "points": 5}
ASSIGNMENT_RULE = {"name": "North", "regions": ["north"], "user_ids": ["u-2"]}
RULES = [
    ("/api/v1/lead-scoring-rules", SCORING_RULE, {"points": 30}),
    ("/api/v1/lead-assignment-rules", ASSIGNMENT_RULE, {"capacity": 5}),
]


@pytest.mark.parametrize(("path", "created", "patch"), RULES)
async def test_a_rule_patch_changes_the_given_fields_only(
    env: Any, admin: httpx.AsyncClient, path: str, created: dict[str, Any], patch: dict[str, Any]
) -> None:
    rule = (await admin.post(path, json=created)).json()

    patched = await admin.patch(f"{path}/{rule['id']}", json=patch, headers={"If-Match": f'"{rule["version"]}"'})

    assert patched.status_code == 200, patched.text
    assert patched.json() == {**rule, **patch, "version": rule["version"] + 1}
    assert patched.headers["ETag"] == f'"{rule["version"] + 1}"'
    assert (await admin.get(f"{path}/{rule['id']}")).json() == patched.json()
    (audited,) = (
        await admin.get("/api/v1/audit-events", params={"record_id": rule["id"], "action": patched_action(path)})
    ).json()["items"]
    assert audited["after"] == {**patch, "version": rule["version"] + 1}


def patched_action(path: str) -> str:
    return "update_scoring_rule" if "scoring" in path else "update_assignment_rule"


@pytest.mark.parametrize(("path", "created", "patch"), RULES)
async def test_a_bad_patch_is_refused_and_changes_nothing(
    env: Any, admin: httpx.AsyncClient, path: str, created: dict[str, Any], patch: dict[str, Any]
) -> None:
    rule = (await admin.post(path, json=created)).json()
    (field,) = patch

    out_of_range = await admin.patch(f"{path}/{rule['id']}", json={field: -1000})
    unknown = await admin.patch(f"{path}/{rule['id']}", json={"colour": "red"})
    stale = await admin.patch(f"{path}/{rule['id']}", json=patch, headers={"If-Match": f'"{rule["version"] + 7}"'})
    missing = await admin.patch(f"{path}/no-such-rule", json=patch)

    assert out_of_range.status_code == 422 and [e["field"] for e in out_of_range.json()["errors"]] == [field]
    assert unknown.status_code == 422 and [e["field"] for e in unknown.json()["errors"]] == ["colour"]
    assert stale.status_code == 412, stale.text
    assert missing.status_code == 404
    assert (await admin.get(f"{path}/{rule['id']}")).json() == rule
