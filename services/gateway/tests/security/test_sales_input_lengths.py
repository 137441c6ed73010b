"""Sales text the service stores in sized columns is refused at the gateway when it is too long:
422 naming the field, where it reached PostgreSQL and failed with a 500. The real app runs without
upstreams: a request that gets past the gateway's validation answers 503 (no service configured).

An import row's `external_id` is not limited here on purpose: the sales service rejects that row
alone and imports the others (per-row results), instead of the gateway refusing the whole file."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

pytestmark = pytest.mark.integration


def stages(key: str) -> list[dict[str, str]]:
    return [
        {"key": key, "name": "A", "probability": "10"},
        {"key": "w", "name": "W", "probability": "100", "outcome": "won"},
        {"key": "l", "name": "L", "probability": "0", "outcome": "lost"},
    ]


def payment(method: str) -> dict[str, Any]:
    return {
        "contract_id": "c-1",
        "amount": {"amount": "1.00", "currency": "CNY"},
        "external_reference": "BANK-1",
        "method": method,
    }


@pytest.fixture
async def client(real_app: FastAPI, real_app_auth: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=real_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers=real_app_auth("admin")
    ) as http:
        yield http


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/payments", payment("m" * 65), "method"),
        ("/api/v1/pipelines", {"name": "p", "stages": stages("k" * 65)}, "stages.0.key"),
    ],
)
async def test_sales_text_longer_than_its_column_is_422_naming_the_field(
    client: httpx.AsyncClient, path: str, body: Any, field: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/payments", payment("m" * 64)),
        ("/api/v1/pipelines", {"name": "p", "stages": stages("k" * 64)}),
    ],
)
async def test_sales_text_as_long_as_its_column_reaches_the_service(
    client: httpx.AsyncClient, path: str, body: Any
) -> None:
    assert (await client.post(path, json=body)).status_code == 503  # the missing upstream
