"""The projection: every event the reports need, from the leads, accounts, sales and service topics,
applied to the read models in the consumer's transaction (the platform's inbox makes a redelivered
event a no-op; the versioned upserts make a replay converge). A record's account id is stored as
the account it lives on after merges, whichever of the merge and the record's event comes first.

The consumer group is `<group>-g<generation>` (group `analytics-projection` by default): a rebuild
empties the read models and moves to the next generation, whose fresh group reads every topic from
its beginning."""

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from crm.accounts.v1 import accounts_pb2
from crm.accounts.v1 import events_pb2 as accounts_events
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2 as leads_events
from crm.leads.v1 import leads_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm.servicedesk.v1 import events_pb2 as service_events
from crm.servicedesk.v1 import servicedesk_pb2
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.db import transaction
from crm_platform.money import parse_decimal
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.timeutil import from_timestamp
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncConnection

from analytics import domain
from analytics import repository as repo

log = logging.getLogger(__name__)


def consumer_name(group: str, generation: int) -> str:
    return f"{group}-g{generation}"


def _amount(money: common_pb2.Money, field: str) -> tuple[Decimal | None, str]:
    if not money.amount:
        return None, money.currency
    return parse_decimal(money.amount, field=field), money.currency


def _time(stamp: Timestamp) -> datetime | None:
    return from_timestamp(stamp)


# --------------------------------------------------------------------------------------- leads


async def apply_lead(conn: AsyncConnection, lead: leads_pb2.Lead) -> None:
    values = {name: getattr(lead, name) for name in domain.LEAD_KEY_FIELDS}
    filled = domain.filled_fields(values, domain.LEAD_KEY_FIELDS)
    await repo.upsert(
        conn,
        repo.leads,
        {
            "id": lead.id,
            "source": lead.source,
            "campaign_id": lead.campaign_id,
            "status": lead.status,
            "owner_id": lead.owner_id,
            "team": lead.team,
            "region": lead.region,
            "created_at": _time(lead.created_at),
            "first_contacted_at": _time(lead.first_contacted_at),
            "converted_opportunity_id": lead.converted_opportunity_id,
            "filled": filled,
            "completeness": domain.completeness(filled, domain.LEAD_KEY_FIELDS),
            "version": lead.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_lead_activity(conn: AsyncConnection, activity: leads_pb2.LeadActivity) -> None:
    """An activity of a lead as logged or corrected: a contact comes with `lead.contacted`, a note
    with `lead.updated`, a correction with `lead.activity_updated` (which also brings in a note
    logged before `lead.updated` carried it)."""
    if not activity.id:
        return  # a lead.updated of no activity
    row = {"id": activity.id, "lead_id": activity.lead_id}
    await _put_activity(conn, row, activity.actor_id, activity.kind, activity.occurred_at, activity.version)


async def apply_lead_deleted(conn: AsyncConnection, lead_id: str) -> None:
    """The lead and its activities leave every report, as they left the leads service. The rows go
    rather than carry a flag (as accounts do, whose merges still resolve through them): a lead's
    events share its key, so no event of it can come after its deletion to bring it back."""
    await conn.execute(delete(repo.activities).where(repo.activities.c.lead_id == lead_id))
    await conn.execute(delete(repo.leads).where(repo.leads.c.id == lead_id))


async def apply_campaign(conn: AsyncConnection, campaign: leads_pb2.Campaign) -> None:
    cost, currency = _amount(campaign.cost, "campaign.cost.amount")
    await repo.upsert(
        conn,
        repo.campaigns,
        {
            "id": campaign.id,
            "name": campaign.name,
            "channel": campaign.channel,
            "cost": cost,
            "currency": currency,
            "starts_on": date.fromisoformat(campaign.starts_on) if campaign.starts_on else None,
            "ends_on": date.fromisoformat(campaign.ends_on) if campaign.ends_on else None,
            "owner_id": campaign.owner_id,
            "team": campaign.team,
            "version": campaign.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_campaign_deleted(conn: AsyncConnection, campaign_id: str) -> None:
    """The campaign leaves the ROI report. The leads service deletes only a campaign no lead links
    to, so no lead row here names it; and as a campaign's events share its key, none can come
    after its deletion to bring it back."""
    await conn.execute(delete(repo.campaigns).where(repo.campaigns.c.id == campaign_id))


# ------------------------------------------------------------------------------------ accounts


async def apply_account(conn: AsyncConnection, account: accounts_pb2.Account) -> None:
    values: dict[str, object] = {name: getattr(account, name) for name in domain.ACCOUNT_KEY_FIELDS}
    values["annual_revenue"] = account.annual_revenue.amount
    filled = domain.filled_fields(values, domain.ACCOUNT_KEY_FIELDS)
    await repo.upsert(
        conn,
        repo.accounts,
        {
            "id": account.id,
            "name": account.name,
            "owner_id": account.owner_id,
            "team": account.team,
            "region": account.region,
            "created_at": _time(account.created_at),
            "last_activity_at": _time(account.last_activity_at),
            "merged_into_id": account.merged_into_id,
            "filled": filled,
            "completeness": domain.completeness(filled, domain.ACCOUNT_KEY_FIELDS),
            "version": account.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_account_deleted(conn: AsyncConnection, account_id: str) -> None:
    await conn.execute(update(repo.accounts).where(repo.accounts.c.id == account_id).values(deleted=True))


async def apply_account_merged(conn: AsyncConnection, duplicate_id: str, survivor_id: str) -> None:
    """The duplicate's contracts, payments, tickets, CSAT and the rest move to the survivor. Sales
    and the service desk re-point some of their own rows without an event for each (payments,
    surveys), and a record's event may come before or after the merge, so analytics moves its rows
    itself; records applied later resolve the duplicate's id through `surviving_account`."""
    await repo.lock_account(conn, duplicate_id, merging=True)
    await conn.execute(
        update(repo.accounts).where(repo.accounts.c.id == duplicate_id).values(merged_into_id=survivor_id)
    )
    # The survivor may itself have been merged meanwhile (events of different accounts can be
    # applied in any order): the rows go to the end of the chain.
    target = await repo.surviving_account(conn, survivor_id)
    if target != duplicate_id:
        await repo.move_account_records(conn, duplicate_id, target)


async def apply_contact(conn: AsyncConnection, contact: accounts_pb2.Contact) -> None:
    """A contact as created or changed: an edit, a move to another account, and what the accounts
    service changes along (a demoted primary, its account's new owner or territory, a merge) all
    come as `contact.updated`, each a new version. Only which key fields are filled is kept, not
    their values. The `deleted` flag of a tombstone is left as it is."""
    filled = domain.contact_filled(
        name=contact.name,
        title=contact.title,
        phone=contact.phone,
        mobile=contact.mobile,
        email=contact.email,
        decision_role=contact.decision_role,
    )
    await repo.upsert(
        conn,
        repo.contacts,
        {
            "id": contact.id,
            "account_id": await repo.surviving_account(conn, contact.account_id),
            "owner_id": contact.owner_id,
            "team": contact.team,
            "region": contact.region,
            "created_at": _time(contact.created_at),
            "filled": filled,
            "completeness": domain.completeness(filled, domain.CONTACT_KEY_FIELDS),
            "version": contact.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_contact_deleted(conn: AsyncConnection, contact_id: str) -> None:
    """The contact leaves data completeness (deleted alone, or with its account), for good: its row
    becomes a tombstone, which no snapshot applied later (a stale one redelivered) brings back. One
    never seen is entered as a tombstone (at version 0, its values left to its snapshots)."""
    await repo.upsert(
        conn,
        repo.contacts,
        {"id": contact_id, "deleted": True, "filled": [], "completeness": domain.ZERO, "version": 0},
        keys=["id"],
        insert_only=["filled", "completeness", "version"],
    )


async def apply_activity(conn: AsyncConnection, activity: accounts_pb2.Activity) -> None:
    account_id = await repo.surviving_account(conn, activity.account_id)
    row = {"id": activity.id, "account_id": account_id}
    await _put_activity(conn, row, activity.actor_id, activity.kind, activity.occurred_at, activity.version)


async def _put_activity(
    conn: AsyncConnection, row: dict[str, Any], actor_id: str, kind: str, occurred_at: Timestamp, version: int
) -> None:
    """An activity of a lead or an account as it is now, unless it was deleted since. Versioned: an
    account's activity events are keyed by the account it is on, so after a merge its
    `activity.logged` (the duplicate's key) may be applied after a correction (the survivor's)."""
    await repo.lock_activity(conn, row["id"])
    if await repo.activity_deleted(conn, row["id"]):
        return  # logged or corrected before its deletion, applied after it (`deleted_activities`)
    row.update(actor_id=actor_id, kind=kind, occurred_at=_time(occurred_at), version=version)
    await repo.upsert(conn, repo.activities, row, keys=["id"], versioned=True)


async def apply_activity_deleted(conn: AsyncConnection, activity_id: str) -> None:
    """An activity deleted from its lead or account (logged by mistake) leaves the reports, and a
    tombstone keeps it out should an earlier event of it come after (an account's, across a merge)."""
    await repo.lock_activity(conn, activity_id)
    await repo.upsert(conn, repo.deleted_activities, {"id": activity_id}, keys=["id"])
    await conn.execute(delete(repo.activities).where(repo.activities.c.id == activity_id))


async def apply_task(conn: AsyncConnection, task: accounts_pb2.Task) -> None:
    await repo.upsert(
        conn,
        repo.tasks,
        {
            "id": task.id,
            "status": task.status,
            "owner_id": task.owner_id,
            "team": task.team,
            "region": task.region,
            "due_at": _time(task.due_at),
            "created_at": _time(task.created_at),
            "completed_at": _time(task.completed_at),
            "version": task.version,
        },
        keys=["id"],
        versioned=True,
    )


# --------------------------------------------------------------------------------------- sales


async def apply_pipeline(conn: AsyncConnection, pipeline: sales_pb2.Pipeline) -> None:
    """A pipeline as created or changed, its stages in their order. Versioned: an older snapshot
    applied late changes nothing; nor does any snapshot of a deleted pipeline (its id is never
    used again)."""
    if await repo.pipeline_deleted(conn, pipeline.id):
        return
    await repo.upsert(conn, repo.pipelines, _pipeline_values(pipeline), keys=["id"], versioned=True)


async def apply_pipeline_deleted(conn: AsyncConnection, pipeline: sales_pb2.Pipeline) -> None:
    """A deleted pipeline stays, flagged, with its last stage order: sales deletes only a pipeline no
    deal is in, but a deal's deletion (keyed by the deal) may be applied after it, and should any of
    its deals be in the read model they keep their history in that order. The flag is set whatever
    the versions: no later change of the pipeline exists."""
    await repo.upsert(conn, repo.pipelines, _pipeline_values(pipeline), keys=["id"], versioned=True)
    await conn.execute(update(repo.pipelines).where(repo.pipelines.c.id == pipeline.id).values(deleted=True))


def _pipeline_values(pipeline: sales_pb2.Pipeline) -> dict[str, Any]:
    stages = [
        {"key": stage.key, "name": stage.name, "probability": stage.probability, "outcome": stage.outcome}
        for stage in domain.ordered_stages(pipeline.stages)
    ]
    return {
        "id": pipeline.id,
        "name": pipeline.name,
        "stages": stages,
        "is_default": pipeline.is_default,
        "version": pipeline.version,
    }


async def apply_opportunity(conn: AsyncConnection, deal: sales_pb2.Opportunity) -> None:
    amount, currency = _amount(deal.amount, "opportunity.amount.amount")
    filled = domain.opportunity_filled(
        amount=amount,
        expected_close_date=deal.expected_close_date,
        primary_contact_id=deal.primary_contact_id,
        line_items=len(deal.line_items),
        product_line=deal.product_line,
        next_step=deal.next_step,
    )
    history = [
        {
            "stage": entry.stage,
            "entered_at": _iso(entry.entered_at),
            "exited_at": _iso(entry.exited_at),
        }
        for entry in deal.stage_history
    ]
    await repo.upsert(
        conn,
        repo.opportunities,
        {
            "id": deal.id,
            "account_id": await repo.surviving_account(conn, deal.account_id),
            "pipeline_id": deal.pipeline_id,
            "stage": deal.stage,
            "status": deal.status,
            "amount": amount,
            "currency": currency,
            "owner_id": deal.owner_id,
            "team": deal.team,
            "region": deal.region,
            "source_lead_id": deal.source_lead_id,
            "campaign_id": deal.campaign_id,
            "created_at": _time(deal.created_at),
            "closed_at": _time(deal.closed_at),
            "close_date": date.fromisoformat(deal.close_date) if deal.close_date else None,
            "history": history,
            "filled": filled,
            "completeness": domain.completeness(filled, domain.OPPORTUNITY_KEY_FIELDS),
            "version": deal.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_opportunity_deleted(conn: AsyncConnection, opportunity_id: str) -> None:
    """A deal entered by mistake leaves the funnel and the revenue (sales deletes none with a
    contract, so no contract row refers to it); gone for good, as a deleted lead."""
    await conn.execute(delete(repo.opportunities).where(repo.opportunities.c.id == opportunity_id))


def _iso(stamp: Timestamp) -> str | None:
    value = _time(stamp)
    return value.isoformat() if value is not None else None


async def apply_contract(conn: AsyncConnection, contract: sales_pb2.Contract) -> None:
    await repo.upsert(
        conn,
        repo.contracts,
        {
            "id": contract.id,
            "account_id": await repo.surviving_account(conn, contract.account_id),
            "opportunity_id": contract.opportunity_id,
            "owner_id": contract.owner_id,
            "team": contract.team,
            "region": contract.region,
            "status": contract.status,
            "version": contract.version,
        },
        keys=["id"],
        versioned=True,
    )


async def apply_contract_deleted(conn: AsyncConnection, contract_id: str) -> None:
    """A contract that never took effect (sales deletes only drafts and rejected ones, which have
    no plan, payment or invoice) leaves the read model; its events share its key, so none comes
    after the deletion to bring it back."""
    await conn.execute(delete(repo.contracts).where(repo.contracts.c.id == contract_id))


def _installment_values(contract_id: str, installment: sales_pb2.Installment) -> dict[str, Any]:
    amount, currency = _amount(installment.amount, "installment.amount.amount")
    paid, _ = _amount(installment.paid, "installment.paid.amount")
    return {
        "id": installment.id,
        "contract_id": contract_id,
        "amount": amount or Decimal(0),
        "paid": paid or Decimal(0),
        "currency": currency,
        "due_date": installment.due_date,
        "status": installment.status,
    }


async def apply_plan_installment(conn: AsyncConnection, contract_id: str, installment: sales_pb2.Installment) -> None:
    """An installment as the plan creates it: its paid amount is the money received before the
    plan existed, which sales applies then, without allocations."""
    await repo.upsert(conn, repo.installments, _installment_values(contract_id, installment), keys=["id"])


async def apply_overdue_installment(
    conn: AsyncConnection, contract_id: str, account_id: str, installment: sales_pb2.Installment
) -> None:
    """Once reported overdue, an installment counts as overdue until its payments cover it. The
    snapshot's paid amount also holds the allocations of payments already applied, so it does not
    replace the plan's (counting those allocations twice); it is kept only for an installment whose
    plan was never seen."""
    values = _installment_values(contract_id, installment) | {"overdue": True}
    if account_id:
        values["account_id"] = await repo.surviving_account(conn, account_id)
    await repo.upsert(conn, repo.installments, values, keys=["id"], insert_only=["paid"])


async def apply_plan_updated(conn: AsyncConnection, plan: sales_pb2.PaymentPlan, removed: Sequence[str]) -> None:
    """A plan's installments replaced: the removed ones (never paid, so no allocation names them)
    leave; the others take their due date, amount and status, keeping the money the plan's creation
    recorded as paid; added ones start unpaid. Overdue is what sales says now: an installment moved
    to a later due date owes nothing late any more (one still overdue stays so)."""
    if removed:
        await conn.execute(delete(repo.installments).where(repo.installments.c.id.in_(list(removed))))
    for installment in plan.installments:
        values = _installment_values(plan.contract_id, installment) | {"overdue": installment.status == "overdue"}
        await repo.upsert(conn, repo.installments, values, keys=["id"], insert_only=["paid"])


async def apply_payment(conn: AsyncConnection, payment: sales_pb2.Payment) -> None:
    amount, currency = _amount(payment.amount, "payment.amount.amount")
    await repo.upsert(
        conn,
        repo.payments,
        {
            "id": payment.id,
            "contract_id": payment.contract_id,
            "amount": amount or Decimal(0),
            "currency": currency,
            "received_at": _time(payment.received_at),
        },
        keys=["id"],
    )
    for allocation in payment.allocations:
        allocated, _ = _amount(allocation.amount, "payment.allocations.amount.amount")
        await repo.upsert(
            conn,
            repo.allocations,
            {"payment_id": payment.id, "installment_id": allocation.installment_id, "amount": allocated or 0},
            keys=["payment_id", "installment_id"],
        )


# ------------------------------------------------------------------------------------- service


async def apply_ticket(conn: AsyncConnection, ticket: servicedesk_pb2.Ticket) -> None:
    """The ticket as this version has it. A breach the desk reported stays while it holds: a version
    whose due time a priority or tier change moved lifts one the clock has not reached, as the desk
    lifts it (`domain.breach_holds`)."""
    stored = await repo.ticket_sla(conn, ticket.id)
    changed_at = _time(ticket.updated_at)
    paused_at = domain.resolution_paused_at(
        ticket.status,
        changed_at,
        stored.status if stored is not None else "",
        stored.resolution_paused_at if stored is not None else None,
    )
    first_response_due_at = _time(ticket.first_response_due_at)
    first_responded_at = _time(ticket.first_responded_at)
    resolution_due_at = _time(ticket.resolution_due_at)
    values: dict[str, Any] = {
        "id": ticket.id,
        "account_id": await repo.surviving_account(conn, ticket.account_id),
        "owner_id": ticket.assignee_id,
        "team": ticket.team,
        "region": ticket.region,
        "priority": ticket.effective_priority or ticket.priority,
        "status": ticket.status,
        "created_at": _time(ticket.created_at),
        "first_response_due_at": first_response_due_at,
        "first_responded_at": first_responded_at,
        "resolution_due_at": resolution_due_at,
        "resolved_at": _time(ticket.resolved_at),
        "resolution_paused_at": paused_at,
        "version": ticket.version,
    }
    if stored is not None:
        # Met for good as the desk's clocks are: the first response once answered or the ticket done;
        # the resolution once closed (a resolved ticket's clock only stands still, it may be reopened).
        done = ticket.status in domain.TICKET_DONE_STATUSES
        if not domain.breach_holds(
            stored.first_response_breached_at,
            first_response_due_at,
            met_for_good=done or first_responded_at is not None,
            judged_at=changed_at,
        ):
            values.update(first_response_breached=False, first_response_breached_at=None)
        if not domain.breach_holds(
            stored.resolution_breached_at,
            resolution_due_at,
            met_for_good=ticket.status == "closed",
            judged_at=paused_at or changed_at,
        ):
            values.update(resolution_breached=False, resolution_breached_at=None)
    await repo.upsert(conn, repo.tickets, values, keys=["id"], versioned=True)


async def apply_sla_breach(
    conn: AsyncConnection, ticket: servicedesk_pb2.Ticket, target: str, due_at: Timestamp
) -> None:
    """A breach as the desk reported it, at the time of the version reporting it (else of the due time
    it passed): it holds until a version the desk re-timed no longer reaches it (`apply_ticket`)."""
    await apply_ticket(conn, ticket)
    prefix = "resolution" if "resol" in target else "first_response"
    breach = {f"{prefix}_breached": True, f"{prefix}_breached_at": _time(ticket.updated_at) or _time(due_at)}
    await conn.execute(update(repo.tickets).where(repo.tickets.c.id == ticket.id).values(breach))


async def apply_csat(conn: AsyncConnection, response: servicedesk_pb2.CsatResponse) -> None:
    await repo.upsert(
        conn,
        repo.csat_responses,
        {
            "id": response.id,
            "ticket_id": response.ticket_id,
            "account_id": await repo.surviving_account(conn, response.account_id),
            "score": response.score,
            "submitted_at": _time(response.submitted_at),
        },
        keys=["id"],
    )


async def apply_ticket_deleted(conn: AsyncConnection, ticket_id: str) -> None:
    """A ticket that should never have been one (spam, a test, a duplicate) leaves the ticket counts,
    the backlog and SLA compliance. The service desk deletes only tickets never resolved, which have
    no survey answer, so CSAT is as it was; and as a ticket's events share its key, none (an SLA
    warning or breach) can come after its deletion to bring it back."""
    await conn.execute(delete(repo.tickets).where(repo.tickets.c.id == ticket_id))


# -------------------------------------------------------------------------------------- wiring

Apply = Callable[[AsyncConnection, Any], Awaitable[None]]


def _on(apply: Apply, part: Callable[[Any], Any]) -> Callable[[Transaction, ReceivedEvent[Any]], Awaitable[None]]:
    async def handle(tx: Transaction, event: ReceivedEvent[Any]) -> None:
        await apply(tx.conn, part(event.message))

    return handle


async def _lead_and_activity(
    tx: Transaction, event: ReceivedEvent[leads_events.LeadContacted | leads_events.LeadUpdated]
) -> None:
    await apply_lead(tx.conn, event.message.lead)
    await apply_lead_activity(tx.conn, event.message.activity)


async def _account_merged(tx: Transaction, event: ReceivedEvent[accounts_events.AccountMerged]) -> None:
    message = event.message
    if message.duplicate_id and message.survivor_id:
        await apply_account_merged(tx.conn, message.duplicate_id, message.survivor_id)


async def _account_deleted(tx: Transaction, event: ReceivedEvent[accounts_events.AccountDeleted]) -> None:
    await apply_account_deleted(tx.conn, event.message.account_id)


async def _plan_created(tx: Transaction, event: ReceivedEvent[sales_events.PaymentPlanCreated]) -> None:
    plan = event.message.payment_plan
    for installment in plan.installments:
        await apply_plan_installment(tx.conn, plan.contract_id, installment)


async def _plan_updated(tx: Transaction, event: ReceivedEvent[sales_events.PaymentPlanUpdated]) -> None:
    await apply_plan_updated(tx.conn, event.message.payment_plan, event.message.removed_installment_ids)


async def _installment_overdue(tx: Transaction, event: ReceivedEvent[sales_events.InstallmentOverdue]) -> None:
    message = event.message
    await apply_overdue_installment(tx.conn, message.contract_id, message.account_id, message.installment)


async def _sla_breached(tx: Transaction, event: ReceivedEvent[service_events.TicketSlaBreached]) -> None:
    message = event.message
    await apply_sla_breach(tx.conn, message.ticket, message.target, message.due_at)


def handlers() -> Mapping[type[Message], Callable[[Transaction, ReceivedEvent[Any]], Awaitable[None]]]:
    lead = _on(apply_lead, lambda m: m.lead)
    campaign = _on(apply_campaign, lambda m: m.campaign)
    account = _on(apply_account, lambda m: m.account)
    contact = _on(apply_contact, lambda m: m.contact)
    task = _on(apply_task, lambda m: m.task)
    deal = _on(apply_opportunity, lambda m: m.opportunity)
    contract = _on(apply_contract, lambda m: m.contract)
    ticket = _on(apply_ticket, lambda m: m.ticket)
    return {
        leads_events.LeadCreated: lead,
        leads_events.LeadUpdated: _lead_and_activity,
        leads_events.LeadAssigned: lead,
        leads_events.LeadContacted: _lead_and_activity,
        leads_events.LeadFollowUpOverdue: lead,
        leads_events.LeadRecycled: lead,
        leads_events.LeadConverted: lead,
        leads_events.LeadDisqualified: lead,
        leads_events.LeadDeleted: _on(apply_lead_deleted, lambda m: m.lead_id),
        leads_events.LeadActivityUpdated: _on(apply_lead_activity, lambda m: m.activity),
        leads_events.LeadActivityDeleted: _on(apply_activity_deleted, lambda m: m.activity_id),
        leads_events.CampaignCreated: campaign,
        leads_events.CampaignUpdated: campaign,
        leads_events.CampaignDeleted: _on(apply_campaign_deleted, lambda m: m.campaign_id),
        accounts_events.AccountCreated: account,
        accounts_events.AccountUpdated: account,
        accounts_events.AccountTransferred: account,
        accounts_events.AccountClaimed: account,
        accounts_events.AccountReleased: account,
        accounts_events.AccountMerged: _account_merged,
        accounts_events.AccountDeleted: _account_deleted,
        accounts_events.ContactCreated: contact,
        accounts_events.ContactUpdated: contact,
        accounts_events.ContactDeleted: _on(apply_contact_deleted, lambda m: m.contact_id),
        accounts_events.ActivityLogged: _on(apply_activity, lambda m: m.activity),
        accounts_events.ActivityUpdated: _on(apply_activity, lambda m: m.activity),
        accounts_events.ActivityDeleted: _on(apply_activity_deleted, lambda m: m.activity_id),
        accounts_events.TaskCreated: task,
        accounts_events.TaskCompleted: task,
        accounts_events.TaskUpdated: task,
        accounts_events.TaskReassigned: task,
        sales_events.PipelineCreated: _on(apply_pipeline, lambda m: m.pipeline),
        sales_events.PipelineUpdated: _on(apply_pipeline, lambda m: m.pipeline),
        sales_events.PipelineDeleted: _on(apply_pipeline_deleted, lambda m: m.pipeline),
        sales_events.OpportunityCreated: deal,
        sales_events.OpportunityUpdated: deal,
        sales_events.OpportunityAssigned: deal,
        sales_events.OpportunityStageChanged: deal,
        sales_events.OpportunityWon: deal,
        sales_events.OpportunityLost: deal,
        sales_events.OpportunityDeleted: _on(apply_opportunity_deleted, lambda m: m.opportunity_id),
        sales_events.ContractCreated: contract,
        sales_events.ContractSubmitted: contract,
        sales_events.ContractApproved: contract,
        sales_events.ContractRejected: contract,
        sales_events.ContractSigned: contract,
        sales_events.ContractCompleted: contract,
        sales_events.ContractTerminated: contract,
        # Moved to a merge's survivor or handed to the account's new owner (a transfer).
        sales_events.ContractUpdated: contract,
        sales_events.ContractDeleted: _on(apply_contract_deleted, lambda m: m.contract_id),
        sales_events.PaymentPlanCreated: _plan_created,
        sales_events.PaymentPlanUpdated: _plan_updated,
        sales_events.PaymentReceived: _on(apply_payment, lambda m: m.payment),
        sales_events.InstallmentOverdue: _installment_overdue,
        service_events.TicketCreated: ticket,
        service_events.TicketAssigned: ticket,
        service_events.TicketStatusChanged: ticket,
        # Priority, due times and the rest as changed; a re-timing lifts the breaches that no longer hold.
        service_events.TicketUpdated: ticket,
        service_events.TicketSlaWarning: ticket,
        service_events.TicketSlaBreached: _sla_breached,
        service_events.TicketResolved: ticket,
        service_events.TicketReopened: ticket,
        service_events.TicketClosed: ticket,
        service_events.TicketEscalated: ticket,
        service_events.CsatSubmitted: _on(apply_csat, lambda m: m.response),
        service_events.TicketDeleted: _on(apply_ticket_deleted, lambda m: m.ticket_id),
    }


class ProjectionConsumer(EventConsumer):
    """The projection's consumer: its group (and inbox) name carries the generation stored in the
    database, read when it starts consuming, so a rebuild done while it was stopped starts from the
    beginning (a database not there yet at start is waited for, as any failure to consume)."""

    def __init__(self, *, uow: UnitOfWork, kafka: KafkaSettings, service: str, group: str) -> None:
        super().__init__(
            name=consumer_name(group, 1),
            uow=uow,
            metadata=repo.metadata,
            kafka=kafka,
            handlers=handlers(),
            service=service,
        )
        self.engine = uow.engine
        self.group = group

    async def _before_consuming(self) -> None:
        async with transaction(self.engine) as conn:
            self.name = consumer_name(self.group, await repo.generation(conn, self.group))
        log.info("projection consuming as group %s", self.name)


async def rebuild(conn: AsyncConnection, group: str) -> str:
    """Empties the read models and returns the consumer group the next start will replay with."""
    return consumer_name(group, await repo.start_next_generation(conn, group))
