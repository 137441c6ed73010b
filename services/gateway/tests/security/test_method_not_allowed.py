"""A method a path does not serve is a 405 whose `Allow` names every method the path does serve
(RFC 9110 §15.5.6), not only those of the first route found for it."""

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/leads", "GET, POST"),
        ("PUT", "/api/v1/leads/L1", "DELETE, GET, PATCH"),
        ("GET", "/api/v1/leads/L1/assign", "POST"),
    ],
)
async def test_a_405_allows_every_method_of_its_path(
    real_app: FastAPI, real_app_auth: Any, method: str, path: str, allowed: str
) -> None:
    transport = httpx.ASGITransport(app=real_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.request(method, path, headers=real_app_auth("admin"))

    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == allowed
    assert response.headers["content-type"].startswith("application/problem+json")
