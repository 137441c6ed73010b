"""A write answers with the record as it was before it (`previous`), read under the record's row lock
in the write's transaction: the gateway audits exactly what this write changed, even when other
writes to the same record run at the same time (PostgreSQL, which has the row locks). A write that
changes nothing answers the record as before and after; a repeat of an Idempotency-Key changed
nothing and has none. A delete answers the record it deleted, a merge both accounts as they were."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from accounts import handlers
from accounts.handlers import Change, Context
from crm_platform.errors import NotFound
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.changes import assert_one_after_another

pytestmark = pytest.mark.integration

Caller = tuple[Principal, RecordScope]


def rep(user_id: str) -> Caller:
    principal = Principal(user_id=user_id, roles=("sales_rep",), team="east", region="cn-east")
    return principal, RecordScope(ScopeKind.OWN, owner_id=user_id)


REP1, REP2 = rep("rep-1"), rep("rep-2")
MANAGER = (
    Principal(user_id="mgr", roles=("sales_manager",), team="east", region="cn-east"),
    RecordScope(ScopeKind.TEAM, team="east"),
)


async def new_account(ctx: Context, name: str, who: Caller = REP1, *, in_pool: bool = False, **values: Any) -> Any:
    with acting_as(*who):
        return await handlers.create_account(ctx, {"name": name, **values}, idempotency_key="", in_pool=in_pool)


async def new_contact(ctx: Context, account_id: str, name: str) -> Any:
    with acting_as(*REP1):
        return await handlers.create_contact(ctx, {"account_id": account_id, "name": name}, idempotency_key="")


async def concurrently(writes: int, write: Callable[[int], Awaitable[Change]]) -> list[Change]:
    """`writes` writes to one record at once (each on its own connection)."""
    with acting_as(*REP1):
        return await asyncio.gather(*(write(n) for n in range(writes)))


async def test_concurrent_account_updates_each_answer_the_version_they_changed(pg_ctx: Context) -> None:
    account = await new_account(pg_ctx, "Acme", industry="retail")

    updates = await concurrently(
        8, lambda n: handlers.update_account(pg_ctx, account.id, {"industry": f"I{n}"}, expected_version=0)
    )

    assert_one_after_another(updates, "industry", first="retail", version=account.version)


async def test_concurrent_contact_and_segment_updates_each_answer_the_version_they_changed(pg_ctx: Context) -> None:
    account = await new_account(pg_ctx, "Acme")
    contact = await new_contact(pg_ctx, account.id, "Li Lei")
    with acting_as(*REP1):
        segment = await handlers.create_segment(
            pg_ctx, name="Mine", visibility="user", filters={}, tags=[], idempotency_key=""
        )

    contacts = await concurrently(
        8, lambda n: handlers.update_contact(pg_ctx, contact.id, {"title": f"T{n}"}, expected_version=0)
    )
    segments = await concurrently(
        8, lambda n: handlers.update_segment(pg_ctx, segment.id, {"name": f"S{n}"}, expected_version=0)
    )

    assert_one_after_another(contacts, "title", first="", version=contact.version)
    assert_one_after_another(segments, "name", first="Mine", version=segment.version)


async def test_concurrent_task_updates_each_answer_the_version_they_changed(pg_ctx: Context) -> None:
    account = await new_account(pg_ctx, "Acme")
    with acting_as(*REP1):
        task = await handlers.create_task(pg_ctx, {"account_id": account.id, "title": "call"}, idempotency_key="")

    tasks = await concurrently(
        8, lambda n: handlers.update_task(pg_ctx, task.id, {"title": f"call {n}"}, expected_version=0)
    )

    assert_one_after_another(tasks, "title", first="call", version=task.version)
    with acting_as(*REP1):
        done = await handlers.complete_task(pg_ctx, task.id, expected_version=0)
    assert (done.previous.status, done.record.status) == ("open", "done")


async def test_an_update_that_changes_nothing_answers_the_record_as_before_and_after(ctx: Context) -> None:
    account = await new_account(ctx, "Acme", industry="retail")
    contact = await new_contact(ctx, account.id, "Li Lei")

    with acting_as(*REP1):
        same_account = await handlers.update_account(ctx, account.id, {"industry": "retail"}, expected_version=0)
        same_contact = await handlers.update_contact(ctx, contact.id, {"name": "Li Lei"}, expected_version=0)

    assert same_account.previous == same_account.record == account
    assert same_contact.previous == same_contact.record == contact


async def test_ownership_moves_answer_the_account_as_it_was(ctx: Context) -> None:
    account = await new_account(ctx, "Acme")

    with acting_as(*REP1):
        released = await handlers.release_account(ctx, account.id, reason="no fit", expected_version=0)
    with acting_as(*REP2):
        claimed = await handlers.claim_account(ctx, account.id, idempotency_key="")
    with acting_as(*MANAGER):
        transferred = await handlers.transfer_account(
            ctx, account.id, new_owner_id="rep-1", new_team="", reason="back", expected_version=0
        )

    assert (released.previous.owner_id, released.previous.in_pool, released.record.in_pool) == ("rep-1", False, True)
    assert claimed.previous == released.record and claimed.record.owner_id == "rep-2"
    assert transferred.previous == claimed.record and transferred.record.owner_id == "rep-1"


async def test_a_repeat_of_an_idempotency_key_changed_nothing_and_has_no_previous(ctx: Context) -> None:
    pooled = await new_account(ctx, "Pooled", MANAGER, in_pool=True)
    survivor = await new_account(ctx, "Acme")
    duplicate = await new_account(ctx, "Acme Trading")

    with acting_as(*REP1):
        claimed = await handlers.claim_account(ctx, pooled.id, idempotency_key="claim-1")
        claimed_again = await handlers.claim_account(ctx, pooled.id, idempotency_key="claim-1")
        merged = await handlers.merge_accounts(ctx, survivor.id, duplicate.id, idempotency_key="merge-1")
        merged_again = await handlers.merge_accounts(ctx, survivor.id, duplicate.id, idempotency_key="merge-1")

    assert claimed.previous == pooled
    assert (claimed_again.previous, claimed_again.record.version) == (None, claimed.record.version)
    assert (merged.previous_survivor, merged.previous_duplicate) == (survivor, duplicate)
    assert (merged_again.previous_survivor, merged_again.previous_duplicate) == (None, None)
    assert merged_again.survivor.version == merged.survivor.version


async def test_deletes_answer_the_record_they_deleted(ctx: Context) -> None:
    account = await new_account(ctx, "Acme")
    doomed = await new_account(ctx, "Doomed", industry="retail")
    contact = await new_contact(ctx, account.id, "Li Lei")
    with acting_as(*REP1):
        contact = (await handlers.update_contact(ctx, contact.id, {"title": "CTO"}, expected_version=0)).record

        deleted_contact = await handlers.delete_contact(ctx, contact.id, expected_version=0)
        deleted_account = await handlers.delete_account(ctx, doomed.id, expected_version=0)

    assert deleted_contact == contact and deleted_contact.version == 2
    assert deleted_account == doomed and deleted_account.industry == "retail"


async def test_a_merge_answers_both_accounts_as_they_were(ctx: Context) -> None:
    survivor = await new_account(ctx, "Acme", tags=["vip"])
    duplicate = await new_account(ctx, "Acme Trading", industry="retail", tags=["key"])

    with acting_as(*REP1):
        merged = await handlers.merge_accounts(ctx, survivor.id, duplicate.id, idempotency_key="")

    assert merged.previous_survivor == survivor and merged.previous_duplicate == duplicate
    assert (merged.previous_survivor.industry, merged.survivor.industry) == ("", "retail")
    assert (merged.previous_survivor.tags, merged.survivor.tags) == (["vip"], ["vip", "key"])
    assert merged.previous_duplicate.merged_into_id == ""  # the duplicate before it became a tombstone
    assert merged.survivor.version == survivor.version + 1


async def test_a_claim_of_an_account_the_caller_may_not_read_is_not_found(ctx: Context) -> None:
    """Not in the pool and out of the caller's scope, the account is not there, as GetAccount answers
    (the gateway read it before the claim until the claim answered `previous`)."""
    others = await new_account(ctx, "Rep Two's", REP2)

    with acting_as(*REP1), pytest.raises(NotFound):
        await handlers.claim_account(ctx, others.id, idempotency_key="")
