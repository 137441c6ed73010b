"""Stored rows -> protobuf messages of crm.servicedesk.v1."""

from collections.abc import Mapping
from typing import Any

from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_pb2 as sd
from crm_platform.principal import Principal
from crm_platform.timeutil import to_timestamp
from google.protobuf import struct_pb2


def actor(principal: Principal) -> common_pb2.Actor:
    return common_pb2.Actor(user_id=principal.user_id, kind=principal.kind)


def _values(row: Any) -> Mapping[str, Any]:
    return row._mapping if hasattr(row, "_mapping") else row  # type: ignore[no-any-return]


def _times(message: Any, values: Mapping[str, Any], *names: str) -> None:
    for name in names:
        stamp = to_timestamp(values.get(name))
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)


def _struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if values:
        message.update(dict(values))
    return message


# What a ticket.updated event may list as changed: the Ticket fields but those changing every time.
# The survey key is no change any event tells (only ticket.resolved carries it: `ticket_answer`).
TICKET_CHANGE_FIELDS = tuple(
    field.name for field in sd.Ticket.DESCRIPTOR.fields if field.name not in ("updated_at", "version", "survey_key")
)


def changed_ticket_fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The Ticket fields whose value differs between two versions of a ticket, sorted."""
    return sorted(name for name in TICKET_CHANGE_FIELDS if before[name] != after[name])


def ticket_answer(row: Any) -> sd.Ticket:
    """A ticket as the service answers for it: with its survey key (a credential, which the gateway
    shows only to who may enter CSAT answers), which `ticket_to_proto` leaves out of the events
    but for ticket.resolved, for whatever sends the customer their link."""
    message = ticket_to_proto(row)
    message.survey_key = _values(row)["survey_key"] or ""
    return message


def ticket_to_proto(row: Any) -> sd.Ticket:
    """A ticket as its events carry it: without its survey key."""
    r = _values(row)
    message = sd.Ticket(
        id=r["id"],
        account_id=r["account_id"],
        contact_id=r["contact_id"],
        subject=r["subject"],
        description=r["description"],
        channel=r["channel"],
        category=r["category"],
        priority=r["priority"],
        status=r["status"],
        assignee_id=r["assignee_id"],
        team=r["team"],
        region=r["region"],
        tags=list(r["tags"] or []),
        version=r["version"],
        effective_priority=r["effective_priority"],
        escalated=r["escalated"],
        escalation_reason=r["escalation_reason"],
        created_by_id=r["created_by_id"],
        account_tier=r["account_tier"],
        custom=_struct(r["custom"]),
    )
    _times(
        message,
        r,
        "first_response_due_at",
        "resolution_due_at",
        "first_responded_at",
        "resolved_at",
        "closed_at",
        "created_at",
        "updated_at",
    )
    return message


def comment_to_proto(row: Any) -> sd.TicketComment:
    r = _values(row)
    message = sd.TicketComment(
        id=r["id"], ticket_id=r["ticket_id"], author_id=r["author_id"], body=r["body"], public=r["public"]
    )
    _times(message, r, "created_at")
    return message


def work_log_to_proto(row: Any) -> sd.WorkLogEntry:
    r = _values(row)
    message = sd.WorkLogEntry(
        id=r["id"], ticket_id=r["ticket_id"], agent_id=r["agent_id"], minutes=r["minutes"], note=r["note"]
    )
    _times(message, r, "logged_at")
    return message


def sla_policy_to_proto(row: Any) -> sd.SlaPolicy:
    r = _values(row)
    message = sd.SlaPolicy(
        priority=r["priority"],
        first_response_minutes=r["first_response_minutes"],
        resolution_minutes=r["resolution_minutes"],
        version=r["version"],
    )
    _times(message, r, "updated_at")
    return message


def agent_to_proto(row: Any, open_tickets: int) -> sd.Agent:
    r = _values(row)
    message = sd.Agent(
        id=r["id"],
        name=r["name"],
        skills=list(r["skills"] or []),
        region=r["region"],
        team=r["team"],
        capacity=r["capacity"],
        available=r["available"],
        open_tickets=open_tickets,
        version=r["version"],
    )
    _times(message, r, "created_at", "updated_at")
    return message


def csat_to_proto(row: Any) -> sd.CsatResponse:
    r = _values(row)
    message = sd.CsatResponse(
        id=r["id"],
        ticket_id=r["ticket_id"],
        account_id=r["account_id"],
        score=r["score"],
        comment=r["comment"],
        channel=r["channel"],
    )
    _times(message, r, "submitted_at")
    return message


def survey_to_proto(survey: Mapping[str, Any]) -> sd.CsatSurvey:
    """A ticket's survey as its customer sees it (`handlers.get_csat_survey`)."""
    message = sd.CsatSurvey(
        ticket_id=survey["ticket_id"],
        subject=survey["subject"],
        answered=survey["answered"],
        answerable=survey["answerable"],
    )
    _times(message, survey, "resolved_at", "expires_at")
    return message


def return_visit_to_proto(row: Any) -> sd.ReturnVisit:
    r = _values(row)
    message = sd.ReturnVisit(
        id=r["id"],
        ticket_id=r["ticket_id"],
        account_id=r["account_id"],
        assignee_id=r["assignee_id"],
        status=r["status"],
        notes=r["notes"],
        region=r["region"],
    )
    _times(message, r, "due_at", "completed_at", "created_at")
    return message


def article_to_proto(row: Any) -> sd.KbArticle:
    r = _values(row)
    message = sd.KbArticle(
        id=r["id"],
        title=r["title"],
        body=r["body"],
        category=r["category"],
        tags=list(r["tags"] or []),
        published=r["published"],
        author_id=r["author_id"],
        version=r["version"],
    )
    _times(message, r, "created_at", "updated_at")
    return message
