"""The knowledge-base list is paged by keyset cursors like every list (SPEC §3), on SQLite and
PostgreSQL, through the gRPC servicer: without `q` newest update first; a PostgreSQL search most
relevant first (ranks tied: by id), a SQLite one (no ranking) newest update first. Paging through
gives each article once, in the order of one big page; a cursor that is not one, or was made for
the other order, is a 422 on `cursor`."""

import base64
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import pytest
from crm.common.v1 import common_pb2
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm_platform.errors import ValidationFailed
from crm_platform.outbox import UnitOfWork
from crm_platform.testing.database import migrated_engine
from crm_platform.timeutil import utcnow
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context
from service_desk.servicer import ServiceDeskServicer

pytestmark = pytest.mark.integration

# Updated one after the other but the last two, at once. "password" is found three times, twice,
# then once in each of the last three, which tie on relevance.
ARTICLES = (
    ("VPN drops", "Renew the VPN certificate on the gateway."),
    ("Password reset", "Reset the password: password settings, then the password form."),
    ("Password expiry", "A password expires after 90 days; renew the password."),
    ("Locked out", "After five wrong password attempts the account is locked for an hour or two."),
    ("Security settings", "Two-factor login, devices and the password of the account."),
    ("Security settings", "Two-factor login, devices and the password of the account."),
)
BY_UPDATE = ["Security settings", "Security settings", "Locked out", "Password expiry", "Password reset", "VPN drops"]
BY_RELEVANCE = ["Password reset", "Password expiry", "Security settings", "Security settings", "Locked out"]


def stopped_at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def cursor_of(payload: object) -> str:
    """A cursor as this API encodes them (base64url JSON), carrying anything."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.fixture
async def desk(each_database_url: str) -> AsyncIterator[ServiceDeskServicer]:
    async for servicer in _desk_with_articles(each_database_url):
        yield servicer


@pytest.fixture
async def desk_on_postgres(postgres_url: str) -> AsyncIterator[ServiceDeskServicer]:
    async for servicer in _desk_with_articles(postgres_url):
        yield servicer


async def _desk_with_articles(url: str) -> AsyncIterator[ServiceDeskServicer]:
    async with migrated_engine(url, MIGRATIONS) as engine:
        ctx = Context(uow=UnitOfWork(engine, repo.metadata, source="/test"))  # acting as the system
        start = utcnow()
        for minutes, (title, body) in enumerate(ARTICLES):
            ctx.clock = stopped_at(start + timedelta(minutes=min(minutes, len(ARTICLES) - 2)))
            await handlers.create_article(ctx, {"title": title, "body": body, "published": True}, idempotency_key="")
        yield ServiceDeskServicer(ctx)


async def search(
    desk: ServiceDeskServicer, q: str = "", *, limit: int, cursor: str = ""
) -> pb.SearchKbArticlesResponse:
    page = common_pb2.PageRequest(limit=limit, cursor=cursor)
    return await desk.SearchKbArticles(pb.SearchKbArticlesRequest(q=q, page=page), None)


async def every_page(desk: ServiceDeskServicer, q: str = "", *, limit: int) -> list[list[str]]:
    """The ids of each page, following next_cursor to the end."""
    pages, cursor = [], ""
    while True:
        reply = await search(desk, q, limit=limit, cursor=cursor)
        pages.append([article.id for article in reply.items])
        cursor = reply.page_info.next_cursor
        if not cursor:
            return pages


@pytest.mark.parametrize("q", ["", "password"], ids=["listing", "search"])
async def test_paging_through_the_knowledge_base_gives_each_article_once_in_order(
    desk: ServiceDeskServicer, q: str
) -> None:
    whole = [article.id for article in (await search(desk, q, limit=50)).items]
    pages = await every_page(desk, q, limit=2)

    assert len(whole) == (len(ARTICLES) if not q else len(ARTICLES) - 1)
    assert [article_id for page in pages for article_id in page] == whole
    assert all(len(page) == 2 for page in pages[:-1]) and 1 <= len(pages[-1]) <= 2


async def test_the_listing_is_newest_update_first_and_a_search_on_postgres_most_relevant_first(
    desk: ServiceDeskServicer,
) -> None:
    listed = (await search(desk, limit=50)).items
    found = (await search(desk, "password", limit=50)).items

    ranked = desk.ctx.uow.engine.dialect.name == "postgresql"
    assert [a.title for a in listed] == BY_UPDATE
    assert [a.title for a in found] == (BY_RELEVANCE if ranked else BY_UPDATE[:-1])
    # Tied, on the update time or on relevance, articles come by id, highest first.
    tied = [a.id for a in listed[:2]], [a.id for a in (found[2:] if ranked else found[:2])]
    assert all(ids == sorted(ids, reverse=True) for ids in tied)


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        cursor_of(["yesterday", "x"]),
        cursor_of({"sort": "-rank", "value": "1e999999", "id": "x"}),
        cursor_of({"sort": "-updated_at", "value": [1], "id": "x"}),
    ],
    ids=["garbage", "bad-value", "huge-rank", "bad-time"],
)
@pytest.mark.parametrize("q", ["", "password"], ids=["listing", "search"])
async def test_a_cursor_this_list_did_not_issue_is_refused_on_cursor(
    desk: ServiceDeskServicer, q: str, cursor: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await search(desk, q, limit=2, cursor=cursor)

    assert [e.field for e in caught.value.errors] == ["cursor"]


async def test_a_cursor_of_the_listing_is_refused_by_a_ranked_search_on_postgres(
    desk_on_postgres: ServiceDeskServicer,
) -> None:
    """(SQLite does not rank: its search pages in the listing's order.)"""
    cursor = (await search(desk_on_postgres, limit=2)).page_info.next_cursor

    with pytest.raises(ValidationFailed) as caught:
        await search(desk_on_postgres, "password", limit=2, cursor=cursor)

    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("cursor", "belongs to a list sorted by -updated_at; start again without a cursor")
    ]


async def test_callers_from_before_paging_still_set_the_page_size_by_limit(desk: ServiceDeskServicer) -> None:
    reply = await desk.SearchKbArticles(pb.SearchKbArticlesRequest(limit=3), None)

    assert len(reply.items) == 3 and reply.page_info.next_cursor


async def test_the_listing_pages_along_an_index_on_postgres(desk_on_postgres: ServiceDeskServicer) -> None:
    engine = desk_on_postgres.ctx.uow.engine
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SET enable_seqscan = off")  # 6 rows: make the planner show the index
        plan = "\n".join(
            row[0]
            for row in await conn.exec_driver_sql(
                "EXPLAIN SELECT id FROM kb_articles ORDER BY updated_at DESC, id DESC LIMIT 3"
            )
        )

    assert "ix_kb_articles_updated" in plan
