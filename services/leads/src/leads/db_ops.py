"""Dialect-specific statements (PostgreSQL in production, SQLite as the embedded default)."""

import json
from typing import Any

from sqlalchemy import JSON, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


async def upsert(conn: AsyncConnection, table: Table, values: dict[str, Any], *, keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE with the given values."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(values)
    changes = {name: statement.excluded[name] for name in values if name not in keys}
    await conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=changes))


async def bulk_insert(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Many rows in one round trip: COPY on PostgreSQL (in the open transaction), executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        await conn.execute(table.insert(), rows)
        return
    columns = list(rows[0])
    json_columns = {name for name in columns if isinstance(table.c[name].type, JSON)}
    records = [tuple(json.dumps(row[name]) if name in json_columns else row[name] for name in columns) for row in rows]
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    if not driver.is_in_transaction():
        await conn.execute(select(1))  # SQLAlchemy opens its transaction lazily, on the first statement
    await driver.copy_records_to_table(table.name, records=records, columns=columns)
