"""The leads lists that once answered every row at once page as every list does (SPEC §3): a lead's
tasks and score history, the scoring and assignment rules, the web forms. Through the real gateway
in front of the real leads service: `?limit=` (default 50, at most 500) and `?cursor=`, answered with
`next_cursor` (null on the last page); page after page, every row comes once, in the list's order.
A rule's own routes still find a rule however far down its listing it is."""

from typing import Any

import httpx
import pytest
from crm_platform.ids import new_id
from leads import repository as repo
from sqlalchemy import insert

pytestmark = pytest.mark.integration

LISTS = (
    "/api/v1/leads/{lead_id}/tasks",
    "/api/v1/leads/{lead_id}/score-history",
    "/api/v1/lead-scoring-rules",
    "/api/v1/lead-assignment-rules",
    "/api/v1/webforms",
)


async def created(admin: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await admin.post(path, json=body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def paged(admin: httpx.AsyncClient, path: str, limit: int = 2) -> list[list[dict[str, Any]]]:
    """The pages of a list, followed by their cursors until `next_cursor` is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await admin.get(path, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def ids(pages: list[list[dict[str, Any]]]) -> list[str]:
    return [item["id"] for page in pages for item in page]


async def a_lead(admin: httpx.AsyncClient) -> str:
    lead = await created(admin, "/api/v1/leads", {"name": "Li Lei", "email": "li.lei@example.com", "owner_id": "u-1"})
    return str(lead["id"])


async def log_notes(admin: httpx.AsyncClient, lead_id: str, count: int) -> None:
    """`count` notes, each planning a follow-up task."""
    for day in range(count):
        note = {"kind": "note", "next_follow_up_at": f"2026-03-{10 + day}T09:00:00Z"}
        await created(admin, f"/api/v1/leads/{lead_id}/activities", note)


async def test_a_leads_tasks_page_in_the_order_they_were_created(env: Any, admin: httpx.AsyncClient) -> None:
    lead_id = await a_lead(admin)  # its first-contact task
    await log_notes(admin, lead_id, 4)  # and a follow-up task of each note
    path = f"/api/v1/leads/{lead_id}/tasks"

    pages = await paged(admin, path)

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [task["kind"] for page in pages for task in page] == ["first_contact"] + ["follow_up"] * 4
    assert ids(pages) == sorted(ids(pages)) == ids(await paged(admin, path, limit=500))
    open_tasks = await paged(admin, f"{path}?status=open")  # the status filter pages as well
    assert ids(open_tasks) == [task["id"] for page in pages for task in page if task["status"] == "open"]


async def test_a_leads_score_history_pages_oldest_first(env: Any, admin: httpx.AsyncClient) -> None:
    for count in range(1, 6):  # each note logged moves the score by 10
        rule = {"name": f"{count} notes", "activity_kind": "note", "min_count": count, "points": 10}
        await created(admin, "/api/v1/lead-scoring-rules", rule)
    lead_id = await a_lead(admin)
    await log_notes(admin, lead_id, 5)

    pages = await paged(admin, f"/api/v1/leads/{lead_id}/score-history")

    changes = [(change["previous_score"], change["score"]) for page in pages for change in page]
    assert changes == [(0, 0), (0, 10), (10, 20), (20, 30), (30, 40), (40, 50)]  # graded when created, then scored
    assert [len(page) for page in pages] == [2, 2, 2]  # no empty page after a full last one


async def test_the_scoring_rules_page_in_the_order_they_were_created_each_page_with_the_thresholds(
    env: Any, admin: httpx.AsyncClient
) -> None:
    rule = {"field": "company", "operator": "present"}
    rules = [
        await created(admin, "/api/v1/lead-scoring-rules", {**rule, "name": f"Rule {n}", "points": n})
        for n in range(1, 6)
    ]
    thresholds = (await admin.get("/api/v1/lead-scoring-rules")).json()["thresholds"]

    pages = await paged(admin, "/api/v1/lead-scoring-rules")

    assert ids(pages) == [rule["id"] for rule in rules]
    assert [len(page) for page in pages] == [2, 2, 1]
    first = await admin.get("/api/v1/lead-scoring-rules", params={"limit": 2})
    last = await admin.get("/api/v1/lead-scoring-rules", params={"limit": 2, "cursor": first.json()["next_cursor"]})
    assert first.json()["thresholds"] == last.json()["thresholds"] == thresholds
    assert first.headers["ETag"] == last.headers["ETag"] == f'"{thresholds["version"]}"'


async def test_the_assignment_rules_page_in_the_order_they_are_tried(env: Any, admin: httpx.AsyncClient) -> None:
    positions = [3, 1, 2, 1, 3]  # the page boundaries fall inside a position, and between two
    rules = [
        await created(admin, "/api/v1/lead-assignment-rules", {"name": f"Rule {n}", "position": p, "user_ids": ["u-2"]})
        for n, p in enumerate(positions)
    ]
    tried = [rule["id"] for _, rule in sorted(enumerate(rules), key=lambda item: (item[1]["position"], item[0]))]

    pages = await paged(admin, "/api/v1/lead-assignment-rules")

    assert ids(pages) == tried
    assert [[rule["position"] for rule in page] for page in pages] == [[1, 1], [2, 3], [3]]


async def test_the_web_forms_page_in_the_order_they_were_created(env: Any, admin: httpx.AsyncClient) -> None:
    forms = [await created(admin, "/api/v1/webforms", {"name": f"Form {n}"}) for n in range(4)]

    pages = await paged(admin, "/api/v1/webforms")

    assert ids(pages) == [form["id"] for form in forms]
    assert [len(page) for page in pages] == [2, 2]  # no empty page after a full last one


async def test_a_page_holds_50_rows_unless_a_limit_is_given(env: Any, admin: httpx.AsyncClient) -> None:
    with env.acting("admin", roles=("admin",)):
        forms = [(await env.service.create_webform({"name": f"Form {n}"}, ""))["id"] for n in range(51)]

    first = (await admin.get("/api/v1/webforms")).json()
    rest = (await admin.get("/api/v1/webforms", params={"cursor": first["next_cursor"]})).json()

    assert [form["id"] for form in first["items"]] == forms[:50]
    assert [form["id"] for form in rest["items"]] == forms[50:] and rest["next_cursor"] is None


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize(
    ("limit", "message"),
    [(-1, "greater than or equal to 1"), (0, "greater than or equal to 1"), (501, "less than or equal to 500")],
)
async def test_a_limit_out_of_range_is_a_422_naming_limit(
    env: Any, admin: httpx.AsyncClient, path: str, limit: int, message: str
) -> None:
    lead_id = await a_lead(admin) if "{lead_id}" in path else ""

    response = await admin.get(path.format(lead_id=lead_id), params={"limit": limit})

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "limit" and message in error["message"]


RULE_TABLES = {
    "/api/v1/lead-scoring-rules": (repo.scoring_rules, {"points": 1}),
    "/api/v1/lead-assignment-rules": (
        repo.assignment_rules,
        {"regions": [], "industries": [], "sources": [], "user_ids": ["u-2"], "strategy": "round_robin"},
    ),
}


@pytest.mark.parametrize("route", list(RULE_TABLES))
async def test_a_rule_is_read_and_deleted_wherever_its_listing_has_it(
    env: Any, admin: httpx.AsyncClient, route: str
) -> None:
    """A rule's routes look it up in its listing (for its `ETag`, and as it was for the audit trail):
    past the largest page (500) as on the first."""
    table, values = RULE_TABLES[route]
    rows = [{"id": new_id(), "name": f"Rule {n}", "position": n, **values} for n in range(501)]
    async with env.engine.begin() as conn:
        await conn.execute(insert(table), [{k: v for k, v in row.items() if k in table.c} for row in rows])
    last = rows[-1]["id"]

    read = await admin.get(f"{route}/{last}")
    deleted = await admin.delete(f"{route}/{last}", headers={"If-Match": '"1"'})

    assert read.status_code == 200, read.text
    assert read.json()["name"] == "Rule 500" and read.headers["ETag"] == '"1"'
    assert deleted.status_code == 204, deleted.text
    audit = (await admin.get("/api/v1/audit-events", params={"record_id": last})).json()["items"]
    assert [event["before"]["name"] for event in audit] == ["Rule 500"]  # the rule as it was, deleted
