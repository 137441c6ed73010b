"""An export reads each filter it shares with its list route as that route declares it: a value the
list refuses (an unknown ticket status, a sort it does not offer, a score out of range) is the
list's own 422 naming the query parameter, and `sort` is a filter only of the exports whose list
sorts. The refusal comes before anything is audited, exported or counted against the export rate
limit, and before the owning service hears of the export."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as desk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import (
    ServiceDeskServiceServicer,
    add_ServiceDeskServiceServicer_to_server,
)
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.grpc_errors import to_status
from fastapi import FastAPI
from gateway.testing import add_no_custom_fields, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "export-filter-values-" + "e" * 30
STATUSES = ("new", "assigned", "in_progress", "waiting_customer", "resolved", "closed", "reopened")


@pytest.mark.parametrize(
    ("resource", "listed_at", "params"),
    [
        ("tickets", "/tickets", {"status": "bogus"}),
        ("tickets", "/tickets", {"channel": "fax"}),
        ("tickets", "/tickets", {"priority": "bogus"}),
        ("tickets", "/tickets", {"escalated": "maybe"}),
        ("tickets", "/tickets", {"sort": "no_such_field"}),
        ("leads", "/leads", {"sort": "no_such_field"}),
        ("leads", "/leads", {"min_score": "500"}),
        ("leads", "/leads", {"in_pool": "maybe"}),
        ("leads", "/leads", {"status": "bogus"}),
        ("leads", "/leads", {"source": "fax"}),
        ("leads", "/leads", {"grade": "Z"}),
        ("accounts", "/accounts", {"tier": "A,Z"}),
        ("accounts", "/accounts", {"lifecycle": "dead"}),
        ("contacts", "/contacts", {"decision_role": "boss"}),
        ("quotes", "/quotes", {"status": "aproved"}),
        ("contracts", "/contracts", {"status": "bogus"}),
        ("invoices", "/invoices", {"status": "paid"}),
        # A list that takes no `sort`: it is a query parameter its export does not take either.
        ("csat", "/csat", {"sort": "-submitted_at"}),
    ],
)
async def test_a_value_the_list_refuses_is_the_same_422_on_the_export(
    real_app: FastAPI, real_app_auth: Any, resource: str, listed_at: str, params: dict[str, str]
) -> None:
    transport = httpx.ASGITransport(app=real_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        headers = real_app_auth("admin")
        exported = await client.get(f"/api/v1/exports/{resource}", params=params, headers=headers)
        listed = await client.get(f"/api/v1{listed_at}", params=params, headers=headers)

    assert (exported.status_code, listed.status_code) == (422, 422), exported.text
    assert exported.json()["errors"] == listed.json()["errors"]
    assert [error["field"].split("[")[0] for error in exported.json()["errors"]] == list(params)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/audit-events", {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "until"),
        ("/audit-events", {"since": "2026-03-02T00:00:00Z", "until": "2026-03-02T00:00:00Z"}, "until"),
        ("/exports/audit_events", {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "until"),
        ("/exports/audit_events", {"since": "2026-03-02T00:00:00"}, "since"),  # no time zone: whose midnight?
        ("/forecast", {"from": "2026-03-02", "to": "2026-03-01"}, "to"),
        ("/exports/forecast", {"from": "2026-03-02", "to": "2026-03-01"}, "to"),
    ],
)
async def test_a_period_that_can_hold_nothing_is_a_422_naming_its_end(
    real_app: FastAPI, real_app_auth: Any, path: str, params: dict[str, str], field: str
) -> None:
    """A filter's end before its start is the caller's mistake, not an empty list or file."""
    transport = httpx.ASGITransport(app=real_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get(f"/api/v1{path}", params=params, headers=real_app_auth("admin"))

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


def test_only_the_exports_whose_list_sorts_document_sort(real_app: FastAPI) -> None:
    description = real_app.openapi()["paths"]["/api/v1/exports/{resource}"]["get"]["description"]
    lines = {line.split("`")[1]: line for line in description.splitlines() if line.startswith("- `")}

    assert "`sort`" in lines["tickets"] and "`sort`" in lines["leads"]
    assert "`sort`" not in lines["csat"] and "`sort`" not in lines["reports"]


class FakeServiceDesk(ServiceDeskServiceServicer):
    """Lists no tickets, refusing an unknown status as the service does (naming its request field)."""

    def __init__(self) -> None:
        self.lists: list[desk_pb.ListTicketsRequest] = []

    async def ListTickets(self, request: desk_pb.ListTicketsRequest, context: Any) -> Any:
        self.lists.append(request)
        unknown = [FieldError("statuses", f"unknown status {s!r}") for s in request.statuses if s not in STATUSES]
        if unknown:
            status = to_status(ValidationFailed(unknown))
            await context.abort(status.code, status.details, status.trailing_metadata)
        return desk_pb.ListTicketsResponse(page_info=common_pb2.PageInfo())


@pytest.fixture
def desk() -> FakeServiceDesk:
    return FakeServiceDesk()  # type: ignore[abstract]  # the calls these tests make only


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path, desk: FakeServiceDesk) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway (the default export rate limit: a burst of 5), its service desk the fake."""
    async with (
        serving(
            lambda server: add_ServiceDeskServiceServicer_to_server(desk, server),
            add_no_custom_fields,
        ) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, service_desk=target) as client,
    ):
        yield client


def auth(role: str, sub: str) -> dict[str, str]:
    token = issue_dev_token(secret=SECRET, sub=sub, roles=[role], team="east", region="north")
    return {"Authorization": f"Bearer {token}"}


# Seven values the ticket list refuses (text PostgreSQL cannot store among them): more than the
# export rate limit's burst.
REFUSED = [{"status": "bogus"}, {"channel": "fax"}, {"priority": "p1"}, {"sort": "nope"}, {"status": "old"},
           {"escalated": "maybe"}, {"q": "router\x00"}]  # fmt: skip


async def test_a_refused_export_is_not_audited_nor_counted_against_the_export_limit(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    manager = auth("service_manager", sub="u-manager")

    refused = [await gateway.get("/api/v1/exports/tickets", params=params, headers=manager) for params in REFUSED]
    exported = await gateway.get("/api/v1/exports/tickets", params={"status": "new"}, headers=manager)
    trail = await gateway.get("/api/v1/audit-events", params={"actor": "u-manager"}, headers=auth("admin", "u-admin"))

    assert [response.status_code for response in refused] == [422] * len(REFUSED)
    assert refused[0].json()["errors"][0]["field"] == "status[0]"
    assert exported.status_code == 200, exported.text  # the refusals took none of the limit's burst
    assert [list(request.statuses) for request in desk.lists] == [["new"]]
    audited = [(event["action"], event["reason"]) for event in trail.json()["items"]]
    assert audited == [("export", "filters: status=new")]


async def test_an_exports_search_text_is_masked_in_its_audit_row(gateway: httpx.AsyncClient) -> None:
    manager = auth("service_manager", sub="u-manager")

    exported = await gateway.get("/api/v1/exports/tickets", params={"q": "13812345678"}, headers=manager)
    trail = await gateway.get("/api/v1/audit-events", params={"actor": "u-manager"}, headers=auth("admin", "u-admin"))

    assert exported.status_code == 200, exported.text
    [reason] = [event["reason"] for event in trail.json()["items"] if event["action"] == "export"]
    assert "13812345678" not in reason and reason.startswith("filters: q=1")


async def test_a_yes_no_filter_reaches_the_service_as_the_list_route_reads_it(
    gateway: httpx.AsyncClient, desk: FakeServiceDesk
) -> None:
    manager = auth("service_manager", sub="u-manager")

    exported = await gateway.get("/api/v1/exports/tickets", params={"escalated": "1"}, headers=manager)
    listed = await gateway.get("/api/v1/tickets", params={"escalated": "1"}, headers=manager)

    assert (exported.status_code, listed.status_code) == (200, 200), exported.text
    assert [request.escalated for request in desk.lists] == ["true", "true"]
