"""An export takes the filters its list route takes, read as the list reads them (SPEC §3, §9):
`q` looks only in the fields the caller reads in clear, timestamps are RFC 3339 with a time zone,
numbers and booleans are typed, and `custom.<key>=` filters by custom fields, all reaching the
owning service's List request typed. A value a filter cannot take is the list route's 422 naming
it, before the service is called or anything is exported."""

from typing import Any

import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer, add_CustomFieldServiceServicer_to_server
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm.servicedesk.v1 import servicedesk_service_pb2 as servicedesk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from fastapi import FastAPI
from gateway.testing import RoleClient, grant_fields, serving

pytestmark = pytest.mark.integration

# 2026-01-01T00:00:00Z
NEW_YEAR = 1_767_225_600


class FakeServices(LeadsServiceServicer, SalesServiceServicer, ServiceDeskServiceServicer, CustomFieldServiceServicer):
    """Records the List requests it serves (no records); every entity has one custom field, `channel`."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def ListLeads(self, request: leads_pb.ListLeadsRequest, context: Any) -> leads_pb.ListLeadsResponse:
        self.requests.append(request)
        return leads_pb.ListLeadsResponse(page_info=common_pb2.PageInfo())

    async def ListOpportunities(self, request: Any, context: Any) -> sales_pb.ListOpportunitiesResponse:
        self.requests.append(request)
        return sales_pb.ListOpportunitiesResponse(page_info=common_pb2.PageInfo())

    async def ListTickets(self, request: Any, context: Any) -> servicedesk_pb.ListTicketsResponse:
        self.requests.append(request)
        return servicedesk_pb.ListTicketsResponse(page_info=common_pb2.PageInfo())

    async def ListCustomFields(self, request: cf_pb.ListCustomFieldsRequest, context: Any) -> Any:
        return cf_pb.ListCustomFieldsResponse(
            items=[cf_pb.CustomFieldDefinition(entity=request.entity, key="channel", label="Channel", type="text")]
        )


async def _export(
    role_client: RoleClient, role: str, resource: str, params: dict[str, str]
) -> tuple[httpx.Response, list[Any]]:
    """The export of `resource` by `role` with `params`, and the List requests the services got."""
    services = FakeServices()  # type: ignore[abstract]  # the calls these tests make only
    async with serving(
        lambda server: add_LeadsServiceServicer_to_server(services, server),
        lambda server: add_SalesServiceServicer_to_server(services, server),
        lambda server: add_ServiceDeskServiceServicer_to_server(services, server),
        lambda server: add_CustomFieldServiceServicer_to_server(services, server),
    ) as target:
        caller = await role_client(role, upstream=target)
        response = await caller.get(f"/api/v1/exports/{resource}", params=params)
    return response, services.requests


@pytest.mark.parametrize(
    ("role", "params", "searched"),
    [
        ("sales_manager", {"q": "zhou"}, ["name", "company", "email", "phone"]),
        # Marketing sees lead emails masked: its search looks in name and company, as its list's does.
        ("marketing", {"q": "zhou"}, ["name", "company"]),
        ("marketing", {"q": "zhou", "q_field": "name"}, ["name"]),
    ],
)
async def test_an_export_searches_the_fields_the_caller_reads_in_clear(
    role_client: RoleClient, role: str, params: dict[str, str], searched: list[str]
) -> None:
    response, requests = await _export(role_client, role, "leads", params)

    assert response.status_code == 200, response.text
    [listed] = requests
    assert (listed.q, list(listed.q_fields)) == ("zhou", searched)


async def test_an_export_searching_a_field_the_caller_sees_masked_is_403_naming_it(role_client: RoleClient) -> None:
    response, requests = await _export(role_client, "marketing", "leads", {"q": "zhou", "q_field": "email"})

    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["field"] == "email"
    assert requests == []


async def test_an_export_searching_a_field_the_search_does_not_look_in_is_422(role_client: RoleClient) -> None:
    response, requests = await _export(role_client, "sales_manager", "leads", {"q": "zhou", "q_field": "title"})

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "q_field"
    assert requests == []


async def test_the_leads_export_takes_the_typed_filters_of_the_lead_list(role_client: RoleClient) -> None:
    params = {
        "created_after": "2026-01-01T08:00:00+08:00",
        "created_before": "2026-02-01T00:00:00Z",
        "min_score": "40",
        "in_pool": "false",
        "custom.channel": "partner",
    }
    response, requests = await _export(role_client, "sales_manager", "leads", params)

    assert response.status_code == 200, response.text
    [listed] = requests
    assert listed.created_after.seconds == NEW_YEAR
    assert listed.created_before.seconds == NEW_YEAR + 31 * 86_400
    assert listed.min_score == 40
    assert listed.in_pool == "false"
    assert [(f.key, f.value) for f in listed.custom] == [("channel", "partner")]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        # A date-time without a time zone names no instant.
        ({"created_after": "2026-01-01T00:00:00"}, "created_after"),
        ({"created_before": "yesterday"}, "created_before"),
        ({"min_score": "high"}, "min_score"),
    ],
)
async def test_a_value_the_leads_export_filter_cannot_take_is_the_lists_422(
    role_client: RoleClient, params: dict[str, str], field: str
) -> None:
    response, requests = await _export(role_client, "sales_manager", "leads", params)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert requests == []


async def test_a_zone_less_created_after_is_refused_by_export_and_list_alike(
    real_app: FastAPI, real_app_auth: Any
) -> None:
    transport = httpx.ASGITransport(app=real_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        params = {"created_after": "2026-01-01T00:00:00"}
        headers = real_app_auth("admin")
        exported = await client.get("/api/v1/exports/leads", params=params, headers=headers)
        listed = await client.get("/api/v1/leads", params=params, headers=headers)

    assert exported.status_code == listed.status_code == 422
    assert exported.json()["errors"] == listed.json()["errors"]


async def test_a_custom_field_filter_is_checked_as_the_field_it_filters_by(role_client: RoleClient) -> None:
    services = FakeServices()  # type: ignore[abstract]  # the calls this test makes only
    async with serving(
        lambda server: add_LeadsServiceServicer_to_server(services, server),
        lambda server: add_CustomFieldServiceServicer_to_server(services, server),
    ) as target:
        hidden = grant_fields("sales_manager", "leads", custom="hidden")
        caller = await role_client("sales_manager", hidden, upstream=target)
        response = await caller.get("/api/v1/exports/leads", params={"custom.channel": "partner"})

    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["field"] == "custom.channel"
    assert services.requests == []


async def test_the_tickets_export_takes_a_created_after_timestamp(role_client: RoleClient) -> None:
    response, requests = await _export(
        role_client, "service_manager", "tickets", {"created_after": "2026-01-01T00:00:00Z", "custom.channel": "web"}
    )
    refused, _ = await _export(role_client, "service_manager", "tickets", {"created_after": "2026-01-01"})

    assert response.status_code == 200, response.text
    [listed] = requests
    assert listed.created_after.seconds == NEW_YEAR
    assert [(f.key, f.value) for f in listed.custom] == [("channel", "web")]
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["field"] == "created_after"


async def test_the_opportunities_export_takes_the_lists_rotting_filter(role_client: RoleClient) -> None:
    response, requests = await _export(role_client, "sales_manager", "opportunities", {"rotting": "true"})
    unknown, _ = await _export(role_client, "sales_manager", "opportunities", {"rotting_only": "true"})

    assert response.status_code == 200, response.text
    [listed] = requests
    assert listed.rotting_only is True
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["errors"][0]["field"] == "rotting_only"


def test_the_export_route_documents_the_typed_and_custom_filters(real_app: FastAPI) -> None:
    description = real_app.openapi()["paths"]["/api/v1/exports/{resource}"]["get"]["description"]
    [leads] = [line for line in description.splitlines() if line.startswith("- `leads`: ")]
    [accounts] = [line for line in description.splitlines() if line.startswith("- `accounts`: ")]

    for name in ("created_after", "created_before", "min_score", "in_pool", "q_field", "custom.<key>"):
        assert f"`{name}`" in leads
    assert "`created_after`" in accounts and "include_merged" not in accounts
