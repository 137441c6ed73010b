"""POST /accounts/{account_id}/claim, /release and /transfer answer the account as the move left it
with its version in `ETag`, as PATCH does, so that the caller's next write sends it back in
If-Match; a bulk transfer is on the trail of each account it moved. The real gateway app over a
fake accounts service."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceServicer, add_AccountsServiceServicer_to_server
from gateway.testing import serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "account-ownership-secret-" + "o" * 30
BEFORE = accounts_pb2.Account(id="acc-1", name="Initech", owner_id="u-1", team="east", version=2)


def after(**values: Any) -> accounts_pb2.Account:
    """acc-1 as any write leaves it: at version 3."""
    return accounts_pb2.Account(id="acc-1", name="Initech", team="east", version=3, **values)


class OneAccount(AccountsServiceServicer):
    """acc-1 at version 2, which each write moves to version 3."""

    async def UpdateAccount(self, request: pb.UpdateAccountRequest, context: Any) -> pb.UpdateAccountResponse:
        return pb.UpdateAccountResponse(account=after(owner_id="u-1", industry="retail"), previous=BEFORE)

    async def ClaimAccount(self, request: pb.ClaimAccountRequest, context: Any) -> pb.ClaimAccountResponse:
        return pb.ClaimAccountResponse(account=after(owner_id="u-1"), previous=BEFORE)

    async def ReleaseAccount(self, request: pb.ReleaseAccountRequest, context: Any) -> pb.ReleaseAccountResponse:
        return pb.ReleaseAccountResponse(account=after(in_pool=True), previous=BEFORE)

    async def TransferAccount(self, request: pb.TransferAccountRequest, context: Any) -> pb.TransferAccountResponse:
        return pb.TransferAccountResponse(account=after(owner_id=request.new_owner_id), previous=BEFORE)

    async def BulkTransferAccounts(
        self, request: pb.BulkTransferAccountsRequest, context: Any
    ) -> pb.BulkTransferAccountsResponse:
        return pb.BulkTransferAccountsResponse(
            bulk_transfer_id="bt-1", accounts_transferred=2, account_ids=["acc-1", "acc-2"]
        )


@pytest.fixture
async def http(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving(lambda server: add_AccountsServiceServicer_to_server(OneAccount(), server)) as accounts,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, accounts=accounts) as client,
    ):
        yield client


def auth(role: str) -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub="u-1", roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        ("sales_rep", "PATCH", "/accounts/acc-1", {"industry": "retail"}),
        ("sales_rep", "POST", "/accounts/acc-1/claim", None),
        ("sales_rep", "POST", "/accounts/acc-1/release", {"reason": "no fit"}),
        ("sales_manager", "POST", "/accounts/acc-1/transfer", {"new_owner_id": "u-2", "reason": "leave"}),
    ],
)
async def test_a_write_of_an_account_answers_its_new_version_in_the_etag(
    http: httpx.AsyncClient, role: str, method: str, path: str, body: Any
) -> None:
    response = await http.request(method, f"/api/v1{path}", json=body, headers=auth(role))

    assert response.status_code == 200, response.text
    assert (response.json()["version"], response.headers.get("ETag")) == (3, '"3"')


async def test_a_bulk_transfer_is_on_the_trail_of_the_transfer_and_of_each_account_it_moved(
    http: httpx.AsyncClient,
) -> None:
    body = {"from_owner_id": "u-1", "to_owner_id": "u-2", "reason": "left the company"}
    response = await http.post("/api/v1/accounts:transfer", json=body, headers=auth("sales_manager"))
    assert response.status_code == 200, response.text

    trail = await http.get("/api/v1/audit-events", params={"resource": "accounts"}, headers=auth("admin"))
    rows = sorted((row["action"], row["record_id"], row["reason"]) for row in trail.json()["items"])
    assert rows == [
        ("bulk_transfer", "bt-1", "u-1 -> u-2: left the company"),
        ("transfer", "acc-1", "u-1 -> u-2: left the company (bt-1)"),
        ("transfer", "acc-2", "u-1 -> u-2: left the company (bt-1)"),
    ]
