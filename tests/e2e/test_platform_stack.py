"""The stack as a whole: every service healthy behind the gateway; errors are problem+json."""

import pytest
from crm_devstack.components import installed_services
from crm_devstack.stack import RunningStack

pytestmark = pytest.mark.e2e


async def test_readyz_reports_every_service_serving(stack: RunningStack) -> None:
    async with stack.client() as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    dependencies = response.json()["dependencies"]
    expected = {service.name.replace("-", "_") for service in installed_services()}
    assert set(dependencies) == expected
    assert set(dependencies.values()) == {"SERVING"}


async def test_every_response_carries_a_request_id_and_errors_are_problem_json(stack: RunningStack) -> None:
    async with stack.client() as client:
        response = await client.get("/api/v1/no-such-route", headers={"X-Request-ID": "trace-me-1"})
    assert response.headers["x-request-id"] == "trace-me-1"
    assert response.status_code in (401, 404)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
