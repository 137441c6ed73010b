"""gRPC ↔ handlers: parses requests into domain values (naming the field on bad input) and wraps
results into responses. No rules live here."""

from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeAlias

import grpc
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1 import sales_service_pb2_grpc
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.money import Money, money_from_proto, parse_decimal
from crm_platform.principal import RecordScope
from crm_platform.structs import struct_values
from crm_platform.timeutil import from_timestamp
from google.protobuf.timestamp_pb2 import Timestamp

from sales import domain as d
from sales import views as v
from sales.handlers import ForecastQuery, ImportRow, LineItemIn, OpportunityIn, Page, SalesHandlers

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def optional_money(message: common_pb2.Money, field: str) -> Money | None:
    if not message.amount and not message.currency:
        return None
    return money_from_proto(message, field=field)


def required_money(message: common_pb2.Money, field: str) -> Money:
    money = optional_money(message, field)
    if money is None:
        raise ValidationFailed([FieldError(field, "is required")])
    return money


def optional_date(text: str, field: str) -> date | None:
    return d.optional_date(text, field_name=field)


def optional_time(stamp: Timestamp) -> datetime | None:
    return from_timestamp(stamp)


def page_of(message: common_pb2.PageRequest) -> Page:
    return Page(limit=message.limit, cursor=message.cursor, sort=message.sort)


def page_info(cursor: str) -> common_pb2.PageInfo:
    return common_pb2.PageInfo(next_cursor=cursor)


def line_items(messages: Any, field: str = "line_items") -> list[LineItemIn]:
    items = []
    for index, item in enumerate(messages):
        prefix = f"{field}[{index}]"
        items.append(
            LineItemIn(
                product_id=item.product_id,
                product_name=item.product_name,
                product_line=item.product_line,
                quantity=parse_decimal(item.quantity or "1", field=f"{prefix}.quantity"),
                unit_price=required_money(item.unit_price, f"{prefix}.unit_price"),
                discount_percent=parse_decimal(item.discount_percent or "0", field=f"{prefix}.discount_percent"),
            )
        )
    return items


def installment_inputs(messages: Any) -> list[tuple[date, Money]]:
    installments = []
    for index, item in enumerate(messages):
        due = d.parse_iso_date(item.due_date, field_name=f"installments[{index}].due_date")
        installments.append((due, required_money(item.amount, f"installments[{index}].amount")))
    return installments


def stage_input(message: pb.StageInput, index: int) -> d.Stage:
    outcome_text = message.outcome or d.Outcome.OPEN.value
    try:
        outcome = d.Outcome(outcome_text)
    except ValueError:
        raise ValidationFailed([FieldError(f"stages[{index}].outcome", "must be open, won or lost")]) from None
    return d.Stage(
        key=message.key,
        name=message.name,
        probability=parse_decimal(message.probability or "0", field=f"stages[{index}].probability"),
        required_fields=tuple(message.required_fields),
        rotting_days=message.rotting_days,
        outcome=outcome,
    )


def opportunity_in(request: pb.CreateOpportunityRequest) -> OpportunityIn:
    return OpportunityIn(
        account_id=request.account_id,
        name=request.name,
        pipeline_id=request.pipeline_id,
        stage=request.stage,
        primary_contact_id=request.primary_contact_id,
        amount=optional_money(request.amount, "amount"),
        expected_close_date=optional_date(request.expected_close_date, "expected_close_date"),
        owner_id=request.owner_id,
        team=request.team,
        region=request.region,
        source_lead_id=request.source_lead_id,
        campaign_id=request.campaign_id,
        line_items=line_items(request.line_items),
        next_step=request.next_step,
        product_line=request.product_line,
        tags=list(request.tags),
        custom=struct_values(request.custom),
        forecast_category=d.parse_forecast_category(request.forecast_category),
    )


def import_row(row: pb.ImportOpportunityRow, index: int) -> ImportRow:
    prefix = f"rows[{index}]"
    return ImportRow(
        external_id=row.external_id,
        opportunity=OpportunityIn(
            account_id=row.account_id,
            name=row.name,
            stage=row.stage,
            owner_id=row.owner_id,
            team=row.team,
            region=row.region,
            product_line=row.product_line,
            line_items=line_items(row.line_items, f"{prefix}.line_items"),
            amount=optional_money(row.amount, f"{prefix}.amount"),
            expected_close_date=optional_date(row.expected_close_date, f"{prefix}.expected_close_date"),
        ),
        close_date=optional_date(row.close_date, f"{prefix}.close_date"),
        lost_reason=row.lost_reason,
        engaged_at=optional_time(row.engaged_at),
        refusal=row.refusal,
    )


def update_changes(request: pb.UpdateOpportunityRequest) -> dict[str, Any]:
    source = request.opportunity
    changes: dict[str, Any] = {}
    for path in request.update_mask.paths:
        match path:
            case "amount":
                changes[path] = required_money(source.amount, "amount")
            case "expected_close_date":
                changes[path] = optional_date(source.expected_close_date, path)
            case "line_items":
                changes[path] = line_items(request.line_items)
            case "forecast_category":
                changes[path] = d.parse_forecast_category(source.forecast_category)
            case "tags":
                changes[path] = list(source.tags)
            case "custom":
                changes[path] = struct_values(source.custom)
            case "name" | "primary_contact_id" | "owner_id" | "team" | "region" | "next_step" | "product_line":
                changes[path] = getattr(source, path)
            case _:
                raise ValidationFailed([FieldError("update_mask", f"cannot update {path!r}")])
    if not changes:
        raise ValidationFailed([FieldError("update_mask", "name at least one field to update")])
    return changes


def contract_changes(request: pb.UpdateContractRequest) -> dict[str, Any]:
    """The fields the mask names, as the handler checks them (`handlers.CONTRACT_EDITABLE`)."""
    source = request.contract
    changes: dict[str, Any] = {}
    for path in request.update_mask.paths:
        match path:
            case "starts_on" | "ends_on":
                changes[path] = optional_date(getattr(source, path), path)
            case "title":
                changes[path] = source.title
            case _:
                raise ValidationFailed([FieldError("update_mask", f"cannot update {path!r}")])
    if not changes:
        raise ValidationFailed([FieldError("update_mask", "name at least one field to update")])
    return changes


def forecast_query(request: pb.GetForecastRequest | pb.GetAttainmentRequest, *, pipeline_id: str = "") -> ForecastQuery:
    """The forecast's periods, groups and filters, as the forecast and attainment requests both name them."""
    return ForecastQuery(
        quarter=request.period == pb.FORECAST_PERIOD_QUARTER,
        by_team=request.group_by == pb.FORECAST_GROUP_BY_TEAM,
        from_date=optional_date(request.from_date, "from_date"),
        to_date=optional_date(request.to_date, "to_date"),
        owner_id=request.owner_id,
        team=request.team,
        pipeline_id=pipeline_id,
    )


def forecast_row(line: d.ForecastLine) -> pb.ForecastRow:
    return pb.ForecastRow(
        period=line.period,
        group=line.group,
        currency=line.currency,
        pipeline=v.money(line.pipeline, line.currency),
        weighted=v.money(line.weighted, line.currency),
        commit=v.money(line.commit, line.currency),
        best_case=v.money(line.best_case, line.currency),
        closed_won=v.money(line.closed_won, line.currency),
        open_count=line.open_count,
        won_count=line.won_count,
    )


def attainment_row(line: d.AttainmentLine) -> pb.AttainmentRow:
    row = pb.AttainmentRow(
        period=line.period,
        group=line.group,
        currency=line.currency,
        closed_won=v.money(line.closed_won, line.currency),
        commit=v.money(line.commit, line.currency),
        weighted=v.money(line.weighted, line.currency),
    )
    if line.target is not None:
        row.target.CopyFrom(v.money(line.target, line.currency))
    if line.attainment is not None:
        row.attainment = format(line.attainment, "f")
    return row


def money_list(totals: dict[str, Decimal]) -> list[common_pb2.Money]:
    return [v.money(amount, currency) for currency, amount in sorted(totals.items())]


class SalesServicer(sales_service_pb2_grpc.SalesServiceServicer):
    def __init__(self, handlers: SalesHandlers) -> None:
        self.h = handlers

    # pipelines

    async def CreatePipeline(self, request: pb.CreatePipelineRequest, context: Context) -> pb.CreatePipelineResponse:
        stages = [stage_input(stage, index) for index, stage in enumerate(request.stages)]
        pipeline = await self.h.create_pipeline(
            idempotency_key=request.idempotency_key, name=request.name, stages=stages, is_default=request.is_default
        )
        return pb.CreatePipelineResponse(pipeline=pipeline)

    async def GetPipeline(self, request: pb.GetPipelineRequest, context: Context) -> pb.GetPipelineResponse:
        return pb.GetPipelineResponse(pipeline=await self.h.get_pipeline(request.id))

    async def ListPipelines(self, request: pb.ListPipelinesRequest, context: Context) -> pb.ListPipelinesResponse:
        page = await self.h.list_pipelines(page_of(request.page))
        return pb.ListPipelinesResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def UpdatePipeline(self, request: pb.UpdatePipelineRequest, context: Context) -> pb.UpdatePipelineResponse:
        stages = [stage_input(stage, index) for index, stage in enumerate(request.stages)]
        change = await self.h.update_pipeline(
            request.id,
            expected_version=request.expected_version,
            name=request.name,
            stages=stages,
            is_default=request.is_default,
        )
        return pb.UpdatePipelineResponse(pipeline=change.record, previous=change.previous)

    async def DeletePipeline(self, request: pb.DeletePipelineRequest, context: Context) -> pb.DeletePipelineResponse:
        deleted = await self.h.delete_pipeline(request.id, expected_version=request.expected_version)
        return pb.DeletePipelineResponse(previous=deleted)

    # opportunities

    async def CreateOpportunity(
        self, request: pb.CreateOpportunityRequest, context: Context
    ) -> pb.CreateOpportunityResponse:
        opportunity = await self.h.create_opportunity(
            opportunity_in(request),
            idempotency_key=request.idempotency_key,
            override_collision=request.override_collision,
            override_reason=request.override_reason,
        )
        return pb.CreateOpportunityResponse(opportunity=opportunity)

    async def GetOpportunity(self, request: pb.GetOpportunityRequest, context: Context) -> pb.GetOpportunityResponse:
        return pb.GetOpportunityResponse(opportunity=await self.h.get_opportunity(request.id))

    async def ListOpportunities(
        self, request: pb.ListOpportunitiesRequest, context: Context
    ) -> pb.ListOpportunitiesResponse:
        statuses = list(dict.fromkeys([*([request.status] if request.status else []), *request.statuses]))
        page = await self.h.list_opportunities(
            page_of(request.page),
            account_id=request.account_id,
            statuses=statuses,
            owner_id=request.owner_id,
            team=request.team,
            stage=request.stage,
            pipeline_id=request.pipeline_id,
            product_line=request.product_line,
            campaign_id=request.campaign_id,
            q=request.q,
            rotting_only=request.rotting_only,
            custom=[(c.key, c.value) for c in request.custom],
        )
        return pb.ListOpportunitiesResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def UpdateOpportunity(
        self, request: pb.UpdateOpportunityRequest, context: Context
    ) -> pb.UpdateOpportunityResponse:
        change = await self.h.update_opportunity(
            request.id,
            expected_version=request.expected_version,
            changes=update_changes(request),
            override_collision=request.override_collision,
            override_reason=request.override_reason,
            discounts_scope=_discounts_scope(request),
        )
        return pb.UpdateOpportunityResponse(opportunity=change.record, previous=change.previous)

    async def AssignOpportunity(
        self, request: pb.AssignOpportunityRequest, context: Context
    ) -> pb.AssignOpportunityResponse:
        change = await self.h.assign_opportunity(
            request.id,
            expected_version=request.expected_version,
            owner_id=request.owner_id,
            team=request.team,
            region=request.region,
            override_collision=request.override_collision,
            override_reason=request.override_reason,
        )
        return pb.AssignOpportunityResponse(opportunity=change.record, previous=change.previous)

    async def DeleteOpportunity(
        self, request: pb.DeleteOpportunityRequest, context: Context
    ) -> pb.DeleteOpportunityResponse:
        deleted = await self.h.delete_opportunity(request.id, expected_version=request.expected_version)
        return pb.DeleteOpportunityResponse(previous=deleted)

    async def MoveOpportunityStage(
        self, request: pb.MoveOpportunityStageRequest, context: Context
    ) -> pb.MoveOpportunityStageResponse:
        if not request.stage:
            raise ValidationFailed([FieldError("stage", "is required")])
        change = await self.h.move_stage(request.id, stage=request.stage, expected_version=request.expected_version)
        return pb.MoveOpportunityStageResponse(opportunity=change.record, previous=change.previous)

    async def WinOpportunity(self, request: pb.WinOpportunityRequest, context: Context) -> pb.WinOpportunityResponse:
        change = await self.h.win(
            request.id,
            expected_version=request.expected_version,
            close_date=optional_date(request.close_date, "close_date"),
            amount=optional_money(request.amount, "amount"),
        )
        return pb.WinOpportunityResponse(opportunity=change.record, previous=change.previous)

    async def LoseOpportunity(self, request: pb.LoseOpportunityRequest, context: Context) -> pb.LoseOpportunityResponse:
        change = await self.h.lose(
            request.id,
            expected_version=request.expected_version,
            reason=request.reason,
            close_date=optional_date(request.close_date, "close_date"),
        )
        return pb.LoseOpportunityResponse(opportunity=change.record, previous=change.previous)

    async def ImportOpportunities(
        self, request: pb.ImportOpportunitiesRequest, context: Context
    ) -> pb.ImportOpportunitiesResponse:
        rows: list[ImportRow] = []
        rejected: dict[int, list[FieldError]] = {}
        for index, row in enumerate(request.rows):
            try:
                rows.append(import_row(row, index))
            except ValidationFailed as error:
                rejected[index] = error.errors
        outcomes = (
            await self.h.import_opportunities(
                request.pipeline_id,
                rows,
                override=request.override_collision,
                override_reason=request.override_reason,
            )
            if rows
            else []
        )
        results: list[pb.ImportRowResult] = []
        accepted = [index for index in range(len(request.rows)) if index not in rejected]
        outcome_by_row = {accepted[outcome.row]: outcome for outcome in outcomes}
        for index, row in enumerate(request.rows):
            if index in rejected:
                results.append(
                    pb.ImportRowResult(
                        row=index,
                        external_id=row.external_id,
                        outcome="rejected",
                        errors=[pb.ImportFieldError(field=e.field, message=e.message) for e in rejected[index]],
                    )
                )
                continue
            outcome = outcome_by_row[index]
            results.append(
                pb.ImportRowResult(
                    row=index,
                    external_id=outcome.external_id,
                    outcome=outcome.outcome,
                    opportunity_id=outcome.opportunity_id,
                    errors=[pb.ImportFieldError(field=e.field, message=e.message) for e in outcome.errors],
                )
            )
        return pb.ImportOpportunitiesResponse(
            results=results,
            created=sum(1 for x in results if x.outcome == "created"),
            rejected=sum(1 for x in results if x.outcome == "rejected"),
        )

    # forecast

    async def GetForecast(self, request: pb.GetForecastRequest, context: Context) -> pb.GetForecastResponse:
        lines = await self.h.forecast(forecast_query(request, pipeline_id=request.pipeline_id))
        return pb.GetForecastResponse(rows=[forecast_row(line) for line in lines])

    async def GetWinStatistics(
        self, request: pb.GetWinStatisticsRequest, context: Context
    ) -> pb.GetWinStatisticsResponse:
        overall, by_owner = await self.h.win_statistics(
            from_date=optional_date(request.from_date, "from_date"),
            to_date=optional_date(request.to_date, "to_date"),
            team=request.team,
        )

        def convert(stats: Any) -> pb.WinStatistics:
            return pb.WinStatistics(
                owner_id=stats.owner_id,
                currency=stats.currency,
                won_amount=v.money(stats.won_amount, stats.currency),
                won_count=stats.won_count,
                lost_count=stats.lost_count,
                win_rate=format(stats.win_rate, "f"),
            )

        return pb.GetWinStatisticsResponse(
            overall=[convert(s) for s in overall], by_owner=[convert(s) for s in by_owner]
        )

    # targets and attainment

    async def CreateTarget(self, request: pb.CreateTargetRequest, context: Context) -> pb.CreateTargetResponse:
        target = await self.h.create_target(
            idempotency_key=request.idempotency_key,
            owner_id=request.owner_id,
            team=request.team,
            period=request.period,
            amount=required_money(request.amount, "amount"),
        )
        return pb.CreateTargetResponse(target=target)

    async def GetTarget(self, request: pb.GetTargetRequest, context: Context) -> pb.GetTargetResponse:
        return pb.GetTargetResponse(target=await self.h.get_target(request.id))

    async def ListTargets(self, request: pb.ListTargetsRequest, context: Context) -> pb.ListTargetsResponse:
        page = await self.h.list_targets(
            page_of(request.page),
            from_date=optional_date(request.from_date, "from_date"),
            to_date=optional_date(request.to_date, "to_date"),
            owner_id=request.owner_id,
            team=request.team,
        )
        return pb.ListTargetsResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def UpdateTarget(self, request: pb.UpdateTargetRequest, context: Context) -> pb.UpdateTargetResponse:
        change = await self.h.update_target(
            request.id, expected_version=request.expected_version, amount=required_money(request.amount, "amount")
        )
        return pb.UpdateTargetResponse(target=change.record, previous=change.previous)

    async def DeleteTarget(self, request: pb.DeleteTargetRequest, context: Context) -> pb.DeleteTargetResponse:
        deleted = await self.h.delete_target(request.id, expected_version=request.expected_version)
        return pb.DeleteTargetResponse(previous=deleted)

    async def GetAttainment(self, request: pb.GetAttainmentRequest, context: Context) -> pb.GetAttainmentResponse:
        lines = await self.h.attainment(forecast_query(request))
        return pb.GetAttainmentResponse(rows=[attainment_row(line) for line in lines])

    # quotes

    async def CreateQuote(self, request: pb.CreateQuoteRequest, context: Context) -> pb.CreateQuoteResponse:
        quote = await self.h.create_quote(
            idempotency_key=request.idempotency_key,
            opportunity_id=request.opportunity_id,
            line_items=line_items(request.line_items),
        )
        return pb.CreateQuoteResponse(quote=quote)

    async def GetQuote(self, request: pb.GetQuoteRequest, context: Context) -> pb.GetQuoteResponse:
        return pb.GetQuoteResponse(quote=await self.h.get_quote(request.id))

    async def ListQuotes(self, request: pb.ListQuotesRequest, context: Context) -> pb.ListQuotesResponse:
        page = await self.h.list_quotes(
            page_of(request.page), opportunity_id=request.opportunity_id, status=request.status
        )
        return pb.ListQuotesResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def ApproveQuote(self, request: pb.ApproveQuoteRequest, context: Context) -> pb.ApproveQuoteResponse:
        change = await self.h.decide_quote(
            request.id, expected_version=request.expected_version, decision=d.Decision.APPROVED, comment=request.comment
        )
        return pb.ApproveQuoteResponse(quote=change.record, previous=change.previous)

    async def RejectQuote(self, request: pb.RejectQuoteRequest, context: Context) -> pb.RejectQuoteResponse:
        change = await self.h.decide_quote(
            request.id, expected_version=request.expected_version, decision=d.Decision.REJECTED, comment=request.comment
        )
        return pb.RejectQuoteResponse(quote=change.record, previous=change.previous)

    async def UpdateQuote(self, request: pb.UpdateQuoteRequest, context: Context) -> pb.UpdateQuoteResponse:
        change = await self.h.update_quote(
            request.id,
            expected_version=request.expected_version,
            line_items=line_items(request.line_items),
            discounts_scope=_discounts_scope(request),
        )
        return pb.UpdateQuoteResponse(quote=change.record, previous=change.previous)

    async def DeleteQuote(self, request: pb.DeleteQuoteRequest, context: Context) -> pb.DeleteQuoteResponse:
        deleted = await self.h.delete_quote(request.id, expected_version=request.expected_version)
        return pb.DeleteQuoteResponse(previous=deleted)

    # contracts

    async def CreateContract(self, request: pb.CreateContractRequest, context: Context) -> pb.CreateContractResponse:
        contract = await self.h.create_contract(
            idempotency_key=request.idempotency_key,
            opportunity_id=request.opportunity_id,
            account_id=request.account_id,
            title=request.title,
            amount=optional_money(request.amount, "amount"),
            owner_id=request.owner_id,
            team=request.team,
            region=request.region,
            starts_on=optional_date(request.starts_on, "starts_on"),
            ends_on=optional_date(request.ends_on, "ends_on"),
        )
        return pb.CreateContractResponse(contract=contract)

    async def GetContract(self, request: pb.GetContractRequest, context: Context) -> pb.GetContractResponse:
        return pb.GetContractResponse(contract=await self.h.get_contract(request.id))

    async def ListContracts(self, request: pb.ListContractsRequest, context: Context) -> pb.ListContractsResponse:
        page = await self.h.list_contracts(
            page_of(request.page),
            account_id=request.account_id,
            status=request.status,
            opportunity_id=request.opportunity_id,
            owner_id=request.owner_id,
        )
        return pb.ListContractsResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def SubmitContract(self, request: pb.SubmitContractRequest, context: Context) -> pb.SubmitContractResponse:
        change = await self.h.submit_contract(request.id, expected_version=request.expected_version)
        return pb.SubmitContractResponse(contract=change.record, previous=change.previous)

    async def ApproveContract(self, request: pb.ApproveContractRequest, context: Context) -> pb.ApproveContractResponse:
        change = await self.h.decide_contract(
            request.id, expected_version=request.expected_version, decision=d.Decision.APPROVED, comment=request.comment
        )
        return pb.ApproveContractResponse(contract=change.record, previous=change.previous)

    async def RejectContract(self, request: pb.RejectContractRequest, context: Context) -> pb.RejectContractResponse:
        change = await self.h.decide_contract(
            request.id, expected_version=request.expected_version, decision=d.Decision.REJECTED, comment=request.comment
        )
        return pb.RejectContractResponse(contract=change.record, previous=change.previous)

    async def SignContract(self, request: pb.SignContractRequest, context: Context) -> pb.SignContractResponse:
        change = await self.h.sign_contract(
            request.id, expected_version=request.expected_version, signed_at=optional_time(request.signed_at)
        )
        return pb.SignContractResponse(contract=change.record, previous=change.previous)

    async def CompleteContract(
        self, request: pb.CompleteContractRequest, context: Context
    ) -> pb.CompleteContractResponse:
        change = await self.h.complete_contract(request.id, expected_version=request.expected_version)
        return pb.CompleteContractResponse(contract=change.record, previous=change.previous)

    async def TerminateContract(
        self, request: pb.TerminateContractRequest, context: Context
    ) -> pb.TerminateContractResponse:
        change = await self.h.terminate_contract(
            request.id, expected_version=request.expected_version, reason=request.reason
        )
        return pb.TerminateContractResponse(contract=change.record, previous=change.previous)

    async def DeleteContract(self, request: pb.DeleteContractRequest, context: Context) -> pb.DeleteContractResponse:
        deleted = await self.h.delete_contract(request.id, expected_version=request.expected_version)
        return pb.DeleteContractResponse(previous=deleted)

    async def UpdateContract(self, request: pb.UpdateContractRequest, context: Context) -> pb.UpdateContractResponse:
        change = await self.h.update_contract(
            request.id, expected_version=request.expected_version, changes=contract_changes(request)
        )
        return pb.UpdateContractResponse(contract=change.record, previous=change.previous)

    # payment plans, payments, receivables

    async def CreatePaymentPlan(
        self, request: pb.CreatePaymentPlanRequest, context: Context
    ) -> pb.CreatePaymentPlanResponse:
        plan = await self.h.create_payment_plan(
            idempotency_key=request.idempotency_key,
            contract_id=request.contract_id,
            installments=installment_inputs(request.installments),
        )
        return pb.CreatePaymentPlanResponse(payment_plan=plan)

    async def GetPaymentPlan(self, request: pb.GetPaymentPlanRequest, context: Context) -> pb.GetPaymentPlanResponse:
        return pb.GetPaymentPlanResponse(payment_plan=await self.h.get_payment_plan(request.contract_id))

    async def UpdatePaymentPlan(
        self, request: pb.UpdatePaymentPlanRequest, context: Context
    ) -> pb.UpdatePaymentPlanResponse:
        change = await self.h.update_payment_plan(
            request.contract_id,
            expected_version=request.expected_version,
            installments=installment_inputs(request.installments),
        )
        return pb.UpdatePaymentPlanResponse(payment_plan=change.record, previous=change.previous)

    async def RecordPayment(self, request: pb.RecordPaymentRequest, context: Context) -> pb.RecordPaymentResponse:
        payment, created = await self.h.record_payment(
            contract_id=request.contract_id,
            amount=required_money(request.amount, "amount"),
            received_at=optional_time(request.received_at),
            method=request.method,
            external_reference=request.external_reference,
            idempotency_key=request.idempotency_key,
        )
        return pb.RecordPaymentResponse(payment=payment, created=created)

    async def ListPayments(self, request: pb.ListPaymentsRequest, context: Context) -> pb.ListPaymentsResponse:
        page = await self.h.list_payments(
            page_of(request.page), contract_id=request.contract_id, account_id=request.account_id
        )
        return pb.ListPaymentsResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def ListReceivables(self, request: pb.ListReceivablesRequest, context: Context) -> pb.ListReceivablesResponse:
        result = await self.h.list_receivables(request.account_id, page_of(request.page))
        return pb.ListReceivablesResponse(
            items=result.items,
            page_info=page_info(result.next_cursor),
            total_outstanding=money_list(result.total_outstanding),
            total_overdue=money_list(result.total_overdue),
            account_outstanding=money_list(result.account.outstanding),
            account_overdue=money_list(result.account.overdue),
            lifetime_paid=money_list(result.account.lifetime_paid),
        )

    # invoices

    async def RequestInvoice(self, request: pb.RequestInvoiceRequest, context: Context) -> pb.RequestInvoiceResponse:
        invoice = await self.h.request_invoice(
            idempotency_key=request.idempotency_key,
            contract_id=request.contract_id,
            amount=required_money(request.amount, "amount"),
        )
        return pb.RequestInvoiceResponse(invoice=invoice)

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Context) -> pb.GetInvoiceResponse:
        return pb.GetInvoiceResponse(invoice=await self.h.get_invoice(request.id))

    async def ListInvoices(self, request: pb.ListInvoicesRequest, context: Context) -> pb.ListInvoicesResponse:
        page = await self.h.list_invoices(
            page_of(request.page), contract_id=request.contract_id, status=request.status, account_id=request.account_id
        )
        return pb.ListInvoicesResponse(items=page.items, page_info=page_info(page.next_cursor))

    async def IssueInvoice(self, request: pb.IssueInvoiceRequest, context: Context) -> pb.IssueInvoiceResponse:
        change = await self.h.issue_invoice(
            request.id,
            number=request.number,
            issued_at=optional_time(request.issued_at),
            expected_version=request.expected_version,
        )
        return pb.IssueInvoiceResponse(invoice=change.record, previous=change.previous)

    async def VoidInvoice(self, request: pb.VoidInvoiceRequest, context: Context) -> pb.VoidInvoiceResponse:
        change = await self.h.void_invoice(request.id, reason=request.reason, expected_version=request.expected_version)
        return pb.VoidInvoiceResponse(invoice=change.record, previous=change.previous)


def _discounts_scope(request: pb.UpdateOpportunityRequest | pb.UpdateQuoteRequest) -> RecordScope | None:
    """Where the caller may replace discounted line items; None (nowhere) when the gateway sent none."""
    return RecordScope.from_proto(request.discounts_scope) if request.HasField("discounts_scope") else None
