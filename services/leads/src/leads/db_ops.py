"""Dialect-specific statements (PostgreSQL in production, SQLite as the embedded default)."""

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from crm_platform.db import driver_connection, json_text
from sqlalchemy import JSON, Table
from sqlalchemy.ext.asyncio import AsyncConnection


async def bulk_insert(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Many rows in one round trip: COPY on PostgreSQL (in the open transaction), executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        await conn.execute(table.insert(), rows)
        return
    columns = list(rows[0])
    records = _records(rows, columns, [i for i, name in enumerate(columns) if isinstance(table.c[name].type, JSON)])
    driver = await driver_connection(conn)
    await driver.copy_records_to_table(table.name, records=records, columns=columns)


def _records(rows: list[dict[str, Any]], columns: list[str], json_positions: list[int]) -> list[Sequence[Any]]:
    """The rows as COPY records, JSON columns as text: one itemgetter call per row (C)."""
    pick: Callable[[dict[str, Any]], Sequence[Any]] = (
        itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    )
    if not json_positions:
        return [pick(row) for row in rows]
    records: list[Sequence[Any]] = []
    for row in rows:
        record = list(pick(row))
        for i in json_positions:
            record[i] = json_text(record[i])
        records.append(record)
    return records
