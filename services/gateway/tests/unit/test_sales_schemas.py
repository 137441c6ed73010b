"""The answer schemas the OpenAPI document shows for the sales routes (`gateway.routers.sales_schemas`)
are those of what the routes send: each record and each composite answer as the router prints it,
from messages with every field set, has exactly the documented fields, each of the documented JSON
type, and so has every record inside it (a deal's line items, a plan's installments); what the
caller's field rules hide or mask is still of the documented types."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from crm.sales.v1 import sales_pb2
from crm.sales.v1 import sales_service_pb2 as pb
from crm_platform.principal import Principal
from gateway.errors import field_error
from gateway.routers import sales_schemas as schemas
from gateway.routers.sales import (
    _forecast_row,
    _import_answer,
    _import_row_result,
    _list,
    _rejected_import_row,
    contract_dict,
    invoice_dict,
    opportunity_dict,
    payment_dict,
    pipeline_dict,
    plan_dict,
    quote_dict,
    receivables_view,
    win_statistics_view,
)
from gateway.security import Access, SecurityRuntime, SecuritySettings
from gateway.security.policy import parse_policy
from gateway.testing import assert_documented, default_policy_document, filled, policy_text
from google.protobuf.message import Message
from pydantic import BaseModel
from starlette.requests import Request

pytestmark = pytest.mark.unit

Printer = Callable[[Any], dict[str, Any]]

# Each record: its printer, its message, its policy resource and its schema.
_RECORDS: list[tuple[Printer, type[Message], str, type[BaseModel]]] = [
    (pipeline_dict, sales_pb2.Pipeline, "pipelines", schemas.Pipeline),
    (opportunity_dict, sales_pb2.Opportunity, "opportunities", schemas.Opportunity),
    (quote_dict, sales_pb2.Quote, "quotes", schemas.Quote),
    (contract_dict, sales_pb2.Contract, "contracts", schemas.Contract),
    (plan_dict, sales_pb2.PaymentPlan, "payment_plans", schemas.PaymentPlan),
    (payment_dict, sales_pb2.Payment, "payments", schemas.Payment),
    (invoice_dict, sales_pb2.Invoice, "invoices", schemas.Invoice),
]
_RECORD_CASES = [pytest.param(*record, id=record[3].__name__) for record in _RECORDS]
# Beside the default policy's roles: one that sees every sales record with every field masked.
_MASKED_READER = "masked_reader"


@pytest.fixture(scope="module")
def runtime() -> Iterator[SecurityRuntime]:
    document = default_policy_document()
    grant = {"actions": ["read"], "scope": "all", "fields": {"*": "masked"}}
    document["roles"][_MASKED_READER] = {"grants": {resource: grant for _, _, resource, _ in _RECORDS}}
    settings = SecuritySettings(dev_mode=True, dev_jwt_secret="s" * 40, database_url="sqlite+aiosqlite://")
    yield SecurityRuntime(settings, policy=parse_policy(policy_text(document)))


def _access(runtime: SecurityRuntime, role: str, resource: str) -> Access:
    """The read access of a caller with `role` to `resource`, as `require` makes it: the owner of the
    records `filled` makes (owner, team and region "x")."""
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""})
    decision = runtime.policy.decide(Principal(user_id="x", roles=(role,), team="x", region="x"), resource, "read")
    assert decision.allowed
    return Access(runtime=runtime, request=request, principal=decision.principal, decision=decision)


@pytest.mark.parametrize(("printer", "message", "resource", "model"), _RECORD_CASES)
def test_a_record_has_the_documented_fields_and_types(
    printer: Printer, message: type[Message], resource: str, model: type[BaseModel]
) -> None:
    assert_documented(printer(filled(message())), model)


@pytest.mark.parametrize(("printer", "message", "resource", "model"), _RECORD_CASES)
def test_a_record_with_only_its_id_is_documented_too_its_unset_times_and_money_null(
    printer: Printer, message: type[Message], resource: str, model: type[BaseModel]
) -> None:
    printed = printer(message(id="r-1"))

    assert_documented(printed, model)
    assert {key for key, value in printed.items() if value not in (None, "", 0, False, [], {})} == {"id"}


@pytest.mark.parametrize(("next_cursor", "shown"), [("c-2", "c-2"), ("", None)])
@pytest.mark.parametrize(("printer", "message", "resource", "model"), _RECORD_CASES)
def test_a_page_has_its_records_and_the_next_cursor_null_on_the_last(
    printer: Printer,
    message: type[Message],
    resource: str,
    model: type[BaseModel],
    next_cursor: str,
    shown: str | None,
) -> None:
    page = _list([printer(filled(message()))], next_cursor)

    assert_documented(page, schemas.Page[model])
    assert page["next_cursor"] == shown


@pytest.mark.parametrize("role", ["sales_rep", _MASKED_READER])
@pytest.mark.parametrize(("printer", "message", "resource", "model"), _RECORD_CASES)
def test_a_record_as_the_field_rules_show_it_is_still_of_the_documented_types(
    runtime: SecurityRuntime, role: str, printer: Printer, message: type[Message], resource: str, model: type[BaseModel]
) -> None:
    """A sales rep's quotes lack the discounts (hidden by default); masked numbers and booleans are
    null, masked amounts `"***"`, in the records' lists too."""
    shown = _access(runtime, role, resource).present(printer(filled(message())))

    model.model_validate(shown, strict=True)
    if role == _MASKED_READER and "version" in model.model_fields:
        assert shown["version"] is None


def test_the_forecast_answers_its_grouping_and_a_row_per_period_group_and_currency() -> None:
    reply = filled(pb.GetForecastResponse())
    reply.rows.add(period="2026-Q4", group="team-a")  # nothing forecast in a currency: no amounts
    answer = {"period": "quarter", "group_by": "team", "rows": [_forecast_row(r) for r in reply.rows]}  # as the route

    assert_documented(answer, schemas.Forecast)
    assert answer["rows"][1]["closed_won"] is None


def test_win_statistics_show_the_won_amount_as_the_caller_sees_deals_amounts(runtime: SecurityRuntime) -> None:
    reply = filled(pb.GetWinStatisticsResponse())
    reply.overall.add(currency="CNY", win_rate="0.0000")

    answer = win_statistics_view(reply, _access(runtime, "admin", "opportunities"))
    assert_documented(answer, schemas.WinStatisticsReport)
    assert [row["owner_id"] for row in answer["overall"]] == ["x", None]

    # Without a grant to read deals, their won amount is left out: the schema leaves it optional.
    hidden = win_statistics_view(reply, None)
    schemas.WinStatisticsReport.model_validate(hidden, strict=True)
    assert "won_amount" not in hidden["by_owner"][0]


def test_receivables_answer_a_page_with_the_page_and_account_totals(runtime: SecurityRuntime) -> None:
    reply = filled(pb.ListReceivablesResponse())
    reply.items.add(contract_id="c-2", contract_number="CT-2", account_id="a-1", status="signed")

    answer = receivables_view(reply, _access(runtime, "admin", "contracts"))

    assert_documented(answer, schemas.Receivables)
    assert answer["items"][1]["amount"] is None and answer["items"][1]["next_due_date"] is None


def test_an_import_answers_every_row_in_the_request_order_whoever_rejected_it() -> None:
    reply = filled(pb.ImportOpportunitiesResponse())
    refused = [field_error({"loc": ("name",), "msg": "Field required", "type": "missing"})]
    results = {1: _import_row_result(1, reply.results[0]), 0: _rejected_import_row(0, {"external_id": "e-0"}, refused)}

    answer = _import_answer(results)  # as the route answers

    assert_documented(answer, schemas.OpportunityImportAnswer)
    assert [result["row"] for result in answer["results"]] == [0, 1]
    assert answer["results"][0]["opportunity_id"] is None


def test_the_check_refuses_an_undocumented_field_and_a_wrong_type() -> None:
    """The checks above can fail: a field the schema does not name, in a record or in a record inside
    it, is not taken, nor is text where the schema says number."""
    printed = contract_dict(filled(sales_pb2.Contract()))
    with pytest.raises(AssertionError):
        assert_documented({**printed, "paid": None}, schemas.Contract)
    with pytest.raises(ValueError, match="version"):
        assert_documented({**printed, "version": "3"}, schemas.Contract)
    decision = {**printed["decisions"][0], "step": 1}
    with pytest.raises(AssertionError):
        assert_documented({**printed, "decisions": [decision]}, schemas.Contract)
