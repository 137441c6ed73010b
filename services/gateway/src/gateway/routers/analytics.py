"""Analytics over REST (SPEC §8): one route per report under `/reports/...`, resource `reports`.

Permissions come only from `require(...)`/`Access`; the analytics service limits rows to the
caller's record scope. `?format=csv` returns the same report as CSV: it needs the `export` action
as well, is rate limited with the other exports and audited. (The generic `/exports/{resource}`
route streams one resource's records with policy-declared columns; a report is chosen per request
and has its own columns, which that route cannot validate before it starts streaming.)

Money is `{"amount": "12.50", "currency": "CNY"}`; rates and durations are decimal strings, null
when undefined (nothing to divide by).
"""

from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from crm.analytics.v1 import analytics_service_pb2 as pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from crm.common.v1 import common_pb2
from crm_platform.timeutil import from_timestamp, isoformat, to_timestamp
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gateway.security import Access, SecurityProblem, require
from gateway.security.access import runtime_of
from gateway.security.exports import csv_line
from gateway.security.problems import rate_limited

router = APIRouter(tags=["analytics"])

ReportsRead = Annotated[Access, Depends(require("reports", "read"))]
Format = Annotated[Literal["json", "csv"], Query(description="csv needs the export permission")]

# Decimal-string fields of the report messages: "" (undefined) becomes null in JSON.
_DECIMAL_SUFFIXES = ("_rate", "_compliance", "_average", "_days", "_hours", "_minutes", "_in_stage")
_DECIMAL_NAMES = frozenset({"roi", "conversion_to_next", "completeness", "rate", "data_completeness"})


def _stub(request: Request) -> AnalyticsServiceStub:
    return request.app.state.upstreams.stub("analytics", AnalyticsServiceStub)  # type: ignore[no-any-return]


class Filters:
    """The query parameters every report takes."""

    def __init__(
        self,
        period_from: Annotated[datetime | None, Query(description="inclusive, RFC 3339")] = None,
        period_to: Annotated[datetime | None, Query(description="exclusive, RFC 3339")] = None,
        owner_id: Annotated[str, Query(max_length=100)] = "",
        team: Annotated[str, Query(max_length=100)] = "",
        source: Annotated[str, Query(max_length=100)] = "",
        currency: Annotated[str, Query(max_length=3, description="ISO 4217; default: the reporting currency")] = "",
    ) -> None:
        self.period_from = period_from
        self.period_to = period_to
        self.owner_id = owner_id
        self.team = team
        self.source = source
        self.currency = currency.upper()

    def proto(self) -> pb.ReportFilter:
        return pb.ReportFilter(
            period_from=to_timestamp(self.period_from),
            period_to=to_timestamp(self.period_to),
            owner_id=self.owner_id,
            team=self.team,
            source=self.source,
            currency=self.currency,
        )

    def described(self) -> str:
        values = {
            "period_from": isoformat(self.period_from),
            "period_to": isoformat(self.period_to),
            "owner_id": self.owner_id,
            "team": self.team,
            "source": self.source,
            "currency": self.currency,
        }
        return ", ".join(f"{name}={value}" for name, value in values.items() if value) or "none"


ReportFilters = Annotated[Filters, Depends()]


def plain(message: Message) -> dict[str, Any]:
    """A report message as JSON values: int64 as numbers, Money as amount/currency, timestamps as
    RFC 3339, undefined rates as null."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            result[field.name] = [plain(item) if field.message_type else item for item in value]
        elif field.message_type is not None:
            if not message.HasField(field.name):
                result[field.name] = None
            elif field.message_type.full_name == "google.protobuf.Timestamp":
                result[field.name] = isoformat(from_timestamp(value))
            else:
                result[field.name] = plain(value)
        elif field.type == FieldDescriptor.TYPE_STRING and _is_decimal(field.name):
            result[field.name] = value or None
        else:
            result[field.name] = value
    return result


def _is_decimal(name: str) -> bool:
    return name in _DECIMAL_NAMES or name.endswith(_DECIMAL_SUFFIXES)


async def _respond(
    request: Request,
    access: Access,
    report: str,
    body: dict[str, Any],
    rows: Iterable[Mapping[str, Any]],
    filters: Filters,
    format: str,
) -> Any:
    if format == "json":
        return body
    runtime = runtime_of(request)
    try:
        access.ensure("export")
    except SecurityProblem as problem:
        await runtime.audit_denied(request, access.principal, "reports", "export", problem)
        raise
    wait = runtime.export_limiter.acquire(f"{access.principal.kind}:{access.principal.user_id}")
    if wait:
        raise rate_limited(wait, "export rate limit exceeded")
    table = [_flat(row) for row in rows]
    columns = list(table[0]) if table else []
    await access.audit("export", report, fields=columns, reason=f"report {report}; filters: {filters.described()}")

    async def lines() -> AsyncIterator[str]:
        yield csv_line(columns)
        for row in table:
            yield csv_line(row.get(column) for column in columns)

    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{report}.csv"'},
    )


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: lists of reasons joined, nested records other than Money flattened."""
    flat: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, list):
            flat[name] = "; ".join(
                f"{item['code']}: {item['detail']}" if isinstance(item, Mapping) else str(item) for item in value
            )
        else:
            flat[name] = value
    return flat


_CSV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "JSON, or CSV with format=csv"}
}


@router.get("/reports/sales-funnel", responses=_CSV)
async def sales_funnel(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    pipeline_id: Annotated[str, Query(max_length=64)] = "",
    format: Format = "json",
) -> Any:
    """Deals per stage, stage-to-stage conversion, win rate, average deal size, sales cycle."""
    reply = await _stub(request).GetSalesFunnel(
        pb.GetSalesFunnelRequest(filter=filters.proto(), pipeline_id=pipeline_id), metadata=access.grpc_metadata()
    )
    body = plain(reply)
    return await _respond(request, access, "sales-funnel", body, body["stages"], filters, format)


@router.get("/reports/lead-sources", responses=_CSV)
async def lead_sources(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    group_by: Annotated[Literal["source", "campaign"], Query()] = "source",
    format: Format = "json",
) -> Any:
    """Leads by source or campaign: volume, contacted %, converted %, first-contact time, revenue, cost, ROI."""
    grouping = pb.LEAD_GROUPING_CAMPAIGN if group_by == "campaign" else pb.LEAD_GROUPING_SOURCE
    reply = await _stub(request).GetLeadSourceReport(
        pb.GetLeadSourceReportRequest(filter=filters.proto(), group_by=grouping), metadata=access.grpc_metadata()
    )
    body = plain(reply)
    return await _respond(request, access, "lead-sources", body, body["rows"], filters, format)


@router.get("/reports/rep-performance", responses=_CSV)
async def rep_performance(
    request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json"
) -> Any:
    """Per rep: activities, task completion, deals won, CSAT of their tickets, data completeness."""
    reply = await _stub(request).GetRepPerformance(
        pb.GetRepPerformanceRequest(filter=filters.proto()), metadata=access.grpc_metadata()
    )
    body = plain(reply)
    return await _respond(request, access, "rep-performance", body, body["rows"], filters, format)


@router.get("/reports/service", responses=_CSV)
async def service(request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json") -> Any:
    """SLA compliance, first-response and resolution times, backlog, CSAT average and % satisfied."""
    reply = await _stub(request).GetServiceReport(
        pb.GetServiceReportRequest(filter=filters.proto()), metadata=access.grpc_metadata()
    )
    body = plain(reply)
    return await _respond(request, access, "service", body, [body], filters, format)


@router.get("/reports/customer-value", responses=_CSV)
async def customer_value(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    at_risk_only: bool = False,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str, Query(max_length=500)] = "",
    format: Format = "json",
) -> Any:
    """Per account: won and paid amounts, churn risk and its reasons; highest paid first."""
    reply = await _stub(request).GetCustomerValue(
        pb.GetCustomerValueRequest(
            filter=filters.proto(),
            at_risk_only=at_risk_only,
            page=common_pb2.PageRequest(limit=access.page_limit(limit), cursor=cursor),
        ),
        metadata=access.grpc_metadata(),
    )
    items = [plain(row) for row in reply.rows]
    body = {"items": items, "next_cursor": reply.page_info.next_cursor or None}
    return await _respond(request, access, "customer-value", body, items, filters, format)


@router.get("/reports/data-completeness", responses=_CSV)
async def data_completeness(
    request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json"
) -> Any:
    """Share of filled key fields of leads and accounts, overall and per field."""
    reply = await _stub(request).GetDataCompleteness(
        pb.GetDataCompletenessRequest(filter=filters.proto()), metadata=access.grpc_metadata()
    )
    body = plain(reply)
    overall = {"field": "(all key fields)", "filled": None}
    per_field = [
        {"entity": row["entity"], "records": row["records"], **fill}
        for row in body["rows"]
        for fill in [{**overall, "rate": row["completeness"]}, *row["fields"]]
    ]
    return await _respond(request, access, "data-completeness", body, per_field, filters, format)
