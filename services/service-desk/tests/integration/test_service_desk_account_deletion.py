"""AccountDeleted and AccountMerged from the accounts context (SPEC §7, §10), through the
consumer's handler (no broker), on SQLite and PostgreSQL: the account's tickets are closed as a
close by hand would be (events, stopped SLA clocks) and kept as history; the account takes no new
tickets; a redelivery, a late update or a merge applied before or after the deletion ends the same.
Merges of different accounts arrive in any order: a merged account's tickets, and new tickets that
name it, end on the last survivor of its chain of merges, at its tier, or closed if it was deleted."""

import asyncio
import contextlib
import itertools
from datetime import timedelta
from typing import Any

import pytest
from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.servicedesk.v1 import events_pb2 as desk_events
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.consumer import ReceivedEvent
from crm_platform.errors import Conflict, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import utcnow
from google.protobuf.message import Message
from service_desk import handlers
from service_desk import repository as repo
from service_desk.consumers import build_consumer
from service_desk.handlers import Context
from service_desk.repository import TicketFilter
from sqlalchemy import select

pytestmark = pytest.mark.integration

STATUS_CHANGED = "crm.service.ticket.status_changed"
CLOSED = "crm.service.ticket.closed"
UPDATED = "crm.service.ticket.updated"


async def _row(ctx: Context, ticket_id: str) -> Any:
    row, _, _, _ = await handlers.get_ticket(ctx, ticket_id)
    return row


async def _events(ctx: Context, key: str) -> list[tuple[str, bytes]]:
    return await outbox_events(ctx.uow.engine, repo.metadata, key)


async def deliver(ctx: Context, *messages: Message) -> None:
    """Each event in its own transaction, through the handler the accounts consumer calls."""
    consumer = build_consumer(ctx.uow, KafkaSettings(), "service-desk")
    for message in messages:
        event_type = spec_of(message).type
        _, handle = consumer.handlers[event_type]
        headers = CloudEventHeaders(id=new_id(), type=event_type, source="/test", time=utcnow())
        async with ctx.uow.begin() as tx:
            await handle(tx, ReceivedEvent(headers, message, "", "crm.accounts.v1", 0, 0))


def created(account_id: str, tier: str = "B", region: str = "east") -> accounts_events.AccountCreated:
    return accounts_events.AccountCreated(account=accounts_pb2.Account(id=account_id, tier=tier, region=region))


def deleted(account_id: str) -> accounts_events.AccountDeleted:
    return accounts_events.AccountDeleted(account_id=account_id)


def merged(survivor_id: str, duplicate_id: str) -> accounts_events.AccountMerged:
    return accounts_events.AccountMerged(survivor_id=survivor_id, duplicate_id=duplicate_id)


async def _ticket(ctx: Context, account_id: str, *, dispatch: bool = False, priority: str = "urgent") -> Any:
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": f"Issue of {account_id}", "account_id": account_id, "priority": priority},
        idempotency_key="", skip_dispatch=not dispatch,
    )  # fmt: skip
    return ticket


async def _return_visit(ctx: Context, account_id: str) -> Any:
    """The return visit scheduled by resolving a ticket of the (tier-A) account."""
    ticket = await _ticket(ctx, account_id)
    await handlers.change_status(ctx, ticket["id"], "resolved", expected_version=0, note="")
    table = repo.return_visits
    async with ctx.uow.engine.connect() as conn:
        return (await conn.execute(select(table).where(table.c.ticket_id == ticket["id"]))).one()


async def _visit_row(ctx: Context, visit_id: str) -> Any:
    table = repo.return_visits
    async with ctx.uow.engine.connect() as conn:
        return (await conn.execute(select(table).where(table.c.id == visit_id))).one()


async def _visits(ctx: Context, *, account_id: str = "", status: str = "") -> list[str]:
    rows, _ = await handlers.list_return_visits(
        ctx, account_id=account_id, status=status, assignee_id="", due_before=None, page=handlers.Page()
    )
    return [row.id for row in rows]


async def _outbox_size(ctx: Context) -> int:
    async with ctx.uow.engine.connect() as conn:
        return len(list(await conn.execute(select(repo.metadata.tables["outbox"].c.seq))))


async def test_deleting_an_account_closes_its_tickets_and_keeps_them_as_history(ctx: Context) -> None:
    start = utcnow()
    ctx.clock = lambda: start
    await deliver(ctx, created("acme", tier="A"), created("other"))
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Bo", "region": "east"}, idempotency_key="")
    queued = await _ticket(ctx, "acme")
    working = await _ticket(ctx, "acme", dispatch=True)
    await handlers.change_status(ctx, working["id"], "in_progress", expected_version=0, note="")
    waiting = await _ticket(ctx, "acme", dispatch=True)
    await handlers.change_status(ctx, waiting["id"], "waiting_customer", expected_version=0, note="")
    resolved = await _ticket(ctx, "acme", dispatch=True)
    await handlers.change_status(ctx, resolved["id"], "resolved", expected_version=0, note="")
    await handlers.submit_csat(ctx, resolved["id"], 4, "Quick", idempotency_key="")
    spam = await _ticket(ctx, "acme")
    await handlers.change_status(ctx, spam["id"], "closed", expected_version=0, note="spam")
    elsewhere = await _ticket(ctx, "other")
    spam_events = await _events(ctx, spam["id"])

    await deliver(ctx, deleted("acme"))

    was = [(queued, "new"), (working, "in_progress"), (waiting, "waiting_customer"), (resolved, "resolved")]
    for ticket, previous in was:
        row = await _row(ctx, ticket["id"])
        assert (row.account_id, row.status, row.next_sla_check_at) == ("acme", "closed", None)
        assert row.closed_at is not None
        events = [event for event in await _events(ctx, ticket["id"]) if event[0].startswith("crm.service.ticket.")]
        assert [event_type for event_type, _ in events[-2:]] == [STATUS_CHANGED, CLOSED]
        change = desk_events.TicketStatusChanged.FromString(events[-2][1])
        assert (change.from_status, change.to_status, change.ticket.status) == (previous, "closed", "closed")
        _, comments, _, _ = await handlers.get_ticket(ctx, ticket["id"])
        assert [c.body for c in comments if not c.public][-1] == "Closed: account acme was deleted."
    # Resolved before, it keeps its resolution and survey; closed unresolved, it takes no survey.
    assert (await _row(ctx, resolved["id"])).resolved_at is not None
    surveys, _ = await handlers.list_csat(ctx, ticket_id="", account_id="acme", page=handlers.Page())
    assert [s.score for s in surveys] == [4]
    with pytest.raises(Conflict) as caught:
        await handlers.submit_csat(ctx, working["id"], 5, "", idempotency_key="")
    assert caught.value.reason == "TICKET_NOT_RESOLVED"
    # Closed already: untouched. Another account's ticket: untouched. The agent's capacity is free.
    assert await _events(ctx, spam["id"]) == spam_events
    assert (await _row(ctx, elsewhere["id"])).status == "new"
    async with ctx.uow.engine.connect() as conn:
        assert await repo.open_ticket_counts(conn, ["ag-1"]) == {}
    # The SLA clocks stopped: nothing is ever announced about these tickets.
    ctx.clock = lambda: start + timedelta(days=30)
    assert await handlers.run_sla_timer(ctx, batch_size=50) == 1  # the other account's ticket only
    for ticket in (queued, working, waiting, resolved):
        assert not {t for t, _ in await _events(ctx, ticket["id"])} & {
            "crm.service.ticket.sla_warning",
            "crm.service.ticket.sla_breached",
        }


async def test_a_deleted_account_takes_no_new_tickets_even_after_a_late_update(ctx: Context) -> None:
    # "ghost" was never seen created here: its deletion is remembered all the same.
    await deliver(ctx, created("acme"), deleted("acme"), created("acme", tier="A"), deleted("ghost"))
    for account_id in ("acme", "ghost"):
        with pytest.raises(ValidationFailed) as caught:
            await _ticket(ctx, account_id)
        errors = [(e.field, e.message) for e in caught.value.errors]
        assert errors == [("account_id", f"account {account_id} was deleted")]
    ticket = await _ticket(ctx, "")
    with pytest.raises(ValidationFailed) as caught:
        await handlers.update_ticket(ctx, ticket["id"], {"account_id": "acme"}, expected_version=0)
    assert caught.value.errors[0].field == "account_id"
    assert (await _row(ctx, ticket["id"])).account_id == ""


async def test_an_account_deletion_applied_twice_changes_nothing_the_second_time(ctx: Context) -> None:
    await deliver(ctx, created("acme", tier="A"))
    ticket = await _ticket(ctx, "acme")
    visit = await _return_visit(ctx, "acme")
    await deliver(ctx, deleted("acme"))
    row, outbox = await _row(ctx, ticket["id"]), await _outbox_size(ctx)
    cancelled = await _visit_row(ctx, visit.id)
    table = repo.account_tiers
    async with ctx.uow.engine.connect() as conn:
        deleted_at = await conn.scalar(select(table.c.deleted_at).where(table.c.account_id == "acme"))
    await deliver(ctx, deleted("acme"))  # redelivered under another event id: past the inbox
    assert await _row(ctx, ticket["id"]) == row
    assert await _visit_row(ctx, visit.id) == cancelled
    assert await _outbox_size(ctx) == outbox
    async with ctx.uow.engine.connect() as conn:
        assert await conn.scalar(select(table.c.deleted_at).where(table.c.account_id == "acme")) == deleted_at


@pytest.mark.parametrize("deletion_first", [True, False], ids=["deletion-first", "merge-first"])
async def test_tickets_merged_into_a_deleted_account_are_closed_in_either_order(
    ctx: Context, deletion_first: bool
) -> None:
    # The merge travels under the duplicate's key, the deletion under the survivor's: any order.
    await deliver(ctx, created("dup"), created("acme", tier="A"))
    moved, own = await _ticket(ctx, "dup"), await _ticket(ctx, "acme")
    events = [deleted("acme"), merged("acme", "dup")]
    await deliver(ctx, *(events if deletion_first else reversed(events)))
    for ticket in (moved, own):
        row = await _row(ctx, ticket["id"])
        assert (row.account_id, row.status, row.next_sla_check_at) == ("acme", "closed", None)
        assert [t for t, _ in await _events(ctx, ticket["id"])].count(CLOSED) == 1
    with pytest.raises(ValidationFailed):
        await _ticket(ctx, "acme")


async def test_tickets_wait_for_a_deletion_being_applied_on_postgres(ctx_on_postgres: Context) -> None:
    """A ticket created, or moved by a merge, while the deletion of its account is being applied
    waits for it: the ticket is then refused, the moved one closed; none is left open."""
    ctx = ctx_on_postgres
    await deliver(ctx, created("dup"), created("acme"))
    moving = await _ticket(ctx, "dup")
    applied, release = asyncio.Event(), asyncio.Event()

    async def delete_and_hold() -> None:
        async with ctx.uow.begin() as tx:
            await handlers.apply_account_deleted(tx, "acme")
            applied.set()
            await release.wait()

    deletion = asyncio.create_task(delete_and_hold())
    await applied.wait()
    creating = asyncio.create_task(_ticket(ctx, "acme"))
    merging = asyncio.create_task(deliver(ctx, merged("acme", "dup")))
    await asyncio.sleep(0.5)
    assert not creating.done() and not merging.done()
    release.set()
    await deletion
    with pytest.raises(ValidationFailed):
        await creating
    await merging
    row = await _row(ctx, moving["id"])
    assert (row.account_id, row.status) == ("acme", "closed")


# --- merges ----------------------------------------------------------------------------------------


def orders(*events: Message) -> pytest.MarkDecorator:
    """Every order of the events (each travels under its own account's key), named as "a>b,-c":
    a merged into b, then c deleted."""

    def name(event: Any) -> str:
        return f"{event.duplicate_id}>{event.survivor_id}" if hasattr(event, "survivor_id") else f"-{event.account_id}"

    return pytest.mark.parametrize(
        "events", list(itertools.permutations(events)), ids=lambda order: ",".join(map(name, order))
    )


@orders(merged("b", "a"), merged("c", "b"), merged("d", "c"))
async def test_tickets_of_a_chain_of_merges_end_on_its_last_survivor_in_any_order(
    ctx: Context, events: tuple[Message, ...]
) -> None:
    await deliver(ctx, created("a"), created("b"), created("c"), created("d", tier="A", region="north"))
    await handlers.create_agent(ctx, {"id": "ag-1", "name": "Bo", "region": "east"}, idempotency_key="")
    answered = await _ticket(ctx, "a", dispatch=True, priority="normal")
    await handlers.change_status(ctx, answered["id"], "resolved", expected_version=0, note="")
    await handlers.submit_csat(ctx, answered["id"], 5, "", idempotency_key="")
    open_ones = [await _ticket(ctx, account_id, priority="normal") for account_id in "abc"]

    await deliver(ctx, *events)

    for ticket in open_ones:
        row = await _row(ctx, ticket["id"])
        # Served at d's tier: VIP, one priority up.
        assert (row.account_id, row.account_tier, row.effective_priority) == ("d", "A", "high")
        # Consumers learn where it went, and at which version, from its last ticket.updated.
        last_update = [payload for event_type, payload in await _events(ctx, ticket["id"]) if event_type == UPDATED][-1]
        published = desk_events.TicketUpdated.FromString(last_update).ticket
        assert (published.account_id, published.effective_priority, published.version) == ("d", "high", row.version)
    # A resolved ticket and its survey follow too. The ticket takes d's tier, to be worked at if it is
    # reopened, but keeps the priority its resolution was judged at.
    row = await _row(ctx, answered["id"])
    assert (row.account_id, row.account_tier, row.effective_priority) == ("d", "A", "normal")
    surveys, _ = await handlers.list_csat(ctx, ticket_id="", account_id="d", page=handlers.Page())
    assert [s.ticket_id for s in surveys] == [answered["id"]]
    # Filtered by any account of the chain, the tickets are found where they went.
    on_d, _ = await handlers.list_tickets(ctx, TicketFilter(account_id="d"), handlers.Page())
    assert {row.id for row in on_d} == {answered["id"], *(ticket["id"] for ticket in open_ones)}
    for account_id in "abc":
        assert (await handlers.list_tickets(ctx, TicketFilter(account_id=account_id), handlers.Page()))[0] == on_d


@orders(merged("b", "a"), merged("c", "b"), deleted("c"))
async def test_tickets_merged_along_a_chain_into_a_deleted_account_are_closed_in_any_order(
    ctx: Context, events: tuple[Message, ...]
) -> None:
    await deliver(ctx, created("a"), created("b"), created("c"))
    moved = [await _ticket(ctx, "a"), await _ticket(ctx, "b")]
    await deliver(ctx, *events)
    for ticket in moved:
        row = await _row(ctx, ticket["id"])
        assert (row.account_id, row.status, row.next_sla_check_at) == ("c", "closed", None)
        assert [t for t, _ in await _events(ctx, ticket["id"])].count(CLOSED) == 1


async def test_a_ticket_naming_a_merged_away_account_goes_to_the_account_it_lives_on_as(ctx: Context) -> None:
    await deliver(ctx, created("a"), created("b"), created("c", tier="A", region="north"))
    await deliver(ctx, merged("c", "b"), merged("b", "a"))
    # Created: on c, at c's tier, in c's region (the ticket names none).
    ticket = await _ticket(ctx, "a", priority="normal")
    assert (ticket["account_id"], ticket["account_tier"], ticket["effective_priority"]) == ("c", "A", "high")
    assert ticket["region"] == "north"
    # Moved by an update: on c, at c's tier.
    other = await _ticket(ctx, "", priority="normal")
    moved = (await handlers.update_ticket(ctx, other["id"], {"account_id": "a"}, expected_version=0)).record
    assert (moved["account_id"], moved["account_tier"], moved["effective_priority"]) == ("c", "A", "high")
    # Naming another id of the account it is on already changes nothing.
    events = await _events(ctx, other["id"])
    again = (await handlers.update_ticket(ctx, other["id"], {"account_id": "b"}, expected_version=0)).record
    assert (again["account_id"], again["version"]) == ("c", moved["version"])
    assert await _events(ctx, other["id"]) == events


async def test_a_ticket_naming_an_account_merged_into_a_deleted_one_is_refused(ctx: Context) -> None:
    await deliver(ctx, created("a"), created("b"), merged("b", "a"), deleted("b"))
    with pytest.raises(ValidationFailed) as caught:
        await _ticket(ctx, "a")
    errors = [(e.field, e.message) for e in caught.value.errors]
    assert errors == [("account_id", "account a was merged into b, which was deleted")]


async def test_a_merge_that_would_close_a_cycle_is_ignored(ctx: Context) -> None:
    await deliver(ctx, created("a"), created("b"))
    tickets = [await _ticket(ctx, "a"), await _ticket(ctx, "b")]
    # Bad data: a into b, then b into a, and a into itself.
    await deliver(ctx, merged("b", "a"), merged("a", "b"), merged("a", "a"))
    for ticket in tickets:
        assert (await _row(ctx, ticket["id"])).account_id == "b"
    for account_id in "ab":
        assert (await _ticket(ctx, account_id))["account_id"] == "b"


async def test_account_events_without_an_account_id_leave_tickets_without_an_account_alone(ctx: Context) -> None:
    ticket = await _ticket(ctx, "")
    outbox = await _outbox_size(ctx)
    await deliver(ctx, created("", tier="A"), merged("acme", ""), merged("", "acme"), deleted(""))
    row = await _row(ctx, ticket["id"])
    assert (row.account_id, row.status, row.account_tier) == ("", "new", "")
    assert await _outbox_size(ctx) == outbox


async def test_merges_wait_for_the_merge_of_their_survivor_being_applied_on_postgres(
    ctx_on_postgres: Context,
) -> None:
    """A merge into b, or a ticket for b, while b's own merge into c is being applied waits for it,
    then goes on to c."""
    ctx = ctx_on_postgres
    await deliver(ctx, created("a"), created("b"), created("c", tier="A"))
    moving = await _ticket(ctx, "a")
    applied, release = asyncio.Event(), asyncio.Event()

    async def merge_and_hold() -> None:
        async with ctx.uow.begin() as tx:
            await handlers.apply_account_merge(tx, "c", "b")
            applied.set()
            await release.wait()

    merge = asyncio.create_task(merge_and_hold())
    await applied.wait()
    merging = asyncio.create_task(deliver(ctx, merged("b", "a")))
    creating = asyncio.create_task(_ticket(ctx, "b"))
    await asyncio.sleep(0.5)
    assert not merging.done() and not creating.done()
    release.set()
    await merge
    await merging
    assert ((await _row(ctx, moving["id"])).account_id, (await creating)["account_id"]) == ("c", "c")


async def test_moving_a_ticket_to_an_account_while_a_merge_into_it_is_applied_does_not_deadlock_on_postgres(
    ctx_on_postgres: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent moves a ticket of d to s while AccountMerged(s <- d) is applied. Both lock the
    accounts before the ticket, so one waits for the other; in the opposite order PostgreSQL aborts
    one of them with a deadlock."""
    ctx = ctx_on_postgres
    await deliver(ctx, created("s"), created("d"))
    ticket = await _ticket(ctx, "d")
    agent_holds_ticket, merge_holds_accounts = asyncio.Event(), asyncio.Event()
    lock_ticket, lock_chain = handlers._ticket_for_update, handlers._merge_chain

    async def ticket_then_wait_for_the_merge(conn: Any, ticket_id: str) -> Any:
        locked = await lock_ticket(conn, ticket_id)
        agent_holds_ticket.set()
        with contextlib.suppress(TimeoutError):  # the merge may wait for this update instead
            await asyncio.wait_for(merge_holds_accounts.wait(), 0.5)
        return locked

    async def chain_then_tell(conn: Any, account_id: str, *, lock: Any) -> Any:
        chain = await lock_chain(conn, account_id, lock=lock)
        if lock == "exclusive":
            merge_holds_accounts.set()
        return chain

    monkeypatch.setattr(handlers, "_ticket_for_update", ticket_then_wait_for_the_merge)
    monkeypatch.setattr(handlers, "_merge_chain", chain_then_tell)

    async def merge_once_the_agent_holds_the_ticket() -> None:
        await agent_holds_ticket.wait()
        await deliver(ctx, merged("s", "d"))

    moved, _ = await asyncio.gather(
        handlers.update_ticket(ctx, ticket["id"], {"account_id": "s"}, expected_version=ticket["version"]),
        merge_once_the_agent_holds_the_ticket(),
    )
    assert moved.record["account_id"] == "s" and (await _row(ctx, ticket["id"])).account_id == "s"


# --- return visits of a deleted account --------------------------------------------------------------

VISIT_CANCELLED = "crm.service.return_visit.cancelled"


async def test_deleting_an_account_cancels_its_open_return_visits_and_keeps_the_done_ones(ctx: Context) -> None:
    await deliver(ctx, created("acme", tier="A"), created("other", tier="A"))
    scheduled, called = await _return_visit(ctx, "acme"), await _return_visit(ctx, "acme")
    await handlers.complete_return_visit(ctx, called.id, "Happy with the fix")
    elsewhere = await _return_visit(ctx, "other")

    await deliver(ctx, deleted("acme"))

    # Off the agents' open lists, and listed as cancelled, saying why.
    assert await _visits(ctx, status="open") == [elsewhere.id]
    assert await _visits(ctx, status="cancelled") == [scheduled.id]
    visit = await _visit_row(ctx, scheduled.id)
    assert (visit.status, visit.notes, visit.completed_at) == (
        "cancelled",
        "Cancelled: account acme was deleted.",
        None,
    )
    done = await _visit_row(ctx, called.id)
    assert (done.status, done.notes) == ("done", "Happy with the fix")
    # Announced once, after the ticket's close, under the ticket's key as its scheduling was.
    events = await _events(ctx, scheduled.ticket_id)
    assert [event_type for event_type, _ in events].count(VISIT_CANCELLED) == 1
    assert events[-1][0] == VISIT_CANCELLED
    announced = desk_events.ReturnVisitCancelled.FromString(events[-1][1])
    assert (announced.return_visit.id, announced.return_visit.status, announced.reason) == (
        scheduled.id, "cancelled", "account_deleted"
    )  # fmt: skip
    assert VISIT_CANCELLED not in {event_type for event_type, _ in await _events(ctx, called.ticket_id)}
    # Nobody is left to call: completing it is refused.
    with pytest.raises(Conflict) as caught:
        await handlers.complete_return_visit(ctx, scheduled.id, "Called anyway")
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert (await _visit_row(ctx, scheduled.id)).status == "cancelled"


@pytest.mark.parametrize("deletion_first", [True, False], ids=["deletion-first", "merge-first"])
async def test_return_visits_merged_into_a_deleted_account_are_cancelled_in_either_order(
    ctx: Context, deletion_first: bool
) -> None:
    await deliver(ctx, created("dup", tier="A"), created("acme", tier="A"))
    moved, own = await _return_visit(ctx, "dup"), await _return_visit(ctx, "acme")
    events = [deleted("acme"), merged("acme", "dup")]
    await deliver(ctx, *(events if deletion_first else reversed(events)))
    for visit in (moved, own):
        row = await _visit_row(ctx, visit.id)
        assert (row.account_id, row.status) == ("acme", "cancelled")
        assert [t for t, _ in await _events(ctx, visit.ticket_id)].count(VISIT_CANCELLED) == 1


async def test_listing_return_visits_by_an_unknown_status_names_the_status(ctx: Context) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await _visits(ctx, status="skipped")
    assert [(e.field, e.message) for e in caught.value.errors] == [("status", "must be one of open, done, cancelled")]


# --- lists filtered by a merged-away account ---------------------------------------------------------


@orders(merged("b", "a"), merged("c", "b"))
async def test_lists_filtered_by_a_merged_away_account_find_the_records_where_they_went(
    ctx: Context, events: tuple[Message, ...]
) -> None:
    await deliver(ctx, created("a", tier="A"), created("b"), created("c"), created("z", tier="A"))
    visit = await _return_visit(ctx, "a")
    await handlers.submit_csat(ctx, visit.ticket_id, 5, "", idempotency_key="")
    other = await _return_visit(ctx, "z")  # another account's records are not found

    await deliver(ctx, *events)

    for account_id in "abc":
        tickets, _ = await handlers.list_tickets(ctx, TicketFilter(account_id=account_id), handlers.Page())
        surveys, _ = await handlers.list_csat(ctx, ticket_id="", account_id=account_id, page=handlers.Page())
        assert [row.id for row in tickets] == [visit.ticket_id]
        assert [row.ticket_id for row in surveys] == [visit.ticket_id]
        assert await _visits(ctx, account_id=account_id) == [visit.id]
    assert other.id not in await _visits(ctx, account_id="a")


async def test_a_list_filtered_by_an_account_does_not_wait_for_a_merge_being_applied_on_postgres(
    ctx_on_postgres: Context,
) -> None:
    """A list takes no lock: while b's merge into c is applied (the chain locked), a list by b
    answers at once, with what is committed (the ticket still on b), and by c after the merge."""
    ctx = ctx_on_postgres
    await deliver(ctx, created("b"), created("c"))
    ticket = await _ticket(ctx, "b")
    applied, release = asyncio.Event(), asyncio.Event()

    async def merge_and_hold() -> None:
        async with ctx.uow.begin() as tx:
            await handlers.apply_account_merge(tx, "c", "b")
            applied.set()
            await release.wait()

    merge = asyncio.create_task(merge_and_hold())
    await applied.wait()
    try:
        async with asyncio.timeout(5):
            listed, _ = await handlers.list_tickets(ctx, TicketFilter(account_id="b"), handlers.Page())
    finally:
        release.set()
        await merge
    assert [row.id for row in listed] == [ticket["id"]]
    moved, _ = await handlers.list_tickets(ctx, TicketFilter(account_id="b"), handlers.Page())
    assert [(row.id, row.account_id) for row in moved] == [(ticket["id"], "c")]
