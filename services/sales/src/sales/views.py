"""Stored rows → the protobuf resources that the API returns and the events carry.

Decimals become strings with `format(x, "f")`, so no float ever appears in a message.
"""

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2
from crm_platform.money import amount_text
from crm_platform.principal import Principal
from crm_platform.timeutil import to_timestamp
from google.protobuf import struct_pb2

from sales import domain as d

# A stored row (SQLAlchemy RowMapping) or the dict of values just written.
Row = Mapping[Any, Any]


def money(amount: Decimal, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount=amount_text(amount, currency), currency=currency)


def decimal_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


def iso(value: date | None) -> str:
    return value.isoformat() if value else ""


def actor(principal: Principal) -> common_pb2.Actor:
    return common_pb2.Actor(user_id=principal.user_id, kind=principal.kind)


# ---------------------------------------------------------------- line items (stored as JSON)


def line_item_json(item: d.LineItem) -> dict[str, str]:
    return {
        "product_id": item.product_id,
        "product_name": item.product_name,
        "product_line": item.product_line,
        "quantity": format(item.quantity, "f"),
        "unit_price": format(item.unit_price.amount, "f"),
        "currency": item.unit_price.currency,
        "discount_percent": format(item.discount_percent, "f"),
        "total": format(item.total, "f"),
    }


def line_item_proto(item: Mapping[str, str]) -> sales_pb2.LineItem:
    currency = item["currency"]
    return sales_pb2.LineItem(
        product_id=item["product_id"],
        product_name=item["product_name"],
        product_line=item["product_line"],
        quantity=item["quantity"],
        unit_price=money(Decimal(item["unit_price"]), currency),
        discount_percent=item["discount_percent"],
        total=money(Decimal(item["total"]), currency),
    )


# ---------------------------------------------------------------- pipelines


def stage_json(stage: d.Stage) -> dict[str, Any]:
    return {
        "key": stage.key,
        "name": stage.name,
        "probability": format(stage.probability, "f"),
        "required_fields": list(stage.required_fields),
        "rotting_days": stage.rotting_days,
        "outcome": stage.outcome.value,
    }


def stage_from_json(data: Row) -> d.Stage:
    return d.Stage(
        key=data["key"],
        name=data["name"],
        probability=Decimal(data["probability"]),
        required_fields=tuple(data["required_fields"]),
        rotting_days=int(data["rotting_days"]),
        outcome=d.Outcome(data["outcome"]),
    )


def pipeline_domain(row: Row) -> d.Pipeline:
    return d.Pipeline(
        id=row["id"],
        name=row["name"],
        stages=tuple(stage_from_json(s) for s in row["stages"]),
        is_default=bool(row["is_default"]),
    )


def pipeline_proto(row: Row) -> sales_pb2.Pipeline:
    pipeline = pipeline_domain(row)
    return sales_pb2.Pipeline(
        id=pipeline.id,
        name=pipeline.name,
        is_default=pipeline.is_default,
        stages=[
            sales_pb2.Stage(
                key=s.key,
                name=s.name,
                probability=decimal_text(s.probability),
                required_fields=list(s.required_fields),
                rotting_days=s.rotting_days,
                position=index,
                outcome=s.outcome.value,
            )
            for index, s in enumerate(pipeline.stages)
        ],
        created_at=to_timestamp(row["created_at"]),
        version=row["version"],
    )


# ---------------------------------------------------------------- opportunities


def probability_from_bp(basis_points: int) -> Decimal:
    return Decimal(basis_points) / 100


def opportunity_proto(row: Row, *, rotting: bool = False) -> sales_pb2.Opportunity:
    custom = struct_pb2.Struct()
    custom.update(row["custom"] or {})
    return sales_pb2.Opportunity(
        id=row["id"],
        account_id=row["account_id"],
        primary_contact_id=row["primary_contact_id"],
        name=row["name"],
        pipeline_id=row["pipeline_id"],
        stage=row["stage"],
        amount=money(row["amount"], row["currency"]),
        expected_close_date=iso(row["expected_close_date"]),
        owner_id=row["owner_id"],
        team=row["team"],
        source_lead_id=row["source_lead_id"],
        campaign_id=row["campaign_id"],
        line_items=[line_item_proto(item) for item in row["line_items"]],
        status=row["status"],
        lost_reason=row["lost_reason"],
        stage_history=[
            sales_pb2.StageEntry(
                stage=visit["stage"],
                entered_at=_parse_ts(visit["entered_at"]),
                exited_at=_parse_ts(visit["exited_at"]),
            )
            for visit in row["stage_history"]
        ],
        next_step=row["next_step"],
        product_line=row["product_line"],
        probability=decimal_text(probability_from_bp(row["probability_bp"])),
        tags=list(row["tags"]),
        custom=custom,
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        closed_at=to_timestamp(row["closed_at"]),
        version=row["version"],
        region=row["region"],
        forecast_category=row["forecast_category"],
        close_date=iso(row["close_date"]),
        collision_override_by=row["collision_override_by"],
        collision_override_reason=row["collision_override_reason"],
        colliding_opportunity_id=row["colliding_opportunity_id"],
        stage_entered_at=to_timestamp(row["stage_entered_at"]),
        rotting=rotting,
    )


def _parse_ts(text: str) -> Any:
    return to_timestamp(datetime.fromisoformat(text)) if text else None


# ---------------------------------------------------------------- quotes and contracts


def decision_proto(data: Row) -> sales_pb2.ApprovalDecision:
    decided_at = data["decided_at"]
    return sales_pb2.ApprovalDecision(
        role=data["role"],
        approver_id=data["approver_id"],
        decision=data["decision"],
        comment=data["comment"],
        decided_at=_parse_ts(decided_at) if isinstance(decided_at, str) else to_timestamp(decided_at),
    )


def quote_proto(row: Row) -> sales_pb2.Quote:
    decisions = [d.ApprovalStep(x["role"], x["approver_id"], d.Decision(x["decision"])) for x in row["decisions"]]
    required = (
        d.pending_roles(row["approval_chain"], decisions) if row["status"] == d.QuoteStatus.PENDING_APPROVAL else []
    )
    currency = row["currency"]
    return sales_pb2.Quote(
        id=row["id"],
        opportunity_id=row["opportunity_id"],
        account_id=row["account_id"],
        line_items=[line_item_proto(item) for item in row["line_items"]],
        subtotal=money(row["subtotal"], currency),
        discount_total=money(row["discount_total"], currency),
        total=money(row["total"], currency),
        max_discount_percent=decimal_text(Decimal(row["max_discount_percent"])),
        status=row["status"],
        required_approvals=required,
        owner_id=row["owner_id"],
        created_at=to_timestamp(row["created_at"]),
        version=row["version"],
        decisions=[decision_proto(x) for x in row["decisions"]],
        updated_at=to_timestamp(row["updated_at"]),
        team=row["team"],
        region=row["region"],
    )


def contract_proto(row: Row, decisions: Sequence[Row]) -> sales_pb2.Contract:
    return sales_pb2.Contract(
        id=row["id"],
        number=row["number"],
        opportunity_id=row["opportunity_id"],
        account_id=row["account_id"],
        title=row["title"],
        amount=money(row["amount"], row["currency"]),
        status=row["status"],
        approval_chain=list(row["approval_chain"]),
        decisions=[decision_proto(x) for x in decisions],
        owner_id=row["owner_id"],
        team=row["team"],
        starts_on=iso(row["starts_on"]),
        ends_on=iso(row["ends_on"]),
        signed_at=to_timestamp(row["signed_at"]),
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        version=row["version"],
        region=row["region"],
        terminated_reason=row["terminated_reason"],
        completed_at=to_timestamp(row["completed_at"]),
        terminated_at=to_timestamp(row["terminated_at"]),
    )


# ---------------------------------------------------------------- plans, payments, invoices


def installment_proto(row: Row) -> sales_pb2.Installment:
    return sales_pb2.Installment(
        id=row["id"],
        sequence=row["sequence"],
        due_date=iso(row["due_date"]),
        amount=money(row["amount"], row["currency"]),
        paid=money(row["paid"], row["currency"]),
        status=row["status"],
        overdue_at=to_timestamp(row["overdue_at"]),
    )


def plan_proto(plan: Row, rows: Sequence[Row]) -> sales_pb2.PaymentPlan:
    return sales_pb2.PaymentPlan(
        id=plan["id"],
        contract_id=plan["contract_id"],
        installments=[installment_proto(row) for row in rows],
        created_at=to_timestamp(plan["created_at"]),
        total=money(plan["total"], plan["currency"]),
        version=plan["version"],
    )


def payment_proto(row: Row) -> sales_pb2.Payment:
    currency = row["currency"]
    return sales_pb2.Payment(
        id=row["id"],
        contract_id=row["contract_id"],
        amount=money(row["amount"], currency),
        received_at=to_timestamp(row["received_at"]),
        method=row["method"],
        external_reference=row["external_reference"],
        allocations=[
            sales_pb2.Allocation(installment_id=a["installment_id"], amount=money(Decimal(a["amount"]), currency))
            for a in row["allocations"]
        ],
        created_at=to_timestamp(row["created_at"]),
    )


def invoice_proto(row: Row) -> sales_pb2.Invoice:
    return sales_pb2.Invoice(
        id=row["id"],
        contract_id=row["contract_id"],
        number=row["number"] or "",
        amount=money(row["amount"], row["currency"]),
        status=row["status"],
        external_reference=row["external_reference"] or "",
        requested_at=to_timestamp(row["requested_at"]),
        issued_at=to_timestamp(row["issued_at"]),
        voided_at=to_timestamp(row["voided_at"]),
        void_reason=row["void_reason"],
        account_id=row["account_id"],
        version=row["version"],
    )


def target_proto(row: Row) -> sales_pb2.Target:
    return sales_pb2.Target(
        id=row["id"],
        owner_id=row["owner_id"],
        team=row["team"],
        period=row["period"],
        amount=money(row["amount"], row["currency"]),
        set_by=row["set_by"],
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        version=row["version"],
    )
