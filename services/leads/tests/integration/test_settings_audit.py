"""The audit rows of a web form's update and of the grade thresholds hold what changed, before and
after (SPEC §9: every write with its changed fields), as a rule's update does: through the real
gateway in front of the real leads service."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def audited(admin: httpx.AsyncClient, action: str) -> dict[str, Any]:
    (row,) = (await admin.get("/api/v1/audit-events", params={"action": action})).json()["items"]
    return dict(row)


async def test_a_web_form_update_is_audited_with_what_it_changed(env: Any, admin: httpx.AsyncClient) -> None:
    form = (await admin.post("/api/v1/webforms", json={"name": "Expo", "rate_limit_per_minute": 30})).json()

    renamed = await admin.patch(f"/api/v1/webforms/{form['id']}", json={"name": "Expo 2027"})
    turned_off = await admin.patch(f"/api/v1/webforms/{form['id']}", json={"enabled": False})

    assert renamed.status_code == 200 and turned_off.status_code == 200, turned_off.text
    update, disable = await audited(admin, "update_webform"), await audited(admin, "disable_webform")
    assert (update["before"], update["after"]) == ({"name": "Expo", "version": 1}, {"name": "Expo 2027", "version": 2})
    assert (disable["before"], disable["after"]) == ({"enabled": True, "version": 2}, {"enabled": False, "version": 3})
    assert "form_key" not in update["before"] and "form_key" not in disable["after"]


async def test_setting_the_grade_thresholds_is_audited_with_the_ones_before(env: Any, admin: httpx.AsyncClient) -> None:
    first = await admin.put("/api/v1/lead-scoring-rules/thresholds", json={"a": 85, "b": 60, "c": 40})
    second = await admin.put("/api/v1/lead-scoring-rules/thresholds", json={"a": 90, "b": 60, "c": 40})

    assert first.status_code == 200 and second.status_code == 200, second.text
    rows = (await admin.get("/api/v1/audit-events", params={"action": "set_grade_thresholds"})).json()["items"]
    latest = rows[0]  # newest first
    assert (latest["before"], latest["after"]) == ({"a": 85, "version": 2}, {"a": 90, "version": 3})


async def test_a_logged_activity_is_audited_with_the_leads_changes(env: Any, admin: httpx.AsyncClient) -> None:
    lead = (await admin.post("/api/v1/leads", json={"name": "Wang", "email": "wang@x.cn"})).json()

    logged = await admin.post(f"/api/v1/leads/{lead['id']}/activities", json={"kind": "call", "outcome": "reached"})

    assert logged.status_code == 201, logged.text
    row = await audited(admin, "log_activity")
    assert row["before"]["status"] == "new" and row["after"]["status"] == "contacted"
    assert row["before"]["first_contacted_at"] is None and row["after"]["first_contacted_at"]
    assert row["before"]["activity"] is None and row["after"]["activity"]["kind"] == "call"
    assert {"status", "first_contacted_at", "activity", "version"} <= set(row["fields"])
