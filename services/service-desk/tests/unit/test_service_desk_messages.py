"""Stored tickets -> events without I/O: what a ticket.updated event lists as changed."""

from datetime import UTC, datetime, timedelta

import pytest
from service_desk.messages import changed_ticket_fields

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

TICKET = {
    "id": "t-1", "account_id": "acme", "contact_id": "", "subject": "Line down", "description": "", "channel": "api",
    "category": "", "priority": "urgent", "status": "new", "assignee_id": "", "team": "", "region": "east",
    "first_response_due_at": T0 + timedelta(minutes=15), "resolution_due_at": T0 + timedelta(hours=4),
    "first_responded_at": None, "resolved_at": None, "closed_at": None, "created_at": T0, "updated_at": T0,
    "tags": ["vip"], "version": 1, "effective_priority": "urgent", "escalated": True,
    "escalation_reason": "sla_breached_first_response", "created_by_id": "u-1", "account_tier": "A",
    "custom": {"sku": "X1"}, "survey_key": None,
    # Not in the Ticket message: never listed.
    "owner_id": "u-1", "next_sla_check_at": T0, "first_response_breached_at": T0,
}  # fmt: skip


def test_the_changed_fields_are_the_ticket_message_fields_that_differ_sorted() -> None:
    after = {
        **TICKET, "priority": "low", "effective_priority": "low", "escalated": False, "escalation_reason": "",
        "first_response_due_at": T0 + timedelta(hours=8), "tags": ["vip", "line"], "custom": {"sku": "X2"},
    }  # fmt: skip
    assert changed_ticket_fields(TICKET, after) == [
        "custom", "effective_priority", "escalated", "escalation_reason", "first_response_due_at", "priority", "tags",
    ]  # fmt: skip


def test_the_version_the_update_time_and_fields_outside_the_message_are_not_listed() -> None:
    after = {
        **TICKET, "updated_at": T0 + timedelta(minutes=1), "version": 2, "owner_id": "u-2", "next_sla_check_at": None,
        "first_response_breached_at": None,
    }  # fmt: skip
    assert changed_ticket_fields(TICKET, after) == []
