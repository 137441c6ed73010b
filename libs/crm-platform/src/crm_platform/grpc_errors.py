"""Domain errors <-> gRPC status with machine-readable details (google.rpc BadRequest / ErrorInfo)."""

import logging
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    CrmError,
    FieldError,
    NotFound,
    PermissionDenied,
    StaleVersion,
    Unavailable,
    ValidationFailed,
)

log = logging.getLogger(__name__)

DOMAIN = "crm"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Trailing metadata of a RESOURCE_EXHAUSTED error: whole seconds until a retry may succeed.
RETRY_AFTER_KEY = "retry-after"

# gRPC refuses trailers over 16 KiB (the hard metadata limit): the caller would get a
# RESOURCE_EXHAUSTED about metadata instead of the error. An error carries the input it refuses
# and travels twice (percent-encoded in grpc-message, base64 in the details), so what it says is
# bounded, in bytes of UTF-8, to stay far below whatever the input was: at most about 8 KiB.
MAX_TEXT_BYTES = 500  # the message, each field violation's field and description, each metadata value
MAX_FIELD_VIOLATIONS = 100
FIELD_VIOLATIONS_BYTES = 4096
ELLIPSIS = "…"

# What a caller hears of a call its service never answered (no connection, the deadline passed on
# the way): gRPC's own text names hosts, ports and library internals, so it goes to the log only.
_UNANSWERED = {
    grpc.StatusCode.UNAVAILABLE: "is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time",
}


def _bounded(text: str) -> str:
    """`text`, cut to MAX_TEXT_BYTES of UTF-8 with an ellipsis where it was cut."""
    encoded = text.encode()
    if len(encoded) <= MAX_TEXT_BYTES:
        return text
    kept = encoded[: MAX_TEXT_BYTES - len(ELLIPSIS.encode())]
    return kept.decode(errors="ignore") + ELLIPSIS  # "ignore": drops a character cut in two


def _field_violations(errors: list[FieldError]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The first errors, as many as MAX_FIELD_VIOLATIONS and FIELD_VIOLATIONS_BYTES allow, then
    one saying how many more there are (naming no field)."""
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for error in errors[:MAX_FIELD_VIOLATIONS]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_bounded(error.field), description=_bounded(error.message)
        )
        size += violation.ByteSize()
        if size > FIELD_VIOLATIONS_BYTES:
            break
        violations.append(violation)
    if len(violations) < len(errors):
        more = f"{ELLIPSIS} and {len(errors) - len(violations)} more"
        violations.append(error_details_pb2.BadRequest.FieldViolation(description=more))
    return violations


def _info(reason: str, **metadata: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    bounded = {key: _bounded(value) for key, value in metadata.items()}
    packed.Pack(error_details_pb2.ErrorInfo(reason=_bounded(reason), domain=DOMAIN, metadata=bounded))
    return packed


def to_status(error: CrmError) -> grpc.Status:
    """The status of a domain error, with its details; small enough for gRPC's trailers whatever
    the error says (see MAX_TEXT_BYTES)."""
    details: list[any_pb2.Any] = []
    match error:
        case ValidationFailed():
            code = code_pb2.INVALID_ARGUMENT
            bad_request = error_details_pb2.BadRequest(field_violations=_field_violations(error.errors))
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        case NotFound():
            code = code_pb2.NOT_FOUND
            details.append(_info("NOT_FOUND", resource=error.resource, id=error.record_id))
        case AlreadyExists():
            code = code_pb2.ALREADY_EXISTS
            details.append(_info("DUPLICATE", existing_id=error.existing_id))
        case Conflict():
            code = code_pb2.FAILED_PRECONDITION
            details.append(_info(error.reason, existing_id=error.existing_id))
        case StaleVersion():
            code = code_pb2.ABORTED
            details.append(_info("STALE_VERSION", current_version=str(error.current_version)))
        case PermissionDenied():
            code = code_pb2.PERMISSION_DENIED
            details.append(_info("FORBIDDEN", field=error.field))
        case Unavailable():
            code = code_pb2.UNAVAILABLE
        case _:
            code = code_pb2.INTERNAL
    return rpc_status.to_status(status_pb2.Status(code=code, message=_bounded(error.detail), details=details))


@dataclass(slots=True)
class RemoteError:
    """What a caller learns from a failed call: the code, the message and the details."""

    code: grpc.StatusCode
    message: str
    field_errors: list[FieldError] = field(default_factory=list)
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: int | None = None  # seconds, when the service said how long to wait


def from_rpc_error(error: grpc.aio.AioRpcError, *, service: str = "an upstream service") -> RemoteError:
    """What the failed call tells its caller. A service's own error (`to_status`) comes as it sent
    it; an UNAVAILABLE or DEADLINE_EXCEEDED without one says only that `service` did not answer."""
    remote = RemoteError(code=error.code(), message=error.details() or "")
    sent_by_service = False
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            remote.retry_after = _seconds(value)
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        sent_by_service = True
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                remote.field_errors.extend(FieldError(v.field, v.description) for v in bad_request.field_violations)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                remote.reason = info.reason
                remote.metadata.update(info.metadata)
    if not sent_by_service and remote.code in _UNANSWERED:
        log.warning("%s did not answer: %s %s", service, remote.code.name, remote.message)
        remote.message = f"{service} {_UNANSWERED[remote.code]}"
    return remote


def _seconds(value: str | bytes) -> int | None:
    """A non-negative whole number of seconds, as HTTP's Retry-After takes it; None for anything else.
    At most 9 digits (31 years): int() refuses thousands of them, and no wait is that long."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    return None
