from datetime import UTC, datetime, timedelta

import pytest
from crm.leads.v1 import events_pb2, leads_pb2
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from leads import repository as repo
from leads.messages import fill_lead, lead_to_proto

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def _stamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def test_a_lead_row_becomes_a_message_with_every_field() -> None:
    row = {
        **repo.LEAD_DEFAULTS,
        "id": "l1",
        "name": "Li Lei",
        "source": "website",
        "status": "new",
        "grade": "C",
        "owner_id": "rep1",
        "score": 45,
        "tags": ["vip", "web"],
        "custom": {"visits": "7", "engaged": True},
        "in_pool": False,
        "version": 3,
        "created_at": NOW,
        "updated_at": NOW,
        "assigned_at": NOW,
        "first_contact_due_at": NOW + timedelta(hours=2),
    }
    custom = struct_pb2.Struct()
    custom.update({"visits": "7", "engaged": True})
    expected = leads_pb2.Lead(
        id="l1",
        name="Li Lei",
        source="website",
        status="new",
        grade="C",
        owner_id="rep1",
        score=45,
        tags=["vip", "web"],
        custom=custom,
        version=3,
        created_at=_stamp(NOW),
        updated_at=_stamp(NOW),
        assigned_at=_stamp(NOW),
        first_contact_due_at=_stamp(NOW + timedelta(hours=2)),
    )
    assert lead_to_proto(row) == expected
    # The same filled in place, in an event (the import's way), and again for another row.
    event = events_pb2.LeadCreated()
    fill_lead(event.lead, row)
    assert event.lead == expected
    later = NOW + timedelta(minutes=1)
    assert lead_to_proto({**row, "created_at": later}).created_at == _stamp(later)
