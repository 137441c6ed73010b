"""The audit trail: rows in the append-only `audit_events` table, each written in the same
transaction as its `crm.audit.v1.AuditRecorded` outbox row (nothing lost while Kafka is down).

Every request writes audit rows, so concurrent writes are grouped: one transaction (one commit, one
wake-up of the outbox relay) for all the entries that arrived while the previous one was written."""

import asyncio
import contextvars
import json
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, overload

from crm.audit.v1 import events_pb2
from crm_platform.audit import audit_recorded, changed_fields
from crm_platform.consumer import ReceivedEvent
from crm_platform.db import DriverStatement, insert_from_json, insert_ignore, json_rows, single_statements
from crm_platform.errors import ValidationFailed
from crm_platform.ids import new_id
from crm_platform.outbox import PendingEvent, Transaction, insert_outbox_json, outbox_rows
from crm_platform.pagination import (
    NOT_ISSUED,
    bind_cursor,
    decode_cursor,
    encode_cursor,
    list_fingerprint,
    unbind_cursor,
)
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind
from crm_platform.timeutil import as_utc, from_timestamp, isoformat, utcnow
from google.protobuf import json_format
from sqlalchemy import ColumnElement, Select, and_, false, insert, select, true
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.security.masking import mask_value
from gateway.security.policy import ResourceSpec
from gateway.security.problems import SecurityProblem
from gateway.security.store import audit_events, outbox

log = logging.getLogger(__name__)

AUDIT_SOURCE = "crm-gateway"


@dataclass(slots=True)
class AuditEntry:
    actor: Principal
    action: str
    resource: str
    record_id: str = ""
    outcome: str = "allowed"
    reason: str = ""
    fields: Sequence[str] = ()
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    request_id: str = ""
    method: str = ""
    path: str = ""
    status_code: int = 0
    client_address: str = ""
    id: str = field(default_factory=new_id)
    occurred_at: datetime = field(default_factory=utcnow)


def _jsonable(value: Any) -> Any:
    """Plain JSON (Decimals and datetimes as strings), as stored and as put in the event's Struct."""
    return json.loads(json.dumps(value, default=str))


@overload
def mask_pii(
    values: Mapping[str, Any], spec: ResourceSpec | None, custom_pii: Collection[str] | None = None
) -> dict[str, Any]: ...
@overload
def mask_pii(values: None, spec: ResourceSpec | None, custom_pii: Collection[str] | None = None) -> None: ...
def mask_pii(
    values: Mapping[str, Any] | None, spec: ResourceSpec | None, custom_pii: Collection[str] | None = None
) -> dict[str, Any] | None:
    """Masks fields flagged `pii`, and the `custom` values of the keys in `custom_pii` (the custom
    fields defined as pii; None when they are unknown: then every custom value), for the audit trail."""
    if values is None:
        return None
    result: dict[str, Any] = {}
    for key, value in values.items():
        field_spec = spec.fields.get(key) if spec is not None else None
        if field_spec is not None and field_spec.pii:
            result[key] = mask_value(value, field_spec.type)
        elif key == "custom" and isinstance(value, Mapping):
            result[key] = {
                name: mask_value(item, "text") if custom_pii is None or name in custom_pii else item
                for name, item in value.items()
            }
        else:
            result[key] = value
    return result


def diff_for_audit(
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    spec: ResourceSpec | None,
    *,
    custom_pii: Collection[str] | None,
) -> tuple[list[str], dict[str, Any] | None, dict[str, Any] | None]:
    """Only the changed fields, before and after, with PII masked (`custom_pii` as for `mask_pii`)."""
    fields = changed_fields(before, after)
    old = {key: (before or {}).get(key) for key in fields} if before is not None else None
    new = {key: (after or {}).get(key) for key in fields} if after is not None else None
    return fields, mask_pii(old, spec, custom_pii), mask_pii(new, spec, custom_pii)


def _plain(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return _jsonable(dict(values)) if values is not None else None


def _event(entry: AuditEntry, before: dict[str, Any] | None, after: dict[str, Any] | None) -> events_pb2.AuditRecorded:
    """The entry's event; `before` and `after` are its values as plain JSON (`_plain`)."""
    return audit_recorded(
        id=entry.id,
        occurred_at=entry.occurred_at,
        actor=entry.actor,
        action=entry.action,
        resource=entry.resource,
        record_id=entry.record_id,
        outcome=entry.outcome,
        reason=entry.reason,
        fields=entry.fields,
        before=before,
        after=after,
        request_id=entry.request_id,
        method=entry.method,
        path=entry.path,
        status_code=entry.status_code,
        client_address=entry.client_address,
    )


def row_of_event(event: events_pb2.AuditRecorded) -> dict[str, Any]:
    """The `audit_events` row of a record another process audited (`crm_platform.audit`)."""
    entry = AuditEntry(
        actor=Principal.from_proto(event.actor),
        action=event.action,
        resource=event.resource,
        record_id=event.record_id[:_RECORD_ID_LENGTH],
        outcome=event.outcome,
        reason=event.reason,
        fields=list(event.fields),
        request_id=event.request_id,
        method=event.method,
        path=event.path,
        status_code=event.status_code,
        client_address=event.client_address,
        id=event.id,
        occurred_at=from_timestamp(event.occurred_at) or utcnow(),
    )
    before = json_format.MessageToDict(event.before) if event.HasField("before") else None
    after = json_format.MessageToDict(event.after) if event.HasField("after") else None
    return _row(entry, before, after)


_RECORD_ID_LENGTH = 200  # audit_events.record_id, and the outbox key of its event


def _row(entry: AuditEntry, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """The entry's `audit_events` row; `before` and `after` as for `_event`."""
    return {
        "id": entry.id,
        "occurred_at": entry.occurred_at,
        "actor_id": entry.actor.user_id,
        "actor_kind": entry.actor.kind,
        "actor_roles": list(entry.actor.roles),
        "actor_team": entry.actor.team,
        "actor_region": entry.actor.region,
        "action": entry.action,
        "resource": entry.resource,
        "record_id": entry.record_id,
        "outcome": entry.outcome,
        "reason": entry.reason,
        "fields": list(entry.fields),
        "before": before,
        "after": after,
        "request_id": entry.request_id,
        "method": entry.method,
        "path": entry.path,
        "status_code": entry.status_code,
        "client_address": entry.client_address,
    }


@dataclass(frozen=True, slots=True)
class AuditQuery:
    actor_id: str | None = None
    resource: str | None = None
    record_id: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    # From the previous page (newest first): an opaque cursor naming its last event (`_after_id`).
    cursor: str | None = None
    # The caller's record scope, applied to the actor (`_actor_in_scope`).
    scope: RecordScope = ALL_RECORDS


@dataclass(slots=True)
class _Pending:
    """One `record` call waiting for its rows to be committed."""

    rows: list[dict[str, Any]]
    events: list[dict[str, Any]]
    done: asyncio.Future[None]


class AuditLog:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._listeners: list[Callable[[], None]] = []
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Called after every commit (the in-process outbox relay wakes up at once)."""
        self._listeners.append(listener)

    async def record(self, entries: Sequence[AuditEntry]) -> None:
        """Appends the entries and their events; they are committed when this returns, and an error
        writing them is raised here. Calls made while a write is in flight are written together in
        the next transaction (group commit); with none in flight the write starts at once."""
        if not entries:
            return
        # Rows and events are built here, in the caller's context: the events carry its trace, and
        # an entry that cannot be converted fails only its own caller.
        rows: list[dict[str, Any]] = []
        events: list[PendingEvent] = []
        for entry in entries:
            if len(entry.record_id) > _RECORD_ID_LENGTH:
                # No record has such an id (a refused request's path named it): its start is kept.
                entry = replace(entry, record_id=entry.record_id[:_RECORD_ID_LENGTH])
            before, after = _plain(entry.before), _plain(entry.after)
            rows.append(_row(entry, before, after))
            key = entry.record_id or entry.actor.user_id or entry.id
            events.append(PendingEvent(message=_event(entry, before, after), key=key, subject=key))
        pending = _Pending(
            rows=rows,
            events=outbox_rows(events, source=AUDIT_SOURCE, now=utcnow()),
            done=asyncio.get_running_loop().create_future(),
        )
        self._queue.append(pending)
        if self._writer is None:
            # In a context of its own: the writer serves every request, not the one that started it.
            self._writer = asyncio.create_task(
                self._write_queued(), name="gateway-audit-writer", context=contextvars.Context()
            )
        await pending.done

    @staticmethod
    async def store_recorded(tx: Transaction, event: ReceivedEvent[events_pb2.AuditRecorded]) -> None:
        """Stores a record another process published on `crm.audit.v1` (a service auditing a write
        that reached it without a request), in the consumer's transaction with its inbox row. It is
        on the topic already: no event is published again. A record read again after the inbox
        forgot it (offsets reset further back) is kept once, by its id."""
        await insert_ignore(tx.conn, audit_events, row_of_event(event.message), keys=["id"])

    async def close(self) -> None:
        """Waits for the write in flight, if any (before the engine is disposed)."""
        if self._writer is not None:
            await asyncio.wait([self._writer])

    async def _write_queued(self) -> None:
        """The one writer: writes everything queued in one transaction, until the queue is empty."""
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._write(batch)
                except Exception as error:  # noqa: BLE001 - raised to the callers of the batch
                    if len(batch) == 1:
                        _settle(batch[0], error)
                    else:
                        await self._write_one_by_one(batch, error)
                else:
                    for pending in batch:
                        _settle(pending, None)
        finally:
            self._writer = None
            # Cancelled (the loop is closing): no caller may wait forever. A no-op for those settled.
            for pending in [*batch, *self._queue]:
                pending.done.cancel()
            self._queue = []

    async def _write_one_by_one(self, batch: list[_Pending], error: Exception) -> None:
        """After a failed group, each caller's entries alone: an entry the database refuses (an id
        longer than its column) then fails only its own request, while an outage fails them all."""
        log.warning("audit group of %d writes failed (%s); writing them one by one", len(batch), error)
        for pending in batch:
            try:
                await self._write([pending])
            except Exception as own_error:  # noqa: BLE001 - raised to that caller
                _settle(pending, own_error)
            else:
                _settle(pending, None)

    async def _write(self, batch: list[_Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        events = [event for pending in batch for event in pending.events]
        if self.engine.dialect.name == "postgresql":
            # One statement, atomic by itself: no BEGIN and COMMIT round trips.
            async with single_statements(self.engine).connect() as conn:
                await _ENTRIES_AND_EVENTS.execute(conn, {"entries": json_rows(rows), "events": json_rows(events)})
        else:
            async with self.engine.begin() as conn:
                await conn.execute(insert(audit_events), rows)
                await conn.execute(insert(outbox), events)
        for listener in self._listeners:
            listener()

    async def query(self, query: AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the trail, newest first. Its cursor is bound to the query's filters, as the
        services bind theirs: given with other filters it is a 422 on `cursor`, not a page of them."""
        filters = _filters_fingerprint(query)
        statement = self._select(replace(query, cursor=unbind_cursor(query.cursor or "", filters) or None))
        async with self.engine.connect() as conn:
            rows = list((await conn.execute(statement)).mappings())
        page = rows[: query.limit]
        next_cursor = bind_cursor(encode_cursor([page[-1]["id"]]), filters) if len(rows) > query.limit else None
        return [_present(row) for row in page], next_cursor

    @staticmethod
    def _select(query: AuditQuery) -> Select[Any]:
        table = audit_events
        conditions = []
        if query.actor_id:
            conditions.append(table.c.actor_id == query.actor_id)
        if query.resource:
            conditions.append(table.c.resource == query.resource)
        if query.record_id:
            conditions.append(table.c.record_id == query.record_id)
        if query.action:
            conditions.append(table.c.action == query.action)
        if query.since is not None:
            conditions.append(table.c.occurred_at >= query.since)
        if query.until is not None:
            conditions.append(table.c.occurred_at < query.until)
        if query.cursor:
            conditions.append(table.c.id < _after_id(query.cursor))
        conditions.append(_actor_in_scope(query.scope))
        return select(table).where(and_(*conditions)).order_by(table.c.id.desc()).limit(query.limit + 1)


def _filters_fingerprint(query: AuditQuery) -> str:
    times = [isoformat(moment) if moment else None for moment in (query.since, query.until)]
    filters = [query.actor_id, query.resource, query.record_id, query.action, *times]
    return list_fingerprint("audit-events", json.dumps(filters).encode())


def _after_id(cursor: str) -> str:
    """The id of the event a page starts after: the one its cursor names, as `query` encoded it.
    Anything else is a 422 on `cursor`: an edited cursor must not start a page at another event."""
    try:
        values = decode_cursor(cursor)
    except ValidationFailed:
        values = []
    if len(values) == 1 and isinstance(values[0], str) and _is_event_id(values[0]):
        return values[0]
    raise SecurityProblem(422, "Unprocessable Content", f"cursor {NOT_ISSUED}", field="cursor")


def _is_event_id(text: str) -> bool:
    """An id as `new_id` makes them: a UUID in its canonical form."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _actor_in_scope(scope: RecordScope) -> ColumnElement[bool]:
    """The audit events a record scope covers. An event is owned by whoever acted, in the team and
    region they had then: `own` covers the caller's own actions, `team` those of their team, `region`
    those of their region. (The audited record's owner is not stored with the event, and a denied
    request may name no record at all.)"""
    table = audit_events
    match scope.kind:
        case ScopeKind.ALL:
            return true()
        case ScopeKind.OWN:
            column, value = table.c.actor_id, scope.owner_id
        case ScopeKind.TEAM:
            column, value = table.c.actor_team, scope.team
        case ScopeKind.REGION:
            column, value = table.c.actor_region, scope.region
    # Like `scope_clause`: a scope naming no one grants nothing.
    return column == value if value else false()


# The entries and their outbox rows, each given as one JSON array: one statement.
_ENTRIES_AND_EVENTS = DriverStatement(
    insert_outbox_json(outbox, "events").add_cte(insert_from_json(audit_events, "entries").cte("entries"))
)


def _settle(pending: _Pending, error: Exception | None) -> None:
    # A caller cancelled while waiting has a done (cancelled) future: its rows are written all the same.
    if pending.done.done():
        return
    if error is None:
        pending.done.set_result(None)
    else:
        pending.done.set_exception(error)


def _present(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "occurred_at": isoformat(as_utc(row["occurred_at"])),
        "actor": {
            "user_id": row["actor_id"],
            "kind": row["actor_kind"],
            "roles": list(row["actor_roles"] or []),
            "team": row["actor_team"],
            "region": row["actor_region"],
        },
        "action": row["action"],
        "resource": row["resource"],
        "record_id": row["record_id"],
        "outcome": row["outcome"],
        "reason": row["reason"],
        "fields": list(row["fields"] or []),
        "before": row["before"],
        "after": row["after"],
        "request_id": row["request_id"],
        "method": row["method"],
        "path": row["path"],
        "status_code": row["status_code"],
        "client_address": row["client_address"],
    }


__all__ = ["AuditEntry", "AuditLog", "AuditQuery", "diff_for_audit", "mask_pii"]
