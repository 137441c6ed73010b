"""A public web form's fields reach the leads service as text (SubmitWebformRequest.fields), as an
HTML form's do: a JSON number or bool goes as its text (`12`, `3.5`, `true`), text as it is.
The leads service reads that text back by the custom field's type (crm_platform.custom_fields.from_text),
so a number or bool custom field is stored typed (services/leads/tests/integration/test_custom_field_texts_pg.py
covers the whole way). Real route, against a fake leads service that records what it is sent."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm_platform.custom_fields import FieldDefinition, FieldType, from_text
from gateway.testing import RoleClient, serving

pytestmark = pytest.mark.integration


class RecordingWebforms(LeadsServiceServicer):
    """Accepts every submission and keeps the fields it was sent."""

    def __init__(self) -> None:
        self.fields: list[dict[str, str]] = []

    async def SubmitWebform(self, request: leads_pb.SubmitWebformRequest, context: Any) -> Any:
        self.fields.append(dict(request.fields))
        return leads_pb.SubmitWebformResponse(lead_id="l-1")


@pytest.fixture
def leads() -> RecordingWebforms:
    return RecordingWebforms()  # type: ignore[abstract]


@pytest.fixture
async def leads_target(leads: RecordingWebforms) -> AsyncIterator[str]:
    async with serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as target:
        yield target


async def test_json_numbers_and_bools_reach_the_service_as_the_text_it_reads_back_typed(
    role_client: RoleClient, leads_target: str, leads: RecordingWebforms
) -> None:
    http = await role_client("admin", upstream=leads_target)  # the intake is public: the token plays no part
    body = {"name": "WN", "visits_x": 12, "ratio": 3.5, "tiny": 1e-07, "vip": True, "opt_out": False, "note": "12"}

    response = await http.post("/api/v1/webforms/form-key-1/submissions", json=body)

    assert response.status_code == 202, response.text
    [sent] = leads.fields
    assert sent == {
        "name": "WN",
        "visits_x": "12",
        "ratio": "3.5",
        "tiny": "1e-07",
        "vip": "true",
        "opt_out": "false",
        "note": "12",
    }
    number = FieldDefinition(entity="lead", key="n", label="N", type=FieldType.NUMBER)
    flag = FieldDefinition(entity="lead", key="b", label="B", type=FieldType.BOOL)
    # Read by the field's type, each is the JSON value the form sent.
    for key in ("visits_x", "ratio", "tiny"):
        assert from_text(number, sent[key]) == body[key]
    assert (from_text(flag, sent["vip"]), from_text(flag, sent["opt_out"])) == (True, False)
