"""Query plans as PostgreSQL runs a service's prepared statements, for tests of index use."""

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement

from crm_platform.db import DriverStatement, driver_connection


async def generic_plan(conn: AsyncConnection, statement: ClauseElement) -> str:
    """EXPLAIN of `statement` (its bound values as given) under the generic plan PostgreSQL keeps for
    a prepared statement from its sixth run on, when that looks no dearer than planning each run. A
    partial index serves such a plan only where the query proves the index's predicate without
    knowing the parameters."""
    prepared = DriverStatement(statement)
    driver = await driver_connection(conn)
    await driver.execute(f"PREPARE plan_under_test AS {prepared.sql}")
    try:
        await driver.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        values = ", ".join(sql_literal(arg) for arg in prepared.args({}))
        return "\n".join(row[0] for row in await driver.fetch(f"EXPLAIN EXECUTE plan_under_test({values})"))
    finally:
        await driver.execute("DEALLOCATE plan_under_test")


def sql_literal(value: Any) -> str:
    """A statement argument as SQL text, for `EXECUTE` (which takes no bound parameters)."""
    if isinstance(value, list):
        return "'{" + ",".join(map(str, value)) + "}'"  # an array of numbers
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)
