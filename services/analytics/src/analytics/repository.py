"""Read models (SQLAlchemy Core): one row per aggregate, keyed by its id, written by upserts that
only let a snapshot replace one at least as new (its `version`). Replaying the topics, or receiving
an event twice, therefore converges on the same rows."""

from collections.abc import Mapping, Sequence
from typing import Any

from crm_platform.db import UtcDateTime, insert_on_conflict, lock_for_transaction
from crm_platform.outbox import add_messaging_tables
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

metadata = MetaData()
add_messaging_tables(metadata)

ID = String(64)
MONEY = Numeric(20, 4)
SHARE = Numeric(6, 4)


def _ts(name: str) -> Column[Any]:
    return Column(name, UtcDateTime(), nullable=True)


def _text(name: str) -> Column[Any]:
    return Column(name, Text, nullable=False, server_default="")


def _scope_columns() -> list[Column[Any]]:
    return [_text("owner_id"), _text("team"), _text("region")]


leads = Table(
    "rm_leads",
    metadata,
    Column("id", ID, primary_key=True),
    _text("source"),
    _text("campaign_id"),
    _text("status"),
    *_scope_columns(),
    _ts("created_at"),
    _ts("first_contacted_at"),
    _text("converted_opportunity_id"),
    Column("filled", JSON, nullable=False),
    Column("completeness", SHARE, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_leads_created", "created_at"),
    Index("ix_rm_leads_owner", "owner_id"),
    Index("ix_rm_leads_team", "team"),
    Index("ix_rm_leads_source", "source"),
)

campaigns = Table(
    "rm_campaigns",
    metadata,
    Column("id", ID, primary_key=True),
    _text("name"),
    _text("channel"),
    Column("cost", MONEY, nullable=True),
    _text("currency"),
    Column("starts_on", Date, nullable=True),
    Column("ends_on", Date, nullable=True),
    *_scope_columns(),
    Column("version", BigInteger, nullable=False),
)

opportunities = Table(
    "rm_opportunities",
    metadata,
    Column("id", ID, primary_key=True),
    _text("account_id"),
    _text("pipeline_id"),
    _text("stage"),
    _text("status"),
    Column("amount", MONEY, nullable=True),
    _text("currency"),
    *_scope_columns(),
    _text("source_lead_id"),
    _text("campaign_id"),
    _ts("created_at"),
    # When the win or loss was recorded, and the date the deal was won or lost (`close_date`, which
    # sales may back-date): wins count in a period by the date. NULL for a deal projected before the
    # date was kept (until its next event or a rebuild), counted by `closed_at` meanwhile.
    _ts("closed_at"),
    Column("close_date", Date, nullable=True),
    Column("history", JSON, nullable=False),
    # Its filled key fields (`domain.OPPORTUNITY_KEY_FIELDS`) and their share. NULL for a deal
    # projected before they were kept, left out of data completeness until its next event.
    Column("filled", JSON, nullable=True),
    Column("completeness", SHARE, nullable=True),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_opportunities_created", "created_at"),
    Index("ix_rm_opportunities_closed", "closed_at"),
    Index("ix_rm_opportunities_close_date", "close_date"),
    Index("ix_rm_opportunities_owner", "owner_id"),
    Index("ix_rm_opportunities_team", "team"),
    Index("ix_rm_opportunities_account", "account_id"),
)

# Pipelines as their events give them: the stages in order (`{"key", "name", "probability",
# "outcome"}`), for the funnel of a pipeline. A deleted one stays, flagged: its last order still
# orders whatever of its deals the reports hold, and no older event of it can bring it back.
pipelines = Table(
    "rm_pipelines",
    metadata,
    Column("id", ID, primary_key=True),
    _text("name"),
    Column("stages", JSON, nullable=False),
    Column("is_default", Boolean, nullable=False, server_default=text("false")),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
    Column("version", BigInteger, nullable=False),
)

accounts = Table(
    "rm_accounts",
    metadata,
    Column("id", ID, primary_key=True),
    _text("name"),
    *_scope_columns(),
    _ts("created_at"),
    _ts("last_activity_at"),
    _text("merged_into_id"),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
    Column("filled", JSON, nullable=False),
    Column("completeness", SHARE, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_accounts_owner", "owner_id"),
    Index("ix_rm_accounts_team", "team"),
)

# Contacts, for their data completeness alone: the scope columns, the account they are on (after
# merges, as other account records), which key fields are filled (`domain.CONTACT_KEY_FIELDS`) and
# their share, never the values (no name, phone number or email address is kept). A deleted contact
# stays as a flagged tombstone, out of the reports: no snapshot of it applied later brings it back.
contacts = Table(
    "rm_contacts",
    metadata,
    Column("id", ID, primary_key=True),
    _text("account_id"),
    *_scope_columns(),
    _ts("created_at"),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
    Column("filled", JSON, nullable=False),
    Column("completeness", SHARE, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_contacts_created", "created_at"),
    Index("ix_rm_contacts_owner", "owner_id"),
    Index("ix_rm_contacts_team", "team"),
    Index("ix_rm_contacts_account", "account_id"),
)

activities = Table(
    "rm_activities",
    metadata,
    Column("id", ID, primary_key=True),
    _text("account_id"),
    _text("lead_id"),
    _text("actor_id"),
    _text("kind"),
    _ts("occurred_at"),
    # 0 for a row projected before versions were kept: any event of the activity replaces it.
    Column("version", BigInteger, nullable=False, server_default=text("0")),
    Index("ix_rm_activities_actor", "actor_id", "occurred_at"),
    Index("ix_rm_activities_account", "account_id", "occurred_at"),
)

# Activities deleted where they were logged. An account's activity events are keyed by the account
# it is on: after a merge, its `activity.logged` (under the duplicate's key) may be applied after its
# deletion (under the survivor's), on a rebuild as well as late; the tombstone keeps it out.
deleted_activities = Table(
    "rm_deleted_activities",
    metadata,
    Column("id", ID, primary_key=True),
)

tasks = Table(
    "rm_tasks",
    metadata,
    Column("id", ID, primary_key=True),
    _text("status"),
    *_scope_columns(),
    _ts("due_at"),
    _ts("created_at"),
    _ts("completed_at"),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_tasks_owner", "owner_id"),
)

contracts = Table(
    "rm_contracts",
    metadata,
    Column("id", ID, primary_key=True),
    _text("account_id"),
    _text("opportunity_id"),
    *_scope_columns(),
    _text("status"),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_contracts_account", "account_id"),
)

payments = Table(
    "rm_payments",
    metadata,
    Column("id", ID, primary_key=True),
    _text("contract_id"),
    Column("amount", MONEY, nullable=False),
    _text("currency"),
    _ts("received_at"),
    Index("ix_rm_payments_contract", "contract_id"),
)

allocations = Table(
    "rm_allocations",
    metadata,
    Column("payment_id", ID, primary_key=True),
    Column("installment_id", ID, primary_key=True),
    Column("amount", MONEY, nullable=False),
    Index("ix_rm_allocations_installment", "installment_id"),
)

installments = Table(
    "rm_installments",
    metadata,
    Column("id", ID, primary_key=True),
    _text("contract_id"),
    _text("account_id"),
    Column("amount", MONEY, nullable=False),
    # Paid when the plan was created: money received before the plan existed. Later payments are
    # the installment's rm_allocations, so the two add up.
    Column("paid", MONEY, nullable=False),
    _text("currency"),
    _text("due_date"),
    _text("status"),
    # Once reported overdue, always counted as overdue until its payments cover it.
    Column("overdue", Boolean, nullable=False, server_default=text("false")),
    Index("ix_rm_installments_account", "account_id"),
)

tickets = Table(
    "rm_tickets",
    metadata,
    Column("id", ID, primary_key=True),
    _text("account_id"),
    # The assignee: the ticket's owner for record scope and rep performance.
    *_scope_columns(),
    _text("priority"),
    _text("status"),
    _ts("created_at"),
    _ts("first_response_due_at"),
    _ts("first_responded_at"),
    _ts("resolution_due_at"),
    _ts("resolved_at"),
    Column("first_response_breached", Boolean, nullable=False, server_default=text("false")),
    Column("resolution_breached", Boolean, nullable=False, server_default=text("false")),
    # When the service desk reported each breach: a later version it re-timed judges the breach again
    # (`domain.breach_holds`). NULL for one reported before these were kept, which stays as reported.
    _ts("first_response_breached_at"),
    _ts("resolution_breached_at"),
    # When the desk's resolution clock stopped (waiting for the customer, resolved); NULL while it runs.
    _ts("resolution_paused_at"),
    Column("version", BigInteger, nullable=False),
    Index("ix_rm_tickets_created", "created_at"),
    Index("ix_rm_tickets_owner", "owner_id"),
    Index("ix_rm_tickets_team", "team"),
    Index("ix_rm_tickets_account", "account_id"),
)

csat_responses = Table(
    "rm_csat",
    metadata,
    Column("id", ID, primary_key=True),
    _text("ticket_id"),
    _text("account_id"),
    Column("score", Integer, nullable=False),
    _ts("submitted_at"),
    Index("ix_rm_csat_ticket", "ticket_id"),
    Index("ix_rm_csat_account", "account_id"),
)

# Which consumer group generation the projection reads with; a rebuild moves to the next one, whose
# fresh group starts at the beginning of every topic.
projection_state = Table(
    "rm_projection_state",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("generation", Integer, nullable=False),
)

READ_MODELS: tuple[Table, ...] = (
    leads,
    campaigns,
    opportunities,
    pipelines,
    accounts,
    contacts,
    activities,
    deleted_activities,
    tasks,
    contracts,
    payments,
    allocations,
    installments,
    tickets,
    csat_responses,
)

# The read models holding an account id: an account merge moves their rows to the survivor.
ACCOUNT_RECORDS: tuple[Table, ...] = (
    opportunities,
    contacts,
    contracts,
    installments,
    activities,
    tickets,
    csat_responses,
)


async def upsert(
    conn: AsyncConnection,
    table: Table,
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
    versioned: bool = False,
    insert_only: Sequence[str] = (),
) -> None:
    """INSERT or UPDATE by primary key; a versioned row is replaced only by a snapshot at least as new.
    The `insert_only` columns are written by the INSERT and left alone by the UPDATE."""
    names = list(values)
    await insert_on_conflict(
        conn,
        table,
        values,
        lambda insert: _upsert(insert, table, names, keys, versioned, insert_only),
        shape=("upsert", tuple(keys), versioned, tuple(insert_only)),
    )


def _upsert(
    statement: Any, table: Table, names: list[str], keys: Sequence[str], versioned: bool, insert_only: Sequence[str]
) -> Any:
    """`statement` (an INSERT of the columns `names`) updating the row of the same `keys` instead."""
    changes = {name: statement.excluded[name] for name in names if name not in keys and name not in insert_only}
    if not changes:
        return statement.on_conflict_do_nothing(index_elements=list(keys))
    where = table.c.version <= statement.excluded.version if versioned else None
    return statement.on_conflict_do_update(index_elements=list(keys), set_=changes, where=where)


# Partitions are applied concurrently, each in its own transaction: a record resolved just before
# its account's merge commits, or written just after the merge moved the rows, would stay on the
# duplicate. Records of an account share its lock and its merge takes it alone, so one waits for the
# other. (SQLite runs one writing transaction at a time anyway.)
async def lock_account(conn: AsyncConnection, account_id: str, *, merging: bool = False) -> None:
    await lock_for_transaction(conn, f"account:{account_id}", shared=not merging)


async def surviving_account(conn: AsyncConnection, account_id: str) -> str:
    """The account `account_id` now lives on: the end of its chain of merges (a duplicate merged into
    an account that was merged in turn). The merge of an account is keyed by it, so it is applied
    after the account's creation and is found here from then on."""
    seen = {account_id}
    while account_id:
        await lock_account(conn, account_id)
        found = await conn.execute(select(accounts.c.merged_into_id).where(accounts.c.id == account_id))
        survivor = found.scalar_one_or_none()
        if not survivor or survivor in seen:  # the accounts service never forms a cycle; never loop on one
            break
        seen.add(survivor)
        account_id = survivor
    return account_id


async def move_account_records(conn: AsyncConnection, duplicate_id: str, survivor_id: str) -> None:
    """Every read-model row of the duplicate account now belongs to the survivor."""
    for table in ACCOUNT_RECORDS:
        await conn.execute(update(table).where(table.c.account_id == duplicate_id).values(account_id=survivor_id))


async def generation(conn: AsyncConnection, name: str) -> int:
    found = await conn.execute(select(projection_state.c.generation).where(projection_state.c.name == name))
    value = found.scalar_one_or_none()
    return int(value) if value is not None else 1


async def start_next_generation(conn: AsyncConnection, name: str) -> int:
    """Empties every read model and the inbox and moves to the next consumer group generation: the
    projection then replays every topic from its beginning. Returns the new generation."""
    for table in READ_MODELS:
        await conn.execute(delete(table))
    await conn.execute(delete(metadata.tables["processed_events"]))
    following = await generation(conn, name) + 1
    await upsert(conn, projection_state, {"name": name, "generation": following}, keys=["name"])
    return following


async def count_rows(conn: AsyncConnection, table: Table) -> int:
    return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def ticket_sla(conn: AsyncConnection, ticket_id: str) -> Row[Any] | None:
    """The ticket's status, when its resolution clock stopped and when its breaches were reported;
    None for a ticket not projected yet."""
    t = tickets.c
    found = await conn.execute(
        select(t.status, t.resolution_paused_at, t.first_response_breached_at, t.resolution_breached_at).where(
            t.id == ticket_id
        )
    )
    return found.first()


async def pipeline_deleted(conn: AsyncConnection, pipeline_id: str) -> bool:
    """Was the pipeline deleted in sales (its `pipeline.deleted` applied)?"""
    found = await conn.scalar(select(pipelines.c.deleted).where(pipelines.c.id == pipeline_id))
    return bool(found)


async def pipeline_stages(conn: AsyncConnection, pipeline_id: str) -> list[dict[str, Any]] | None:
    """The stages of a pipeline as its latest event gave them (deleted or not); None for a pipeline
    no event told of (the default the sales database is seeded with, until it is changed)."""
    found = await conn.execute(select(pipelines.c.stages).where(pipelines.c.id == pipeline_id))
    stages = found.scalar_one_or_none()
    return list(stages) if stages is not None else None


async def lock_activity(conn: AsyncConnection, activity_id: str) -> None:
    """To the end of the transaction: an activity's events applied at once from two partitions (an
    account's, across a merge) wait for each other, so one sees the other's tombstone or row."""
    await lock_for_transaction(conn, f"activity:{activity_id}")


async def activity_deleted(conn: AsyncConnection, activity_id: str) -> bool:
    """Was the activity deleted where it was logged (`deleted_activities`)?"""
    found = await conn.scalar(select(deleted_activities.c.id).where(deleted_activities.c.id == activity_id))
    return found is not None
