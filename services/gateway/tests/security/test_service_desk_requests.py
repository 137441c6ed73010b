"""Service-desk reads and edits at the real gateway, against a fake service desk that answers as
the service does: a knowledge-base draft is its editors' (to anyone else it reads as an article
that does not exist, as the listing leaves drafts out for them), and a PATCH takes null as the other
PATCH routes do (it clears the field, and the service names a field that must keep a value) while a
body that changes nothing is a 422 saying so, before the service hears of it."""

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
from crm_platform.errors import FieldError, NotFound, ValidationFailed
from crm_platform.update_mask import writable_paths
from gateway.testing import add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "service-desk-requests-" + "s" * 30

ARTICLES = {
    article.id: article
    for article in (
        servicedesk_pb2.KbArticle(id="kb-1", title="Reset a password", body="Open settings", published=True),
        servicedesk_pb2.KbArticle(id="kb-draft", title="VPN outage", body="Not ready yet", published=False),
    )
}
TICKET = servicedesk_pb2.Ticket(id="t-1", subject="Printer", description="Jams", channel="web", priority="normal")
AGENT = servicedesk_pb2.Agent(id="u-2", name="Wu", capacity=5, available=True)


class FakeServiceDesk(ServiceDeskServiceServicer):
    """The articles, ticket and agent above; an update is checked as the service checks it (its
    mask must name a writable field, and a required one may not be emptied)."""

    def __init__(self) -> None:
        self.updates: list[Any] = []

    async def GetKbArticle(self, request: desk_pb.GetKbArticleRequest, context: Any) -> Any:
        if request.article_id not in ARTICLES:
            await refuse(context, NotFound("kb_article", request.article_id))
        return desk_pb.GetKbArticleResponse(article=ARTICLES[request.article_id])

    async def UpdateTicket(self, request: desk_pb.UpdateTicketRequest, context: Any) -> Any:
        ticket = await self._updated(context, request, request.ticket, TICKET, required="subject")
        return desk_pb.UpdateTicketResponse(ticket=ticket, previous=TICKET)

    async def UpdateAgent(self, request: desk_pb.UpdateAgentRequest, context: Any) -> Any:
        agent = await self._updated(context, request, request.agent, AGENT, required="name")
        return desk_pb.UpdateAgentResponse(agent=agent, previous=AGENT)

    async def UpdateKbArticle(self, request: desk_pb.UpdateKbArticleRequest, context: Any) -> Any:
        article = await self._updated(context, request, request.article, ARTICLES["kb-1"], required="title")
        return desk_pb.UpdateKbArticleResponse(article=article, previous=ARTICLES["kb-1"])

    async def _updated(self, context: Any, request: Any, given: Any, stored: Any, *, required: str) -> Any:
        """`stored` with the fields the request's mask names set from `given`."""
        self.updates.append(request)
        writable = [field.name for field in given.DESCRIPTOR.fields]
        try:
            paths = writable_paths(request.update_mask.paths, writable, keyed=True)
            if required in paths and not getattr(given, required).strip():
                raise ValidationFailed([FieldError(required, "is required")])
        except ValidationFailed as error:
            await refuse(context, error)
        updated = type(stored)()
        updated.CopyFrom(stored)
        request.update_mask.MergeMessage(given, updated)
        return updated


@pytest.fixture
def desk() -> FakeServiceDesk:
    return FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path, desk: FakeServiceDesk) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway, whose service-desk calls go to the fake; callers send `auth(role)`."""
    async with (
        serving(
            lambda server: add_ServiceDeskServiceServicer_to_server(desk, server),
            add_no_custom_fields,
        ) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, service_desk=target) as client,
    ):
        yield client


def auth(role: str, sub: str = "u-1") -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


# --- knowledge-base drafts -----------------------------------------------------------------------


async def test_a_draft_reads_as_a_missing_article_to_who_may_not_edit_articles(gateway: httpx.AsyncClient) -> None:
    agent = auth("service_agent")  # reads and writes articles, may not update them

    draft = await gateway.get("/api/v1/kb-articles/kb-draft", headers=agent)
    missing = await gateway.get("/api/v1/kb-articles/kb-gone", headers=agent)
    published = await gateway.get("/api/v1/kb-articles/kb-1", headers=agent)

    assert draft.status_code == missing.status_code == 404, draft.text
    assert "Not ready yet" not in draft.text
    assert {**draft.json(), "detail": "", "instance": ""} == {**missing.json(), "detail": "", "instance": ""}
    assert draft.json()["detail"] == missing.json()["detail"].replace("kb-gone", "kb-draft")
    assert published.status_code == 200 and published.json()["body"] == "Open settings"


async def test_who_may_edit_articles_reads_a_draft(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/api/v1/kb-articles/kb-draft", headers=auth("service_manager"))

    assert response.status_code == 200, response.text
    assert (response.json()["body"], response.json()["published"]) == ("Not ready yet", False)


async def test_a_hidden_draft_is_audited_as_a_missing_article_is(gateway: httpx.AsyncClient) -> None:
    agent = auth("service_agent", sub="u-agent")
    await gateway.get("/api/v1/kb-articles/kb-draft", headers=agent)
    await gateway.get("/api/v1/kb-articles/kb-gone", headers=agent)

    trail = await gateway.get(
        "/api/v1/audit-events", params={"actor": "u-agent", "resource": "kb_articles"}, headers=auth("admin")
    )

    assert trail.status_code == 200, trail.text
    rows = [(e["record_id"], e["outcome"], e["status_code"], e["reason"]) for e in trail.json()["items"]]
    assert sorted(rows) == [
        ("kb-draft", "denied", 404, "read: kb_article kb-draft not found"),
        ("kb-gone", "denied", 404, "read: kb_article kb-gone not found"),
    ]


# --- PATCH bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [("/tickets/t-1", {}), ("/agents/u-2", {}), ("/kb-articles/kb-1", {}), ("/tickets/t-1", {"custom": {}})],
)
async def test_a_patch_that_changes_nothing_is_a_422_saying_so(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk, path: str, body: dict[str, Any]
) -> None:
    response = await gateway.patch(f"/api/v1{path}", json=body, headers=auth("service_manager"))

    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": "body", "message": "names no field to change"}]
    assert desk.updates == []


@pytest.mark.parametrize(
    ("path", "field"),
    [("/tickets/t-1", "subject"), ("/agents/u-2", "name"), ("/kb-articles/kb-1", "title")],
)
async def test_a_null_for_a_field_that_must_keep_a_value_is_a_422_naming_it(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk, path: str, field: str
) -> None:
    response = await gateway.patch(f"/api/v1{path}", json={field: None}, headers=auth("service_manager"))

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    [update] = desk.updates  # the null reached the service as the field emptied, as other PATCH routes send it
    assert list(update.update_mask.paths) == [field]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        # An agent's capacity or availability, an article's publication: their empty value (0,
        # false) would be a setting, not the absence of one.
        ("/agents/u-2", "capacity"),
        ("/agents/u-2", "available"),
        ("/kb-articles/kb-1", "published"),
        # Custom values are removed one by one (`custom.<key>: null`), never all at once.
        ("/tickets/t-1", "custom"),
    ],
)
async def test_a_null_for_a_field_without_an_empty_value_is_a_422_naming_it(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk, path: str, field: str
) -> None:
    response = await gateway.patch(f"/api/v1{path}", json={field: None}, headers=auth("service_manager"))

    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": field, "message": "must not be null"}]
    assert desk.updates == []


async def test_a_null_clears_a_field_that_may_be_empty(gateway: httpx.AsyncClient, desk: FakeServiceDesk) -> None:
    response = await gateway.patch("/api/v1/tickets/t-1", json={"description": None}, headers=auth("service_manager"))

    assert response.status_code == 200, response.text
    assert response.json()["description"] == ""
    [update] = desk.updates
    assert (list(update.update_mask.paths), update.ticket.description) == (["description"], "")


async def test_an_agent_may_not_move_their_ticket_to_another_region(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    """An agent files a ticket in a customer's region (the policy's `create` rule) but may not move
    it out of the region whose manager dispatches and reads it; the manager may."""
    refused = await gateway.patch("/api/v1/tickets/t-1", json={"region": "south"}, headers=auth("service_agent"))
    edited = await gateway.patch("/api/v1/tickets/t-1", json={"subject": "Paper"}, headers=auth("service_agent"))
    moved = await gateway.patch("/api/v1/tickets/t-1", json={"region": "south"}, headers=auth("service_manager"))

    assert refused.status_code == 403, refused.text
    assert refused.json()["errors"] == [{"field": "region", "message": "you may not set field 'region' of tickets"}]
    assert edited.status_code == moved.status_code == 200, (edited.text, moved.text)
    assert [list(update.update_mask.paths) for update in desk.updates] == [["subject"], ["region"]]
