"""Audit records as events (`crm.audit.v1.AuditRecorded`). The gateway audits every request it
serves; a service audits the writes no request made (an ERP's postings on Kafka, a timer's) by
publishing the record from its outbox, in the write's transaction. The gateway stores every record
of `crm.audit.v1` in its audit trail, so `/api/v1/audit-events` shows both."""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from crm.audit.v1 import events_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from crm_platform.cloudevents import spec_of
from crm_platform.ids import new_id
from crm_platform.principal import SYSTEM, Principal
from crm_platform.structs import fill_struct
from crm_platform.timeutil import to_timestamp

# Where audit records go: a service that publishes some creates it at start-up with its own topic.
AUDIT_TOPIC = spec_of(events_pb2.AuditRecorded).topic


def changed_fields(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[str]:
    before = before or {}
    after = after or {}
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))


def message_values(message: Message) -> dict[str, Any]:
    """A record message as the values an audit record holds: field names as in the API, unset
    fields left out, money and times as the API writes them."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def audit_recorded(
    *,
    id: str,
    occurred_at: datetime,
    actor: Principal,
    action: str,
    resource: str,
    record_id: str = "",
    outcome: str = "allowed",
    reason: str = "",
    fields: Sequence[str] = (),
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    request_id: str = "",
    method: str = "",
    path: str = "",
    status_code: int = 0,
    client_address: str = "",
) -> events_pb2.AuditRecorded:
    """The event of one audited action; `before` and `after` are plain JSON values, PII masked
    (None: not given, as for a create's `before`)."""
    event = events_pb2.AuditRecorded(
        id=id,
        occurred_at=to_timestamp(occurred_at),
        actor=actor.to_proto(),
        action=action,
        resource=resource,
        record_id=record_id,
        outcome=outcome,
        reason=reason,
        fields=list(fields),
        request_id=request_id,
        method=method,
        path=path,
        status_code=status_code,
        client_address=client_address,
    )
    if before is not None:
        fill_struct(event.before, before)
        event.before.SetInParent()  # present even when empty
    if after is not None:
        fill_struct(event.after, after)
        event.after.SetInParent()
    return event


def audit_of_change(
    *,
    actor: Principal,
    action: str,
    resource: str,
    record_id: str,
    record: Message,
    previous: Message | None,
    occurred_at: datetime,
    reason: str = "",
    request_id: str = "",
    method: str = "",
    path: str = "",
    client_address: str = "",
) -> events_pb2.AuditRecorded:
    """The record of a write a service made without a request, as the gateway audits one: the
    fields it changed, as they were (`previous`; None: the write made the record) and as they are.
    Fields it did not change are left out, so no personal data goes in that the write did not touch."""
    old = message_values(previous) if previous is not None else None
    new = message_values(record)
    fields = changed_fields(old, new)
    return audit_recorded(
        id=new_id(),
        occurred_at=occurred_at,
        actor=actor,
        action=action,
        resource=resource,
        record_id=record_id,
        reason=reason,
        fields=fields,
        before={key: old.get(key) for key in fields} if old is not None else None,
        after={key: new.get(key) for key in fields},
        request_id=request_id,
        method=method,
        path=path,
        client_address=client_address,
    )


def audit_of_job(
    job: str,
    *,
    action: str,
    resource: str,
    record_id: str,
    record: Message,
    previous: Message,
    occurred_at: datetime,
    reason: str,
) -> events_pb2.AuditRecorded:
    """The record of a change a timer made (`audit_of_change`): actor `system`, method `JOB`, path
    the job's name, and the reason it acted, so a trail read by record shows why the record moved."""
    return audit_of_change(
        actor=SYSTEM,
        action=action,
        resource=resource,
        record_id=record_id,
        record=record,
        previous=previous,
        occurred_at=occurred_at,
        reason=reason,
        method="JOB",
        path=job,
    )
