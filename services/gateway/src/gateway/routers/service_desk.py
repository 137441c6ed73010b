"""Service desk over REST (SPEC §7): tickets (status machine, assignment, comments, work log),
CSAT, SLA policies, agents, return visits and the knowledge base.

Permissions come only from `require(...)`/`Access`; the service-desk service applies record scope
(a ticket's owner is its assignee). Illegal status transitions answer 409. A ticket's CSAT survey
link (`/csat-surveys/{survey_key}`) is public: its key, which only who may enter CSAT answers for the
ticket reads on it, authenticates the customer (`gateway.public_keys`). A ticket's account tier is
shown only to who may read the account (`ticket_presenter`).
"""

from collections.abc import Container, Iterable, Mapping
from typing import Annotated, Any, Literal

import grpc
from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from crm_platform.grpc_client import noting_replays, replay_noted
from crm_platform.principal import Principal, RecordScope, ScopeKind
from crm_platform.timeutil import isoformat, to_timestamp
from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from pydantic import Field

from gateway.conventions import IdempotencyKey, IfMatch, expected_version, nothing_to_change, with_etag
from gateway.inputs import Instant, NonBlank, OptionalId, ReplacementBody, RequestBody
from gateway.public_keys import PublicKeyPath, deny_unknown_key, path_without_key
from gateway.references import CONTACT, References, listed_accounts
from gateway.routers import service_desk_schemas as schemas
from gateway.routers.custom_fields import CUSTOM_FILTER_PARAMETERS, Presenter, custom_filters, presenter
from gateway.routing import ResourceRouter
from gateway.security import Access, FilterFields, require
from gateway.security.access import runtime_of
from gateway.security.policy import covers
from gateway.security.problems import not_found
from gateway.upstreams import UpstreamNotConfigured

router = ResourceRouter(tags=["service desk"])

TicketsRead = Annotated[Access, Depends(require("tickets", "read"))]
TicketsCreate = Annotated[Access, Depends(require("tickets", "create"))]
TicketsUpdate = Annotated[Access, Depends(require("tickets", "update"))]
TicketsAssign = Annotated[Access, Depends(require("tickets", "assign"))]
TicketsDelete = Annotated[Access, Depends(require("tickets", "delete"))]
CsatRead = Annotated[Access, Depends(require("csat", "read"))]
CsatCreate = Annotated[Access, Depends(require("csat", "create"))]
SlaRead = Annotated[Access, Depends(require("sla_policies", "read"))]
SlaUpdate = Annotated[Access, Depends(require("sla_policies", "update"))]
AgentsRead = Annotated[Access, Depends(require("agents", "read"))]
AgentsCreate = Annotated[Access, Depends(require("agents", "create"))]
AgentsUpdate = Annotated[Access, Depends(require("agents", "update"))]
VisitsRead = Annotated[Access, Depends(require("return_visits", "read"))]
VisitsUpdate = Annotated[Access, Depends(require("return_visits", "update"))]
KbRead = Annotated[Access, Depends(require("kb_articles", "read"))]
KbCreate = Annotated[Access, Depends(require("kb_articles", "create"))]
KbUpdate = Annotated[Access, Depends(require("kb_articles", "update"))]

Channel = Literal["phone", "email", "web", "wechat", "api"]
Priority = Literal["urgent", "high", "normal", "low"]
TicketStatus = Literal["new", "assigned", "in_progress", "waiting_customer", "resolved", "closed", "reopened"]
OPEN_STATUSES = ["new", "assigned", "in_progress", "waiting_customer", "reopened"]


def _stub(request: Request) -> ServiceDeskServiceStub:
    return request.app.state.upstreams.stub("service_desk", ServiceDeskServiceStub)  # type: ignore[no-any-return]


# --- models --------------------------------------------------------------------------------------

# Tags of at most 100 characters (service_desk.domain); the other limits are the columns' sizes.
Tag = Annotated[str, Field(max_length=100)]


class TicketIn(RequestBody):
    # Ids, region and team: "" is none, as null is (no account; a PATCH clears the field); only
    # whitespace would name a record nobody can find or a team nobody is in.
    account_id: OptionalId = Field(default=None, max_length=64)
    contact_id: OptionalId = Field(default=None, max_length=64)
    subject: str | None = Field(default=None, max_length=500)
    description: str | None = Field(default=None, max_length=20_000)
    channel: Channel | None = None
    category: str | None = Field(default=None, max_length=100)
    priority: Priority | None = None
    region: OptionalId = Field(default=None, max_length=100)
    team: OptionalId = Field(default=None, max_length=100)
    tags: list[Tag] | None = None
    custom: dict[str, Any] | None = Field(default=None, description="custom field values (null removes one)")


class TicketCreate(TicketIn):
    subject: NonBlank = Field(max_length=500)


class StatusIn(RequestBody):
    status: Literal["in_progress", "waiting_customer", "resolved", "closed", "reopened"]
    note: str = Field(default="", max_length=20_000)


class AssignIn(RequestBody):
    assignee_id: OptionalId = Field(default=None, max_length=64, description="empty: auto-dispatch")


class CommentIn(RequestBody):
    body: NonBlank = Field(max_length=20_000)
    public: bool = False


class WorkLogIn(RequestBody):
    minutes: int = Field(ge=1, le=1440)
    note: str = Field(default="", max_length=2000)


class CsatIn(RequestBody):
    score: int = Field(ge=1, le=5)
    comment: str = Field(default="", max_length=2000)


class SlaPolicyIn(ReplacementBody):
    read_only = frozenset({"priority", "updated_at", "version"})
    first_response_minutes: int = Field(ge=1, le=525_600)
    resolution_minutes: int = Field(ge=1, le=525_600)


class AgentIn(RequestBody):
    name: str | None = Field(default=None, max_length=200)
    skills: list[Annotated[str, Field(max_length=100)]] | None = None
    # "" is none, as null; only whitespace would be a region or team no ticket is dispatched from.
    region: OptionalId = Field(default=None, max_length=100)
    team: OptionalId = Field(default=None, max_length=100)
    capacity: int | None = Field(default=None, ge=0, le=1000)
    available: bool | None = None


class AgentCreate(AgentIn):
    id: NonBlank = Field(max_length=64, description="the agent's user id")
    name: NonBlank = Field(max_length=200)


class VisitDoneIn(RequestBody):
    notes: str = Field(default="", max_length=20_000)


class ArticleIn(RequestBody):
    title: str | None = Field(default=None, max_length=300)
    body: str | None = Field(default=None, max_length=200_000)
    category: str | None = Field(default=None, max_length=100)
    tags: list[Tag] | None = None
    published: bool | None = None


class ArticleCreate(ArticleIn):
    title: NonBlank = Field(max_length=300)
    body: NonBlank = Field(max_length=200_000)


# --- proto <-> JSON ------------------------------------------------------------------------------


def to_json(message: Message) -> dict[str, Any]:
    """Every field of a resource message: times as RFC 3339 (null when unset), int64 as numbers."""
    body: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.Struct":
            body[field.name] = json_format.MessageToDict(value)
        elif field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp":
            body[field.name] = None if value.seconds == 0 and value.nanos == 0 else isoformat(value.ToDatetime())
        elif hasattr(value, "extend"):  # a repeated field
            body[field.name] = list(value)
        else:
            body[field.name] = value
    return body


def _fill(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            getattr(message, name).update(value)
        elif isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def _page(limit: int, cursor: str, sort: str = "") -> common_pb2.PageRequest:
    return common_pb2.PageRequest(limit=limit, cursor=cursor, sort=sort)


async def _listing(access: Access, items: Any, cursor: str, present: Presenter | None = None) -> dict[str, Any]:
    present = present or await presenter(access)
    return {"items": [present(to_json(item)) for item in items], "next_cursor": cursor or None}


# --- what a ticket shows of its survey key and of its account -----------------------------------------

SURVEY_KEY = "survey_key"
# The account's tier (A: a VIP) as a ticket names it. The priority and due times a tier raises stay:
# whoever works the ticket works by them (they tell the tier only of an account one has a ticket for).
ACCOUNT_TIER_FIELDS = ("account_tier",)


def may_see_survey_key(answering: RecordScope | None, ticket: Mapping[str, Any]) -> bool:
    """A ticket's `survey_key` lets whoever holds it answer the ticket's CSAT survey: it is for who
    may enter CSAT answers for this very ticket (to print the link or its QR code for the customer),
    as a web form's key is for who may change web forms; anyone else reading the ticket does not get
    it. `answering`: the record scope of the caller's grant to create CSAT answers (None: they have
    none), which must cover the ticket, as the service checks it for `POST /tickets/{id}/csat`."""
    return answering is not None and covers(answering, _scoped_as_stored(ticket))


def _scoped_as_stored(ticket: Mapping[str, Any]) -> dict[str, Any]:
    """What a record scope judges a ticket by, as the service desk stores it: its owner is its
    assignee, its creator while it has none."""
    owner = ticket.get("assignee_id") or ticket.get("created_by_id")
    return {"owner_id": owner, "team": ticket.get("team"), "region": ticket.get("region")}


def without_survey_key(ticket: Mapping[str, Any]) -> dict[str, Any]:
    """A ticket without its `survey_key`: as the audit trail keeps it (the key is a credential,
    kept out as a web form's is), and as a caller who may not enter CSAT answers for it reads it."""
    return _without(ticket, (SURVEY_KEY,))


def _without(ticket: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    left_out = set(names)
    return {name: value for name, value in ticket.items() if name not in left_out}


async def _accounts_in_sight(access: Access, account_ids: Iterable[str]) -> Container[str]:
    """Of the accounts named, those the caller may read, as the accounts service lists them in the
    caller's read scope for accounts (no call for a caller who reads all accounts, or none); none of
    them while that service cannot say (down, not deployed): tickets are still served, tiers left out."""
    named = {account_id for account_id in account_ids if account_id}
    accounts = access.view("accounts") if named else None
    if accounts is None:
        return frozenset()
    if accounts.scope.kind is ScopeKind.ALL:
        return named
    try:
        return (await listed_accounts(accounts, named, accounts.grpc_metadata())).keys()
    except (grpc.aio.AioRpcError, UpstreamNotConfigured):
        return frozenset()


def _shown_of_account(ticket: Mapping[str, Any], in_sight: Container[str]) -> Mapping[str, Any]:
    """The ticket, without its account's tier (`ACCOUNT_TIER_FIELDS`) when the caller may not read
    that account: naming any account in a ticket they file must not tell them its tier."""
    if not ticket.get("account_id") or ticket["account_id"] in in_sight:
        return ticket
    return _without(ticket, ACCOUNT_TIER_FIELDS)


async def without_unseen_account_tiers(access: Access, tickets: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A page of exported tickets, their accounts' tiers as `ticket_presenter` shows them (an export
    holds no survey key: a credential is never a column)."""
    in_sight = await _accounts_in_sight(access, (ticket["account_id"] for ticket in tickets))
    return [_shown_of_account(ticket, in_sight) for ticket in tickets]


async def ticket_presenter(access: Access, account_ids: Iterable[str]) -> Presenter:
    """`presenter(access)` for tickets of the accounts `account_ids` (those of the tickets the route
    shows): the `survey_key` only on the tickets whose CSAT answers the caller may enter
    (`may_see_survey_key`), and the account's tier only on tickets of accounts the caller may read
    (or of none)."""
    present = await presenter(access)
    answering = access.runtime.policy.decide(access.principal, "csat", "create").scope
    in_sight = await _accounts_in_sight(access, account_ids)

    def present_ticket(ticket: Mapping[str, Any]) -> dict[str, Any]:
        shown = _shown_of_account(ticket, in_sight)
        return present(shown if may_see_survey_key(answering, ticket) else without_survey_key(shown))

    return present_ticket


def _mask(given: dict[str, Any]) -> field_mask_pb2.FieldMask:
    """Top-level fields, and `custom.<key>` per custom value so the others stay as they are."""
    paths = [name for name in given if name != "custom"]
    paths += [f"custom.{key}" for key in given.get("custom") or {}]
    return field_mask_pb2.FieldMask(paths=paths)


def _changes(body: RequestBody, *, not_null: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a PATCH body sends. A null empties its field, as on the other PATCH routes (the
    service refuses, naming the field, to empty one that must keep a value: a ticket's subject).
    `not_null`: the fields whose empty value would be a value (a capacity of 0, `available: false`)
    or whose values are removed one by one (`custom.<key>: null`); a null for one is a 422 naming
    it. A body that changes nothing (`{}`, `{"custom": {}}`) is a 422 saying so."""
    given = body.model_dump(exclude_unset=True)
    nulls = [name for name in not_null if name in given and given[name] is None]
    if nulls:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", name), "msg": "must not be null"} for name in nulls]
        )
    if not _mask(given).paths:
        raise nothing_to_change()
    return given


# --- tickets -------------------------------------------------------------------------------------


@router.post("/tickets", status_code=201, responses={201: {"model": schemas.CreatedTicket}})
async def create_ticket(
    body: TicketCreate,
    request: Request,
    response: Response,
    access: TicketsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Opens a ticket: SLA due times (tier-A accounts one priority up), auto-dispatch to an agent,
    and suggested knowledge-base articles."""
    given = body.model_dump(exclude_unset=True, exclude_none=True)
    access.check_write(given)
    message = pb.CreateTicketRequest(ticket=_fill(pb.TicketInput(), given), idempotency_key=idempotency_key)  # type: ignore[arg-type]
    stub = _stub(request)
    reply = await _contact(access, body.contact_id, body.account_id).check_or_replay(
        idempotency_key, lambda replay: stub.CreateTicket(message, metadata=access.grpc_metadata() + replay)
    )
    result = to_json(reply.ticket)
    await access.audit_write(result["id"], None, without_survey_key(result))
    present = await ticket_presenter(access, [result["account_id"]])
    kb = access.view("kb_articles")
    return with_etag(
        response, _created_ticket_json(result, reply.suggested_articles, present, kb.present if kb else None)
    )


def _created_ticket_json(
    ticket: dict[str, Any], suggested_articles: Iterable[Message], present: Presenter, present_article: Presenter | None
) -> dict[str, Any]:
    """The new ticket under the ticket rules, its suggested articles under the knowledge base's
    (none when `present_article` is None: the caller may not read the knowledge base)."""
    shown = present(ticket)
    shown["suggested_articles"] = [present_article(to_json(a)) for a in suggested_articles] if present_article else []
    return shown


# The filters of GET /tickets (and of the export): query parameter -> the field it filters by.
TICKET_FILTERS: FilterFields = {
    "account_id": "account_id",
    "contact_id": "contact_id",
    "status": "status",
    "open": "status",
    "priority": "priority",
    "channel": "channel",
    "category": "category",
    "assignee_id": "assignee_id",
    "region": "region",
    "escalated": "escalated",
    "created_after": "created_at",
    "q": "subject",
}


@router.get("/tickets", openapi_extra=CUSTOM_FILTER_PARAMETERS, responses={200: {"model": schemas.TicketPage}})
async def list_tickets(
    request: Request,
    access: TicketsRead,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str = "",
    sort: Annotated[str, Query(pattern=r"^-?(created_at|updated_at|resolution_due_at)$")] = "-created_at",
    account_id: str = "",
    contact_id: str = "",
    status: Annotated[list[TicketStatus] | None, Query()] = None,
    open: Annotated[bool, Query(description="only new, assigned, in_progress, waiting_customer, reopened")] = False,
    priority: Annotated[list[Priority] | None, Query()] = None,
    channel: Annotated[list[Channel] | None, Query()] = None,
    category: Annotated[list[str] | None, Query()] = None,
    assignee_id: str = "",
    region: str = "",
    escalated: bool | None = None,
    created_after: Instant | None = None,
    q: Annotated[str, Query(max_length=200)] = "",
) -> dict[str, Any]:
    access.check_filters(TICKET_FILTERS)
    access.check_filter([sort])
    custom = await custom_filters(access)
    assignee_id = access.resolve_me(assignee_id)
    statuses: list[str] = list(status or [])
    if open:
        statuses = [s for s in statuses if s in OPEN_STATUSES] if statuses else OPEN_STATUSES
        if not statuses:  # open and only statuses that are not: no ticket is both (none sent is no filter)
            return {"items": [], "next_cursor": None}
    reply = await _stub(request).ListTickets(
        pb.ListTicketsRequest(
            page=_page(access.page_limit(limit), cursor, sort),
            account_id=account_id,
            contact_id=contact_id,
            statuses=statuses,
            priorities=priority or [],
            channels=channel or [],
            categories=category or [],
            assignee_id=assignee_id,
            region=region,
            escalated="" if escalated is None else str(escalated).lower(),
            created_after=to_timestamp(created_after) if created_after else None,
            q=q,
            custom=custom,
        ),
        metadata=access.grpc_metadata(),
    )
    present = await ticket_presenter(access, (ticket.account_id for ticket in reply.items))
    return await _listing(access, reply.items, reply.page_info.next_cursor, present)


@router.get("/tickets/{ticket_id}", responses={200: {"model": schemas.TicketDetail}})
async def get_ticket(ticket_id: str, request: Request, response: Response, access: TicketsRead) -> dict[str, Any]:
    """The ticket with its comments, work log and CSAT answer (when the caller may read CSAT)."""
    reply = await _stub(request).GetTicket(pb.GetTicketRequest(ticket_id=ticket_id), metadata=access.grpc_metadata())
    present = await ticket_presenter(access, [reply.ticket.account_id])
    csat = access.view("csat")
    return with_etag(response, _ticket_detail_json(reply, present, csat.present if csat else None))


def _ticket_detail_json(
    reply: pb.GetTicketResponse, present: Presenter, present_csat: Presenter | None
) -> dict[str, Any]:
    """The ticket with its comments and work log, which are parts of the ticket (its rules for them
    apply), and its CSAT answer under the CSAT rules (null when `present_csat` is None: the caller
    may not read CSAT)."""
    body = present(
        {
            **to_json(reply.ticket),
            "comments": [to_json(c) for c in reply.comments],
            "work_log": [to_json(e) for e in reply.work_log],
        }
    )
    body["csat"] = present_csat(to_json(reply.csat)) if present_csat and reply.HasField("csat") else None
    return body


@router.patch("/tickets/{ticket_id}", responses={200: {"model": schemas.Ticket}})
async def update_ticket(
    ticket_id: str, body: TicketIn, request: Request, response: Response, access: TicketsUpdate, if_match: IfMatch = ""
) -> dict[str, Any]:
    given = _changes(body, not_null=("custom",))
    access.check_write(given)
    stub = _stub(request)
    if "contact_id" in given or "account_id" in given:
        # A ticket's contact must work at its account: the one of the two the body does not set is
        # read from the ticket (404 when it is not in the caller's scope) for this check only.
        stored = await stub.GetTicket(pb.GetTicketRequest(ticket_id=ticket_id), metadata=access.grpc_metadata())
        contact_id, account_id = (
            given.get(name, getattr(stored.ticket, name)) for name in ("contact_id", "account_id")
        )
        await _contact(access, contact_id, account_id).check()
    reply = await stub.UpdateTicket(
        pb.UpdateTicketRequest(
            ticket_id=ticket_id,
            ticket=_fill(pb.TicketInput(), given),  # type: ignore[arg-type]
            update_mask=_mask(given),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.ticket)
    await access.audit_write(ticket_id, without_survey_key(to_json(reply.previous)), without_survey_key(result))
    present = await ticket_presenter(access, [result["account_id"]])
    return with_etag(response, present(result))


def _contact(access: Access, contact_id: str | None, account_id: str | None) -> References:
    """A ticket's contact must exist, at the ticket's account when it names one (`gateway.references`).
    The account itself is the service desk's to check (it takes one created a moment ago on purpose)."""
    return References(access).add("contact_id", CONTACT, contact_id, on_account=account_id)


@router.delete("/tickets/{ticket_id}", status_code=204)
async def delete_ticket(ticket_id: str, request: Request, access: TicketsDelete, if_match: IfMatch = "") -> Response:
    """A ticket that should never have been one (spam, a test, a duplicate), with its comments and
    work log: only while open and never resolved (409 `TICKET_ON_RECORD` once resolved or closed,
    also before a reopening: SLA and CSAT reports count it)."""
    reply = await _stub(request).DeleteTicket(
        pb.DeleteTicketRequest(ticket_id=ticket_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(ticket_id, without_survey_key(to_json(reply.previous)), None)
    return Response(status_code=204)


@router.post("/tickets/{ticket_id}/status", responses={200: {"model": schemas.Ticket}})
async def change_ticket_status(
    ticket_id: str, body: StatusIn, request: Request, response: Response, access: TicketsUpdate, if_match: IfMatch = ""
) -> dict[str, Any]:
    """Moves the ticket along its status machine; an illegal move is 409."""
    reply = await _stub(request).ChangeTicketStatus(
        pb.ChangeTicketStatusRequest(
            ticket_id=ticket_id, status=body.status, note=body.note, expected_version=expected_version(if_match)
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.ticket)
    before, after = without_survey_key(to_json(reply.previous)), without_survey_key(result)
    await access.audit_write(ticket_id, before, after, reason=body.note)
    present = await ticket_presenter(access, [result["account_id"]])
    return with_etag(response, present(result))


@router.post("/tickets/{ticket_id}/assign", responses={200: {"model": schemas.Ticket}})
async def assign_ticket(
    ticket_id: str, body: AssignIn, request: Request, response: Response, access: TicketsAssign, if_match: IfMatch = ""
) -> dict[str, Any]:
    """Assigns to an agent, or auto-dispatches again when `assignee_id` is empty."""
    access.check_write(["assignee_id"])
    reply = await _stub(request).AssignTicket(
        pb.AssignTicketRequest(
            ticket_id=ticket_id, assignee_id=body.assignee_id or "", expected_version=expected_version(if_match)
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.ticket)
    await access.audit_write(ticket_id, without_survey_key(to_json(reply.previous)), without_survey_key(result))
    present = await ticket_presenter(access, [result["account_id"]])
    return with_etag(response, present(result))


@router.post("/tickets/{ticket_id}/comments", status_code=201, responses={201: {"model": schemas.TicketComment}})
async def add_ticket_comment(
    ticket_id: str, body: CommentIn, request: Request, access: TicketsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    reply = await _stub(request).AddTicketComment(
        pb.AddTicketCommentRequest(
            ticket_id=ticket_id, body=body.body, public=body.public, idempotency_key=idempotency_key
        ),
        metadata=access.grpc_metadata(),
    )
    comment = to_json(reply.comment)
    await access.audit_write(ticket_id, None, {"comment": comment}, action="comment")
    return _ticket_entry(access, "comments", comment)


@router.post("/tickets/{ticket_id}/work-log", status_code=201, responses={201: {"model": schemas.WorkLogEntry}})
async def log_ticket_work(
    ticket_id: str, body: WorkLogIn, request: Request, access: TicketsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    reply = await _stub(request).LogWork(
        pb.LogWorkRequest(ticket_id=ticket_id, minutes=body.minutes, note=body.note, idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    entry = to_json(reply.entry)
    await access.audit_write(ticket_id, None, {"work_log": entry}, action="log_work")
    return _ticket_entry(access, "work_log", entry)


def _ticket_entry(access: Access, part: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A comment or work-log entry as the caller sees that part of a ticket (empty when hidden)."""
    shown: list[dict[str, Any]] = access.present({part: [entry]}).get(part, [{}])
    return shown[0]


@router.get("/tickets/{ticket_id}/suggested-articles", responses={200: {"model": schemas.SuggestedArticles}})
async def suggest_articles(
    ticket_id: str, request: Request, access: TicketsRead, limit: Annotated[int, Query(ge=1, le=20)] = 3
) -> dict[str, Any]:
    """Published knowledge-base articles matching the ticket (empty for callers who may not read the KB)."""
    # Asked of the service whatever the caller may read of the KB: it finds the ticket in the
    # caller's scope first, so a ticket they may not see is a 404 here too, as on GET /tickets/{id}.
    reply = await _stub(request).SuggestKbArticles(
        pb.SuggestKbArticlesRequest(ticket_id=ticket_id, limit=limit), metadata=access.grpc_metadata()
    )
    kb = access.view("kb_articles")
    return _items_json(reply.items, kb.present) if kb else {"items": []}


def _items_json(records: Iterable[Message], present: Presenter) -> dict[str, Any]:
    """The answer of an unpaged list (suggested articles, SLA policies): every record as the caller sees it."""
    return {"items": [present(to_json(record)) for record in records]}


@router.post("/tickets/{ticket_id}/csat", status_code=201, responses={201: {"model": schemas.CsatResponse}})
async def submit_csat(
    ticket_id: str, body: CsatIn, request: Request, access: CsatCreate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """The customer's satisfaction answer (1 to 5): one per resolved ticket; a second one is 409."""
    access.check_write(body.model_dump(exclude_unset=True))
    reply = await _stub(request).SubmitCsat(
        pb.SubmitCsatRequest(
            ticket_id=ticket_id, score=body.score, comment=body.comment, idempotency_key=idempotency_key
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.response)
    await access.audit_write(result["id"], None, result)
    return access.present(result)


@router.get("/csat", responses={200: {"model": schemas.CsatPage}})
async def list_csat(
    request: Request,
    access: CsatRead,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str = "",
    ticket_id: str = "",
    account_id: str = "",
) -> dict[str, Any]:
    access.check_filters({"ticket_id": "ticket_id", "account_id": "account_id"})
    reply = await _stub(request).ListCsatResponses(
        pb.ListCsatResponsesRequest(
            page=_page(access.page_limit(limit), cursor), ticket_id=ticket_id, account_id=account_id
        ),
        metadata=access.grpc_metadata(),
    )
    return await _listing(access, reply.items, reply.page_info.next_cursor)


# --- the customer's survey link (public) -------------------------------------------------------

_SURVEY_RATE_LIMIT = {
    "description": "This address asked for too many unknown survey keys (see Retry-After): guesses are slowed "
    "like failed logins"
}


def survey_actor(ticket_id: str) -> Principal:
    """Who answers through a ticket's survey link: the survey, named by its ticket (never its key),
    as the service desk acts for it (`handlers.survey_principal`), so its events and the audit trail
    name the same actor."""
    return Principal(user_id=f"survey:{ticket_id}", kind="customer")


async def _deny_unknown_survey_key(request: Request, path: str, action: str) -> None:
    """A key no ticket's survey link has: a failed authentication (`public_keys.deny_unknown_key`)."""
    await deny_unknown_key(
        request, path, resource="csat", action=action, message="no such survey",
        too_many="too many requests to unknown surveys",
    )  # fmt: skip


@router.get("/csat-surveys/{survey_key}", responses={200: {"model": schemas.CsatSurvey}, 429: _SURVEY_RATE_LIMIT})
async def get_csat_survey(survey_key: PublicKeyPath, request: Request) -> dict[str, Any]:
    """Public, no login: the CSAT survey of the ticket whose link has this key (the link, or the QR
    code of it, left with the customer; the ticket's `survey_key`). What identifies the ticket to
    its customer (its id and subject) and whether the survey takes an answer now. An unknown key is
    a 404, audited and slowed down as a failed login."""
    path = path_without_key(request, SURVEY_KEY, survey_key)
    try:
        reply = await _stub(request).GetCsatSurvey(pb.GetCsatSurveyRequest(survey_key=survey_key), timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            await _deny_unknown_survey_key(request, path, "read_survey")
        raise
    return to_json(reply.survey)


@router.post(
    "/csat-surveys/{survey_key}",
    status_code=201,
    responses={
        201: {"model": schemas.SurveyAnswerReceived},
        409: {
            "description": "No answer taken: one was given already (staff's included: `DUPLICATE`), the ticket "
            "is open again or was closed unresolved (`TICKET_NOT_RESOLVED`), or the link expired "
            "(`SURVEY_EXPIRED`)"
        },
        429: _SURVEY_RATE_LIMIT,
    },
)
async def answer_csat_survey(
    survey_key: PublicKeyPath, body: CsatIn, request: Request, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """Public, no login: the customer's own answer to the ticket's CSAT survey (score 1 to 5, a
    comment), through the link the key is of. Taken once per ticket (an answer entered by staff
    counts), while the ticket is resolved or closed after a resolution, and for the service desk's
    `SURVEY_VALID_DAYS` after its resolution. The answer never echoes the record. Audited with the
    survey as its actor (`survey:<ticket id>`), never the key; an unknown key is a 404, audited and
    slowed down as a failed login."""
    path = path_without_key(request, SURVEY_KEY, survey_key)
    try:
        with noting_replays():
            reply = await _stub(request).SubmitCsatSurvey(
                pb.SubmitCsatSurveyRequest(
                    survey_key=survey_key, score=body.score, comment=body.comment, idempotency_key=idempotency_key
                ),
                timeout=10,
            )
            replayed = replay_noted()
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            await _deny_unknown_survey_key(request, path, "answer_survey")
        raise
    result = to_json(reply.response)
    await runtime_of(request).audit_public_write(
        request,
        survey_actor(result["ticket_id"]),
        "csat",
        result["id"],
        None,
        result,
        action="create",
        path=path,
        replayed=replayed,
    )
    return {"status": "received"}


# --- SLA policies --------------------------------------------------------------------------------


@router.get("/sla-policies", responses={200: {"model": schemas.SlaPolicyList}})
async def list_sla_policies(request: Request, access: SlaRead) -> dict[str, Any]:
    reply = await _stub(request).ListSlaPolicies(pb.ListSlaPoliciesRequest(), metadata=access.grpc_metadata())
    return _items_json(reply.items, access.present)


@router.put("/sla-policies/{priority}", responses={200: {"model": schemas.SlaPolicy}})
async def update_sla_policy(
    priority: Priority,
    body: SlaPolicyIn,
    request: Request,
    response: Response,
    access: SlaUpdate,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """New targets for tickets created from now on."""
    access.check_write(body.model_dump())
    reply = await _stub(request).UpdateSlaPolicy(
        pb.UpdateSlaPolicyRequest(
            priority=priority,
            first_response_minutes=body.first_response_minutes,
            resolution_minutes=body.resolution_minutes,
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.policy)
    await access.audit_write(priority, to_json(reply.previous), result, action="update")
    return with_etag(response, access.present(result))


# --- agents --------------------------------------------------------------------------------------


@router.post("/agents", status_code=201, responses={201: {"model": schemas.Agent}})
async def create_agent(
    body: AgentCreate, request: Request, response: Response, access: AgentsCreate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    given = body.model_dump(exclude_unset=True, exclude_none=True)
    access.check_write(given)
    values = {"capacity": 10, "available": True, **given}
    reply = await _stub(request).CreateAgent(
        pb.CreateAgentRequest(agent=_fill(pb.AgentInput(), values), idempotency_key=idempotency_key),  # type: ignore[arg-type]
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.agent)
    await access.audit_write(result["id"], None, result)
    return with_etag(response, access.present(result))


@router.get("/agents", responses={200: {"model": schemas.AgentPage}})
async def list_agents(
    request: Request,
    access: AgentsRead,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str = "",
    region: str = "",
    skill: str = "",
    team: str = "",
    available: bool | None = None,
) -> dict[str, Any]:
    access.check_filters({"region": "region", "skill": "skills", "team": "team", "available": "available"})
    reply = await _stub(request).ListAgents(
        pb.ListAgentsRequest(
            page=_page(access.page_limit(limit), cursor),
            region=region,
            skill=skill,
            team=team,
            available="" if available is None else str(available).lower(),
        ),
        metadata=access.grpc_metadata(),
    )
    return await _listing(access, reply.items, reply.page_info.next_cursor)


@router.get("/agents/{agent_id}", responses={200: {"model": schemas.Agent}})
async def get_agent(agent_id: str, request: Request, response: Response, access: AgentsRead) -> dict[str, Any]:
    reply = await _stub(request).GetAgent(pb.GetAgentRequest(agent_id=agent_id), metadata=access.grpc_metadata())
    return with_etag(response, access.present(to_json(reply.agent)))


@router.patch("/agents/{agent_id}", responses={200: {"model": schemas.Agent}})
async def update_agent(
    agent_id: str, body: AgentIn, request: Request, response: Response, access: AgentsUpdate, if_match: IfMatch = ""
) -> dict[str, Any]:
    """Skills, region, capacity and availability drive auto-dispatch."""
    given = _changes(body, not_null=("capacity", "available"))
    access.check_write(given)
    reply = await _stub(request).UpdateAgent(
        pb.UpdateAgentRequest(
            agent_id=agent_id,
            agent=_fill(pb.AgentInput(), given),  # type: ignore[arg-type]
            update_mask=_mask(given),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.agent)
    await access.audit_write(agent_id, to_json(reply.previous), result)
    return with_etag(response, access.present(result))


# --- return visits -------------------------------------------------------------------------------


@router.get("/return-visits", responses={200: {"model": schemas.ReturnVisitPage}})
async def list_return_visits(
    request: Request,
    access: VisitsRead,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str = "",
    account_id: str = "",
    status: Literal["open", "done", "cancelled"] | None = None,
    assignee_id: str = "",
    due_before: Instant | None = None,
) -> dict[str, Any]:
    """Follow-up calls scheduled after tier-A accounts' tickets were resolved (回访); `cancelled`
    ones were called off when their account was deleted."""
    access.check_filters(
        {"account_id": "account_id", "status": "status", "assignee_id": "assignee_id", "due_before": "due_at"}
    )
    assignee_id = access.resolve_me(assignee_id)
    reply = await _stub(request).ListReturnVisits(
        pb.ListReturnVisitsRequest(
            page=_page(access.page_limit(limit), cursor),
            account_id=account_id,
            status=status or "",
            assignee_id=assignee_id,
            due_before=to_timestamp(due_before) if due_before else None,
        ),
        metadata=access.grpc_metadata(),
    )
    return await _listing(access, reply.items, reply.page_info.next_cursor)


@router.post("/return-visits/{visit_id}/complete", responses={200: {"model": schemas.ReturnVisit}})
async def complete_return_visit(
    visit_id: str, body: VisitDoneIn, request: Request, access: VisitsUpdate
) -> dict[str, Any]:
    access.check_write(body.model_dump(exclude_unset=True))
    reply = await _stub(request).CompleteReturnVisit(
        pb.CompleteReturnVisitRequest(return_visit_id=visit_id, notes=body.notes), metadata=access.grpc_metadata()
    )
    result = to_json(reply.return_visit)
    await access.audit_write(visit_id, {"status": "open"}, {"status": "done", "notes": body.notes})
    return access.present(result)


# --- knowledge base ------------------------------------------------------------------------------


@router.post("/kb-articles", status_code=201, responses={201: {"model": schemas.KbArticle}})
async def create_article(
    body: ArticleCreate, request: Request, response: Response, access: KbCreate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    given = body.model_dump(exclude_unset=True, exclude_none=True)
    access.check_write(given)
    reply = await _stub(request).CreateKbArticle(
        pb.CreateKbArticleRequest(article=_fill(pb.KbArticleInput(), given), idempotency_key=idempotency_key),  # type: ignore[arg-type]
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.article)
    await access.audit_write(result["id"], None, result)
    return with_etag(response, access.present(result))


@router.get("/kb-articles", responses={200: {"model": schemas.KbArticlePage}})
async def search_articles(
    request: Request,
    access: KbRead,
    q: Annotated[str, Query(max_length=200, description="full-text search over title and body")] = "",
    category: str = "",
    include_unpublished: bool = False,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str = "",
) -> dict[str, Any]:
    """Published articles matching every word of `q` (drafts only for who may edit articles): most
    relevant first on PostgreSQL, otherwise, and without `q`, most recently updated first."""
    access.check_filters({"q": ("title", "body"), "category": "category", "include_unpublished": "published"})
    if include_unpublished:
        access.ensure("update")
    reply = await _stub(request).SearchKbArticles(
        pb.SearchKbArticlesRequest(
            q=q,
            category=category,
            include_unpublished=include_unpublished,
            page=_page(access.page_limit(limit), cursor),
        ),
        metadata=access.grpc_metadata(),
    )
    return {
        "items": access.present_many(to_json(a) for a in reply.items),
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.get("/kb-articles/{article_id}", responses={200: {"model": schemas.KbArticle}})
async def get_article(article_id: str, request: Request, response: Response, access: KbRead) -> dict[str, Any]:
    """A published article; a draft only for who may edit articles, as the listing's
    `include_unpublished` (to anyone else it is a 404, as an article that does not exist)."""
    reply = await _stub(request).GetKbArticle(
        pb.GetKbArticleRequest(article_id=article_id), metadata=access.grpc_metadata()
    )
    if not reply.article.published and access.view("kb_articles", "update") is None:
        # Answered and audited as the service answers an unknown article (SPEC §3: never reveal).
        hidden = not_found(f"kb_article {article_id} not found")
        await access.runtime.audit_denied(
            request, access.principal, access.resource, access.action, hidden, record_id=article_id
        )
        raise hidden
    return with_etag(response, access.present(to_json(reply.article)))


@router.patch("/kb-articles/{article_id}", responses={200: {"model": schemas.KbArticle}})
async def update_article(
    article_id: str, body: ArticleIn, request: Request, response: Response, access: KbUpdate, if_match: IfMatch = ""
) -> dict[str, Any]:
    given = _changes(body, not_null=("published",))
    access.check_write(given)
    reply = await _stub(request).UpdateKbArticle(
        pb.UpdateKbArticleRequest(
            article_id=article_id,
            article=_fill(pb.KbArticleInput(), given),  # type: ignore[arg-type]
            update_mask=_mask(given),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = to_json(reply.article)
    await access.audit_write(article_id, to_json(reply.previous), result)
    return with_etag(response, access.present(result))
