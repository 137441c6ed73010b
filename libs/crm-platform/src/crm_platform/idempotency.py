"""Idempotency keys, shared: a creating call records its key with what it created, so a repeated
call answers with the first result instead of creating again.

One table per service database (`idempotency_keys`, see `idempotency_table`), keyed by the operation,
the caller (the principal's user id; "" where keys are not per caller) and the key. The recorded
result is JSON: an id (`str`) or a small object (`dict`). `CallerKeys` serves the services whose keys
are per caller and whose result is an id.

Two ways to record a key, both inside the caller's transaction, so the key and what it created
commit (or roll back) together:

- `claim`, before creating: INSERT ... ON CONFLICT DO NOTHING. A concurrent first use of the key
  holds the row lock until it commits; the second waits, then gets the first result back and
  creates nothing. When the call ends in something else than it claimed for, `settle` records that.
  The way for every new call site.
- `remember`, after creating, following a `recall` at the start (leads' conversion still works so):
  a plain INSERT. A concurrent duplicate that committed first makes it raise
  `sqlalchemy.exc.IntegrityError`, rolling back everything this transaction created; the caller
  may then `recall` the winner's result.

Keys are kept for a retention period (`ServiceSettings.idempotency_retention_hours`, a day by
default, as payment APIs do): every service runs `expire_keys` as a periodic job, so the table
holds the keys of the retry window, not every key ever sent.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import (
    JSON,
    Column,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crm_platform.db import UtcDateTime, insert_ignore, transaction
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.principal import current_principal

TABLE_NAME = "idempotency_keys"

# What a call remembers: the id of what it created, or a small JSON object.
Result: TypeAlias = str | dict[str, Any]
# The longest key the table holds (the gateway's Idempotency-Key header allows as many).
KEY_LENGTH = 200


def idempotency_table(metadata: MetaData, name: str = TABLE_NAME) -> Table:
    """Adds the idempotency key table to a service's metadata (each service's migrations create it)."""
    return Table(
        name,
        metadata,
        Column("operation", String(64), nullable=False),
        Column("caller", String(200), nullable=False, server_default=""),
        Column("key", String(KEY_LENGTH), nullable=False),
        Column("result", JSON, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        PrimaryKeyConstraint("operation", "caller", "key"),
    )


def _checked(key: str) -> str:
    """A key the table can hold: a longer one is the caller's error (422), not the database's (500)."""
    if len(key) > KEY_LENGTH:
        raise ValidationFailed([FieldError("idempotency_key", f"must be at most {KEY_LENGTH} characters")])
    return key


async def recall(conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str) -> Result | None:
    """The result remembered for `key`, or None (always None for an empty key: no idempotency asked)."""
    if not _checked(key):
        return None
    stored = await conn.scalar(
        select(table.c.result).where(table.c.operation == operation, table.c.caller == caller, table.c.key == key)
    )
    return _result(stored)


async def claim(
    conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result, now: datetime
) -> Result | None:
    """Records `key` for what this call is about to create. None when the key is now this call's
    (also for an empty key); otherwise the first use's result, and the caller must not create."""
    if not _checked(key):
        return None
    values = {"operation": operation, "caller": caller, "key": key, "result": result, "created_at": now}
    if await insert_ignore(conn, table, values, keys=["operation", "caller", "key"]):
        return None
    return await recall(conn, table, operation=operation, caller=caller, key=key)


async def settle(conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result) -> None:
    """Replaces the result `claim` recorded, in the claiming transaction, when the call ended in
    something else than it claimed for (nothing for an empty key)."""
    if key:
        c = table.c
        await conn.execute(
            update(table).where(c.operation == operation, c.caller == caller, c.key == key).values(result=result)
        )


async def remember(
    conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result, now: datetime
) -> None:
    """Records `key` with what this call created (nothing for an empty key). Raises IntegrityError
    when a concurrent call with the same key committed first."""
    if key:
        await conn.execute(
            insert(table).values(operation=operation, caller=caller, key=key, result=result, created_at=now)
        )


async def expire_keys(engine: AsyncEngine, table: Table, *, before: datetime, limit: int) -> int:
    """Deletes up to `limit` keys recorded before `before`; returns how many. A repeat of such a
    key afterwards is a new request. Replicas running this at once delete each key once."""
    c = table.c
    expired = select(c.operation, c.caller, c.key).where(c.created_at < before).limit(limit)
    async with transaction(engine) as conn:
        result = await conn.execute(delete(table).where(tuple_(c.operation, c.caller, c.key).in_(expired)))
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class CallerKeys:
    """Keys per calling principal whose result is the id of what the call created (or acted on)."""

    table: Table

    async def claim(self, conn: AsyncConnection, operation: str, key: str, result_id: str, now: datetime) -> str | None:
        """`claim` for the caller, at the start of the transaction, with the id the call will answer
        with: None when the key is now this call's (or empty), else the first call's id, and this
        call must not do the work."""
        earlier = await claim(
            conn, self.table, operation=operation, caller=current_principal().user_id, key=key, result=result_id,
            now=now,
        )  # fmt: skip
        return None if earlier is None else str(earlier)


def _result(stored: Any) -> Result | None:
    if stored is None:
        return None
    if isinstance(stored, dict):
        return dict(stored)
    return str(stored)
