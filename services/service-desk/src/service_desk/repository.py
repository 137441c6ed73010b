"""Tables of the service desk (SQLAlchemy Core) and the queries the handlers share."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crm_platform.custom_field_filters import CustomFilter, custom_clauses
from crm_platform.custom_fields_service import definitions_table
from crm_platform.db import UtcDateTime
from crm_platform.idempotency import idempotency_table
from crm_platform.outbox import add_messaging_tables
from crm_platform.pagination import keyset_page, next_cursor, page_limit, parse_sort
from crm_platform.principal import RecordScope, scope_clause
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    cast,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from service_desk.domain import is_cjk

metadata = MetaData()
add_messaging_tables(metadata)

TS = UtcDateTime()
# Tickets with a survey link (resolved once): the only ones its unique index holds.
HAS_SURVEY = text("survey_key IS NOT NULL")

tickets = Table(
    "tickets",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("contact_id", String(64), nullable=False, server_default=""),
    Column("subject", String(500), nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("channel", String(20), nullable=False),
    Column("category", String(100), nullable=False, server_default=""),
    Column("priority", String(20), nullable=False),
    Column("effective_priority", String(20), nullable=False),
    Column("account_tier", String(8), nullable=False, server_default=""),
    Column("status", String(20), nullable=False),
    Column("assignee_id", String(64), nullable=False, server_default=""),
    # The record-scope owner: the assignee, or the creator while nobody is assigned.
    Column("owner_id", String(64), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("region", String(100), nullable=False, server_default=""),
    Column("tags", JSON, nullable=False),
    # jsonb on PostgreSQL (migration 0005): `?custom.<key>=` filters are containment, GIN-indexed.
    Column("custom", JSON().with_variant(JSONB(), "postgresql"), nullable=False, server_default="{}"),
    Column("escalated", Boolean, nullable=False, server_default=false()),
    Column("escalation_reason", String(100), nullable=False, server_default=""),
    Column("created_by_id", String(64), nullable=False, server_default=""),
    Column("first_response_due_at", TS, nullable=False),
    Column("resolution_due_at", TS, nullable=False),
    Column("first_responded_at", TS),
    Column("resolved_at", TS),
    # The first resolution, kept when a reopening clears `resolved_at`: a ticket once resolved is a
    # service record, never deleted (migration 0012).
    Column("first_resolved_at", TS),
    Column("closed_at", TS),
    # What the SLA timer has announced, so each warning and breach goes out once.
    Column("first_response_warned_at", TS),
    Column("first_response_breached_at", TS),
    Column("resolution_warned_at", TS),
    Column("resolution_breached_at", TS),
    # Waiting for the customer stops the resolution clock: since when, and the seconds stopped so far.
    Column("sla_paused_at", TS),
    Column("sla_paused_seconds", Integer, nullable=False, server_default="0"),
    # When the SLA timer must look at the ticket next; NULL when nothing is left to announce.
    Column("next_sla_check_at", TS),
    # When the dispatch timer last offered the queued ticket and no agent could take it: the queue
    # is taken from the tickets offered longest ago (or never), so those nobody can take do not
    # hold the head of it.
    Column("dispatch_offered_at", TS),
    # The key of the ticket's survey link for its customer (GetCsatSurvey): set at the first
    # resolution, kept through reopenings; NULL before (migration 0016).
    Column("survey_key", String(64)),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_tickets_account_status", "account_id", "status"),
    Index("ix_tickets_assignee_status", "assignee_id", "status"),
    Index("ix_tickets_status_created", "status", "created_at"),
    Index("ix_tickets_created", "created_at", "id"),
    Index("ix_tickets_updated", "updated_at", "id"),
    Index("ix_tickets_priority", "priority"),
    Index("ix_tickets_channel", "channel"),
    Index("ix_tickets_category", "category"),
    Index("ix_tickets_region", "region"),
    Index("ix_tickets_owner", "owner_id"),
    Index("ix_tickets_team", "team"),
    Index("ix_tickets_contact", "contact_id"),
    Index("ix_tickets_escalated", "escalated"),
    Index("ix_tickets_next_sla_check", "next_sla_check_at"),
    Index("ux_tickets_survey_key", "survey_key", unique=True, postgresql_where=HAS_SURVEY, sqlite_where=HAS_SURVEY),
)

ticket_comments = Table(
    "ticket_comments",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("ticket_id", String(36), nullable=False),
    Column("author_id", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("public", Boolean, nullable=False),
    Column("created_at", TS, nullable=False),
    Index("ix_ticket_comments_ticket", "ticket_id", "created_at"),
)

work_log = Table(
    "work_log",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("ticket_id", String(36), nullable=False),
    Column("agent_id", String(64), nullable=False),
    Column("minutes", Integer, nullable=False),
    Column("note", Text, nullable=False, server_default=""),
    Column("logged_at", TS, nullable=False),
    Index("ix_work_log_ticket", "ticket_id", "logged_at"),
)

sla_policies = Table(
    "sla_policies",
    metadata,
    Column("priority", String(20), primary_key=True),
    Column("first_response_minutes", Integer, nullable=False),
    Column("resolution_minutes", Integer, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("version", BigInteger, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("skills", JSON, nullable=False),
    Column("region", String(100), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("capacity", Integer, nullable=False),
    Column("available", Boolean, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_agents_region_available", "region", "available"),
    Index("ix_agents_team", "team"),
)

# Projection of the accounts context (from crm.accounts.v1 events): only what the desk needs.
account_tiers = Table(
    "account_tiers",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("tier", String(8), nullable=False),
    Column("region", String(100), nullable=False, server_default=""),
    Column("updated_at", TS, nullable=False),
    # Set by crm.accounts.v1 AccountDeleted: the account takes no more tickets (migration 0008).
    Column("deleted_at", TS),
    # Set by AccountMerged: the survivor the account was merged into, which may have been merged in
    # turn; its tickets, and new ones naming it, go to the end of that chain (migration 0009).
    Column("merged_into_id", String(64), nullable=False, server_default=""),
)

csat_responses = Table(
    "csat_responses",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("ticket_id", String(36), nullable=False),
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("score", Integer, nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("submitted_by_id", String(64), nullable=False, server_default=""),
    Column("owner_id", String(64), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("region", String(100), nullable=False, server_default=""),
    Column("submitted_at", TS, nullable=False),
    # staff (SubmitCsat) or customer (the survey link; `submitted_by_id` names the survey:
    # `survey:<ticket id>`). Answers from before migration 0016 were all entered by staff.
    Column("channel", String(20), nullable=False, server_default="staff"),
    UniqueConstraint("ticket_id", name="uq_csat_ticket"),
    Index("ix_csat_account", "account_id"),
    Index("ix_csat_submitted", "submitted_at", "id"),
)

return_visits = Table(
    "return_visits",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("ticket_id", String(36), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("assignee_id", String(64), nullable=False, server_default=""),
    Column("owner_id", String(64), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("region", String(100), nullable=False, server_default=""),
    Column("due_at", TS, nullable=False),
    Column("status", String(10), nullable=False),
    Column("notes", Text, nullable=False, server_default=""),
    Column("completed_at", TS),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("ticket_id", name="uq_return_visit_ticket"),
    Index("ix_return_visits_status_due", "status", "due_at", "id"),
    Index("ix_return_visits_account", "account_id"),
    Index("ix_return_visits_assignee", "assignee_id"),
)

kb_articles = Table(
    "kb_articles",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("title", String(300), nullable=False),
    Column("body", Text, nullable=False),
    Column("category", String(100), nullable=False, server_default=""),
    Column("tags", JSON, nullable=False),
    Column("published", Boolean, nullable=False),
    Column("author_id", String(64), nullable=False, server_default=""),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_kb_articles_category", "category", "published"),
    # The list without a search, newest first, pages along it (migration 0010).
    Index("ix_kb_articles_updated", "updated_at", "id"),
    # PostgreSQL also has `search`, a stored tsvector of title and body with a GIN index (migration 0003).
)

idempotency_keys = idempotency_table(metadata)

# Definitions of the custom fields of tickets (served by crm_platform's CustomFieldServicer).
custom_fields = definitions_table(metadata, "custom_fields")

# PostgreSQL only: the stored, GIN-indexed tsvector column (ranking reads it instead of re-parsing bodies).
KB_DOCUMENT_SQL = "to_tsvector('simple', coalesce(title, '') || ' ' || coalesce(body, ''))"
KB_SEARCH_COLUMN = "kb_articles.search"


# --- tickets ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class TicketFilter:
    account_id: str = ""
    contact_id: str = ""
    statuses: list[str] = field(default_factory=list)
    priorities: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    assignee_id: str = ""
    region: str = ""
    escalated: bool | None = None
    created_after: datetime | None = None
    q: str = ""
    custom: list[CustomFilter] = field(default_factory=list)


TICKET_SORTS = {
    "created_at": tickets.c.created_at,
    "updated_at": tickets.c.updated_at,
    "resolution_due_at": tickets.c.resolution_due_at,
}


async def list_tickets(
    conn: AsyncConnection, scope: RecordScope, f: TicketFilter, *, limit: int, cursor: str, sort: str
) -> tuple[list[Any], str]:
    t = tickets
    conditions = [scope_clause(t, scope)]
    equal = {"account_id": f.account_id, "contact_id": f.contact_id, "assignee_id": f.assignee_id, "region": f.region}
    conditions += [t.c[name] == value for name, value in equal.items() if value]
    in_lists = {"status": f.statuses, "priority": f.priorities, "channel": f.channels, "category": f.categories}
    conditions += [t.c[name].in_(values) for name, values in in_lists.items() if values]
    if f.escalated is not None:
        conditions.append(t.c.escalated.is_(f.escalated))
    if f.created_after is not None:
        conditions.append(t.c.created_at > f.created_after)
    if f.q:
        conditions.append(func.lower(t.c.subject).contains(f.q.lower(), autoescape=True))
    conditions += custom_clauses(conn, t.c.custom, f.custom)
    return await _page(conn, select(t).where(and_(*conditions)), TICKET_SORTS, t.c.id, limit, cursor, sort)


async def _page(
    conn: AsyncConnection,
    query: Any,
    sorts: dict[str, Column[Any]],
    id_column: Column[Any],
    limit: int,
    cursor: str,
    sort: str,
    default: str = "-created_at",
) -> tuple[list[Any], str]:
    size = page_limit(limit)
    column, descending = parse_sort(sort, sorts, default=default)
    query = keyset_page(
        query, sort_column=column, id_column=id_column, descending=descending, cursor=cursor, limit=size
    )
    rows = list(await conn.execute(query))
    return rows[:size], next_cursor(rows, sort_key=column.name, descending=descending, limit=size)


async def open_ticket_counts(conn: AsyncConnection, agent_ids: list[str]) -> dict[str, int]:
    from service_desk.domain import OPEN_STATUSES

    if not agent_ids:
        return {}
    rows = await conn.execute(
        select(tickets.c.assignee_id, func.count())
        .where(tickets.c.assignee_id.in_(agent_ids), tickets.c.status.in_(OPEN_STATUSES))
        .group_by(tickets.c.assignee_id)
    )
    return {assignee: int(count) for assignee, count in rows}


# --- agents ----------------------------------------------------------------------------------------

AGENT_SORTS = {"created_at": agents.c.created_at, "name": agents.c.name}


async def list_agents(
    conn: AsyncConnection,
    *,
    region: str,
    skill: str,
    available: bool | None,
    team: str,
    limit: int,
    cursor: str,
    sort: str,
) -> tuple[list[Any], str]:
    a = agents
    conditions: list[Any] = []
    if region:
        conditions.append(a.c.region == region)
    if team:
        conditions.append(a.c.team == team)
    if available is not None:
        conditions.append(a.c.available.is_(available))
    if skill:
        # Skills are a small JSON list; its text form holds each skill as a quoted string.
        conditions.append(cast(a.c.skills, String).contains(f'"{skill}"', autoescape=True))
    return await _page(conn, select(a).where(and_(*conditions)), AGENT_SORTS, a.c.id, limit, cursor, sort, "created_at")


# --- knowledge base --------------------------------------------------------------------------------


KB_SORTS = {"updated_at": kb_articles.c.updated_at}
# A ranked search's results, with their relevance, come from a subquery: keyset_page pages by
# Columns, and these, unbound, name its columns.
KB_RANK = Column("rank", Numeric(20, 10), nullable=False)
KB_RANKED_ID = Column("id", String(36), nullable=False)


async def search_articles(
    conn: AsyncConnection,
    terms: list[str],
    *,
    any_term: bool,
    category: str,
    published_only: bool,
    limit: int,
    cursor: str = "",
) -> tuple[list[Any], str]:
    """A page of the articles matching the terms (all, or any) and the next page's cursor. Words:
    full text on PostgreSQL (the GIN-indexed tsvector), ranked by ts_rank; substring match on
    SQLite, which does not rank them. CJK terms (character pairs, see `domain.search_terms`):
    substring match on both databases, as the text-search parser cannot cut CJK text into words,
    ranked on both by the terms an article contains, those of its title counting more. Ranked
    searches come most relevant first, then by id; the others, and every article without terms,
    most recently updated first, then by id."""
    a = kb_articles
    conditions: list[Any] = []
    if published_only:
        conditions.append(a.c.published.is_(True))
    if category:
        conditions.append(a.c.category == category)
    words = [term for term in terms if not is_cjk(term[0])]  # a term is all CJK or has none
    matches: list[ColumnElement[bool]] = []
    ranks: list[ColumnElement[Any]] = []
    if conn.dialect.name == "postgresql" and words:
        document: ColumnElement[Any] = literal_column(KB_SEARCH_COLUMN)
        joiner = " | " if any_term else " & "
        tsquery = func.to_tsquery("simple", joiner.join(f"{word}:*" for word in words))
        matches.append(document.op("@@")(tsquery))
        ranks.append(func.ts_rank(document, tsquery))
    else:
        matches += [or_(_contains(a.c.title, word), _contains(a.c.body, word)) for word in words]
    for term in terms:
        if is_cjk(term[0]):
            in_title, in_body = _contains(a.c.title, term), _contains(a.c.body, term)
            matches.append(or_(in_title, in_body))
            ranks.append(case((in_title, 2), else_=0) + case((in_body, 1), else_=0))
    if matches:
        conditions.append(or_(*matches) if any_term else and_(*matches))
    if not ranks:
        return await _page(conn, select(a).where(and_(*conditions)), KB_SORTS, a.c.id, limit, cursor, "", "-updated_at")
    # As numeric: a value the cursor carries as text and gives back exactly, so the next page starts
    # right after the last row (a real would not compare equal to its decimal text). Ranks equal to
    # 10 decimals tie, and go by id.
    rank = cast(sum(ranks[1:], ranks[0]), KB_RANK.type).label(KB_RANK.name)
    ranked = select(a, rank).where(and_(*conditions)).subquery("ranked")
    return await _page(conn, select(ranked), {KB_RANK.name: KB_RANK}, KB_RANKED_ID, limit, cursor, "", "-rank")


def _contains(column: Column[Any], term: str) -> ColumnElement[bool]:
    return func.lower(column).contains(term, autoescape=True)
