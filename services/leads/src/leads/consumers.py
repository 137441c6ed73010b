"""Events this service consumes: accounts' contacts, kept as a projection of their dedupe keys so a
new lead is linked to an existing contact (`matched_contact_id`) without a call per lead."""

from crm.accounts.v1 import accounts_pb2, events_pb2
from crm_platform.config import KafkaSettings
from crm_platform.consumer import EventConsumer, ReceivedEvent
from crm_platform.contact_points import normalise_email, normalise_phone
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.timeutil import utcnow
from sqlalchemy import update

from leads import domain
from leads import repository as repo
from leads.db_ops import upsert


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
    await upsert(
        tx.conn,
        repo.contact_keys,
        {"contact_id": contact.id, "email_norm": email, "phone_norm": phone, "updated_at": utcnow()},
        keys=["contact_id"],
    )
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


def build_consumer(uow: UnitOfWork, kafka: KafkaSettings, default_country: str) -> EventConsumer:
    async def on_created(tx: Transaction, event: ReceivedEvent[events_pb2.ContactCreated]) -> None:
        await apply_contact(tx, event.message.contact, default_country)

    async def on_updated(tx: Transaction, event: ReceivedEvent[events_pb2.ContactUpdated]) -> None:
        await apply_contact(tx, event.message.contact, default_country)

    return EventConsumer(
        name="leads-contacts",
        uow=uow,
        metadata=repo.metadata,
        kafka=kafka,
        handlers={events_pb2.ContactCreated: on_created, events_pb2.ContactUpdated: on_updated},
        service="leads",
    )
