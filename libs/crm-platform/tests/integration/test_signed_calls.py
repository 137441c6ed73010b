"""Signed internal calls over a real connection: with `CRM_INTERNAL_CALL_SECRET` set, a service runs
only calls whose principal and scopes its callers signed; health and reflection stay open; without
the secret, calls are believed as before."""

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from crm_platform.call_auth import SIGNATURE_KEY, sign
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.grpc_client import create_channel
from crm_platform.grpc_server import GrpcServer
from crm_platform.principal import (
    Principal,
    RecordScope,
    ScopeKind,
    current_principal,
    current_scope,
    outgoing_metadata,
)
from crm_platform.testing.sample_service import SERVICE as NOTES_SERVICE
from crm_platform.testing.sample_service import build_app, create_schema
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.integration

SERVICE = "crm.test.v1.ProbeService"
WHO_AM_I = f"/{SERVICE}/WhoAmI"
COUNT = f"/{SERVICE}/Count"
SECRET = "internal-" + "k" * 40
REP = outgoing_metadata(Principal("rep-1", ("sales_rep",), team="east"), RecordScope(ScopeKind.OWN, owner_id="rep-1"))


async def who_am_i(request: bytes, context: Any) -> bytes:
    return f"{current_principal().user_id}|{current_scope().kind.value}".encode()


async def count(requests: AsyncIterator[bytes], context: Any) -> bytes:
    """Client-streaming, as a lead import part."""
    return str(len([request async for request in requests])).encode()


async def started(call_secret: str) -> tuple[GrpcServer, str]:
    handlers = {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
        "Count": grpc.stream_unary_rpc_method_handler(count),
    }
    server = GrpcServer(
        service="probe",
        service_names=[SERVICE],
        register=lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),)),
        call_secret=call_secret,
    )
    port = await server.start("127.0.0.1", 0)
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    """A service that requires signed calls: its address."""
    server, target = await started(SECRET)
    yield target
    await server.stop(0)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
    return caught.value


async def test_a_signed_call_runs_as_its_principal_in_its_scope(guarded: str) -> None:
    async with create_channel(guarded, call_secret=SECRET) as channel:
        assert await channel.unary_unary(WHO_AM_I)(b"", metadata=REP) == b"rep-1|own"
        assert await channel.stream_unary(COUNT)(iter([b"a", b"b"]), metadata=REP) == b"2"


async def test_an_unsigned_call_is_unauthenticated(guarded: str) -> None:
    async with grpc.aio.insecure_channel(guarded) as channel:
        error = await refused(channel.unary_unary(WHO_AM_I)(b"", metadata=REP))
        await refused(channel.stream_unary(COUNT)(iter([b"a"]), metadata=REP))
    assert "internal call refused" in (error.details() or "") and SIGNATURE_KEY in (error.details() or "")


async def test_a_call_signed_with_another_secret_is_unauthenticated(guarded: str) -> None:
    async with create_channel(guarded, call_secret="another-" + "k" * 40) as channel:
        await refused(channel.unary_unary(WHO_AM_I)(b"", metadata=REP))


async def test_a_scope_forged_after_signing_is_unauthenticated(guarded: str) -> None:
    """A caller holding a genuine signature (copied from the wire) cannot widen the scope it covers."""
    signature = sign(SECRET.encode(), WHO_AM_I, REP, time.time())
    admin = outgoing_metadata(Principal("rep-1", ("sales_rep",), team="east"), RecordScope(ScopeKind.ALL))
    async with grpc.aio.insecure_channel(guarded) as channel:
        call = channel.unary_unary(WHO_AM_I)
        assert await call(b"", metadata=(*REP, (SIGNATURE_KEY, signature))) == b"rep-1|own"
        error = await refused(call(b"", metadata=(*admin, (SIGNATURE_KEY, signature))))
    assert "does not match" in (error.details() or "")


async def test_health_and_reflection_answer_unsigned_calls(guarded: str) -> None:
    """Kubernetes probes and grpcurl sign nothing."""
    async with grpc.aio.insecure_channel(guarded) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = [reply async for reply in replies]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE in {service.name for service in listed[0].list_services_response.service}


async def test_refusals_are_logged_once_per_peer(guarded: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="crm_platform.grpc_server"):
        for _ in range(3):  # each on a connection of its own: another client port, the same peer
            async with grpc.aio.insecure_channel(guarded) as channel:
                await refused(channel.unary_unary(WHO_AM_I)(b"", metadata=REP))

    [logged] = [r.getMessage() for r in caplog.records if "refused a call" in r.getMessage()]
    assert WHO_AM_I in logged and "ipv4:127.0.0.1" in logged and "not signed" in logged


async def test_without_a_secret_unsigned_calls_run_and_the_start_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="crm_platform.grpc_server"):
        server, target = await started("")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            assert await channel.unary_unary(WHO_AM_I)(b"", metadata=REP) == b"rep-1|own"
    finally:
        await server.stop(0)
    assert any("internal calls are not authenticated" in r.getMessage() for r in caplog.records)


async def test_a_service_takes_the_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    """`CRM_INTERNAL_CALL_SECRET`, as the chart gives it to every component's pods."""
    monkeypatch.setenv("CRM_INTERNAL_CALL_SECRET", SECRET)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}")
    await create_schema(engine)
    app = build_app(engine, kafka_settings)
    target = f"127.0.0.1:{await app.start()}"
    add_note = f"/{NOTES_SERVICE}/AddNote"
    try:
        async with create_channel(target, call_secret=SECRET) as channel:
            assert await channel.unary_unary(add_note)(b"signed", metadata=REP)
        async with create_channel(target) as unsigned:
            await refused(unsigned.unary_unary(add_note)(b"unsigned", metadata=REP))
    finally:
        await app.stop()


async def test_a_service_calling_another_signs_for_the_caller_it_acts_for() -> None:
    """As leads calls accounts and sales to convert a lead: with the caller's principal and scope,
    on a channel signing with the service's secret."""
    downstream, downstream_target = await started(SECRET)
    hop = create_channel(downstream_target, call_secret=SECRET)

    async def forward(request: bytes, context: Any) -> bytes:
        metadata = outgoing_metadata(current_principal(), current_scope())
        reply: bytes = await hop.unary_unary(WHO_AM_I)(request, metadata=metadata)
        return reply

    upstream = GrpcServer(
        service="forwarder",
        service_names=[SERVICE],
        register=lambda s: s.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Forward": grpc.unary_unary_rpc_method_handler(forward)}),)
        ),
        call_secret=SECRET,
    )
    port = await upstream.start("127.0.0.1", 0)
    try:
        async with create_channel(f"127.0.0.1:{port}", call_secret=SECRET) as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Forward")(b"", metadata=REP) == b"rep-1|own"
    finally:
        await upstream.stop(0)
        await hop.close()
        await downstream.stop(0)
