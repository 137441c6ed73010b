"""Alembic, shared: every service keeps its revisions in `services/<name>/migrations/` and its
`env.py` is two lines (`from crm_platform.migrations import run_env; run_env(metadata)`)."""

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from alembic.operations import Operations
from sqlalchemy import Column, LargeBinary, MetaData, RowMapping, String, Table, insert, pool, select, text, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from crm_platform.db import normalise_url
from crm_platform.idempotency import FINGERPRINT_LENGTH
from crm_platform.idempotency import TABLE_NAME as IDEMPOTENCY_TABLE
from crm_platform.outbox import NOTIFY_CHANNEL, add_messaging_tables

# Date-prefixed revision files sort in the order they were written.
FILE_TEMPLATE = "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s"


def alembic_config(migrations_dir: Path, database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("file_template", FILE_TEMPLATE)
    config.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return config


def upgrade(migrations_dir: Path, database_url: str, revision: str = "head") -> None:
    """Migrates a database to `revision`. Blocking: call it with `asyncio.to_thread` from async code."""
    command.upgrade(alembic_config(migrations_dir, database_url), revision)


# Held for the transaction that migrates a database (PostgreSQL's transaction advisory lock).
MIGRATION_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('crm-migrations'))")


def run_env(metadata: MetaData) -> None:
    """The body of every service's `migrations/env.py`."""
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set for Alembic")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    def migrate(connection: Connection) -> None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Two migrators at once (replicas migrating at start, a Job and a pod) take turns:
                # the second reads the version the first left, and has nothing left to do.
                connection.execute(MIGRATION_LOCK)
            context.run_migrations()

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(migrate)
        await engine.dispose()

    asyncio.run(run_async())


OUTBOX_NOTIFY_SQL = (
    f"""
    CREATE OR REPLACE FUNCTION crm_outbox_notify() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql
    """,
    "CREATE OR REPLACE TRIGGER outbox_notify AFTER INSERT ON outbox "
    "FOR EACH STATEMENT EXECUTE FUNCTION crm_outbox_notify()",
)


def create_messaging_tables(op: Operations) -> None:
    """The outbox and inbox tables (and the NOTIFY trigger on PostgreSQL), for a service's first revision."""
    metadata = MetaData()
    add_messaging_tables(metadata)
    metadata.create_all(op.get_bind())
    create_outbox_notify_trigger(op)


def drop_messaging_tables(op: Operations) -> None:
    drop_outbox_notify_trigger(op)
    op.drop_table("processed_events")
    op.drop_table("outbox")


def index_published_outbox_rows_only(op: Operations) -> None:
    """`ix_outbox_published_at` over published rows only (every component's revision of 2026-12-05).
    The relay claims pending rows in seq order through ix_outbox_pending; while this index also
    held them, a planner with stale statistics after a burst of inserts claimed through it instead,
    fetching and sorting every pending row on each pass (see `add_messaging_tables`)."""
    _replace_published_at_index(op, partial=True)


def index_every_outbox_row(op: Operations) -> None:
    """`ix_outbox_published_at` as the first revisions made it (the downgrade)."""
    _replace_published_at_index(op, partial=False)


def _replace_published_at_index(op: Operations, *, partial: bool) -> None:
    where = text("published_at IS NOT NULL") if partial else None
    op.drop_index("ix_outbox_published_at", table_name="outbox")
    op.create_index("ix_outbox_published_at", "outbox", ["published_at"], postgresql_where=where, sqlite_where=where)


def index_retrying_outbox_rows(op: Operations) -> None:
    """`ix_outbox_retrying` on (key, seq) of the outbox rows that failed at least once (every
    component's revision of 2026-12-07). A pass no longer claims a row behind an older row of its key
    that waits out a backoff (`claim_statement`): such rows were claimed only to be held back, and
    once a pass's worth of them stood at the head of the queue, every pass published nothing and
    the events of all other keys waited too. The claim probes this index for every row it looks
    at, on every pass; rows are deleted once published, so it is normally empty. A database made
    after this revision was written has it already (`create_messaging_tables`)."""
    where = text("published_at IS NULL AND next_attempt_at IS NOT NULL")
    op.create_index(
        "ix_outbox_retrying",
        "outbox",
        ["key", "seq"],
        postgresql_where=where,
        sqlite_where=where,
        if_not_exists=True,
    )


def drop_retrying_outbox_rows_index(op: Operations) -> None:
    op.drop_index("ix_outbox_retrying", table_name="outbox", if_exists=True)


def add_idempotency_fingerprints(op: Operations) -> None:
    """The `fingerprint` column of the idempotency key table (each service's revision
    `idempotency_fingerprint`): which request used a key, so that a different request with the same
    key is refused. Keys recorded before have none and answer as they did (`crm_platform.idempotency`)."""
    with op.batch_alter_table(IDEMPOTENCY_TABLE) as batch:
        batch.add_column(Column("fingerprint", String(FINGERPRINT_LENGTH), nullable=True))


def drop_idempotency_fingerprints(op: Operations) -> None:
    with op.batch_alter_table(IDEMPOTENCY_TABLE) as batch:
        batch.drop_column("fingerprint")


def add_idempotency_answers(op: Operations) -> None:
    """The `answer` column of the idempotency key table (each service's revision
    `idempotency_answers`): the answer a key's first request got, which a repeat gets again. Keys
    recorded before have none: a repeat answers with the record as it is then
    (`crm_platform.idempotency.first_answer`)."""
    with op.batch_alter_table(IDEMPOTENCY_TABLE) as batch:
        batch.add_column(Column("answer", LargeBinary, nullable=True))


def drop_idempotency_answers(op: Operations) -> None:
    with op.batch_alter_table(IDEMPOTENCY_TABLE) as batch:
        batch.drop_column("answer")


def add_processed_events_expiry(op: Operations) -> None:
    """The index the inbox expiry job deletes by (each service's revision `processed_events_expiry`):
    the processed-events table otherwise grows by every event a service ever consumed. A database
    made after this revision was written has it already (`create_messaging_tables` creates the
    tables as `add_messaging_tables` defines them now)."""
    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"], if_not_exists=True)


def drop_processed_events_expiry(op: Operations) -> None:
    op.drop_index("ix_processed_events_processed_at", table_name="processed_events", if_exists=True)


REPLACE_TABLE_BATCH_ROWS = 5000


def replace_table(op: Operations, new: Table, convert: Callable[[RowMapping], dict[str, Any]]) -> None:
    """Replaces the table named like `new` by `new`, keeping every row through `convert`. Rows are
    copied into a staging table in pages (keyset on the primary key), so memory stays flat however
    large the table; then the old table is dropped and the staging table takes its name."""
    bind = op.get_bind()
    old = Table(new.name, MetaData(), autoload_with=bind)
    staging = new.to_metadata(MetaData(), name=f"{new.name}_reshaped")
    staging.create(bind)
    key = list(old.primary_key.columns)
    after: tuple[Any, ...] | None = None
    while True:
        page = select(old).order_by(*key).limit(REPLACE_TABLE_BATCH_ROWS)
        if after is not None:
            page = page.where(tuple_(*key) > tuple_(*after))
        rows = list(bind.execute(page).mappings())
        if not rows:
            break
        bind.execute(insert(staging), [convert(row) for row in rows])
        after = tuple(rows[-1][column.name] for column in key)
    op.drop_table(new.name)
    op.rename_table(staging.name, new.name)
    if bind.dialect.name == "postgresql":  # the primary key's index was named after the staging table
        op.execute(f'ALTER INDEX "{staging.name}_pkey" RENAME TO "{new.name}_pkey"')


def create_outbox_notify_trigger(op: Operations) -> None:
    """PostgreSQL only: NOTIFY the relays once per inserting statement, so they wake at commit."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in OUTBOX_NOTIFY_SQL:
        op.execute(statement)


def drop_outbox_notify_trigger(op: Operations) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute("DROP FUNCTION IF EXISTS crm_outbox_notify()")
