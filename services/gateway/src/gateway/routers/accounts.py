"""Accounts context over REST: accounts, contacts, the public pool, transfer, merge, activities,
tasks, reminder rules, segments and the composed 360° view (custom field definitions: routers/
custom_fields.py). Permissions come only from `require(...)`/`Access` (gateway.security)."""

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

import grpc
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import accounts_service_pb2 as pb
from crm.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_service_pb2
from crm.sales.v1.sales_service_pb2_grpc import SalesServiceStub
from crm.servicedesk.v1 import servicedesk_service_pb2
from crm.servicedesk.v1.servicedesk_service_pb2_grpc import ServiceDeskServiceStub
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.timeutil import as_utc, from_timestamp, isoformat, to_timestamp
from fastapi import Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from pydantic import BaseModel, Field

from gateway.conventions import (
    IF_MATCH_HEADER,
    FigureIn,
    IdempotencyKey,
    MoneyOut,
    before_write,
    expected_version,
    with_etag,
)
from gateway.errors import http_status_of
from gateway.inputs import Instant, NonBlank, OptionalId, RequestBody, check_same_as_path, comma_separated_choices
from gateway.routers import sales_schemas
from gateway.routers.custom_fields import (
    CUSTOM_FILTER_PARAMETERS,
    check_custom_filters,
    custom_filters,
    presenter,
    readable_custom_keys,
)
from gateway.routers.sales import contract_dict, opportunity_dict, receivables_view
from gateway.routers.service_desk import OPEN_STATUSES as OPEN_TICKET_STATUSES
from gateway.routers.service_desk import ticket_presenter
from gateway.routers.service_desk import to_json as ticket_json
from gateway.routing import ResourceRouter
from gateway.security import Access, FilterFields, require
from gateway.security.masking import mask_value
from gateway.security.policy import FieldRule
from gateway.security.problems import SecurityProblem, forbidden
from gateway.upstreams import UpstreamNotConfigured, Upstreams

router = ResourceRouter(tags=["accounts"])

# Parts of the 360° view read at most this many records each.
VIEW_LIMIT = 20


# --- request models ----------------------------------------------------------------------------------


# Lengths as the accounts service stores them: ids of accounts, contacts and rules in VARCHAR(36),
# users and teams in VARCHAR(100), tags of at most 64 characters (accounts.domain.MAX_TAG_LENGTH),
# names of at most 300 (MAX_NAME); the other text is TEXT, limited here to what such a field holds
# (a region at most 100: the service desk keeps an account's region in a VARCHAR(100)). Ids, owners,
# teams and regions are `OptionalId`: "" is none (the caller's own, the account's, no parent); only
# spaces would be a record owned by nobody, in a team or region nobody sees.
Tag = Annotated[str, Field(max_length=64)]
FilterValue = Annotated[str, Field(max_length=200)]


class AccountIn(RequestBody):
    name: str | None = Field(default=None, max_length=300)
    industry: str | None = Field(default=None, max_length=200)
    size: str | None = Field(default=None, max_length=100)
    annual_revenue: FigureIn | None = None
    region: OptionalId = Field(default=None, max_length=100)
    address: str | None = Field(default=None, max_length=1000)
    website: str | None = Field(default=None, max_length=2000)
    tier: str | None = Field(default=None, max_length=1)
    lifecycle: str | None = Field(default=None, max_length=20)
    owner_id: OptionalId = Field(default=None, max_length=100)
    team: OptionalId = Field(default=None, max_length=100)
    tags: list[Tag] | None = None
    custom: dict[str, Any] | None = None
    parent_id: OptionalId = Field(default=None, max_length=36)
    credit_limit: FigureIn | None = None


class AccountCreate(AccountIn):
    name: NonBlank = Field(max_length=300)
    in_pool: bool = False


class ContactIn(RequestBody):
    account_id: OptionalId = Field(default=None, max_length=36)
    name: str | None = Field(default=None, max_length=300)
    title: str | None = Field(default=None, max_length=200)
    department: str | None = Field(default=None, max_length=200)
    phone: str | None = Field(default=None, max_length=64)
    mobile: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=254)
    wechat: str | None = Field(default=None, max_length=100)
    decision_role: str | None = Field(default=None, max_length=20)
    is_primary: bool | None = None
    tags: list[Tag] | None = None
    custom: dict[str, Any] | None = None


class ContactCreate(ContactIn):
    name: NonBlank = Field(max_length=300)


class MergeIn(RequestBody):
    duplicate_id: NonBlank = Field(max_length=36)


class ReleaseIn(RequestBody):
    reason: str = Field(default="", max_length=2000)


class TransferIn(RequestBody):
    new_owner_id: NonBlank = Field(max_length=100)
    new_team: OptionalId = Field(default=None, max_length=100)
    reason: str = Field(default="", max_length=2000)


class BulkTransferIn(RequestBody):
    from_owner_id: NonBlank = Field(max_length=100)
    to_owner_id: NonBlank = Field(max_length=100)
    to_team: OptionalId = Field(default=None, max_length=100)
    reason: str = Field(default="", max_length=2000)


# What an activity says happened, as logged and as corrected.
ActivityKind = Annotated[NonBlank, Field(max_length=20)]
ActivitySubject = Annotated[str, Field(max_length=500)]
ActivityNotes = Annotated[str, Field(max_length=20_000)]
ActivityOutcome = Annotated[str, Field(max_length=200, description="what came of it")]
FollowUpAt = Annotated[Instant, Field(description="plans the author's follow-up task on the account then")]


class ActivityIn(RequestBody):
    kind: ActivityKind
    subject: ActivitySubject = ""
    notes: ActivityNotes = ""
    contact_id: OptionalId = Field(default=None, max_length=36)
    occurred_at: Instant | None = None
    outcome: ActivityOutcome = ""
    next_follow_up_at: FollowUpAt | None = None


class ActivityPatch(RequestBody):
    """What an activity says happened, corrected: the fields sent are written, checked as when it
    was logged. Its account, contact and who logged it stay."""

    kind: ActivityKind | None = None
    subject: ActivitySubject | None = None
    notes: ActivityNotes | None = None
    occurred_at: Instant | None = None
    outcome: ActivityOutcome | None = None
    next_follow_up_at: FollowUpAt | None = Field(
        default=None, description="its follow-up task moves there; null cancels it"
    )


class TaskIn(RequestBody):
    title: str | None = Field(default=None, max_length=500)
    description: str | None = Field(default=None, max_length=20_000)
    account_id: OptionalId = Field(default=None, max_length=36)
    contact_id: OptionalId = Field(default=None, max_length=36)
    due_at: Instant | None = None
    owner_id: OptionalId = Field(default=None, max_length=100)


class TaskCreate(TaskIn):
    title: NonBlank = Field(max_length=500)


class ReminderRuleIn(RequestBody):
    name: NonBlank = Field(max_length=200)
    tiers: list[Annotated[str, Field(max_length=1)]] = Field(default_factory=list)
    inactive_days: int = Field(ge=1, le=3650)
    task_title: str = Field(default="", max_length=500)
    due_in_hours: int = Field(default=24, ge=0, le=8760)
    enabled: bool = True


class SegmentIn(RequestBody):
    name: NonBlank = Field(max_length=200)
    entity: Literal["account"] = "account"
    # Keys are the account list's filters (checked by the route); values as long as `?q=` takes.
    filters: dict[str, FilterValue | list[FilterValue]] = Field(default_factory=dict)
    shared_with_team: bool = False


class SegmentPatch(RequestBody):
    """The fields of a segment a PATCH may change: those sent are written (`filters` replaces them all)."""

    name: NonBlank | None = Field(default=None, max_length=200)
    filters: dict[str, FilterValue | list[FilterValue]] | None = None
    shared_with_team: bool | None = None


# --- response models (every field but the id is optional: hidden fields are left out) -------------------


class AccountOut(BaseModel):
    id: str
    name: str | None = None
    industry: str | None = None
    size: str | None = None
    annual_revenue: MoneyOut | None = None
    region: str | None = None
    address: str | None = None
    website: str | None = None
    tier: str | None = None
    lifecycle: str | None = None
    owner_id: str | None = None
    team: str | None = None
    tags: list[str] | None = None
    custom: dict[str, Any] | None = None
    parent_id: str | None = None
    credit_limit: MoneyOut | None = None
    in_pool: bool | None = None
    last_activity_at: str | None = None
    released_at: str | None = None
    claimed_at: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    merged_into_id: str | None = None
    version: int | None = None


class ContactOut(BaseModel):
    id: str
    account_id: str | None = None
    name: str | None = None
    title: str | None = None
    department: str | None = None
    phone: str | None = None
    mobile: str | None = None
    email: str | None = None
    wechat: str | None = None
    decision_role: str | None = None
    is_primary: bool | None = None
    owner_id: str | None = None
    team: str | None = None
    region: str | None = None
    tags: list[str] | None = None
    custom: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    version: int | None = None


class ActivityOut(BaseModel):
    id: str
    account_id: str | None = None
    contact_id: str | None = None
    kind: str | None = None
    subject: str | None = None
    notes: str | None = None
    actor_id: str | None = None
    occurred_at: str | None = None
    outcome: str | None = None
    next_follow_up_at: str | None = None
    version: int | None = None


class TaskOut(BaseModel):
    id: str
    title: str | None = None
    description: str | None = None
    account_id: str | None = None
    contact_id: str | None = None
    due_at: str | None = None
    status: str | None = None
    owner_id: str | None = None
    team: str | None = None
    region: str | None = None
    source: str | None = None
    reminder_rule_id: str | None = None
    created_at: str | None = None
    completed_at: str | None = None
    version: int | None = None


class SegmentOut(BaseModel):
    id: str
    name: str | None = None
    entity: str | None = None
    filters: dict[str, Any] | None = None
    shared_with_team: bool | None = None
    owner_id: str | None = None
    team: str | None = None
    created_at: str | None = None
    version: int | None = None


class ReminderRuleOut(BaseModel):
    id: str
    name: str
    tiers: list[str]
    inactive_days: int
    task_title: str
    due_in_hours: int
    enabled: bool
    created_at: str | None = None


class AccountPage(BaseModel):
    items: list[AccountOut]
    next_cursor: str | None


class ContactPage(BaseModel):
    items: list[ContactOut]
    next_cursor: str | None


class ActivityPage(BaseModel):
    items: list[ActivityOut]
    next_cursor: str | None


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class SegmentPage(BaseModel):
    items: list[SegmentOut]
    next_cursor: str | None


class ReminderRulePage(BaseModel):
    items: list[ReminderRuleOut]
    next_cursor: str | None


class MergeOut(BaseModel):
    survivor: AccountOut
    duplicate_id: str
    moved_contact_ids: list[str]
    moved_activities: int
    moved_tasks: int


class BulkTransferOut(BaseModel):
    bulk_transfer_id: str
    accounts_transferred: int
    contacts_transferred: int
    tasks_transferred: int


class PartStatus(BaseModel):
    """One part of the 360° view: `ok` with its records, or `forbidden` / `unavailable` / `error`."""

    model_config = {"extra": "allow"}
    status: Literal["ok", "forbidden", "unavailable", "error"]
    detail: str | None = None


class ViewPart(PartStatus):
    items: list[dict[str, Any]] | None = None


class OpenOpportunities(PartStatus):
    items: list[sales_schemas.Opportunity] | None = Field(default=None, description="as GET /opportunities shows them")


# Totals over all the account's contracts, as GET /receivables answers them (`account_*`, `lifetime_value`).
ContractTotals = Annotated[
    list[MoneyOut] | None,
    Field(default=None, description="per currency; left out when the caller may not see contracts' amount"),
]


class ContractsAndReceivables(PartStatus):
    items: list[sales_schemas.Contract] | None = Field(default=None, description="as GET /contracts shows them")
    receivables: list[sales_schemas.Receivable] | None = Field(
        default=None, description="as GET /receivables shows them"
    )
    total_outstanding: ContractTotals
    total_overdue: ContractTotals
    lifetime_value: ContractTotals


class Account360(BaseModel):
    account: AccountOut
    contacts: ViewPart
    open_opportunities: OpenOpportunities
    contracts_and_receivables: ContractsAndReceivables
    open_tickets: ViewPart
    recent_activities: ViewPart


# --- helpers -----------------------------------------------------------------------------------------


def _upstreams(request: Request) -> Upstreams:
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams


def _stub(request: Request) -> AccountsServiceStub:
    return _upstreams(request).stub("accounts", AccountsServiceStub)


def _money(message: common_pb2.Money, present: bool) -> dict[str, str] | None:
    return {"amount": message.amount, "currency": message.currency} if present else None


def _time(message: Message, name: str) -> str | None:
    return isoformat(from_timestamp(getattr(message, name))) if message.HasField(name) else None


def _struct(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def account_dict(a: accounts_pb2.Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "industry": a.industry,
        "size": a.size,
        "annual_revenue": _money(a.annual_revenue, a.HasField("annual_revenue")),
        "region": a.region,
        "address": a.address,
        "website": a.website,
        "tier": a.tier,
        "lifecycle": a.lifecycle,
        "owner_id": a.owner_id,
        "team": a.team,
        "tags": list(a.tags),
        "custom": _struct(a.custom),
        "parent_id": a.parent_id or None,
        "credit_limit": _money(a.credit_limit, a.HasField("credit_limit")),
        "in_pool": a.in_pool,
        "last_activity_at": _time(a, "last_activity_at"),
        "released_at": _time(a, "released_at"),
        "claimed_at": _time(a, "claimed_at"),
        "created_at": _time(a, "created_at"),
        "updated_at": _time(a, "updated_at"),
        "merged_into_id": a.merged_into_id or None,
        "version": a.version,
    }


def contact_dict(c: accounts_pb2.Contact) -> dict[str, Any]:
    return {
        "id": c.id,
        "account_id": c.account_id,
        "name": c.name,
        "title": c.title,
        "department": c.department,
        "phone": c.phone,
        "mobile": c.mobile,
        "email": c.email,
        "wechat": c.wechat,
        "decision_role": c.decision_role,
        "is_primary": c.is_primary,
        "owner_id": c.owner_id,
        "team": c.team,
        "region": c.region,
        "tags": list(c.tags),
        "custom": _struct(c.custom),
        "created_at": _time(c, "created_at"),
        "updated_at": _time(c, "updated_at"),
        "version": c.version,
    }


def activity_dict(a: accounts_pb2.Activity) -> dict[str, Any]:
    return {
        "id": a.id,
        "account_id": a.account_id,
        "contact_id": a.contact_id or None,
        "kind": a.kind,
        "subject": a.subject,
        "notes": a.notes,
        "actor_id": a.actor_id,
        "occurred_at": _time(a, "occurred_at"),
        "outcome": a.outcome,
        "next_follow_up_at": _time(a, "next_follow_up_at"),
        "version": a.version,
    }


def task_dict(t: accounts_pb2.Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "title": t.title,
        "description": t.notes,
        "account_id": t.account_id or None,
        "contact_id": t.contact_id or None,
        "due_at": _time(t, "due_at"),
        "status": t.status,
        "owner_id": t.owner_id,
        "team": t.team,
        "region": t.region,
        "source": t.source,
        "reminder_rule_id": t.reminder_rule_id or None,
        "created_at": _time(t, "created_at"),
        "completed_at": _time(t, "completed_at"),
        "version": t.version,
    }


def segment_dict(s: accounts_pb2.Segment) -> dict[str, Any]:
    filters: dict[str, Any] = dict(s.filters)
    if s.tags:
        filters["tag"] = list(s.tags)
    return {
        "id": s.id,
        "name": s.name,
        "entity": "account",
        "filters": filters,
        "shared_with_team": s.visibility == "team",
        "owner_id": s.owner_id,
        "team": s.team,
        "created_at": _time(s, "created_at"),
        "version": s.version,
    }


def _page(limit: int | None, cursor: str | None, sort: str | None, access: Access) -> common_pb2.PageRequest:
    if sort:
        access.check_filter([sort])
    return common_pb2.PageRequest(limit=access.page_limit(limit), cursor=cursor or "", sort=sort or "")


def _list_body(items: list[dict[str, Any]], next_cursor: str) -> dict[str, Any]:
    return {"items": items, "next_cursor": next_cursor or None}


def _activity_input(values: dict[str, Any]) -> accounts_pb2.Activity:
    message = accounts_pb2.Activity()
    for key, value in values.items():
        if value is None:
            continue
        if key in ("occurred_at", "next_follow_up_at"):
            _set_instant(message, key, value)
        else:
            setattr(message, key, value)
    return message


def _mask_paths(values: dict[str, Any]) -> list[str]:
    paths: list[str] = []
    for key, value in values.items():
        if key == "custom" and isinstance(value, dict):
            paths.extend(f"custom.{name}" for name in value)
        else:
            paths.append(key)
    return paths


def _account_input(values: dict[str, Any]) -> pb.AccountInput:
    message = pb.AccountInput()
    for key, value in values.items():
        if value is None:
            continue
        if key in ("annual_revenue", "credit_limit"):
            getattr(message, key).CopyFrom(FigureIn(**value).proto())
        elif key == "custom":
            message.custom.update(value)
        elif key == "tags":
            message.tags.extend(value)
        else:
            setattr(message, key, value)
    return message


def _contact_input(values: dict[str, Any]) -> pb.ContactInput:
    message = pb.ContactInput()
    for key, value in values.items():
        if value is None:
            continue
        if key == "custom":
            message.custom.update(value)
        elif key == "tags":
            message.tags.extend(value)
        else:
            setattr(message, key, value)
    return message


def _set_instant(message: Message, name: str, value: datetime) -> None:
    stamp = to_timestamp(as_utc(value))
    assert stamp is not None
    getattr(message, name).CopyFrom(stamp)


def _task_input(values: dict[str, Any]) -> pb.TaskInput:
    message = pb.TaskInput()
    for key, value in values.items():
        if value is None:
            continue
        if key == "due_at":
            _set_instant(message, "due_at", value)
        elif key == "description":
            message.notes = value
        else:
            setattr(message, key, value)
    return message


# The accounts field each account list filter reads: the query parameters of GET /accounts and the
# filters a saved segment stores (`custom.<key>`: routers/custom_fields.check_custom_filters).
# The filters of GET /accounts (and of the accounts export, and saved in segments): query parameter
# -> the field it filters by. `segment_id` applies a segment, whose own filters are checked.
ACCOUNT_FILTER_FIELDS: dict[str, str] = {
    "q": "name",
    "tier": "tier",
    "lifecycle": "lifecycle",
    "region": "region",
    "industry": "industry",
    "owner_id": "owner_id",
    "team": "team",
    "tag": "tags",
    "parent_id": "parent_id",
    "in_pool": "in_pool",
    "created_after": "created_at",
}
POOL_FILTER_FIELDS: FilterFields = {
    name: ACCOUNT_FILTER_FIELDS[name] for name in ("q", "tier", "region", "industry", "tag")
}
CONTACT_FILTER_FIELDS: FilterFields = {
    "account_id": "account_id",
    "q": "name",
    "tag": "tags",
    "decision_role": "decision_role",
    "owner_id": "owner_id",
}


# --- accounts ----------------------------------------------------------------------------------------

AccountsRead = Annotated[Access, Depends(require("accounts", "read"))]
AccountsCreate = Annotated[Access, Depends(require("accounts", "create"))]
AccountsUpdate = Annotated[Access, Depends(require("accounts", "update"))]
AccountsDelete = Annotated[Access, Depends(require("accounts", "delete"))]
AccountsAssign = Annotated[Access, Depends(require("accounts", "assign"))]
IfMatch = Annotated[str | None, IF_MATCH_HEADER]
CSV = Annotated[list[str] | None, Query()]
DecisionRoles = Annotated[
    list[Annotated[str, comma_separated_choices("decision_maker", "influencer", "user", "gatekeeper")]] | None, Query()
]
# The accounts service's values (`accounts.domain.TIERS`, `LIFECYCLES`).
TierFilter = Annotated[
    list[Annotated[str, comma_separated_choices("A", "B", "C", "D")]] | None,
    Query(description="A, B, C or D; several comma-separated or repeated (either)"),
]
LifecycleFilter = Annotated[
    list[Annotated[str, comma_separated_choices("prospect", "customer", "churned")]] | None,
    Query(description="prospect, customer or churned; several comma-separated or repeated (either)"),
]


@router.post("/accounts", status_code=201, response_model=AccountOut, response_model_exclude_unset=True)
async def create_account(
    body: AccountCreate,
    request: Request,
    response: Response,
    access: AccountsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    values = body.model_dump(exclude_none=True, exclude={"in_pool"})
    access.check_write(values)
    reply = await _stub(request).CreateAccount(
        pb.CreateAccountRequest(account=_account_input(values), idempotency_key=idempotency_key, in_pool=body.in_pool),
        metadata=access.grpc_metadata(),
    )
    record = account_dict(reply.account)
    await access.audit_write(record["id"], None, record)
    present = await presenter(access)
    return with_etag(response, present(record))


@router.get(
    "/accounts", response_model=AccountPage, response_model_exclude_unset=True, openapi_extra=CUSTOM_FILTER_PARAMETERS
)
async def list_accounts(
    request: Request,
    access: AccountsRead,
    q: Annotated[str | None, Query(max_length=200, description="name contains")] = None,
    tier: TierFilter = None,
    lifecycle: LifecycleFilter = None,
    region: CSV = None,
    industry: CSV = None,
    owner_id: Annotated[str | None, Query(description='"me" for the caller')] = None,
    team: str | None = None,
    tag: Annotated[list[str] | None, Query(description="every tag must be present")] = None,
    parent_id: str | None = None,
    in_pool: bool | None = None,
    created_after: Instant | None = None,
    segment_id: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: Annotated[str | None, Query(description="created_at, name, updated_at; - for descending")] = None,
) -> dict[str, Any]:
    access.check_filters(ACCOUNT_FILTER_FIELDS)
    custom = await custom_filters(access)
    if segment_id:
        await check_saved_segment(access, segment_id)
    request_message = pb.ListAccountsRequest(
        page=_page(limit, cursor, sort, access),
        q=q or "",
        tiers=_split(tier),
        lifecycles=_split(lifecycle),
        regions=_split(region),
        industries=_split(industry),
        owner_id=access.resolve_me(owner_id),
        team=team or "",
        tags=tag or [],
        parent_id=parent_id or "",
        in_pool="" if in_pool is None else str(in_pool).lower(),
        custom=custom,
        segment_id=segment_id or "",
    )
    if created_after is not None:
        stamp = to_timestamp(as_utc(created_after))
        assert stamp is not None
        request_message.created_after.CopyFrom(stamp)
    reply = await _stub(request).ListAccounts(request_message, metadata=access.grpc_metadata())
    present = await presenter(access)
    return _list_body([present(account_dict(a)) for a in reply.items], reply.page_info.next_cursor)


def _split(values: list[str] | None) -> list[str]:
    """`?tier=A,B` and `?tier=A&tier=B` both work."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@router.get(
    "/accounts/{account_id}",
    response_model=AccountOut,
    response_model_exclude_unset=True,
    responses={301: {"description": "merged into another account: `merged_into_id` and `Location` name the survivor"}},
)
async def get_account(account_id: str, request: Request, response: Response, access: AccountsRead) -> Any:
    reply = await _stub(request).GetAccount(
        pb.GetAccountRequest(account_id=account_id), metadata=access.grpc_metadata()
    )
    if reply.account.merged_into_id:
        survivor = reply.account.merged_into_id
        return JSONResponse(
            {
                "id": account_id,
                "merged_into_id": survivor,
                "detail": f"account {account_id} was merged into {survivor}",
            },
            status_code=301,
            headers={"Location": f"{request.scope.get('root_path', '')}/api/v1/accounts/{survivor}"},
        )
    present = await presenter(access)
    return with_etag(response, present(account_dict(reply.account)))


@router.patch("/accounts/{account_id}", response_model=AccountOut, response_model_exclude_unset=True)
async def update_account(
    account_id: str,
    body: AccountIn,
    request: Request,
    response: Response,
    access: AccountsUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    values = body.model_dump(exclude_unset=True)
    access.check_write(values)
    reply = await _stub(request).UpdateAccount(
        pb.UpdateAccountRequest(
            account_id=account_id,
            account=_account_input(values),
            update_mask=field_mask_pb2.FieldMask(paths=_mask_paths(values)),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    record = account_dict(reply.account)
    await access.audit_write(account_id, before_write(reply, account_dict, record), record)
    present = await presenter(access)
    return with_etag(response, present(record))


@router.delete("/accounts/{account_id}", status_code=204)
async def delete_account(
    account_id: str, request: Request, access: AccountsDelete, if_match: IfMatch = None
) -> Response:
    reply = await _stub(request).DeleteAccount(
        pb.DeleteAccountRequest(account_id=account_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(account_id, account_dict(reply.previous), None)
    return Response(status_code=204)


@router.post("/accounts/{account_id}/merge", response_model=MergeOut, response_model_exclude_unset=True)
async def merge_accounts(
    account_id: str, body: MergeIn, request: Request, access: AccountsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    # A survivor the caller may not read is a 404, a duplicate a 422 naming `duplicate_id` (the service's).
    reply = await _stub(request).MergeAccounts(
        pb.MergeAccountsRequest(
            survivor_id=account_id, duplicate_id=body.duplicate_id, idempotency_key=idempotency_key
        ),
        metadata=access.grpc_metadata(),
    )
    survivor = account_dict(reply.survivor)
    # Both as the service read them under their row locks in the merge's transaction; unset in a repeat
    # of the idempotency key, which merged nothing and is audited as a replay (whatever `before` says).
    survivor_before = account_dict(reply.previous_survivor) if reply.HasField("previous_survivor") else survivor
    duplicate_before = account_dict(reply.previous_duplicate)
    await access.audit_write(
        account_id, survivor_before, survivor, action="merge", reason=f"merged {body.duplicate_id}"
    )
    # The duplicate lives on only as a pointer to the survivor: audited like a delete.
    await access.audit_write(
        body.duplicate_id, duplicate_before, None, action="merge", reason=f"merged into {account_id}"
    )
    present = await presenter(access)
    return {
        "survivor": present(survivor),
        "duplicate_id": body.duplicate_id,
        "moved_contact_ids": list(reply.moved_contact_ids),
        "moved_activities": reply.moved_activities,
        "moved_tasks": reply.moved_tasks,
    }


# --- public pool and ownership ---------------------------------------------------------------------------


@router.get("/account-pool", response_model=AccountPage, response_model_exclude_unset=True)
async def list_pool(
    request: Request,
    access: AccountsRead,
    q: Annotated[str | None, Query(max_length=200)] = None,
    tier: TierFilter = None,
    region: CSV = None,
    industry: CSV = None,
    tag: Annotated[list[str] | None, Query()] = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: str | None = None,
) -> dict[str, Any]:
    access.check_filters(POOL_FILTER_FIELDS)
    reply = await _stub(request).ListPoolAccounts(
        pb.ListPoolAccountsRequest(
            page=_page(limit, cursor, sort, access),
            q=q or "",
            tiers=_split(tier),
            regions=_split(region),
            industries=_split(industry),
            tags=tag or [],
        ),
        metadata=access.grpc_metadata(),
    )
    present = await presenter(access)
    return _list_body([present(account_dict(a)) for a in reply.items], reply.page_info.next_cursor)


# Claim and release are a rep's own work on their book (update); moving records between
# owners is `assign` (managers).
@router.post("/accounts/{account_id}/claim", response_model=AccountOut, response_model_exclude_unset=True)
async def claim_account(
    account_id: str,
    request: Request,
    response: Response,
    access: AccountsUpdate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    reply = await _stub(request).ClaimAccount(
        pb.ClaimAccountRequest(account_id=account_id, idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    record = account_dict(reply.account)
    await access.audit_write(account_id, before_write(reply, account_dict, record), record, action="claim")
    present = await presenter(access)
    return with_etag(response, present(record))


@router.post("/accounts/{account_id}/release", response_model=AccountOut, response_model_exclude_unset=True)
async def release_account(
    account_id: str,
    request: Request,
    response: Response,
    access: AccountsUpdate,
    body: ReleaseIn | None = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    reason = body.reason if body else ""
    reply = await _stub(request).ReleaseAccount(
        pb.ReleaseAccountRequest(account_id=account_id, reason=reason, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    record = account_dict(reply.account)
    await access.audit_write(
        account_id, before_write(reply, account_dict, record), record, action="release", reason=reason
    )
    present = await presenter(access)
    return with_etag(response, present(record))


@router.post("/accounts/{account_id}/transfer", response_model=AccountOut, response_model_exclude_unset=True)
async def transfer_account(
    account_id: str,
    body: TransferIn,
    request: Request,
    response: Response,
    access: AccountsAssign,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    access.check_write(["owner_id", "team"] if body.new_team else ["owner_id"])
    reply = await _stub(request).TransferAccount(
        pb.TransferAccountRequest(
            account_id=account_id,
            new_owner_id=body.new_owner_id,
            new_team=body.new_team or "",
            reason=body.reason,
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    record = account_dict(reply.account)
    await access.audit_write(
        account_id, before_write(reply, account_dict, record), record, action="transfer", reason=body.reason
    )
    present = await presenter(access)
    return with_etag(response, present(record))


@router.post("/accounts:transfer", response_model=BulkTransferOut, response_model_exclude_unset=True)
async def bulk_transfer(
    body: BulkTransferIn, request: Request, access: AccountsAssign, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    # A `to_team` moves the accounts into that team: the caller must be able to write it, as on a
    # single transfer's `new_team`.
    access.check_write(["owner_id", "team"] if body.to_team else ["owner_id"])
    reply = await _stub(request).BulkTransferAccounts(
        pb.BulkTransferAccountsRequest(
            from_owner_id=body.from_owner_id,
            to_owner_id=body.to_owner_id,
            to_team=body.to_team or "",
            reason=body.reason,
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    await access.audit_bulk_transfer(
        reply.bulk_transfer_id,
        body.from_owner_id,
        body.to_owner_id,
        body.reason,
        reply.account_ids,
        to_team=body.to_team or "",
    )
    return {
        "bulk_transfer_id": reply.bulk_transfer_id,
        "accounts_transferred": reply.accounts_transferred,
        "contacts_transferred": reply.contacts_transferred,
        "tasks_transferred": reply.tasks_transferred,
    }


# --- contacts --------------------------------------------------------------------------------------------

ContactsRead = Annotated[Access, Depends(require("contacts", "read"))]
ContactsCreate = Annotated[Access, Depends(require("contacts", "create"))]
ContactsUpdate = Annotated[Access, Depends(require("contacts", "update"))]
ContactsDelete = Annotated[Access, Depends(require("contacts", "delete"))]


async def _create_contact(
    values: dict[str, Any], request: Request, response: Response, access: Access, idempotency_key: str
) -> dict[str, Any]:
    access.check_write(values)
    reply = await _stub(request).CreateContact(
        pb.CreateContactRequest(contact=_contact_input(values), idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    record = contact_dict(reply.contact)
    await access.audit_write(record["id"], None, record)
    present = await presenter(access)
    return with_etag(response, present(record))


@router.post("/contacts", status_code=201, response_model=ContactOut, response_model_exclude_unset=True)
async def create_contact(
    body: ContactCreate,
    request: Request,
    response: Response,
    access: ContactsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    return await _create_contact(body.model_dump(exclude_none=True), request, response, access, idempotency_key)


@router.post(
    "/accounts/{account_id}/contacts", status_code=201, response_model=ContactOut, response_model_exclude_unset=True
)
async def create_account_contact(
    account_id: str,
    body: ContactCreate,
    request: Request,
    response: Response,
    access: ContactsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    check_same_as_path("account_id", body.account_id, account_id)
    values = {**body.model_dump(exclude_none=True), "account_id": account_id}
    try:
        return await _create_contact(values, request, response, access, idempotency_key)
    except grpc.aio.AioRpcError as error:
        # The service refuses an account_id it cannot find (or the caller cannot see) as the body's
        # field (422); here the path addresses the account, and a path's record not found is a 404.
        remote = from_rpc_error(error)
        if remote.code == grpc.StatusCode.INVALID_ARGUMENT and [e.field for e in remote.field_errors] == ["account_id"]:
            raise HTTPException(404, f"account {account_id} not found") from None
        raise


async def _list_contacts(
    request: Request,
    access: Access,
    *,
    account_id: str,
    q: str | None,
    tag: list[str] | None,
    decision_role: list[str] | None,
    owner_id: str | None,
    limit: int | None,
    cursor: str | None,
    sort: str | None,
    scopes_along: tuple[Access, ...] = (),
) -> dict[str, Any]:
    """`scopes_along`: the caller's access to other resources whose scope goes along to the service
    (`Access.grpc_metadata`)."""
    access.check_filters(CONTACT_FILTER_FIELDS)
    reply = await _stub(request).ListContacts(
        pb.ListContactsRequest(
            page=_page(limit, cursor, sort, access),
            account_id=account_id,
            q=q or "",
            tags=tag or [],
            decision_roles=_split(decision_role),
            owner_id=access.resolve_me(owner_id),
            custom=await custom_filters(access),
        ),
        metadata=access.grpc_metadata(*scopes_along),
    )
    present = await presenter(access)
    return _list_body([present(contact_dict(c)) for c in reply.items], reply.page_info.next_cursor)


@router.get(
    "/contacts", response_model=ContactPage, response_model_exclude_unset=True, openapi_extra=CUSTOM_FILTER_PARAMETERS
)
async def list_contacts(
    request: Request,
    access: ContactsRead,
    account_id: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[list[str] | None, Query()] = None,
    decision_role: DecisionRoles = None,
    owner_id: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: str | None = None,
) -> dict[str, Any]:
    return await _list_contacts(
        request,
        access,
        account_id=account_id or "",
        q=q,
        tag=tag,
        decision_role=decision_role,
        owner_id=owner_id,
        limit=limit,
        cursor=cursor,
        sort=sort,
    )


@router.get(
    "/accounts/{account_id}/contacts",
    response_model=ContactPage,
    response_model_exclude_unset=True,
    openapi_extra=CUSTOM_FILTER_PARAMETERS,
)
async def list_account_contacts(
    account_id: str,
    request: Request,
    access: ContactsRead,
    q: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[list[str] | None, Query()] = None,
    decision_role: DecisionRoles = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: str | None = None,
) -> dict[str, Any]:
    """The contacts of an account the caller may read (404 otherwise, as its timeline answers): their
    scope for accounts goes along, and the accounts service checks the account in it in the same call."""
    return await _list_contacts(
        request,
        access,
        account_id=account_id,
        q=q,
        tag=tag,
        decision_role=decision_role,
        owner_id=None,
        limit=limit,
        cursor=cursor,
        sort=sort,
        scopes_along=(access.require_view("accounts"),),
    )


@router.get("/contacts/{contact_id}", response_model=ContactOut, response_model_exclude_unset=True)
async def get_contact(contact_id: str, request: Request, response: Response, access: ContactsRead) -> dict[str, Any]:
    reply = await _stub(request).GetContact(
        pb.GetContactRequest(contact_id=contact_id), metadata=access.grpc_metadata()
    )
    present = await presenter(access)
    return with_etag(response, present(contact_dict(reply.contact)))


@router.patch("/contacts/{contact_id}", response_model=ContactOut, response_model_exclude_unset=True)
async def update_contact(
    contact_id: str,
    body: ContactIn,
    request: Request,
    response: Response,
    access: ContactsUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    values = body.model_dump(exclude_unset=True)
    access.check_write(values)
    reply = await _stub(request).UpdateContact(
        pb.UpdateContactRequest(
            contact_id=contact_id,
            contact=_contact_input(values),
            update_mask=field_mask_pb2.FieldMask(paths=_mask_paths(values)),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    record = contact_dict(reply.contact)
    # As the service read it under its row lock in the write's transaction.
    await access.audit_write(contact_id, contact_dict(reply.previous), record)
    present = await presenter(access)
    return with_etag(response, present(record))


@router.delete("/contacts/{contact_id}", status_code=204)
async def delete_contact(
    contact_id: str, request: Request, access: ContactsDelete, if_match: IfMatch = None
) -> Response:
    reply = await _stub(request).DeleteContact(
        pb.DeleteContactRequest(contact_id=contact_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(contact_id, contact_dict(reply.previous), None)
    return Response(status_code=204)


# --- activities and tasks --------------------------------------------------------------------------------

TasksRead = Annotated[Access, Depends(require("tasks", "read"))]
TasksCreate = Annotated[Access, Depends(require("tasks", "create"))]
TasksUpdate = Annotated[Access, Depends(require("tasks", "update"))]
# Reminder rules are team-wide configuration: only roles that may delete tasks (managers) manage them.
TasksManage = Annotated[Access, Depends(require("tasks", "delete"))]
ActivitiesUpdate = Annotated[Access, Depends(require("activities", "update"))]
ActivitiesDelete = Annotated[Access, Depends(require("activities", "delete"))]


@router.post(
    "/accounts/{account_id}/activities", status_code=201, response_model=ActivityOut, response_model_exclude_unset=True
)
async def log_activity(
    account_id: str,
    body: ActivityIn,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("activities", "create"))],
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    access.check_write(body.model_dump(exclude_unset=True))
    message = pb.LogActivityRequest(
        account_id=account_id,
        contact_id=body.contact_id or "",
        kind=body.kind,
        subject=body.subject,
        notes=body.notes,
        idempotency_key=idempotency_key,
        outcome=body.outcome,
    )
    if body.occurred_at is not None:
        _set_instant(message, "occurred_at", body.occurred_at)
    if body.next_follow_up_at is not None:
        _set_instant(message, "next_follow_up_at", body.next_follow_up_at)
    # The account must be one the caller may read: the service checks it under the scope it is
    # sent, and a service agent, who owns only their own activities, visits accounts of their region.
    readable_accounts = access.require_view("accounts")
    reply = await _stub(request).LogActivity(message, metadata=readable_accounts.grpc_metadata())
    record = activity_dict(reply.activity)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


def _activity_write_metadata(access: Access) -> tuple[tuple[str, str | bytes], ...]:
    """A correction or deletion of an activity runs in the caller's scope for activities (who logged
    it owns it; it is in its account's team and region), on an account they may read as when
    logging one: their scope for accounts goes along for the service to check it."""
    return access.grpc_metadata(access.require_view("accounts"))


@router.patch(
    "/accounts/{account_id}/activities/{activity_id}", response_model=ActivityOut, response_model_exclude_unset=True
)
async def update_activity(
    account_id: str,
    activity_id: str,
    body: ActivityPatch,
    request: Request,
    response: Response,
    access: ActivitiesUpdate,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Corrects what an activity logged on the account says happened (404 when it is on another
    account or outside the caller's scope for activities: a rep corrects what they logged). A later
    `occurred_at` moves the account's `last_activity_at` forward; nothing moves it back."""
    values = body.model_dump(exclude_unset=True)
    access.check_write(values)
    reply = await _stub(request).UpdateActivity(
        pb.UpdateActivityRequest(
            account_id=account_id,
            activity_id=activity_id,
            activity=_activity_input(values),
            update_mask=field_mask_pb2.FieldMask(paths=list(values)),
            expected_version=expected_version(if_match),
        ),
        metadata=_activity_write_metadata(access),
    )
    record = activity_dict(reply.activity)
    await access.audit_write(activity_id, activity_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.delete("/accounts/{account_id}/activities/{activity_id}", status_code=204)
async def delete_activity(
    account_id: str, activity_id: str, request: Request, access: ActivitiesDelete, if_match: IfMatch = None
) -> Response:
    """An activity logged by mistake (404 as for a correction); the account's `last_activity_at` stays."""
    reply = await _stub(request).DeleteActivity(
        pb.DeleteActivityRequest(
            account_id=account_id, activity_id=activity_id, expected_version=expected_version(if_match)
        ),
        metadata=_activity_write_metadata(access),
    )
    await access.audit_write(activity_id, activity_dict(reply.activity), None)
    return Response(status_code=204)


@router.get("/accounts/{account_id}/activities", response_model=ActivityPage, response_model_exclude_unset=True)
async def list_activities(
    account_id: str,
    request: Request,
    access: Annotated[Access, Depends(require("activities", "read"))],
    contact_id: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    access.check_filters({"contact_id": "contact_id"})
    # The account must be one the caller may read (a timeline tells that it exists): their scope for
    # accounts goes along, and their scope for activities picks the entries.
    reply = await _stub(request).ListActivities(
        pb.ListActivitiesRequest(
            page=_page(limit, cursor, None, access), account_id=account_id, contact_id=contact_id or ""
        ),
        metadata=access.grpc_metadata(access.require_view("accounts")),
    )
    return _list_body(access.present_many(activity_dict(a) for a in reply.items), reply.page_info.next_cursor)


@router.get("/tasks", response_model=TaskPage, response_model_exclude_unset=True)
async def list_tasks(
    request: Request,
    access: TasksRead,
    due: Annotated[Literal["today", "overdue"] | None, Query(description="open tasks due today or overdue")] = None,
    account_id: str | None = None,
    owner_id: str | None = None,
    status: CSV = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: str | None = None,
) -> dict[str, Any]:
    access.check_filters({"due": "due_at", "account_id": "account_id", "owner_id": "owner_id", "status": "status"})
    reply = await _stub(request).ListTasks(
        pb.ListTasksRequest(
            page=_page(limit, cursor, sort, access),
            due=due or "",
            account_id=account_id or "",
            owner_id=access.resolve_me(owner_id),
            statuses=_split(status),
        ),
        metadata=access.grpc_metadata(),
    )
    return _list_body(access.present_many(task_dict(t) for t in reply.items), reply.page_info.next_cursor)


@router.post("/tasks", status_code=201, response_model=TaskOut, response_model_exclude_unset=True)
async def create_task(
    body: TaskCreate, request: Request, response: Response, access: TasksCreate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    values = body.model_dump(exclude_none=True)
    access.check_write(values)
    reply = await _stub(request).CreateTask(
        pb.CreateTaskRequest(task=_task_input(values), idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    record = task_dict(reply.task)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.patch("/tasks/{task_id}", response_model=TaskOut, response_model_exclude_unset=True)
async def update_task(
    task_id: str, body: TaskIn, request: Request, response: Response, access: TasksUpdate, if_match: IfMatch = None
) -> dict[str, Any]:
    values = body.model_dump(exclude_unset=True)
    access.check_write(values)
    paths = ["notes" if p == "description" else p for p in values]
    reply = await _stub(request).UpdateTask(
        pb.UpdateTaskRequest(
            task_id=task_id,
            task=_task_input(values),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    record = task_dict(reply.task)
    # As the service read it under its row lock (a service of an older release sends none).
    previous = task_dict(reply.previous) if reply.HasField("previous") else None
    await access.audit_write(task_id, previous, record, action="update")
    return with_etag(response, access.present(record))


@router.post("/tasks/{task_id}/complete", response_model=TaskOut, response_model_exclude_unset=True)
async def complete_task(
    task_id: str, request: Request, response: Response, access: TasksUpdate, if_match: IfMatch = None
) -> dict[str, Any]:
    reply = await _stub(request).CompleteTask(
        pb.CompleteTaskRequest(task_id=task_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit("complete", task_id, fields=["status"])
    return with_etag(response, access.present(task_dict(reply.task)))


@router.get("/reminder-rules", response_model=ReminderRulePage, response_model_exclude_unset=True)
async def list_reminder_rules(
    request: Request,
    access: TasksRead,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The reminder rules in the order they were created, one page at a time."""
    reply = await _stub(request).ListReminderRules(
        pb.ListReminderRulesRequest(page=_page(limit, cursor, None, access)), metadata=access.grpc_metadata()
    )
    return _list_body([_rule_dict(r) for r in reply.items], reply.page_info.next_cursor)


@router.post("/reminder-rules", status_code=201, response_model=ReminderRuleOut, response_model_exclude_unset=True)
async def create_reminder_rule(
    body: ReminderRuleIn, request: Request, access: TasksManage, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    rule = accounts_pb2.ReminderRule(
        name=body.name,
        tiers=body.tiers,
        inactive_days=body.inactive_days,
        task_title=body.task_title,
        due_in_hours=body.due_in_hours,
        enabled=body.enabled,
    )
    reply = await _stub(request).CreateReminderRule(
        pb.CreateReminderRuleRequest(rule=rule, idempotency_key=idempotency_key), metadata=access.grpc_metadata()
    )
    await access.audit("create_reminder_rule", reply.rule.id, fields=list(body.model_fields_set))
    return _rule_dict(reply.rule)


@router.delete("/reminder-rules/{rule_id}", status_code=204)
async def delete_reminder_rule(rule_id: str, request: Request, access: TasksManage) -> Response:
    await _stub(request).DeleteReminderRule(
        pb.DeleteReminderRuleRequest(rule_id=rule_id), metadata=access.grpc_metadata()
    )
    await access.audit("delete_reminder_rule", rule_id)
    return Response(status_code=204)


def _rule_dict(r: accounts_pb2.ReminderRule) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "tiers": list(r.tiers),
        "inactive_days": r.inactive_days,
        "task_title": r.task_title,
        "due_in_hours": r.due_in_hours,
        "enabled": r.enabled,
        "created_at": _time(r, "created_at"),
    }


# --- segments --------------------------------------------------------------------------------------------


def segment_filter_names(s: accounts_pb2.Segment) -> list[str]:
    return [*s.filters, *(["tag"] if s.tags else [])]


async def check_segment_filters(view: Access, names: Iterable[str], segment: str) -> None:
    """A segment's filters pass the checks of GET /accounts' own (`view`: the caller's access to
    accounts): 403 naming `filters.<name>` for a field the caller may not filter by — hidden or
    masked by the field rules, or a custom field defined as pii for a caller who sees personal data
    masked. Otherwise a saved filter would test guesses of values the caller sees masked."""
    for name in names:
        try:
            if name.startswith("custom."):
                await check_custom_filters(view, [name.removeprefix("custom.")])
            else:
                view.check_filter([ACCOUNT_FILTER_FIELDS.get(name, name)])
        except SecurityProblem as problem:
            if problem.status != 403:
                raise
            raise forbidden(f"{problem.detail} ({segment})", field=f"filters.{name}") from None


async def check_saved_segment(access: Access, segment_id: str) -> None:
    """Before a list applies a saved segment (`?segment_id=`, `access`: to accounts): its filters
    pass the same checks as the query's own. It may be a team segment saved by someone who reads
    more, and would otherwise test guesses of values this caller sees masked."""
    reply = await _stub(access.request).GetSegment(
        pb.GetSegmentRequest(segment_id=segment_id), metadata=access.grpc_metadata()
    )
    await check_segment_filters(access, segment_filter_names(reply.segment), f"segment {segment_id}")


async def _clear_filters(view: Access | None, names: Iterable[str]) -> set[str]:
    """The filter names among `names` whose field the caller reads in clear (`view`: their access to
    accounts, None when they may not read accounts: then none)."""
    names = list(names)
    if view is None:
        return set()
    custom = await readable_custom_keys(view, [n.removeprefix("custom.") for n in names if n.startswith("custom.")])
    return {
        name
        for name in names
        if (
            name.removeprefix("custom.") in custom
            if name.startswith("custom.")
            else view.decision.read_rule(ACCOUNT_FILTER_FIELDS.get(name, name)) >= FieldRule.READ
        )
    }


async def _shown_segments(access: Access, segments: Iterable[accounts_pb2.Segment]) -> list[dict[str, Any]]:
    """The segments as the caller may see them: the value of a saved filter on a field the caller
    does not read in clear (a teammate's team segment on a pii custom field, say) is masked."""
    records = [segment_dict(s) for s in segments]
    clear = await _clear_filters(access.view("accounts"), {name for r in records for name in r["filters"]})
    for record in records:
        record["filters"] = {
            name: value if name in clear else mask_value(value, "text") for name, value in record["filters"].items()
        }
    return access.present_many(records)


SegmentSort = Annotated[str | None, Query(pattern=r"^-?(name|created_at)$", description="name (default), created_at")]


@router.get("/segments", response_model=SegmentPage, response_model_exclude_unset=True)
async def list_segments(
    request: Request,
    access: Annotated[Access, Depends(require("segments", "read"))],
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: str | None = None,
    sort: SegmentSort = None,
) -> dict[str, Any]:
    """The caller's segments and their team's shared ones, one page at a time."""
    reply = await _stub(request).ListSegments(
        pb.ListSegmentsRequest(page=_page(limit, cursor, sort, access)), metadata=access.grpc_metadata()
    )
    return _list_body(await _shown_segments(access, reply.items), reply.page_info.next_cursor)


async def _segment_filters(
    access: Access, body_filters: dict[str, str | list[str]]
) -> tuple[dict[str, str], list[str]]:
    """A segment's filters as sent (`tag` repeatable) as the service stores them: the filters other
    than `tag`, comma-joined, and the tags. They pass the checks of the account list's own first."""
    view = access.view("accounts")
    if view is None and body_filters:
        raise forbidden("you may not filter accounts", field="filters")
    if view is not None:
        await check_segment_filters(view, body_filters, "saved in a segment")
    filters = {k: ",".join(v) if isinstance(v, list) else v for k, v in body_filters.items() if k != "tag"}
    raw_tags = body_filters.get("tag", [])
    return filters, [raw_tags] if isinstance(raw_tags, str) else raw_tags


@router.post("/segments", status_code=201, response_model=SegmentOut, response_model_exclude_unset=True)
async def create_segment(
    body: SegmentIn,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("segments", "create"))],
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    filters, tags = await _segment_filters(access, dict(body.filters))
    reply = await _stub(request).CreateSegment(
        pb.CreateSegmentRequest(
            name=body.name,
            visibility="team" if body.shared_with_team else "user",
            filters=filters,
            tags=tags,
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    record = segment_dict(reply.segment)
    await access.audit_write(record["id"], None, record)
    return with_etag(response, access.present(record))


@router.get("/segments/{segment_id}", response_model=SegmentOut, response_model_exclude_unset=True)
async def get_segment(
    segment_id: str,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("segments", "read"))],
) -> dict[str, Any]:
    reply = await _stub(request).GetSegment(
        pb.GetSegmentRequest(segment_id=segment_id), metadata=access.grpc_metadata()
    )
    [shown] = await _shown_segments(access, [reply.segment])
    return with_etag(response, shown)


@router.patch("/segments/{segment_id}", response_model=SegmentOut, response_model_exclude_unset=True)
async def update_segment(
    segment_id: str,
    body: SegmentPatch,
    request: Request,
    response: Response,
    access: Annotated[Access, Depends(require("segments", "update"))],
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Only the segment's owner may change it: a teammate who sees a team segment gets 404."""
    sent = body.model_dump(exclude_unset=True)
    access.check_write(sent)
    segment = accounts_pb2.Segment(name=body.name or "")
    paths = [name for name in ("name",) if name in sent]
    if "shared_with_team" in sent:
        segment.visibility = "team" if body.shared_with_team else "user"
        paths.append("visibility")
    if "filters" in sent:
        # `filters` carries the tags too (as `tag`): sending it replaces both.
        filters, tags = await _segment_filters(access, dict(body.filters or {}))
        segment.filters.update(filters)
        segment.tags.extend(tags)
        paths.extend(["filters", "tags"])
    reply = await _stub(request).UpdateSegment(
        pb.UpdateSegmentRequest(
            segment_id=segment_id,
            segment=segment,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    record = segment_dict(reply.segment)
    # As the service read it under its row lock in the write's transaction.
    await access.audit_write(segment_id, segment_dict(reply.previous), record)
    return with_etag(response, access.present(record))


@router.delete("/segments/{segment_id}", status_code=204)
async def delete_segment(
    segment_id: str,
    request: Request,
    access: Annotated[Access, Depends(require("segments", "delete"))],
    if_match: IfMatch = None,
) -> Response:
    reply = await _stub(request).DeleteSegment(
        pb.DeleteSegmentRequest(segment_id=segment_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(segment_id, segment_dict(reply.previous), None)
    return Response(status_code=204)


# --- the 360° view -------------------------------------------------------------------------------------------

Part = dict[str, Any]


async def _part(access: Access | None, fetch: Callable[[Access], Awaitable[Part]]) -> Part:
    """One part of the view: forbidden without permission, unavailable when its service is down."""
    if access is None:
        return {"status": "forbidden"}
    try:
        return {"status": "ok", **await fetch(access)}
    except UpstreamNotConfigured as error:
        return {"status": "unavailable", "detail": str(error)}
    except grpc.aio.AioRpcError as error:
        remote = from_rpc_error(error)
        status = http_status_of(remote)
        if status in (503, 504) or status >= 500:
            return {"status": "unavailable", "detail": remote.message or remote.code.name}
        return {"status": "error", "http_status": status, "detail": remote.message}


def _sales_stub(request: Request) -> SalesServiceStub:
    return _upstreams(request).stub("sales", SalesServiceStub)


@router.get("/accounts/{account_id}/360", response_model=Account360, response_model_exclude_unset=True)
async def account_360(account_id: str, request: Request, access: AccountsRead) -> Any:
    """Account, contacts, open opportunities, contracts and receivables, open tickets, recent
    activities and lifetime value — each part under the caller's own permissions for its resource."""
    reply = await _stub(request).GetAccount(
        pb.GetAccountRequest(account_id=account_id), metadata=access.grpc_metadata()
    )
    if reply.account.merged_into_id:
        return await get_account(account_id, request, Response(), access)
    present_account = await presenter(access)
    stub = _stub(request)

    async def contacts(view: Access) -> Part:
        rows = await stub.ListContacts(
            pb.ListContactsRequest(account_id=account_id, page=common_pb2.PageRequest(limit=VIEW_LIMIT)),
            metadata=view.grpc_metadata(),
        )
        present = await presenter(view)
        return {"items": [present(contact_dict(c)) for c in rows.items]}

    async def activities(view: Access) -> Part:
        rows = await stub.ListActivities(
            pb.ListActivitiesRequest(account_id=account_id, page=common_pb2.PageRequest(limit=VIEW_LIMIT)),
            metadata=view.grpc_metadata(),
        )
        return {"items": view.present_many(activity_dict(a) for a in rows.items)}

    async def opportunities(view: Access) -> Part:
        rows = await _sales_stub(request).ListOpportunities(
            sales_service_pb2.ListOpportunitiesRequest(
                account_id=account_id, status="open", page=common_pb2.PageRequest(limit=VIEW_LIMIT)
            ),
            metadata=view.grpc_metadata(),
        )
        present = await presenter(view)
        return {"items": [present(opportunity_dict(o)) for o in rows.items]}

    async def contracts(view: Access) -> Part:
        sales = _sales_stub(request)
        contract_rows, receivables = await asyncio.gather(
            sales.ListContracts(
                sales_service_pb2.ListContractsRequest(
                    account_id=account_id, page=common_pb2.PageRequest(limit=VIEW_LIMIT)
                ),
                metadata=view.grpc_metadata(),
            ),
            sales.ListReceivables(
                sales_service_pb2.ListReceivablesRequest(
                    account_id=account_id, page=common_pb2.PageRequest(limit=VIEW_LIMIT)
                ),
                metadata=view.grpc_metadata(),
            ),
        )
        owed = receivables_view(receivables, view)
        part = {"items": view.present_many(contract_dict(c) for c in contract_rows.items), "receivables": owed["items"]}
        if "lifetime_value" in owed:  # the caller sees contract amounts
            # Totals over all the account's contracts, not just the ones listed here.
            part["total_outstanding"] = owed["account_outstanding"]
            part["total_overdue"] = owed["account_overdue"]
            part["lifetime_value"] = owed["lifetime_value"]
        return part

    async def tickets(view: Access) -> Part:
        rows = (
            await _upstreams(request)
            .stub("service_desk", ServiceDeskServiceStub)
            .ListTickets(
                servicedesk_service_pb2.ListTicketsRequest(
                    account_id=account_id,
                    statuses=OPEN_TICKET_STATUSES,
                    page=common_pb2.PageRequest(limit=VIEW_LIMIT, sort="-created_at"),
                ),
                metadata=view.grpc_metadata(),
            )
        )
        # A reopened ticket's survey key only for who enters its CSAT answers; the tier for who reads its account.
        present = await ticket_presenter(view, (t.account_id for t in rows.items))
        return {"items": [present(ticket_json(t)) for t in rows.items]}

    parts = await asyncio.gather(
        _part(access.view("contacts"), contacts),
        _part(access.view("opportunities"), opportunities),
        _part(access.view("contracts"), contracts),
        _part(access.view("tickets"), tickets),
        _part(access.view("activities"), activities),
    )
    names = ("contacts", "open_opportunities", "contracts_and_receivables", "open_tickets", "recent_activities")
    return {"account": present_account(account_dict(reply.account)), **dict(zip(names, parts, strict=True))}
