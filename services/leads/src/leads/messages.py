"""Rows of the leads tables as protobuf messages (shared by the servicer and the events)."""

import functools
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2
from crm_platform.money import amount_text
from crm_platform.structs import fill_struct
from crm_platform.timeutil import to_timestamp
from google.protobuf.timestamp_pb2 import Timestamp

_LEAD_TEXT = (
    "id",
    "name",
    "company",
    "title",
    "phone",
    "email",
    "source",
    "source_detail",
    "campaign_id",
    "region",
    "industry",
    "status",
    "grade",
    "owner_id",
    "team",
    "external_id",
    "matched_contact_id",
    "disqualified_reason",
    "converted_account_id",
    "converted_contact_id",
    "converted_opportunity_id",
    "import_id",
)
_LEAD_TIMES = (
    "created_at",
    "updated_at",
    "assigned_at",
    "first_contacted_at",
    "last_activity_at",
    "first_contact_due_at",
    "recycled_at",
)


def lead_to_proto(row: Mapping[Any, Any]) -> leads_pb2.Lead:
    message = leads_pb2.Lead()
    fill_lead(message, row)
    return message


def fill_lead(message: leads_pb2.Lead, row: Mapping[Any, Any]) -> None:
    """Sets an empty Lead from a row, in place: an event can fill the lead it holds instead of
    copying a built one (a copy of the custom fields costs as much as building them)."""
    for name in _LEAD_TEXT:
        value = row[name]
        if value:
            setattr(message, name, value)
    message.score = row["score"]
    if row["tags"]:
        message.tags.extend(row["tags"])
    message.in_pool = bool(row["in_pool"])
    message.follow_up_overdue = bool(row["follow_up_overdue"])
    message.version = row["version"]
    if row["custom"]:
        fill_struct(message.custom, row["custom"])
    for name in _LEAD_TIMES:
        value = row[name]
        if value is not None:
            getattr(message, name).CopyFrom(_timestamp(value))


@functools.lru_cache(maxsize=64)
def _timestamp(value: datetime) -> Timestamp:
    """Shared, never changed: the rows of an import batch carry the same few times."""
    stamp = to_timestamp(value)
    assert stamp is not None
    return stamp


def activity_to_proto(row: Mapping[Any, Any]) -> leads_pb2.LeadActivity:
    return leads_pb2.LeadActivity(
        id=row["id"],
        lead_id=row["lead_id"],
        kind=row["kind"],
        outcome=row["outcome"],
        notes=row["notes"],
        actor_id=row["actor_id"],
        occurred_at=to_timestamp(row["occurred_at"]),
        next_follow_up_at=to_timestamp(row["next_follow_up_at"]),
        version=row["version"],
    )


def task_to_proto(row: Mapping[Any, Any]) -> leads_pb2.LeadTask:
    return leads_pb2.LeadTask(
        id=row["id"],
        lead_id=row["lead_id"],
        kind=row["kind"],
        owner_id=row["owner_id"],
        due_at=to_timestamp(row["due_at"]),
        status=row["status"],
        created_at=to_timestamp(row["created_at"]),
        completed_at=to_timestamp(row["completed_at"]),
    )


def score_change_to_proto(row: Mapping[Any, Any]) -> leads_pb2.ScoreChange:
    return leads_pb2.ScoreChange(
        previous_score=row["previous_score"],
        score=row["score"],
        previous_grade=row["previous_grade"],
        grade=row["grade"],
        matched_rule_ids=row["matched_rule_ids"],
        changed_at=to_timestamp(row["changed_at"]),
    )


def engagement_to_proto(row: Mapping[Any, Any]) -> leads_pb2.Engagement:
    return leads_pb2.Engagement(
        id=row["id"],
        lead_id=row["lead_id"],
        kind=row["kind"],
        url=row["url"],
        occurred_at=to_timestamp(row["occurred_at"]),
        external_id=row["external_id"],
        actor_id=row["actor_id"],
        recorded_at=to_timestamp(row["recorded_at"]),
    )


def scoring_rule_to_proto(row: Mapping[Any, Any]) -> leads_pb2.ScoringRule:
    return leads_pb2.ScoringRule(
        id=row["id"],
        name=row["name"],
        field=row["field"],
        operator=row["operator"],
        value=row["value"],
        activity_kind=row["activity_kind"],
        min_count=row["min_count"],
        points=row["points"],
        enabled=row["enabled"],
        version=row["version"],
        engagement_kind=row["engagement_kind"],
        url_contains=row["url_contains"],
    )


def assignment_rule_to_proto(row: Mapping[Any, Any]) -> leads_pb2.AssignmentRule:
    return leads_pb2.AssignmentRule(
        id=row["id"],
        name=row["name"],
        position=row["position"],
        enabled=row["enabled"],
        regions=row["regions"],
        industries=row["industries"],
        sources=row["sources"],
        min_score=row["min_score"],
        max_score=row["max_score"],
        team=row["team"],
        user_ids=row["user_ids"],
        strategy=row["strategy"],
        capacity=row["capacity"],
        version=row["version"],
        lead_team=row["lead_team"],
    )


def _date_text(value: date | None) -> str:
    return value.isoformat() if value else ""


def campaign_to_proto(row: Mapping[Any, Any]) -> leads_pb2.Campaign:
    message = leads_pb2.Campaign(
        id=row["id"],
        name=row["name"],
        channel=row["channel"],
        starts_on=_date_text(row["starts_on"]),
        ends_on=_date_text(row["ends_on"]),
        owner_id=row["owner_id"],
        team=row["team"],
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        version=row["version"],
    )
    if row["cost_amount"] is not None:
        message.cost.CopyFrom(
            common_pb2.Money(
                amount=amount_text(row["cost_amount"], row["cost_currency"]), currency=row["cost_currency"]
            )
        )
    return message


def webform_to_proto(row: Mapping[Any, Any]) -> leads_pb2.Webform:
    return leads_pb2.Webform(
        id=row["id"],
        name=row["name"],
        form_key=row["form_key"],
        campaign_id=row["campaign_id"],
        team=row["team"],
        region=row["region"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
        enabled=row["enabled"],
        created_at=to_timestamp(row["created_at"]),
        honeypot_field=row["honeypot_field"],
        version=row["version"],
    )
