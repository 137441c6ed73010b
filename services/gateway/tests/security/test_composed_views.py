"""The composed 360° view degrades per part: with the accounts service up and the sales and
service-desk services down, the view still answers 200 — the account, its contacts and activities
are there, and the parts owned by the unreachable services say `unavailable` (never a 500).
Sensitive fields read in a part are audited like those of the account itself."""

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from fastapi import FastAPI
from gateway.app import create_app
from gateway.config import Settings
from gateway.security.audit import AuditQuery
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "composed-views-secret-" + "v" * 30
ACCOUNT_ID = "0190a000-0000-7000-8000-000000000001"


class OneAccount(AccountsServiceServicer):
    """An accounts service holding one account with one contact and one activity."""

    async def GetAccount(self, request: pb.GetAccountRequest, context: Any) -> pb.GetAccountResponse:
        if request.account_id != ACCOUNT_ID:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such account")
        account = accounts_pb2.Account(
            id=ACCOUNT_ID,
            name="Initech",
            region="north",
            owner_id="rep-1",
            team="east",
            annual_revenue=common_pb2.Money(amount="1000.00", currency="CNY"),
            version=1,
        )
        return pb.GetAccountResponse(account=account)

    async def ListContacts(self, request: pb.ListContactsRequest, context: Any) -> pb.ListContactsResponse:
        contact = accounts_pb2.Contact(id="c-1", account_id=request.account_id, name="Peter Gibbons", version=1)
        return pb.ListContactsResponse(items=[contact])

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Any) -> pb.ListActivitiesResponse:
        activity = accounts_pb2.Activity(id="a-1", account_id=request.account_id, kind="call", subject="TPS reports")
        return pb.ListActivitiesResponse(items=[activity])


class OneDeal(SalesServiceServicer):
    """A sales service holding one open deal of the account, with a discount on its line item."""

    async def ListOpportunities(
        self, request: sales_pb.ListOpportunitiesRequest, context: Any
    ) -> sales_pb.ListOpportunitiesResponse:
        deal = sales_pb2.Opportunity(
            id="o-1",
            account_id=request.account_id,
            name="Staplers",
            owner_id="rep-1",
            team="east",
            region="north",
            line_items=[sales_pb2.LineItem(product_id="p-1", discount_percent="15")],
        )
        return sales_pb.ListOpportunitiesResponse(items=[deal])


@asynccontextmanager
async def _serve(servicer: Any, add: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the probe is: nothing listens there


@pytest.fixture
async def accounts_target() -> AsyncIterator[str]:
    async with _serve(OneAccount(), add_AccountsServiceServicer_to_server) as target:
        yield target


@pytest.fixture
async def sales_target() -> AsyncIterator[str]:
    async with _serve(OneDeal(), add_SalesServiceServicer_to_server) as target:
        yield target


@asynccontextmanager
async def _gateway(database: Path, accounts: str, sales: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real gateway app for an admin, over the given upstreams (the others down)."""
    down = f"127.0.0.1:{_closed_port()}"
    settings = Settings(
        dev_mode=True,
        dev_jwt_secret=SECRET,
        database_url=f"sqlite+aiosqlite:///{database}",
        accounts_target=accounts,
        leads_target=down,
        sales_target=sales or down,
        service_desk_target=down,
        analytics_target=down,
        audit_relay_enabled=False,
        audit_ingest_enabled=False,
    )
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    token = issue_dev_token(secret=SECRET, sub="root", roles=["admin"], team="east", region="north")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ) as http:
        yield app, http
    await app.state.upstreams.close()
    await app.state.security.stop()


@pytest.fixture
async def client(tmp_path: Path, migrated_sqlite: Path, accounts_target: str) -> AsyncIterator[httpx.AsyncClient]:
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    async with _gateway(database, accounts_target, "") as (_, http):
        yield http


async def test_parts_of_unreachable_services_are_unavailable_and_the_rest_answers(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/api/v1/accounts/{ACCOUNT_ID}/360")

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["account"]["name"] == "Initech"
    assert view["account"]["annual_revenue"] == {"amount": "1000.00", "currency": "CNY"}
    assert view["contacts"]["status"] == "ok"
    assert [c["name"] for c in view["contacts"]["items"]] == ["Peter Gibbons"]
    assert [a["subject"] for a in view["recent_activities"]["items"]] == ["TPS reports"]
    for part in ("open_opportunities", "contracts_and_receivables", "open_tickets"):
        assert view[part]["status"] == "unavailable", part
        assert "items" not in view[part]


async def test_an_unknown_account_is_a_404_not_a_partial_view(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/accounts/0190a000-0000-7000-8000-0000000000ff/360")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_sensitive_fields_read_in_a_part_are_audited(
    tmp_path: Path, migrated_sqlite: Path, accounts_target: str, sales_target: str
) -> None:
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    async with _gateway(database, accounts_target, sales_target) as (app, http):
        response = await http.get(f"/api/v1/accounts/{ACCOUNT_ID}/360")

        assert response.status_code == 200, response.text
        [deal] = response.json()["open_opportunities"]["items"]
        assert deal["line_items"][0]["discount_percent"] == "15"
        rows, _ = await app.state.security.audit.query(AuditQuery(action="read_sensitive"))
    assert [(row["resource"], row["record_id"], row["fields"]) for row in rows] == [
        ("opportunities", "o-1", ["line_items.discount_percent"])
    ]
