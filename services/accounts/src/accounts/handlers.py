"""Use cases of the accounts service: one function per command, each in one unit of work that
writes the change and its events (outbox) together."""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from crm.accounts.v1 import events_pb2
from crm_platform import custom_fields as cf
from crm_platform import idempotency
from crm_platform.activities import DUE_FILTERS, due_before, follow_up_change, may_change_activity
from crm_platform.changes import Change
from crm_platform.contact_points import normalise_email, normalise_phone
from crm_platform.custom_field_filters import CustomFilter, load_filters
from crm_platform.custom_fields_service import load_definitions
from crm_platform.db import lock_for_transaction
from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    FieldError,
    NotFound,
    StaleVersion,
    ValidationFailed,
    missing_reference,
)
from crm_platform.ids import new_id
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.principal import (
    Principal,
    RecordScope,
    ScopeKind,
    current_principal,
    current_scope,
    scope_clause,
)
from crm_platform.timeutil import as_utc, utcnow
from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from accounts import domain
from accounts import repository as repo
from accounts.domain import PoolPolicy
from accounts.messages import account_to_proto, activity_to_proto, actor, contact_to_proto, task_to_proto
from accounts.repository import AccountFilter, ContactFilter, Page

ACCOUNT_FIELDS = (
    "name",
    "industry",
    "size",
    "annual_revenue",
    "region",
    "address",
    "website",
    "tier",
    "lifecycle",
    "owner_id",
    "team",
    "tags",
    "custom",
    "parent_id",
    "credit_limit",
)
CONTACT_FIELDS = (
    "account_id",
    "name",
    "title",
    "department",
    "phone",
    "mobile",
    "email",
    "wechat",
    "decision_role",
    "is_primary",
    "tags",
    "custom",
)
TASK_FIELDS = ("account_id", "contact_id", "title", "notes", "due_at", "owner_id")
# What happened: the fields of an activity a correction may change (not its account, contact or actor).
ACTIVITY_FIELDS = ("kind", "subject", "notes", "occurred_at", "outcome", "next_follow_up_at")
SEGMENT_FIELDS = ("name", "visibility", "filters", "tags")
OWNED_ENTITIES = ("account", "contact")


@dataclass(slots=True)
class Context:
    uow: UnitOfWork
    policy: PoolPolicy
    default_country_code: str = "86"
    clock: Callable[[], datetime] = utcnow


@dataclass(frozen=True, slots=True)
class Merge:
    """A merge: the survivor after it, what moved to it from the duplicate, and for the caller's audit
    trail both accounts as they were before it (read under their row locks in the merge's
    transaction; None for an answer repeating the idempotency key's earlier merge)."""

    survivor: Any
    previous_survivor: Any | None
    previous_duplicate: Any | None
    moved_contact_ids: list[str]
    moved_activities: int
    moved_tasks: int


def _fail(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationFailed(errors)


def _visible(scope: RecordScope, row: Any) -> bool:
    return scope.allows(owner_id=row.owner_id, team=row.team, region=row.region)


def _name_taken(name: str, duplicate: Any | None) -> AlreadyExists:
    """409 for an account name already taken in its region: the account is named (`existing_id`)
    only to a caller who may read it, as a read would (never reveal a record out of scope)."""
    if duplicate is not None and (duplicate.in_pool or _visible(current_scope(), duplicate)):
        return AlreadyExists(f"account {name!r} already exists in this region", existing_id=duplicate.id)
    return AlreadyExists(f"account {name!r} already exists in this region, outside your accounts")


def _check_version(resource: str, row: Any, expected: int) -> None:
    if expected and row.version != expected:
        raise StaleVersion(resource, row.id, row.version)


# --- custom fields ---------------------------------------------------------------------------------


async def _custom_values(
    conn: AsyncConnection, entity: str, values: Mapping[str, Any], *, existing: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validated, canonical custom values; an update merges into the stored ones."""
    defs = await load_definitions(conn, repo.custom_fields, entity)
    _fail(cf.validate(defs, values, partial=existing is not None))
    merged = dict(existing or {})
    for key, _value in values.items():
        merged.pop(key, None)
    merged.update(cf.coerce(defs, values))
    return merged


async def custom_filters(
    conn: AsyncConnection, entity: str, pairs: Iterable[tuple[str, str]], *, field_prefix: str = "custom"
) -> list[CustomFilter]:
    return await load_filters(conn, repo.custom_fields, entity, pairs, prefix=field_prefix)


# --- accounts --------------------------------------------------------------------------------------


async def _readable_account(
    conn: AsyncConnection,
    account_id: str,
    *,
    for_update: bool = False,
    field: str = "",
    scope: RecordScope | None = None,
    pool_open: bool = True,
) -> Any:
    """A visible account (pool accounts are visible to everyone), a merged-away one as its tombstone,
    else NotFound; an account a request's body names in `field` that is not there is a 422 naming the
    field instead. Visible in `scope`, by default the call's record scope. Without `pool_open`, a
    pool account must be in that scope too: anyone may read, claim and work a pool account, only those
    whose scope holds it may change, transfer or delete it."""
    row = await repo.get_account(conn, account_id, for_update=for_update)
    if row is None or not ((pool_open and row.in_pool) or _visible(scope or current_scope(), row)):
        if field:
            raise missing_reference(field, "account", account_id)
        raise NotFound("account", account_id)
    return row


async def _live_account(
    conn: AsyncConnection,
    account_id: str,
    *,
    for_update: bool = False,
    field: str = "",
    scope: RecordScope | None = None,
    pool_open: bool = True,
) -> Any:
    """A readable account (`_readable_account`) that is not merged away, else Conflict MERGED."""
    row = await _readable_account(
        conn, account_id, for_update=for_update, field=field, scope=scope, pool_open=pool_open
    )
    if row.merged_into_id:
        raise Conflict(
            f"account {account_id} was merged into {row.merged_into_id}",
            existing_id=row.merged_into_id,
            reason="MERGED",
        )
    return row


async def _check_parent(conn: AsyncConnection, account_id: str, parent_id: str) -> None:
    if not parent_id:
        return
    parent = await repo.get_account(conn, parent_id)
    if parent is None or parent.merged_into_id or not (parent.in_pool or _visible(current_scope(), parent)):
        raise missing_reference("parent_id", "account", parent_id)
    if domain.parent_cycle(account_id, parent_id, await repo.parent_chain(conn, parent_id)):
        raise ValidationFailed([FieldError("parent_id", "would make the account hierarchy a cycle")])


# A repeated create with the same key (per caller) answers with the first result. Each call claims
# its key first thing in its transaction: a concurrent repeat waits there, then answers alike.
_idempotency_keys = idempotency.CallerKeys(repo.idempotency_keys)


def _earlier_live(row: Any | None, gone: NotFound) -> Any:
    """The account or contact a key's first request created, as `repo.get_account` / `get_contact`
    read it back for a repeat (None: soft-deleted since). Deleted, the repeat answers `gone`, a 404,
    as `idempotency.earlier_record` answers for records deleted outright (it would still find a
    soft-deleted row)."""
    if row is None:
        raise gone
    return row


async def create_account(ctx: Context, values: dict[str, Any], *, idempotency_key: str, in_pool: bool) -> Any:
    principal = current_principal()
    account_id = new_id()
    now = ctx.clock()
    try:
        async with ctx.uow.begin() as tx:
            earlier = await _idempotency_keys.claim(tx.conn, "create_account", idempotency_key, account_id, now)
            if earlier is not None:
                return _earlier_live(await repo.get_account(tx.conn, earlier), NotFound("account", earlier))
            # A rep's new account lands in their own region and team unless set (managers may set them).
            values = {**values, "name": str(values.get("name", "")).strip()}
            values["region"] = values.get("region") or principal.region
            values["tags"] = domain.normalise_tags(values.get("tags", []))
            _fail(domain.check_account(values))
            custom = await _custom_values(tx.conn, "account", values.get("custom") or {}, existing=None)
            key = domain.dedupe_key(values["name"], values.get("region", ""))
            duplicate = await repo.find_by_dedupe_key(tx.conn, key)
            if duplicate is not None:
                raise _name_taken(values["name"], duplicate)
            await _check_parent(tx.conn, account_id, values.get("parent_id") or "")
            row = {
                **{k: v for k, v in values.items() if k in repo.accounts.c and k not in ("custom", "tags")},
                "id": account_id,
                "dedupe_key": key,
                "tags": values["tags"],
                "custom": custom,
                "parent_id": values.get("parent_id") or None,
                "owner_id": "" if in_pool else (values.get("owner_id") or principal.user_id),
                "team": values.get("team") or principal.team,
                "lifecycle": values.get("lifecycle") or "prospect",
                "in_pool": in_pool,
                "released_at": now if in_pool else None,
                "created_at": now,
                "updated_at": now,
                "version": 1,
            }
            await tx.conn.execute(insert(repo.accounts).values(**row))
            created = await repo.get_account(tx.conn, account_id)
            tx.publish(
                events_pb2.AccountCreated(account=account_to_proto(created), actor=actor(principal)), key=account_id
            )
            return created
    except IntegrityError:
        # A concurrent create (another key) won the unique dedupe index: answer as it would have.
        async with ctx.uow.engine.connect() as conn:
            duplicate = await repo.find_by_dedupe_key(conn, domain.dedupe_key(values["name"], values.get("region", "")))
        raise _name_taken(values["name"], duplicate) from None


async def get_account(ctx: Context, account_id: str) -> Any:
    """The account; a merged-away id answers with its tombstone (merged_into_id names the survivor)."""
    async with ctx.uow.engine.connect() as conn:
        return await _readable_account(conn, account_id)


async def update_account(
    ctx: Context, account_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[Any]:
    principal = current_principal()
    for forbidden in ("owner_id", "in_pool"):
        if forbidden in values:
            _fail([FieldError(forbidden, "change ownership with the transfer, release or claim actions")])
    try:
        async with ctx.uow.begin() as tx:
            row = await _live_account(tx.conn, account_id, for_update=True, pool_open=False)
            _check_version("account", row, expected_version)
            if "tags" in values:
                values["tags"] = domain.normalise_tags(values["tags"])
            if "name" in values:
                values["name"] = str(values["name"]).strip()
            _fail(domain.check_account(values, update=True))
            changes = {k: v for k, v in values.items() if k != "custom"}
            if "custom" in values:
                changes["custom"] = await _custom_values(tx.conn, "account", values["custom"], existing=row.custom)
            if "parent_id" in values:
                changes["parent_id"] = values["parent_id"] or None
                # Only a new parent is checked: saving the account as read keeps a parent out of scope.
                if changes["parent_id"] != row.parent_id:
                    await _check_parent(tx.conn, account_id, values["parent_id"] or "")
            name, region = changes.get("name", row.name), changes.get("region", row.region)
            key = domain.dedupe_key(name, region)
            if key != row.dedupe_key:
                duplicate = await repo.find_by_dedupe_key(tx.conn, key)
                if duplicate is not None and duplicate.id != account_id:
                    raise _name_taken(name, duplicate)
                changes["dedupe_key"] = key
            changed = sorted(k for k, v in changes.items() if k != "dedupe_key" and getattr(row, k) != v)
            if not changed:
                return Change(row, row)
            now = ctx.clock()
            await tx.conn.execute(
                update(repo.accounts)
                .where(repo.accounts.c.id == account_id)
                .values(**changes, updated_at=now, version=row.version + 1)
            )
            territory: dict[str, str] = {name: changes[name] for name in ("team", "region") if name in changed}
            if territory:
                await _follow_territory(tx, account_id, territory, now=now, principal=principal)
            updated = await repo.get_account(tx.conn, account_id)
            tx.publish(
                events_pb2.AccountUpdated(
                    account=account_to_proto(updated), changed_fields=changed, actor=actor(principal)
                ),
                key=account_id,
            )
            return Change(updated, row)
    except IntegrityError:
        raise AlreadyExists("account already exists in this region") from None


CANCELLED = {"status": "cancelled"}


async def _follow_territory(
    tx: Transaction, account_id: str, territory: dict[str, str], *, now: datetime, principal: Principal
) -> None:
    """An account's contacts and open tasks carry its team and region (copied when made, read in
    that scope): a new team or region takes them along, so the account's new team sees them and
    the old one no longer does. Each moved contact and task is published."""
    c, t = repo.contacts, repo.tasks
    await _change_contacts(
        tx, c.c.account_id == account_id, c.c.deleted_at.is_(None), values=territory, now=now, principal=principal
    )
    await _change_tasks(
        tx, t.c.account_id == account_id, t.c.status == "open", values=territory, now=now, principal=principal
    )


async def _change_contacts(
    tx: Transaction, *selecting: ColumnElement[bool], values: Mapping[str, Any], now: datetime, principal: Principal
) -> list[Any]:
    """Sets `values` on the contacts `selecting` picks that differ in any of them, each in its next
    version, published as contact.updated with the fields that changed for it, as an edit is: a mirror
    (ERP, analytics) follows a demoted primary, a new owner or territory, a merge. A deleted contact
    changed along (a merge moves it too) is not published: its mirrors dropped it on contact.deleted.
    Returns the changed contacts as they are now, in id order."""
    c = repo.contacts
    differs = or_(*(c.c[name] != value for name, value in values.items()))
    # Read as they were, locked, for each one's changed fields: RETURNING gives only the new row.
    before = {
        row.id: row
        for row in await tx.conn.execute(select(c).where(*selecting, differs).order_by(c.c.id).with_for_update())
    }
    if not before:
        return []
    changed = await tx.conn.execute(
        update(c).where(c.c.id.in_(before)).values(**values, updated_at=now, version=c.c.version + 1).returning(c)
    )
    contacts = sorted(changed, key=lambda contact: contact.id)
    for contact in contacts:
        if contact.deleted_at is not None:
            continue
        fields = sorted(name for name in values if getattr(before[contact.id], name) != getattr(contact, name))
        tx.publish(
            events_pb2.ContactUpdated(contact=contact_to_proto(contact), changed_fields=fields, actor=actor(principal)),
            key=contact.id,
        )
    return contacts


async def _change_tasks(
    tx: Transaction, *selecting: ColumnElement[bool], values: Mapping[str, Any], now: datetime, principal: Principal
) -> list[Any]:
    """Sets `values` on the tasks `selecting` picks, each in its next version, published as
    task.updated with those fields (so the read models follow: a cancelled task closes there too).
    Returns the changed tasks as they are now, in id order."""
    t = repo.tasks
    changed = await tx.conn.execute(
        update(t).where(*selecting).values(**values, updated_at=now, version=t.c.version + 1).returning(t)
    )
    tasks = sorted(changed, key=lambda task: task.id)
    for task in tasks:
        tx.publish(
            events_pb2.TaskUpdated(task=task_to_proto(task), changed_fields=sorted(values), actor=actor(principal)),
            key=task.id,
        )
    return tasks


async def delete_account(ctx: Context, account_id: str, *, expected_version: int) -> Any:
    """Soft-deletes the account with its contacts (each evented as DeleteContact does) and cancels its
    open tasks; returns it as it was (for the caller's audit trail). Contact writes share-lock their
    account, so none lands on it meanwhile."""
    principal = current_principal()
    c, t = repo.contacts, repo.tasks
    async with ctx.uow.begin() as tx:
        row = await _live_account(tx.conn, account_id, for_update=True, pool_open=False)
        _check_version("account", row, expected_version)
        now = ctx.clock()
        await tx.conn.execute(
            update(repo.accounts).where(repo.accounts.c.id == account_id).values(deleted_at=now, updated_at=now)
        )
        contact_ids = await tx.conn.scalars(
            update(c)
            .where(c.c.account_id == account_id, c.c.deleted_at.is_(None))
            .values(deleted_at=now, updated_at=now)
            .returning(c.c.id)
        )
        for contact_id in sorted(contact_ids):
            tx.publish(
                events_pb2.ContactDeleted(contact_id=contact_id, account_id=account_id, actor=actor(principal)),
                key=contact_id,
            )
        await _change_tasks(
            tx, t.c.account_id == account_id, t.c.status == "open", values=CANCELLED, now=now, principal=principal
        )
        tx.publish(events_pb2.AccountDeleted(account_id=account_id, actor=actor(principal)), key=account_id)
        return row


async def segment_filter(conn: AsyncConnection, segment_id: str) -> AccountFilter:
    segment = await _visible_segment(conn, segment_id)
    return await filter_from_pairs(conn, _segment_pairs(segment), field_prefix="filters")


def _segment_pairs(segment: Any) -> list[tuple[str, str]]:
    pairs = [(k, v) for k, v in dict(segment.filters).items()]
    pairs.extend(("tag", tag) for tag in segment.tags)
    return pairs


async def filter_from_pairs(
    conn: AsyncConnection, pairs: Iterable[tuple[str, str]], *, field_prefix: str = ""
) -> AccountFilter:
    """An account filter from query-string style pairs (segments store their filters this way)."""
    f = AccountFilter()
    custom_pairs: list[tuple[str, str]] = []
    errors: list[FieldError] = []
    lists = {"tier": f.tiers, "lifecycle": f.lifecycles, "region": f.regions, "industry": f.industries, "tag": f.tags}
    prefix = f"{field_prefix}." if field_prefix else ""
    # A stored filter of a value no account has would list nothing, silently: refused as the
    # account list refuses it.
    choices = {"tier": domain.TIERS, "lifecycle": domain.LIFECYCLES}
    for key, raw in pairs:
        values = [v.strip() for v in raw.split(",") if v.strip()] if key != "q" else [raw]
        if key in lists:
            unknown = [value for value in values if key in choices and value not in choices[key]]
            if unknown:
                errors.append(FieldError(f"{prefix}{key}", f"{unknown[0]!r} is not one of {', '.join(choices[key])}"))
            lists[key].extend(values)
        elif key in ("q", "owner_id", "team", "parent_id"):
            setattr(f, key, raw)
        elif key == "in_pool":
            if raw not in ("true", "false"):
                errors.append(FieldError(f"{prefix}in_pool", "must be true or false"))
            f.in_pool = raw == "true"
        elif key == "created_after":
            try:
                created_after = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                created_after = None
            if created_after is None or created_after.tzinfo is None:  # a date, or a time of no zone
                errors.append(FieldError(f"{prefix}created_after", "must be an RFC 3339 time with its time zone"))
            else:
                f.created_after = as_utc(created_after)
        elif key.startswith("custom."):
            custom_pairs.append((key.removeprefix("custom."), raw))
        else:
            errors.append(FieldError(f"{prefix}{key}", "is not an account filter"))
    _fail(errors)
    f.custom = await custom_filters(conn, "account", custom_pairs, field_prefix=f"{prefix}custom")
    return f


async def list_accounts(
    ctx: Context, f: AccountFilter, custom_pairs: list[tuple[str, str]], page: Page, segment_id: str
) -> tuple[list[Any], str]:
    async with ctx.uow.engine.connect() as conn:
        f.custom = await custom_filters(conn, "account", custom_pairs)
        # A segment narrows the list: its filters and the request's must all hold.
        saved = await segment_filter(conn, segment_id) if segment_id else None
        return await repo.list_accounts(conn, f, current_scope(), page, segment=saved)


async def list_pool(ctx: Context, f: AccountFilter, page: Page) -> tuple[list[Any], str]:
    f.in_pool = True
    async with ctx.uow.engine.connect() as conn:
        return await repo.list_accounts(conn, f, None, page)


async def _publish_account_updated(tx: Transaction, account_id: str, changed: list[str], principal: Principal) -> Any:
    row = await repo.get_account(tx.conn, account_id)
    tx.publish(
        events_pb2.AccountUpdated(account=account_to_proto(row), changed_fields=changed, actor=actor(principal)),
        key=account_id,
    )
    return row


async def merge_accounts(ctx: Context, survivor_id: str, duplicate_id: str, *, idempotency_key: str) -> Merge:
    principal = current_principal()
    a, c, act, t = repo.accounts, repo.contacts, repo.activities, repo.tasks
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "merge_accounts", idempotency_key, survivor_id, now)
        if earlier is not None:
            # Nothing is merged again: the answer reads both accounts as GetAccount would (out of the
            # caller's scope by now, the survivor is a 404 and the duplicate a 422 naming it).
            survivor = await _readable_account(tx.conn, earlier)
            await _readable_account(tx.conn, duplicate_id, field="duplicate_id")
            return Merge(survivor, None, None, [], 0, 0)
        # Lock in id order so two merges touching the same pair cannot deadlock.
        rows = {i: await repo.get_account(tx.conn, i, for_update=True) for i in sorted({survivor_id, duplicate_id})}
        survivor, duplicate = rows[survivor_id], rows[duplicate_id]
        if survivor is None or not _visible(current_scope(), survivor):
            raise NotFound("account", survivor_id)
        if duplicate is None or not _visible(current_scope(), duplicate):
            raise missing_reference("duplicate_id", "account", duplicate_id)
        _fail(
            domain.check_merge(
                survivor_id=survivor_id,
                duplicate_id=duplicate_id,
                survivor_merged_into=survivor.merged_into_id,
                duplicate_merged_into=duplicate.merged_into_id,
            )
        )
        changes = domain.merge_changes(survivor._asdict(), duplicate._asdict())
        if changes.get("parent_id") and domain.parent_cycle(
            survivor_id, str(changes["parent_id"]), await repo.parent_chain(tx.conn, str(changes["parent_id"]))
        ):
            changes.pop("parent_id")
        heir = domain.heir_in_line(survivor_id, duplicate_id, await repo.parent_chain(tx.conn, survivor_id))
        if heir == survivor_id:
            changes["parent_id"] = duplicate.parent_id
        elif heir is not None:
            await tx.conn.execute(
                update(a)
                .where(a.c.id == heir)
                .values(parent_id=duplicate.parent_id, updated_at=now, version=a.c.version + 1)
            )
        last_activity = max((x for x in (survivor.last_activity_at, duplicate.last_activity_at) if x), default=None)
        if last_activity is not None and last_activity != survivor.last_activity_at:
            changes["last_activity_at"] = last_activity
        # Moved records change, so each takes a new version (an If-Match on the old one is stale),
        # published as an edit of it is. An account has one primary contact: the survivor keeps its
        # own, a moved one stays primary only on a survivor without one.
        survivor_has_primary = await _has_primary(tx.conn, survivor_id)
        moved_to_survivor = {
            "account_id": survivor_id,
            "owner_id": survivor.owner_id,
            "team": survivor.team,
            "region": survivor.region,
            **({"is_primary": False} if survivor_has_primary else {}),
        }
        moved_contacts = [
            contact.id
            for contact in await _change_contacts(
                tx, c.c.account_id == duplicate_id, values=moved_to_survivor, now=now, principal=principal
            )
        ]
        activities = await tx.conn.execute(
            update(act)
            .where(act.c.account_id == duplicate_id)
            .values(account_id=survivor_id, version=act.c.version + 1)
            .returning(act)
        )
        moved_activities = sorted(activities, key=lambda activity: activity.id)
        for activity in moved_activities:
            # Keyed by its account, now the survivor, as its later corrections will be.
            tx.publish(
                events_pb2.ActivityUpdated(
                    activity=activity_to_proto(activity), changed_fields=["account_id"], actor=actor(principal)
                ),
                key=survivor_id,
            )
        # One open reminder per rule and account: the duplicate's for a rule the survivor has one
        # open for is done with (cancelled, and published so), the survivor's stays.
        survivor_reminders = select(t.c.reminder_rule_id).where(
            t.c.account_id == survivor_id, t.c.status == "open", t.c.reminder_rule_id != ""
        )
        await _change_tasks(
            tx,
            t.c.account_id == duplicate_id,
            t.c.status == "open",
            t.c.reminder_rule_id.in_(survivor_reminders),
            values=CANCELLED,
            now=now,
            principal=principal,
        )
        # An open task is read in the survivor's territory from now on, as one moved by update_task
        # is (its team kept where the survivor has none); a done or cancelled one keeps the
        # territory it was worked in, as when an account's territory changes.
        to_survivor = {"account_id": survivor_id}
        survivor_territory = {"region": survivor.region, **({"team": survivor.team} if survivor.team else {})}
        moved_tasks = [
            *await _change_tasks(
                tx,
                t.c.account_id == duplicate_id,
                t.c.status == "open",
                values={**to_survivor, **survivor_territory},
                now=now,
                principal=principal,
            ),
            *await _change_tasks(
                tx,
                t.c.account_id == duplicate_id,
                t.c.status != "open",
                values=to_survivor,
                now=now,
                principal=principal,
            ),
        ]
        # Children and earlier tombstones point at the survivor, so no pointer chain forms. A live
        # child re-parented (and the heir) is a new version of it, published after the merge.
        children = (
            update(a)
            .where(a.c.parent_id == duplicate_id)
            .values(parent_id=survivor_id, updated_at=now, version=a.c.version + 1)
            .returning(a.c.id, a.c.merged_into_id, a.c.deleted_at)
        )
        reparented = [
            child.id
            for child in await tx.conn.execute(children if heir is None else children.where(a.c.id != heir))
            if not child.merged_into_id and child.deleted_at is None
        ]
        await tx.conn.execute(update(a).where(a.c.merged_into_id == duplicate_id).values(merged_into_id=survivor_id))
        await tx.conn.execute(
            update(a)
            .where(a.c.id == duplicate_id)
            .values(merged_into_id=survivor_id, in_pool=False, updated_at=now, version=duplicate.version + 1)
        )
        await tx.conn.execute(
            update(a).where(a.c.id == survivor_id).values(**changes, updated_at=now, version=survivor.version + 1)
        )
        tx.publish(
            events_pb2.AccountMerged(
                survivor_id=survivor_id,
                duplicate_id=duplicate_id,
                moved_contact_ids=moved_contacts,
                actor=actor(principal),
            ),
            key=duplicate_id,
        )
        for child_id in sorted(reparented + ([heir] if heir not in (None, survivor_id) else [])):
            await _publish_account_updated(tx, child_id, ["parent_id"], principal)
        updated = await _publish_account_updated(tx, survivor_id, sorted(changes), principal)
        return Merge(updated, survivor, duplicate, moved_contacts, len(moved_activities), len(moved_tasks))


# --- pool, claim, transfer ---------------------------------------------------------------------------


async def release_account(ctx: Context, account_id: str, *, reason: str, expected_version: int) -> Change[Any]:
    principal = current_principal()
    async with ctx.uow.begin() as tx:
        row = await _live_account(tx.conn, account_id, for_update=True, pool_open=False)
        _check_version("account", row, expected_version)
        if row.in_pool:
            raise Conflict(f"account {account_id} is already in the public pool", reason="ALREADY_IN_POOL")
        released = await _release(tx, row, now=ctx.clock(), reason=reason or "manual", principal=principal)
        return Change(released, row)


async def _release(tx: Transaction, row: Any, *, now: datetime, reason: str, principal: Principal) -> Any:
    await tx.conn.execute(
        update(repo.accounts)
        .where(repo.accounts.c.id == row.id)
        .values(
            in_pool=True,
            owner_id="",
            released_at=now,
            released_by_id=row.owner_id,
            claimed_at=None,
            updated_at=now,
            version=row.version + 1,
        )
    )
    released = await repo.get_account(tx.conn, row.id)
    tx.publish(
        events_pb2.AccountReleased(
            account=account_to_proto(released), previous_owner_id=row.owner_id, reason=reason, actor=actor(principal)
        ),
        key=row.id,
    )
    return released


async def claim_account(ctx: Context, account_id: str, *, idempotency_key: str) -> Change[Any]:
    principal = current_principal()
    a = repo.accounts
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        # An account the caller may not read (not in the pool, nor in their scope) is a 404, as
        # GetAccount answers, also to a repeat. Checked as the request finds it, before waiting for
        # the account's lock: a claim losing the race for a pool account answers that it is taken (409).
        await _readable_account(tx.conn, account_id)
        earlier = await _idempotency_keys.claim(tx.conn, "claim_account", idempotency_key, account_id, now)
        if earlier is not None:
            return Change(await repo.get_account(tx.conn, earlier), None)
        # The claimant's claims are counted one claim at a time, so concurrent ones cannot all pass
        # the daily limit on the same count.
        await lock_for_transaction(tx.conn, f"pool-claims:{principal.user_id}")
        row = await repo.get_account(tx.conn, account_id, for_update=True)
        if row is None or row.merged_into_id:
            raise NotFound("account", account_id)
        claims = await tx.conn.scalar(
            select(func.count())
            .select_from(repo.pool_claims)
            .where(
                repo.pool_claims.c.claimant_id == principal.user_id,
                repo.pool_claims.c.claimed_at > now - timedelta(hours=24),
            )
        )
        released_at = as_utc(row.released_at) if row.released_at else None
        decision = domain.decide_claim(
            ctx.policy,
            claimant_id=principal.user_id,
            in_pool=row.in_pool,
            released_by_id=row.released_by_id,
            released_at=released_at,
            claims_last_24h=int(claims or 0),
            now=now,
        )
        if not decision.allowed:
            raise Conflict(decision.detail, reason=decision.reason.upper())
        # The version guard makes two concurrent claims of one account end with exactly one winner.
        result = await tx.conn.execute(
            update(a)
            .where(a.c.id == account_id, a.c.version == row.version, a.c.in_pool.is_(True))
            .values(
                in_pool=False,
                owner_id=principal.user_id,
                team=principal.team or row.team,
                claimed_at=now,
                updated_at=now,
                version=row.version + 1,
            )
        )
        if result.rowcount != 1:
            raise Conflict(f"account {account_id} was claimed by someone else", reason="NOT_IN_POOL")
        await tx.conn.execute(
            insert(repo.pool_claims).values(
                id=new_id(), account_id=account_id, claimant_id=principal.user_id, claimed_at=now
            )
        )
        await _follow_owner(
            tx,
            account_id,
            previous_owner="",
            new_owner=principal.user_id,
            new_team=principal.team or row.team,
            now=now,
            principal=principal,
        )
        claimed = await repo.get_account(tx.conn, account_id)
        tx.publish(
            events_pb2.AccountClaimed(
                account=account_to_proto(claimed), owner_id=principal.user_id, actor=actor(principal)
            ),
            key=account_id,
        )
        return Change(claimed, row)


async def _follow_owner(
    tx: Transaction,
    account_id: str,
    *,
    previous_owner: str,
    new_owner: str,
    new_team: str,
    now: datetime,
    principal: Principal,
) -> tuple[int, int]:
    """The account's contacts and open tasks follow a change of owner (counts moved)."""
    c, t = repo.contacts, repo.tasks
    moved_contacts = await _change_contacts(
        tx,
        c.c.account_id == account_id,
        c.c.deleted_at.is_(None),
        values={"owner_id": new_owner, "team": new_team},
        now=now,
        principal=principal,
    )
    open_tasks = await _reassign_tasks(
        tx,
        t.c.account_id == account_id,
        t.c.status == "open",
        t.c.owner_id == previous_owner,
        previous_owner=previous_owner,
        values={"owner_id": new_owner, "team": new_team},
        now=now,
        principal=principal,
    )
    return len(moved_contacts), len(open_tasks)


async def _reassign_tasks(
    tx: Transaction,
    *selecting: ColumnElement[bool],
    previous_owner: str,
    values: Mapping[str, Any],
    now: datetime,
    principal: Principal,
) -> list[Any]:
    """Gives the tasks `selecting` picks to their new owner (`values`), each in its next version,
    published as task.reassigned; returns them as they are now, in id order. The version is taken in
    the UPDATE, under each row's lock: a task edit committed meanwhile is built on (and a task it
    completed or gave away is no longer picked), never given the same version."""
    t = repo.tasks
    changed = await tx.conn.execute(
        update(t).where(*selecting).values(**values, updated_at=now, version=t.c.version + 1).returning(t)
    )
    tasks = sorted(changed, key=lambda task: task.id)
    for task in tasks:
        tx.publish(
            events_pb2.TaskReassigned(
                task=task_to_proto(task), previous_owner_id=previous_owner, actor=actor(principal)
            ),
            key=task.id,
        )
    return tasks


async def transfer_account(
    ctx: Context, account_id: str, *, new_owner_id: str, new_team: str, reason: str, expected_version: int
) -> Change[Any]:
    _fail([] if new_owner_id else [FieldError("new_owner_id", "is required")])
    principal = current_principal()
    async with ctx.uow.begin() as tx:
        row = await _live_account(tx.conn, account_id, for_update=True, pool_open=False)
        _check_version("account", row, expected_version)
        if row.owner_id == new_owner_id and not row.in_pool:
            raise Conflict(f"account {account_id} is already owned by {new_owner_id}", reason="SAME_OWNER")
        transferred, _, _ = await _transfer(
            tx, row, new_owner_id, new_team or row.team, reason, "", ctx.clock(), principal
        )
        return Change(transferred, row)


async def _transfer(
    tx: Transaction,
    row: Any,
    new_owner: str,
    new_team: str,
    reason: str,
    bulk_id: str,
    now: datetime,
    principal: Principal,
) -> tuple[Any, int, int]:
    # Its new owner gets the account's full inactivity period (`claimed_at` anchors it, as a
    # claim's does): one taken out of the pool is not returned to it by the next pass.
    await tx.conn.execute(
        update(repo.accounts)
        .where(repo.accounts.c.id == row.id)
        .values(
            owner_id=new_owner, team=new_team, in_pool=False, claimed_at=now, updated_at=now, version=row.version + 1
        )
    )
    contacts, tasks = await _follow_owner(
        tx, row.id, previous_owner=row.owner_id, new_owner=new_owner, new_team=new_team, now=now, principal=principal
    )
    transferred = await repo.get_account(tx.conn, row.id)
    tx.publish(
        events_pb2.AccountTransferred(
            account=account_to_proto(transferred),
            previous_owner_id=row.owner_id,
            new_owner_id=new_owner,
            reason=reason,
            actor=actor(principal),
            bulk_transfer_id=bulk_id,
        ),
        key=row.id,
    )
    return transferred, contacts, tasks


async def bulk_transfer(
    ctx: Context, *, from_owner_id: str, to_owner_id: str, to_team: str, reason: str, idempotency_key: str
) -> tuple[Any, list[str]]:
    """Moves every account of `from_owner_id` in the caller's scope, with its contacts and open
    tasks, and the departing owner's other open tasks. Returns the recorded transfer and the ids of
    the accounts moved (none when its key answers an earlier call's transfer: the service answers
    that call's kept response)."""
    errors = [
        FieldError(n, "is required")
        for n, v in (("from_owner_id", from_owner_id), ("to_owner_id", to_owner_id))
        if not v
    ]
    if from_owner_id and from_owner_id == to_owner_id:
        errors.append(FieldError("to_owner_id", "must differ from from_owner_id"))
    _fail(errors)
    principal = current_principal()
    a, t = repo.accounts, repo.tasks
    now = ctx.clock()
    bulk_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "bulk_transfer", idempotency_key, bulk_id, now)
        if earlier is not None:
            done = await tx.conn.execute(select(repo.bulk_transfers).where(repo.bulk_transfers.c.id == earlier))
            return done.one(), []
        query = (
            select(a)
            .where(
                a.c.owner_id == from_owner_id,
                a.c.merged_into_id == "",
                a.c.deleted_at.is_(None),
                scope_clause(a, current_scope()),
            )
            .order_by(a.c.id)
        )
        if repo.is_pg(tx.conn):
            query = query.with_for_update()
        accounts = list(await tx.conn.execute(query))
        contacts = tasks = 0
        for row in accounts:
            _, moved_contacts, moved_tasks = await _transfer(
                tx, row, to_owner_id, to_team or row.team, reason, bulk_id, now, principal
            )
            contacts += moved_contacts
            tasks += moved_tasks
        # Open tasks of the departing owner that belong to no transferred account follow too.
        loose = await _reassign_tasks(
            tx,
            t.c.owner_id == from_owner_id,
            t.c.status == "open",
            scope_clause(t, current_scope()),
            previous_owner=from_owner_id,
            values={"owner_id": to_owner_id, **({"team": to_team} if to_team else {})},
            now=now,
            principal=principal,
        )
        await tx.conn.execute(
            insert(repo.bulk_transfers).values(
                id=bulk_id,
                from_owner_id=from_owner_id,
                to_owner_id=to_owner_id,
                reason=reason,
                accounts=len(accounts),
                contacts=contacts,
                tasks=tasks + len(loose),
                actor_id=principal.user_id,
                created_at=now,
            )
        )
        recorded = await tx.conn.execute(select(repo.bulk_transfers).where(repo.bulk_transfers.c.id == bulk_id))
        return recorded.one(), [row.id for row in accounts]


# --- contacts ----------------------------------------------------------------------------------------


def _contact_norms(values: Mapping[str, Any], country_code: str) -> dict[str, str]:
    """The matching keys of validated contact values (`domain.check_contact` accepted them)."""
    norms: dict[str, str] = {}
    if "email" in values:
        norms["email_norm"] = normalise_email(values["email"]) if values["email"] else ""
    for name in ("phone", "mobile"):
        if name in values:
            norms[f"{name}_norm"] = normalise_phone(values[name], country_code) if values[name] else ""
    return norms


async def _survivor_id(conn: AsyncConnection, account_id: str) -> str:
    """The account a contact attaching to `account_id` lands on: it, or its survivor; "" when deleted or unknown."""
    row = await repo.get_account(conn, account_id)
    return "" if row is None else row.merged_into_id or row.id


async def _lock_for_contact_write(conn: AsyncConnection, *account_ids: str) -> None:
    """Share-locks the accounts a contact write touches until it commits: a delete of one, which takes
    the account's contacts along, waits for the write (and the write then sees the account gone)."""
    await repo.share_lock_accounts(conn, [await _survivor_id(conn, i) for i in account_ids if i])


async def _account_for_contact(conn: AsyncConnection, account_id: str) -> Any:
    """The live account a contact attaches to (locked as above); a merged-away id resolves to its survivor."""
    survivor_id = await _survivor_id(conn, account_id)
    await repo.share_lock_accounts(conn, [survivor_id])
    row = await repo.get_account(conn, survivor_id) if survivor_id else None
    if row is None or row.merged_into_id or not (row.in_pool or _visible(current_scope(), row)):
        raise missing_reference("account_id", "account", account_id)
    return row


async def _writable_contact(conn: AsyncConnection, contact_id: str, *, new_account_id: str = "") -> Any:
    """A visible contact of a live account, its account and any new one (`new_account_id`) locked as above,
    then the contact's own row (FOR UPDATE): read under that lock, it is the contact as it is before
    this write. The accounts first, as an account's delete, merge or transfer locks its account before
    the contacts it takes along, so the two never wait on each other in a cycle.

    A contact of a deleted account answers as deleted: its account took it along (one left live by an
    older release stays read-only)."""
    found = await repo.get_contact(conn, contact_id)
    if found is None or not _visible(current_scope(), found):
        raise NotFound("contact", contact_id)
    await _lock_for_contact_write(conn, found.account_id, new_account_id)
    row = await repo.get_contact(conn, contact_id, for_update=True)
    if row is None or not _visible(current_scope(), row) or await repo.get_account(conn, row.account_id) is None:
        raise NotFound("contact", contact_id)
    return row


async def create_contact(ctx: Context, values: dict[str, Any], *, idempotency_key: str) -> Any:
    principal = current_principal()
    now = ctx.clock()
    contact_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_contact", idempotency_key, contact_id, now)
        if earlier is not None:
            return _earlier_live(await repo.get_contact(tx.conn, earlier), NotFound("contact", earlier))
        values["tags"] = domain.normalise_tags(values.get("tags", []))
        _fail(domain.check_contact(values))
        account = await _account_for_contact(tx.conn, values["account_id"])
        custom = await _custom_values(tx.conn, "contact", values.get("custom") or {}, existing=None)
        if values.get("is_primary"):
            await _clear_primary(tx, account.id, now=now, principal=principal)
        row = {
            **{k: v for k, v in values.items() if k in repo.contacts.c and k != "custom"},
            **_contact_norms(values, ctx.default_country_code),
            "id": contact_id,
            "account_id": account.id,
            "name": values["name"].strip(),
            "custom": custom,
            "owner_id": domain.contact_owner(account_owner_id=account.owner_id, caller_id=principal.user_id),
            "team": account.team,
            "region": account.region,
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        await tx.conn.execute(insert(repo.contacts).values(**row))
        created = await repo.get_contact(tx.conn, contact_id)
        tx.publish(events_pb2.ContactCreated(contact=contact_to_proto(created), actor=actor(principal)), key=contact_id)
        return created


async def _lock_primary(conn: AsyncConnection, account_id: str) -> None:
    await lock_for_transaction(conn, f"primary-contact:{account_id}")


async def _has_primary(conn: AsyncConnection, account_id: str) -> bool:
    """Whether the account has a primary contact, read in turn with the writes making one
    (`_clear_primary`): the answer holds until this transaction ends."""
    await _lock_primary(conn, account_id)
    c = repo.contacts
    primary = exists().where(c.c.account_id == account_id, c.c.is_primary.is_(True), c.c.deleted_at.is_(None))
    return bool(await conn.scalar(select(primary)))


async def _clear_primary(
    tx: Transaction, account_id: str, *, now: datetime, principal: Principal, keep: str = ""
) -> None:
    """Demotes the account's primary contact, to a new version (published), for a new one; `keep`
    (the contact being made primary) is left to its own write. Writes making a primary of one
    account take turns here: each demotes what the one before it committed, so one primary remains."""
    c = repo.contacts
    await _lock_primary(tx.conn, account_id)
    await _change_contacts(
        tx,
        c.c.account_id == account_id,
        c.c.is_primary.is_(True),
        c.c.id != keep,
        values={"is_primary": False},
        now=now,
        principal=principal,
    )


async def get_contact(ctx: Context, contact_id: str) -> Any:
    async with ctx.uow.engine.connect() as conn:
        row = await repo.get_contact(conn, contact_id)
    if row is None or not _visible(current_scope(), row):
        raise NotFound("contact", contact_id)
    return row


async def update_contact(
    ctx: Context, contact_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[Any]:
    principal = current_principal()
    c = repo.contacts
    async with ctx.uow.begin() as tx:
        row = await _writable_contact(tx.conn, contact_id, new_account_id=str(values.get("account_id") or ""))
        _check_version("contact", row, expected_version)
        if "tags" in values:
            values["tags"] = domain.normalise_tags(values["tags"])
        _fail(domain.check_contact(values))
        changes = {k: v for k, v in values.items() if k != "custom"}
        if "custom" in values:
            changes["custom"] = await _custom_values(tx.conn, "contact", values["custom"], existing=row.custom)
        if "account_id" in values and values["account_id"] != row.account_id:
            account = await _account_for_contact(tx.conn, values["account_id"])
            # The contact follows its new account's owner, as a created or merged one does.
            owner = domain.contact_owner(account_owner_id=account.owner_id, caller_id=principal.user_id)
            changes.update(account_id=account.id, owner_id=owner, team=account.team, region=account.region)
            if row.is_primary and not values.get("is_primary"):
                # A primary contact moved stays primary only on an account without one, as in a merge.
                changes["is_primary"] = not await _has_primary(tx.conn, account.id)
        if values.get("is_primary"):
            account_id = changes.get("account_id", row.account_id)
            await _clear_primary(tx, account_id, now=ctx.clock(), principal=principal, keep=contact_id)
        changed = sorted(k for k, v in changes.items() if getattr(row, k) != v)
        if not changed:
            return Change(row, row)
        changes.update(_contact_norms(values, ctx.default_country_code))
        await tx.conn.execute(
            update(c).where(c.c.id == contact_id).values(**changes, updated_at=ctx.clock(), version=row.version + 1)
        )
        updated = await repo.get_contact(tx.conn, contact_id)
        tx.publish(
            events_pb2.ContactUpdated(
                contact=contact_to_proto(updated), changed_fields=changed, actor=actor(principal)
            ),
            key=contact_id,
        )
        return Change(updated, row)


async def delete_contact(ctx: Context, contact_id: str, *, expected_version: int) -> Any:
    """Soft-deletes the contact; returns it as it was (for the caller's audit trail)."""
    c = repo.contacts
    async with ctx.uow.begin() as tx:
        row = await _writable_contact(tx.conn, contact_id)
        _check_version("contact", row, expected_version)
        now = ctx.clock()
        await tx.conn.execute(update(c).where(c.c.id == contact_id).values(deleted_at=now, updated_at=now))
        tx.publish(
            events_pb2.ContactDeleted(
                contact_id=contact_id, account_id=row.account_id, actor=actor(current_principal())
            ),
            key=contact_id,
        )
        return row


async def list_contacts(
    ctx: Context,
    f: ContactFilter,
    custom_pairs: list[tuple[str, str]],
    page: Page,
    *,
    account_scope: RecordScope | None = None,
) -> tuple[list[Any], str]:
    """Contacts matching `f` in the call's scope. With `account_scope`, the caller's scope for
    accounts, the list is the contacts of the account `f.account_id` names, which must be one they
    may read (NOT_FOUND otherwise, as the account's timeline answers); None: `account_id` is a filter
    like the others."""
    async with ctx.uow.engine.connect() as conn:
        if account_scope is not None:
            await _readable_account(conn, f.account_id, scope=account_scope)
        f.custom = await custom_filters(conn, "contact", custom_pairs)
        return await repo.list_contacts(conn, f, current_scope(), page)


async def find_contacts(ctx: Context, *, email: str, phone: str, limit: int) -> list[Any]:
    if not email and not phone:
        _fail([FieldError("email", "email or phone is required")])
    try:
        email_norm = normalise_email(email) if email else ""
    except ValueError:
        raise ValidationFailed([FieldError("email", "must be an email address")]) from None
    try:
        phone_norm = normalise_phone(phone, ctx.default_country_code) if phone else ""
    except ValueError:
        raise ValidationFailed([FieldError("phone", "must be a phone number")]) from None
    async with ctx.uow.engine.connect() as conn:
        return await repo.find_contacts(
            conn, email=email_norm, phone=phone_norm, scope=current_scope(), limit=min(max(limit, 1), 100)
        )


# --- activities ----------------------------------------------------------------------------------------


async def log_activity(
    ctx: Context,
    *,
    account_id: str,
    contact_id: str,
    kind: str,
    subject: str,
    notes: str,
    occurred_at: datetime | None,
    idempotency_key: str,
    outcome: str = "",
    next_follow_up_at: datetime | None = None,
) -> Any:
    """An activity of the caller on an account. The call's record scope is the caller's scope for
    reading accounts (the gateway's to send): the account must be readable in it, while the activity
    is always the caller's own, whatever their activities scope (a service agent's is `own`). A
    `next_follow_up_at` plans the caller's follow-up task on the account then."""
    principal = current_principal()
    act = repo.activities
    now = ctx.clock()
    when = occurred_at or now
    _fail(domain.check_activity({"kind": kind, "occurred_at": when, "next_follow_up_at": next_follow_up_at}, now=now))
    activity_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "log_activity", idempotency_key, activity_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(tx.conn, act, earlier, gone=NotFound("activity", earlier))
        await _live_account(tx.conn, account_id, for_update=True)
        if contact_id:
            await _referenced_contact(tx.conn, contact_id, account_id=account_id)
        await tx.conn.execute(
            insert(act).values(
                id=activity_id,
                account_id=account_id,
                contact_id=contact_id,
                kind=kind,
                subject=subject,
                notes=notes,
                actor_id=principal.user_id,
                occurred_at=when,
                created_at=now,
                version=1,
                outcome=outcome.strip(),
                next_follow_up_at=next_follow_up_at,
            )
        )
        await repo.touch_account(tx.conn, account_id, when)
        row = (await tx.conn.execute(select(act).where(act.c.id == activity_id))).one()
        tx.publish(events_pb2.ActivityLogged(activity=activity_to_proto(row), actor=actor(principal)), key=account_id)
        if next_follow_up_at is not None:
            await _plan_follow_up(tx, row, principal, now)
        return row


async def _plan_follow_up(tx: Transaction, activity: Any, principal: Principal, now: datetime) -> None:
    """The follow-up task an activity plans: the activity's author's, on its account and contact,
    due at its `next_follow_up_at`."""
    await _insert_task(
        tx,
        {
            "account_id": activity.account_id,
            "contact_id": activity.contact_id,
            "title": f"Follow up: {activity.subject or activity.kind}",
            "due_at": activity.next_follow_up_at,
            "owner_id": activity.actor_id,
            "source": "follow_up",
            "activity_id": activity.id,
        },
        principal,
        now,
    )


async def _follow_up_moves(
    tx: Transaction, activity: Any, follow_up_at: datetime | None, principal: Principal, now: datetime
) -> None:
    """The activity's follow-up task once its `next_follow_up_at` is `follow_up_at` (None: cleared,
    or the activity deleted): moved there, planned, or cancelled."""
    t = repo.tasks
    of_activity = (t.c.activity_id == activity.id, t.c.status == "open")
    has_open = await tx.conn.scalar(select(t.c.id).where(*of_activity).limit(1)) is not None
    match follow_up_change(follow_up_at, has_open):
        case "move":
            await _change_tasks(tx, *of_activity, values={"due_at": follow_up_at}, now=now, principal=principal)
        case "create":
            await _plan_follow_up(tx, activity, principal, now)
        case "cancel":
            await _change_tasks(tx, *of_activity, values=CANCELLED, now=now, principal=principal)


async def _writable_activity(
    conn: AsyncConnection, account_id: str, activity_id: str, *, account_scope: RecordScope
) -> Any:
    """An activity logged on `account_id` that the caller may change, its account locked (as
    LogActivity locks it), else NotFound. The account must be readable in the caller's scope for
    accounts, as LogActivity checks it; the activity in the call's scope, their scope for activities."""
    account = await _live_account(conn, account_id, for_update=True, scope=account_scope)
    act = repo.activities
    row = (await conn.execute(select(act).where(act.c.id == activity_id, act.c.account_id == account_id))).first()
    if row is None or not may_change_activity(
        current_scope(), actor_id=row.actor_id, team=account.team, region=account.region
    ):
        raise NotFound("activity", activity_id)
    return row


async def update_activity(
    ctx: Context,
    account_id: str,
    activity_id: str,
    values: dict[str, Any],
    *,
    expected_version: int,
    account_scope: RecordScope,
) -> tuple[Any, Any]:
    """Corrects what happened (`values` of ACTIVITY_FIELDS): the activity as it was and as it is now.
    A later `occurred_at` advances the account's `last_activity_at`; an earlier one leaves it, as
    the account may have been touched since by other activities or by its deals."""
    principal = current_principal()
    act = repo.activities
    now = ctx.clock()
    if "outcome" in values:
        values = {**values, "outcome": values["outcome"].strip()}
    async with ctx.uow.begin() as tx:
        row = await _writable_activity(tx.conn, account_id, activity_id, account_scope=account_scope)
        _check_version("activity", row, expected_version)
        # Checked as the activity will be: a follow-up after what happened, whichever of them changes.
        times = {name: values.get(name, getattr(row, name)) for name in ("occurred_at", "next_follow_up_at")}
        _fail(domain.check_activity({**values, **times}, now=now))
        changed = sorted(name for name, value in values.items() if getattr(row, name) != value)
        if not changed:
            return row, row
        await tx.conn.execute(update(act).where(act.c.id == activity_id).values(**values, version=row.version + 1))
        if "occurred_at" in changed:
            await repo.touch_account(tx.conn, account_id, values["occurred_at"])
        updated = (await tx.conn.execute(select(act).where(act.c.id == activity_id))).one()
        if "next_follow_up_at" in changed:
            await _follow_up_moves(tx, updated, updated.next_follow_up_at, principal, now)
        tx.publish(
            events_pb2.ActivityUpdated(
                activity=activity_to_proto(updated), changed_fields=changed, actor=actor(principal)
            ),
            key=account_id,
        )
        return row, updated


async def delete_activity(
    ctx: Context, account_id: str, activity_id: str, *, expected_version: int, account_scope: RecordScope
) -> Any:
    """Deletes an activity logged by mistake and returns it as it was. The account's
    `last_activity_at` stays: it records every touch, including other services' (a deal's work)."""
    act = repo.activities
    async with ctx.uow.begin() as tx:
        row = await _writable_activity(tx.conn, account_id, activity_id, account_scope=account_scope)
        _check_version("activity", row, expected_version)
        await tx.conn.execute(delete(act).where(act.c.id == activity_id))
        if row.next_follow_up_at is not None:  # the follow-up it planned goes with it
            await _follow_up_moves(tx, row, None, current_principal(), ctx.clock())
        tx.publish(
            events_pb2.ActivityDeleted(
                activity_id=activity_id, account_id=account_id, actor=actor(current_principal())
            ),
            key=account_id,
        )
        return row


async def list_activities(
    ctx: Context, *, account_id: str, contact_id: str, page: Page, account_scope: RecordScope | None = None
) -> tuple[list[Any], str]:
    """The account's timeline, of an account the caller may read in `account_scope`, their scope for
    accounts (NOT_FOUND otherwise: a timeline tells that its account exists; None: not checked).
    The activities scope applies to the entries: on an account outside it, an `own` scope still
    lists the caller's own entries (e.g. a service agent's visits); other scopes none."""
    act = repo.activities
    scope = current_scope()
    async with ctx.uow.engine.connect() as conn:
        if not account_id and contact_id:
            contact = await repo.get_contact(conn, contact_id)
            if contact is None or not _visible(scope, contact):
                raise NotFound("contact", contact_id)
            account_id = contact.account_id
        if not account_id:
            raise ValidationFailed([FieldError("account_id", "is required")])
        row = await repo.get_account(conn, account_id)
        if row is None or (account_scope is not None and not (row.in_pool or _visible(account_scope, row))):
            raise NotFound("account", account_id)
        query = select(act).where(act.c.account_id == account_id)
        if not (row.in_pool or _visible(scope, row)):
            if scope.kind != ScopeKind.OWN:
                return [], ""
            query = query.where(act.c.actor_id == scope.owner_id)
        if contact_id:
            query = query.where(act.c.contact_id == contact_id)
        rows = list(await conn.execute(repo.apply_page(query, act, page)))
        return repo.page_result(rows, page)


async def _referenced_contact(conn: AsyncConnection, contact_id: str, *, account_id: str) -> None:
    """Checks a contact a request's body names (`contact_id`): live and in the caller's scope (else
    it answers as missing), and on `account_id` when the record it goes on has an account."""
    contact = await repo.get_contact(conn, contact_id)
    # A contact left live on a deleted account by an older release is gone with it.
    if (
        contact is None
        or not _visible(current_scope(), contact)
        or await repo.get_account(conn, contact.account_id) is None
    ):
        raise missing_reference("contact_id", "contact", contact_id)
    if account_id and contact.account_id != account_id:
        raise ValidationFailed([FieldError("contact_id", f"contact {contact_id} is not on account {account_id}")])


# --- tasks ------------------------------------------------------------------------------------------------


async def create_task(ctx: Context, values: dict[str, Any], *, idempotency_key: str) -> Any:
    principal = current_principal()
    t = repo.tasks
    _fail([] if str(values.get("title", "")).strip() else [FieldError("title", "is required")])
    now = ctx.clock()
    task_id = new_id()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_task", idempotency_key, task_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(tx.conn, t, earlier, gone=NotFound("task", earlier))
        if values.get("contact_id"):
            await _referenced_contact(tx.conn, values["contact_id"], account_id=values.get("account_id", ""))
        return await _insert_task(tx, {**values, "id": task_id}, principal, now)


async def _insert_task(tx: Transaction, values: Mapping[str, Any], principal: Principal, now: datetime) -> Any:
    """An open task (made by a person, or planned by an activity), in its account's team and region
    (the caller's without one), published as task.created."""
    t = repo.tasks
    task_id = values.get("id") or new_id()
    team, region = principal.team, principal.region
    account_id = values.get("account_id", "")
    if account_id:
        account = await _task_account(tx.conn, account_id)
        team, region = account.team or team, account.region
    await tx.conn.execute(
        insert(t).values(
            id=task_id,
            account_id=account_id,
            contact_id=values.get("contact_id", ""),
            title=values["title"].strip(),
            notes=values.get("notes", ""),
            due_at=values.get("due_at"),
            status="open",
            owner_id=values.get("owner_id") or principal.user_id,
            team=team,
            region=region,
            source=values.get("source", "manual"),
            activity_id=values.get("activity_id", ""),
            created_at=now,
            updated_at=now,
            version=1,
        )
    )
    row = (await tx.conn.execute(select(t).where(t.c.id == task_id))).one()
    tx.publish(events_pb2.TaskCreated(task=task_to_proto(row), actor=actor(principal)), key=task_id)
    return row


async def _task_account(conn: AsyncConnection, account_id: str) -> Any:
    """The live account a task names, share-locked until the write commits: a merge or delete of
    it, which moves or cancels its open tasks, waits for the write (or goes first, and the write
    then finds it merged or gone), so no open task lands on an account that is no more."""
    await repo.share_lock_accounts(conn, [account_id])
    return await _live_account(conn, account_id, field="account_id")


async def _visible_task(conn: AsyncConnection, task_id: str) -> Any:
    """The task, locked for the write that reads it (so its `expected_version` holds), if in scope."""
    t = repo.tasks
    row = (await conn.execute(select(t).where(t.c.id == task_id).with_for_update())).first()
    if row is None or not _visible(current_scope(), row):
        raise NotFound("task", task_id)
    return row


async def update_task(ctx: Context, task_id: str, values: dict[str, Any], *, expected_version: int) -> Change[Any]:
    """The task changed, and as it was (read under its lock), for the caller's audit trail."""
    t = repo.tasks
    # A task always has a title and an owner (an unowned one is on nobody's list).
    blank = [
        FieldError(name, "is required")
        for name in ("title", "owner_id")
        if name in values and not str(values[name] or "").strip()
    ]
    if blank:
        _fail(blank)
    async with ctx.uow.begin() as tx:
        row = await _visible_task(tx.conn, task_id)
        _check_version("task", row, expected_version)
        # Only a new account or contact is checked, as an account's parent is: saving the task as it
        # was read keeps one that left the caller's scope since.
        account_id = values.get("account_id", row.account_id)
        if account_id and account_id != row.account_id:
            account = await _task_account(tx.conn, account_id)
            # It is now read in its new account's territory, as a task created there is.
            values = {**values, "team": account.team or row.team, "region": account.region}
        contact_id = values.get("contact_id", row.contact_id)
        if values.get("contact_id") and values["contact_id"] != row.contact_id:
            await _referenced_contact(tx.conn, values["contact_id"], account_id=account_id)
        elif contact_id and account_id and account_id != row.account_id:
            # The task keeps its contact: it must be one of the new account's.
            contact = await repo.get_contact(tx.conn, contact_id)
            if contact is not None and contact.account_id != account_id:
                message = f"the task's contact {contact_id} is not on account {account_id}: change or clear contact_id"
                _fail([FieldError("account_id", message)])
        await tx.conn.execute(
            update(t).where(t.c.id == task_id).values(**values, updated_at=ctx.clock(), version=row.version + 1)
        )
        updated = (await tx.conn.execute(select(t).where(t.c.id == task_id))).one()
        changed = sorted(name for name, value in values.items() if getattr(row, name) != value)
        if changed:
            tx.publish(
                events_pb2.TaskUpdated(
                    task=task_to_proto(updated), changed_fields=changed, actor=actor(current_principal())
                ),
                key=task_id,
            )
        return Change(updated, row)


async def complete_task(ctx: Context, task_id: str, *, expected_version: int) -> Change[Any]:
    t = repo.tasks
    async with ctx.uow.begin() as tx:
        row = await _visible_task(tx.conn, task_id)
        _check_version("task", row, expected_version)
        if row.status != "open":
            raise Conflict(f"task {task_id} is {row.status}", reason="TASK_NOT_OPEN")
        now = ctx.clock()
        await tx.conn.execute(
            update(t)
            .where(t.c.id == task_id)
            .values(status="done", completed_at=now, updated_at=now, version=row.version + 1)
        )
        done = (await tx.conn.execute(select(t).where(t.c.id == task_id))).one()
        tx.publish(events_pb2.TaskCompleted(task=task_to_proto(done), actor=actor(current_principal())), key=task_id)
        return Change(done, row)


async def list_tasks(
    ctx: Context, *, due: str, account_id: str, owner_id: str, statuses: list[str], page: Page
) -> tuple[list[Any], str]:
    t = repo.tasks
    errors = [FieldError("status", f"unknown status {s}") for s in statuses if s not in domain.TASK_STATUSES]
    if due and due not in DUE_FILTERS:
        errors.append(FieldError("due", f"must be one of {', '.join(DUE_FILTERS)}"))
    if page.sort_field == "due_at" and not due:
        errors.append(FieldError("sort", "due_at sorting needs a due filter"))
    _fail(errors)
    query = select(t).where(scope_clause(t, current_scope()))
    if due:
        before = due_before(due, ctx.clock())
        query = query.where(t.c.status == "open", t.c.due_at.is_not(None), t.c.due_at < before)
    if statuses:
        query = query.where(t.c.status.in_(statuses))
    if account_id:
        query = query.where(t.c.account_id == account_id)
    if owner_id:
        query = query.where(t.c.owner_id == owner_id)
    async with ctx.uow.engine.connect() as conn:
        rows = list(await conn.execute(repo.apply_page(query, t, page)))
    return repo.page_result(rows, page)


# --- reminder rules ------------------------------------------------------------------------------------------


async def create_reminder_rule(
    ctx: Context,
    *,
    name: str,
    tiers: list[str],
    inactive_days: int,
    task_title: str,
    due_in_hours: int,
    enabled: bool,
    idempotency_key: str,
) -> Any:
    _fail(domain.check_reminder_rule(name=name, tiers=tiers, inactive_days=inactive_days, due_in_hours=due_in_hours))
    principal = current_principal()
    r = repo.reminder_rules
    rule_id = new_id()
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_reminder_rule", idempotency_key, rule_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(tx.conn, r, earlier, gone=NotFound("reminder rule", earlier))
        title = task_title.strip() or f"{name.strip()}: follow up"
        await tx.conn.execute(
            insert(r).values(
                id=rule_id,
                name=name.strip(),
                tiers=tiers,
                inactive_days=inactive_days,
                task_title=title,
                due_in_hours=due_in_hours,
                enabled=enabled,
                created_by=principal.user_id,
                created_at=now,
            )
        )
        return (await tx.conn.execute(select(r).where(r.c.id == rule_id))).one()


async def list_reminder_rules(ctx: Context, page: Page) -> tuple[list[Any], str]:
    r = repo.reminder_rules
    async with ctx.uow.engine.connect() as conn:
        rows = list(await conn.execute(repo.apply_page(select(r), r, page)))
    return repo.page_result(rows, page)


async def delete_reminder_rule(ctx: Context, rule_id: str) -> None:
    async with ctx.uow.begin() as tx:
        result = await tx.conn.execute(delete(repo.reminder_rules).where(repo.reminder_rules.c.id == rule_id))
        if result.rowcount == 0:
            raise NotFound("reminder rule", rule_id)


# --- segments --------------------------------------------------------------------------------------------------


async def _visible_segment(conn: AsyncConnection, segment_id: str, *, for_update: bool = False) -> Any:
    s = repo.segments
    principal = current_principal()
    query = select(s).where(s.c.id == segment_id)
    if for_update and repo.is_pg(conn):
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or not (
        row.owner_id == principal.user_id or (row.visibility == "team" and row.team and row.team == principal.team)
    ):
        raise NotFound("segment", segment_id)
    return row


async def create_segment(
    ctx: Context, *, name: str, visibility: str, filters: dict[str, str], tags: list[str], idempotency_key: str
) -> Any:
    principal = current_principal()
    visibility = visibility or "user"
    errors = [] if name.strip() else [FieldError("name", "is required")]
    if visibility not in domain.SEGMENT_VISIBILITIES:
        errors.append(FieldError("visibility", "must be user or team"))
    if visibility == "team" and not principal.team:
        errors.append(FieldError("visibility", "a team segment needs a caller with a team"))
    _fail(errors)
    s = repo.segments
    segment_id = new_id()
    now = ctx.clock()
    async with ctx.uow.begin() as tx:
        earlier = await _idempotency_keys.claim(tx.conn, "create_segment", idempotency_key, segment_id, now)
        if earlier is not None:
            return await idempotency.earlier_record(tx.conn, s, earlier, gone=NotFound("segment", earlier))
        # Validate the filter now, so a saved segment always runs.
        await filter_from_pairs(tx.conn, [*filters.items(), *(("tag", t) for t in tags)], field_prefix="filters")
        await tx.conn.execute(
            insert(s).values(
                id=segment_id,
                name=name.strip(),
                visibility=visibility,
                owner_id=principal.user_id,
                team=principal.team,
                filters=filters,
                tags=domain.normalise_tags(tags),
                created_at=now,
            )
        )
        return (await tx.conn.execute(select(s).where(s.c.id == segment_id))).one()


async def get_segment(ctx: Context, segment_id: str) -> Any:
    async with ctx.uow.engine.connect() as conn:
        return await _visible_segment(conn, segment_id)


async def list_segments(ctx: Context, page: Page) -> tuple[list[Any], str]:
    s = repo.segments
    principal = current_principal()
    visible = s.c.owner_id == principal.user_id
    if principal.team:
        visible = or_(visible, and_(s.c.visibility == "team", s.c.team == principal.team))
    async with ctx.uow.engine.connect() as conn:
        rows = list(await conn.execute(repo.apply_page(select(s).where(visible), s, page)))
    return repo.page_result(rows, page)


async def update_segment(
    ctx: Context, segment_id: str, values: dict[str, Any], *, expected_version: int
) -> Change[Any]:
    """Writes `values` (of SEGMENT_FIELDS) on one of the caller's own segments: a teammate who sees a
    team segment may use it but not change it (404, as on delete)."""
    principal = current_principal()
    values = dict(values)
    errors = []
    if "name" in values:
        values["name"] = str(values["name"]).strip()
        if not values["name"]:
            errors.append(FieldError("name", "is required"))
    if "visibility" in values:
        if values["visibility"] not in domain.SEGMENT_VISIBILITIES:
            errors.append(FieldError("visibility", "must be user or team"))
        elif values["visibility"] == "team" and not principal.team:
            errors.append(FieldError("visibility", "a team segment needs a caller with a team"))
    if "tags" in values:
        values["tags"] = domain.normalise_tags(values["tags"])
    _fail(errors)
    s = repo.segments
    async with ctx.uow.begin() as tx:
        row = await _visible_segment(tx.conn, segment_id, for_update=True)
        if row.owner_id != principal.user_id:
            raise NotFound("segment", segment_id)
        _check_version("segment", row, expected_version)
        # The filter as it will be saved is validated, so a saved segment always runs.
        filters = values.get("filters", dict(row.filters))
        tags = values.get("tags", list(row.tags))
        await filter_from_pairs(tx.conn, [*filters.items(), *(("tag", t) for t in tags)], field_prefix="filters")
        # A segment made a team one is shared with the owner's team of now (one saved by a caller
        # without a team, or before they changed teams, would otherwise reach no one or the old team).
        team = {"team": principal.team} if values.get("visibility") == "team" else {}
        await tx.conn.execute(update(s).where(s.c.id == segment_id).values(**values, **team, version=row.version + 1))
        return Change((await tx.conn.execute(select(s).where(s.c.id == segment_id))).one(), row)


async def delete_segment(ctx: Context, segment_id: str, *, expected_version: int = 0) -> Any:
    """Deletes the caller's own segment; returns it as it was (for the caller's audit trail)."""
    async with ctx.uow.begin() as tx:
        row = await _visible_segment(tx.conn, segment_id, for_update=True)
        if row.owner_id != current_principal().user_id:
            raise NotFound("segment", segment_id)
        _check_version("segment", row, expected_version)
        await tx.conn.execute(delete(repo.segments).where(repo.segments.c.id == segment_id))
        return row


# --- timers (run by jobs.py; safe with several replicas) ------------------------------------------------------------


def _anchor(row: Any) -> datetime:
    return domain.inactivity_anchor(
        last_activity_at=as_utc(row.last_activity_at) if row.last_activity_at else None,
        claimed_at=as_utc(row.claimed_at) if row.claimed_at else None,
        created_at=as_utc(row.created_at),
    )


def _quiet_since(cutoff: datetime) -> Any:
    """Inactivity anchor (latest of activity, claim, creation) is before the cutoff."""
    a = repo.accounts
    return and_(
        a.c.created_at < cutoff,
        or_(a.c.last_activity_at.is_(None), a.c.last_activity_at < cutoff),
        or_(a.c.claimed_at.is_(None), a.c.claimed_at < cutoff),
    )


async def return_inactive_accounts(ctx: Context, *, batch_size: int) -> int:
    """Owned accounts quiet past their tier's limit go back to the pool. Rows are claimed with
    FOR UPDATE SKIP LOCKED in the transaction that changes them, so replicas never collide."""
    a = repo.accounts
    now = ctx.clock()
    returned = 0
    for tier, cutoff in domain.return_cutoffs(ctx.policy, now).items():
        tiers = [tier, ""] if tier == "C" else [tier]  # an account without a tier counts as C
        async with ctx.uow.begin() as tx:
            query = (
                select(a)
                .where(
                    a.c.in_pool.is_(False),
                    a.c.owner_id != "",
                    a.c.merged_into_id == "",
                    a.c.deleted_at.is_(None),
                    a.c.tier.in_(tiers),
                    _quiet_since(cutoff),
                )
                .order_by(a.c.id)
                .limit(batch_size)
            )
            if repo.is_pg(tx.conn):
                query = query.with_for_update(skip_locked=True)
            for row in await tx.conn.execute(query):
                # The query narrows the candidates; the domain rule decides.
                if not domain.due_for_return(
                    ctx.policy, tier=row.tier, in_pool=row.in_pool, anchor=_anchor(row), now=now
                ):
                    continue
                await _release(tx, row, now=now, reason="inactivity", principal=current_principal())
                returned += 1
    return returned


async def raise_reminders(ctx: Context, *, batch_size: int) -> int:
    """Reminder rules create one open task per quiet account (never a second while one is open)."""
    a, t = repo.accounts, repo.tasks
    now = ctx.clock()
    created = 0
    async with ctx.uow.engine.connect() as conn:
        rules = list(await conn.execute(select(repo.reminder_rules).where(repo.reminder_rules.c.enabled.is_(True))))
    for rule in rules:
        async with ctx.uow.begin() as tx:
            open_task = exists().where(t.c.reminder_rule_id == rule.id, t.c.account_id == a.c.id, t.c.status == "open")
            query = select(a).where(
                a.c.in_pool.is_(False),
                a.c.owner_id != "",
                a.c.merged_into_id == "",
                a.c.deleted_at.is_(None),
                _quiet_since(now - timedelta(days=rule.inactive_days)),
                ~open_task,
            )
            if rule.tiers:
                query = query.where(a.c.tier.in_(rule.tiers))
            query = query.order_by(a.c.id).limit(batch_size)
            if repo.is_pg(tx.conn):
                query = query.with_for_update(of=a, skip_locked=True)
            reminder = domain.Reminder(tiers=tuple(rule.tiers), inactive_days=rule.inactive_days)
            for account in await tx.conn.execute(query):
                if not domain.reminder_fires(
                    reminder, tier=account.tier, in_pool=account.in_pool, anchor=_anchor(account), now=now
                ):
                    continue
                task_id = new_id()
                await tx.conn.execute(
                    insert(t).values(
                        id=task_id,
                        account_id=account.id,
                        contact_id="",
                        title=rule.task_title,
                        notes=f"{account.name}: no activity for {rule.inactive_days} days",
                        status="open",
                        due_at=now + timedelta(hours=rule.due_in_hours),
                        owner_id=account.owner_id,
                        team=account.team,
                        region=account.region,
                        source="reminder_rule",
                        reminder_rule_id=rule.id,
                        created_at=now,
                        updated_at=now,
                        version=1,
                    )
                )
                row = (await tx.conn.execute(select(t).where(t.c.id == task_id))).one()
                tx.publish(
                    events_pb2.TaskCreated(task=task_to_proto(row), actor=actor(current_principal())), key=task_id
                )
                created += 1
    return created
