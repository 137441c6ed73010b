"""Every list and export route checks its filters as the declared fields they filter by: filtering
by a field the caller does not read in clear is a 403 naming that field, before any service is
called (no service runs here: a request past the checks answers 503)."""

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from gateway.security.access import filtered_fields
from gateway.security.exports import _sources
from gateway.security.policy import load_policy
from gateway.testing import RoleClient, grant_fields

pytestmark = pytest.mark.integration


Client = Callable[[str, dict[str, Any]], Awaitable[httpx.AsyncClient]]


@pytest.fixture
def client(role_client: RoleClient) -> Client:
    """`await client(role, {resource: {field: rule}})`: the real gateway, without services, for one
    role whose grants give those rules."""

    async def make(role: str, rules: dict[str, Any]) -> httpx.AsyncClient:
        return await role_client(role, *(grant_fields(role, resource, **fields) for resource, fields in rules.items()))

    return make


@pytest.mark.parametrize(
    ("role", "resource", "field", "path", "params"),
    [
        ("sales_rep", "accounts", "tags", "/account-pool", {"tag": "vip"}),
        ("sales_rep", "accounts", "tier", "/account-pool", {"tier": "A"}),
        ("sales_rep", "accounts", "name", "/account-pool", {"q": "Ini"}),
        ("finance", "payments", "contract_id", "/payments", {"account_id": "acc-1"}),
        ("finance", "invoices", "status", "/invoices", {"status": "issued"}),
        ("finance", "contracts", "account_id", "/receivables", {"account_id": "acc-1"}),
        ("sales_rep", "tasks", "status", "/leads/l-1/tasks", {"status": "open"}),
        ("sales_rep", "contacts", "name", "/contacts", {"q": "Li"}),
        ("sales_rep", "tasks", "account_id", "/tasks", {"account_id": "acc-1"}),
        ("sales_manager", "leads", "tags", "/exports/leads", {"tag": "vip"}),
        ("sales_manager", "accounts", "tags", "/exports/accounts", {"tag": "vip"}),
        ("finance", "payments", "contract_id", "/exports/payments", {"account_id": "acc-1"}),
    ],
)
async def test_filtering_by_a_hidden_field_is_403(
    client: Client, role: str, resource: str, field: str, path: str, params: dict[str, str]
) -> None:
    allowed = await client(role, {})
    hidden = await client(role, {resource: {field: "hidden"}})

    passes = await allowed.get(f"/api/v1{path}", params=params)
    refused = await hidden.get(f"/api/v1{path}", params=params)

    assert passes.status_code == 503, passes.text  # past the checks, to the missing service
    assert refused.status_code == 403, refused.text
    assert refused.json()["errors"][0]["field"] == field


def test_export_filters_are_checked_as_declared_fields() -> None:
    """Filters are named after the services' request fields (`tag`); each must be checked as the
    field it filters by (`tags`), never as an undeclared name that would fall back to the default
    rule. Reports declare no fields: their filters are not fields of a record."""
    policy = load_policy()  # the real sources are registered by importing gateway.app
    undeclared = {
        f"{resource}.{name}": sorted(set(filtered_fields(source.fields, name)) - set(policy.resource(resource).fields))
        for resource, source in _sources.items()
        if policy.resource(resource).fields
        for name in source.filters
        if set(filtered_fields(source.fields, name)) - set(policy.resource(resource).fields)
    }
    assert undeclared == {}
