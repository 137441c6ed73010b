"""The gRPC chassis over a real connection: health, reflection, caller context, errors, deadlines."""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from crm_platform.config import KafkaSettings, ServiceSettings
from crm_platform.db import create_engine
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.grpc_client import create_channel
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.grpc_server import GrpcServer
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import (
    Principal,
    RecordScope,
    ScopeKind,
    current_principal,
    current_scope,
    outgoing_metadata,
)
from crm_platform.service import ServiceApp
from crm_platform.testing.sample_service import create_schema, metadata
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

SERVICE = "crm.test.v1.ProbeService"


async def whoami(request: bytes, context: Any) -> bytes:
    scope = current_scope()
    return f"{current_principal().user_id}|{scope.kind.value}|{scope.team}".encode()


async def trace_id(request: bytes, context: Any) -> bytes:
    return format(trace.get_current_span().get_span_context().trace_id, "032x").encode()


async def refuse(request: bytes, context: Any) -> bytes:
    raise ValidationFailed([FieldError("email", "is not an email address")])


async def refuse_at_length(request: bytes, context: Any) -> bytes:
    """Quotes the input as the services do: in the message and in each of 2,000 field errors."""
    text = request.decode()
    raise ValidationFailed(
        [FieldError("source", f"{text!r} is too long")]
        + [FieldError(f"items[{index}].name", f"{text[:100]!r} is not a product") for index in range(1999)]
    )


async def dawdle(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(5)
    return b"too late"


async def crash(request: bytes, context: Any) -> bytes:
    raise RuntimeError("secret internals")


@pytest.fixture
async def channel(database_url: str, kafka_settings: KafkaSettings) -> AsyncIterator[grpc.aio.Channel]:
    engine = create_engine(database_url)
    await create_schema(engine)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {
            "WhoAmI": whoami,
            "TraceId": trace_id,
            "Refuse": refuse,
            "RefuseAtLength": refuse_at_length,
            "Dawdle": dawdle,
            "Crash": crash,
        }.items()
    }
    app = ServiceApp(
        settings=ServiceSettings(
            service_name="probe",
            grpc_port=0,
            kafka=kafka_settings,
            default_deadline_seconds=0.5,
            shutdown_grace_seconds=1,
        ),
        engine=engine,
        metadata=metadata,
        uow=UnitOfWork(engine, metadata, source="/crm/probe"),
        service_names=[SERVICE],
        register=lambda server: server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        ),
    )
    port = await app.start()
    client = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    yield client
    await client.close()
    await app.stop()


async def test_health_reports_serving_for_the_server_and_each_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for reply in replies:
        names = {service.name for service in reply.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        break


async def test_the_callers_principal_and_scope_reach_the_handler(channel: grpc.aio.Channel) -> None:
    metadata = outgoing_metadata(
        Principal("u-7", ("sales_rep",), team="east"), RecordScope(ScopeKind.TEAM, team="east")
    )
    reply = await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=metadata)
    assert reply == b"u-7|team|east"


async def test_the_handler_continues_the_callers_trace_without_the_grpc_instrumentation(
    channel: grpc.aio.Channel,
) -> None:
    # No exporter (as in these tests): no gRPC spans, the call's metadata carries the trace.
    caller = SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0xF067AA0BA902B7, is_remote=False)
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
    try:
        metadata = outgoing_metadata(Principal("u-7", ("sales_rep",)), RecordScope(ScopeKind.OWN, owner_id="u-7"))
    finally:
        otel_context.detach(token)
    assert dict(metadata)["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    reply = await channel.unary_unary(f"/{SERVICE}/TraceId")(b"", metadata=metadata)
    assert reply == b"4bf92f3577b34da6a3ce929d0e0e4736"
    # A call made outside any trace starts none on the server.
    untraced = outgoing_metadata(Principal("u-7", ("sales_rep",)), RecordScope(ScopeKind.OWN, owner_id="u-7"))
    assert "traceparent" not in dict(untraced)
    assert await channel.unary_unary(f"/{SERVICE}/TraceId")(b"", metadata=untraced) == b"0" * 32


async def test_domain_errors_arrive_with_field_details(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Refuse")(b"")
    remote = from_rpc_error(caught.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert remote.field_errors == [FieldError("email", "is not an email address")]


@pytest.mark.parametrize("letter", ["a", "好"])
async def test_an_error_quoting_a_huge_input_arrives_bounded_not_as_a_metadata_overflow(
    channel: grpc.aio.Channel, letter: str
) -> None:
    # Sent whole, the error's trailers outgrew gRPC's 16 KiB limit: the caller got
    # RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" (HTTP 429) instead.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/RefuseAtLength")((letter * 20_000).encode())
    remote = from_rpc_error(caught.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert remote.message.startswith(f"source: '{letter * 10}") and remote.message.endswith("…")
    first, *intact, more = remote.field_errors
    assert first.field == "source" and first.message.startswith(f"'{letter * 10}") and first.message.endswith("…")
    assert intact == [
        FieldError(f"items[{index}].name", f"{letter * 100!r} is not a product") for index in range(len(intact))
    ]
    assert intact  # the first errors are all there, as they were raised
    assert more == FieldError("", f"… and {2000 - 1 - len(intact)} more")


async def test_a_call_is_cut_at_the_servers_deadline(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Dawdle")(b"", timeout=3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unexpected_errors_do_not_leak_internals(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Crash")(b"")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_aged_connections_are_replaced_so_new_replicas_get_calls() -> None:
    """Behind a Kubernetes Service one HTTP/2 connection sticks to one pod; ageing it out makes the
    client reconnect (and be balanced again) with no call failing."""

    async def peer(request: bytes, context: Any) -> bytes:
        return str(context.peer()).encode()

    server = GrpcServer(
        service="probe",
        service_names=[SERVICE],
        register=lambda s: s.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Peer": grpc.unary_unary_rpc_method_handler(peer)}),)
        ),
        default_deadline_seconds=0.5,
        max_connection_age_seconds=0.5,
    )
    port = await server.start("127.0.0.1", 0)
    client = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    try:
        call = client.unary_unary(f"/{SERVICE}/Peer")
        first = await call(b"")
        assert await call(b"") == first  # one connection while it is young
        await asyncio.sleep(1.5)  # age (0.5 s, ±10 %) plus grace (0.5 s)
        assert await call(b"") != first  # a new connection, from a new client port
    finally:
        await client.close()
        await server.stop(0)


class DatabaseProxy:
    """A TCP proxy to the test's PostgreSQL: `cut()` drops every connection and refuses new ones (the
    database is down), `open()` lets them through again on the same port."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def proxied_url(self) -> str:
        return self.url.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._connections:
            writer.transport.abort()
        self._connections.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.url.host, self.url.port or 5432)
        self._connections |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))


def probe_app(engine: AsyncEngine, kafka: KafkaSettings) -> ServiceApp:
    app = ServiceApp(
        settings=ServiceSettings(service_name="probe", grpc_port=0, kafka=kafka, shutdown_grace_seconds=1),
        engine=engine,
        metadata=metadata,
        uow=UnitOfWork(engine, metadata, source="/crm/probe"),
        service_names=[SERVICE],
        register=lambda server: None,
    )
    app.server.readiness_interval_seconds = 0.1
    return app


async def health_of(stub: health_pb2_grpc.HealthStub) -> dict[str, str]:
    """The status of the server ("") and of the named service."""
    return {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(
            (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
        )
        for name in ("", SERVICE)
    }


async def health_becomes(stub: health_pb2_grpc.HealthStub, expected: dict[str, str], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await health_of(stub) != expected:
            await asyncio.sleep(0.05)


async def test_the_named_services_are_not_serving_while_the_database_does_not_answer(
    postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    """Readiness probes ask the named service (the pod leaves the endpoints while its database is
    down) and liveness the server, which stays SERVING: a database outage restarts no pod."""
    await create_schema(setup := create_engine(postgres_url))
    await setup.dispose()
    proxy = DatabaseProxy(postgres_url)
    await proxy.open()
    engine = create_engine(proxy.proxied_url)
    app = probe_app(engine, kafka_settings)
    port = await app.start()
    client = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    stub = health_pb2_grpc.HealthStub(client)
    try:
        assert await health_of(stub) == {"": "SERVING", SERVICE: "SERVING"}

        await proxy.cut()
        await health_becomes(stub, {"": "SERVING", SERVICE: "NOT_SERVING"})

        await proxy.open()
        await health_becomes(stub, {"": "SERVING", SERVICE: "SERVING"})
    finally:
        await client.close()
        await app.stop()
    await proxy.cut()


async def test_a_service_started_and_stopped_without_its_database_is_not_ready_and_stops_cleanly(
    kafka_settings: KafkaSettings,
) -> None:
    """SIGTERM while the database is down: the outbox cannot be flushed, which is logged, and the
    service still stops (its engine disposed) instead of dying with a traceback."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{closed.getsockname()[1]}/crm")
    pool = engine.sync_engine.pool
    app = probe_app(engine, kafka_settings)
    port = await app.start()
    client = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    try:
        assert await health_of(health_pb2_grpc.HealthStub(client)) == {"": "SERVING", SERVICE: "NOT_SERVING"}
    finally:
        await client.close()

    async with asyncio.timeout(10):
        await app.stop()

    assert engine.sync_engine.pool is not pool  # disposed: dispose() replaces the pool


async def test_a_service_whose_every_pooled_connection_is_busy_stays_ready(
    postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    """A burst that takes the whole request pool is load, not an outage: the readiness check opens a
    connection of its own, so the pod is not taken out to pass its load on to the others."""
    engine = create_engine(postgres_url, pool_size=1, max_overflow=0)
    app = probe_app(engine, kafka_settings)
    port = await app.start()
    client = create_channel(f"127.0.0.1:{port}", default_deadline_seconds=5)
    stub = health_pb2_grpc.HealthStub(client)
    try:
        async with engine.connect() as held:  # the pool's only connection, busy
            await held.execute(text("SELECT 1"))
            await asyncio.sleep(app.server.readiness_timeout_seconds + 0.5)
            assert await health_of(stub) == {"": "SERVING", SERVICE: "SERVING"}
    finally:
        await client.close()
        await app.stop()
