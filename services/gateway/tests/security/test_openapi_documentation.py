"""The gateway's OpenAPI document (`/openapi.json`, shown at `/docs`) says what each route can
answer: an error response only where it can happen (`security.runtime._problem_responses`), every
route's answers with their schemas, and what every parameter of the lead routes means."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI

pytestmark = pytest.mark.integration

SUBMISSIONS = "/api/v1/webforms/{form_key}/submissions"
LEAD_ROUTES = ("/api/v1/leads", "/api/v1/lead-", "/api/v1/campaigns", "/api/v1/webforms")


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield method, path, operation


def _headers(operation: dict[str, Any]) -> set[str]:
    return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}


def test_412_is_documented_exactly_on_the_routes_that_take_if_match(real_app: FastAPI) -> None:
    schema = real_app.openapi()
    for method, path, operation in _operations(schema):
        assert ("412" in operation["responses"]) == ("If-Match" in _headers(operation)), (method, path)


def test_409_is_never_documented_on_a_read(real_app: FastAPI) -> None:
    reads = [(path, operation) for method, path, operation in _operations(real_app.openapi()) if method == "get"]
    assert reads
    assert [path for path, operation in reads if "409" in operation["responses"]] == []


def test_413_is_documented_exactly_on_the_routes_that_take_a_body(real_app: FastAPI) -> None:
    for method, path, operation in _operations(real_app.openapi()):
        assert ("413" in operation["responses"]) == ("requestBody" in operation), (method, path)


def test_every_error_response_is_a_problem(real_app: FastAPI) -> None:
    for method, path, operation in _operations(real_app.openapi()):
        for code, response in operation["responses"].items():
            if code.startswith(("4", "5")):
                assert list(response["content"]) == ["application/problem+json"], (method, path, code)


def test_the_public_form_intake_documents_its_rate_limit_and_body_limit_and_no_conflict(real_app: FastAPI) -> None:
    responses = real_app.openapi()["paths"][SUBMISSIONS]["post"]["responses"]

    assert {"202", "413", "429"} <= set(responses)
    assert not {"401", "403", "409", "412"} & set(responses)
    assert "rate_limit_per_minute" in responses["429"]["description"]


def test_a_lead_write_documents_its_conflicts(real_app: FastAPI) -> None:
    paths = real_app.openapi()["paths"]

    assert "DUPLICATE" in paths["/api/v1/leads"]["post"]["responses"]["409"]["description"]
    assert "CLAIM_LIMIT" in paths["/api/v1/leads/{lead_id}/claim"]["post"]["responses"]["409"]["description"]
    assert {"409", "412"} <= set(paths["/api/v1/leads/{lead_id}"]["patch"]["responses"])
    problem = real_app.openapi()["components"]["schemas"]["Problem"]["properties"]
    assert {"reason", "existing_id", "current_version"} <= set(problem)


def test_every_json_answer_of_every_route_has_a_schema(real_app: FastAPI) -> None:
    untyped = []
    answers = 0
    for method, path, operation in _operations(real_app.openapi()):
        for code, response in operation["responses"].items():
            for kind, content in response.get("content", {}).items() if code.startswith("2") else ():
                answers += kind == "application/json"
                if kind == "application/json" and set(content["schema"]) != {"$ref"}:
                    untyped.append((method, path, code))
    assert answers > 140
    assert untyped == []


def test_a_report_documents_its_json_and_its_csv_answer(real_app: FastAPI) -> None:
    content = real_app.openapi()["paths"]["/api/v1/reports/sales-funnel"]["get"]["responses"]["200"]["content"]

    assert set(content) == {"application/json", "text/csv"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/SalesFunnel"}


def test_a_lead_create_documents_the_created_and_the_merged_answer(real_app: FastAPI) -> None:
    responses = real_app.openapi()["paths"]["/api/v1/leads"]["post"]["responses"]

    for code in ("201", "200"):
        assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Lead"}
    assert "X-Merged-Into" in responses["200"]["headers"]


def test_the_import_documents_its_file_and_every_parameter(real_app: FastAPI) -> None:
    operation = real_app.openapi()["paths"]["/api/v1/leads/import"]["post"]
    body = operation["requestBody"]

    assert set(body["content"]) == {"text/csv", "application/json", "application/x-ndjson"}
    assert "CRM_GATEWAY_MAX_BODY_BYTES" in body["description"] and "charset" in body["description"]
    names = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert {"format", "import_key", "column_map", "source_map", "report_accepted", "part", "final"} <= names
    assert [p["name"] for p in operation["parameters"] if not p.get("description")] == []


def test_every_parameter_of_the_lead_routes_is_described(real_app: FastAPI) -> None:
    bare = [
        (method, path, parameter["name"])
        for method, path, operation in _operations(real_app.openapi())
        if path.startswith(LEAD_ROUTES)
        for parameter in operation.get("parameters", [])
        if parameter["in"] != "path" and not parameter.get("description")
    ]
    assert bare == []


def test_the_lead_list_parameters_say_what_they_take(real_app: FastAPI) -> None:
    paths = real_app.openapi()["paths"]
    leads = {p["name"]: p["description"] for p in paths["/api/v1/leads"]["get"]["parameters"]}
    summary = {p["name"]: p["description"] for p in paths["/api/v1/leads/summary"]["get"]["parameters"]}

    assert "`me`" in leads["owner_id"]
    assert "repeat" in leads["status"] and "repeat" in leads["source"]
    assert "in clear" in leads["q"]
    assert all(group in summary["group_by"] for group in ("source", "source_detail", "owner_id", "campaign_id"))


def test_the_write_headers_are_described_wherever_a_route_takes_them(real_app: FastAPI) -> None:
    found = 0
    for _, _, operation in _operations(real_app.openapi()):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "header" and parameter["name"] in ("If-Match", "Idempotency-Key"):
                found += 1
                assert parameter.get("description"), parameter["name"]
    assert found > 0
