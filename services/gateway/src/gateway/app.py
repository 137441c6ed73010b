"""The FastAPI application: routers per context, problem+json errors, health, readiness, metrics."""

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.config import Settings
from gateway.errors import install_error_handlers
from gateway.middleware import RequestContextMiddleware
from gateway.public_keys import holds_public_key
from gateway.routers import (
    accounts,
    analytics,
    api_keys,
    audit,
    custom_fields,
    exports,
    leads,
    me,
    sales,
    service_desk,
)
from gateway.security import install_security
from gateway.security.runtime import build_routes
from gateway.upstreams import Upstreams

UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def untraced(scope: MutableMapping[str, Any]) -> bool:
    """Probes and scrapes: frequent, and nothing to follow in a trace; and the public routes whose
    path holds their key (a credential: a span would keep it in `url.path`)."""
    path = str(scope.get("path", ""))
    return path in UNTRACED_PATHS or holds_public_key(path)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    upstreams = Upstreams(
        settings.upstream_targets(),
        deadline_seconds=settings.upstream_deadline_seconds,
        call_secret=settings.internal_calls.secret,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await security.start(
            migrate=settings.migrate_on_start,
            relay=settings.audit_relay_enabled,
            ingest=settings.audit_ingest_enabled,
        )
        build_routes(app)
        try:
            yield
        finally:
            await upstreams.close()
            # After uvicorn gave in-flight requests the grace: at most as long again to flush the audit outbox.
            await security.stop(drain_seconds=settings.shutdown_grace_seconds)

    app = FastAPI(
        title="CRM API",
        version="1.0.0",
        description="The CRM's public REST API. Errors are application/problem+json (RFC 9457).",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        # FastAPI's own OpenTelemetry spans: one server span per request, named by its route once
        # routing found it (no second route match per request, as the contrib middleware does).
        telemetry={"operation_spans": False, "exclude": untraced},
    )
    app.state.settings = settings
    app.state.upstreams = upstreams
    install_error_handlers(app)
    security = install_security(app, settings, kafka=settings.kafka)
    security.custom_pii_keys = custom_fields.audit_pii_keys
    app.add_middleware(RequestContextMiddleware)
    routers = [
        m.router for m in (me, audit, exports, api_keys, accounts, sales, leads, service_desk, analytics, custom_fields)
    ]
    for router in routers:
        app.include_router(router)
    exports.describe_export_filters()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Readiness of the gateway: its own database, and each upstream's gRPC health.

        Without its database the gateway can audit nothing, so it serves nothing: "unready", 503.
        A down upstream makes the gateway "degraded", still ready (200): its routes answer 503 while
        the rest of the API keeps working (the readiness probe would take the whole API offline).
        """
        database, dependencies = await asyncio.gather(security.database_status(), upstreams.health())
        degraded = any(status != "SERVING" for status in dependencies.values())
        status = "unready" if database != "ok" else "degraded" if degraded else "ready"
        return JSONResponse(
            {"status": status, "database": database, "dependencies": dependencies},
            status_code=503 if status == "unready" else 200,
        )

    security.check_routes(app)
    # Every route, for the Allow header of a 405 (`errors.allowed_methods`).
    app.state.api_routes = [*app.routes, *(route for router in routers for route in router.routes)]
    return app
