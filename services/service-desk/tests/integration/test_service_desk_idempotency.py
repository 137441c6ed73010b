"""Idempotency keys under concurrency, on both databases: a request sent twice at once with one
Idempotency-Key, as a client retrying before the first answer, creates once, and both answers
carry the first result."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.testing.database import migrated_engine
from crm_platform.testing.races import count_rows, twice
from service_desk import handlers
from service_desk import repository as repo
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context

pytestmark = pytest.mark.integration

ADMIN = Principal(user_id="admin", roles=("admin",))


@pytest.fixture
async def ctx(each_database_url: str) -> AsyncIterator[Context]:
    async with migrated_engine(each_database_url, MIGRATIONS) as engine:
        yield Context(uow=UnitOfWork(engine, repo.metadata, source="/test"))


def _id(answer: Any) -> str:
    """A handler answers with the dict it stored, or with the stored row when it replays a key."""
    return str(answer["id"] if isinstance(answer, dict) else answer.id)


async def test_concurrent_requests_with_one_key_create_once_and_answer_alike(ctx: Context) -> None:
    with acting_as(ADMIN, ALL_RECORDS):
        created = await twice(
            lambda: handlers.create_ticket(ctx, {"subject": "Printer jams", "channel": "web"}, idempotency_key="tkt")
        )
        tickets = [ticket for ticket, _suggestions in created]
        ticket_id = _id(tickets[0])
        comments = await twice(
            lambda: handlers.add_comment(ctx, ticket_id, "Looking into it", public=True, idempotency_key="cmt")
        )
        work = await twice(lambda: handlers.log_work(ctx, ticket_id, 15, "cleaned the rollers", idempotency_key="wrk"))
        agents = await twice(lambda: handlers.create_agent(ctx, {"id": "ag-1", "name": "Ann"}, idempotency_key="agt"))

    for answers, table in [
        (tickets, repo.tickets),
        (comments, repo.ticket_comments),
        (work, repo.work_log),
        ([agent for agent, _load in agents], repo.agents),
    ]:
        assert _id(answers[0]) == _id(answers[1]), table.name
        assert await count_rows(ctx.uow.engine, table) == 1, table.name
