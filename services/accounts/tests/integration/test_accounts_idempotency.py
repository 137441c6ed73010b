"""Idempotency keys under concurrency (PostgreSQL): a request sent twice at once with one
Idempotency-Key, as a client retrying before the first answer, creates once, and both answers
carry the first result."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from accounts import handlers
from accounts import repository as repo
from accounts.__main__ import MIGRATIONS
from accounts.domain import PoolPolicy
from accounts.handlers import Context
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from sqlalchemy import Table, func, select

pytestmark = pytest.mark.integration

REP = Principal(user_id="rep-1", roles=("sales_rep",), team="east", region="cn-east")
REP_SCOPE = RecordScope(ScopeKind.OWN, owner_id="rep-1")


@pytest.fixture
async def ctx(postgres_url: str) -> AsyncIterator[Context]:
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, postgres_url)
    engine = create_engine(postgres_url)
    yield Context(uow=UnitOfWork(engine, repo.metadata, source="/test"), policy=PoolPolicy())
    await engine.dispose()


async def _twice(request: Callable[[], Awaitable[Any]]) -> list[Any]:
    """The same request sent twice at once."""
    return list(await asyncio.gather(request(), request()))


async def _rows(ctx: Context, table: Table) -> int:
    async with ctx.uow.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def test_concurrent_requests_with_one_key_create_once_and_answer_alike(ctx: Context) -> None:
    with acting_as(REP, REP_SCOPE):
        accounts = await _twice(
            lambda: handlers.create_account(ctx, {"name": "Acme Ltd"}, idempotency_key="acc", in_pool=False)
        )
        account_id = accounts[0].id
        contacts = await _twice(
            lambda: handlers.create_contact(ctx, {"account_id": account_id, "name": "Li"}, idempotency_key="con")
        )
        activities = await _twice(
            lambda: handlers.log_activity(
                ctx, account_id=account_id, contact_id="", kind="call", subject="Intro", notes="", occurred_at=None,
                idempotency_key="act",
            )
        )  # fmt: skip
        tasks = await _twice(
            lambda: handlers.create_task(ctx, {"account_id": account_id, "title": "Call back"}, idempotency_key="tsk")
        )

    for answers, table in [
        (accounts, repo.accounts),
        (contacts, repo.contacts),
        (activities, repo.activities),
        (tasks, repo.tasks),
    ]:
        assert answers[0].id == answers[1].id, table.name
        assert await _rows(ctx, table) == 1, table.name
