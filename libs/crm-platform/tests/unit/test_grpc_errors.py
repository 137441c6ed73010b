"""Domain errors become gRPC statuses that fit the trailers whatever input they quote: gRPC refuses
trailers over 16 KiB, and the caller then got RESOURCE_EXHAUSTED about metadata instead of the error.
A call no service answered tells its caller which service did not, never gRPC's text of hosts and ports."""

import base64

import grpc
import pytest
from crm_platform.errors import FieldError, NotFound, Unavailable, ValidationFailed
from crm_platform.grpc_errors import (
    FIELD_VIOLATIONS_BYTES,
    MAX_FIELD_VIOLATIONS,
    MAX_TEXT_BYTES,
    STATUS_DETAILS_KEY,
    from_rpc_error,
    to_status,
)
from google.rpc import error_details_pb2, status_pb2

pytestmark = pytest.mark.unit

# Far below gRPC's hard limit of 16 KiB for all the metadata of a response.
TRAILER_BUDGET = 8_192  # gRPC refuses some trailers above its 8 KiB soft limit (12,000 bytes: 5 in 30)


def details_of(error: ValidationFailed | NotFound) -> tuple[str, status_pb2.Status, int]:
    """The status message, the status in the details trailer, and the trailers' size on the wire."""
    status = to_status(error)
    [(key, value)] = status.trailing_metadata
    assert key == STATUS_DETAILS_KEY
    # grpc-message is percent-encoded: every byte outside printable ASCII (and %) takes three.
    message_size = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in status.details.encode())
    return status.details, status_pb2.Status.FromString(value), message_size + len(base64.b64encode(value))


def violations(status: status_pb2.Status) -> list[FieldError]:
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    return [FieldError(v.field, v.description) for v in bad_request.field_violations]


def test_an_ordinary_error_is_sent_as_it_is() -> None:
    errors = [FieldError("email", "is not an email address"), FieldError("name", "is required")]
    message, status, _ = details_of(ValidationFailed(errors))
    assert message == "email: is not an email address; name: is required"
    assert violations(status) == errors


@pytest.mark.parametrize("letter", ["a", "好", "😀"], ids=["ascii", "three bytes", "four bytes"])
def test_a_long_message_and_many_field_errors_are_bounded_to_fit_the_trailers(letter: str) -> None:
    errors = [FieldError("source", f"{letter * 20_000!r} is too long")] + [
        FieldError(f"items[{index}].{letter * 600}", f"{letter * 600!r} is not a product") for index in range(1999)
    ]
    message, status, size = details_of(ValidationFailed(errors))

    assert size < TRAILER_BUDGET
    assert status.message == message
    assert message.startswith(f"source: '{letter * 10}") and message.endswith("…")
    assert len(message.encode()) <= MAX_TEXT_BYTES
    sent = violations(status)
    assert sent[0].field == "source" and sent[0].message.endswith("…")
    assert all(len(e.field.encode()) <= MAX_TEXT_BYTES >= len(e.message.encode()) for e in sent)
    assert sum(len(e.field.encode()) + len(e.message.encode()) for e in sent[:-1]) <= FIELD_VIOLATIONS_BYTES
    assert len(sent) <= MAX_FIELD_VIOLATIONS + 1
    assert sent[-1] == FieldError("", f"… and {2000 - (len(sent) - 1)} more")


def test_many_short_field_errors_stop_at_a_hundred() -> None:
    errors = [FieldError(f"items[{index}]", "is required") for index in range(2000)]
    _, status, size = details_of(ValidationFailed(errors))
    assert size < TRAILER_BUDGET
    assert violations(status) == [*errors[:MAX_FIELD_VIOLATIONS], FieldError("", "… and 1900 more")]


def test_the_id_a_not_found_quotes_is_bounded_too() -> None:
    _, status, size = details_of(NotFound("lead", "a" * 10_000))
    assert size < TRAILER_BUDGET
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "NOT_FOUND"
    assert info.metadata["resource"] == "lead"
    assert info.metadata["id"] == "a" * (MAX_TEXT_BYTES - 3) + "…"


# What gRPC itself says of a service nothing listens for (seen through the gateway as a 503 detail).
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:62665: "
    "Failed to connect to remote host: Connection refused"
)


def unanswered(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "grpcs_text", "said"),
    [
        (grpc.StatusCode.UNAVAILABLE, REFUSED, "the sales service is unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "the sales service did not answer in time"),
    ],
)
def test_a_call_no_service_answered_names_the_service_and_logs_grpcs_text(
    code: grpc.StatusCode, grpcs_text: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    remote = from_rpc_error(unanswered(code, grpcs_text), service="the sales service")

    assert (remote.code, remote.message) == (code, said)
    assert grpcs_text in caplog.text


def test_without_a_service_named_the_message_says_an_upstream_service() -> None:
    remote = from_rpc_error(unanswered(grpc.StatusCode.UNAVAILABLE, REFUSED))
    assert remote.message == "an upstream service is unavailable"


def test_a_services_own_unavailable_comes_as_the_service_said_it() -> None:
    status = to_status(Unavailable("the last conversion attempt of lead l1 is not undone yet; retry later"))
    error = grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), details=status.details
    )

    remote = from_rpc_error(error, service="the leads service")

    assert remote.message == "the last conversion attempt of lead l1 is not undone yet; retry later"
