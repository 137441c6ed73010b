"""A ticket shows its account's tier, and the priority and due times it raises, only to who may read
the account: a service agent may file a ticket for any account (customers call in from anywhere),
but one of another region learns nothing of the account's tier from it — not on the created ticket,
nor reading it back, listing or exporting it — while an agent of the account's region sees them all.
The service desk serves the ticket at its tier whoever filed it. The real gateway over a fake service
desk that times tickets by tier as the service does, and a fake accounts service that lists accounts
in the record scope it is sent."""

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
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
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from gateway.testing import add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration

SECRET = "ticket-account-tier-secret-" + "t" * 30
CREATED = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
# Accounts of the south region: a VIP (tier A) and one of tier C.
ACCOUNTS = {
    account.id: account
    for account in (
        accounts_pb2.Account(id="acc-vip", name="Initech", tier="A", owner_id="u-s", team="south", region="south"),
        accounts_pb2.Account(id="acc-plain", name="Globex", tier="C", owner_id="u-s", team="south", region="south"),
    )
}
# What the ticket works by, which whoever works it sees whatever the account's tier.
SLA_FIELDS = ("effective_priority", "first_response_due_at", "resolution_due_at")
# The default SLA targets (first response, resolution) by priority; tier A is served one priority up.
TARGETS = {"normal": (timedelta(hours=4), timedelta(hours=24)), "high": (timedelta(hours=1), timedelta(hours=8))}


def _scope(context: Any) -> RecordScope:
    return context_from_metadata(context.invocation_metadata()).scope


def _at(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class FakeServiceDesk(ServiceDeskServiceServicer):
    """Files tickets as the service does: of the account's region unless one is given, at the
    account's tier (tier A one priority up, with that priority's due times), and with no agent to
    dispatch to, the filer's own."""

    def __init__(self) -> None:
        self.tickets: dict[str, sd.Ticket] = {}

    async def CreateTicket(self, request: desk_pb.CreateTicketRequest, context: Any) -> Any:
        account = ACCOUNTS[request.ticket.account_id]
        effective = "high" if account.tier == "A" else request.ticket.priority
        first_response, resolution = TARGETS[effective]
        ticket = sd.Ticket(
            id=f"t-{len(self.tickets) + 1}", account_id=account.id, subject=request.ticket.subject,
            priority=request.ticket.priority, status="new", region=request.ticket.region or account.region,
            account_tier=account.tier, effective_priority=effective, created_at=_at(CREATED),
            first_response_due_at=_at(CREATED + first_response), resolution_due_at=_at(CREATED + resolution),
            created_by_id=context_from_metadata(context.invocation_metadata()).principal.user_id,
            escalated=True, escalation_reason="no_agent_available", version=1,
        )  # fmt: skip
        self.tickets[ticket.id] = ticket
        return desk_pb.CreateTicketResponse(ticket=ticket)

    def _in_scope(self, context: Any) -> list[sd.Ticket]:
        scope = _scope(context)
        return [
            ticket
            for ticket in self.tickets.values()
            if scope.allows(owner_id=ticket.assignee_id or ticket.created_by_id, team=ticket.team, region=ticket.region)
        ]

    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        ticket = next((t for t in self._in_scope(context) if t.id == request.ticket_id), None)
        if ticket is None:
            await refuse(context, NotFound("ticket", request.ticket_id))
        return desk_pb.GetTicketResponse(ticket=ticket)

    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> Any:
        return desk_pb.ListTicketsResponse(items=self._in_scope(context))


class FakeAccounts(AccountsServiceServicer):
    def __init__(self) -> None:
        self.listed_for: list[RecordScope] = []  # the scope of each ListAccounts

    async def ListAccounts(self, request: accounts_pb.ListAccountsRequest, context: Any) -> Any:
        scope = _scope(context)
        self.listed_for.append(scope)
        return accounts_pb.ListAccountsResponse(
            items=[
                account
                for account_id in request.ids
                if (account := ACCOUNTS.get(account_id)) is not None
                and scope.allows(owner_id=account.owner_id, team=account.team, region=account.region)
            ]
        )


class Services:
    def __init__(self) -> None:
        self.desk = FakeServiceDesk()
        self.accounts = FakeAccounts()


Caller = Callable[[str, str], Awaitable[httpx.AsyncClient]]


@pytest.fixture
def services() -> Services:
    return Services()


@pytest.fixture
async def caller(tmp_path: Path, migrated_sqlite: Path, services: Services) -> AsyncIterator[Caller]:
    """`await caller(role, region)`: the real gateway under the default policy, for a caller of
    `role` in `region` (each caller its own user)."""
    async with (
        serving(
            lambda server: add_ServiceDeskServiceServicer_to_server(services.desk, server),
            lambda server: add_AccountsServiceServicer_to_server(services.accounts, server),
            add_no_custom_fields,
        ) as target,
        AsyncExitStack() as started,
    ):

        async def make(role: str, region: str) -> httpx.AsyncClient:
            sub = f"{role}-{region}"
            token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team=f"desk-{region}", region=region)
            gateway = started_gateway(
                tmp_path, migrated_sqlite, secret=SECRET, token=token, service_desk=target, accounts=target
            )
            return await started.enter_async_context(gateway)

        yield make


async def file_ticket(http: httpx.AsyncClient, account_id: str, **given: str) -> dict[str, Any]:
    response = await http.post(
        "/api/v1/tickets", json={"account_id": account_id, "subject": "Printer jams", "priority": "normal", **given}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_an_agent_of_another_region_is_not_told_the_tier_of_the_account_they_file_for(
    caller: Caller, services: Services
) -> None:
    """Naming any account in a ticket does not show its tier; the ticket's priority and due times,
    which whoever works it needs, stay."""
    north = await caller("service_agent", "north")

    vip = await file_ticket(north, "acc-vip")
    plain = await file_ticket(north, "acc-plain")

    stored = services.desk.tickets[vip["id"]]
    assert (stored.account_tier, stored.effective_priority) == ("A", "high")  # served one priority up all the same
    for ticket in (vip, plain):
        assert "account_tier" not in ticket, ticket
        assert set(SLA_FIELDS) <= set(ticket), ticket
        assert (ticket["priority"], ticket["region"], ticket["subject"]) == ("normal", "south", "Printer jams")
    assert (vip["effective_priority"], plain["effective_priority"]) == ("high", "normal")
    # Still theirs while no agent takes them: read back, listed, they show no more.
    detail = await north.get(f"/api/v1/tickets/{vip['id']}")
    listed = await north.get("/api/v1/tickets")
    assert detail.status_code == listed.status_code == 200, (detail.text, listed.text)
    assert "account_tier" not in detail.json() and detail.json()["effective_priority"] == "high"
    assert ["account_tier" in t for t in listed.json()["items"]] == [False, False]
    # The accounts service was asked which accounts they may read: those of their region.
    assert {(scope.kind, scope.region) for scope in services.accounts.listed_for} == {(ScopeKind.REGION, "north")}


async def test_an_agent_of_the_accounts_region_sees_its_tier_and_what_it_raises(caller: Caller) -> None:
    south = await caller("service_agent", "south")

    vip = await file_ticket(south, "acc-vip")
    detail = (await south.get(f"/api/v1/tickets/{vip['id']}")).json()

    for ticket in (vip, detail):
        assert (ticket["account_tier"], ticket["priority"], ticket["effective_priority"]) == ("A", "normal", "high")
        assert (ticket["first_response_due_at"], ticket["resolution_due_at"]) == (
            "2026-11-02T10:00:00Z",
            "2026-11-02T17:00:00Z",
        )


async def test_a_ticket_filed_in_a_region_for_another_regions_account_is_read_and_exported_there_without_its_tier(
    caller: Caller, services: Services
) -> None:
    """A north agent files the south VIP's ticket in the north (the customer called the north desk):
    the north manager works it, reading and exporting it by its priority and due times but without
    the account's tier; admins read every account, and see it."""
    north_agent = await caller("service_agent", "north")
    filed = await file_ticket(north_agent, "acc-vip", region="north")
    north_manager = await caller("service_manager", "north")
    admin = await caller("admin", "north")

    managed = await north_manager.get(f"/api/v1/tickets/{filed['id']}")
    exported = await north_manager.get("/api/v1/exports/tickets")
    by_admin = await admin.get(f"/api/v1/tickets/{filed['id']}")

    assert managed.status_code == exported.status_code == by_admin.status_code == 200, exported.text
    assert managed.json()["region"] == "north" and "account_tier" not in managed.json()
    assert managed.json()["effective_priority"] == "high" and managed.json()["resolution_due_at"]
    [row] = csv.DictReader(io.StringIO(exported.text))
    assert row["id"] == filed["id"] and (row["priority"], row["effective_priority"]) == ("normal", "high")
    assert row["account_tier"] == ""
    assert (by_admin.json()["account_tier"], by_admin.json()["effective_priority"]) == ("A", "high")
