"""ASGI middleware (plain ASGI, not BaseHTTPMiddleware, to stay off the hot path's CPU budget):
`X-Request-ID` on every response, and request metrics per route template."""

import time
import uuid
from contextvars import ContextVar

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter("crm_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "crm_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_request_id: ContextVar[str] = ContextVar("crm_request_id", default="")
MAX_REQUEST_ID = 100  # audit_events.request_id


def current_request_id() -> str:
    return _request_id.get()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # Accept a caller's id only when it is printable and fits the audit trail; otherwise mint one.
        request_id = incoming if 0 < len(incoming) <= MAX_REQUEST_ID and incoming.isprintable() else uuid.uuid4().hex
        token = _request_id.set(request_id)
        # Also on the request's state: the 500 of an unhandled error is sent from outside this
        # middleware (Starlette's outermost one), after the context variable is reset.
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
