"""Input the services cannot take is a 422 naming the field, never a 500 (SPEC §3).

Regressions found by the fuzz test (test_fuzz.py): integers wider than the protobuf int32 the
gateway forwards them as, and text holding NUL characters, which PostgreSQL cannot store or
compare. The real app runs without upstreams: a request that gets past the gateway's validation
answers 503 (no service configured), one that does not answers 422."""

import json
from collections.abc import Iterator
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import grpc
import httpx
import pytest
from annotated_types import MaxLen
from crm.common.v1 import custom_fields_pb2
from crm.common.v1.custom_fields_pb2_grpc import CustomFieldServiceServicer, add_CustomFieldServiceServicer_to_server
from crm_platform.structs import INEXACT_INTEGER, unstorable_values
from fastapi import FastAPI
from gateway.conventions import FigureIn, MoneyIn
from gateway.inputs import INT32_MAX, INT32_MIN, RequestBody
from gateway.routers.sales import ImportRowBody
from gateway.security.runtime import _api_routes
from pydantic import BaseModel
from pydantic.fields import FieldInfo

pytestmark = pytest.mark.integration

STAGES = [
    {"key": "a", "name": "A", "probability": "10"},
    {"key": "w", "name": "W", "probability": "100", "outcome": "won"},
    {"key": "l", "name": "L", "probability": "0", "outcome": "lost"},
]


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
        "stages[0].rotting_days",
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
        ["stages[1].name"],
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
    ("POST", "/api/v1/accounts", '{"name": "ok", "custom": {"x": [1, 1e999]}}', ["custom.x[1]"]),
    ("POST", "/api/v1/tickets", {"subject": "s", "custom": {"x": float("-inf")}}, ["custom.x"]),
    ("POST", "/api/v1/opportunities", {"name": "o", "custom": {"x": 10**400}}, ["custom.x"]),
    # Held as a double, 2^53 + 1 would come back as 2^53: stored, it would be another number.
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"erp_id": 2**53 + 1}}, ["custom.erp_id"]),
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"x": [-(10**19)]}}, ["custom.x[0]"]),
    ("POST", "/api/v1/leads", {"name": "ok", "custom": {"x": float("inf")}}, ["custom.x"]),
]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


# A value nested deeper than a protobuf Struct carries failed building the upstream request (500).
TOO_DEEP = [
    ("POST", "/api/v1/accounts", {"name": "ok", "custom": {"x": nested(50)}}, "custom.x" + "[0]" * 30),
    ("POST", "/api/v1/leads", {"name": "ok", "custom": {"x": nested(31)}}, "custom.x" + "[0]" * 30),
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
    crowded = await client.post(url, json={"name": "Li", **{f"f{n}": "x" for n in range(120)}})
    assert crowded.status_code == 422 and [e["field"] for e in crowded.json()["errors"]] == ["body"]
    blank_key = await client.post(url, json={"name": "Li", " ": "x"})
    assert blank_key.status_code == 422 and [e["field"] for e in blank_key.json()["errors"]] == [" "]


def test_unstorable_values_walks_keys_values_and_lists() -> None:
    found = list(unstorable_values({"a": ["ok", "b\x00"], "c\x00": "x", "d": {"e": "\udc00"}, "n": 1}, ("body",)))
    assert found == [
        (("body", "a", 1), "must not contain NUL characters"),
        (("body",), "has a key that must not contain NUL characters"),
        (("body", "d", "e"), "is not valid UTF-8 text"),
    ]
    exact = {"e": 2**53, "f": -(2**53), "d": True, "g": 1e300}
    found = list(unstorable_values({"a": [1.5, float("nan")], "b": -(10**400), "c": 10**300, **exact}, ()))
    assert found == [
        (("a", 1), "must be a finite number (JSON has no NaN or Infinity)"),
        (("b",), "is out of range for a number"),
        (("c",), INEXACT_INTEGER),  # a double near it, not it
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
        ("/api/v1/pipelines", {"name": "p", "stages": stages("k" * 65)}, "stages[0].key"),
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


# --- money -----------------------------------------------------------------------------------------
# Refused before any service with the services' own rule (crm_platform.money): 1e400 or 40 digits
# overflowed the accounts' rounding (500) and were stored as Infinity or rounded in campaigns,
# 0.129 became 0.13, and any three letters passed for a currency.


def money(amount: str, currency: str = "CNY") -> dict[str, str]:
    return {"amount": amount, "currency": currency}


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/api/v1/accounts", {"name": "Big rev", "annual_revenue": money("1e400")}, "annual_revenue.amount"),
        ("POST", "/api/v1/accounts", {"name": "x", "credit_limit": money("1" * 40)}, "credit_limit.amount"),
        ("PATCH", "/api/v1/accounts/a-1", {"annual_revenue": money("0.129")}, "annual_revenue.amount"),
        ("POST", "/api/v1/accounts", {"name": "x", "annual_revenue": money("1", "ZZZ")}, "annual_revenue.currency"),
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("1e400")}, "cost.amount"),
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("0.129")}, "cost.amount"),
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("100", "ZZZ")}, "cost.currency"),
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("12.3456", "KWD")}, "cost.amount"),
        ("POST", "/api/v1/payments", {**payment("bank"), "amount": money("1e13")}, "amount.amount"),
        ("POST", "/api/v1/payments", {**payment("bank"), "amount": money("3546000000000.00")}, "amount.amount"),
        ("POST", "/api/v1/payments", {**payment("bank"), "amount": money("100", "RMB")}, "amount.currency"),
        # SPEC §3: a decimal string like "12500.00"; "1e5" was taken as 100000.00.
        ("POST", "/api/v1/opportunities", {"account_id": "a-1", "name": "x", "amount": money("1e5")}, "amount.amount"),
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("1E+5")}, "cost.amount"),
        ("POST", "/api/v1/leads/l-1/convert", {"opportunity": {"amount": money("1e5")}}, "opportunity.amount.amount"),
    ],
)
async def test_money_no_service_takes_is_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    response = await client.request(method, path, json=body)
    assert _fields(response) == [field]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("999999999999.99", "cny")}),
        ("POST", "/api/v1/payments", {**payment("bank"), "amount": money("0.1", "USD")}),
        ("POST", "/api/v1/payments", {**payment("bank"), "amount": money("100", "CNH")}),  # offshore renminbi
        ("POST", "/api/v1/campaigns", {"name": "x", "cost": money("12.345", "KWD")}),  # 1000 fils to the dinar
        # A company's figures are not summed: State Grid's revenue is above the cap on amounts.
        ("POST", "/api/v1/accounts", {"name": "State Grid", "annual_revenue": money("3546000000000.00")}),
        ("POST", "/api/v1/tickets", {"subject": "s", "account_id": "", "contact_id": ""}),  # "": none
    ],
)
async def test_money_every_service_takes_reaches_the_service(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    assert (await client.request(method, path, json=body)).status_code == 503  # the missing upstream


# --- request bodies: nothing dropped, coerced, blank, unbounded or contradicting the path ---------
# The regressions a black-box fuzz of the API found. The real app runs without upstreams: a request
# past the gateway's validation answers 503, one that is not answers 4xx.

ID = "00000000-0000-7000-8000-000000000000"
# The public web form intake keeps a form's other fields as the lead's custom data (SPEC §4).
EXTRAS_ARE_CUSTOM_DATA = {"POST /api/v1/webforms/{form_key}/submissions"}
# Not limited here on purpose: an import row's text (the sales service rejects a row alone, with
# the reason, rather than the whole file) and money, which MoneyIn validates.
LIMITED_ELSEWHERE = {ImportRowBody, MoneyIn, FigureIn}  # import rows by the service; money by its own rule


def body_models(app: FastAPI) -> list[tuple[str, type[BaseModel]]]:
    """("METHOD path", model) of every route that takes a JSON body."""
    found = []
    for path, methods, route in _api_routes(app):
        if route.body_field is None:
            continue
        annotation = route.body_field.field_info.annotation
        models = [arg for arg in (get_args(annotation) or (annotation,)) if arg is not type(None)]
        found += [(f"{method} {path}", model) for method in sorted(methods) for model in models]
    return found


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        for field in annotation.model_fields.values():
            yield from nested_models(field.annotation)
    else:
        for arg in get_args(annotation):
            yield from nested_models(arg)


def unlimited_text(annotation: Any, metadata: list[Any], where: str) -> Iterator[str]:
    """Where text without a `max_length` can go in a value of `annotation`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner, *extra = args
        more = [m for e in extra for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
        yield from unlimited_text(inner, [*metadata, *more], where)
    elif annotation is str:
        if not any(isinstance(m, MaxLen) for m in metadata):
            yield where
    elif origin in (Union, UnionType):
        for arg in args:
            yield from unlimited_text(arg, metadata, where)
    elif origin in (list, dict):  # the field's own limits count its items, not their length
        yield from unlimited_text(args[-1], [], f"{where}[]")
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in LIMITED_ELSEWHERE:
        for name, field in annotation.model_fields.items():
            yield from unlimited_text(field.annotation, field.metadata, f"{where}.{name}")


def test_every_json_body_refuses_unknown_fields_and_takes_values_as_json_gives_them(real_app: FastAPI) -> None:
    models = body_models(real_app)
    assert len(models) > 60
    for route, model in models:
        assert issubclass(model, RequestBody), route
        assert model.model_config.get("strict") is True, route
        assert model.model_config.get("extra") == ("allow" if route in EXTRAS_ARE_CUSTOM_DATA else "forbid"), route
        for nested in list(nested_models(model))[1:]:
            assert nested.model_config.get("extra") == "forbid", (route, nested)


def test_every_text_field_of_a_json_body_has_a_length_limit(real_app: FastAPI) -> None:
    models = body_models(real_app)
    assert [f"{route}: {where}" for route, model in models for where in unlimited_text(model, [], "")] == []


UNKNOWN_FIELDS = [
    ("POST", "/api/v1/api-keys", {"name": "k", "principal_id": "u", "roles": ["admin"], "scopes": ["read"]}, "scopes"),
    ("POST", "/api/v1/accounts:transfer", {"from_owner_id": "a", "to_owner_id": "b", "dry_run": True}, "dry_run"),
    ("POST", f"/api/v1/accounts/{ID}/activities", {"kind": "call", "minutes": 5}, "minutes"),
    ("POST", f"/api/v1/accounts/{ID}/merge", {"duplicate_id": "d", "keep": "d"}, "keep"),
    ("POST", f"/api/v1/accounts/{ID}/transfer", {"new_owner_id": "u", "notify": True}, "notify"),
    ("POST", f"/api/v1/accounts/{ID}/release", {"reason": "r", "cool_down": 1}, "cool_down"),
    ("POST", "/api/v1/reminder-rules", {"name": "r", "inactive_days": 3, "owner_id": "u"}, "owner_id"),
    ("POST", "/api/v1/segments", {"name": "s", "visibility": "team"}, "visibility"),
    ("POST", f"/api/v1/opportunities/{ID}/stage", {"stage": "won", "probability": "1"}, "probability"),
    ("POST", "/api/v1/custom-fields/account", {"key": "k", "label": "K", "type": "text", "unique": True}, "unique"),
    ("PUT", "/api/v1/custom-fields/account/k", {"key": "k", "label": "K", "type": "text", "unique": True}, "unique"),
    ("POST", f"/api/v1/quotes/{ID}/approve", {"comment": "ok", "role": "finance"}, "role"),
    ("POST", f"/api/v1/contracts/{ID}/terminate", {"reason": "r", "refund": True}, "refund"),
    ("POST", f"/api/v1/contracts/{ID}/sign", {"signed_by": "u"}, "signed_by"),
    ("POST", f"/api/v1/invoices/{ID}/issue", {"number": "N-1", "tax": "1"}, "tax"),
    (
        "POST",
        "/api/v1/opportunities/import",
        {"rows": [{"external_id": "e", "account_id": "a", "name": "n"}], "dry_run": True},
        "dry_run",
    ),
]


async def test_an_import_row_without_an_external_id_is_left_to_the_service_to_reject_alone(
    client: httpx.AsyncClient,
) -> None:
    """The sales service answers per row: a blank `external_id` must not refuse the whole file."""
    rows = [{"external_id": "", "account_id": "a", "name": "n"}, {"external_id": "e", "account_id": "a", "name": "n"}]
    response = await client.post("/api/v1/opportunities/import", json={"rows": rows})
    assert response.status_code == 503  # past the gateway's checks: the missing upstream


@pytest.mark.parametrize(("method", "path", "body", "field"), UNKNOWN_FIELDS)
async def test_an_unknown_body_field_is_422_naming_it_not_dropped(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    assert _fields(await client.request(method, path, json=body)) == [field]
    del body[field]
    # Past the gateway's checks: the missing upstream, or the gateway's own API key store.
    assert (await client.request(method, path, json=body)).status_code in (503, 201)


@pytest.mark.parametrize(
    ("path", "body", "field", "agrees"),
    [
        (f"/api/v1/accounts/{ID}/contacts", {"name": "Li", "account_id": "A2"}, "account_id", ID),
        ("/api/v1/custom-fields/account/erp_code", {"key": "other", "label": "ERP", "type": "text"}, "key", "erp_code"),
    ],
)
async def test_a_body_naming_another_record_than_the_path_is_422_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], field: str, agrees: str
) -> None:
    method = "PUT" if path.startswith("/api/v1/custom-fields") else "POST"
    assert _fields(await client.request(method, path, json=body)) == [field]
    assert (await client.request(method, path, json={**body, field: agrees})).status_code == 503


BLANK = [
    ("POST", f"/api/v1/accounts/{ID}/transfer", {"new_owner_id": "   "}, ["new_owner_id"]),
    (
        "POST",
        "/api/v1/accounts:transfer",
        {"from_owner_id": " ", "to_owner_id": "\t"},
        ["from_owner_id", "to_owner_id"],
    ),
    ("POST", "/api/v1/api-keys", {"name": "  ", "principal_id": "  ", "roles": ["admin"]}, ["name", "principal_id"]),
    ("POST", "/api/v1/tickets", {"subject": "Printer", "account_id": "   "}, ["account_id"]),
    ("POST", "/api/v1/accounts", {"name": "\u3000"}, ["name"]),  # an ideographic space
    ("POST", "/api/v1/segments", {"name": ""}, ["name"]),
    # A lead owned by nobody and out of the pool, or in a team nobody sees.
    ("POST", f"/api/v1/leads/{ID}/assign", {"owner_id": "   ", "team": " "}, ["owner_id", "team"]),
    ("PATCH", f"/api/v1/leads/{ID}", {"owner_id": "   "}, ["owner_id"]),
    ("POST", "/api/v1/leads", {"name": "Li", "team": "\t"}, ["team"]),
    # A web form may name no team ("") but not a blank one, whose leads nobody would see.
    ("POST", "/api/v1/webforms", {"name": "Expo", "team": " ", "region": "\t"}, ["team", "region"]),
    ("PATCH", f"/api/v1/webforms/{ID}", {"campaign_id": "  "}, ["campaign_id"]),
]


@pytest.mark.parametrize(("method", "path", "body", "fields"), BLANK)
async def test_a_required_value_of_only_whitespace_is_422_naming_it(
    client: httpx.AsyncClient, method: str, path: str, body: Any, fields: list[str]
) -> None:
    response = await client.request(method, path, json=body)
    assert _fields(response) == fields
    assert {error["message"] for error in response.json()["errors"]} == {"must not be blank"}


COERCED = [
    ("/api/v1/reminder-rules", {"name": "r", "inactive_days": True}, "inactive_days"),
    ("/api/v1/reminder-rules", {"name": "r", "inactive_days": "5"}, "inactive_days"),
    ("/api/v1/reminder-rules", {"name": "r", "inactive_days": 5.0}, "inactive_days"),
    ("/api/v1/reminder-rules", {"name": "r", "inactive_days": 5, "enabled": 1}, "enabled"),
    ("/api/v1/segments", {"name": "s", "shared_with_team": "yes"}, "shared_with_team"),
    ("/api/v1/tasks", {"title": "t", "due_at": 123}, "due_at"),  # it became 1970-01-01T00:02:03Z
    ("/api/v1/tasks", {"title": "t", "due_at": "123"}, "due_at"),
    ("/api/v1/tasks", {"title": "t", "due_at": "2030-01-01T09:00:00"}, "due_at"),  # no time zone: no instant
    (f"/api/v1/opportunities/{ID}/win", {"close_date": "2030-01-01T00:00:00Z"}, "close_date"),
    (f"/api/v1/tickets/{ID}/work-log", {"minutes": "30"}, "minutes"),
]


@pytest.mark.parametrize(("path", "body", "field"), COERCED)
async def test_a_value_of_another_json_type_is_422_naming_it_not_coerced(
    client: httpx.AsyncClient, path: str, body: Any, field: str
) -> None:
    assert _fields(await client.post(path, json=body)) == [field]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/tasks", {"title": "t", "due_at": "2030-01-01T09:00:00Z"}),
        ("/api/v1/tasks", {"title": "t", "due_at": "2030-01-01T09:00:00.250+08:00"}),
        (f"/api/v1/opportunities/{ID}/win", {"close_date": "2030-01-01"}),
        ("/api/v1/reminder-rules", {"name": "r", "inactive_days": 5, "enabled": False}),
        (
            "/api/v1/api-keys",
            {"name": "erp", "principal_id": "u", "roles": ["admin"], "expires_at": "2999-01-01T09:00Z"},
        ),
    ],
)
async def test_json_values_of_the_right_type_are_taken(client: httpx.AsyncClient, path: str, body: Any) -> None:
    assert (await client.post(path, json=body)).status_code in (201, 503)  # API keys live in the gateway


async def test_query_parameters_still_arrive_as_text_and_are_read_as_numbers(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/accounts", params={"limit": "10"})).status_code == 503


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/api/v1/reminder-rules", {"name": "x" * 201, "inactive_days": 3}, "name"),
        ("POST", "/api/v1/segments", {"name": "x" * 201}, "name"),
        ("PATCH", f"/api/v1/opportunities/{ID}", {"override_reason": "x" * 2001}, "override_reason"),
    ],
)
async def test_text_longer_than_its_field_takes_is_422_naming_it(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    assert _fields(await client.request(method, path, json=body)) == [field]


@pytest.mark.parametrize("if_match", ['"²"', '"' + "9" * 5000 + '"', '"1", "2"', "abc"])
async def test_a_malformed_if_match_is_422_naming_the_header(client: httpx.AsyncClient, if_match: str) -> None:
    body = {"key": "erp_code", "label": "ERP", "type": "text"}
    headers = {b"If-Match": if_match.encode("latin-1")}  # as HTTP carries "²": one byte, read as Latin-1
    response = await client.put("/api/v1/custom-fields/account/erp_code", json=body, headers=headers)
    assert _fields(response) == ["If-Match"]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b'{"name": "s"}', "text/plain"), (b"name=s", "application/x-www-form-urlencoded"), (b'{"name": "s"}', None)],
)
async def test_a_body_that_is_not_declared_json_is_415(
    client: httpx.AsyncClient, content: bytes, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/api/v1/segments", "/api/v1/webforms/abcdefgh123/submissions"):
        response = await client.post(path, content=content, headers=headers)
        assert response.status_code == 415, response.text
        assert response.headers["content-type"] == "application/problem+json"


async def test_a_json_syntax_error_is_400_naming_the_body_with_the_position_in_the_message(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/api/v1/segments", content=b'{"name": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["field"] == "body"
    assert "at character 9" in error["message"]


class FakeCustomFields(CustomFieldServiceServicer):
    """Lead custom field definitions as the leads service keeps them: `source_code` exists."""

    def __init__(self) -> None:
        self.upserts: list[custom_fields_pb2.UpsertCustomFieldRequest] = []

    async def ListCustomFields(self, request: custom_fields_pb2.ListCustomFieldsRequest, context: Any) -> Any:
        definition = custom_fields_pb2.CustomFieldDefinition(entity="lead", key="source_code", label="S", type="text")
        return custom_fields_pb2.ListCustomFieldsResponse(items=[definition])

    async def UpsertCustomField(self, request: custom_fields_pb2.UpsertCustomFieldRequest, context: Any) -> Any:
        self.upserts.append(request)
        return custom_fields_pb2.UpsertCustomFieldResponse(definition=request.definition)


async def test_if_match_star_updates_an_existing_definition_at_any_version_and_never_creates_one(
    role_client: Any,
) -> None:
    fake = FakeCustomFields()  # type: ignore[abstract]
    server = grpc.aio.server()
    add_CustomFieldServiceServicer_to_server(fake, server)  # type: ignore[abstract]  # serves two calls
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        admin = await role_client("admin", upstream=f"127.0.0.1:{port}")
        body = {"label": "Source", "type": "text"}
        missing = await admin.put("/api/v1/custom-fields/lead/campaign_code", json=body, headers={"If-Match": "*"})
        assert missing.status_code == 412, missing.text
        existing = await admin.put("/api/v1/custom-fields/lead/source_code", json=body, headers={"If-Match": "*"})
        assert existing.status_code == 200, existing.text
        assert [(u.definition.key, u.expected_version) for u in fake.upserts] == [("source_code", 0)]
    finally:
        await server.stop(None)


async def test_validation_messages_are_ours_without_pydantics_prefix(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/campaigns", json={"name": "x", "cost": money("0.129")})
    assert response.json()["errors"] == [{"field": "cost.amount", "message": "at most 2 decimal places"}]


@pytest.mark.parametrize("due_at", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+01:00"])
async def test_an_instant_outside_the_years_utc_holds_is_422_not_a_500(client: httpx.AsyncClient, due_at: str) -> None:
    response = await client.post("/api/v1/tasks", json={"title": "Call back", "due_at": due_at})
    assert _fields(response) == ["due_at"]


async def test_an_api_key_acts_as_a_user_id_as_long_as_the_services_store(
    client: httpx.AsyncClient, real_app_auth: Any
) -> None:
    body = {"name": "ERP", "principal_id": "u" * 65, "roles": ["sales_rep"]}
    response = await client.post("/api/v1/api-keys", json=body, headers=real_app_auth("admin"))
    assert _fields(response) == ["principal_id"]


STAGES_AS_READ = [
    {"key": key, "name": key.title(), "probability": "10", "position": position, "outcome": outcome}
    for position, (key, outcome) in enumerate([("lead", "open"), ("won", "won"), ("lost", "lost")])
]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/api/v1/pipelines/{ID}", {"name": "Default", "stages": STAGES_AS_READ}),
        (f"/api/v1/lead-scoring-rules/{ID}", {"id": ID, "version": 3, "name": "r", "points": 5, "field": "email",
                                             "operator": "present"}),
        (f"/api/v1/lead-assignment-rules/{ID}", {"id": ID, "version": 2, "name": "r", "user_ids": ["u-1"],
                                                 "capacity": 3}),
        ("/api/v1/sla-policies/high", {"priority": "high", "first_response_minutes": 60, "resolution_minutes": 480,
                                       "updated_at": "2026-12-05T10:00:00Z", "version": 2}),
    ],
)  # fmt: skip
async def test_a_record_as_read_may_be_put_back_with_the_fields_the_server_sets(
    client: httpx.AsyncClient, path: str, body: Any
) -> None:
    """Its id, version, times or a stage's position are ignored, not a 422: a client PUTs what it read."""
    assert (await client.put(path, json=body)).status_code == 503  # past the gateway's checks


@pytest.mark.parametrize("value", ["2026-01-01T00:00:00", "2026-01-01", "1700000000"])
@pytest.mark.parametrize(
    "path", ["/api/v1/leads?created_after=", "/api/v1/tickets?created_after=", "/api/v1/return-visits?due_before="]
)
async def test_a_time_in_a_query_names_its_zone_as_in_a_body(client: httpx.AsyncClient, path: str, value: str) -> None:
    """A time without a zone names no instant; epoch seconds are no RFC 3339 time."""
    name = path.rsplit("?", 1)[1].rstrip("=")
    assert _fields(await client.get(path + value)) == [name]


async def test_a_time_with_its_zone_is_taken_in_a_query(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/leads?created_after=2026-01-01T08:00:00%2B08:00")).status_code == 503
