"""The 360° view of an account shows its open deals and its contracts exactly as GET
/opportunities/{id} and GET /contracts/{id} show them to the same caller (versions as numbers, an
expected close date or a stage not yet left as null, a decision without a comment with an empty
one), and its receivables as GET /receivables shows them; its open tickets' survey keys only to who
may enter CSAT answers, as the ticket routes. The view's OpenAPI document names the schemas of those
records. The real gateway app over fake accounts, sales and service-desk services."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from gateway.routers import sales_schemas
from gateway.testing import assert_documented, serving, started_gateway
from gateway.token_cli import issue_dev_token
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration

SECRET = "account-360-records-secret-" + "r" * 30
VIEW = "/api/v1/accounts/acc-1/360"
CNY = common_pb2.Money(amount="120000.00", currency="CNY")
# What the sales service holds of acc-1: fields it never set are empty in its messages.
DEAL = sales_pb2.Opportunity(
    id="o-1",
    account_id="acc-1",
    name="Robots",
    pipeline_id="p-1",
    stage="qualify",
    probability="20",
    amount=CNY,
    owner_id="u-1",
    team="east",
    region="north",
    line_items=[sales_pb2.LineItem(product_name="GTX", quantity="1", unit_price=CNY, total=CNY)],
    status="open",
    stage_history=[sales_pb2.StageEntry(stage="qualify", entered_at=Timestamp(seconds=1_780_000_000))],
    version=1,
)
CONTRACT = sales_pb2.Contract(
    id="k-1",
    number="CT-202611-000001",
    account_id="acc-1",
    title="Robots",
    amount=CNY,
    status="approved",
    approval_chain=["sales_manager"],
    decisions=[sales_pb2.ApprovalDecision(role="sales_manager", approver_id="mgr", decision="approved")],
    owner_id="u-1",
    team="east",
    region="north",
    version=2,
)
RECEIVABLES = sales_pb.ListReceivablesResponse(
    items=[
        sales_pb2.Receivable(
            contract_id="k-1", contract_number="CT-202611-000001", account_id="acc-1", status="signed",
            amount=CNY, paid=CNY, outstanding=common_pb2.Money(amount="0.00", currency="CNY"),
        )
    ],
    total_outstanding=[common_pb2.Money(amount="0.00", currency="CNY")],
    account_outstanding=[common_pb2.Money(amount="0.00", currency="CNY")],
    lifetime_paid=[CNY],
)  # fmt: skip


class OneAccount(AccountsServiceServicer):
    async def GetAccount(self, request: pb.GetAccountRequest, context: Any) -> pb.GetAccountResponse:
        account = accounts_pb2.Account(id="acc-1", name="Initech", owner_id="u-1", team="east", region="north")
        return pb.GetAccountResponse(account=account)

    async def ListContacts(self, request: pb.ListContactsRequest, context: Any) -> pb.ListContactsResponse:
        return pb.ListContactsResponse()

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Any) -> pb.ListActivitiesResponse:
        return pb.ListActivitiesResponse()


class OneDealAndContract(SalesServiceServicer):
    async def ListOpportunities(
        self, request: sales_pb.ListOpportunitiesRequest, context: Any
    ) -> sales_pb.ListOpportunitiesResponse:
        return sales_pb.ListOpportunitiesResponse(items=[DEAL])

    async def GetOpportunity(self, request: sales_pb.GetOpportunityRequest, context: Any) -> Any:
        return sales_pb.GetOpportunityResponse(opportunity=DEAL)

    async def ListContracts(self, request: sales_pb.ListContractsRequest, context: Any) -> Any:
        return sales_pb.ListContractsResponse(items=[CONTRACT])

    async def GetContract(self, request: sales_pb.GetContractRequest, context: Any) -> Any:
        return sales_pb.GetContractResponse(contract=CONTRACT)

    async def ListReceivables(self, request: sales_pb.ListReceivablesRequest, context: Any) -> Any:
        return RECEIVABLES


class OneReopenedTicket(ServiceDeskServiceServicer):
    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> desk_pb.ListTicketsResponse:
        ticket = servicedesk_pb2.Ticket(
            id="t-1", account_id="acc-1", subject="Printer", status="reopened", team="east", region="north",
            survey_key="k" * 32,  # resolved once: its customer's survey link
        )  # fmt: skip
        return desk_pb.ListTicketsResponse(items=[ticket])


@pytest.fixture
async def http(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving(lambda server: add_AccountsServiceServicer_to_server(OneAccount(), server)) as accounts,
        serving(lambda server: add_SalesServiceServicer_to_server(OneDealAndContract(), server)) as sales,
        serving(lambda server: add_ServiceDeskServiceServicer_to_server(OneReopenedTicket(), server)) as desk,
        started_gateway(
            tmp_path, migrated_sqlite, secret=SECRET, accounts=accounts, sales=sales, service_desk=desk
        ) as client,
    ):
        yield client


def auth(role: str) -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub="u-1", roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


async def read(http: httpx.AsyncClient, path: str, role: str) -> Any:
    response = await http.get(path, headers=auth(role))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("role", ["admin", "sales_rep", "finance"])
async def test_the_views_deals_and_contracts_are_those_their_own_routes_show(
    http: httpx.AsyncClient, role: str
) -> None:
    view = await read(http, VIEW, role)

    deal = await read(http, "/api/v1/opportunities/o-1", role)
    contract = await read(http, "/api/v1/contracts/k-1", role)
    assert view["open_opportunities"] == {"status": "ok", "items": [deal]}
    receivables = await read(http, "/api/v1/receivables?account_id=acc-1", role)
    assert view["contracts_and_receivables"] == {
        "status": "ok",
        "items": [contract],
        "receivables": receivables["items"],
        "total_outstanding": receivables["account_outstanding"],
        "total_overdue": receivables["account_overdue"],
        "lifetime_value": receivables["lifetime_value"],
    }


async def test_the_views_deals_and_contracts_show_unset_fields_as_null_and_versions_as_numbers(
    http: httpx.AsyncClient,
) -> None:
    view = await read(http, VIEW, "admin")

    [deal] = view["open_opportunities"]["items"]
    assert (deal["version"], deal["expected_close_date"], deal["next_step"], deal["rotting"]) == (1, None, "", False)
    assert (deal["primary_contact_id"], deal["stage_history"][0]["exited_at"]) == (None, None)
    assert_documented(deal, sales_schemas.Opportunity)
    [contract] = view["contracts_and_receivables"]["items"]
    assert (contract["version"], contract["decisions"][0]["comment"]) == (2, "")
    assert_documented(contract, sales_schemas.Contract)


async def test_the_views_schema_names_the_deal_and_contract_schemas(http: httpx.AsyncClient) -> None:
    openapi = (await http.get("/openapi.json")).json()
    schemas = openapi["components"]["schemas"]

    view = schemas["Account360"]["properties"]
    deals = schemas[view["open_opportunities"]["$ref"].rsplit("/", 1)[-1]]["properties"]["items"]
    contracts = schemas[view["contracts_and_receivables"]["$ref"].rsplit("/", 1)[-1]]["properties"]["items"]
    assert deals["anyOf"][0]["items"] == {"$ref": "#/components/schemas/Opportunity"}
    assert contracts["anyOf"][0]["items"] == {"$ref": "#/components/schemas/Contract"}


@pytest.mark.parametrize(("role", "shown"), [("admin", True), ("sales_manager", False)])
async def test_an_open_tickets_survey_key_is_shown_only_to_who_may_enter_csat_answers(
    http: httpx.AsyncClient, role: str, shown: bool
) -> None:
    [ticket] = (await read(http, VIEW, role))["open_tickets"]["items"]
    assert ticket["id"] == "t-1"
    assert ("survey_key" in ticket) is shown
