"""Events this service consumes: work on an account's deals counts as activity on the account, so
an account with a moving opportunity neither returns to the public pool nor raises "not contacted"
reminders. Sales re-pointing a deal on its own (an account merge, a transfer) is no work on it, and
work counts at the deal's own time of it: imported history does not make a quiet account look
active. Idempotent: the inbox drops redeliveries, and the update only ever moves the time forward."""

from typing import Any

from crm.sales.v1 import events_pb2 as sales_events
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.timeutil import from_timestamp
from google.protobuf.timestamp_pb2 import Timestamp

from accounts import repository as repo

CONSUMER_GROUP = "accounts-sales-activity"
# What sales changes on a deal by itself: a merge moves the duplicate's deals to the survivor
# (account_id), a transfer hands them to the new owner (owner_id, team, region).
REPOINTED_FIELDS = frozenset({"account_id", "owner_id", "team", "region"})


async def _touch(tx: Transaction, account_id: str, worked_at: Timestamp, event: ReceivedEvent[Any]) -> None:
    """Activity on the account at `worked_at`, the record's own time of the work (an imported deal
    won a year ago was worked a year ago), never later than its event (a sales clock ahead of ours);
    at the event's time when the record has none."""
    own = from_timestamp(worked_at)
    when = event.headers.time if own is None else min(own, event.headers.time)
    await repo.touch_account(tx.conn, account_id, when)


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings) -> EventConsumer:
    async def on_created(tx: Transaction, event: ReceivedEvent[sales_events.OpportunityCreated]) -> None:
        deal = event.message.opportunity
        await _touch(tx, deal.account_id, deal.created_at, event)

    async def on_updated(tx: Transaction, event: ReceivedEvent[sales_events.OpportunityUpdated]) -> None:
        changed = set(event.message.changed_fields)
        if changed and changed <= REPOINTED_FIELDS:
            return
        deal = event.message.opportunity
        await _touch(tx, deal.account_id, deal.updated_at, event)

    async def on_stage_changed(tx: Transaction, event: ReceivedEvent[sales_events.OpportunityStageChanged]) -> None:
        deal = event.message.opportunity
        await _touch(tx, deal.account_id, deal.stage_entered_at, event)

    async def on_closed(tx: Transaction, event: ReceivedEvent[Any]) -> None:
        # OpportunityWon and OpportunityLost both carry the deal as `opportunity`.
        deal = event.message.opportunity
        await _touch(tx, deal.account_id, deal.closed_at, event)

    async def on_contract(tx: Transaction, event: ReceivedEvent[sales_events.ContractSigned]) -> None:
        contract = event.message.contract
        await _touch(tx, contract.account_id, contract.signed_at, event)

    return EventConsumer(
        name=CONSUMER_GROUP,
        uow=uow,
        metadata=repo.metadata,
        kafka=kafka,
        handlers={
            sales_events.OpportunityCreated: on_created,
            sales_events.OpportunityUpdated: on_updated,
            sales_events.OpportunityStageChanged: on_stage_changed,
            sales_events.OpportunityWon: on_closed,
            sales_events.OpportunityLost: on_closed,
            sales_events.ContractSigned: on_contract,
        },
        service="accounts",
    )
