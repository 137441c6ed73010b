"""A report's CSV (`format=csv`) is read with the export grant, as `/exports/{resource}` reads: under
a policy where the caller reads reports and the forecast over their region but may export them only
for their own records, the JSON holds the region's rows and the CSV their own alone, the service
being asked with the export grant's record scope. The real gateway over fake analytics and sales
services that filter by the scope they are sent, as the real ones do."""

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.analytics.v1 import analytics_service_pb2 as analytics_pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceServicer, add_AnalyticsServiceServicer_to_server
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceServicer, add_SalesServiceServicer_to_server
from crm_platform.principal import RecordScope, ScopeKind, context_from_metadata
from gateway.testing import serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "report-csv-scope-secret-" + "s" * 30
CNY = common_pb2.Money(amount="900.00", currency="CNY")
# The reps whose records the fakes hold: (owner, team, region). The caller is u-1.
REPS = [("u-1", "east", "north"), ("u-2", "west", "north")]


def _scope(context: Any) -> RecordScope:
    return context_from_metadata(context.invocation_metadata()).scope


def _reps_in(scope: RecordScope) -> list[tuple[str, str, str]]:
    return [rep for rep in REPS if scope.allows(owner_id=rep[0], team=rep[1], region=rep[2])]


class FakeAnalytics(AnalyticsServiceServicer):
    def __init__(self) -> None:
        self.scopes: list[ScopeKind] = []

    async def GetRepPerformance(self, request: analytics_pb.GetRepPerformanceRequest, context: Any) -> Any:
        scope = _scope(context)
        self.scopes.append(scope.kind)
        rows = [
            analytics_pb.RepPerformanceRow(owner_id=owner, team=team, won_count=1, won_amount=CNY)
            for owner, team, _ in _reps_in(scope)
        ]
        return analytics_pb.GetRepPerformanceResponse(rows=rows)


class FakeSales(SalesServiceServicer):
    def __init__(self) -> None:
        self.scopes: list[ScopeKind] = []

    async def GetForecast(self, request: sales_pb.GetForecastRequest, context: Any) -> Any:
        scope = _scope(context)
        self.scopes.append(scope.kind)
        rows = [
            sales_pb.ForecastRow(period="2026-11", group=owner, currency="CNY", pipeline=CNY, closed_won=CNY)
            for owner, _, _ in _reps_in(scope)
        ]
        return sales_pb.GetForecastResponse(rows=rows)


def read_widely_export_narrowly(policy: dict[str, Any]) -> None:
    """Two roles: one reads reports and the forecast over its region, the other exports its own."""
    policy["roles"]["regional_reader"] = {
        "grants": {resource: {"actions": ["read"], "scope": "region"} for resource in ("reports", "forecast")}
    }
    policy["roles"]["own_exporter"] = {
        "grants": {resource: {"actions": ["read", "export"], "scope": "own"} for resource in ("reports", "forecast")}
    }


class Services:
    def __init__(self) -> None:
        self.analytics = FakeAnalytics()
        self.sales = FakeSales()


@pytest.fixture
def services() -> Services:
    return Services()


@pytest.fixture
async def http(tmp_path: Path, migrated_sqlite: Path, services: Services) -> AsyncIterator[httpx.AsyncClient]:
    token = issue_dev_token(
        secret=SECRET, sub="u-1", roles=["regional_reader", "own_exporter"], team="east", region="north"
    )
    async with (
        serving(
            lambda server: add_AnalyticsServiceServicer_to_server(services.analytics, server),
            lambda server: add_SalesServiceServicer_to_server(services.sales, server),
        ) as target,
        started_gateway(
            tmp_path,
            migrated_sqlite,
            secret=SECRET,
            edits=[read_widely_export_narrowly],
            token=token,
            analytics=target,
            sales=target,
        ) as client,
    ):
        yield client


def csv_rows(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


async def test_an_analytics_reports_csv_holds_only_what_the_export_grant_covers(
    http: httpx.AsyncClient, services: Services
) -> None:
    as_json = await http.get("/api/v1/reports/rep-performance")
    as_csv = await http.get("/api/v1/reports/rep-performance", params={"format": "csv"})

    assert as_json.status_code == 200, as_json.text
    assert [row["owner_id"] for row in as_json.json()["rows"]] == ["u-1", "u-2"]  # read over the region
    assert [row["owner_id"] for row in csv_rows(as_csv)] == ["u-1"]  # exported: their own only
    assert services.analytics.scopes == [ScopeKind.REGION, ScopeKind.OWN]


async def test_a_forecasts_csv_holds_only_what_the_export_grant_covers(
    http: httpx.AsyncClient, services: Services
) -> None:
    as_json = await http.get("/api/v1/forecast")
    as_csv = await http.get("/api/v1/forecast", params={"format": "csv"})

    assert as_json.status_code == 200, as_json.text
    assert [row["group"] for row in as_json.json()["rows"]] == ["u-1", "u-2"]
    assert [(row["group"], row["closed_won"]) for row in csv_rows(as_csv)] == [("u-1", "900.00 CNY")]
    assert services.sales.scopes == [ScopeKind.REGION, ScopeKind.OWN]
