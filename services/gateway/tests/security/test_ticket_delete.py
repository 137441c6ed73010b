"""DELETE /api/v1/tickets/{id} at the real gateway, against a fake service desk that applies the
record scope it is sent, as the service does: a service manager deletes the tickets of their region
and an admin any ticket; every other role is refused (403) before the service hears of it; a ticket
outside the caller's region is a 404; `If-Match` reaches the service as the expected version (412
when stale); a ticket the service keeps as a service record is a 409 naming why; and a delete is
audited with the ticket as it was (a refused one changed nothing: no delete row)."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import Conflict, StaleVersion
from gateway.testing import RoleClient, refuse, serving, ticket_in_scope

pytestmark = pytest.mark.integration

# Every role's token is of region north (the role_client fixture).
TICKETS = {
    ticket.id: ticket
    for ticket in (
        servicedesk_pb2.Ticket(id="t-spam", subject="Win a prize", status="new", region="north", version=3),
        servicedesk_pb2.Ticket(id="t-south", subject="Duplicate", status="assigned", region="south", version=1),
        servicedesk_pb2.Ticket(id="t-done", subject="Printer", status="resolved", region="north", version=5),
    )
}


class FakeServiceDesk(ServiceDeskServiceServicer):
    """The tickets above, read and deleted as the service would, in the scope of the call."""

    def __init__(self) -> None:
        self.deletes: list[desk_pb.DeleteTicketRequest] = []

    async def DeleteTicket(self, request: desk_pb.DeleteTicketRequest, context: Any) -> Any:
        ticket = await ticket_in_scope(context, TICKETS, request.ticket_id)
        if request.expected_version and request.expected_version != ticket.version:
            await refuse(context, StaleVersion("ticket", ticket.id, ticket.version))
        if ticket.status == "resolved":
            await refuse(context, Conflict(f"ticket {ticket.id} is resolved", reason="TICKET_ON_RECORD"))
        self.deletes.append(request)
        return desk_pb.DeleteTicketResponse(previous=ticket)


@pytest.fixture
def desk() -> FakeServiceDesk:
    return FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only


@pytest.fixture
async def client_of(role_client: RoleClient, desk: FakeServiceDesk) -> AsyncIterator[Any]:
    """`await client_of(role)`: that role at the real gateway, its service-desk calls going to the fake."""
    async with serving(lambda server: add_ServiceDeskServiceServicer_to_server(desk, server)) as target:

        async def make(role: str) -> httpx.AsyncClient:
            return await role_client(role, upstream=target)

        yield make


@pytest.mark.parametrize("role", ["service_manager", "admin"])
async def test_who_may_delete_tickets_deletes_one_of_their_scope_at_its_etag(
    client_of: Any, desk: FakeServiceDesk, role: str
) -> None:
    client = await client_of(role)

    stale = await client.delete("/api/v1/tickets/t-spam", headers={"If-Match": '"2"'})
    deleted = await client.delete("/api/v1/tickets/t-spam", headers={"If-Match": '"3"'})

    assert stale.status_code == 412, stale.text
    assert stale.json()["current_version"] == 3
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert [(r.ticket_id, r.expected_version) for r in desk.deletes] == [("t-spam", 3)]


@pytest.mark.parametrize(
    "role", ["service_agent", "sales_manager", "sales_rep", "marketing", "finance", "analyst", "erp_integration"]
)
async def test_every_other_role_is_refused_before_the_service_hears_of_it(
    client_of: Any, desk: FakeServiceDesk, role: str
) -> None:
    client = await client_of(role)

    refused = await client.delete("/api/v1/tickets/t-spam")

    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert desk.deletes == []


async def test_a_ticket_outside_the_managers_region_is_not_there_for_them(
    client_of: Any, desk: FakeServiceDesk
) -> None:
    manager, admin = await client_of("service_manager"), await client_of("admin")

    elsewhere = await manager.delete("/api/v1/tickets/t-south")
    missing = await manager.delete("/api/v1/tickets/t-none")
    by_admin = await admin.delete("/api/v1/tickets/t-south")

    assert (elsewhere.status_code, missing.status_code) == (404, 404)
    assert elsewhere.json()["detail"] == missing.json()["detail"].replace("t-none", "t-south")
    assert by_admin.status_code == 204, by_admin.text
    assert [r.ticket_id for r in desk.deletes] == ["t-south"]


async def test_a_ticket_kept_as_a_service_record_is_a_409_naming_why(client_of: Any, desk: FakeServiceDesk) -> None:
    manager = await client_of("service_manager")

    refused = await manager.delete("/api/v1/tickets/t-done")

    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert (refused.json()["reason"], refused.json()["detail"]) == ("TICKET_ON_RECORD", "ticket t-done is resolved")
    assert desk.deletes == []


async def test_a_delete_is_audited_with_the_ticket_as_it_was_and_a_refused_one_not_as_a_delete(
    client_of: Any,
) -> None:
    admin = await client_of("admin")

    assert (await admin.delete("/api/v1/tickets/t-done")).status_code == 409
    assert (await admin.delete("/api/v1/tickets/t-spam")).status_code == 204

    audit = await admin.get("/api/v1/audit-events", params={"resource": "tickets"})
    [row] = audit.json()["items"]
    assert (row["action"], row["record_id"], row["outcome"], row["after"]) == ("delete", "t-spam", "allowed", None)
    assert (row["before"]["subject"], row["before"]["status"]) == ("Win a prize", "new")
