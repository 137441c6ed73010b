"""The export sources of the real gateway for reports, the forecast, CSAT, activities and the audit
trail (`GET /api/v1/exports/{resource}`), against fake owning services: CSV with a header row and
the rows of the RPC (paged through by its cursor), the caller's export scope in the call's
metadata, 403 (audited) without the `export` action, 422 naming a bad filter before anything is
audited, and an `export` row in the audit trail for each export."""

import asyncio
import csv
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as accounts_pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from crm.analytics.v1 import analytics_service_pb2 as analytics_pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from crm.common.v1 import common_pb2, custom_fields_pb2
from crm.sales.v1 import sales_service_pb2 as sales_pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm.servicedesk.v1 import servicedesk_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as servicedesk_pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from crm_platform.principal import ScopeKind, context_from_metadata, resource_scope_from_metadata
from crm_platform.testing import infra
from crm_platform.testing.polling import eventually
from fastapi import FastAPI
from gateway.routers import audit as audit_router
from gateway.routers.exports import ExportTooLarge
from gateway.security.exports import registered_exports
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration


def _money(amount: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount, currency="CNY")


class Calls:
    """Every call the fakes answered: (method, request, record scope), and the caller's scope for
    accounts where it went along."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.accounts_scopes: list[Any] = []

    def note(self, method: str, request: Any, metadata: Any) -> None:
        self.calls.append((method, request, context_from_metadata(metadata).scope))
        self.accounts_scopes.append(resource_scope_from_metadata(metadata, "accounts"))

    def of(self, method: str) -> list[tuple[Any, Any]]:
        return [(request, scope) for name, request, scope in self.calls if name == method]


class FakeAnalytics:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def GetSalesFunnel(self, request: Any, metadata: Any = None) -> analytics_pb.GetSalesFunnelResponse:
        self.calls.note("GetSalesFunnel", request, metadata)
        return analytics_pb.GetSalesFunnelResponse(
            stages=[
                analytics_pb.FunnelStage(stage="qualify", count=3, amount=_money("300.00"), reached=5),
                analytics_pb.FunnelStage(
                    stage="won", count=1, amount=_money("100.00"), reached=1, conversion_to_next="0.2000"
                ),
            ],
            opportunities=5,
            open_count=3,
            won_count=1,
            lost_count=1,
            win_rate="0.5000",
            won_amount=_money("100.00"),
            average_deal_size=_money("100.00"),
            mean_sales_cycle_days="12.50",
        )

    async def GetLeadSourceReport(self, request: Any, metadata: Any = None) -> analytics_pb.GetLeadSourceReportResponse:
        self.calls.note("GetLeadSourceReport", request, metadata)
        return analytics_pb.GetLeadSourceReportResponse(
            rows=[analytics_pb.LeadSourceRow(key="web_form", leads=4, contacted=2, contacted_rate="0.5000")]
        )

    async def GetRepPerformance(self, request: Any, metadata: Any = None) -> analytics_pb.GetRepPerformanceResponse:
        self.calls.note("GetRepPerformance", request, metadata)
        return analytics_pb.GetRepPerformanceResponse(
            rows=[analytics_pb.RepPerformanceRow(owner_id="u-1", team="team-a", activities=7)]
        )

    async def GetServiceReport(self, request: Any, metadata: Any = None) -> analytics_pb.GetServiceReportResponse:
        self.calls.note("GetServiceReport", request, metadata)
        return analytics_pb.GetServiceReportResponse(tickets=9, backlog=2, csat_average="4.50")

    async def GetCustomerValue(self, request: Any, metadata: Any = None) -> analytics_pb.GetCustomerValueResponse:
        self.calls.note("GetCustomerValue", request, metadata)
        reasons = [analytics_pb.ChurnReason(code="LOW_CSAT", detail="2.0")]
        if not request.page.cursor:
            row = analytics_pb.CustomerValueRow(
                account_id="a-1", account_name="=HYPERLINK()", paid_amount=_money("50.00"), churn_risk="medium"
            )
            row.reasons.extend(reasons)
            return analytics_pb.GetCustomerValueResponse(
                rows=[row], page_info=common_pb2.PageInfo(next_cursor="page-2")
            )
        return analytics_pb.GetCustomerValueResponse(
            rows=[analytics_pb.CustomerValueRow(account_id="a-2", account_name="Beta", churn_risk="low")]
        )

    async def GetDataCompleteness(self, request: Any, metadata: Any = None) -> analytics_pb.GetDataCompletenessResponse:
        self.calls.note("GetDataCompleteness", request, metadata)
        return analytics_pb.GetDataCompletenessResponse(
            rows=[
                analytics_pb.CompletenessRow(
                    entity="lead",
                    records=10,
                    completeness="0.7000",
                    fields=[analytics_pb.FieldFill(field="phone", filled=6, rate="0.6000")],
                )
            ]
        )


class FakeSales:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def GetForecast(self, request: Any, metadata: Any = None) -> sales_pb.GetForecastResponse:
        self.calls.note("GetForecast", request, metadata)
        return sales_pb.GetForecastResponse(
            rows=[
                sales_pb.ForecastRow(
                    period="2026-Q4",
                    group="team-a",
                    currency="CNY",
                    pipeline=_money("1000.00"),
                    weighted=_money("400.00"),
                    commit=_money("200.00"),
                    best_case=_money("600.00"),
                    closed_won=_money("150.00"),
                    open_count=4,
                    won_count=1,
                )
            ]
        )

    async def GetAttainment(self, request: Any, metadata: Any = None) -> sales_pb.GetAttainmentResponse:
        self.calls.note("GetAttainment", request, metadata)
        row = sales_pb.AttainmentRow(
            period="2026-12", group="team-a", currency="CNY", target=_money("300.00"), closed_won=_money("150.00"),
            attainment="0.5000", commit=_money("200.00"), weighted=_money("400.00"),
        )  # fmt: skip
        return sales_pb.GetAttainmentResponse(rows=[row])


class FakeServiceDesk:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def ListCsatResponses(self, request: Any, metadata: Any = None) -> servicedesk_pb.ListCsatResponsesResponse:
        self.calls.note("ListCsatResponses", request, metadata)
        at = Timestamp(seconds=1_790_000_000)
        if not request.page.cursor:
            return servicedesk_pb.ListCsatResponsesResponse(
                items=[
                    servicedesk_pb2.CsatResponse(id="c-1", ticket_id="t-1", score=5, comment="great", submitted_at=at)
                ],
                page_info=common_pb2.PageInfo(next_cursor="c-1"),
            )
        return servicedesk_pb.ListCsatResponsesResponse(
            items=[servicedesk_pb2.CsatResponse(id="c-2", ticket_id="t-2", score=2, comment="+slow", submitted_at=at)]
        )


class FakeAccounts:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def ListActivities(self, request: Any, metadata: Any = None) -> accounts_pb.ListActivitiesResponse:
        self.calls.note("ListActivities", request, metadata)
        if not request.page.cursor:
            return accounts_pb.ListActivitiesResponse(
                items=[accounts_pb2.Activity(id="act-1", account_id=request.account_id, kind="call", subject="Intro")],
                page_info=common_pb2.PageInfo(next_cursor="act-1"),
            )
        return accounts_pb.ListActivitiesResponse(
            items=[accounts_pb2.Activity(id="act-2", account_id=request.account_id, kind="visit", subject="Demo")]
        )

    async def ListCustomFields(self, request: Any, metadata: Any = None) -> custom_fields_pb2.ListCustomFieldsResponse:
        return custom_fields_pb2.ListCustomFieldsResponse()


class FakeUpstreams:
    def __init__(self) -> None:
        self.calls = Calls()
        self.fakes: dict[Any, Any] = {
            AnalyticsServiceStub: FakeAnalytics(self.calls),
            SalesServiceStub: FakeSales(self.calls),
            ServiceDeskServiceStub: FakeServiceDesk(self.calls),
            AccountsServiceStub: FakeAccounts(self.calls),
        }

    def stub(self, name: str, stub_type: Any) -> Any:
        return self.fakes.get(stub_type, self.fakes[AccountsServiceStub])

    async def close(self) -> None:
        return None


@pytest.fixture
async def app(real_app: FastAPI) -> AsyncIterator[FastAPI]:
    upstreams = real_app.state.upstreams
    real_app.state.upstreams = FakeUpstreams()
    yield real_app
    real_app.state.upstreams = upstreams


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def calls(app: FastAPI) -> Calls:
    fake: FakeUpstreams = app.state.upstreams
    return fake.calls


def table(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.text)))


def test_the_five_resources_are_exportable(app: FastAPI) -> None:
    assert {"reports", "forecast", "csat", "activities", "audit_events"} <= set(registered_exports())


async def test_sales_funnel_report_as_csv(app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any) -> None:
    response = await client.get(
        "/api/v1/exports/reports?format=csv&report=sales-funnel&pipeline_id=p-1&team=team-a"
        "&period_from=2026-01-01T00:00:00Z",
        headers=real_app_auth("sales_manager"),
    )
    rows = table(response)
    stage_columns = ["stage", "count", "amount", "reached", "conversion_to_next", "mean_days_in_stage"]
    whole = ["opportunities", "open_count", "won_count", "lost_count", "win_rate", "won_amount", "average_deal_size"]
    assert rows[0] == [*stage_columns, *whole, "mean_sales_cycle_days"]
    # The stages, then the figures of the whole funnel on a row of their own.
    assert rows[1:] == [
        ["qualify", "3", "300.00 CNY", "5", "", "", *[""] * 8],
        ["won", "1", "100.00 CNY", "1", "0.2000", "", *[""] * 8],
        ["total", *[""] * 5, "5", "3", "1", "1", "0.5000", "100.00 CNY", "100.00 CNY", "12.50"],
    ]
    assert response.headers["content-disposition"] == 'attachment; filename="reports.csv"'
    ((request, scope),) = calls(app).of("GetSalesFunnel")
    assert request.pipeline_id == "p-1"
    assert request.filter.team == "team-a"
    assert request.filter.period_from.seconds == 1_767_225_600
    # The export grant's scope travels with the call: a sales manager's team.
    assert scope.kind is ScopeKind.TEAM and scope.team == "team-a"


@pytest.mark.parametrize(
    ("query", "method", "header", "expected"),
    [
        ("report=lead-sources&group_by=campaign", "GetLeadSourceReport", "key", [["web_form"]]),
        ("report=rep_performance", "GetRepPerformance", "owner_id", [["u-1"]]),
        ("report=service", "GetServiceReport", "tickets", [["9"]]),
        ("report=data-completeness", "GetDataCompleteness", "entity", [["lead"], ["lead"]]),
    ],
)
async def test_other_reports_as_csv(
    query: str,
    method: str,
    header: str,
    expected: list[list[str]],
    app: FastAPI,
    client: httpx.AsyncClient,
    real_app_auth: Any,
) -> None:
    rows = table(await client.get(f"/api/v1/exports/reports?{query}", headers=real_app_auth("analyst")))
    assert rows[0][0] == header
    assert [row[:1] for row in rows[1:]] == expected
    ((request, scope),) = calls(app).of(method)
    assert scope.kind is ScopeKind.ALL
    if method == "GetLeadSourceReport":
        assert request.group_by == analytics_pb.LEAD_GROUPING_CAMPAIGN
    if method == "GetDataCompleteness":
        assert rows[0] == ["entity", "records", "field", "filled", "rate"]
        assert rows[1:] == [["lead", "10", "(all key fields)", "", "0.7000"], ["lead", "10", "phone", "6", "0.6000"]]


async def test_customer_value_is_paged_through(app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any) -> None:
    rows = table(
        await client.get(
            "/api/v1/exports/reports?report=customer-value&at_risk_only=true", headers=real_app_auth("finance")
        )
    )
    assert rows[0][:3] == ["account_id", "account_name", "owner_id"]
    reasons = rows[0].index("reasons")
    assert [row[0] for row in rows[1:]] == ["a-1", "a-2"]
    assert rows[1][1] == "'=HYPERLINK()"  # no formula injection
    assert rows[1][reasons] == "LOW_CSAT: 2.0"
    pages = calls(app).of("GetCustomerValue")
    assert [request.page.cursor for request, _ in pages] == ["", "page-2"]
    assert all(request.at_risk_only for request, _ in pages)


async def test_the_customer_value_reports_csv_links_its_next_page(
    client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    """The report's own CSV is one page, as its JSON is: `Link` rel="next" names the next one, so
    no row is left out without a word."""
    first = await client.get("/api/v1/reports/customer-value?format=csv&limit=1", headers=real_app_auth("finance"))
    assert first.status_code == 200, first.text
    assert [row[0] for row in table(first)[1:]] == ["a-1"]
    link = first.headers["Link"]
    assert link.endswith('>; rel="next"') and "cursor=page-2" in link and "limit=1" in link

    last = await client.get(link[1 : link.index(">")], headers=real_app_auth("finance"))
    assert [row[0] for row in table(last)[1:]] == ["a-2"] and "Link" not in last.headers


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "report"),
        ("report=pipeline-velocity", "report"),
        ("report=service&pipeline_id=p-1", "pipeline_id"),
        ("report=sales-funnel&period_from=yesterday", "period_from"),
        ("report=lead-sources&group_by=owner", "group_by"),
        ("report=customer-value&at_risk_only=perhaps", "at_risk_only"),
        ("report=service&colour=red", "colour"),
        # One value per filter: the last one alone would be exported, without a word.
        ("report=lead-sources&group_by=source&group_by=campaign", "group_by"),
        ("report=sales-funnel&report=service", "report"),
    ],
)
async def test_a_bad_report_filter_is_422_naming_it(
    query: str, field: str, app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    response = await client.get(f"/api/v1/exports/reports?{query}", headers=real_app_auth("analyst"))
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert not calls(app).calls


async def test_forecast_as_csv(app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any) -> None:
    response = await client.get(
        "/api/v1/exports/forecast?period=quarter&group_by=team&from=2026-10-01&to=2026-12-31&owner_id=me",
        headers=real_app_auth("sales_manager", sub="u-boss"),
    )
    rows = table(response)
    assert rows == [
        ["period", "group", "pipeline", "weighted", "commit", "best_case", "closed_won"],
        ["2026-Q4", "team-a", "1000.00 CNY", "400.00 CNY", "200.00 CNY", "600.00 CNY", "150.00 CNY"],
    ]
    ((request, scope),) = calls(app).of("GetForecast")
    assert request.period == sales_pb.FORECAST_PERIOD_QUARTER
    assert request.group_by == sales_pb.FORECAST_GROUP_BY_TEAM
    assert (request.from_date, request.to_date, request.owner_id) == ("2026-10-01", "2026-12-31", "u-boss")
    assert scope.kind is ScopeKind.TEAM


@pytest.mark.parametrize(("query", "field"), [("period=year", "period"), ("from=soon", "from")])
async def test_a_bad_forecast_filter_is_422(
    query: str, field: str, app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    response = await client.get(f"/api/v1/exports/forecast?{query}", headers=real_app_auth("finance"))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


async def test_csat_as_csv_paged_in_the_region(app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any) -> None:
    rows = table(await client.get("/api/v1/exports/csat?ticket_id=t-1", headers=real_app_auth("service_manager")))
    assert rows[0] == ["id", "ticket_id", "account_id", "score", "comment", "submitted_at", "channel"]
    assert [row[:5] for row in rows[1:]] == [["c-1", "t-1", "", "5", "great"], ["c-2", "t-2", "", "2", "'+slow"]]
    pages = calls(app).of("ListCsatResponses")
    assert [request.page.cursor for request, _ in pages] == ["", "c-1"]
    assert pages[0][0].ticket_id == "t-1"
    assert pages[0][1].kind is ScopeKind.REGION and pages[0][1].region == "north"


async def test_activities_of_an_account_as_csv(app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any) -> None:
    rows = table(await client.get("/api/v1/exports/activities?account_id=a-9", headers=real_app_auth("sales_manager")))
    header = rows[0]
    assert header[:3] == ["id", "account_id", "contact_id"]
    assert {"kind", "subject", "owner_id", "team", "region"} <= set(header)
    assert [(row[0], row[1], row[header.index("subject")]) for row in rows[1:]] == [
        ("act-1", "a-9", "Intro"),
        ("act-2", "a-9", "Demo"),
    ]
    pages = calls(app).of("ListActivities")
    assert [request.page.cursor for request, _ in pages] == ["", "act-1"]
    assert pages[0][1].kind is ScopeKind.TEAM
    # As on the list route, the account is checked in the caller's scope for accounts.
    assert [scope.kind for scope in calls(app).accounts_scopes] == [ScopeKind.TEAM, ScopeKind.TEAM]


async def test_activities_need_an_account_or_contact(
    app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    response = await client.get("/api/v1/exports/activities", headers=real_app_auth("sales_manager"))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "account_id"
    assert not calls(app).calls
    assert (
        await client.get("/api/v1/exports/activities?contact_id=c-1", headers=real_app_auth("sales_manager"))
    ).status_code == 200


@pytest.mark.parametrize(
    ("role", "resource"),
    [
        ("sales_rep", "reports?report=service"),
        ("service_agent", "reports?report=service"),
        ("sales_rep", "forecast"),
        ("marketing", "forecast"),
        ("service_agent", "csat"),
        ("sales_manager", "csat"),
        ("sales_rep", "activities?account_id=a-1"),
        ("service_manager", "activities?account_id=a-1"),
        ("analyst", "audit_events"),
        ("finance", "audit_events"),
    ],
)
async def test_roles_without_export_get_403(
    role: str, resource: str, app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    response = await client.get(f"/api/v1/exports/{resource}", headers=real_app_auth(role))
    assert response.status_code == 403, response.text
    assert not calls(app).calls
    denied = await client.get("/api/v1/audit-events?action=denied", headers=real_app_auth("admin"))
    name = resource.split("?")[0]
    assert any(e["resource"] == name and e["actor"]["roles"] == [role] for e in denied.json()["items"])


async def test_audit_trail_export_pages_and_every_export_is_audited(
    app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_router, "_EXPORT_PAGE", 2)  # several pages of the trail
    admin = real_app_auth("admin", sub="u-admin")
    for path in (
        "reports?report=service&team=team-a",
        "forecast",
        "csat",
        "activities?account_id=a-1",
    ):
        assert (await client.get(f"/api/v1/exports/{path}", headers=admin)).status_code == 200
    rows = table(await client.get("/api/v1/exports/audit_events?action=export", headers=admin))
    header = rows[0]
    assert header[:3] == ["id", "occurred_at", "actor"]
    resources = [row[header.index("resource")] for row in rows[1:]]
    # Newest first, the audit export's own row included.
    assert resources == ["audit_events", "activities", "csat", "forecast", "reports"]
    assert rows[-1][header.index("reason")] == "filters: report=service, team=team-a"

    listed = await client.get("/api/v1/audit-events?action=export", headers=admin)
    assert {e["resource"] for e in listed.json()["items"]} == {
        "reports",
        "forecast",
        "csat",
        "activities",
        "audit_events",
    }
    bad = await client.get("/api/v1/exports/audit_events?since=never", headers=admin)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "since"


async def test_an_export_of_exactly_its_row_limit_is_whole(
    app: FastAPI, client: httpx.AsyncClient, real_app_auth: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.state.security.settings, "export_max_rows", 2)

    response = await client.get("/api/v1/exports/csat", headers=real_app_auth("service_manager"))

    assert [row[0] for row in table(response)] == ["id", "c-1", "c-2"]
    assert response.headers["X-Export-Row-Limit"] == "2"


async def test_an_export_broken_off_at_its_limit_is_a_warning_in_the_log_not_an_error_with_a_traceback(
    app: FastAPI, real_app_auth: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Served by uvicorn, as in production: it logs the exception that ends a response as an error."""
    monkeypatch.setattr(app.state.security.settings, "export_max_rows", 1)
    port = infra.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        assert await eventually(lambda: asyncio.to_thread(infra.port_open, "127.0.0.1", port), timeout=10)
        with caplog.at_level(logging.INFO):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                with pytest.raises(httpx.RemoteProtocolError):  # no last chunk: the file is not whole
                    await client.get("/api/v1/exports/csat", headers=real_app_auth("service_manager"))
                answered = await client.get("/api/v1/exports/csat?limit=x", headers=real_app_auth("service_manager"))
    finally:
        server.should_exit = True
        await serving
    assert answered.status_code == 422  # the server goes on serving
    logged = [(r.name, r.levelname) for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged == [("gateway.routers.exports", "WARNING")], logged


async def test_an_export_beyond_its_row_limit_is_broken_off_never_handed_out_as_a_shorter_whole_file(
    app: FastAPI, real_app_auth: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.state.security.settings, "export_max_rows", 1)
    sent: list[dict[str, Any]] = []

    requested = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if requested.is_set():
            await asyncio.Event().wait()  # the client stays connected
        requested.set()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(name.lower().encode(), value.encode()) for name, value in real_app_auth("service_manager").items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/api/v1/exports/csat", "raw_path": b"/api/v1/exports/csat", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"gateway"), *headers], "client": ("127.0.0.1", 5000), "server": ("gateway", 80),
    }  # fmt: skip
    with pytest.raises(ExportTooLarge, match="more than 1 rows"):
        await app(scope, receive, send)

    start, *bodies = sent
    assert start["status"] == 200 and (b"x-export-row-limit", b"1") in start["headers"]
    assert b"".join(body["body"] for body in bodies).decode().splitlines()[1].startswith("c-1")
    assert all(body.get("more_body") for body in bodies)  # no last chunk: the file is not ended as whole


@pytest.mark.parametrize(
    ("path", "report", "header"),
    [
        ("forecast", "forecast", ["period", "group", "currency", "pipeline", "weighted"]),
        ("forecast/attainment", "attainment", ["period", "group", "currency", "closed_won", "commit"]),
    ],
)
async def test_the_forecast_and_attainment_routes_answer_csv_as_an_audited_export(
    path: str, report: str, header: list[str], client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    manager = real_app_auth("sales_manager", sub="u-boss")
    rows = table(await client.get(f"/api/v1/{path}?format=csv&group_by=team&team=team-a", headers=manager))
    refused = await client.get(f"/api/v1/{path}?format=csv", headers=real_app_auth("sales_rep"))

    assert rows[0][:5] == header
    assert rows[1][:3] == ["2026-12" if report == "attainment" else "2026-Q4", "team-a", "CNY"]
    assert "150.00 CNY" in rows[1]
    assert refused.status_code == 403, refused.text  # a rep reads the forecast, but exports nothing
    trail = await client.get("/api/v1/audit-events?resource=forecast", headers=real_app_auth("admin"))
    # One row for the refusal, naming the action refused (a route needing `export` besides `read`).
    assert sorted((e["action"], e["outcome"], e["record_id"], e["reason"]) for e in trail.json()["items"]) == [
        ("denied", "denied", "", "export: you may not export forecast"),
        ("export", "allowed", report, f"report {report}; filters: group_by=team, team=team-a"),
    ]
