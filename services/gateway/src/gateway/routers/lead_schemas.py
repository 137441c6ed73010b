"""The answers of the leads routes (`gateway.routers.leads`) as the OpenAPI document shows them.

Documentation only: the routes name these models in `responses=`, which FastAPI puts in the
OpenAPI document without validating any answer (a `response_model` would check every answer, on
the benchmarked lead capture too). The routes build their answers from the leads service's
messages (`lead_json`, `campaign_json`, `_import_json`, ...); these models follow them.

Every field but an id is optional and may be null: the caller's field rules leave hidden fields
out, and mask numbers, times and booleans as null (`gateway.security.masking`). An int64 the
service sends inside a nested message (an import's counts, a row number) is a decimal string, as
protobuf's JSON mapping writes it; a version is a number.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

from gateway.conventions import MoneyOut, Time

# The values the leads service knows (`leads.domain`): a list filter refuses any other by name.
LeadStatus = Literal["new", "contacted", "qualified", "unqualified", "converted", "recycled"]
LeadSource = Literal["website", "webform", "ad", "event", "referral", "wechat", "phone", "email", "import", "other"]
LeadGrade = Literal["A", "B", "C", "D"]
EngagementKind = Literal["page_view", "email_open", "email_click", "download", "webinar"]


class Lead(BaseModel):
    """A lead as the caller may see it (`ETag` carries its `version`)."""

    id: str
    name: str | None = None
    company: str | None = None
    title: str | None = None
    phone: str | None = None
    email: str | None = None
    source: str | None = Field(
        default=None, description="website, webform, ad, event, referral, wechat, phone, email, import or other"
    )
    source_detail: str | None = Field(default=None, description="the original source value behind `source`")
    campaign_id: str | None = None
    region: str | None = None
    industry: str | None = None
    status: str | None = Field(
        default=None, description="new, contacted, qualified, unqualified, converted or recycled"
    )
    score: int | None = None
    grade: str | None = Field(default=None, description="A, B, C or D")
    owner_id: str | None = Field(default=None, description="empty while the lead is in the pool")
    team: str | None = None
    tags: list[str] | None = None
    custom: dict[str, Any] | None = None
    external_id: str | None = None
    matched_contact_id: str | None = Field(default=None, description="the existing contact with its email or phone")
    disqualified_reason: str | None = None
    converted_account_id: str | None = None
    converted_contact_id: str | None = None
    converted_opportunity_id: str | None = None
    import_id: str | None = Field(default=None, description="the import key of the import that created it")
    in_pool: bool | None = None
    follow_up_overdue: bool | None = Field(default=None, description="the first-contact SLA passed without contact")
    version: int | None = None
    created_at: Time = None
    updated_at: Time = None
    assigned_at: Time = None
    first_contacted_at: Time = None
    last_activity_at: Time = None
    first_contact_due_at: Time = None
    recycled_at: Time = None


class LeadPage(BaseModel):
    items: list[Lead]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")


class LeadSummary(BaseModel):
    group_by: str
    counts: dict[str, int] = Field(description='leads per value of the `group_by` field ("" for none)')
    total: int


class LeadActivity(BaseModel):
    """A follow-up record (`ETag` of its PATCH carries its `version`)."""

    id: str
    lead_id: str | None = None
    kind: str | None = Field(default=None, description="call, email, meeting, visit, note or wechat")
    outcome: str | None = None
    notes: str | None = None
    actor_id: str | None = None
    occurred_at: Time = None
    next_follow_up_at: Time = None
    version: int | None = None


class LeadActivityPage(BaseModel):
    items: list[LeadActivity]
    next_cursor: str | None


class LoggedActivity(BaseModel):
    lead: Lead
    activity: LeadActivity | None = Field(
        default=None, description="left out for a caller without a grant to read activities"
    )


class LeadTask(BaseModel):
    id: str
    lead_id: str | None = None
    kind: str | None = Field(default=None, description="first_contact or follow_up")
    owner_id: str | None = None
    status: str | None = Field(default=None, description="open, done or cancelled")
    due_at: Time = None
    created_at: Time = None
    completed_at: Time = None


class LeadTaskList(BaseModel):
    items: list[LeadTask]
    next_cursor: str | None


class ScopedLeadTask(LeadTask):
    lead_name: str | None = Field(default=None, description="the name of the task's lead")


class ScopedLeadTaskPage(BaseModel):
    items: list[ScopedLeadTask]
    next_cursor: str | None


class ScoreChange(BaseModel):
    previous_score: int | None = None
    score: int | None = None
    previous_grade: str | None = None
    grade: str | None = None
    matched_rule_ids: list[str] = []
    changed_at: Time = None


class ScoreHistory(BaseModel):
    items: list[ScoreChange]
    next_cursor: str | None


class Conversion(BaseModel):
    lead: Lead
    account_id: str
    contact_id: str
    opportunity_id: str | None = Field(description="null when no opportunity was created")


class LeadTransfer(BaseModel):
    """What `POST /leads:transfer` moved."""

    bulk_transfer_id: str
    leads_transferred: int = Field(description="the leads the departing rep was working, now the new owner's")
    tasks_transferred: int = Field(description="their open first-contact and follow-up tasks, now the new owner's")
    skipped_lead_ids: list[str] = Field(
        description="the departing rep's leads left with them because their conversion was under way (its account, "
        "contact and deal are made for the owner it began with): transfer again once it has ended"
    )


class EngagementResult(BaseModel):
    index: int = Field(description="the item's 0-based position in `items`")
    status: str = Field(description="recorded, duplicate (its external_id was recorded on the lead before) or rejected")
    lead_id: str = Field(description="the lead it was recorded on; empty when rejected")
    reason: str
    field: str = Field(description="the field a rejection names, as `items[3].kind`")


class EngagementAnswer(BaseModel):
    """What `POST /lead-engagements` did, item by item in request order."""

    results: list[EngagementResult]
    recorded: int
    duplicates: int
    rejected: int


class Engagement(BaseModel):
    """Web behaviour recorded on a lead (`POST /lead-engagements`)."""

    id: str
    lead_id: str | None = None
    kind: str | None = Field(default=None, description="page_view, email_open, email_click, download or webinar")
    url: str | None = Field(
        default=None,
        description="as recorded; without its query string and fragment (`https://x.cn/p`) for a caller who reads "
        "the lead's email or phone masked or not at all",
    )
    occurred_at: Time = None
    external_id: str | None = Field(default=None, description="the sender's event id: recorded once per lead")
    actor_id: str | None = Field(default=None, description="who recorded it (the marketing system's user or API key)")
    recorded_at: Time = None


class EngagementPage(BaseModel):
    items: list[Engagement]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")


class ImportProgress(BaseModel):
    rows_seen: str | None = None
    accepted: str | None = None
    merged: str | None = None
    rejected: str | None = None
    skipped: str | None = None


class ImportRow(BaseModel):
    row: str = Field(description="the 1-based data row (the CSV header is not counted), as a decimal string")
    status: str = Field(description="accepted, merged, rejected or skipped")
    lead_id: str = Field(description="the lead the row became or was merged into")
    field: str = Field(description="the field a rejection names")
    reason: str


class LeadImport(BaseModel):
    """An import under its key (`id`)."""

    id: str
    status: str = Field(description="running, completed or failed")
    progress: ImportProgress = Field(description="counts over every part so far, each a decimal string")
    parts_received: int
    error: str = Field(description="why a failed import failed")
    started_at: Time = None
    finished_at: Time = None
    updated_at: Time = Field(default=None, description="when it last moved: a `running` import that stays put stalled")
    owner_id: str = Field(description="who started it")
    format: str = Field(description="csv, json or jsonl")


class LeadImportPage(BaseModel):
    items: list[LeadImport]
    next_cursor: str | None


class LeadImportStatus(LeadImport):
    rejected_rows: list[ImportRow] = Field(description="a page of the rejected rows by row number, with reasons")
    next_cursor: str | None = Field(description="the `cursor` of the next page of rejected rows; null on the last")


class ImportAnswer(BaseModel):
    import_: LeadImport = Field(alias="import")
    rows: list[ImportRow] = Field(
        description="this part's rejected and merged rows; its accepted ones too with `report_accepted=true`"
    )


class Campaign(BaseModel):
    id: str
    name: str | None = None
    channel: str | None = None
    cost: MoneyOut | None = None
    starts_on: str | None = Field(default=None, description="a date (YYYY-MM-DD); null when not set")
    ends_on: str | None = Field(default=None, description="a date (YYYY-MM-DD); null when not set")
    owner_id: str | None = None
    team: str | None = None
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class CampaignPage(BaseModel):
    items: list[Campaign]
    next_cursor: str | None


class Webform(BaseModel):
    id: str
    name: str
    form_key: str | None = Field(
        default=None,
        description="the key in `POST /webforms/{form_key}/submissions`: a credential, shown only to who may "
        "change web forms (left out for who only reads them)",
    )
    campaign_id: str
    team: str
    region: str
    rate_limit_per_minute: int
    enabled: bool
    honeypot_field: str
    created_at: Time = None
    version: int


class WebformList(BaseModel):
    items: list[Webform]
    next_cursor: str | None


class SubmissionReceived(BaseModel):
    status: str = Field(description='"received", whether a lead was created, merged or the submission discarded')


class ScoringRule(BaseModel):
    id: str
    name: str
    field: str = Field(description="the lead field a field condition looks at (`custom.<key>` too)")
    operator: str = Field(description="equals, not_equals, contains, in, present, absent, gte or lte")
    value: str
    activity_kind: str = Field(description="what an activity-count condition counts: an activity kind, or any")
    min_count: int
    points: int
    enabled: bool
    version: int
    engagement_kind: str = Field(
        description="what an engagement-count condition counts: page_view, email_open, email_click, download or webinar"
    )
    url_contains: str = Field(description="of an engagement condition: only URLs containing this (any case)")


class GradeThresholds(BaseModel):
    """The minimum scores of grades A, B and C (below C is D)."""

    a: int
    b: int
    c: int
    version: int


class ScoringRules(BaseModel):
    items: list[ScoringRule]
    thresholds: GradeThresholds
    next_cursor: str | None


class AssignmentRule(BaseModel):
    id: str
    name: str
    position: int
    enabled: bool
    regions: list[str]
    industries: list[str]
    sources: list[str]
    min_score: int
    max_score: int = Field(description="0: no upper bound")
    team: str
    user_ids: list[str]
    strategy: str = Field(description="round_robin or least_loaded")
    capacity: int = Field(description="open leads per rep; 0: no cap")
    version: int
    lead_team: str = Field(description="the team whose leads the rule matches; empty: any lead")


class AssignmentRuleList(BaseModel):
    items: list[AssignmentRule]
    next_cursor: str | None
