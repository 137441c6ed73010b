"""Input the services cannot take is a 422 naming the field, never a 500 (SPEC §3).

Regressions found by the fuzz test (test_fuzz.py): integers wider than the protobuf int32 the
gateway forwards them as, and text holding NUL characters, which PostgreSQL cannot store or
compare. The real app runs without upstreams: a request that gets past the gateway's validation
answers 503 (no service configured), one that does not answers 422."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from crm_platform.structs import unstorable_values
from fastapi import FastAPI
from gateway.inputs import INT32_MAX, INT32_MIN

pytestmark = pytest.mark.integration

STAGES = [
    {"key": "a", "name": "A", "probability": "10"},
    {"key": "w", "name": "W", "probability": "100", "outcome": "won"},
    {"key": "l", "name": "L", "probability": "0", "outcome": "lost"},
]


@pytest.fixture
async def client(real_app: FastAPI, real_app_auth: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=real_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers=real_app_auth("admin")
    ) as http:
        yield http


def _fields(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [error["field"] for error in response.json()["errors"]]


# Integers beyond int32 failed to build the upstream request (ValueError -> 500).
OUT_OF_RANGE = [
    ("POST", "/api/v1/reminder-rules", {"name": "r", "inactive_days": 2_575_137_457}, "inactive_days"),
    (
        "POST",
        "/api/v1/reminder-rules",
        {"name": "r", "inactive_days": 3, "due_in_hours": 429_080_382_574},
        "due_in_hours",
    ),
    (
        "POST",
        "/api/v1/pipelines",
        {"name": "p", "stages": [{**STAGES[0], "rotting_days": 100_000_000_000}, *STAGES[1:]]},
        "stages.0.rotting_days",
    ),
    ("POST", "/api/v1/leads/import?part=310583695289489856", None, "part"),
    ("PUT", "/api/v1/lead-scoring-rules/%C2%87", {"name": "a", "points": 9_226_973_012_463_422}, "points"),
    ("POST", "/api/v1/lead-scoring-rules", {"name": "a", "points": 1, "min_count": INT32_MAX + 1}, "min_count"),
    ("POST", "/api/v1/lead-assignment-rules", {"name": "a", "user_ids": ["u"], "position": 7_576_044_293}, "position"),
    ("PUT", "/api/v1/lead-assignment-rules/0", {"name": "a", "user_ids": ["u"], "min_score": 134_217_728}, "min_score"),
    ("PUT", "/api/v1/lead-assignment-rules/x", {"name": "a", "user_ids": ["u"], "capacity": -20_213_561}, "capacity"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), OUT_OF_RANGE)
async def test_out_of_range_integers_are_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    assert _fields(await client.request(method, path, json=body)) == [field]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/lead-assignment-rules", {"name": "a", "user_ids": ["u"], "position": INT32_MIN}),
        ("POST", "/api/v1/lead-assignment-rules", {"name": "a", "user_ids": ["u"], "capacity": INT32_MAX}),
        ("POST", "/api/v1/reminder-rules", {"name": "r", "inactive_days": 3650, "due_in_hours": 8760}),
        ("POST", "/api/v1/pipelines", {"name": "p", "stages": [{**STAGES[0], "rotting_days": 3650}, *STAGES[1:]]}),
    ],
)
async def test_the_widest_accepted_values_reach_the_service(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    assert (await client.request(method, path, json=body)).status_code == 503  # the missing upstream


# Text with NUL characters reached PostgreSQL (-> INTERNAL -> 500), in any service.
UNSTORABLE = [
    ("GET", "/api/v1/forecast/win-statistics?to=0492-03-03&team=r%00%C3%A9", None, ["team"]),
    ("GET", "/api/v1/accounts?region=x&region=b%00", None, ["region"]),
    ("GET", "/api/v1/accounts/a%00b", None, ["account_id"]),
    ("POST", "/api/v1/reminder-rules", {"name": "n\x00", "inactive_days": 3}, ["name"]),
    (
        "POST",
        "/api/v1/pipelines",
        {"name": "p", "stages": [STAGES[0], {**STAGES[1], "name": "\x00"}, STAGES[2]]},
        ["stages.1.name"],
    ),
    ("POST", "/api/v1/opportunities/import", {"pipeline_id": "a\x00", "rows": []}, ["pipeline_id"]),
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"k\x00": "v", "note": "\ud800"}}, ["custom", "custom.note"]),
]


@pytest.mark.parametrize(("method", "path", "body", "fields"), UNSTORABLE)
async def test_unstorable_text_is_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: Any, fields: list[str]
) -> None:
    # Encoded here: httpx cannot encode a lone surrogate, JSON escapes it (`"\\ud800"`).
    content = json.dumps(body) if body is not None else None
    response = await client.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert _fields(response) == fields


# NaN, Infinity and 1e999 (Infinity to Python's parser) in `custom` failed the service's JSON
# conversion (-> INTERNAL -> 500); so did an integer no double can hold.
NOT_A_JSON_NUMBER = [
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"x": float("nan")}}, ["custom.x"]),
    ("POST", "/api/v1/accounts", '{"name": "ok", "custom": {"x": [1, 1e999]}}', ["custom.x.1"]),
    ("POST", "/api/v1/tickets", {"subject": "s", "custom": {"x": float("-inf")}}, ["custom.x"]),
    ("POST", "/api/v1/opportunities", {"name": "o", "custom": {"x": 10**400}}, ["custom.x"]),
    ("POST", "/api/v1/leads", {"name": "ok", "custom": {"x": float("inf")}}, ["custom.x"]),
]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


# A value nested deeper than a protobuf Struct carries failed building the upstream request (500).
TOO_DEEP = [
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"x": nested(50)}}, "custom.x" + ".0" * 30),
    ("POST", "/api/v1/leads", {"name": "ok", "custom": {"x": nested(31)}}, "custom.x" + ".0" * 30),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), TOO_DEEP)
async def test_values_nested_too_deep_are_422_naming_where(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    assert _fields(await client.request(method, path, json=body)) == [field]


async def test_values_nested_as_deep_as_allowed_reach_the_service(client: httpx.AsyncClient) -> None:
    body = {"name": "ok", "custom": {"x": nested(30)}}
    assert (await client.post("/api/v1/accounts", json=body)).status_code == 503  # the missing upstream


@pytest.mark.parametrize(("method", "path", "body", "fields"), NOT_A_JSON_NUMBER)
async def test_numbers_json_does_not_have_are_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: Any, fields: list[str]
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = await client.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert _fields(response) == fields


async def test_security_answers_before_text_validation(client: httpx.AsyncClient, real_app_auth: Any) -> None:
    body = {"name": "n\x00", "inactive_days": 3}
    unauthenticated = await client.post("/api/v1/reminder-rules", json=body, headers={"Authorization": ""})
    assert unauthenticated.status_code == 401
    forbidden = await client.post("/api/v1/reminder-rules", json=body, headers=real_app_auth("sales_rep"))
    assert forbidden.status_code == 403


async def test_the_public_webform_intake_refuses_nul_characters(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/webforms/abcdefgh123/submissions", json={"name": "x\x00"})
    assert response.status_code == 422 and "NUL" in response.text


async def test_the_public_webform_intake_refuses_what_it_would_otherwise_drop_or_mangle(
    client: httpx.AsyncClient,
) -> None:
    """A form field too long to keep, or one that is not a single value, is a 422 naming it; it used
    to be dropped silently (too long) or kept as a Python repr (an object or a list)."""
    url = "/api/v1/webforms/abcdefgh123/submissions"
    too_long = await client.post(url, json={"name": "Li", "notes": "x" * 2001})
    nested = await client.post(url, json={"name": "Li", "interests": ["robots", "drones"], "utm": {"source": "x"}})
    assert too_long.status_code == 422 and nested.status_code == 422
    assert [e["field"] for e in too_long.json()["errors"]] == ["notes"]
    assert sorted(e["field"] for e in nested.json()["errors"]) == ["interests", "utm"]


def test_unstorable_values_walks_keys_values_and_lists() -> None:
    found = list(unstorable_values({"a": ["ok", "b\x00"], "c\x00": "x", "d": {"e": "\udc00"}, "n": 1}, ("body",)))
    assert found == [
        (("body", "a", 1), "must not contain NUL characters"),
        (("body",), "has a key that must not contain NUL characters"),
        (("body", "d", "e"), "is not valid UTF-8 text"),
    ]
    found = list(unstorable_values({"a": [1.5, float("nan")], "b": -(10**400), "c": 10**300, "d": True}, ()))
    assert found == [
        (("a", 1), "must be a finite number (JSON has no NaN or Infinity)"),
        (("b",), "is out of range for a number"),
    ]


# --- sales text in sized columns -------------------------------------------------------------------
# Too long, it reached PostgreSQL and failed with a 500. An import row's `external_id` is not limited
# here on purpose: the sales service rejects that row alone (per-row results), not the whole file.
# A request past the gateway's checks answers 503 here (the real app runs without upstreams).


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
