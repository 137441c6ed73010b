"""`GET /api/v1/audit-events`: the audit trail, newest first. Admins read all of it; a role that a
custom policy lets read it sees the events of the actors its record scope covers (its own, its
team's or its region's actions), in the listing and the export alike."""

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any

from crm_platform.timeutil import as_utc
from fastapi import Depends, Query
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from gateway.inputs import Instant, check_period, period_problem
from gateway.routing import ResourceRouter
from gateway.security import Access, FilterFields, require
from gateway.security.audit import AuditQuery
from gateway.security.exports import invalid_filter, register_export_source
from gateway.security.masking import mask_value
from gateway.security.policy import Decision, FieldRule, ResourceSpec

router = ResourceRouter(tags=["audit"])


# Every field is absent where a policy hides it from the reader (and null where it masks a time or a
# number), as on any record: a policy may let a manager read the trail without client addresses.
class AuditActor(BaseModel):
    user_id: str | None = None
    kind: str | None = None
    roles: list[str] | None = None
    team: str | None = None
    region: str | None = None


class AuditEvent(BaseModel):
    id: str | None = None
    occurred_at: str | None = None
    actor: AuditActor | None = None
    action: str | None = None
    resource: str | None = None
    record_id: str | None = None
    outcome: str | None = None
    reason: str | None = None
    fields: list[str] | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    request_id: str | None = None
    method: str | None = None
    path: str | None = None
    status_code: int | None = None
    client_address: str | None = Field(
        default=None, description="where it came from: a trusted proxy's X-Forwarded-For, else the peer"
    )


class AuditEventPage(BaseModel):
    items: list[AuditEvent]
    next_cursor: str | None


# The filters of GET /audit-events (and of the export): query parameter -> the field it filters by.
AUDIT_FILTERS: FilterFields = {
    "actor": "actor",
    "resource": "resource",
    "record_id": "record_id",
    "action": "action",
    "since": "occurred_at",
    "until": "occurred_at",
}


@router.get("/audit-events", response_model=AuditEventPage, response_model_exclude_unset=True)
async def list_audit_events(
    access: Annotated[Access, Depends(require("audit_events", "read"))],
    actor: Annotated[str | None, Query(max_length=200, description="actor user id")] = None,
    resource: Annotated[str | None, Query(max_length=60)] = None,
    record_id: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[
        str | None, Query(max_length=40, description="create, update, delete, export, denied, refused, replay, ...")
    ] = None,
    since: Annotated[Instant | None, Query(description="occurred at or after (RFC 3339, with a time zone)")] = None,
    until: Annotated[Instant | None, Query(description="occurred before (RFC 3339, with a time zone)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> AuditEventPage:
    check_period("since", since, "until", until, end_inclusive=False)
    access.check_filters(AUDIT_FILTERS)
    query = AuditQuery(
        actor_id=actor,
        resource=resource,
        record_id=record_id,
        action=action,
        since=as_utc(since) if since else None,
        until=as_utc(until) if until else None,
        limit=access.page_limit(limit),
        cursor=cursor,
        scope=access.scope,
    )
    items, next_cursor = await access.runtime.audit.query(query)
    seen = AuditedValues(access)
    return AuditEventPage(
        items=[AuditEvent.model_validate(access.present(seen.of(item))) for item in items], next_cursor=next_cursor
    )


class AuditedValues:
    """Audit rows with their `before` and `after` values as the reader sees the audited records'
    fields: hidden ones left out, masked ones masked, none of a resource they may not read. The
    trail shows no value its reader could not read on the record itself (a policy may let a manager
    read the trail of their region's records without their credit limits or discounts)."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self._decisions: dict[str, tuple[Decision, ResourceSpec] | None] = {}

    def of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        resource = str(row.get("resource", ""))
        if resource not in self._decisions:
            self._decisions[resource] = self._reading(resource)
        reading = self._decisions[resource]
        shown = dict(row)
        for name in ("before", "after"):
            values = row.get(name)
            if isinstance(values, Mapping):
                shown[name] = _values_seen(values, *reading) if reading is not None else {}
        return shown

    def _reading(self, resource: str) -> tuple[Decision, ResourceSpec] | None:
        policy = self.access.runtime.policy
        try:
            decision = policy.decide(self.access.principal, resource, "read")
        except KeyError:  # a resource the policy does not declare: nothing of it is shown
            return None
        return (decision, policy.resource(resource)) if decision.allowed else None


def _values_seen(values: Mapping[str, Any], decision: Decision, spec: ResourceSpec, prefix: str = "") -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        rule = decision.best_read_rule(path)
        if rule is FieldRule.HIDDEN:
            continue
        if rule is FieldRule.MASKED:
            seen[key] = mask_value(value, spec.field(path).type)
        elif isinstance(value, Mapping):
            seen[key] = _values_seen(value, decision, spec, f"{path}.")
        elif isinstance(value, list):
            seen[key] = [
                _values_seen(item, decision, spec, f"{path}.") if isinstance(item, Mapping) else item for item in value
            ]
        else:
            seen[key] = value
    return seen


# --- GET /exports/audit_events: the trail as CSV, with the listing's filters ---------------------

_DATETIME: TypeAdapter[datetime] = TypeAdapter(Instant)
_EXPORT_PAGE = 500


def _export_query(filters: Mapping[str, str]) -> AuditQuery:
    """The listing's filters (422 naming a bad one); pages are chosen by the export itself."""
    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        value = filters.get(name)
        try:
            times[name] = as_utc(_DATETIME.validate_python(value)) if value else None
        except ValidationError:
            raise invalid_filter(name, f"filter '{name}' must be an RFC 3339 date-time with a time zone") from None
    if problem := period_problem("since", times["since"], times["until"], end_inclusive=False):
        raise invalid_filter("until", f"filter 'until' {problem}")
    for name, longest in (("actor", 200), ("resource", 60), ("record_id", 200), ("action", 40)):
        if len(filters.get(name, "")) > longest:
            raise invalid_filter(name, f"filter '{name}' is too long")
    return AuditQuery(
        actor_id=filters.get("actor") or None,
        resource=filters.get("resource") or None,
        record_id=filters.get("record_id") or None,
        action=filters.get("action") or None,
        since=times["since"],
        until=times["until"],
        limit=_EXPORT_PAGE,
    )


def _check_audit_export(filters: Mapping[str, str]) -> None:
    _export_query(filters)


async def _audit_export_rows(access: Access, filters: Mapping[str, str]) -> AsyncIterator[Mapping[str, Any]]:
    """Newest first, page by page on the event id (keyset), in the caller's scope as listed."""
    query = replace(_export_query(filters), scope=access.scope)
    seen = AuditedValues(access)
    while True:
        items, cursor = await access.runtime.audit.query(query)
        for item in items:
            yield seen.of(item)
        if not cursor:
            return
        query = replace(query, cursor=cursor)


register_export_source(
    "audit_events",
    _audit_export_rows,
    filters=set(AUDIT_FILTERS),
    check=_check_audit_export,
    fields=AUDIT_FILTERS,
)
