"""The service-desk lists over REST, against a fake service desk: the knowledge base is paged by
keyset cursors like every list (`cursor` in, `next_cursor` out, a cursor the desk refuses a 422 on
`cursor`), return visits can be listed by each of their statuses, `cancelled` included, and `open`
with statuses lists the open ones of them (none when none is open, never every ticket)."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.grpc_errors import to_status
from gateway.testing import RoleClient, add_no_custom_fields, serving

pytestmark = pytest.mark.integration


class FakeServiceDesk(ServiceDeskServiceServicer):
    """Two pages of articles (cursor "page-2" leads to the second), and one visit of any status."""

    def __init__(self) -> None:
        self.searches: list[desk_pb.SearchKbArticlesRequest] = []
        self.visit_lists: list[desk_pb.ListReturnVisitsRequest] = []
        self.ticket_lists: list[desk_pb.ListTicketsRequest] = []

    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> Any:
        self.ticket_lists.append(request)
        return desk_pb.ListTicketsResponse(items=[servicedesk_pb2.Ticket(id="t-1", status="new")])

    async def SearchKbArticles(self, request: desk_pb.SearchKbArticlesRequest, context: Any) -> Any:
        self.searches.append(request)
        if request.page.cursor not in ("", "page-2"):
            status = to_status(ValidationFailed([FieldError("cursor", "is not a cursor this API issued")]))
            await context.abort(status.code, status.details, status.trailing_metadata)
        if request.page.cursor == "page-2":
            return desk_pb.SearchKbArticlesResponse(items=[servicedesk_pb2.KbArticle(id="kb-3", title="VPN")])
        articles = [servicedesk_pb2.KbArticle(id=f"kb-{n}", title=f"Password {n}") for n in (1, 2)]
        return desk_pb.SearchKbArticlesResponse(items=articles, page_info=common_pb2.PageInfo(next_cursor="page-2"))

    async def ListReturnVisits(self, request: desk_pb.ListReturnVisitsRequest, context: Any) -> Any:
        self.visit_lists.append(request)
        visit = servicedesk_pb2.ReturnVisit(id="rv-1", ticket_id="t-1", account_id="acme", status=request.status)
        return desk_pb.ListReturnVisitsResponse(items=[visit])


@pytest.fixture
def desk() -> FakeServiceDesk:
    return FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only


@pytest.fixture
async def agent(role_client: RoleClient, desk: FakeServiceDesk) -> AsyncIterator[httpx.AsyncClient]:
    """A service agent at the real gateway, whose service-desk calls go to the fake."""
    async with serving(
        lambda server: add_ServiceDeskServiceServicer_to_server(desk, server),
        add_no_custom_fields,
    ) as target:
        yield await role_client("service_agent", upstream=target)


async def test_the_knowledge_base_is_paged_by_the_cursor_each_page_returns(
    agent: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    first = await agent.get("/api/v1/kb-articles", params={"q": "password", "limit": 2})
    second = await agent.get(
        "/api/v1/kb-articles", params={"q": "password", "limit": 2, "cursor": first.json()["next_cursor"]}
    )

    assert first.status_code == 200, first.text
    assert [a["id"] for a in first.json()["items"]] == ["kb-1", "kb-2"] and first.json()["next_cursor"] == "page-2"
    assert [a["id"] for a in second.json()["items"]] == ["kb-3"] and second.json()["next_cursor"] is None
    assert [(s.q, s.page.limit, s.page.cursor) for s in desk.searches] == [
        ("password", 2, ""),
        ("password", 2, "page-2"),
    ]


async def test_a_knowledge_base_cursor_the_desk_refuses_is_a_422_on_cursor(agent: httpx.AsyncClient) -> None:
    response = await agent.get("/api/v1/kb-articles", params={"cursor": "edited"})

    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["cursor"]


@pytest.mark.parametrize("status", ["open", "done", "cancelled"])
async def test_return_visits_are_listed_by_each_of_their_statuses(
    agent: httpx.AsyncClient, desk: FakeServiceDesk, status: str
) -> None:
    response = await agent.get("/api/v1/return-visits", params={"status": status})

    assert response.status_code == 200, response.text
    assert [v["status"] for v in response.json()["items"]] == [status]
    assert [request.status for request in desk.visit_lists] == [status]


async def test_return_visits_of_an_unknown_status_are_a_422_on_status(
    agent: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    response = await agent.get("/api/v1/return-visits", params={"status": "skipped"})

    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["status"]
    assert desk.visit_lists == []


async def test_open_with_statuses_lists_the_open_ones_of_them(agent: httpx.AsyncClient, desk: FakeServiceDesk) -> None:
    response = await agent.get("/api/v1/tickets", params={"open": "true", "status": ["new", "resolved"]})

    assert response.status_code == 200, response.text
    assert [list(r.statuses) for r in desk.ticket_lists] == [["new"]]


async def test_open_with_only_statuses_that_are_not_lists_no_ticket(
    agent: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    response = await agent.get("/api/v1/tickets", params={"open": "true", "status": ["resolved", "closed"]})

    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}
    assert desk.ticket_lists == []  # an empty status list would have been no filter at all
