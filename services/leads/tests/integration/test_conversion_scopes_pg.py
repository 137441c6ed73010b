"""A lead conversion through the real gateway and leads service, against fakes of accounts and sales
that refuse out-of-scope records as the real ones do: each call the saga makes carries the caller's
record scope on the resource it writes (as the gateway's policy decides it), never their scope on
leads, and what a refused attempt created is undone whatever the caller's scopes."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.leads.v1 import leads_service_pb2_grpc
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm_platform.errors import Conflict, CrmError, FieldError, NotFound, Unavailable, ValidationFailed
from crm_platform.grpc_errors import to_status
from crm_platform.grpc_server import GrpcServer
from crm_platform.idempotency import NOTHING_TO_REPLAY, REPLAY_ONLY_METADATA
from crm_platform.ids import new_id
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from gateway.testing import PolicyEdit, started_gateway
from gateway.token_cli import issue_dev_token
from leads.handlers import ConvertRequest
from leads.servicer import LeadsServicer
from leads.upstream import GrpcConversionPorts

pytestmark = pytest.mark.integration

SECRET = "conversion-scopes-secret-" + "s" * 30
# The caller: a sales rep of team east; u-2 is a colleague of the same team.
CALLER, COLLEAGUE, TEAM, REGION = "u-1", "u-2", "east", "north"
# (owner, team, region) of the accounts that exist before the conversion.
ACCOUNTS = {"acc-mine": (CALLER, TEAM, REGION), "acc-colleague": (COLLEAGUE, TEAM, REGION)}


def scope(kind: ScopeKind) -> RecordScope:
    """The caller's scope of that kind, as the gateway sends it."""
    return RecordScope(kind, owner_id=CALLER, team=TEAM, region=REGION)


def rep_scopes(**kinds: str) -> PolicyEdit:
    """The default policy with the sales rep's scope changed on the resources named."""

    def edit(policy: dict[str, Any]) -> None:
        for resource, kind in kinds.items():
            policy["roles"]["sales_rep"]["grants"][resource]["scope"] = kind

    return edit


@dataclass
class Upstream:
    """Accounts and sales as the saga calls them. Like the real services they answer an account
    outside the call's scope as missing; every call is noted with the scope it came with."""

    accounts: dict[str, tuple[str, str, str]] = field(default_factory=lambda: dict(ACCOUNTS))
    contacts: dict[str, str] = field(default_factory=dict)
    opportunities: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, RecordScope]] = field(default_factory=list)
    sales_down: bool = False

    def note(self, method: str, context: Any) -> RecordScope:
        call_scope = context_from_metadata(context.invocation_metadata()).scope
        self.calls.append((method, call_scope))
        return call_scope

    def sees(self, call_scope: RecordScope, account_id: str) -> bool:
        where = self.accounts.get(account_id)
        return where is not None and call_scope.allows(owner_id=where[0], team=where[1], region=where[2])


async def abort(context: Any, error: CrmError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def refuse_a_replay(context: Any) -> None:
    """These fakes keep no keys: a create asking only for what its key made finds nothing, as the
    services answer a key never used."""
    if REPLAY_ONLY_METADATA in tuple(context.invocation_metadata()):
        await abort(context, Conflict("no earlier request under this key", reason=NOTHING_TO_REPLAY))


class FakeAccounts(AccountsServiceServicer):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def GetAccount(self, request: accounts_pb.GetAccountRequest, context: Any) -> Any:
        if not self.upstream.sees(self.upstream.note("GetAccount", context), request.account_id):
            await abort(context, NotFound("account", request.account_id))
        return accounts_pb.GetAccountResponse(account=accounts_pb2.Account(id=request.account_id))

    async def CreateAccount(self, request: accounts_pb.CreateAccountRequest, context: Any) -> Any:
        self.upstream.note("CreateAccount", context)
        await refuse_a_replay(context)
        account_id = new_id()
        self.upstream.accounts[account_id] = (request.account.owner_id, request.account.team, request.account.region)
        return accounts_pb.CreateAccountResponse(account=accounts_pb2.Account(id=account_id))

    async def DeleteAccount(self, request: accounts_pb.DeleteAccountRequest, context: Any) -> Any:
        if not self.upstream.sees(self.upstream.note("DeleteAccount", context), request.account_id):
            await abort(context, NotFound("account", request.account_id))
        del self.upstream.accounts[request.account_id]
        return accounts_pb.DeleteAccountResponse()

    async def CreateContact(self, request: accounts_pb.CreateContactRequest, context: Any) -> Any:
        account_id = request.contact.account_id
        call_scope = self.upstream.note("CreateContact", context)
        await refuse_a_replay(context)
        if not self.upstream.sees(call_scope, account_id):
            await abort(context, ValidationFailed([FieldError("account_id", f"account {account_id} does not exist")]))
        contact_id = new_id()
        self.upstream.contacts[contact_id] = account_id
        return accounts_pb.CreateContactResponse(contact=accounts_pb2.Contact(id=contact_id, account_id=account_id))

    async def ListContacts(self, request: accounts_pb.ListContactsRequest, context: Any) -> Any:
        self.upstream.note("ListContacts", context)
        items = [accounts_pb2.Contact(id=c, account_id=a) for c, a in self.upstream.contacts.items()]
        return accounts_pb.ListContactsResponse(items=[c for c in items if c.account_id == request.account_id])

    async def ListActivities(self, request: accounts_pb.ListActivitiesRequest, context: Any) -> Any:
        self.upstream.note("ListActivities", context)
        return accounts_pb.ListActivitiesResponse()

    async def DeleteContact(self, request: accounts_pb.DeleteContactRequest, context: Any) -> Any:
        self.upstream.note("DeleteContact", context)
        self.upstream.contacts.pop(request.contact_id, None)
        return accounts_pb.DeleteContactResponse()


class FakeSales(SalesServiceServicer):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def CreateOpportunity(self, request: sales_pb.CreateOpportunityRequest, context: Any) -> Any:
        self.upstream.note("CreateOpportunity", context)
        await refuse_a_replay(context)
        if self.upstream.sales_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sales is down")
        opportunity_id = new_id()
        self.upstream.opportunities[opportunity_id] = request.account_id
        return sales_pb.CreateOpportunityResponse(opportunity=sales_pb2.Opportunity(id=opportunity_id))

    async def ListOpportunities(self, request: sales_pb.ListOpportunitiesRequest, context: Any) -> Any:
        self.upstream.note("ListOpportunities", context)
        deals = [o for o, account in self.upstream.opportunities.items() if account == request.account_id]
        return sales_pb.ListOpportunitiesResponse(items=[sales_pb2.Opportunity(id=o) for o in deals])

    async def DeleteOpportunity(self, request: sales_pb.DeleteOpportunityRequest, context: Any) -> Any:
        self.upstream.note("DeleteOpportunity", context)
        self.upstream.opportunities.pop(request.id, None)
        return sales_pb.DeleteOpportunityResponse()


# `await as_rep(*edits)`: the gateway under the default policy changed by `edits`, with the caller's
# token, in front of the leads service of `env`, whose saga calls the `Upstream` fakes.
RepClient = Callable[..., Awaitable[httpx.AsyncClient]]


@dataclass
class Conversion:
    as_rep: RepClient
    upstream: Upstream


@pytest.fixture
async def conversion(env: Any, tmp_path: Path, gateway_database: Path) -> AsyncIterator[Conversion]:
    upstream = Upstream()
    upstream_server = grpc.aio.server()
    # Each serves the calls of a conversion only.
    add_AccountsServiceServicer_to_server(FakeAccounts(upstream), upstream_server)  # type: ignore[abstract]
    add_SalesServiceServicer_to_server(FakeSales(upstream), upstream_server)  # type: ignore[abstract]
    upstream_port = upstream_server.add_insecure_port("127.0.0.1:0")
    await upstream_server.start()
    target = f"127.0.0.1:{upstream_port}"
    ports = GrpcConversionPorts(target, target, deadline_seconds=10)
    env.service.ports = ports
    leads_server = GrpcServer(
        service="leads",
        service_names=["crm.leads.v1.LeadsService"],
        register=lambda s: leads_service_pb2_grpc.add_LeadsServiceServicer_to_server(LeadsServicer(env.service), s),
    )
    leads_port = await leads_server.start("127.0.0.1", 0)
    async with AsyncExitStack() as started:

        async def as_rep(*edits: PolicyEdit) -> httpx.AsyncClient:
            token = issue_dev_token(secret=SECRET, sub=CALLER, roles=["sales_rep"], team=TEAM, region=REGION)
            gateway = started_gateway(
                tmp_path, gateway_database, secret=SECRET, edits=edits, token=token, leads=f"127.0.0.1:{leads_port}"
            )
            return await started.enter_async_context(gateway)

        yield Conversion(as_rep, upstream)
    await leads_server.stop(1)
    await ports.close()
    await upstream_server.stop(None)


async def lead_of(env: Any, owner: str) -> str:
    with env.acting(owner, team=TEAM):
        lead, _ = await env.service.create_lead(
            {"name": "Zhang", "company": "Zhang Co", "owner_id": owner, "team": TEAM}
        )
    return str(lead["id"])


async def test_a_wider_scope_on_leads_does_not_let_a_conversion_join_an_account_outside_the_accounts_scope(
    env: Any, conversion: Conversion
) -> None:
    # The rep sees the team's leads, but only their own accounts and contacts.
    rep = await conversion.as_rep(rep_scopes(leads="team"))
    lead_id = await lead_of(env, COLLEAGUE)

    response = await rep.post(f"/api/v1/leads/{lead_id}/convert", json={"account_id": "acc-colleague"})

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "account_id"
    assert conversion.upstream.calls == [("GetAccount", scope(ScopeKind.OWN))]
    assert conversion.upstream.contacts == {}
    assert (await rep.get(f"/api/v1/leads/{lead_id}")).json()["status"] == "new"


async def test_each_call_of_a_conversion_carries_the_callers_scope_on_the_resource_it_writes(
    env: Any, conversion: Conversion
) -> None:
    # Narrower on leads than on accounts and contacts: the team's account may be joined.
    rep = await conversion.as_rep(rep_scopes(leads="own", accounts="team", contacts="team"))
    lead_id = await lead_of(env, CALLER)

    response = await rep.post(
        f"/api/v1/leads/{lead_id}/convert",
        json={"account_id": "acc-colleague", "opportunity": {"name": "Robots"}},
    )

    assert response.status_code == 200, response.text
    assert conversion.upstream.calls == [
        ("GetAccount", scope(ScopeKind.TEAM)),
        ("CreateContact", scope(ScopeKind.TEAM)),
        ("CreateOpportunity", scope(ScopeKind.OWN)),
    ]
    assert conversion.upstream.contacts == {response.json()["contact_id"]: "acc-colleague"}


async def test_what_a_refused_conversion_created_for_the_leads_owner_is_undone_whatever_the_callers_scope(
    env: Any, conversion: Conversion
) -> None:
    # The new account is the colleague's, as the lead is: outside the rep's accounts and contacts.
    rep = await conversion.as_rep(rep_scopes(leads="team"))
    lead_id = await lead_of(env, COLLEAGUE)

    response = await rep.post(f"/api/v1/leads/{lead_id}/convert", json={})

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "contact.account_id"
    assert [method for method, _ in conversion.upstream.calls] == ["CreateAccount", "CreateContact", "DeleteAccount"]
    assert conversion.upstream.calls[-1][1].kind is ScopeKind.ALL
    assert conversion.upstream.accounts == ACCOUNTS  # nothing left behind
    assert (await rep.get(f"/api/v1/leads/{lead_id}")).json()["status"] == "new"


async def test_a_conversion_left_by_the_leads_former_owner_is_undone_not_finished_by_the_new_one(
    env: Any, conversion: Conversion
) -> None:
    """The colleague's attempt stopped at the deal (sales down), holding an account and contact made
    for the colleague. The lead then passed to the caller: their conversion undoes that attempt, made
    for another owner than the lead has now (without asking accounts whether they could open it), and
    converts afresh, into records of their own, never into the colleague's."""
    lead_id = await lead_of(env, COLLEAGUE)
    conversion.upstream.sales_down = True
    with env.acting(COLLEAGUE, team=TEAM, scope=ScopeKind.OWN), pytest.raises(Unavailable):
        await env.service.convert(ConvertRequest(lead_id, create_opportunity=True))
    [colleagues] = set(conversion.upstream.accounts) - set(ACCOUNTS)
    with env.acting("admin", roles=("admin",)):
        await env.service.assign(lead_id, CALLER, TEAM, 0)
    conversion.upstream.sales_down = False
    rep = await conversion.as_rep()
    conversion.upstream.calls.clear()

    response = await rep.post(f"/api/v1/leads/{lead_id}/convert", json={"opportunity": {"name": "Robots"}})

    assert response.status_code == 200, response.text
    converted = response.json()
    assert colleagues not in conversion.upstream.accounts  # the former attempt's account is gone
    assert conversion.upstream.accounts[converted["account_id"]][:2] == (CALLER, TEAM)  # owned as the lead now is
    assert conversion.upstream.contacts == {converted["contact_id"]: converted["account_id"]}
    methods = [method for method, _ in conversion.upstream.calls]
    assert methods[0] == "CreateOpportunity"  # what the deal's key made, if sales made it before going down: nothing
    assert sorted(methods[1:4]) == ["ListActivities", "ListContacts", "ListOpportunities"]  # asked side by side
    assert methods[4:] == ["DeleteContact", "DeleteAccount", "CreateAccount", "CreateContact", "CreateOpportunity"]
