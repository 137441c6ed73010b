"""A service's RESOURCE_EXHAUSTED becomes 429 with the service's own wait as Retry-After, when it
sent one in the `retry-after` trailer (the leads web form limit sends the rest of its minute);
otherwise the gateway's default wait. Real routes, against a fake leads service."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from gateway.errors import RETRY_AFTER_SECONDS
from gateway.testing import RoleClient, serving

pytestmark = pytest.mark.integration

# Form key -> the retry-after trailer the fake service sends with its refusal (None: no trailer).
TRAILERS = {"form-waits-42": "42", "form-no-trailer": None, "form-says-soon": "soon", "form-negative": "-3"}


class FullWebforms(LeadsServiceServicer):
    """Every submission is over the form's limit; the refusal is made as the leads service makes it."""

    async def SubmitWebform(self, request: leads_pb.SubmitWebformRequest, context: Any) -> Any:
        trailer = TRAILERS[request.form_key]
        if trailer is not None:
            context.set_trailing_metadata((("retry-after", trailer),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many submissions for this form")


@pytest.fixture
async def leads_target() -> AsyncIterator[str]:
    # Serves one call.
    async with serving(lambda server: add_LeadsServiceServicer_to_server(FullWebforms(), server)) as target:  # type: ignore[abstract]
        yield target


async def submit(role_client: RoleClient, leads_target: str, form_key: str) -> Any:
    http = await role_client("admin", upstream=leads_target)  # the intake is public: the token plays no part
    return await http.post(f"/api/v1/webforms/{form_key}/submissions", json={"name": "Li", "email": "li@example.com"})


async def test_the_services_wait_becomes_retry_after(role_client: RoleClient, leads_target: str) -> None:
    response = await submit(role_client, leads_target, "form-waits-42")

    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "42"
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"] == "too many submissions for this form"


@pytest.mark.parametrize("form_key", ["form-no-trailer", "form-says-soon", "form-negative"])
async def test_without_a_wait_in_seconds_the_default_stays(
    role_client: RoleClient, leads_target: str, form_key: str
) -> None:
    response = await submit(role_client, leads_target, form_key)

    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == RETRY_AFTER_SECONDS
