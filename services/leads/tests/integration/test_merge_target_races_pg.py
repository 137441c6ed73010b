"""A capture with `on_duplicate=merge` (REST create, web form, import) finds its duplicate without
locking it, then waits for the lead's row. Whatever happened to the lead meanwhile (disqualified,
converted, its email changed), the capture merges only into a lead that is still open and still
holds the email or phone it was found by, or else captures a lead of its own: a submission is
never lost in a closed lead nor lands on another person. An update of a lead's email or phone
locks the keys it takes away too, so a create probing the old key waits for it."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from leads import repository as repo
from leads.domain import OPEN_STATUSES
from leads.handlers import ImportOptions, ImportSpec
from leads.importing import RowMapper
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

pytestmark = pytest.mark.integration

_WAITING_ON_LOCKS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def _until_waiting(env: Any, waiters: int = 1) -> None:
    """Until `waiters` sessions of the test's database wait for a lock (a row's, or a key's)."""
    for _ in range(1000):
        async with env.engine.connect() as conn:
            if await conn.scalar(_WAITING_ON_LOCKS) >= waiters:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{waiters} session(s) never waited for a lock")


@asynccontextmanager
async def _row_held(env: Any, lead_id: str) -> AsyncIterator[AsyncConnection]:
    """A transaction of another writer holding the lead's row (as a disqualify or a conversion
    holds it, taking no dedupe key locks), committed at the end of the block."""
    async with env.engine.begin() as conn:
        await conn.execute(select(repo.leads.c.id).where(repo.leads.c.id == lead_id).with_for_update())
        yield conn


async def _disqualify_in(conn: AsyncConnection, lead_id: str) -> None:
    """What `disqualify` writes, in the transaction holding the row."""
    c = repo.leads.c
    await conn.execute(
        update(repo.leads)
        .where(c.id == lead_id)
        .values(status="unqualified", disqualified_reason="spam", in_pool=False, version=c.version + 1)
    )


async def _change_email_in(conn: AsyncConnection, lead_id: str, email: str) -> None:
    c = repo.leads.c
    await conn.execute(
        update(repo.leads).where(c.id == lead_id).values(email=email, email_norm=email, version=c.version + 1)
    )


async def _lead(env: Any, lead_id: str) -> Any:
    async with env.engine.connect() as conn:
        return (await conn.execute(select(repo.leads).where(repo.leads.c.id == lead_id))).mappings().one()


async def _open_leads_with_email(env: Any, email: str) -> int:
    c = repo.leads.c
    async with env.engine.connect() as conn:
        query = select(func.count()).where(c.email_norm == email, c.status.in_(OPEN_STATUSES))
        return int(await conn.scalar(query) or 0)


async def _captured_while(
    env: Any,
    lead_id: str,
    capture: Callable[[], Awaitable[Any]],
    meanwhile: Callable[[AsyncConnection], Awaitable[None]],
) -> Any:
    """Starts `capture` while another transaction holds the lead's row, lets the capture wait for
    the row, writes `meanwhile` in that transaction and commits it: the capture's result."""
    async with _row_held(env, lead_id) as held:
        task = asyncio.create_task(capture())
        await _until_waiting(env)
        assert not task.done()
        await meanwhile(held)
    return await asyncio.wait_for(task, 30)


async def test_a_submission_for_a_lead_disqualified_meanwhile_captures_a_new_open_lead(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})
        form = await env.service.create_webform({"name": "Expo signup"}, "")

    async def submitted() -> Any:
        with env.acting():
            return await env.service.submit_webform(form["form_key"], {"name": "Li Lei", "email": "li@x.cn"}, "")

    captured, merged = await _captured_while(env, lead["id"], submitted, lambda held: _disqualify_in(held, lead["id"]))
    assert not merged and captured["id"] != lead["id"]
    assert captured["status"] == "new" and captured["email_norm"] == "li@x.cn" and captured["name"] == "Li Lei"
    closed = await _lead(env, lead["id"])
    assert closed["status"] == "unqualified" and closed["name"] == "Li" and closed["version"] == lead["version"] + 1
    assert await _open_leads_with_email(env, "li@x.cn") == 1


async def test_a_create_merges_into_the_other_open_duplicate_when_the_first_is_disqualified_meanwhile(
    env: Any,
) -> None:
    with env.acting():
        by_email, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})
        by_phone, _ = await env.service.create_lead({"name": "Li P", "phone": "13800138000", "owner_id": "rep1"})

    async def created() -> Any:
        with env.acting():
            return await env.service.create_lead(
                {"name": "Li", "email": "li@x.cn", "phone": "13800138000", "company": "Li Co"}, on_duplicate="merge"
            )

    # The probe finds the older lead (by its email) first.
    captured, merged = await _captured_while(
        env, by_email["id"], created, lambda held: _disqualify_in(held, by_email["id"])
    )
    assert merged and captured["id"] == by_phone["id"]
    assert captured["company"] == "Li Co" and captured["email_norm"] == "li@x.cn"  # the key nobody open holds now
    assert (await _lead(env, by_email["id"]))["company"] == ""


async def test_a_create_does_not_merge_into_a_lead_whose_email_changed_meanwhile(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})

    async def created() -> Any:
        with env.acting():
            return await env.service.create_lead(
                {"name": "Li Lei", "email": "li@x.cn", "company": "Li Co"}, on_duplicate="merge"
            )

    captured, merged = await _captured_while(
        env, lead["id"], created, lambda held: _change_email_in(held, lead["id"], "wang@x.cn")
    )
    assert not merged and captured["id"] != lead["id"] and captured["email_norm"] == "li@x.cn"
    other = await _lead(env, lead["id"])
    assert other["email_norm"] == "wang@x.cn" and other["company"] == ""  # the other person's lead is untouched


async def test_an_import_row_for_a_lead_disqualified_meanwhile_is_imported_as_a_new_lead(env: Any) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})

    async def imported() -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps([{"name": "Li Lei", "email": "li@x.cn", "company": "Li Co"}]).encode()

        options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}), on_duplicate="merge")
        with env.acting():
            return await env.service.import_part(
                ImportSpec(import_id="imp-race", format="json", options=options), chunks()
            )

    result = await _captured_while(env, lead["id"], imported, lambda held: _disqualify_in(held, lead["id"]))
    [outcome] = result.outcomes
    assert outcome.status == "accepted" and outcome.lead_id != lead["id"]
    assert result.lead_import["accepted"] == 1 and result.lead_import["merged"] == 0
    assert (await _lead(env, outcome.lead_id))["status"] == "new"
    assert (await _lead(env, lead["id"]))["company"] == ""
    assert await _open_leads_with_email(env, "li@x.cn") == 1


async def test_an_import_row_merges_into_the_other_open_duplicate_when_the_first_is_disqualified_meanwhile(
    env: Any,
) -> None:
    with env.acting():
        by_email, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})
        by_phone, _ = await env.service.create_lead({"name": "Li P", "phone": "13800138000", "owner_id": "rep1"})
    rows = [{"name": "Li", "email": "li@x.cn", "phone": "13800138000", "company": "Li Co"}]

    async def imported() -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps(rows).encode()

        options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}), on_duplicate="merge")
        with env.acting():
            return await env.service.import_part(
                ImportSpec(import_id="imp-race", format="json", options=options), chunks()
            )

    result = await _captured_while(env, by_email["id"], imported, lambda held: _disqualify_in(held, by_email["id"]))
    assert [(o.status, o.lead_id) for o in result.outcomes] == [("merged", by_phone["id"])]
    merged = await _lead(env, by_phone["id"])
    assert merged["company"] == "Li Co" and merged["email_norm"] == "li@x.cn"
    assert (await _lead(env, by_email["id"]))["company"] == ""


async def test_an_email_change_holds_the_old_email_so_a_create_of_it_waits_and_then_captures_its_own_lead(
    env: Any,
) -> None:
    with env.acting():
        lead, _ = await env.service.create_lead({"name": "Li", "email": "li@x.cn", "owner_id": "rep1"})

    async def updated() -> Any:
        with env.acting():
            return await env.service.update_lead(lead["id"], {"email": "wang@x.cn"}, ["email"], lead["version"])

    async def created() -> Any:
        with env.acting():
            return await env.service.create_lead(
                {"name": "Li Lei", "email": "li@x.cn", "company": "Li Co"}, on_duplicate="merge"
            )

    async with _row_held(env, lead["id"]) as held:  # the update waits here, holding its keys
        update_task = asyncio.create_task(updated())
        await _until_waiting(env)
        async with env.engine.begin() as probe:
            old_key_free = await probe.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext('li@x.cn'))"))
        create_task = asyncio.create_task(created())
        await _until_waiting(env, 2)  # the create waits for the old email's lock (for the row, without it)
        await held.execute(text("SELECT 1"))
    await asyncio.wait_for(update_task, 30)
    assert not old_key_free
    captured, merged = await asyncio.wait_for(create_task, 30)
    assert not merged and captured["id"] != lead["id"] and captured["email_norm"] == "li@x.cn"
    changed = await _lead(env, lead["id"])
    assert changed["email_norm"] == "wang@x.cn" and changed["company"] == "" and changed["name"] == "Li"
