"""Rate limits per principal (429 + Retry-After), export rate limit, body size (413), page size
cap, CORS from configuration, and no stack traces in error responses."""

from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from gateway.security.audit import AuditQuery
from gateway.security.rate_limit import RateLimiter

pytestmark = pytest.mark.integration


async def test_rate_limit_is_per_principal_with_retry_after(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(rate_limit_per_second=0.5, rate_limit_burst=3)
    alice = auth_headers("sales_rep", sub="alice")
    statuses = [(await gateway.client.get("/api/v1/me", headers=alice)).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = await gateway.client.get("/api/v1/me", headers=alice)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["content-type"].startswith("application/problem+json")
    # Another principal has a bucket of its own.
    bob = auth_headers("sales_rep", sub="bob")
    assert (await gateway.client.get("/api/v1/me", headers=bob)).status_code == 200


async def test_failed_authentications_are_limited_per_client(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(auth_failure_rate_per_second=0.1, auth_failure_burst=3)
    bad = {"Authorization": "Bearer not-a-token"}
    statuses = [(await gateway.client.get("/api/v1/me", headers=bad)).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    # Only the failures that were answered 401 are audited; a valid caller is unaffected.
    denied, _ = await gateway.runtime.audit.query(AuditQuery(action="denied"))
    assert len(denied) == 3
    assert (await gateway.client.get("/api/v1/me", headers=auth_headers("admin"))).status_code == 200


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_second=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("k") for _ in range(3)] == [0, 0, 1]
    now[0] += 0.5
    assert limiter.acquire("k") == 0
    assert limiter.acquire("k") == 1
    assert limiter.acquire("other") == 0


async def test_exports_have_their_own_rate_limit(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(export_rate_limit_per_minute=1, export_rate_limit_burst=2)
    admin = auth_headers("admin")
    statuses = [(await gateway.client.get("/api/v1/exports/leads", headers=admin)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    # Ordinary reads are not affected.
    assert (await gateway.client.get("/api/v1/fake/leads", headers=admin)).status_code == 200


async def test_body_size_limit(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(max_body_bytes=1000)
    admin = auth_headers("admin")
    small = await gateway.client.post("/api/v1/fake/leads", json={"name": "x"}, headers=admin)
    assert small.status_code == 201
    large = await gateway.client.post("/api/v1/fake/leads", json={"name": "x" * 2000}, headers=admin)
    assert large.status_code == 413
    assert large.headers["content-type"].startswith("application/problem+json")

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 500

    # No Content-Length: the bytes received are counted.
    streamed = await gateway.client.post(
        "/api/v1/fake/leads", content=chunks(), headers={**admin, "content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert gateway.store.records.get("leads", {}).keys() == {small.json()["id"]}


async def test_page_size_is_capped(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(max_page_size=5)
    for number in range(12):
        gateway.store.put("leads", {"id": f"l{number}", "owner_id": "x"})
    admin = auth_headers("admin")
    assert len((await gateway.client.get("/api/v1/fake/leads?limit=100", headers=admin)).json()["items"]) == 5
    assert len((await gateway.client.get("/api/v1/fake/leads?limit=3", headers=admin)).json()["items"]) == 3
    assert len((await gateway.client.get("/api/v1/fake/leads", headers=admin)).json()["items"]) == 5


async def test_cors_from_configuration(make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(cors_origins=["https://app.example"])
    preflight = await gateway.client.options(
        "/api/v1/me",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            # A frontend traced with OpenTelemetry sends the W3C trace context on every call.
            "Access-Control-Request-Headers": "authorization, idempotency-key, traceparent, tracestate",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = await gateway.client.options(
        "/api/v1/me", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in other.headers
    simple = await gateway.client.get("/api/v1/me", headers={"Origin": "https://app.example", **auth_headers("admin")})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    # What a merge answers with, what conditional writes and retries need, a report CSV's next page,
    # an export's file name and row limit, a replay's mark and a 405's methods are readable by the page.
    exposed = {h.strip().lower() for h in simple.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "retry-after", "x-request-id", "location", "x-merged-into", "link"} <= exposed
    assert {"content-disposition", "x-export-row-limit", "idempotent-replayed", "allow"} <= exposed


async def test_no_cors_headers_without_configuration(gateway: Any, auth_headers: Any) -> None:
    response = await gateway.client.get(
        "/api/v1/me", headers={"Origin": "https://app.example", **auth_headers("admin")}
    )
    assert "access-control-allow-origin" not in response.headers


async def test_unexpected_errors_have_no_stack_trace(gateway: Any, auth_headers: Any) -> None:
    app: FastAPI = gateway.app
    router = APIRouter()

    @router.get("/api/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/app.py line 42")

    app.include_router(router)
    # As a server would: the app's answer, not the exception re-raised for the test client.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/api/v1/boom", headers=auth_headers("admin"))
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "secret internals" not in response.text and "Traceback" not in response.text
