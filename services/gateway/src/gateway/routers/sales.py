"""Sales context over REST (SPEC §6, §8): pipelines, opportunities, forecast, targets and their
attainment, quotes, contracts with approvals, payment plans, payments, receivables and invoices,
routed to the sales service.

Permissions come only from `require(...)`/`Access` (gateway.security); approvals need the
`approve` action here, and the sales service then checks that the caller holds the role the
approval chain waits for and is neither the submitter nor the approver of an earlier step.
Money is `{"amount": "12.50", "currency": "CNY"}`: decimal strings only.
"""

from collections.abc import AsyncIterator, Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal

from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm_platform.principal import RecordScope
from crm_platform.structs import unstorable_values
from crm_platform.timeutil import as_utc, from_timestamp, isoformat, to_timestamp
from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field, ValidationError

from gateway.conventions import IF_MATCH_HEADER, IdempotencyKey, MoneyIn, expected_version, with_etag
from gateway.errors import field_error
from gateway.inputs import (
    CalendarDate,
    Instant,
    NonBlank,
    OptionalId,
    ReplacementBody,
    RequestBody,
    check_period,
    period_problem,
)
from gateway.references import (
    ACCOUNT,
    CAMPAIGN,
    CONTACT,
    LEAD,
    References,
    audit_refused_rows,
    rows_naming_no_account,
)
from gateway.report_csv import Format, json_or_csv, query_described, report_access, report_answer
from gateway.routers import sales_schemas as schemas
from gateway.routers.custom_fields import CUSTOM_FILTER_PARAMETERS, custom_filters, presenter
from gateway.routing import ResourceRouter
from gateway.security import Access, FilterFields, SecurityProblem, require
from gateway.security.exports import invalid_filter, register_export_source
from gateway.upstreams import Upstreams

# The statuses a list may be filtered by: any other is a 422 naming `status`, not an empty page.
QuoteStatus = Literal["draft", "pending_approval", "approved", "rejected"]
ContractStatus = Literal["draft", "pending_approval", "approved", "rejected", "signed", "completed", "terminated"]
InvoiceStatus = Literal["requested", "issued", "void"]

router = ResourceRouter(tags=["sales"])

IfMatch = Annotated[str | None, IF_MATCH_HEADER]
Limit = Annotated[int | None, Query(ge=1, le=500)]


# --- request models ----------------------------------------------------------------------------------


# Lengths as the sales service stores them (sales.domain): its own ids in VARCHAR(36), other
# services' ids up to REF_LENGTH (64), names, users, teams and regions up to NAME_LENGTH (200),
# codes (a stage key, a payment method, an invoice number) up to CODE_LENGTH (64), external
# references up to REFERENCE_LENGTH (200); reasons, comments and next steps are TEXT, limited here.
# An id, owner, team or region a body may leave out is an `OptionalId`: "" means it is left out, and
# only whitespace is refused (it would be stored: a deal owned by nobody, in a team nobody sees).
Tag = Annotated[str, Field(max_length=100)]


class LineItemBody(RequestBody):
    product_id: OptionalId = Field(default=None, max_length=64)
    product_name: str = Field(default="", max_length=200)
    product_line: str = Field(default="", max_length=200)
    quantity: str = Field(default="1", max_length=32, description='a decimal string, e.g. "2"')
    unit_price: MoneyIn
    discount_percent: str | None = Field(
        default=None, max_length=32, description='percent as a decimal string, e.g. "12.5"'
    )

    def proto(self) -> pb.LineItemInput:
        return pb.LineItemInput(
            product_id=self.product_id or "",
            product_name=self.product_name,
            product_line=self.product_line,
            quantity=self.quantity,
            unit_price=self.unit_price.proto(),
            discount_percent=self.discount_percent or "",
        )


class StageBody(ReplacementBody):
    read_only = frozenset({"position"})
    key: NonBlank = Field(max_length=64)
    name: NonBlank = Field(max_length=200)
    probability: str = Field(max_length=32, description='percent as a decimal string, e.g. "40"')
    required_fields: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list)
    rotting_days: int = Field(default=0, ge=0, le=3650)
    outcome: Literal["open", "won", "lost"] = "open"


class PipelineCreate(RequestBody):
    name: NonBlank = Field(max_length=200)
    stages: list[StageBody] = Field(min_length=3)
    is_default: bool = False


class PipelineReplacement(PipelineCreate, ReplacementBody):
    """A PUT of the pipeline: its name, stages and default flag, or the pipeline as GET returned it."""

    read_only = frozenset({"id", "created_at", "version"})


class OpportunityFields(RequestBody):
    name: str | None = Field(default=None, max_length=200)
    primary_contact_id: OptionalId = Field(default=None, max_length=64)
    amount: MoneyIn | None = None
    expected_close_date: CalendarDate | None = None
    owner_id: OptionalId = Field(default=None, max_length=200)
    team: OptionalId = Field(default=None, max_length=200)
    region: OptionalId = Field(default=None, max_length=200)
    line_items: list[LineItemBody] | None = None
    next_step: str | None = Field(default=None, max_length=2000)
    product_line: str | None = Field(default=None, max_length=200)
    tags: list[Tag] | None = None
    custom: dict[str, Any] | None = None
    forecast_category: Literal["pipeline", "best_case", "commit", "omitted"] | None = None


class CollisionOverride(RequestBody):
    # 防撞单 override: managers only, with a reason (audited).
    override_collision: bool = False
    override_reason: str | None = Field(default=None, max_length=2000)


class OpportunityPatch(OpportunityFields, CollisionOverride):
    pass


class OpportunityCreate(OpportunityFields, CollisionOverride):
    account_id: NonBlank = Field(max_length=64)
    name: NonBlank = Field(max_length=200)
    pipeline_id: OptionalId = Field(default=None, max_length=36)
    stage: str | None = Field(default=None, max_length=64)
    source_lead_id: OptionalId = Field(default=None, max_length=64)
    campaign_id: OptionalId = Field(default=None, max_length=64)


class OpportunityAssign(CollisionOverride):
    owner_id: NonBlank = Field(max_length=200)
    team: OptionalId = Field(default=None, max_length=200, description="left out or empty: unchanged")
    region: OptionalId = Field(default=None, max_length=200, description="left out or empty: unchanged")


OVERRIDE_FIELDS = set(CollisionOverride.model_fields)


class StageMove(RequestBody):
    stage: NonBlank = Field(max_length=64)


class WinBody(RequestBody):
    close_date: CalendarDate | None = None
    amount: MoneyIn | None = None


class LoseBody(RequestBody):
    reason: NonBlank = Field(max_length=2000)
    close_date: CalendarDate | None = None


class ImportRowBody(RequestBody):
    """One row of an import, checked on its own (`import_opportunities`): a row that does not fit is
    rejected alone, with its reasons, and the others are imported. Its text is not limited here:
    the sales service rejects a row alone for that too."""

    external_id: str = ""  # blank: that row alone is rejected by the service, with its reason
    account_id: NonBlank
    name: str
    owner_id: OptionalId = None
    team: OptionalId = None
    region: OptionalId = None
    product_line: str = ""
    line_items: list[LineItemBody] = Field(default_factory=list)
    stage: str = ""
    amount: MoneyIn | None = None
    expected_close_date: CalendarDate | None = None
    close_date: CalendarDate | None = None
    lost_reason: str = ""
    engaged_at: Instant | None = None


class ImportBody(RequestBody):
    pipeline_id: OptionalId = Field(default=None, max_length=36)
    rows: list[dict[str, Any]] = Field(
        min_length=1, max_length=5000, description="ImportRowBody objects, each checked on its own"
    )
    override_collision: bool = Field(
        default=False,
        description="a manager migrating another CRM's deals lets open deals in beside another owner's (防撞单), "
        "each recording the override",
    )
    override_reason: str | None = Field(default=None, max_length=2000)


class TargetCreate(RequestBody):
    owner_id: OptionalId = Field(default=None, max_length=200, description="left out: a team's target")
    team: OptionalId = Field(
        default=None, max_length=200, description="the team, or the owner's team; left out: the caller's team"
    )
    period: NonBlank = Field(max_length=7, description='"2026-12" (a month) or "2026-Q4" (a quarter)')
    amount: MoneyIn


class TargetPatch(RequestBody):
    amount: MoneyIn


class QuoteCreate(RequestBody):
    opportunity_id: NonBlank = Field(max_length=36)
    line_items: list[LineItemBody] = Field(min_length=1)


class QuotePatch(RequestBody):
    line_items: list[LineItemBody] = Field(min_length=1)


class DecisionBody(RequestBody):
    comment: str = Field(default="", max_length=2000)


class ContractCreate(RequestBody):
    opportunity_id: OptionalId = Field(default=None, max_length=36)
    account_id: OptionalId = Field(default=None, max_length=64)
    title: str | None = Field(default=None, max_length=200)
    amount: MoneyIn | None = None
    owner_id: OptionalId = Field(default=None, max_length=200)
    team: OptionalId = Field(default=None, max_length=200)
    region: OptionalId = Field(default=None, max_length=200)
    starts_on: CalendarDate | None = None
    ends_on: CalendarDate | None = None


class ContractPatch(RequestBody):
    """A draft or rejected contract's title and term: the fields sent are written (null clears a date)."""

    title: NonBlank | None = Field(default=None, max_length=200)
    starts_on: CalendarDate | None = None
    ends_on: CalendarDate | None = None


class SignBody(RequestBody):
    signed_at: Instant | None = None


class ReasonBody(RequestBody):
    reason: NonBlank = Field(max_length=2000)


class InstallmentBody(RequestBody):
    due_date: CalendarDate
    amount: MoneyIn


class PaymentPlanCreate(RequestBody):
    installments: list[InstallmentBody] = Field(min_length=1, max_length=240)


class InstallmentReplacement(InstallmentBody, ReplacementBody):
    read_only = frozenset({"id", "sequence", "paid", "status", "overdue_at"})


class PaymentPlanReplacement(ReplacementBody):
    """A PUT of the plan: the installments as they are to be, or the plan as GET returned it."""

    read_only = frozenset({"id", "contract_id", "total", "created_at", "version"})
    installments: list[InstallmentReplacement] = Field(min_length=1, max_length=240)


class PaymentCreate(RequestBody):
    contract_id: NonBlank = Field(max_length=36)
    amount: MoneyIn
    external_reference: NonBlank = Field(max_length=200, description="unique; the idempotency key")
    received_at: Instant | None = None
    method: str = Field(default="", max_length=64)


class InvoiceCreate(RequestBody):
    contract_id: NonBlank = Field(max_length=36)
    amount: MoneyIn


class IssueBody(RequestBody):
    number: NonBlank = Field(max_length=64)
    issued_at: Instant | None = None


# --- proto -> JSON -----------------------------------------------------------------------------------


def _money(message: common_pb2.Money) -> dict[str, str] | None:
    return {"amount": message.amount, "currency": message.currency} if message.currency else None


def _time(message: Message, name: str) -> str | None:
    return isoformat(from_timestamp(getattr(message, name))) if message.HasField(name) else None


def _line_item(item: sales_pb2.LineItem) -> dict[str, Any]:
    return {
        "product_id": item.product_id,
        "product_name": item.product_name,
        "product_line": item.product_line,
        "quantity": item.quantity,
        "unit_price": _money(item.unit_price),
        "discount_percent": item.discount_percent,
        "total": _money(item.total),
    }


def _decision(decision: sales_pb2.ApprovalDecision) -> dict[str, Any]:
    return {
        "role": decision.role,
        "approver_id": decision.approver_id,
        "decision": decision.decision,
        "comment": decision.comment,
        "decided_at": _time(decision, "decided_at"),
    }


def pipeline_dict(p: sales_pb2.Pipeline) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "is_default": p.is_default,
        "stages": [
            {
                "key": s.key,
                "name": s.name,
                "probability": s.probability,
                "required_fields": list(s.required_fields),
                "rotting_days": s.rotting_days,
                "position": s.position,
                "outcome": s.outcome,
            }
            for s in p.stages
        ],
        "created_at": _time(p, "created_at"),
        "version": p.version,
    }


def opportunity_dict(o: sales_pb2.Opportunity) -> dict[str, Any]:
    return {
        "id": o.id,
        "account_id": o.account_id,
        "primary_contact_id": o.primary_contact_id or None,
        "name": o.name,
        "pipeline_id": o.pipeline_id,
        "stage": o.stage,
        "probability": o.probability,
        "amount": _money(o.amount),
        "expected_close_date": o.expected_close_date or None,
        "close_date": o.close_date or None,
        "owner_id": o.owner_id,
        "team": o.team,
        "region": o.region,
        "source_lead_id": o.source_lead_id or None,
        "campaign_id": o.campaign_id or None,
        "line_items": [_line_item(item) for item in o.line_items],
        "status": o.status,
        "lost_reason": o.lost_reason or None,
        "stage_history": [
            {"stage": h.stage, "entered_at": _time(h, "entered_at"), "exited_at": _time(h, "exited_at")}
            for h in o.stage_history
        ],
        "next_step": o.next_step,
        "product_line": o.product_line,
        "forecast_category": o.forecast_category or None,
        "tags": list(o.tags),
        "custom": json_format.MessageToDict(o.custom),
        "collision_override_by": o.collision_override_by or None,
        "collision_override_reason": o.collision_override_reason or None,
        "colliding_opportunity_id": o.colliding_opportunity_id or None,
        "stage_entered_at": _time(o, "stage_entered_at"),
        "rotting": o.rotting,
        "created_at": _time(o, "created_at"),
        "updated_at": _time(o, "updated_at"),
        "closed_at": _time(o, "closed_at"),
        "version": o.version,
    }


def quote_dict(q: sales_pb2.Quote) -> dict[str, Any]:
    return {
        "id": q.id,
        "opportunity_id": q.opportunity_id,
        "account_id": q.account_id,
        "line_items": [_line_item(item) for item in q.line_items],
        "subtotal": _money(q.subtotal),
        "discount_total": _money(q.discount_total),
        "total": _money(q.total),
        "max_discount_percent": q.max_discount_percent,
        "status": q.status,
        "required_approvals": list(q.required_approvals),
        "decisions": [_decision(x) for x in q.decisions],
        "owner_id": q.owner_id,
        "team": q.team,
        "region": q.region,
        "created_at": _time(q, "created_at"),
        "updated_at": _time(q, "updated_at"),
        "version": q.version,
    }


def contract_dict(c: sales_pb2.Contract) -> dict[str, Any]:
    return {
        "id": c.id,
        "number": c.number,
        "opportunity_id": c.opportunity_id or None,
        "account_id": c.account_id,
        "title": c.title,
        "amount": _money(c.amount),
        "status": c.status,
        "approval_chain": list(c.approval_chain),
        "decisions": [_decision(x) for x in c.decisions],
        "owner_id": c.owner_id,
        "team": c.team,
        "region": c.region,
        "starts_on": c.starts_on or None,
        "ends_on": c.ends_on or None,
        "signed_at": _time(c, "signed_at"),
        "completed_at": _time(c, "completed_at"),
        "terminated_at": _time(c, "terminated_at"),
        "terminated_reason": c.terminated_reason or None,
        "created_at": _time(c, "created_at"),
        "updated_at": _time(c, "updated_at"),
        "version": c.version,
    }


def plan_dict(p: sales_pb2.PaymentPlan) -> dict[str, Any]:
    return {
        "id": p.id,
        "contract_id": p.contract_id,
        "total": _money(p.total),
        "installments": [
            {
                "id": i.id,
                "sequence": i.sequence,
                "due_date": i.due_date,
                "amount": _money(i.amount),
                "paid": _money(i.paid),
                "status": i.status,
                "overdue_at": _time(i, "overdue_at"),
            }
            for i in p.installments
        ],
        "created_at": _time(p, "created_at"),
        "version": p.version,
    }


def payment_dict(p: sales_pb2.Payment) -> dict[str, Any]:
    return {
        "id": p.id,
        "contract_id": p.contract_id,
        "amount": _money(p.amount),
        "received_at": _time(p, "received_at"),
        "method": p.method,
        "external_reference": p.external_reference,
        "allocations": [{"installment_id": a.installment_id, "amount": _money(a.amount)} for a in p.allocations],
        "created_at": _time(p, "created_at"),
    }


def invoice_dict(i: sales_pb2.Invoice) -> dict[str, Any]:
    return {
        "id": i.id,
        "contract_id": i.contract_id,
        "account_id": i.account_id,
        "number": i.number or None,
        "amount": _money(i.amount),
        "status": i.status,
        "external_reference": i.external_reference or None,
        "requested_at": _time(i, "requested_at"),
        "issued_at": _time(i, "issued_at"),
        "voided_at": _time(i, "voided_at"),
        "void_reason": i.void_reason or None,
        "version": i.version,
    }


def target_dict(t: sales_pb2.Target) -> dict[str, Any]:
    return {
        "id": t.id,
        "owner_id": t.owner_id or None,
        "team": t.team or None,
        "period": t.period,
        "amount": _money(t.amount),
        "set_by": t.set_by,
        "created_at": _time(t, "created_at"),
        "updated_at": _time(t, "updated_at"),
        "version": t.version,
    }


def attainment_row(r: pb.AttainmentRow, access: Access) -> dict[str, Any]:
    """A row as the caller sees the forecast: the target and the ratio as its closed won, which
    the two together would reveal."""
    forecast = {
        "period": r.period,
        "group": r.group,
        "currency": r.currency,
        "closed_won": _money(r.closed_won),
        "commit": _money(r.commit),
        "weighted": _money(r.weighted),
    }
    against_target = {"target": _money(r.target), "attainment": r.attainment or None}
    return {**access.present(forecast), **access.present_derived(against_target, like="closed_won")}


def receivable_dict(r: sales_pb2.Receivable, access: Access) -> dict[str, Any]:
    """Receivables are the contract's money: shown as the caller sees a contract's `amount`."""
    money = {
        "amount": _money(r.amount),
        "paid": _money(r.paid),
        "outstanding": _money(r.outstanding),
        "overdue": _money(r.overdue),
        "invoiced": _money(r.invoiced),
    }
    return {
        "contract_id": r.contract_id,
        "contract_number": r.contract_number,
        "account_id": r.account_id,
        "status": r.status,
        **access.present_derived(money, like="amount"),
        "next_due_date": r.next_due_date or None,
    }


def receivables_view(reply: pb.ListReceivablesResponse, access: Access) -> dict[str, Any]:
    """One page of an account's receivables with the page's and the whole account's totals."""
    totals = {
        "total_outstanding": [_money(m) for m in reply.total_outstanding],
        "total_overdue": [_money(m) for m in reply.total_overdue],
        "account_outstanding": [_money(m) for m in reply.account_outstanding],
        "account_overdue": [_money(m) for m in reply.account_overdue],
        "lifetime_value": [_money(m) for m in reply.lifetime_paid],
    }
    return {
        "items": [receivable_dict(r, access) for r in reply.items],
        "next_cursor": reply.page_info.next_cursor or None,
        **access.present_derived(totals, like="amount"),
    }


# --- helpers -----------------------------------------------------------------------------------------


def _stub(request: Request) -> SalesServiceStub:
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams.stub("sales", SalesServiceStub)


def _page(limit: int | None, cursor: str | None, sort: str | None, access: Access) -> common_pb2.PageRequest:
    if sort:
        access.check_filter([sort])
    return common_pb2.PageRequest(limit=access.page_limit(limit), cursor=cursor or "", sort=sort or "")


def _list(items: list[dict[str, Any]], next_cursor: str) -> dict[str, Any]:
    return {"items": items, "next_cursor": next_cursor or None}


def _timestamp(value: datetime | None) -> Timestamp | None:
    return to_timestamp(as_utc(value)) if value is not None else None


def _iso(value: date | None) -> str:
    return value.isoformat() if value else ""


def _written(body: BaseModel, *, exclude: set[str] | None = None) -> dict[str, Any]:
    """The fields a request sets, as JSON: what `check_write` and the audit see (a field left out
    is not set, whatever its default)."""
    return body.model_dump(mode="json", exclude_unset=True, exclude_none=True, exclude=exclude)


# --- pipelines ---------------------------------------------------------------------------------------

PipelinesRead = Annotated[Access, Depends(require("pipelines", "read"))]
PipelinesCreate = Annotated[Access, Depends(require("pipelines", "create"))]
PipelinesUpdate = Annotated[Access, Depends(require("pipelines", "update"))]
PipelinesDelete = Annotated[Access, Depends(require("pipelines", "delete"))]


@router.get("/pipelines", responses={200: {"model": schemas.Page[schemas.Pipeline]}})
async def list_pipelines(
    request: Request, access: PipelinesRead, limit: Limit = None, cursor: str | None = None
) -> dict[str, Any]:
    reply = await _stub(request).ListPipelines(
        pb.ListPipelinesRequest(page=_page(limit, cursor, None, access)), metadata=access.grpc_metadata()
    )
    return _list(access.present_many(pipeline_dict(p) for p in reply.items), reply.page_info.next_cursor)


@router.get(
    "/pipelines/{pipeline_id}",
    description='"default" is the default pipeline',
    responses={200: {"model": schemas.Pipeline}},
)
async def get_pipeline(pipeline_id: str, request: Request, response: Response, access: PipelinesRead) -> dict[str, Any]:
    reply = await _stub(request).GetPipeline(pb.GetPipelineRequest(id=pipeline_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(pipeline_dict(reply.pipeline)))


@router.post("/pipelines", status_code=201, responses={201: {"model": schemas.Pipeline}})
async def create_pipeline(
    body: PipelineCreate,
    request: Request,
    response: Response,
    access: PipelinesCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    access.check_write(_written(body))
    reply = await _stub(request).CreatePipeline(
        pb.CreatePipelineRequest(
            idempotency_key=idempotency_key,
            name=body.name,
            is_default=body.is_default,
            stages=[pb.StageInput(**stage.model_dump()) for stage in body.stages],
        ),
        metadata=access.grpc_metadata(),
    )
    record = pipeline_dict(reply.pipeline)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.put("/pipelines/{pipeline_id}", responses={200: {"model": schemas.Pipeline}})
async def replace_pipeline(
    pipeline_id: str,
    body: PipelineReplacement,
    request: Request,
    response: Response,
    access: PipelinesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Name, stages and default flag at once (the pipeline as GET returned it may be sent back: its id,
    times, version and stages' positions are ignored). 409 when a removed stage still holds open deals;
    open deals take their stage's new probability."""
    access.check_write(_written(body))
    reply = await _stub(request).UpdatePipeline(
        pb.UpdatePipelineRequest(
            id=pipeline_id,
            expected_version=expected_version(if_match),
            name=body.name,
            is_default=body.is_default,
            stages=[pb.StageInput(**stage.model_dump()) for stage in body.stages],
        ),
        metadata=access.grpc_metadata(),
    )
    record = pipeline_dict(reply.pipeline)
    await access.audit_write(pipeline_id, pipeline_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.delete("/pipelines/{pipeline_id}", status_code=204)
async def delete_pipeline(
    pipeline_id: str, request: Request, access: PipelinesDelete, if_match: IfMatch = None
) -> Response:
    reply = await _stub(request).DeletePipeline(
        pb.DeletePipelineRequest(id=pipeline_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(pipeline_id, pipeline_dict(reply.previous), None)
    return Response(status_code=204)


# --- opportunities -----------------------------------------------------------------------------------

OpportunitiesRead = Annotated[Access, Depends(require("opportunities", "read"))]
OpportunitiesCreate = Annotated[Access, Depends(require("opportunities", "create"))]
OpportunitiesUpdate = Annotated[Access, Depends(require("opportunities", "update"))]
OpportunitiesDelete = Annotated[Access, Depends(require("opportunities", "delete"))]
OpportunitiesAssign = Annotated[Access, Depends(require("opportunities", "assign"))]
# An import checks each of its rows' storability itself: an unstorable row is rejected alone.
OpportunitiesImport = Annotated[Access, Depends(require("opportunities", "create", rows="rows"))]


@router.post("/opportunities", status_code=201, responses={201: {"model": schemas.Opportunity}})
async def create_opportunity(
    body: OpportunityCreate,
    request: Request,
    response: Response,
    access: OpportunitiesCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    access.check_write(_written(body, exclude=OVERRIDE_FIELDS))
    references = (
        References(access)
        .add("account_id", ACCOUNT, body.account_id)
        .add("primary_contact_id", CONTACT, body.primary_contact_id, on_account=body.account_id)
        .add("source_lead_id", LEAD, body.source_lead_id)
        .add("campaign_id", CAMPAIGN, body.campaign_id)
    )
    message = pb.CreateOpportunityRequest(
        idempotency_key=idempotency_key,
        account_id=body.account_id,
        primary_contact_id=body.primary_contact_id or "",
        name=body.name,
        pipeline_id=body.pipeline_id or "",
        stage=body.stage or "",
        expected_close_date=_iso(body.expected_close_date),
        owner_id=body.owner_id or "",
        team=body.team or "",
        region=body.region or "",
        source_lead_id=body.source_lead_id or "",
        campaign_id=body.campaign_id or "",
        line_items=[item.proto() for item in body.line_items or []],
        next_step=body.next_step or "",
        product_line=body.product_line or "",
        tags=body.tags or [],
        forecast_category=body.forecast_category or "",
        override_collision=body.override_collision,
        override_reason=body.override_reason or "",
    )
    if body.amount is not None:
        message.amount.CopyFrom(body.amount.proto())
    if body.custom:
        message.custom.update(body.custom)
    stub = _stub(request)
    reply = await references.check_or_replay(
        idempotency_key, lambda replay: stub.CreateOpportunity(message, metadata=access.grpc_metadata() + replay)
    )
    return await _deal_written(access, response, None, reply.opportunity)


async def _deal_written(
    access: Access, response: Response, before: dict[str, Any] | None, deal: sales_pb2.Opportunity
) -> dict[str, Any]:
    """The answer to a write of a deal: audited against `before` (None for a create), a manager's
    collision override audited on its own, shown as the caller may see it, with its ETag."""
    record = opportunity_dict(deal)
    await access.audit_write(record["id"], before, record)
    await _audit_collision_override(access, record, before)
    present = await presenter(access)
    return with_etag(response, present(record))


async def _audit_collision_override(access: Access, record: dict[str, Any], before: dict[str, Any] | None) -> None:
    """A manager's 防撞单 override is audited on its own, with the deal it overrode and why."""
    overridden = record["colliding_opportunity_id"]
    if record["collision_override_by"] and overridden != (before or {}).get("colliding_opportunity_id"):
        await access.audit(
            "override_collision",
            record["id"],
            fields=["colliding_opportunity_id"],
            reason=f"over {overridden}: {record['collision_override_reason']}",
        )


# The filters of GET /opportunities (and of the export): query parameter -> the field(s) it filters by.
OPPORTUNITY_FILTERS: FilterFields = {
    "account_id": "account_id",
    "status": "status",
    "owner_id": "owner_id",
    "team": "team",
    "stage": "stage",
    "pipeline_id": "pipeline_id",
    "product_line": "product_line",
    "campaign_id": "campaign_id",
    "q": "name",
    "rotting": "rotting",
}


@router.get(
    "/opportunities",
    openapi_extra=CUSTOM_FILTER_PARAMETERS,
    responses={200: {"model": schemas.Page[schemas.Opportunity]}},
)
async def list_opportunities(
    request: Request,
    access: OpportunitiesRead,
    account_id: str | None = None,
    status: Annotated[list[str] | None, Query(description="open, won, lost (repeat or comma-separate)")] = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    team: str | None = None,
    stage: str | None = None,
    pipeline_id: str | None = None,
    product_line: str | None = None,
    campaign_id: Annotated[str | None, Query(description="the deals a campaign brought")] = None,
    q: Annotated[str | None, Query(max_length=200, description="name contains")] = None,
    rotting: Annotated[bool, Query(description="only open deals past their stage's rotting days")] = False,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[str | None, Query(description="created_at, updated_at, expected_close_date, amount, name")] = None,
) -> dict[str, Any]:
    access.check_filters(OPPORTUNITY_FILTERS)
    custom = await custom_filters(access)
    statuses = [part.strip() for value in status or [] for part in value.split(",") if part.strip()]
    reply = await _stub(request).ListOpportunities(
        pb.ListOpportunitiesRequest(
            page=_page(limit, cursor, sort, access),
            account_id=account_id or "",
            statuses=statuses,
            owner_id=access.resolve_me(owner_id),
            team=team or "",
            stage=stage or "",
            pipeline_id=pipeline_id or "",
            product_line=product_line or "",
            campaign_id=campaign_id or "",
            q=q or "",
            rotting_only=rotting,
            custom=custom,
        ),
        metadata=access.grpc_metadata(),
    )
    present = await presenter(access)
    return _list([present(opportunity_dict(o)) for o in reply.items], reply.page_info.next_cursor)


@router.get("/opportunities/{opportunity_id}", responses={200: {"model": schemas.Opportunity}})
async def get_opportunity(
    opportunity_id: str, request: Request, response: Response, access: OpportunitiesRead
) -> dict[str, Any]:
    reply = await _stub(request).GetOpportunity(
        pb.GetOpportunityRequest(id=opportunity_id), metadata=access.grpc_metadata()
    )
    present = await presenter(access)
    return with_etag(response, present(opportunity_dict(reply.opportunity)))


@router.patch("/opportunities/{opportunity_id}", responses={200: {"model": schemas.Opportunity}})
async def update_opportunity(
    opportunity_id: str,
    body: OpportunityPatch,
    request: Request,
    response: Response,
    access: OpportunitiesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    values = body.model_dump(mode="json", exclude_unset=True, exclude=OVERRIDE_FIELDS)
    access.check_write(values)
    source = sales_pb2.Opportunity(
        name=body.name or "",
        primary_contact_id=body.primary_contact_id or "",
        expected_close_date=_iso(body.expected_close_date),
        owner_id=body.owner_id or "",
        team=body.team or "",
        region=body.region or "",
        next_step=body.next_step or "",
        product_line=body.product_line or "",
        tags=body.tags or [],
        forecast_category=body.forecast_category or "",
    )
    if body.amount is not None:
        source.amount.CopyFrom(body.amount.proto())
    if body.custom:
        source.custom.update(body.custom)
    stub = _stub(request)
    if body.primary_contact_id:
        # A deal's primary contact works at its account, which only the deal tells (read for this check
        # alone: the audit's `before` comes with the write).
        deal = await stub.GetOpportunity(pb.GetOpportunityRequest(id=opportunity_id), metadata=access.grpc_metadata())
        contact = References(access).add(
            "primary_contact_id", CONTACT, body.primary_contact_id, on_account=deal.opportunity.account_id
        )
        await contact.check()
    message = pb.UpdateOpportunityRequest(
        id=opportunity_id,
        expected_version=expected_version(if_match),
        update_mask=field_mask_pb2.FieldMask(paths=list(values)),
        opportunity=source,
        line_items=[item.proto() for item in body.line_items or []],
        override_collision=body.override_collision,
        override_reason=body.override_reason or "",
    )
    discounts_scope = _discounts_scope(access, values) if "line_items" in values else None
    if discounts_scope is not None:
        message.discounts_scope.CopyFrom(discounts_scope.to_proto())
    reply = await stub.UpdateOpportunity(message, metadata=access.grpc_metadata())
    return await _deal_written(access, response, opportunity_dict(reply.previous), reply.opportunity)


@router.post("/opportunities/{opportunity_id}/assign", responses={200: {"model": schemas.Opportunity}})
async def assign_opportunity(
    opportunity_id: str,
    body: OpportunityAssign,
    request: Request,
    response: Response,
    access: OpportunitiesAssign,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Hands an open deal to another owner (a rep leaves, territories change), with its quotes; team
    and region change only when given. 409 for a won or lost deal: its close credited its owner."""
    access.check_write(_written(body, exclude=OVERRIDE_FIELDS))
    reply = await _stub(request).AssignOpportunity(
        pb.AssignOpportunityRequest(
            id=opportunity_id,
            expected_version=expected_version(if_match),
            owner_id=body.owner_id,
            team=body.team or "",
            region=body.region or "",
            override_collision=body.override_collision,
            override_reason=body.override_reason or "",
        ),
        metadata=access.grpc_metadata(),
    )
    return await _deal_written(access, response, opportunity_dict(reply.previous), reply.opportunity)


@router.delete("/opportunities/{opportunity_id}", status_code=204)
async def delete_opportunity(
    opportunity_id: str, request: Request, access: OpportunitiesDelete, if_match: IfMatch = None
) -> Response:
    """A deal entered by mistake (409 when a contract refers to it: close it as won or lost instead)."""
    reply = await _stub(request).DeleteOpportunity(
        pb.DeleteOpportunityRequest(id=opportunity_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(opportunity_id, opportunity_dict(reply.previous), None)
    return Response(status_code=204)


@router.post("/opportunities/{opportunity_id}/stage", responses={200: {"model": schemas.Opportunity}})
async def move_opportunity_stage(
    opportunity_id: str,
    body: StageMove,
    request: Request,
    response: Response,
    access: OpportunitiesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """422 names the fields the stage gate requires and the deal lacks."""
    reply = await _stub(request).MoveOpportunityStage(
        pb.MoveOpportunityStageRequest(
            id=opportunity_id, stage=body.stage, expected_version=expected_version(if_match)
        ),
        metadata=access.grpc_metadata(),
    )
    return await _deal_written(access, response, opportunity_dict(reply.previous), reply.opportunity)


@router.post("/opportunities/{opportunity_id}/win", responses={200: {"model": schemas.Opportunity}})
async def win_opportunity(
    opportunity_id: str,
    request: Request,
    response: Response,
    access: OpportunitiesUpdate,
    body: WinBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    body = body or WinBody()
    message = pb.WinOpportunityRequest(
        id=opportunity_id, expected_version=expected_version(if_match), close_date=_iso(body.close_date)
    )
    if body.amount is not None:
        access.check_write(["amount"])
        message.amount.CopyFrom(body.amount.proto())
    reply = await _stub(request).WinOpportunity(message, metadata=access.grpc_metadata())
    return await _deal_written(access, response, opportunity_dict(reply.previous), reply.opportunity)


@router.post("/opportunities/{opportunity_id}/lose", responses={200: {"model": schemas.Opportunity}})
async def lose_opportunity(
    opportunity_id: str,
    body: LoseBody,
    request: Request,
    response: Response,
    access: OpportunitiesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    reply = await _stub(request).LoseOpportunity(
        pb.LoseOpportunityRequest(
            id=opportunity_id,
            expected_version=expected_version(if_match),
            reason=body.reason,
            close_date=_iso(body.close_date),
        ),
        metadata=access.grpc_metadata(),
    )
    return await _deal_written(access, response, opportunity_dict(reply.previous), reply.opportunity)


@router.post("/opportunities/import", responses={200: {"model": schemas.OpportunityImportAnswer}})
async def import_opportunities(body: ImportBody, request: Request, access: OpportunitiesImport) -> dict[str, Any]:
    """Deals of another system as they are (open at a stage, won or lost), per-row results;
    a repeated `external_id` returns the first result. A row that cannot be stored or does not fit
    its schema is rejected alone, here, with the fields at fault; the service rejects the others it
    refuses (a deal imported open meets anti-collision, as a created one does)."""
    checked: dict[int, ImportRowBody] = {}
    refused: dict[int, list[dict[str, str]]] = {}
    for index, raw in enumerate(body.rows):
        unstorable = [field_error({"loc": loc, "msg": problem}) for loc, problem in unstorable_values(raw)]
        if unstorable:
            refused[index] = unstorable
            continue
        try:
            checked[index] = ImportRowBody.model_validate(raw)
        except ValidationError as error:
            refused[index] = [field_error(item) for item in error.errors()]
    for row in checked.values():
        access.check_write(_written(row, exclude={"external_id", "engaged_at", "close_date", "lost_reason", "stage"}))
    # A deal names an account that exists, as in a create (`References`): a row naming none is
    # refused alone (unless imported before: the service answers `existing`), the others imported.
    refusals = await rows_naming_no_account(access, {i: r.account_id for i, r in checked.items()})
    rows = []
    for index, row in checked.items():
        message = pb.ImportOpportunityRow(
            external_id=row.external_id,
            account_id=row.account_id,
            name=row.name,
            owner_id=row.owner_id or "",
            team=row.team or "",
            region=row.region or "",
            product_line=row.product_line,
            line_items=[item.proto() for item in row.line_items],
            stage=row.stage,
            expected_close_date=_iso(row.expected_close_date),
            close_date=_iso(row.close_date),
            lost_reason=row.lost_reason,
            refusal=refusals.get(index, ""),
        )
        if row.amount is not None:
            message.amount.CopyFrom(row.amount.proto())
        engaged = _timestamp(row.engaged_at)
        if engaged is not None:
            message.engaged_at.CopyFrom(engaged)
        rows.append(message)
    results = {index: _rejected_import_row(index, body.rows[index], errors) for index, errors in refused.items()}
    if rows:
        reply = await _stub(request).ImportOpportunities(
            pb.ImportOpportunitiesRequest(
                pipeline_id=body.pipeline_id or "",
                rows=rows,
                override_collision=body.override_collision,
                override_reason=body.override_reason or "",
            ),
            metadata=access.grpc_metadata(),
        )
        sent = list(checked)  # the service numbers the rows it was sent
        for r in reply.results:
            results[sent[r.row]] = _import_row_result(sent[r.row], r)
    await audit_refused_rows(
        access, {index: problem for index, problem in refusals.items() if results[index]["outcome"] == "rejected"}
    )
    answer = _import_answer(results)
    overriding = f"; anti-collision overridden: {body.override_reason}" if body.override_collision else ""
    await access.audit("import", "", reason=f"{answer['created']} created, {answer['rejected']} rejected{overriding}")
    # Each deal the import created is on its own trail, as one created alone is.
    created = [
        (r["opportunity_id"], f"import row {r['row']}, external_id {r['external_id']}")
        for r in answer["results"]
        if r["outcome"] == "created"
    ]
    await access.audit_each("create", created)
    return answer


def _rejected_import_row(row: int, raw: Mapping[str, Any], errors: list[dict[str, str]]) -> dict[str, Any]:
    """The result of a row refused here (it does not fit `ImportRowBody`): the service never saw it."""
    return {
        "row": row,
        "external_id": str(raw.get("external_id") or ""),
        "outcome": "rejected",
        "opportunity_id": None,
        "errors": errors,
    }


def _import_row_result(row: int, result: pb.ImportRowResult) -> dict[str, Any]:
    """The service's result of a row, under the row's place in the request."""
    return {
        "row": row,
        "external_id": result.external_id,
        "outcome": result.outcome,
        "opportunity_id": result.opportunity_id or None,
        "errors": [{"field": e.field, "message": e.message} for e in result.errors],
    }


def _import_answer(results: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Every row's result in the request's order, with how many were created and rejected."""
    ordered = [results[index] for index in sorted(results)]
    created = sum(1 for result in ordered if result["outcome"] == "created")
    rejected = sum(1 for result in ordered if result["outcome"] == "rejected")
    return {"created": created, "rejected": rejected, "results": ordered}


# --- forecast ----------------------------------------------------------------------------------------

ForecastRead = Annotated[Access, Depends(require("forecast", "read"))]


# The filters of GET /forecast (and of its export): an owner or team is a row's `group`; a pipeline
# is no field of the rows.
FORECAST_FILTERS: FilterFields = {
    "period": "period",
    "from": "period",
    "to": "period",
    "group_by": "group",
    "owner_id": "group",
    "team": "group",
    "pipeline_id": (),
}


@router.get("/forecast", response_model=None, responses=json_or_csv(schemas.Forecast))
async def forecast(
    request: Request,
    access: ForecastRead,
    period: Literal["month", "quarter"] = "month",
    group_by: Literal["owner", "team"] = "owner",
    from_date: Annotated[date | None, Query(alias="from")] = None,
    to_date: Annotated[date | None, Query(alias="to")] = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    team: str | None = None,
    pipeline_id: str | None = None,
    format: Format = "json",
) -> Any:
    """Pipeline, weighted, commit, best case and closed won per period, owner or team and currency.
    Open deals count by expected close date, won deals by close date. As CSV with `format=csv`
    (the forecast's `export` action; `/exports/forecast` too)."""
    access = report_access(access, format)
    check_period("from", from_date, "to", to_date, end_inclusive=True)
    access.check_filters(FORECAST_FILTERS)
    reply = await _stub(request).GetForecast(
        _forecast_request(
            period, group_by, _iso(from_date), _iso(to_date), access.resolve_me(owner_id), team, pipeline_id
        ),
        metadata=access.grpc_metadata(),
    )
    rows = access.present_many(_forecast_row(r) for r in reply.rows)
    body = {"period": period, "group_by": group_by, "rows": rows}
    return await report_answer(request, access, "forecast", body, rows, query_described(request))


def _forecast_request(
    period: str, group_by: str, from_date: str, to_date: str, owner_id: str, team: str | None, pipeline_id: str | None
) -> pb.GetForecastRequest:
    return pb.GetForecastRequest(
        period=pb.FORECAST_PERIOD_QUARTER if period == "quarter" else pb.FORECAST_PERIOD_MONTH,
        group_by=pb.FORECAST_GROUP_BY_TEAM if group_by == "team" else pb.FORECAST_GROUP_BY_OWNER,
        from_date=from_date,
        to_date=to_date,
        owner_id=owner_id,
        team=team or "",
        pipeline_id=pipeline_id or "",
    )


def _forecast_row(r: pb.ForecastRow) -> dict[str, Any]:
    return {
        "period": r.period,
        "group": r.group,
        "currency": r.currency,
        "pipeline": _money(r.pipeline),
        "weighted": _money(r.weighted),
        "commit": _money(r.commit),
        "best_case": _money(r.best_case),
        "closed_won": _money(r.closed_won),
        "open_count": r.open_count,
        "won_count": r.won_count,
    }


# `GET /exports/forecast`: the forecast rows with the forecast route's query parameters (the generic
# export route has already put the caller's id for `owner_id=me`). Columns are the policy's forecast
# fields; amounts are `amount currency`.
_FORECAST_CHOICES = {"period": ("month", "quarter"), "group_by": ("owner", "team")}


def _check_forecast_export(filters: Mapping[str, str]) -> dict[str, str]:
    """The GetForecast parameters from the export's filters; 422 naming a bad one."""
    values = {"period": "month", "group_by": "owner", **filters}
    for name, choices in _FORECAST_CHOICES.items():
        if values[name] not in choices:
            raise invalid_filter(name, f"filter '{name}' must be one of {', '.join(choices)}")
    bounds: dict[str, date | None] = {}
    for name in ("from", "to"):
        try:
            bounds[name] = date.fromisoformat(values[name]) if values.get(name) else None
        except ValueError:
            raise invalid_filter(name, f"filter '{name}' must be an ISO date (YYYY-MM-DD)") from None
    if problem := period_problem("from", bounds["from"], bounds["to"], end_inclusive=True):
        raise invalid_filter("to", f"filter 'to' {problem}")
    return values


async def _forecast_export_rows(access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
    values = _check_forecast_export(filters)
    reply = await _stub(access.request).GetForecast(
        _forecast_request(
            values["period"],
            values["group_by"],
            values.get("from", ""),
            values.get("to", ""),
            values.get("owner_id", ""),
            values.get("team"),
            values.get("pipeline_id"),
        ),
        metadata=access.grpc_metadata(),
    )
    for row in reply.rows:
        yield _forecast_row(row)


register_export_source(
    "forecast",
    _forecast_export_rows,
    filters=set(FORECAST_FILTERS),
    check=_check_forecast_export,
    fields=FORECAST_FILTERS,
)


@router.get("/forecast/win-statistics", responses={200: {"model": schemas.WinStatisticsReport}})
async def win_statistics(
    request: Request,
    access: ForecastRead,
    from_date: Annotated[date | None, Query(alias="from")] = None,
    to_date: Annotated[date | None, Query(alias="to")] = None,
    team: str | None = None,
) -> dict[str, Any]:
    """Closed deals (by close date): won amount, won and lost counts and win rate, overall and per owner.
    The won amount is shown as the caller sees deals' amounts (left out without a grant to read deals)."""
    access.check_filters({name: FORECAST_FILTERS[name] for name in ("from", "to", "team")})
    reply = await _stub(request).GetWinStatistics(
        pb.GetWinStatisticsRequest(from_date=_iso(from_date), to_date=_iso(to_date), team=team or ""),
        metadata=access.grpc_metadata(),
    )
    return win_statistics_view(reply, access.view("opportunities"))


def win_statistics_view(reply: pb.GetWinStatisticsResponse, opportunities: Access | None) -> dict[str, Any]:
    """The statistics overall and per owner, their won amount shown as `opportunities` (the caller's
    view of deals) shows a deal's amount; left out without one."""

    def stats(s: pb.WinStatistics) -> dict[str, Any]:
        won = {"won_amount": _money(s.won_amount)}
        return {
            "owner_id": s.owner_id or None,
            "currency": s.currency,
            **(opportunities.present_derived(won, like="amount") if opportunities else {}),
            "won_count": s.won_count,
            "lost_count": s.lost_count,
            "win_rate": s.win_rate,
        }

    return {"overall": [stats(s) for s in reply.overall], "by_owner": [stats(s) for s in reply.by_owner]}


# --- targets and attainment (业绩达成率) ----------------------------------------------------------------

TargetsRead = Annotated[Access, Depends(require("targets", "read"))]
TargetsCreate = Annotated[Access, Depends(require("targets", "create"))]
TargetsUpdate = Annotated[Access, Depends(require("targets", "update"))]
TargetsDelete = Annotated[Access, Depends(require("targets", "delete"))]

# The filters of GET /targets: `from` and `to` select targets by the months of their period.
TARGET_FILTERS: FilterFields = {"from": "period", "to": "period", "owner_id": "owner_id", "team": "team"}
# The filters of GET /forecast/attainment: the forecast's, but for the pipeline (targets have none).
ATTAINMENT_FILTERS: FilterFields = {name: fields for name, fields in FORECAST_FILTERS.items() if name != "pipeline_id"}


@router.post("/targets", status_code=201, responses={201: {"model": schemas.Target}})
async def create_target(
    body: TargetCreate,
    request: Request,
    response: Response,
    access: TargetsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """An owner's target (`owner_id`, with the owner's `team`, which decides who sees it) or, without
    `owner_id`, a team's. 409 when the owner or team has a target for the period already
    (`existing_id` names it when the caller may read it): PATCH that one's amount instead."""
    access.check_write(_written(body))
    reply = await _stub(request).CreateTarget(
        pb.CreateTargetRequest(
            idempotency_key=idempotency_key,
            owner_id=body.owner_id or "",
            team=body.team or "",
            period=body.period,
            amount=body.amount.proto(),
        ),
        metadata=access.grpc_metadata(),
    )
    record = target_dict(reply.target)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/targets", responses={200: {"model": schemas.Page[schemas.Target]}})
async def list_targets(
    request: Request,
    access: TargetsRead,
    from_date: Annotated[date | None, Query(alias="from", description="targets whose period ends on or after")] = None,
    to_date: Annotated[date | None, Query(alias="to", description="targets whose period starts on or before")] = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    team: str | None = None,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[
        str | None, Query(description="created_at (default: newest first), updated_at; - descending")
    ] = None,
) -> dict[str, Any]:
    check_period("from", from_date, "to", to_date, end_inclusive=True)
    access.check_filters(TARGET_FILTERS)
    reply = await _stub(request).ListTargets(
        pb.ListTargetsRequest(
            page=_page(limit, cursor, sort, access),
            from_date=_iso(from_date),
            to_date=_iso(to_date),
            owner_id=access.resolve_me(owner_id),
            team=team or "",
        ),
        metadata=access.grpc_metadata(),
    )
    return _list(access.present_many(target_dict(t) for t in reply.items), reply.page_info.next_cursor)


@router.get("/targets/{target_id}", responses={200: {"model": schemas.Target}})
async def get_target(target_id: str, request: Request, response: Response, access: TargetsRead) -> dict[str, Any]:
    reply = await _stub(request).GetTarget(pb.GetTargetRequest(id=target_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(target_dict(reply.target)))


@router.patch("/targets/{target_id}", responses={200: {"model": schemas.Target}})
async def update_target(
    target_id: str,
    body: TargetPatch,
    request: Request,
    response: Response,
    access: TargetsUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """A new amount (owner, team and period name the target: create another for another)."""
    access.check_write(_written(body))
    reply = await _stub(request).UpdateTarget(
        pb.UpdateTargetRequest(id=target_id, amount=body.amount.proto(), expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    record = target_dict(reply.target)
    await access.audit_write(target_id, target_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.delete("/targets/{target_id}", status_code=204)
async def delete_target(target_id: str, request: Request, access: TargetsDelete, if_match: IfMatch = None) -> Response:
    reply = await _stub(request).DeleteTarget(
        pb.DeleteTargetRequest(id=target_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(target_id, target_dict(reply.previous), None)
    return Response(status_code=204)


@router.get("/forecast/attainment", response_model=None, responses=json_or_csv(schemas.Attainment))
async def attainment(
    request: Request,
    access: ForecastRead,
    period: Literal["month", "quarter"] = "month",
    group_by: Literal["owner", "team"] = "owner",
    from_date: Annotated[date | None, Query(alias="from")] = None,
    to_date: Annotated[date | None, Query(alias="to")] = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    team: str | None = None,
    format: Format = "json",
) -> Any:
    """业绩达成率: per period, owner or team and currency, the target (monthly targets by month,
    quarterly ones by quarter, or a quarter's three monthly ones summed; owners' by owner, teams' by
    team), the forecast's closed won, attainment = closed won / target, and the forecast's commit
    and weighted pipeline, to read whether the target will be made. Read as the forecast is (its
    grant and record scope); as CSV with `format=csv` (the forecast's `export` action)."""
    access = report_access(access, format)
    check_period("from", from_date, "to", to_date, end_inclusive=True)
    access.check_filters(ATTAINMENT_FILTERS)
    reply = await _stub(request).GetAttainment(
        pb.GetAttainmentRequest(
            period=pb.FORECAST_PERIOD_QUARTER if period == "quarter" else pb.FORECAST_PERIOD_MONTH,
            group_by=pb.FORECAST_GROUP_BY_TEAM if group_by == "team" else pb.FORECAST_GROUP_BY_OWNER,
            from_date=_iso(from_date),
            to_date=_iso(to_date),
            owner_id=access.resolve_me(owner_id),
            team=team or "",
        ),
        metadata=access.grpc_metadata(),
    )
    rows = [attainment_row(r, access) for r in reply.rows]
    body = {"period": period, "group_by": group_by, "rows": rows}
    return await report_answer(request, access, "attainment", body, rows, query_described(request))


# --- quotes ------------------------------------------------------------------------------------------

QuotesRead = Annotated[Access, Depends(require("quotes", "read"))]
QuotesCreate = Annotated[Access, Depends(require("quotes", "create"))]
QuotesUpdate = Annotated[Access, Depends(require("quotes", "update"))]
QuotesApprove = Annotated[Access, Depends(require("quotes", "approve"))]
QuotesDelete = Annotated[Access, Depends(require("quotes", "delete"))]
DISCOUNT_FIELD = "line_items.discount_percent"


@router.post("/quotes", status_code=201, responses={201: {"model": schemas.Quote}})
async def create_quote(
    body: QuoteCreate,
    request: Request,
    response: Response,
    access: QuotesCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    access.check_write(_written(body))
    reply = await _stub(request).CreateQuote(
        pb.CreateQuoteRequest(
            idempotency_key=idempotency_key,
            opportunity_id=body.opportunity_id,
            line_items=[item.proto() for item in body.line_items],
        ),
        metadata=access.grpc_metadata(),
    )
    record = quote_dict(reply.quote)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/quotes", responses={200: {"model": schemas.Page[schemas.Quote]}})
async def list_quotes(
    request: Request,
    access: QuotesRead,
    opportunity_id: str | None = None,
    status: QuoteStatus | None = None,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[
        str | None, Query(description="created_at (default: newest first), updated_at; - descending")
    ] = None,
) -> dict[str, Any]:
    access.check_filters({"opportunity_id": "opportunity_id", "status": "status"})
    reply = await _stub(request).ListQuotes(
        pb.ListQuotesRequest(
            page=_page(limit, cursor, sort, access), opportunity_id=opportunity_id or "", status=status or ""
        ),
        metadata=access.grpc_metadata(),
    )
    return _list(access.present_many(quote_dict(q) for q in reply.items), reply.page_info.next_cursor)


@router.get("/quotes/{quote_id}", responses={200: {"model": schemas.Quote}})
async def get_quote(quote_id: str, request: Request, response: Response, access: QuotesRead) -> dict[str, Any]:
    reply = await _stub(request).GetQuote(pb.GetQuoteRequest(id=quote_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(quote_dict(reply.quote)))


@router.patch("/quotes/{quote_id}", responses={200: {"model": schemas.Quote}})
async def update_quote(
    quote_id: str,
    body: QuotePatch,
    request: Request,
    response: Response,
    access: QuotesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """New line items for a quote not yet decided: totals and the approvals its discounts need are
    computed again, and decisions already made are void (its `status` says it awaits approval again).
    409 once approved or rejected, or when its deal has a contract."""
    written = _written(body)
    access.check_write(written)
    message = pb.UpdateQuoteRequest(
        id=quote_id,
        expected_version=expected_version(if_match),
        line_items=[item.proto() for item in body.line_items],
    )
    discounts_scope = _discounts_scope(access, written)
    if discounts_scope is not None:
        message.discounts_scope.CopyFrom(discounts_scope.to_proto())
    reply = await _stub(request).UpdateQuote(message, metadata=access.grpc_metadata())
    record = quote_dict(reply.quote)
    await access.audit_write(quote_id, quote_dict(reply.previous), record)
    return with_etag(response, access.present(record))


def _discounts_scope(access: Access, written: dict[str, Any]) -> RecordScope | None:
    """Where the caller may give new line items to a quote or deal that has discounts: they replace
    the old with their discounts, which who may not set discounts (nor see them) would drop unseen.
    The scope of the caller's grants that may set the body's fields and discounts too; None when
    none may. The service applies it to such a record, as it finds it under its row lock."""
    writers = access.require_view(access.resource, access.action)  # a decision of its own to narrow
    try:
        writers.check_write(written)
        writers.check_write([DISCOUNT_FIELD])
    except SecurityProblem:
        return None
    return writers.scope


@router.post("/quotes/{quote_id}/approve", responses={200: {"model": schemas.Quote}})
async def approve_quote(
    quote_id: str,
    request: Request,
    response: Response,
    access: QuotesApprove,
    body: DecisionBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """The discount step the quote waits for, decided with the caller's role: 403 for any other role,
    for the quote's creator and for one who decided an earlier step."""
    comment = (body or DecisionBody()).comment
    reply = await _stub(request).ApproveQuote(
        pb.ApproveQuoteRequest(id=quote_id, expected_version=expected_version(if_match), comment=comment),
        metadata=access.grpc_metadata(),
    )
    record = quote_dict(reply.quote)
    await access.audit_write(quote_id, quote_dict(reply.previous), record, action="approve", reason=comment)
    return with_etag(response, access.present(record))


@router.post("/quotes/{quote_id}/reject", responses={200: {"model": schemas.Quote}})
async def reject_quote(
    quote_id: str,
    request: Request,
    response: Response,
    access: QuotesApprove,
    body: DecisionBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    comment = (body or DecisionBody()).comment
    reply = await _stub(request).RejectQuote(
        pb.RejectQuoteRequest(id=quote_id, expected_version=expected_version(if_match), comment=comment),
        metadata=access.grpc_metadata(),
    )
    record = quote_dict(reply.quote)
    await access.audit_write(quote_id, quote_dict(reply.previous), record, action="reject", reason=comment)
    return with_etag(response, access.present(record))


@router.delete("/quotes/{quote_id}", status_code=204)
async def delete_quote(quote_id: str, request: Request, access: QuotesDelete, if_match: IfMatch = None) -> Response:
    """A quote before approval (409 once approved, or when its deal has a contract)."""
    reply = await _stub(request).DeleteQuote(
        pb.DeleteQuoteRequest(id=quote_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(quote_id, quote_dict(reply.previous), None)
    return Response(status_code=204)


# --- contracts ---------------------------------------------------------------------------------------

ContractsRead = Annotated[Access, Depends(require("contracts", "read"))]
ContractsCreate = Annotated[Access, Depends(require("contracts", "create"))]
ContractsUpdate = Annotated[Access, Depends(require("contracts", "update"))]
ContractsApprove = Annotated[Access, Depends(require("contracts", "approve"))]
ContractsDelete = Annotated[Access, Depends(require("contracts", "delete"))]


@router.post("/contracts", status_code=201, responses={201: {"model": schemas.Contract}})
async def create_contract(
    body: ContractCreate,
    request: Request,
    response: Response,
    access: ContractsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """From a won opportunity (`opportunity_id`: account, amount, owner follow it) or direct
    (`account_id`, `title`, `amount`)."""
    access.check_write(_written(body))
    references = References(access).add("account_id", ACCOUNT, body.account_id)
    message = pb.CreateContractRequest(
        idempotency_key=idempotency_key,
        opportunity_id=body.opportunity_id or "",
        account_id=body.account_id or "",
        title=body.title or "",
        owner_id=body.owner_id or "",
        team=body.team or "",
        region=body.region or "",
        starts_on=_iso(body.starts_on),
        ends_on=_iso(body.ends_on),
    )
    if body.amount is not None:
        message.amount.CopyFrom(body.amount.proto())
    stub = _stub(request)
    reply = await references.check_or_replay(
        idempotency_key, lambda replay: stub.CreateContract(message, metadata=access.grpc_metadata() + replay)
    )
    record = contract_dict(reply.contract)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/contracts", responses={200: {"model": schemas.Page[schemas.Contract]}})
async def list_contracts(
    request: Request,
    access: ContractsRead,
    account_id: str | None = None,
    status: ContractStatus | None = None,
    opportunity_id: str | None = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[str | None, Query(description="created_at, updated_at; - for descending")] = None,
) -> dict[str, Any]:
    access.check_filters(
        {"account_id": "account_id", "status": "status", "opportunity_id": "opportunity_id", "owner_id": "owner_id"}
    )
    reply = await _stub(request).ListContracts(
        pb.ListContractsRequest(
            page=_page(limit, cursor, sort, access),
            account_id=account_id or "",
            status=status or "",
            opportunity_id=opportunity_id or "",
            owner_id=access.resolve_me(owner_id),
        ),
        metadata=access.grpc_metadata(),
    )
    return _list(access.present_many(contract_dict(c) for c in reply.items), reply.page_info.next_cursor)


@router.get("/contracts/{contract_id}", responses={200: {"model": schemas.Contract}})
async def get_contract(contract_id: str, request: Request, response: Response, access: ContractsRead) -> dict[str, Any]:
    reply = await _stub(request).GetContract(pb.GetContractRequest(id=contract_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(contract_dict(reply.contract)))


async def _contract_step(
    request: Request, response: Response, access: Access, contract_id: str, call: str, message: Message, reason: str
) -> dict[str, Any]:
    """One status-machine step (illegal transitions come back as 409), audited with its action."""
    reply = await getattr(_stub(request), call)(message, metadata=access.grpc_metadata())
    record = contract_dict(reply.contract)
    await access.audit_write(contract_id, contract_dict(reply.previous), record, reason=reason)
    return with_etag(response, access.present(record))


@router.post("/contracts/{contract_id}/submit", responses={200: {"model": schemas.Contract}})
async def submit_contract(
    contract_id: str, request: Request, response: Response, access: ContractsUpdate, if_match: IfMatch = None
) -> dict[str, Any]:
    message = pb.SubmitContractRequest(id=contract_id, expected_version=expected_version(if_match))
    return await _contract_step(request, response, access, contract_id, "SubmitContract", message, "submitted")


@router.post("/contracts/{contract_id}/approve", responses={200: {"model": schemas.Contract}})
async def approve_contract(
    contract_id: str,
    request: Request,
    response: Response,
    access: ContractsApprove,
    body: DecisionBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """The step the approval chain waits for, decided with the caller's role: 403 for any other role,
    for the user who submitted the contract and for one who decided an earlier step of this round."""
    comment = (body or DecisionBody()).comment
    message = pb.ApproveContractRequest(id=contract_id, expected_version=expected_version(if_match), comment=comment)
    return await _contract_step(request, response, access, contract_id, "ApproveContract", message, comment)


@router.post("/contracts/{contract_id}/reject", responses={200: {"model": schemas.Contract}})
async def reject_contract(
    contract_id: str,
    request: Request,
    response: Response,
    access: ContractsApprove,
    body: DecisionBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    comment = (body or DecisionBody()).comment
    message = pb.RejectContractRequest(id=contract_id, expected_version=expected_version(if_match), comment=comment)
    return await _contract_step(request, response, access, contract_id, "RejectContract", message, comment)


@router.post("/contracts/{contract_id}/sign", responses={200: {"model": schemas.Contract}})
async def sign_contract(
    contract_id: str,
    request: Request,
    response: Response,
    access: ContractsUpdate,
    body: SignBody | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    message = pb.SignContractRequest(id=contract_id, expected_version=expected_version(if_match))
    signed_at = _timestamp((body or SignBody()).signed_at)
    if signed_at is not None:
        message.signed_at.CopyFrom(signed_at)
    return await _contract_step(request, response, access, contract_id, "SignContract", message, "signed")


@router.post("/contracts/{contract_id}/complete", responses={200: {"model": schemas.Contract}})
async def complete_contract(
    contract_id: str, request: Request, response: Response, access: ContractsUpdate, if_match: IfMatch = None
) -> dict[str, Any]:
    """A signed contract paid in full (409 with reason OUTSTANDING_BALANCE while anything is owed)."""
    message = pb.CompleteContractRequest(id=contract_id, expected_version=expected_version(if_match))
    return await _contract_step(request, response, access, contract_id, "CompleteContract", message, "completed")


@router.post("/contracts/{contract_id}/terminate", responses={200: {"model": schemas.Contract}})
async def terminate_contract(
    contract_id: str,
    body: ReasonBody,
    request: Request,
    response: Response,
    access: ContractsUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    access.check_write(["terminated_reason"])
    message = pb.TerminateContractRequest(
        id=contract_id, expected_version=expected_version(if_match), reason=body.reason
    )
    return await _contract_step(request, response, access, contract_id, "TerminateContract", message, body.reason)


@router.delete("/contracts/{contract_id}", status_code=204)
async def delete_contract(
    contract_id: str, request: Request, access: ContractsDelete, if_match: IfMatch = None
) -> Response:
    """A contract that never took effect, draft or rejected (409 for any other status)."""
    reply = await _stub(request).DeleteContract(
        pb.DeleteContractRequest(id=contract_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(contract_id, contract_dict(reply.previous), None)
    return Response(status_code=204)


@router.patch("/contracts/{contract_id}", responses={200: {"model": schemas.Contract}})
async def update_contract(
    contract_id: str,
    body: ContractPatch,
    request: Request,
    response: Response,
    access: ContractsUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Corrects a draft or rejected contract's title or term, before it is submitted (again): 409 once
    approvers decide on it or it was approved; its amount, account and deal are what it was made from."""
    given = body.model_dump(exclude_unset=True)
    if not given:
        raise RequestValidationError([{"loc": ("body",), "msg": "names no field to change", "type": "value_error"}])
    access.check_write(given)
    contract = sales_pb2.Contract(
        title=given.get("title") or "",
        starts_on=_iso(given.get("starts_on")),
        ends_on=_iso(given.get("ends_on")),
    )
    message = pb.UpdateContractRequest(
        id=contract_id,
        expected_version=expected_version(if_match),
        contract=contract,
        update_mask=field_mask_pb2.FieldMask(paths=list(given)),
    )
    reply = await _stub(request).UpdateContract(message, metadata=access.grpc_metadata())
    record = contract_dict(reply.contract)
    await access.audit_write(contract_id, contract_dict(reply.previous), record)
    return with_etag(response, access.present(record))


# --- payment plans, payments, receivables ----------------------------------------------------------

PlansRead = Annotated[Access, Depends(require("payment_plans", "read"))]
PlansCreate = Annotated[Access, Depends(require("payment_plans", "create"))]
PlansUpdate = Annotated[Access, Depends(require("payment_plans", "update"))]
PaymentsRead = Annotated[Access, Depends(require("payments", "read"))]
PaymentsCreate = Annotated[Access, Depends(require("payments", "create"))]


def _installments(body: PaymentPlanCreate | PaymentPlanReplacement) -> list[pb.InstallmentInput]:
    return [
        pb.InstallmentInput(due_date=item.due_date.isoformat(), amount=item.amount.proto())
        for item in body.installments
    ]


@router.post("/contracts/{contract_id}/payment-plan", status_code=201, responses={201: {"model": schemas.PaymentPlan}})
async def create_payment_plan(
    contract_id: str,
    body: PaymentPlanCreate,
    request: Request,
    response: Response,
    access: PlansCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Installments must sum exactly to the contract amount (else 422)."""
    access.check_write(["installments"])
    reply = await _stub(request).CreatePaymentPlan(
        pb.CreatePaymentPlanRequest(
            idempotency_key=idempotency_key, contract_id=contract_id, installments=_installments(body)
        ),
        metadata=access.grpc_metadata(),
    )
    record = plan_dict(reply.payment_plan)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/contracts/{contract_id}/payment-plan", responses={200: {"model": schemas.PaymentPlan}})
async def get_payment_plan(contract_id: str, request: Request, response: Response, access: PlansRead) -> dict[str, Any]:
    reply = await _stub(request).GetPaymentPlan(
        pb.GetPaymentPlanRequest(contract_id=contract_id), metadata=access.grpc_metadata()
    )
    return with_etag(response, access.present(plan_dict(reply.payment_plan)))


@router.put("/contracts/{contract_id}/payment-plan", responses={200: {"model": schemas.PaymentPlan}})
async def replace_payment_plan(
    contract_id: str,
    body: PaymentPlanReplacement,
    request: Request,
    response: Response,
    access: PlansUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """The plan's installments replaced: `installments[i]` takes the place of the plan's i-th (as it
    lists them, by due date). One paid in full or in part must come back unchanged in its place (409
    `INSTALLMENT_PAID` naming it); the others keep their id where they keep their place. They still
    sum exactly to the contract amount (else 422)."""
    access.check_write(["installments"])
    reply = await _stub(request).UpdatePaymentPlan(
        pb.UpdatePaymentPlanRequest(
            contract_id=contract_id, expected_version=expected_version(if_match), installments=_installments(body)
        ),
        metadata=access.grpc_metadata(),
    )
    record = plan_dict(reply.payment_plan)
    await access.audit_write(record["id"], plan_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.post(
    "/payments",
    status_code=201,
    # The documented model alone, unmerged with a schema of `Any` (the answers are the same JSON).
    response_model=None,
    responses={
        201: {"model": schemas.Payment},
        200: {"model": schemas.Payment, "description": "the reference was posted before"},
    },
)
async def record_payment(
    body: PaymentCreate,
    request: Request,
    response: Response,
    access: PaymentsCreate,
    idempotency_key: IdempotencyKey = "",
) -> Any:
    """`external_reference` is the idempotency key of postings: posting it again returns the first
    payment (200). `Idempotency-Key`, as on every create, answers the same request again as it was
    answered the first time; another request under it is a 422 naming the header."""
    access.check_write(_written(body))
    message = pb.RecordPaymentRequest(
        contract_id=body.contract_id,
        amount=body.amount.proto(),
        method=body.method,
        external_reference=body.external_reference,
        idempotency_key=idempotency_key,
    )
    received_at = _timestamp(body.received_at)
    if received_at is not None:
        message.received_at.CopyFrom(received_at)
    reply = await _stub(request).RecordPayment(message, metadata=access.grpc_metadata())
    record = payment_dict(reply.payment)
    if reply.created:
        await access.audit_write(record["id"], None, record)
    else:
        response.status_code = 200
    return access.present(record)


# Payments carry no account: they are an account's through their contract.
PAYMENT_FILTERS: FilterFields = {"contract_id": "contract_id", "account_id": "contract_id"}


@router.get("/payments", responses={200: {"model": schemas.Page[schemas.Payment]}})
async def list_payments(
    request: Request,
    access: PaymentsRead,
    contract_id: str | None = None,
    account_id: str | None = None,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[
        str | None, Query(description="created_at (default: newest first), received_at; - descending")
    ] = None,
) -> dict[str, Any]:
    access.check_filters(PAYMENT_FILTERS)
    reply = await _stub(request).ListPayments(
        pb.ListPaymentsRequest(
            page=_page(limit, cursor, sort, access), contract_id=contract_id or "", account_id=account_id or ""
        ),
        metadata=access.grpc_metadata(),
    )
    return _list(access.present_many(payment_dict(p) for p in reply.items), reply.page_info.next_cursor)


@router.get("/receivables", responses={200: {"model": schemas.Receivables}})
async def list_receivables(
    request: Request, access: ContractsRead, account_id: str, limit: Limit = None, cursor: str | None = None
) -> dict[str, Any]:
    """What an account owes per contract in force: amount, paid, outstanding, overdue, invoiced;
    totals for the page and for the whole account, and what it has ever paid (lifetime value)."""
    access.check_filters({"account_id": "account_id"})
    reply = await _stub(request).ListReceivables(
        pb.ListReceivablesRequest(account_id=account_id, page=_page(limit, cursor, None, access)),
        metadata=access.grpc_metadata(),
    )
    return receivables_view(reply, access)


# --- invoices ----------------------------------------------------------------------------------------

InvoicesRead = Annotated[Access, Depends(require("invoices", "read"))]
InvoicesCreate = Annotated[Access, Depends(require("invoices", "create"))]
InvoicesUpdate = Annotated[Access, Depends(require("invoices", "update"))]


@router.post("/invoices", status_code=201, responses={201: {"model": schemas.Invoice}})
async def request_invoice(
    body: InvoiceCreate,
    request: Request,
    response: Response,
    access: InvoicesCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Never more than the contract's uninvoiced amount (else 422)."""
    access.check_write(_written(body))
    reply = await _stub(request).RequestInvoice(
        pb.RequestInvoiceRequest(
            idempotency_key=idempotency_key, contract_id=body.contract_id, amount=body.amount.proto()
        ),
        metadata=access.grpc_metadata(),
    )
    record = invoice_dict(reply.invoice)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/invoices", responses={200: {"model": schemas.Page[schemas.Invoice]}})
async def list_invoices(
    request: Request,
    access: InvoicesRead,
    contract_id: str | None = None,
    account_id: str | None = None,
    status: InvoiceStatus | None = None,
    limit: Limit = None,
    cursor: str | None = None,
    sort: Annotated[str | None, Query(description="requested_at (default: newest first); - descending")] = None,
) -> dict[str, Any]:
    access.check_filters({"contract_id": "contract_id", "account_id": "account_id", "status": "status"})
    reply = await _stub(request).ListInvoices(
        pb.ListInvoicesRequest(
            page=_page(limit, cursor, sort, access),
            contract_id=contract_id or "",
            account_id=account_id or "",
            status=status or "",
        ),
        metadata=access.grpc_metadata(),
    )
    return _list(access.present_many(invoice_dict(i) for i in reply.items), reply.page_info.next_cursor)


@router.get("/invoices/{invoice_id}", responses={200: {"model": schemas.Invoice}})
async def get_invoice(invoice_id: str, request: Request, response: Response, access: InvoicesRead) -> dict[str, Any]:
    reply = await _stub(request).GetInvoice(pb.GetInvoiceRequest(id=invoice_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(invoice_dict(reply.invoice)))


@router.post("/invoices/{invoice_id}/issue", responses={200: {"model": schemas.Invoice}})
async def issue_invoice(
    invoice_id: str,
    body: IssueBody,
    request: Request,
    response: Response,
    access: InvoicesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """A requested invoice gets its number (409 once its contract is terminated: void it instead)."""
    message = pb.IssueInvoiceRequest(id=invoice_id, number=body.number, expected_version=expected_version(if_match))
    issued_at = _timestamp(body.issued_at)
    if issued_at is not None:
        message.issued_at.CopyFrom(issued_at)
    reply = await _stub(request).IssueInvoice(message, metadata=access.grpc_metadata())
    record = invoice_dict(reply.invoice)
    await access.audit_write(invoice_id, invoice_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.post("/invoices/{invoice_id}/void", responses={200: {"model": schemas.Invoice}})
async def void_invoice(
    invoice_id: str,
    body: ReasonBody,
    request: Request,
    response: Response,
    access: InvoicesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    access.check_write(["void_reason"])
    reply = await _stub(request).VoidInvoice(
        pb.VoidInvoiceRequest(id=invoice_id, reason=body.reason, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    record = invoice_dict(reply.invoice)
    await access.audit_write(invoice_id, invoice_dict(reply.previous), record)
    return with_etag(response, access.present(record))
