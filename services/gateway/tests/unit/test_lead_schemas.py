"""The answer schemas the OpenAPI document shows for the leads routes (`gateway.routers.lead_schemas`)
are those of what the routes send: each record as the router prints it, from a message with every
field set, has exactly the documented fields, each of the documented JSON type."""

from typing import Any

import pytest
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as pb
from gateway.routers import lead_schemas as schemas
from gateway.routers.leads import (
    _activity_json,
    _engagement_json,
    _import_json,
    _message_json,
    _rule_json,
    _task_json,
    _thresholds_json,
    _transfer_json,
    _webform_json,
    campaign_json,
    lead_json,
)
from gateway.testing import assert_documented, filled
from pydantic import BaseModel

pytestmark = pytest.mark.unit

_RECORDS = [
    (lead_json(filled(leads_pb2.Lead())), schemas.Lead),
    (campaign_json(filled(leads_pb2.Campaign())), schemas.Campaign),
    (_activity_json(filled(leads_pb2.LeadActivity())), schemas.LeadActivity),
    (_task_json(filled(leads_pb2.LeadTask())), schemas.LeadTask),
    (_webform_json(filled(leads_pb2.Webform())), schemas.Webform),
    (_rule_json(filled(leads_pb2.ScoringRule())), schemas.ScoringRule),
    (_rule_json(filled(leads_pb2.AssignmentRule())), schemas.AssignmentRule),
    (_thresholds_json(filled(leads_pb2.GradeThresholds()), 2), schemas.GradeThresholds),
    (_transfer_json(filled(pb.TransferLeadsResponse())), schemas.LeadTransfer),
    (_engagement_json(filled(leads_pb2.Engagement()), whole_url=False), schemas.Engagement),
]


@pytest.mark.parametrize(("printed", "model"), [pytest.param(*record, id=record[1].__name__) for record in _RECORDS])
def test_a_record_has_the_documented_fields_and_types(printed: dict[str, Any], model: type[BaseModel]) -> None:
    assert_documented(printed, model)


@pytest.mark.parametrize("next_cursor", ["x", None])
def test_an_import_status_answers_a_page_of_its_rejected_rows_and_the_next_cursor(next_cursor: str | None) -> None:
    reply = filled(pb.GetLeadImportResponse())
    answer = {**_import_json(reply.lead_import), "next_cursor": next_cursor}  # as the route answers

    assert_documented(answer, schemas.LeadImportStatus)
    assert answer["rejected_rows"][0]["row"] == "4"


def test_an_import_part_answers_its_import_without_the_rejected_rows_and_its_rows() -> None:
    reply = filled(pb.ImportLeadsResponse())
    summary = _import_json(reply.lead_import)
    del summary["rejected_rows"]  # as the route answers
    answer = {"import": summary, "rows": [_message_json(row) for row in reply.rows]}

    assert_documented(answer, schemas.ImportAnswer)
    assert_documented(summary, schemas.LeadImport)
    assert answer["import"]["progress"]["rows_seen"] == "4"  # an int64 inside a message is a string


def test_unset_times_and_a_campaign_without_cost_are_null_as_documented() -> None:
    assert_documented(lead_json(leads_pb2.Lead(id="l1")), schemas.Lead)
    assert_documented(campaign_json(leads_pb2.Campaign(id="c1")), schemas.Campaign)


def test_a_documented_answer_with_a_wrong_type_is_refused() -> None:
    """The check above can fail: a number where the schema says text is not taken."""
    printed = _webform_json(filled(leads_pb2.Webform()))
    with pytest.raises(ValueError, match="rate_limit_per_minute"):
        schemas.Webform.model_validate({**printed, "rate_limit_per_minute": "3"}, strict=True)
