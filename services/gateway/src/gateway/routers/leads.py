"""Leads context over REST (SPEC §4): leads, import, activities, assignment, conversion,
disqualification, the lead pool, scoring and assignment rules, campaigns and web forms.

Permissions come only from `require(...)`/`Access`; the leads service applies the record scope.
Rules are managed with the `assign` action on leads (managers, admins), web forms with campaigns.
The public web form intake is authenticated by its form key and rate limited by the service.
"""

import csv
import dataclasses
import io
import json
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, Optional

import grpc
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_pb2
from crm.leads.v1 import leads_service_pb2 as pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceStub
from crm_platform.errors import field_path
from crm_platform.grpc_client import noting_replays, replay_noted
from crm_platform.lead_import import IMPORTABLE_FIELDS, column_target, custom_key
from crm_platform.principal import Principal
from crm_platform.structs import unstorable_values
from crm_platform.timeutil import to_timestamp
from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from gateway.conventions import (
    IdempotencyKey,
    IfMatch,
    MoneyIn,
    before_write,
    expected_version,
    nothing_to_change,
    with_etag,
)
from gateway.inputs import (
    INT32_MAX,
    INT32_MIN,
    CalendarDate,
    Instant,
    NonBlank,
    OptionalId,
    ReplacementBody,
    RequestBody,
)
from gateway.public_keys import PublicKeyPath, deny_unknown_key, path_without_key
from gateway.references import refuse_if_deals_name_campaign
from gateway.routers import lead_schemas as schemas
from gateway.routers.custom_fields import CUSTOM_FILTER_PARAMETERS, custom_filters, presenter
from gateway.routing import ResourceRouter
from gateway.security import Access, FilterFields, require
from gateway.security.access import runtime_of
from gateway.security.masking import MASK, mask_value, url_without_query
from gateway.security.problems import forbidden

router = ResourceRouter(tags=["leads"])

LeadsRead = Annotated[Access, Depends(require("leads", "read"))]
LeadsCreate = Annotated[Access, Depends(require("leads", "create"))]
LeadsUpdate = Annotated[Access, Depends(require("leads", "update"))]
LeadsDelete = Annotated[Access, Depends(require("leads", "delete"))]
LeadsAssign = Annotated[Access, Depends(require("leads", "assign"))]
# Rules decide whom leads go to and how they score: managing them takes the grant to assign leads.
ScoringRulesManage = Annotated[Access, Depends(require("leads", "assign", denied="manage lead scoring rules"))]
AssignmentRulesManage = Annotated[Access, Depends(require("leads", "assign", denied="manage lead assignment rules"))]
ActivitiesUpdate = Annotated[Access, Depends(require("activities", "update"))]
ActivitiesDelete = Annotated[Access, Depends(require("activities", "delete"))]
CampaignsRead = Annotated[Access, Depends(require("campaigns", "read"))]
CampaignsCreate = Annotated[Access, Depends(require("campaigns", "create"))]
CampaignsUpdate = Annotated[Access, Depends(require("campaigns", "update"))]
CampaignsDelete = Annotated[Access, Depends(require("campaigns", "delete"))]
# The paging parameters of the lists.
PageLimit = Annotated[int | None, Query(ge=1, le=500, description="items per page, 1 to 500; 50 when left out")]
PageCursor = Annotated[str, Query(description="the `next_cursor` of the page before; left out for the first page")]
# Imports can run for minutes; everything else uses the channel's default deadline.
IMPORT_DEADLINE_SECONDS = 600.0
IMPORT_CHUNK_BYTES = 256 * 1024


def _stub(request: Request) -> LeadsServiceStub:
    return request.app.state.upstreams.stub("leads", LeadsServiceStub)  # type: ignore[no-any-return]


# --- models --------------------------------------------------------------------------------------


# Lengths as the leads service stores them (leads.repository): ids of its records in VARCHAR(36),
# users, teams, regions and names in VARCHAR(200), codes (a source, an operator) in VARCHAR(20).
Tag = Annotated[str, Field(max_length=100)]
ShortText = Annotated[str, Field(max_length=200)]


class LeadIn(RequestBody):
    name: str | None = Field(default=None, max_length=200)
    company: str | None = Field(default=None, max_length=200)
    title: str | None = Field(default=None, max_length=200)
    phone: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=254)
    source: str | None = Field(
        default=None, max_length=20, description="website, webform, ad, event, referral, wechat, phone, ..."
    )
    source_detail: str | None = Field(default=None, max_length=200)
    campaign_id: str | None = Field(default=None, max_length=36)
    region: str | None = Field(default=None, max_length=200)
    industry: str | None = Field(default=None, max_length=200)
    tags: list[Tag] | None = None
    custom: dict[str, Any] | None = None
    # "" is none (the rules, the pool); only spaces would be an owner nobody is, a team nobody sees.
    owner_id: OptionalId = Field(default=None, max_length=200)
    team: OptionalId = Field(default=None, max_length=200)
    external_id: str | None = Field(default=None, max_length=200)


class LeadPatch(LeadIn):
    status: Literal["new", "contacted", "qualified"] | None = None


ActivityKind = Literal["call", "email", "meeting", "visit", "note", "wechat"]


class ActivityPatch(RequestBody):
    """What an activity says happened, as logging it takes it: the fields sent are corrected
    (`next_follow_up_at: null` clears the follow-up and cancels its task)."""

    kind: ActivityKind | None = None
    outcome: str = Field(default="", max_length=200)
    notes: str = Field(default="", max_length=10_000)
    occurred_at: Instant | None = None
    next_follow_up_at: Instant | None = None


class ActivityIn(ActivityPatch):
    kind: ActivityKind


class AssignIn(RequestBody):
    owner_id: OptionalId = Field(default=None, max_length=200, description="empty: run the assignment rules")
    team: OptionalId = Field(default=None, max_length=200)


class TransferIn(RequestBody):
    from_owner_id: NonBlank = Field(max_length=200, description="the rep whose leads go")
    to_owner_id: NonBlank = Field(max_length=200, description="the rep who takes them")
    to_team: OptionalId = Field(default=None, max_length=200, description="the team the leads join; empty: their own")
    reason: str = Field(default="", max_length=2000)


class ReasonIn(RequestBody):
    reason: str = Field(default="", max_length=2000)


class DisqualifyIn(RequestBody):
    reason: NonBlank = Field(max_length=2000)


class OpportunityIn(RequestBody):
    # The sales service stores the name in a VARCHAR(200).
    name: str = Field(default="", max_length=200)
    amount: MoneyIn | None = None
    pipeline_id: str = Field(default="", max_length=36)
    expected_close_date: CalendarDate | None = None


class ConvertIn(RequestBody):
    account_id: str = Field(default="", max_length=36, description="attach to this existing account; empty creates one")
    account_name: str = Field(default="", max_length=300)
    create_opportunity: bool = False
    opportunity: OpportunityIn | None = None


class ScoringRuleIn(ReplacementBody):
    read_only = frozenset({"id", "version"})
    name: NonBlank = Field(max_length=200)
    field: str = Field(default="", max_length=200)
    operator: str = Field(default="", max_length=20)
    value: str = Field(default="", max_length=500)
    activity_kind: str = Field(default="", max_length=20)
    min_count: int = Field(default=0, ge=0, le=INT32_MAX)
    points: int = Field(ge=-100, le=100)
    enabled: bool = True
    engagement_kind: str = Field(
        default="", max_length=20, description="page_view, email_open, email_click, download or webinar"
    )
    url_contains: str = Field(
        default="", max_length=2000, description="of an engagement rule: only URLs containing this (any case)"
    )


class EngagementIn(RequestBody):
    """One engagement, as the leads service checks it item by item (a `kind` it does not know, an
    `occurred_at` missing or in the future, a lead it cannot find: that item is rejected, the others
    recorded). Here only the shape and the stored lengths: anything else fails the whole request."""

    lead_id: str = Field(default="", max_length=36, description="the lead; or name it by `email`")
    email: str = Field(default="", max_length=254, description="the caller's one open lead with this email")
    kind: str = Field(default="", max_length=20, description="page_view, email_open, email_click, download or webinar")
    url: str = Field(default="", max_length=2000)
    occurred_at: Instant | None = Field(default=None, description="required, not in the future")
    external_id: str = Field(
        default="", max_length=200, description="the sender's event id: recorded once per lead, so a resend counts once"
    )


class EngagementsIn(RequestBody):
    items: list[EngagementIn] = Field(max_length=500, description="at most 500 per request")


class ThresholdsIn(ReplacementBody):
    read_only = frozenset({"version"})
    a: int = Field(ge=0, le=100)
    b: int = Field(ge=0, le=100)
    c: int = Field(ge=0, le=100)


class AssignmentRuleIn(ReplacementBody):
    read_only = frozenset({"id", "version"})
    name: NonBlank = Field(max_length=200)
    position: int = Field(default=0, ge=INT32_MIN, le=INT32_MAX)
    enabled: bool = True
    regions: list[ShortText] = []
    industries: list[ShortText] = []
    sources: list[Annotated[str, Field(max_length=20)]] = []
    min_score: int = Field(default=0, ge=0, le=100)
    max_score: int = Field(default=0, ge=0, le=100, description="0: no upper bound")
    team: str = Field(default="", max_length=200)
    user_ids: list[ShortText] = Field(default=[], description="none: the leads go to `team`'s pool")
    strategy: str = Field(default="round_robin", max_length=20)
    capacity: int = Field(default=0, ge=0, le=INT32_MAX)
    lead_team: str = Field(
        default="", max_length=200, description="only leads of this team; empty: any (a team manager's: their team)"
    )


class CampaignIn(RequestBody):
    name: str | None = Field(default=None, max_length=200)
    channel: str | None = Field(default=None, max_length=100)
    cost: MoneyIn | None = None
    starts_on: CalendarDate | None = None
    ends_on: CalendarDate | None = None
    owner_id: str | None = Field(default=None, max_length=200)
    team: str | None = Field(default=None, max_length=200)


class CampaignCreate(CampaignIn):
    name: NonBlank = Field(max_length=200)


class WebformIn(RequestBody):
    name: NonBlank = Field(max_length=200)
    campaign_id: OptionalId = Field(default=None, max_length=36)
    team: OptionalId = Field(default=None, max_length=200)
    region: OptionalId = Field(default=None, max_length=200)
    rate_limit_per_minute: int = Field(default=0, ge=0, le=10_000)
    honeypot_field: str = Field(
        default="",
        max_length=64,
        description="A field the form hides from people: submissions that fill it create no lead",
    )


# --- proto <-> JSON ------------------------------------------------------------------------------

_LEAD_TIMES = (
    "created_at",
    "updated_at",
    "assigned_at",
    "first_contacted_at",
    "last_activity_at",
    "first_contact_due_at",
    "recycled_at",
)
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


_EPOCH = datetime(1970, 1, 1)


def _time(stamp: Timestamp) -> str | None:
    """RFC 3339 UTC with a `Z`, as `crm_platform.timeutil.isoformat` prints it; None when unset.
    Built directly: `ToDatetime` and `isoformat` cost twice as much, for every time of every lead."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if seconds == 0 and nanos == 0:
        return None
    return f"{(_EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)).isoformat()}Z"


def lead_json(lead: leads_pb2.Lead) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(lead, name) for name in _LEAD_TEXT}
    body.update(
        score=lead.score,
        tags=list(lead.tags),
        # Unset when the lead has no custom values (converting an empty Struct costs ~3 us).
        custom=json_format.MessageToDict(lead.custom) if lead.HasField("custom") else {},
        in_pool=lead.in_pool,
        follow_up_overdue=lead.follow_up_overdue,
        version=lead.version,
    )
    for name in _LEAD_TIMES:
        body[name] = _time(getattr(lead, name))
    return body


def _message_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(  # type: ignore[no-any-return]
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def campaign_json(campaign: leads_pb2.Campaign) -> dict[str, Any]:
    body = _message_json(campaign)
    body["cost"] = _message_json(campaign.cost) if campaign.HasField("cost") else None
    for name in ("created_at", "updated_at"):
        body[name] = _time(getattr(campaign, name))
    for name in ("starts_on", "ends_on"):
        body[name] = getattr(campaign, name) or None  # no date, as a time not set is null
    body["version"] = campaign.version  # a number, as a lead's (JSON of an int64 is a string)
    return body


def _timestamp(value: datetime | None) -> Timestamp | None:
    return to_timestamp(value) if value is not None else None


def _lead_input(body: LeadIn) -> tuple[pb.LeadInput, list[str]]:
    given = body.model_dump(exclude_unset=True)
    message = pb.LeadInput()
    for name, value in given.items():
        if value is None:
            continue
        if name == "custom":
            message.custom.update(value)
        elif name == "tags":
            message.tags.extend(value)
        else:
            setattr(message, name, value)
    return message, list(given)


def _page(limit: int | None, cursor: str, sort: str = "") -> common_pb2.PageRequest:
    return common_pb2.PageRequest(limit=limit or 0, cursor=cursor, sort=sort)


# --- leads ---------------------------------------------------------------------------------------


_MERGED_INTO = {"X-Merged-Into": {"description": "the id of the lead merged into", "schema": {"type": "string"}}}
OnDuplicate = Annotated[
    Literal["reject", "merge", "allow"],
    Query(
        description="when the email or phone is an open lead's: `reject` (409 DUPLICATE naming `existing_id`), "
        "`merge` (fills that lead's empty fields and appends tags) or `allow` (a second lead)"
    ),
]


@router.post(
    "/leads",
    status_code=201,
    responses={
        201: {"model": schemas.Lead, "description": "Created"},
        200: {"model": schemas.Lead, "description": "Merged (`on_duplicate=merge`)", "headers": _MERGED_INTO},
        409: {
            "description": "DUPLICATE: an open lead has the email or phone (`existing_id` names it to a caller "
            "who may read it); so is a merge into a lead outside the caller's record scope"
        },
    },
)
async def create_lead(
    body: LeadIn,
    request: Request,
    response: Response,
    access: LeadsCreate,
    on_duplicate: OnDuplicate = "reject",
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Captures a lead: deduplicated by email/phone (409 with `existing_id`), scored, assigned."""
    access.check_write(body.model_dump(exclude_unset=True, exclude_none=True))
    lead, _ = _lead_input(body)
    reply = await _stub(request).CreateLead(
        pb.CreateLeadRequest(lead=lead, on_duplicate=on_duplicate, idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    result = lead_json(reply.lead)
    action, before = _capture_audited(reply)
    if reply.merged:
        response.status_code = 200
        response.headers["X-Merged-Into"] = result["id"]
    await access.audit_write(result["id"], before, result, action=action, status_code=response.status_code)
    present = await presenter(access)
    return with_etag(response, present(result))


def _capture_audited(reply: pb.CreateLeadResponse | pb.SubmitWebformResponse) -> tuple[str, dict[str, Any] | None]:
    """The audit action of a lead capture, and the lead before it: a new lead is a `create`; a merge
    is the change it made to the existing lead (`merge`, before as the service had it), not a
    second create. A key's repeat gets the first answer again, `previous` included: its audit row
    is a `replay` all the same (`Access.audit_write`)."""
    if not reply.merged:
        return "create", None
    return "merge", lead_json(reply.previous) if reply.HasField("previous") else None


LEAD_SEARCHED_FIELDS = ("name", "company", "email", "phone")
# The filters of GET /leads (and of the leads export): query parameter -> the field(s) it filters by.
LEAD_FILTERS: FilterFields = {
    "status": "status",
    "source": "source",
    "owner_id": "owner_id",
    "team": "team",
    "region": "region",
    "industry": "industry",
    "grade": "grade",
    "campaign_id": "campaign_id",
    "tag": "tags",
    "q": LEAD_SEARCHED_FIELDS,
    "created_after": "created_at",
    "created_before": "created_at",
    "source_detail": "source_detail",
    "in_pool": "in_pool",
    "follow_up_overdue": "follow_up_overdue",
    "min_score": "score",
}


LEAD_SORTS = r"^-?(created_at|updated_at|score|name)$"  # the leads service's SORTS


LeadSort = Annotated[
    str,
    Query(
        pattern=LEAD_SORTS,
        description="created_at, updated_at, score or name; a leading `-` sorts descending (newest first by default)",
    ),
]
_EXACTLY = "only the leads whose {} is this (exactly)"


@router.get("/leads", openapi_extra=CUSTOM_FILTER_PARAMETERS, responses={200: {"model": schemas.LeadPage}})
async def list_leads(
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    sort: LeadSort = "-created_at",
    status: Annotated[
        list[schemas.LeadStatus] | None,
        Query(
            description="new, contacted, qualified, unqualified, converted or recycled; "
            "repeat it for several (`status=new&status=contacted`: either)"
        ),
    ] = None,
    source: Annotated[
        list[schemas.LeadSource] | None,
        Query(
            description="website, webform, ad, event, referral, wechat, phone, email, import or other; "
            "repeat it for several (either)"
        ),
    ] = None,
    owner_id: Annotated[str, Query(description="the owner's user id; `me` for the caller")] = "",
    team: Annotated[str, Query(description=_EXACTLY.format("team"))] = "",
    region: Annotated[str, Query(description=_EXACTLY.format("region"))] = "",
    industry: Annotated[str, Query(description=_EXACTLY.format("industry"))] = "",
    grade: Annotated[schemas.LeadGrade | None, Query(description="A, B, C or D")] = None,
    campaign_id: Annotated[str, Query(description=_EXACTLY.format("campaign id"))] = "",
    tag: Annotated[str, Query(description="only the leads with this tag")] = "",
    q: Annotated[
        str,
        Query(
            max_length=200,
            description="a substring, any case, of the name, company or email; only of those the caller "
            "reads in clear (a caller who sees emails masked searches names and companies)",
        ),
    ] = "",
    created_after: Annotated[Instant | None, Query(description="created at or after this time (RFC 3339)")] = None,
    created_before: Annotated[Instant | None, Query(description="created before this time (RFC 3339)")] = None,
    source_detail: Annotated[str, Query(description=_EXACTLY.format("original source value"))] = "",
    in_pool: Annotated[bool | None, Query(description="true: only the pool's; false: only owned leads")] = None,
    follow_up_overdue: Annotated[
        bool | None, Query(description="true: only the leads whose first-contact SLA passed without contact")
    ] = None,
    min_score: Annotated[int, Query(ge=0, le=100, description="only the leads scoring at least this")] = 0,
) -> dict[str, Any]:
    """The leads in the caller's record scope, one page at a time, shown with the caller's field
    rules; filters combine (all must hold). Filtering or sorting by a field the caller does not read
    in clear is 403, an unknown parameter 422."""
    access.check_filters({name: fields for name, fields in LEAD_FILTERS.items() if name != "q"})
    access.check_filter([sort])
    # `q` looks only in the fields the caller reads in clear (marketing finds leads by name and
    # company, not by the email it sees masked); in none of them, it is refused naming the first.
    searched = access.searched_fields(LEAD_SEARCHED_FIELDS) if q else []
    custom = await custom_filters(access)
    owner_id = access.resolve_me(owner_id)
    reply = await _stub(request).ListLeads(
        pb.ListLeadsRequest(
            page=_page(access.page_limit(limit), cursor, sort),
            statuses=status or [],
            sources=source or [],
            owner_id=owner_id,
            team=team,
            region=region,
            industry=industry,
            grade=grade or "",
            campaign_id=campaign_id,
            tag=tag,
            q=q,
            q_fields=searched,
            created_after=_timestamp(created_after),
            created_before=_timestamp(created_before),
            source_detail=source_detail,
            in_pool="" if in_pool is None else str(in_pool).lower(),
            follow_up_overdue="" if follow_up_overdue is None else str(follow_up_overdue).lower(),
            min_score=min_score,
            custom=custom,
        ),
        metadata=access.grpc_metadata(),
    )
    present = await presenter(access)
    return {
        "items": [present(lead_json(item)) for item in reply.items],
        "next_cursor": reply.page_info.next_cursor or None,
    }


# The fields the leads service counts by (`LeadsService.summarize`).
SUMMARY_GROUPS = ("source", "source_detail", "status", "grade", "region", "owner_id", "industry", "team", "campaign_id")


@router.get("/leads/summary", responses={200: {"model": schemas.LeadSummary}})
async def summarize_leads(
    request: Request,
    access: LeadsRead,
    group_by: Annotated[
        str, Query(pattern=r"^[a-z_]+$", description=f"the field to count by: {', '.join(SUMMARY_GROUPS)}")
    ],
    status: Annotated[
        list[schemas.LeadStatus] | None,
        Query(description="count only the leads of this status; repeat it for several (either)"),
    ] = None,
    import_id: Annotated[str, Query(description="count only the leads this import (its key) created")] = "",
) -> dict[str, Any]:
    """Counts of the caller's in-scope leads grouped by one field (e.g. source, source_detail)."""
    access.check_filter([group_by])
    access.check_filters({"status": "status", "import_id": "import_id"})
    reply = await _stub(request).SummarizeLeads(
        pb.SummarizeLeadsRequest(group_by=group_by, statuses=status or [], import_id=import_id),
        metadata=access.grpc_metadata(),
    )
    return {"group_by": group_by, "counts": {c.key: c.count for c in reply.counts}, "total": reply.total}


_IMPORT_FILE = (
    "The file itself, at most `CRM_GATEWAY_MAX_BODY_BYTES` (1 MiB by default; 413 above it) per request: "
    "a larger file goes in parts (`part`, `final`) cut at line ends. UTF-8, or the charset the "
    "Content-Type names (`text/csv; charset=gbk`, `gb18030`, `utf-16`, ...)."
)
_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "description": _IMPORT_FILE,
        "content": {
            "text/csv": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
            "application/x-ndjson": {
                "schema": {"type": "string", "format": "binary", "description": "JSON Lines: one object a line"}
            },
        },
    }
}


@router.post(
    "/leads/import",
    openapi_extra=_IMPORT_BODY,
    responses={
        200: {"model": schemas.ImportAnswer},
        409: {"description": "IMPORT_COMPLETED: the import under this key completed; use a new key"},
    },
)
async def import_leads(
    request: Request,
    access: LeadsCreate,
    format: Annotated[
        Literal["csv", "json", "jsonl"] | None,
        Query(
            description="the file's format; left out, the Content-Type says: `application/json` a JSON array "
            "of objects, `application/x-ndjson` or `application/jsonl` JSON Lines, anything else CSV"
        ),
    ] = None,
    import_key: Annotated[
        str,
        Query(
            max_length=200,
            description="names the file: its parts and re-sends use it (a re-sent part is never applied "
            "twice); progress at `GET /leads/imports/{import_key}`",
        ),
    ] = "",
    on_duplicate: OnDuplicate = "reject",
    column_map: Annotated[
        str,
        Query(
            description='JSON object, file column -> lead field (`{"Mobile No": "phone"}`): only these columns '
            "set fields, the others go to `custom`; left out, headers match field names and their aliases"
        ),
    ] = "",
    source_map: Annotated[
        str,
        Query(description='JSON object, a source value of the file -> a lead source (`{"Olark Chat": "website"}`)'),
    ] = "",
    default_source: Annotated[str, Query(description="the source of rows without one; `import` by default")] = "",
    campaign_id: Annotated[str, Query(description="the campaign every imported lead is attributed to")] = "",
    assign: Annotated[bool, Query(description="true: rows without an owner go through the assignment rules")] = False,
    report_accepted: Annotated[
        bool,
        Query(description="true: `rows` lists the accepted rows too, with the `lead_id` each became"),
    ] = False,
    part: Annotated[
        int, Query(ge=0, le=INT32_MAX, description="1, 2, ... for a file sent in parts; 0: the whole file")
    ] = 0,
    final: Annotated[bool, Query(description="true on a file's last part: the import then completes")] = False,
) -> dict[str, Any]:
    """Bulk import of CSV, a JSON array or JSON Lines, streamed to the service.

    Every row not accepted is listed with its reason. Files larger than one request body are sent
    in parts under one `import_key` (`part=1..n`, `final=true` on the last); a part re-sent after a
    failure is skipped or resumed, never applied twice (resumed only if its rows up to where it was
    cut short are the same: 422 on `import_key` otherwise). Progress, and when it last moved
    (`updated_at`): `GET /leads/imports/{import_key}`. A part that takes the import past its byte
    limit is a 422 before any of its rows is imported; rows past its row limit are each rejected,
    with that reason.
    The fields the file's columns set must be writable by the caller (403 naming one otherwise); the
    columns of a part that does not show them all (a CSV part after the first, a JSON line that does
    not parse alone) count as every importable field, unless `column_map` names the only columns
    that set fields. A file that is not UTF-8 names its charset in the Content-Type
    (`text/csv; charset=gbk`, `gb18030`, `utf-16`, ...).
    """
    fmt = format or _format_of(request.headers.get("content-type", ""))
    header = pb.ImportHeader(
        format=fmt,
        import_key=import_key,
        on_duplicate=on_duplicate,
        column_map=_json_map(column_map, "column_map"),
        source_map=_json_map(source_map, "source_map"),
        default_source=default_source,
        campaign_id=campaign_id,
        assign=assign,
        report_accepted=report_accepted,
        part=part,
        final=final,
    )
    # The body limit keeps a part small: read whole, it is checked before the service sees any of it.
    body = _as_utf8(await request.body(), request.headers.get("content-type", ""), part)
    # Told up front, the service refuses a part that takes the import past its byte limit (422)
    # before writing any row of it.
    header.part_bytes = len(body)
    access.check_write(_import_targets(header, _import_columns(fmt, body, part)))

    async def messages() -> AsyncIterator[pb.ImportLeadsRequest]:
        yield pb.ImportLeadsRequest(header=header)
        for start in range(0, len(body), IMPORT_CHUNK_BYTES):
            yield pb.ImportLeadsRequest(chunk=body[start : start + IMPORT_CHUNK_BYTES])

    reply = await _stub(request).ImportLeads(
        messages(), metadata=access.grpc_metadata(), timeout=IMPORT_DEADLINE_SECONDS
    )
    progress = reply.lead_import.progress  # of the whole import so far
    counts = f"{progress.accepted} accepted, {progress.merged} merged, {progress.rejected} rejected"
    await access.audit("import", reply.lead_import.id, reason=f"part {part or 1}: {counts} in all")
    # A merge changed a lead that was there before: it is on that lead's own trail. (The leads an
    # import created carry its id, `import_id`, which its row above names.)
    merged = [
        (row.lead_id, f"import {reply.lead_import.id}, row {row.row}") for row in reply.rows if row.status == "merged"
    ]
    await access.audit_each("merge", merged)
    summary = _import_json(reply.lead_import)
    # This part's rejections are its `rows`; all of them, page by page: GET /leads/imports/{id}.
    del summary["rejected_rows"]
    return {"import": summary, "rows": [_message_json(row) for row in reply.rows]}


@dataclass(slots=True)
class ImportColumns:
    """What one part of an import names: its columns (CSV header, JSON keys), mapped to fields as
    the leads service maps them, and the keys of JSON rows' `custom` objects, which it files as given."""

    columns: list[str]
    custom_keys: list[str] = dataclasses.field(default_factory=list)


def _import_columns(fmt: str, body: bytes, part: int) -> ImportColumns | None:
    """The columns of this part, None when it does not show them all."""
    text = body.decode("utf-8-sig", errors="replace")
    if fmt == "csv":
        if part > 1:
            return None  # the rows of a later part come under the first part's header
        try:
            return ImportColumns([name.strip() for name in next(csv.reader(io.StringIO(text)), [])])
        except csv.Error:
            return ImportColumns([])  # a header csv cannot read: the service refuses the file, saying why
    if fmt == "json":
        try:
            items = json.loads(text or "[]")
        except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
            return ImportColumns([])  # the service refuses the whole file: nothing is imported
        rows = [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
        return _json_columns(rows)
    lines: list[dict[str, Any]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            # Maybe part of a record the service reads across lines or parts: its keys are unknown.
            return None
        if isinstance(item, dict):
            lines.append(item)
    return _json_columns(lines)


def _json_columns(rows: Iterable[dict[str, Any]]) -> ImportColumns:
    """JSON rows' columns; a row's `custom` object is read as `POST /leads` reads it, its keys as given."""
    found = ImportColumns([])
    for row in rows:
        custom = row.get("custom")
        if isinstance(custom, dict):
            found.columns.extend(key for key in row if key != "custom")
            found.custom_keys.extend(custom)
        else:
            found.columns.extend(row)
    return found


def _import_targets(header: pb.ImportHeader, named: ImportColumns | None) -> list[str]:
    """The lead fields an import sets, as the leads service maps columns: an explicit `column_map`
    decides alone, else header names and their aliases; other columns go to `custom`, under their
    normalised key; a JSON row's `custom` keys as they are."""
    column_map = dict(header.column_map)
    targets = {"source", "source_detail", *column_map.values()}
    if named is None:
        targets |= {"custom"} if column_map else {"custom", *IMPORTABLE_FIELDS}
    else:
        targets |= {column_target(column, column_map) or _custom_path(column) for column in named.columns}
        targets |= {f"custom.{key}" for key in named.custom_keys}
    if header.campaign_id:
        targets.add("campaign_id")
    # `assign` lets the assignment rules choose owners, as a lead made without one by `POST /leads`
    # (marketing's trade-show lists are routed so): the caller sets no owner by it.
    return sorted(targets)


def _custom_path(column: str) -> str:
    """Where a column no field takes goes: `custom.<key>`, by the key the leads service files it under."""
    return f"custom.{custom_key(column)}"


_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([\w.:-]+)", re.IGNORECASE)


def _as_utf8(body: bytes, content_type: str, part: int) -> bytes:
    """The file as UTF-8, which the leads service reads. Spreadsheet exports on Chinese Windows are
    GBK (`charset=gbk` or `gb18030` in the Content-Type; gb18030 reads both) or UTF-16: they are
    re-encoded here, part by part, so a part must end on a whole character (at a line end)."""
    found = _CHARSET.search(content_type)
    declared = found.group(1).lower() if found else "utf-8"
    if declared in ("utf-8", "utf8"):
        return body
    charset = "gb18030" if declared in ("gbk", "gb2312", "cp936") else declared
    try:
        text = body.decode(charset)
    except LookupError:
        raise RequestValidationError(
            [{"loc": ("header", "content-type"), "msg": f"unknown charset {declared!r}", "type": "value_error"}]
        ) from None
    except UnicodeDecodeError as error:
        where = f"part {part}" if part else "the file"
        raise RequestValidationError(
            [{"loc": ("body", "file"), "msg": f"{where} is not {declared} text at byte {error.start}"
              " (a part must end on a whole character: split parts at line ends)", "type": "value_error"}]
        ) from None  # fmt: skip
    return text.encode("utf-8")


def _format_of(content_type: str) -> str:
    media = content_type.split(";", 1)[0].strip().lower()
    return {"application/json": "json", "application/x-ndjson": "jsonl", "application/jsonl": "jsonl"}.get(media, "csv")


def _json_map(text: str, name: str) -> dict[str, str]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RequestValidationError(
            [{"loc": ("query", name), "msg": "must be a JSON object of strings", "type": "value_error"}]
        )
    return value


def _import_json(lead_import: pb.LeadImport) -> dict[str, Any]:
    body = _message_json(lead_import)
    body["started_at"] = _time(lead_import.started_at)
    body["finished_at"] = _time(lead_import.finished_at)
    body["updated_at"] = _time(lead_import.updated_at)  # a `running` import that stays put is stalled
    return body


@router.get("/leads/imports", responses={200: {"model": schemas.LeadImportPage}})
async def list_imports(
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    status: Annotated[Literal["running", "completed", "failed"] | None, Query(description="only those")] = None,
) -> dict[str, Any]:
    """The imports the caller sees, newest first: those they started and those of their record scope
    (a team manager sees their reps'), each with its status and progress; an import's rejected rows
    are at `GET /leads/imports/{import_key}`."""
    reply = await _stub(request).ListLeadImports(
        pb.ListLeadImportsRequest(page=_page(access.page_limit(limit), cursor), status=status or ""),
        metadata=access.grpc_metadata(),
    )
    items = []
    for item in reply.items:
        summary = _import_json(item)
        del summary["rejected_rows"]  # none in a list: the import's own page has them
        items.append(summary)
    return {"items": items, "next_cursor": reply.page_info.next_cursor or None}


@router.get("/leads/imports/{import_id}", responses={200: {"model": schemas.LeadImportStatus}})
async def get_import(
    import_id: str, request: Request, access: LeadsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """An import's status and progress with a page of its rejected rows (with reasons) by row number;
    `next_cursor` pages on through them."""
    reply = await _stub(request).GetLeadImport(
        pb.GetLeadImportRequest(import_id=import_id, page=_page(access.page_limit(limit), cursor)),
        metadata=access.grpc_metadata(),
    )
    summary = _import_json(reply.lead_import)
    summary["rejected_rows"] = _rejections_as_seen(access, summary.get("rejected_rows", []))
    summary["next_cursor"] = reply.page_info.next_cursor or None
    return summary


# A value a reason quotes as Python's repr does: in single quotes, or in double quotes when the value
# holds a single quote (`"o'neil@example.com"`), backslash escapes within.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _rejections_as_seen(access: Access, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An import's rejected rows as the caller may see them: a reason quoting the value of a field
    the caller does not read in clear (a marketer reading a rep's import: its emails and phones, or
    custom values, which may be personal data) quotes it masked, as the lead's field would show."""
    core = {row["field"] for row in rows if row.get("field") in IMPORTABLE_FIELDS}
    clear = set(access.in_clear(core))
    masks_custom = access.masks_personal_data()
    seen = []
    for row in rows:
        field = row.get("field", "")
        hidden = (field in core and field not in clear) or (field.startswith("custom.") and masks_custom)
        if hidden:
            row = {**row, "reason": _masked_quotes(row["reason"], field)}
        seen.append(row)
    return seen


def _masked_quotes(reason: str, field: str) -> str:
    """The values `reason` quotes masked as the field shows them (`'j***@example.com'`,
    `'138****5678'`), else as `'***'`."""
    kind = field if field in ("email", "phone") else "id"
    return _QUOTED.sub(lambda quoted: f"'{mask_value(quoted.group(0)[1:-1], kind) or MASK}'", reason)


@router.get("/leads/{lead_id}", responses={200: {"model": schemas.Lead}})
async def get_lead(lead_id: str, request: Request, response: Response, access: LeadsRead) -> dict[str, Any]:
    """A lead in the caller's record scope (404 otherwise), with its version as the `ETag`."""
    reply = await _stub(request).GetLead(pb.GetLeadRequest(lead_id=lead_id), metadata=access.grpc_metadata())
    present = await presenter(access)
    return with_etag(response, present(lead_json(reply.lead)))


@router.patch(
    "/leads/{lead_id}",
    responses={
        200: {"model": schemas.Lead},
        409: {
            "description": "ILLEGAL_TRANSITION: the status cannot move so; DUPLICATE: another open lead has "
            "the email or phone"
        },
    },
)
async def update_lead(
    lead_id: str, body: LeadPatch, request: Request, response: Response, access: LeadsUpdate, if_match: IfMatch = ""
) -> dict[str, Any]:
    """Changes the fields sent; `status` moves it new -> contacted -> qualified (moving the status
    needs the grant to create activities as well)."""
    given = body.model_dump(exclude_unset=True)
    access.check_write(given)
    status = given.get("status")
    if status is not None and access.view("activities", "create") is None:
        # A status move is work on the lead (contacted records its first contact, closing the SLA):
        # whoever may not log a follow-up may not claim one either.
        raise forbidden("moving a lead's status needs the grant to create activities", field="status")
    lead, paths = _lead_input(body)
    if status is not None:  # status moves are a transition of the lead, checked by the service
        lead.status = status
    reply = await _stub(request).UpdateLead(
        pb.UpdateLeadRequest(
            lead_id=lead_id,
            lead=lead,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = lead_json(reply.lead)
    await access.audit_write(lead_id, before_write(reply, lead_json, result), result)
    present = await presenter(access)
    return with_etag(response, present(result))


@router.delete(
    "/leads/{lead_id}",
    status_code=204,
    responses={409: {"description": "LEAD_CONVERTED: the records it became point back at it"}},
)
async def delete_lead(lead_id: str, request: Request, access: LeadsDelete, if_match: IfMatch = "") -> Response:
    """A lead entered by mistake or to be erased, with its activities and tasks (409 when converted:
    the records it became point back at it; it stays as their history)."""
    reply = await _stub(request).DeleteLead(
        pb.DeleteLeadRequest(lead_id=lead_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(lead_id, lead_json(reply.previous), None)
    return Response(status_code=204)


@router.post("/leads/{lead_id}/activities", status_code=201, responses={201: {"model": schemas.LoggedActivity}})
async def log_activity(
    lead_id: str, body: ActivityIn, request: Request, access: LeadsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """A follow-up record; a contact activity moves a new lead to `contacted`; `next_follow_up_at` makes a task.
    Needs `activities: create` as on an account, beside `leads: update` in whose scope the lead must be."""
    access.require_view("activities", "create")
    reply = await _stub(request).LogLeadActivity(
        pb.LogLeadActivityRequest(
            lead_id=lead_id,
            kind=body.kind,
            outcome=body.outcome,
            notes=body.notes,
            occurred_at=_timestamp(body.occurred_at),
            next_follow_up_at=_timestamp(body.next_follow_up_at),
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    activity = _activity_json(reply.activity)
    # The lead's changes with it (status, contact times, score); a key's repeat is audited as a replay.
    before = lead_json(reply.previous) if reply.HasField("previous") else None
    after = {**lead_json(reply.lead), "activity": activity} if before is not None else {"activity": activity}
    await access.audit_write(lead_id, before, after, action="log_activity")
    present = await presenter(access)
    shown = {"lead": present(lead_json(reply.lead))}
    # The activity is shown with the caller's rules for activities; without them, left out.
    activities = access.view("activities")
    if activities is not None:
        shown["activity"] = activities.present(activity)
    return shown


def _activity_json(activity: leads_pb2.LeadActivity) -> dict[str, Any]:
    body = _message_json(activity)
    body["occurred_at"] = _time(activity.occurred_at)
    body["next_follow_up_at"] = _time(activity.next_follow_up_at)
    body["version"] = activity.version  # a number, as a lead's (JSON of an int64 is a string)
    return body


def _activity_metadata(access: Access) -> tuple[tuple[str, str | bytes], ...]:
    """An activity's correction is made in the caller's scope on activities (their own, for a rep);
    beside it goes their scope on leads as logging an activity checks the lead (`leads: update`,
    403 without it), under which the lead must be."""
    return access.grpc_metadata(access.require_view("leads", "update"))


@router.patch("/leads/{lead_id}/activities/{activity_id}", responses={200: {"model": schemas.LeadActivity}})
async def update_activity(
    lead_id: str,
    activity_id: str,
    body: ActivityPatch,
    request: Request,
    response: Response,
    access: ActivitiesUpdate,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Corrects what a logged activity says happened (the wrong kind, a mistyped note), checked as
    when it was logged; the lead's score is recomputed, and the follow-up task follows
    `next_follow_up_at`. An activity of another lead, or outside the caller's scope on activities,
    is a 404, as is a lead outside their scope on leads."""
    given = body.model_dump(exclude_unset=True)
    if not given:
        raise nothing_to_change()
    access.check_write(given)
    activity = leads_pb2.LeadActivity(
        kind=body.kind or "",
        outcome=body.outcome,
        notes=body.notes,
        occurred_at=_timestamp(body.occurred_at),
        next_follow_up_at=_timestamp(body.next_follow_up_at),
    )
    reply = await _stub(request).UpdateLeadActivity(
        pb.UpdateLeadActivityRequest(
            lead_id=lead_id,
            activity_id=activity_id,
            activity=activity,
            update_mask=field_mask_pb2.FieldMask(paths=list(given)),
            expected_version=expected_version(if_match),
        ),
        metadata=_activity_metadata(access),
    )
    result = _activity_json(reply.activity)
    await access.audit_write(activity_id, _activity_json(reply.previous), result)
    return with_etag(response, access.present(result))


@router.delete("/leads/{lead_id}/activities/{activity_id}", status_code=204)
async def delete_activity(
    lead_id: str, activity_id: str, request: Request, access: ActivitiesDelete, if_match: IfMatch = ""
) -> Response:
    """An activity logged by mistake (on the wrong lead, say), under the scopes of the PATCH: the
    lead's score is recomputed and the activity's open follow-up task cancelled; the lead's last
    activity time and first contact stay."""
    reply = await _stub(request).DeleteLeadActivity(
        pb.DeleteLeadActivityRequest(
            lead_id=lead_id, activity_id=activity_id, expected_version=expected_version(if_match)
        ),
        metadata=_activity_metadata(access),
    )
    await access.audit_write(activity_id, _activity_json(reply.activity), None)
    return Response(status_code=204)


@router.get("/leads/{lead_id}/activities", responses={200: {"model": schemas.LeadActivityPage}})
async def list_activities(
    lead_id: str, request: Request, access: LeadsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """The lead's follow-ups, shown with the caller's rules for activities (403 without a grant)."""
    activities = access.require_view("activities")
    reply = await _stub(request).ListLeadActivities(
        pb.ListLeadActivitiesRequest(lead_id=lead_id, page=_page(access.page_limit(limit), cursor)),
        metadata=access.grpc_metadata(),
    )
    return {
        "items": activities.present_many(_activity_json(item) for item in reply.items),
        "next_cursor": reply.page_info.next_cursor or None,
    }


TaskStatus = Literal["open", "done", "cancelled"]


@router.get("/leads/{lead_id}/tasks", responses={200: {"model": schemas.LeadTaskList}})
async def list_tasks(
    lead_id: str,
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    status: Annotated[TaskStatus | None, Query(description="only the tasks of this status; all when left out")] = None,
) -> dict[str, Any]:
    """The lead's follow-up tasks in the order they were created, one page at a time, shown with the
    caller's rules for tasks (403 without a grant)."""
    tasks = access.require_view("tasks")
    tasks.check_filters({"status": "status"})
    reply = await _stub(request).ListLeadTasks(
        pb.ListLeadTasksRequest(lead_id=lead_id, status=status or "", page=_page(access.page_limit(limit), cursor)),
        metadata=access.grpc_metadata(),
    )
    return {
        "items": tasks.present_many(_task_json(item) for item in reply.items),
        "next_cursor": reply.page_info.next_cursor or None,
    }


def _task_json(task: leads_pb2.LeadTask) -> dict[str, Any]:
    body = _message_json(task)
    for name in ("due_at", "created_at", "completed_at"):
        body[name] = _time(getattr(task, name))
    return body


@router.get("/lead-tasks", responses={200: {"model": schemas.ScopedLeadTaskPage}})
async def list_lead_tasks(
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    owner_id: Annotated[str, Query(description="the tasks of this user; `me` for the caller")] = "",
    status: Annotated[TaskStatus, Query(description="open by default")] = "open",
    kind: Annotated[
        Literal["first_contact", "follow_up"] | None,
        Query(description="first_contact (the SLA's task) or follow_up (an activity's `next_follow_up_at`)"),
    ] = None,
    due: Annotated[
        Literal["today", "overdue"] | None,
        Query(description="today: due within the current UTC day; overdue: open and due before now"),
    ] = None,
) -> dict[str, Any]:
    """The follow-up tasks of the leads in the caller's scope (a rep's own, a manager's team's), by
    due time, each with its lead's name; of those, only the caller's own tasks when their scope on
    tasks is `own` (a rep's pool leads may carry others' tasks). Shown with the caller's rules for
    tasks, the name with their rules for a lead's name (403 without a grant on tasks)."""
    tasks = access.require_view("tasks")
    tasks.check_filters({"owner_id": "owner_id", "status": "status", "kind": "kind", "due": "due_at"})
    owner_id = access.resolve_me(owner_id)
    reply = await _stub(request).SearchLeadTasks(
        pb.SearchLeadTasksRequest(
            page=_page(access.page_limit(limit), cursor),
            owner_id=owner_id,
            status=status,
            kind=kind or "",
            due=due or "",
        ),
        metadata=access.grpc_metadata(tasks),  # the call's scope is on leads; the tasks' goes along
    )
    items = [
        tasks.present(_task_json(item))
        | access.present_derived({"lead_name": reply.lead_names[item.lead_id]}, like="name")
        for item in reply.items
    ]
    return {"items": items, "next_cursor": reply.page_info.next_cursor or None}


@router.get("/leads/{lead_id}/score-history", responses={200: {"model": schemas.ScoreHistory}})
async def score_history(
    lead_id: str, request: Request, access: LeadsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """Each recomputation of the lead's score, oldest first, one page at a time, shown as the caller
    sees the lead's score and grade."""
    reply = await _stub(request).GetLeadScoreHistory(
        pb.GetLeadScoreHistoryRequest(lead_id=lead_id, page=_page(access.page_limit(limit), cursor)),
        metadata=access.grpc_metadata(),
    )
    return {
        "items": [
            {
                **access.present_derived({"previous_score": item.previous_score, "score": item.score}, like="score"),
                **access.present_derived({"previous_grade": item.previous_grade, "grade": item.grade}, like="grade"),
                "matched_rule_ids": list(item.matched_rule_ids),
                "changed_at": _time(item.changed_at),
            }
            for item in reply.items
        ],
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.post("/leads/{lead_id}/assign", responses={200: {"model": schemas.Lead}})
async def assign_lead(
    lead_id: str,
    body: AssignIn,
    request: Request,
    response: Response,
    access: LeadsAssign,
    if_match: IfMatch = "",
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Assigns to a user, or (no owner_id) runs the assignment rules; no match puts the lead in the
    pool. Repeated with its `Idempotency-Key`, it answers with the lead as it is now: the first
    request's assignment stands, the rules do not run again."""
    reply = await _stub(request).AssignLead(
        pb.AssignLeadRequest(
            lead_id=lead_id,
            owner_id=body.owner_id or "",
            team=body.team or "",
            expected_version=expected_version(if_match),
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    result = lead_json(reply.lead)
    await access.audit_write(lead_id, before_write(reply, lead_json, result), result)
    present = await presenter(access)
    return with_etag(response, present(result))


def _transfer_json(reply: pb.TransferLeadsResponse) -> dict[str, Any]:
    return {
        "bulk_transfer_id": reply.bulk_transfer_id,
        "leads_transferred": reply.leads_transferred,
        "tasks_transferred": reply.tasks_transferred,
        "skipped_lead_ids": list(reply.skipped_lead_ids),
    }


@router.post("/leads:transfer", responses={200: {"model": schemas.LeadTransfer}})
async def transfer_leads(
    body: TransferIn, request: Request, access: LeadsAssign, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """A departing rep's leads to another rep (人走客户不走), as `POST /accounts:transfer` moves their
    accounts: every lead `from_owner_id` is working in the caller's scope (new, contacted or
    qualified, out of the pool; converted and disqualified ones stay) goes to `to_owner_id`, with its
    open first-contact and follow-up tasks, each as `POST /leads/{id}/assign` gives a lead to a rep
    (a fresh first-contact SLA for one not contacted yet; the assignment rules' capacity caps do not
    apply). A lead whose conversion is under way stays, named in `skipped_lead_ids` (transfer again
    once it has ended); one whose conversion an outage interrupted moves. On the audit trail once for
    the transfer and once on each lead it moved. Repeated with its `Idempotency-Key`, it answers as
    the first request and moves nothing more."""
    access.check_write(["owner_id", "team"] if body.to_team else ["owner_id"])
    reply = await _stub(request).TransferLeads(
        pb.TransferLeadsRequest(
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
        reply.lead_ids,
        to_team=body.to_team or "",
    )
    return _transfer_json(reply)


@router.post("/leads/{lead_id}/disqualify", responses={200: {"model": schemas.Lead}})
async def disqualify_lead(
    lead_id: str,
    body: DisqualifyIn,
    request: Request,
    response: Response,
    access: LeadsUpdate,
    if_match: IfMatch = "",
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Closes an open lead as `unqualified`, with the reason (required) in `disqualified_reason`."""
    reply = await _stub(request).DisqualifyLead(
        pb.DisqualifyLeadRequest(
            lead_id=lead_id,
            reason=body.reason,
            expected_version=expected_version(if_match),
            idempotency_key=idempotency_key,
        ),
        metadata=access.grpc_metadata(),
    )
    result = lead_json(reply.lead)
    await access.audit_write(lead_id, before_write(reply, lead_json, result), result)
    present = await presenter(access)
    return with_etag(response, present(result))


@router.post("/leads/{lead_id}/convert", responses={200: {"model": schemas.Conversion}})
async def convert_lead(
    lead_id: str, body: ConvertIn, request: Request, access: LeadsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """Lead -> account (new or `account_id`) + contact (+ opportunity), idempotent; a partial failure is undone."""
    opportunity = body.opportunity or OpportunityIn()
    message = pb.ConvertLeadRequest(
        lead_id=lead_id,
        account_id=body.account_id,
        account_name=body.account_name,
        create_opportunity=body.create_opportunity or body.opportunity is not None,
        opportunity_name=opportunity.name,
        pipeline_id=opportunity.pipeline_id,
        idempotency_key=idempotency_key,
    )
    if opportunity.amount is not None:
        message.opportunity_amount.CopyFrom(opportunity.amount.proto())
    if opportunity.expected_close_date is not None:
        close = datetime.combine(opportunity.expected_close_date, datetime.min.time())
        message.expected_close_date.FromDatetime(close)
    # Converting creates (or joins) an account, creates a contact and maybe a deal in their own
    # services, which trust the gateway: the caller needs those grants as well as leads update, and
    # the leads service makes each of those calls in the caller's scope on that resource.
    targets = [
        access.require_view("accounts", "read" if body.account_id else "create"),
        access.require_view("contacts", "create"),
    ]
    if message.create_opportunity:
        opportunities = access.require_view("opportunities", "create")
        opportunities.check_write(opportunity.model_dump(exclude_unset=True, exclude_defaults=True))
        targets.append(opportunities)
    reply = await _stub(request).ConvertLead(message, metadata=access.grpc_metadata(*targets))
    result = lead_json(reply.lead)
    await access.audit_write(lead_id, before_write(reply, lead_json, result), result)
    if reply.HasField("previous"):  # converted now: what it made in the other services is on their trails
        made = [
            (targets[0], reply.account_created, reply.account_id),
            (targets[1], reply.contact_created, reply.contact_id),
        ]
        if message.create_opportunity:
            made.append((targets[2], True, reply.opportunity_id))
        for view, created, record_id in made:
            if created and record_id:
                await view.audit("create", record_id, reason=f"converted from lead {lead_id}")
    present = await presenter(access)
    return {
        "lead": present(result),
        "account_id": reply.account_id,
        "contact_id": reply.contact_id,
        "opportunity_id": reply.opportunity_id or None,
    }


# --- lead pool -----------------------------------------------------------------------------------


@router.get("/lead-pool", responses={200: {"model": schemas.LeadPage}})
async def list_pool(
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    sort: LeadSort = "-created_at",
    region: Annotated[str, Query(description=_EXACTLY.format("region"))] = "",
    industry: Annotated[str, Query(description=_EXACTLY.format("industry"))] = "",
    source: Annotated[str, Query(description=_EXACTLY.format("source"))] = "",
) -> dict[str, Any]:
    """The pool's open leads in the caller's record scope, sorted as `GET /leads` sorts (`-score`:
    the best scored first), to claim with `POST /leads/{id}/claim`."""
    access.check_filters({"region": "region", "industry": "industry", "source": "source"})
    access.check_filter([sort])
    reply = await _stub(request).ListLeadPool(
        pb.ListLeadPoolRequest(
            page=_page(access.page_limit(limit), cursor, sort), region=region, industry=industry, source=source
        ),
        metadata=access.grpc_metadata(),
    )
    present = await presenter(access)
    return {
        "items": [present(lead_json(item)) for item in reply.items],
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.post(
    "/leads/{lead_id}/claim",
    responses={
        200: {"model": schemas.Lead},
        409: {"description": "CLAIM_LIMIT, or RECLAIM_COOLDOWN (a lead recycled from the caller lately)"},
    },
)
async def claim_lead(
    lead_id: str, request: Request, response: Response, access: LeadsUpdate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """Takes a pool lead (within the per-rep claim limit: 409 `CLAIM_LIMIT` beyond it; 409
    `RECLAIM_COOLDOWN` for a lead recycled from the caller not long ago). Needs `activities: create`
    beside `leads: update`."""
    if access.view("activities", "create") is None:
        # A claimed lead is worked by logging its first contact: whoever may not log one would only
        # keep it from the reps who may until it is recycled.
        raise forbidden("claiming a lead from the pool needs the grant to create activities")
    reply = await _stub(request).ClaimLead(
        pb.ClaimLeadRequest(lead_id=lead_id, idempotency_key=idempotency_key), metadata=access.grpc_metadata()
    )
    result = lead_json(reply.lead)
    # The service claims only unowned leads of the pool: what the claim changed is known without
    # reading the lead first (no second call on the path of a rush for the pool).
    before = {"owner_id": "", "in_pool": True}
    await access.audit_write(lead_id, before, {name: result[name] for name in before}, action="assign")
    present = await presenter(access)
    return with_etag(response, present(result))


@router.post(
    "/leads/{lead_id}/release",
    responses={200: {"model": schemas.Lead}, 409: {"description": "IN_POOL: the lead is in the pool already"}},
)
async def release_lead(
    lead_id: str,
    request: Request,
    response: Response,
    access: LeadsUpdate,
    body: ReasonIn | None = None,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Gives a lead back to the pool (the body and its reason are optional); 409 `IN_POOL` when it
    is there already."""
    reason = body.reason if body else ""
    # One's own lead goes back with update, anyone else's is an ownership change: without the grant
    # to assign leads, the service releases only the caller's own (checked under the lead's lock).
    reply = await _stub(request).ReleaseLead(
        pb.ReleaseLeadRequest(
            lead_id=lead_id,
            reason=reason,
            idempotency_key=idempotency_key,
            own_only=access.view("leads", "assign") is None,
        ),
        metadata=access.grpc_metadata(),
    )
    result = lead_json(reply.lead)
    await access.audit_write(lead_id, before_write(reply, lead_json, result), result, action="assign", reason=reason)
    present = await presenter(access)
    return with_etag(response, present(result))


# --- engagements (web behaviour) ----------------------------------------------------------------


@router.post("/lead-engagements", responses={200: {"model": schemas.EngagementAnswer}})
async def record_engagements(body: EngagementsIn, request: Request, access: LeadsUpdate) -> dict[str, Any]:
    """Web behaviour a marketing system saw (page views, e-mail opens and clicks, downloads,
    webinars), which scoring rules count (`engagement_kind`, `url_contains`, `min_count`): answered
    item by item, as an import part answers row by row (`recorded`, `duplicate`: its `external_id`
    was recorded on the lead before, so a resent batch counts nothing twice, or `rejected` naming the
    field, `items[3].kind`). Each open lead recorded on is rescored at once; an engagement is no
    contact (no first contact, status, SLA or recycling clock moves). Leads of the caller's scope
    only: any other is not found, as one that does not exist. One audit row per request, with its
    counts."""
    reply = await _stub(request).RecordLeadEngagements(
        pb.RecordLeadEngagementsRequest(
            items=[
                pb.EngagementInput(
                    lead_id=item.lead_id,
                    email=item.email,
                    kind=item.kind,
                    url=item.url,
                    occurred_at=_timestamp(item.occurred_at),
                    external_id=item.external_id,
                )
                for item in body.items
            ]
        ),
        metadata=access.grpc_metadata(),
    )
    counts = f"{reply.recorded} recorded, {reply.duplicates} duplicate, {reply.rejected} rejected"
    await access.audit("record_engagements", reason=f"{len(body.items)} engagements: {counts}")
    return {
        "results": [_message_json(result) for result in reply.results],
        "recorded": reply.recorded,
        "duplicates": reply.duplicates,
        "rejected": reply.rejected,
    }


def _engagement_json(engagement: leads_pb2.Engagement, *, whole_url: bool) -> dict[str, Any]:
    body = _message_json(engagement)
    body["occurred_at"] = _time(engagement.occurred_at)
    body["recorded_at"] = _time(engagement.recorded_at)
    if not whole_url:  # a tracking link's query often carries the lead's address or phone
        body["url"] = url_without_query(body["url"])
    return body


@router.get("/leads/{lead_id}/engagements", responses={200: {"model": schemas.EngagementPage}})
async def list_engagements(
    lead_id: str,
    request: Request,
    access: LeadsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    kind: Annotated[
        schemas.EngagementKind | None,
        Query(
            description="only the engagements of this kind: page_view, email_open, email_click, download or "
            "webinar; every kind when left out"
        ),
    ] = None,
) -> dict[str, Any]:
    """The web behaviour recorded on a lead of the caller's record scope (404 for any other, as for
    one that does not exist), newest first by `occurred_at`, one page at a time. Engagements are none
    of the lead's fields: whoever reads the lead reads them as they were recorded, except that a
    caller who reads the lead's `email` or `phone` masked (marketing, analysts) or not at all sees
    each URL without its query string and fragment (`https://x.cn/p`), where a tracking link carries
    them."""
    reply = await _stub(request).ListLeadEngagements(
        pb.ListLeadEngagementsRequest(lead_id=lead_id, kind=kind or "", page=_page(access.page_limit(limit), cursor)),
        metadata=access.grpc_metadata(),
    )
    contact_points = ["email", "phone"]
    whole_urls = access.in_clear(contact_points) == contact_points
    return {
        "items": [_engagement_json(item, whole_url=whole_urls) for item in reply.items],
        "next_cursor": reply.page_info.next_cursor or None,
    }


# --- scoring and assignment rules ----------------------------------------------------------------


async def _rule(kind: "_RuleKind", request: Request, access: Access, rule_id: str) -> dict[str, Any]:
    reply = await getattr(_stub(request), kind.get)(kind.get_request(rule_id=rule_id), metadata=access.grpc_metadata())
    return _rule_json(reply.rule)


def _partial(model: type[ReplacementBody]) -> type[ReplacementBody]:
    """`model` for a PATCH: every field may be left out (it then stays as it is), with its limits."""
    fields: dict[str, Any] = {
        name: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))  # noqa: UP045
        for name, info in model.model_fields.items()
    }
    partial: type[ReplacementBody] = create_model(  # type: ignore[call-overload]
        f"{model.__name__.removesuffix('In')}Patch",
        __base__=ReplacementBody,
        __doc__="The fields to change; the others stay. Without `If-Match`, the rule as read is the "
        "base: a change made meanwhile is a 412, to read and send again.",
        **fields,
    )
    partial.read_only = model.read_only
    return partial


ScoringRulePatch = _partial(ScoringRuleIn)
AssignmentRulePatch = _partial(AssignmentRuleIn)


@dataclass(frozen=True, slots=True)
class _RuleKind:
    """What a rule's PUT and PATCH need of its kind (scoring or assignment)."""

    model: type[ScoringRuleIn] | type[AssignmentRuleIn]
    message: type[leads_pb2.ScoringRule] | type[leads_pb2.AssignmentRule]
    get: str  # the RPC reading one rule
    get_request: type[Message]
    update: str  # the RPC replacing a rule
    update_request: type[Message]
    action: str  # of the audit row


async def _replace_rule(
    kind: _RuleKind,
    request: Request,
    access: Access,
    rule_id: str,
    rule: ReplacementBody,
    if_match: str,
    *,
    patch: bool,
) -> dict[str, Any]:
    """Writes `rule` over the stored one and audits the change. A PATCH (`patch`) gives only the
    fields to change: they go over the rule as it is, checked as a PUT checks a whole rule (a 422
    naming a bad or unknown field), and the write is at the version read unless `If-Match` names one."""
    stub = _stub(request)
    version = expected_version(if_match)
    if patch:  # the fields given go over the rule as it is, written at the version read
        stored = await _rule(kind, request, access, rule_id)
        try:  # a field given as null is refused here, as its PUT refuses it
            rule = kind.model.model_validate({**stored, **rule.model_dump(exclude_unset=True)})
        except ValidationError as error:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
        version = version or stored["version"]
    reply = await getattr(stub, kind.update)(
        kind.update_request(rule=kind.message(id=rule_id, **rule.model_dump()), expected_version=version),
        metadata=access.grpc_metadata(),
    )
    after = _rule_json(reply.rule)
    await access.audit_write(rule_id, _rule_json(reply.previous), after, action=kind.action)
    return after


def _rule_json(rule: leads_pb2.ScoringRule | leads_pb2.AssignmentRule) -> dict[str, Any]:
    body = _message_json(rule)
    body["version"] = rule.version  # a number, as a lead's (JSON of an int64 is a string)
    return body


def _scoring_rule(body: ScoringRuleIn) -> leads_pb2.ScoringRule:
    return leads_pb2.ScoringRule(**body.model_dump())


def _thresholds_json(thresholds: leads_pb2.GradeThresholds, version: int) -> dict[str, Any]:
    return {**_message_json(thresholds), "version": version}


@router.get("/lead-scoring-rules", responses={200: {"model": schemas.ScoringRules}})
async def list_scoring_rules(
    request: Request, response: Response, access: LeadsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """The rules (each with its version) in the order they were created, one page at a time, and on
    every page the grade thresholds; the `ETag` is the thresholds' version, for the `If-Match` of
    `PUT /lead-scoring-rules/thresholds`."""
    reply = await _stub(request).ListScoringRules(
        pb.ListScoringRulesRequest(page=_page(access.page_limit(limit), cursor)), metadata=access.grpc_metadata()
    )
    thresholds = with_etag(response, _thresholds_json(reply.thresholds, reply.thresholds_version))
    return {
        "items": [_rule_json(r) for r in reply.items],
        "thresholds": thresholds,
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.post("/lead-scoring-rules", status_code=201, responses={201: {"model": schemas.ScoringRule}})
async def create_scoring_rule(
    body: ScoringRuleIn,
    request: Request,
    response: Response,
    access: ScoringRulesManage,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """A scoring rule: a field condition or an activity count that adds (or takes) `points`."""
    reply = await _stub(request).CreateScoringRule(
        pb.CreateScoringRuleRequest(rule=_scoring_rule(body), idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    rule = _rule_json(reply.rule)
    await access.audit_write(rule["id"], None, rule, action="create_scoring_rule")
    return with_etag(response, rule)


@router.put("/lead-scoring-rules/thresholds", responses={200: {"model": schemas.GradeThresholds}})
async def set_thresholds(
    body: ThresholdsIn, request: Request, response: Response, access: ScoringRulesManage, if_match: IfMatch = ""
) -> dict[str, Any]:
    """Sets the minimum scores of grades A, B and C (below C is D)."""
    reply = await _stub(request).SetGradeThresholds(
        pb.SetGradeThresholdsRequest(
            thresholds=leads_pb2.GradeThresholds(a=body.a, b=body.b, c=body.c),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    thresholds = _thresholds_json(reply.thresholds, reply.version)
    before = _thresholds_json(reply.previous, reply.previous_version) if reply.HasField("previous") else None
    await access.audit_write("grade_thresholds", before, thresholds, action="set_grade_thresholds")
    return with_etag(response, thresholds)


@router.get("/lead-scoring-rules/{rule_id}", responses={200: {"model": schemas.ScoringRule}})
async def get_scoring_rule(rule_id: str, request: Request, response: Response, access: LeadsRead) -> dict[str, Any]:
    """One scoring rule, with its version as the `ETag`."""
    return with_etag(response, await _rule(SCORING_RULES, request, access, rule_id))


SCORING_RULES = _RuleKind(
    ScoringRuleIn,
    leads_pb2.ScoringRule,
    "GetScoringRule",
    pb.GetScoringRuleRequest,
    "UpdateScoringRule",
    pb.UpdateScoringRuleRequest,
    "update_scoring_rule",
)


@router.put("/lead-scoring-rules/{rule_id}", responses={200: {"model": schemas.ScoringRule}})
async def update_scoring_rule(
    rule_id: str,
    body: ScoringRuleIn,
    request: Request,
    response: Response,
    access: ScoringRulesManage,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Replaces a scoring rule (its `id` and `version` may be sent back as read; they are ignored)."""
    rule = await _replace_rule(SCORING_RULES, request, access, rule_id, body, if_match, patch=False)
    return with_etag(response, rule)


@router.patch("/lead-scoring-rules/{rule_id}", responses={200: {"model": schemas.ScoringRule}})
async def patch_scoring_rule(
    rule_id: str,
    body: ScoringRulePatch,  # type: ignore[valid-type]
    request: Request,
    response: Response,
    access: ScoringRulesManage,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Changes the given fields of a scoring rule (SPEC §3: updates are PATCH); the others stay."""
    rule = await _replace_rule(SCORING_RULES, request, access, rule_id, body, if_match, patch=True)
    return with_etag(response, rule)


@router.delete("/lead-scoring-rules/{rule_id}", status_code=204)
async def delete_scoring_rule(
    rule_id: str, request: Request, access: ScoringRulesManage, if_match: IfMatch = ""
) -> Response:
    """Deletes a scoring rule: leads are scored without it from then on."""
    reply = await _stub(request).DeleteScoringRule(
        pb.DeleteScoringRuleRequest(rule_id=rule_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(rule_id, _rule_json(reply.previous), None, action="delete_scoring_rule")
    return Response(status_code=204)


def _assignment_rule(body: AssignmentRuleIn) -> leads_pb2.AssignmentRule:
    return leads_pb2.AssignmentRule(**body.model_dump())


@router.get("/lead-assignment-rules", responses={200: {"model": schemas.AssignmentRuleList}})
async def list_assignment_rules(
    request: Request, access: LeadsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """The assignment rules, each with its version, in the order they are tried (by `position`, then
    in the order they were created), one page at a time."""
    reply = await _stub(request).ListAssignmentRules(
        pb.ListAssignmentRulesRequest(page=_page(access.page_limit(limit), cursor)), metadata=access.grpc_metadata()
    )
    return {"items": [_rule_json(r) for r in reply.items], "next_cursor": reply.page_info.next_cursor or None}


@router.post("/lead-assignment-rules", status_code=201, responses={201: {"model": schemas.AssignmentRule}})
async def create_assignment_rule(
    body: AssignmentRuleIn,
    request: Request,
    response: Response,
    access: AssignmentRulesManage,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """An assignment rule: the first enabled rule (by `position`) whose conditions all hold assigns a lead."""
    reply = await _stub(request).CreateAssignmentRule(
        pb.CreateAssignmentRuleRequest(rule=_assignment_rule(body), idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    rule = _rule_json(reply.rule)
    await access.audit_write(rule["id"], None, rule, action="create_assignment_rule")
    return with_etag(response, rule)


@router.get("/lead-assignment-rules/{rule_id}", responses={200: {"model": schemas.AssignmentRule}})
async def get_assignment_rule(rule_id: str, request: Request, response: Response, access: LeadsRead) -> dict[str, Any]:
    """One assignment rule, with its version as the `ETag`."""
    return with_etag(response, await _rule(ASSIGNMENT_RULES, request, access, rule_id))


ASSIGNMENT_RULES = _RuleKind(
    AssignmentRuleIn,
    leads_pb2.AssignmentRule,
    "GetAssignmentRule",
    pb.GetAssignmentRuleRequest,
    "UpdateAssignmentRule",
    pb.UpdateAssignmentRuleRequest,
    "update_assignment_rule",
)


@router.put("/lead-assignment-rules/{rule_id}", responses={200: {"model": schemas.AssignmentRule}})
async def update_assignment_rule(
    rule_id: str,
    body: AssignmentRuleIn,
    request: Request,
    response: Response,
    access: AssignmentRulesManage,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Replaces an assignment rule (its `id` and `version` may be sent back as read; they are ignored)."""
    rule = await _replace_rule(ASSIGNMENT_RULES, request, access, rule_id, body, if_match, patch=False)
    return with_etag(response, rule)


@router.patch("/lead-assignment-rules/{rule_id}", responses={200: {"model": schemas.AssignmentRule}})
async def patch_assignment_rule(
    rule_id: str,
    body: AssignmentRulePatch,  # type: ignore[valid-type]
    request: Request,
    response: Response,
    access: AssignmentRulesManage,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Changes the given fields of an assignment rule (SPEC §3: updates are PATCH); the others stay."""
    rule = await _replace_rule(ASSIGNMENT_RULES, request, access, rule_id, body, if_match, patch=True)
    return with_etag(response, rule)


@router.delete("/lead-assignment-rules/{rule_id}", status_code=204)
async def delete_assignment_rule(
    rule_id: str, request: Request, access: AssignmentRulesManage, if_match: IfMatch = ""
) -> Response:
    """Deletes an assignment rule; leads it assigned keep their owners."""
    reply = await _stub(request).DeleteAssignmentRule(
        pb.DeleteAssignmentRuleRequest(rule_id=rule_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(rule_id, _rule_json(reply.previous), None, action="delete_assignment_rule")
    return Response(status_code=204)


# --- campaigns -----------------------------------------------------------------------------------


def _campaign_input(body: CampaignIn) -> tuple[pb.CampaignInput, list[str]]:
    given = body.model_dump(exclude_unset=True)
    message = pb.CampaignInput(
        name=body.name or "",
        channel=body.channel or "",
        owner_id=body.owner_id or "",
        team=body.team or "",
        starts_on=body.starts_on.isoformat() if body.starts_on else "",
        ends_on=body.ends_on.isoformat() if body.ends_on else "",
    )
    if body.cost is not None:
        message.cost.CopyFrom(body.cost.proto())
    return message, list(given)


@router.post("/campaigns", status_code=201, responses={201: {"model": schemas.Campaign}})
async def create_campaign(
    body: CampaignCreate,
    request: Request,
    response: Response,
    access: CampaignsCreate,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """A marketing campaign that leads, web forms and deals are attributed to (`ends_on` not before `starts_on`)."""
    access.check_write(body.model_dump(exclude_unset=True, exclude_none=True, mode="json"))
    campaign, _ = _campaign_input(body)
    reply = await _stub(request).CreateCampaign(
        pb.CreateCampaignRequest(campaign=campaign, idempotency_key=idempotency_key), metadata=access.grpc_metadata()
    )
    result = campaign_json(reply.campaign)
    await access.audit_write(result["id"], None, result)
    return with_etag(response, access.present(result))


@router.get("/campaigns", responses={200: {"model": schemas.CampaignPage}})
async def list_campaigns(
    request: Request,
    access: CampaignsRead,
    limit: PageLimit = None,
    cursor: PageCursor = "",
    channel: Annotated[str, Query(description="only the campaigns of this channel (exactly)")] = "",
) -> dict[str, Any]:
    """The campaigns, one page at a time, shown with the caller's field rules."""
    access.check_filters({"channel": "channel"})
    reply = await _stub(request).ListCampaigns(
        pb.ListCampaignsRequest(page=_page(access.page_limit(limit), cursor), channel=channel),
        metadata=access.grpc_metadata(),
    )
    return {
        "items": access.present_many(campaign_json(item) for item in reply.items),
        "next_cursor": reply.page_info.next_cursor or None,
    }


@router.get("/campaigns/{campaign_id}", responses={200: {"model": schemas.Campaign}})
async def get_campaign(campaign_id: str, request: Request, response: Response, access: CampaignsRead) -> dict[str, Any]:
    """A campaign, with its version as the `ETag`."""
    reply = await _stub(request).GetCampaign(
        pb.GetCampaignRequest(campaign_id=campaign_id), metadata=access.grpc_metadata()
    )
    return with_etag(response, access.present(campaign_json(reply.campaign)))


@router.patch("/campaigns/{campaign_id}", responses={200: {"model": schemas.Campaign}})
async def update_campaign(
    campaign_id: str,
    body: CampaignIn,
    request: Request,
    response: Response,
    access: CampaignsUpdate,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Changes the fields sent; ending a campaign is setting its `ends_on`."""
    access.check_write(body.model_dump(exclude_unset=True, mode="json"))
    campaign, paths = _campaign_input(body)
    reply = await _stub(request).UpdateCampaign(
        pb.UpdateCampaignRequest(
            campaign_id=campaign_id,
            campaign=campaign,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version(if_match),
        ),
        metadata=access.grpc_metadata(),
    )
    result = campaign_json(reply.campaign)
    await access.audit_write(campaign_id, campaign_json(reply.previous), result)
    return with_etag(response, access.present(result))


@router.delete(
    "/campaigns/{campaign_id}",
    status_code=204,
    responses={409: {"description": "CAMPAIGN_IN_USE: a lead, web form or deal links to it; end it instead"}},
)
async def delete_campaign(
    campaign_id: str, request: Request, access: CampaignsDelete, if_match: IfMatch = ""
) -> Response:
    """A campaign created by mistake (409 while a lead, web form or deal links to it: end it instead,
    by setting its end date, which keeps their links and its ROI history)."""
    await refuse_if_deals_name_campaign(access, campaign_id)
    reply = await _stub(request).DeleteCampaign(
        pb.DeleteCampaignRequest(campaign_id=campaign_id, expected_version=expected_version(if_match)),
        metadata=access.grpc_metadata(),
    )
    await access.audit_write(campaign_id, campaign_json(reply.previous), None)
    return Response(status_code=204)


# --- web forms -----------------------------------------------------------------------------------


@router.post("/webforms", status_code=201, responses={201: {"model": schemas.Webform}})
async def create_webform(
    body: WebformIn, request: Request, response: Response, access: CampaignsCreate, idempotency_key: IdempotencyKey = ""
) -> dict[str, Any]:
    """A public lead form; its `form_key` authenticates submissions."""
    reply = await _stub(request).CreateWebform(
        pb.CreateWebformRequest(webform=leads_pb2.Webform(**body.model_dump()), idempotency_key=idempotency_key),
        metadata=access.grpc_metadata(),
    )
    body_json = _webform_json(reply.webform)
    await access.audit_write(body_json["id"], None, _without_key(body_json), action="create_webform")
    return with_etag(response, body_json)


def _without_key(webform: dict[str, Any]) -> dict[str, Any]:
    """A web form as the audit trail keeps it: its `form_key` is a credential, kept out as API keys'
    secrets are (a rotation is audited without it too)."""
    return {name: value for name, value in webform.items() if name != "form_key"}


@router.get("/webforms", responses={200: {"model": schemas.WebformList}})
async def list_webforms(
    request: Request, access: CampaignsRead, limit: PageLimit = None, cursor: PageCursor = ""
) -> dict[str, Any]:
    """The web forms in the order they were created, one page at a time; each with its `form_key` for
    who may change web forms."""
    reply = await _stub(request).ListWebforms(
        pb.ListWebformsRequest(page=_page(access.page_limit(limit), cursor)), metadata=access.grpc_metadata()
    )
    shown = [_as_read_by(access, _webform_json(w)) for w in reply.items]
    return {"items": shown, "next_cursor": reply.page_info.next_cursor or None}


@router.get("/webforms/{webform_id}", responses={200: {"model": schemas.Webform}})
async def get_webform(webform_id: str, request: Request, response: Response, access: CampaignsRead) -> dict[str, Any]:
    """A web form, with its version as the `ETag` (and its `form_key` for who may change web forms)."""
    reply = await _stub(request).GetWebform(pb.GetWebformRequest(id=webform_id), metadata=access.grpc_metadata())
    return with_etag(response, _as_read_by(access, _webform_json(reply.webform)))


def _as_read_by(access: Access, webform: dict[str, Any]) -> dict[str, Any]:
    """A form's key lets anyone who holds it create and merge leads: a caller who only reads web forms
    (an analyst, a rep) does not get it, as no one gets an API key's secret back."""
    return webform if access.may("update") or access.may("create") else _without_key(webform)


class WebformPatch(RequestBody):
    """The settings to change; the others stay. The key changes only by POST .../rotate-key."""

    name: NonBlank | None = Field(default=None, max_length=200)
    campaign_id: OptionalId = Field(default=None, max_length=36)
    team: OptionalId = Field(default=None, max_length=200)
    region: OptionalId = Field(default=None, max_length=200)
    rate_limit_per_minute: int | None = Field(default=None, ge=1, le=10_000)
    honeypot_field: str | None = Field(default=None, max_length=64)
    enabled: bool | None = Field(default=None, description="false: its submissions answer 404 until turned on")


@router.patch("/webforms/{webform_id}", responses={200: {"model": schemas.Webform}})
async def update_webform(
    webform_id: str,
    body: WebformPatch,
    request: Request,
    response: Response,
    access: CampaignsUpdate,
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """Changes a form's settings, or turns it off (its submissions then answer 404) or on again."""
    given = body.model_dump(exclude_unset=True)
    if not given:
        raise RequestValidationError([{"loc": ("body",), "msg": "names no setting to change", "type": "value_error"}])
    update = pb.UpdateWebformRequest(
        id=webform_id, webform=leads_pb2.Webform(**given), expected_version=expected_version(if_match)
    )
    update.update_mask.paths.extend(given)
    reply = await _stub(request).UpdateWebform(update, metadata=access.grpc_metadata())
    result = _webform_json(reply.webform)
    action = (
        ("enable_webform" if body.enabled else "disable_webform") if set(given) == {"enabled"} else "update_webform"
    )
    await access.audit_write(
        webform_id, _without_key(_webform_json(reply.previous)), _without_key(result), action=action
    )
    return with_etag(response, result)


@router.post("/webforms/{webform_id}/rotate-key", responses={200: {"model": schemas.Webform}})
async def rotate_webform_key(
    webform_id: str,
    request: Request,
    response: Response,
    access: CampaignsUpdate,
    idempotency_key: IdempotencyKey = "",
    if_match: IfMatch = "",
) -> dict[str, Any]:
    """A new `form_key` for a leaked or abused one; the old key stops working at once. A retry with
    the same `Idempotency-Key` draws no other key: it answers with the key the first call drew."""
    reply = await _stub(request).RotateWebformKey(
        pb.RotateWebformKeyRequest(
            id=webform_id, idempotency_key=idempotency_key, expected_version=expected_version(if_match)
        ),
        metadata=access.grpc_metadata(),
    )
    await access.audit("rotate_webform_key", webform_id)
    return with_etag(response, _webform_json(reply.webform))


def _webform_json(webform: leads_pb2.Webform) -> dict[str, Any]:
    body = _message_json(webform)
    body["created_at"] = _time(webform.created_at)
    body["version"] = webform.version  # a number, as a lead's (JSON of an int64 is a string)
    return body


class SubmissionIn(RequestBody):
    """A public form's fields. The intake has no `require` dependency, so its body is checked here."""

    model_config = {"extra": "allow"}
    name: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=64)
    company: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _storable(self) -> "SubmissionIn":
        for loc, problem in unstorable_values(self.model_dump(exclude_none=True)):
            raise ValueError(f"{field_path(loc)}: {problem}")
        return self


# A form's other fields are kept as the lead's custom data: one text value each, of a size a form
# field has. Anything else is refused, naming the field, rather than dropped or kept as a repr.
_SUBMISSION_VALUE_MAX = 2000
_SUBMISSION_FIELDS_MAX = 100
_SUBMISSION_KEY_MAX = 64


def _submission_fields(body: SubmissionIn) -> dict[str, str]:
    given = body.model_dump(exclude_none=True)
    if len(given) > _SUBMISSION_FIELDS_MAX:  # a public route: no lead of 20,000 custom keys
        msg = f"a form submits at most {_SUBMISSION_FIELDS_MAX} fields"
        raise RequestValidationError([{"loc": ("body",), "msg": msg, "type": "value_error"}])
    fields: dict[str, str] = {}
    problems: list[dict[str, Any]] = []
    for key, value in given.items():
        if not key.strip() or len(key) > _SUBMISSION_KEY_MAX:
            msg = f"a field name is 1 to {_SUBMISSION_KEY_MAX} characters, not blank"
            problems.append({"loc": ("body", key), "msg": msg, "type": "value_error"})
            continue
        # The intake carries text (SubmitWebformRequest.fields), as an HTML form does: a JSON bool
        # or number goes as its text (`true`, `12`, `3.5`; str() of a float round-trips), and
        # the leads service reads it back by the custom field's type (custom_fields.from_text), so
        # it is stored as a bool or number there, and as text in a text or undefined field.
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            problems.append({"loc": ("body", key), "msg": "must be text, a number or a boolean", "type": "value_error"})
            continue
        if len(text) > _SUBMISSION_VALUE_MAX:
            msg = f"must be at most {_SUBMISSION_VALUE_MAX} characters"
            problems.append({"loc": ("body", key), "msg": msg, "type": "value_error"})
            continue
        fields[key] = text
    if problems:
        raise RequestValidationError(problems)
    return fields


@router.post(
    "/webforms/{form_key}/submissions",
    status_code=202,
    responses={
        202: {"model": schemas.SubmissionReceived},
        429: {
            "description": "The form's `rate_limit_per_minute` is used up, or this address sent too many "
            "submissions to unknown keys (see Retry-After)"
        },
    },
)
async def submit_webform(
    form_key: PublicKeyPath,
    body: SubmissionIn,
    request: Request,
    idempotency_key: IdempotencyKey = "",
) -> dict[str, Any]:
    """Public intake: no login, the form key authenticates; rate limited per form (429 + Retry-After).
    The answer never echoes the lead: it only acknowledges the submission. A submission that
    created or merged a lead is audited with the form as its actor (`webform_actor`); one refused
    (422, 429) or discarded as a bot's wrote nothing, and leaves no row."""
    fields = _submission_fields(body)
    # The audit trail (and its events) never holds the key: whoever reads it could submit.
    path = path_without_key(request, "form_key", form_key)
    try:
        with noting_replays():
            reply = await _stub(request).SubmitWebform(
                pb.SubmitWebformRequest(form_key=form_key, fields=fields, idempotency_key=idempotency_key),
                timeout=10,
            )
            replayed = replay_noted()
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            # A key no form has: a failed authentication, audited and limited like failed logins.
            await deny_unknown_key(
                request,
                path,
                resource="webforms",
                action="submit",
                message="no such web form",
                too_many="too many submissions to unknown forms",
            )
        raise
    if not reply.discarded_as_spam:
        action, before = _capture_audited(reply)
        await runtime_of(request).audit_public_write(
            request,
            webform_actor(reply.webform_id),
            "leads",
            reply.lead_id,
            before,
            lead_json(reply.lead),
            action=action,
            path=path,
            replayed=replayed,
        )
    # The public answer never says whether the person was already known.
    return {"status": "received"}


def webform_actor(webform_id: str) -> Principal:
    """Who captures a web form's leads: the form itself (by its id, never its key), as the leads
    service acts for it (`LeadsService.capture_submission`), so its events and the audit trail
    name the same actor."""
    return Principal(user_id=f"webform:{webform_id}", kind="webform")
