"""Custom field definitions over REST against the one servicer every owning service registers
(crm_platform.custom_fields_service, here on SQLite), and custom values as records carry them."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from gateway.testing import RoleClient, serving, serving_lead_definitions

pytestmark = pytest.mark.integration

BUDGET = {"key": "budget", "label": "Budget", "type": "number"}


@pytest.fixture
async def lead_definitions(tmp_path: Path) -> AsyncIterator[str]:
    async with serving_lead_definitions(tmp_path) as target:
        yield target


async def test_creating_a_key_that_has_a_definition_is_409_and_leaves_it_as_it_was(
    role_client: RoleClient, lead_definitions: str
) -> None:
    admin = await role_client("admin", upstream=lead_definitions)
    created = await admin.post("/api/v1/custom-fields/lead", json=BUDGET)
    assert created.status_code == 201, created.text

    duplicate = await admin.post("/api/v1/custom-fields/lead", json={**BUDGET, "type": "bool"})

    assert duplicate.status_code == 409, duplicate.text
    assert duplicate.headers["content-type"] == "application/problem+json"
    problem = duplicate.json()
    assert problem["reason"] == "DUPLICATE"
    assert problem["existing_id"] == "lead.budget"
    assert "lead.budget" in problem["detail"]
    [stored] = (await admin.get("/api/v1/custom-fields/lead")).json()["items"]
    assert (stored["type"], stored["version"]) == ("number", 1)


async def test_a_create_repeated_under_its_idempotency_key_answers_201_with_the_first_definition(
    role_client: RoleClient, lead_definitions: str
) -> None:
    admin = await role_client("admin", upstream=lead_definitions)
    key = {"Idempotency-Key": "budget-once"}
    created = await admin.post("/api/v1/custom-fields/lead", json=BUDGET, headers=key)
    assert created.status_code == 201, created.text

    repeated = await admin.post("/api/v1/custom-fields/lead", json=BUDGET, headers=key)

    assert repeated.status_code == 201, repeated.text
    assert repeated.json() == created.json()
    reused = await admin.post("/api/v1/custom-fields/lead", json={**BUDGET, "label": "Other"}, headers=key)
    assert reused.status_code == 422, reused.text
    assert reused.json()["errors"][0]["field"] == "Idempotency-Key"


async def test_a_definition_written_carries_its_version_as_etag_for_a_later_if_match(
    role_client: RoleClient, lead_definitions: str
) -> None:
    admin = await role_client("admin", upstream=lead_definitions)
    created = await admin.post("/api/v1/custom-fields/lead", json=BUDGET)
    assert created.headers["ETag"] == '"1"'

    replaced = await admin.put(
        "/api/v1/custom-fields/lead/budget", json={**BUDGET, "label": "Budget (CNY)"}, headers={"If-Match": '"1"'}
    )

    assert replaced.status_code == 200, replaced.text
    assert replaced.headers["ETag"] == '"2"'
    assert replaced.json()["version"] == 2
    stale = await admin.put("/api/v1/custom-fields/lead/budget", json=BUDGET, headers={"If-Match": '"1"'})
    assert stale.status_code == 412, stale.text
    stale_delete = await admin.delete("/api/v1/custom-fields/lead/budget", headers={"If-Match": '"1"'})
    assert stale_delete.status_code == 412, stale_delete.text
    deleted = await admin.delete("/api/v1/custom-fields/lead/budget", headers={"If-Match": '"2"'})
    assert deleted.status_code == 204, deleted.text


class OneLead(LeadsServiceServicer):
    """A lead whose custom values travel in a Struct, as the leads service sends the stored ones."""

    def __init__(self, custom: dict[str, Any]) -> None:
        self.lead = leads_pb2.Lead(id="lead-1", name="Li", owner_id="u-1", version=1)
        self.lead.custom.update(custom)

    async def GetLead(self, request: leads_pb.GetLeadRequest, context: Any) -> leads_pb.GetLeadResponse:
        return leads_pb.GetLeadResponse(lead=self.lead)


async def test_an_integral_custom_number_reads_back_as_an_integer(role_client: RoleClient) -> None:
    leads = OneLead({"budget": 1000, "ratio": 2.5, "distance": 1e20, "channel": "partner"})  # type: ignore[abstract]
    async with serving(lambda server: add_LeadsServiceServicer_to_server(leads, server)) as target:
        admin = await role_client("admin", upstream=target)
        response = await admin.get("/api/v1/leads/lead-1")

    assert response.status_code == 200, response.text
    custom = response.json()["custom"]
    assert custom == {"budget": 1000, "ratio": 2.5, "distance": 1e20, "channel": "partner"}
    assert [type(custom[key]) for key in ("budget", "ratio", "distance")] == [int, float, float]  # not 1000.0
