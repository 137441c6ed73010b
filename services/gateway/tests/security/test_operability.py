"""Operating the gateway: readiness reports its own database (unready without it, ready with a busy
connection pool) and each
upstream (a down one degrades the API, it does not take it offline), a 500 carries the request's
id like every other response, and a served gateway traces its database calls."""

import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crm.sales.v1 import sales_service_pb2
from crm_platform.grpc_server import GrpcServer
from crm_platform.testing.tracing import record_spans
from fastapi import FastAPI
from gateway import __main__ as gateway_main
from gateway.app import create_app
from gateway.config import Settings
from gateway.security.store import migrate_async
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

pytestmark = pytest.mark.integration

SECRET = "operability-secret-" + "o" * 30
SALES_SERVICE = sales_service_pb2.DESCRIPTOR.services_by_name["SalesService"].full_name


def _settings(database_url: str, **targets: str) -> Settings:
    upstreams = {f"{name}_target": "" for name in ("leads", "accounts", "sales", "service_desk", "analytics")}
    return Settings(
        dev_mode=True,
        dev_jwt_secret=SECRET,
        database_url=database_url,
        audit_relay_enabled=False,
        audit_ingest_enabled=False,
        **{**upstreams, **targets},
    )


async def _get(app: FastAPI, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.get(path, **kwargs)


@pytest.fixture
async def app_for() -> AsyncIterator[Any]:
    """`await app_for(settings)`: the real gateway app, started, stopped after the test."""
    started: list[FastAPI] = []

    async def start(settings: Settings) -> FastAPI:
        app = create_app(settings)
        await app.state.security.start(migrate=False, relay=False)
        started.append(app)
        return app

    yield start
    for app in started:
        await app.state.upstreams.close()
        await app.state.security.stop()


async def test_ready_when_the_database_answers(real_app: FastAPI) -> None:
    response = await _get(real_app, "/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "dependencies": {}}


async def test_unready_without_its_database(app_for: Any, tmp_path: Path) -> None:
    app = await app_for(_settings(f"sqlite+aiosqlite:///{tmp_path / 'no-such-folder' / 'gateway.db'}"))

    response = await _get(app, "/readyz")

    assert response.status_code == 503
    assert response.json()["status"] == "unready" and response.json()["database"] != "ok"


async def test_a_busy_connection_pool_keeps_the_gateway_ready(app_for: Any, postgres_url: str) -> None:
    """Every pooled connection checked out by requests, the database answering at once: the pod is
    busy, not broken, and taken out of the Service its load would only move to the others."""
    await migrate_async(postgres_url)
    app = await app_for(_settings(postgres_url))
    engine = app.state.security.engine
    in_use = [await engine.connect() for _ in range(engine.pool.size() + engine.pool._max_overflow)]
    try:
        response = await _get(app, "/readyz")
    finally:
        for connection in in_use:
            await connection.close()

    assert response.status_code == 200, response.text
    assert response.json()["database"] == "ok"


async def test_a_down_upstream_degrades_but_keeps_the_gateway_ready(
    app_for: Any, tmp_path: Path, migrated_sqlite: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    app = await app_for(_settings(f"sqlite+aiosqlite:///{database}", sales_target=closed))

    response = await _get(app, "/readyz")

    assert response.status_code == 200
    assert response.json()["status"] == "degraded" and response.json()["dependencies"]["sales"] != "SERVING"


@pytest.mark.parametrize(("database_answers", "status"), [(True, "SERVING"), (False, "NOT_SERVING")])
async def test_a_service_whose_database_does_not_answer_degrades_the_gateway(
    app_for: Any, tmp_path: Path, migrated_sqlite: Path, database_answers: bool, status: str
) -> None:
    """The service's server ("") stays SERVING (liveness) while its own gRPC service is NOT_SERVING:
    readiness asks the latter."""

    async def sales_database() -> None:
        if not database_answers:
            raise ConnectionRefusedError("the sales database is down")

    sales = GrpcServer(
        service="sales", service_names=[SALES_SERVICE], register=lambda server: None, readiness=sales_database
    )
    port = await sales.start("127.0.0.1", 0)
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    try:
        app = await app_for(_settings(f"sqlite+aiosqlite:///{database}", sales_target=f"127.0.0.1:{port}"))
        response = await _get(app, "/readyz")
    finally:
        await sales.stop(0)

    assert response.status_code == 200
    assert response.json()["dependencies"] == {"sales": status}
    assert response.json()["status"] == ("ready" if database_answers else "degraded")


async def test_the_gateway_flushes_its_audit_outbox_for_its_configured_shutdown_grace(
    tmp_path: Path, migrated_sqlite: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """values.yaml: the gateway flushes its outbox for at most `shutdownGraceSeconds` (the chart sets
    CRM_GATEWAY_SHUTDOWN_GRACE_SECONDS), not for a fixed 5 s."""
    database = tmp_path / "gateway.db"
    shutil.copyfile(migrated_sqlite, database)
    settings = _settings(f"sqlite+aiosqlite:///{database}").model_copy(
        update={"shutdown_grace_seconds": 17, "migrate_on_start": False}
    )
    app = create_app(settings)
    security = app.state.security
    stop = security.stop
    budgets: list[Any] = []

    async def recorded_stop(**kwargs: Any) -> None:
        budgets.append(kwargs.get("drain_seconds"))
        await stop(**kwargs)

    monkeypatch.setattr(security, "stop", recorded_stop)
    async with app.router.lifespan_context(app):
        pass

    assert budgets == [17]


async def test_an_unhandled_error_is_a_problem_with_the_request_id(real_app: FastAPI) -> None:
    @real_app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    traced = await _get(real_app, "/boom", headers={"X-Request-ID": "trace-500"})
    minted = await _get(real_app, "/boom")

    assert traced.status_code == 500 and traced.headers["content-type"].startswith("application/problem+json")
    assert traced.headers["x-request-id"] == "trace-500"
    assert minted.status_code == 500 and minted.headers["x-request-id"]


@pytest.mark.parametrize(("sent", "kept"), [("a" * 100, True), ("a" * 101, False), ("tab\there", False)])
async def test_a_callers_request_id_is_kept_when_the_audit_trail_can_hold_it(
    real_app: FastAPI, sent: str, kept: bool
) -> None:
    response = await _get(real_app, "/readyz", headers={"X-Request-ID": sent})

    assert (response.headers["x-request-id"] == sent) is kept
    assert 0 < len(response.headers["x-request-id"]) <= 100


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return record_spans()


async def test_a_request_continues_the_callers_trace_in_a_span_named_by_its_route(
    real_app: FastAPI, real_app_auth: Any, spans: InMemorySpanExporter
) -> None:
    trace_id, caller_span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {**real_app_auth("sales_rep"), "traceparent": f"00-{trace_id}-{caller_span_id}-01"}

    await _get(real_app, "/api/v1/leads/L-1", headers=headers)
    await _get(real_app, "/healthz", headers=headers)

    [server] = [  # one: the probe made none
        span
        for span in spans.get_finished_spans()
        if span.kind is SpanKind.SERVER and format(span.context.trace_id, "032x") == trace_id
    ]
    assert server.name == "GET /api/v1/leads/{lead_id}"
    assert server.attributes is not None and server.attributes["http.route"] == "/api/v1/leads/{lead_id}"
    assert server.parent is not None and format(server.parent.span_id, "016x") == caller_span_id


def test_serving_traces_the_gateways_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[FastAPI] = []
    instrumented: list[Any] = []
    monkeypatch.setattr(sys, "argv", ["crm-gateway", "serve"])
    monkeypatch.setenv("CRM_GATEWAY_DEV_MODE", "true")
    monkeypatch.setenv("CRM_GATEWAY_DEV_JWT_SECRET", SECRET)
    monkeypatch.setenv("CRM_GATEWAY_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    monkeypatch.setenv("CRM_GATEWAY_METRICS_PORT", "0")  # no listener on 9106, where `make run` may serve
    # The process-wide parts (logging, tracer provider) are not the subject here.
    monkeypatch.setattr(gateway_main, "configure_logging", lambda *args: None)
    monkeypatch.setattr(gateway_main, "configure_telemetry", lambda *args: None)
    monkeypatch.setattr(gateway_main, "freeze_startup_objects", lambda: None)  # not the test process
    monkeypatch.setattr(gateway_main, "instrument_engine", instrumented.append)
    monkeypatch.setattr(gateway_main.uvicorn, "run", lambda app, **kwargs: served.append(app))

    gateway_main.main()

    [app] = served
    assert instrumented == [app.state.security.engine]
