"""The answer schemas the OpenAPI document shows for the report routes (`gateway.routers.analytics_schemas`)
are those of what the routes send: each report as its route prints it, from a reply with every field
set, has exactly the documented fields, each of the documented JSON type."""

from collections.abc import Callable
from typing import Any

import pytest
from crm.analytics.v1 import analytics_service_pb2 as pb
from crm_platform.principal import Principal
from gateway.routers import analytics_schemas as schemas
from gateway.routers.analytics import _completeness_rows, _customer_value, _funnel, _Money, _rows, plain
from gateway.security import Access, SecurityRuntime, SecuritySettings
from gateway.security.masking import MASK
from gateway.security.policy import parse_policy
from gateway.testing import PolicyEdit, assert_documented, default_policy_document, filled, grant_fields, policy_text
from pydantic import BaseModel
from starlette.requests import Request

pytestmark = pytest.mark.unit


def _money(role: str, *edits: PolicyEdit) -> _Money:
    """Report money as a caller of `role` sees it under the default policy changed by `edits`."""
    document = default_policy_document()
    for edit in edits:
        edit(document)
    settings = SecuritySettings(dev_mode=True, dev_jwt_secret="s" * 40, database_url="sqlite+aiosqlite://")
    runtime = SecurityRuntime(settings, policy=parse_policy(policy_text(document)))
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""})
    principal = Principal(user_id="u-1", roles=(role,))
    decision = runtime.policy.decide(principal, "reports", "read")
    return _Money(Access(runtime=runtime, request=request, principal=principal, decision=decision))


# Each report's JSON answer as its route prints it from the analytics service's reply.
Answer = Callable[[_Money], dict[str, Any]]
_REPORTS: list[tuple[Answer, type[BaseModel]]] = [
    (lambda money: _funnel(plain(filled(pb.GetSalesFunnelResponse())), money), schemas.SalesFunnel),
    (lambda money: _rows(plain(filled(pb.GetLeadSourceReportResponse())), money), schemas.LeadSourceReport),
    (lambda money: _rows(plain(filled(pb.GetRepPerformanceResponse())), money), schemas.RepPerformanceReport),
    (lambda money: plain(filled(pb.GetServiceReportResponse())), schemas.ServiceReport),
    (lambda money: _customer_value(filled(pb.GetCustomerValueResponse()), money), schemas.CustomerValuePage),
    (lambda money: plain(filled(pb.GetDataCompletenessResponse())), schemas.DataCompleteness),
]


@pytest.mark.parametrize(("answer", "model"), [pytest.param(*report, id=report[1].__name__) for report in _REPORTS])
def test_a_report_has_the_documented_fields_and_types(answer: Answer, model: type[BaseModel]) -> None:
    printed = answer(_money("admin"))

    assert_documented(printed, model)


def test_undefined_rates_unset_money_and_the_last_page_are_null_as_documented() -> None:
    money = _money("admin")

    assert_documented(_funnel(plain(pb.GetSalesFunnelResponse(stages=[pb.FunnelStage()])), money), schemas.SalesFunnel)
    assert_documented(_customer_value(pb.GetCustomerValueResponse(), money), schemas.CustomerValuePage)
    assert_documented(plain(pb.GetServiceReportResponse()), schemas.ServiceReport)


def test_masked_money_keeps_the_documented_type() -> None:
    money = _money("analyst", grant_fields("analyst", "opportunities", amount="masked"))

    reps = _rows(plain(filled(pb.GetRepPerformanceResponse())), money)

    assert_documented(reps, schemas.RepPerformanceReport)
    assert reps["rows"][0]["won_amount"] == {"amount": MASK, "currency": "x"}


def test_money_the_caller_may_not_read_is_left_out_as_documented() -> None:
    money = _money("marketing")  # reads campaign costs, no deal or contract amounts

    sources = _rows(plain(filled(pb.GetLeadSourceReportResponse())), money)
    customers = _customer_value(filled(pb.GetCustomerValueResponse()), money)

    schemas.LeadSourceReport.model_validate(sources, strict=True)
    schemas.CustomerValuePage.model_validate(customers, strict=True)
    assert not {"won_revenue", "roi"} & set(sources["rows"][0]) and "cost" in sources["rows"][0]
    assert not {"won_amount", "paid_amount"} & set(customers["items"][0])


def test_an_answer_with_a_wrong_type_is_refused() -> None:
    """The check above can fail: a count printed as protobuf JSON's decimal string is not taken."""
    printed = plain(filled(pb.GetServiceReportResponse()))
    assert printed["backlog"] == 4
    with pytest.raises(ValueError, match="backlog"):
        assert_documented({**printed, "backlog": "4"}, schemas.ServiceReport)


def test_the_data_completeness_of_contacts_and_deals_is_printed_and_exported_as_of_leads_and_accounts() -> None:
    """A row per entity the service reports (lead, account, contact, opportunity), in its order: in
    the JSON answer as documented, and in the CSV (the report's and the export's) its overall
    completeness first, then its key fields."""
    entities = ["lead", "account", "contact", "opportunity"]
    fields = {"lead": "phone", "account": "tier", "contact": "decision_role", "opportunity": "next_step"}
    reply = pb.GetDataCompletenessResponse(
        rows=[
            pb.CompletenessRow(
                entity=entity,
                records=4,
                completeness="0.5000",
                fields=[pb.FieldFill(field=fields[entity], filled=1, rate="0.2500")],
            )
            for entity in entities
        ]
    )

    printed = plain(reply)
    exported = _completeness_rows(printed)

    assert_documented(printed, schemas.DataCompleteness)
    assert [row["entity"] for row in printed["rows"]] == entities
    assert [(row["entity"], row["field"], row["filled"], row["rate"]) for row in exported] == [
        row
        for entity in entities
        for row in [(entity, "(all key fields)", None, "0.5000"), (entity, fields[entity], 1, "0.2500")]
    ]
    described = str(schemas.CompletenessRow.model_fields["entity"].description)
    assert all(entity in described for entity in entities)
