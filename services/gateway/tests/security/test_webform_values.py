"""A public web form's fields reach the leads service as text (SubmitWebformRequest.fields), as an
HTML form's do: a JSON number or bool goes as its text (`12`, `3.5`, `true`), text as it is.
The leads service reads that text back by the custom field's type (crm_platform.custom_fields.from_text),
so a number or bool custom field is stored typed (services/leads/tests/integration/test_custom_field_texts_pg.py
covers the whole way). Real route, against a fake leads service that records what it is sent."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm.leads.v1 import leads_pb2
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


class OneWebform(LeadsServiceServicer):
    """A web form, listed and read."""

    FORM = leads_pb2.Webform(id="wf-1", name="Expo", form_key="secret-form-key", version=1)

    async def ListWebforms(self, request: leads_pb.ListWebformsRequest, context: Any) -> Any:
        return leads_pb.ListWebformsResponse(items=[self.FORM])

    async def GetWebform(self, request: leads_pb.GetWebformRequest, context: Any) -> Any:
        return leads_pb.GetWebformResponse(webform=self.FORM)


@pytest.mark.parametrize(
    ("role", "shown"), [("marketing", True), ("admin", True), ("analyst", False), ("sales_rep", False)]
)
async def test_a_forms_key_is_shown_only_to_who_may_change_web_forms(
    role_client: RoleClient, role: str, shown: bool
) -> None:
    """The key lets whoever holds it create and merge leads: who only reads web forms reads them without it."""
    async with serving(lambda server: add_LeadsServiceServicer_to_server(OneWebform(), server)) as target:  # type: ignore[abstract]
        http = await role_client(role, upstream=target)
        listed = await http.get("/api/v1/webforms")
        read = await http.get("/api/v1/webforms/wf-1")

    assert listed.status_code == read.status_code == 200, listed.text
    assert [form.get("form_key") for form in listed.json()["items"]] == ["secret-form-key" if shown else None]
    assert read.json().get("form_key") == ("secret-form-key" if shown else None)
    assert ("secret-form-key" in listed.text) is shown
