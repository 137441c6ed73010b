"""Stored rows <-> protobuf messages of crm.accounts.v1."""

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from crm.accounts.v1 import accounts_pb2
from crm.common.v1 import common_pb2
from crm_platform.money import amount_text, parse_currency, parse_decimal
from crm_platform.principal import Principal
from crm_platform.timeutil import to_timestamp
from google.protobuf import struct_pb2


def actor(principal: Principal) -> common_pb2.Actor:
    return common_pb2.Actor(user_id=principal.user_id, kind=principal.kind)


def dict_to_struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if values:
        message.update(dict(values))
    return message


def money_value(message: common_pb2.Money, *, field: str) -> tuple[Decimal | None, str | None]:
    """(amount, currency) of an optional money input; (None, None) when unset."""
    if not message.amount and not message.currency:
        return None, None
    return parse_decimal(message.amount, field=f"{field}.amount"), parse_currency(
        message.currency, field=f"{field}.currency"
    )


def _money(amount: Decimal | None, currency: str | None) -> common_pb2.Money | None:
    if amount is None:
        return None
    return common_pb2.Money(amount=amount_text(Decimal(amount), currency or ""), currency=currency or "")


def _set_time(message: Any, name: str, value: Any) -> None:
    stamp = to_timestamp(value)
    if stamp is not None:
        getattr(message, name).CopyFrom(stamp)


def account_to_proto(row: Any) -> accounts_pb2.Account:
    r = row._mapping if hasattr(row, "_mapping") else row
    message = accounts_pb2.Account(
        id=r["id"],
        name=r["name"],
        industry=r["industry"],
        size=r["size"],
        region=r["region"],
        address=r["address"],
        website=r["website"],
        tier=r["tier"],
        lifecycle=r["lifecycle"],
        owner_id=r["owner_id"],
        team=r["team"],
        tags=list(r["tags"] or []),
        custom=dict_to_struct(r["custom"]),
        parent_id=r["parent_id"] or "",
        in_pool=bool(r["in_pool"]),
        merged_into_id=r["merged_into_id"],
        version=r["version"],
        released_by_id=r["released_by_id"],
    )
    for name in ("annual_revenue", "credit_limit"):
        money = _money(r[name], r[f"{name}_currency"])
        if money is not None:
            getattr(message, name).CopyFrom(money)
    for name in ("last_activity_at", "created_at", "updated_at", "released_at", "claimed_at"):
        _set_time(message, name, r[name])
    return message


def contact_to_proto(row: Any) -> accounts_pb2.Contact:
    r = row._mapping if hasattr(row, "_mapping") else row
    message = accounts_pb2.Contact(
        id=r["id"],
        account_id=r["account_id"],
        name=r["name"],
        title=r["title"],
        department=r["department"],
        phone=r["phone"],
        mobile=r["mobile"],
        email=r["email"],
        wechat=r["wechat"],
        decision_role=r["decision_role"],
        is_primary=bool(r["is_primary"]),
        owner_id=r["owner_id"],
        team=r["team"],
        region=r["region"],
        tags=list(r["tags"] or []),
        custom=dict_to_struct(r["custom"]),
        version=r["version"],
    )
    for name in ("created_at", "updated_at"):
        _set_time(message, name, r[name])
    return message


def activity_to_proto(row: Any) -> accounts_pb2.Activity:
    r = row._mapping if hasattr(row, "_mapping") else row
    message = accounts_pb2.Activity(
        id=r["id"],
        account_id=r["account_id"],
        contact_id=r["contact_id"],
        kind=r["kind"],
        subject=r["subject"],
        notes=r["notes"],
        actor_id=r["actor_id"],
        version=r["version"],
        outcome=r["outcome"],
    )
    _set_time(message, "occurred_at", r["occurred_at"])
    _set_time(message, "next_follow_up_at", r["next_follow_up_at"])
    return message


def task_to_proto(row: Any) -> accounts_pb2.Task:
    r = row._mapping if hasattr(row, "_mapping") else row
    message = accounts_pb2.Task(
        id=r["id"],
        account_id=r["account_id"],
        contact_id=r["contact_id"],
        title=r["title"],
        notes=r["notes"],
        status=r["status"],
        owner_id=r["owner_id"],
        team=r["team"],
        region=r["region"],
        source=r["source"],
        reminder_rule_id=r["reminder_rule_id"],
        version=r["version"],
        activity_id=r["activity_id"],
    )
    for name in ("due_at", "created_at", "completed_at"):
        _set_time(message, name, r[name])
    return message


def rule_to_proto(row: Any) -> accounts_pb2.ReminderRule:
    r = row._mapping
    message = accounts_pb2.ReminderRule(
        id=r["id"],
        name=r["name"],
        tiers=list(r["tiers"]),
        inactive_days=r["inactive_days"],
        task_title=r["task_title"],
        due_in_hours=r["due_in_hours"],
        enabled=bool(r["enabled"]),
    )
    _set_time(message, "created_at", r["created_at"])
    return message


def segment_to_proto(row: Any) -> accounts_pb2.Segment:
    r = row._mapping
    message = accounts_pb2.Segment(
        id=r["id"],
        name=r["name"],
        visibility=r["visibility"],
        owner_id=r["owner_id"],
        team=r["team"],
        filters=dict(r["filters"]),
        tags=list(r["tags"]),
        version=r["version"],
    )
    _set_time(message, "created_at", r["created_at"])
    return message
