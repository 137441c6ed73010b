"""Field-level rules through the HTTP API: per role the response keys are exactly the readable
fields, masked values are masked, and writing a protected field is a 403 that changes nothing."""

import copy
import csv
import io
import json
from collections.abc import Iterable
from typing import Any

import pytest
from crm.common.v1 import common_pb2
from crm.sales.v1 import sales_pb2, sales_service_pb2
from crm_platform.principal import Principal
from gateway.routers.custom_fields import RESOURCE_ENTITIES
from gateway.routers.sales import receivables_view
from gateway.security import Access, Policy
from gateway.security.exports import csv_cell
from gateway.security.masking import mask_value
from gateway.security.policy import FieldRule, FieldSpec, load_policy, parse_policy
from gateway.testing import default_policy_document, policy_text
from starlette.requests import Request

pytestmark = pytest.mark.integration

POLICY = load_policy()
ME, TEAM, REGION = "u-me", "team-a", "north"


def sample(name: str, spec: FieldSpec | None) -> Any:
    kind = spec.type if spec else "text"
    return {
        "phone": "13812345678",
        "email": "john.doe@example.com",
        "money": {"amount": "12500.00", "currency": "CNY"},
        "number": 7,
        "decimal": "1.5",
        "percent": "12.5",
        "date": "2026-11-23",
        "datetime": "2026-11-23T10:00:00Z",
        "bool": True,
        "url": "https://example.com",
        "list": ["a", "b"],
        "object": {"k": "v"},
        "id": f"{name}-1",
    }.get(kind, f"{name} value")


def full_record(resource: str) -> dict[str, Any]:
    spec = POLICY.resource(resource)
    record = {name: sample(name, field) for name, field in spec.fields.items() if "." not in name}
    nested = {name.split(".", 1)[0] for name in spec.fields if "." in name}
    for parent in nested:
        record[parent] = [
            {
                child.split(".", 1)[1]: sample(child, spec.fields[child])
                for child in spec.fields
                if child.startswith(parent + ".")
            }
        ]
    record.update({"id": f"{resource}-mine", "owner_id": ME, "team": TEAM, "region": REGION})
    return record


def principal(role: str) -> Principal:
    return Principal(user_id=ME, roles=(role,), team=TEAM, region=REGION)


READ_CELLS = [
    (role, resource)
    for role in POLICY.roles
    for resource in POLICY.resources
    if POLICY.decide(principal(role), resource, "read").allowed and POLICY.resource(resource).fields
]


@pytest.mark.parametrize("role", POLICY.roles)
async def test_response_keys_are_exactly_the_readable_fields(role: str, make_gateway: Any, auth_headers: Any) -> None:
    gateway = await make_gateway(policy=POLICY)
    headers = auth_headers(role, sub=ME, team=TEAM, region=REGION)
    checked = 0
    for cell_role, resource in READ_CELLS:
        if cell_role != role:
            continue
        record = gateway.store.put(resource, full_record(resource))
        decision = POLICY.decide(principal(role), resource, "read")
        response = await gateway.client.get(f"/api/v1/fake/{resource}/{record['id']}", headers=headers)
        assert response.status_code == 200, (resource, response.text)
        body = response.json()
        readable = {name for name in record if decision.read_rule(name) is not FieldRule.HIDDEN}
        assert set(body) == readable, (role, resource, set(body) ^ readable)
        for name in readable:
            rule = decision.read_rule(name)
            field = POLICY.resource(resource).field(name)
            if rule is FieldRule.MASKED:
                assert body[name] == mask_value(record[name], field.type), (role, resource, name)
                assert body[name] != record[name]
            elif isinstance(record[name], list) and record[name] and isinstance(record[name][0], dict):
                item_keys = {
                    key for key in record[name][0] if decision.read_rule(f"{name}.{key}") is not FieldRule.HIDDEN
                }
                assert set(body[name][0]) == item_keys, (role, resource, name)
            else:
                assert body[name] == record[name], (role, resource, name)
        checked += 1
    assert checked or not any(r == role for r, _ in READ_CELLS)


def test_spec_masks() -> None:
    assert mask_value("13812345678", "phone") == "138****5678"
    assert mask_value("john@example.com", "email") == "j***@example.com"


def test_masked_numbers_times_and_flags_are_null_so_a_typed_client_still_reads_the_record() -> None:
    assert mask_value("2026-03-02T09:00:00Z", "datetime") is None
    assert mask_value("2026-03-02", "date") is None
    assert (mask_value(12, "number"), mask_value(True, "bool")) == (None, None)
    assert mask_value("", "datetime") == ""  # nothing to hide


async def test_marketing_sees_masked_lead_contact_details(gateway: Any, auth_headers: Any) -> None:
    gateway.store.put(
        "leads",
        {
            "id": "l1",
            "name": "Li",
            "phone": "13812345678",
            "email": "john@example.com",
            "owner_id": "u-other",
            "team": "t",
            "region": "r",
        },
    )
    response = await gateway.client.get("/api/v1/fake/leads/l1", headers=auth_headers("marketing"))
    assert response.status_code == 200
    assert response.json()["phone"] == "138****5678"
    assert response.json()["email"] == "j***@example.com"
    # A sales rep owning it sees them in clear.
    gateway.store.records["leads"]["l1"]["owner_id"] = ME
    clear = await gateway.client.get("/api/v1/fake/leads/l1", headers=auth_headers("sales_rep", sub=ME))
    assert clear.json()["phone"] == "13812345678"


async def test_a_second_role_unmasks_phones_only_on_the_records_it_reaches(gateway: Any, auth_headers: Any) -> None:
    """Marketing lists every lead with phones masked; a sales rep reads the phones of their own
    leads. Holding both shows the own leads' phones in clear and every other lead's masked."""
    phone = "13812345678"
    for lead_id, owner in (("mine", ME), ("theirs", "u-other")):
        gateway.store.put("leads", {"id": lead_id, "name": lead_id, "phone": phone, "owner_id": owner, "team": "t"})
    headers = auth_headers(["marketing", "sales_rep"], sub=ME, team=TEAM, region=REGION)
    masked = mask_value(phone, "phone")

    listing = await gateway.client.get("/api/v1/fake/leads", headers=headers)
    assert {lead["id"]: lead["phone"] for lead in listing.json()["items"]} == {"mine": phone, "theirs": masked}
    export = await gateway.client.get("/api/v1/exports/leads", headers=headers)
    assert {row["id"]: row["phone"] for row in csv.DictReader(io.StringIO(export.text))} == {
        "mine": phone,
        "theirs": masked,
    }
    # Only the rep may set phones, so only on the rep's own leads; marketing sets names anywhere.
    refused = await gateway.client.patch("/api/v1/fake/leads/theirs", json={"phone": "1"}, headers=headers)
    assert refused.status_code in (403, 404)
    assert gateway.store.get("leads", "theirs")["phone"] == phone
    assert (await gateway.client.patch("/api/v1/fake/leads/mine", json={"phone": "1"}, headers=headers)).is_success
    assert (await gateway.client.patch("/api/v1/fake/leads/theirs", json={"name": "n"}, headers=headers)).is_success


async def test_an_analyst_who_is_also_a_rep_reads_only_their_own_contacts_phones(
    gateway: Any, auth_headers: Any
) -> None:
    for contact_id, owner in (("mine", ME), ("theirs", "u-other")):
        gateway.store.put("contacts", {"id": contact_id, "phone": "13812345678", "owner_id": owner, "team": "t"})
    headers = auth_headers(["analyst", "sales_rep"], sub=ME, team=TEAM, region=REGION)
    mine = await gateway.client.get("/api/v1/fake/contacts/mine", headers=headers)
    theirs = await gateway.client.get("/api/v1/fake/contacts/theirs", headers=headers)
    assert (mine.json()["phone"], theirs.json()["phone"]) == ("13812345678", "138****5678")


WRITE_CELLS = [
    (role, resource, name)
    for role in POLICY.roles
    for resource, spec in POLICY.resources.items()
    if "update" in spec.actions and POLICY.decide(principal(role), resource, "update").allowed
    for name in spec.fields
    if POLICY.decide(principal(role), resource, "update").write_rule(name) is not FieldRule.WRITE
]


@pytest.mark.parametrize("role", sorted({role for role, _, _ in WRITE_CELLS}))
async def test_patching_a_protected_field_is_403_and_changes_nothing(
    role: str, make_gateway: Any, auth_headers: Any
) -> None:
    gateway = await make_gateway(policy=POLICY)
    headers = auth_headers(role, sub=ME, team=TEAM, region=REGION)
    count = 0
    for cell_role, resource, name in WRITE_CELLS:
        if cell_role != role:
            continue
        record = gateway.store.put(resource, full_record(resource))
        stored = copy.deepcopy(record)
        if "." in name:
            parent, child = name.split(".", 1)
            body: dict[str, Any] = {parent: [{child: "99"}]}
        else:
            # A permitted field alongside: the whole request is refused, not just the one field.
            body = {"name": "harmless"} if name != "name" and decision_allows(role, resource, "name") else {}
            body[name] = sample(name, POLICY.resource(resource).field(name))
        response = await gateway.client.patch(f"/api/v1/fake/{resource}/{record['id']}", json=body, headers=headers)
        assert response.status_code == 403, (role, resource, name, response.text)
        problem = response.json()
        assert problem["errors"][0]["field"] == name, (role, resource, name, problem)
        assert name in problem["detail"]
        assert gateway.store.get(resource, record["id"]) == stored, (role, resource, name)
        count += 1
    assert count > 0


def decision_allows(role: str, resource: str, name: str) -> bool:
    return POLICY.decide(principal(role), resource, "update").write_rule(name) is FieldRule.WRITE


async def test_mass_assignment_of_owner_by_a_rep_is_refused(gateway: Any, auth_headers: Any) -> None:
    gateway.store.put("leads", {"id": "l1", "name": "Li", "owner_id": ME, "team": TEAM, "region": REGION})
    headers = auth_headers("sales_rep", sub=ME, team=TEAM, region=REGION)
    response = await gateway.client.patch(
        "/api/v1/fake/leads/l1", json={"name": "New", "owner_id": "u-me-too"}, headers=headers
    )
    assert response.status_code == 403
    assert response.json()["errors"] == [{"field": "owner_id", "message": response.json()["detail"]}]
    assert gateway.store.get("leads", "l1")["owner_id"] == ME
    assert gateway.store.get("leads", "l1")["name"] == "Li"
    # A manager may.
    manager = auth_headers("sales_manager", sub="u-boss", team=TEAM, region=REGION)
    ok = await gateway.client.patch("/api/v1/fake/leads/l1", json={"owner_id": "u-other"}, headers=manager)
    assert ok.status_code == 200 and gateway.store.get("leads", "l1")["owner_id"] == "u-other"


async def test_nested_protected_field_and_custom_fields(gateway: Any, auth_headers: Any) -> None:
    quote = {"id": "q1", "owner_id": ME, "team": TEAM, "region": REGION, "line_items": [{"product_id": "p"}]}
    gateway.store.put("quotes", quote)
    headers = auth_headers("sales_rep", sub=ME, team=TEAM, region=REGION)
    response = await gateway.client.patch(
        "/api/v1/fake/quotes/q1",
        json={"line_items": [{"product_id": "p", "discount_percent": "40"}]},
        headers=headers,
    )
    assert response.status_code == 403
    assert response.json()["errors"][0]["field"] == "line_items.discount_percent"
    ok = await gateway.client.patch(
        "/api/v1/fake/quotes/q1", json={"line_items": [{"product_id": "p2", "quantity": "2"}]}, headers=headers
    )
    assert ok.status_code == 200
    lead = {"id": "l1", "owner_id": ME, "team": TEAM, "region": REGION, "custom": {}}
    gateway.store.put("leads", lead)
    custom = await gateway.client.patch("/api/v1/fake/leads/l1", json={"custom": {"budget": "10"}}, headers=headers)
    assert custom.status_code == 200 and custom.json()["custom"] == {"budget": "10"}


@pytest.mark.parametrize(
    ("role", "resource", "query"),
    [
        ("service_agent", "accounts", "credit_limit=1"),
        ("service_agent", "accounts", "sort=-annual_revenue"),
        ("sales_rep", "quotes", "sort=discount_total"),
        ("marketing", "leads", "phone=13812345678"),
        ("analyst", "contacts", "sort=email"),
    ],
)
async def test_filtering_or_sorting_by_an_unreadable_field_is_403(
    role: str, resource: str, query: str, gateway: Any, auth_headers: Any
) -> None:
    response = await gateway.client.get(f"/api/v1/fake/{resource}?{query}", headers=auth_headers(role))
    assert response.status_code == 403, response.text
    field = query.split("=", 1)[0] if not query.startswith("sort=") else query.split("=", 1)[1].lstrip("-")
    assert response.json()["errors"][0]["field"] == field


async def test_filtering_by_a_readable_field_works(gateway: Any, auth_headers: Any) -> None:
    response = await gateway.client.get(
        "/api/v1/fake/accounts?name=x&sort=-name", headers=auth_headers("service_agent")
    )
    assert response.status_code == 200


async def test_export_obeys_field_rules(gateway: Any, auth_headers: Any) -> None:
    for number in range(3):
        gateway.store.put("leads", {**full_record("leads"), "id": f"l{number}", "owner_id": f"u{number}"})
    response = await gateway.client.get("/api/v1/exports/leads?format=csv", headers=auth_headers("marketing"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 3
    assert {row["phone"] for row in rows} == {"138****5678"}
    assert {row["email"] for row in rows} == {"j***@example.com"}
    decision = POLICY.decide(principal("marketing"), "leads", "read")
    assert set(rows[0]) == {
        name
        for name in POLICY.resource("leads").fields
        if "." not in name and decision.read_rule(name) > FieldRule.HIDDEN
    }
    # Filtering an export by a masked field is refused like any filter.
    refused = await gateway.client.get("/api/v1/exports/leads?format=csv&phone=1", headers=auth_headers("marketing"))
    assert refused.status_code == 403


async def test_export_neutralises_spreadsheet_formulas(gateway: Any, auth_headers: Any) -> None:
    gateway.store.put("leads", {"id": "l1", "name": '=HYPERLINK("http://x")', "owner_id": ME, "team": TEAM})
    response = await gateway.client.get("/api/v1/exports/leads", headers=auth_headers("admin"))
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows[0]["name"].startswith("'=")


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("+86 138-0013-8000", "+86 138-0013-8000"),  # a phone number, not a formula: kept as it is
        ("+8613800138000", "+8613800138000"),
        ("-12.50", "-12.50"),
        ({"amount": "-12.50", "currency": "CNY"}, "-12.50 CNY"),
        ({"amount": "=1+1", "currency": "CNY"}, "'=1+1 CNY"),
    ],
)
def test_an_export_cell_quotes_what_a_spreadsheet_would_compute_and_keeps_numbers(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


# The resources whose records carry custom fields, and their custom-field entity.
CUSTOM_ENTITIES = {
    "leads": "lead",
    "accounts": "account",
    "contacts": "contact",
    "opportunities": "opportunity",
    "tickets": "ticket",
}
# Who sees personal data masked in the default policy (SPEC §9: contact details masked for
# marketing and analyst). Marketing reads no opportunities or tickets; the analyst reads both and
# sees their custom pii values masked like the contacts' phones.
MASKS_PERSONAL_DATA = {
    "marketing": {"leads", "accounts", "contacts"},
    "analyst": {"leads", "accounts", "contacts", "opportunities", "tickets"},
}


def test_custom_entities_are_those_of_the_custom_fields_router() -> None:
    assert CUSTOM_ENTITIES == RESOURCE_ENTITIES


@pytest.mark.parametrize("role", POLICY.roles)
async def test_who_sees_personal_data_and_so_custom_pii_values_masked(role: str, gateway: Any) -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "app": gateway.app})
    for resource in CUSTOM_ENTITIES:
        decision = POLICY.decide(principal(role), resource, "read")
        if not decision.allowed:
            continue
        access = Access(runtime=gateway.runtime, request=request, principal=principal(role), decision=decision)
        assert access.masks_personal_data() is (resource in MASKS_PERSONAL_DATA.get(role, set())), resource


def _policy_granting(role: str, action: str, resources: Iterable[str]) -> Policy:
    data = default_policy_document()
    for resource in resources:
        grant = data["roles"][role]["grants"][resource]
        grant["actions"] = [*grant["actions"], action]
    return parse_policy(policy_text(data))


@pytest.mark.parametrize("resource", sorted(CUSTOM_ENTITIES))
async def test_exports_mask_custom_pii_values_like_phone_and_email(
    resource: str, make_gateway: Any, auth_headers: Any
) -> None:
    # The default analyst may not export these: a policy that lets them.
    gateway = await make_gateway(policy=_policy_granting("analyst", "export", CUSTOM_ENTITIES))
    gateway.store.define(CUSTOM_ENTITIES[resource], "private_mobile", pii=True)
    gateway.store.define(CUSTOM_ENTITIES[resource], "shoe_size")
    custom = {"private_mobile": "13812345678", "shoe_size": "42"}
    gateway.store.put(resource, {"id": "r1", "owner_id": ME, "team": TEAM, "region": REGION, "custom": custom})

    async def exported(role: str) -> Any:
        response = await gateway.client.get(f"/api/v1/exports/{resource}", headers=auth_headers(role))
        assert response.status_code == 200, response.text
        return json.loads(next(csv.DictReader(io.StringIO(response.text)))["custom"])

    assert await exported("analyst") == {"private_mobile": "1***", "shoe_size": "42"}
    assert await exported("admin") == custom


async def test_marketing_exports_leads_with_custom_pii_values_masked(gateway: Any, auth_headers: Any) -> None:
    gateway.store.define("lead", "interest", pii=True)
    gateway.store.put("leads", {**full_record("leads"), "custom": {"interest": "robots"}})
    response = await gateway.client.get("/api/v1/exports/leads", headers=auth_headers("marketing"))
    assert response.status_code == 200, response.text
    assert json.loads(next(csv.DictReader(io.StringIO(response.text)))["custom"]) == {"interest": "r***"}


async def test_me_lists_effective_field_rules(gateway: Any, auth_headers: Any) -> None:
    response = await gateway.client.get("/api/v1/me", headers=auth_headers(["marketing", "analyst"], sub="u5"))
    assert response.status_code == 200
    me = response.json()
    assert me["user_id"] == "u5" and me["roles"] == ["marketing", "analyst"]
    leads = me["permissions"]["leads"]
    assert leads["fields"]["phone"] == "masked"
    assert leads["scopes"]["read"] == "all"
    assert "export" in leads["actions"]
    assert "contracts" not in me["permissions"]
    assert me["permissions"]["opportunities"]["fields"]["line_items.discount_percent"] == "hidden"


async def test_me_names_the_custom_fields_a_caller_reads_masked(gateway: Any, auth_headers: Any) -> None:
    gateway.store.define("lead", "private_mobile", pii=True)
    gateway.store.define("lead", "shoe_size")

    async def lead_fields(role: str) -> dict[str, str]:
        response = await gateway.client.get("/api/v1/me", headers=auth_headers(role))
        assert response.status_code == 200, response.text
        return response.json()["permissions"]["leads"]["fields"]  # type: ignore[no-any-return]

    marketing = await lead_fields("marketing")
    assert marketing["custom.private_mobile"] == "masked"
    assert "custom.shoe_size" not in marketing  # read like the rest of `custom`
    assert "custom.private_mobile" not in await lead_fields("sales_rep")


async def test_receivables_are_shown_as_the_caller_sees_a_contracts_amount(make_gateway: Any) -> None:
    data = default_policy_document()
    data["roles"]["sales_rep"]["grants"]["contracts"]["fields"]["amount"] = "hidden"
    data["roles"]["finance"]["grants"]["contracts"]["fields"]["amount"] = "masked"
    gateway = await make_gateway(policy=parse_policy(policy_text(data)))
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "app": gateway.app})
    cny = common_pb2.Money(amount="300.00", currency="CNY")
    reply = sales_service_pb2.ListReceivablesResponse(
        items=[sales_pb2.Receivable(contract_id="k-1", status="signed", amount=cny, paid=cny, outstanding=cny)],
        account_outstanding=[cny],
        lifetime_paid=[cny],
    )

    def view(role: str) -> dict[str, Any]:
        decision = gateway.runtime.policy.decide(principal(role), "contracts", "read")
        access = Access(runtime=gateway.runtime, request=request, principal=principal(role), decision=decision)
        return receivables_view(reply, access)

    money = {"amount": "300.00", "currency": "CNY"}
    shown = view("sales_manager")
    assert shown["items"][0]["paid"] == money and shown["lifetime_value"] == [money]
    hidden = view("sales_rep")
    assert "paid" not in hidden["items"][0] and "amount" not in hidden["items"][0]
    assert hidden["items"][0]["contract_id"] == "k-1" and "lifetime_value" not in hidden
    masked = view("finance")
    assert masked["items"][0]["outstanding"] == mask_value(money, "money") != money
    assert masked["account_outstanding"] == [mask_value(money, "money")]
