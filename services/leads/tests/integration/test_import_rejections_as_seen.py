"""An import's stored rejections quote the rejected values in their reasons; a caller who reads a
lead's email, phone or custom values masked reads them masked there too."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def test_a_marketer_reads_the_emails_and_phones_a_reps_import_rejected_masked(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    file = "name,email,phone\nBad Email,john.doe@examplecom,\nBad Phone,,+86 1381234567\n"
    imported = await admin.post(
        "/api/v1/leads/import",
        params={"import_key": "pii-probe"},
        content=file.encode(),
        headers={**bearer("rep1", "sales_manager"), "Content-Type": "text/csv"},
    )
    assert imported.status_code == 200, imported.text

    async def reasons(user: str, role: str) -> list[str]:
        response = await admin.get("/api/v1/leads/imports/pii-probe", headers=bearer(user, role))
        assert response.status_code == 200, response.text
        return [row["reason"] for row in response.json()["rejected_rows"]]

    assert await reasons("rep1", "sales_manager") == [
        "email: 'john.doe@examplecom' is not an email address",
        "phone: '+86 1381234567' is not a phone number",
    ]
    masked = await reasons("mkt1", "marketing")
    assert "john.doe" not in str(masked) and "1381234567" not in str(masked)
    assert masked[0].startswith("email: 'j***") and masked[1].startswith("phone: '")
