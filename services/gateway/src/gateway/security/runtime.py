"""Everything the security layer holds for the gateway's lifetime, and `install_security`, which
puts it on a FastAPI app (state, middleware, error handlers, OpenAPI responses)."""

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import grpc
import httpx
from crm.audit.v1 import events_pb2
from crm_platform.config import KafkaSettings, database_url_or_embedded
from crm_platform.consumer import EventConsumer, consumed_topics
from crm_platform.db import create_engine, probe_engine
from crm_platform.errors import ValidationFailed
from crm_platform.grpc_errors import from_rpc_error
from crm_platform.jobs import expiry_job, inbox_expiry_job
from crm_platform.kafka import ensure_topics_or_wait
from crm_platform.outbox import OutboxRelay, UnitOfWork
from crm_platform.principal import Principal
from fastapi import FastAPI, Request
from fastapi import routing as fastapi_routing
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.security.access import (
    REPLAY_REASON,
    CustomPiiKeys,
    FieldViews,
    addressed_record,
    client_address_of,
    declared_status,
    request_id_of,
)
from gateway.security.api_keys import ApiKeyStore
from gateway.security.audit import AUDIT_SOURCE, AuditEntry, AuditLog, diff_for_audit
from gateway.security.auth import Authenticator, JwksCache, JwtVerifier
from gateway.security.body_limit import BodySizeLimit
from gateway.security.policy import Decision, Policy, ReaderKey, load_policy, reader_memo
from gateway.security.problems import SecurityProblem, handle_security_problem
from gateway.security.rate_limit import RateLimiter
from gateway.security.replays import WriteReplays
from gateway.security.settings import SecuritySettings
from gateway.security.store import metadata, migrate_async, write_replays

log = logging.getLogger(__name__)

# Service answers that refuse the caller, and their HTTP status (gateway.errors maps them alike).
_UPSTREAM_REFUSALS = {grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404}


def database_url(settings: SecuritySettings) -> str:
    return database_url_or_embedded(settings, settings.database_url, "gateway")


class SecurityRuntime:
    def __init__(
        self,
        settings: SecuritySettings,
        *,
        policy: Policy | None = None,
        engine: AsyncEngine | None = None,
        jwks_client: httpx.AsyncClient | None = None,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy or load_policy(settings.policy_path or None)
        self.engine = engine or create_engine(database_url(settings))
        # Readiness asks on a connection of its own: a pod whose pool is busy is busy, not broken.
        self._probe = probe_engine(self.engine)
        self.audit = AuditLog(self.engine)
        self.api_keys = ApiKeyStore(self.engine)
        self.replays = WriteReplays(self.engine)
        jwks = (
            JwksCache(
                settings.jwks_url,
                client=jwks_client,
                cache_seconds=settings.jwks_cache_seconds,
                refetch_min_seconds=settings.jwks_refetch_min_seconds,
                timeout_seconds=settings.jwks_timeout_seconds,
            )
            if settings.jwks_url and not settings.dev_mode
            else None
        )
        self.authenticator = Authenticator(JwtVerifier(settings, jwks), self.api_keys.authenticate)
        self.rate_limiter = RateLimiter(rate_per_second=settings.rate_limit_per_second, burst=settings.rate_limit_burst)
        self.export_limiter = RateLimiter(
            rate_per_second=settings.export_rate_limit_per_minute / 60.0, burst=settings.export_rate_limit_burst
        )
        self.auth_failure_limiter = RateLimiter(
            rate_per_second=settings.auth_failure_rate_per_second, burst=settings.auth_failure_burst
        )
        self.kafka = kafka
        # Set by the app: the owning services hold the custom field definitions. Unset, every
        # custom value is masked in the audit trail.
        self.custom_pii_keys: CustomPiiKeys | None = None
        self._relay: OutboxRelay | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._ingest: EventConsumer | None = None
        self._ingest_task: asyncio.Task[None] | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._nested = {
            name: {path.rsplit(".", 1)[0] for path in spec.fields if "." in path}
            for name, spec in self.policy.resources.items()
        }
        self._field_views: dict[ReaderKey, FieldViews] = {}

    def nested_prefixes(self, resource: str, path: str) -> bool:
        """Does the policy have rules for fields inside `path` (e.g. `line_items.discount_percent`)?"""
        return path in self._nested.get(resource, set())

    def field_views(self, decision: Decision) -> FieldViews:
        """How fields show under a decision's read grants, shared by the requests whose decisions
        have the same read grants (same resource, same reader roles): presenting a record then
        costs about a dict lookup per field, from the first record of a request on."""
        return reader_memo(self._field_views, (decision.resource, decision.reader_roles), dict)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, *, migrate: bool = True, relay: bool = True, ingest: bool = False) -> None:
        """Migrates the gateway database (embedded default), starts the audit outbox relay and, with
        `ingest`, the consumer that stores the services' audit records (`AuditLog.store_recorded`)."""
        if migrate:
            await migrate_async(self.engine.url.render_as_string(hide_password=False))
        retention = timedelta(hours=self.settings.idempotency_retention_hours)
        replays_expiry = expiry_job(self.engine, "write-replays-expiry", write_replays, "created_at", retention, 600)
        self._jobs.append(asyncio.create_task(replays_expiry.run(self._stopping), name="gateway-write-replays-expiry"))
        if relay and self.kafka is not None:
            self._relay = OutboxRelay(self.engine, metadata, self.kafka, service="gateway")
            self.audit.on_commit(self._relay.wake)
            self._relay_task = asyncio.create_task(self._relay.run(), name="gateway-audit-relay")
        if ingest and self.kafka is not None:
            self._ingest = EventConsumer(
                name="gateway-audit",
                uow=UnitOfWork(self.engine, metadata, source=AUDIT_SOURCE),
                metadata=metadata,
                kafka=self.kafka,
                handlers={events_pb2.AuditRecorded: self.audit.store_recorded},
                service="gateway",
                ignored_sources=[AUDIT_SOURCE],  # the gateway's own records are in the trail already
                # Most records on the topic are its own, one per request: fetched a second at a time.
                patient_fetch_ms=1000,
            )
            self._ingest_task = asyncio.create_task(self._run_ingest(self._ingest), name="gateway-audit-ingest")
            inbox_expiry = inbox_expiry_job(self.engine, self._ingest.inbox, self.settings)
            self._jobs.append(asyncio.create_task(inbox_expiry.run(self._stopping), name="gateway-inbox-expiry"))

    async def _run_ingest(self, consumer: EventConsumer) -> None:
        await ensure_topics_or_wait(consumer.kafka, consumed_topics([consumer]))
        await consumer.run()

    async def database_status(self, timeout_seconds: float = 1.0) -> str:
        """ "ok" when the gateway's own database answers, else what went wrong: without it nothing can
        be audited, so no request can be served."""
        try:
            async with asyncio.timeout(timeout_seconds), self._probe.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            log.warning("gateway database not ready: %s", error)
            return type(error).__name__
        return "ok"

    async def stop(self, *, drain_seconds: float = 5.0) -> None:
        self._stopping.set()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._ingest is not None:
            await self._ingest.stop()
            if self._ingest_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self._ingest_task, drain_seconds)
        await self.audit.close()
        if self._relay is not None:
            await self._relay.stop()
            if self._relay_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(self._relay_task, drain_seconds)
            left = await self._relay.drain(drain_seconds)
            if left:
                log.warning("gateway outbox: %d audit events left for the next start", left)
        await self._probe.dispose()
        await self.engine.dispose()

    # --- audit of refusals -----------------------------------------------------------------
    async def audit_denied(
        self,
        request: Request,
        principal: Principal | None,
        resource: str,
        action: str,
        problem: SecurityProblem,
        *,
        record_id: str = "",
        path: str = "",
    ) -> None:
        """`path`: the request's path with any secret in it replaced (default: the path as requested)."""
        await self._audit_refusal(
            request,
            principal,
            resource,
            record_id,
            outcome="denied",
            reason=f"{action}: {problem.detail}",
            fields=[problem.field] if problem.field else [],
            status=problem.status,
            path=path,
        )

    async def audit_refused(
        self,
        request: Request,
        principal: Principal,
        resource: str,
        action: str,
        refusal: ValidationFailed,
        *,
        status: int = 422,
    ) -> None:
        """Audits a refusal of ids a body names of records other services own (`gateway.references`;
        a 422, or rows of an import answered 200): its answer tells whether an id exists, so it is
        traced as a probe would be (action and outcome `refused`, the failing fields, the action in
        the reason)."""
        await self._audit_refusal(
            request,
            principal,
            resource,
            addressed_record(request),
            outcome="refused",
            reason=f"{action}: {refusal}",
            fields=[error.field for error in refusal.errors],
            status=status,
        )

    async def _audit_refusal(
        self,
        request: Request,
        principal: Principal | None,
        resource: str,
        record_id: str,
        *,
        outcome: str,
        reason: str,
        fields: list[str],
        status: int,
        path: str = "",
    ) -> None:
        """One row (action and outcome `outcome`) for a request refused. A failure to write it is
        logged: the caller still gets the refusal, not a 500."""
        entry = AuditEntry(
            actor=principal or Principal(user_id="", kind="anonymous"),
            action=outcome,
            resource=resource,
            record_id=record_id,
            outcome=outcome,
            reason=reason,
            fields=fields,
            request_id=request_id_of(request),
            client_address=client_address_of(request),
            method=request.method,
            path=path or request.url.path,
            status_code=status,
        )
        try:
            await self.audit.record([entry])
        except Exception:
            log.exception("could not audit a %s request", outcome)

    async def audit_upstream_denied(
        self, request: Request, principal: Principal, resource: str, action: str, error: grpc.aio.AioRpcError
    ) -> None:
        """Audits a refusal decided by the owning service: PERMISSION_DENIED (an approval by a role
        the chain does not wait for) and NOT_FOUND (which is also how a record outside the caller's
        scope answers). Other errors are not refusals."""
        status = _UPSTREAM_REFUSALS.get(error.code())
        if status is None:
            return
        remote = from_rpc_error(error)
        problem = SecurityProblem(status, error.code().name, remote.message, field=remote.metadata.get("field", ""))
        # The service names the record it did not find; a refused one is the one the path names.
        record_id = remote.metadata.get("id") or addressed_record(request)
        await self.audit_denied(request, principal, resource, action, problem, record_id=str(record_id))

    # --- audit of public writes -----------------------------------------------------------
    async def audit_public_write(
        self,
        request: Request,
        actor: Principal,
        resource: str,
        record_id: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        *,
        action: str,
        path: str,
        replayed: bool = False,
    ) -> None:
        """`Access.audit_write` for a route without a logged-in caller, whose write the owning
        service authenticated (a web form's submission, by its key): `actor` is who wrote as that
        service says (the form, never its key), `path` the request's path with any secret in it
        replaced. Every custom value is masked: their definitions are read in a caller's scope, and
        there is none. `replayed`: answered with the Idempotency-Key's earlier result, so one
        `replay` row, as for a logged-in caller."""
        if replayed:
            fields: list[str] = []
            old = new = None
            action, reason = "replay", f"{action}: {REPLAY_REASON}"
        else:
            fields, old, new = diff_for_audit(before, after, self.policy.resource(resource), custom_pii=None)
            reason = ""
        entry = AuditEntry(
            actor=actor,
            action=action,
            resource=resource,
            record_id=record_id,
            reason=reason,
            fields=fields,
            before=old,
            after=new,
            request_id=request_id_of(request),
            client_address=client_address_of(request),
            method=request.method,
            path=path,
            status_code=declared_status(request),
        )
        await self.audit.record([entry])

    # --- start-up checks -------------------------------------------------------------------
    def check_routes(self, app: FastAPI) -> None:
        """Every route's declared resource must exist in the policy: fail at start, not per request."""
        for declaration in declared_routes(app):
            if declaration["resource"] not in self.policy.resources:
                raise ValueError(
                    f"route {declaration['method']} {declaration['path']} requires unknown resource "
                    f"{declaration['resource']!r} (policy {self.policy.source})"
                )


def _walk(dependant: Any) -> Iterator[Any]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _walk(dependency)


def _api_routes(app: FastAPI) -> Iterator[tuple[str, set[str], APIRoute]]:
    """(full path, methods, route) of every API route, including those of included routers, as
    declared. FastAPI >= 0.16x keeps included routers nested; their effective routes (what requests
    are routed to) are built on first use, which analyses every route's dependencies again: most of
    a second per app, that a check need not spend (`build_routes` builds them where the app is served)."""
    return _declared_routes(app.routes, None)


def build_routes(app: FastAPI) -> None:
    """Builds the routes requests are routed to now, at start-up, rather than on each router's first
    request (a tenth of a second each, on 2 cores). A FastAPI that copies included routes has them
    built already."""
    effective = getattr(fastapi_routing, "iter_route_contexts", None)
    if effective is not None:
        for _ in effective(app.routes):
            pass


def _declared_routes(routes: Iterable[Any], inclusion: Any) -> Iterator[tuple[str, set[str], APIRoute]]:
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = route.include_context if inclusion is None else inclusion.combine(route.include_context)
            yield from _declared_routes(included.routes, context)
        elif isinstance(route, APIRoute):
            path = route.path if inclusion is None else inclusion.path_for(route)
            yield str(path), set(route.methods or ()), route


def declared_routes(app: FastAPI) -> list[dict[str, str]]:
    """(method, path, resource, action) of every route guarded by `require` — for start-up
    checks and for tests that must cover every route."""
    result: list[dict[str, str]] = []
    for path, methods, route in _api_routes(app):
        for dependency in _walk(route.dependant):
            requirement = getattr(dependency.call, "crm_requirement", None)
            if requirement is None:
                continue
            for method in sorted(methods):
                result.append({"method": method, "path": path, "resource": requirement[0], "action": requirement[1]})
    return result


def authenticated_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every API route that authenticates its caller (directly or via `require`)."""
    from gateway.security.access import authenticate

    found: set[tuple[str, str]] = set()
    for path, methods, route in _api_routes(app):
        if any(dependency.call is authenticate for dependency in _walk(route.dependant)):
            found |= {(method, path) for method in methods}
    return found


def api_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(method, path) for path, methods, _ in _api_routes(app) for method in methods}


_PROBLEM_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "reason": {"type": "string", "description": "409 and 412: why, as a code (DUPLICATE, STALE_VERSION, ...)"},
        "existing_id": {"type": "string", "description": "409: the record the request conflicts with"},
        "current_version": {"type": "integer", "description": "412: the record's version now"},
    },
    "required": ["title", "status"],
}
# Every route can answer these through the gateway's problem+json error handlers.
_ERROR_RESPONSES = {
    "400": "Malformed request",
    "404": "Not found, or outside the caller's record scope",
    "422": "Validation failed: `errors` names each field",
    "503": "A dependency is down (see Retry-After)",
    "504": "A dependency did not answer in time",
}
# A route that authenticates its caller (`authenticate`, or `require` which calls it).
_AUTHENTICATED_RESPONSES = {"401": "Not authenticated", "429": "Rate limited (see Retry-After)"}
_FORBIDDEN = "Forbidden: the action or a field is not allowed"  # a route guarded by `require`
_BODY_TOO_LARGE = "Request body larger than `CRM_GATEWAY_MAX_BODY_BYTES` (1 MiB by default)"
_CONFLICT = "Conflict with the records' state (a duplicate, an illegal transition): `reason` says which"
_STALE = "If-Match names a version the record no longer has: `current_version` is its version now"
_PROBLEM_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _problem_responses(
    method: str, operation: Mapping[str, Any], *, authenticated: bool, guarded: bool
) -> dict[str, str]:
    """The problem responses an operation can answer, by what it takes: 401 and 429 when it
    authenticates, 403 when `require` guards it, 413 with a request body, 412 with an If-Match
    header, 409 on an authenticated write (a read changes nothing to conflict with; the public web
    form intake merges duplicates and has no version)."""
    wanted = dict(_ERROR_RESPONSES)
    if authenticated:
        wanted.update(_AUTHENTICATED_RESPONSES)
        if method != "get":
            wanted["409"] = _CONFLICT
    if guarded:
        wanted["403"] = _FORBIDDEN
    if "requestBody" in operation:
        wanted["413"] = _BODY_TOO_LARGE
    headers = {p["name"].lower() for p in operation.get("parameters", []) if p.get("in") == "header"}
    if "if-match" in headers:
        wanted["412"] = _STALE
    return wanted


def _document_problem_responses(app: FastAPI) -> None:
    """Documents the problem+json responses in the OpenAPI document, each where it can happen
    (`_problem_responses`), replacing FastAPI's default 422 shape, which the gateway never sends.
    An error response a route documents itself keeps its description and answers a problem too.
    A success response documented by a model (`responses={200: {"model": ...}}`) shows the model
    alone, not merged with the untyped object of a route's `dict` return annotation."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", _PROBLEM_SCHEMA)
        guarded = {(d["method"].lower(), d["path"]) for d in declared_routes(app)}
        authenticated = guarded | {(method.lower(), path) for method, path in authenticated_routes(app)}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    del responses["422"]
                wanted = _problem_responses(
                    method,
                    operation,
                    authenticated=(method, path) in authenticated,
                    guarded=(method, path) in guarded,
                )
                for code, description in wanted.items():
                    responses.setdefault(code, {"description": description})
                for code, response in responses.items():
                    if code[:1] in ("4", "5"):
                        response.setdefault("content", _PROBLEM_CONTENT)
                        continue
                    for content in response.get("content", {}).values():
                        documented = content.get("schema", {})
                        if "$ref" in documented and documented.get("additionalProperties") is True:
                            content["schema"] = {"$ref": documented["$ref"]}
                operation["responses"] = dict(sorted(responses.items()))
        # FastAPI's validation error schemas are unused once every 422 is a problem.
        if "HTTPValidationError" not in str(schema.get("paths", {})):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_security(
    app: FastAPI,
    settings: SecuritySettings,
    *,
    policy: Policy | None = None,
    engine: AsyncEngine | None = None,
    jwks_client: httpx.AsyncClient | None = None,
    kafka: KafkaSettings | None = None,
) -> SecurityRuntime:
    """Loads and validates the policy (a bad file raises `PolicyError` naming the line), and adds
    the security state, body-size limit, CORS, error handler and OpenAPI responses to `app`.
    Call `await runtime.start()` / `await runtime.stop()` from the app's lifespan."""
    runtime = SecurityRuntime(settings, policy=policy, engine=engine, jwks_client=jwks_client, kafka=kafka)
    app.state.security = runtime
    app.add_exception_handler(SecurityProblem, handle_security_problem)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            # traceparent and tracestate: browser frontends traced with OpenTelemetry send them.
            allow_headers=[
                *("Authorization", "Content-Type", "If-Match", "Idempotency-Key", "X-API-Key", "X-Request-ID"),
                *("traceparent", "tracestate"),
            ],
            # What a page reads of an answer: versions, waits, merges, a CSV's next page and file name,
            # an export's row limit, a replayed answer, the methods a 405 allows.
            expose_headers=[
                *("ETag", "Retry-After", "X-Request-ID", "Location", "X-Merged-Into", "Link"),
                *("Content-Disposition", "X-Export-Row-Limit", "Idempotent-Replayed", "Allow"),
            ],
        )
    _document_problem_responses(app)
    return runtime
