"""A write answers with the record as it was before it (`previous`), read under the record's row lock
in the write's transaction: the gateway audits exactly what this write changed, even when other
writes to the same record run at the same time. A write that changes nothing answers the record as
both; a delete answers the deleted ticket. (None of these writes takes an Idempotency-Key, so every
answer has a previous.)"""

import asyncio
from typing import Any

import pytest
from crm.servicedesk.v1 import servicedesk_service_pb2 as pb
from crm_platform.errors import EXPECTED_VERSION_ZERO, StaleVersion
from crm_platform.testing.changes import assert_one_after_another
from service_desk import handlers
from service_desk.handlers import Context
from service_desk.servicer import ServiceDeskServicer

pytestmark = pytest.mark.integration


async def _ticket(ctx: Context, **values: Any) -> dict[str, Any]:
    ticket, _ = await handlers.create_ticket(
        ctx, {"subject": "Printer jams", "region": "north", **values}, idempotency_key="", skip_dispatch=True
    )
    return dict(ticket)


async def _agent(ctx: Context, agent_id: str) -> None:
    await handlers.create_agent(ctx, {"id": agent_id, "name": agent_id, "region": "north"}, idempotency_key="")


async def test_concurrent_updates_each_answer_the_version_they_changed(ctx_on_postgres: Context) -> None:
    ticket = await _ticket(ctx_on_postgres)

    changes = await asyncio.gather(
        *(
            handlers.update_ticket(ctx_on_postgres, ticket["id"], {"subject": f"S{n}"}, expected_version=0)
            for n in range(8)
        )
    )

    assert_one_after_another(changes, "subject", first="Printer jams")


async def test_a_write_that_changes_nothing_answers_the_ticket_as_before_and_after(ctx: Context) -> None:
    await _agent(ctx, "ag-1")
    ticket = await _ticket(ctx)
    assigned = await handlers.assign_ticket(ctx, ticket["id"], "ag-1", expected_version=0)

    unchanged = await handlers.update_ticket(ctx, ticket["id"], {"subject": "Printer jams"}, expected_version=0)
    assigned_again = await handlers.assign_ticket(ctx, ticket["id"], "ag-1", expected_version=0)

    assert unchanged.previous == unchanged.record
    assert assigned_again.previous == assigned_again.record
    assert unchanged.record["version"] == assigned_again.record["version"] == assigned.record["version"]


async def test_a_status_change_and_an_assignment_answer_the_ticket_as_it_was(ctx: Context) -> None:
    await _agent(ctx, "ag-1")
    await _agent(ctx, "ag-2")
    ticket = await _ticket(ctx)

    assigned = await handlers.assign_ticket(ctx, ticket["id"], "ag-1", expected_version=0)
    started = await handlers.change_status(ctx, ticket["id"], "in_progress", expected_version=0, note="")
    handed_over = await handlers.assign_ticket(ctx, ticket["id"], "ag-2", expected_version=0)

    assert (assigned.previous["status"], assigned.previous["assignee_id"]) == ("new", "")
    assert (started.previous["status"], started.record["status"]) == ("assigned", "in_progress")
    assert started.previous["version"] == assigned.record["version"]
    assert (handed_over.previous["assignee_id"], handed_over.record["assignee_id"]) == ("ag-1", "ag-2")


async def test_a_delete_answers_the_deleted_ticket(ctx: Context) -> None:
    ticket = await _ticket(ctx)
    updated = await handlers.update_ticket(ctx, ticket["id"], {"subject": "Win a prize"}, expected_version=0)

    deleted = await handlers.delete_ticket(ctx, ticket["id"], expected_version=0)

    assert (deleted["subject"], deleted["version"]) == ("Win a prize", updated.record["version"])


async def test_an_sla_policy_update_answers_the_policy_as_it_was(ctx: Context) -> None:
    first = await handlers.update_sla_policy(ctx, "urgent", 20, 120, expected_version=0)
    second = await handlers.update_sla_policy(ctx, "urgent", 25, 180, expected_version=0)

    # None stored yet: the default targets the tickets were given until now.
    assert first.previous == {
        "priority": "urgent",
        "first_response_minutes": 15,
        "resolution_minutes": 240,
        "updated_at": None,
        "version": 0,
    }
    assert (second.previous.first_response_minutes, second.previous.resolution_minutes) == (20, 120)
    assert second.previous.version == first.record["version"] == 1


async def test_an_agent_and_an_article_update_answer_them_as_they_were(ctx: Context) -> None:
    await _agent(ctx, "ag-1")
    article = await handlers.create_article(ctx, {"title": "Toner", "body": "Shake it"}, idempotency_key="")

    agent = await handlers.update_agent(ctx, "ag-1", {"capacity": 3}, expected_version=0)
    edited = await handlers.update_article(ctx, article.id, {"title": "Toner, again"}, expected_version=0)

    (before, open_before), (after, open_after) = agent.previous, agent.record
    assert (before.capacity, before.version, after.capacity, after.version) == (10, 1, 3, 2)
    assert open_before == open_after
    assert (edited.previous.title, edited.previous.version, edited.record.title) == ("Toner", 1, "Toner, again")


async def test_the_responses_carry_previous(ctx: Context) -> None:
    servicer = ServiceDeskServicer(ctx)
    ticket = await _ticket(ctx)

    policy = await servicer.UpdateSlaPolicy(
        pb.UpdateSlaPolicyRequest(priority="low", first_response_minutes=60, resolution_minutes=600), None
    )
    updated = await servicer.UpdateTicket(
        pb.UpdateTicketRequest(
            ticket_id=ticket["id"], ticket=pb.TicketInput(subject="Fax"), update_mask={"paths": ["subject"]}
        ),
        None,
    )
    deleted = await servicer.DeleteTicket(pb.DeleteTicketRequest(ticket_id=ticket["id"]), None)

    assert (policy.previous.version, policy.previous.HasField("updated_at"), policy.policy.version) == (0, False, 1)
    assert (updated.previous.subject, updated.previous.version, updated.ticket.subject) == ("Printer jams", 1, "Fax")
    assert (deleted.previous.subject, deleted.previous.version) == ("Fax", 2)


async def test_if_match_0_is_a_version_an_sla_policy_has_only_at_its_default_targets(ctx: Context) -> None:
    first = await handlers.update_sla_policy(ctx, "urgent", 20, 120, expected_version=EXPECTED_VERSION_ZERO)

    with pytest.raises(StaleVersion) as stale:
        await handlers.update_sla_policy(ctx, "urgent", 25, 180, expected_version=EXPECTED_VERSION_ZERO)

    assert first.record["version"] == 1
    assert stale.value.current_version == 1


async def test_if_match_0_is_stale_for_a_stored_ticket_not_unconditional(ctx: Context) -> None:
    ticket = await _ticket(ctx)

    with pytest.raises(StaleVersion) as stale:
        await handlers.update_ticket(
            ctx, ticket["id"], {"subject": "Overwritten"}, expected_version=EXPECTED_VERSION_ZERO
        )

    assert stale.value.current_version == ticket["version"]
