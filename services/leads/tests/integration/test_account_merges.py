"""account.merged from the accounts context (SPEC §5), through the contacts consumer's handler (no
broker): the leads converted into the duplicate name the survivor, each as a new version published
as `lead.updated` naming `converted_account_id`, and the conversion log follows; a redelivery changes
nothing. Merges of one chain (a into b, b into c) end at the last survivor in either order, also
applied at once, and a conversion finishing into an account merged meanwhile names the survivor."""

import asyncio
from typing import Any

import pytest
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.consumer import ReceivedEvent
from crm_platform.ids import new_id
from crm_platform.testing.outbox import outbox_events
from crm_platform.timeutil import utcnow
from leads import repository as repo
from leads.consumers import build_consumer
from leads.handlers import ConvertRequest
from sqlalchemy import select

pytestmark = pytest.mark.integration

MERGER = common_pb2.Actor(user_id="manager", kind="user")


def merged(duplicate_id: str, survivor_id: str) -> accounts_events.AccountMerged:
    return accounts_events.AccountMerged(survivor_id=survivor_id, duplicate_id=duplicate_id, actor=MERGER)


async def deliver(env: Any, message: accounts_events.AccountMerged) -> None:
    """The event in its own transaction, through the handler the accounts consumer calls."""
    consumer = build_consumer(env.service.uow, KafkaSettings(), "86")
    event_type = spec_of(message).type
    _, handle = consumer.handlers[event_type]
    headers = CloudEventHeaders(id=new_id(), type=event_type, source="/test", time=utcnow())
    async with env.service.uow.begin() as tx:
        await handle(tx, ReceivedEvent(headers, message, message.duplicate_id, "crm.accounts.v1", 0, 0))


async def converted_into(env: Any, account_id: str) -> dict[str, Any]:
    """A lead of rep1 converted into the existing account `account_id`."""
    env.ports.accounts[account_id] = f"Account {account_id}"
    with env.acting():
        lead, _ = await env.service.create_lead({"name": f"Lead of {account_id}", "owner_id": "rep1"})
        result = await env.service.convert(ConvertRequest(lead["id"], account_id=account_id))
    return dict(result.lead)


async def stored(env: Any, lead_id: str) -> Any:
    async with env.engine.connect() as conn:
        return (await conn.execute(select(repo.leads).where(repo.leads.c.id == lead_id))).one()


async def saga_account(env: Any, lead_id: str) -> str:
    conversions = repo.conversions.c
    async with env.engine.connect() as conn:
        return str(await conn.scalar(select(conversions.account_id).where(conversions.lead_id == lead_id)))


async def updates(env: Any, lead_id: str) -> list[events_pb2.LeadUpdated]:
    return [
        events_pb2.LeadUpdated.FromString(payload)
        for event_type, payload in await outbox_events(env.engine, repo.metadata, lead_id)
        if event_type == "crm.leads.lead.updated"
    ]


async def test_a_merge_repoints_the_leads_converted_into_the_duplicate_once(env: Any) -> None:
    lead = await converted_into(env, "dup")
    bystander = await converted_into(env, "other")

    await deliver(env, merged("dup", "surv"))
    await deliver(env, merged("dup", "surv"))  # redelivered

    row = await stored(env, lead["id"])
    assert (row.converted_account_id, row.version) == ("surv", lead["version"] + 1)
    (update,) = await updates(env, lead["id"])  # one new version, published once
    assert list(update.changed_fields) == ["converted_account_id"]
    assert (update.lead.converted_account_id, update.lead.version) == ("surv", lead["version"] + 1)
    assert update.actor == MERGER
    assert await saga_account(env, lead["id"]) == "surv"
    assert (await stored(env, bystander["id"])).converted_account_id == "other"
    assert await updates(env, bystander["id"]) == []


@pytest.mark.parametrize("survivor_merged_first", [False, True])
async def test_a_chain_of_merges_ends_at_the_last_survivor_in_either_order(
    env: Any, survivor_merged_first: bool
) -> None:
    into_a, into_b = await converted_into(env, "a"), await converted_into(env, "b")
    chain = [merged("a", "b"), merged("b", "c")]

    for message in reversed(chain) if survivor_merged_first else chain:
        await deliver(env, message)

    assert [(await stored(env, lead["id"])).converted_account_id for lead in (into_a, into_b)] == ["c", "c"]
    published = [update.lead.converted_account_id for update in await updates(env, into_a["id"])]
    assert published == (["c"] if survivor_merged_first else ["b", "c"])  # each version it went through


async def test_merges_of_one_chain_applied_at_once_end_at_the_last_survivor(env: Any) -> None:
    into_a, into_b = await converted_into(env, "a"), await converted_into(env, "b")

    await asyncio.gather(deliver(env, merged("a", "b")), deliver(env, merged("b", "c")))

    assert [(await stored(env, lead["id"])).converted_account_id for lead in (into_a, into_b)] == ["c", "c"]


async def test_a_conversion_finishing_into_an_account_merged_meanwhile_names_the_survivor(env: Any) -> None:
    await deliver(env, merged("dup", "surv"))  # consumed while the conversion was on its way

    lead = await converted_into(env, "dup")

    assert lead["converted_account_id"] == "surv"
