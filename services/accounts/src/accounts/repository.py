"""Tables and queries of the accounts service (SQLAlchemy Core; PostgreSQL or SQLite)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crm_platform.custom_field_filters import CustomFilter, custom_clauses
from crm_platform.custom_fields_service import definitions_table
from crm_platform.db import UtcDateTime
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.idempotency import idempotency_table
from crm_platform.outbox import add_messaging_tables
from crm_platform.pagination import keyset_page, next_cursor, page_limit, sort_field
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
    and_,
    column,
    false,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

metadata = MetaData()
add_messaging_tables(metadata)

# PostgreSQL: text[] with a GIN index (tags @> ...); SQLite: a JSON array.
TagsType = ARRAY(Text).with_variant(JSON(), "sqlite")
# PostgreSQL: jsonb with a GIN index (custom @> ...); SQLite: JSON text.
CustomType = JSON().with_variant(JSONB(), "postgresql")
Money = Numeric(20, 4)
Stamp = UtcDateTime()

# A live account (not merged away, not deleted), as the dedupe index's predicate. The dedupe lookup
# repeats it as this literal SQL: PostgreSQL uses a partial index only where it can prove the query
# implies its predicate, which it cannot from bound parameters under a prepared statement's generic
# plan (the lookup then reads the whole table).
LIVE = text("merged_into_id = '' AND deleted_at IS NULL")

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", Text, nullable=False),
    Column("dedupe_key", Text, nullable=False),
    Column("industry", Text, nullable=False, server_default=""),
    Column("size", Text, nullable=False, server_default=""),
    Column("annual_revenue", Money),
    Column("annual_revenue_currency", String(3)),
    Column("region", Text, nullable=False, server_default=""),
    Column("address", Text, nullable=False, server_default=""),
    Column("website", Text, nullable=False, server_default=""),
    Column("tier", String(1), nullable=False, server_default=""),
    Column("lifecycle", String(20), nullable=False, server_default="prospect"),
    Column("owner_id", String(100), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("tags", TagsType, nullable=False),
    Column("custom", CustomType, nullable=False),
    Column("parent_id", String(36)),
    Column("credit_limit", Money),
    Column("credit_limit_currency", String(3)),
    Column("in_pool", Boolean, nullable=False, server_default=false()),
    Column("last_activity_at", Stamp),
    Column("claimed_at", Stamp),
    Column("released_at", Stamp),
    Column("released_by_id", String(100), nullable=False, server_default=""),
    Column("merged_into_id", String(36), nullable=False, server_default=""),
    Column("deleted_at", Stamp),
    Column("created_at", Stamp, nullable=False),
    Column("updated_at", Stamp, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index("ix_accounts_owner", "owner_id", "id"),
    Index("ix_accounts_team", "team", "id"),
    Index("ix_accounts_region", "region", "id"),
    Index("ix_accounts_tier", "tier", "id"),
    Index("ix_accounts_lifecycle", "lifecycle", "id"),
    Index("ix_accounts_industry", "industry", "id"),
    Index("ix_accounts_parent", "parent_id"),
    Index("ix_accounts_pool", "in_pool", "tier", "id"),
    Index("ix_accounts_created", "created_at", "id"),
    Index("ix_accounts_name", "name", "id"),
    # One live account per normalised name + region: the dedupe rule, enforced even under races.
    Index("ux_accounts_dedupe", "dedupe_key", unique=True, postgresql_where=LIVE, sqlite_where=LIVE),
)

contacts = Table(
    "contacts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), nullable=False),
    Column("name", Text, nullable=False),
    Column("title", Text, nullable=False, server_default=""),
    Column("department", Text, nullable=False, server_default=""),
    Column("phone", Text, nullable=False, server_default=""),
    Column("phone_norm", String(32), nullable=False, server_default=""),
    Column("mobile", Text, nullable=False, server_default=""),
    Column("mobile_norm", String(32), nullable=False, server_default=""),
    Column("email", Text, nullable=False, server_default=""),
    Column("email_norm", Text, nullable=False, server_default=""),
    Column("wechat", Text, nullable=False, server_default=""),
    Column("decision_role", String(20), nullable=False, server_default=""),
    Column("is_primary", Boolean, nullable=False, server_default=false()),
    Column("owner_id", String(100), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("region", Text, nullable=False, server_default=""),
    Column("tags", TagsType, nullable=False),
    Column("custom", CustomType, nullable=False),
    Column("deleted_at", Stamp),
    Column("created_at", Stamp, nullable=False),
    Column("updated_at", Stamp, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index("ix_contacts_account", "account_id", "id"),
    Index("ix_contacts_owner", "owner_id", "id"),
    Index("ix_contacts_email", "email_norm"),
    Index("ix_contacts_phone", "phone_norm"),
    Index("ix_contacts_mobile", "mobile_norm"),
)

activities = Table(
    "activities",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), nullable=False),
    Column("contact_id", String(36), nullable=False, server_default=""),
    Column("kind", String(20), nullable=False),
    Column("subject", Text, nullable=False, server_default=""),
    Column("notes", Text, nullable=False, server_default=""),
    Column("actor_id", String(100), nullable=False, server_default=""),
    Column("occurred_at", Stamp, nullable=False),
    Column("created_at", Stamp, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Column("outcome", Text, nullable=False, server_default=""),
    Column("next_follow_up_at", Stamp),
    Index("ix_activities_account", "account_id", "occurred_at", "id"),
    Index("ix_activities_contact", "contact_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), nullable=False, server_default=""),
    Column("contact_id", String(36), nullable=False, server_default=""),
    Column("title", Text, nullable=False),
    Column("notes", Text, nullable=False, server_default=""),
    Column("due_at", Stamp),
    Column("status", String(20), nullable=False, server_default="open"),
    Column("owner_id", String(100), nullable=False, server_default=""),
    Column("team", String(100), nullable=False, server_default=""),
    Column("region", Text, nullable=False, server_default=""),
    Column("source", String(20), nullable=False, server_default="manual"),
    Column("reminder_rule_id", String(36), nullable=False, server_default=""),
    Column("created_at", Stamp, nullable=False),
    Column("completed_at", Stamp),
    Column("updated_at", Stamp, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    # The activity that planned it (source `follow_up`): it moves, or is cancelled, with the activity.
    Column("activity_id", String(36), nullable=False, server_default=""),
    Index("ix_tasks_owner_due", "owner_id", "status", "due_at", "id"),
    Index("ix_tasks_activity", "activity_id"),
    Index("ix_tasks_account", "account_id", "status"),
    # At most one open reminder task per rule and account, even with several job replicas.
    Index(
        "ux_tasks_open_reminder",
        "reminder_rule_id",
        "account_id",
        unique=True,
        postgresql_where=text("status = 'open' AND reminder_rule_id <> ''"),
        sqlite_where=text("status = 'open' AND reminder_rule_id <> ''"),
    ),
)

reminder_rules = Table(
    "reminder_rules",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", Text, nullable=False),
    Column("tiers", JSON, nullable=False),
    Column("inactive_days", Integer, nullable=False),
    Column("task_title", Text, nullable=False),
    Column("due_in_hours", Integer, nullable=False, server_default="24"),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_by", String(100), nullable=False, server_default=""),
    Column("created_at", Stamp, nullable=False),
)

segments = Table(
    "segments",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", Text, nullable=False),
    Column("visibility", String(10), nullable=False),
    Column("owner_id", String(100), nullable=False),
    Column("team", String(100), nullable=False, server_default=""),
    Column("filters", JSON, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("created_at", Stamp, nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Index("ix_segments_owner", "owner_id"),
    Index("ix_segments_team", "team"),
)

# Definitions of the custom fields of accounts and contacts (served by crm_platform's CustomFieldServicer).
custom_fields = definitions_table(metadata, "custom_field_definitions")

pool_claims = Table(
    "pool_claims",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), nullable=False),
    Column("claimant_id", String(100), nullable=False),
    Column("claimed_at", Stamp, nullable=False),
    Index("ix_pool_claims_claimant", "claimant_id", "claimed_at"),
)

idempotency_keys = idempotency_table(metadata)

bulk_transfers = Table(
    "bulk_transfers",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("from_owner_id", String(100), nullable=False),
    Column("to_owner_id", String(100), nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("accounts", Integer, nullable=False),
    Column("contacts", Integer, nullable=False),
    Column("tasks", Integer, nullable=False),
    Column("actor_id", String(100), nullable=False),
    Column("created_at", Stamp, nullable=False),
)


# --- dialect helpers -----------------------------------------------------------------------------


def is_pg(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


def has_all_tags(conn: AsyncConnection, table: Table, tags: Sequence[str]) -> ColumnElement[bool]:
    if is_pg(conn):
        return table.c.tags.contains(list(tags))
    clauses = [
        select(literal(1))
        .select_from(func.json_each(table.c.tags).table_valued("value"))
        .where(column("value") == tag)
        .exists()
        for tag in tags
    ]
    return and_(*clauses)


def name_contains(table: Table, query: str) -> ColumnElement[bool]:
    """Case-insensitive substring match; served by the pg_trgm GIN index on PostgreSQL."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return table.c.name.ilike(f"%{escaped}%", escape="\\")


# --- keyset paging --------------------------------------------------------------------------------

SORTS = {"created_at", "name", "updated_at"}


@dataclass(frozen=True, slots=True)
class Page:
    """A page as asked for, checked: the platform's keyset paging (`crm_platform.pagination`) over
    `sort_key`, the column the sort names (ids are time-ordered, so created_at order is id order:
    one indexed column)."""

    limit: int
    sort_field: str
    sort_key: str
    descending: bool
    cursor: str


def parse_page(limit: int, cursor: str, sort: str, *, sorts: set[str] = SORTS) -> Page:
    field_name, descending = sort_field(sort) if sort else ("created_at", False)
    if field_name not in sorts:
        raise ValidationFailed([FieldError("sort", f"must be one of {', '.join(sorted(sorts))} (- for descending)")])
    sort_key = "id" if field_name == "created_at" else field_name
    return Page(page_limit(limit), field_name, sort_key, descending, cursor)


def apply_page(query: Select[Any], table: Table, page: Page) -> Select[Any]:
    return keyset_page(
        query,
        sort_column=table.c[page.sort_key],
        id_column=table.c.id,
        descending=page.descending,
        cursor=page.cursor,
        limit=page.limit,
    )


def page_result(rows: list[Any], page: Page) -> tuple[list[Any], str]:
    """Drops the look-ahead row `apply_page` fetched; the cursor points after the last row returned."""
    return rows[: page.limit], next_cursor(rows, sort_key=page.sort_key, descending=page.descending, limit=page.limit)


# --- account queries ----------------------------------------------------------------------------


@dataclass(slots=True)
class AccountFilter:
    q: str = ""
    tiers: list[str] = field(default_factory=list)
    lifecycles: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    industries: list[str] = field(default_factory=list)
    owner_id: str = ""
    team: str = ""
    tags: list[str] = field(default_factory=list)
    parent_id: str = ""
    in_pool: bool | None = None
    created_after: datetime | None = None
    custom: list[CustomFilter] = field(default_factory=list)
    include_merged: bool = False
    ids: list[str] = field(default_factory=list)


def account_conditions(conn: AsyncConnection, f: AccountFilter) -> list[ColumnElement[bool]]:
    t = accounts
    where: list[ColumnElement[bool]] = [t.c.deleted_at.is_(None)]
    if not f.include_merged:
        where.append(t.c.merged_into_id == "")
    where.extend(filter_conditions(conn, f))
    return where


def filter_conditions(conn: AsyncConnection, f: AccountFilter) -> list[ColumnElement[bool]]:
    """What `f` asks of an account beyond being live (or merged, with `include_merged`)."""
    t = accounts
    where: list[ColumnElement[bool]] = []
    if f.q:
        where.append(name_contains(t, f.q))
    if f.tiers:
        where.append(t.c.tier.in_(f.tiers))
    if f.lifecycles:
        where.append(t.c.lifecycle.in_(f.lifecycles))
    if f.regions:
        where.append(t.c.region.in_(f.regions))
    if f.industries:
        where.append(t.c.industry.in_(f.industries))
    if f.owner_id:
        where.append(t.c.owner_id == f.owner_id)
    if f.team:
        where.append(t.c.team == f.team)
    if f.tags:
        where.append(has_all_tags(conn, t, f.tags))
    if f.parent_id:
        where.append(t.c.parent_id == f.parent_id)
    if f.in_pool is not None:
        where.append(t.c.in_pool.is_(f.in_pool))
    if f.created_after is not None:
        where.append(t.c.created_at > f.created_after)
    where.extend(custom_clauses(conn, t.c.custom, f.custom))
    if f.ids:
        where.append(t.c.id.in_(f.ids))
    return where


async def list_accounts(
    conn: AsyncConnection,
    f: AccountFilter,
    scope: RecordScope | None,
    page: Page,
    *,
    segment: AccountFilter | None = None,
) -> tuple[list[Any], str]:
    """Accounts matching `f` and, when given, a saved segment's filter too (each narrows the list)."""
    where = account_conditions(conn, f)
    if segment is not None:
        where.extend(filter_conditions(conn, segment))
    if scope is not None:
        where.append(scope_clause(accounts, scope))
    query = apply_page(select(accounts).where(*where), accounts, page)
    rows = list(await conn.execute(query))
    return page_result(rows, page)


async def get_account(conn: AsyncConnection, account_id: str, *, for_update: bool = False) -> Any | None:
    query = select(accounts).where(accounts.c.id == account_id, accounts.c.deleted_at.is_(None))
    if for_update and is_pg(conn):
        query = query.with_for_update()
    return (await conn.execute(query)).first()


async def touch_account(conn: AsyncConnection, account_id: str, when: datetime) -> None:
    """Moves the account's `last_activity_at` up to `when`, never back: a high-water mark of every
    touch (activities logged or corrected, work on its deals in sales). Not a version bump: activity
    must not make an open edit form stale."""
    if not account_id:
        return
    await conn.execute(
        update(accounts)
        .where(
            accounts.c.id == account_id,
            or_(accounts.c.last_activity_at.is_(None), accounts.c.last_activity_at < when),
        )
        .values(last_activity_at=when)
    )


async def share_lock_accounts(conn: AsyncConnection, account_ids: Sequence[str]) -> None:
    """Share-locks accounts until the transaction ends: a delete, merge or transfer of one (FOR UPDATE)
    waits for it. In id order, as merges lock theirs, so the two never wait on each other in a cycle."""
    ids = sorted({i for i in account_ids if i})
    if ids and is_pg(conn):
        await conn.execute(
            select(accounts.c.id).where(accounts.c.id.in_(ids)).order_by(accounts.c.id).with_for_update(read=True)
        )


def live_account_with_dedupe_key(key: str) -> Select[Any]:
    """The live account holding a dedupe key: one probe of the unique index, also under a generic
    plan, because the query repeats the index's predicate as literal SQL (`LIVE`)."""
    scope = (accounts.c.owner_id, accounts.c.team, accounts.c.region, accounts.c.in_pool)  # whom to name it to
    return select(accounts.c.id, *scope).where(LIVE, accounts.c.dedupe_key == key)


async def find_by_dedupe_key(conn: AsyncConnection, key: str) -> Any | None:
    return (await conn.execute(live_account_with_dedupe_key(key))).first()


async def parent_chain(conn: AsyncConnection, start_id: str, *, limit: int = 100) -> dict[str, str | None]:
    """Parents of `start_id` and its ancestors (bounded walk; hierarchies are shallow)."""
    chain: dict[str, str | None] = {}
    current: str | None = start_id
    while current and current not in chain and len(chain) < limit:
        parent = await conn.scalar(select(accounts.c.parent_id).where(accounts.c.id == current))
        chain[current] = parent
        current = parent
    return chain


# --- contacts -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ContactFilter:
    account_id: str = ""
    q: str = ""
    tags: list[str] = field(default_factory=list)
    decision_roles: list[str] = field(default_factory=list)
    owner_id: str = ""
    custom: list[CustomFilter] = field(default_factory=list)


async def list_contacts(
    conn: AsyncConnection, f: ContactFilter, scope: RecordScope | None, page: Page
) -> tuple[list[Any], str]:
    t = contacts
    where: list[ColumnElement[bool]] = [t.c.deleted_at.is_(None)]
    if f.account_id:
        where.append(t.c.account_id == f.account_id)
    if f.q:
        where.append(name_contains(t, f.q))
    if f.tags:
        where.append(has_all_tags(conn, t, f.tags))
    if f.decision_roles:
        where.append(t.c.decision_role.in_(f.decision_roles))
    if f.owner_id:
        where.append(t.c.owner_id == f.owner_id)
    where.extend(custom_clauses(conn, t.c.custom, f.custom))
    if scope is not None:
        where.append(scope_clause(t, scope))
    rows = list(await conn.execute(apply_page(select(t).where(*where), t, page)))
    return page_result(rows, page)


async def get_contact(conn: AsyncConnection, contact_id: str, *, for_update: bool = False) -> Any | None:
    query = select(contacts).where(contacts.c.id == contact_id, contacts.c.deleted_at.is_(None))
    if for_update and is_pg(conn):
        query = query.with_for_update()
    return (await conn.execute(query)).first()


async def find_contacts(conn: AsyncConnection, *, email: str, phone: str, scope: RecordScope, limit: int) -> list[Any]:
    matches: list[ColumnElement[bool]] = []
    if email:
        matches.append(contacts.c.email_norm == email)
    if phone:
        matches.append(or_(contacts.c.phone_norm == phone, contacts.c.mobile_norm == phone))
    if not matches:
        return []
    query = (
        select(contacts)
        .where(contacts.c.deleted_at.is_(None), or_(*matches), scope_clause(contacts, scope))
        .order_by(contacts.c.id)
        .limit(limit)
    )
    return list(await conn.execute(query))
