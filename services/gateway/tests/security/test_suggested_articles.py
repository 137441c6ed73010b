"""A ticket's suggested articles at the real gateway, against a fake service desk that applies the
caller's record scope as the service does (a ticket out of scope answers as one that does not
exist): the ticket must be found in the caller's scope first, as `GET /tickets/{id}` finds it, and
only then does what the caller may read of the knowledge base decide the articles shown."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from gateway.testing import add_no_custom_fields, serving, started_gateway, ticket_in_scope
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "suggested-articles-" + "s" * 30

TICKETS = {
    ticket.id: ticket
    for ticket in (
        servicedesk_pb2.Ticket(id="t-mine", subject="Printer jams", assignee_id="u-1", team="east", region="north"),
        servicedesk_pb2.Ticket(id="t-other", subject="VPN down", assignee_id="u-9", team="west", region="south"),
    )
}
ARTICLE = servicedesk_pb2.KbArticle(id="kb-1", title="Clear a paper jam", body="Open the tray", published=True)


class FakeServiceDesk(ServiceDeskServiceServicer):
    """The tickets above, each found only in a scope that covers it (its owner is its assignee)."""

    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        return desk_pb.GetTicketResponse(ticket=await ticket_in_scope(context, TICKETS, request.ticket_id))

    async def SuggestKbArticles(self, request: desk_pb.SuggestKbArticlesRequest, context: Any) -> Any:
        await ticket_in_scope(context, TICKETS, request.ticket_id)
        return desk_pb.SuggestKbArticlesResponse(items=[ARTICLE])


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway, whose service-desk calls go to the fake; callers send `auth(role)`."""
    desk = FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only
    async with (
        serving(lambda server: add_ServiceDeskServiceServicer_to_server(desk, server), add_no_custom_fields) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, service_desk=target) as client,
    ):
        yield client


def auth(role: str) -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub="u-1", roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


# A sales rep reads their own tickets and not the knowledge base; a service agent reads both.
@pytest.mark.parametrize("role", ["sales_rep", "service_agent"])
@pytest.mark.parametrize("ticket_id", ["t-missing", "t-other"])
async def test_the_suggestions_for_a_ticket_missing_or_out_of_scope_are_a_404_as_the_ticket_is(
    gateway: httpx.AsyncClient, role: str, ticket_id: str
) -> None:
    ticket = await gateway.get(f"/api/v1/tickets/{ticket_id}", headers=auth(role))
    suggestions = await gateway.get(f"/api/v1/tickets/{ticket_id}/suggested-articles", headers=auth(role))

    assert ticket.status_code == suggestions.status_code == 404, suggestions.text
    assert suggestions.json()["detail"] == ticket.json()["detail"] == f"ticket {ticket_id} not found"


@pytest.mark.parametrize(("role", "articles"), [("sales_rep", []), ("service_agent", ["kb-1"])])
async def test_a_ticket_in_scope_is_suggested_the_articles_the_caller_may_read(
    gateway: httpx.AsyncClient, role: str, articles: list[str]
) -> None:
    response = await gateway.get("/api/v1/tickets/t-mine/suggested-articles", headers=auth(role))

    assert response.status_code == 200, response.text
    assert [article["id"] for article in response.json()["items"]] == articles
