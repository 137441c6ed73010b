"""gRPC refuses an answer whose trailers outgrow its metadata limit with its own RESOURCE_EXHAUSTED,
the code of a service's rate limit. The gateway answers that as the upstream failure it is (502,
nothing of the transport's text), never as 429 "Too Many Requests" inviting a retry that fails
the same way. Real routes, against a fake leads service that sends such an error."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from crm.leads.v1 import leads_service_pb2 as leads_pb
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceServicer, add_LeadsServiceServicer_to_server
from gateway.testing import RoleClient, serving

pytestmark = pytest.mark.integration


class OversizedErrors(LeadsServiceServicer):
    """Refuses every lead id with a message quoting it, unbounded, as the services once did."""

    async def GetLead(self, request: leads_pb.GetLeadRequest, context: Any) -> Any:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"lead_id: {request.lead_id!r} is not an id" * 4)


@pytest.fixture
async def leads_target() -> AsyncIterator[str]:
    # Serves one call.
    async with serving(lambda server: add_LeadsServiceServicer_to_server(OversizedErrors(), server)) as target:  # type: ignore[abstract]
        yield target


async def test_a_metadata_overflow_is_a_bad_gateway_not_a_rate_limit(
    role_client: RoleClient, leads_target: str
) -> None:
    http = await role_client("admin", upstream=leads_target)
    response = await http.get(f"/api/v1/leads/{'a' * 5000}")

    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "retry-after" not in response.headers
    body = response.json()
    assert (body["title"], body["detail"]) == ("Bad Gateway", "internal error")
    assert "metadata" not in response.text and "limit" not in response.text
