"""A call to a service that is down answers 503 with Retry-After, saying a service is unavailable:
never gRPC's own text, which names internal hosts and ports. Real routes, nothing listening."""

import socket

import pytest
from gateway.errors import RETRY_AFTER_SECONDS
from gateway.testing import RoleClient

pytestmark = pytest.mark.integration


async def test_a_route_whose_service_is_down_is_a_503_naming_no_host(role_client: RoleClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{probe.getsockname()[1]}"  # closed again with the probe: nothing listens there
    http = await role_client("admin", upstream=down)

    response = await http.get("/api/v1/leads")

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == RETRY_AFTER_SECONDS
    assert response.json()["detail"] == "an upstream service is unavailable"
    assert "127.0.0.1" not in response.text
