"""Domain errors raised by handlers; the gRPC layer maps them to status codes with details,
and the gateway maps those back to problem+json (SPEC §3)."""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


def field_path(location: Sequence[str | int]) -> str:
    """A field's name in an error: `line_items[0].unit_price`, keys joined by dots and list
    positions in brackets, the same from every service and the gateway."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


class CrmError(Exception):
    """Base of every error a handler may raise on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(CrmError):
    def __init__(self, resource: str, record_id: str) -> None:
        super().__init__(f"{resource} {record_id} not found")
        self.resource = resource
        self.record_id = record_id


class AlreadyExists(CrmError):
    """A duplicate: `existing_id` names the record that already exists."""

    def __init__(self, detail: str, *, existing_id: str = "") -> None:
        super().__init__(detail)
        self.existing_id = existing_id


class Conflict(CrmError):
    """An illegal state transition or a business rule conflict (HTTP 409)."""

    def __init__(self, detail: str, *, existing_id: str = "", reason: str = "CONFLICT") -> None:
        super().__init__(detail)
        self.existing_id = existing_id
        self.reason = reason


class ValidationFailed(CrmError):
    """Input that breaks a rule; every offending field is named (HTTP 422)."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors


def missing_reference(field: str, resource: str, record_id: str) -> ValidationFailed:
    """A request body's reference (`field`) to a record that does not exist: a 422 naming the field,
    not a 404, which is for the record a path addresses. A record outside the caller's record scope
    answers the same, so the answer never reveals that it exists."""
    return ValidationFailed([FieldError(field, f"{resource} {record_id} does not exist")])


class PermissionDenied(CrmError):
    def __init__(self, detail: str, *, field: str = "") -> None:
        super().__init__(detail)
        self.field = field


# The `expected_version` of an `If-Match: "0"`. A write's `expected_version` 0 means "unconditional",
# and no stored record has version 0 (versions start at 1), so the gateway sends this instead, which
# no version equals: a 412 naming the current one, never an unconditional write. A record shown at
# version 0 before it is first stored (an SLA policy at its default targets) takes it as its own.
EXPECTED_VERSION_ZERO = -1


class StaleVersion(CrmError):
    """The caller's expected version is not the stored one (HTTP 412)."""

    def __init__(self, resource: str, record_id: str, current_version: int) -> None:
        super().__init__(f"{resource} {record_id} has version {current_version}")
        self.current_version = current_version


class Unavailable(CrmError):
    """A dependency is down; the caller may retry (HTTP 503)."""
