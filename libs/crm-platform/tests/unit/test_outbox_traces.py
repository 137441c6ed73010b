"""The trace an event's consumers continue is the one it was published in, even when one transaction
publishes the events of several traces (a consumer applying a batch of events, each in its own span)."""

import pytest
from crm.audit.v1 import events_pb2
from crm_platform.outbox import Transaction, outbox_rows
from crm_platform.testing.tracing import record_spans
from crm_platform.timeutil import utcnow
from opentelemetry import trace

pytestmark = pytest.mark.unit
record_spans()  # an SDK tracer provider, so spans have trace ids


def _trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def test_events_published_in_different_spans_of_one_transaction_carry_their_own_traces() -> None:
    tx = Transaction(conn=None, source="/crm/test")  # type: ignore[arg-type]  # no statement is run
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("posting 1") as first:
        tx.publish(events_pb2.AuditRecorded(record_id="p-1"), key="k")
    with tracer.start_as_current_span("posting 2") as second:
        tx.publish(events_pb2.AuditRecorded(record_id="p-2"), key="k")
        tx.publish(events_pb2.AuditRecorded(record_id="p-3"), key="k")

    rows = outbox_rows(tx.events, source="/crm/test", now=utcnow())  # at commit, outside both spans

    traces = [_trace_id(dict(row["headers"])["traceparent"]) for row in rows]
    expected = [format(span.get_span_context().trace_id, "032x") for span in (first, second, second)]
    assert traces == expected
