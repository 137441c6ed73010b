"""A service's refusal as the gateway answers it: the fields the gateway fills from a header are
named as the header, and the update mask it makes of a PATCH body as `body`, in `errors` and in
`detail` alike."""

import json

import grpc
import pytest
from crm_platform.errors import FieldError
from crm_platform.grpc_errors import RemoteError
from gateway.errors import remote_problem

pytestmark = pytest.mark.unit


def test_a_reused_idempotency_key_is_named_as_the_header_in_errors_and_detail() -> None:
    remote = RemoteError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="idempotency_key: was used with a different request",
        field_errors=[FieldError("idempotency_key", "was used with a different request")],
    )

    body = json.loads(remote_problem(remote, "/api/v1/tickets").body)

    assert body["status"] == 422
    assert body["errors"] == [{"field": "Idempotency-Key", "message": "was used with a different request"}]
    assert body["detail"] == "Idempotency-Key: was used with a different request"


def test_a_patch_naming_no_field_to_update_is_a_422_on_the_body_not_on_a_grpc_name() -> None:
    remote = RemoteError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="update_mask: name at least one field to update",
        field_errors=[FieldError("update_mask", "name at least one field to update")],
    )

    body = json.loads(remote_problem(remote, "/api/v1/opportunities/o-1").body)

    assert body["errors"] == [{"field": "body", "message": "name at least one field to update"}]
    assert body["detail"] == "body: name at least one field to update"


def test_other_fields_keep_the_services_detail() -> None:
    remote = RemoteError(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="custom.x: is not a defined custom field",
        field_errors=[FieldError("custom.x", "is not a defined custom field")],
    )

    body = json.loads(remote_problem(remote).body)

    assert body["detail"] == "custom.x: is not a defined custom field"
    assert body["errors"] == [{"field": "custom.x", "message": "is not a defined custom field"}]


def test_a_call_an_older_service_pod_does_not_know_is_a_503_to_retry() -> None:
    remote = RemoteError(code=grpc.StatusCode.UNIMPLEMENTED, message="Method not found!")

    response = remote_problem(remote, "/api/v1/lead-scoring-rules/r-1")
    body = json.loads(response.body)

    assert (body["status"], response.headers["Retry-After"]) == (503, "5")
    assert "Method not found" not in body["detail"] and "retry" in body["detail"]
