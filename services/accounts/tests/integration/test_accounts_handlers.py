"""Rules of the accounts handlers on each database (SQLite and PostgreSQL): saved segments, what an
account's deletion takes with it, contacts moving between accounts, parents outside the caller's
scope, activities logged on accounts the caller may read and their correction and deletion; a
contact write racing a deletion on PostgreSQL alone (SQLite has a single writer). Events are read
from the outbox."""

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from accounts import handlers
from accounts import repository as repo
from accounts.domain import PoolPolicy
from accounts.handlers import Context
from accounts.messages import account_to_proto
from accounts.repository import AccountFilter, ContactFilter, parse_page
from crm.accounts.v1 import events_pb2
from crm.common.v1 import common_pb2
from crm_platform.cloudevents import spec_of
from crm_platform.errors import Conflict, NotFound, StaleVersion, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.outbox import outbox_table
from crm_platform.principal import Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from sqlalchemy import select, update

pytestmark = pytest.mark.integration

PAGE = parse_page(50, "", "")
Caller = tuple[Principal, RecordScope]
M = TypeVar("M", bound=Message)


def rep(user_id: str) -> Caller:
    return Principal(user_id=user_id, roles=("sales_rep",), team="east", region="cn-east"), RecordScope(
        ScopeKind.OWN, owner_id=user_id
    )


REP1, REP2 = rep("rep-1"), rep("rep-2")
MANAGER = (
    Principal(user_id="mgr", roles=("sales_manager",), team="east", region="cn-east"),
    RecordScope(ScopeKind.TEAM, team="east"),
)
AGENT = Principal(user_id="agent-1", roles=("service_agent",), team="support", region="cn-east")
# The default policy: a service agent reads the accounts of their region, and their own activities.
AGENT_READING_ACCOUNTS = (AGENT, RecordScope(ScopeKind.REGION, owner_id="agent-1", region="cn-east"))
AGENT_READING_ACTIVITIES = (AGENT, RecordScope(ScopeKind.OWN, owner_id="agent-1", region="cn-east"))


async def new_account(ctx: Context, who: Caller, name: str, **values: Any) -> Any:
    with acting_as(*who):
        return await handlers.create_account(ctx, {"name": name, **values}, idempotency_key="", in_pool=False)


async def new_contact(ctx: Context, who: Caller, account_id: str, name: str) -> Any:
    with acting_as(*who):
        return await handlers.create_contact(ctx, {"account_id": account_id, "name": name}, idempotency_key="")


async def new_task(ctx: Context, who: Caller, account_id: str, title: str) -> Any:
    with acting_as(*who):
        return await handlers.create_task(ctx, {"account_id": account_id, "title": title}, idempotency_key="")


async def keyed_events(ctx: Context, message_type: type[M]) -> list[tuple[str, M]]:
    """The events of one type written to the outbox with their keys, oldest first."""
    outbox = outbox_table(repo.metadata)
    query = (
        select(outbox.c.key, outbox.c.payload).where(outbox.c.type == spec_of(message_type).type).order_by(outbox.c.seq)
    )
    async with ctx.uow.engine.connect() as conn:
        return [(key, message_type.FromString(payload)) for key, payload in await conn.execute(query)]


async def events(ctx: Context, message_type: type[M]) -> list[M]:
    """The events of one type written to the outbox, oldest first."""
    return [event for _, event in await keyed_events(ctx, message_type)]


# --- a saved segment narrows a list ------------------------------------------------------------------


async def test_a_segment_and_the_lists_own_filters_must_all_hold(ctx: Context) -> None:
    await new_account(ctx, MANAGER, "Alpha", tier="A", owner_id="rep-1")
    await new_account(ctx, MANAGER, "Beta", tier="B", owner_id="rep-2")
    with acting_as(*MANAGER):
        tier_a = await handlers.create_segment(
            ctx, name="A accounts", visibility="user", filters={"tier": "A"}, tags=[], idempotency_key=""
        )
        of_rep1 = await handlers.create_segment(
            ctx,
            name="rep-1's",
            visibility="user",
            filters={"owner_id": "rep-1", "q": "alp"},
            tags=[],
            idempotency_key="",
        )

        async def names(segment_id: str, f: AccountFilter) -> list[str]:
            rows, _ = await handlers.list_accounts(ctx, f, [], PAGE, segment_id)
            return sorted(r.name for r in rows)

        assert await names(tier_a.id, AccountFilter()) == ["Alpha"]
        assert await names(tier_a.id, AccountFilter(tiers=["B"])) == []  # was [Alpha, Beta]
        assert await names(tier_a.id, AccountFilter(tiers=["A", "B"])) == ["Alpha"]
        assert await names(of_rep1.id, AccountFilter(owner_id="rep-2")) == []  # was [Beta]
        assert await names(of_rep1.id, AccountFilter(q="bet")) == []  # was [Beta]
        assert await names(of_rep1.id, AccountFilter(q="alpha")) == ["Alpha"]


# --- changing a saved segment ------------------------------------------------------------------------


async def new_segment(ctx: Context, who: Caller, name: str, **values: Any) -> Any:
    with acting_as(*who):
        return await handlers.create_segment(
            ctx,
            name=name,
            visibility=values.get("visibility", "user"),
            filters=values.get("filters", {}),
            tags=values.get("tags", []),
            idempotency_key="",
        )


async def test_the_owner_changes_a_segment_and_each_change_adds_one_to_its_version(ctx: Context) -> None:
    await new_account(ctx, MANAGER, "Alpha", tier="A")
    await new_account(ctx, MANAGER, "Beta", tier="B", tags=["key"])
    segment = await new_segment(ctx, MANAGER, "A accounts", filters={"tier": "A"})
    assert segment.version == 1
    with acting_as(*MANAGER):
        changed = (
            await handlers.update_segment(
                ctx,
                segment.id,
                {"name": " Key accounts ", "filters": {"tier": "B"}, "tags": ["key", "key"]},
                expected_version=1,
            )
        ).record
        assert (changed.name, changed.filters, changed.tags, changed.version) == (
            "Key accounts",
            {"tier": "B"},
            ["key"],
            2,
        )
        assert changed.visibility == "user"  # not in the mask: kept
        rows, _ = await handlers.list_accounts(ctx, AccountFilter(), [], PAGE, segment.id)
        assert [r.name for r in rows] == ["Beta"]
        unconditional = (await handlers.update_segment(ctx, segment.id, {"name": "Key"}, expected_version=0)).record
        assert (unconditional.name, unconditional.version) == ("Key", 3)


async def test_a_stale_version_changes_nothing(ctx: Context) -> None:
    segment = await new_segment(ctx, MANAGER, "A accounts", filters={"tier": "A"})
    with acting_as(*MANAGER):
        await handlers.update_segment(ctx, segment.id, {"name": "first"}, expected_version=1)
        with pytest.raises(StaleVersion) as stale:
            await handlers.update_segment(ctx, segment.id, {"name": "second"}, expected_version=1)
        assert stale.value.current_version == 2
        assert (await handlers.get_segment(ctx, segment.id)).name == "first"


async def test_only_the_owner_may_change_a_segment_a_teammate_sees(ctx: Context) -> None:
    shared = await new_segment(ctx, MANAGER, "team A", visibility="team", filters={"tier": "A"})
    with acting_as(*REP1):
        assert (await handlers.get_segment(ctx, shared.id)).id == shared.id  # the teammate uses it
        with pytest.raises(NotFound):
            await handlers.update_segment(ctx, shared.id, {"name": "mine now"}, expected_version=0)
    with acting_as(*MANAGER):
        assert (await handlers.get_segment(ctx, shared.id)).name == "team A"


async def test_a_segment_is_saved_only_with_a_filter_that_runs(ctx: Context) -> None:
    segment = await new_segment(ctx, MANAGER, "A accounts", filters={"tier": "A"})
    with acting_as(*MANAGER):
        with pytest.raises(ValidationFailed) as refused:
            await handlers.update_segment(
                ctx, segment.id, {"filters": {"created_after": "yesterday"}}, expected_version=1
            )
        assert [e.field for e in refused.value.errors] == ["filters.created_after"]
        with pytest.raises(ValidationFailed) as blank:
            await handlers.update_segment(ctx, segment.id, {"name": " "}, expected_version=1)
        assert [e.field for e in blank.value.errors] == ["name"]
        kept = await handlers.get_segment(ctx, segment.id)
    assert (kept.filters, kept.version) == ({"tier": "A"}, 1)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"tier": "A,Z"}, "filters.tier"),
        ({"lifecycle": "bogus"}, "filters.lifecycle"),
        ({"created_after": "2026-01-01"}, "filters.created_after"),
        ({"created_after": "2026-01-01T00:00:00"}, "filters.created_after"),  # whose midnight?
    ],
)
async def test_a_segment_is_not_saved_with_a_value_the_account_list_refuses(
    ctx: Context, filters: dict[str, str], field: str
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await new_segment(ctx, MANAGER, "Odd", filters=filters)

    assert [e.field for e in refused.value.errors] == [field]


async def test_a_segment_made_a_team_one_is_shared_with_the_owners_team(ctx: Context) -> None:
    segment = await new_segment(ctx, MANAGER, "A accounts", filters={"tier": "A"})
    with acting_as(*REP1), pytest.raises(NotFound):
        await handlers.get_segment(ctx, segment.id)
    with acting_as(*MANAGER):
        shared = (await handlers.update_segment(ctx, segment.id, {"visibility": "team"}, expected_version=1)).record
    assert (shared.visibility, shared.team) == ("team", "east")
    with acting_as(*REP1):
        assert (await handlers.get_segment(ctx, segment.id)).id == segment.id
    with acting_as(*MANAGER):
        await handlers.update_segment(ctx, segment.id, {"visibility": "user"}, expected_version=2)
    with acting_as(*REP1), pytest.raises(NotFound):
        await handlers.get_segment(ctx, segment.id)


async def test_a_team_segment_needs_an_owner_with_a_team(ctx: Context) -> None:
    loner = (Principal(user_id="solo", roles=("sales_rep",), team="", region="cn-east"), REP1[1])
    segment = await new_segment(ctx, loner, "mine")
    with acting_as(*loner):
        for visibility in ("team", "everyone"):
            with pytest.raises(ValidationFailed) as refused:
                await handlers.update_segment(ctx, segment.id, {"visibility": visibility}, expected_version=0)
            assert [e.field for e in refused.value.errors] == ["visibility"]
        assert (await handlers.get_segment(ctx, segment.id)).visibility == "user"


# --- deleting an account -----------------------------------------------------------------------------


async def test_deleting_an_account_deletes_its_contacts_and_cancels_its_open_tasks(ctx: Context) -> None:
    beta = await new_account(ctx, REP1, "Beta")
    alpha = await new_account(ctx, REP1, "Alpha")
    dora = await new_contact(ctx, REP1, beta.id, "Dora")
    eve = await new_contact(ctx, REP1, alpha.id, "Eve")
    open_task = await new_task(ctx, REP1, beta.id, "call Dora")
    done_task = await new_task(ctx, REP1, beta.id, "send brochure")
    alphas_task = await new_task(ctx, REP1, alpha.id, "call Eve")
    with acting_as(*REP1):
        await handlers.complete_task(ctx, done_task.id, expected_version=0)
        await handlers.delete_account(ctx, beta.id, expected_version=0)

        contacts, _ = await handlers.list_contacts(ctx, ContactFilter(account_id=beta.id), [], PAGE)
        assert contacts == []
        with pytest.raises(NotFound):
            await handlers.get_contact(ctx, dora.id)
        with pytest.raises(NotFound):
            await handlers.update_contact(ctx, dora.id, {"title": "CTO"}, expected_version=0)
        with pytest.raises(NotFound):
            await handlers.delete_contact(ctx, dora.id, expected_version=0)
        with pytest.raises(ValidationFailed) as refused:
            await handlers.create_contact(ctx, {"account_id": beta.id, "name": "Fay"}, idempotency_key="")
        assert refused.value.errors[0].field == "account_id"

        tasks, _ = await handlers.list_tasks(ctx, due="", account_id="", owner_id="", statuses=[], page=PAGE)
        status = {t.id: t.status for t in tasks}
        assert status == {open_task.id: "cancelled", done_task.id: "done", alphas_task.id: "open"}
        # The other account keeps its contact.
        assert (await handlers.get_contact(ctx, eve.id)).name == "Eve"

    # The contact's deletion is evented as DeleteContact events it, so projections drop it too.
    deleted = await events(ctx, events_pb2.ContactDeleted)
    assert [(e.contact_id, e.account_id, e.actor.user_id) for e in deleted] == [(dora.id, beta.id, "rep-1")]
    assert [e.account_id for e in await events(ctx, events_pb2.AccountDeleted)] == [beta.id]
    # So is each task's cancellation: the read models close them too.
    cancelled = await events(ctx, events_pb2.TaskUpdated)
    assert [(e.task.id, e.task.status, list(e.changed_fields)) for e in cancelled] == [
        (open_task.id, "cancelled", ["status"])
    ]


async def test_a_task_edit_is_evented_with_the_fields_it_changed(ctx: Context) -> None:
    beta = await new_account(ctx, REP1, "Beta")
    task = await new_task(ctx, REP1, beta.id, "call Dora")
    with acting_as(*REP1):
        await handlers.update_task(ctx, task.id, {"title": "call Dora back", "account_id": beta.id}, expected_version=0)
        await handlers.update_task(ctx, task.id, {"title": "call Dora back"}, expected_version=0)  # no change
    edits = await events(ctx, events_pb2.TaskUpdated)
    assert [(e.task.title, list(e.changed_fields), e.task.version) for e in edits] == [("call Dora back", ["title"], 2)]


async def test_a_task_keeps_a_title_and_an_owner(ctx: Context) -> None:
    beta = await new_account(ctx, REP1, "Beta")
    task = await new_task(ctx, REP1, beta.id, "call Dora")
    with acting_as(*REP1), pytest.raises(ValidationFailed) as raised:
        await handlers.update_task(ctx, task.id, {"title": " ", "owner_id": ""}, expected_version=0)
    assert [(e.field, e.message) for e in raised.value.errors] == [
        ("title", "is required"),
        ("owner_id", "is required"),
    ]
    async with ctx.uow.engine.connect() as conn:
        kept = (await conn.execute(select(repo.tasks).where(repo.tasks.c.id == task.id))).one()
    assert (kept.title, kept.owner_id) == ("call Dora", task.owner_id)
    assert task.owner_id


async def test_a_contact_left_live_on_a_deleted_account_cannot_be_written(ctx: Context) -> None:
    """Accounts deleted before contacts went with them left their contacts live: writes to those
    answer as for the deleted account (not found)."""
    beta = await new_account(ctx, REP1, "Beta")
    dora = await new_contact(ctx, REP1, beta.id, "Dora")
    async with ctx.uow.engine.begin() as conn:
        await conn.execute(update(repo.accounts).where(repo.accounts.c.id == beta.id).values(deleted_at=utcnow()))
    with acting_as(*REP1):
        with pytest.raises(NotFound):
            await handlers.update_contact(ctx, dora.id, {"title": "CTO"}, expected_version=0)
        with pytest.raises(NotFound):
            await handlers.delete_contact(ctx, dora.id, expected_version=0)


async def test_a_contact_write_racing_the_accounts_deletion_waits_for_it_and_is_refused(pg_ctx: Context) -> None:
    """PostgreSQL: while a deletion holds the account (as DeleteAccount does, FOR UPDATE), a contact
    write on it waits, then answers as for the deleted account: no contact outlives it."""
    ctx = pg_ctx
    beta = await new_account(ctx, REP1, "Beta")
    elsewhere = await new_account(ctx, REP1, "Alpha")
    dora = await new_contact(ctx, REP1, beta.id, "Dora")
    eve = await new_contact(ctx, REP1, elsewhere.id, "Eve")

    async def on_beta() -> tuple[Any, ...]:
        with acting_as(*REP1):
            return await asyncio.gather(
                handlers.create_contact(ctx, {"account_id": beta.id, "name": "Fay"}, idempotency_key=""),
                handlers.update_contact(ctx, dora.id, {"title": "CTO"}, expected_version=0),
                handlers.update_contact(ctx, eve.id, {"account_id": beta.id}, expected_version=0),
                return_exceptions=True,
            )

    async with ctx.uow.engine.begin() as deletion:
        await deletion.execute(select(repo.accounts.c.id).where(repo.accounts.c.id == beta.id).with_for_update())
        writes = asyncio.create_task(on_beta())
        await asyncio.sleep(0.5)
        assert not writes.done(), "a contact write went ahead while the account was being deleted"
        accounts, contacts = repo.accounts, repo.contacts
        await deletion.execute(update(accounts).where(accounts.c.id == beta.id).values(deleted_at=utcnow()))
        await deletion.execute(update(contacts).where(contacts.c.account_id == beta.id).values(deleted_at=utcnow()))
    created, updated, moved = await writes
    assert isinstance(created, ValidationFailed) and created.errors[0].field == "account_id"
    assert isinstance(updated, NotFound)
    assert isinstance(moved, ValidationFailed) and moved.errors[0].field == "account_id"
    async with ctx.uow.engine.connect() as conn:
        live = select(contacts.c.name).where(contacts.c.deleted_at.is_(None)).order_by(contacts.c.name)
        assert list(await conn.scalars(live)) == ["Eve"]


# --- an account's contacts -----------------------------------------------------------------------------


async def test_an_accounts_contacts_are_listed_only_for_an_account_the_caller_may_read(ctx: Context) -> None:
    """With the caller's scope for accounts sent along, the list is of that account's contacts: an
    account missing, deleted or outside that scope is NOT_FOUND, as its timeline is; one without
    contacts, or a pool account, lists what it has."""
    acme = await new_account(ctx, REP1, "Acme")
    dora = await new_contact(ctx, REP1, acme.id, "Dora")
    empty = await new_account(ctx, REP1, "Empty")
    others = await new_account(ctx, REP2, "Others")
    gone = await new_account(ctx, REP1, "Gone")
    with acting_as(*REP1):
        pooled = await handlers.create_account(ctx, {"name": "Pooled"}, idempotency_key="", in_pool=True)
        await handlers.delete_account(ctx, gone.id, expected_version=0)

    async def contacts_of(account_id: str) -> list[str]:
        with acting_as(*REP1):
            rows, _ = await handlers.list_contacts(
                ctx, ContactFilter(account_id=account_id), [], PAGE, account_scope=REP1[1]
            )
        return [row.id for row in rows]

    assert await contacts_of(acme.id) == [dora.id]
    assert await contacts_of(empty.id) == []
    assert await contacts_of(pooled.id) == []
    for account_id in (others.id, gone.id, "no-such-account"):
        with pytest.raises(NotFound) as refused:
            await contacts_of(account_id)
        assert (refused.value.resource, refused.value.record_id) == ("account", account_id)
    # Without it (GET /contacts?account_id=), account_id is a filter like any other: nothing matches.
    with acting_as(*REP1):
        rows, _ = await handlers.list_contacts(ctx, ContactFilter(account_id=others.id), [], PAGE)
    assert rows == []


# --- moving a contact -----------------------------------------------------------------------------


async def test_a_contact_moved_to_another_account_belongs_to_that_accounts_owner(ctx: Context) -> None:
    old_home = await new_account(ctx, REP1, "Old Home")
    new_home = await new_account(ctx, REP2, "New Home")
    dora = await new_contact(ctx, REP1, old_home.id, "Dora")
    with acting_as(*MANAGER):
        moved = (await handlers.update_contact(ctx, dora.id, {"account_id": new_home.id}, expected_version=0)).record
    assert (moved.account_id, moved.owner_id) == (new_home.id, "rep-2")
    with acting_as(*REP2):
        assert (await handlers.get_contact(ctx, dora.id)).account_id == new_home.id
    with acting_as(*REP1), pytest.raises(NotFound):
        await handlers.get_contact(ctx, dora.id)

    [event] = await events(ctx, events_pb2.ContactUpdated)
    assert event.contact.owner_id == "rep-2"
    assert {"account_id", "owner_id"} <= set(event.changed_fields)


# --- contacts changed along with their account: one primary contact, a new version each -----------------


async def new_primary_contact(ctx: Context, who: Caller, account_id: str, name: str) -> Any:
    with acting_as(*who):
        values = {"account_id": account_id, "name": name, "is_primary": True}
        return await handlers.create_contact(ctx, values, idempotency_key="")


async def stored_contacts(ctx: Context, *contact_ids: str) -> list[Any]:
    """The contacts as stored, whoever may read them."""
    async with ctx.uow.engine.connect() as conn:
        return [await repo.get_contact(conn, contact_id) for contact_id in contact_ids]


async def test_a_new_primary_contact_demotes_the_former_one_to_a_new_version(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    ann = await new_primary_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, REP1, acme.id, "Bob")

    ann_now, bob_now = await stored_contacts(ctx, ann.id, bob.id)
    assert (ann_now.is_primary, ann_now.version) == (False, 2)
    assert (bob_now.is_primary, bob_now.version) == (True, 1)
    with acting_as(*REP1), pytest.raises(StaleVersion):
        await handlers.update_contact(ctx, ann.id, {"title": "CFO"}, expected_version=ann.version)


async def test_a_primary_contact_demoted_for_a_new_one_is_published_at_its_new_version(ctx: Context) -> None:
    """A mirror of the contacts (ERP, analytics) follows a demotion as it follows an edit, so it too
    keeps one primary contact per account."""
    acme = await new_account(ctx, REP1, "Acme")
    ann = await new_primary_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, REP1, acme.id, "Bob")  # Ann is demoted
    cid = await new_contact(ctx, REP1, acme.id, "Cid")
    with acting_as(*REP1):
        await handlers.update_contact(ctx, cid.id, {"is_primary": True}, expected_version=0)  # Bob is demoted

    updates = [
        (key, e.contact.id, e.contact.is_primary, e.contact.version, list(e.changed_fields))
        for key, e in await keyed_events(ctx, events_pb2.ContactUpdated)
    ]
    assert updates == [
        (ann.id, ann.id, False, 2, ["is_primary"]),
        (bob.id, bob.id, False, 2, ["is_primary"]),
        (cid.id, cid.id, True, 2, ["is_primary"]),
    ]


async def test_the_primary_contact_made_primary_again_stays_primary_and_unchanged(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    ann = await new_primary_contact(ctx, REP1, acme.id, "Ann")

    with acting_as(*REP1):
        again = await handlers.update_contact(ctx, ann.id, {"is_primary": True}, expected_version=ann.version)

    [stored] = await stored_contacts(ctx, ann.id)
    assert (again.record.is_primary, stored.is_primary, stored.version) == (True, True, 1)


async def test_a_merge_keeps_the_survivors_primary_contact_and_moves_the_others_to_a_new_version(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, REP1, "Acme Trading")
    ann = await new_primary_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, REP1, twin.id, "Bob")
    cid = await new_contact(ctx, REP1, twin.id, "Cid")
    call = await log_call(ctx, REP1, twin.id, "intro")

    with acting_as(*REP1):
        await handlers.merge_accounts(ctx, acme.id, twin.id, idempotency_key="")

    with pytest.raises(StaleVersion):  # the activity moved to the survivor: a new version of it
        await correct(ctx, REP1, acme.id, call.id, {"subject": "first call"}, version=call.version)
    stored = await stored_contacts(ctx, ann.id, bob.id, cid.id)
    assert [(c.name, c.account_id, c.is_primary, c.version) for c in stored] == [
        ("Ann", acme.id, True, 1),
        ("Bob", acme.id, False, 2),
        ("Cid", acme.id, False, 2),
    ]
    # A write at the version read before the merge is stale: the contact changed since.
    with acting_as(*REP1), pytest.raises(StaleVersion):
        await handlers.update_contact(ctx, bob.id, {"title": "CFO"}, expected_version=bob.version)


async def test_a_merge_into_an_account_without_a_primary_contact_keeps_the_duplicates(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, REP1, "Acme Trading")
    ann = await new_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, REP1, twin.id, "Bob")

    with acting_as(*REP1):
        await handlers.merge_accounts(ctx, acme.id, twin.id, idempotency_key="")

    stored = await stored_contacts(ctx, ann.id, bob.id)
    assert [(c.name, c.is_primary, c.version) for c in stored] == [("Ann", False, 1), ("Bob", True, 2)]


async def test_a_merge_publishes_each_contact_task_and_activity_it_moves(ctx: Context) -> None:
    """Mirrors follow the moved records as they follow an edit of each: the live contacts with the
    survivor's account, owner and territory, and no second primary; an open task with the survivor's
    account and territory (the fields set, listed even where equal, as when an account's territory
    changes); activities on the survivor (keyed by their account, now the survivor)."""
    acme = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, MANAGER, "Acme Trading", owner_id="rep-2", region="cn-north")
    await new_primary_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, MANAGER, twin.id, "Bob")
    cid = await new_contact(ctx, MANAGER, twin.id, "Cid")
    task = await new_task(ctx, MANAGER, twin.id, "call Bob")
    call = await log_call(ctx, MANAGER, twin.id, "intro")
    with acting_as(*MANAGER):
        await handlers.delete_contact(ctx, cid.id, expected_version=0)  # gone from the mirrors already
        await handlers.merge_accounts(ctx, acme.id, twin.id, idempotency_key="")

    [(key, moved)] = await keyed_events(ctx, events_pb2.ContactUpdated)
    assert (key, moved.contact.id, moved.contact.account_id, moved.contact.version) == (bob.id, bob.id, acme.id, 2)
    assert (moved.contact.owner_id, moved.contact.team, moved.contact.region, moved.contact.is_primary) == (
        "rep-1",
        "east",
        "cn-east",
        False,
    )
    assert list(moved.changed_fields) == ["account_id", "is_primary", "owner_id", "region"]  # same team
    tasks = [
        (key, e.task.account_id, e.task.version, list(e.changed_fields))
        for key, e in await keyed_events(ctx, events_pb2.TaskUpdated)
    ]
    assert tasks == [(task.id, acme.id, 2, ["account_id", "region", "team"])]
    activities = [
        (key, e.activity.id, e.activity.account_id, e.activity.version, list(e.changed_fields))
        for key, e in await keyed_events(ctx, events_pb2.ActivityUpdated)
    ]
    assert activities == [(acme.id, call.id, acme.id, 2, ["account_id"])]


async def test_contacts_following_their_accounts_owner_move_to_a_new_version_each_time(ctx: Context) -> None:
    """A claim, a transfer and a bulk transfer each give the account's contacts its new owner: each
    is a new version of the contact, so a write at a version read before it is stale."""
    with acting_as(*MANAGER):
        pooled = await handlers.create_account(ctx, {"name": "Pooled"}, idempotency_key="", in_pool=True)
    dora = await new_contact(ctx, REP1, pooled.id, "Dora")
    seen = [await stored_contacts(ctx, dora.id)]

    with acting_as(*REP2):
        await handlers.claim_account(ctx, pooled.id, idempotency_key="")
    seen.append(await stored_contacts(ctx, dora.id))
    with acting_as(*MANAGER):
        await handlers.transfer_account(
            ctx, pooled.id, new_owner_id="rep-1", new_team="", reason="cover", expected_version=0
        )
        seen.append(await stored_contacts(ctx, dora.id))
        await handlers.bulk_transfer(
            ctx, from_owner_id="rep-1", to_owner_id="rep-2", to_team="", reason="leave", idempotency_key=""
        )
        seen.append(await stored_contacts(ctx, dora.id))

        assert [(c.owner_id, c.version) for [c] in seen] == [("rep-1", 1), ("rep-2", 2), ("rep-1", 3), ("rep-2", 4)]
        with pytest.raises(StaleVersion):
            await handlers.update_contact(ctx, dora.id, {"title": "CFO"}, expected_version=3)


# --- parents outside the caller's scope ---------------------------------------------------------------


async def test_a_parent_outside_the_callers_scope_answers_like_one_that_does_not_exist(ctx: Context) -> None:
    others = await new_account(ctx, REP2, "Rep Two Holding")
    mine = await new_account(ctx, REP1, "Rep One Branch")
    with acting_as(*REP1):
        for parent_id in (others.id, "no-such-account"):
            with pytest.raises(ValidationFailed) as on_create:
                await handlers.create_account(
                    ctx, {"name": f"Child of {parent_id}", "parent_id": parent_id}, idempotency_key="", in_pool=False
                )
            with pytest.raises(ValidationFailed) as on_update:
                await handlers.update_account(ctx, mine.id, {"parent_id": parent_id}, expected_version=0)
            expected = [("parent_id", f"account {parent_id} does not exist")]
            assert [(e.field, e.message) for e in on_create.value.errors] == expected
            assert [(e.field, e.message) for e in on_update.value.errors] == expected


async def test_an_unchanged_parent_outside_the_callers_scope_is_kept(ctx: Context) -> None:
    """A manager hung the rep's account under another rep's: the rep may still save the account as they read it."""
    others = await new_account(ctx, REP2, "Rep Two Holding")
    mine = await new_account(ctx, REP1, "Rep One Branch")
    with acting_as(*MANAGER):
        await handlers.update_account(ctx, mine.id, {"parent_id": others.id}, expected_version=0)
    with acting_as(*REP1):
        saved = (
            await handlers.update_account(
                ctx, mine.id, {"name": "Rep One Branch East", "parent_id": others.id}, expected_version=0
            )
        ).record
    assert (saved.name, saved.parent_id) == ("Rep One Branch East", others.id)


# --- other records a request's body names -----------------------------------------------------------------


def refusals(caught: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str, str]]:
    return [(e.field, e.message) for e in caught.value.errors]


async def test_a_tasks_account_missing_or_outside_the_callers_scope_is_a_422_naming_it(ctx: Context) -> None:
    others = await new_account(ctx, REP2, "Rep Two Holding")
    mine = await new_account(ctx, REP1, "Rep One Branch")
    task = await new_task(ctx, REP1, "", "call back")
    with acting_as(*REP1):
        for account_id in (others.id, "no-such-account"):
            with pytest.raises(ValidationFailed) as on_create:
                await handlers.create_task(ctx, {"title": "visit", "account_id": account_id}, idempotency_key="")
            with pytest.raises(ValidationFailed) as on_update:
                await handlers.update_task(ctx, task.id, {"account_id": account_id}, expected_version=0)
            expected = [("account_id", f"account {account_id} does not exist")]
            assert refusals(on_create) == refusals(on_update) == expected
        moved = (await handlers.update_task(ctx, task.id, {"account_id": mine.id}, expected_version=0)).record
    assert moved.account_id == mine.id


async def test_an_unchanged_task_account_outside_the_callers_scope_is_kept(ctx: Context) -> None:
    """A manager put the rep's task on another rep's account: the rep may still save the task as they read it."""
    others = await new_account(ctx, REP2, "Rep Two Holding")
    task = await new_task(ctx, REP1, "", "call back")
    with acting_as(*MANAGER):
        await handlers.update_task(ctx, task.id, {"account_id": others.id}, expected_version=0)
    with acting_as(*REP1):
        saved = (
            await handlers.update_task(
                ctx, task.id, {"title": "call back today", "account_id": others.id}, expected_version=0
            )
        ).record
    assert (saved.title, saved.account_id) == ("call back today", others.id)


async def test_a_contact_missing_or_outside_the_callers_scope_is_a_422_naming_it(ctx: Context) -> None:
    """The contact of a task or of an activity."""
    mine = await new_account(ctx, REP1, "Rep One Branch")
    dora = await new_contact(ctx, REP1, mine.id, "Dora")
    hidden = await new_contact(ctx, REP2, (await new_account(ctx, REP2, "Rep Two Holding")).id, "Hal")
    task = await new_task(ctx, REP1, mine.id, "call back")

    async def log(contact_id: str) -> Any:
        return await handlers.log_activity(
            ctx, account_id=mine.id, contact_id=contact_id, kind="call", subject="", notes="", occurred_at=None,
            idempotency_key="",
        )  # fmt: skip

    with acting_as(*REP1):
        for contact_id in (hidden.id, "no-such-contact"):
            with pytest.raises(ValidationFailed) as on_create:
                await handlers.create_task(ctx, {"title": "visit", "contact_id": contact_id}, idempotency_key="")
            with pytest.raises(ValidationFailed) as on_update:
                await handlers.update_task(ctx, task.id, {"contact_id": contact_id}, expected_version=0)
            with pytest.raises(ValidationFailed) as on_activity:
                await log(contact_id)
            expected = [("contact_id", f"contact {contact_id} does not exist")]
            assert refusals(on_create) == refusals(on_update) == refusals(on_activity) == expected
        made = await handlers.create_task(
            ctx, {"title": "visit", "account_id": mine.id, "contact_id": dora.id}, idempotency_key=""
        )
        updated = (await handlers.update_task(ctx, task.id, {"contact_id": dora.id}, expected_version=0)).record
        logged = await log(dora.id)
    assert made.contact_id == updated.contact_id == logged.contact_id == dora.id


async def test_a_contact_of_another_account_than_the_records_is_named_as_such(ctx: Context) -> None:
    mine = await new_account(ctx, REP1, "Rep One Branch")
    elsewhere = await new_account(ctx, REP1, "Rep One Plant")
    eve = await new_contact(ctx, REP1, elsewhere.id, "Eve")
    with acting_as(*REP1), pytest.raises(ValidationFailed) as caught:
        await handlers.create_task(
            ctx, {"title": "visit", "account_id": mine.id, "contact_id": eve.id}, idempotency_key=""
        )
    assert refusals(caught) == [("contact_id", f"contact {eve.id} is not on account {mine.id}")]


async def test_a_task_moved_to_another_account_keeps_its_contact_only_if_it_is_on_that_account(ctx: Context) -> None:
    mine = await new_account(ctx, REP1, "Rep One Branch")
    elsewhere = await new_account(ctx, REP1, "Rep One Plant")
    dora = await new_contact(ctx, REP1, mine.id, "Dora")
    eve = await new_contact(ctx, REP1, elsewhere.id, "Eve")
    with acting_as(*REP1):
        task = await handlers.create_task(
            ctx, {"title": "visit", "account_id": mine.id, "contact_id": dora.id}, idempotency_key=""
        )
        with pytest.raises(ValidationFailed) as caught:
            await handlers.update_task(ctx, task.id, {"account_id": elsewhere.id}, expected_version=0)
        message = f"the task's contact {dora.id} is not on account {elsewhere.id}: change or clear contact_id"
        assert refusals(caught) == [("account_id", message)]
        moved = (
            await handlers.update_task(
                ctx, task.id, {"account_id": elsewhere.id, "contact_id": eve.id}, expected_version=0
            )
        ).record
        cleared = (
            await handlers.update_task(ctx, task.id, {"account_id": mine.id, "contact_id": ""}, expected_version=0)
        ).record
    assert (moved.account_id, moved.contact_id) == (elsewhere.id, eve.id)
    assert (cleared.account_id, cleared.contact_id) == (mine.id, "")


async def test_a_contact_left_live_on_a_deleted_account_does_not_exist_for_a_task(ctx: Context) -> None:
    beta = await new_account(ctx, REP1, "Beta")
    dora = await new_contact(ctx, REP1, beta.id, "Dora")
    async with ctx.uow.engine.begin() as conn:
        await conn.execute(update(repo.accounts).where(repo.accounts.c.id == beta.id).values(deleted_at=utcnow()))
    with acting_as(*REP1), pytest.raises(ValidationFailed) as caught:
        await handlers.create_task(ctx, {"title": "visit", "contact_id": dora.id}, idempotency_key="")
    assert refusals(caught) == [("contact_id", f"contact {dora.id} does not exist")]


async def test_a_merges_duplicate_missing_or_outside_the_callers_scope_is_a_422_naming_it(ctx: Context) -> None:
    mine = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, REP1, "Acme Trading")
    others = await new_account(ctx, REP2, "Acme Holding")
    with acting_as(*REP1):
        for duplicate_id in (others.id, "no-such-account"):
            with pytest.raises(ValidationFailed) as caught:
                await handlers.merge_accounts(ctx, mine.id, duplicate_id, idempotency_key="")
            assert refusals(caught) == [("duplicate_id", f"account {duplicate_id} does not exist")]
        with pytest.raises(NotFound):  # the survivor is the account the request addresses (its path)
            await handlers.merge_accounts(ctx, "no-such-account", twin.id, idempotency_key="")
        merged = await handlers.merge_accounts(ctx, mine.id, twin.id, idempotency_key="")
    assert merged.survivor.id == mine.id


# --- activities -----------------------------------------------------------------------------------------


async def test_a_service_agent_logs_a_visit_on_an_account_of_their_region(ctx: Context) -> None:
    """LogActivity checks the account against the record scope of the call, which is the caller's
    scope for reading accounts (an agent's is their region); the activity is always the caller's own,
    and an agent's activities scope (own) lists it."""
    customer = await new_account(ctx, REP1, "Customer", region="cn-east")
    elsewhere = await new_account(ctx, REP1, "Far Away", region="cn-west")

    async def log(who: Caller, account_id: str, subject: str) -> Any:
        with acting_as(*who):
            return await handlers.log_activity(
                ctx, account_id=account_id, contact_id="", kind="visit", subject=subject, notes="",
                occurred_at=None, idempotency_key="",
            )  # fmt: skip

    visit = await log(AGENT_READING_ACCOUNTS, customer.id, "on-site repair")
    assert visit.actor_id == "agent-1"
    with pytest.raises(NotFound):
        await log(AGENT_READING_ACCOUNTS, elsewhere.id, "not my region")
    with pytest.raises(NotFound):
        await log(REP2, customer.id, "not my account")

    async def timeline(who: Caller) -> list[str]:
        page = parse_page(50, "", "-occurred_at", sorts={"occurred_at"})
        with acting_as(*who):
            rows, _ = await handlers.list_activities(ctx, account_id=customer.id, contact_id="", page=page)
        return [r.subject for r in rows]

    assert await timeline(AGENT_READING_ACTIVITIES) == ["on-site repair"]
    assert await timeline(REP1) == ["on-site repair"]
    assert await timeline(REP2) == []  # the account's entries are not theirs
    # Sent their scope for accounts (as the gateway does), a caller who may not read the account
    # finds none: a timeline would tell that it exists.
    page = parse_page(50, "", "-occurred_at", sorts={"occurred_at"})
    with acting_as(*REP2), pytest.raises(NotFound):
        await handlers.list_activities(ctx, account_id=customer.id, contact_id="", page=page, account_scope=REP2[1])
    with acting_as(*AGENT_READING_ACTIVITIES):
        rows, _ = await handlers.list_activities(
            ctx, account_id=customer.id, contact_id="", page=page, account_scope=AGENT_READING_ACCOUNTS[1]
        )
    assert [r.subject for r in rows] == ["on-site repair"]


# --- correcting and deleting activities -----------------------------------------------------------------


async def log_call(
    ctx: Context, who: Caller, account_id: str, subject: str, occurred_at: datetime | None = None
) -> Any:
    with acting_as(*who):
        return await handlers.log_activity(
            ctx, account_id=account_id, contact_id="", kind="call", subject=subject, notes="",
            occurred_at=occurred_at, idempotency_key="",
        )  # fmt: skip


async def correct(
    ctx: Context, who: Caller, account_id: str, activity_id: str, values: dict[str, Any], version: int = 0
) -> Any:
    """A correction as the gateway sends it: the call's scope is the caller's for activities, their
    scope for accounts goes along (for these callers both are the same)."""
    with acting_as(*who):
        _, corrected = await handlers.update_activity(
            ctx, account_id, activity_id, values, expected_version=version, account_scope=who[1]
        )
    return corrected


async def remove(ctx: Context, who: Caller, account_id: str, activity_id: str, version: int = 0) -> Any:
    with acting_as(*who):
        return await handlers.delete_activity(
            ctx, account_id, activity_id, expected_version=version, account_scope=who[1]
        )


async def last_activity_at(ctx: Context, account_id: str) -> Any:
    with acting_as(*MANAGER):
        return (await handlers.get_account(ctx, account_id)).last_activity_at


async def test_an_activity_logged_again_under_its_key_after_its_deletion_is_a_404_and_not_brought_back(
    ctx: Context,
) -> None:
    acme = await new_account(ctx, REP1, "Acme")

    async def log_under_key() -> Any:
        with acting_as(*REP1):
            return await handlers.log_activity(
                ctx, account_id=acme.id, contact_id="", kind="call", subject="intro", notes="",
                occurred_at=None, idempotency_key="call-1",
            )  # fmt: skip

    call = await log_under_key()
    assert (await log_under_key()).id == call.id
    await remove(ctx, REP1, acme.id, call.id)

    with pytest.raises(NotFound):
        await log_under_key()
    page = parse_page(50, "", "-occurred_at", sorts={"occurred_at"})
    with acting_as(*REP1):
        rows, _ = await handlers.list_activities(ctx, account_id=acme.id, contact_id="", page=page)
    assert rows == []


async def test_a_segment_saved_again_under_its_key_after_its_deletion_is_a_404(ctx: Context) -> None:
    async def save() -> Any:
        with acting_as(*REP1):
            return await handlers.create_segment(
                ctx, name="Big ones", visibility="user", filters={"tier": "A"}, tags=[], idempotency_key="seg-1"
            )

    segment = await save()
    with acting_as(*REP1):
        await handlers.delete_segment(ctx, segment.id)

    with pytest.raises(NotFound) as gone:
        await save()
    assert (gone.value.resource, gone.value.record_id) == ("segment", segment.id)


async def test_an_account_created_again_under_its_key_after_its_deletion_is_a_404_and_not_brought_back(
    ctx: Context,
) -> None:
    async def create_under_key() -> Any:
        with acting_as(*REP1):
            return await handlers.create_account(ctx, {"name": "Acme"}, idempotency_key="acc-1", in_pool=False)

    acme = await create_under_key()
    assert (await create_under_key()).id == acme.id
    with acting_as(*REP1):
        await handlers.delete_account(ctx, acme.id, expected_version=0)

    with pytest.raises(NotFound) as gone:
        await create_under_key()
    assert (gone.value.resource, gone.value.record_id) == ("account", acme.id)
    with acting_as(*REP1), pytest.raises(NotFound):
        await handlers.get_account(ctx, acme.id)


async def test_a_contact_created_again_under_its_key_after_its_deletion_or_its_accounts_is_a_404(
    ctx: Context,
) -> None:
    acme = await new_account(ctx, REP1, "Acme")

    async def create_under_key(key: str) -> Any:
        with acting_as(*REP1):
            return await handlers.create_contact(ctx, {"account_id": acme.id, "name": "Li"}, idempotency_key=key)

    li = await create_under_key("con-1")
    with acting_as(*REP1):
        await handlers.delete_contact(ctx, li.id, expected_version=0)
    with pytest.raises(NotFound) as gone:
        await create_under_key("con-1")
    assert (gone.value.resource, gone.value.record_id) == ("contact", li.id)

    # The account's deletion takes its contacts along: a repeat of one's create is a 404 too.
    fay = await create_under_key("con-2")
    with acting_as(*REP1):
        await handlers.delete_account(ctx, acme.id, expected_version=0)
    with pytest.raises(NotFound) as gone:
        await create_under_key("con-2")
    assert (gone.value.resource, gone.value.record_id) == ("contact", fay.id)


async def test_the_logger_corrects_an_activity_and_each_change_adds_one_to_its_version(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    call = await log_call(ctx, REP1, acme.id, "intro")
    assert call.version == 1
    with acting_as(*REP1):
        previous, corrected = await handlers.update_activity(
            ctx, acme.id, call.id, {"kind": "meeting", "notes": "met the CTO"}, expected_version=1,
            account_scope=REP1[1],
        )  # fmt: skip
    assert (previous.kind, previous.notes, previous.version) == ("call", "", 1)
    assert (corrected.kind, corrected.subject, corrected.notes, corrected.version) == (
        "meeting",
        "intro",
        "met the CTO",
        2,
    )
    again = await correct(ctx, REP1, acme.id, call.id, {"kind": "meeting", "subject": "intro"})
    assert again.version == 2  # nothing changed: no new version, no event
    [updated] = await events(ctx, events_pb2.ActivityUpdated)
    assert (updated.activity.id, updated.activity.version, list(updated.changed_fields)) == (
        call.id,
        2,
        ["kind", "notes"],
    )
    assert updated.actor.user_id == "rep-1"


async def test_an_activity_says_what_came_of_it_and_plans_its_follow_up_which_moves_and_goes_with_it(
    ctx: Context,
) -> None:
    """As on a lead: `next_follow_up_at` plans the author's task on the account then; changed, the
    task moves; cleared, or the activity deleted, it is cancelled; an open task of the activity is
    never planned twice."""
    acme = await new_account(ctx, REP1, "Acme")
    monday = utcnow().replace(microsecond=0) - timedelta(days=10)  # all of it past: any time may be corrected to
    friday, next_week = monday + timedelta(days=4), monday + timedelta(days=8)
    with acting_as(*REP1):
        with pytest.raises(ValidationFailed) as backwards:
            await handlers.log_activity(
                ctx, account_id=acme.id, contact_id="", kind="call", subject="pricing", notes="",
                occurred_at=monday, idempotency_key="", next_follow_up_at=monday - timedelta(days=1),
            )  # fmt: skip
        call = await handlers.log_activity(
            ctx, account_id=acme.id, contact_id="", kind="call", subject="pricing", notes="",
            occurred_at=monday, idempotency_key="", outcome=" wants a quote ", next_follow_up_at=friday,
        )  # fmt: skip
    assert refusals(backwards) == [("next_follow_up_at", "must be after occurred_at")]
    assert (call.outcome, call.next_follow_up_at) == ("wants a quote", friday)

    async def follow_ups() -> list[tuple[str, Any, str]]:
        t = repo.tasks
        async with ctx.uow.engine.connect() as conn:
            rows = await conn.execute(select(t.c.status, t.c.due_at, t.c.owner_id).where(t.c.activity_id == call.id))
        return [(status, due_at, owner) for status, due_at, owner in rows]

    assert await follow_ups() == [("open", friday, "rep-1")]
    with pytest.raises(ValidationFailed) as overtaken:  # corrected to after its own follow-up
        await correct(ctx, REP1, acme.id, call.id, {"occurred_at": friday + timedelta(minutes=1)})
    assert refusals(overtaken) == [("next_follow_up_at", "must be after occurred_at")]
    await correct(ctx, REP1, acme.id, call.id, {"next_follow_up_at": next_week})
    assert await follow_ups() == [("open", next_week, "rep-1")]
    await correct(ctx, REP1, acme.id, call.id, {"next_follow_up_at": None})
    assert await follow_ups() == [("cancelled", next_week, "rep-1")]
    await correct(ctx, REP1, acme.id, call.id, {"next_follow_up_at": friday, "outcome": "quote sent"})
    await remove(ctx, REP1, acme.id, call.id)
    assert sorted(await follow_ups()) == [("cancelled", friday, "rep-1"), ("cancelled", next_week, "rep-1")]
    created = [e.task for e in await events(ctx, events_pb2.TaskCreated)]
    assert [(task.source, task.activity_id, task.title) for task in created] == [
        ("follow_up", call.id, "Follow up: pricing")
    ] * 2


async def test_a_stale_or_invalid_correction_changes_nothing(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    call = await log_call(ctx, REP1, acme.id, "intro")
    await correct(ctx, REP1, acme.id, call.id, {"subject": "first"}, version=1)
    with pytest.raises(StaleVersion) as stale:
        await correct(ctx, REP1, acme.id, call.id, {"subject": "second"}, version=1)
    assert stale.value.current_version == 2
    with pytest.raises(StaleVersion):
        await remove(ctx, REP1, acme.id, call.id, version=1)
    with pytest.raises(ValidationFailed) as invalid:
        await correct(ctx, REP1, acme.id, call.id, {"kind": "lunch", "occurred_at": utcnow() + timedelta(days=1)})
    assert [field for field, _ in refusals(invalid)] == ["kind", "occurred_at"]
    with acting_as(*REP1):
        rows, _ = await handlers.list_activities(ctx, account_id=acme.id, contact_id="", page=PAGE)
    assert [(r.kind, r.subject, r.version) for r in rows] == [("call", "first", 2)]
    assert len(await events(ctx, events_pb2.ActivityUpdated)) == 1


async def test_a_later_time_moves_the_accounts_last_activity_forward_and_nothing_moves_it_back(ctx: Context) -> None:
    now = utcnow()
    acme = await new_account(ctx, REP1, "Acme")
    call = await log_call(ctx, REP1, acme.id, "intro", occurred_at=now - timedelta(hours=3))
    assert await last_activity_at(ctx, acme.id) == now - timedelta(hours=3)
    await correct(ctx, REP1, acme.id, call.id, {"occurred_at": now - timedelta(hours=1)})
    assert await last_activity_at(ctx, acme.id) == now - timedelta(hours=1)
    moved_back = await correct(ctx, REP1, acme.id, call.id, {"occurred_at": now - timedelta(hours=5)})
    assert moved_back.occurred_at == now - timedelta(hours=5)
    assert await last_activity_at(ctx, acme.id) == now - timedelta(hours=1)  # the touch happened
    await remove(ctx, REP1, acme.id, call.id)
    assert await last_activity_at(ctx, acme.id) == now - timedelta(hours=1)


async def test_a_deleted_activity_leaves_the_timeline_with_an_event_keyed_by_its_account(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    kept = await log_call(ctx, REP1, acme.id, "intro")
    mistake = await log_call(ctx, REP1, acme.id, "wrong account")
    removed = await remove(ctx, REP1, acme.id, mistake.id, version=1)
    assert (removed.id, removed.subject) == (mistake.id, "wrong account")
    with acting_as(*REP1):
        rows, _ = await handlers.list_activities(ctx, account_id=acme.id, contact_id="", page=PAGE)
    assert [r.id for r in rows] == [kept.id]
    with pytest.raises(NotFound):
        await remove(ctx, REP1, acme.id, mistake.id)
    [deleted] = await events(ctx, events_pb2.ActivityDeleted)
    assert (deleted.activity_id, deleted.account_id, deleted.actor.user_id) == (mistake.id, acme.id, "rep-1")
    outbox = outbox_table(repo.metadata)
    async with ctx.uow.engine.connect() as conn:
        keys = await conn.scalars(select(outbox.c.key).where(outbox.c.type == "crm.accounts.activity.deleted"))
        assert list(keys) == [acme.id]


async def test_an_activity_outside_the_callers_scope_or_under_another_account_is_not_found(ctx: Context) -> None:
    """A rep changes what they logged, on an account they may read; a manager what was logged on
    their team's accounts. The path's account must be the activity's."""
    acme = await new_account(ctx, REP1, "Acme")
    other = await new_account(ctx, REP1, "Other")
    mine = await log_call(ctx, REP1, acme.id, "rep's call")
    managers = await log_call(ctx, MANAGER, acme.id, "manager's call")
    west = (
        Principal(user_id="mgr-w", roles=("sales_manager",), team="west", region="cn-east"),
        RecordScope(ScopeKind.TEAM, team="west"),
    )
    refused = [
        (REP1, acme.id, managers.id),  # the manager's entry on the rep's own account
        (REP2, acme.id, mine.id),  # another rep's
        (west, acme.id, mine.id),  # another team's
        (REP1, other.id, mine.id),  # under another account than its own
        (REP1, acme.id, "no-such-activity"),
    ]
    for who, account_id, activity_id in refused:
        with pytest.raises(NotFound):
            await correct(ctx, who, account_id, activity_id, {"subject": "x"})
        with pytest.raises(NotFound):
            await remove(ctx, who, account_id, activity_id)
    assert (await correct(ctx, MANAGER, acme.id, mine.id, {"notes": "checked"})).notes == "checked"
    await remove(ctx, MANAGER, acme.id, managers.id)

    # Once the account is another rep's, the rep no longer reads it: their own entry there is out of reach.
    with acting_as(*MANAGER):
        await handlers.transfer_account(
            ctx, acme.id, new_owner_id="rep-2", new_team="", reason="territory", expected_version=0
        )
    with pytest.raises(NotFound):
        await correct(ctx, REP1, acme.id, mine.id, {"subject": "x"})


async def test_the_account_is_checked_in_the_scope_for_accounts_sent_along_and_the_activity_in_the_calls(
    ctx: Context,
) -> None:
    """A service agent reads the accounts of their region and owns their activities: with their scope
    for accounts sent along, they could correct their visit (were they granted it); without it, the
    account is checked against their own accounts, which it is not."""
    customer = await new_account(ctx, REP1, "Customer", region="cn-east")
    visit = await log_call(ctx, AGENT_READING_ACCOUNTS, customer.id, "on-site repair")
    with acting_as(*AGENT_READING_ACTIVITIES):
        _, corrected = await handlers.update_activity(
            ctx, customer.id, visit.id, {"notes": "pump replaced"}, expected_version=0,
            account_scope=AGENT_READING_ACCOUNTS[1],
        )  # fmt: skip
        with pytest.raises(NotFound):
            await handlers.update_activity(
                ctx, customer.id, visit.id, {"notes": "x"}, expected_version=0,
                account_scope=RecordScope(ScopeKind.OWN, owner_id="agent-1"),
            )  # fmt: skip
    assert corrected.notes == "pump replaced"


# --- money ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["1e400", "1" * 40, "0.129"])
async def test_money_the_columns_cannot_hold_as_given_is_refused_naming_the_field(ctx: Context, amount: str) -> None:
    # 1e400 broke rounding the reply (HTTP 500), 40 digits overflowed the column, 0.129 was rounded
    # to 0.13 without a word: gRPC callers reach the handlers without the gateway's checks.
    money = {"annual_revenue": Decimal(amount), "annual_revenue_currency": "CNY"}
    with acting_as(*MANAGER), pytest.raises(ValidationFailed) as caught:
        await handlers.create_account(ctx, {"name": "Big rev", **money}, idempotency_key="", in_pool=False)
    assert [e.field for e in caught.value.errors] == ["annual_revenue.amount"]

    account = await new_account(ctx, MANAGER, "Small rev")
    limit = {"credit_limit": Decimal(amount), "credit_limit_currency": "CNY"}
    with acting_as(*MANAGER), pytest.raises(ValidationFailed) as caught:
        await handlers.update_account(ctx, account.id, limit, expected_version=account.version)
    assert [e.field for e in caught.value.errors] == ["credit_limit.amount"]


async def test_the_largest_amount_is_kept_to_the_cent(ctx: Context) -> None:
    account = await new_account(
        ctx, MANAGER, "Rich", annual_revenue=Decimal("999999999999.99"), annual_revenue_currency="CNY"
    )
    assert account_to_proto(account).annual_revenue == common_pb2.Money(amount="999999999999.99", currency="CNY")


# --- configuration lists page like every list ----------------------------------------------------------


async def _all_pages(list_page: Any, sort: str = "") -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = ""
    while True:
        rows, cursor = await list_page(parse_page(2, cursor, sort, sorts={"created_at", "name"}))
        pages.append([row.name for row in rows])
        if not cursor:
            return pages


async def test_segments_and_reminder_rules_are_listed_a_page_at_a_time(ctx: Context) -> None:
    for name in ("Gamma", "Alpha", "Beta"):
        await new_segment(ctx, MANAGER, name)
    with acting_as(*MANAGER):
        for name in ("Quiet A", "Quiet B", "Quiet C"):
            await handlers.create_reminder_rule(
                ctx, name=name, tiers=["A"], inactive_days=30, task_title="Call", due_in_hours=24, enabled=True,
                idempotency_key="",
            )  # fmt: skip

        segments = await _all_pages(lambda page: handlers.list_segments(ctx, page), sort="name")
        rules = await _all_pages(lambda page: handlers.list_reminder_rules(ctx, page))

    assert segments == [["Alpha", "Beta"], ["Gamma"]]
    assert rules == [["Quiet A", "Quiet B"], ["Quiet C"]]


# --- pool accounts, territories, reminders and concurrent writes --------------------------------------

WEST_REP = (
    Principal(user_id="rep-w", roles=("sales_rep",), team="west", region="cn-west"),
    RecordScope(ScopeKind.OWN, owner_id="rep-w"),
)
WEST_MANAGER = (
    Principal(user_id="mgr-w", roles=("sales_manager",), team="west", region="cn-west"),
    RecordScope(ScopeKind.TEAM, team="west"),
)
ADMIN = (Principal(user_id="admin", roles=("admin",)), RecordScope(ScopeKind.ALL))


async def pool_account(ctx: Context, name: str) -> Any:
    """A pool account of the east team (cn-east), put there by its manager."""
    with acting_as(*MANAGER):
        values = {"name": name, "team": "east", "region": "cn-east", "tier": "B"}
        return await handlers.create_account(ctx, values, idempotency_key="", in_pool=True)


async def test_anyone_reads_and_claims_a_pool_account_but_only_its_scope_changes_transfers_or_deletes_it(
    ctx: Context,
) -> None:
    pooled = await pool_account(ctx, "Pooled")
    for caller in (WEST_REP, WEST_MANAGER):
        with acting_as(*caller):
            assert (await handlers.get_account(ctx, pooled.id)).id == pooled.id
            with pytest.raises(NotFound):
                await handlers.update_account(ctx, pooled.id, {"tier": "D"}, expected_version=0)
            with pytest.raises(NotFound):
                await handlers.transfer_account(
                    ctx, pooled.id, new_owner_id="rep-w", new_team="west", reason="mine now", expected_version=0
                )
            with pytest.raises(NotFound):
                await handlers.delete_account(ctx, pooled.id, expected_version=0)
    with acting_as(*MANAGER):  # the east team's manager looks after the east team's pool accounts
        renamed = (await handlers.update_account(ctx, pooled.id, {"name": "Pooled Ltd"}, expected_version=0)).record
    assert (renamed.name, renamed.tier, renamed.in_pool) == ("Pooled Ltd", "B", True)
    with acting_as(*WEST_REP):
        claimed = (await handlers.claim_account(ctx, pooled.id, idempotency_key="")).record
    assert (claimed.owner_id, claimed.in_pool) == ("rep-w", False)


async def test_an_accounts_new_team_or_region_takes_its_contacts_and_open_tasks_along(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    dora = await new_contact(ctx, REP1, acme.id, "Dora")
    open_task = await new_task(ctx, REP1, acme.id, "call Dora")
    done_task = await new_task(ctx, REP1, acme.id, "send brochure")
    with acting_as(*REP1):
        await handlers.complete_task(ctx, done_task.id, expected_version=0)
    with acting_as(*ADMIN):
        await handlers.update_account(ctx, acme.id, {"team": "west", "region": "cn-west"}, expected_version=0)

    [contact] = await stored_contacts(ctx, dora.id)
    assert (contact.team, contact.region, contact.version) == ("west", "cn-west", 2)
    with acting_as(*WEST_MANAGER):
        assert (await handlers.get_contact(ctx, dora.id)).id == dora.id
    east_region = (Principal(user_id="mgr", roles=("sales_manager",)), RecordScope(ScopeKind.REGION, region="cn-east"))
    with acting_as(*east_region), pytest.raises(NotFound):
        await handlers.get_contact(ctx, dora.id)
    async with ctx.uow.engine.connect() as conn:
        t = repo.tasks
        rows = {row.id: row for row in await conn.execute(select(t).where(t.c.account_id == acme.id))}
    assert (rows[open_task.id].team, rows[open_task.id].region, rows[open_task.id].version) == ("west", "cn-west", 2)
    assert (rows[done_task.id].team, rows[done_task.id].region) == ("east", "cn-east")  # done: history stays
    [moved] = [e for e in await events(ctx, events_pb2.TaskUpdated) if e.task.id == open_task.id]
    assert (list(moved.changed_fields), moved.task.region) == (["region", "team"], "cn-west")


async def test_contacts_following_their_accounts_territory_or_owner_are_published_with_what_changed(
    ctx: Context,
) -> None:
    """A new team or region of the account, a claim, a transfer and a bulk transfer each publish the
    contacts they move, with the fields that changed for each; a contact that has the new owner and
    team already (one the claimant added to the pool account) is left as it is."""
    pooled = await pool_account(ctx, "Pooled")
    dora = await new_contact(ctx, REP1, pooled.id, "Dora")  # rep-1's: added while in the pool
    eli = await new_contact(ctx, REP2, pooled.id, "Eli")
    with acting_as(*ADMIN):
        await handlers.update_account(ctx, pooled.id, {"region": "cn-north"}, expected_version=0)
    with acting_as(*REP2):
        await handlers.claim_account(ctx, pooled.id, idempotency_key="")
    with acting_as(*ADMIN):
        await handlers.transfer_account(
            ctx, pooled.id, new_owner_id="rep-1", new_team="west", reason="cover", expected_version=0
        )
        await handlers.bulk_transfer(
            ctx, from_owner_id="rep-1", to_owner_id="rep-2", to_team="", reason="leave", idempotency_key=""
        )

    updates = await keyed_events(ctx, events_pb2.ContactUpdated)
    assert all(key == e.contact.id for key, e in updates)  # keyed by the contact, as its edits are

    def published(contact_id: str) -> list[tuple[str, str, str, int, list[str]]]:
        return [
            (e.contact.owner_id, e.contact.team, e.contact.region, e.contact.version, list(e.changed_fields))
            for _, e in updates
            if e.contact.id == contact_id
        ]

    assert published(dora.id) == [
        ("rep-1", "east", "cn-north", 2, ["region"]),  # the account's new region
        ("rep-2", "east", "cn-north", 3, ["owner_id"]),  # the claim
        ("rep-1", "west", "cn-north", 4, ["owner_id", "team"]),  # the transfer
        ("rep-2", "west", "cn-north", 5, ["owner_id"]),  # the bulk transfer
    ]
    assert published(eli.id) == [
        ("rep-2", "east", "cn-north", 2, ["region"]),
        # The claim left Eli as it was: rep-2's already.
        ("rep-1", "west", "cn-north", 3, ["owner_id", "team"]),
        ("rep-2", "west", "cn-north", 4, ["owner_id"]),
    ]
    [eli_now] = await stored_contacts(ctx, eli.id)
    assert eli_now.version == 4


async def test_a_task_moved_to_another_account_is_read_in_that_accounts_territory(ctx: Context) -> None:
    east = await new_account(ctx, REP1, "East Co")
    west = await new_account(ctx, ADMIN, "West Co", team="west", region="cn-west")
    task = await new_task(ctx, REP1, east.id, "call")
    with acting_as(*ADMIN):
        moved = (await handlers.update_task(ctx, task.id, {"account_id": west.id}, expected_version=0)).record
    assert (moved.account_id, moved.team, moved.region) == (west.id, "west", "cn-west")


async def stored_tasks(ctx: Context, *task_ids: str) -> list[Any]:
    """The tasks as stored, whoever may read them."""
    t = repo.tasks
    async with ctx.uow.engine.connect() as conn:
        return [(await conn.execute(select(t).where(t.c.id == task_id))).one() for task_id in task_ids]


async def open_task_titles(ctx: Context, who: Caller, account_id: str) -> list[str]:
    with acting_as(*who):
        rows, _ = await handlers.list_tasks(
            ctx, due="", account_id=account_id, owner_id="", statuses=["open"], page=PAGE
        )
    return [row.title for row in rows]


async def test_a_merge_takes_the_duplicates_open_tasks_into_the_survivors_territory(ctx: Context) -> None:
    """Moved to the survivor, an open task is read in its team and region, as a task moved to another
    account by an edit is: the survivor's team sees it, the duplicate's no longer does. A done task
    keeps the territory it was worked in."""
    acme = await new_account(ctx, ADMIN, "Acme", owner_id="rep-1", team="east", region="cn-east")
    twin = await new_account(ctx, ADMIN, "Acme West", owner_id="rep-w", team="west", region="cn-west")
    quote = await new_task(ctx, WEST_REP, twin.id, "send quote")
    brochure = await new_task(ctx, WEST_REP, twin.id, "send brochure")
    with acting_as(*WEST_REP):
        await handlers.complete_task(ctx, brochure.id, expected_version=0)
    with acting_as(*ADMIN):
        await handlers.merge_accounts(ctx, acme.id, twin.id, idempotency_key="")

    moved_quote, moved_brochure = await stored_tasks(ctx, quote.id, brochure.id)
    assert (moved_quote.account_id, moved_quote.team, moved_quote.region, moved_quote.version) == (
        acme.id,
        "east",
        "cn-east",
        2,
    )
    assert (moved_brochure.account_id, moved_brochure.team, moved_brochure.region) == (acme.id, "west", "cn-west")
    assert await open_task_titles(ctx, MANAGER, acme.id) == ["send quote"]
    assert await open_task_titles(ctx, WEST_MANAGER, acme.id) == []
    [published] = [e for e in await events(ctx, events_pb2.TaskUpdated) if e.task.id == quote.id]
    assert (published.task.team, published.task.region, published.task.version) == ("east", "cn-east", 2)
    assert list(published.changed_fields) == ["account_id", "region", "team"]


async def test_a_merge_into_an_account_without_a_team_keeps_the_open_tasks_team(ctx: Context) -> None:
    """A survivor without a team gives a moved open task its region only, as an edit moving the task
    there does: a task is never left in no team."""
    group = await new_account(ctx, ADMIN, "Group", owner_id="rep-1", region="cn-east")  # no team
    twin = await new_account(ctx, ADMIN, "Group West", owner_id="rep-w", team="west", region="cn-west")
    task = await new_task(ctx, WEST_REP, twin.id, "send quote")
    with acting_as(*ADMIN):
        await handlers.merge_accounts(ctx, group.id, twin.id, idempotency_key="")

    [moved] = await stored_tasks(ctx, task.id)
    assert (moved.account_id, moved.team, moved.region) == (group.id, "west", "cn-east")
    [published] = [e for e in await events(ctx, events_pb2.TaskUpdated) if e.task.id == task.id]
    assert list(published.changed_fields) == ["account_id", "region"]


async def _open_reminder(ctx: Context, account_id: str, rule_id: str) -> str:
    """An open reminder task as the reminder job raises one."""
    task_id, now = new_id(), utcnow()
    async with ctx.uow.engine.begin() as conn:
        await conn.execute(
            repo.tasks.insert().values(
                id=task_id, account_id=account_id, title="quiet", status="open", owner_id="rep-1", team="east",
                region="cn-east", source="reminder", reminder_rule_id=rule_id, created_at=now, updated_at=now,
            )
        )  # fmt: skip
    return task_id


async def test_a_merge_keeps_one_open_reminder_of_a_rule_the_survivors(ctx: Context) -> None:
    acme = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, REP1, "Acme Trading")
    kept = await _open_reminder(ctx, acme.id, "quiet-3-days")
    twins = await _open_reminder(ctx, twin.id, "quiet-3-days")
    other_rule = await _open_reminder(ctx, twin.id, "quiet-7-days")
    with acting_as(*REP1):
        merge = await handlers.merge_accounts(ctx, acme.id, twin.id, idempotency_key="")

    async with ctx.uow.engine.connect() as conn:
        t = repo.tasks
        rows = {row.id: (row.account_id, row.status) for row in await conn.execute(select(t))}
    assert rows == {kept: (acme.id, "open"), twins: (acme.id, "cancelled"), other_rule: (acme.id, "open")}
    assert merge.moved_tasks == 2
    [cancelled] = [e for e in await events(ctx, events_pb2.TaskUpdated) if "status" in e.changed_fields]
    assert (cancelled.task.id, cancelled.task.status, list(cancelled.changed_fields)) == (
        twins,
        "cancelled",
        ["status"],
    )


async def test_a_primary_contact_moved_to_an_account_with_one_is_no_longer_primary(ctx: Context) -> None:
    acme, globex, initech = [await new_account(ctx, REP1, name) for name in ("Acme", "Globex", "Initech")]
    ann = await new_primary_contact(ctx, REP1, acme.id, "Ann")
    bob = await new_primary_contact(ctx, REP1, globex.id, "Bob")
    cid = await new_primary_contact(ctx, REP1, acme.id, "Cid")  # Ann is demoted
    with acting_as(*REP1):
        to_globex = (await handlers.update_contact(ctx, cid.id, {"account_id": globex.id}, expected_version=0)).record
        to_initech = (await handlers.update_contact(ctx, bob.id, {"account_id": initech.id}, expected_version=0)).record
    assert (to_globex.account_id, to_globex.is_primary) == (globex.id, False)  # Globex had Bob
    assert (to_initech.account_id, to_initech.is_primary) == (initech.id, True)  # Initech had none
    [ann_now] = await stored_contacts(ctx, ann.id)
    assert not ann_now.is_primary


async def test_a_transfer_out_of_the_pool_gives_the_new_owner_the_whole_inactivity_period(ctx: Context) -> None:
    pooled = await pool_account(ctx, "Long Idle")
    long_ago = utcnow() - timedelta(days=60)
    async with ctx.uow.engine.begin() as conn:  # idle in the pool for two months
        accounts = repo.accounts
        await conn.execute(update(accounts).where(accounts.c.id == pooled.id).values(created_at=long_ago))
    with acting_as(*MANAGER):
        transferred = (
            await handlers.transfer_account(
                ctx, pooled.id, new_owner_id="rep-2", new_team="east", reason="territory", expected_version=0
            )
        ).record
    assert transferred.claimed_at is not None
    assert await handlers.return_inactive_accounts(ctx, batch_size=10) == 0
    with acting_as(*REP2):
        assert (await handlers.get_account(ctx, pooled.id)).owner_id == "rep-2"


async def test_concurrent_task_writes_at_one_version_let_one_through(pg_ctx: Context) -> None:
    """PostgreSQL: two edits (or completions) of a task sent with the same version: one is applied,
    the other is stale, never both applied over each other."""
    ctx = pg_ctx
    acme = await new_account(ctx, REP1, "Acme")
    for attempt in range(3):
        task = await new_task(ctx, REP1, acme.id, f"call {attempt}")
        with acting_as(*REP1):
            edits = await asyncio.gather(
                handlers.update_task(ctx, task.id, {"title": "first"}, expected_version=1),
                handlers.update_task(ctx, task.id, {"title": "second"}, expected_version=1),
                return_exceptions=True,
            )
            completions = await asyncio.gather(
                handlers.complete_task(ctx, task.id, expected_version=2),
                handlers.complete_task(ctx, task.id, expected_version=2),
                return_exceptions=True,
            )
        assert sorted(type(e).__name__ for e in edits) == ["Change", "StaleVersion"]
        assert sorted(type(e).__name__ for e in completions) == ["Change", "StaleVersion"]
    done = [e for e in await events(ctx, events_pb2.TaskCompleted)]
    assert len(done) == 3  # one per task


async def test_a_bulk_transfer_waiting_for_task_edits_moves_the_tasks_on_from_the_edited_versions(
    pg_ctx: Context,
) -> None:
    """PostgreSQL: while edits hold tasks of the departing rep (as UpdateTask does, FOR UPDATE), one on
    an account of theirs and one on another's, a bulk transfer waits for them, then gives each task
    the version after the edit's, published as stored: two states of a task never share a version."""
    ctx = pg_ctx
    theirs = await new_account(ctx, REP1, "Acme")
    others = await new_account(ctx, REP2, "Globex")
    follows_account = await new_task(ctx, REP1, theirs.id, "call")
    with acting_as(*MANAGER):
        loose = await handlers.create_task(
            ctx, {"account_id": others.id, "title": "visit", "owner_id": "rep-1"}, idempotency_key=""
        )

    async def transfer() -> Any:
        with acting_as(*MANAGER):
            return await handlers.bulk_transfer(
                ctx, from_owner_id="rep-1", to_owner_id="rep-3", to_team="", reason="leave", idempotency_key=""
            )

    tasks = repo.tasks
    edited = tasks.c.id.in_([follows_account.id, loose.id])
    async with ctx.uow.engine.begin() as edits:
        await edits.execute(select(tasks.c.id).where(edited).with_for_update())
        transferring = asyncio.create_task(transfer())
        await asyncio.sleep(0.5)
        assert not transferring.done(), "the transfer moved tasks being edited"
        await edits.execute(update(tasks).where(edited).values(notes="asked for a quote", version=2))
    await transferring

    stored = await stored_tasks(ctx, follows_account.id, loose.id)
    assert [(t.owner_id, t.notes, t.version) for t in stored] == [("rep-3", "asked for a quote", 3)] * 2
    published = {
        e.task.id: (e.task.owner_id, e.task.notes, e.task.version) for e in await events(ctx, events_pb2.TaskReassigned)
    }
    assert published == {
        follows_account.id: ("rep-3", "asked for a quote", 3),
        loose.id: ("rep-3", "asked for a quote", 3),
    }


async def test_concurrent_claims_of_one_rep_stop_at_the_daily_limit(pg_ctx: Context) -> None:
    ctx = pg_ctx
    ctx.policy = PoolPolicy(claim_limit_per_day=2)
    pooled = [await pool_account(ctx, f"Pooled {n}") for n in range(5)]
    with acting_as(*REP1):
        claims = await asyncio.gather(
            *(handlers.claim_account(ctx, account.id, idempotency_key="") for account in pooled),
            return_exceptions=True,
        )
    refused = [c for c in claims if isinstance(c, Conflict)]
    assert len(refused) == 3 and all(c.reason == "CLAIM_LIMIT" for c in refused), claims


async def test_concurrent_new_primary_contacts_leave_one_primary(pg_ctx: Context) -> None:
    ctx = pg_ctx
    acme = await new_account(ctx, REP1, "Acme")
    made = await asyncio.gather(*(new_primary_contact(ctx, REP1, acme.id, f"Contact {n}") for n in range(4)))
    stored = await stored_contacts(ctx, *(contact.id for contact in made))
    assert sum(contact.is_primary for contact in stored) == 1


async def test_a_task_created_while_its_account_is_merged_away_waits_and_is_refused(pg_ctx: Context) -> None:
    """PostgreSQL: while a merge holds the duplicate (FOR UPDATE, as MergeAccounts does), a task
    for it waits, then finds it merged: no open task lands on an account that is no more."""
    ctx = pg_ctx
    acme = await new_account(ctx, REP1, "Acme")
    twin = await new_account(ctx, REP1, "Acme Trading")
    async with ctx.uow.engine.begin() as merge:
        accounts = repo.accounts
        await merge.execute(select(accounts.c.id).where(accounts.c.id == twin.id).with_for_update())
        creating = asyncio.create_task(new_task(ctx, REP1, twin.id, "call"))
        await asyncio.sleep(0.5)
        assert not creating.done(), "a task was created on an account being merged"
        await merge.execute(update(accounts).where(accounts.c.id == twin.id).values(merged_into_id=acme.id))
    with pytest.raises(Conflict) as merged:
        await creating
    assert merged.value.reason == "MERGED"


async def test_a_merge_publishes_each_account_it_re_parents_in_a_new_version(ctx: Context) -> None:
    group = await new_account(ctx, REP1, "Group")
    twin = await new_account(ctx, REP1, "Group Holding")
    branch = await new_account(ctx, REP1, "Branch", parent_id=twin.id)
    with acting_as(*REP1):
        await handlers.merge_accounts(ctx, group.id, twin.id, idempotency_key="")
        with pytest.raises(StaleVersion):  # re-parented: a write at the version read before is stale
            await handlers.update_account(ctx, branch.id, {"tier": "A"}, expected_version=branch.version)
    updates = {e.account.id: e for e in await events(ctx, events_pb2.AccountUpdated)}
    moved = updates[branch.id]
    assert (moved.account.parent_id, list(moved.changed_fields)) == (group.id, ["parent_id"])
    assert moved.account.version == branch.version + 1
