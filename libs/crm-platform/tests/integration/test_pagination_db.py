"""Keyset paging on real databases (SQLite and PostgreSQL): the cursors of `next_cursor` walk every
sort of a list, both ways, through every row once; a cursor the list cannot use is refused as
INVALID_ARGUMENT before the database sees it, not failed by the database as INTERNAL."""

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import grpc
import pytest
from crm_platform.db import UtcDateTime, create_engine
from crm_platform.errors import ValidationFailed
from crm_platform.grpc_errors import to_status
from crm_platform.pagination import keyset_page, next_cursor, parse_sort
from sqlalchemy import Column, Date, Integer, MetaData, Numeric, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = MetaData()
deals = Table(
    "deals",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("score", Integer, nullable=False),
    Column("name", String(200), nullable=False),
    Column("close_date", Date),
    Column("amount", Numeric(20, 4), nullable=False),
)
SORTS = {name: deals.c[name] for name in ("created_at", "score", "name", "close_date", "amount")}


def at(hour: int) -> datetime:
    return datetime(2026, 11, 23, hour, tzinfo=UTC)


# Ties in every column, so the id decides between rows; two deals have no close date.
ROWS: list[dict[str, Any]] = [
    {"id": "d-1", "created_at": at(8), "score": 50, "name": "Alpha", "close_date": date(2026, 12, 1),
     "amount": Decimal("100.0000")},
    {"id": "d-2", "created_at": at(9), "score": 50, "name": "Bravo", "close_date": None,
     "amount": Decimal("250.5000")},
    {"id": "d-3", "created_at": at(9), "score": 10, "name": "Bravo", "close_date": date(2026, 11, 1),
     "amount": Decimal("100.0000")},
    {"id": "d-4", "created_at": at(10), "score": 90, "name": "Delta", "close_date": None,
     "amount": Decimal("5.2500")},
    {"id": "d-5", "created_at": at(7), "score": 10, "name": "Echo", "close_date": date(2026, 12, 1),
     "amount": Decimal("99999.9999")},
]  # fmt: skip


@pytest.fixture
async def engine(each_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(each_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(insert(deals), ROWS)
    yield engine
    await engine.dispose()


async def list_deals(engine: AsyncEngine, *, sort: str, cursor: str = "", limit: int = 2) -> tuple[list[str], str]:
    """A list call as the services write one: ids of the page, and the cursor of the next."""
    column, descending = parse_sort(sort, SORTS, default="-created_at")
    query = keyset_page(
        select(deals), sort_column=column, id_column=deals.c.id, descending=descending, cursor=cursor, limit=limit
    )
    async with engine.connect() as conn:
        rows = list(await conn.execute(query))
    return [str(row.id) for row in rows[:limit]], next_cursor(
        rows, sort_key=column.name, descending=descending, limit=limit
    )


def expected_order(sort: str) -> list[str]:
    """Ascending with NULLs last; descending is the exact reverse."""
    name = sort.lstrip("-")
    ordered = sorted(ROWS, key=lambda row: (row[name] is None, row[name] or 0, row["id"]))
    ids = [row["id"] for row in ordered]
    return ids[::-1] if sort.startswith("-") else ids


def raw(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.mark.parametrize("sort", [f"{way}{name}" for name in SORTS for way in ("", "-")])
async def test_the_cursors_walk_every_row_once_in_the_order_of_the_sort(engine: AsyncEngine, sort: str) -> None:
    seen, cursor = await list_deals(engine, sort=sort)
    while cursor:
        page, cursor = await list_deals(engine, sort=sort, cursor=cursor)
        seen += page
    assert seen == expected_order(sort)


@pytest.mark.parametrize(
    ("sort", "cursor"),
    [
        ("-created_at", raw([1])),
        ("-created_at", raw(["a", "b", "c"])),
        ("name", raw([1, "x"])),  # a number where the column holds text
        ("score", raw(["abc", "x"])),  # text where it holds integers
        ("score", raw([2**40, "x"])),  # an integer PostgreSQL's integer cannot hold
        ("name", raw(["nul\x00", "x"])),  # text PostgreSQL cannot hold
        ("amount", raw(["1e30", "x"])),  # more digits than numeric(20, 4)
        ("-created_at", raw({"sort": "score", "value": 87, "id": "x"})),  # kept from ?sort=score
    ],
    ids=["one value", "three values", "number for text", "text for integer", "integer too big", "NUL in text",
         "decimal too big", "other sort"],
)  # fmt: skip
async def test_a_cursor_the_list_cannot_use_is_invalid_argument(engine: AsyncEngine, sort: str, cursor: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await list_deals(engine, sort=sort, cursor=cursor)
    assert [error.field for error in caught.value.errors] == ["cursor"]
    assert to_status(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cursor_kept_from_another_sort_says_which(engine: AsyncEngine) -> None:
    _, cursor = await list_deals(engine, sort="score")
    with pytest.raises(ValidationFailed) as caught:
        await list_deals(engine, sort="-created_at", cursor=cursor)
    assert caught.value.errors[0].message == "belongs to a list sorted by score; start again without a cursor"
