"""An import's rejected rows page as every list does (SPEC §3), where `GET /leads/imports/{id}` once
answered all of them at once, tens of thousands for a large file. Through the real gateway in front
of the real leads service: `?limit=` (default 50, at most 500) and `?cursor=` page the rejected rows
by row number, each page beside the import's status and progress, with `next_cursor` (null on the
last page). A cursor pages only the import it came from, and an import outside the caller's is a 404
whatever the cursor."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

REJECTED = [2, 3, 5, 7, 8, 10, 12]  # of rows 1 to 12: a page boundary falls inside runs of them


def csv_of(rows: int, rejected: list[int], tag: str) -> bytes:
    """`rows` leads with a unique email each, but an email that is none in the rows `rejected`."""
    emails = [f"no email {n}" if n in rejected else f"{tag}.{n}@example.com" for n in range(1, rows + 1)]
    return "\n".join(["name,email", *(f"Lead {n},{email}" for n, email in enumerate(emails, start=1))]).encode()


async def imported(admin: httpx.AsyncClient, key: str, data: bytes, headers: dict[str, str] | None = None) -> None:
    response = await admin.post(
        "/api/v1/leads/import",
        params={"import_key": key},
        content=data,
        headers={**(headers or {}), "Content-Type": "text/csv"},
    )
    assert response.status_code == 200, response.text


async def status_pages(admin: httpx.AsyncClient, key: str, limit: int) -> list[dict[str, Any]]:
    """The answers of `GET /leads/imports/{key}`, followed by their cursors until `next_cursor` is null."""
    answers: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await admin.get(f"/api/v1/leads/imports/{key}", params=params)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        cursor = answers[-1]["next_cursor"]
        if cursor is None:
            return answers


def rows_of(answers: list[dict[str, Any]]) -> list[int]:
    return [int(row["row"]) for answer in answers for row in answer["rejected_rows"]]


def refused_on_cursor(response: httpx.Response) -> bool:
    return response.status_code == 422 and [e["field"] for e in response.json()["errors"]] == ["cursor"]


async def test_the_rejected_rows_page_by_row_number_each_page_with_the_same_status(
    env: Any, admin: httpx.AsyncClient
) -> None:
    await imported(admin, "seven", csv_of(12, REJECTED, "seven"))

    answers = await status_pages(admin, "seven", limit=3)

    assert [len(answer["rejected_rows"]) for answer in answers] == [3, 3, 1]
    assert rows_of(answers) == REJECTED  # in row order, each once
    assert all(row["status"] == "rejected" and row["field"] == "email" for row in answers[0]["rejected_rows"])
    statuses = [{k: v for k, v in answer.items() if k not in ("rejected_rows", "next_cursor")} for answer in answers]
    assert statuses == [statuses[0]] * 3
    assert statuses[0]["status"] == "completed"
    assert (statuses[0]["progress"]["accepted"], statuses[0]["progress"]["rejected"]) == ("5", "7")
    assert [answer["next_cursor"] is None for answer in answers] == [False, False, True]


async def test_a_page_holds_50_rejected_rows_unless_a_limit_is_given(env: Any, admin: httpx.AsyncClient) -> None:
    await imported(admin, "many", csv_of(52, list(range(2, 53)), "many"))  # rows 2 to 52 rejected

    first = (await admin.get("/api/v1/leads/imports/many")).json()
    rest = (await admin.get("/api/v1/leads/imports/many", params={"cursor": first["next_cursor"]})).json()
    too_many = await admin.get("/api/v1/leads/imports/many", params={"limit": 501})

    assert rows_of([first]) == list(range(2, 52)) and first["next_cursor"] is not None
    assert rows_of([rest]) == [52] and rest["next_cursor"] is None
    assert too_many.status_code == 422 and [e["field"] for e in too_many.json()["errors"]] == ["limit"]


async def test_a_cursor_of_another_import_is_a_422_on_cursor(env: Any, admin: httpx.AsyncClient) -> None:
    await imported(admin, "first", csv_of(4, [1, 2, 3], "first"))
    await imported(admin, "second", csv_of(4, [1, 2, 3], "second"))
    cursor = (await admin.get("/api/v1/leads/imports/first", params={"limit": 1})).json()["next_cursor"]

    own = await admin.get("/api/v1/leads/imports/first", params={"limit": 1, "cursor": cursor})
    other = await admin.get("/api/v1/leads/imports/second", params={"limit": 1, "cursor": cursor})

    assert own.status_code == 200 and rows_of([own.json()]) == [2]
    assert refused_on_cursor(other), other.text


async def test_an_import_outside_the_callers_is_a_404_also_with_a_cursor(
    env: Any, admin: httpx.AsyncClient, bearer: Any
) -> None:
    owner, other = bearer("rep1", "sales_rep"), bearer("rep2", "sales_rep")
    await imported(admin, "reps", csv_of(6, [1, 2, 3, 4], "reps"), headers=owner)
    path = "/api/v1/leads/imports/reps"
    cursor = (await admin.get(path, params={"limit": 2}, headers=owner)).json()["next_cursor"]
    edited = f"{cursor.partition('.')[0]}.e30="  # bound to this import, but no cursor a page issued

    assert rows_of([(await admin.get(path, params={"limit": 2, "cursor": cursor}, headers=owner)).json()]) == [3, 4]
    assert refused_on_cursor(await admin.get(path, params={"cursor": edited}, headers=owner))
    for params in ({}, {"limit": 2, "cursor": cursor}, {"cursor": edited}):
        response = await admin.get(path, params=params, headers=other)
        assert response.status_code == 404, (params, response.text)
