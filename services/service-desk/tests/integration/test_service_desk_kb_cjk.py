"""The knowledge base in Chinese, on PostgreSQL and SQLite alike: a search finds a part of a phrase
(Chinese puts no spaces between words), and a new ticket is offered the articles sharing most of
its character pairs, those sharing them in the title first; published articles only."""

from typing import Any

import pytest
from service_desk import handlers
from service_desk.handlers import Context

pytestmark = pytest.mark.integration

PRINTER = "打印机无法启动怎么办"
ROUTER = "路由器指示灯不亮"
PHONE = "手机不能充电"


async def _articles(ctx: Context, *articles: tuple[str, str, bool]) -> None:
    for title, body, published in articles:
        values = {"title": title, "body": body, "published": published}
        await handlers.create_article(ctx, values, idempotency_key="")


async def _search(ctx: Context, q: str, *, limit: int = 10, cursor: str = "") -> tuple[list[Any], str]:
    return await handlers.search_articles(ctx, q, category="", limit=limit, include_unpublished=False, cursor=cursor)


async def test_a_search_finds_a_chinese_phrase_by_a_part_of_it_title_matches_first(ctx: Context) -> None:
    # The one matching in its body only is the newer: relevance, not the update, puts it second.
    await _articles(
        ctx,
        (PRINTER, "先检查电源线。再按住电源键十秒。", True),
        ("如何重置密码", "在登录页点击忘记密码。", True),
        (ROUTER, "如果路由器无法启动就检查电源适配器。", True),
    )

    found, cursor = await _search(ctx, "无法启动")

    assert [a.title for a in found] == [PRINTER, ROUTER] and cursor == ""
    first, cursor = await _search(ctx, "无法启动", limit=1)
    second, last = await _search(ctx, "无法启动", limit=1, cursor=cursor)
    assert [a.title for a in first + second] == [PRINTER, ROUTER] and last == ""
    assert [a.title for a in (await _search(ctx, "密码"))[0]] == ["如何重置密码"]


async def test_a_chinese_ticket_is_offered_the_article_sharing_most_of_its_words(ctx: Context) -> None:
    await _articles(
        ctx,
        (PRINTER, "先检查电源线。再按住电源键十秒。", True),
        ("打印机不能启动", "草稿。尚未发布。", False),
        ("如何重置密码", "在登录页点击忘记密码。", True),
        (PHONE, "换一根充电线再试。", True),  # shares 机不, 不能 only: the newer, but second
    )

    ticket, suggested = await handlers.create_ticket(ctx, {"subject": "打印机不能启动"}, idempotency_key="")

    assert [a.title for a in suggested] == [PRINTER, PHONE]
    assert [a.title for a in await handlers.suggest_articles(ctx, ticket["id"], 1)] == [PRINTER]
