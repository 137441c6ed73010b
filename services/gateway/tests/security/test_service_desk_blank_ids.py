"""The ids, teams and regions of service-desk request bodies are refused when only whitespace, as
the other routes refuse them (README: blank names and ids are refused): a ticket in a team nobody
is in, or an agent of a region no ticket is dispatched from, is a 422 naming the field. An empty
one still means "not given" (auto-dispatch, no account) where a route says so. The real app runs
without upstreams: a request past the gateway's validation answers 503."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

ID = "00000000-0000-7000-8000-000000000000"


@pytest.mark.parametrize(
    ("method", "path", "body", "fields"),
    [
        ("POST", "/api/v1/tickets", {"subject": "Printer", "team": "   "}, ["team"]),
        ("POST", "/api/v1/tickets", {"subject": "Printer", "region": "\t"}, ["region"]),
        (
            "PATCH",
            f"/api/v1/tickets/{ID}",
            {"account_id": " ", "contact_id": " ", "region": " ", "team": "\u3000"},  # an ideographic space
            ["account_id", "contact_id", "region", "team"],
        ),
        ("POST", f"/api/v1/tickets/{ID}/assign", {"assignee_id": "   "}, ["assignee_id"]),
        ("POST", "/api/v1/agents", {"id": "u-9", "name": "Wu", "region": " ", "team": "  "}, ["region", "team"]),
        ("PATCH", "/api/v1/agents/u-9", {"region": "   "}, ["region"]),
        ("PATCH", "/api/v1/agents/u-9", {"team": "   "}, ["team"]),
    ],
)
async def test_a_service_desk_id_team_or_region_of_only_whitespace_is_422_naming_it(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], fields: list[str]
) -> None:
    response = await client.request(method, path, json=body)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == fields
    assert {error["message"] for error in response.json()["errors"]} == {"must not be blank"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/tickets", {"subject": "Printer", "account_id": "", "team": "", "region": ""}),
        ("POST", f"/api/v1/tickets/{ID}/assign", {"assignee_id": ""}),  # auto-dispatch
        ("POST", f"/api/v1/tickets/{ID}/assign", {}),
        ("POST", "/api/v1/agents", {"id": "u-9", "name": "Wu", "region": "", "team": ""}),
        ("PATCH", f"/api/v1/tickets/{ID}", {"team": ""}),  # clears it, as null does
        ("PATCH", "/api/v1/agents/u-9", {"region": "north", "team": "east"}),
    ],
)
async def test_an_empty_or_real_service_desk_id_reaches_the_service(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> None:
    assert (await client.request(method, path, json=body)).status_code == 503  # the missing upstream
