"""Events this service consumes: work on an account's deals counts as activity on the account, so
an account with a moving opportunity neither returns to the public pool nor raises "not contacted"
reminders. Idempotent: the inbox drops redeliveries, and the update only ever moves the time forward."""

from typing import Any

from crm.sales.v1 import events_pb2 as sales_events
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.outbox import Transaction, UnitOfWork

from accounts import repository as repo

CONSUMER_GROUP = "accounts-sales-activity"


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings) -> EventConsumer:
    async def on_opportunity(tx: Transaction, event: ReceivedEvent[Any]) -> None:
        # Every opportunity event above carries the deal as `opportunity`.
        await repo.touch_account(tx.conn, event.message.opportunity.account_id, event.headers.time)

    async def on_contract(tx: Transaction, event: ReceivedEvent[sales_events.ContractSigned]) -> None:
        await repo.touch_account(tx.conn, event.message.contract.account_id, event.headers.time)

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
