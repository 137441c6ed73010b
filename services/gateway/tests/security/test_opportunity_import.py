"""POST /opportunities/import answers per row (SPEC: nothing of a file is refused for one row): a
row that does not fit its schema is rejected alone by the gateway, with the fields at fault; the
others go to the sales service, whose per-row results come back under the file's row numbers."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from gateway.testing import serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "opportunity-import-secret-" + "s" * 30


class CreatesEveryRow(SalesServiceServicer):
    """Creates each row it is sent and remembers which it was sent."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def ImportOpportunities(self, request: sales_pb.ImportOpportunitiesRequest, context: Any) -> Any:
        self.received = [row.external_id for row in request.rows]
        results = [
            sales_pb.ImportRowResult(
                row=index, external_id=row.external_id, outcome="created", opportunity_id=f"o-{index}"
            )
            for index, row in enumerate(request.rows)
        ]
        return sales_pb.ImportOpportunitiesResponse(results=results, created=len(results))


class EveryAccountExists(AccountsServiceServicer):
    """The rows' accounts exist (checking them is `test_cross_service_references`' subject)."""

    async def ListAccounts(self, request: accounts_pb.ListAccountsRequest, context: Any) -> Any:
        return accounts_pb.ListAccountsResponse(items=[accounts_pb2.Account(id=i) for i in request.ids])


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[tuple[CreatesEveryRow, httpx.AsyncClient]]:
    """An admin's client of the real gateway, whose sales and accounts services are the fakes."""
    sales = CreatesEveryRow()  # type: ignore[abstract]  # serves one call
    accounts = EveryAccountExists()  # type: ignore[abstract]
    async with serving(
        lambda server: add_SalesServiceServicer_to_server(sales, server),
        lambda server: add_AccountsServiceServicer_to_server(accounts, server),
    ) as target:
        token = issue_dev_token(secret=SECRET, sub="u-1", roles=["admin"], team="east", region="north")
        async with started_gateway(
            tmp_path, migrated_sqlite, secret=SECRET, token=token, sales=target, accounts=target
        ) as http:
            yield sales, http


async def test_a_row_that_does_not_fit_is_rejected_alone_and_the_others_are_imported(
    gateway: tuple[CreatesEveryRow, httpx.AsyncClient],
) -> None:
    servicer, http = gateway
    deal = {"account_id": "a-1", "name": "Deal"}
    rows = [
        {**deal, "external_id": "ok-1"},
        {**deal, "external_id": "cents", "amount": {"amount": "10.555", "currency": "USD"}},
        {**deal, "external_id": "date", "engaged_at": "2016-10-20"},
        {**deal, "external_id": "ok-2"},
        {**deal, "external_id": "extra", "colour": "red"},
    ]
    response = await http.post("/api/v1/opportunities/import", json={"rows": rows})

    assert response.status_code == 200, response.text
    body = response.json()
    assert servicer.received == ["ok-1", "ok-2"]
    assert (body["created"], body["rejected"]) == (2, 3)
    outcomes = [(r["row"], r["external_id"], r["outcome"], r["opportunity_id"]) for r in body["results"]]
    assert outcomes == [
        (0, "ok-1", "created", "o-0"),
        (1, "cents", "rejected", None),
        (2, "date", "rejected", None),
        (3, "ok-2", "created", "o-1"),
        (4, "extra", "rejected", None),
    ]
    assert [[e["field"] for e in r["errors"]] for r in body["results"] if r["outcome"] == "rejected"] == [
        ["amount.amount"],
        ["engaged_at"],
        ["colour"],
    ]
    assert "Value error" not in response.text


async def test_each_deal_an_import_creates_is_on_its_own_audit_trail(
    gateway: tuple[CreatesEveryRow, httpx.AsyncClient],
) -> None:
    _, http = gateway
    rows = [{"account_id": "a-1", "name": "Deal", "external_id": f"crm-{n}"} for n in (1, 2)]
    assert (await http.post("/api/v1/opportunities/import", json={"rows": rows})).status_code == 200

    trails = [(await http.get("/api/v1/audit-events", params={"record_id": f"o-{n}"})).json() for n in (0, 1)]
    assert [[(e["action"], e["reason"]) for e in trail["items"]] for trail in trails] == [
        [("create", "import row 0, external_id crm-1")],
        [("create", "import row 1, external_id crm-2")],
    ]


async def test_a_rep_imports_deals_without_naming_fields_they_may_not_set(
    gateway: tuple[CreatesEveryRow, httpx.AsyncClient],
) -> None:
    servicer, http = gateway
    rep = {"Authorization": "Bearer " + issue_dev_token(secret=SECRET, sub="u-2", roles=["sales_rep"], team="east")}
    row = {"account_id": "a-1", "name": "Deal", "external_id": "mine"}

    imported = await http.post("/api/v1/opportunities/import", json={"rows": [row]}, headers=rep)
    refused = await http.post("/api/v1/opportunities/import", json={"rows": [{**row, "owner_id": "u-3"}]}, headers=rep)

    assert imported.status_code == 200, imported.text
    assert servicer.received == ["mine"]
    assert refused.status_code == 403
    assert [e["field"] for e in refused.json()["errors"]] == ["owner_id"]


async def test_an_unstorable_row_is_rejected_alone_and_the_rest_of_the_body_is_checked_whole(
    gateway: tuple[CreatesEveryRow, httpx.AsyncClient],
) -> None:
    """Every import row must be storable (no NUL, valid UTF-8): one that is not is rejected alone,
    naming its field and the problem, as a row that does not fit its schema is; the others are
    imported. The body's other fields are checked as every route's are: one of them unstorable
    refuses the request."""
    servicer, http = gateway
    deal = {"account_id": "a-1", "name": "Deal"}
    rows = [
        {**deal, "external_id": "ok-1"},
        {**deal, "external_id": "nul", "stage": "lost", "close_date": "2026-01-05", "lost_reason": "price\x00"},
        {**deal, "external_id": "surrogate", "name": "\ud800"},
        {**deal, "external_id": "ok-2"},
    ]
    headers = {"Content-Type": "application/json"}  # encoded here: httpx cannot encode a lone surrogate
    response = await http.post("/api/v1/opportunities/import", content=json.dumps({"rows": rows}), headers=headers)

    assert response.status_code == 200, response.text
    assert servicer.received == ["ok-1", "ok-2"]
    body = response.json()
    assert (body["created"], body["rejected"]) == (2, 2)
    assert [(r["external_id"], r["outcome"], r["errors"]) for r in body["results"][1:3]] == [
        ("nul", "rejected", [{"field": "lost_reason", "message": "must not contain NUL characters"}]),
        ("surrogate", "rejected", [{"field": "name", "message": "is not valid UTF-8 text"}]),
    ]

    servicer.received = []
    refused = await http.post("/api/v1/opportunities/import", json={"pipeline_id": "p\x00", "rows": rows[:1]})
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json()["errors"]] == ["pipeline_id"]
    assert servicer.received == []
