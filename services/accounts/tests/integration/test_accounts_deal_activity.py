"""Work on an account's deals in sales counts as activity on the account (SPEC §5: an account with no
activity returns to the public pool), through the sales consumer's handlers (no broker), on SQLite
and PostgreSQL. Sales re-pointing a deal by itself (an account merge, a transfer) is no work on it;
work counts at the deal's own time of it, never later than its event, and never moves the
account's last activity back."""

from datetime import datetime, timedelta
from typing import Any

import pytest
from accounts import handlers
from accounts import repository as repo
from accounts.consumers import build_consumer
from accounts.handlers import Context
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.consumer import ReceivedEvent
from crm_platform.ids import new_id
from crm_platform.principal import ALL_RECORDS, SYSTEM, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from google.protobuf.message import Message
from sqlalchemy import update

pytestmark = pytest.mark.integration

REP1 = (
    Principal(user_id="rep-1", roles=("sales_rep",), team="east", region="cn-east"),
    RecordScope(ScopeKind.OWN, owner_id="rep-1"),
)


async def quiet_account(ctx: Context, idle_since: datetime) -> Any:
    """A tier-C account of rep-1 (back to the pool after 7 quiet days), created and last worked on
    at `idle_since`."""
    with acting_as(*REP1):
        account = await handlers.create_account(ctx, {"name": "Acme", "tier": "C"}, idempotency_key="", in_pool=False)
    async with ctx.uow.begin() as tx:
        a = repo.accounts
        await tx.conn.execute(
            update(a).where(a.c.id == account.id).values(created_at=idle_since, last_activity_at=idle_since)
        )
    return account


def deal(account_id: str, **times: datetime) -> sales_pb2.Opportunity:
    """A deal of the account as sales publishes it, with the given times (created_at, closed_at, ...)."""
    return sales_pb2.Opportunity(
        id=new_id(), account_id=account_id, **{name: to_timestamp(value) for name, value in times.items()}
    )


async def deliver(ctx: Context, message: Message, *, published_at: datetime) -> None:
    """The event, published by sales at `published_at`, through the handler the sales consumer calls."""
    event_type = spec_of(message).type
    _, handle = build_consumer(ctx.uow, KafkaSettings()).handlers[event_type]
    headers = CloudEventHeaders(id=new_id(), type=event_type, source="/crm/sales", time=published_at)
    async with ctx.uow.begin() as tx:
        await handle(tx, ReceivedEvent(headers, message, "", "crm.sales.v1", 0, 0))


async def last_activity_at(ctx: Context, account_id: str) -> Any:
    with acting_as(*REP1):
        return (await handlers.get_account(ctx, account_id)).last_activity_at


async def returned_to_pool(ctx: Context) -> int:
    with acting_as(SYSTEM, ALL_RECORDS):
        return await handlers.return_inactive_accounts(ctx, batch_size=10)


async def test_deals_re_pointed_by_a_merge_or_a_transfer_are_no_work_on_the_account(ctx: Context) -> None:
    now = utcnow()
    acme = await quiet_account(ctx, now - timedelta(days=60))
    moved = deal(acme.id, updated_at=now)
    for changed in (["account_id"], ["owner_id", "region", "team"]):
        updated = sales_events.OpportunityUpdated(opportunity=moved, changed_fields=changed)
        await deliver(ctx, updated, published_at=now)

    assert await last_activity_at(ctx, acme.id) == now - timedelta(days=60)
    assert await returned_to_pool(ctx) == 1


async def test_a_deal_worked_on_counts_at_its_own_time_never_later_than_its_event(ctx: Context) -> None:
    now = utcnow()
    acme = await quiet_account(ctx, now - timedelta(days=60))
    edited = deal(acme.id, updated_at=now - timedelta(hours=2))
    # Moved to this account by hand and edited: work on the deal, not only a re-pointing.
    updated = sales_events.OpportunityUpdated(opportunity=edited, changed_fields=["account_id", "amount"])
    await deliver(ctx, updated, published_at=now)
    assert await last_activity_at(ctx, acme.id) == now - timedelta(hours=2)

    ahead = deal(acme.id, stage_entered_at=now + timedelta(hours=1))  # a sales clock ahead of the event's
    await deliver(ctx, sales_events.OpportunityStageChanged(opportunity=ahead), published_at=now)
    assert await last_activity_at(ctx, acme.id) == now
    assert await returned_to_pool(ctx) == 0


async def test_history_imported_or_recorded_late_does_not_make_a_quiet_account_active(ctx: Context) -> None:
    now = utcnow()
    acme = await quiet_account(ctx, now - timedelta(days=60))
    year_ago = now - timedelta(days=365)
    imported = deal(acme.id, created_at=year_ago, closed_at=year_ago + timedelta(days=30), updated_at=now)
    await deliver(ctx, sales_events.OpportunityCreated(opportunity=imported), published_at=now)
    await deliver(ctx, sales_events.OpportunityLost(opportunity=imported), published_at=now)
    signed = sales_pb2.Contract(id=new_id(), account_id=acme.id, signed_at=to_timestamp(now - timedelta(days=90)))
    await deliver(ctx, sales_events.ContractSigned(contract=signed), published_at=now)

    # Neither made the account active now, nor moved its last activity back to when they happened.
    assert await last_activity_at(ctx, acme.id) == now - timedelta(days=60)
    assert await returned_to_pool(ctx) == 1
