"""Tables of the leads service (SQLAlchemy Core) and the queries the handlers share."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from crm_platform.custom_fields_service import definitions_table
from crm_platform.db import DriverStatement, UtcDateTime, insert_ignore, insert_on_conflict, json_rows
from crm_platform.idempotency import idempotency_table
from crm_platform.outbox import add_messaging_tables, insert_outbox_json
from crm_platform.principal import RecordScope, ScopeKind
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Date,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    Text,
    any_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from leads.domain import OPEN_STATUSES, RECYCLABLE_STATUSES, TRANSFERABLE_STATUSES

metadata = MetaData()
outbox, _ = add_messaging_tables(metadata)

# The leads each timer looks at, as the predicates of their partial indexes below. The timers'
# queries repeat them as this literal SQL: PostgreSQL uses a partial index only where it can prove
# the query implies its predicate, which it cannot from a bound parameter under the generic plan of
# a prepared statement, nor from `follow_up_overdue IS false` for `NOT follow_up_overdue`.
AWAITING_FIRST_CONTACT = text("first_contacted_at IS NULL AND NOT follow_up_overdue")
RECYCLING_CANDIDATES = text(
    f"status IN ({', '.join(repr(s) for s in RECYCLABLE_STATUSES)}) AND owner_id <> '' AND assigned_at IS NOT NULL"
)
# The leads the rescoring job looks at (its index's predicate, repeated by its query as above).
OPEN_LEADS = text(f"status IN ({', '.join(repr(s) for s in OPEN_STATUSES)})")
# The leads converted into an account, which an account merge re-points (its index's predicate, as above).
CONVERTED_INTO_ACCOUNT = text("converted_account_id <> ''")

_JSON = JSON().with_variant(JSONB(), "postgresql")
_ID = String(36)
_TS = UtcDateTime()

leads = Table(
    "leads",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", String(200), nullable=False, server_default=""),
    Column("company", String(200), nullable=False, server_default=""),
    Column("title", String(200), nullable=False, server_default=""),
    Column("phone", String(64), nullable=False, server_default=""),
    Column("phone_norm", String(32)),
    Column("email", String(254), nullable=False, server_default=""),
    Column("email_norm", String(254)),
    Column("source", String(20), nullable=False),
    Column("source_detail", String(200), nullable=False, server_default=""),
    Column("campaign_id", String(36), nullable=False, server_default=""),
    Column("region", String(200), nullable=False, server_default=""),
    Column("industry", String(200), nullable=False, server_default=""),
    Column("status", String(20), nullable=False),
    Column("score", Integer, nullable=False, server_default="0"),
    Column("grade", String(1), nullable=False, server_default="D"),
    Column("owner_id", String(200), nullable=False, server_default=""),
    Column("team", String(200), nullable=False, server_default=""),
    Column("tags", _JSON, nullable=False),
    Column("custom", _JSON, nullable=False),
    Column("external_id", String(200), nullable=False, server_default=""),
    Column("matched_contact_id", String(36), nullable=False, server_default=""),
    Column("disqualified_reason", Text, nullable=False, server_default=""),
    Column("converted_account_id", String(36), nullable=False, server_default=""),
    Column("converted_contact_id", String(36), nullable=False, server_default=""),
    Column("converted_opportunity_id", String(36), nullable=False, server_default=""),
    Column("in_pool", Boolean, nullable=False, server_default=false()),
    Column("follow_up_overdue", Boolean, nullable=False, server_default=false()),
    Column("import_id", String(200), nullable=False, server_default=""),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("assigned_at", _TS),
    Column("first_contact_due_at", _TS),
    Column("first_contacted_at", _TS),
    Column("last_activity_at", _TS),
    Column("recycled_at", _TS),
    # The owner the lead was last recycled from, at `recycled_at` (it went idle, or they released
    # it): barred from claiming it back for a cool-down (migration 0020).
    Column("recycled_from_id", String(200), nullable=False, server_default=""),
    Column("claimed_at", _TS),
    Column("version", BigInteger, nullable=False, server_default="1"),
    # The scoring generation (`scoring_generation` below) whose rules and thresholds gave the lead its
    # score (migration 0019): the rescoring job walks the open leads scored under an older one.
    Column("scoring_generation", BigInteger, nullable=False, server_default="0"),
    # Keyset pages order by id (time-ordered), so every filter index ends with it.
    Index("ix_leads_status_id", "status", "id"),
    Index("ix_leads_status_source_id", "status", "source", "id"),  # the list's most used filter pair
    Index("ix_leads_source_id", "source", "id"),
    Index("ix_leads_source_detail_id", "source_detail", "id"),
    Index("ix_leads_owner_status", "owner_id", "status", "id"),
    Index("ix_leads_team_id", "team", "id"),
    Index("ix_leads_region_id", "region", "id"),
    Index("ix_leads_industry_id", "industry", "id"),
    Index("ix_leads_grade_id", "grade", "id"),
    Index("ix_leads_campaign_id", "campaign_id", "id"),
    Index("ix_leads_created_at_id", "created_at", "id"),
    Index("ix_leads_import_id", "import_id"),
    Index("ix_leads_email_norm", "email_norm"),
    Index("ix_leads_phone_norm", "phone_norm"),
    Index("ix_leads_external_id", "external_id"),
    Index("ix_leads_pool", "in_pool", "id"),
    # The timers walk these by due time and stop at their batch, instead of reading the table (the
    # SLA timer) or every open lead (recycling: 324,000 of 1,000,000 in the bench) each run of each
    # replica. Not on last_activity_at: an activity would then never be a HOT update.
    Index("ix_leads_sla_due", "first_contact_due_at", postgresql_where=AWAITING_FIRST_CONTACT),
    Index("ix_leads_recycle_due", "assigned_at", postgresql_where=RECYCLING_CANDIDATES),
    # The rescoring job's: open leads by the generation they were scored under. A pass reads from
    # the oldest and stops at the first lead scored under the current rules, so a pass with nothing
    # to do is one index probe, however many leads there are. A write that keeps a lead's generation
    # (nearly every write) keeps its update HOT.
    Index("ix_leads_scoring_due", "scoring_generation", postgresql_where=OPEN_LEADS),
    # An account merge's: the leads converted into the duplicate (migration 0028).
    Index("ix_leads_converted_account", "converted_account_id", postgresql_where=CONVERTED_INTO_ACCOUNT),
)

activities = Table(
    "lead_activities",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("lead_id", _ID, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("outcome", String(200), nullable=False, server_default=""),
    Column("notes", Text, nullable=False, server_default=""),
    Column("actor_id", String(200), nullable=False, server_default=""),
    Column("occurred_at", _TS, nullable=False),
    Column("next_follow_up_at", _TS),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index("ix_lead_activities_lead", "lead_id", "id"),
)

# Web behaviour a marketing system reports (page views, e-mail opens and clicks, downloads, webinars;
# migration 0030): counted by scoring rules, never a contact. Unique per lead by the sender's event id,
# so a resent batch counts nothing twice.
engagements = Table(
    "lead_engagements",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("lead_id", _ID, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("url", String(2000), nullable=False, server_default=""),
    Column("occurred_at", _TS, nullable=False),
    Column("external_id", String(200), nullable=False),
    Column("actor_id", String(200), nullable=False, server_default=""),
    Column("recorded_at", _TS, nullable=False),
    # Also what scoring counts by: a lead's engagements of a kind.
    Index("ux_lead_engagements_external", "lead_id", "external_id", unique=True),
    Index("ix_lead_engagements_lead_kind", "lead_id", "kind"),
    # A lead's engagements newest first, keyset paged (ListLeadEngagements, migration 0031).
    Index("ix_lead_engagements_lead_time", "lead_id", "occurred_at", "id"),
)

tasks = Table(
    "lead_tasks",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("lead_id", _ID, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("owner_id", String(200), nullable=False, server_default=""),
    Column("due_at", _TS, nullable=False),
    Column("status", String(20), nullable=False),
    Column("created_at", _TS, nullable=False),
    Column("completed_at", _TS),
    # The activity whose next_follow_up_at planned a follow-up task ("" for a first-contact task).
    Column("activity_id", _ID, nullable=False, server_default=""),
    Index("ix_lead_tasks_lead", "lead_id", "status"),
    Index("ix_lead_tasks_owner", "owner_id", "status", "due_at"),
)

score_history = Table(
    "lead_score_history",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("lead_id", _ID, nullable=False),
    Column("previous_score", Integer, nullable=False),
    Column("score", Integer, nullable=False),
    Column("previous_grade", String(1), nullable=False),
    Column("grade", String(1), nullable=False),
    Column("matched_rule_ids", _JSON, nullable=False),
    Column("changed_at", _TS, nullable=False),
    Index("ix_lead_score_history_lead", "lead_id", "id"),
)

# Open leads per owner (status in OPEN_STATUSES), kept by triggers on `leads` (migration 0006): what
# assignment caps and least-loaded picks read, in one index probe per rep however many leads they hold.
owner_loads = Table(
    "lead_owner_loads",
    metadata,
    Column("owner_id", String(200), primary_key=True),
    Column("open_leads", Integer, nullable=False),
)

scoring_rules = Table(
    "scoring_rules",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("field", String(200), nullable=False, server_default=""),
    Column("operator", String(20), nullable=False, server_default=""),
    Column("value", String(500), nullable=False, server_default=""),
    Column("activity_kind", String(20), nullable=False, server_default=""),
    Column("min_count", Integer, nullable=False, server_default="0"),
    Column("points", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("version", BigInteger, nullable=False, server_default="1"),
    # An engagement count (migration 0030): engagements of this kind whose URL contains `url_contains`.
    Column("engagement_kind", String(20), nullable=False, server_default=""),
    Column("url_contains", String(2000), nullable=False, server_default=""),
)

# The scoring model's generation (migration 0019), one row: every write of a scoring rule or of the
# grade thresholds moves it on in its own transaction. Leads record the generation they were scored
# under (`leads.scoring_generation`), so the leads a change left stale are found through an index
# without the write touching them: it commits at once, and the rescoring job catches up.
scoring_generation = Table(
    "scoring_generation",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),
)

# The grade thresholds, one row (id 1) once they are set; before that the defaults hold.
settings_table = Table(
    "lead_settings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("grade_a", Integer, nullable=False),
    Column("grade_b", Integer, nullable=False),
    Column("grade_c", Integer, nullable=False),
    # The thresholds' version for If-Match (migration 0021): the defaults are version 1, and every
    # setting adds 1.
    Column("version", BigInteger, nullable=False, server_default="1"),
)

assignment_rules = Table(
    "assignment_rules",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("position", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("regions", _JSON, nullable=False),
    Column("industries", _JSON, nullable=False),
    Column("sources", _JSON, nullable=False),
    Column("min_score", Integer, nullable=False, server_default="0"),
    Column("max_score", Integer, nullable=False, server_default="0"),
    Column("team", String(200), nullable=False, server_default=""),
    Column("user_ids", _JSON, nullable=False),
    Column("strategy", String(20), nullable=False),
    Column("capacity", Integer, nullable=False, server_default="0"),
    # The team whose leads the rule matches, "" for any (migration 0023).
    Column("lead_team", String(200), nullable=False, server_default=""),
    # The rule's next round-robin turn (domain.pick_assignee). On SQLite turns are taken from this
    # column; on PostgreSQL from the rule's sequence (`take_turns`), which starts from it.
    Column("turns", BigInteger, nullable=False, server_default="0"),
    # The round-robin pointer of releases before migration 0008, which still write it during a
    # rollout; unused here, dropped by a later release (expand, then contract).
    Column("last_user_id", String(200), nullable=False, server_default=""),
    Column("version", BigInteger, nullable=False, server_default="1"),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("channel", String(100), nullable=False, server_default=""),
    Column("cost_amount", Numeric(18, 3)),
    Column("cost_currency", String(3), nullable=False, server_default=""),
    Column("starts_on", Date),
    Column("ends_on", Date),
    Column("owner_id", String(200), nullable=False, server_default=""),
    Column("team", String(200), nullable=False, server_default=""),
    Column("region", String(200), nullable=False, server_default=""),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index("ix_campaigns_channel", "channel", "id"),
)

webforms = Table(
    "webforms",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("form_key", String(64), nullable=False, unique=True),
    Column("campaign_id", String(36), nullable=False, server_default=""),
    Column("team", String(200), nullable=False, server_default=""),
    Column("region", String(200), nullable=False, server_default=""),
    Column("rate_limit_per_minute", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", _TS, nullable=False),
    Column("honeypot_field", String(64), nullable=False, server_default=""),
    Column("version", BigInteger, nullable=False, server_default="1"),
)

# Fixed one-minute windows per form; one UPSERT per submission counts across replicas.
webform_rate = Table(
    "webform_rate",
    metadata,
    Column("form_key", String(64), nullable=False),
    Column("window_start", _TS, nullable=False),
    Column("count", Integer, nullable=False),
    PrimaryKeyConstraint("form_key", "window_start"),
)

idempotency = idempotency_table(metadata)

imports = Table(
    "lead_imports",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("status", String(20), nullable=False),
    Column("format", String(10), nullable=False),
    Column("owner_id", String(200), nullable=False, server_default=""),
    # Of who started it: the import is seen in the record scope its owner's leads are.
    Column("team", String(200), nullable=False, server_default=""),
    Column("region", String(200), nullable=False, server_default=""),
    Column("rows_seen", BigInteger, nullable=False, server_default="0"),
    Column("accepted", BigInteger, nullable=False, server_default="0"),
    Column("merged", BigInteger, nullable=False, server_default="0"),
    Column("rejected", BigInteger, nullable=False, server_default="0"),
    Column("skipped", BigInteger, nullable=False, server_default="0"),
    # Every data row up to this one is committed: a re-run skips them.
    Column("committed_rows", BigInteger, nullable=False, server_default="0"),
    # SHA-256 of the rows of the unfinished part up to committed_rows (`importing.RowsDigest`): a
    # re-run resumes only the same rows. Empty when no row of the part is committed.
    Column("committed_digest", String(64), nullable=False, server_default=""),
    # Parser state between the parts of a multi-part import.
    Column("parts_received", Integer, nullable=False, server_default="0"),
    Column("parsed_rows", BigInteger, nullable=False, server_default="0"),
    Column("bytes_seen", BigInteger, nullable=False, server_default="0"),
    Column("csv_header", _JSON),
    Column("pending", LargeBinary, nullable=False, server_default=""),
    Column("started_at", _TS, nullable=False),
    Column("finished_at", _TS),
    # When the import last made progress (a batch committed, a part ended or failed).
    Column("updated_at", _TS),
    Column("error", Text, nullable=False, server_default=""),
    # SHA-256 of each part's bytes, in order: a part sent again must be the same part.
    Column("part_digests", _JSON),
    Index("ix_lead_imports_started_at_id", "started_at", "id"),  # the list, newest first
)

import_rejections = Table(
    "lead_import_rejections",
    metadata,
    Column("import_id", String(200), nullable=False),
    Column("row", BigInteger, nullable=False),
    Column("field", String(100), nullable=False, server_default=""),
    Column("reason", Text, nullable=False),
    Column("lead_id", String(200), nullable=False, server_default=""),  # of the open lead it duplicates
    PrimaryKeyConstraint("import_id", "row"),
)

# Definitions of the custom fields of leads (served by crm_platform's CustomFieldServicer).
custom_fields = definitions_table(metadata, "lead_custom_fields")

# A projection of accounts' contacts (from crm.accounts.v1 events) for linking leads to contacts.
contact_keys = Table(
    "contact_keys",
    metadata,
    Column("contact_id", _ID, primary_key=True),
    Column("email_norm", String(254)),
    Column("phone_norm", String(32)),
    Column("updated_at", _TS, nullable=False),
    # The contact's version in the event applied (migration 0017): an older snapshot is not applied.
    Column("version", BigInteger, nullable=False, server_default="0"),
    # A tombstone: set by contact.deleted, with both keys cleared; no event of the contact applies after.
    Column("deleted_at", _TS),
    Index("ix_contact_keys_email", "email_norm"),
    Index("ix_contact_keys_phone", "phone_norm"),
)

# Accounts merged away (from crm.accounts.v1 account.merged): each duplicate names the account its
# merges end at (migration 0028), so a merge of a survivor arriving first, or a conversion finishing
# into a duplicate, still ends at the last survivor. Kept flat: no survivor here is a duplicate.
account_merges = Table(
    "account_merges",
    metadata,
    Column("duplicate_id", String(36), primary_key=True),
    Column("survivor_id", String(36), nullable=False),
    Column("merged_at", _TS, nullable=False),
    Index("ix_account_merges_survivor", "survivor_id"),
)

# The conversion saga's log: one row per lead, so a retried conversion resumes where it stopped.
conversions = Table(
    "lead_conversions",
    metadata,
    Column("lead_id", _ID, primary_key=True),
    # Upstream idempotency keys include the attempt, and a nonce nobody can predict (a caller could
    # otherwise create a record under the key first); a compensated attempt is never reused.
    Column("attempt", Integer, nullable=False),
    Column("attempt_nonce", String(32), nullable=False, server_default=""),
    Column("state", String(20), nullable=False),
    Column("account_id", String(36), nullable=False, server_default=""),
    Column("account_created", Boolean, nullable=False, server_default=false()),
    Column("contact_id", String(36), nullable=False, server_default=""),
    # True once the attempt chose to create its contact (before the create); False while it has not
    # chosen or when it links the lead's matched contact. Compensation deletes only a created one.
    # Attempts begun before migration 0018 all created theirs.
    Column("contact_created", Boolean, nullable=False, server_default=true()),
    Column("opportunity_id", String(36), nullable=False, server_default=""),
    Column("error", Text, nullable=False, server_default=""),
    Column("updated_at", _TS, nullable=False),
    # The lead's owner when the attempt began, whom its account and deal are made for (migration
    # 0033): an attempt is resumed only while the lead still has that owner.
    Column("owner_id", String(200), nullable=False, server_default=""),
)

# Bulk transfers of a rep's leads to another (`LeadsService.transfer_leads`, migration 0029): what
# each moved, as its answer says it, also to a repeat of its idempotency key.
bulk_transfers = Table(
    "lead_bulk_transfers",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("from_owner_id", String(200), nullable=False),
    Column("to_owner_id", String(200), nullable=False),
    Column("to_team", String(200), nullable=False, server_default=""),
    Column("reason", Text, nullable=False, server_default=""),
    Column("leads", Integer, nullable=False),
    Column("tasks", Integer, nullable=False),
    Column("actor_id", String(200), nullable=False),
    Column("created_at", _TS, nullable=False),
)


def lead_scope_clause(scope: RecordScope) -> ColumnElement[bool]:
    """The leads the caller reads and acts on (`lead_in_scope` for one already loaded): the records
    of their scope, and the pool as they see it. The one rule for the list, the pool, a lead's read
    and every action on it, so a lead the pool lists is never a 404 elsewhere (only a rep's writes
    to it wait for their claim: `claim_first`)."""
    match scope.kind:
        case ScopeKind.ALL:
            return true()
        case ScopeKind.OWN:
            return or_(leads.c.owner_id == scope.owner_id if scope.owner_id else false(), _shared_pool(scope))
        case ScopeKind.TEAM:
            return or_(leads.c.team == scope.team if scope.team else false(), _shared_pool(scope))
        case ScopeKind.REGION:
            # A region's pool is its region's leads: in scope already.
            return leads.c.region == scope.region if scope.region else false()


def _shared_pool(scope: RecordScope) -> ColumnElement[bool]:
    """The pool is shared: an own- or team-scoped caller sees its open leads of their team and the
    team-less ones (a web form or an import without a team), which nobody's team scope holds.
    Never more: a closed lead left in the pool is not listed by the pool, so not here either."""
    # The statuses as literals, as the timers' predicates above: the planner sees them in the
    # generic plan of a prepared statement too.
    is_open = leads.c.status.in_([literal_column(repr(status)) for status in OPEN_STATUSES])
    return leads.c.in_pool & is_open & or_(leads.c.team == "", leads.c.team == scope.team)


def worklist_scope_clause(leads_scope: RecordScope, tasks_scope: RecordScope) -> ColumnElement[bool]:
    """The tasks a caller's worklist across leads lists (`SearchLeadTasks`, the tasks joined with
    their leads): those of the leads in their scope on leads, and only their own tasks when their
    scope on tasks is `own`. A rep's lead scope takes in the shared pool, whose leads carry other
    people's tasks (a manager's follow-up, the first contact of the rep a lead was recycled from); a
    team, region or all scope on tasks covers every task of the leads in it."""
    of_leads = lead_scope_clause(leads_scope)
    if tasks_scope.kind is not ScopeKind.OWN:
        return of_leads
    owned = tasks.c.owner_id == tasks_scope.owner_id if tasks_scope.owner_id else false()
    return of_leads & owned


def lead_in_scope(scope: RecordScope, lead: Mapping[Any, Any]) -> bool:
    """`lead_scope_clause` for a lead loaded without it."""
    if scope.allows(owner_id=lead["owner_id"], team=lead["team"], region=lead["region"]):
        return True
    shared = lead["in_pool"] and lead["status"] in OPEN_STATUSES and lead["team"] in ("", scope.team)
    return scope.kind in (ScopeKind.OWN, ScopeKind.TEAM) and bool(shared)


def claim_first(scope: RecordScope, lead: Mapping[Any, Any]) -> bool:
    """A lead of the caller's scope (`lead_scope_clause`) that they may read and claim but not
    write to yet: a rep (own scope) sees their pool to choose what to claim, yet works only the
    leads they own, so that the claim limit holds (a pool lead updated, contacted, disqualified or
    converted by whoever sees it would be worked without being anyone's). Managers act on their pool."""
    return scope.kind == ScopeKind.OWN and lead["owner_id"] != scope.owner_id


def transferable_from(owner_id: str) -> ColumnElement[bool]:
    """The leads a bulk transfer of `owner_id`'s leads moves (`domain.transferable`), found by
    `ix_leads_owner_status`."""
    c = leads.c
    return (c.owner_id == owner_id) & ~c.in_pool & c.status.in_(TRANSFERABLE_STATUSES)


def conversion_unfinished(lead_id: ColumnElement[str]) -> ColumnElement[bool]:
    """SQL: the lead's last conversion attempt is unfinished (running, or being undone): under way
    now, or interrupted by an outage (`conversion_lock` tells which)."""
    return exists().where(conversions.c.lead_id == lead_id, conversions.c.state.in_(("running", "compensating")))


def conversion_lock(lead_id: str) -> str:
    """The name a conversion of the lead, or an undo of one, holds while it runs
    (`crm_platform.db.held_exclusively`): one at a time per lead, on any replica."""
    return f"lead-convert:{lead_id}"


def one_of_ids(conn: AsyncConnection, column: ColumnElement[str]) -> ColumnElement[bool]:
    """SQL: `column` is one of the ids a statement is executed with as `ids`, however many there are
    (on PostgreSQL one array parameter)."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam("ids", type_=ARRAY(column.type)))
    return column.in_(bindparam("ids", expanding=True))


async def move_open_tasks(
    conn: AsyncConnection, lead_ids: Sequence[str], owner_id: str, *, first_contact_due: datetime
) -> int:
    """Gives the open tasks of the leads to `owner_id`, in one statement however many there are; a
    first-contact task becomes due when the lead's new first-contact SLA ends (`first_contact_due`).
    How many tasks moved."""
    if not lead_ids:
        return 0
    t = tasks.c
    due = case((t.kind == "first_contact", literal(first_contact_due, t.due_at.type)), else_=t.due_at)
    of_leads = one_of_ids(conn, t.lead_id)
    statement = update(tasks).where(of_leads, t.status == "open").values(owner_id=owner_id, due_at=due)
    moved = await conn.execute(statement, {"ids": list(lead_ids)})
    return int(moved.rowcount)


def tag_clause(conn: AsyncConnection, tag: str) -> ColumnElement[bool]:
    if conn.dialect.name == "postgresql":
        # JSONB containment (`tags @> '["vip"]'`); the column's generic JSON type would compile
        # `contains` to a LIKE that PostgreSQL cannot apply to jsonb.
        return type_coerce(leads.c.tags, JSONB()).contains([tag])
    return cast(leads.c.tags, String).contains(f'"{tag}"', autoescape=True)


async def find_open_duplicate(
    conn: AsyncConnection, *, email_norm: str | None, phone_norm: str | None, excluding: str = ""
) -> RowMapping | None:
    """An open lead other than `excluding` with the email or the phone, locked."""
    conditions = []
    if email_norm:
        conditions.append(leads.c.email_norm == email_norm)
    if phone_norm:
        conditions.append(leads.c.phone_norm == phone_norm)
    if not conditions:
        return None
    others = leads.c.id != excluding if excluding else true()
    row = (
        (
            await conn.execute(
                select(leads)
                .where(or_(*conditions), leads.c.status.in_(OPEN_STATUSES), others)
                .order_by(leads.c.id)
                .limit(1)
                .with_for_update()
            )
        )
        .mappings()
        .first()
    )
    return row


async def lock_dedupe_keys(conn: AsyncConnection, keys: Iterable[str]) -> None:
    """Serialises concurrent writes of the same email/phone (PostgreSQL advisory locks): a create,
    an update or a delete holds its keys' locks, and shares the import batches' lock
    (`lock_out_dedupe_writers`) before them, so a batch never checks its rows between another
    write's check and its commit."""
    keys = sorted(set(keys))
    if not keys or conn.dialect.name != "postgresql":
        return
    await _LOCK_DEDUPE_KEYS.execute(conn, {"keys": keys, "batches": _IMPORT_BATCHES_LOCK})


async def lock_keys(conn: AsyncConnection, keys: Iterable[str]) -> None:
    """Serialises the transactions that name the same key (PostgreSQL advisory locks)."""
    keys = sorted(set(keys))
    if keys and conn.dialect.name == "postgresql":
        await _LOCK_KEYS.execute(conn, {"keys": keys})


async def lock_out_dedupe_writers(conn: AsyncConnection) -> None:
    """An import batch checks thousands of rows' keys at once: rather than a lock per key (more than
    the server's lock table holds), it takes the lock every dedupe write shares, so it waits for
    those under way and holds new ones off until it commits."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:batches AS bigint))"), {"batches": _IMPORT_BATCHES_LOCK}
        )


# Outside the int4 range of hashtext(), so no key's lock is ever this one.
_IMPORT_BATCHES_LOCK = 2**32 + 1
# As that one: the lock of applying account merges against conversions finishing.
_ACCOUNT_MERGES_LOCK = 2**32 + 2
# One statement text for any number of keys. unnest yields the (sorted) keys in order, so
# concurrent transactions take their locks in the same order and cannot deadlock; a dedupe write
# shares the batches' lock before its keys' (the array's leading NULL), as a batch takes it first.
_LOCK_KEYS = DriverStatement(text("SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest(CAST(:keys AS text[])) AS k"))
_LOCK_DEDUPE_KEYS = DriverStatement(
    text(
        "SELECT CASE WHEN k IS NULL THEN pg_advisory_xact_lock_shared(CAST(:batches AS bigint))"
        " ELSE pg_advisory_xact_lock(hashtext(k)) END"
        " FROM unnest(array_prepend(NULL::text, CAST(:keys AS text[]))) AS k"
    )
)


async def lock_account_merges(conn: AsyncConnection, *, shared: bool) -> None:
    """Applying a merge (exclusive) waits for the conversions finishing (shared) and holds new ones
    off, so a lead never converts into an account whose merge was applied meanwhile; merges apply
    one at a time, each seeing the chain the ones before it left."""
    if conn.dialect.name == "postgresql":
        lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        await conn.execute(text(f"SELECT {lock}(CAST(:key AS bigint))"), {"key": _ACCOUNT_MERGES_LOCK})


async def surviving_account(conn: AsyncConnection, account_id: str) -> str:
    """The account `account_id` was last merged into, or itself (one step: `account_merges` is flat)."""
    survivor = await conn.scalar(
        select(account_merges.c.survivor_id).where(account_merges.c.duplicate_id == account_id)
    )
    return str(survivor or account_id)


async def record_account_merge(conn: AsyncConnection, duplicate_id: str, survivor_id: str, *, now: datetime) -> None:
    """The duplicate, and the accounts merged into it before, now end at `survivor_id` (the end of
    its chain); a merge recorded already stays as it was (a redelivery)."""
    values = {"duplicate_id": duplicate_id, "survivor_id": survivor_id, "merged_at": now}
    await insert_ignore(conn, account_merges, values, keys=["duplicate_id"])
    await conn.execute(
        update(account_merges).where(account_merges.c.survivor_id == duplicate_id).values(survivor_id=survivor_id)
    )


async def find_contact(conn: AsyncConnection, *, email_norm: str | None, phone_norm: str | None) -> str:
    conditions = []
    if email_norm:
        conditions.append(contact_keys.c.email_norm == email_norm)
    if phone_norm:
        conditions.append(contact_keys.c.phone_norm == phone_norm)
    if not conditions:
        return ""
    found = await conn.scalar(select(contact_keys.c.contact_id).where(or_(*conditions)).limit(1))
    return str(found or "")


async def put_contact_keys(
    conn: AsyncConnection,
    contact_id: str,
    *,
    email_norm: str | None,
    phone_norm: str | None,
    version: int,
    now: datetime,
) -> bool:
    """The contact's keys as of its `version` (contact.created/updated), unless a newer version or
    its deletion came first (events delivered again or out of order): whether they were applied.
    The same version again applies (a redelivery changes nothing)."""
    c = contact_keys.c
    values = {
        "contact_id": contact_id, "email_norm": email_norm, "phone_norm": phone_norm, "version": version,
        "updated_at": now,
    }  # fmt: skip
    applied = await insert_on_conflict(
        conn,
        contact_keys,
        values,
        lambda insert: insert.on_conflict_do_update(
            index_elements=["contact_id"],
            set_={name: insert.excluded[name] for name in ("email_norm", "phone_norm", "version", "updated_at")},
            where=c.deleted_at.is_(None) & (c.version <= insert.excluded.version),
        ).returning(c.contact_id),
        shape="keys of a version",
    )
    return applied is not None


async def tombstone_contact_keys(conn: AsyncConnection, contact_id: str, *, now: datetime) -> None:
    """contact.deleted: the contact's keys no longer link leads, and the row stays as a tombstone so
    that a created or updated of the contact applied after it does not bring them back."""
    cleared = {"email_norm": None, "phone_norm": None, "deleted_at": now, "updated_at": now}
    await insert_on_conflict(
        conn,
        contact_keys,
        {"contact_id": contact_id, **cleared},
        lambda insert: insert.on_conflict_do_update(
            index_elements=["contact_id"],
            set_={name: insert.excluded[name] for name in cleared},
            where=contact_keys.c.deleted_at.is_(None),  # deleted again (a redelivery): the first time stays
        ),
        shape="tombstone",
    )


async def known_contacts(conn: AsyncConnection, *, emails: set[str], phones: set[str]) -> dict[str, str]:
    """Contacts holding any of these keys, as {"email:<norm>" | "phone:<norm>": contact id}: one
    query for an import batch instead of one per row."""
    c = contact_keys.c
    conditions = []
    if emails:
        conditions.append(c.email_norm.in_(sorted(emails)))
    if phones:
        conditions.append(c.phone_norm.in_(sorted(phones)))
    if not conditions:
        return {}
    found: dict[str, str] = {}
    for contact_id, email, phone in await conn.execute(
        select(c.contact_id, c.email_norm, c.phone_norm).where(or_(*conditions)).order_by(c.contact_id)
    ):
        if email in emails:
            found.setdefault(f"email:{email}", contact_id)
        if phone in phones:
            found.setdefault(f"phone:{phone}", contact_id)
    return found


async def open_loads(conn: AsyncConnection, user_ids: Sequence[str], *, locked: bool = False) -> dict[str, int]:
    """The reps' open leads; `locked`: their rows locked for the transaction, in order (two writers
    lock in the same order), so a cap holds against concurrent assignments to them."""
    query = select(owner_loads.c.owner_id, owner_loads.c.open_leads).where(
        owner_loads.c.owner_id.in_(sorted(set(user_ids)))
    )
    if locked:
        query = query.order_by(owner_loads.c.owner_id).with_for_update()
    return {owner: int(count) for owner, count in await conn.execute(query)}


async def activity_counts_of(conn: AsyncConnection, lead_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each lead's activities counted by kind: one query for a lead, a batch of the rescoring job or
    the leads a batch of engagements was recorded on."""
    counts: dict[str, dict[str, int]] = {lead_id: {} for lead_id in lead_ids}
    if not counts:
        return counts
    a = activities.c
    rows = await conn.execute(
        select(a.lead_id, a.kind, func.count()).where(a.lead_id.in_(sorted(counts))).group_by(a.lead_id, a.kind)
    )
    for lead_id, kind, count in rows:
        counts[lead_id][kind] = int(count)
    return counts


async def engagement_counts_of(
    conn: AsyncConnection, lead_ids: Sequence[str], kinds: Iterable[str]
) -> dict[str, dict[tuple[str, str], int]]:
    """Each lead's engagements of `kinds` counted by kind and URL (`domain.EngagementCounts`): one
    query for a lead, a batch of the rescoring job or the leads a batch of engagements was recorded
    on; none when no rule counts engagements."""
    counts: dict[str, dict[tuple[str, str], int]] = {lead_id: {} for lead_id in lead_ids}
    wanted = sorted(set(kinds))
    if not counts or not wanted:
        return counts
    e = engagements.c
    rows = await conn.execute(
        select(e.lead_id, e.kind, e.url, func.count())
        .where(e.lead_id.in_(sorted(counts)), e.kind.in_(wanted))
        .group_by(e.lead_id, e.kind, e.url)
    )
    for lead_id, kind, url, count in rows:
        counts[lead_id][(kind, url)] = int(count)
    return counts


async def insert_new_engagements(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """Inserts the engagements but those recorded before (the same lead and `external_id`), in one
    multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING however many there are (SQLAlchemy's
    "insertmanyvalues", on PostgreSQL and SQLite alike): the (lead_id, external_id) of those it
    inserted. No two rows may name the same lead and `external_id`."""
    if not rows:
        return set()
    e = engagements.c
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(engagements)
        .on_conflict_do_nothing(index_elements=["lead_id", "external_id"])
        .returning(e.lead_id, e.external_id)
    )
    inserted = await conn.execute(statement, list(rows))
    return {(lead_id, external_id) for lead_id, external_id in inserted}


async def current_scoring_generation(conn: AsyncConnection) -> int:
    generation = await conn.scalar(select(scoring_generation.c.generation).where(scoring_generation.c.id == 1))
    return int(generation or 0)


async def next_scoring_generation(conn: AsyncConnection) -> int:
    """Moves the scoring generation on in the caller's transaction, which writes a scoring rule or
    the thresholds: rules read after it commits are read with its generation or a later one. The
    row stays locked to the commit, so concurrent rule writes take one generation each."""
    moved = await insert_on_conflict(
        conn,
        scoring_generation,
        {"id": 1, "generation": 1},
        lambda insert: insert.on_conflict_do_update(
            index_elements=["id"], set_={"generation": scoring_generation.c.generation + 1}
        ).returning(scoring_generation.c.generation),
        shape="next generation",
    )
    return int(moved[0])


def leads_scored_before(generation: int, limit: int) -> Select[Any]:
    """Open leads scored under an older generation than `generation`, oldest first, locked
    (skipping those another replica's job holds, and those a write holds: that write records the
    generation it scores under itself): a batch of the rescoring job."""
    c = leads.c
    return (
        select(leads)
        .where(OPEN_LEADS, c.scoring_generation < generation)
        .order_by(c.scoring_generation)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


async def record_scoring_generation(conn: AsyncConnection, lead_ids: Sequence[str], generation: int) -> None:
    """The leads, rescored without their score or grade moving, were scored under `generation`: no
    new version, since nothing a reader sees changed (an open edit form stays current)."""
    if lead_ids:
        await conn.execute(update(leads).where(leads.c.id.in_(lead_ids)).values(scoring_generation=generation))


def overdue_first_contacts(now: datetime, limit: int) -> Select[Any]:
    """New leads whose owner has not contacted them by the due time, not yet flagged, earliest due
    first, locked (skipping those another replica's timer holds): a batch of the SLA timer."""
    c = leads.c
    return (
        select(leads)
        .where(AWAITING_FIRST_CONTACT, c.first_contact_due_at <= now, c.owner_id != "", c.status == "new")
        .order_by(c.first_contact_due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def idle_held_leads(cutoff: datetime, limit: int) -> Select[Any]:
    """Held leads nobody has worked since `cutoff`, oldest assignment first, locked (skipping those
    another replica's timer holds): a batch of the recycling timer."""
    c = leads.c
    return (
        select(leads)
        .where(
            RECYCLING_CANDIDATES,
            c.assigned_at <= cutoff,
            or_(c.last_activity_at.is_(None), c.last_activity_at <= cutoff),
        )
        .order_by(c.assigned_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


async def load_lead(conn: AsyncConnection, lead_id: str, *, for_update: bool = False) -> RowMapping | None:
    query = select(leads).where(leads.c.id == lead_id)
    if for_update:
        query = query.with_for_update()
    return (await conn.execute(query)).mappings().first()


async def count_submission(conn: AsyncConnection, form_key: str, window: datetime) -> int:
    """Counts one submission in the form's current minute and returns the count (one UPSERT)."""
    counted = await insert_on_conflict(
        conn,
        webform_rate,
        {"form_key": form_key, "window_start": window, "count": 1},
        lambda insert: insert.on_conflict_do_update(
            index_elements=["form_key", "window_start"], set_={"count": webform_rate.c["count"] + 1}
        ).returning(webform_rate.c["count"]),
        shape="count a submission",
    )
    return int(counted[0])


# --- the create path on PostgreSQL: fewer round trips ----------------------------------------------

_OPEN_SQL = ", ".join(f"'{status}'" for status in OPEN_STATUSES)

# A rule's turns come from a sequence of its own on PostgreSQL (made and dropped with the rule by
# migration 0008's triggers): taking a turn locks nothing, so concurrent creates under one rule
# do not queue on it from their pick to their commit. A turn taken by a transaction that then
# fails is not given back; the rotation just moves on.
_TURNS_SEQUENCE = "to_regclass(quote_ident('assignment_turns_' || {rule_id}))"

# The rule's reps' open leads: `locked`, every row locked in order. Assignments that share a rep
# queue on its row and take rows in one order, so they cannot deadlock. The locks wait for their
# holders and then read what those committed (a plain read in this statement would see the loads
# as of before the wait: READ COMMITTED takes a statement's snapshot when it begins).
_LOADS_SQL = """
    COALESCE((SELECT json_object_agg(o.owner_id, o.open_leads) FROM (
         SELECT owner_id, open_leads FROM lead_owner_loads
          WHERE owner_id = ANY(CAST(:users AS text[])) ORDER BY owner_id {lock}) AS o), '{{}}')
"""

# A create's reads after its dedupe keys are locked: its duplicate, its contact, whether its matched
# rule still exists, a turn of that rule when the create assigns by it (not when it merges into a
# duplicate), and the rule's reps' loads. The probe runs after the key locks, in a statement of its
# own: a probe in the locking statement could miss the lead the previous key holder committed while
# this one waited.
_PROBE_SQL = f"""
    SELECT d.duplicate_id,
           (SELECT contact_id FROM contact_keys
             WHERE email_norm = CAST(:email AS text) OR phone_norm = CAST(:phone AS text) LIMIT 1) AS contact_id,
           r.id IS NOT NULL AS rule_found,
           CASE WHEN r.id IS NOT NULL AND CAST(:take_turn AS boolean)
                     AND (d.duplicate_id IS NULL OR NOT CAST(:check_duplicates AS boolean))
                THEN nextval({_TURNS_SEQUENCE.format(rule_id="r.id")}) END AS turn,
           CASE WHEN r.id IS NOT NULL THEN {_LOADS_SQL} END AS loads
      FROM (SELECT (SELECT id FROM leads
                     WHERE (email_norm = CAST(:email AS text) OR phone_norm = CAST(:phone AS text))
                       AND status IN ({_OPEN_SQL})
                     ORDER BY id LIMIT 1) AS duplicate_id) AS d
      LEFT JOIN assignment_rules AS r ON r.id = CAST(:rule_id AS text)
"""
_PROBE_FOR_CREATE = {
    locked: DriverStatement(text(_PROBE_SQL.format(lock="FOR UPDATE" if locked else ""))) for locked in (False, True)
}


@dataclass(frozen=True, slots=True)
class CreateProbe:
    """What a create needs to know before it inserts, read under its locks."""

    duplicate_id: str | None  # an open lead with the same email or phone
    contact_id: str  # a known contact with it
    rule_found: bool  # the matched rule still exists
    turn: int | None  # the turn taken of the rule's rotation, if the create assigns by it
    loads: dict[str, int]  # the rule's reps' open leads, when its strategy or cap needs them


async def probe_for_create(
    conn: AsyncConnection,
    *,
    email_norm: str | None,
    phone_norm: str | None,
    check_duplicates: bool,
    rule_id: str,
    user_ids: Sequence[str],
    loads: bool,
    take_turn: bool,
    lock_loads: bool,
) -> CreateProbe:
    """Locks the new lead's dedupe keys (when duplicates are checked), then reads its duplicate, its
    contact, and its matched rule's state: a turn (when `take_turn` and the lead is not merged) and
    its reps' loads (locked when `lock_loads`); on PostgreSQL in two round trips."""
    keys = sorted({k for k in (email_norm, phone_norm) if k})
    users = list(user_ids) if rule_id and loads else []
    if conn.dialect.name != "postgresql":  # one writer at a time: no locks to take
        duplicate = None
        if keys and check_duplicates:
            found = await find_open_duplicate(conn, email_norm=email_norm, phone_norm=phone_norm)
            duplicate = found["id"] if found is not None else None
        contact = await find_contact(conn, email_norm=email_norm, phone_norm=phone_norm) if keys else ""
        if not rule_id:
            return CreateProbe(duplicate, contact, False, None, {})
        turns = await take_turns(conn, {rule_id: 1 if take_turn and duplicate is None else 0})
        if rule_id not in turns:
            return CreateProbe(duplicate, contact, False, None, {})
        counts = await open_loads(conn, users) if users else {}
        return CreateProbe(duplicate, contact, True, turns[rule_id][0] if turns[rule_id] else None, counts)
    if keys and check_duplicates:
        await lock_dedupe_keys(conn, keys)
    if not keys and not rule_id:
        return CreateProbe(None, "", False, None, {})
    row = await _PROBE_FOR_CREATE[lock_loads].fetchrow(
        conn,
        {
            "email": email_norm,
            "phone": phone_norm,
            "rule_id": rule_id,
            "users": users,
            "take_turn": take_turn,
            "check_duplicates": check_duplicates,
        },
    )
    return CreateProbe(
        row["duplicate_id"] if check_duplicates else None,
        str(row["contact_id"] or ""),
        bool(row["rule_found"]),
        row["turn"],
        {str(k): int(v) for k, v in (row["loads"] or {}).items()},
    )


def rule_deleted_meanwhile(error: DBAPIError) -> bool:
    """Whether a statement failed taking a turn because the rule was deleted while it waited: the
    delete dropped the rule's sequence, which the statement had looked up and then waited to lock.
    The rule is gone once that transaction commits, so the work can be done again."""
    return isinstance(error.orig, asyncpg.InternalServerError) and str(error.orig).startswith(
        "could not open relation with OID"
    )


# Turns of several rules in one statement: the rules that exist, each with its turns in order.
_TAKE_TURNS = DriverStatement(
    text(
        f"""
    SELECT r.id, ARRAY(SELECT nextval({_TURNS_SEQUENCE.format(rule_id="r.id")})
                         FROM generate_series(1, w.wanted) ORDER BY 1) AS turns
      FROM unnest(CAST(:rule_ids AS text[]), CAST(:wanted AS int[])) AS w(rule_id, wanted)
      JOIN assignment_rules AS r ON r.id = w.rule_id
    """
    )
)


async def take_turns(conn: AsyncConnection, wanted: Mapping[str, int]) -> dict[str, list[int]]:
    """Takes `wanted[rule id]` turns of each rule's rotation (none to only see it exists): the
    turns of the rules that exist, in order. Turns of one rule taken concurrently never repeat."""
    if not wanted:
        return {}
    ids = sorted(wanted)
    if conn.dialect.name == "postgresql":
        rows = await _TAKE_TURNS.fetch(conn, {"rule_ids": ids, "wanted": [wanted[i] for i in ids]})
        return {str(rule_id): list(turns) for rule_id, turns in rows}
    taken: dict[str, list[int]] = {}
    c = assignment_rules.c
    for rule_id in ids:  # SQLite: one writer at a time
        after = await conn.scalar(
            update(assignment_rules).where(c.id == rule_id).values(turns=c.turns + wanted[rule_id]).returning(c.turns)
        )
        if after is not None:
            taken[rule_id] = list(range(after - wanted[rule_id], after))
    return taken


# --- the import path: one statement per batch, the same text for every batch ---------------------

# One index probe per key, whatever the planner knows of the table: a batch's keys are few next to
# the leads, but an import into a young table runs before its statistics are gathered, and then a
# plan that scans the whole table per batch (or per key) looks as cheap. OFFSET 0 keeps each lookup
# a separate, parameterized index scan; the status is checked in Python, since an index on status
# is the other (wrong) scan the planner could pick without statistics.
_KEY_LOOKUP = """
    SELECT l.* FROM unnest(CAST(:{param} AS text[])) AS k(v),
           LATERAL (SELECT id, email_norm, phone_norm, external_id, status FROM leads
                     WHERE {column} = k.v OFFSET 0) AS l
"""
OPEN_WITH_KEYS = text(
    " UNION ALL ".join(
        _KEY_LOOKUP.format(param=param, column=column)
        for param, column in (("emails", "email_norm"), ("phones", "phone_norm"), ("externals", "external_id"))
    )
    + " ORDER BY id"
)


async def open_leads_with_keys(
    conn: AsyncConnection, *, emails: Sequence[str], phones: Sequence[str], externals: Sequence[str]
) -> list[tuple[str, str | None, str | None, str]]:
    """(id, email_norm, phone_norm, external_id) of the open leads holding any of these keys,
    oldest first: one statement for an import batch."""
    if conn.dialect.name == "postgresql":
        # Each key is one index probe, whatever the statistics say: without statistics (a young
        # table) or with them on a column most leads leave empty (external_id: the planner then
        # expects every row to match an unknown key) a sequential scan per key looks as cheap,
        # and costs a full scan of the table for each of the batch's keys. JIT compiling for such
        # an estimate would cost more than running the statement. Both only for this transaction.
        await conn.execute(text("SELECT set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true)"))
        params = {"emails": list(emails), "phones": list(phones), "externals": list(externals)}
        rows = await conn.execute(OPEN_WITH_KEYS, params)
    else:
        c = leads.c
        conditions = [
            column.in_(values)
            for column, values in ((c.email_norm, emails), (c.phone_norm, phones), (c.external_id, externals))
            if values
        ]
        if not conditions:
            return []
        rows = await conn.execute(
            select(c.id, c.email_norm, c.phone_norm, c.external_id, c.status).where(or_(*conditions)).order_by(c.id)
        )
    return [
        (lead_id, email, phone, external) for lead_id, email, phone, external, status in rows if status in OPEN_STATUSES
    ]


def _bundle_statement() -> Any:
    """One static statement (compiled once) inserting a lead with its first score entry and an
    optional first-contact task (data-modifying CTEs), and reading its capped owner's open leads
    with the owner's row locked (None without a cap)."""
    new_lead = (
        insert(leads)
        .values({c.name: bindparam(f"l_{c.name}", type_=c.type) for c in leads.c})
        .returning(leads.c.id)
        .cte("new_lead")
    )
    new_history = (
        insert(score_history)
        .values({c.name: bindparam(f"h_{c.name}", type_=c.type) for c in score_history.c})
        .cte("new_history")
    )
    task_values = select(*[bindparam(f"t_{c.name}", type_=c.type) for c in tasks.c]).where(
        bindparam("t_present", type_=Boolean)
    )
    new_task = insert(tasks).from_select([c.name for c in tasks.c], task_values).cte("new_task")
    # The lock waits for the transactions assigning to this owner and reads what they committed;
    # the lead's own count is added by the insert's trigger, after this statement.
    capped_owner = (
        select(owner_loads.c.open_leads)
        .where(owner_loads.c.owner_id == bindparam("c_owner", type_=String))
        .with_for_update()
        .cte("capped_owner")
    )
    new_events = insert_outbox_json(outbox, "o_events").cte("new_events")
    return select(new_lead.c.id, select(capped_owner.c.open_leads).scalar_subquery().label("owner_load")).add_cte(
        new_history, new_task, new_events
    )


_BUNDLE = DriverStatement(_bundle_statement())
_TASK_BLANK = {c.name: None for c in tasks.c}
LEAD_DEFAULTS: dict[str, Any] = {
    c.name: ("" if isinstance(c.type, String) and not c.nullable else None) for c in leads.c
} | {
    "in_pool": False,
    "follow_up_overdue": False,
    "score": 0,
    "grade": "D",
    "version": 1,
    "tags": [],
    "custom": {},
    "scoring_generation": 0,
}


async def insert_lead_bundle(
    conn: AsyncConnection,
    lead: dict[str, Any],
    history: dict[str, Any],
    task: dict[str, Any] | None,
    capped_owner: str,
    events: list[dict[str, Any]],
) -> tuple[Mapping[Any, Any], int | None]:
    """The new lead, its first score entry, its first-contact task and its events' outbox rows; on
    PostgreSQL in one round trip. Returns the lead as stored and, when `capped_owner` is set, that
    owner's open leads before this one, their row locked until the transaction ends."""
    if conn.dialect.name != "postgresql":  # one writer at a time: nothing to lock
        if events:
            await conn.execute(insert(outbox), events)
        row = (await conn.execute(insert(leads).values(lead).returning(leads))).mappings().one()
        await conn.execute(insert(score_history).values(history))
        if task is not None:
            await conn.execute(insert(tasks).values(task))
        return row, None
    stored = LEAD_DEFAULTS | lead
    params: dict[str, Any] = {f"l_{k}": v for k, v in stored.items()}
    params.update({f"h_{k}": v for k, v in history.items()})
    params.update({f"t_{k}": v for k, v in (task or _TASK_BLANK).items()})
    params.update(t_present=task is not None, c_owner=capped_owner)
    params["o_events"] = json_rows(events)
    row = await _BUNDLE.fetchrow(conn, params)
    return stored, row["owner_load"]
