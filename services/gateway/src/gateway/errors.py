"""Every error leaves the gateway as RFC 9457 problem+json, never as a stack trace.

gRPC status codes from the services map as ARCHITECTURE.md §5 says; the details the services
attach (field violations, the conflicting record's id) are carried into the problem body.
"""

import logging
from collections.abc import Mapping
from typing import Any

import grpc
from crm_platform.errors import Conflict, ValidationFailed
from crm_platform.grpc_errors import RemoteError, from_rpc_error
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.inputs import NON_BLANK_PATTERN
from gateway.public_keys import path_for_logs
from gateway.routing import allowed_methods
from gateway.upstreams import UpstreamNotConfigured

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://crm.example/problems/"

_TITLES = {
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    # Only a service refusing the gateway's own call (internal call authentication: secrets that
    # differ): the caller's credentials were fine, the gateway's were not.
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    # A call the service does not know: an older pod, during a rolling upgrade that added it. A retry
    # reaches a new pod once the rollout is done.
    grpc.StatusCode.UNIMPLEMENTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
NOT_SERVED_YET = "the service does not serve this call in the version that answered (an upgrade in progress?); retry"

RETRY_AFTER_SECONDS = "5"

# The request fields the gateway fills from a header or makes of the body: a service's error about
# one names the header, as the gateway's own validation of that header does, or the body (`update_mask`
# is what a PATCH body names: an empty or override-only one "names no field to update").
_REQUEST_FIELDS = {"idempotency_key": "Idempotency-Key", "update_mask": "body"}

# gRPC's own refusals of a call's metadata or message as too large for the channel. Their code is
# RESOURCE_EXHAUSTED, as a service's rate limit's is, but no wait helps and the text describes
# the transport: a 502, never a 429 passing that text on.
_TRANSPORT_LIMITS = ("metadata size exceeds", "larger than max")


def problem(
    status: int,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    instance: str = "",
) -> JSONResponse:
    title = _TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def http_status_of(remote: RemoteError) -> int:
    if remote.code == grpc.StatusCode.ABORTED and remote.reason == "STALE_VERSION":
        return 412
    if remote.code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(t in remote.message for t in _TRANSPORT_LIMITS):
        return 502
    return _GRPC_TO_HTTP.get(remote.code, 500)


def remote_problem(remote: RemoteError, instance: str = "") -> JSONResponse:
    status = http_status_of(remote)
    errors = [{"field": _REQUEST_FIELDS.get(e.field, e.field), "message": e.message} for e in remote.field_errors]
    if status == 403 and remote.metadata.get("field"):
        errors.append({"field": remote.metadata["field"], "message": remote.message})
    extra: dict[str, Any] = {}
    if remote.metadata.get("existing_id"):
        extra["existing_id"] = remote.metadata["existing_id"]
    if remote.metadata.get("current_version"):
        extra["current_version"] = int(remote.metadata["current_version"])
    if remote.reason and status in (409, 412):
        extra["reason"] = remote.reason
    headers = None
    if status in (429, 503):
        # The service's own wait when it said one (the leads web form limit counts down a minute).
        wait = RETRY_AFTER_SECONDS if remote.retry_after is None else str(remote.retry_after)
        headers = {"Retry-After": wait}
    detail = remote.message if status < 500 or status in (503, 504) else "internal error"
    if remote.code == grpc.StatusCode.UNIMPLEMENTED:  # gRPC's own text ("Method not found!") says nothing to a client
        detail = NOT_SERVED_YET
    if any(e.field in _REQUEST_FIELDS for e in remote.field_errors):
        # The service's message names its fields ("idempotency_key: ..."): say it as `errors` does.
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[: len(remote.field_errors)])
    return problem(status, detail, errors=errors or None, headers=headers, extra=extra or None, instance=instance)


async def _rpc_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, grpc.aio.AioRpcError)
    remote = from_rpc_error(error)
    if http_status_of(remote) >= 500 and remote.code != grpc.StatusCode.UNAVAILABLE:
        log.error("upstream error on %s %s: %s %s", request.method, path_for_logs(request), remote.code, remote.message)
    return remote_problem(remote, request.url.path)


def field_error(item: Mapping[str, Any]) -> dict[str, str]:
    """One pydantic error as a problem's `errors` entry: the field's path (without where in the
    request it was; `items[0].name`) and the message, without pydantic's "Value error, " before our own messages."""
    field = ""
    for part in item.get("loc", ()):
        if part in ("body", "query", "path", "header"):
            continue
        # List positions as the services write them: line_items[0].unit_price, not line_items.0.
        field += f"[{part}]" if isinstance(part, int) else f".{part}" if field else str(part)
    message = str(item.get("msg", "invalid"))
    if item.get("type") == "value_error" and "error" in item.get("ctx", {}):
        message = str(item["ctx"]["error"])
    if item.get("type") == "string_pattern_mismatch" and item.get("ctx", {}).get("pattern") == NON_BLANK_PATTERN:
        message = "must not be blank"
    return {"field": field or "body", "message": message}


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = []
    malformed = False
    for item in error.errors():
        if item.get("type") == "json_invalid":
            # FastAPI puts the character offset where a field goes: the field is the body.
            position = item["loc"][-1]
            reason = item.get("ctx", {}).get("error", "invalid JSON")
            errors.append({"field": "body", "message": f"{reason} at character {position}"})
            malformed = True
            continue
        if item.get("loc") == ("body",) and isinstance(item.get("input"), bytes):
            # FastAPI reads a body as JSON only when its Content-Type says JSON; it hands the model
            # the raw bytes otherwise.
            return problem(
                415, "the request body must be JSON (Content-Type: application/json)", instance=request.url.path
            )
        errors.append(field_error(item))
    if malformed:
        return problem(400, "the request body is not valid JSON", errors=errors, instance=request.url.path)
    return problem(422, "the request has invalid fields", errors=errors, instance=request.url.path)


async def _validation_failed(request: Request, error: Exception) -> JSONResponse:
    """A domain ValidationFailed the gateway raises itself answers as one from a service does."""
    assert isinstance(error, ValidationFailed)
    errors = [{"field": e.field, "message": e.message} for e in error.errors]
    return problem(422, error.detail, errors=errors, instance=request.url.path)


async def _conflict(request: Request, error: Exception) -> JSONResponse:
    """A Conflict the gateway raises itself (a rule across services) answers as one from a service does."""
    assert isinstance(error, Conflict)
    metadata = {"existing_id": error.existing_id} if error.existing_id else {}
    remote = RemoteError(grpc.StatusCode.FAILED_PRECONDITION, error.detail, reason=error.reason, metadata=metadata)
    return remote_problem(remote, request.url.path)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    headers = dict(error.headers or {})
    if error.status_code == 405:
        routes = getattr(request.app.state, "api_routes", ())
        if methods := allowed_methods(routes, get_route_path(request.scope)):
            headers["Allow"] = ", ".join(methods)
    return problem(error.status_code, str(error.detail), headers=headers or None, instance=request.url.path)


async def _not_configured(request: Request, error: Exception) -> JSONResponse:
    return problem(503, str(error), headers={"Retry-After": RETRY_AFTER_SECONDS}, instance=request.url.path)


class ResponseBrokenOff(Exception):
    """Raised while a response streams, to break it off on purpose: without its last chunk, the
    client knows the body is not whole. Whoever raises it logs why; it is no error of the gateway,
    so neither the gateway nor uvicorn logs it as one, with a traceback."""


class _QuietBrokenOff(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _broken_off(record.exc_info[1]))


def _broken_off(error: BaseException | None) -> bool:
    if isinstance(error, BaseExceptionGroup):  # as a task group raises it
        return all(_broken_off(inner) for inner in error.exceptions)
    return isinstance(error, ResponseBrokenOff)


# One instance: adding it to a logger again changes nothing.
_QUIET_BROKEN_OFF = _QuietBrokenOff()


async def _unhandled(request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, ResponseBrokenOff):
        log.exception("unhandled error on %s %s", request.method, path_for_logs(request))
    # Sent past RequestContextMiddleware, which put the request's id on its state for this.
    request_id = getattr(request.state, "request_id", "")
    headers = {"X-Request-ID": request_id} if request_id else None
    return problem(500, "internal error", headers=headers, instance=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(grpc.aio.AioRpcError, _rpc_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationFailed, _validation_failed)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(UpstreamNotConfigured, _not_configured)
    app.add_exception_handler(Exception, _unhandled)
    logging.getLogger("uvicorn.error").addFilter(_QUIET_BROKEN_OFF)  # it logs what ends a response
