"""Use cases of the leads service. Each loads, decides with `domain`, writes and publishes its
events in one unit of work; the servicer only translates gRPC to these calls and back."""

import asyncio
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2
from crm_platform import custom_fields as cf
from crm_platform import idempotency
from crm_platform.activities import due_before, follow_up_change, may_change_activity
from crm_platform.audit import audit_of_job
from crm_platform.changes import Change
from crm_platform.custom_field_filters import CustomFilter, custom_clauses, typed_filters
from crm_platform.custom_fields_service import load_definitions
from crm_platform.db import delete_expired, held_exclusively, held_now, insert_ignore, single_statements, transaction
from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    CrmError,
    FieldError,
    NotFound,
    PermissionDenied,
    StaleVersion,
    Unavailable,
    ValidationFailed,
    missing_reference,
)
from crm_platform.ids import new_id
from crm_platform.money import Money, check_amount
from crm_platform.outbox import PendingEvent, Transaction, UnitOfWork, outbox_rows, outbox_table
from crm_platform.pagination import keyset_page, next_cursor, page_limit, parse_sort
from crm_platform.principal import (
    ALL_RECORDS,
    SYSTEM,
    Principal,
    RecordScope,
    ScopeKind,
    acting_as,
    current_principal,
    current_request_id,
    current_scope,
    scope_clause,
)
from crm_platform.timeutil import utcnow
from crm_platform.update_mask import writable_paths
from prometheus_client import Counter
from sqlalchemy import (
    Column,
    ColumnElement,
    Select,
    Table,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from leads import domain
from leads import repository as repo
from leads.config import LeadsSettings
from leads.db_ops import bulk_insert
from leads.domain import AssignmentRule, FollowUpPolicy, ScoringRule, Thresholds
from leads.importing import IMPORT_STATUSES, ParserState, RowMapper, RowsDigest, StreamParser, check_import_size
from leads.messages import activity_to_proto, campaign_to_proto, fill_lead, lead_to_proto

LEAD = "lead"
ACTIVITY = "activity"
T = TypeVar("T")
# What a web form's owner sets (besides turning it on and off); its key is drawn by the service.
WEBFORM_SETTINGS = ("name", "campaign_id", "team", "region", "rate_limit_per_minute", "honeypot_field")
log = logging.getLogger(__name__)
# Timers whose changes are audited, by the names the audit records give them (see jobs).
FIRST_CONTACT_JOB = "first-contact-sla"
RECYCLE_JOB = "recycle-idle-leads"
WEBFORM_SPAM = Counter(
    "crm_leads_webform_discarded_total", "Web form submissions discarded: they filled the honeypot", ["webform"]
)


class RateLimited(CrmError):
    """Too many requests (HTTP 429); `retry_after` seconds until the window reopens."""

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class _RepFilledMeanwhile(Exception):
    """A create's rep, picked from loads read without locks, was at capacity by the time its row
    was locked: the create is made again with the loads locked before the pick."""


def actor(principal: Principal) -> common_pb2.Actor:
    return common_pb2.Actor(user_id=principal.user_id, kind=principal.kind)


# --- idempotency -------------------------------------------------------------------------------


async def recall(conn: AsyncConnection, operation: str, key: str, principal: Principal) -> dict[str, Any] | None:
    """The result remembered for the principal's key (leads always remember a small object)."""
    result = await idempotency.recall(conn, repo.idempotency, operation=operation, caller=principal.user_id, key=key)
    return _as_object(result)


async def claim(
    conn: AsyncConnection, operation: str, key: str, principal: Principal, result: Mapping[Any, Any], now: datetime
) -> dict[str, Any] | None:
    """Claims the principal's key for what this call is about to do: None when the key is now this
    call's, else the first call's result. A concurrent first use holds the key until it commits; this
    call waits for it, then answers with its result instead of failing on what it created."""
    earlier = await idempotency.claim(
        conn, repo.idempotency, operation=operation, caller=principal.user_id, key=key, result=dict(result), now=now
    )
    return _as_object(earlier)


def _as_object(result: idempotency.Result | None) -> dict[str, Any] | None:
    return None if result is None else dict(result) if isinstance(result, dict) else {"id": result}


async def remember(
    conn: AsyncConnection, operation: str, key: str, principal: Principal, result: Mapping[Any, Any], now: datetime
) -> None:
    """Inside the creating transaction; a concurrent duplicate that committed first raises IntegrityError."""
    await idempotency.remember(
        conn, repo.idempotency, operation=operation, caller=principal.user_id, key=key, result=dict(result), now=now
    )


# --- cached rules ------------------------------------------------------------------------------

# The one entity whose custom fields the leads service owns (definitions: crm_platform.custom_fields_service).
LEAD_ENTITY = "lead"


RowChange = Change[Mapping[Any, Any]]  # a write of one row, and the row before it


@dataclass(slots=True)
class Rules:
    scoring: list[ScoringRule] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    assignment: list[AssignmentRule] = field(default_factory=list)
    custom_fields: list[cf.FieldDefinition] = field(default_factory=list)
    # The scoring generation these rules are at least as new as (`load_rules`): what a lead scored
    # with them records, so that the rescoring job finds it if they were already stale.
    generation: int = 0
    scorer: domain.Scorer = field(init=False)

    def __post_init__(self) -> None:
        self.scorer = domain.Scorer(self.scoring)  # prepared once per load, used for every lead


@dataclass(frozen=True, slots=True)
class ScoringCounts:
    """What the scoring `rules` count of some leads, read for all of them at once
    (`LeadsService._scoring_counts`): their activities by kind (only when a rule counts activities)
    and their engagements by kind and URL (of the kinds the rules count), by lead id."""

    rules: Rules
    activities: Mapping[str, Mapping[str, int]]
    engagements: Mapping[str, domain.EngagementCounts]


class RulesCache:
    """Scoring and assignment rules per replica, reloaded after `ttl` seconds or on a local change."""

    def __init__(self, engine: AsyncEngine, ttl: float) -> None:
        self.engine = engine
        self.ttl = ttl
        self._rules: Rules | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._rules = None

    async def get(self, *, generation: int = 0) -> Rules:
        """The cached rules, reloaded when older than `ttl` or than the scoring `generation` given
        (a change committed on another replica, which the rescoring job must not score with)."""
        rules = self._rules
        if rules is not None and self._fresh(rules, generation):
            return rules
        async with self._lock:
            rules = self._rules
            if rules is None or not self._fresh(rules, generation):
                async with self.engine.connect() as conn:
                    rules = self._rules = await load_rules(conn)
                self._loaded_at = time.monotonic()
            return rules

    def _fresh(self, rules: Rules, generation: int) -> bool:
        return rules.generation >= generation and time.monotonic() - self._loaded_at < self.ttl


async def load_rules(conn: AsyncConnection) -> Rules:
    # The generation first: under READ COMMITTED each statement sees what committed before it, so
    # the rules read next are at least as new as it (a rule write moves it in its transaction). A
    # lead scored with them may be rescored once more than needed, never left stale.
    generation = await repo.current_scoring_generation(conn)
    scoring = [
        ScoringRule(
            id=r.id,
            points=r.points,
            field=r.field,
            operator=r.operator,
            value=r.value,
            activity_kind=r.activity_kind,
            min_count=r.min_count,
            enabled=r.enabled,
            engagement_kind=r.engagement_kind,
            url_contains=r.url_contains,
        )
        for r in await conn.execute(select(repo.scoring_rules).order_by(repo.scoring_rules.c.id))
    ]
    thresholds, _ = await grade_thresholds(conn)
    # Tried by position, and at one position in the order they were created (ids are time-ordered).
    a = repo.assignment_rules.c
    assignment = [
        assignment_rule_of(r._mapping)
        for r in await conn.execute(select(repo.assignment_rules).order_by(a.position, a.id))
    ]
    definitions = await load_definitions(conn, repo.custom_fields, LEAD_ENTITY)
    return Rules(scoring, thresholds, assignment, definitions, generation)


class VersionedThresholds(NamedTuple):
    thresholds: Thresholds
    version: int


async def grade_thresholds(conn: AsyncConnection, *, for_update: bool = False) -> VersionedThresholds:
    """The grade thresholds and their version, read together (an ETag for what was read); the
    defaults at version 1 while none are set."""
    query = select(repo.settings_table).where(repo.settings_table.c.id == 1)
    row = (await conn.execute(query.with_for_update() if for_update else query)).first()
    if row is None:
        return VersionedThresholds(Thresholds(), 1)
    return VersionedThresholds(Thresholds(row.grade_a, row.grade_b, row.grade_c), row.version)


_ParsedRow = tuple[int, Mapping[str, Any] | str]


class _ParserFailed(Exception):
    """An unexpected error of the import parser (its cause), told apart from database errors."""


async def _digested(chunks: AsyncIterator[bytes], digest: "hashlib._Hash") -> AsyncIterator[bytes]:
    """The chunks, each added to `digest` as it passes."""
    async for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _parsed(parse: Callable[..., Iterator[_ParsedRow]], *chunk: bytes) -> Iterator[_ParsedRow]:
    """The parser's rows; an unexpected parser error becomes `_ParserFailed` (a 422 stays a 422)."""
    try:
        yield from parse(*chunk)
    except ValidationFailed:
        raise
    except Exception as error:
        raise _ParserFailed(f"{type(error).__name__}: {error}") from error


def _period_errors(starts_on: date | None, ends_on: date | None, *, given: Mapping[str, Any]) -> list[FieldError]:
    """A campaign period ending before it starts, named by the date the request gave (`ends_on`
    when it gave both)."""
    if not (starts_on and ends_on and ends_on < starts_on):
        return []
    if "ends_on" in given or "starts_on" not in given:
        return [FieldError("ends_on", f"must not be before starts_on ({starts_on.isoformat()})")]
    return [FieldError("starts_on", f"must not be after ends_on ({ends_on.isoformat()})")]


def checked_custom(
    definitions: Sequence[cf.FieldDefinition], values: Mapping[str, Any], *, partial: bool, lenient: bool = False
) -> dict[str, Any]:
    """Custom values validated against the definitions (422 naming `custom.<key>`), in stored form.

    `lenient` (imports, web forms) keeps keys without a definition as given, so no column of a
    file or field of a form is lost; the defined keys are still checked. These sources write every
    value as text (a CSV cell, a form field), so a defined field's text is read by its type first,
    as a list filter reads it: `12` for a number field, `true` for a bool one.
    """
    by_key = {d.key for d in definitions}
    checked = {k: v for k, v in values.items() if k in by_key} if lenient else dict(values)
    if lenient:
        checked = cf.typed_texts(definitions, checked)
    errors = cf.validate(definitions, checked, partial=partial)
    if errors:
        raise ValidationFailed(errors)
    extra = {k: v for k, v in values.items() if k not in by_key} if lenient else {}
    return {**extra, **cf.coerce(definitions, checked)}


def custom_to_check(
    given: Mapping[str, Any], stored: Mapping[str, Any], definitions: Sequence[cf.FieldDefinition]
) -> dict[str, Any]:
    """The custom values of an update to validate and set. A key no definition has (a web form's or
    a file's field, kept as captured) passes only as stored, sent back by a client that edits the
    object it read, or empty, to remove it; its stored value stays as it is."""
    defined = {d.key for d in definitions}
    return {
        key: value
        for key, value in given.items()
        if key in defined or key not in stored or (value != stored[key] and value not in (None, ""))
    }


def assignment_rule_of(row: Mapping[Any, Any]) -> AssignmentRule:
    return AssignmentRule(
        id=row["id"],
        position=row["position"],
        user_ids=tuple(row["user_ids"]),
        strategy=row["strategy"],
        team=row["team"],
        regions=frozenset(row["regions"]),
        industries=frozenset(row["industries"]),
        sources=frozenset(row["sources"]),
        min_score=row["min_score"],
        max_score=row["max_score"],
        capacity=row["capacity"],
        enabled=row["enabled"],
        lead_team=row["lead_team"],
    )


# --- conversion ports (accounts and sales services) ---------------------------------------------


class ConversionPorts(Protocol):
    """What conversion needs from the accounts and sales services (gRPC in production). A create
    resumes what its key began; with `replay_only` it creates nothing and answers the id its key
    made, "" when none (or deleted since)."""

    async def get_account(self, account_id: str) -> None: ...

    async def create_account(
        self, *, key: str, lead: Mapping[Any, Any], name: str, replay_only: bool = False
    ) -> str: ...

    async def contact_account_id(self, contact_id: str) -> str:
        """The account of the live contact `contact_id` as the call's scope sees it; "" when it is
        deleted, missing or out of that scope."""
        ...

    async def create_contact(
        self, *, key: str, account_id: str, lead: Mapping[Any, Any], replay_only: bool = False
    ) -> str: ...

    async def create_opportunity(
        self,
        *,
        key: str,
        account_id: str,
        contact_id: str,
        lead: Mapping[Any, Any],
        request: "ConvertRequest",
        replay_only: bool = False,
    ) -> str: ...

    async def delete_opportunity(self, opportunity_id: str) -> None: ...

    async def delete_contact(self, contact_id: str) -> None: ...

    async def delete_account(self, account_id: str) -> None: ...

    async def account_used_besides(self, account_id: str, *, contact_id: str, opportunity_id: str) -> bool:
        """Does the account hold a contact, activity or deal other than these (the attempt's own)?"""
        ...


@dataclass(frozen=True, slots=True)
class ConversionScopes:
    """The caller's record scope on each resource a conversion writes, as the gateway's policy
    decided it. Each call to accounts and sales is made in the scope of its own resource, never in
    the caller's scope on leads: a wider scope on leads gives no wider rights on accounts or deals."""

    accounts: RecordScope
    contacts: RecordScope
    opportunities: RecordScope

    @classmethod
    def own(cls, principal: Principal) -> "ConversionScopes":
        """The caller's own records on each: what a call that names no scope gets."""
        scope = RecordScope(ScopeKind.OWN, owner_id=principal.user_id)
        return cls(accounts=scope, contacts=scope, opportunities=scope)


@dataclass(frozen=True, slots=True)
class ConvertRequest:
    lead_id: str
    account_id: str = ""
    account_name: str = ""
    create_opportunity: bool = False
    opportunity_name: str = ""
    opportunity_amount: Money | None = None
    pipeline_id: str = ""
    expected_close_date: date | None = None
    idempotency_key: str = ""
    # None: the caller's own records on each (`ConversionScopes.own`).
    scopes: ConversionScopes | None = None


@dataclass(frozen=True, slots=True)
class ConvertResult:
    lead: RowMapping
    account_id: str
    contact_id: str
    opportunity_id: str
    # The lead before this request converted it (None when it was converted already), for the audit trail.
    previous: RowMapping | None = None
    # Whether this conversion made the account and the contact (not joined or linked existing ones).
    account_created: bool = False
    contact_created: bool = False


@dataclass(frozen=True, slots=True)
class ActivityLogged:
    """A logged activity and its lead after it, and, for the caller's audit trail, the lead before
    it: None for an answer repeating the idempotency key's earlier result (nothing changed then)."""

    activity: Mapping[Any, Any]
    lead: Mapping[Any, Any]
    previous: Mapping[Any, Any] | None = None


@dataclass(frozen=True, slots=True)
class Capture:
    """What a lead capture did, for the caller's audit trail: a merge is audited as the change it
    made to the existing lead, not as a second create."""

    lead: Mapping[Any, Any]
    merged: bool = False
    # The merged lead as it was before the merge. None for a new lead, and for an answer repeating
    # the idempotency key's earlier result (nothing was changed then).
    previous: Mapping[Any, Any] | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """A web form submission's capture, and the form that captured it (the actor, never its key)."""

    webform_id: str
    capture: Capture


@dataclass(frozen=True, slots=True)
class ImportOptions:
    mapper: RowMapper
    on_duplicate: str = "reject"
    assign: bool = False


@dataclass(frozen=True, slots=True)
class ImportSpec:
    import_id: str
    format: str
    options: ImportOptions
    part: int = 0
    final: bool = False
    part_bytes: int = 0  # the part's size, when the sender gives it: 0 if not


@dataclass(frozen=True, slots=True)
class ImportRowOutcome:
    row: int
    status: str
    lead_id: str = ""
    reason: str = ""
    field: str = ""


@dataclass(slots=True)
class _CheckedRow:
    """An import row that passed the checks: the lead as it would be inserted and its LeadCreated
    event, before dedupe, contact linking and assignment (which need the database) decide."""

    row: int
    clean: domain.CleanLead
    values: dict[str, Any]
    keys: list[str]
    matched: list[str]  # ids of the scoring rules that matched
    rule: AssignmentRule | None  # the assignment rule it matches, when the import assigns
    # None when a rule matches: the lead will most likely get an owner, and its event then.
    created: events_pb2.LeadCreated | None


@dataclass(slots=True)
class _CheckedBatch:
    rows: list[_CheckedRow]
    rejected: list[ImportRowOutcome]
    size: int  # rows of the file in the batch
    last_row: int
    now: datetime
    digest: str = ""  # of the part's rows up to last_row (`RowsDigest`), kept with the batch's commit


# Rows parsed or checked between two chances for the batch being written to go on (a few ms).
_CHECK_SLICE = 100
# Attempts at an assignment whose rule is deleted meanwhile, each time (a rare race with an admin).
_RULE_ATTEMPTS = 3
# Probes for the open lead a capture merges into, when the one found was closed, or lost the email or
# phone it was found by, while the capture waited for its row (`_still_duplicate`).
_MERGE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class _ImportMergeTarget:
    """What an import row merges into (`LeadsService._import_merge_target`)."""

    duplicate_of: str | None  # the lead or the earlier row of the batch; None: the row is a new lead
    target: RowMapping | None  # the stored lead, locked, when `duplicate_of` is one
    ids: set[str]  # the open leads found when the row's keys were looked up again


@dataclass(frozen=True, slots=True)
class ImportPartResult:
    lead_import: RowMapping
    outcomes: list[ImportRowOutcome]


def _same_record(key: str, resource: str, first_id: str, record_id: str) -> None:
    """A key repeated for another record is another request, not a retry: refused, never answered
    with the first record's result."""
    if first_id != record_id:
        raise Conflict(
            f"Idempotency-Key {key!r} was used for {resource} {first_id}; use a new key for {resource} {record_id}",
            reason="IDEMPOTENCY_KEY_REUSED",
        )


async def _versioned_write(
    conn: AsyncConnection, table: Any, resource: str, record_id: str, expected_version: int, values: Mapping[str, Any]
) -> RowChange:
    """Writes `values` and adds 1 to the record's version, when `expected_version` is its current
    version or 0 (unconditional); the row stays locked until the caller's transaction ends."""
    current = (await conn.execute(select(table).where(table.c.id == record_id).with_for_update())).mappings().first()
    if current is None:
        raise NotFound(resource, record_id)
    if expected_version and current["version"] != expected_version:
        raise StaleVersion(resource, record_id, current["version"])
    statement = update(table).where(table.c.id == record_id).values(**values, version=table.c.version + 1)
    return Change((await conn.execute(statement.returning(table))).mappings().one(), current)


async def _contact_linked_by(conn: AsyncConnection, lead: Mapping[Any, Any], changes: Mapping[str, Any]) -> str:
    """The contact a lead without one is linked to when a change (an update, a merge) gives it an
    email or phone a contact has, as a create links it (SPEC §4); "" otherwise. A link it has stays."""
    if lead["matched_contact_id"] or not ("email" in changes or "phone" in changes):
        return ""
    email = changes.get("email_norm", lead["email_norm"])
    phone = changes.get("phone_norm", lead["phone_norm"])
    contacts = await repo.known_contacts(conn, emails={email} if email else set(), phones={phone} if phone else set())
    return contacts.get(f"email:{email}") or contacts.get(f"phone:{phone}") or ""


def _in_scope(lead: Mapping[Any, Any]) -> bool:
    """The caller may write to the lead (loaded without the scope's clause), as `_visible_lead`
    finds one for a write: in their scope on leads, and not a pool lead a rep may only claim."""
    scope = current_scope()
    return repo.lead_in_scope(scope, lead) and not repo.claim_first(scope, lead)


async def _out_of_sight(conn: AsyncConnection, lead_ids: Collection[str]) -> set[str]:
    """Those of `lead_ids` outside the caller's scope: an answer names a lead only to who may read it."""
    scope = current_scope()
    if scope.kind == ScopeKind.ALL or not lead_ids:
        return set()
    c = repo.leads.c
    query = select(c.id).where(c.id.in_(sorted(lead_ids)), repo.lead_scope_clause(scope))
    return set(lead_ids) - set(await conn.scalars(query))


def _check_rule_scope(rule: Mapping[Any, Any]) -> None:
    """PermissionDenied naming the field when the caller may not manage this assignment rule."""
    error = domain.rule_scope_error(
        current_scope(), team=rule["team"], lead_team=rule["lead_team"], regions=rule["regions"]
    )
    if error:
        raise PermissionDenied(error.message, field=error.field)


def _check_scoring_change(what: str) -> None:
    """PermissionDenied when the caller may not change the company's scoring (`what` of it)."""
    if error := domain.scoring_change_error(current_scope(), what):
        raise PermissionDenied(error)


def _entered_for(principal: Principal) -> str:
    """The owner of a lead the caller enters or imports without one: a rep (own scope) works only
    the leads they own, so theirs, not the pool's (where they could open it only by a claim, within
    its limit); anyone else's goes to the assignment rules or the pool ("")."""
    return principal.user_id if principal.kind == "user" and current_scope().kind == ScopeKind.OWN else ""


def _team_entered_for(principal: Principal) -> str:
    """The team of a lead the caller enters or imports without one: a sales user's, who works their
    own or their team's leads; none for a caller who sees leads across teams (marketing, an admin),
    so that it goes to the rules or the shared pool, which every team's reps see, and not to the
    pool of a team no rep is in."""
    works_a_team = current_scope().kind in (ScopeKind.OWN, ScopeKind.TEAM)
    return principal.team if principal.kind == "user" and works_a_team else ""


def _still_duplicate(lead: Mapping[Any, Any] | None, clean: domain.CleanLead) -> bool:
    """Whether `lead`, read under its row lock, is still what a create's probe looks for: an open
    lead with the new lead's email or phone."""
    if lead is None or lead["status"] not in domain.OPEN_STATUSES:
        return False
    return bool(
        (clean.email_norm and lead["email_norm"] == clean.email_norm)
        or (clean.phone_norm and lead["phone_norm"] == clean.phone_norm)
    )


async def _merge_target(
    conn: AsyncConnection,
    clean: domain.CleanLead,
    probe: repo.CreateProbe,
    probe_again: Callable[[], Awaitable[repo.CreateProbe]],
) -> tuple[repo.CreateProbe, RowMapping | None]:
    """The open duplicate a create merges `clean` into, its row locked, with the probe that found it;
    None when there is none (the probe's turn and loads then assign the new lead). The probe reads
    the duplicate without locking it, and a disqualify or a conversion takes no dedupe key locks: the
    lead may be closed while the create waits for its row (or its email or phone changed, by a writer
    that read them before the create locked them). Then the create probes again, after that write
    committed, rather than merge into a lead that is no longer the open one with its email or phone:
    a submission merged into a closed lead would be lost, one merged into a lead with another email
    given to another person."""
    for attempt in range(1, _MERGE_ATTEMPTS + 1):
        if probe.duplicate_id is None:
            return probe, None
        duplicate = await repo.load_lead(conn, probe.duplicate_id, for_update=True)
        if _still_duplicate(duplicate, clean):
            return probe, duplicate
        if attempt < _MERGE_ATTEMPTS:
            probe = await probe_again()
    raise Unavailable("the open lead this one duplicates kept changing while it was merged into; try again")


def _held_keys(lead: Mapping[Any, Any]) -> set[str]:
    """The dedupe keys a stored lead holds."""
    return set(domain.dedupe_keys(lead["email_norm"], lead["phone_norm"], lead["external_id"]).values())


def _duplicate_in(keys: Iterable[str], existing: Mapping[str, str], seen: Mapping[str, str]) -> str | None:
    """What an import row with `keys` duplicates: an open lead (`existing`) or an earlier row of its
    batch (`seen`), by its first key either holds; None if neither holds any."""
    return next((existing.get(k) or seen.get(k) for k in keys if k in existing or k in seen), None)


def _dedupe_keys(clean: domain.CleanLead) -> list[str]:
    return list(domain.dedupe_key_fields(clean).values())


@dataclass(frozen=True, slots=True)
class ActivityInput:
    lead_id: str
    kind: str
    outcome: str = ""
    notes: str = ""
    occurred_at: datetime | None = None
    next_follow_up_at: datetime | None = None
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class EngagementOutcome:
    """What became of one item of `record_engagements`, as an import row's outcome tells it."""

    index: int
    status: str  # recorded, duplicate, rejected
    lead_id: str = ""
    reason: str = ""
    field: str = ""  # of a rejection: `items[<index>].<field>`


def _engagement_rejected(index: int, error: FieldError) -> EngagementOutcome:
    name = f"items[{index}].{error.field}"
    return EngagementOutcome(index, "rejected", reason=f"{name}: {error.message}", field=name)


@dataclass(frozen=True, slots=True)
class LeadFilters:
    statuses: Sequence[str] = ()
    sources: Sequence[str] = ()
    owner_id: str = ""
    team: str = ""
    region: str = ""
    industry: str = ""
    grade: str = ""
    campaign_id: str = ""
    tag: str = ""
    q: str = ""
    # The fields `q` searches (SEARCHED_FIELDS; empty: all of them).
    q_fields: Sequence[str] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    source_detail: str = ""
    in_pool: bool | None = None
    follow_up_overdue: bool | None = None
    min_score: int = 0
    # `?custom.<key>=value` pairs, typed against the lead definitions (crm_platform.custom_field_filters).
    custom: Sequence[tuple[str, str]] = ()


# What `q` searches: a lead's name, company and email, case-insensitively, and its phone by the
# query's digits (`138 0013` finds +8613800138000).
SEARCHED_FIELDS = {
    "name": func.lower(repo.leads.c.name),
    "company": func.lower(repo.leads.c.company),
    "email": repo.leads.c.email_norm,
    "phone": repo.leads.c.phone_norm,
}

SORTS = {
    "created_at": repo.leads.c.id,
    "updated_at": repo.leads.c.updated_at,
    "score": repo.leads.c.score,
    "name": repo.leads.c.name,
}


class LeadsService:
    """The use cases. `clock` is injectable so timers can be tested without waiting."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        uow: UnitOfWork,
        settings: LeadsSettings,
        ports: ConversionPorts | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.single_statements = single_statements(engine)
        self.uow = uow
        self.settings = settings
        self.ports = ports
        self.clock = clock
        self.rules = RulesCache(engine, settings.rules_cache_seconds)
        self.outbox = outbox_table(repo.metadata)
        self.policy: FollowUpPolicy = settings.follow_up_policy()

    # --- shared steps -----------------------------------------------------------------------

    async def _visible_lead(
        self, conn: AsyncConnection, lead_id: str, *, for_update: bool = False, scope: RecordScope | None = None
    ) -> RowMapping:
        """The lead in `scope` (the call's record scope when None), else NotFound. Locked
        (`for_update`) for a write, which a rep makes to a pool lead only by claiming it."""
        scope = scope or current_scope()
        query = select(repo.leads).where(repo.leads.c.id == lead_id, repo.lead_scope_clause(scope))
        if for_update:
            query = query.with_for_update()
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound(LEAD, lead_id)
        if for_update and repo.claim_first(scope, row):
            raise Conflict(f"lead {lead_id} is in the pool: claim it first", reason="IN_POOL")
        return row

    async def _check_campaign(self, conn: AsyncConnection, campaign_id: str, field_name: str = "campaign_id") -> None:
        """Raises unless the campaign exists (`_campaign_linkable`)."""
        if campaign_id and not await self._campaign_linkable(conn, campaign_id):
            raise missing_reference(field_name, "campaign", campaign_id)

    @staticmethod
    async def _campaign_linkable(conn: AsyncConnection, campaign_id: str) -> bool:
        """Does the campaign exist? Key-share locks its row to the end of the transaction, so that a
        `delete_campaign` (which locks it for update) either waits for the write linking to it and
        then counts that link, or deletes it first and this finds it gone."""
        query = select(repo.campaigns.c.id).where(repo.campaigns.c.id == campaign_id)
        return await conn.scalar(query.with_for_update(key_share=True, read=True)) is not None

    def _score(
        self,
        rules: Rules,
        lead: Mapping[Any, Any],
        counts: Mapping[str, int],
        engagements: domain.EngagementCounts = domain.NO_ENGAGEMENTS,
    ) -> tuple[int, str, list[str]]:
        score, matched = rules.scorer.score(lead, counts, engagements)
        return score, domain.grade_for(score, rules.thresholds), matched

    async def _pick_by_rules(
        self, conn: AsyncConnection, rules: Rules, lead: Mapping[Any, Any]
    ) -> tuple[str, str, str] | None:
        """(owner, team, rule id) from the first matching rule, or None for the pool: a turn of its
        rotation, and its reps' loads with their rows locked (for a cap or a least-loaded pick).
        A create does the same in its probe (`repo.probe_for_create`); an import batch takes its
        turns and loads once (`domain.pick_in_batch`)."""
        rule = domain.first_matching_rule(rules.assignment, lead)
        if rule is None:
            return None
        turns = await repo.take_turns(conn, {rule.id: 1 if domain.takes_turns(rule) else 0})
        if rule.id not in turns:  # deleted since the cache was loaded
            return None
        loads = await repo.open_loads(conn, rule.user_ids, locked=True) if domain.needs_loads(rule) else {}
        return domain.routed(rule, domain.pick_assignee(rule, loads, turns[rule.id][0] if turns[rule.id] else 0))

    def _assignment_values(self, owner_id: str, team: str, first_contacted: bool, now: datetime) -> dict[str, Any]:
        values: dict[str, Any] = {
            "owner_id": owner_id,
            "assigned_at": now,
            "in_pool": False,
            "follow_up_overdue": False,
            "first_contact_due_at": None if first_contacted else self.policy.first_contact_due(now),
        }
        if team:
            values["team"] = team
        return values

    def _first_contact_task(self, lead_id: str, owner_id: str, now: datetime) -> dict[str, Any]:
        return {
            "id": new_id(),
            "lead_id": lead_id,
            "kind": "first_contact",
            "activity_id": "",  # planned by the assignment, not by an activity
            "owner_id": owner_id,
            "due_at": self.policy.first_contact_due(now),
            "status": "open",
            "created_at": now,
            "completed_at": None,
        }

    def _follow_up_task(
        self, lead: Mapping[Any, Any], activity_id: str, due_at: datetime, principal: Principal, now: datetime
    ) -> dict[str, Any]:
        """The task an activity's `next_follow_up_at` plans: the lead owner's (the caller's on a pool lead)."""
        return {
            "id": new_id(),
            "lead_id": lead["id"],
            "activity_id": activity_id,
            "kind": "follow_up",
            "owner_id": lead["owner_id"] or principal.user_id,
            "due_at": due_at,
            "status": "open",
            "created_at": now,
            "completed_at": None,
        }

    async def _close_tasks(self, conn: AsyncConnection, lead_id: str, status: str, now: datetime) -> None:
        await conn.execute(
            update(repo.tasks)
            .where(repo.tasks.c.lead_id == lead_id, repo.tasks.c.status == "open")
            .values(status=status, completed_at=now)
        )

    async def _close_tasks_done_by_contact(
        self, conn: AsyncConnection, lead_id: str, occurred_at: datetime, now: datetime
    ) -> None:
        """Closes as done the open tasks of the lead a contact at `occurred_at` does (`domain.done_by_contact`)."""
        t = repo.tasks
        open_tasks = await conn.execute(
            select(t.c.id, t.c.kind, t.c.due_at).where(t.c.lead_id == lead_id, t.c.status == "open")
        )
        done = [task.id for task in open_tasks if domain.done_by_contact(task.kind, task.due_at, occurred_at)]
        if done:
            await conn.execute(update(t).where(t.c.id.in_(done)).values(status="done", completed_at=now))

    async def _scoring_counts(
        self, conn: AsyncConnection, lead_ids: Sequence[str], rules: Rules | None = None
    ) -> ScoringCounts:
        """What `rules` (the cached rules when None) count of the leads: a query for their
        activities when a rule counts them, one for their engagements when a rule counts those."""
        if rules is None:
            rules = await self.rules.get()
        activities = await repo.activity_counts_of(conn, lead_ids) if rules.scorer.counts_activities else {}
        engagements = await repo.engagement_counts_of(conn, lead_ids, rules.scorer.engagement_kinds)
        return ScoringCounts(rules, activities, engagements)

    async def _rescore(
        self, tx: Transaction, lead: Mapping[Any, Any], now: datetime, counts: ScoringCounts | None = None
    ) -> dict[str, Any]:
        """Recomputes the score, with `counts` when read for several leads at once (else read for
        this one); writes history and publishes `lead.scored` when it changed, and returns the
        values the caller writes then. A score that stays only records the generation of the rules
        it was computed with, when other than the lead's."""
        if counts is None:
            counts = await self._scoring_counts(tx.conn, [lead["id"]])
        rules, lead_id = counts.rules, lead["id"]
        activities, engagements = counts.activities.get(lead_id, {}), counts.engagements.get(lead_id, {})
        scored = await self._rescored(tx, lead, rules, activities, now, engagements)
        if not scored and lead["scoring_generation"] != rules.generation:
            await repo.record_scoring_generation(tx.conn, [lead_id], rules.generation)
        return scored

    async def _rescored(
        self,
        tx: Transaction,
        lead: Mapping[Any, Any],
        rules: Rules,
        counts: Mapping[str, int],
        now: datetime,
        engagements: domain.EngagementCounts = domain.NO_ENGAGEMENTS,
    ) -> dict[str, Any]:
        """The lead's score, grade and scoring generation under `rules` when its score or grade
        moves (history written, `lead.scored` published), else {}. `counts` are its activities by
        kind, `engagements` its engagements by kind and URL (those of the kinds the rules count)."""
        score, grade, matched = self._score(rules, lead, counts, engagements)
        if score == lead["score"] and grade == lead["grade"]:
            return {}
        await tx.conn.execute(
            insert(repo.score_history).values(
                id=new_id(),
                lead_id=lead["id"],
                previous_score=lead["score"],
                score=score,
                previous_grade=lead["grade"],
                grade=grade,
                matched_rule_ids=matched,
                changed_at=now,
            )
        )
        tx.publish(
            events_pb2.LeadScored(
                lead_id=lead["id"],
                previous_score=lead["score"],
                score=score,
                previous_grade=lead["grade"],
                grade=grade,
                matched_rule_ids=matched,
            ),
            key=lead["id"],
        )
        return {"score": score, "grade": grade, "scoring_generation": rules.generation}

    async def _write(self, conn: AsyncConnection, lead_id: str, values: Mapping[Any, Any]) -> RowMapping:
        row = (
            (
                await conn.execute(
                    update(repo.leads)
                    .where(repo.leads.c.id == lead_id)
                    .values(**values, version=repo.leads.c.version + 1)
                    .returning(repo.leads)
                )
            )
            .mappings()
            .one()
        )
        return row

    async def _write_rescored(
        self, tx: Transaction, lead: Mapping[Any, Any], changes: Mapping[str, Any], now: datetime
    ) -> RowMapping:
        """Writes `changes` with the score they give the lead (`_rescore`), as one new version."""
        scored = await self._rescore(tx, {**lead, **changes}, now)
        return await self._write(tx.conn, lead["id"], {**changes, **scored})

    # --- capture ----------------------------------------------------------------------------

    async def create_lead(
        self,
        data: Mapping[Any, Any],
        *,
        on_duplicate: str = "reject",
        idempotency_key: str = "",
        defaults: Mapping[Any, Any] | None = None,
        lenient_custom: bool = False,
    ) -> tuple[Mapping[Any, Any], bool]:
        """Creates a lead (or merges it into its open duplicate); returns (lead, merged)."""
        capture = await self.capture_lead(
            data,
            on_duplicate=on_duplicate,
            idempotency_key=idempotency_key,
            defaults=defaults,
            lenient_custom=lenient_custom,
        )
        return capture.lead, capture.merged

    async def capture_lead(
        self,
        data: Mapping[Any, Any],
        *,
        on_duplicate: str = "reject",
        idempotency_key: str = "",
        defaults: Mapping[Any, Any] | None = None,
        lenient_custom: bool = False,
    ) -> Capture:
        """`create_lead`, telling also what a merge changed (the lead as it was before it)."""
        on_duplicate = on_duplicate or "reject"
        if on_duplicate not in domain.ON_DUPLICATE:
            raise ValidationFailed([FieldError("on_duplicate", f"{on_duplicate!r} is not one of reject, merge, allow")])
        clean = domain.validate_lead(data, default_country=self.settings.default_country_code)
        rules = await self.rules.get()
        if rules.custom_fields or clean.values.get("custom"):
            clean.values["custom"] = checked_custom(
                rules.custom_fields, clean.values.get("custom") or {}, partial=False, lenient=lenient_custom
            )

        async def attempt(current: Rules) -> Capture:
            try:
                return await self._create_once(
                    clean, on_duplicate, idempotency_key, defaults or {}, current, lock_loads=False
                )
            except _RepFilledMeanwhile:  # a concurrent create took the picked rep's last place: pick again, exactly
                return await self._create_once(
                    clean, on_duplicate, idempotency_key, defaults or {}, current, lock_loads=True
                )

        return await self._again_if_rule_deleted(attempt, rules)

    async def _again_if_rule_deleted(self, attempt: Callable[[Rules], Awaitable[T]], rules: Rules) -> T:
        """`attempt(rules)`, made again with the rules as they are now when the rule it assigned by
        was deleted while it took a turn (`repo.rule_deleted_meanwhile`)."""
        for _ in range(_RULE_ATTEMPTS):
            try:
                return await attempt(rules)
            except DBAPIError as error:
                if not repo.rule_deleted_meanwhile(error):
                    raise
                self.rules.invalidate()
                rules = await self.rules.get()
        raise Unavailable("the assignment rules kept changing while the lead was assigned; try again")

    async def _create_once(
        self,
        clean: domain.CleanLead,
        on_duplicate: str,
        idempotency_key: str,
        defaults: Mapping[Any, Any],
        rules: Rules,
        *,
        lock_loads: bool,
    ) -> Capture:
        """One attempt at `create_lead`, in one transaction. A capped round-robin pick reads its
        reps' loads without locks and checks the picked rep under its row lock on insert
        (`_RepFilledMeanwhile` if full by then); with `lock_loads` (and for least-loaded picks)
        the reps' rows are locked before the pick."""
        principal = current_principal()
        now = self.clock()
        values, matched = self._new_lead(clean, principal, now, rules, defaults)
        async with self.uow.begin() as tx:
            conn = tx.conn
            claimed = {"lead_id": values["id"], "merged": False}
            earlier = await claim(conn, "create_lead", idempotency_key, principal, claimed, now)
            if earlier is not None:
                return Capture(await self._visible_lead(conn, earlier["lead_id"]), bool(earlier["merged"]))
            given_campaign = clean.values.get("campaign_id", "")
            await self._check_campaign(conn, given_campaign)
            if values["campaign_id"] != given_campaign and not await self._campaign_linkable(
                conn, values["campaign_id"]
            ):
                # The web form's campaign, unlinked from the form and deleted since the form was read:
                # the submission is captured all the same, as the form now is, without it.
                values["campaign_id"] = ""
            rule = None if values["owner_id"] else domain.first_matching_rule(rules.assignment, values)

            async def probed() -> repo.CreateProbe:
                return await repo.probe_for_create(
                    conn,
                    email_norm=clean.email_norm,
                    phone_norm=clean.phone_norm,
                    check_duplicates=on_duplicate != "allow",
                    rule_id=rule.id if rule is not None else "",
                    user_ids=rule.user_ids if rule is not None else (),
                    loads=rule is not None and domain.needs_loads(rule),
                    take_turn=rule is not None and domain.takes_turns(rule),
                    lock_loads=lock_loads or (rule is not None and not domain.takes_turns(rule)),
                )

            probe = await probed()
            duplicate = None
            if on_duplicate == "merge":
                probe, duplicate = await _merge_target(conn, clean, probe, probed)
            elif probe.duplicate_id is not None:
                duplicate = await repo.load_lead(conn, probe.duplicate_id)
            duplicate_id = probe.duplicate_id
            if duplicate_id is not None:
                if duplicate is None or on_duplicate != "merge" or not _in_scope(duplicate):
                    # A merge writes only leads the caller may see; the answer names only one they may read.
                    if duplicate is not None and repo.lead_in_scope(current_scope(), duplicate):
                        found = f"an open lead with this email or phone exists: {duplicate_id}"
                        raise AlreadyExists(found, existing_id=duplicate_id)
                    raise AlreadyExists("an open lead with this email or phone exists, outside your leads")
                held = await self._keys_held_elsewhere(conn, duplicate, clean)
                merged = await self._merge(tx, duplicate, clean, principal, now, held=held)
                await idempotency.settle(
                    conn, repo.idempotency, operation="create_lead", caller=principal.user_id, key=idempotency_key,
                    result={"lead_id": merged["id"], "merged": True},
                )  # fmt: skip
                return Capture(merged, merged=True, previous=duplicate)
            return Capture(
                await self._insert_lead(tx, values, matched, rule, probe, principal, now, loads_locked=lock_loads)
            )

    async def _keys_held_elsewhere(
        self, conn: AsyncConnection, lead: Mapping[Any, Any], clean: domain.CleanLead
    ) -> set[str]:
        """The email or phone a merge of `clean` would give `lead` that another open lead holds. At
        most one: the lead was found by the other. The create holds both keys' locks, so none is
        given to a lead meanwhile."""
        held: set[str] = set()
        for key in domain.keys_a_merge_fills(lead, clean):
            kind, _, value = key.partition(":")
            if kind not in ("email", "phone"):
                continue
            other = await repo.find_open_duplicate(
                conn,
                email_norm=value if kind == "email" else None,
                phone_norm=value if kind == "phone" else None,
                excluding=lead["id"],
            )
            if other is not None:
                held.add(key)
        return held

    async def _merge(
        self,
        tx: Transaction,
        existing: RowMapping,
        clean: domain.CleanLead,
        principal: Principal,
        now: datetime,
        *,
        held: Collection[str] = (),
    ) -> RowMapping:
        """Merges `clean` into `existing`, leaving unfilled the dedupe keys other open leads hold (`held`)."""
        changes = domain.merge_into(existing, clean, held)
        if not changes:
            return existing
        if contact_id := await _contact_linked_by(tx.conn, existing, changes):
            changes["matched_contact_id"] = contact_id
        row = await self._write_rescored(tx, existing, {**changes, "updated_at": now}, now)
        tx.publish(
            events_pb2.LeadUpdated(
                lead=lead_to_proto(row), changed_fields=domain.changed_lead_fields(changes), actor=actor(principal)
            ),
            key=row["id"],
        )
        return row

    def _new_lead(
        self,
        clean: domain.CleanLead,
        principal: Principal,
        now: datetime,
        rules: Rules,
        defaults: Mapping[Any, Any],
    ) -> tuple[dict[str, Any], list[str]]:
        """The new lead's row as far as it depends on nothing stored (scored, not yet assigned or
        linked to a contact), and the ids of the scoring rules it matched."""
        values: dict[str, Any] = {
            "name": "",
            "company": "",
            "title": "",
            "phone": "",
            "email": "",
            "source": "other",
            "source_detail": "",
            "campaign_id": "",
            "region": "",
            "industry": "",
            "owner_id": "",
            "team": "",
            "tags": [],
            "custom": {},
            "external_id": "",
        }
        values.update({k: v for k, v in defaults.items() if v})
        values.update({k: v for k, v in clean.values.items() if v not in (None, "") or k not in defaults})
        if not values["team"]:
            values["team"] = _team_entered_for(principal)
        if not values["owner_id"]:
            values["owner_id"] = _entered_for(principal)
        status = values.pop("status", None) or "new"
        values.update(
            id=new_id(),
            status=status,
            email_norm=clean.email_norm,
            phone_norm=clean.phone_norm,
            created_at=now,
            updated_at=now,
            version=1,
            in_pool=False,
            follow_up_overdue=False,
        )
        score, grade, matched = self._score(rules, values, {})
        values.update(score=score, grade=grade, scoring_generation=rules.generation)
        return values, matched

    async def _insert_lead(
        self,
        tx: Transaction,
        values: dict[str, Any],
        matched: list[str],
        rule: domain.AssignmentRule | None,
        probe: repo.CreateProbe,
        principal: Principal,
        now: datetime,
        *,
        loads_locked: bool,
    ) -> Mapping[Any, Any]:
        """Inserts the lead of `_new_lead`, linked to its contact and assigned: to its owner, or by
        its matched rule to a rep with room, or else into the pool."""
        lead_id = values["id"]
        values["matched_contact_id"] = probe.contact_id
        rule_id = ""
        capped_owner = ""  # a rep picked by a cap read without locks, checked on insert
        if values["owner_id"]:
            values.update(self._assignment_values(values["owner_id"], "", False, now))
        else:
            picked = None
            if rule is not None and probe.rule_found:  # else no rule matched, or it was deleted
                picked = domain.pick_assignee(rule, probe.loads, probe.turn or 0)
            if rule is None or picked is None:
                values["in_pool"] = True
                if rule is not None and probe.rule_found and rule.team:  # the rule's team's pool
                    values["team"] = rule.team
            else:
                rule_id = rule.id
                if rule.capacity and domain.takes_turns(rule) and not loads_locked:
                    capped_owner = picked
                values.update(self._assignment_values(picked, rule.team, False, now))
        history = {
            "id": new_id(),
            "lead_id": lead_id,
            "previous_score": 0,
            "score": values["score"],
            "previous_grade": "",
            "grade": values["grade"],
            "matched_rule_ids": matched,
            "changed_at": now,
        }
        task = self._first_contact_task(lead_id, values["owner_id"], now) if values["owner_id"] else None
        message = lead_to_proto(repo.LEAD_DEFAULTS | values)  # the row as the bundle stores it
        tx.publish(events_pb2.LeadCreated(lead=message, actor=actor(principal)), key=lead_id)
        if values["owner_id"]:
            tx.publish(events_pb2.LeadAssigned(lead=message, rule_id=rule_id, actor=actor(principal)), key=lead_id)
        row, owner_load = await repo.insert_lead_bundle(
            tx.conn, values, history, task, capped_owner, tx.take_outbox_rows(now)
        )
        if rule is not None and owner_load is not None and owner_load >= rule.capacity:
            raise _RepFilledMeanwhile  # rolls the transaction back
        return row

    async def get_lead(self, lead_id: str) -> RowMapping:
        async with self.single_statements.connect() as conn:
            return await self._visible_lead(conn, lead_id)

    async def update_lead(
        self, lead_id: str, data: Mapping[Any, Any], paths: Sequence[str], expected_version: int
    ) -> RowChange:
        allowed = {
            *domain.TEXT_FIELDS,
            "title",
            "phone",
            "email",
            "source",
            "source_detail",
            "tags",
            "custom",
            "external_id",
            "status",
        }
        given = {p: data.get(p) for p in writable_paths(paths, allowed, what="lead field")}
        clean = domain.validate_lead(given, partial=True, default_country=self.settings.default_country_code)
        principal = current_principal()
        now = self.clock()
        if "custom" in clean.values:
            definitions = (await self.rules.get()).custom_fields
        new_keys = [k for k in (clean.email_norm, clean.phone_norm) if k]
        async with self.uow.begin() as tx:
            conn = tx.conn
            # The keys the update gives the lead and, of the email or phone it changes, the ones it
            # takes away (as delete_lead locks them): a create of the old email or phone waits for
            # this update and then finds the lead without it, rather than finding it and merging
            # into it once it holds another. Before the lead's row, as a create takes them before
            # it merges into a lead: one order.
            old_keys: list[str] = []
            if "email" in clean.values or "phone" in clean.values:
                c = repo.leads.c
                taken_away = [c.email_norm] if "email" in clean.values else []
                taken_away += [c.phone_norm] if "phone" in clean.values else []
                before = (await conn.execute(select(*taken_away).where(c.id == lead_id))).first()
                old_keys = [k for k in before or () if k]
            await repo.lock_dedupe_keys(conn, [*new_keys, *old_keys])
            lead = await self._visible_lead(conn, lead_id, for_update=True)
            if "custom" in clean.values:  # the keys given are set; an empty value removes its key
                stored = lead["custom"] or {}
                given_custom = clean.values["custom"]
                to_check = custom_to_check(given_custom, stored, definitions)
                updates = checked_custom(definitions, to_check, partial=True)
                emptied = {k for k, v in given_custom.items() if k not in to_check and v in (None, "")}
                kept = {k: v for k, v in stored.items() if k not in to_check and k not in emptied}
                clean.values["custom"] = {**kept, **updates}
            if expected_version and lead["version"] != expected_version:
                raise StaleVersion(LEAD, lead_id, lead["version"])
            domain.ensure_open(lead["status"], "update")
            if "status" in clean.values:
                domain.check_status_change(
                    lead["status"], clean.values["status"], contacted=lead["first_contacted_at"] is not None
                )
            if "campaign_id" in clean.values:
                await self._check_campaign(conn, clean.values["campaign_id"])
            changes = {k: v for k, v in clean.values.items() if lead[k] != v and k != "owner_id"}
            if lead["first_contacted_at"] is None and domain.says_contacted(changes.get("status", "")):
                # Set by hand, as after a call logged elsewhere: the first contact is now.
                changes.update(first_contacted_at=now, follow_up_overdue=False)
                await self._close_tasks(conn, lead_id, "done", now)
            if "email" in clean.values:
                changes["email_norm"] = clean.email_norm
            if "phone" in clean.values:
                changes["phone_norm"] = clean.phone_norm
            if new_keys:
                duplicate = await repo.find_open_duplicate(
                    conn, email_norm=clean.email_norm, phone_norm=clean.phone_norm, excluding=lead_id
                )
                if duplicate is not None:
                    # Named only when the caller may read it, as a create's duplicate is.
                    if repo.lead_in_scope(current_scope(), duplicate):
                        found = f"another open lead has this email or phone: {duplicate['id']}"
                        raise AlreadyExists(found, existing_id=duplicate["id"])
                    raise AlreadyExists("another open lead has this email or phone, outside your leads")
            if contact_id := await _contact_linked_by(conn, lead, changes):
                changes["matched_contact_id"] = contact_id
            new_owner = clean.values.get("owner_id")
            reassign = "owner_id" in clean.values and new_owner != lead["owner_id"]
            if not changes and not reassign:
                return Change(lead, lead)
            # Each write publishes the version it makes: the changes (rescored with them), then a new owner.
            row = lead
            if changes:
                row = await self._write_rescored(tx, lead, {**changes, "updated_at": now}, now)
                tx.publish(
                    events_pb2.LeadUpdated(
                        lead=lead_to_proto(row),
                        changed_fields=domain.changed_lead_fields(changes),
                        actor=actor(principal),
                    ),
                    key=lead_id,
                )
            if "first_contacted_at" in changes:  # the first contact, as a logged call would publish it
                tx.publish(events_pb2.LeadContacted(lead=lead_to_proto(row), actor=actor(principal)), key=lead_id)
            if reassign:
                row = await self._assign_to(tx, row, new_owner or "", "", "", principal, now)
            return Change(row, lead)

    def _filtered(
        self, conn: AsyncConnection, query: Select[Any], f: LeadFilters, custom: Sequence[CustomFilter] = ()
    ) -> Select[Any]:
        c = repo.leads.c
        bad = [s for s in f.statuses if s not in domain.STATUSES]
        if bad:
            raise ValidationFailed([FieldError("status", f"{bad[0]!r} is not one of {', '.join(domain.STATUSES)}")])
        bad = [s for s in f.sources if s not in domain.SOURCES]
        if bad:
            raise ValidationFailed([FieldError("source", f"{bad[0]!r} is not one of {', '.join(domain.SOURCES)}")])
        if f.grade and f.grade not in domain.GRADES:
            raise ValidationFailed([FieldError("grade", f"{f.grade!r} is not one of A, B, C, D")])
        if f.statuses:
            query = query.where(c.status.in_(list(f.statuses)) if len(f.statuses) > 1 else c.status == f.statuses[0])
        if f.sources:
            query = query.where(c.source.in_(list(f.sources)) if len(f.sources) > 1 else c.source == f.sources[0])
        for name in ("owner_id", "team", "region", "industry", "grade", "campaign_id", "source_detail"):
            value = getattr(f, name)
            if value:
                query = query.where(c[name] == value)
        if f.tag:
            query = query.where(repo.tag_clause(conn, f.tag))
        if unknown := [name for name in f.q_fields if name not in SEARCHED_FIELDS]:
            message = f"{unknown[0]!r} is not one of {', '.join(SEARCHED_FIELDS)}"
            raise ValidationFailed([FieldError("q_fields", message)])
        if f.q:
            searched = {name: SEARCHED_FIELDS[name] for name in f.q_fields or SEARCHED_FIELDS}
            terms = {name: domain.search_term(name, f.q) for name in searched}
            matches = [
                column.contains(terms[name], autoescape=True) for name, column in searched.items() if terms[name]
            ]
            # A substring: % and _ in it are the characters, not wildcards. No field to look in: no lead.
            query = query.where(or_(*matches) if matches else false())
        if f.created_after:
            query = query.where(c.created_at >= f.created_after)
        if f.created_before:
            query = query.where(c.created_at < f.created_before)
        if f.in_pool is not None:
            query = query.where(c.in_pool == f.in_pool)
        if f.follow_up_overdue is not None:
            query = query.where(c.follow_up_overdue == f.follow_up_overdue)
        if f.min_score:
            query = query.where(c.score >= f.min_score)
        if custom:
            query = query.where(*custom_clauses(conn, c.custom, custom))
        return query

    async def list_leads(self, f: LeadFilters, *, limit: int, cursor: str, sort: str) -> tuple[list[RowMapping], str]:
        size = page_limit(limit)
        column, descending = parse_sort(sort, SORTS, default="-created_at")
        # Typed against the definitions the lead writes are validated with (this replica's cache).
        custom = typed_filters((await self.rules.get()).custom_fields, f.custom) if f.custom else []
        async with self.single_statements.connect() as conn:
            query = self._filtered(conn, select(repo.leads).where(repo.lead_scope_clause(current_scope())), f, custom)
            query = keyset_page(
                query, sort_column=column, id_column=repo.leads.c.id, descending=descending, cursor=cursor, limit=size
            )
            rows = list((await conn.execute(query)).mappings())
        return rows[:size], next_cursor(
            [_Row(r) for r in rows], sort_key=column.name, descending=descending, limit=size
        )

    async def summarize(
        self, group_by: str, statuses: Sequence[str], import_id: str
    ) -> tuple[list[tuple[str, int]], int]:
        groups = ("source", "source_detail", "status", "grade", "region", "owner_id", "industry", "team", "campaign_id")
        if group_by not in groups:
            raise ValidationFailed([FieldError("group_by", f"{group_by!r} is not one of {', '.join(groups)}")])
        column = repo.leads.c[group_by]
        query = select(column, func.count()).where(repo.lead_scope_clause(current_scope())).group_by(column)
        if statuses:
            query = query.where(repo.leads.c.status.in_(list(statuses)))
        if import_id:
            query = query.where(repo.leads.c.import_id == import_id)
        async with self.engine.connect() as conn:
            counts = [(str(key or ""), int(n)) for key, n in await conn.execute(query.order_by(column))]
        return counts, sum(n for _, n in counts)

    # --- activities and tasks ---------------------------------------------------------------

    async def log_activity(self, a: ActivityInput) -> tuple[Mapping[Any, Any], Mapping[Any, Any]]:
        """Logs an activity; returns it and its lead after it."""
        logged = await self.record_activity(a)
        return logged.activity, logged.lead

    async def record_activity(self, a: ActivityInput) -> ActivityLogged:
        """`log_activity`, telling also the lead as it was before the activity."""
        principal = current_principal()
        now = self.clock()
        given = {"kind": a.kind, "outcome": a.outcome, "notes": a.notes, "next_follow_up_at": a.next_follow_up_at}
        checked = domain.checked_activity({**given, "occurred_at": a.occurred_at or now}, now)
        occurred = checked["occurred_at"]
        activity_id = new_id()
        async with self.uow.begin() as tx:
            conn = tx.conn
            earlier = await claim(conn, "log_activity", a.idempotency_key, principal, {"activity_id": activity_id}, now)
            if earlier is not None:
                gone = NotFound(ACTIVITY, earlier["activity_id"])
                activity = (
                    await idempotency.earlier_record(conn, repo.activities, earlier["activity_id"], gone=gone)
                )._mapping
                _same_record(a.idempotency_key, LEAD, activity["lead_id"], a.lead_id)
                return ActivityLogged(activity, await self._visible_lead(conn, a.lead_id))
            lead = await self._visible_lead(conn, a.lead_id, for_update=True)
            domain.ensure_open(lead["status"], "log an activity on")
            new_activity: dict[str, Any] = {
                "id": activity_id,
                "lead_id": a.lead_id,
                **checked,
                "actor_id": principal.user_id,
                "version": 1,
            }
            await conn.execute(insert(repo.activities).values(new_activity))
            contact = a.kind in domain.CONTACT_KINDS
            changes: dict[str, Any] = {"updated_at": now}
            counted = domain.counted_from_capture(occurred, captured_at=lead["created_at"])
            if domain.advances_last_activity(lead["last_activity_at"], counted):
                changes["last_activity_at"] = counted
            new_status = domain.status_after_activity(lead["status"], a.kind)
            if new_status != lead["status"]:
                changes["status"] = new_status
            if contact and lead["first_contacted_at"] is None:
                changes.update(first_contacted_at=counted, follow_up_overdue=False)
            if contact:
                await self._close_tasks_done_by_contact(conn, a.lead_id, occurred, now)
            if a.next_follow_up_at is not None:
                follow_up = self._follow_up_task(lead, activity_id, a.next_follow_up_at, principal, now)
                await conn.execute(insert(repo.tasks).values(follow_up))
            row = await self._write_rescored(tx, lead, changes, now)
            activity_message = activity_to_proto(new_activity)
            if contact:
                tx.publish(
                    events_pb2.LeadContacted(
                        lead=lead_to_proto(row), activity=activity_message, actor=actor(principal)
                    ),
                    key=a.lead_id,
                )
            else:
                tx.publish(
                    events_pb2.LeadUpdated(
                        lead=lead_to_proto(row),
                        changed_fields=domain.changed_lead_fields(changes),
                        actor=actor(principal),
                        activity=activity_message,
                    ),
                    key=a.lead_id,
                )
            return ActivityLogged(new_activity, row, previous=lead)

    async def list_activities(self, lead_id: str, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        size = page_limit(limit)
        async with self.engine.connect() as conn:
            await self._visible_lead(conn, lead_id)
            query = keyset_page(
                select(repo.activities).where(repo.activities.c.lead_id == lead_id),
                sort_column=repo.activities.c.id,
                id_column=repo.activities.c.id,
                descending=True,
                cursor=cursor,
                limit=size,
            )
            rows = list((await conn.execute(query)).mappings())
        return rows[:size], next_cursor([_Row(r) for r in rows], sort_key="id", descending=True, limit=size)

    async def update_activity(
        self,
        lead_id: str,
        activity_id: str,
        data: Mapping[str, Any],
        paths: Sequence[str],
        expected_version: int,
        *,
        leads_scope: RecordScope,
    ) -> tuple[RowMapping, RowMapping]:
        """Corrects what an activity says happened: the fields `paths` names (of ACTIVITY_FIELDS),
        checked together with the others as stored, as a logged activity is. Returns the activity as
        it was and as it is now. The call's scope is the caller's on activities; the lead must be in
        `leads_scope`, as for logging one (`_lead_and_activity`)."""
        writable_paths(paths, domain.ACTIVITY_FIELDS, what="activity field")
        principal = current_principal()
        now = self.clock()
        async with self.uow.begin() as tx:
            conn = tx.conn
            lead, before = await self._lead_and_activity(conn, lead_id, activity_id, expected_version, leads_scope)
            domain.ensure_open(lead["status"], "edit an activity of")
            stored = {name: before[name] for name in domain.ACTIVITY_FIELDS}
            edited = domain.checked_activity({**stored, **{p: data.get(p) for p in paths}}, now)
            changes = {name: value for name, value in edited.items() if value != stored[name]}
            if not changes:
                return before, before
            a = repo.activities
            statement = update(a).where(a.c.id == activity_id).values(**changes, version=a.c.version + 1)
            after = (await conn.execute(statement.returning(a))).mappings().one()
            if "next_follow_up_at" in changes:
                await self._follow_activity(conn, lead, activity_id, after["next_follow_up_at"], principal, now)
            counted = domain.counted_from_capture(after["occurred_at"], captured_at=lead["created_at"])
            advanced = domain.advances_last_activity(lead["last_activity_at"], counted)
            moved = {"last_activity_at": counted} if advanced else {}
            row = await self._after_activity_change(tx, lead, moved, now, rescore="kind" in changes)
            tx.publish(
                events_pb2.LeadActivityUpdated(
                    lead=lead_to_proto(row),
                    activity=activity_to_proto(after),
                    changed_fields=sorted(changes),
                    actor=actor(principal),
                ),
                key=lead_id,
            )
            return before, after

    async def delete_activity(
        self, lead_id: str, activity_id: str, expected_version: int, *, leads_scope: RecordScope
    ) -> RowMapping:
        """Deletes an activity logged by mistake, under the scopes of `update_activity`; returns it as
        it was. Its open follow-up task is cancelled and the lead's score recomputed; the lead's
        `last_activity_at`, `first_contacted_at` and status stay (the first-contact SLA's record)."""
        principal = current_principal()
        now = self.clock()
        async with self.uow.begin() as tx:
            conn = tx.conn
            lead, activity = await self._lead_and_activity(conn, lead_id, activity_id, expected_version, leads_scope)
            domain.ensure_open(lead["status"], "delete an activity of")
            await conn.execute(delete(repo.activities).where(repo.activities.c.id == activity_id))
            await self._follow_activity(conn, lead, activity_id, None, principal, now)
            await self._after_activity_change(tx, lead, {}, now, rescore=True)
            tx.publish(
                events_pb2.LeadActivityDeleted(lead_id=lead_id, activity_id=activity_id, actor=actor(principal)),
                key=lead_id,
            )
            return activity

    async def _lead_and_activity(
        self, conn: AsyncConnection, lead_id: str, activity_id: str, expected_version: int, leads_scope: RecordScope
    ) -> tuple[RowMapping, RowMapping]:
        """The lead, locked (every write of its activities locks it first), when it is in
        `leads_scope`; and its activity `activity_id` when in the call's scope on activities and at
        `expected_version` (0: any). NotFound for a lead or activity out of scope, or an activity of
        another lead."""
        lead = await self._visible_lead(conn, lead_id, for_update=True, scope=leads_scope)
        a = repo.activities
        query = select(a).where(a.c.id == activity_id, a.c.lead_id == lead_id)
        activity = (await conn.execute(query)).mappings().first()
        if activity is None or not may_change_activity(
            current_scope(), actor_id=activity["actor_id"], team=lead["team"], region=lead["region"]
        ):
            raise NotFound(ACTIVITY, activity_id)
        if expected_version and activity["version"] != expected_version:
            raise StaleVersion(ACTIVITY, activity_id, activity["version"])
        return lead, activity

    async def _follow_activity(
        self,
        conn: AsyncConnection,
        lead: Mapping[Any, Any],
        activity_id: str,
        next_follow_up_at: datetime | None,
        principal: Principal,
        now: datetime,
    ) -> None:
        """The follow-up task the activity planned, after its `next_follow_up_at` became this (None:
        cleared, or the activity deleted): see `crm_platform.activities.follow_up_change`."""
        t = repo.tasks
        planned = (t.c.lead_id == lead["id"], t.c.activity_id == activity_id, t.c.status == "open")
        open_tasks = await conn.scalar(select(func.count()).where(*planned))
        match follow_up_change(next_follow_up_at, bool(open_tasks)):
            case "move":
                await conn.execute(update(t).where(*planned).values(due_at=next_follow_up_at))
            case "cancel":
                await conn.execute(update(t).where(*planned).values(status="cancelled", completed_at=now))
            case "create" if next_follow_up_at is not None:
                await conn.execute(
                    insert(t).values(self._follow_up_task(lead, activity_id, next_follow_up_at, principal, now))
                )

    async def _after_activity_change(
        self,
        tx: Transaction,
        lead: RowMapping,
        changes: Mapping[str, Any],
        now: datetime,
        *,
        rescore: bool,
        counts: ScoringCounts | None = None,
    ) -> RowMapping:
        """The lead after one of its activities was edited or deleted (or engagements recorded on
        it): `changes` and, when the kinds its activities count changed (`rescore`), its score
        recomputed (history and `lead.scored` when it moved; with `counts` when read for several
        leads at once), written at once. When nothing of the lead moves it is not written: a
        corrected note must not make an open edit form of the lead stale."""
        scored = await self._rescore(tx, lead, now, counts) if rescore else {}
        if not changes and not scored:
            return lead
        return await self._write(tx.conn, lead["id"], {**changes, **scored, "updated_at": now})

    # --- engagements (web behaviour) -------------------------------------------------------

    async def record_engagements(self, items: Sequence[domain.EngagementInput]) -> list[EngagementOutcome]:
        """Records what a marketing system saw a lead do on the web, item by item (an item at fault
        is rejected naming its field, the others are recorded), in one transaction: each on its lead
        once per `external_id` (a resent batch: `duplicate`), then each open lead it recorded on is
        rescored once, as an activity rescores it (history and `lead.scored` when its score or grade
        moves; no other event). An engagement is no contact: the lead's status, first contact, SLA
        and recycling clock stay. A converted or disqualified lead records it (it is what happened)
        and keeps the score it closed with, as the rescoring job leaves it. Only leads in the
        caller's scope: any other is `not found`, as one that does not exist."""
        domain.check_engagement_count(len(items))
        principal = current_principal()
        scope = current_scope()
        now = self.clock()
        outcomes: dict[int, EngagementOutcome] = {}
        checked: dict[int, domain.CheckedEngagement] = {}
        for index, item in enumerate(items):
            result = domain.checked_engagement(item, now)
            if isinstance(result, FieldError):
                outcomes[index] = _engagement_rejected(index, result)
            else:
                checked[index] = result
        async with self.uow.begin() as tx:
            conn = tx.conn
            emails = {e.email_norm for e in checked.values() if e.email_norm}
            by_email = await self._open_leads_with_emails(conn, emails, scope)
            wanted = {e.lead_id for e in checked.values() if e.lead_id}
            wanted |= {ids[0] for ids in by_email.values() if len(ids) == 1}
            leads: dict[str, RowMapping] = {}
            if wanted:
                c = repo.leads.c
                # Locked in id order, as by every write to several leads: two calls cannot deadlock.
                query = select(repo.leads).where(c.id.in_(sorted(wanted)), repo.lead_scope_clause(scope))
                rows = await conn.execute(query.order_by(c.id).with_for_update())
                leads = {row["id"]: row for row in rows.mappings()}
            named: dict[int, RowMapping] = {}  # item -> the lead it names
            firsts: dict[tuple[str, str], int] = {}  # (lead id, external id) -> the first item naming them
            for index, engagement in sorted(checked.items()):
                found = self._engagement_lead(engagement, by_email, leads, scope)
                if isinstance(found, FieldError):
                    outcomes[index] = _engagement_rejected(index, found)
                    continue
                named[index] = found
                firsts.setdefault((found["id"], engagement.external_id), index)
            # One statement for the batch. An item naming the lead and external id of an earlier one
            # is its duplicate, as one recorded by an earlier batch.
            new_rows = [
                {
                    "id": new_id(),
                    "lead_id": named[index]["id"],
                    "kind": checked[index].kind,
                    "url": checked[index].url,
                    "occurred_at": checked[index].occurred_at,
                    "external_id": checked[index].external_id,
                    "actor_id": principal.user_id,
                    "recorded_at": now,
                }
                for index in firsts.values()
            ]
            recorded = {firsts[key] for key in await repo.insert_new_engagements(conn, new_rows)}
            touched: dict[str, RowMapping] = {}
            for index, lead in named.items():
                if index in recorded:
                    outcomes[index] = EngagementOutcome(index, "recorded", lead["id"])
                    touched[lead["id"]] = lead
                else:
                    reason = f"external_id {checked[index].external_id!r} was recorded on this lead before"
                    outcomes[index] = EngagementOutcome(index, "duplicate", lead["id"], reason)
            # A closed lead keeps the score it closed with; the open ones are rescored in id order,
            # with what the rules count of all of them read at once.
            to_rescore = [lead for _, lead in sorted(touched.items()) if lead["status"] in domain.OPEN_STATUSES]
            if to_rescore:
                counts = await self._scoring_counts(conn, [lead["id"] for lead in to_rescore])
                for lead in to_rescore:
                    await self._after_activity_change(tx, lead, {}, now, rescore=True, counts=counts)
        return [outcomes[index] for index in range(len(items))]

    @staticmethod
    async def _open_leads_with_emails(
        conn: AsyncConnection, emails: Collection[str], scope: RecordScope
    ) -> dict[str, list[str]]:
        """The ids of the open leads in `scope` with each of `emails` (normalised), in id order."""
        if not emails:
            return {}
        c = repo.leads.c
        query = (
            select(c.id, c.email_norm)
            .where(c.email_norm.in_(sorted(emails)), c.status.in_(domain.OPEN_STATUSES), repo.lead_scope_clause(scope))
            .order_by(c.id)
        )
        found: dict[str, list[str]] = {}
        for lead_id, email_norm in await conn.execute(query):
            found.setdefault(email_norm, []).append(lead_id)
        return found

    @staticmethod
    def _engagement_lead(
        engagement: domain.CheckedEngagement,
        by_email: Mapping[str, Sequence[str]],
        leads: Mapping[str, RowMapping],
        scope: RecordScope,
    ) -> RowMapping | FieldError:
        """The lead (locked, in `scope`) an engagement names, or why it names none (a FieldError
        naming `lead_id` or `email`). A lead out of the caller's scope is not found, as a lead that
        does not exist, and an email whose leads are all out of it names none: nothing tells them apart."""
        if engagement.lead_id:
            field_name, lead = "lead_id", leads.get(engagement.lead_id)
            if lead is None:
                return FieldError("lead_id", f"lead {engagement.lead_id} not found")
        else:
            field_name, ids = "email", by_email.get(engagement.email_norm, [])
            if len(ids) > 1:
                return FieldError("email", f"{len(ids)} open leads have this email: name the lead by lead_id")
            lead = leads.get(ids[0]) if ids else None
            # Read before its row was locked: the lead may have been closed or given another email since.
            if (
                lead is None
                or lead["email_norm"] != engagement.email_norm
                or lead["status"] not in domain.OPEN_STATUSES
            ):
                return FieldError("email", "no open lead you may see has this email")
        if repo.claim_first(scope, lead):  # a rep's pool lead, as for any write to it
            return FieldError(field_name, f"lead {lead['id']} is in the pool: claim it first")
        return lead

    async def list_engagements(
        self, lead_id: str, kind: str, *, limit: int, cursor: str
    ) -> tuple[list[RowMapping], str]:
        """The engagements recorded on a lead in the caller's scope (else NotFound, as for one that
        does not exist), of `kind` or of every kind: newest first by when they happened, then id
        (`ix_lead_engagements_lead_time`)."""
        if error := domain.engagement_filter_error(kind):
            raise ValidationFailed([error])
        e = repo.engagements.c
        query = select(repo.engagements).where(e.lead_id == lead_id)
        if kind:
            query = query.where(e.kind == kind)
        async with self.engine.connect() as conn:
            await self._visible_lead(conn, lead_id)
            return await _keyset_rows(
                conn, query, e.occurred_at, id_column=e.id, descending=True, cursor=cursor, limit=limit
            )

    async def list_tasks(self, lead_id: str, status: str, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        if status and status not in ("open", "done", "cancelled"):
            raise ValidationFailed([FieldError("status", "is not one of open, done, cancelled")])
        async with self.engine.connect() as conn:
            await self._visible_lead(conn, lead_id)
            query = select(repo.tasks).where(repo.tasks.c.lead_id == lead_id)
            if status:
                query = query.where(repo.tasks.c.status == status)
            return await _keyset_rows(conn, query, repo.tasks.c.id, cursor=cursor, limit=limit)

    async def list_scoped_tasks(
        self, f: domain.TaskFilters, *, tasks_scope: RecordScope, limit: int, cursor: str
    ) -> tuple[list[RowMapping], str]:
        """The tasks of the leads in the call's record scope, only the caller's own of them when
        their scope on tasks (`tasks_scope`) is `own` (`repo.worklist_scope_clause`), each with its
        lead's name as `lead_name`, by due_at then id (`ix_lead_tasks_owner` serves an owner's)."""
        if errors := domain.task_filter_errors(f):
            raise ValidationFailed(errors)
        size = page_limit(limit)
        t = repo.tasks.c
        query = (
            select(repo.tasks, repo.leads.c.name.label("lead_name"))
            .join(repo.leads, repo.leads.c.id == t.lead_id)
            .where(repo.worklist_scope_clause(current_scope(), tasks_scope), t.status == f.status)
        )
        if f.owner_id:
            query = query.where(t.owner_id == f.owner_id)
        if f.kind:
            query = query.where(t.kind == f.kind)
        if f.due:
            query = query.where(t.due_at < due_before(f.due, self.clock()))
        query = keyset_page(query, sort_column=t.due_at, id_column=t.id, descending=False, cursor=cursor, limit=size)
        async with self.engine.connect() as conn:
            rows = list((await conn.execute(query)).mappings())
        return rows[:size], next_cursor([_Row(r) for r in rows], sort_key="due_at", descending=False, limit=size)

    async def score_history(self, lead_id: str, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        async with self.engine.connect() as conn:
            await self._visible_lead(conn, lead_id)
            query = select(repo.score_history).where(repo.score_history.c.lead_id == lead_id)
            return await _keyset_rows(conn, query, repo.score_history.c.id, cursor=cursor, limit=limit)

    # --- assignment, pool, disqualify -------------------------------------------------------

    async def _assign_to(
        self,
        tx: Transaction,
        lead: RowMapping,
        owner_id: str,
        team: str,
        rule_id: str,
        principal: Principal,
        now: datetime,
        *,
        claimed: bool = False,
    ) -> RowMapping:
        """Gives the lead to `owner_id` (or the pool when empty) with a fresh first-contact SLA.
        Only a claim (`claimed`) counts against the new owner's claim limit."""
        await self._close_tasks(tx.conn, lead["id"], "cancelled", now)
        if owner_id:
            values = self._assignment_values(owner_id, team, lead["first_contacted_at"] is not None, now)
            if lead["status"] == "recycled":
                values["status"] = domain.status_after_claim(lead["first_contacted_at"])
        else:
            values = {"owner_id": "", "in_pool": True, "first_contact_due_at": None, "follow_up_overdue": False}
            if team:  # a rule's team's pool
                values["team"] = team
        values["claimed_at"] = now if claimed else None
        row = await self._write(tx.conn, lead["id"], {**values, "updated_at": now})
        if owner_id and row["first_contacted_at"] is None:
            await tx.conn.execute(insert(repo.tasks).values(self._first_contact_task(lead["id"], owner_id, now)))
        tx.publish(
            events_pb2.LeadAssigned(
                lead=lead_to_proto(row), previous_owner_id=lead["owner_id"], rule_id=rule_id, actor=actor(principal)
            ),
            key=lead["id"],
        )
        return row

    async def assign(
        self, lead_id: str, owner_id: str, team: str, expected_version: int, idempotency_key: str = ""
    ) -> RowChange:
        # "" runs the rules (owner) or keeps none (team); only spaces would be an owner nobody is.
        given = {"owner_id": owner_id, "team": team}
        if blank := [name for name, value in given.items() if value and not value.strip()]:
            raise ValidationFailed([FieldError(name, "must not be blank") for name in blank])
        if team and not owner_id:  # the rules choose owner and team together: a team alone would be dropped
            raise ValidationFailed(
                [FieldError("team", "a team is given with its owner_id; without one the rules choose")]
            )
        principal = current_principal()
        now = self.clock()

        async def attempt(rules: Rules) -> RowChange:
            async with self.uow.begin() as tx:
                if await self._repeats_lead_move(tx.conn, "assign_lead", idempotency_key, principal, lead_id, now):
                    return Change(await self._visible_lead(tx.conn, lead_id), None)  # the rules are not run again
                lead = await self._visible_lead(tx.conn, lead_id, for_update=True)
                if expected_version and lead["version"] != expected_version:
                    raise StaleVersion(LEAD, lead_id, lead["version"])
                domain.ensure_open(lead["status"], "assign")
                target = (owner_id, team, "") if owner_id else await self._pick_by_rules(tx.conn, rules, lead)
                to_owner, to_team, rule_id = target or ("", "", "")
                if domain.already_assigned(lead, owner_id=to_owner, team=to_team):
                    return Change(lead, lead)  # no new assignment: its first-contact SLA and recycling clock go on
                return Change(await self._assign_to(tx, lead, to_owner, to_team, rule_id, principal, now), lead)

        return await self._again_if_rule_deleted(attempt, await self.rules.get())

    async def transfer_leads(
        self, from_owner_id: str, to_owner_id: str, to_team: str, reason: str, idempotency_key: str = ""
    ) -> tuple[RowMapping, list[str], list[str]]:
        """Hands every lead `from_owner_id` is working (`domain.transferable`) in the caller's record
        scope to `to_owner_id` (in `to_team`, "" keeping each lead's own), with the leads' open
        first-contact and follow-up tasks, in one transaction: a departing rep's leads go on being
        worked by another (人走客户不走). Each lead is assigned as `assign` assigns one to a user
        (`_assignment_values`: a fresh first-contact SLA for a lead not contacted yet, which its
        first-contact task follows; the recycling clock restarted; no claim held against the new
        owner's claim limit) and published as `lead.assigned` with the reason and the transfer's id.
        The assignment rules' per-rep capacity cap does not apply: the transfer is a manager's
        explicit decision, as a manual assignment is, and leaving part of the leads with a rep who
        has left would defeat it. One UPDATE ... RETURNING moves the leads, one UPDATE their tasks,
        and the events are built from the returned rows, however many leads the rep holds.

        A lead whose conversion is under way (its conversion lock held, on any replica) stays: the
        saga makes its account, contact and deal for the owner it began with. One whose conversion
        attempt an outage interrupted moves; a later conversion undoes that attempt and converts for
        the new owner (`_resumable`).

        Returns the transfer as recorded, the ids of the leads this call moved and those it left
        because their conversion was under way. A repeat of the idempotency key answers with the
        first call's record and moves nothing (no ids)."""
        domain.check_transfer(from_owner_id, to_owner_id, to_team)
        reason = reason.strip()
        principal = current_principal()
        now = self.clock()
        transfer_id = new_id()
        transfers = repo.bulk_transfers
        async with self.uow.begin() as tx:
            conn = tx.conn
            earlier = await claim(conn, "transfer_leads", idempotency_key, principal, {"id": transfer_id}, now)
            if earlier is not None:
                first = await conn.execute(select(transfers).where(transfers.c.id == earlier["id"]))
                return first.mappings().one(), [], []
            c = repo.leads.c
            movable = (repo.transferable_from(from_owner_id), repo.lead_scope_clause(current_scope()))
            # Locked in id order first, as every write of several leads locks them (an engagement
            # batch's locks never cross these). A conversion begins its attempt and finishes under
            # its lead's row lock: none does so until this transaction ends, and one that begins
            # later finds the lead moved. So only a lead whose attempt is unfinished now may have a
            # conversion under way, which its conversion lock tells.
            locked = list(await conn.scalars(select(c.id).where(*movable).order_by(c.id).with_for_update()))
            unfinished = set(await conn.scalars(select(c.id).where(*movable, repo.conversion_unfinished(c.id))))
            skipped = await self._conversions_under_way(conn, unfinished.intersection(locked))
            values = self._assignment_values(to_owner_id, to_team, False, now)
            due = values["first_contact_due_at"]
            # Per lead, as an assignment decides it: a lead contacted already has no first contact due.
            values["first_contact_due_at"] = case(
                (c.first_contacted_at.is_(None), literal(due, c.first_contact_due_at.type)), else_=None
            )
            statement = (
                update(repo.leads)
                .where(repo.one_of_ids(conn, c.id))
                .values(**values, claimed_at=None, updated_at=now, version=c.version + 1)
                .returning(repo.leads)
            )
            moving = [lead_id for lead_id in locked if lead_id not in skipped]
            rows = sorted((await conn.execute(statement, {"ids": moving})).mappings(), key=lambda row: str(row["id"]))
            lead_ids = [row["id"] for row in rows]
            tasks = await repo.move_open_tasks(conn, lead_ids, to_owner_id, first_contact_due=due)
            who = actor(principal)
            for row in rows:
                assigned = events_pb2.LeadAssigned(
                    previous_owner_id=from_owner_id, actor=who, reason=reason, bulk_transfer_id=transfer_id
                )
                fill_lead(assigned.lead, row)
                tx.publish(assigned, key=row["id"])
            await bulk_insert(conn, self.outbox, tx.take_outbox_rows(now))  # one COPY on PostgreSQL
            recorded = await conn.execute(
                insert(transfers)
                .values(
                    id=transfer_id,
                    from_owner_id=from_owner_id,
                    to_owner_id=to_owner_id,
                    to_team=to_team,
                    reason=reason,
                    leads=len(rows),
                    tasks=tasks,
                    actor_id=principal.user_id,
                    created_at=now,
                )
                .returning(transfers)
            )
            return recorded.mappings().one(), lead_ids, sorted(skipped)

    @staticmethod
    async def _conversions_under_way(conn: AsyncConnection, lead_ids: set[str]) -> set[str]:
        """Those of `lead_ids` (leads with an unfinished conversion attempt) whose conversion runs
        now, on any replica, told by their conversion locks without waiting (`held_now`): each lock
        found free stays with this transaction, so no conversion of those leads begins meanwhile."""
        locks = {repo.conversion_lock(lead_id): lead_id for lead_id in lead_ids}
        return {locks[name] for name in await held_now(conn, locks)}

    async def disqualify(
        self, lead_id: str, reason: str, expected_version: int, idempotency_key: str = ""
    ) -> RowChange:
        if not reason.strip():
            raise ValidationFailed([FieldError("reason", "a disqualified lead needs a reason")])
        principal = current_principal()
        now = self.clock()
        async with self.engine.connect() as conn:
            # A repeat neither undoes a conversion attempt (its first request did) nor checks the
            # version its first request moved on.
            repeat = await recall(conn, "disqualify_lead", idempotency_key, principal)
        if repeat is None:
            await self._abandon_conversion(lead_id, expected_version)
        async with self.uow.begin() as tx:
            if await self._repeats_lead_move(tx.conn, "disqualify_lead", idempotency_key, principal, lead_id, now):
                return Change(await self._visible_lead(tx.conn, lead_id), None)
            lead = await self._visible_lead(tx.conn, lead_id, for_update=True)
            if expected_version and lead["version"] != expected_version:
                raise StaleVersion(LEAD, lead_id, lead["version"])
            domain.ensure_open(lead["status"], "disqualify")
            await self._close_tasks(tx.conn, lead_id, "cancelled", now)
            row = await self._write(
                tx.conn,
                lead_id,
                {"status": "unqualified", "disqualified_reason": reason.strip(), "in_pool": False, "updated_at": now},
            )
            tx.publish(
                events_pb2.LeadDisqualified(lead=lead_to_proto(row), reason=reason.strip(), actor=actor(principal)),
                key=lead_id,
            )
            return Change(row, lead)

    async def delete_lead(self, lead_id: str, expected_version: int) -> RowMapping:
        """Deletes a lead with what is only its own: activities, engagements, tasks, score history and an undone
        conversion attempt; returns it as it was (for the caller's audit trail). Everything else
        follows the row: the owner loads by the triggers on `leads` (migration 0006), while the
        pool, the timers and the dedupe probe read `leads` itself."""
        principal = current_principal()
        await self._abandon_conversion(lead_id, expected_version)
        async with self.uow.begin() as tx:
            conn = tx.conn
            # The lead's dedupe keys before its row, in the order a create takes them: a create of
            # the same email or phone waits for this delete and then finds no duplicate, rather than
            # finding this lead and answering (or merging into) a lead that no longer exists.
            c = repo.leads.c
            keys = (await conn.execute(select(c.email_norm, c.phone_norm).where(c.id == lead_id))).first()
            await repo.lock_dedupe_keys(conn, [k for k in keys or () if k])
            lead = await self._visible_lead(conn, lead_id, for_update=True)
            if expected_version and lead["version"] != expected_version:
                raise StaleVersion(LEAD, lead_id, lead["version"])
            saga_state = await conn.scalar(
                select(repo.conversions.c.state).where(repo.conversions.c.lead_id == lead_id).with_for_update()
            )
            domain.ensure_deletable(lead["status"], saga_state)
            for table in (repo.activities, repo.engagements, repo.tasks, repo.score_history, repo.conversions):
                await conn.execute(delete(table).where(table.c.lead_id == lead_id))
            await conn.execute(delete(repo.leads).where(repo.leads.c.id == lead_id))
            tx.publish(events_pb2.LeadDeleted(lead_id=lead_id, actor=actor(principal)), key=lead_id)
            return lead

    async def list_pool(
        self, *, region: str, industry: str, source: str, limit: int, cursor: str, sort: str = ""
    ) -> tuple[list[RowMapping], str]:
        """The pool's open leads in the caller's scope, sorted as `list_leads` sorts (a rep picks the
        best scored first with `-score`)."""
        size = page_limit(limit)
        column, descending = parse_sort(sort, SORTS, default="-created_at")
        f = LeadFilters(region=region, industry=industry, sources=[source] if source else [], in_pool=True)
        async with self.engine.connect() as conn:
            # The caller's leads in the pool: what `list_leads(in_pool=True)` lists, open ones only.
            query = self._filtered(conn, select(repo.leads).where(repo.lead_scope_clause(current_scope())), f)
            query = query.where(repo.leads.c.status.in_(domain.OPEN_STATUSES))
            query = keyset_page(
                query, sort_column=column, id_column=repo.leads.c.id, descending=descending, cursor=cursor, limit=size
            )
            rows = list((await conn.execute(query)).mappings())
        return rows[:size], next_cursor(
            [_Row(r) for r in rows], sort_key=column.name, descending=descending, limit=size
        )

    async def claim(self, lead_id: str, idempotency_key: str = "") -> RowMapping:
        principal = current_principal()
        if principal.kind != "user" or not principal.user_id:
            raise PermissionDenied("only a user can claim a lead from the pool")
        now = self.clock()
        async with self.uow.begin() as tx:
            conn = tx.conn
            if await self._repeats_lead_move(conn, "claim_lead", idempotency_key, principal, lead_id, now):
                return await self._visible_lead(conn, lead_id)
            lead = (
                (
                    await conn.execute(
                        select(repo.leads)
                        .where(repo.leads.c.id == lead_id, repo.lead_scope_clause(current_scope()))
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if lead is None:
                raise NotFound(LEAD, lead_id)  # neither in the caller's pool nor theirs to see: it does not exist
            if not lead["in_pool"]:
                raise Conflict(f"lead {lead_id} is not in the pool", reason="NOT_IN_POOL")
            domain.ensure_open(lead["status"], "claim")
            domain.ensure_reclaimable(
                claimant_id=principal.user_id,
                recycled_from_id=lead["recycled_from_id"],
                recycled_at=lead["recycled_at"],
                policy=self.policy,
                now=now,
            )
            # Serialise one rep's claims so two parallel claims cannot both pass the limit.
            await repo.lock_keys(conn, [f"claim:{principal.user_id}"])
            held = await conn.scalar(
                select(func.count()).where(
                    repo.leads.c.owner_id == principal.user_id,
                    repo.leads.c.claimed_at.is_not(None),
                    repo.leads.c.status.in_(domain.OPEN_STATUSES),
                )
            )
            if int(held or 0) >= self.policy.pool_claim_limit:
                raise Conflict(
                    f"claim limit reached: {principal.user_id} holds {held} claimed leads "
                    f"(limit {self.policy.pool_claim_limit})",
                    reason="CLAIM_LIMIT",
                )
            team = lead["team"] or principal.team
            return await self._assign_to(tx, lead, principal.user_id, team, "", principal, now, claimed=True)

    async def release(
        self, lead_id: str, reason: str, idempotency_key: str = "", *, own_only: bool = False
    ) -> RowChange:
        """Puts a lead back in the pool; with `own_only` (a caller who may not assign leads) only a
        lead the caller owns, as found under its row lock."""
        principal = current_principal()
        now = self.clock()
        async with self.uow.begin() as tx:
            if await self._repeats_lead_move(tx.conn, "release_lead", idempotency_key, principal, lead_id, now):
                return Change(await self._visible_lead(tx.conn, lead_id), None)
            lead = await self._visible_lead(tx.conn, lead_id, for_update=True)
            if lead["in_pool"] or not lead["owner_id"]:
                raise Conflict(f"lead {lead_id} is already in the pool", reason="IN_POOL")
            if own_only and lead["owner_id"] != principal.user_id:
                raise PermissionDenied("releasing another rep's lead needs the grant to assign leads")
            domain.ensure_open(lead["status"], "release")
            why = f"released: {reason.strip() or 'no reason given'}"
            return Change(await self._to_pool(tx, lead, why, principal, now), lead)

    @staticmethod
    async def _repeats_lead_move(
        conn: AsyncConnection, operation: str, key: str, principal: Principal, lead_id: str, now: datetime
    ) -> bool:
        """Claims the idempotency key of a claim, release, assignment or disqualification of
        `lead_id`: True when the key's first request moved this lead already (the repeat answers
        with the lead as it is now; it must not move it again, or fail because it was moved),
        Conflict when that request was for another."""
        earlier = await claim(conn, operation, key, principal, {"lead_id": lead_id}, now)
        if earlier is None:
            return False
        _same_record(key, LEAD, earlier["lead_id"], lead_id)
        return True

    async def _to_pool(
        self, tx: Transaction, lead: RowMapping, reason: str, principal: Principal, now: datetime
    ) -> RowMapping:
        """Back to the pool, recording whom from (`domain.ensure_reclaimable`); `principal` released
        it, or is the system for the recycling timer."""
        await self._close_tasks(tx.conn, lead["id"], "cancelled", now)
        row = await self._write(
            tx.conn,
            lead["id"],
            {
                "owner_id": "",
                "in_pool": True,
                "status": "recycled",
                "recycled_at": now,
                "recycled_from_id": lead["owner_id"],
                "claimed_at": None,
                "first_contact_due_at": None,
                "follow_up_overdue": False,
                "updated_at": now,
            },
        )
        tx.publish(
            events_pb2.LeadRecycled(
                lead=lead_to_proto(row), previous_owner_id=lead["owner_id"], reason=reason, actor=actor(principal)
            ),
            key=lead["id"],
        )
        return row

    # --- bulk import ------------------------------------------------------------------------

    async def start_import(self, import_id: str, fmt: str) -> RowMapping:
        """Creates the import record, or returns the earlier one with the same key (resume)."""
        principal = current_principal()
        now = self.clock()
        async with transaction(self.engine) as conn:
            await insert_ignore(
                conn,
                repo.imports,
                {
                    "id": import_id,
                    "status": "running",
                    "format": fmt,
                    "owner_id": principal.user_id,
                    "team": principal.team,
                    "region": principal.region,
                    "started_at": now,
                    "updated_at": now,
                },
                keys=["id"],
            )
            row = (await conn.execute(select(repo.imports).where(repo.imports.c.id == import_id))).mappings().one()
            if row["owner_id"] != principal.user_id:
                raise Conflict(f"import key {import_id} belongs to another user", reason="IMPORT_KEY_TAKEN")
            if row["format"] != fmt:
                raise ValidationFailed([FieldError("format", f"import {import_id} is {row['format']}, not {fmt}")])
            return row

    async def import_part(self, spec: ImportSpec, chunks: AsyncIterator[bytes]) -> ImportPartResult:
        """Applies one part (or the whole file) of an import, batch by batch.

        Each batch commits its leads with the import's progress; the parser state is saved when
        the part ends. A crash mid-part is resumed by sending the part again: rows already
        committed are skipped, so nothing is imported twice, once their digest shows they are the
        same rows (other content is refused on `import_key` before anything is written). Requests
        of one import run one at a time, on any replica: a part sent again while it is being
        applied waits for it, then answers its result.
        """
        async with held_exclusively(self.engine, f"lead-import:{spec.import_id}"):
            return await self._apply_part(spec, chunks)

    async def _apply_part(self, spec: ImportSpec, chunks: AsyncIterator[bytes]) -> ImportPartResult:
        record = await self.start_import(spec.import_id, spec.format)
        part = spec.part
        received = record["parts_received"]
        if (part and part <= received) or (not part and received == 1 and record["status"] == "completed"):
            # A repeated request returns the first result, if it sends what the first one sent.
            await self._check_part_sent_before(record, part or 1, chunks)
            idempotency.answer_from_earlier()  # audited as a replay, not as a second import
            return ImportPartResult(record, [])
        if record["status"] == "completed":
            raise Conflict(
                f"import {spec.import_id} is complete ({received} parts); import more rows under a new import key",
                reason="IMPORT_COMPLETED",
            )
        expected = received + 1
        if part and part != expected:
            raise Conflict(f"import {spec.import_id} expects part {expected}, not {part}", reason="PART_OUT_OF_ORDER")
        if not part and record["parts_received"]:
            raise ValidationFailed(
                [FieldError("part", f"import {spec.import_id} is sent in parts; send part {expected}")]
            )
        final = not part or spec.final
        if spec.options.mapper.campaign_id:  # every row of the import links to it
            async with self.engine.connect() as conn:
                await self._check_campaign(conn, spec.options.mapper.campaign_id)
        if spec.format == "json" and part and (part > 1 or not final):
            raise ValidationFailed(
                [FieldError("part", "a JSON array comes in one part; send jsonl to import in parts")]
            )
        state = ParserState(
            rows=record["parsed_rows"],
            bytes_seen=record["bytes_seen"],
            header=record["csv_header"],
            pending=bytes(record["pending"] or b""),
        )
        parser = StreamParser(spec.format, self.settings.import_max_bytes, state)
        digest = hashlib.sha256()
        chunks = _digested(chunks, digest)
        already = int(record["committed_rows"])
        max_rows = self.settings.import_max_rows
        rows_digest = RowsDigest()
        # The digest of this part's rows an earlier run committed before it was cut short: a re-run
        # skips them only if it reads the same rows (a part begun before digests were kept: unchecked).
        to_verify = record["committed_digest"] if already > state.rows else ""
        outcomes: list[ImportRowOutcome] = []
        batch: list[tuple[int, Mapping[str, Any] | str]] = []
        skipped = 0
        # One batch is written (a task) while the next is parsed and checked here: the database
        # works on one core while Python works on the other. Batches are written in file order.
        writing: asyncio.Task[list[ImportRowOutcome]] | None = None

        def verify_skipped_rows() -> None:
            nonlocal to_verify
            if to_verify and rows_digest.hexdigest() != to_verify:
                sent = f"part {part}" if part else "the file"
                message = (
                    f"import {spec.import_id} was cut short after row {already}, and {sent} is sent again with "
                    "other rows up to there; send the same rows again, or use a new import key"
                )
                raise ValidationFailed([FieldError("import_key", message)])
            to_verify = ""

        async def hand_over() -> None:
            nonlocal writing
            digest_so_far = rows_digest.hexdigest()  # the batch's rows are the last ones added
            checked = await self._check_rows(spec.import_id, batch, spec.options)
            checked.digest = digest_so_far
            batch.clear()
            if writing is not None:
                outcomes.extend(await writing)
            writing = asyncio.create_task(self.import_batch(spec.import_id, checked, spec.options))

        async def take(rows: Iterable[tuple[int, Mapping[str, Any] | str]]) -> None:
            nonlocal skipped
            for number, item in rows:
                if to_verify and number > already:
                    verify_skipped_rows()  # before any row of this run is handed over to be written
                rows_digest.add(number, item)
                if number <= already:
                    skipped += 1  # committed by an earlier run of this part
                    continue
                if number > max_rows:
                    # Rejected one by one in a normal answer, not a 422: a 422 could come only after the
                    # batches before were committed, unless the whole part (up to import_max_bytes) were
                    # held before writing any. So each row is accounted for, and the import completes.
                    item = f"is past the limit of {max_rows} rows an import may have; import it under a new import key"
                batch.append((number, item))
                if len(batch) >= self.settings.import_batch_size:
                    await hand_over()
                elif len(batch) % _CHECK_SLICE == 0:
                    await asyncio.sleep(0)  # lets the batch being written go on

        try:
            if spec.part_bytes:  # refused before a row is written (the check as chunks arrive comes after batches)
                check_import_size(parser.bytes_seen + spec.part_bytes, self.settings.import_max_bytes)
            try:
                async for chunk in chunks:
                    await take(_parsed(parser.feed, chunk))
                if final:
                    await take(_parsed(parser.finish))
                verify_skipped_rows()  # when the rows sent end before the ones committed
                if batch:
                    await hand_over()
                if writing is not None:
                    outcomes.extend(await writing)
            except BaseException:
                if writing is not None:  # the batch handed over commits (or fails) before the error is reported
                    await asyncio.gather(writing, return_exceptions=True)
                raise
        except ValidationFailed as error:
            if error.errors[0].field != "import_key":  # a re-run with other rows leaves the import as it was
                await self._save_import_state(
                    spec.import_id, None, record["parts_received"], final=False, error=error.detail
                )
            raise
        except _ParserFailed as error:
            # A parser bug must not leave the import `running` forever; the error still reaches the
            # caller (INTERNAL). Database errors are not caught here: the part can be sent again.
            await self._save_import_state(
                spec.import_id,
                None,
                record["parts_received"],
                final=False,
                error=f"the file could not be read: {error}",
            )
            raise
        digests = [*(record["part_digests"] or []), digest.hexdigest()]
        done = await self._save_import_state(
            spec.import_id, parser.state, max(part, 1), final=final, error="", digests=digests, skipped=skipped
        )
        return ImportPartResult(done, outcomes)

    @staticmethod
    async def _check_part_sent_before(record: RowMapping, part: int, chunks: AsyncIterator[bytes]) -> None:
        """422 on `import_key` when part `part` of the import was first sent with other bytes: the key
        names one file, and rows of another file must not be answered as imported when they are not.
        (Imports begun before the parts' digests were kept are not checked.)"""
        digests = record["part_digests"] or []
        digest = hashlib.sha256()
        async for _chunk in _digested(chunks, digest):
            pass
        if part <= len(digests) and digests[part - 1] != digest.hexdigest():
            message = f"part {part} of import {record['id']} was sent before with other content; use a new import key"
            raise ValidationFailed([FieldError("import_key", message)])

    async def _save_import_state(
        self,
        import_id: str,
        state: ParserState | None,
        parts: int,
        *,
        final: bool,
        error: str,
        digests: list[str] | None = None,
        skipped: int = 0,
    ) -> RowMapping:
        """`skipped`: the rows of the part that an earlier run of it committed (counted then), added
        to the import's count of rows read again."""
        values: dict[str, Any] = {"parts_received": parts, "error": error[:2000], "updated_at": self.clock()}
        if skipped:
            values["skipped"] = repo.imports.c.skipped + skipped
        if digests is not None:
            values["part_digests"] = digests
        if state is not None:  # the part is done: the next one resumes from its end, not within it
            values.update(
                committed_digest="",
                parsed_rows=state.rows,
                bytes_seen=state.bytes_seen,
                csv_header=state.header,
                pending=b"" if final else state.pending,
            )
        if error:
            values["status"] = "failed"
        elif final:
            values.update(status="completed", finished_at=self.clock())
        else:
            values["status"] = "running"
        async with transaction(self.engine) as conn:
            row = (
                (
                    await conn.execute(
                        update(repo.imports)
                        .where(repo.imports.c.id == import_id)
                        .values(values)
                        .returning(repo.imports)
                    )
                )
                .mappings()
                .one()
            )
        return row

    async def import_batch(
        self, import_id: str, batch: _CheckedBatch, options: ImportOptions
    ) -> list[ImportRowOutcome]:
        """One transaction per batch: inserts the new leads, their events and the import's progress."""
        principal = current_principal()
        now = batch.now
        checked = batch.rows
        outcomes = list(batch.rejected)
        who = actor(principal)
        async with self.uow.begin() as tx:
            conn = tx.conn
            await repo.lock_out_dedupe_writers(conn)
            cleans = [item.clean for item in checked]
            existing = await self._existing_keys(conn, cleans, options.on_duplicate)
            contacts = await repo.known_contacts(
                conn,
                emails={c.email_norm for c in cleans if c.email_norm},
                phones={c.phone_norm for c in cleans if c.phone_norm},
            )
            existing_ids = set(existing.values())
            out_of_sight = await _out_of_sight(conn, existing_ids)
            unknown_campaigns = await self._unknown_campaigns(conn, {i.values["campaign_id"] for i in checked})
            seen: dict[str, str] = {}
            new_items: dict[str, _CheckedRow] = {}  # by lead id
            rules: Rules | None = None
            for item in checked:  # duplicates first: the assignments below take turns for the new leads only
                keys = item.keys
                campaign_id = item.values["campaign_id"]
                if campaign_id in unknown_campaigns:
                    reason = f"campaign {campaign_id} does not exist"
                    outcomes.append(ImportRowOutcome(item.row, "rejected", field="campaign_id", reason=reason))
                    continue
                duplicate_of = _duplicate_in(keys, existing, seen)
                target = None
                if options.on_duplicate == "merge" and duplicate_of in existing_ids:
                    found = await self._import_merge_target(conn, keys, duplicate_of, existing, seen)
                    duplicate_of, target = found.duplicate_of, found.target
                    if found.ids:  # open leads found again, which `existing` now names
                        out_of_sight |= await _out_of_sight(conn, found.ids - existing_ids)
                        existing_ids |= found.ids
                if duplicate_of is not None and options.on_duplicate != "allow":
                    # A merge leaves unfilled a key another open lead or another new row holds.
                    held = {k for k in keys if existing.get(k, duplicate_of) != duplicate_of}
                    held.update(k for k in keys if seen.get(k, duplicate_of) != duplicate_of)
                    if options.on_duplicate == "merge" and duplicate_of in existing_ids:
                        if target is not None and _in_scope(target):  # no write to a lead the caller cannot see
                            filled = [k for k in domain.keys_a_merge_fills(target, item.clean) if k not in held]
                            await self._merge(tx, target, item.clean, principal, now, held=held)
                            existing.update(dict.fromkeys(filled, duplicate_of))  # later rows find them on it
                            outcomes.append(ImportRowOutcome(item.row, "merged", lead_id=duplicate_of))
                            continue
                    elif options.on_duplicate == "merge" and duplicate_of in new_items:  # an earlier row of the batch
                        rules = rules or await self.rules.get()
                        earlier = new_items[duplicate_of]
                        self._merge_rows(earlier, item.clean, rules, held)
                        seen.update({k: duplicate_of for k in earlier.keys if k not in seen})
                        outcomes.append(ImportRowOutcome(item.row, "merged", lead_id=duplicate_of))
                        continue
                    key = next(k for k in keys if existing.get(k) == duplicate_of or seen.get(k) == duplicate_of)
                    kind = key.split(":", 1)[0]
                    if duplicate_of in out_of_sight:  # the row is refused all the same, the lead not named
                        duplicate_of, reason = "", f"duplicate of an open lead outside your leads ({kind})"
                    else:
                        reason = f"duplicate of open lead {duplicate_of} ({kind})"
                    outcomes.append(
                        ImportRowOutcome(item.row, "rejected", lead_id=duplicate_of, field=kind, reason=reason)
                    )
                    continue
                for k in keys:
                    seen[k] = item.values["id"]
                new_items[item.values["id"]] = item
            assigned_by = [i.rule for i in new_items.values() if i.rule is not None] if options.assign else []
            turns, loads = await self._assignment_state(conn, assigned_by)
            new_rows: list[dict[str, Any]] = []
            history: list[dict[str, Any]] = []
            tasks: list[dict[str, Any]] = []
            events: list[PendingEvent] = []
            for item in new_items.values():
                values = item.values
                lead_id = values["id"]
                changed = False  # since the checks built the event's lead
                contact_id = next((contacts[k] for k in item.keys if k in contacts), "")
                if contact_id:
                    values["matched_contact_id"] = contact_id
                    changed = True
                rule_id = ""  # of the rule that assigned the lead, for its event
                if options.assign and not values["owner_id"]:
                    picked = domain.pick_in_batch(item.rule, turns, loads)
                    if picked is not None and picked[0]:
                        owner, team, rule_id = picked
                        values.update(self._assignment_values(owner, team, False, now))
                        changed = True
                    else:
                        values["in_pool"] = True
                        if picked is not None:  # the rule's team's pool
                            values["team"] = picked[1]
                            changed = True
                if values["owner_id"]:  # by a rule, or by the file's owner column
                    tasks.append(self._first_contact_task(lead_id, values["owner_id"], now))
                if values["owner_id"] and values["status"] in domain.OPEN_STATUSES:
                    loads[values["owner_id"]] = loads.get(values["owner_id"], 0) + 1
                new_rows.append(values)
                history.append(
                    {
                        "id": new_id(),
                        "lead_id": lead_id,
                        "previous_score": 0,
                        "score": values["score"],
                        "previous_grade": "",
                        "grade": values["grade"],
                        "matched_rule_ids": item.matched,
                        "changed_at": now,
                    }
                )
                created = item.created
                if created is None or changed:
                    created = events_pb2.LeadCreated(actor=who)
                    fill_lead(created.lead, values)
                events.append(PendingEvent(created, lead_id, lead_id))
                if values["owner_id"]:
                    assigned = events_pb2.LeadAssigned(rule_id=rule_id, actor=who)
                    assigned.lead.CopyFrom(created.lead)
                    events.append(PendingEvent(assigned, lead_id, lead_id))
                outcomes.append(ImportRowOutcome(item.row, "accepted", lead_id=lead_id))
            await bulk_insert(conn, repo.leads, new_rows)
            await bulk_insert(conn, repo.score_history, history)
            await bulk_insert(conn, repo.tasks, tasks)
            # The batch's events go to the outbox in this transaction, in one COPY.
            await bulk_insert(conn, self.outbox, outbox_rows(events, source=self.uow.source, now=now))
            rejected = [o for o in outcomes if o.status == "rejected"]
            await bulk_insert(
                conn,
                repo.import_rejections,
                [
                    {"import_id": import_id, "row": o.row, "field": o.field, "reason": o.reason, "lead_id": o.lead_id}
                    for o in rejected
                ],
            )
            counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("accepted", "merged", "rejected")}
            t = repo.imports
            await conn.execute(
                update(t)
                .where(t.c.id == import_id)
                .values(
                    rows_seen=t.c.rows_seen + batch.size,
                    accepted=t.c.accepted + counts["accepted"],
                    merged=t.c.merged + counts["merged"],
                    rejected=t.c.rejected + counts["rejected"],
                    committed_rows=func.greatest(t.c.committed_rows, batch.last_row)
                    if conn.dialect.name == "postgresql"
                    else func.max(t.c.committed_rows, batch.last_row),
                    committed_digest=batch.digest,
                    updated_at=self.clock(),
                )
            )
        return sorted(outcomes, key=lambda o: o.row)

    def _merge_rows(
        self, earlier: _CheckedRow, clean: domain.CleanLead, rules: Rules, held: Collection[str] = ()
    ) -> None:
        """`on_duplicate=merge` within one batch: a later row fills the empty fields of the earlier
        row it duplicates (and appends its tags), as it would merge into that lead once stored; not
        with a dedupe key that another lead or row holds (`held`)."""
        values = earlier.values
        values.update(domain.merge_into(values, clean, held))
        earlier.keys = _dedupe_keys(domain.CleanLead(values, values["email_norm"], values["phone_norm"]))
        score, grade, earlier.matched = self._score(rules, values, {})
        values.update(score=score, grade=grade, scoring_generation=rules.generation)
        earlier.created = None  # built again from the merged row

    async def _unknown_campaigns(self, conn: AsyncConnection, campaign_ids: set[str]) -> set[str]:
        wanted = sorted(c for c in campaign_ids if c)
        if not wanted:
            return set()
        # Locked as `_check_campaign` locks one: a campaign found here is not deleted before the batch commits.
        query = select(repo.campaigns.c.id).where(repo.campaigns.c.id.in_(wanted))
        known = await conn.scalars(query.with_for_update(key_share=True, read=True))
        return set(wanted) - set(known)

    async def _check_rows(
        self, import_id: str, batch: Sequence[tuple[int, Mapping[Any, Any] | str]], options: ImportOptions
    ) -> _CheckedBatch:
        """Maps, validates and scores a batch's rows (the CPU-heavy part, no database): the leads
        ready to insert with their LeadCreated events, and the rows rejected."""
        principal = current_principal()
        now = self.clock()
        rules = await self.rules.get()
        base = self._import_base(principal, now, import_id)
        who = actor(principal)
        checked: list[_CheckedRow] = []
        rejected: list[ImportRowOutcome] = []
        for count, (row_number, record) in enumerate(batch, start=1):
            if count % _CHECK_SLICE == 0:
                await asyncio.sleep(0)  # lets the batch being written go on
            if isinstance(record, str):
                rejected.append(ImportRowOutcome(row_number, "rejected", reason=record, field="row"))
                continue
            try:
                data = options.mapper.map(record)
                clean = domain.validate_lead(data, default_country=self.settings.default_country_code)
                if rules.custom_fields:
                    clean.values["custom"] = checked_custom(
                        rules.custom_fields, clean.values.get("custom") or {}, partial=False, lenient=True
                    )
            except ValidationFailed as error:
                first = error.errors[0]
                rejected.append(ImportRowOutcome(row_number, "rejected", reason=error.detail, field=first.field))
                continue
            values, matched = self._import_values(clean, base, rules, now)
            assigning = options.assign and not values["owner_id"]
            rule = domain.first_matching_rule(rules.assignment, values) if assigning else None
            created = None
            if rule is None:
                created = events_pb2.LeadCreated(actor=who)
                fill_lead(created.lead, values)
            checked.append(_CheckedRow(row_number, clean, values, _dedupe_keys(clean), matched, rule, created))
        last_row = max((n for n, _ in batch), default=0)
        return _CheckedBatch(checked, rejected, len(batch), last_row, now)

    async def _import_merge_target(
        self,
        conn: AsyncConnection,
        keys: Sequence[str],
        duplicate_of: str,
        existing: dict[str, str],
        seen: Mapping[str, str],
    ) -> _ImportMergeTarget:
        """The stored open lead an import row with `keys` merges into, its row locked (`_merge_target`
        for a batch), or the earlier row of the batch it merges into now, or None for a new lead.
        The batch found `duplicate_of` by the keys `existing` maps to it, read without locks: the
        batch locks out the writers of dedupe keys, not a disqualify or a conversion, which may
        have closed the lead while the batch waited for its row. Then `existing` forgets what the
        lead no longer holds and has the row's keys looked up again."""
        ids: set[str] = set()
        for attempt in range(1, _MERGE_ATTEMPTS + 1):
            target = await repo.load_lead(conn, duplicate_of, for_update=True)
            found_by = {k for k in keys if existing.get(k) == duplicate_of}
            held_now = _held_keys(target) if target is not None and target["status"] in domain.OPEN_STATUSES else set()
            if found_by & held_now:
                return _ImportMergeTarget(duplicate_of, target, ids)
            if attempt == _MERGE_ATTEMPTS:
                break
            for key in [k for k, lead_id in existing.items() if lead_id == duplicate_of and k not in held_now]:
                del existing[key]
            looked_up = [k for k in keys if k not in existing]
            for key, lead_id in (await self._open_holders(conn, looked_up)).items():
                existing.setdefault(key, lead_id)
                ids.add(lead_id)
            again = _duplicate_in(keys, existing, seen)
            if again is None or again not in existing.values():  # a new lead, or one of an earlier row
                return _ImportMergeTarget(again, None, ids)
            duplicate_of = again
        raise Unavailable("an open lead the import's rows duplicate kept changing while they were merged; try again")

    async def _existing_keys(
        self, conn: AsyncConnection, cleans: Sequence[domain.CleanLead], on_duplicate: str
    ) -> dict[str, str]:
        """Dedupe keys of the batch already held by open leads: one query per batch."""
        if on_duplicate == "allow" or not cleans:
            return {}
        keys = [key for clean in cleans for key in domain.dedupe_key_fields(clean).values()]
        return await self._open_holders(conn, keys)

    @staticmethod
    async def _open_holders(conn: AsyncConnection, keys: Iterable[str]) -> dict[str, str]:
        """The open lead (the oldest) holding each of these dedupe keys ("email:…", "phone:…",
        "external_id:…") that one holds."""
        values: dict[str, set[str]] = {"email": set(), "phone": set(), "external_id": set()}
        for key in keys:
            kind, _, value = key.partition(":")
            values[kind].add(value)
        emails, phones, externals = (sorted(values[kind]) for kind in ("email", "phone", "external_id"))
        if not (emails or phones or externals):
            return {}
        found: dict[str, str] = {}
        for lead_id, email, phone, external in await repo.open_leads_with_keys(
            conn, emails=emails, phones=phones, externals=externals
        ):
            for key in (
                f"email:{email}" if email else "",
                f"phone:{phone}" if phone else "",
                f"external_id:{external}" if external else "",
            ):
                if key:
                    found.setdefault(key, lead_id)
        return found

    async def _assignment_state(
        self, conn: AsyncConnection, rules: Sequence[domain.AssignmentRule]
    ) -> tuple[dict[str, deque[int]], dict[str, int]]:
        """For the rules that assign a batch's new leads (one entry per lead): their turns, taken
        at once, of the rules that still exist, and the open leads of the reps whose caps or
        least-loaded picks need them, with their rows locked (caps hold against concurrent creates)."""
        if not rules:
            return {}, {}
        try:
            turns = await repo.take_turns(conn, domain.turns_wanted(rules))
        except DBAPIError as error:
            if not repo.rule_deleted_meanwhile(error):
                raise
            self.rules.invalidate()  # the part, sent again, is checked against the rules left
            raise Unavailable("an assignment rule was deleted while this part was imported; send it again") from error
        counted = sorted({u for r in rules if domain.needs_loads(r) for u in r.user_ids})
        loads = await repo.open_loads(conn, counted, locked=True) if counted else {}
        return {rule_id: deque(taken) for rule_id, taken in turns.items()}, loads

    def _import_base(self, principal: Principal, now: datetime, import_id: str) -> dict[str, Any]:
        """The columns every imported lead of a batch starts with."""
        return {
            "name": "",
            "company": "",
            "title": "",
            "phone": "",
            "email": "",
            "source": "import",
            "source_detail": "",
            "campaign_id": "",
            "region": "",
            "industry": "",
            "owner_id": _entered_for(principal),  # a row's owner column wins (`_import_values`)
            "team": _team_entered_for(principal),
            "external_id": "",
            "status": "new",
            "created_at": now,
            "updated_at": now,
            "version": 1,
            "follow_up_overdue": False,
            "import_id": import_id,
            "matched_contact_id": "",
            "disqualified_reason": "",
            "converted_account_id": "",
            "converted_contact_id": "",
            "converted_opportunity_id": "",
            "assigned_at": None,
            "first_contact_due_at": None,
            "first_contacted_at": None,
            "last_activity_at": None,
            "recycled_at": None,
            "claimed_at": None,
        }

    def _import_values(
        self, clean: domain.CleanLead, base: Mapping[str, Any], rules: Rules, now: datetime
    ) -> tuple[dict[str, Any], list[str]]:
        """The lead row of a checked import row, and the ids of the scoring rules it matched."""
        values: dict[str, Any] = {**base, "tags": [], "custom": {}}
        values.update({k: v for k, v in clean.values.items() if v not in (None, "")})
        score, grade, matched = self._score(rules, values, {})
        values.update(
            id=new_id(),
            email_norm=clean.email_norm,
            phone_norm=clean.phone_norm,
            score=score,
            grade=grade,
            scoring_generation=rules.generation,
            in_pool=not values["owner_id"],
        )
        if values["owner_id"]:
            values.update(self._assignment_values(values["owner_id"], "", False, now))
        return values, matched

    async def get_import(self, import_id: str) -> RowMapping:
        async with self.engine.connect() as conn:
            query = select(repo.imports).where(repo.imports.c.id == import_id, _imports_seen())
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound("import", import_id)
        return row

    async def list_imports(self, *, status: str, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        """The imports the caller sees as `get_import` does, newest first, a page at a time; only
        those of `status` when given."""
        if status and status not in IMPORT_STATUSES:
            raise ValidationFailed([FieldError("status", f"{status!r} is not one of {', '.join(IMPORT_STATUSES)}")])
        t = repo.imports
        query = select(t).where(_imports_seen())
        if status:
            query = query.where(t.c.status == status)
        async with self.engine.connect() as conn:
            return await _keyset_rows(
                conn, query, t.c.started_at, id_column=t.c.id, descending=True, cursor=cursor, limit=limit
            )

    async def import_rejections(
        self, import_id: str, *, limit: int, cursor: str
    ) -> tuple[RowMapping, list[RowMapping], str]:
        """The import as `get_import` finds it, a page of its rejected rows by row number (the
        table's key within an import) and the next page's cursor. `get_import` checks access first:
        no rejection of an import outside the caller's is read."""
        lead_import = await self.get_import(import_id)
        r = repo.import_rejections.c
        async with self.engine.connect() as conn:
            query = select(repo.import_rejections).where(r.import_id == import_id)
            rows, next_page = await _keyset_rows(conn, query, r.row, cursor=cursor, limit=limit)
        return lead_import, rows, next_page

    # --- scoring and assignment rules -------------------------------------------------------

    async def _idempotent_create(
        self,
        operation: str,
        key: str,
        table: Any,
        values: dict[str, Any],
        publish: Callable[[Transaction, RowMapping], None] | None = None,
        check: Callable[[AsyncConnection], Awaitable[None]] | None = None,
        *,
        rescores: bool = False,
    ) -> RowMapping:
        """Inserts `values` once per idempotency key; `check`, if given, runs in the insert's
        transaction before it (a reference checked there stays valid until the commit). `rescores`:
        the insert changes how leads score (a scoring rule), and moves the scoring generation on."""
        principal = current_principal()
        now = self.clock()
        async with self.uow.begin() as tx:
            earlier = await claim(tx.conn, operation, key, principal, {"id": values["id"]}, now)
            if earlier is not None:
                gone = NotFound(operation.removeprefix("create_").replace("_", " "), earlier["id"])
                return (await idempotency.earlier_record(tx.conn, table, earlier["id"], gone=gone))._mapping
            if check is not None:
                await check(tx.conn)
            row = (await tx.conn.execute(insert(table).values(values).returning(table))).mappings().one()
            if publish is not None:
                publish(tx, row)
            if rescores:
                await repo.next_scoring_generation(tx.conn)
        self.rules.invalidate()
        return row

    async def _versioned_update(
        self,
        table: Any,
        resource: str,
        record_id: str,
        expected_version: int,
        values: dict[str, Any],
        *,
        rescores: bool = False,
    ) -> RowChange:
        async with transaction(self.engine) as conn:
            change = await _versioned_write(conn, table, resource, record_id, expected_version, values)
            if rescores:
                await repo.next_scoring_generation(conn)
        self.rules.invalidate()
        return change

    async def _delete(
        self, table: Any, resource: str, record_id: str, expected_version: int, *, rescores: bool = False
    ) -> RowMapping:
        """Deletes the record when `expected_version` is its current version or 0 (unconditional);
        returns it as it was (for the caller's audit trail)."""
        async with transaction(self.engine) as conn:
            locked = select(table).where(table.c.id == record_id).with_for_update()
            current = (await conn.execute(locked)).mappings().first()
            if current is None:
                raise NotFound(resource, record_id)
            if expected_version and current["version"] != expected_version:
                raise StaleVersion(resource, record_id, current["version"])
            await conn.execute(delete(table).where(table.c.id == record_id))
            if rescores:
                await repo.next_scoring_generation(conn)
        self.rules.invalidate()
        return current

    @staticmethod
    def _scoring_values(rule: ScoringRule, name: str) -> dict[str, Any]:
        domain.validate_scoring_rule(rule, name)
        return {
            "name": name.strip(),
            "field": rule.field,
            "operator": rule.operator,
            "value": rule.value,
            "activity_kind": rule.activity_kind,
            "min_count": rule.min_count,
            "points": rule.points,
            "enabled": rule.enabled,
            "engagement_kind": rule.engagement_kind,
            "url_contains": rule.url_contains,
        }

    # A write of a scoring rule or of the thresholds moves the scoring generation on in its
    # transaction and returns without touching a lead: `rescore_stale_leads` rescores the open ones.

    async def create_scoring_rule(self, rule: ScoringRule, name: str, key: str) -> RowMapping:
        _check_scoring_change("scoring rules")
        values = {"id": new_id(), **self._scoring_values(rule, name), "version": 1}
        return await self._idempotent_create("create_scoring_rule", key, repo.scoring_rules, values, rescores=True)

    async def update_scoring_rule(self, rule: ScoringRule, name: str, expected_version: int) -> RowChange:
        _check_scoring_change("scoring rules")
        values = self._scoring_values(rule, name)
        return await self._versioned_update(
            repo.scoring_rules, "scoring rule", rule.id, expected_version, values, rescores=True
        )

    async def delete_scoring_rule(self, rule_id: str, expected_version: int = 0) -> RowMapping:
        _check_scoring_change("scoring rules")
        return await self._delete(repo.scoring_rules, "scoring rule", rule_id, expected_version, rescores=True)

    async def list_scoring_rules(self, *, limit: int, cursor: str) -> tuple[list[RowMapping], str, Thresholds, int]:
        """A page of the scoring rules with the next page's cursor, and the grade thresholds with
        their version."""
        async with self.engine.connect() as conn:
            rows, next_page = await _keyset_rows(
                conn, select(repo.scoring_rules), repo.scoring_rules.c.id, cursor=cursor, limit=limit
            )
            thresholds, version = await grade_thresholds(conn)
        return rows, next_page, thresholds, version

    async def get_scoring_rule(self, rule_id: str) -> RowMapping:
        return await self._rule_row(repo.scoring_rules, "scoring rule", rule_id)

    async def set_thresholds(self, t: Thresholds, expected_version: int = 0) -> Change[VersionedThresholds]:
        """Sets the grade thresholds when `expected_version` is their version or 0 (unconditional);
        returns them with their new version, and as they were with theirs."""
        _check_scoring_change("grade thresholds")
        domain.validate_thresholds(t)
        async with transaction(self.engine) as conn:
            # The generation first: its row stays locked to the commit, so settings of the
            # thresholds run one at a time, also the first, which finds no row to lock yet.
            await repo.next_scoring_generation(conn)
            previous = await grade_thresholds(conn, for_update=True)
            current = previous.version
            if expected_version and current != expected_version:
                raise StaleVersion("grade", "thresholds", current)
            values = {"grade_a": t.a, "grade_b": t.b, "grade_c": t.c, "version": current + 1}
            if (
                await conn.execute(update(repo.settings_table).where(repo.settings_table.c.id == 1).values(values))
            ).rowcount == 0:
                await conn.execute(insert(repo.settings_table).values(id=1, **values))
        self.rules.invalidate()
        return Change(VersionedThresholds(t, current + 1), previous)

    @staticmethod
    def _assignment_values_of(rule: AssignmentRule, name: str) -> dict[str, Any]:
        domain.validate_assignment_rule(rule, name)
        return {
            "name": name.strip(),
            "position": rule.position,
            "enabled": rule.enabled,
            "regions": sorted(rule.regions),
            "industries": sorted(rule.industries),
            "sources": sorted(rule.sources),
            "min_score": rule.min_score,
            "max_score": rule.max_score,
            "team": rule.team,
            "user_ids": list(rule.user_ids),
            "strategy": rule.strategy,
            "capacity": rule.capacity,
            "lead_team": rule.lead_team,
        }

    async def create_assignment_rule(self, rule: AssignmentRule, name: str, key: str) -> RowMapping:
        rule = domain.rule_in_callers_scope(rule, current_scope())
        values = {"id": new_id(), **self._assignment_values_of(rule, name), "version": 1}
        _check_rule_scope(values)
        return await self._idempotent_create("create_assignment_rule", key, repo.assignment_rules, values)

    async def update_assignment_rule(self, rule: AssignmentRule, name: str, expected_version: int) -> RowChange:
        values = self._assignment_values_of(domain.rule_in_callers_scope(rule, current_scope()), name)
        _check_rule_scope(await self.get_assignment_rule(rule.id))  # as it routes now, and as it would
        _check_rule_scope(values)
        return await self._versioned_update(repo.assignment_rules, "assignment rule", rule.id, expected_version, values)

    async def delete_assignment_rule(self, rule_id: str, expected_version: int = 0) -> RowMapping:
        _check_rule_scope(await self.get_assignment_rule(rule_id))
        return await self._delete(repo.assignment_rules, "assignment rule", rule_id, expected_version)

    async def get_assignment_rule(self, rule_id: str) -> RowMapping:
        return await self._rule_row(repo.assignment_rules, "assignment rule", rule_id)

    async def _rule_row(self, table: Table, resource: str, rule_id: str) -> RowMapping:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(table).where(table.c.id == rule_id))).mappings().first()
        if row is None:
            raise NotFound(resource, rule_id)
        return row

    async def list_assignment_rules(self, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        """A page of the assignment rules by position, then id."""
        r = repo.assignment_rules.c
        async with self.engine.connect() as conn:
            return await _keyset_rows(
                conn, select(repo.assignment_rules), r.position, id_column=r.id, cursor=cursor, limit=limit
            )

    # --- campaigns --------------------------------------------------------------------------

    @staticmethod
    def _campaign_values(data: Mapping[Any, Any], paths: Sequence[str] | None) -> dict[str, Any]:
        fields = paths if paths is not None else ("name", "channel", "cost", "starts_on", "ends_on", "owner_id", "team")
        errors: list[FieldError] = []
        values: dict[str, Any] = {}
        for name in fields:
            value = data.get(name)
            if name in ("name", "channel", "owner_id", "team"):
                text = str(value or "").strip()
                if name == "name" and not text:
                    errors.append(FieldError("name", "must not be empty"))
                if len(text) > 200:
                    errors.append(FieldError(name, "longer than 200 characters"))
                values[name] = text
            elif name == "cost":
                cost: Money | None = value
                if cost is not None:
                    errors.extend(check_amount(cost.amount, field="cost.amount", currency=cost.currency))
                values["cost_amount"] = cost.amount if cost else None
                values["cost_currency"] = cost.currency if cost else ""
            elif name in ("starts_on", "ends_on"):
                try:
                    values[name] = date.fromisoformat(value) if value else None
                except ValueError:
                    errors.append(FieldError(name, f"{value!r} is not a date (YYYY-MM-DD)"))
            else:
                errors.append(FieldError(name, "is not a writable campaign field"))
        errors.extend(_period_errors(values.get("starts_on"), values.get("ends_on"), given=values))
        if errors:
            raise ValidationFailed(errors)
        return values

    async def create_campaign(self, data: Mapping[Any, Any], key: str) -> RowMapping:
        principal = current_principal()
        now = self.clock()
        values = self._campaign_values(data, None)
        values.update(
            id=new_id(),
            owner_id=values["owner_id"] or principal.user_id,
            team=values["team"] or principal.team,
            region=principal.region,
            created_at=now,
            updated_at=now,
            version=1,
        )

        def publish(tx: Transaction, row: RowMapping) -> None:
            tx.publish(
                events_pb2.CampaignCreated(campaign=campaign_to_proto(row), actor=actor(principal)), key=row["id"]
            )

        return await self._idempotent_create("create_campaign", key, repo.campaigns, values, publish)

    async def get_campaign(self, campaign_id: str) -> RowMapping:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(repo.campaigns).where(repo.campaigns.c.id == campaign_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound("campaign", campaign_id)
        return row

    async def update_campaign(
        self, campaign_id: str, data: Mapping[Any, Any], paths: Sequence[str], expected_version: int
    ) -> RowChange:
        if not paths:
            raise ValidationFailed([FieldError("update_mask", "names no field to update")])
        values = self._campaign_values(data, paths)
        principal = current_principal()
        async with self.uow.begin() as tx:
            t = repo.campaigns
            # FOR NO KEY UPDATE: the key-share locks of writes linking to the campaign (`_check_campaign`)
            # guard it against deletion only, so an update need not wait for them.
            locked = select(t).where(t.c.id == campaign_id).with_for_update(key_share=True)
            current = (await tx.conn.execute(locked)).mappings().first()
            if current is None:
                raise NotFound("campaign", campaign_id)
            if expected_version and current["version"] != expected_version:
                raise StaleVersion("campaign", campaign_id, current["version"])
            # One date changed alone must fit the other as stored.
            period = {**{k: current[k] for k in ("starts_on", "ends_on")}, **values}
            if errors := _period_errors(period["starts_on"], period["ends_on"], given=values):
                raise ValidationFailed(errors)
            changes = {name: value for name, value in values.items() if current[name] != value}
            if not changes:  # as a lead's: a write that changes nothing makes no version and no event
                return Change(current, current)
            stmt = (
                update(t)
                .where(t.c.id == campaign_id)
                .values(**changes, updated_at=self.clock(), version=t.c.version + 1)
            )
            row = (await tx.conn.execute(stmt.returning(t))).mappings().one()
            changed_fields = sorted({"cost" if name.startswith("cost_") else name for name in changes})
            tx.publish(
                events_pb2.CampaignUpdated(
                    campaign=campaign_to_proto(row), changed_fields=changed_fields, actor=actor(principal)
                ),
                key=campaign_id,
            )
            return Change(row, current)

    async def list_campaigns(self, channel: str, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        size = page_limit(limit)
        query = select(repo.campaigns)
        if channel:
            query = query.where(repo.campaigns.c.channel == channel)
        query = keyset_page(
            query,
            sort_column=repo.campaigns.c.id,
            id_column=repo.campaigns.c.id,
            descending=True,
            cursor=cursor,
            limit=size,
        )
        async with self.engine.connect() as conn:
            rows = list((await conn.execute(query)).mappings())
        return rows[:size], next_cursor([_Row(r) for r in rows], sort_key="id", descending=True, limit=size)

    async def delete_campaign(self, campaign_id: str, expected_version: int) -> RowMapping:
        """Deletes a campaign that no lead or web form links to (`domain.ensure_campaign_unused`);
        returns it as it was (for the caller's audit trail).
        Its row is locked for update before the links are counted: a lead, import or form writing a
        link holds the row key-share locked (`_check_campaign`) until it commits, so the count,
        taken after the lock is granted, sees every link written meanwhile."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            conn = tx.conn
            t = repo.campaigns
            current = (await conn.execute(select(t).where(t.c.id == campaign_id).with_for_update())).mappings().first()
            if current is None:
                raise NotFound("campaign", campaign_id)
            if expected_version and current["version"] != expected_version:
                raise StaleVersion("campaign", campaign_id, current["version"])
            # Every lead, whatever the caller's record scope: a link out of sight dangles all the same.
            lead_count = await conn.scalar(
                select(func.count()).select_from(repo.leads).where(repo.leads.c.campaign_id == campaign_id)
            )
            w = repo.webforms
            webform_ids = list(
                await conn.scalars(select(w.c.id).where(w.c.campaign_id == campaign_id).order_by(w.c.id))
            )
            domain.ensure_campaign_unused(lead_count or 0, webform_ids)
            await conn.execute(delete(t).where(t.c.id == campaign_id))
            tx.publish(events_pb2.CampaignDeleted(campaign_id=campaign_id, actor=actor(principal)), key=campaign_id)
            return current

    # --- webforms ---------------------------------------------------------------------------

    async def create_webform(self, data: Mapping[Any, Any], key: str) -> RowMapping:
        rate = data.get("rate_limit_per_minute") or self.settings.webform_default_rate_per_minute  # 0: not given
        given = {**data, "rate_limit_per_minute": rate}
        values = self._webform_settings(given, WEBFORM_SETTINGS)
        values.update(id=new_id(), form_key=secrets.token_urlsafe(24), enabled=True, created_at=self.clock(), version=1)

        async def check(conn: AsyncConnection) -> None:
            await self._check_campaign(conn, values["campaign_id"])

        return await self._idempotent_create("create_webform", key, repo.webforms, values, check=check)

    async def get_webform(self, webform_id: str) -> RowMapping:
        w = repo.webforms
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(w).where(w.c.id == webform_id))).mappings().first()
        if row is None:
            raise NotFound("webform", webform_id)
        return row

    async def update_webform(
        self, webform_id: str, data: Mapping[Any, Any], paths: Sequence[str], expected_version: int
    ) -> RowChange:
        """The settings named by `paths` (a form's key changes only by `rotate_webform_key`)."""
        unknown = sorted(set(paths) - {*WEBFORM_SETTINGS, "enabled"})
        if unknown or not paths:
            raise ValidationFailed([FieldError("update_mask", f"names settings of a form; not {unknown}")])
        values = self._webform_settings(data, [path for path in paths if path != "enabled"])
        if "enabled" in paths:
            values["enabled"] = bool(data.get("enabled"))
        async with transaction(self.engine) as conn:
            # In the write's transaction, which holds the campaign's row lock: see `delete_campaign`.
            await self._check_campaign(conn, values.get("campaign_id", ""))
            return await _versioned_write(conn, repo.webforms, "webform", webform_id, expected_version, values)

    @staticmethod
    def _webform_settings(data: Mapping[Any, Any], names: Sequence[str]) -> dict[str, Any]:
        """The form settings `names` of `data`, checked (a 422 naming each field at fault); the
        campaign is checked in the write's transaction (`_check_campaign`)."""
        values = {name: data.get(name) or ("" if name != "rate_limit_per_minute" else 0) for name in names}
        errors: list[FieldError] = []
        if "name" in values:
            values["name"] = str(values["name"]).strip()
            if not values["name"]:
                errors.append(FieldError("name", "must not be empty"))
        if "rate_limit_per_minute" in values and not 1 <= int(values["rate_limit_per_minute"]) <= 10_000:
            errors.append(FieldError("rate_limit_per_minute", "must be between 1 and 10000"))
        if "honeypot_field" in values:
            errors.extend(domain.validate_honeypot_field(str(values["honeypot_field"])))
        if errors:
            raise ValidationFailed(errors)
        return values

    async def rotate_webform_key(self, webform_id: str, key: str, expected_version: int) -> Mapping[Any, Any]:
        """A new key for a leaked or abused one: submissions with the old key answer 404 at once.
        A repeated idempotency key draws none: a client retrying after a timeout gets the form as
        it is, with the key the first call drew, instead of a second key that kills the first."""
        principal = current_principal()
        w = repo.webforms
        async with transaction(self.engine) as conn:
            # Before the version check: a retry sends the If-Match of the form before its first call.
            earlier = await claim(conn, "rotate_webform_key", key, principal, {"id": webform_id}, self.clock())
            if earlier is not None:
                _same_record(key, "webform", earlier["id"], webform_id)
                return (await conn.execute(select(w).where(w.c.id == webform_id))).mappings().one()
            values = {"form_key": secrets.token_urlsafe(24)}
            return (await _versioned_write(conn, w, "webform", webform_id, expected_version, values)).record

    async def list_webforms(self, *, limit: int, cursor: str) -> tuple[list[RowMapping], str]:
        async with self.engine.connect() as conn:
            return await _keyset_rows(conn, select(repo.webforms), repo.webforms.c.id, cursor=cursor, limit=limit)

    async def submit_webform(
        self, form_key: str, fields: Mapping[str, str], key: str
    ) -> tuple[Mapping[Any, Any], bool] | None:
        """`capture_submission`'s lead and whether it was merged (None for a bot's submission)."""
        submission = await self.capture_submission(form_key, fields, key)
        return None if submission is None else (submission.capture.lead, submission.capture.merged)

    async def capture_submission(self, form_key: str, fields: Mapping[str, str], key: str) -> Submission | None:
        """Public intake: the form key authenticates; a fixed one-minute window limits the rate.
        A submission that fills the form's honeypot field is a bot's: it counts against the rate and
        creates nothing (None); the caller answers it like any other, so the bot learns nothing."""
        now = self.clock()
        async with transaction(self.engine) as conn:
            form = (
                (await conn.execute(select(repo.webforms).where(repo.webforms.c.form_key == form_key)))
                .mappings()
                .first()
            )
            if form is None or not form["enabled"]:
                raise NotFound("webform", form_key)
            window = now.replace(second=0, microsecond=0)
            used = await repo.count_submission(conn, form_key, window)
        if used > form["rate_limit_per_minute"]:
            raise RateLimited(
                f"webform {form['name']} accepts {form['rate_limit_per_minute']} submissions per minute",
                retry_after=60 - now.second,
            )
        if domain.fills_honeypot(fields, form["honeypot_field"]):
            WEBFORM_SPAM.labels(form["id"]).inc()
            log.info("webform %s: a submission filled the honeypot field and was discarded", form["id"])
            return None
        data: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        for name, value in fields.items():
            if name in domain.WEBFORM_LEAD_FIELDS:
                data[name] = value
            elif name != form["honeypot_field"]:
                custom[name] = value
        data.update(source="webform", source_detail=form["name"], custom=custom)
        defaults = {"campaign_id": form["campaign_id"], "team": form["team"], "region": form["region"]}
        # The form key was the credential: the lead is captured by the form itself, with full scope.
        form_principal = Principal(user_id=f"webform:{form['id']}", kind="webform")
        with acting_as(form_principal, ALL_RECORDS, current_request_id()):
            capture = await self.capture_lead(
                data, on_duplicate="merge", idempotency_key=key, defaults=defaults, lenient_custom=True
            )
        return Submission(webform_id=form["id"], capture=capture)

    # --- timers -----------------------------------------------------------------------------

    async def forget_past_webform_windows(self) -> int:
        """Deletes web forms' rate windows that closed over an hour ago (a batch): the table holds a
        row per form per minute with a submission, and only the current minute's is ever read."""
        before = self.clock() - timedelta(hours=1)
        limit = self.settings.jobs_batch_size
        return await delete_expired(self.engine, repo.webform_rate, "window_start", before=before, limit=limit)

    async def flag_overdue_first_contacts(self) -> int:
        """SLA timer: leads past their first-contact due time are flagged and evented, once."""
        now = self.clock()
        async with self.uow.begin() as tx:
            batch = repo.overdue_first_contacts(now, self.settings.jobs_batch_size)
            due = (await tx.conn.execute(batch)).mappings().all()
            for lead in due:
                if not domain.is_first_contact_overdue(
                    status=lead["status"],
                    owner_id=lead["owner_id"],
                    first_contacted_at=lead["first_contacted_at"],
                    due_at=lead["first_contact_due_at"],
                    now=now,
                ):
                    continue
                row = await self._write(tx.conn, lead["id"], {"follow_up_overdue": True, "updated_at": now})
                record = lead_to_proto(row)
                overdue = events_pb2.LeadFollowUpOverdue(lead=record, due_at=record.first_contact_due_at)
                tx.publish(overdue, key=lead["id"])
                # No request made this change for the gateway to audit: the record goes with it.
                audit = audit_of_job(
                    FIRST_CONTACT_JOB,
                    action="flag_overdue",
                    resource="leads",
                    record_id=lead["id"],
                    record=record,
                    previous=lead_to_proto(lead),
                    occurred_at=now,
                    reason=f"not contacted by {record.first_contact_due_at.ToJsonString()}",
                )
                tx.publish(audit, key=lead["id"])
            return len(due)

    async def recycle_idle_leads(self) -> int:
        """Recycling timer: owned leads without activity for N days return to the pool."""
        now = self.clock()
        cutoff = self.policy.recycle_cutoff(now)
        async with self.uow.begin() as tx:
            batch = repo.idle_held_leads(cutoff, self.settings.jobs_batch_size)
            idle = (await tx.conn.execute(batch)).mappings().all()
            for lead in idle:
                if domain.is_recyclable(
                    status=lead["status"],
                    owner_id=lead["owner_id"],
                    assigned_at=lead["assigned_at"],
                    last_activity_at=lead["last_activity_at"],
                    policy=self.policy,
                    now=now,
                ):
                    reason = f"no activity for {self.policy.recycle_after_days:g} days"
                    row = await self._to_pool(tx, lead, reason, SYSTEM, now)
                    audit = audit_of_job(
                        RECYCLE_JOB,
                        action="recycle",
                        resource="leads",
                        record_id=lead["id"],
                        record=lead_to_proto(row),
                        previous=lead_to_proto(lead),
                        occurred_at=now,
                        reason=reason,
                    )
                    tx.publish(audit, key=lead["id"])
            return len(idle)

    async def rescore_stale_leads(self) -> int:
        """Rescoring job: open leads scored under an older scoring generation (a scoring rule or the
        thresholds changed since) are scored with the current rules, as an activity rescores its
        lead: when the score or grade moves, history, `lead.scored` and a new version; when not,
        only the generation is recorded. Closed leads keep the score they closed with."""
        now = self.clock()
        async with self.uow.begin() as tx:
            # Rules at least as new as the generation committed now, even if this replica's cache
            # was loaded before a change made on another one.
            rules = await self.rules.get(generation=await repo.current_scoring_generation(tx.conn))
            batch = repo.leads_scored_before(rules.generation, self.settings.jobs_batch_size)
            stale = (await tx.conn.execute(batch)).mappings().all()
            ids = [lead["id"] for lead in stale]
            counts = await self._scoring_counts(tx.conn, ids, rules)
            unmoved: list[str] = []
            for lead in stale:
                scored = await self._rescored(
                    tx, lead, rules, counts.activities.get(lead["id"], {}), now, counts.engagements.get(lead["id"], {})
                )
                if scored:
                    await self._write(tx.conn, lead["id"], {**scored, "updated_at": now})
                else:
                    unmoved.append(lead["id"])
            await repo.record_scoring_generation(tx.conn, unmoved, rules.generation)
            return len(stale)

    # --- conversion saga --------------------------------------------------------------------

    async def convert(self, req: ConvertRequest) -> ConvertResult:
        """Lead -> account (new or existing) + contact (+ opportunity), idempotent and compensated.

        The saga row records each step, and every upstream create uses a key derived from the lead,
        the attempt and the attempt's random nonce, so a retry after a crash or timeout resumes
        without creating anything twice, and no caller can plant a record under a key to come.
        Into an existing account, the contact the lead matched is linked when it is one of that
        account's, not created again (and never deleted by compensation).
        A business error from a later step deletes what this attempt created (compensation).
        A converted lead answers a repeated request with its links unless it asks for more (409).
        Conversions of one lead run one at a time, on any replica: one that comes while another is
        under way waits for it, then finds the lead converted (or the attempt undone), and never
        resumes an attempt still in flight as if it had been cut short.
        """
        async with held_exclusively(self.engine, repo.conversion_lock(req.lead_id)):
            return await self._convert_alone(req)

    async def _convert_alone(self, req: ConvertRequest) -> ConvertResult:
        if self.ports is None:
            raise Unavailable("conversion is not configured (no accounts/sales targets)")
        if req.create_opportunity and req.opportunity_amount is not None and req.opportunity_amount.amount < 0:
            raise ValidationFailed([FieldError("opportunity_amount.amount", "must not be negative")])
        principal = current_principal()
        now = self.clock()
        scopes = req.scopes or ConversionScopes.own(principal)
        await self._undo_attempt(req.lead_id, ("compensating",))  # a new attempt never builds on a half-undone one
        begun = await self._begin_attempt(req, principal, now)
        if isinstance(begun, ConvertResult):
            return begun
        lead, saga = begun
        if (
            saga["state"] == "running"
            and saga["attempt_resumed"]
            and not await self._resumable(req, lead, saga, scopes)
        ):
            if req.account_id:  # a request refused for its account leaves the attempt as it was
                with _calling_in(scopes.accounts):
                    await self.ports.get_account(req.account_id)
            await self._undo_attempt(req.lead_id, ("running",))
            begun = await self._begin_attempt(req, principal, now)
            if isinstance(begun, ConvertResult):
                return begun
            lead, saga = begun
        attempt_key = _attempt_key(req.lead_id, saga)
        account_id, contact_id = str(saga["account_id"]), str(saga["contact_id"])
        opportunity_id = str(saga["opportunity_id"])
        account_created, contact_created = bool(saga["account_created"]), bool(saga["contact_created"])
        try:
            if not account_id:
                with _calling_in(scopes.accounts):
                    if req.account_id:
                        await self.ports.get_account(req.account_id)
                        account_id = req.account_id
                    else:
                        name = req.account_name.strip() or lead["company"] or lead["name"]
                        account_id = await self.ports.create_account(key=f"{attempt_key}:account", lead=lead, name=name)
                        account_created = True
                await self._saga_step(req.lead_id, account_id=account_id, account_created=account_created)
            if not contact_id and not contact_created:
                # Link or create is chosen once per attempt and recorded before anything is created:
                # a retry after a create whose answer was lost resumes that create under its key,
                # never links the matched contact beside it.
                with _calling_in(scopes.contacts):
                    contact_id = await self._contact_to_reuse(lead, account_id, account_created)
                contact_created = not contact_id
                await self._saga_step(req.lead_id, contact_id=contact_id, contact_created=contact_created)
            if not contact_id:
                with _calling_in(scopes.contacts):
                    contact_id = await self.ports.create_contact(
                        key=f"{attempt_key}:contact", account_id=account_id, lead=lead
                    )
                await self._saga_step(req.lead_id, contact_id=contact_id)
            if req.create_opportunity and not opportunity_id:
                with _calling_in(scopes.opportunities):
                    opportunity_id = await self.ports.create_opportunity(
                        key=f"{attempt_key}:opportunity",
                        account_id=account_id,
                        contact_id=contact_id,
                        lead=lead,
                        request=req,
                    )
                await self._saga_step(req.lead_id, opportunity_id=opportunity_id)
        except Unavailable:
            raise  # the saga row keeps the progress; a retry resumes with the same keys
        except CrmError as error:
            created_contact_id = contact_id if contact_created else ""  # a linked contact stays
            await self._compensate(req.lead_id, account_id if account_created else "", created_contact_id, "", error)
            raise
        try:
            finished = await self._finish_conversion(req, account_id, contact_id, opportunity_id, principal, now)
            return replace(finished, account_created=account_created, contact_created=contact_created)
        except Unavailable:
            raise
        except CrmError as error:  # e.g. the lead was disqualified meanwhile: this attempt is undone
            await self._compensate(
                req.lead_id,
                account_id if account_created else "",
                contact_id if contact_created else "",
                opportunity_id,
                error,
            )
            raise

    async def _begin_attempt(
        self, req: ConvertRequest, principal: Principal, now: datetime
    ) -> ConvertResult | tuple[RowMapping, Mapping[Any, Any]]:
        """The converted lead's answer to a repeat (a ConvertResult), else the lead and the saga of
        the attempt to make: the interrupted one to resume (`attempt_resumed`), or a new one."""
        async with self.uow.begin() as tx:
            conn = tx.conn
            earlier = await recall(conn, "convert_lead", req.idempotency_key, principal)
            if earlier is not None:
                _same_record(req.idempotency_key, LEAD, earlier["lead_id"], req.lead_id)
            lead = await self._visible_lead(conn, req.lead_id, for_update=True)
            if earlier is not None or lead["status"] == "converted":
                if earlier is None:  # a replay under its key answers as the first; another request may not differ
                    domain.ensure_repeats_conversion(
                        account_id=req.account_id,
                        create_opportunity=req.create_opportunity,
                        converted_account_id=lead["converted_account_id"],
                        converted_contact_id=lead["converted_contact_id"],
                        converted_opportunity_id=lead["converted_opportunity_id"],
                    )
                return ConvertResult(
                    lead, lead["converted_account_id"], lead["converted_contact_id"], lead["converted_opportunity_id"]
                )
            domain.ensure_open(lead["status"], "convert")
            saga: Mapping[Any, Any] | None = (
                (
                    await conn.execute(
                        select(repo.conversions).where(repo.conversions.c.lead_id == req.lead_id).with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if saga is None or saga["state"] == "compensated":
                attempt = 1 if saga is None else saga["attempt"] + 1
                values = {
                    "lead_id": req.lead_id,
                    "attempt": attempt,
                    "attempt_nonce": secrets.token_hex(16),
                    "state": "running",
                    "account_id": "",
                    "account_created": False,
                    "contact_id": "",
                    "contact_created": False,
                    "opportunity_id": "",
                    "error": "",
                    "updated_at": now,
                    "owner_id": lead["owner_id"],
                }
                if saga is None:
                    await conn.execute(insert(repo.conversions).values(values))
                else:
                    await conn.execute(
                        update(repo.conversions).where(repo.conversions.c.lead_id == req.lead_id).values(values)
                    )
                return lead, {**values, "attempt_resumed": False}
        return lead, {**saga, "attempt_resumed": True}

    async def _finish_conversion(
        self,
        req: ConvertRequest,
        account_id: str,
        contact_id: str,
        opportunity_id: str,
        principal: Principal,
        now: datetime,
    ) -> ConvertResult:
        async with self.uow.begin() as tx:
            await repo.lock_account_merges(tx.conn, shared=True)
            lead = await self._visible_lead(tx.conn, req.lead_id, for_update=True)
            if lead["status"] == "converted":  # a concurrent call finished first
                return ConvertResult(lead, account_id, contact_id, opportunity_id)
            domain.ensure_open(lead["status"], "convert")
            # The account may have been merged away since the attempt chose it: the lead names the
            # survivor, as the merge re-pointed the leads converted before it.
            account_id = await repo.surviving_account(tx.conn, account_id)
            await self._close_tasks(tx.conn, req.lead_id, "done", now)
            row = await self._write(
                tx.conn,
                req.lead_id,
                {
                    "status": "converted",
                    "converted_account_id": account_id,
                    "converted_contact_id": contact_id,
                    "converted_opportunity_id": opportunity_id,
                    "in_pool": False,
                    "updated_at": now,
                },
            )
            await tx.conn.execute(
                update(repo.conversions)
                .where(repo.conversions.c.lead_id == req.lead_id)
                .values(state="completed", updated_at=now)
            )
            tx.publish(
                events_pb2.LeadConverted(
                    lead=lead_to_proto(row),
                    account_id=account_id,
                    contact_id=contact_id,
                    opportunity_id=opportunity_id,
                    actor=actor(principal),
                ),
                key=req.lead_id,
            )
            await remember(tx.conn, "convert_lead", req.idempotency_key, principal, {"lead_id": req.lead_id}, now)
            return ConvertResult(row, account_id, contact_id, opportunity_id, previous=lead)

    async def _contact_to_reuse(self, lead: Mapping[Any, Any], account_id: str, account_created: bool) -> str:
        """The contact the lead matched, to link when it is a live contact of the account the lead
        converts into (read in the caller's scope on contacts); "" to create one. An account this
        attempt created has no contact of its own yet, so it is not asked."""
        assert self.ports is not None
        matched = str(lead["matched_contact_id"] or "")
        if not matched or account_created:
            return ""
        return domain.contact_to_reuse(
            matched_contact_id=matched,
            matched_contact_account_id=await self.ports.contact_account_id(matched),
            account_id=account_id,
        )

    async def _saga_step(self, lead_id: str, **values: Any) -> None:
        async with transaction(self.engine) as conn:
            await conn.execute(
                update(repo.conversions)
                .where(repo.conversions.c.lead_id == lead_id)
                .values(**values, updated_at=self.clock())
            )

    async def _compensate(
        self,
        lead_id: str,
        created_account_id: str,
        created_contact_id: str,
        opportunity_id: str,
        cause: CrmError | None,
    ) -> bool:
        """Undoes an attempt's creations, newest first, and records each undo as it succeeds. When one
        fails the saga stays `compensating`, holding only what still exists; False then. An account or
        contact the attempt linked rather than created is no creation of it: the caller passes ""."""
        assert self.ports is not None
        left = {"opportunity_id": opportunity_id, "contact_id": created_contact_id, "account_id": created_account_id}
        try:
            # Only what the saga itself created (the ids on its row), so in every scope: records made
            # for the lead's owner may lie outside the caller's, and a delete refused as "not found"
            # would count as done and leave them behind.
            with _calling_in(ALL_RECORDS):
                if opportunity_id:
                    await self.ports.delete_opportunity(opportunity_id)
                    left["opportunity_id"] = ""
                if created_contact_id:
                    await self.ports.delete_contact(created_contact_id)
                    left["contact_id"] = ""
                if created_account_id:
                    await self.ports.delete_account(created_account_id)
                    left["account_id"] = ""
        except CrmError:
            pass
        done = not any(left.values())
        values: dict[str, Any] = {
            "state": "compensated" if done else "compensating",
            **left,
            "account_created": bool(left["account_id"]),
            "contact_created": bool(left["contact_id"]),
        }
        if cause is not None:
            values["error"] = f"{type(cause).__name__}: {cause.detail}"[:2000]
        await self._saga_step(lead_id, **values)
        return done

    async def _undo_attempt(self, lead_id: str, states: Sequence[str]) -> None:
        """Undoes the lead's last conversion attempt when its saga is in one of `states`: whatever it
        created upstream is deleted (`_compensate`), or Unavailable while that cannot be done yet."""
        async with self.engine.connect() as conn:
            saga: Mapping[Any, Any] | None = (
                (await conn.execute(select(repo.conversions).where(repo.conversions.c.lead_id == lead_id)))
                .mappings()
                .first()
            )
        if saga is None or saga["state"] not in states:
            return
        if saga["state"] == "running":
            saga = await self._with_lost_creates(lead_id, saga)
        account = str(saga["account_id"]) if saga["account_created"] else ""
        contact = str(saga["contact_id"]) if saga["contact_created"] else ""
        opportunity = str(saga["opportunity_id"])
        if account and await self._in_use(account, contact, opportunity):
            # Since the attempt stopped, someone worked on its account (a contact, a call, a deal):
            # it is a customer now, and so are the records the attempt made for it. They stay.
            log.info("lead %s: the interrupted conversion's account %s is in use: kept", lead_id, account)
            await self._saga_step(lead_id, state="compensated", error="undone: its account, in use since, was kept")
            return
        if not await self._compensate(lead_id, account, contact, opportunity, None):
            raise Unavailable(f"the last conversion attempt of lead {lead_id} is not undone yet; retry later")

    async def _with_lost_creates(self, lead_id: str, saga: Mapping[Any, Any]) -> Mapping[Any, Any]:
        """The interrupted attempt `saga` with the records of its creates whose answer was lost (a
        timeout after the upstream made one), asked of the upstream under the step's key without
        creating anything, and recorded: undone, they would be left behind otherwise."""
        assert self.ports is not None
        key = _attempt_key(lead_id, saga)
        found: dict[str, Any] = {}
        async with self.engine.connect() as conn:
            lead = await self._visible_lead(conn, lead_id)
        with _calling_in(ALL_RECORDS):  # whoever's scope they were made in, as `_compensate` deletes them
            account_id = str(saga["account_id"])
            if not account_id and (made := await self.ports.create_account(
                key=f"{key}:account", lead=lead, name=lead["company"] or lead["name"], replay_only=True
            )):  # fmt: skip
                account_id = found["account_id"] = made
                found["account_created"] = True
            contact_id = str(saga["contact_id"])
            if account_id and not contact_id and saga["contact_created"]:
                contact_id = await self.ports.create_contact(
                    key=f"{key}:contact", account_id=account_id, lead=lead, replay_only=True
                )
                found["contact_id"] = contact_id
            if contact_id and not saga["opportunity_id"]:
                found["opportunity_id"] = await self.ports.create_opportunity(
                    key=f"{key}:opportunity",
                    account_id=account_id,
                    contact_id=contact_id,
                    lead=lead,
                    request=ConvertRequest(lead_id=lead_id, create_opportunity=True),
                    replay_only=True,
                )
        if not any(found.values()):
            return saga
        await self._saga_step(lead_id, **found)
        return {**saga, **found}

    async def _in_use(self, account_id: str, contact_id: str, opportunity_id: str) -> bool:
        assert self.ports is not None
        try:
            with _calling_in(ALL_RECORDS):  # whoever's they are: the undo would delete them all
                return await self.ports.account_used_besides(
                    account_id, contact_id=contact_id, opportunity_id=opportunity_id
                )
        except NotFound:
            return False  # gone already

    async def _abandon_conversion(self, lead_id: str, expected_version: int) -> None:
        """A lead that leaves the convertible state (disqualified, deleted) first undoes a conversion
        attempt interrupted by an outage, which would otherwise keep an account and contact made
        for a conversion that will never finish, and the lead undeletable. Only by who may write
        the lead, at the version they expect. A conversion still under way (on any replica) is
        waited for, as another conversion would wait: only an attempt nobody is running is undone."""
        async with held_exclusively(self.engine, repo.conversion_lock(lead_id)):
            async with self.engine.connect() as conn:
                lead = await self._visible_lead(conn, lead_id, for_update=True)
            if expected_version and lead["version"] != expected_version:
                raise StaleVersion(LEAD, lead_id, lead["version"])
            await self._undo_attempt(lead_id, ("running", "compensating"))

    async def _resumable(
        self, req: ConvertRequest, lead: Mapping[Any, Any], saga: Mapping[Any, Any], scopes: ConversionScopes
    ) -> bool:
        """May this request resume the interrupted attempt `saga`? Not when the lead changed hands
        since the attempt began (a transfer, an assignment, a claim): its account and deal are the
        former owner's. Nor when it asks for another account than the attempt chose, nor when the
        attempt's account is outside the caller's scope: it would finish with records the caller
        asked for no part in."""
        assert self.ports is not None
        if saga["owner_id"] != lead["owner_id"]:
            return False
        account_id = str(saga["account_id"])
        if not domain.same_account_choice(
            requested_account_id=req.account_id, account_id=account_id, account_created=bool(saga["account_created"])
        ):
            return False
        if account_id:
            try:
                with _calling_in(scopes.accounts):
                    await self.ports.get_account(account_id)
            except (NotFound, ValidationFailed):
                return False
        return True


def _attempt_key(lead_id: str, saga: Mapping[Any, Any]) -> str:
    """The prefix of the idempotency keys of a conversion attempt's creates (the step follows)."""
    key = f"lead-convert:{lead_id}:{saga['attempt']}"
    if saga["attempt_nonce"]:  # attempts begun before migration 0011 resume with the keys they began with
        key += f":{saga['attempt_nonce']}"
    return key


def _calling_in(scope: RecordScope) -> AbstractContextManager[None]:
    """The conversion ports' calls within go out in `scope`, for the same caller."""
    return acting_as(current_principal(), scope, current_request_id())


def _imports_seen() -> ColumnElement[bool]:
    """The imports the caller sees: those they started, and those in the record scope of their
    owner's leads (a team manager sees their reps' imports: an import's leads are its owner's until
    assigned)."""
    t = repo.imports
    return or_(t.c.owner_id == current_principal().user_id, scope_clause(t, current_scope()))


async def _keyset_rows(
    conn: AsyncConnection,
    query: Select[Any],
    sort_column: Column[Any],
    *,
    id_column: Column[Any] | None = None,
    descending: bool = False,
    cursor: str,
    limit: int,
) -> tuple[list[RowMapping], str]:
    """A page of `query` by `sort_column` (then `id_column`, by default the sort column itself),
    ascending unless `descending`, after `cursor`; and the next page's cursor ('' on the last page)."""
    size = page_limit(limit)
    if id_column is None:
        id_column = sort_column
    page = keyset_page(
        query, sort_column=sort_column, id_column=id_column, descending=descending, cursor=cursor, limit=size
    )
    rows = list((await conn.execute(page)).mappings())
    next_page = next_cursor(
        [_Row(r) for r in rows], sort_key=sort_column.name, descending=descending, limit=size, id_key=id_column.name
    )
    return rows[:size], next_page


class _Row:
    """Attribute access over a row mapping, for `next_cursor`."""

    def __init__(self, mapping: Mapping[Any, Any]) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        return self._mapping[name]
