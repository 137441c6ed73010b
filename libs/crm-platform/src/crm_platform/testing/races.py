"""Helpers for tests of what happens when requests race each other."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine


async def twice(request: Callable[[], Awaitable[Any]]) -> list[Any]:
    """The same request sent twice at once; both answers."""
    return list(await asyncio.gather(request(), request()))


async def count_rows(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)
