"""Pure rules of the platform: event naming, ordering, scopes, cursors, error details."""

import asyncio
import gc
import json
import random
from collections import namedtuple
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import asyncpg
import grpc
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2
from crm.leads.v1 import events_pb2 as lead_events
from crm.leads.v1.leads_service_pb2 import SubmitWebformRequest
from crm.sales.v1 import events_pb2 as sales_events
from crm_platform import activities
from crm_platform.activities import kind_error, may_change_activity, occurred_at_error
from crm_platform.cloudevents import CloudEventHeaders, MalformedEvent, spec_of
from crm_platform.config import KafkaSettings, ServiceSettings
from crm_platform.db import json_text
from crm_platform.errors import AlreadyExists, FieldError, NotFound, StaleVersion, ValidationFailed, field_path
from crm_platform.grpc_errors import STATUS_DETAILS_KEY, from_rpc_error, to_status
from crm_platform.idempotency import RESUMING_METADATA, request_fingerprint
from crm_platform.jobs import PeriodicJob
from crm_platform.kafka import murmur2, partition_for
from crm_platform.money import Money, parse_decimal
from crm_platform.outbox import OutboxRelay, add_messaging_tables, backoff_seconds, listen_dsn, publishable
from crm_platform.pagination import decode_cursor, encode_cursor, page_limit
from crm_platform.principal import (
    Principal,
    RecordScope,
    ScopeKind,
    context_from_metadata,
    outgoing_metadata,
    scope_clause,
)
from crm_platform.service import GC_ALLOCATIONS_PER_COLLECTION, freeze_startup_objects
from crm_platform.structs import fill_struct, struct_values
from crm_platform.telemetry import default_sampler, instrument_engine
from crm_platform.testing.tracing import record_spans
from crm_platform.timeutil import CLOCK_SKEW
from crm_platform.update_mask import writable_paths
from google.protobuf import struct_pb2
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic_settings import SettingsConfigDict
from sqlalchemy import Column, MetaData, String, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.asyncio import create_async_engine

pytestmark = pytest.mark.unit


def test_event_type_and_topic_come_from_the_contract() -> None:
    spec = spec_of(sales_events.ContractSigned)
    assert (spec.type, spec.topic, spec.schema) == (
        "crm.sales.contract.signed",
        "crm.sales.v1",
        "crm.sales.v1.ContractSigned",
    )
    assert spec_of(lead_events.LeadCreated()).topic == "crm.leads.v1"


def test_a_message_that_is_not_an_event_is_refused() -> None:
    from crm.common.v1 import common_pb2

    with pytest.raises(ValueError, match="not an event message"):
        spec_of(common_pb2.Money)


def test_cloudevents_headers_round_trip() -> None:
    headers = CloudEventHeaders(
        id="e1",
        type="crm.leads.lead.created",
        source="/crm/leads",
        time=datetime(2026, 11, 23, 8, 0, tzinfo=UTC),
        subject="lead-1",
        dataschema="crm.leads.v1.LeadCreated",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    )
    encoded = headers.encode()
    assert dict(encoded)["ce_time"] == b"2026-11-23T08:00:00Z"
    assert dict(encoded)["content-type"] == b"application/protobuf"
    assert CloudEventHeaders.decode(encoded) == headers
    assert [(name, value.encode()) for name, value in headers.text_pairs()] == encoded  # as the outbox stores them


@pytest.mark.parametrize(
    "value",
    [
        {"name": "Łukasz 王", "tags": ["a", "b"], "n": 1.5, "ok": True, "none": None},
        {"big": 10**30, "small": -(10**30)},  # beyond orjson's 64 bits: the standard library writes it
        [],
        {},
    ],
)
def test_json_column_text_reads_back_as_the_value(value: object) -> None:
    assert json.loads(json_text(value)) == value


def test_record_keys_go_to_the_partitions_kafka_clients_pick() -> None:
    # aiokafka's DefaultPartitioner is the reference (it follows the Java client's Utils.murmur2).
    randomness = random.Random(4)
    keys = [b"", b"a", b"ab", b"abc", b"01a2466f-4a0d-7353-a5e4-989b43526c13", "王".encode()]
    keys += [randomness.randbytes(randomness.randrange(0, 80)) for _ in range(2000)]
    partitions = list(range(6))
    for key in keys:
        assert murmur2(key) == reference_murmur2(key), key
        assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions), key


def test_headers_without_an_id_are_malformed() -> None:
    with pytest.raises(MalformedEvent, match="ce_id"):
        CloudEventHeaders.decode(
            [("ce_specversion", b"1.0"), ("ce_type", b"t"), ("ce_source", b"s"), ("ce_time", b"2026-01-01T00:00:00Z")]
        )


Row = namedtuple("Row", "seq key held_back")


def test_a_claimed_row_held_back_by_an_older_row_of_its_key_waits() -> None:
    # Row 6 of "b" has an older pending row outside the pass (another relay holds it, or it waits
    # out a retry backoff); the other keys' rows go.
    rows = [Row(5, "a", False), Row(6, "b", True), Row(7, "a", False), Row(9, "c", False)]
    assert [row.seq for row in publishable(rows)] == [5, 7, 9]


async def test_relay_passes_start_a_linger_apart_and_a_commit_after_a_quiet_spell_goes_at_once() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    metadata = MetaData()
    add_messaging_tables(metadata)
    relay = OutboxRelay(engine, metadata, KafkaSettings(), service="test", linger_seconds=0.05)
    assert relay._linger() == 0.0  # no pass yet
    now = asyncio.get_running_loop().time()
    relay._last_pass_started = now - 0.01  # a commit 10 ms into a pass's interval waits out the rest
    assert 0.035 <= relay._linger() <= 0.04
    relay._last_pass_started = now - 1.0
    assert relay._linger() == 0.0
    await engine.dispose()


def test_backoff_grows_and_is_capped() -> None:
    assert all(0 <= backoff_seconds(1) <= 0.5 for _ in range(50))
    assert all(0 <= backoff_seconds(30) <= 60 for _ in range(50))


def test_principal_and_scope_travel_in_metadata() -> None:
    principal = Principal(user_id="u1", roles=("sales_rep",), team="east", region="cn-north", name="Li")
    scope = RecordScope(ScopeKind.TEAM, team="east")
    context = context_from_metadata(outgoing_metadata(principal, scope, "req-1"))
    assert (context.principal, context.scope, context.request_id) == (principal, scope, "req-1")


def test_a_call_without_metadata_gets_no_wider_scope_than_its_own_records() -> None:
    context = context_from_metadata(())
    assert context.scope.kind is ScopeKind.OWN and context.scope.owner_id == ""
    assert not context.scope.allows(owner_id="anyone", team="t", region="r")


def test_scope_clause_filters_on_the_right_column() -> None:
    table = Table("leads", MetaData(), Column("owner_id", String), Column("team", String), Column("region", String))

    def sql(scope: RecordScope) -> str:
        return str(
            scope_clause(table, scope).compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        )

    assert sql(RecordScope(ScopeKind.OWN, owner_id="u1")) == "leads.owner_id = 'u1'"
    assert sql(RecordScope(ScopeKind.TEAM, team="east")) == "leads.team = 'east'"
    assert sql(RecordScope(ScopeKind.REGION, region="north")) == "leads.region = 'north'"
    assert sql(RecordScope(ScopeKind.ALL)) == "true"
    assert sql(RecordScope(ScopeKind.TEAM)) == "false"  # a team scope without a team sees nothing


def test_cursor_round_trip_and_garbage() -> None:
    assert decode_cursor(encode_cursor(["2026-11-23 08:00:00+00:00", "id-1"])) == ["2026-11-23 08:00:00+00:00", "id-1"]
    with pytest.raises(ValidationFailed) as caught:
        decode_cursor("%%%not-a-cursor")
    assert caught.value.errors[0].field == "cursor"


def test_page_limit_defaults_and_caps() -> None:
    assert (page_limit(0), page_limit(20), page_limit(10_000)) == (50, 20, 500)


def test_money_is_decimal_and_refuses_mixed_currencies() -> None:
    total = Money(Decimal("0.10"), "CNY") + Money(Decimal("0.20"), "CNY")
    assert total.amount == Decimal("0.30")
    assert total.to_proto().amount == "0.30"
    with pytest.raises(ValueError, match="currency"):
        _ = total + Money(Decimal("1"), "USD")
    with pytest.raises(ValidationFailed):
        parse_decimal("1e", field="amount")


class _FakeRpcError:
    def __init__(self, status: grpc.Status) -> None:
        self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str:
        return self.status.details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return tuple(self.status.trailing_metadata)


@pytest.mark.parametrize(
    ("error", "code", "check"),
    [
        (
            ValidationFailed([FieldError("email", "is not an email")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda r: r.field_errors == [FieldError("email", "is not an email")],
        ),
        (
            AlreadyExists("duplicate lead", existing_id="lead-7"),
            grpc.StatusCode.ALREADY_EXISTS,
            lambda r: r.metadata["existing_id"] == "lead-7",
        ),
        (
            StaleVersion("lead", "l1", 4),
            grpc.StatusCode.ABORTED,
            lambda r: r.reason == "STALE_VERSION" and r.metadata["current_version"] == "4",
        ),
        (NotFound("lead", "l1"), grpc.StatusCode.NOT_FOUND, lambda r: r.message == "lead l1 not found"),
    ],
)
def test_domain_errors_cross_grpc_with_their_details(error: Exception, code: grpc.StatusCode, check: object) -> None:
    status = to_status(error)  # type: ignore[arg-type]
    assert status.code == code
    assert any(key == STATUS_DETAILS_KEY for key, _ in status.trailing_metadata)
    remote = from_rpc_error(_FakeRpcError(status))  # type: ignore[arg-type]
    assert remote.code == code
    assert check(remote)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("trailer", "seconds"),
    [("42", 42), ("0", 0), (None, None), ("-3", None), ("4.5", None), ("soon", None), ("", None), ("٤٢", None),
     pytest.param("9" * 5000, None, id="5000 digits")],
)  # fmt: skip
def test_a_services_wait_crosses_grpc_in_whole_seconds(trailer: str | None, seconds: int | None) -> None:
    trailers = grpc.aio.Metadata() if trailer is None else grpc.aio.Metadata(("retry-after", trailer))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailers, details="too many submissions"
    )
    assert from_rpc_error(error).retry_after == seconds


def test_infrastructure_failures_are_told_apart_from_bad_events() -> None:
    from crm_platform.consumer import is_infrastructure_failure
    from crm_platform.errors import Unavailable
    from sqlalchemy.exc import IntegrityError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    assert is_infrastructure_failure(OperationalError("SELECT 1", {}, ConnectionRefusedError()))
    assert is_infrastructure_failure(Unavailable("accounts is down"))
    assert is_infrastructure_failure(TimeoutError())
    assert is_infrastructure_failure(ConnectionResetError())
    assert is_infrastructure_failure(PoolTimeout("QueuePool limit reached"))
    assert not is_infrastructure_failure(FileNotFoundError("a bug, not an outage"))
    assert not is_infrastructure_failure(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_infrastructure_failure(ValidationFailed([FieldError("x", "bad")]))
    assert not is_infrastructure_failure(KeyError("bug"))


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.TooManyConnectionsError("too many clients already"),  # raised as it is when connecting
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        DatabaseError("SELECT 1", {}, asyncpg.ConnectionFailureError("could not receive data")),
    ],
    ids=["53300 too many clients", "57P03 starting up", "57P01 shut down", "08006 wrapped"],
)
def test_a_database_that_cannot_serve_now_is_an_outage_to_wait_for(error: BaseException) -> None:
    from crm_platform.consumer import is_infrastructure_failure

    assert is_infrastructure_failure(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key value"),
        DatabaseError("UPDATE", {}, asyncpg.DeadlockDetectedError("deadlock detected")),  # retried, and counted
        DatabaseError("SELECT", {}, asyncpg.DivisionByZeroError("division by zero")),
    ],
)
def test_a_database_error_of_the_statement_itself_is_no_outage(error: BaseException) -> None:
    from crm_platform.consumer import is_infrastructure_failure

    assert not is_infrastructure_failure(error)


def test_without_an_exporter_spans_are_not_recorded_but_still_carry_ids() -> None:
    """Log lines and Kafka headers need trace ids; building spans nobody exports is waste."""
    provider = TracerProvider(sampler=default_sampler({}))
    span = provider.get_tracer("test").start_span("request")
    assert not span.is_recording()
    assert span.get_span_context().is_valid
    assert default_sampler({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) is None
    assert default_sampler({"OTEL_TRACES_SAMPLER": "always_on"}) is None  # the operator's choice


def test_database_statements_are_hooked_only_when_spans_are_exported() -> None:
    """Database spans are leaves: without an exporter their hooks would be pure cost."""
    quiet, exported = create_async_engine("sqlite+aiosqlite://"), create_async_engine("sqlite+aiosqlite://")
    instrument_engine(quiet, {})
    instrument_engine(exported, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    try:
        assert len(quiet.sync_engine.dispatch.before_cursor_execute) == 0
        assert len(exported.sync_engine.dispatch.before_cursor_execute) == 1
    finally:
        SQLAlchemyInstrumentor().uninstrument()  # type: ignore[no-untyped-call]


def test_without_an_exporter_a_sampled_callers_trace_is_still_recorded() -> None:
    provider = TracerProvider(sampler=default_sampler({}))
    caller = SpanContext(trace_id=7, span_id=9, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent = trace.set_span_in_context(NonRecordingSpan(caller))
    span = provider.get_tracer("test").start_span("handle", context=parent)
    assert span.is_recording()
    assert span.get_span_context().trace_id == 7


async def test_the_events_a_timer_writes_carry_the_trace_of_its_pass() -> None:
    """An SLA or recycling event has no request behind it; its pass is the trace consumers continue."""
    spans = record_spans()
    stopping = asyncio.Event()
    carriers: list[dict[str, str]] = []

    async def run_once() -> int:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # what the outbox does for the rows it writes
        carriers.append(carrier)
        stopping.set()
        return 1

    await PeriodicJob("recycle", interval_seconds=0.01, run_once=run_once).run(stopping)
    [finished] = [span for span in spans.get_finished_spans() if span.name == "job recycle"]
    assert carriers[0]["traceparent"].split("-")[1] == format(finished.context.trace_id, "032x")


def test_a_started_service_collects_cycles_less_often_and_never_scans_its_startup_objects() -> None:
    threshold = gc.get_threshold()
    try:
        startup_object = {"settings": [1, 2, 3]}
        freeze_startup_objects()
        assert gc.get_threshold()[0] == GC_ALLOCATIONS_PER_COLLECTION > threshold[0]
        assert not any(startup_object is item for item in gc.get_objects())  # frozen, out of the collector's reach
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_struct_filled_from_values_equals_the_one_struct_update_makes() -> None:
    values = {"name": "Zoë", "score": 35, "in_pool": False, "tags": ["a", 1], "custom": {"k": "v"}, "none": None}
    expected = struct_pb2.Struct()
    expected.update(values)
    filled = struct_pb2.Struct()
    fill_struct(filled, values)
    assert filled == expected


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"ok": 1, "x": float("nan")}, "custom.x"),
        ({"a": {"b": [1.5, float("-inf")]}}, "custom.a.b[1]"),
    ],
)
def test_a_struct_with_a_number_json_does_not_have_is_invalid_input_naming_the_field(
    values: dict[str, object], field: str
) -> None:
    # Regression: a gRPC caller's NaN in `custom` was an internal error (json_format refuses it).
    message = struct_pb2.Struct()
    message.update(values)
    with pytest.raises(ValidationFailed) as caught:
        struct_values(message)
    assert [error.field for error in caught.value.errors] == [field]
    assert struct_values(struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=2.5)})) == {"n": 2.5}


def test_an_event_the_broker_would_refuse_fails_the_write_instead_of_blocking_its_record() -> None:
    from crm.audit.v1 import events_pb2 as audit_events
    from crm_platform.outbox import MAX_EVENT_BYTES, Transaction

    tx = Transaction(conn=cast(Any, None), source="/test")
    tx.publish(audit_events.AuditRecorded(record_id="r" * (MAX_EVENT_BYTES - 100)), key="k")  # fits
    with pytest.raises(ValidationFailed) as caught:
        tx.publish(audit_events.AuditRecorded(record_id="r" * MAX_EVENT_BYTES), key="k")
    assert caught.value.errors[0].field == "record" and len(tx.events) == 1


def test_the_relays_listen_dsn_keeps_the_connection_options_and_leaves_out_what_would_be_a_server_setting() -> None:
    """A database URL's query holds connect() keywords and SQLAlchemy dialect options; in a DSN
    asyncpg would send those to the server as settings, and the server refuses unknown ones."""
    url = make_url(
        "postgresql+asyncpg://crm:s3cret@db.internal:5432/leads?ssl=verify-full"
        "&prepared_statement_cache_size=0&command_timeout=5&target_session_attrs=read-write"
    )
    assert listen_dsn(url) == (
        "postgresql://crm:s3cret@db.internal:5432/leads?sslmode=verify-full&target_session_attrs=read-write"
    )


def test_the_relays_listen_dsn_keeps_hosts_given_in_the_query() -> None:
    socket = make_url("postgresql+asyncpg://crm:pw@/leads?host=/var/run/postgresql")
    assert listen_dsn(socket) == "postgresql://crm:pw@/leads?host=%2Fvar%2Frun%2Fpostgresql"
    several = make_url("postgresql+asyncpg://crm:pw@/leads?host=db1:5432&host=db2:5433&ssl=require")
    assert listen_dsn(several) == "postgresql://crm:pw@/leads?host=db1%3A5432%2Cdb2%3A5433&sslmode=require"


SUBMIT = "/crm.leads.v1.LeadsService/SubmitWebform"


def submission(key: str, **fields: str) -> SubmitWebformRequest:
    return SubmitWebformRequest(form_key="form-1", fields=fields, idempotency_key=key)


def test_a_keyed_requests_fingerprint_is_its_method_and_content_whatever_the_key() -> None:
    first = request_fingerprint(submission("k1", name="Li", email="li@example.com"), SUBMIT)
    assert first is not None and len(first) == 64
    assert request_fingerprint(submission("k2", name="Li", email="li@example.com"), SUBMIT) == first
    # Map entries in another order are the same request.
    assert request_fingerprint(submission("k1", email="li@example.com", name="Li"), SUBMIT) == first
    assert request_fingerprint(submission("k1", name="Wang", email="li@example.com"), SUBMIT) != first
    assert request_fingerprint(submission("k1", name="Li", email="li@example.com"), "/other/Method") != first


def test_a_request_without_a_key_or_resuming_its_key_has_no_fingerprint() -> None:
    assert request_fingerprint(submission("", name="Li"), SUBMIT) is None
    assert request_fingerprint(b"raw bytes", SUBMIT) is None
    resuming = (("x-request-id", "r-1"), RESUMING_METADATA)
    assert request_fingerprint(submission("k1", name="Li"), SUBMIT, resuming) is None


def test_a_fields_path_names_list_positions_in_brackets() -> None:
    assert field_path(["line_items", 0, "unit_price", "amount"]) == "line_items[0].unit_price.amount"
    assert field_path(["custom", "x", 1, 0]) == "custom.x[1][0]"
    assert field_path([0, "name"]) == "[0].name"
    assert field_path([]) == ""


def test_an_activity_is_its_loggers_own_in_the_team_and_region_of_its_record() -> None:
    def may_change(scope: RecordScope, actor_id: str) -> bool:
        return may_change_activity(scope, actor_id=actor_id, team="east", region="cn-east")

    rep = RecordScope(ScopeKind.OWN, owner_id="rep-1")
    assert may_change(rep, "rep-1")
    assert not may_change(rep, "mgr")  # the manager's note on the rep's own record is the manager's
    assert may_change(RecordScope(ScopeKind.TEAM, team="east"), "rep-2")
    assert not may_change(RecordScope(ScopeKind.TEAM, team="west"), "rep-2")
    assert may_change(RecordScope(ScopeKind.REGION, region="cn-east"), "anyone")
    assert not may_change(RecordScope(ScopeKind.REGION, region="cn-west"), "anyone")
    assert may_change(RecordScope(ScopeKind.ALL), "anyone")


def test_an_activity_happened_of_a_kind_there_is_and_not_later_than_a_fast_clock_allows() -> None:
    now = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)

    assert kind_error("wechat") is None and occurred_at_error(now + CLOCK_SKEW, now) is None
    assert kind_error("fax") == FieldError("kind", "must be one of call, email, meeting, visit, note, wechat")
    assert occurred_at_error(now + CLOCK_SKEW + timedelta(seconds=1), now) == FieldError(
        "occurred_at", "must not be in the future"
    )
    assert occurred_at_error(None, now) == FieldError("occurred_at", "is required")


def _mask_errors(paths: list[str], writable: set[str], **options: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        writable_paths(paths, writable, **options)
    return [(error.field, error.message) for error in refused.value.errors]


def test_an_update_mask_names_writable_fields_and_at_least_one() -> None:
    assert writable_paths(iter(["name", "tags"]), {"name", "tags"}) == ["name", "tags"]
    assert _mask_errors([], {"name"}) == [("update_mask", "names no field to update")]
    assert _mask_errors(["name", "id", "version"], {"name"}, what="lead field") == [
        ("id", "is not a writable lead field"),
        ("version", "is not a writable lead field"),
    ]
    # `custom.<key>` writes one custom field where the mask is keyed, and is unknown where it is not.
    assert writable_paths(["custom.size"], {"custom"}, keyed=True) == ["custom.size"]
    assert _mask_errors(["custom.size"], {"custom"}) == [("custom.size", "is not a writable field")]


def test_tasks_due_today_are_due_by_the_end_of_the_utc_day_those_overdue_included() -> None:
    """Both services' task lists (an account's, a lead's) mean the same by `?due=`."""
    now = datetime(2026, 12, 6, 23, 30, tzinfo=UTC)
    end_of_day = datetime(2026, 12, 7, tzinfo=UTC)
    assert activities.due_before("overdue", now) == now
    assert activities.due_before("today", now) == end_of_day
    beijing = now.astimezone(timezone(timedelta(hours=8)))  # already 7 December there
    assert activities.due_before("today", beijing) == end_of_day
    with pytest.raises(ValueError, match="today, overdue"):
        activities.due_before("tomorrow", now)


class NotesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_NOTES_")
    service_name: str = "notes"


def test_a_database_url_left_out_is_the_embedded_sqlite_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CRM_NOTES_DATABASE_URL", raising=False)

    assert NotesSettings().resolved_database_url() == f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}"


def test_a_database_url_given_empty_is_refused_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret whose value is missing: not a throwaway SQLite file in the pod, each replica its own."""
    monkeypatch.setenv("CRM_NOTES_DATABASE_URL", "")

    with pytest.raises(ValueError, match="CRM_NOTES_DATABASE_URL is set but empty"):
        NotesSettings().resolved_database_url()
