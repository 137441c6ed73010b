"""Events this service consumes: accounts' tiers and regions, kept as a projection so tier-A (VIP)
tickets are raised one priority without ever reading the accounts database; merges re-point
tickets to the surviving account (the last of a chain of merges, whatever order they arrive in); a
deleted account's tickets are closed and it takes no new ones."""

from crm.accounts.v1 import events_pb2
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.outbox import Transaction, UnitOfWork

from service_desk import handlers
from service_desk import repository as repo


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings, service: str) -> EventConsumer:
    async def on_created(tx: Transaction, event: ReceivedEvent[events_pb2.AccountCreated]) -> None:
        account = event.message.account
        await handlers.apply_account(tx, account.id, account.tier, account.region)

    async def on_updated(tx: Transaction, event: ReceivedEvent[events_pb2.AccountUpdated]) -> None:
        account = event.message.account
        await handlers.apply_account(tx, account.id, account.tier, account.region)

    async def on_merged(tx: Transaction, event: ReceivedEvent[events_pb2.AccountMerged]) -> None:
        await handlers.apply_account_merge(tx, event.message.survivor_id, event.message.duplicate_id)

    async def on_deleted(tx: Transaction, event: ReceivedEvent[events_pb2.AccountDeleted]) -> None:
        await handlers.apply_account_deleted(tx, event.message.account_id)

    return EventConsumer(
        name="service-desk-accounts",
        uow=uow,
        metadata=repo.metadata,
        kafka=kafka,
        handlers={
            events_pb2.AccountCreated: on_created,
            events_pb2.AccountUpdated: on_updated,
            events_pb2.AccountMerged: on_merged,
            events_pb2.AccountDeleted: on_deleted,
        },
        service=service,
    )
