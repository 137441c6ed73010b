"""An import is on the audit trail as one row with its counts, and each lead it merged into has a
`merge` row of its own: "who changed lead X" is answered for imports too."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def test_a_lead_an_import_merged_into_has_the_merge_on_its_own_trail(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    created = await admin.post("/api/v1/leads", json={"name": "East", "email": "east@example.com"})
    assert created.status_code == 201, created.text
    lead_id = created.json()["id"]

    imported = await admin.post(
        "/api/v1/leads/import",
        params={"import_key": "merge-audit", "on_duplicate": "merge"},
        content=b"name,email,title\nDup of East,east@example.com,CTO\nNew One,new@example.com,\n",
        headers={**bearer("mgr1", "sales_manager"), "Content-Type": "text/csv"},
    )
    assert imported.status_code == 200, imported.text

    trail = (await admin.get("/api/v1/audit-events", params={"record_id": lead_id})).json()["items"]
    merges = [row for row in trail if row["action"] == "merge"]
    assert [(row["actor"]["user_id"], row["reason"]) for row in merges] == [("mgr1", "import merge-audit, row 1")]
    (import_row,) = (await admin.get("/api/v1/audit-events", params={"action": "import"})).json()["items"]
    assert import_row["record_id"] == "merge-audit" and "1 accepted, 1 merged" in import_row["reason"]
