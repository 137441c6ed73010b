"""Real routes that write through an owning service, against a minimal fake of that service: the
lead import checks every field its columns set before the service sees a byte."""

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from gateway.app import create_app
from gateway.config import Settings
from gateway.routers.leads import IMPORT_FIELDS, IMPORT_HEADER_ALIASES
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "route-writes-secret-" + "w" * 30


class FakeLeads(LeadsServiceServicer):
    """Records what reaches the leads service."""

    def __init__(self) -> None:
        self.imports: list[tuple[leads_pb.ImportHeader, bytes]] = []

    async def ImportLeads(self, request_iterator: AsyncIterator[leads_pb.ImportLeadsRequest], context: Any) -> Any:
        messages = [message async for message in request_iterator]
        self.imports.append((messages[0].header, b"".join(message.chunk for message in messages[1:])))
        return leads_pb.ImportLeadsResponse(lead_import=leads_pb.LeadImport(id="import-1", status="completed"))


class Gateway:
    def __init__(self, client: httpx.AsyncClient, leads: FakeLeads) -> None:
        self.client = client
        self.leads = leads

    @staticmethod
    def auth(*roles: str) -> dict[str, str]:
        token = issue_dev_token(secret=SECRET, sub="u-1", roles=list(roles), team="east", region="north")
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Gateway]:
    leads = FakeLeads()
    server = grpc.aio.server()
    add_LeadsServiceServicer_to_server(leads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    settings = Settings(
        dev_mode=True,
        dev_jwt_secret=SECRET,
        database_url=f"sqlite+aiosqlite:///{database}",
        leads_target=f"127.0.0.1:{port}",
        accounts_target="",
        sales_target="",
        service_desk_target="",
        analytics_target="",
        audit_relay_enabled=False,
    )
    app = create_app(settings)
    await app.state.security.start(migrate=False, relay=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
        yield Gateway(client, leads)
    await app.state.upstreams.close()
    await app.state.security.stop()
    await server.stop(None)


async def post_import(gateway: Gateway, body: str, role: str = "sales_rep", **params: Any) -> httpx.Response:
    content_type = {"json": "application/json", "jsonl": "application/x-ndjson"}.get(
        params.get("format", ""), "text/csv"
    )
    if "column_map" in params:
        params["column_map"] = json.dumps(params["column_map"])
    return await gateway.client.post(
        "/api/v1/leads/import",
        params=params,
        content=body.encode(),
        headers={**gateway.auth(role), "Content-Type": content_type},
    )


@pytest.mark.parametrize(
    ("body", "params", "field"),
    [
        ("name,owner_id\nLi,u-2\n", {}, "owner_id"),
        ("\ufeffName,Team\nLi,west\n", {}, "team"),
        ("name,who\nLi,u-2\n", {"column_map": {"name": "name", "who": "owner_id"}}, "owner_id"),
        ('[{"name": "Li", "team": "west"}]', {"format": "json"}, "team"),
        ('{"name": "Li"}\n{"name": "Wu", "owner_id": "u-2"}\n', {"format": "jsonl"}, "owner_id"),
        ("name,phone\nLi,1\n", {"assign": "true"}, "owner_id"),
        # A later CSV part continues the first part's header, which this request does not show.
        ("Wu,2\n", {"import_key": "k", "part": 2, "final": "true"}, "owner_id"),
        # A JSON line cut at the end of a part: its other keys come with the next part.
        ('{"name": "Li"}\n{"name": "Wu", "ow', {"format": "jsonl", "import_key": "k", "part": 1}, "owner_id"),
        # Two lines the service reads as one record (it counts quotes, escaped or not, to find its end).
        ('{"name": "a\\"",\n"owner_id": "u-2", "z": "\\""}\n', {"format": "jsonl"}, "owner_id"),
    ],
)
async def test_a_rep_may_not_import_fields_they_may_not_set(
    gateway: Gateway, body: str, params: dict[str, Any], field: str
) -> None:
    response = await post_import(gateway, body, **params)

    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["field"] == field
    assert gateway.leads.imports == []  # the service never saw the file


@pytest.mark.parametrize(
    ("body", "params"),
    [
        ("Full Name,Phone Number,Shoe size\nLi,138,42\n", {}),
        ('[{"name": "Li", "hobby": "chess"}]', {"format": "json"}),
        ("Wu,2\n", {"import_key": "k", "part": 2, "final": "true", "column_map": {"Name": "name"}}),
    ],
)
async def test_a_rep_imports_the_fields_they_may_set(gateway: Gateway, body: str, params: dict[str, Any]) -> None:
    response = await post_import(gateway, body, **params)

    assert response.status_code == 200, response.text
    [(header, content)] = gateway.leads.imports
    assert content == body.encode() and header.part == params.get("part", 0)


async def test_a_manager_imports_owners_and_teams(gateway: Gateway) -> None:
    body = "name,owner_id,team\nLi,u-2,west\n"
    response = await post_import(gateway, body, role="sales_manager")

    assert response.status_code == 200, response.text
    assert [content for _, content in gateway.leads.imports] == [body.encode()]


def test_the_import_mapping_is_that_of_the_leads_service() -> None:
    importing = pytest.importorskip("leads.importing")
    assert IMPORT_FIELDS == importing.LEAD_FIELDS
    assert IMPORT_HEADER_ALIASES == importing.HEADER_ALIASES
