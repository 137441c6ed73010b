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
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceStub
from crm_platform.principal import ALL_RECORDS, Principal, outgoing_metadata
from gateway.testing import serving_lead_definitions, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

TOKEN_SECRET = "signed-calls-token-secret-" + "t" * 30
INTERNAL_CALL_SECRET = "internal-calls-" + "i" * 40
BUDGET = {"key": "budget", "label": "Budget", "type": "number"}


@pytest.fixture
async def leads_definitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The `host:port` of a service that serves lead custom field definitions and requires signed
    calls; the secret is also in the environment, where the gateway the test starts reads it."""
    monkeypatch.setenv("CRM_INTERNAL_CALL_SECRET", INTERNAL_CALL_SECRET)
    async with serving_lead_definitions(tmp_path, call_secret=INTERNAL_CALL_SECRET) as target:
        yield target


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
