"""The sales routes' JSON bodies as README promises them: blank ids, owners, teams and regions are
refused (a 422 naming each), not stored as "   "; and a pipeline as GET returned it may be PUT back,
the fields the server sets ignored, while an unknown field is still a 422.

The blank-id cases run against the real app without upstreams: a request that gets past the
gateway's validation answers 503 (no service configured), one that does not answers 422."""

import copy
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from gateway.errors import field_error
from gateway.routers.sales import ImportRowBody
from gateway.testing import RoleClient, serving
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

pytestmark = pytest.mark.integration

ID = "00000000-0000-7000-8000-000000000000"
PRICE = {"amount": "10.00", "currency": "CNY"}
DEAL = {"account_id": ID, "name": "Robots"}


def _blank_fields(response: httpx.Response) -> list[str]:
    """The fields a 422 refuses as blank (and only as blank)."""
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert {error["message"] for error in errors} == {"must not be blank"}, errors
    return [error["field"] for error in errors]


BLANK = [
    ("POST", "/api/v1/opportunities", {**DEAL, "owner_id": "   ", "team": " ", "region": "\t"},
     ["owner_id", "team", "region"]),
    ("POST", "/api/v1/opportunities", {**DEAL, "primary_contact_id": " ", "pipeline_id": " "},
     ["primary_contact_id", "pipeline_id"]),
    ("POST", "/api/v1/opportunities", {**DEAL, "source_lead_id": " ", "campaign_id": "\u3000"},
     ["source_lead_id", "campaign_id"]),
    ("POST", "/api/v1/opportunities", {**DEAL, "account_id": "  "}, ["account_id"]),
    ("POST", "/api/v1/opportunities", {**DEAL, "line_items": [{"product_id": " ", "unit_price": PRICE}]},
     ["line_items[0].product_id"]),
    ("PATCH", f"/api/v1/opportunities/{ID}", {"owner_id": "   ", "team": " ", "region": " "},
     ["owner_id", "team", "region"]),
    ("PATCH", f"/api/v1/opportunities/{ID}", {"primary_contact_id": "  "}, ["primary_contact_id"]),
    ("POST", f"/api/v1/opportunities/{ID}/assign", {"owner_id": " ", "team": " ", "region": " "},
     ["owner_id", "team", "region"]),
    ("POST", "/api/v1/opportunities/import", {"pipeline_id": " ", "rows": [DEAL]}, ["pipeline_id"]),
    ("POST", "/api/v1/quotes", {"opportunity_id": " ", "line_items": [{"product_name": "GTX", "unit_price": PRICE}]},
     ["opportunity_id"]),
    ("PATCH", f"/api/v1/quotes/{ID}", {"line_items": [{"product_id": "\t", "unit_price": PRICE}]},
     ["line_items[0].product_id"]),
    ("POST", "/api/v1/contracts", {"opportunity_id": "  "}, ["opportunity_id"]),
    ("POST", "/api/v1/contracts", {"account_id": " ", "title": "Robots", "amount": PRICE}, ["account_id"]),
    ("POST", "/api/v1/contracts", {"opportunity_id": ID, "owner_id": " ", "team": " ", "region": " "},
     ["owner_id", "team", "region"]),
    ("POST", "/api/v1/payments", {"contract_id": " ", "amount": PRICE, "external_reference": "erp-1"},
     ["contract_id"]),
    ("POST", "/api/v1/invoices", {"contract_id": " ", "amount": PRICE}, ["contract_id"]),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "fields"), BLANK)
async def test_a_sales_id_owner_team_or_region_of_only_whitespace_is_422_naming_it(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], fields: list[str]
) -> None:
    assert _blank_fields(await client.request(method, path, json=body)) == fields


LEFT_OUT_AS_EMPTY = [
    ("POST", "/api/v1/opportunities", {**DEAL, "owner_id": "", "team": "", "region": "", "pipeline_id": "",
                                       "primary_contact_id": "", "source_lead_id": "", "campaign_id": ""}),
    ("POST", "/api/v1/opportunities", {**DEAL, "line_items": [{"product_id": "", "unit_price": PRICE}]}),
    ("POST", f"/api/v1/opportunities/{ID}/assign", {"owner_id": "u-2", "team": "", "region": ""}),
    ("POST", "/api/v1/opportunities/import", {"pipeline_id": "", "rows": [DEAL]}),
    ("POST", "/api/v1/contracts", {"opportunity_id": ID, "account_id": "", "owner_id": "", "team": "", "region": ""}),
    ("POST", "/api/v1/contracts", {"opportunity_id": "", "account_id": ID, "title": "Robots", "amount": PRICE}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body"), LEFT_OUT_AS_EMPTY)
async def test_an_empty_sales_id_owner_team_or_region_still_means_not_given(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == 503, response.text  # past the gateway's checks: the missing upstream


@pytest.mark.parametrize(
    ("row", "fields"),
    [
        ({**DEAL, "owner_id": "  ", "team": "\t", "region": " "}, ["owner_id", "team", "region"]),
        ({**DEAL, "account_id": "   "}, ["account_id"]),
    ],
)
def test_an_import_row_with_a_blank_id_owner_team_or_region_is_rejected_naming_it(
    row: dict[str, Any], fields: list[str]
) -> None:
    """The import rejects such a row alone, with these errors (`import_opportunities`)."""
    with pytest.raises(ValidationError) as refused:
        ImportRowBody.model_validate({**row, "external_id": "crm-1"})
    errors = [field_error(item) for item in refused.value.errors()]
    assert errors == [{"field": field, "message": "must not be blank"} for field in fields]


def test_an_import_row_with_an_empty_owner_team_or_region_leaves_them_to_the_service() -> None:
    """The service gives the deal the importer's owner, team and region, as for a row without them."""
    row = ImportRowBody.model_validate({**DEAL, "external_id": "crm-1", "owner_id": "", "team": "", "region": ""})
    assert not (row.owner_id or row.team or row.region)


def _created_at() -> Timestamp:
    created_at = Timestamp()
    created_at.FromJsonString("2026-01-05T09:00:00Z")
    return created_at


class OnePipeline(SalesServiceServicer):
    """A pipeline as the sales service stores it, replaced by what UpdatePipeline is sent."""

    def __init__(self) -> None:
        stages = [
            sales_pb2.Stage(key="qualify", name="Qualify", probability="20", required_fields=["amount"],
                            rotting_days=14, position=0, outcome="open"),
            sales_pb2.Stage(key="won", name="Won", probability="100", position=1, outcome="won"),
            sales_pb2.Stage(key="lost", name="Lost", probability="0", position=2, outcome="lost"),
        ]  # fmt: skip
        self.pipeline = sales_pb2.Pipeline(
            id="p-1", name="Default", stages=stages, is_default=True, created_at=_created_at(), version=3
        )
        self.updates: list[sales_pb.UpdatePipelineRequest] = []

    async def GetPipeline(self, request: sales_pb.GetPipelineRequest, context: Any) -> Any:
        return sales_pb.GetPipelineResponse(pipeline=self.pipeline)

    async def UpdatePipeline(self, request: sales_pb.UpdatePipelineRequest, context: Any) -> Any:
        self.updates.append(request)
        previous = copy.deepcopy(self.pipeline)
        stages = [
            sales_pb2.Stage(key=s.key, name=s.name, probability=s.probability, required_fields=s.required_fields,
                            rotting_days=s.rotting_days, position=n, outcome=s.outcome)
            for n, s in enumerate(request.stages)
        ]  # fmt: skip
        self.pipeline = sales_pb2.Pipeline(id=previous.id, name=request.name, stages=stages,
                                           is_default=request.is_default, created_at=previous.created_at,
                                           version=previous.version + 1)  # fmt: skip
        return sales_pb.UpdatePipelineResponse(pipeline=self.pipeline, previous=previous)


@pytest.fixture
async def pipelines() -> AsyncIterator[tuple[OnePipeline, str]]:
    """The fake sales service and its `host:port`."""
    sales = OnePipeline()  # type: ignore[abstract]  # serves two calls
    async with serving(lambda server: add_SalesServiceServicer_to_server(sales, server)) as target:
        yield sales, target


async def test_a_pipeline_as_get_returned_it_is_put_back_with_the_fields_the_server_sets_ignored(
    role_client: RoleClient, pipelines: tuple[OnePipeline, str]
) -> None:
    sales, target = pipelines
    admin = await role_client("admin", upstream=target)
    read = await admin.get("/api/v1/pipelines/p-1")
    pipeline = read.json()
    assert {"id", "created_at", "version"} <= set(pipeline) and "position" in pipeline["stages"][0]
    pipeline["name"] = "Direct sales"

    replaced = await admin.put("/api/v1/pipelines/p-1", json=pipeline, headers={"If-Match": read.headers["etag"]})

    assert replaced.status_code == 200, replaced.text
    assert (replaced.json()["name"], replaced.headers["etag"]) == ("Direct sales", '"4"')
    [sent] = sales.updates
    assert (sent.id, sent.expected_version, sent.name, sent.is_default) == ("p-1", 3, "Direct sales", True)
    assert [(s.key, s.probability, list(s.required_fields), s.rotting_days) for s in sent.stages] == [
        ("qualify", "20", ["amount"], 14), ("won", "100", [], 0), ("lost", "0", [], 0),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("unknown", "field"),
    [
        (lambda pipeline: pipeline.update(owner_id="u-1"), "owner_id"),
        (lambda pipeline: pipeline["stages"][1].update(colour="green"), "stages[1].colour"),
    ],
    ids=["on the pipeline", "on a stage"],
)
async def test_a_pipeline_put_back_with_a_field_the_server_does_not_set_is_422_naming_it(
    role_client: RoleClient, pipelines: tuple[OnePipeline, str], unknown: Any, field: str
) -> None:
    sales, target = pipelines
    admin = await role_client("admin", upstream=target)
    pipeline = (await admin.get("/api/v1/pipelines/p-1")).json()
    unknown(pipeline)

    response = await admin.put("/api/v1/pipelines/p-1", json=pipeline)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert sales.updates == []
