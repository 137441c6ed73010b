"""CloudEvents binary mode over Kafka headers, and the catalogue that names each event message.

Every event message in proto/ declares its CloudEvents type (`(crm.common.v1.event_type)`) and its
file declares the topic (`(crm.common.v1.event_topic)`); this module reads them from the descriptors.
"""

from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache

from crm.common.v1 import options_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from crm_platform.timeutil import as_utc

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/protobuf"
# Headers a dead-lettered message gets on top of its original ones.
DLT_ERROR = "dlt_error"
DLT_ERROR_TYPE = "dlt_error_type"
DLT_ORIGINAL_TOPIC = "dlt_original_topic"
DLT_ORIGINAL_PARTITION = "dlt_original_partition"
DLT_ORIGINAL_OFFSET = "dlt_original_offset"


class MalformedEvent(ValueError):
    """A Kafka record without the CloudEvents headers this system needs."""


@dataclass(frozen=True, slots=True)
class EventSpec:
    """What the contract says about one event message."""

    type: str
    topic: str
    schema: str


@cache
def event_spec(descriptor: Descriptor) -> EventSpec:
    event_type = descriptor.GetOptions().Extensions[options_pb2.event_type]
    topic = descriptor.file.GetOptions().Extensions[options_pb2.event_topic]
    if not event_type or not topic:
        raise ValueError(f"{descriptor.full_name} is not an event message (no event_type/event_topic option)")
    return EventSpec(type=event_type, topic=topic, schema=descriptor.full_name)


def spec_of(message: Message | type[Message]) -> EventSpec:
    return event_spec(message.DESCRIPTOR)


@lru_cache(maxsize=16)
def format_time(time: datetime) -> str:
    """`ce_time` in RFC 3339, UTC. Cached: the events of one transaction share their time."""
    return as_utc(time).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class CloudEventHeaders:
    id: str
    type: str
    source: str
    time: datetime
    subject: str = ""
    dataschema: str = ""
    traceparent: str = ""
    tracestate: str = ""

    def encode(self) -> list[tuple[str, bytes]]:
        """The Kafka record headers."""
        return [(name, value.encode()) for name, value in self.text_pairs()]

    def text_pairs(self) -> list[tuple[str, str]]:
        """The headers as text (how the outbox stores them until the relay sends them)."""
        headers = [
            ("ce_specversion", SPEC_VERSION),
            ("ce_id", self.id),
            ("ce_type", self.type),
            ("ce_source", self.source),
            ("ce_time", format_time(self.time)),
            ("content-type", CONTENT_TYPE),
        ]
        if self.subject:
            headers.append(("ce_subject", self.subject))
        if self.dataschema:
            headers.append(("ce_dataschema", self.dataschema))
        if self.traceparent:
            headers.append(("traceparent", self.traceparent))
        if self.tracestate:
            headers.append(("tracestate", self.tracestate))
        return headers

    @classmethod
    def decode(cls, headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> "CloudEventHeaders":
        # Kafka allows a header without a value (null): read as empty, so a required one is missing.
        values = {name: (value or b"").decode("utf-8", "replace") for name, value in headers}
        missing = [name for name in ("ce_id", "ce_type", "ce_source", "ce_time") if not values.get(name)]
        if missing:
            raise MalformedEvent(f"missing CloudEvents headers: {', '.join(missing)}")
        if values.get("ce_specversion") != SPEC_VERSION:
            raise MalformedEvent(f"unsupported ce_specversion {values.get('ce_specversion')!r}")
        try:
            time = datetime.fromisoformat(values["ce_time"].replace("Z", "+00:00"))
        except ValueError as error:
            raise MalformedEvent(f"bad ce_time: {error}") from None
        return cls(
            id=values["ce_id"],
            type=values["ce_type"],
            source=values["ce_source"],
            time=time,
            subject=values.get("ce_subject", ""),
            dataschema=values.get("ce_dataschema", ""),
            traceparent=values.get("traceparent", ""),
            tracestate=values.get("tracestate", ""),
        )
