"""The ids, owners, teams and regions of the accounts routes' bodies: only whitespace is a 422 naming
the field ("must not be blank"), never an account, contact or task owned by "   " or in a team
nobody sees; "" means the field was not given, as on the leads routes (`gateway.inputs.OptionalId`).

The real app runs without upstreams: a body that gets past the gateway's validation answers 503
(no service configured), one that does not answers 422."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

ID = "00000000-0000-0000-0000-000000000001"


BLANK = [
    ("POST", "/api/v1/accounts", {"name": "Acme", "owner_id": "   "}, ["owner_id"]),
    ("POST", "/api/v1/accounts", {"name": "Acme", "region": "\t", "team": " "}, ["region", "team"]),
    ("POST", "/api/v1/accounts", {"name": "Acme", "parent_id": "\u3000"}, ["parent_id"]),  # an ideographic space
    ("PATCH", f"/api/v1/accounts/{ID}", {"team": "  ", "region": " "}, ["region", "team"]),
    ("POST", "/api/v1/contacts", {"name": "Li", "account_id": "   "}, ["account_id"]),
    ("POST", f"/api/v1/accounts/{ID}/contacts", {"name": "Li", "account_id": " "}, ["account_id"]),
    ("PATCH", f"/api/v1/contacts/{ID}", {"account_id": "  "}, ["account_id"]),
    ("POST", "/api/v1/tasks", {"title": "Call", "owner_id": "   "}, ["owner_id"]),
    ("POST", "/api/v1/tasks", {"title": "Call", "account_id": " ", "contact_id": "\t"}, ["account_id", "contact_id"]),
    ("PATCH", f"/api/v1/tasks/{ID}", {"owner_id": "   "}, ["owner_id"]),
    ("POST", f"/api/v1/accounts/{ID}/activities", {"kind": "call", "contact_id": "  "}, ["contact_id"]),
    ("POST", f"/api/v1/accounts/{ID}/transfer", {"new_owner_id": "u-2", "new_team": "  "}, ["new_team"]),
    ("POST", "/api/v1/accounts:transfer", {"from_owner_id": "u-1", "to_owner_id": "u-2", "to_team": " "}, ["to_team"]),
]


@pytest.mark.parametrize(("method", "path", "body", "fields"), BLANK)
async def test_an_id_owner_team_or_region_of_only_whitespace_is_422_naming_it(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], fields: list[str]
) -> None:
    response = await client.request(method, path, json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == fields
    assert {error["message"] for error in response.json()["errors"]} == {"must not be blank"}


NOT_GIVEN = [
    ("POST", "/api/v1/accounts", {"name": "Acme", "owner_id": "", "team": "", "region": "", "parent_id": ""}),
    ("PATCH", f"/api/v1/accounts/{ID}", {"parent_id": ""}),  # clears the parent
    ("POST", "/api/v1/contacts", {"name": "Li", "account_id": ""}),
    ("POST", f"/api/v1/accounts/{ID}/contacts", {"name": "Li", "account_id": ""}),
    ("POST", "/api/v1/tasks", {"title": "Call", "owner_id": "", "account_id": "", "contact_id": ""}),
    ("PATCH", f"/api/v1/tasks/{ID}", {"account_id": "", "contact_id": ""}),  # clears them
    ("POST", f"/api/v1/accounts/{ID}/activities", {"kind": "call", "contact_id": ""}),
    ("POST", f"/api/v1/accounts/{ID}/transfer", {"new_owner_id": "u-2", "new_team": ""}),
    ("POST", "/api/v1/accounts:transfer", {"from_owner_id": "u-1", "to_owner_id": "u-2", "to_team": ""}),
]


@pytest.mark.parametrize(("method", "path", "body"), NOT_GIVEN)
async def test_an_empty_id_owner_team_or_region_is_taken_as_not_given(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> None:
    assert (await client.request(method, path, json=body)).status_code == 503


async def test_an_id_longer_than_its_column_is_still_422_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/tasks", json={"title": "Call", "owner_id": "u" * 101})

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["owner_id"]
