"""Idempotency keys under concurrency (PostgreSQL): a request sent twice at once with one
Idempotency-Key, as a client retrying before the first answer, creates once, and both answers
carry the first result."""

import pytest
from accounts import handlers
from accounts import repository as repo
from accounts.handlers import Context
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.races import count_rows, twice

pytestmark = pytest.mark.integration

REP = Principal(user_id="rep-1", roles=("sales_rep",), team="east", region="cn-east")
REP_SCOPE = RecordScope(ScopeKind.OWN, owner_id="rep-1")


async def test_concurrent_requests_with_one_key_create_once_and_answer_alike(pg_ctx: Context) -> None:
    with acting_as(REP, REP_SCOPE):
        accounts = await twice(
            lambda: handlers.create_account(pg_ctx, {"name": "Acme Ltd"}, idempotency_key="acc", in_pool=False)
        )
        account_id = accounts[0].id
        contacts = await twice(
            lambda: handlers.create_contact(pg_ctx, {"account_id": account_id, "name": "Li"}, idempotency_key="con")
        )
        activities = await twice(
            lambda: handlers.log_activity(
                pg_ctx, account_id=account_id, contact_id="", kind="call", subject="Intro", notes="", occurred_at=None,
                idempotency_key="act",
            )
        )  # fmt: skip
        tasks = await twice(
            lambda: handlers.create_task(
                pg_ctx, {"account_id": account_id, "title": "Call back"}, idempotency_key="tsk"
            )
        )

    for answers, table in [
        (accounts, repo.accounts),
        (contacts, repo.contacts),
        (activities, repo.activities),
        (tasks, repo.tasks),
    ]:
        assert answers[0].id == answers[1].id, table.name
        assert await count_rows(pg_ctx.uow.engine, table) == 1, table.name
