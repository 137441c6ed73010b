"""A ticket's survey key is shown by the record scope of the caller's grant to enter CSAT answers, not
by that grant alone: under a policy where agents read every ticket of their region but answer the
surveys of their own (or their team's) tickets only, the key is on the tickets that grant covers and
on no other, in the ticket list, on the ticket and in its account's 360° view alike; under the
default policy callers see the keys they saw before. The real gateway over fake services that keep
to the record scope they are sent, as the real ones do."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2 as sd
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import NotFound
from crm_platform.principal import context_from_metadata
from gateway.testing import PolicyEdit, add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "survey-key-scope-secret-" + "k" * 30


def _ticket(ticket_id: str, **owner: str) -> sd.Ticket:
    """A reopened ticket of acc-1 in the caller's region (north), with the survey key its first
    resolution drew."""
    return sd.Ticket(
        id=ticket_id, account_id="acc-1", subject="Printer jams", status="reopened", region="north",
        survey_key=f"key-of-{ticket_id}-".ljust(32, "x"), **owner,
    )  # fmt: skip


# The caller is u-1 of team east.
TICKETS = {
    ticket.id: ticket
    for ticket in (
        _ticket("t-mine", assignee_id="u-1", team="east"),
        _ticket("t-team", assignee_id="u-2", team="east"),
        _ticket("t-other", assignee_id="u-9", team="west"),
        # Never assigned, worked and resolved by who filed it: theirs, as the service desk stores it.
        _ticket("t-filed", created_by_id="u-1"),
    )
}
ACCOUNT = accounts_pb2.Account(id="acc-1", name="Initech", owner_id="u-7", team="east", region="north")


def _in_scope(context: Any, ticket: sd.Ticket) -> bool:
    """As the service desk judges a ticket: its owner is its assignee, its creator while it has none."""
    scope = context_from_metadata(context.invocation_metadata()).scope
    return scope.allows(owner_id=ticket.assignee_id or ticket.created_by_id, team=ticket.team, region=ticket.region)


class FakeServiceDesk(ServiceDeskServiceServicer):
    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> Any:
        return desk_pb.ListTicketsResponse(items=[t for t in TICKETS.values() if _in_scope(context, t)])

    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        ticket = TICKETS.get(request.ticket_id)
        if ticket is None or not _in_scope(context, ticket):
            await refuse(context, NotFound("ticket", request.ticket_id))
        return desk_pb.GetTicketResponse(ticket=ticket)


class FakeAccounts(AccountsServiceServicer):
    async def GetAccount(self, request: accounts_pb.GetAccountRequest, context: Any) -> Any:
        return accounts_pb.GetAccountResponse(account=ACCOUNT)

    async def ListAccounts(self, request: accounts_pb.ListAccountsRequest, context: Any) -> Any:
        return accounts_pb.ListAccountsResponse(items=[ACCOUNT])

    async def ListContacts(self, request: accounts_pb.ListContactsRequest, context: Any) -> Any:
        return accounts_pb.ListContactsResponse()

    async def ListActivities(self, request: accounts_pb.ListActivitiesRequest, context: Any) -> Any:
        return accounts_pb.ListActivitiesResponse()


def answering_within(scope: str) -> PolicyEdit:
    """Service agents read every ticket of their region, and enter CSAT answers within `scope` only."""

    def edit(policy: dict[str, Any]) -> None:
        grants = policy["roles"]["service_agent"]["grants"]
        grants["tickets"]["scope"] = "region"
        grants["csat"]["scope"] = scope

    return edit


Caller = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def caller(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Caller]:
    """`await caller(role, *edits)`: the real gateway under the default policy changed by `edits`,
    for u-1 of team east in region north with `role`."""
    async with (
        serving(
            lambda server: add_ServiceDeskServiceServicer_to_server(FakeServiceDesk(), server),
            lambda server: add_AccountsServiceServicer_to_server(FakeAccounts(), server),
            add_no_custom_fields,
        ) as target,
        AsyncExitStack() as started,
    ):

        async def make(role: str, *edits: PolicyEdit) -> httpx.AsyncClient:
            token = issue_dev_token(secret=SECRET, sub="u-1", roles=[role], team="east", region="north")
            gateway = started_gateway(
                tmp_path, migrated_sqlite, secret=SECRET, edits=edits, token=token, service_desk=target, accounts=target
            )
            return await started.enter_async_context(gateway)

        yield make


async def keys_shown(http: httpx.AsyncClient) -> dict[str, dict[str, bool]]:
    """Per place a ticket is shown: whether each ticket listed there carries its survey key."""
    listed = await http.get("/api/v1/tickets")
    view = await http.get("/api/v1/accounts/acc-1/360")
    assert listed.status_code == view.status_code == 200, (listed.text, view.text)
    places = {"list": listed.json()["items"], "360": view.json()["open_tickets"]["items"]}
    details = [await http.get(f"/api/v1/tickets/{ticket['id']}") for ticket in places["list"]]
    places["detail"] = [detail.json() for detail in details]
    for tickets in places.values():
        for ticket in tickets:
            assert ticket.get("survey_key") in (None, TICKETS[ticket["id"]].survey_key)
    return {place: {ticket["id"]: "survey_key" in ticket for ticket in tickets} for place, tickets in places.items()}


@pytest.mark.parametrize(
    ("scope", "keyed"),
    [
        ("own", {"t-mine", "t-filed"}),  # assigned to the caller, or filed by them and never assigned
        ("team", {"t-mine", "t-team"}),
    ],
)
async def test_the_key_is_on_the_tickets_the_csat_grants_scope_covers_and_on_no_other(
    caller: Caller, scope: str, keyed: set[str]
) -> None:
    agent = await caller("service_agent", answering_within(scope))

    shown = await keys_shown(agent)

    every_ticket = {ticket_id: ticket_id in keyed for ticket_id in TICKETS}
    assert shown == {"list": every_ticket, "360": every_ticket, "detail": every_ticket}


@pytest.mark.parametrize(
    ("role", "keyed"),
    [
        ("service_manager", set(TICKETS)),  # reads and answers for the whole region
        ("service_agent", {"t-mine", "t-filed"}),  # reads and answers for their own tickets
        ("analyst", set()),  # reads every ticket, answers for none
    ],
)
async def test_under_the_default_policy_the_key_is_shown_as_before(caller: Caller, role: str, keyed: set[str]) -> None:
    http = await caller(role)

    listed = (await http.get("/api/v1/tickets")).json()["items"]

    assert {ticket["id"] for ticket in listed if "survey_key" in ticket} == keyed
