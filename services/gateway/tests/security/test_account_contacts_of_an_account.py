"""GET /accounts/{account_id}/contacts lists the contacts of an account the caller may read: the call
runs in their scope for contacts, with their scope for accounts sent along, in which the accounts
service checks the account (SPEC §3: missing or out of scope, a 404), as the account's timeline
does; GET /contacts?account_id= only filters, and sends no scope for accounts.

The real gateway app over a fake accounts service that, as the real one, checks the account only
when a scope for accounts comes along: acc-1 (one contact) and acc-2 (none) are the rep's."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm_platform.errors import NotFound
from crm_platform.grpc_errors import to_status
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata, resource_scope_from_metadata
from gateway.testing import started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "account-contacts-secret-" + "c" * 30
CONTACTS = {"acc-1": [accounts_pb2.Contact(id="con-1", account_id="acc-1", name="Li", owner_id="rep-1", version=1)]}
READABLE = {"acc-1", "acc-2"}


@dataclass
class Received:
    request: pb.ListContactsRequest
    # The call's record scope (the caller's for contacts) and the scope for accounts sent along.
    scope: RecordScope
    accounts_scope: RecordScope | None


@dataclass
class FakeAccounts(AccountsServiceServicer):
    received: list[Received] = field(default_factory=list)

    async def ListContacts(self, request: pb.ListContactsRequest, context: Any) -> pb.ListContactsResponse:
        metadata = context.invocation_metadata()
        accounts_scope = resource_scope_from_metadata(metadata, "accounts")
        self.received.append(Received(request, context_from_metadata(metadata).scope, accounts_scope))
        if accounts_scope is not None and request.account_id not in READABLE:
            status = to_status(NotFound("account", request.account_id))
            await context.abort(status.code, status.details, status.trailing_metadata)
        return pb.ListContactsResponse(items=CONTACTS.get(request.account_id, []))


@dataclass
class Stack:
    accounts: FakeAccounts
    http: httpx.AsyncClient

    @staticmethod
    def headers(role: str, sub: str = "rep-1") -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region="north")
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def stack(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Stack]:
    accounts = FakeAccounts()
    server = grpc.aio.server()
    add_AccountsServiceServicer_to_server(accounts, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with started_gateway(tmp_path, migrated_sqlite, secret=SECRET, accounts=f"127.0.0.1:{port}") as http:
        yield Stack(accounts, http)
    await server.stop(None)


async def test_the_contacts_of_an_account_the_caller_reads_are_listed(stack: Stack) -> None:
    listed = await stack.http.get("/api/v1/accounts/acc-1/contacts", headers=stack.headers("sales_rep"))
    empty = await stack.http.get("/api/v1/accounts/acc-2/contacts", headers=stack.headers("sales_rep"))

    assert listed.status_code == 200, listed.text
    assert [(c["id"], c["name"]) for c in listed.json()["items"]] == [("con-1", "Li")]
    assert (empty.status_code, empty.json()["items"]) == (200, [])
    sent = stack.accounts.received[0]
    assert sent.request.account_id == "acc-1"
    # A rep's contacts are their own, and so must the account be.
    assert (sent.scope.kind, sent.scope.owner_id) == (ScopeKind.OWN, "rep-1")
    assert sent.accounts_scope is not None
    assert (sent.accounts_scope.kind, sent.accounts_scope.owner_id) == (ScopeKind.OWN, "rep-1")


async def test_the_contacts_of_an_account_missing_or_outside_the_callers_scope_are_a_404(stack: Stack) -> None:
    response = await stack.http.get("/api/v1/accounts/acc-9/contacts", headers=stack.headers("sales_rep"))

    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


async def test_the_contact_list_filtered_by_an_account_sends_no_scope_for_accounts(stack: Stack) -> None:
    rep = stack.headers("sales_rep")
    response = await stack.http.get("/api/v1/contacts", params={"account_id": "acc-9"}, headers=rep)

    assert (response.status_code, response.json()["items"]) == (200, [])
    [sent] = stack.accounts.received
    assert (sent.request.account_id, sent.accounts_scope) == ("acc-9", None)
