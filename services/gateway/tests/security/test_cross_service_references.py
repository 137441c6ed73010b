"""A body's references to records other services own are checked before the owner of the written
record stores them: a deal's account, primary contact, source lead and campaign, a direct contract's
account, a ticket's contact. Each must exist (an account not merged away), or the request is a 422
naming every such field, and nothing is written; a deal's primary contact and a ticket's contact
must work at its account. Existence is asked of the owner over all records: a rep may name an
account another rep owns (a second deal on it then meets anti-collision). An owner that is down is
a 503, never a reference let through unchecked. Each 422 tells whether an id exists, so it is
audited as a refusal; a create sent again under its Idempotency-Key is audited as a replay."""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import Conflict, NotFound
from crm_platform.idempotency import NOTHING_TO_REPLAY, REPLAY_ONLY_METADATA, REPLAYED_METADATA
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from gateway.security.audit import AuditEntry, AuditLog
from gateway.testing import add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "references-secret-" + "r" * 30
ME = "u-1"


class FakeAccounts(AccountsServiceServicer):
    """Acme is mine; Globex is a teammate's; Initech was merged into Acme; contact c-acme works at
    Acme, c-globex at Globex."""

    ACCOUNTS = {
        "acme": accounts_pb2.Account(id="acme", name="Acme", owner_id=ME, team="east", region="north"),
        "globex": accounts_pb2.Account(id="globex", name="Globex", owner_id="u-2", team="east", region="north"),
        "initech": accounts_pb2.Account(id="initech", name="Initech", owner_id=ME, merged_into_id="acme"),
    }
    CONTACTS = {
        "c-acme": accounts_pb2.Contact(
            id="c-acme", account_id="acme", name="Ann", owner_id=ME, team="east", region="north"
        ),
        "c-globex": accounts_pb2.Contact(
            id="c-globex", account_id="globex", name="Bo", owner_id=ME, team="east", region="north"
        ),
    }

    def __init__(self) -> None:
        self.scopes: list[RecordScope] = []
        self.listed: list[list[str]] = []  # the ids of each ListAccounts call
        self.accounts = dict(self.ACCOUNTS)

    async def GetAccount(self, request: accounts_pb.GetAccountRequest, context: Any) -> Any:
        self.scopes.append(context_from_metadata(context.invocation_metadata()).scope)
        account = self.accounts.get(request.account_id)
        if account is None:
            await refuse(context, NotFound("account", request.account_id))
        return accounts_pb.GetAccountResponse(account=account)

    async def ListAccounts(self, request: accounts_pb.ListAccountsRequest, context: Any) -> Any:
        self.scopes.append(context_from_metadata(context.invocation_metadata()).scope)
        self.listed.append(list(request.ids))
        found = [self.accounts[i] for i in request.ids if i in self.accounts]
        items = [a for a in found if request.include_merged or not a.merged_into_id][: request.page.limit or 50]
        return accounts_pb.ListAccountsResponse(items=items)

    async def GetContact(self, request: accounts_pb.GetContactRequest, context: Any) -> Any:
        contact = self.CONTACTS.get(request.contact_id)
        if contact is None:
            await refuse(context, NotFound("contact", request.contact_id))
        return accounts_pb.GetContactResponse(contact=contact)


class FakeLeads(LeadsServiceServicer):
    async def GetLead(self, request: leads_pb.GetLeadRequest, context: Any) -> Any:
        if request.lead_id != "l-mine":
            await refuse(context, NotFound("lead", request.lead_id))
        return leads_pb.GetLeadResponse(lead=leads_pb2.Lead(id="l-mine", owner_id=ME))

    async def GetCampaign(self, request: leads_pb.GetCampaignRequest, context: Any) -> Any:
        if request.campaign_id != "expo":
            await refuse(context, NotFound("campaign", request.campaign_id))
        return leads_pb.GetCampaignResponse(campaign=leads_pb2.Campaign(id="expo", name="Expo"))


class FakeSales(SalesServiceServicer):
    DEAL = sales_pb2.Opportunity(id="o-1", account_id="acme", name="Robots", owner_id=ME, team="east", version=1)

    def __init__(self) -> None:
        self.writes: list[Any] = []
        self.replays: list[str] = []  # the keys of the calls that wanted only an earlier result
        self.created: dict[str, sales_pb2.Opportunity] = {}  # by Idempotency-Key, as the service keeps them
        self.imported: dict[str, str] = {}  # deal ids by external id

    async def CreateOpportunity(self, request: sales_pb.CreateOpportunityRequest, context: Any) -> Any:
        if REPLAY_ONLY_METADATA in context.invocation_metadata():
            self.replays.append(request.idempotency_key)
            if request.idempotency_key not in self.created:
                await refuse(context, Conflict("nothing to replay", reason=NOTHING_TO_REPLAY))
        if request.idempotency_key in self.created:
            context.set_trailing_metadata((REPLAYED_METADATA,))  # as the gRPC layer of a service marks it
            return sales_pb.CreateOpportunityResponse(opportunity=self.created[request.idempotency_key])
        self.writes.append(request)
        deal = sales_pb2.Opportunity(
            id=f"o-{len(self.writes) + 1}", account_id=request.account_id, name=request.name, owner_id=ME
        )
        if request.override_collision:  # over a teammate's deal on the account
            deal.colliding_opportunity_id, deal.collision_override_by = "o-theirs", ME
            deal.collision_override_reason = request.override_reason
        if request.idempotency_key:
            self.created[request.idempotency_key] = deal
        return sales_pb.CreateOpportunityResponse(opportunity=deal)

    async def GetOpportunity(self, request: sales_pb.GetOpportunityRequest, context: Any) -> Any:
        return sales_pb.GetOpportunityResponse(opportunity=self.DEAL)

    async def UpdateOpportunity(self, request: sales_pb.UpdateOpportunityRequest, context: Any) -> Any:
        self.writes.append(request)
        deal = sales_pb2.Opportunity()
        deal.CopyFrom(self.DEAL)
        deal.primary_contact_id, deal.version = request.opportunity.primary_contact_id, 2
        return sales_pb.UpdateOpportunityResponse(opportunity=deal, previous=self.DEAL)

    async def ImportOpportunities(self, request: sales_pb.ImportOpportunitiesRequest, context: Any) -> Any:
        """As the service answers: a row imported before is `existing`; else one the gateway refused
        is rejected with its reason; else it is created."""
        results = []
        for i, row in enumerate(request.rows):
            result = sales_pb.ImportRowResult(row=i, external_id=row.external_id)
            if row.external_id in self.imported:
                result.outcome, result.opportunity_id = "existing", self.imported[row.external_id]
            elif row.refusal:
                result.outcome = "rejected"
                result.errors.add(field="account_id", message=row.refusal)
            else:
                self.writes.append(row)
                self.imported[row.external_id] = result.opportunity_id = f"o-{len(self.imported) + 1}"
                result.outcome = "created"
            results.append(result)
        return sales_pb.ImportOpportunitiesResponse(results=results)

    async def CreateContract(self, request: sales_pb.CreateContractRequest, context: Any) -> Any:
        self.writes.append(request)
        contract = sales_pb2.Contract(id="k-1", account_id=request.account_id, title=request.title, owner_id=ME)
        return sales_pb.CreateContractResponse(contract=contract)


class FakeServiceDesk(ServiceDeskServiceServicer):
    def __init__(self) -> None:
        self.writes: list[Any] = []

    async def CreateTicket(self, request: desk_pb.CreateTicketRequest, context: Any) -> Any:
        self.writes.append(request)
        ticket = servicedesk_pb2.Ticket(id="t-1", subject=request.ticket.subject, contact_id=request.ticket.contact_id)
        return desk_pb.CreateTicketResponse(ticket=ticket)

    TICKET = servicedesk_pb2.Ticket(id="t-1", subject="Printer", account_id="acme", contact_id="c-acme", version=1)

    async def GetTicket(self, request: desk_pb.GetTicketRequest, context: Any) -> Any:
        return desk_pb.GetTicketResponse(ticket=self.TICKET)

    async def UpdateTicket(self, request: desk_pb.UpdateTicketRequest, context: Any) -> Any:
        self.writes.append(request)
        return desk_pb.UpdateTicketResponse(ticket=self.TICKET)


class Services:
    def __init__(self) -> None:
        self.accounts, self.leads = FakeAccounts(), FakeLeads()  # type: ignore[abstract]
        self.sales, self.desk = FakeSales(), FakeServiceDesk()  # type: ignore[abstract]

    def adders(self, *, accounts: bool = True) -> list[Callable[[grpc.aio.Server], None]]:
        adders: list[Callable[[grpc.aio.Server], None]] = [
            lambda server: add_LeadsServiceServicer_to_server(self.leads, server),
            lambda server: add_SalesServiceServicer_to_server(self.sales, server),
            lambda server: add_ServiceDeskServiceServicer_to_server(self.desk, server),
            add_no_custom_fields,
        ]
        if accounts:
            adders.append(lambda server: add_AccountsServiceServicer_to_server(self.accounts, server))
        return adders


@pytest.fixture
def services() -> Services:
    return Services()


@pytest.fixture
async def client(services: Services, tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Any]:
    """`await client(role)`: the real gateway for that role, every service served by the fakes."""
    async with AsyncExitStack() as started:
        target = await started.enter_async_context(serving(*services.adders()))

        async def make(role: str) -> httpx.AsyncClient:
            token = issue_dev_token(secret=SECRET, sub=ME, roles=[role], team="east", region="north")
            targets = {name: target for name in ("leads", "accounts", "sales", "service_desk")}
            gateway = started_gateway(tmp_path, migrated_sqlite, secret=SECRET, token=token, **targets)
            return await started.enter_async_context(gateway)

        yield make


async def audit_events(gateway: httpx.AsyncClient, **filters: str) -> list[dict[str, Any]]:
    """The gateway's audit trail as an admin lists it, newest first."""
    admin = issue_dev_token(secret=SECRET, sub="root", roles=["admin"], team="east", region="north")
    response = await gateway.get(
        "/api/v1/audit-events", params=filters | {"limit": "500"}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def fields_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    return sorted(error["field"] for error in response.json()["errors"])


async def test_a_deal_naming_records_that_are_there_is_created(client: Any, services: Services) -> None:
    rep = await client("sales_rep")
    body = {"account_id": "acme", "name": "Robots", "primary_contact_id": "c-acme"}
    response = await rep.post("/api/v1/opportunities", json=body | {"source_lead_id": "l-mine", "campaign_id": "expo"})

    assert response.status_code == 201, response.text
    assert [w.account_id for w in services.sales.writes] == ["acme"]
    # Asked whether it exists, over every record: not whether the rep may see it.
    assert services.accounts.scopes == [RecordScope(ScopeKind.ALL)]


async def test_a_deal_naming_records_that_are_not_there_is_one_422_naming_each_field(
    client: Any, services: Services
) -> None:
    rep = await client("sales_rep")
    body = {"account_id": "nowhere", "name": "Robots", "source_lead_id": "l-other", "campaign_id": "gone"}
    response = await rep.post("/api/v1/opportunities", json=body)

    assert fields_of(response) == ["account_id", "campaign_id", "source_lead_id"]
    assert "account nowhere does not exist" in response.text
    assert services.sales.writes == []


async def test_a_rep_may_name_an_account_another_rep_owns_but_not_one_merged_away(
    client: Any, services: Services
) -> None:
    rep = await client("sales_rep")  # Globex is a teammate's: outside a rep's own scope
    theirs = await rep.post("/api/v1/opportunities", json={"account_id": "globex", "name": "Robots"})
    merged = await rep.post("/api/v1/opportunities", json={"account_id": "initech", "name": "Robots"})

    assert theirs.status_code == 201, theirs.text  # the sales service's anti-collision judges it
    assert fields_of(merged) == ["account_id"] and "initech was merged into acme" in merged.text
    assert [w.account_id for w in services.sales.writes] == ["globex"]


async def test_a_deals_primary_contact_works_at_its_account(client: Any, services: Services) -> None:
    rep = await client("sales_rep")
    created = await rep.post(
        "/api/v1/opportunities", json={"account_id": "acme", "name": "Robots", "primary_contact_id": "c-globex"}
    )
    patched = await rep.patch("/api/v1/opportunities/o-1", json={"primary_contact_id": "c-globex"})
    fixed = await rep.patch("/api/v1/opportunities/o-1", json={"primary_contact_id": "c-acme"})

    assert fields_of(created) == ["primary_contact_id"] and "not on account acme" in created.text
    assert fields_of(patched) == ["primary_contact_id"]
    assert fixed.status_code == 200, fixed.text
    assert [w.opportunity.primary_contact_id for w in services.sales.writes] == ["c-acme"]


async def test_a_direct_contract_names_an_account_that_is_there(client: Any, services: Services) -> None:
    rep = await client("sales_rep")
    money = {"amount": "1000.00", "currency": "CNY"}
    refused = await rep.post("/api/v1/contracts", json={"account_id": "nowhere", "title": "Support", "amount": money})
    created = await rep.post("/api/v1/contracts", json={"account_id": "acme", "title": "Support", "amount": money})

    assert fields_of(refused) == ["account_id"]
    assert created.status_code == 201, created.text
    assert [w.account_id for w in services.sales.writes] == ["acme"]


async def test_a_tickets_contact_is_one_the_caller_can_read_at_the_tickets_account(
    client: Any, services: Services
) -> None:
    agent = await client("service_agent")
    ticket = {"subject": "Printer on fire", "channel": "phone", "account_id": "acme"}
    unknown = await agent.post("/api/v1/tickets", json=ticket | {"contact_id": "c-nobody"})
    elsewhere = await agent.post("/api/v1/tickets", json=ticket | {"contact_id": "c-globex"})
    created = await agent.post("/api/v1/tickets", json=ticket | {"contact_id": "c-acme"})

    assert fields_of(unknown) == ["contact_id"]
    assert fields_of(elsewhere) == ["contact_id"] and "not on account acme" in elsewhere.text
    assert created.status_code == 201, created.text
    assert [w.ticket.contact_id for w in services.desk.writes] == ["c-acme"]


async def test_a_ticket_moved_to_another_account_takes_a_contact_of_that_account(
    client: Any, services: Services
) -> None:
    agent = await client("service_agent")  # t-1 is Acme's, its contact c-acme
    moved_alone = await agent.patch("/api/v1/tickets/t-1", json={"account_id": "globex"})
    moved_with_contact = await agent.patch(
        "/api/v1/tickets/t-1", json={"account_id": "globex", "contact_id": "c-globex"}
    )

    assert fields_of(moved_alone) == ["contact_id"] and "c-acme is not on account globex" in moved_alone.text
    assert moved_with_contact.status_code == 200, moved_with_contact.text
    assert [w.ticket.contact_id for w in services.desk.writes] == ["c-globex"]


IMPORTED_ROW = {"name": "Robots", "stage": "initial_contact", "external_id": "x-1", "account_id": "acme"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/opportunities", {"account_id": "acme", "name": "Robots"}),
        ("/api/v1/opportunities/import", {"rows": [IMPORTED_ROW]}),
    ],
)
async def test_a_reference_is_not_let_through_when_its_owner_is_down(
    services: Services, tmp_path: Path, migrated_sqlite: Path, path: str, body: dict[str, Any]
) -> None:
    token = issue_dev_token(secret=SECRET, sub=ME, roles=["sales_manager"], team="east", region="north")
    async with serving(*services.adders(accounts=False)) as target:
        others = {name: target for name in ("leads", "sales", "service_desk")}
        closed_port = "127.0.0.1:9"  # nothing listens: the accounts service is down
        async with started_gateway(
            tmp_path, migrated_sqlite, secret=SECRET, token=token, accounts=closed_port, **others
        ) as manager:
            response = await manager.post(path, json=body)

    assert response.status_code == 503, response.text
    assert services.sales.writes == []


async def test_a_deal_sent_again_under_its_key_answers_as_first_though_its_account_was_merged_since(
    client: Any, services: Services
) -> None:
    rep = await client("sales_rep")
    body = {"account_id": "acme", "name": "Robots"}
    first = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})
    services.accounts.accounts["acme"] = accounts_pb2.Account(id="acme", owner_id=ME, merged_into_id="globex")

    again = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})
    new_key = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k2"})
    no_key = await rep.post("/api/v1/opportunities", json=body)

    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert fields_of(new_key) == fields_of(no_key) == ["account_id"]
    assert "acme was merged into globex" in new_key.text
    assert services.sales.replays == ["k1", "k2"]  # only a keyed request is sent again
    assert len(services.sales.writes) == 1


async def test_a_refusal_of_named_records_is_audited_for_it_tells_whether_they_exist(
    client: Any, services: Services
) -> None:
    rep = await client("sales_rep")
    created = await rep.post(
        "/api/v1/opportunities", json={"account_id": "nowhere", "name": "Robots", "campaign_id": "gone"}
    )
    patched = await rep.patch("/api/v1/opportunities/o-1", json={"primary_contact_id": "c-globex"})
    fine = await rep.post("/api/v1/opportunities", json={"account_id": "acme", "name": "Robots"})

    assert fields_of(created) == ["account_id", "campaign_id"] and fields_of(patched) == ["primary_contact_id"]
    assert fine.status_code == 201, fine.text
    patch_row, create_row = await audit_events(rep, action="refused")
    assert {key: create_row[key] for key in ("resource", "record_id", "outcome", "fields", "method", "path")} == {
        "resource": "opportunities",
        "record_id": "",
        "outcome": "refused",
        "fields": ["account_id", "campaign_id"],
        "method": "POST",
        "path": "/api/v1/opportunities",
    }
    assert create_row["reason"] == (
        "create: account_id: account nowhere does not exist; campaign_id: campaign gone does not exist"
    )
    assert (create_row["actor"]["user_id"], create_row["status_code"]) == (ME, 422)
    assert create_row["request_id"] == created.headers["x-request-id"]
    assert (patch_row["record_id"], patch_row["fields"], patch_row["method"]) == (
        "o-1",
        ["primary_contact_id"],
        "PATCH",
    )
    assert patch_row["reason"] == "update: primary_contact_id: contact c-globex is not on account acme"


async def test_a_refusal_that_cannot_be_audited_is_still_a_422(
    client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = AuditLog.record

    async def audit_store_down_for_refusals(log: AuditLog, entries: Sequence[AuditEntry]) -> None:
        if any(entry.action == "refused" for entry in entries):
            raise OSError("the audit store is down")
        await record(log, entries)

    monkeypatch.setattr(AuditLog, "record", audit_store_down_for_refusals)
    rep = await client("sales_rep")
    response = await rep.post("/api/v1/opportunities", json={"account_id": "nowhere", "name": "Robots"})

    assert fields_of(response) == ["account_id"]


async def test_a_deal_sent_again_under_its_key_is_audited_as_a_replay_not_as_a_second_create(
    client: Any, services: Services
) -> None:
    rep = await client("sales_rep")
    body = {"account_id": "acme", "name": "Robots"}
    first = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})
    again = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})
    # The account merged since: the check fails now, and the repeat is answered as the first was.
    services.accounts.accounts["acme"] = accounts_pb2.Account(id="acme", owner_id=ME, merged_into_id="globex")
    after_merge = await rep.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})

    assert first.json()["id"] == again.json()["id"] == after_merge.json()["id"]
    rows = await audit_events(rep, record_id=first.json()["id"])
    assert [(row["action"], row["outcome"]) for row in rows] == [
        ("replay", "allowed"),
        ("replay", "allowed"),
        ("create", "allowed"),
    ]
    assert "name" in rows[-1]["fields"] and rows[-1]["after"]["name"] == "Robots"  # the create's field diff
    for replay in rows[:2]:
        assert (replay["fields"], replay["before"], replay["after"]) == ([], None, None)
        assert replay["reason"] == (
            "create: answered with the result of the earlier request under the same Idempotency-Key"
        )
    assert [row["record_id"] for row in await audit_events(rep, action="create")] == [first.json()["id"]]
    assert await audit_events(rep, action="refused") == []

    # The next request of the same client, under another key, creates: audited as a create.
    other = await rep.post(
        "/api/v1/opportunities", json=body | {"account_id": "globex"}, headers={"Idempotency-Key": "k2"}
    )
    assert other.status_code == 201, other.text
    assert [row["action"] for row in await audit_events(rep, record_id=other.json()["id"])] == ["create"]


async def test_a_managers_override_sent_again_under_its_key_is_audited_once(client: Any, services: Services) -> None:
    manager = await client("sales_manager")
    body = {"account_id": "acme", "name": "Robots", "override_collision": True, "override_reason": "key account"}
    first = await manager.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})
    again = await manager.post("/api/v1/opportunities", json=body, headers={"Idempotency-Key": "k1"})

    assert first.status_code == again.status_code == 201, again.text
    rows = await audit_events(manager, record_id=first.json()["id"])
    assert [(row["action"], row["reason"].split(":")[0]) for row in rows] == [
        ("replay", "create"),
        ("override_collision", "over o-theirs"),
        ("create", ""),
    ]


async def test_an_imported_deal_naming_no_account_is_refused_alone_and_audited(client: Any, services: Services) -> None:
    manager = await client("sales_manager")
    deal = {"name": "Robots", "stage": "initial_contact"}
    rows = [
        {**deal, "external_id": "x-1", "account_id": "acme"},
        {**deal, "external_id": "x-2", "account_id": "nowhere"},
        {**deal, "external_id": "x-3", "account_id": "globex"},  # a teammate's: it exists
        {**deal, "external_id": "x-4", "account_id": "initech"},
        {**deal, "external_id": "x-5", "account_id": "acme"},
    ]
    response = await manager.post("/api/v1/opportunities/import", json={"rows": rows})

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["row"], r["external_id"], r["outcome"]) for r in results] == [
        (0, "x-1", "created"), (1, "x-2", "rejected"), (2, "x-3", "created"),
        (3, "x-4", "rejected"), (4, "x-5", "created"),
    ]  # fmt: skip
    assert [r["errors"] for r in results if r["outcome"] == "rejected"] == [
        [{"field": "account_id", "message": "account nowhere does not exist"}],
        [{"field": "account_id", "message": "account initech was merged into acme"}],
    ]
    assert [row.external_id for row in services.sales.writes] == ["x-1", "x-3", "x-5"]
    # One question for the distinct ids, over every record.
    assert services.accounts.listed == [["acme", "globex", "initech", "nowhere"]]
    assert services.accounts.scopes == [RecordScope(ScopeKind.ALL)]
    [refusal] = await audit_events(manager, action="refused")
    assert (refusal["resource"], refusal["fields"]) == ("opportunities", ["rows[1].account_id", "rows[3].account_id"])
    assert refusal["status_code"] == 200 and refusal["reason"].startswith("import: ")


async def test_an_imported_deal_sent_again_after_its_account_was_merged_away_is_existing(
    client: Any, services: Services
) -> None:
    manager = await client("sales_manager")
    rows = [{"name": "Robots", "stage": "initial_contact", "external_id": "x-1", "account_id": "acme"}]
    first = await manager.post("/api/v1/opportunities/import", json={"rows": rows})
    services.accounts.accounts["acme"] = accounts_pb2.Account(id="acme", name="Acme", merged_into_id="globex")
    again = await manager.post("/api/v1/opportunities/import", json={"rows": rows})

    assert [r["outcome"] for r in first.json()["results"]] == ["created"]
    assert [(r["outcome"], r["opportunity_id"]) for r in again.json()["results"]] == [("existing", "o-1")]
    assert await audit_events(manager, action="refused") == []  # nothing was refused in the end


async def test_an_import_asks_for_its_accounts_a_page_of_distinct_ids_at_a_time(
    client: Any, services: Services
) -> None:
    manager = await client("sales_manager")
    rows = [
        {"name": "Robots", "stage": "initial_contact", "external_id": f"x-{i}", "account_id": f"a-{i:03}"}
        for i in range(501)
    ]
    rows.append({**rows[0], "external_id": "x-again"})  # the same account twice: asked for once
    response = await manager.post("/api/v1/opportunities/import", json={"rows": rows})

    assert response.status_code == 200, response.text
    assert [len(ids) for ids in sorted(services.accounts.listed, key=len, reverse=True)] == [500, 1]
    assert response.json()["rejected"] == 502
