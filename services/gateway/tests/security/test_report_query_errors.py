"""A report's filters arrive as query parameters; the analytics service refuses them by their place
in its request (`filter.period_to`, `filter.currency`). The 422 names the query parameter the
client sent, as every other route's does, on each report route and on the reports export. Real
routes, against a fake analytics service that checks a filter as the service does."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.analytics.v1 import analytics_service_pb2 as analytics_pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceServicer, add_AnalyticsServiceServicer_to_server
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.money import parse_currency
from gateway.testing import add_no_custom_fields, refuse, serving, started_gateway
from gateway.token_cli import issue_dev_token

pytestmark = pytest.mark.integration

SECRET = "report-query-errors-" + "s" * 30


class FakeAnalytics(AnalyticsServiceServicer):
    """Every report refuses its filter as `analytics.handlers.ReportFilter.validated` does, naming
    the request's fields; a customer-value page refuses a cursor it never issued."""

    async def _check(self, context: Any, request: Any) -> None:
        given = request.filter
        bounded = given.HasField("period_from") and given.HasField("period_to")
        try:
            if bounded and given.period_from.ToDatetime() >= given.period_to.ToDatetime():
                raise ValidationFailed([FieldError("filter.period_to", "must be after period_from")])
            parse_currency(given.currency or "CNY", field="filter.currency")
            if isinstance(request, analytics_pb.GetCustomerValueRequest) and request.page.cursor:
                raise ValidationFailed([FieldError("cursor", "was not issued by this service")])
        except ValidationFailed as error:
            await refuse(context, error)

    async def GetSalesFunnel(self, request: analytics_pb.GetSalesFunnelRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetSalesFunnelResponse()

    async def GetLeadSourceReport(self, request: analytics_pb.GetLeadSourceReportRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetLeadSourceReportResponse()

    async def GetRepPerformance(self, request: analytics_pb.GetRepPerformanceRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetRepPerformanceResponse()

    async def GetServiceReport(self, request: analytics_pb.GetServiceReportRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetServiceReportResponse()

    async def GetCustomerValue(self, request: analytics_pb.GetCustomerValueRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetCustomerValueResponse()

    async def GetDataCompleteness(self, request: analytics_pb.GetDataCompletenessRequest, context: Any) -> Any:
        await self._check(context, request)
        return analytics_pb.GetDataCompletenessResponse()


@pytest.fixture
async def gateway(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway, whose analytics calls go to the fake, called by an admin."""
    fake = FakeAnalytics()
    token = issue_dev_token(secret=SECRET, sub="u-1", roles=["admin"], team="east", region="north")
    async with (
        serving(lambda server: add_AnalyticsServiceServicer_to_server(fake, server), add_no_custom_fields) as target,
        started_gateway(tmp_path, migrated_sqlite, secret=SECRET, token=token, analytics=target) as client,
    ):
        yield client


REPORTS = ["sales-funnel", "lead-sources", "rep-performance", "service", "customer-value", "data-completeness"]
# Query parameters the service refuses, and the one the 422 names.
REFUSED = [
    ({"period_from": "2026-12-01T00:00:00Z", "period_to": "2026-01-01T00:00:00Z"}, "period_to"),
    ({"currency": "XXX"}, "currency"),
]


def _errors(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 422, response.text
    errors: list[dict[str, str]] = response.json()["errors"]
    return errors


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize(("params", "parameter"), REFUSED)
async def test_a_filter_the_service_refuses_is_422_naming_the_query_parameter(
    gateway: httpx.AsyncClient, report: str, params: dict[str, str], parameter: str
) -> None:
    response = await gateway.get(f"/api/v1/reports/{report}", params=params)

    assert [error["field"] for error in _errors(response)] == [parameter]
    assert response.json()["detail"].startswith(f"{parameter}: ")


@pytest.mark.parametrize(("params", "parameter"), REFUSED)
async def test_a_filter_the_service_refuses_names_the_query_parameter_in_a_csv_report_and_the_export_too(
    gateway: httpx.AsyncClient, params: dict[str, str], parameter: str
) -> None:
    as_csv = await gateway.get("/api/v1/reports/service", params={**params, "format": "csv"})
    exported = await gateway.get("/api/v1/exports/reports", params={**params, "report": "customer-value"})

    assert [error["field"] for error in _errors(as_csv)] == [parameter]
    assert [error["field"] for error in _errors(exported)] == [parameter]


async def test_an_error_naming_a_query_parameter_already_keeps_its_name(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/api/v1/reports/customer-value", params={"cursor": "forged"})

    assert _errors(response) == [{"field": "cursor", "message": "was not issued by this service"}]


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("value", ["2026-12-07T00:00:00", "2026-12-07", "1796601600"])
async def test_a_report_period_without_a_time_zone_is_refused_not_read_as_utc(
    gateway: httpx.AsyncClient, report: str, value: str
) -> None:
    """An analyst's local midnight read as UTC would move the period by hours, silently."""
    response = await gateway.get(f"/api/v1/reports/{report}", params={"period_from": value})
    exported = await gateway.get("/api/v1/exports/reports", params={"report": report, "period_from": value})

    assert [error["field"] for error in _errors(response)] == ["period_from"]
    assert [error["field"] for error in _errors(exported)] == ["period_from"]


@pytest.mark.parametrize("report", REPORTS)
async def test_a_lead_source_filter_applies_to_the_reports_of_leads_and_deals_only(
    gateway: httpx.AsyncClient, report: str
) -> None:
    response = await gateway.get(f"/api/v1/reports/{report}", params={"source": "web"})
    exported = await gateway.get("/api/v1/exports/reports", params={"report": report, "source": "web"})

    if report in ("sales-funnel", "lead-sources"):
        assert response.status_code == exported.status_code == 200, (response.text, exported.text)
        return
    assert _errors(response) == [{"field": "source", "message": f"filter 'source' does not apply to report {report}"}]
    assert [error["field"] for error in _errors(exported)] == ["source"]
