"""Leads as the REST API prints them: times as `crm_platform.timeutil.isoformat` prints them (RFC
3339 UTC with a `Z`, microseconds when there are any), unset times as null, custom values as JSON."""

from datetime import UTC, datetime

import pytest
from crm.leads.v1 import leads_pb2
from crm_platform.timeutil import from_timestamp, isoformat, to_timestamp
from gateway.routers.leads import _time, lead_json
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (0, 1),
        (0, 999),
        (0, 1_000),
        (1, 0),
        (-1, 0),
        (-1, 500_000_000),
        (1_732_356_000, 0),
        (1_732_356_000, 123_456_789),
        (1_732_356_000, 999_999_999),
        (-62_135_596_800, 0),  # 0001-01-01
        (253_402_300_799, 999_999_999),  # 9999-12-31T23:59:59.999999999
    ],
)
def test_times_print_as_isoformat_prints_them(seconds: int, nanos: int) -> None:
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    assert _time(stamp) == isoformat(from_timestamp(stamp))


def test_an_unset_time_is_null() -> None:
    assert _time(Timestamp()) is None


def test_lead_json() -> None:
    lead = leads_pb2.Lead(id="l1", name="Li", score=40, tags=["vip"], version=2)
    lead.created_at.CopyFrom(to_timestamp(datetime(2026, 11, 23, 10, 0, 0, 250_000, tzinfo=UTC)))
    body = lead_json(lead)
    assert body["id"] == "l1"
    assert body["created_at"] == "2026-11-23T10:00:00.250000Z"
    assert body["recycled_at"] is None
    assert body["custom"] == {}
    assert (body["tags"], body["score"], body["version"]) == (["vip"], 40, 2)
    lead.custom.update({"budget": "100k", "seats": 12, "extra": {"a": [1, "b"]}})
    assert lead_json(lead)["custom"] == {"budget": "100k", "seats": 12, "extra": {"a": [1, "b"]}}
