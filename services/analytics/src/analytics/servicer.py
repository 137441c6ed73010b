"""gRPC <-> report translation for crm.analytics.v1.AnalyticsService (no arithmetic here)."""

from decimal import Decimal
from typing import Any

from crm.analytics.v1 import analytics_service_pb2 as pb
from crm.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceServicer
from crm.common.v1 import common_pb2
from crm_platform.money import amount_text
from crm_platform.timeutil import from_timestamp, to_timestamp

from analytics import domain
from analytics.handlers import ReportFilter, Reports

Ctx = Any  # grpc.aio.ServicerContext; grpc is untyped here


def decimal_text(value: Decimal | None) -> str:
    """A rate or duration as a decimal string; "" when undefined."""
    return "" if value is None else format(value, "f")


def money(amount: Decimal | None, currency: str) -> common_pb2.Money | None:
    """Money as the rest of the API shows it: in the currency's minor unit ("12000.00", "849")."""
    if amount is None:
        return None
    return common_pb2.Money(amount=amount_text(amount, currency), currency=currency)


def report_filter(message: pb.ReportFilter) -> ReportFilter:
    return ReportFilter(
        period_from=from_timestamp(message.period_from) if message.HasField("period_from") else None,
        period_to=from_timestamp(message.period_to) if message.HasField("period_to") else None,
        owner_id=message.owner_id,
        team=message.team,
        source=message.source,
        currency=message.currency,
    )


class AnalyticsServicer(AnalyticsServiceServicer):  # type: ignore[misc]
    def __init__(self, reports: Reports) -> None:
        self.reports = reports

    def _currency(self, message: pb.ReportFilter) -> str:
        return (message.currency or self.reports.reporting_currency).upper()

    async def GetSalesFunnel(self, request: pb.GetSalesFunnelRequest, context: Ctx) -> pb.GetSalesFunnelResponse:
        funnel = await self.reports.sales_funnel(report_filter(request.filter), request.pipeline_id)
        currency = self._currency(request.filter)
        return pb.GetSalesFunnelResponse(
            stages=[
                pb.FunnelStage(
                    stage=row.stage,
                    count=row.count,
                    amount=money(row.amount, currency),
                    reached=row.reached,
                    conversion_to_next=decimal_text(row.conversion_to_next),
                    mean_days_in_stage=decimal_text(row.mean_days_in_stage),
                )
                for row in funnel.stages
            ],
            opportunities=funnel.opportunities,
            open_count=funnel.open_count,
            won_count=funnel.won_count,
            lost_count=funnel.lost_count,
            win_rate=decimal_text(funnel.win_rate),
            won_amount=money(funnel.won_amount, currency),
            average_deal_size=money(funnel.average_deal_size, currency),
            mean_sales_cycle_days=decimal_text(funnel.mean_sales_cycle_days),
        )

    async def GetLeadSourceReport(
        self, request: pb.GetLeadSourceReportRequest, context: Ctx
    ) -> pb.GetLeadSourceReportResponse:
        by_campaign = request.group_by == pb.LEAD_GROUPING_CAMPAIGN
        rows = await self.reports.lead_sources(report_filter(request.filter), by_campaign=by_campaign)
        currency = self._currency(request.filter)
        return pb.GetLeadSourceReportResponse(
            rows=[
                pb.LeadSourceRow(
                    key=row.key,
                    name=row.name,
                    leads=row.leads,
                    contacted=row.contacted,
                    contacted_rate=decimal_text(row.contacted_rate),
                    converted=row.converted,
                    converted_rate=decimal_text(row.converted_rate),
                    mean_first_contact_hours=decimal_text(row.mean_first_contact_hours),
                    won_revenue=money(row.won_revenue, currency),
                    cost=money(row.cost, currency),
                    roi=decimal_text(row.roi),
                )
                for row in rows
            ]
        )

    async def GetRepPerformance(
        self, request: pb.GetRepPerformanceRequest, context: Ctx
    ) -> pb.GetRepPerformanceResponse:
        rows = await self.reports.rep_performance(report_filter(request.filter))
        currency = self._currency(request.filter)
        return pb.GetRepPerformanceResponse(
            rows=[
                pb.RepPerformanceRow(
                    owner_id=row.owner_id,
                    team=row.team,
                    activities=row.activities,
                    tasks=row.tasks,
                    tasks_completed=row.tasks_completed,
                    task_completion_rate=decimal_text(row.task_completion_rate),
                    won_count=row.won_count,
                    won_amount=money(row.won_amount, currency),
                    csat_responses=row.csat.responses,
                    csat_average=decimal_text(row.csat.average),
                    data_completeness=decimal_text(row.data_completeness),
                )
                for row in rows
            ]
        )

    async def GetServiceReport(self, request: pb.GetServiceReportRequest, context: Ctx) -> pb.GetServiceReportResponse:
        summary = await self.reports.service(report_filter(request.filter))
        return pb.GetServiceReportResponse(
            tickets=summary.tickets,
            backlog=summary.backlog,
            first_response_met=summary.first_response_met,
            first_response_breached=summary.first_response_breached,
            first_response_compliance=decimal_text(summary.first_response_compliance),
            resolution_met=summary.resolution_met,
            resolution_breached=summary.resolution_breached,
            resolution_compliance=decimal_text(summary.resolution_compliance),
            mean_first_response_minutes=decimal_text(summary.mean_first_response_minutes),
            mean_resolution_hours=decimal_text(summary.mean_resolution_hours),
            csat_responses=summary.csat.responses,
            csat_average=decimal_text(summary.csat.average),
            csat_satisfied_rate=decimal_text(summary.csat.satisfied_rate),
            open_urgent=summary.open_urgent,
        )

    async def GetCustomerValue(self, request: pb.GetCustomerValueRequest, context: Ctx) -> pb.GetCustomerValueResponse:
        page = await self.reports.customer_value(
            report_filter(request.filter),
            at_risk_only=request.at_risk_only,
            by_name=request.order_by_name,
            limit=request.page.limit,
            cursor=request.page.cursor,
        )
        currency = self._currency(request.filter)
        return pb.GetCustomerValueResponse(
            rows=[
                pb.CustomerValueRow(
                    account_id=row.account_id,
                    account_name=row.account_name,
                    owner_id=row.owner_id,
                    team=row.team,
                    won_amount=money(row.won_amount, currency),
                    paid_amount=money(row.paid_amount, currency),
                    churn_risk=row.churn_risk,
                    reasons=[pb.ChurnReason(code=reason.code, detail=reason.detail) for reason in row.reasons],
                    last_activity_at=to_timestamp(row.last_activity_at),
                )
                for row in page.rows
            ],
            page_info=common_pb2.PageInfo(next_cursor=page.next_cursor),
        )

    async def GetDataCompleteness(
        self, request: pb.GetDataCompletenessRequest, context: Ctx
    ) -> pb.GetDataCompletenessResponse:
        rows = await self.reports.data_completeness(report_filter(request.filter))
        return pb.GetDataCompletenessResponse(rows=[_completeness(row) for row in rows])


def _completeness(row: domain.CompletenessRow) -> pb.CompletenessRow:
    return pb.CompletenessRow(
        entity=row.entity,
        records=row.records,
        completeness=decimal_text(row.completeness),
        fields=[pb.FieldFill(field=name, filled=count, rate=decimal_text(share)) for name, count, share in row.fields],
    )
