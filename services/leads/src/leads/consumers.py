"""Events this service consumes: accounts' contacts, kept as a projection of their dedupe keys so a
new lead is linked to an existing contact (`matched_contact_id`) without a call per lead. A
contact's events share its key, and the projection holds its version and a tombstone once it is
deleted, so a redelivered or late event never brings back keys a newer one replaced or removed.
Account merges re-point the leads converted into the duplicate to the survivor (the last of a chain
of merges, whatever order they arrive in)."""

import logging

from crm.accounts.v1 import accounts_pb2, events_pb2
from crm.common.v1 import common_pb2
from crm.leads.v1 import events_pb2 as leads_events
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.contact_points import normalise_email, normalise_phone
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.timeutil import utcnow
from sqlalchemy import or_, select, update

from leads import domain
from leads import repository as repo
from leads.messages import lead_to_proto

log = logging.getLogger(__name__)


def contact_keys(contact: accounts_pb2.Contact, default_country: str) -> tuple[str | None, str | None]:
    """The normalised email and phone (mobile first) of a contact; malformed values are ignored."""
    email = phone = None
    if contact.email:
        try:
            email = normalise_email(contact.email)
        except ValueError:
            email = None
    for raw in (contact.mobile, contact.phone):
        if raw and phone is None:
            try:
                phone = normalise_phone(raw, default_country)
            except ValueError:
                phone = None
    return email, phone


async def apply_contact(tx: Transaction, contact: accounts_pb2.Contact, default_country: str) -> None:
    email, phone = contact_keys(contact, default_country)
    applied = await repo.put_contact_keys(
        tx.conn, contact.id, email_norm=email, phone_norm=phone, version=contact.version, now=utcnow()
    )
    if not applied:
        return  # a newer version of the contact, or its deletion, was applied first
    # Open leads already captured for this person are linked now.
    matches = []
    if email:
        matches.append(repo.leads.c.email_norm == email)
    if phone:
        matches.append(repo.leads.c.phone_norm == phone)
    for condition in matches:
        await tx.conn.execute(
            update(repo.leads)
            .where(condition, repo.leads.c.matched_contact_id == "", repo.leads.c.status.in_(domain.OPEN_STATUSES))
            .values(matched_contact_id=contact.id)
        )


async def apply_contact_deleted(tx: Transaction, contact_id: str) -> None:
    """A deleted contact links no lead captured from now on. A lead linked to it is linked to
    another live contact of its email or phone, else to none: a link to a contact nobody can open
    (one a conversion attempt created and its undo deleted, maybe as the lead was disqualified)
    helps no one. A converted lead keeps the link it had when it converted."""
    await repo.tombstone_contact_keys(tx.conn, contact_id, now=utcnow())
    c = repo.leads.c
    linked = await tx.conn.execute(
        select(c.id, c.email_norm, c.phone_norm).where(c.matched_contact_id == contact_id, c.status != "converted")
    )
    for lead_id, email, phone in linked.all():
        other = await repo.find_contact(tx.conn, email_norm=email or None, phone_norm=phone or None)
        await tx.conn.execute(update(repo.leads).where(c.id == lead_id).values(matched_contact_id=other))


async def apply_account_merged(
    tx: Transaction, duplicate_id: str, survivor_id: str, merged_by: common_pb2.Actor
) -> None:
    """account.merged: the leads converted into the duplicate name the survivor, or the account the
    survivor was merged into since (`account_merges` remembers, as merges of one chain come under
    different keys in any order). Each moved lead is a new version, published as `lead.updated`
    with the merge's actor. Redelivered, it finds no lead left to move."""
    if not duplicate_id or not survivor_id or duplicate_id == survivor_id:
        return  # bad data: nothing to re-point
    conn, now = tx.conn, utcnow()
    await repo.lock_account_merges(conn, shared=False)
    final_id = await repo.surviving_account(conn, survivor_id)
    if final_id == duplicate_id:
        log.warning("ignored the merge of account %s into %s: it would close a cycle", duplicate_id, survivor_id)
        return
    await repo.record_account_merge(conn, duplicate_id, final_id, now=now)
    c = repo.leads.c
    moved = await conn.execute(
        update(repo.leads)
        .where(repo.CONVERTED_INTO_ACCOUNT, c.converted_account_id == duplicate_id)
        .values(converted_account_id=final_id, updated_at=now, version=c.version + 1)
        .returning(repo.leads)
    )
    for row in sorted(moved.mappings(), key=lambda lead: str(lead["id"])):
        tx.publish(
            leads_events.LeadUpdated(lead=lead_to_proto(row), changed_fields=["converted_account_id"], actor=merged_by),
            key=row["id"],
        )
    # The conversion log follows, except an unfinished attempt's own account: undoing the attempt
    # deletes what it made (gone with the merge), never the survivor.
    s = repo.conversions.c
    await conn.execute(
        update(repo.conversions)
        .where(s.account_id == duplicate_id, or_(s.state == "completed", s.account_created.is_(False)))
        .values(account_id=final_id)
    )


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings, default_country: str) -> EventConsumer:
    async def on_created(tx: Transaction, event: ReceivedEvent[events_pb2.ContactCreated]) -> None:
        await apply_contact(tx, event.message.contact, default_country)

    async def on_updated(tx: Transaction, event: ReceivedEvent[events_pb2.ContactUpdated]) -> None:
        await apply_contact(tx, event.message.contact, default_country)

    async def on_deleted(tx: Transaction, event: ReceivedEvent[events_pb2.ContactDeleted]) -> None:
        await apply_contact_deleted(tx, event.message.contact_id)

    async def on_account_merged(tx: Transaction, event: ReceivedEvent[events_pb2.AccountMerged]) -> None:
        merge = event.message
        await apply_account_merged(tx, merge.duplicate_id, merge.survivor_id, merge.actor)

    return EventConsumer(
        name="leads-contacts",
        uow=uow,
        metadata=repo.metadata,
        kafka=kafka,
        handlers={
            events_pb2.ContactCreated: on_created,
            events_pb2.ContactUpdated: on_updated,
            events_pb2.ContactDeleted: on_deleted,
            events_pb2.AccountMerged: on_account_merged,
        },
        service="leads",
    )
