"""Use cases of the service desk: one function per command, each in one unit of work that writes
the change and its events (outbox) together."""

import logging
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from crm.servicedesk.v1 import events_pb2
from crm_platform import custom_fields as cf
from crm_platform import idempotency
from crm_platform.audit import audit_of_job
from crm_platform.changes import Change
from crm_platform.custom_field_filters import load_filters
from crm_platform.custom_fields_service import load_definitions
from crm_platform.db import insert_ignore, insert_on_conflict
from crm_platform.errors import (
    EXPECTED_VERSION_ZERO,
    AlreadyExists,
    Conflict,
    FieldError,
    NotFound,
    StaleVersion,
    ValidationFailed,
    missing_reference,
)
from crm_platform.ids import new_id
from crm_platform.jobs import claim_due
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.principal import (
    ALL_RECORDS,
    Principal,
    acting_as,
    current_principal,
    current_request_id,
    current_scope,
    scope_clause,
)
from crm_platform.timeutil import as_utc, utcnow
from sqlalchemy import Select, and_, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from service_desk import domain
from service_desk import repository as repo
from service_desk.domain import FIRST_RESPONSE, RESOLUTION, SlaClock
from service_desk.messages import (
    actor,
    changed_ticket_fields,
    csat_to_proto,
    return_visit_to_proto,
    ticket_answer,
    ticket_to_proto,
)
from service_desk.repository import TicketFilter

log = logging.getLogger(__name__)

TICKET_FIELDS = (
    "account_id",
    "contact_id",
    "subject",
    "description",
    "channel",
    "category",
    "priority",
    "region",
    "team",
    "tags",
    "custom",
)
AGENT_FIELDS = ("name", "skills", "region", "team", "capacity", "available")
ARTICLE_FIELDS = ("title", "body", "category", "tags", "published")


@dataclass(slots=True)
class Context:
    uow: UnitOfWork
    return_visit_days: float = 3.0
    suggestions: int = 3
    clock: Callable[[], datetime] = utcnow
    # Days after its resolution during which a ticket's survey link takes the customer's answer.
    survey_valid_days: float = 30.0


@dataclass(frozen=True, slots=True)
class Page:
    limit: int = 0
    cursor: str = ""
    sort: str = ""


def _fail(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationFailed(errors)


def _check_version(resource: str, row: Any, expected: int) -> None:
    if expected and row.version != expected:
        raise StaleVersion(resource, row.id, row.version)


# --- custom fields ---------------------------------------------------------------------------------

TICKET_ENTITY = "ticket"


async def _custom_values(
    conn: AsyncConnection, values: Mapping[str, Any], *, existing: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validated, canonical custom values; an update merges into the stored ones (null removes)."""
    definitions = await load_definitions(conn, repo.custom_fields, TICKET_ENTITY)
    _fail(cf.validate(definitions, values, partial=existing is not None))
    merged = {key: value for key, value in (existing or {}).items() if key not in values}
    merged.update({key: value for key, value in cf.coerce(definitions, values).items() if value is not None})
    return merged


# --- tickets ---------------------------------------------------------------------------------------


async def _ticket_for_update(conn: AsyncConnection, ticket_id: str) -> dict[str, Any]:
    """The ticket locked for a change; outside the caller's record scope it does not exist."""
    row = (await conn.execute(select(repo.tickets).where(repo.tickets.c.id == ticket_id).with_for_update())).first()
    if row is None or not current_scope().allows(owner_id=row.owner_id, team=row.team, region=row.region):
        raise NotFound("ticket", ticket_id)
    return dict(row._mapping)


def _clocks(t: Mapping[str, Any]) -> list[SlaClock]:
    done = t["status"] in domain.DONE_STATUSES
    started = as_utc(t["created_at"])
    return [
        SlaClock(
            target=FIRST_RESPONSE,
            started_at=started,
            due_at=as_utc(t["first_response_due_at"]),
            met=done or t["first_responded_at"] is not None,
            warned=t["first_response_warned_at"] is not None,
            breached=t["first_response_breached_at"] is not None,
        ),
        SlaClock(
            target=RESOLUTION,
            # Paused time is not the team's: the 80 % warning is of the working time, as the due time is.
            started_at=started + timedelta(seconds=t["sla_paused_seconds"]),
            due_at=as_utc(t["resolution_due_at"]),
            met=done or t["sla_paused_at"] is not None,
            warned=t["resolution_warned_at"] is not None,
            breached=t["resolution_breached_at"] is not None,
            paused_at=as_utc(t["sla_paused_at"]) if t["sla_paused_at"] is not None else None,
        ),
    ]


# What the SLA timer announces, and a retiming revises, of a ticket.
# Timers whose changes are audited, by the names the audit records give them (see jobs).
SLA_JOB = "sla-timer"
DISPATCH_JOB = "dispatch-queue"

_SLA_STATE = (
    "first_response_warned_at",
    "first_response_breached_at",
    "resolution_warned_at",
    "resolution_breached_at",
    "next_sla_check_at",
    "escalated",
    "escalation_reason",
)


async def _sla_targets(conn: AsyncConnection, priority: str) -> domain.SlaTargets:
    row = (await conn.execute(select(repo.sla_policies).where(repo.sla_policies.c.priority == priority))).first()
    if row is None:
        return domain.DEFAULT_SLA[priority]
    return domain.SlaTargets(row.first_response_minutes, row.resolution_minutes)


async def _merge_chain(
    conn: AsyncConnection, account_id: str, *, lock: Literal["share", "exclusive"] | None
) -> tuple[list[str], Any]:
    """The account, then each account it was merged into, as the projection knows them, and the
    projection's row of the last one, where the account lives on (None: not known, or not yet).
    Each row is locked (shared for a ticket, exclusively for a merge), so a merge or deletion being
    applied along the chain is waited for and then followed; a list reads without locks (None), as
    committed. A cycle (bad data: merges never record one) ends the walk instead of looping."""
    table = repo.account_tiers
    chain = [account_id]
    while True:
        query = select(table).where(table.c.account_id == chain[-1])
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = (await conn.execute(query)).first()
        if row is None or not row.merged_into_id or row.merged_into_id in chain:
            return chain, row
        chain.append(row.merged_into_id)


async def _ticket_account(conn: AsyncConnection, account_id: str) -> tuple[str, Any]:
    """The account a ticket for `account_id` goes to: that account or, if it was merged, the one it
    lives on as; and its row in the projection (None: not known, or not yet), share-locked so that
    its deletion or merge waits for the ticket to be written and then closes or moves it. A deleted
    account takes no tickets. One the projection does not know is taken on purpose: it may have been
    created a moment ago, its event not here yet. (A ticket's `contact_id` is not checked: this
    service keeps no contacts.)"""
    if not account_id:
        return "", None
    chain, account = await _merge_chain(conn, account_id, lock="share")
    if account is not None and account.deleted_at is not None:
        which = account_id if len(chain) == 1 else f"{account_id} was merged into {chain[-1]}, which"
        raise ValidationFailed([FieldError("account_id", f"account {which} was deleted")])
    return chain[-1], account


async def _account_filter(conn: AsyncConnection, account_id: str) -> str:
    """The account a list filter by `account_id` finds records of: the account or, if it was merged,
    the one it lives on as, where its tickets, surveys and return visits went."""
    if not account_id:
        return ""
    chain, _ = await _merge_chain(conn, account_id, lock=None)
    return chain[-1]


async def _apply_sla(conn: AsyncConnection, t: dict[str, Any], now: datetime) -> None:
    """(Re)computes the effective priority and due times; the warnings and breaches said so far are
    kept only where they still hold against them (a breach's escalation with it), and the timer's
    next look follows."""
    t["effective_priority"] = domain.effective_priority(t["priority"], t["account_tier"])
    paused = timedelta(seconds=t["sla_paused_seconds"])
    due = domain.sla_due(as_utc(t["created_at"]), await _sla_targets(conn, t["effective_priority"]), paused)
    # A target met for good keeps the due time it was met against (a new ticket has none yet).
    kept = {clock.target for clock in _clocks(t) if domain.met_for_good(clock)} if "resolution_due_at" in t else set()
    if FIRST_RESPONSE not in kept:
        t["first_response_due_at"] = due.first_response_due_at
    if RESOLUTION not in kept:
        t["resolution_due_at"] = due.resolution_due_at
    clocks = [domain.retimed_clock(clock, now) for clock in _clocks(t)]
    for clock in clocks:
        if not clock.warned:
            t[f"{clock.target}_warned_at"] = None
        if not clock.breached:
            t[f"{clock.target}_breached_at"] = None
    t["escalated"], t["escalation_reason"] = domain.escalation_after_retiming(
        t["escalated"], t["escalation_reason"], clocks
    )
    t["next_sla_check_at"] = domain.next_sla_check(clocks)


def _candidate_agents(regions: Collection[str]) -> Select[Any]:
    """The available agents a ticket of these regions may go to (any agent for a ticket of none),
    locked in id order: every dispatch takes its agents in that one order, so none waits in a cycle."""
    query = select(repo.agents).where(repo.agents.c.available.is_(True))
    if "" not in regions:
        query = query.where(repo.agents.c.region.in_(sorted(regions)))
    return query.order_by(repo.agents.c.id).with_for_update()


async def _choose_agent(conn: AsyncConnection, category: str, region: str) -> Any:
    """Locks the candidate agents (so concurrent dispatches cannot overfill one) and picks one."""
    rows = list(await conn.execute(_candidate_agents([region])))
    counts = await repo.open_ticket_counts(conn, [row.id for row in rows])
    loads = [
        domain.AgentLoad(
            id=row.id,
            skills=tuple(row.skills or ()),
            region=row.region,
            capacity=row.capacity,
            available=row.available,
            open_tickets=counts.get(row.id, 0),
        )
        for row in rows
    ]
    choice = domain.choose_agent(loads, category=category, region=region)
    return next((row for row in rows if choice is not None and row.id == choice.id), None)


def _assign(tx: Transaction, t: dict[str, Any], agent: Any, now: datetime) -> None:
    """Gives the ticket to the agent (in memory, in its next version) and publishes the assignment
    events with it. An escalation for want of an agent ends with it."""
    previous_assignee, previous_status = t["assignee_id"], t["status"]
    t["assignee_id"] = agent.id
    t["owner_id"] = agent.id
    t["team"] = agent.team or t["team"]
    t["status"] = domain.status_after_assignment(t["status"])
    if t["escalation_reason"] == domain.NO_AGENT_AVAILABLE:
        t["escalated"], t["escalation_reason"] = False, ""
    t["updated_at"] = now
    t["version"] += 1
    who = actor(current_principal())
    tx.publish(
        events_pb2.TicketAssigned(ticket=ticket_to_proto(t), previous_assignee_id=previous_assignee, actor=who),
        key=t["id"],
    )
    if t["status"] != previous_status:
        tx.publish(
            events_pb2.TicketStatusChanged(
                ticket=ticket_to_proto(t), from_status=previous_status, to_status=t["status"], actor=who
            ),
            key=t["id"],
        )


def _escalate(
    tx: Transaction, t: dict[str, Any], reason: str, now: datetime, *, cause: events_pb2.TicketSlaBreached | None = None
) -> None:
    """Escalates the ticket (in memory, in its next version: a reader sees the change) and publishes
    the escalation, after the event that `cause` builds of the ticket (a breach), with the ticket as
    it stores it."""
    t["escalated"] = True
    t["escalation_reason"] = reason
    t["updated_at"] = now
    t["version"] += 1
    if cause is not None:
        cause.ticket.CopyFrom(ticket_to_proto(t))
        tx.publish(cause, key=t["id"])
    tx.publish(events_pb2.TicketEscalated(ticket=ticket_to_proto(t), reason=reason), key=t["id"])


# A repeated create with the same key (per caller) answers with the first result. Each call claims
# its key first thing in its transaction: a concurrent repeat waits there, then answers alike.
_idempotency_keys = idempotency.CallerKeys(repo.idempotency_keys)


async def create_ticket(
    ctx: Context, values: dict[str, Any], *, idempotency_key: str, skip_dispatch: bool = False
) -> tuple[Any, list[Any]]:
    """Creates, computes SLA due times and auto-dispatches; returns the ticket and KB suggestions."""
    values = {**values, "channel": values.get("channel") or "api", "priority": values.get("priority") or "normal"}
    _fail(domain.validate_ticket(values, partial=False))
    principal = current_principal()
    now = ctx.clock()
    ticket_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_ticket", idempotency_key, ticket_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(
                tx.conn, repo.tickets, earlier, gone=NotFound("ticket", earlier)
            ), []
        account_id, account = await _ticket_account(tx.conn, values.get("account_id", ""))
        custom = await _custom_values(tx.conn, values.get("custom") or {}, existing=None)
        t: dict[str, Any] = {
            "id": ticket_id,
            **{name: values.get(name) or "" for name in TICKET_FIELDS if name not in ("tags", "custom")},
            "account_id": account_id,
            "tags": values.get("tags") or [],
            "custom": custom,
            "account_tier": account.tier if account is not None else "",
            "status": "new",
            "assignee_id": "",
            "owner_id": principal.user_id,
            "escalated": False,
            "escalation_reason": "",
            "created_by_id": principal.user_id,
            "first_responded_at": None,
            "resolved_at": None,
            "first_resolved_at": None,
            "closed_at": None,
            "first_response_warned_at": None,
            "first_response_breached_at": None,
            "resolution_warned_at": None,
            "resolution_breached_at": None,
            "sla_paused_at": None,
            "sla_paused_seconds": 0,
            "survey_key": None,
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        if not t["region"] and account is not None:
            t["region"] = account.region
        elif not t["region"]:
            # A ticket for no account, or for one whose event has not reached the desk yet, is of
            # its creator's region: a regional manager can read back (and dispatch within the
            # region) what they filed, as for a ticket of an account there.
            t["region"] = principal.region
        await _apply_sla(tx.conn, t, now)
        tx.publish(events_pb2.TicketCreated(ticket=ticket_to_proto(t), actor=actor(principal)), key=t["id"])
        if not skip_dispatch:
            agent = await _choose_agent(tx.conn, t["category"], t["region"])
            if agent is not None:
                _assign(tx, t, agent, now)
            else:
                _escalate(tx, t, domain.NO_AGENT_AVAILABLE, now)
        await tx.conn.execute(insert(repo.tickets).values(**t))
        suggestions = await _suggestions(tx.conn, t, ctx.suggestions)
    return t, suggestions


async def get_ticket(ctx: Context, ticket_id: str) -> tuple[Any, list[Any], list[Any], Any]:
    async with ctx.uow.engine.connect() as conn:
        row = (await conn.execute(select(repo.tickets).where(repo.tickets.c.id == ticket_id))).first()
        if row is None or not current_scope().allows(owner_id=row.owner_id, team=row.team, region=row.region):
            raise NotFound("ticket", ticket_id)
        comments = list(
            await conn.execute(
                select(repo.ticket_comments)
                .where(repo.ticket_comments.c.ticket_id == ticket_id)
                .order_by(repo.ticket_comments.c.created_at, repo.ticket_comments.c.id)
            )
        )
        entries = list(
            await conn.execute(
                select(repo.work_log)
                .where(repo.work_log.c.ticket_id == ticket_id)
                .order_by(repo.work_log.c.logged_at, repo.work_log.c.id)
            )
        )
        csat = (
            await conn.execute(select(repo.csat_responses).where(repo.csat_responses.c.ticket_id == ticket_id))
        ).first()
    return row, comments, entries, csat


async def update_ticket(
    ctx: Context, ticket_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[dict[str, Any]]:
    _fail(domain.validate_ticket(values, partial=True))
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        # The account before the ticket, in the order a merge or deletion applied meanwhile locks
        # them (accounts, then their tickets): the other order deadlocks with it on PostgreSQL.
        account_id, account = (
            await _ticket_account(tx.conn, values["account_id"]) if "account_id" in values else ("", None)
        )
        t = await _ticket_for_update(tx.conn, ticket_id)
        _check_version("ticket", _Row(t), expected_version)
        if t["status"] == "closed":
            raise Conflict("a closed ticket cannot be changed", reason="TICKET_CLOSED")
        if "custom" in values:
            values = {**values, "custom": await _custom_values(tx.conn, values["custom"], existing=t["custom"])}
        if "account_id" in values:
            values = {**values, "account_id": account_id}
        changed = {name: value for name, value in values.items() if t[name] != value}
        if not changed:
            return Change(t, t)
        before = dict(t)
        t.update(changed)
        if "account_id" in changed:
            t["account_tier"] = account.tier if account is not None else ""
        if {"priority", "account_id"} & changed.keys():
            await _apply_sla(tx.conn, t, now)
        await _store_update(tx, before, t, now)
    return Change(t, before)


class _Row:
    """Attribute access to a ticket dict (for the version check shared with rows)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.id = values["id"]
        self.version = values["version"]


async def _store(conn: AsyncConnection, t: Mapping[str, Any]) -> None:
    await conn.execute(update(repo.tickets).where(repo.tickets.c.id == t["id"]).values(**t))


async def _store_update(tx: Transaction, before: Mapping[str, Any], t: dict[str, Any], now: datetime) -> None:
    """Stores the changed ticket as its next version and publishes ticket.updated."""
    t["updated_at"] = now
    t["version"] += 1
    await _store(tx.conn, t)
    tx.publish(
        events_pb2.TicketUpdated(
            ticket=ticket_to_proto(t), changed_fields=changed_ticket_fields(before, t), actor=actor(current_principal())
        ),
        key=t["id"],
    )


async def list_tickets(
    ctx: Context, f: TicketFilter, page: Page, custom_pairs: Sequence[tuple[str, str]] = ()
) -> tuple[list[Any], str]:
    errors = [FieldError("statuses", f"unknown status {s!r}") for s in f.statuses if s not in domain.STATUSES]
    errors += [FieldError("priorities", f"unknown priority {p!r}") for p in f.priorities if p not in domain.PRIORITIES]
    errors += [FieldError("channels", f"unknown channel {c!r}") for c in f.channels if c not in domain.CHANNELS]
    _fail(errors)
    async with ctx.uow.engine.connect() as conn:
        f.custom = await load_filters(conn, repo.custom_fields, TICKET_ENTITY, custom_pairs)
        f.account_id = await _account_filter(conn, f.account_id)
        return await repo.list_tickets(conn, current_scope(), f, limit=page.limit, cursor=page.cursor, sort=page.sort)


async def change_status(
    ctx: Context, ticket_id: str, status: str, *, expected_version: int, note: str
) -> Change[dict[str, Any]]:
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        t = await _ticket_for_update(tx.conn, ticket_id)
        _check_version("ticket", _Row(t), expected_version)
        domain.check_transition(t["status"], status, resolved_once=t["first_resolved_at"] is not None)
        if status in domain.NEEDS_ASSIGNEE and not t["assignee_id"]:
            raise Conflict(f"a ticket must be assigned before it is {status}", reason="NO_ASSIGNEE")
        before = dict(t)
        await _move(tx, t, status, now=now, note=note)
        if status == "resolved":
            await _schedule_return_visit(ctx, tx, t, now)
    return Change(t, before)


async def _move(tx: Transaction, t: dict[str, Any], status: str, *, now: datetime, note: str) -> None:
    """Moves the locked ticket to `status` (the caller checked the move): its SLA clocks, the note as
    an internal comment, and the events of the move."""
    principal = current_principal()
    previous = t["status"]
    running = _clocks(t)
    t["status"] = status
    if status in domain.RESPONDING_STATUSES and t["first_responded_at"] is None:
        t["first_responded_at"] = now
    if status == "resolved":
        t["resolved_at"] = now
        t["first_resolved_at"] = t["first_resolved_at"] or now
        # The survey link of the first resolution stays: a QR code printed then keeps working.
        t["survey_key"] = t["survey_key"] or secrets.token_urlsafe(domain.SURVEY_KEY_BYTES)
    elif status == "closed":
        t["closed_at"] = now
    elif status == "reopened":
        t["resolved_at"] = None
    # A pause of the resolution clock ends when the ticket is worked on again or resolved (the time
    # waiting for the customer moves the target; the time resolved is a pause of its own). Closing
    # ends none: a closed ticket keeps the due time its resolution was met against.
    if t["sla_paused_at"] is not None and status != "closed":
        waited = int((now - as_utc(t["sla_paused_at"])).total_seconds())
        t["sla_paused_seconds"] += waited
        t["resolution_due_at"] = as_utc(t["resolution_due_at"]) + timedelta(seconds=waited)
        t["sla_paused_at"] = None
    if status in domain.PAUSING_STATUSES and t["sla_paused_at"] is None:
        t["sla_paused_at"] = now
    elif status == "closed":
        t["sla_paused_at"] = None
    # Resolved, the ticket kept the targets its resolution was judged against while taking its
    # account's new tier (`_change_account_facts`); worked again, it is served at that tier.
    if status == "reopened" and t["effective_priority"] != domain.effective_priority(t["priority"], t["account_tier"]):
        await _apply_sla(tx.conn, t, now)
    late = _late_breaches(t, running, now)
    t["next_sla_check_at"] = domain.next_sla_check(_clocks(t))
    t["updated_at"] = now
    t["version"] += 1
    await _store(tx.conn, t)
    if note.strip():
        await tx.conn.execute(
            insert(repo.ticket_comments).values(
                id=new_id(), ticket_id=t["id"], author_id=principal.user_id, body=note, public=False, created_at=now
            )
        )
    who = actor(principal)
    message = ticket_to_proto(t)
    tx.publish(
        events_pb2.TicketStatusChanged(ticket=message, from_status=previous, to_status=status, actor=who), key=t["id"]
    )
    if status == "resolved":  # with the survey key, for whatever sends the customer their link
        tx.publish(events_pb2.TicketResolved(ticket=ticket_answer(t), actor=who), key=t["id"])
    elif status == "closed":
        tx.publish(events_pb2.TicketClosed(ticket=message, actor=who), key=t["id"])
    elif status == "reopened":
        tx.publish(events_pb2.TicketReopened(ticket=message, actor=who), key=t["id"])
    _publish_breaches(tx, t, late)


def _late_breaches(t: dict[str, Any], running: Sequence[SlaClock], now: datetime) -> list[domain.SlaSignal]:
    """Records on the ticket the breaches of the clocks this change stopped late
    (`domain.breaches_at_stop`); the caller publishes them once the ticket is stored."""
    late = domain.breaches_at_stop(running, _clocks(t), now)
    for signal in late:
        t[f"{signal.target}_breached_at"] = now
    return late


def _publish_breaches(tx: Transaction, t: Mapping[str, Any], signals: Sequence[domain.SlaSignal]) -> None:
    """`ticket.sla_breached` of targets met late: no escalation, the answer or resolution being given."""
    for signal in signals:
        event = events_pb2.TicketSlaBreached(ticket=ticket_to_proto(t), target=signal.target)
        event.due_at.CopyFrom(_timestamp(signal.due_at))
        tx.publish(event, key=t["id"])


async def _schedule_return_visit(ctx: Context, tx: Transaction, t: Mapping[str, Any], now: datetime) -> None:
    due = domain.return_visit_due(now, t["account_tier"], ctx.return_visit_days)
    if due is None or not t["account_id"]:
        return
    visit = {
        "id": new_id(),
        "ticket_id": t["id"],
        "account_id": t["account_id"],
        "assignee_id": t["assignee_id"],
        "owner_id": t["owner_id"],
        "team": t["team"],
        "region": t["region"],
        "due_at": due,
        "status": "open",
        "notes": "",
        "completed_at": None,
        "created_at": now,
    }
    # A ticket resolved again after a reopen keeps its first return visit.
    if await insert_ignore(tx.conn, repo.return_visits, visit, keys=["ticket_id"]):
        tx.publish(events_pb2.ReturnVisitScheduled(return_visit=return_visit_to_proto(visit)), key=t["id"])


async def assign_ticket(
    ctx: Context, ticket_id: str, assignee_id: str, *, expected_version: int
) -> Change[dict[str, Any]]:
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        t = await _ticket_for_update(tx.conn, ticket_id)
        _check_version("ticket", _Row(t), expected_version)
        domain.status_after_assignment(t["status"])
        if assignee_id:
            agent = (
                await tx.conn.execute(select(repo.agents).where(repo.agents.c.id == assignee_id).with_for_update())
            ).first()
            if agent is None:
                raise missing_reference("assignee_id", "agent", assignee_id)
            if agent.id != t["assignee_id"]:
                # A person may send a ticket out of its region or skill; not to someone away or full.
                open_tickets = (await repo.open_ticket_counts(tx.conn, [agent.id])).get(agent.id, 0)
                domain.check_manual_assignment(agent.id, agent.available, agent.capacity, open_tickets)
        else:
            agent = await _choose_agent(tx.conn, t["category"], t["region"])
            if agent is None:
                raise Conflict("no available agent has the skill and region of this ticket", reason="NO_AGENT")
        if agent.id == t["assignee_id"]:
            return Change(t, t)
        before = dict(t)
        _assign(tx, t, agent, now)
        await _store(tx.conn, t)
    return Change(t, before)


async def add_comment(ctx: Context, ticket_id: str, body: str, *, public: bool, idempotency_key: str) -> Any:
    if not body.strip():
        raise ValidationFailed([FieldError("body", "is required")])
    if len(body) > 20_000:
        raise ValidationFailed([FieldError("body", "must be at most 20000 characters")])
    principal = current_principal()
    now = ctx.clock()
    comment_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "add_comment", idempotency_key, comment_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(
                tx.conn, repo.ticket_comments, earlier, gone=NotFound("ticket", ticket_id)
            )
        t = await _ticket_for_update(tx.conn, ticket_id)
        if t["status"] == "closed":
            raise Conflict("a closed ticket takes no comments", reason="TICKET_CLOSED")
        comment: dict[str, Any] = {
            "id": comment_id, "ticket_id": ticket_id, "author_id": principal.user_id, "body": body, "public": public,
            "created_at": now,
        }  # fmt: skip
        await tx.conn.execute(insert(repo.ticket_comments).values(**comment))
        # A public answer by someone other than the reporter is the first response the SLA waits for.
        if public and t["first_responded_at"] is None and principal.user_id != t["created_by_id"]:
            running = _clocks(t)
            t["first_responded_at"] = now
            late = _late_breaches(t, running, now)
            t["next_sla_check_at"] = domain.next_sla_check(_clocks(t))
            t["updated_at"] = now
            t["version"] += 1
            await _store(tx.conn, t)
            # Consumers (the SLA reports) learn of the answer, on time or late.
            tx.publish(
                events_pb2.TicketUpdated(
                    ticket=ticket_to_proto(t), changed_fields=["first_responded_at"], actor=actor(principal)
                ),
                key=ticket_id,
            )
            _publish_breaches(tx, t, late)
    return comment


async def log_work(ctx: Context, ticket_id: str, minutes: int, note: str, *, idempotency_key: str) -> Any:
    if not 0 < minutes <= 24 * 60:
        raise ValidationFailed([FieldError("minutes", "must be from 1 to 1440")])
    principal = current_principal()
    now = ctx.clock()
    entry_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "log_work", idempotency_key, entry_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(tx.conn, repo.work_log, earlier, gone=NotFound("ticket", ticket_id))
        await _ticket_for_update(tx.conn, ticket_id)
        entry: dict[str, Any] = {
            "id": entry_id, "ticket_id": ticket_id, "agent_id": principal.user_id, "minutes": minutes, "note": note,
            "logged_at": now,
        }  # fmt: skip
        await tx.conn.execute(insert(repo.work_log).values(**entry))
    return entry


async def delete_ticket(ctx: Context, ticket_id: str, *, expected_version: int) -> dict[str, Any]:
    """Deletes a ticket that should never have been one (spam, a test, a duplicate), open and never
    resolved, with its comments and work log (it has no survey or return visit: both follow a
    resolution); returns it as it was, for the caller's audit trail. The rest follows the row: the
    SLA timer and the dispatch queue claim tickets from `tickets`, so none fires or dispatches for it
    afterwards (a pass holding it locked finishes first), and the agent's open-ticket load that
    dispatch compares is counted from it."""
    async with ctx.uow.begin() as tx:
        t = await _ticket_for_update(tx.conn, ticket_id)
        _check_version("ticket", _Row(t), expected_version)
        domain.check_ticket_deletable(
            t["status"], resolved_once=t["first_resolved_at"] is not None, ticket_id=ticket_id
        )
        for table in (repo.ticket_comments, repo.work_log):
            await tx.conn.execute(delete(table).where(table.c.ticket_id == ticket_id))
        await tx.conn.execute(delete(repo.tickets).where(repo.tickets.c.id == ticket_id))
        tx.publish(
            events_pb2.TicketDeleted(ticket_id=ticket_id, account_id=t["account_id"], actor=actor(current_principal())),
            key=ticket_id,
        )
    return t


# --- SLA -------------------------------------------------------------------------------------------


def _sla_policy(priority: str, stored: Any) -> Any:
    """The policy of a priority: as stored, or its default targets (version 0) while none is."""
    if stored is not None:
        return stored
    targets = domain.DEFAULT_SLA[priority]
    return {
        "priority": priority,
        "first_response_minutes": targets.first_response_minutes,
        "resolution_minutes": targets.resolution_minutes,
        "updated_at": None,
        "version": 0,
    }


async def list_sla_policies(ctx: Context) -> list[Any]:
    async with ctx.uow.engine.connect() as conn:
        stored = {row.priority: row for row in await conn.execute(select(repo.sla_policies))}
    return [_sla_policy(priority, stored.get(priority)) for priority in domain.DEFAULT_SLA]


async def update_sla_policy(
    ctx: Context, priority: str, first_response_minutes: int, resolution_minutes: int, *, expected_version: int
) -> Change[Any]:
    """Applies to tickets created from now on; open tickets keep the due times they were given."""
    if priority not in domain.PRIORITIES:
        raise ValidationFailed([FieldError("priority", f"must be one of {', '.join(domain.PRIORITIES)}")])
    domain.validate_sla_targets(first_response_minutes, resolution_minutes)
    now = ctx.clock()
    table = repo.sla_policies
    async with ctx.uow.begin() as tx:
        row = (await tx.conn.execute(select(table).where(table.c.priority == priority).with_for_update())).first()
        version = row.version if row is not None else 0
        if expected_version == EXPECTED_VERSION_ZERO and version == 0:
            expected_version = 0  # `If-Match: "0"` of the default targets, never stored: their version
        if expected_version and version != expected_version:
            raise StaleVersion("sla_policy", priority, version)
        values = {
            "priority": priority,
            "first_response_minutes": first_response_minutes,
            "resolution_minutes": resolution_minutes,
            "updated_at": now,
            "version": version + 1,
        }
        if row is None:
            await tx.conn.execute(insert(table).values(**values))
        else:
            await tx.conn.execute(update(table).where(table.c.priority == priority).values(**values))
    return Change(values, _sla_policy(priority, row))


async def run_sla_timer(ctx: Context, *, batch_size: int) -> int:
    """Announces warnings (80 %) and breaches of due tickets, each once; replicas claim disjoint rows."""
    now = ctx.clock()
    t = repo.tickets
    async with ctx.uow.begin() as tx:
        query = (
            select(t)
            .where(t.c.next_sla_check_at <= now, t.c.status.in_(domain.OPEN_STATUSES))
            .order_by(t.c.next_sla_check_at)
            .limit(batch_size)
        )
        rows = list(await tx.conn.execute(claim_due(query)))
        for row in rows:
            ticket = dict(row._mapping)
            previous = ticket_to_proto(ticket)
            breaches: list[domain.SlaSignal] = []
            for signal in domain.sla_signals(_clocks(ticket), now):
                column = f"{signal.target}_{'warned' if signal.kind == 'warning' else 'breached'}_at"
                ticket[column] = now
                if signal.kind == "warning":
                    warning = events_pb2.TicketSlaWarning(ticket=ticket_to_proto(ticket), target=signal.target)
                    warning.due_at.CopyFrom(_timestamp(signal.due_at))
                    tx.publish(warning, key=ticket["id"])
                    continue
                breaches.append(signal)
                breached = events_pb2.TicketSlaBreached(target=signal.target)
                breached.due_at.CopyFrom(_timestamp(signal.due_at))
                _escalate(tx, ticket, domain.breach_escalation(signal.target), now, cause=breached)
            ticket["next_sla_check_at"] = domain.next_sla_check(_clocks(ticket))
            stored = (*_SLA_STATE, "updated_at", "version") if breaches else _SLA_STATE
            await tx.conn.execute(
                update(t).where(t.c.id == ticket["id"]).values({name: ticket[name] for name in stored})
            )
            if breaches:  # a warning changes nothing a reader sees; an escalation does, and is audited
                audit = audit_of_job(
                    SLA_JOB,
                    action="escalate",
                    resource="tickets",
                    record_id=ticket["id"],
                    record=ticket_to_proto(ticket),
                    previous=previous,
                    occurred_at=now,
                    reason="; ".join(domain.describe_breach(signal) for signal in breaches),
                )
                tx.publish(audit, key=ticket["id"])
    return len(rows)


def _timestamp(value: datetime) -> Any:
    from crm_platform.timeutil import to_timestamp

    return to_timestamp(value)


async def dispatch_queued(ctx: Context, *, batch_size: int) -> int:
    """Offers queued tickets (new or reopened, nobody assigned) to agents again: the most urgent
    effective priority first (a tier-A account's raised one), then those offered longest ago, in
    the order they came (never offered: as long ago as they came). A ticket no agent takes goes to
    the back of its priority, so tickets nobody can take never hold up those behind them in it."""
    now = ctx.clock()
    t = repo.tickets
    assigned = 0
    urgency = case(
        {priority: rank for rank, priority in enumerate(domain.PRIORITIES)},
        value=t.c.effective_priority,
        else_=len(domain.PRIORITIES),
    )
    async with ctx.uow.begin() as tx:
        # No index serves this order: the queue is the few tickets no agent could take, found by status.
        query = (
            select(t)
            .where(t.c.status.in_(("new", "reopened")), t.c.assignee_id == "")
            .order_by(urgency, func.coalesce(t.c.dispatch_offered_at, t.c.created_at), t.c.created_at, t.c.id)
            .limit(batch_size)
        )
        untaken: list[str] = []
        queued = list(await tx.conn.execute(claim_due(query)))
        if queued:  # the agents of all its regions at once (ticket by ticket, they would be taken in ticket order)
            await tx.conn.execute(_candidate_agents({row.region for row in queued}))
        for row in queued:
            ticket = dict(row._mapping)
            agent = await _choose_agent(tx.conn, ticket["category"], ticket["region"])
            if agent is None:
                untaken.append(ticket["id"])
                continue
            previous = ticket_to_proto(ticket)
            _assign(tx, ticket, agent, now)
            await _store(tx.conn, ticket)
            audit = audit_of_job(
                DISPATCH_JOB,
                action="assign",
                resource="tickets",
                record_id=ticket["id"],
                record=ticket_to_proto(ticket),
                previous=previous,
                occurred_at=now,
                reason=f"queued since {as_utc(ticket['created_at']).isoformat()}; agent {agent.id} had capacity",
            )
            tx.publish(audit, key=ticket["id"])
            assigned += 1
        if untaken:
            await tx.conn.execute(update(t).where(t.c.id.in_(untaken)).values(dispatch_offered_at=now))
    return assigned


# --- agents ----------------------------------------------------------------------------------------


async def _agent_out(conn: AsyncConnection, row: Any) -> tuple[Any, int]:
    counts = await repo.open_ticket_counts(conn, [row.id])
    return row, counts.get(row.id, 0)


async def create_agent(ctx: Context, values: dict[str, Any], *, idempotency_key: str) -> tuple[Any, int]:
    values = {"capacity": 10, "available": True, "skills": [], "region": "", "team": "", **values}
    _fail(domain.validate_agent(values, partial=False))
    now = ctx.clock()
    agent_id = values["id"].strip()
    try:
        async with ctx.uow.begin() as tx:
            earlier = await _idempotency_keys.claim(tx.conn, "create_agent", idempotency_key, agent_id, now)
            if earlier is None:
                await tx.conn.execute(
                    insert(repo.agents).values(
                        id=agent_id, name=values["name"].strip(),
                        skills=sorted({s.strip() for s in values["skills"]}), region=values["region"],
                        team=values["team"], capacity=values["capacity"], available=values["available"],
                        created_at=now, updated_at=now, version=1,
                    )
                )  # fmt: skip
            result_id = agent_id if earlier is None else earlier
            row = (await tx.conn.execute(select(repo.agents).where(repo.agents.c.id == result_id))).one()
            return await _agent_out(tx.conn, row)
    except IntegrityError:
        raise AlreadyExists(f"agent {values['id']} already exists", existing_id=values["id"]) from None


async def get_agent(ctx: Context, agent_id: str) -> tuple[Any, int]:
    async with ctx.uow.engine.connect() as conn:
        row = (await conn.execute(select(repo.agents).where(repo.agents.c.id == agent_id))).first()
        if row is None:
            raise NotFound("agent", agent_id)
        return await _agent_out(conn, row)


async def update_agent(
    ctx: Context, agent_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[tuple[Any, int]]:
    """The agent after the update and before it, each with its open tickets (which it does not change)."""
    _fail(domain.validate_agent(values, partial=True))
    if "skills" in values:
        values["skills"] = sorted({s.strip() for s in values["skills"]})
    async with ctx.uow.begin() as tx:
        row = (await tx.conn.execute(select(repo.agents).where(repo.agents.c.id == agent_id).with_for_update())).first()
        if row is None:
            raise NotFound("agent", agent_id)
        _check_version("agent", row, expected_version)
        await tx.conn.execute(
            update(repo.agents)
            .where(repo.agents.c.id == agent_id)
            .values(**values, updated_at=ctx.clock(), version=row.version + 1)
        )
        updated = (await tx.conn.execute(select(repo.agents).where(repo.agents.c.id == agent_id))).one()
        _, open_tickets = await _agent_out(tx.conn, updated)
        return Change((updated, open_tickets), (row, open_tickets))


async def list_agents(
    ctx: Context, *, region: str, skill: str, available: bool | None, team: str, page: Page
) -> tuple[list[tuple[Any, int]], str]:
    async with ctx.uow.engine.connect() as conn:
        rows, cursor = await repo.list_agents(
            conn, region=region, skill=skill, available=available, team=team, limit=page.limit, cursor=page.cursor,
            sort=page.sort,
        )  # fmt: skip
        counts = await repo.open_ticket_counts(conn, [row.id for row in rows])
    return [(row, counts.get(row.id, 0)) for row in rows], cursor


# --- CSAT and return visits ------------------------------------------------------------------------


async def submit_csat(ctx: Context, ticket_id: str, score: int, comment: str, *, idempotency_key: str) -> Any:
    """An answer entered by staff (channel `staff`): one per resolved ticket, as any answer."""
    now = ctx.clock()
    table = repo.csat_responses
    response_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "submit_csat", idempotency_key, response_id, now)
        if earlier is not None:
            return (await tx.conn.execute(select(table).where(table.c.id == earlier))).one()
        t = await _ticket_for_update(tx.conn, ticket_id)
        domain.validate_csat(t["status"], t["resolved_at"] is not None, score, comment)
        existing = await _csat_answer_id(tx.conn, ticket_id)
        if existing is not None:
            raise AlreadyExists(f"ticket {ticket_id} already has a survey answer", existing_id=existing)
        return await _store_csat(tx, t, response_id, score, comment, domain.STAFF_CHANNEL, now)


async def _csat_answer_id(conn: AsyncConnection, ticket_id: str) -> str | None:
    """The id of the ticket's CSAT answer, whoever gave it; None while it has none."""
    table = repo.csat_responses
    existing = await conn.scalar(select(table.c.id).where(table.c.ticket_id == ticket_id))
    return None if existing is None else str(existing)


async def _store_csat(
    tx: Transaction, t: Mapping[str, Any], response_id: str, score: int, comment: str, channel: str, now: datetime
) -> dict[str, Any]:
    """Stores the answer to the locked ticket (in its record scope) and publishes csat.submitted."""
    response = {
        "id": response_id, "ticket_id": t["id"], "account_id": t["account_id"], "score": score, "comment": comment,
        "submitted_by_id": current_principal().user_id, "owner_id": t["owner_id"], "team": t["team"],
        "region": t["region"], "submitted_at": now, "channel": channel,
    }  # fmt: skip
    await tx.conn.execute(insert(repo.csat_responses).values(**response))
    event = events_pb2.CsatSubmitted(response=csat_to_proto(response), actor=actor(current_principal()))
    tx.publish(event, key=t["id"])
    return response


# --- the customer's survey link --------------------------------------------------------------------


def survey_principal(ticket_id: str) -> Principal:
    """Who answers through a ticket's survey link: the survey itself, named by its ticket (never by
    its key), as a web form captures its leads. The gateway audits the answer with the same actor."""
    return Principal(user_id=f"survey:{ticket_id}", kind="customer")


async def _survey_ticket(conn: AsyncConnection, survey_key: str) -> Any:
    """The ticket whose survey link has `survey_key`, in no record scope: the key is the credential
    (the call is public). An unknown key is NOT_FOUND."""
    row = None
    if survey_key:
        row = (await conn.execute(select(repo.tickets).where(repo.tickets.c.survey_key == survey_key))).first()
    if row is None:
        raise NotFound("csat_survey", survey_key)
    return row


async def get_csat_survey(ctx: Context, survey_key: str) -> dict[str, Any]:
    """The survey of the ticket whose link has `survey_key`, as its customer sees it: the ticket's
    id and subject, its resolution, until when the link takes an answer, whether one was given and
    whether one would be taken now."""
    now = ctx.clock()
    async with ctx.uow.engine.connect() as conn:
        t = await _survey_ticket(conn, survey_key)
        answered = await _csat_answer_id(conn, t.id) is not None
    resolved_at = as_utc(t.resolved_at) if t.resolved_at is not None else None
    refusal = domain.survey_refusal(t.status, resolved_at, now, ctx.survey_valid_days)
    return {
        "ticket_id": t.id,
        "subject": t.subject,
        "resolved_at": resolved_at,
        # Of the current resolution: none while the ticket is open again.
        "expires_at": domain.survey_expires_at(resolved_at, ctx.survey_valid_days) if resolved_at else None,
        "answered": answered,
        "answerable": refusal is None and not answered,
    }


async def submit_csat_survey(ctx: Context, survey_key: str, score: int, comment: str, *, idempotency_key: str) -> Any:
    """The customer's own answer through the ticket's survey link (channel `customer`), given as the
    survey (`survey_principal`): while the ticket is resolved (closed since or not) and the link has
    not expired (`domain.survey_refusal`), once per ticket, an answer entered by staff included. An
    Idempotency-Key is the survey's own: a repeat answers with the first answer."""
    now = ctx.clock()
    table = repo.csat_responses
    response_id = new_id()
    async with ctx.uow.engine.connect() as conn:
        ticket_id = (await _survey_ticket(conn, survey_key)).id
    with acting_as(survey_principal(ticket_id), ALL_RECORDS, current_request_id()):
        async with ctx.uow.begin() as tx:
            earlier = await _idempotency_keys.claim(tx.conn, "submit_csat_survey", idempotency_key, response_id, now)
            if earlier is not None:
                return (await tx.conn.execute(select(table).where(table.c.id == earlier))).one()
            # Locked as SubmitCsat locks it, so that of two answers racing, one is stored.
            t = await _ticket_for_update(tx.conn, ticket_id)
            domain.validate_csat(t["status"], t["resolved_at"] is not None, score, comment)
            resolved_at = as_utc(t["resolved_at"]) if t["resolved_at"] is not None else None
            domain.check_survey_answerable(t["status"], resolved_at, now, ctx.survey_valid_days)
            if await _csat_answer_id(tx.conn, ticket_id) is not None:
                # The customer is not told the answer's id: a public caller gets no internal id.
                raise AlreadyExists("this survey was answered already")
            return await _store_csat(tx, t, response_id, score, comment, domain.CUSTOMER_CHANNEL, now)


async def list_csat(ctx: Context, *, ticket_id: str, account_id: str, page: Page) -> tuple[list[Any], str]:
    table = repo.csat_responses
    conditions = [scope_clause(table, current_scope())]
    if ticket_id:
        conditions.append(table.c.ticket_id == ticket_id)
    sorts = {"submitted_at": table.c.submitted_at}
    async with ctx.uow.engine.connect() as conn:
        if account_id:
            conditions.append(table.c.account_id == await _account_filter(conn, account_id))
        return await repo._page(
            conn, select(table).where(and_(*conditions)), sorts, table.c.id, page.limit, page.cursor, page.sort,
            "-submitted_at",
        )  # fmt: skip


async def list_return_visits(
    ctx: Context, *, account_id: str, status: str, assignee_id: str, due_before: datetime | None, page: Page
) -> tuple[list[Any], str]:
    if status and status not in domain.RETURN_VISIT_STATUSES:
        raise ValidationFailed([FieldError("status", f"must be one of {', '.join(domain.RETURN_VISIT_STATUSES)}")])
    table = repo.return_visits
    conditions = [scope_clause(table, current_scope())]
    for name, value in (("status", status), ("assignee_id", assignee_id)):
        if value:
            conditions.append(table.c[name] == value)
    if due_before is not None:
        conditions.append(table.c.due_at < due_before)
    sorts = {"due_at": table.c.due_at, "created_at": table.c.created_at}
    async with ctx.uow.engine.connect() as conn:
        if account_id:
            conditions.append(table.c.account_id == await _account_filter(conn, account_id))
        return await repo._page(
            conn, select(table).where(and_(*conditions)), sorts, table.c.id, page.limit, page.cursor, page.sort,
            "due_at",
        )  # fmt: skip


async def complete_return_visit(ctx: Context, visit_id: str, notes: str) -> Any:
    table = repo.return_visits
    async with ctx.uow.begin() as tx:
        row = (await tx.conn.execute(select(table).where(table.c.id == visit_id).with_for_update())).first()
        if row is None or not current_scope().allows(owner_id=row.owner_id, team=row.team, region=row.region):
            raise NotFound("return_visit", visit_id)
        domain.check_visit_completion(row.status)
        await tx.conn.execute(
            update(table).where(table.c.id == visit_id).values(status="done", notes=notes, completed_at=ctx.clock())
        )
        return (await tx.conn.execute(select(table).where(table.c.id == visit_id))).one()


# --- knowledge base --------------------------------------------------------------------------------


async def create_article(ctx: Context, values: dict[str, Any], *, idempotency_key: str) -> Any:
    values = {"category": "", "tags": [], "published": False, **values}
    _fail(domain.validate_article(values, partial=False))
    principal = current_principal()
    now = ctx.clock()
    table = repo.kb_articles
    article_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_article", idempotency_key, article_id, now)
        if earlier is None:
            await tx.conn.execute(
                insert(table).values(
                    id=article_id, **{name: values[name] for name in ARTICLE_FIELDS}, author_id=principal.user_id,
                    created_at=now, updated_at=now, version=1,
                )
            )  # fmt: skip
        result_id = article_id if earlier is None else earlier
        return (await tx.conn.execute(select(table).where(table.c.id == result_id))).one()


async def get_article(ctx: Context, article_id: str) -> Any:
    async with ctx.uow.engine.connect() as conn:
        row = (await conn.execute(select(repo.kb_articles).where(repo.kb_articles.c.id == article_id))).first()
    if row is None:
        raise NotFound("kb_article", article_id)
    return row


async def update_article(
    ctx: Context, article_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[Any]:
    _fail(domain.validate_article(values, partial=True))
    table = repo.kb_articles
    async with ctx.uow.begin() as tx:
        row = (await tx.conn.execute(select(table).where(table.c.id == article_id).with_for_update())).first()
        if row is None:
            raise NotFound("kb_article", article_id)
        _check_version("kb_article", row, expected_version)
        await tx.conn.execute(
            update(table)
            .where(table.c.id == article_id)
            .values(**values, updated_at=ctx.clock(), version=row.version + 1)
        )
        return Change((await tx.conn.execute(select(table).where(table.c.id == article_id))).one(), row)


async def search_articles(
    ctx: Context, q: str, *, category: str, limit: int, include_unpublished: bool, cursor: str = ""
) -> tuple[list[Any], str]:
    """A page of the articles matching every word of `q` (all without one) and the next page's cursor."""
    terms = domain.search_terms(q, min_length=1, stop_words=False)
    if q.strip() and not terms:
        raise ValidationFailed([FieldError("q", "has no searchable words")])
    async with ctx.uow.engine.connect() as conn:
        return await repo.search_articles(
            conn, terms, any_term=False, category=category, published_only=not include_unpublished, limit=limit,
            cursor=cursor,
        )  # fmt: skip


async def _suggestions(conn: AsyncConnection, t: Mapping[str, Any], limit: int) -> list[Any]:
    terms = domain.search_terms(f"{t['subject']} {t['description']}")
    if not terms or limit <= 0:
        return []
    found, _ = await repo.search_articles(conn, terms, any_term=True, category="", published_only=True, limit=limit * 3)
    # Articles of the ticket's category first, keeping the relevance order within each group.
    ordered = sorted(found, key=lambda row: row.category != t["category"])
    return ordered[:limit]


async def suggest_articles(ctx: Context, ticket_id: str, limit: int) -> list[Any]:
    row, _, _, _ = await get_ticket(ctx, ticket_id)
    async with ctx.uow.engine.connect() as conn:
        return await _suggestions(conn, row._mapping, min(limit or ctx.suggestions, 20))


# --- the accounts projection -----------------------------------------------------------------------


async def apply_account(tx: Transaction, account_id: str, tier: str, region: str) -> int:
    """Keeps the tier (VIP) and region of an account, from crm.accounts.v1 events. When the tier
    changes, the account's open and resolved tickets take it (`_take_tier`); returns how many."""
    if not account_id:
        return 0  # bad data: "" is how a ticket without an account is stored
    values = {"account_id": account_id, "tier": tier, "region": region, "updated_at": utcnow()}
    await insert_on_conflict(
        tx.conn,
        repo.account_tiers,
        values,
        lambda insert: insert.on_conflict_do_update(
            index_elements=["account_id"],
            set_={name: insert.excluded[name] for name in ("tier", "region", "updated_at")},
        ),
        shape="tier and region",
    )
    return await _take_tier(tx, account_id, tier)


async def _take_tier(tx: Transaction, account_id: str, tier: str) -> int:
    """The account's tickets of another tier that follow it (`domain.TAKE_THE_ACCOUNTS_TIER`) take
    `tier`: the open ones with the SLA targets of their new effective priority; returns how many."""
    t = repo.tickets
    rows = await tx.conn.execute(
        select(t)
        .where(
            t.c.account_id == account_id,
            t.c.status.in_(domain.TAKE_THE_ACCOUNTS_TIER),
            t.c.account_tier != tier,
        )
        .order_by(t.c.id)
        .with_for_update()
    )
    now = utcnow()
    changed = 0
    for row in rows:
        await _change_account_facts(tx, dict(row._mapping), {"account_tier": tier}, now)
        changed += 1
    return changed


async def _change_account_facts(
    tx: Transaction, before: Mapping[str, Any], changes: Mapping[str, Any], now: datetime
) -> None:
    """A change the accounts context makes to a locked ticket (its account, its account's tier): an
    open ticket of another tier gets the SLA targets of its new effective priority. A resolved one
    keeps the targets its resolution was judged against (re-timing its paused clock now could move
    the due time to before `resolved_at` with no breach said): it is re-timed if reopened (`_move`)."""
    t = {**before, **changes}
    if t["status"] in domain.OPEN_STATUSES and t["account_tier"] != before["account_tier"]:
        await _apply_sla(tx.conn, t, now)
    await _store_update(tx, before, t, now)


async def apply_account_merge(tx: Transaction, survivor_id: str, duplicate_id: str) -> None:
    """Tickets, surveys and return visits of a merged-away account go to the survivor or, if that
    was merged in turn, to the end of the chain of merges (merges of different accounts arrive in
    any order); the projection remembers where the duplicate went, for the tickets that name it
    later. Moved open and resolved tickets take the final survivor's tier (a VIP survivor raises
    them: the open ones at once, a resolved one if reopened), or are closed, and open return visits
    cancelled, if its deletion came first (the events travel under different keys)."""
    if not survivor_id or not duplicate_id:
        return  # bad data: "" is how a ticket without an account is stored
    table = repo.account_tiers
    now = utcnow()
    # Known or not (the projection may have missed its creation), the duplicate is remembered, and
    # locked first: a ticket naming it waits for the merge, then follows it. Every writer locks a
    # chain from its start towards the survivor, so none waits for another in the opposite order.
    await insert_ignore(
        tx.conn, table, {"account_id": duplicate_id, "tier": "", "region": "", "updated_at": now}, keys=["account_id"]
    )
    await tx.conn.execute(select(table.c.account_id).where(table.c.account_id == duplicate_id).with_for_update())
    # The survivor's row is locked as its deletion locks it: the two apply one after the other.
    chain, survivor = await _merge_chain(tx.conn, survivor_id, lock="exclusive")
    if duplicate_id in chain:
        log.warning("ignored the merge of account %s into %s: it would close a cycle", duplicate_id, survivor_id)
        return
    final_id = chain[-1]
    await tx.conn.execute(
        update(table).where(table.c.account_id == duplicate_id).values(merged_into_id=survivor_id, updated_at=now)
    )
    t = repo.tickets
    moving = await tx.conn.execute(select(t).where(t.c.account_id == duplicate_id).order_by(t.c.id).with_for_update())
    takes_tier = survivor is not None and survivor.deleted_at is None
    for row in moving:
        changes = {"account_id": final_id}
        if takes_tier and row.status in domain.TAKE_THE_ACCOUNTS_TIER:
            changes["account_tier"] = survivor.tier
        await _change_account_facts(tx, dict(row._mapping), changes, now)
    for records in (repo.csat_responses, repo.return_visits):
        await tx.conn.execute(update(records).where(records.c.account_id == duplicate_id).values(account_id=final_id))
    if survivor is not None and survivor.deleted_at is not None:
        await _end_service_of_deleted_account(tx, final_id)


async def apply_account_deleted(tx: Transaction, account_id: str) -> int:
    """Marks the account deleted in the projection (no more tickets for it), closes its tickets and
    cancels its open return visits; returns how many tickets were closed. Repeated, it changes nothing."""
    if not account_id:
        return 0  # bad data: "" is how a ticket without an account is stored
    table = repo.account_tiers
    now = utcnow()
    # Known or not (the projection may have missed its creation), the account is remembered as deleted.
    await insert_ignore(
        tx.conn, table, {"account_id": account_id, "tier": "", "region": "", "updated_at": now}, keys=["account_id"]
    )
    await tx.conn.execute(
        update(table)
        .where(table.c.account_id == account_id, table.c.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
    )
    return await _end_service_of_deleted_account(tx, account_id)


async def _end_service_of_deleted_account(tx: Transaction, account_id: str) -> int:
    """Closes the deleted account's tickets, then cancels its open return visits: in that order, a
    ticket whose resolution the closing waited for has scheduled its visit by then. Returns how many
    tickets were closed."""
    closed = await _close_tickets_of_deleted_account(tx, account_id)
    await _cancel_return_visits_of_deleted_account(tx, account_id)
    return closed


async def _cancel_return_visits_of_deleted_account(tx: Transaction, account_id: str) -> None:
    """Cancels every open return visit of the deleted account (nobody is left to call), with a note
    saying why, and publishes return_visit.cancelled for each; done visits stay as history."""
    table = repo.return_visits
    note = f"Cancelled: account {account_id} was deleted."
    cancelled = await tx.conn.execute(
        update(table)
        .where(table.c.account_id == account_id, table.c.status == "open")
        .values(status="cancelled", notes=note)
        .returning(*table.c)
    )
    for visit in cancelled:
        tx.publish(
            events_pb2.ReturnVisitCancelled(
                return_visit=return_visit_to_proto(visit), reason=domain.VISIT_CANCELLED_WITH_THE_ACCOUNT
            ),
            key=visit.ticket_id,
        )


async def _close_tickets_of_deleted_account(tx: Transaction, account_id: str) -> int:
    """Closes every ticket of the deleted account not closed yet, as a close by hand would (events,
    stopped SLA clocks), with a note saying why; the tickets, surveys and work log stay as history."""
    t = repo.tickets
    rows = await tx.conn.execute(
        select(t)
        .where(t.c.account_id == account_id, t.c.status.in_(domain.CLOSED_WITH_THE_ACCOUNT))
        .order_by(t.c.id)
        .with_for_update()
    )
    now = utcnow()
    closed = 0
    for row in rows:
        await _move(tx, dict(row._mapping), "closed", now=now, note=f"Closed: account {account_id} was deleted.")
        closed += 1
    return closed
