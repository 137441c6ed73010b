"""The real gateway and a service's real gRPC server, both given `CRM_INTERNAL_CALL_SECRET` as the
chart gives it: the gateway signs the principal and scope of every call, so requests work end to
end, while the same service refuses a caller that does not sign (crm_platform.call_auth).

The service is the custom field definitions servicer every owning service registers
(crm_platform.custom_fields_service), on SQLite."""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from crm.common.v1 import custom_fields_pb2
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub, add_CustomFieldServiceServicer_to_server
from crm_platform.custom_fields_service import SERVICE_NAME, CustomFieldServicer, definitions_table
from crm_platform.db import create_engine
from crm_platform.grpc_server import GrpcServer
from crm_platform.idempotency import idempotency_table
from crm_platform.principal import ALL_RECORDS, Principal, outgoing_metadata
from gateway.testing import started_gateway
from gateway.token_cli import issue_dev_token
from sqlalchemy import MetaData

pytestmark = pytest.mark.integration

TOKEN_SECRET = "signed-calls-token-secret-" + "t" * 30
INTERNAL_CALL_SECRET = "internal-calls-" + "i" * 40
BUDGET = {"key": "budget", "label": "Budget", "type": "number"}


@pytest.fixture
async def leads_definitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The `host:port` of a service that serves lead custom field definitions and requires signed
    calls; the secret is also in the environment, where the gateway the test starts reads it."""
    monkeypatch.setenv("CRM_INTERNAL_CALL_SECRET", INTERNAL_CALL_SECRET)
    metadata = MetaData()
    table = definitions_table(metadata, "custom_field_definitions")
    keys = idempotency_table(metadata)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'definitions.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    servicer = CustomFieldServicer(engine, table, keys=keys, entities=("lead",))
    server = GrpcServer(
        service="leads",
        service_names=[SERVICE_NAME],
        register=lambda s: add_CustomFieldServiceServicer_to_server(servicer, s),
        call_secret=INTERNAL_CALL_SECRET,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await engine.dispose()


async def test_requests_work_end_to_end_with_signed_internal_calls(
    tmp_path: Path, migrated_sqlite: Path, leads_definitions: str
) -> None:
    token = issue_dev_token(secret=TOKEN_SECRET, sub="u-1", roles=["admin"], team="east", region="north")
    async with started_gateway(
        tmp_path, migrated_sqlite, secret=TOKEN_SECRET, token=token, leads=leads_definitions
    ) as http:
        created = await http.post("/api/v1/custom-fields/lead", json=BUDGET)
        listed = await http.get("/api/v1/custom-fields/lead")

    assert created.status_code == 201, created.text
    assert listed.status_code == 200, listed.text
    assert [item["key"] for item in listed.json()["items"]] == ["budget"]


async def test_a_gateway_whose_secret_differs_answers_502_not_the_callers_401(
    tmp_path: Path, migrated_sqlite: Path, leads_definitions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's token was fine: the gateway's own call was refused (a secret rotated on one side)."""
    monkeypatch.setenv("CRM_INTERNAL_CALL_SECRET", "another-" + "o" * 40)
    token = issue_dev_token(secret=TOKEN_SECRET, sub="u-1", roles=["admin"], team="east", region="north")
    async with started_gateway(
        tmp_path, migrated_sqlite, secret=TOKEN_SECRET, token=token, leads=leads_definitions
    ) as http:
        listed = await http.get("/api/v1/custom-fields/lead")

    assert listed.status_code == 502, listed.text
    assert "signature" not in listed.text  # the reason is in the gateway's log, not the answer


async def test_the_same_service_refuses_a_caller_that_does_not_sign(leads_definitions: str) -> None:
    """What any pod that reaches the port could send: an admin in scope `all`, unsigned."""
    metadata = outgoing_metadata(Principal("intruder", ("admin",)), ALL_RECORDS)
    async with grpc.aio.insecure_channel(leads_definitions) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await CustomFieldServiceStub(channel).ListCustomFields(
                custom_fields_pb2.ListCustomFieldsRequest(entity="lead"), metadata=metadata
            )

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
