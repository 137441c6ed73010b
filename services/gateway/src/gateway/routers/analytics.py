"""Analytics over REST (SPEC §8): one route per report under `/reports/...`, resource `reports`.

Permissions come only from `require(...)`/`Access`; the analytics service limits rows to the
caller's record scope. `?format=csv` returns the same report as CSV: it needs the `export` action
as well, is rate limited with the other exports and audited. The same reports are exported through
the generic route too: `GET /exports/reports?report=<name>&<the report's query parameters>`
(registered below; the report's own row fields are the columns).

Money is `{"amount": "12.50", "currency": "CNY"}`; rates and durations are decimal strings, null
when undefined (nothing to divide by).
"""

from collections.abc import AsyncIterator, Awaitable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import grpc
from crm.analytics.v1 import analytics_service_pb2 as pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceStub
from crm.common.v1 import common_pb2
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.timeutil import from_timestamp, isoformat, to_timestamp
from fastapi import Depends, Query, Request
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import TypeAdapter, ValidationError

from gateway.inputs import Instant
from gateway.report_csv import Format, flat_row, json_or_csv, report_access, report_answer
from gateway.routers import analytics_schemas as schemas
from gateway.routing import ResourceRouter
from gateway.security import Access, require
from gateway.security.exports import invalid_filter, register_export_source
from gateway.security.policy import reaches

router = ResourceRouter(tags=["analytics"])

ReportsRead = Annotated[Access, Depends(require("reports", "read"))]

# Decimal-string fields of the report messages: "" (undefined) becomes null in JSON.
_DECIMAL_SUFFIXES = ("_rate", "_compliance", "_average", "_days", "_hours", "_minutes", "_in_stage")
_DECIMAL_NAMES = frozenset({"roi", "conversion_to_next", "completeness", "rate", "data_completeness"})


def _stub(request: Request) -> AnalyticsServiceStub:
    return request.app.state.upstreams.stub("analytics", AnalyticsServiceStub)  # type: ignore[no-any-return]


ReplyT = TypeVar("ReplyT")
# The service names a refused filter by its place in the request (`filter.period_to`); the client
# sent it as the query parameter of the same name (`period_to`, on the report and export routes).
_FILTER_FIELD = "filter."


async def _report(call: Awaitable[ReplyT]) -> ReplyT:
    """The analytics service's answer to `call`; a 422 about the filter names the query parameters."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        refused = from_rpc_error(error).field_errors
        if not any(e.field.startswith(_FILTER_FIELD) for e in refused):
            raise
        raise ValidationFailed([FieldError(e.field.removeprefix(_FILTER_FIELD), e.message) for e in refused]) from None


class Filters:
    """The query parameters every report takes."""

    def __init__(
        self,
        period_from: Annotated[Instant | None, Query(description="inclusive, RFC 3339")] = None,
        period_to: Annotated[Instant | None, Query(description="exclusive, RFC 3339")] = None,
        owner_id: Annotated[str, Query(max_length=100)] = "",
        team: Annotated[str, Query(max_length=100)] = "",
        source: Annotated[
            str, Query(max_length=100, description="lead source: the sales-funnel and lead-sources reports only")
        ] = "",
        currency: Annotated[str, Query(max_length=3, description="ISO 4217; default: the reporting currency")] = "",
    ) -> None:
        self.period_from = period_from
        self.period_to = period_to
        self.owner_id = owner_id
        self.team = team
        self.source = source
        self.currency = currency.upper()

    def proto(self, access: Access, report: str) -> pb.ReportFilter:
        """The filter for the analytics service; `owner_id=me` is the caller, as on every list. A
        filter the report cannot apply is a 422 naming it, not a report answered as if it held."""
        if self.source and report not in _REPORTS_BY_SOURCE:
            raise invalid_filter("source", f"filter 'source' does not apply to report {report}")
        return pb.ReportFilter(
            period_from=to_timestamp(self.period_from),
            period_to=to_timestamp(self.period_to),
            owner_id=access.resolve_me(self.owner_id),
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
# The reports that can be filtered by lead source (the others count records without one).
_REPORTS_BY_SOURCE = frozenset({"sales-funnel", "lead-sources"})


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


# The money of report rows and the declared field it is summed from: the `reports` resource declares
# no fields, so a row's money is shown as the caller sees that field (left out without a grant to
# read the resource, masked when masked), never more than the records it comes from.
_MONEY_SOURCES: Mapping[str, tuple[str, str]] = {
    "amount": ("opportunities", "amount"),  # of a funnel stage
    "won_amount": ("opportunities", "amount"),
    "average_deal_size": ("opportunities", "amount"),
    "won_revenue": ("opportunities", "amount"),
    "cost": ("campaigns", "cost"),
    "paid_amount": ("contracts", "amount"),
}


# Figures computed from that money: shown only where all of it is shown in clear (won revenue
# follows from ROI and cost).
_DERIVED_FROM_MONEY: Mapping[str, tuple[str, ...]] = {"roi": ("won_revenue", "cost")}
# Churn reasons whose text states an amount of that money (the overdue receivables).
_REASONS_WITH_MONEY: Mapping[str, tuple[str, str]] = {"OVERDUE_INSTALLMENTS": ("contracts", "amount")}


class _Money:
    """Presents the money of report rows with the caller's rules for the resources it comes from,
    where the caller reads that resource over as many records as the report sums: a rep who is also
    an analyst of campaigns sees a report of every rep, but only their own deals' amounts."""

    def __init__(self, access: Access) -> None:
        resources = {resource for resource, _ in (*_MONEY_SOURCES.values(), *_REASONS_WITH_MONEY.values())}
        self._views = {resource: self._reading_all(access, resource) for resource in resources}

    @staticmethod
    def _reading_all(access: Access, resource: str) -> Access | None:
        view = access.view(resource)
        if view is None or not reaches(view.scope.kind, access.scope.kind):
            return None
        return view

    def present(self, row: Mapping[str, Any]) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        for name, value in row.items():
            source = _MONEY_SOURCES.get(name)
            if name == "reasons" and isinstance(value, list):
                shown[name] = [self._reason(reason) for reason in value]
            elif source is None:
                shown[name] = value
            elif (view := self._views[source[0]]) is not None:
                shown.update(view.present_derived({name: value}, like=source[1]))
        for name, sources in _DERIVED_FROM_MONEY.items():
            if name in shown and any(source in row and shown.get(source) != row[source] for source in sources):
                del shown[name]
        return shown

    def _reason(self, reason: Mapping[str, Any]) -> Mapping[str, Any]:
        source = _REASONS_WITH_MONEY.get(str(reason.get("code", "")))
        if source is None or self._in_clear(*source):
            return reason
        return {key: value for key, value in reason.items() if key != "detail"}  # the code alone

    def ranks_by_value(self) -> bool:
        """May accounts be ranked by what they paid and won? Not for a caller not shown both in
        clear: the order alone would tell them which accounts paid more."""
        return self._in_clear(*_MONEY_SOURCES["paid_amount"]) and self._in_clear(*_MONEY_SOURCES["won_amount"])

    def _in_clear(self, resource: str, field: str) -> bool:
        view = self._views[resource]
        return view is not None and view.present_derived({field: "1"}, like=field) == {field: "1"}


@router.get("/reports/sales-funnel", response_model=None, responses=json_or_csv(schemas.SalesFunnel))
async def sales_funnel(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    pipeline_id: Annotated[str, Query(max_length=64)] = "",
    format: Format = "json",
) -> Any:
    """Deals per stage, stage-to-stage conversion, win rate, average deal size, sales cycle (as CSV:
    a row per stage, then a `total` row with the figures of the whole funnel)."""
    access = report_access(access, format)
    reply = await _report(
        _stub(request).GetSalesFunnel(
            pb.GetSalesFunnelRequest(filter=filters.proto(access, "sales-funnel"), pipeline_id=pipeline_id),
            metadata=access.grpc_metadata(),
        )
    )
    funnel, money = plain(reply), _Money(access)
    return await report_answer(
        request, access, "sales-funnel", _funnel(funnel, money), _funnel_rows(funnel, money), filters.described()
    )


def _funnel(body: Mapping[str, Any], money: _Money) -> dict[str, Any]:
    return {**money.present(body), "stages": [money.present(stage) for stage in body["stages"]]}


def _funnel_rows(body: Mapping[str, Any], money: _Money) -> list[dict[str, Any]]:
    """The funnel's CSV rows, of the report route and the export alike: one per stage, then a row of
    stage `total` with the figures of the whole funnel (the counts, win rate, won amount, average
    deal size, sales cycle), which the stage rows alone would lose. Every row has every column, as
    the first row names them: a stage's figures of the whole are empty, and the total's stage ones.
    Money shows as in the JSON answer."""
    whole = {name: value for name, value in body.items() if name != "stages"}
    rows = [{**stage, **dict.fromkeys(whole)} for stage in body["stages"]]
    rows.append({**dict.fromkeys(pb.FunnelStage.DESCRIPTOR.fields_by_name), "stage": "total", **whole})
    return [money.present(row) for row in rows]


def _rows(body: Mapping[str, Any], money: _Money) -> dict[str, Any]:
    return {**body, "rows": [money.present(row) for row in body["rows"]]}


@router.get("/reports/lead-sources", response_model=None, responses=json_or_csv(schemas.LeadSourceReport))
async def lead_sources(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    group_by: Annotated[Literal["source", "campaign"], Query()] = "source",
    format: Format = "json",
) -> Any:
    """Leads by source or campaign: volume, contacted %, converted %, first-contact time, revenue, cost, ROI."""
    access = report_access(access, format)
    grouping = pb.LEAD_GROUPING_CAMPAIGN if group_by == "campaign" else pb.LEAD_GROUPING_SOURCE
    reply = await _report(
        _stub(request).GetLeadSourceReport(
            pb.GetLeadSourceReportRequest(filter=filters.proto(access, "lead-sources"), group_by=grouping),
            metadata=access.grpc_metadata(),
        )
    )
    body = _rows(plain(reply), _Money(access))
    return await report_answer(request, access, "lead-sources", body, body["rows"], filters.described())


@router.get("/reports/rep-performance", response_model=None, responses=json_or_csv(schemas.RepPerformanceReport))
async def rep_performance(
    request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json"
) -> Any:
    """Per rep: activities, task completion, deals won, CSAT of their tickets, data completeness."""
    access = report_access(access, format)
    reply = await _report(
        _stub(request).GetRepPerformance(
            pb.GetRepPerformanceRequest(filter=filters.proto(access, "rep-performance")),
            metadata=access.grpc_metadata(),
        )
    )
    body = _rows(plain(reply), _Money(access))
    return await report_answer(request, access, "rep-performance", body, body["rows"], filters.described())


@router.get("/reports/service", response_model=None, responses=json_or_csv(schemas.ServiceReport))
async def service(request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json") -> Any:
    """SLA compliance, first-response and resolution times, backlog, CSAT average and % satisfied."""
    access = report_access(access, format)
    reply = await _report(
        _stub(request).GetServiceReport(
            pb.GetServiceReportRequest(filter=filters.proto(access, "service")), metadata=access.grpc_metadata()
        )
    )
    body = plain(reply)
    return await report_answer(request, access, "service", body, [body], filters.described())


@router.get("/reports/customer-value", response_model=None, responses=json_or_csv(schemas.CustomerValuePage))
async def customer_value(
    request: Request,
    access: ReportsRead,
    filters: ReportFilters,
    at_risk_only: bool = False,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str, Query(max_length=500)] = "",
    format: Format = "json",
) -> Any:
    """Per account: won and paid amounts, churn risk and its reasons; highest paid first (by name
    for a caller not shown the amounts: `ordered_by`), a page at a time (as CSV too: `Link`
    rel="next"; `/exports/reports?report=customer-value` gives every row)."""
    access = report_access(access, format)
    money = _Money(access)
    page = common_pb2.PageRequest(limit=access.page_limit(limit), cursor=cursor)
    reply = await _report(
        _stub(request).GetCustomerValue(
            _customer_value_request(filters.proto(access, "customer-value"), at_risk_only, page, money),
            metadata=access.grpc_metadata(),
        )
    )
    body = _customer_value(reply, money)
    next_cursor = reply.page_info.next_cursor
    return await report_answer(request, access, "customer-value", body, body["items"], filters.described(), next_cursor)


def _customer_value_request(
    report_filter: pb.ReportFilter, at_risk_only: bool, page: common_pb2.PageRequest, money: _Money
) -> pb.GetCustomerValueRequest:
    return pb.GetCustomerValueRequest(
        filter=report_filter, at_risk_only=at_risk_only, page=page, order_by_name=not money.ranks_by_value()
    )


def _customer_value(reply: pb.GetCustomerValueResponse, money: _Money) -> dict[str, Any]:
    """A page of accounts, their money as the caller sees it; `next_cursor` null on the last page."""
    return {
        "items": [money.present(plain(row)) for row in reply.rows],
        "ordered_by": "value" if money.ranks_by_value() else "name",
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.get("/reports/data-completeness", response_model=None, responses=json_or_csv(schemas.DataCompleteness))
async def data_completeness(
    request: Request, access: ReportsRead, filters: ReportFilters, format: Format = "json"
) -> Any:
    """Share of filled key fields of leads, accounts, contacts and opportunities, overall and per field."""
    access = report_access(access, format)
    reply = await _report(
        _stub(request).GetDataCompleteness(
            pb.GetDataCompletenessRequest(filter=filters.proto(access, "data-completeness")),
            metadata=access.grpc_metadata(),
        )
    )
    body = plain(reply)
    return await report_answer(
        request, access, "data-completeness", body, _completeness_rows(body), filters.described()
    )


def _completeness_rows(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per entity and field, the entity's overall completeness first."""
    overall = {"field": "(all key fields)", "filled": None}
    return [
        {"entity": row["entity"], "records": row["records"], **fill}
        for row in body["rows"]
        for fill in [{**overall, "rate": row["completeness"]}, *row["fields"]]
    ]


# --- GET /exports/reports?report=<name>: the generic export route ----------------------------------

# The query parameters of each report route besides the shared `Filters`.
_REPORT_PARAMETERS: dict[str, frozenset[str]] = {
    "sales-funnel": frozenset({"pipeline_id"}),
    "lead-sources": frozenset({"group_by"}),
    "rep-performance": frozenset(),
    "service": frozenset(),
    "customer-value": frozenset({"at_risk_only"}),
    "data-completeness": frozenset(),
}
_SHARED_PARAMETERS = frozenset({"period_from", "period_to", "owner_id", "team", "source", "currency"})
_MAX_LENGTHS = {"owner_id": 100, "team": 100, "source": 100, "currency": 3, "pipeline_id": 64}
_DATETIME: TypeAdapter[datetime] = TypeAdapter(Instant)
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


class _ReportExport:
    """`?report=` and the report's parameters, validated like the report route's query (422 naming
    the parameter)."""

    def __init__(self, filters: Mapping[str, str]) -> None:
        name = filters.get("report", "")
        if not name:
            raise invalid_filter("report", f"filter 'report' is required: one of {', '.join(_REPORT_PARAMETERS)}")
        self.report = name.replace("_", "-")
        if self.report not in _REPORT_PARAMETERS:
            raise invalid_filter("report", f"unknown report '{name}': one of {', '.join(_REPORT_PARAMETERS)}")
        allowed = _SHARED_PARAMETERS | _REPORT_PARAMETERS[self.report] | {"report"}
        if self.report not in _REPORTS_BY_SOURCE:
            allowed -= {"source"}
        for key, value in filters.items():
            if key not in allowed:
                raise invalid_filter(key, f"filter '{key}' does not apply to report {self.report}")
            if len(value) > _MAX_LENGTHS.get(key, 500):
                raise invalid_filter(key, f"filter '{key}' is too long")
        self.filters = Filters(
            period_from=self._datetime(filters, "period_from"),
            period_to=self._datetime(filters, "period_to"),
            owner_id=filters.get("owner_id", ""),
            team=filters.get("team", ""),
            source=filters.get("source", ""),
            currency=filters.get("currency", ""),
        )
        self.pipeline_id = filters.get("pipeline_id", "")
        self.group_by = filters.get("group_by", "source")
        if self.group_by not in ("source", "campaign"):
            raise invalid_filter("group_by", "filter 'group_by' must be source or campaign")
        try:
            self.at_risk_only = _BOOL.validate_python(filters.get("at_risk_only", "false"))
        except ValidationError:
            raise invalid_filter("at_risk_only", "filter 'at_risk_only' must be true or false") from None

    @staticmethod
    def _datetime(filters: Mapping[str, str], name: str) -> datetime | None:
        if not filters.get(name):
            return None
        try:
            return _DATETIME.validate_python(filters[name])
        except ValidationError:
            raise invalid_filter(name, f"filter '{name}' must be an RFC 3339 date-time") from None


def _check_report_export(filters: Mapping[str, str]) -> None:
    _ReportExport(filters)


async def _report_export_rows(access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
    """The chosen report's rows in the caller's scope (the analytics service applies it), flattened
    like the report's own CSV; customer value is paged through by its cursor."""
    export = _ReportExport(filters)
    stub = _stub(access.request)
    metadata = access.grpc_metadata()
    money = _Money(access)
    report_filter = export.filters.proto(access, export.report)
    rows: list[dict[str, Any]]
    match export.report:
        case "customer-value":
            cursor = ""
            while True:
                page_request = common_pb2.PageRequest(limit=access.page_limit(500), cursor=cursor)
                page = await _report(
                    stub.GetCustomerValue(
                        _customer_value_request(report_filter, export.at_risk_only, page_request, money),
                        metadata=metadata,
                    )
                )
                for row in page.rows:
                    yield flat_row(money.present(plain(row)))
                cursor = page.page_info.next_cursor
                if not cursor:
                    return
        case "sales-funnel":
            funnel = await _report(
                stub.GetSalesFunnel(
                    pb.GetSalesFunnelRequest(filter=report_filter, pipeline_id=export.pipeline_id), metadata=metadata
                )
            )
            rows = _funnel_rows(plain(funnel), money)
        case "lead-sources":
            grouping = pb.LEAD_GROUPING_CAMPAIGN if export.group_by == "campaign" else pb.LEAD_GROUPING_SOURCE
            sources = await _report(
                stub.GetLeadSourceReport(
                    pb.GetLeadSourceReportRequest(filter=report_filter, group_by=grouping), metadata=metadata
                )
            )
            rows = _rows(plain(sources), money)["rows"]
        case "rep-performance":
            reps = await _report(
                stub.GetRepPerformance(pb.GetRepPerformanceRequest(filter=report_filter), metadata=metadata)
            )
            rows = _rows(plain(reps), money)["rows"]
        case "service":
            service_report = await _report(
                stub.GetServiceReport(pb.GetServiceReportRequest(filter=report_filter), metadata=metadata)
            )
            rows = [plain(service_report)]
        case _:
            completeness = await _report(
                stub.GetDataCompleteness(pb.GetDataCompletenessRequest(filter=report_filter), metadata=metadata)
            )
            rows = _completeness_rows(plain(completeness))
    for row in rows:
        yield flat_row(row)


register_export_source(
    "reports",
    _report_export_rows,
    filters={"report", *_SHARED_PARAMETERS, *(name for names in _REPORT_PARAMETERS.values() for name in names)},
    check=_check_report_export,
)
