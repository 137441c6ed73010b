"""`GET /api/v1/audit-events`: the audit trail, for admins, newest first."""

from datetime import datetime
from typing import Annotated, Any

from crm_platform.timeutil import as_utc
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from gateway.security import Access, require
from gateway.security.audit import AuditQuery

router = APIRouter(tags=["audit"])


class AuditActor(BaseModel):
    user_id: str
    kind: str
    roles: list[str]
    team: str
    region: str


class AuditEvent(BaseModel):
    id: str
    occurred_at: str
    actor: AuditActor
    action: str
    resource: str
    record_id: str
    outcome: str
    reason: str
    fields: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str
    method: str
    path: str
    status_code: int


class AuditEventPage(BaseModel):
    items: list[AuditEvent]
    next_cursor: str | None


@router.get("/audit-events", response_model=AuditEventPage)
async def list_audit_events(
    access: Annotated[Access, Depends(require("audit_events", "read"))],
    actor: Annotated[str | None, Query(max_length=200, description="actor user id")] = None,
    resource: Annotated[str | None, Query(max_length=60)] = None,
    record_id: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[
        str | None, Query(max_length=40, description="create, update, delete, export, denied, ...")
    ] = None,
    since: Annotated[datetime | None, Query(description="occurred at or after (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="occurred before (RFC 3339)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> AuditEventPage:
    query = AuditQuery(
        actor_id=actor,
        resource=resource,
        record_id=record_id,
        action=action,
        since=as_utc(since) if since else None,
        until=as_utc(until) if until else None,
        limit=access.page_limit(limit),
        cursor=cursor,
    )
    items, next_cursor = await access.runtime.audit.query(query)
    return AuditEventPage(
        items=[AuditEvent.model_validate(access.present(item)) for item in items], next_cursor=next_cursor
    )
