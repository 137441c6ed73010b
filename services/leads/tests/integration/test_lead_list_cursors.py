"""A list's cursor pages on only the list it came from, with the filters it was made for (SPEC §3).
Through the real gateway: the same list and filters take the cursor and give the next page; another
filter value, one more filter or another list refuse it with a 422 naming `cursor`, where they
would have given a page starting at a row of the list the cursor came from."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


async def create(admin: httpx.AsyncClient, n: int, source: str) -> str:
    response = await admin.post("/api/v1/leads", json={"name": f"Lead {n}", "email": f"l{n}@x.cn", "source": source})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def refused_on_cursor(response: httpx.Response) -> bool:
    body: dict[str, Any] = response.json()
    return response.status_code == 422 and [e["field"] for e in body["errors"]] == ["cursor"]


async def test_a_cursor_pages_on_the_list_and_filters_it_came_from(env: Any, admin: httpx.AsyncClient) -> None:
    website = [await create(admin, n, "website") for n in range(3)]
    await create(admin, 3, "event")

    first = await admin.get("/api/v1/leads", params={"source": "website", "limit": 2})
    rest = await admin.get(
        "/api/v1/leads", params={"source": "website", "limit": 2, "cursor": first.json()["next_cursor"]}
    )

    assert first.status_code == 200 and rest.status_code == 200, rest.text
    paged = [lead["id"] for lead in first.json()["items"] + rest.json()["items"]]
    assert sorted(paged) == sorted(website) and rest.json()["next_cursor"] is None


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/leads", {"source": "event"}),  # another value of the filter
        ("/api/v1/leads", {"source": "website", "status": "new"}),  # one more filter
        ("/api/v1/leads", {}),  # the filter left out
        ("/api/v1/lead-pool", {}),  # another list
    ],
)
async def test_a_cursor_of_another_list_or_other_filters_is_a_422_on_cursor(
    env: Any, admin: httpx.AsyncClient, path: str, params: dict[str, str]
) -> None:
    for n in range(3):
        await create(admin, n, "website")
    cursor = (await admin.get("/api/v1/leads", params={"source": "website", "limit": 1})).json()["next_cursor"]

    response = await admin.get(path, params={**params, "cursor": cursor})

    assert refused_on_cursor(response), response.text
    assert "another list or other filters" in response.json()["errors"][0]["message"]
