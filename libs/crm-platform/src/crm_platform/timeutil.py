"""UTC time and conversions to and from protobuf Timestamps."""

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from crm_platform.errors import FieldError, ValidationFailed

# A time a caller gives (when a call happened, when money was received) may run this far ahead of
# the server's clock: the caller's clock may be fast.
CLOCK_SKEW = timedelta(minutes=5)


def utcnow() -> datetime:
    return datetime.now(UTC)


def in_the_future(value: datetime, now: datetime) -> bool:
    """Whether a time a caller gives lies after `now`, beyond the clock skew allowed."""
    return value > now + CLOCK_SKEW


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every datetime in the code is aware UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(as_utc(value))
    return stamp


def from_timestamp(stamp: Timestamp) -> datetime | None:
    """An unset Timestamp (0 seconds, 0 nanos) reads as None."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def given_time(stamp: Timestamp, field: str) -> datetime | None:
    """`from_timestamp` of a time another system sent: one no datetime holds (outside the years
    1 to 9999) is refused naming `field`, a bad message rather than a crash to retry."""
    try:
        return from_timestamp(stamp)
    except ValueError:
        raise ValidationFailed([FieldError(field, "is not a time between the years 1 and 9999")]) from None


def isoformat(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a `Z`, as the REST API prints times."""
    if value is None:
        return None
    return as_utc(value).isoformat().replace("+00:00", "Z")
