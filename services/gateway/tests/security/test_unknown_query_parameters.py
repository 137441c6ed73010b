"""A query parameter a route does not take is a 422 naming it (SPEC §3), never ignored: a misspelt
filter (`?stauts=open`) would otherwise answer with every record, and a bulk update or an export
built on that "filtered" list would touch them all. A route takes the query parameters it declares
and those its OpenAPI operation documents: the list routes that filter by custom fields take every
`custom.<key>`.

The real app runs without upstreams: a request that gets past the gateway's checks answers 503."""

from typing import Any

import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer, add_CustomFieldServiceServicer_to_server
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from fastapi import FastAPI
from gateway.testing import RoleClient, serving

pytestmark = pytest.mark.integration

# The list routes that pass `?custom.<key>=` filters to their service.
CUSTOM_FILTER_ROUTES = [
    "/api/v1/leads",
    "/api/v1/accounts",
    "/api/v1/contacts",
    "/api/v1/accounts/acc-1/contacts",
    "/api/v1/opportunities",
    "/api/v1/tickets",
]


@pytest.mark.parametrize(
    ("path", "params", "unknown"),
    [
        ("/api/v1/kb-articles", {"published": "false"}, ["published"]),
        ("/api/v1/tickets", {"status": "new", "stauts": "open"}, ["stauts"]),
        ("/api/v1/leads", {"limit": "10", "ownerid": "me", "custom": "x"}, ["ownerid", "custom"]),
        # Campaigns have no custom fields to filter by.
        ("/api/v1/campaigns", {"custom.channel": "partner"}, ["custom.channel"]),
        # Routes that take no query parameter at all.
        ("/api/v1/accounts/acc-1", {"foo": "1"}, ["foo"]),
        ("/api/v1/me", {"foo": "1"}, ["foo"]),
        # An export takes the filters of its resource.
        ("/api/v1/exports/leads", {"format": "csv", "stauts": "new", "status": "new"}, ["stauts"]),
    ],
)
async def test_a_query_parameter_the_route_does_not_take_is_422_naming_it(
    client: httpx.AsyncClient, path: str, params: dict[str, str], unknown: list[str]
) -> None:
    response = await client.get(path, params=params)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] == [{"field": name, "message": "unknown query parameter"} for name in unknown]


@pytest.mark.parametrize(
    ("path", "repeated"),
    [
        ("/api/v1/accounts?q=Dup&q=Alpha", ["q"]),
        ("/api/v1/leads?sort=name&sort=-name&limit=5&limit=6", ["sort", "limit"]),
    ],
)
async def test_a_parameter_taking_one_value_given_several_is_422_naming_it(
    client: httpx.AsyncClient, path: str, repeated: list[str]
) -> None:
    # ?q=Dup&q=Alpha searched for Alpha alone, as if Dup had not been asked for.
    response = await client.get(path)

    assert response.status_code == 422, response.text
    message = "given more than once; it takes one value"
    assert response.json()["errors"] == [{"field": name, "message": message} for name in repeated]


async def test_a_query_parameter_without_a_name_is_refused_as_such(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/leads?=x")

    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": "(no name)", "message": "unknown query parameter"}]


async def test_a_write_refuses_a_query_parameter_it_does_not_take(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/leads", params={"on_dupliate": "merge"}, json={"name": "Li"})

    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": "on_dupliate", "message": "unknown query parameter"}]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/kb-articles?include_unpublished=true&q=vpn&limit=5&cursor=c",
        "/api/v1/tickets?status=new&status=assigned&open=true&sort=-created_at",
        "/api/v1/forecast?from=2026-01-01&to=2026-03-31",  # declared as `from_`, taken as `from`
        "/api/v1/leads?on_duplicate=merge",
    ],
)
async def test_the_query_parameters_a_route_declares_are_taken(client: httpx.AsyncClient, path: str) -> None:
    method = "POST" if "on_duplicate" in path else "GET"
    response = await client.request(method, path, json={"name": "Li"} if method == "POST" else None)

    assert response.status_code == 503, response.text  # past the gateway's checks


@pytest.mark.parametrize("path", CUSTOM_FILTER_ROUTES)
async def test_the_lists_that_filter_by_custom_fields_take_them_and_document_them(
    client: httpx.AsyncClient, real_app: FastAPI, path: str
) -> None:
    response = await client.get(path, params={"custom.channel": "partner", "custom.region_code": "BJ"})

    assert response.status_code == 503, response.text  # past the gateway's checks
    template = path.replace("acc-1", "{account_id}")
    parameters = real_app.openapi()["paths"][template]["get"]["parameters"]
    [custom] = [p for p in parameters if p["name"] == "custom"]
    assert custom["in"] == "query" and custom["schema"]["propertyNames"] == {"pattern": r"^custom\."}


async def test_the_caller_is_authenticated_and_authorized_before_the_parameters_are_looked_at(
    client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    body = {"name": "r", "inactive_days": 3}
    unauthenticated = await client.post("/api/v1/reminder-rules?foo=1", json=body, headers={"Authorization": ""})
    forbidden = await client.post("/api/v1/reminder-rules?foo=1", json=body, headers=real_app_auth("sales_rep"))

    assert unauthenticated.status_code == 401
    assert forbidden.status_code == 403


async def test_the_public_web_form_intake_takes_the_query_parameters_a_web_page_adds(
    client: httpx.AsyncClient,
) -> None:
    """A form's address may carry the embedding page's tracking parameters: refusing them would
    lose the lead, and the intake filters nothing by them."""
    response = await client.post("/api/v1/webforms/abcdefgh123/submissions?utm_source=ad", json={"name": "Li"})

    assert response.status_code == 503, response.text  # past the gateway's checks


class FakeLeads(LeadsServiceServicer, CustomFieldServiceServicer):
    """Records the lead lists it serves; leads have one custom field, `channel`."""

    def __init__(self) -> None:
        self.lists: list[leads_pb.ListLeadsRequest] = []

    async def ListLeads(self, request: leads_pb.ListLeadsRequest, context: Any) -> leads_pb.ListLeadsResponse:
        self.lists.append(request)
        return leads_pb.ListLeadsResponse(page_info=common_pb2.PageInfo())

    async def ListCustomFields(self, request: cf_pb.ListCustomFieldsRequest, context: Any) -> Any:
        return cf_pb.ListCustomFieldsResponse(
            items=[cf_pb.CustomFieldDefinition(entity=request.entity, key="channel", label="Channel", type="text")]
        )


async def test_declared_and_custom_field_filters_reach_the_service(role_client: RoleClient) -> None:
    leads = FakeLeads()  # type: ignore[abstract]  # the calls this test makes only
    async with serving(
        lambda server: add_LeadsServiceServicer_to_server(leads, server),
        lambda server: add_CustomFieldServiceServicer_to_server(leads, server),
    ) as target:
        manager = await role_client("sales_manager", upstream=target)
        response = await manager.get("/api/v1/leads", params={"status": "new", "custom.channel": "partner"})

    assert response.status_code == 200, response.text
    [listed] = leads.lists
    assert list(listed.statuses) == ["new"]
    assert [(f.key, f.value) for f in listed.custom] == [("channel", "partner")]


@pytest.mark.parametrize(
    ("role", "searched"),
    [("sales_manager", ["name", "company", "email", "phone"]), ("marketing", ["name", "company"])],
)
async def test_a_search_looks_only_in_the_fields_the_caller_reads_in_clear(
    role_client: RoleClient, role: str, searched: list[str]
) -> None:
    """Marketing sees lead emails masked: it finds leads by name and company, and a search by
    email, which would reveal what the mask hides, finds nothing by it."""
    leads = FakeLeads()  # type: ignore[abstract]  # the calls this test makes only
    async with serving(
        lambda server: add_LeadsServiceServicer_to_server(leads, server),
        lambda server: add_CustomFieldServiceServicer_to_server(leads, server),
    ) as target:
        caller = await role_client(role, upstream=target)
        response = await caller.get("/api/v1/leads", params={"q": "zhou"})

    assert response.status_code == 200, response.text
    [listed] = leads.lists
    assert (listed.q, list(listed.q_fields)) == ("zhou", searched)


def test_the_export_route_documents_the_filters_of_each_resource(real_app: FastAPI) -> None:
    description = real_app.openapi()["paths"]["/api/v1/exports/{resource}"]["get"]["description"]

    assert description.startswith("The caller's in-scope records of one resource as CSV")
    assert "- `opportunities`: " in description and "`campaign_id`" in description
    assert "- `leads`: " in description and "- `tickets`: " in description
