"""Request parsing names the offending field (no I/O)."""

from decimal import Decimal

import pytest
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm_platform.errors import ValidationFailed
from google.protobuf import field_mask_pb2
from sales import servicer

pytestmark = pytest.mark.unit


def fields_of(error: ValidationFailed) -> list[str]:
    return [e.field for e in error.errors]


def test_line_items_parse_and_name_bad_fields() -> None:
    good = pb.LineItemInput(
        product_id="p", unit_price=common_pb2.Money(amount="10.50", currency="cny"), discount_percent="5"
    )
    [item] = servicer.line_items([good])
    assert (item.quantity, item.unit_price.amount, item.unit_price.currency) == (Decimal(1), Decimal("10.50"), "CNY")
    with pytest.raises(ValidationFailed) as bad_quantity:
        servicer.line_items([good, pb.LineItemInput(product_id="p", quantity="two", unit_price=good.unit_price)])
    assert fields_of(bad_quantity.value) == ["line_items[1].quantity"]
    with pytest.raises(ValidationFailed) as no_price:
        servicer.line_items([pb.LineItemInput(product_id="p")])
    assert fields_of(no_price.value) == ["line_items[0].unit_price"]


def test_money_and_dates_name_their_field() -> None:
    assert servicer.optional_money(common_pb2.Money(), "amount") is None
    with pytest.raises(ValidationFailed) as bad_currency:
        servicer.optional_money(common_pb2.Money(amount="1", currency="yuan"), "amount")
    assert fields_of(bad_currency.value) == ["amount.currency"]
    with pytest.raises(ValidationFailed) as bad_amount:
        servicer.required_money(common_pb2.Money(amount="1,5", currency="CNY"), "installments[2].amount")
    assert fields_of(bad_amount.value) == ["installments[2].amount.amount"]
    with pytest.raises(ValidationFailed) as bad_date:
        servicer.optional_date("31/12/2026", "expected_close_date")
    assert fields_of(bad_date.value) == ["expected_close_date"]


def test_update_masks_are_checked() -> None:
    request = pb.UpdateOpportunityRequest(
        id="o1",
        update_mask=field_mask_pb2.FieldMask(paths=["next_step", "forecast_category"]),
        opportunity=sales_pb2.Opportunity(next_step="call", forecast_category="commit"),
    )
    changes = servicer.update_changes(request)
    assert changes["next_step"] == "call" and changes["forecast_category"].value == "commit"
    for paths, field in (
        (["status"], "update_mask"),
        ([], "update_mask"),
        (["forecast_category"], "forecast_category"),
    ):
        bad = pb.UpdateOpportunityRequest(
            id="o1",
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            opportunity=sales_pb2.Opportunity(forecast_category="maybe"),
        )
        with pytest.raises(ValidationFailed) as raised:
            servicer.update_changes(bad)
        assert fields_of(raised.value) == [field]


def test_stage_inputs() -> None:
    stage = servicer.stage_input(pb.StageInput(key="won", name="Won", probability="100", outcome="won"), 0)
    assert stage.outcome == "won" and stage.probability == Decimal(100)
    with pytest.raises(ValidationFailed) as raised:
        servicer.stage_input(pb.StageInput(key="x", name="X", outcome="maybe"), 3)
    assert fields_of(raised.value) == ["stages[3].outcome"]
