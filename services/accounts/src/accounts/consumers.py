"""Events this service consumes: work on an account's deals counts as activity on the account, so
an account with a moving opportunity neither returns to the public pool nor raises "not contacted"
reminders. Idempotent: the inbox drops redeliveries, and the update only ever moves the time forward."""

from datetime import datetime
from typing import Any

from crm.sales.v1 import events_pb2 as sales_events
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.outbox import Transaction, UnitOfWork
from sqlalchemy import or_, update

from accounts import repository as repo

CONSUMER_GROUP = "accounts-sales-activity"


async def touch_account(tx: Transaction, account_id: str, when: datetime) -> None:
    a = repo.accounts
    if not account_id:
        return
    await tx.conn.execute(
        update(a)
        .where(a.c.id == account_id, or_(a.c.last_activity_at.is_(None), a.c.last_activity_at < when))
        .values(last_activity_at=when)
    )


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings) -> EventConsumer:
    async def on_opportunity(tx: Transaction, event: ReceivedEvent[Any]) -> None:
        # Every opportunity event above carries the deal as `opportunity`.
        await touch_account(tx, event.message.opportunity.account_id, event.headers.time)

    async def on_contract(tx: Transaction, event: ReceivedEvent[sales_events.ContractSigned]) -> None:
        await touch_account(tx, event.message.contract.account_id, event.headers.time)

    return EventConsumer(
        name=CONSUMER_GROUP,
        uow=uow,
        metadata=repo.metadata,
        kafka=kafka,
        handlers={
            sales_events.OpportunityCreated: on_opportunity,
            sales_events.OpportunityUpdated: on_opportunity,
            sales_events.OpportunityStageChanged: on_opportunity,
            sales_events.OpportunityWon: on_opportunity,
            sales_events.OpportunityLost: on_opportunity,
            sales_events.ContractSigned: on_contract,
        },
        service="accounts",
    )
