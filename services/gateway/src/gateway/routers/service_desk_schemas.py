"""The answers of the service-desk routes (`gateway.routers.service_desk`) as the OpenAPI document shows them.

Documentation only, as `gateway.routers.lead_schemas`: the routes name these models in `responses=`,
which FastAPI puts in the OpenAPI document without validating or filtering any answer. The routes
print the service desk's messages with `service_desk.to_json` (every field of the message) and
compose them (`_listing`, `_ticket_detail_json`, ...); these models follow them.

Every field but a record's key (its `id`, an SLA policy's `priority`) is optional and may be null:
the caller's field rules leave hidden fields out, and mask numbers and booleans as null (a masked
text keeps its first character, `j***`; a masked time or id is `***`). Every int64 (a `version`)
is a number: `to_json` takes each field as Python holds it, not through protobuf's JSON mapping.
"""

from typing import Any

from pydantic import BaseModel, Field

from gateway.conventions import Time

_PRIORITY = "urgent, high, normal or low"
_SUGGESTIONS = "published articles matching the ticket; none for a caller who may not read the knowledge base"


class Ticket(BaseModel):
    """A ticket as the caller may see it (`ETag` carries its `version`)."""

    id: str
    account_id: str | None = None
    contact_id: str | None = None
    subject: str | None = None
    description: str | None = None
    channel: str | None = Field(default=None, description="phone, email, web, wechat or api")
    category: str | None = Field(default=None, description="auto-dispatch picks an agent with it among their `skills`")
    priority: str | None = Field(default=None, description=_PRIORITY)
    status: str | None = Field(
        default=None, description="new, assigned, in_progress, waiting_customer, resolved, closed or reopened"
    )
    assignee_id: str | None = Field(default=None, description="the agent working on it; empty while queued")
    team: str | None = None
    region: str | None = None
    first_response_due_at: Time = None
    resolution_due_at: Time = Field(default=None, description="later by the time spent waiting for the customer")
    first_responded_at: Time = None
    resolved_at: Time = None
    closed_at: Time = None
    created_at: Time = None
    updated_at: Time = None
    tags: list[str] | None = None
    version: int | None = None
    effective_priority: str | None = Field(
        default=None,
        description=f"the priority the SLA targets use, one above `priority` for tier-A accounts: {_PRIORITY}",
    )
    escalated: bool | None = Field(
        default=None, description="no agent could take the ticket, or an SLA target was breached"
    )
    escalation_reason: str | None = Field(
        default=None,
        description="no_agent_available, sla_breached_first_response or sla_breached_resolution (empty: not escalated)",
    )
    created_by_id: str | None = None
    account_tier: str | None = Field(
        default=None,
        description="the account's tier (A, B, C or D) as the service desk knows it (empty: unknown); left out "
        "for a caller who may not read the ticket's account",
    )
    custom: dict[str, Any] | None = None
    survey_key: str | None = Field(
        default=None,
        description="the key of the ticket's CSAT survey link for its customer (`/csat-surveys/{survey_key}`; a "
        "frontend shows it as a QR code): set at the first resolution, kept through reopenings, empty before. "
        "A credential: only who may create CSAT answers for this ticket (their grant's record scope covers it) gets it",
    )


class TicketPage(BaseModel):
    items: list[Ticket]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")


class TicketComment(BaseModel):
    """A comment on a ticket. `POST /tickets/{ticket_id}/comments` answers `{}` to a caller for
    whom the ticket's `comments` are hidden."""

    id: str
    ticket_id: str | None = None
    author_id: str | None = None
    body: str | None = None
    public: bool | None = Field(default=None, description="visible to the customer")
    created_at: Time = None


class WorkLogEntry(BaseModel):
    """Time an agent spent on a ticket. `POST /tickets/{ticket_id}/work-log` answers `{}` to a
    caller for whom the ticket's `work_log` is hidden."""

    id: str
    ticket_id: str | None = None
    agent_id: str | None = None
    minutes: int | None = None
    note: str | None = None
    logged_at: Time = None


class CsatResponse(BaseModel):
    """A customer's satisfaction answer to a resolved ticket."""

    id: str
    ticket_id: str | None = None
    account_id: str | None = None
    score: int | None = Field(default=None, description="1 to 5")
    comment: str | None = None
    submitted_at: Time = None
    channel: str | None = Field(
        default=None,
        description="staff (entered by staff: POST /tickets/{ticket_id}/csat) or customer (answered by the customer "
        "through the ticket's survey link)",
    )


class CsatPage(BaseModel):
    items: list[CsatResponse]
    next_cursor: str | None


class CsatSurvey(BaseModel):
    """A ticket's CSAT survey as its customer sees it through the survey link: no internal data."""

    ticket_id: str = Field(description="the ticket the survey is of, as its customer was told it")
    subject: str = Field(description="the ticket's subject")
    resolved_at: Time = Field(default=None, description="the ticket's resolution; null while it is open again")
    expires_at: Time = Field(
        default=None,
        description="until when the survey takes an answer (`SURVEY_VALID_DAYS` after the resolution); null while "
        "the ticket is open again",
    )
    answered: bool = Field(description="an answer was given (by the customer, or entered by staff): one per ticket")
    answerable: bool = Field(description="an answer would be taken now: resolved, not expired, not answered")


class SurveyAnswerReceived(BaseModel):
    status: str = Field(description='"received"')


class KbArticle(BaseModel):
    """A knowledge-base article (`ETag` carries its `version`)."""

    id: str
    title: str | None = None
    body: str | None = None
    category: str | None = None
    tags: list[str] | None = None
    published: bool | None = Field(default=None, description="false for a draft")
    author_id: str | None = None
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class KbArticlePage(BaseModel):
    items: list[KbArticle]
    next_cursor: str | None


class SuggestedArticles(BaseModel):
    items: list[KbArticle] = Field(description=_SUGGESTIONS)


class CreatedTicket(Ticket):
    suggested_articles: list[KbArticle] = Field(description=_SUGGESTIONS)


class TicketDetail(Ticket):
    """A ticket with its conversation, time spent and CSAT answer. Comments and work log are parts
    of the ticket: its field rules for `comments` and `work_log` apply to every entry."""

    comments: list[TicketComment] | None = None
    work_log: list[WorkLogEntry] | None = None
    csat: CsatResponse | None = Field(description="null when there is none or the caller may not read CSAT")


class SlaPolicy(BaseModel):
    """The SLA targets of one priority (`ETag` carries its `version`)."""

    priority: str = Field(description=_PRIORITY)
    first_response_minutes: int | None = None
    resolution_minutes: int | None = None
    updated_at: Time = None
    version: int | None = None


class SlaPolicyList(BaseModel):
    items: list[SlaPolicy]


class Agent(BaseModel):
    """A service engineer tickets are dispatched to (`ETag` carries its `version`)."""

    id: str = Field(description="the agent's user id")
    name: str | None = None
    skills: list[str] | None = Field(default=None, description="the ticket categories the agent handles")
    region: str | None = None
    team: str | None = None
    capacity: int | None = Field(default=None, description="the open tickets the agent may hold at once")
    available: bool | None = None
    open_tickets: int | None = Field(default=None, description="tickets assigned to the agent, not resolved or closed")
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class AgentPage(BaseModel):
    items: list[Agent]
    next_cursor: str | None


class ReturnVisit(BaseModel):
    """A follow-up call some days after a tier-A account's ticket was resolved."""

    id: str
    ticket_id: str | None = None
    account_id: str | None = None
    assignee_id: str | None = None
    due_at: Time = None
    status: str | None = Field(
        default=None, description="open, done or cancelled (its account was deleted: nobody is left to call)"
    )
    notes: str | None = Field(default=None, description="the agent's notes on completion; why a visit was cancelled")
    completed_at: Time = None
    created_at: Time = None
    region: str | None = None


class ReturnVisitPage(BaseModel):
    items: list[ReturnVisit]
    next_cursor: str | None
