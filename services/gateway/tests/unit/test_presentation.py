"""`Access.present` works each field out once per grant set and shares that between requests of
the same roles: the records it shows must be exactly those the policy's rules give field by field,
for callers whose roles give different rules on different records."""

from collections.abc import Mapping
from typing import Any

import pytest
from crm_platform.principal import Principal
from gateway.security import Access, Policy, SecurityRuntime, SecuritySettings
from gateway.security.masking import mask_value
from gateway.security.policy import Decision, FieldRule, GrantSet, parse_policy
from gateway.testing import default_policy_document, policy_text
from starlette.requests import Request

pytestmark = pytest.mark.unit

ME, TEAM, REGION = "u-me", "team-a", "north"


def _policy() -> Policy:
    """The default policy plus a role that reads every quote with the default field rules (discounts
    hidden): with sales_manager (team scope, every field) the discounts show on some quotes only."""
    document = default_policy_document()
    document["roles"]["quote_reader"] = {"grants": {"quotes": {"actions": ["read"], "scope": "all"}}}
    return parse_policy(policy_text(document))


POLICY = _policy()

RECORDS: dict[str, list[dict[str, Any]]] = {
    "leads": [
        {
            "id": f"lead-{i}",
            "name": f"Lead {i}",
            "phone": "13812345678",
            "email": f"lead{i}@example.com",
            "owner_id": owner,
            "team": team,
            "region": region,
            "score": 40 + i,
            "tags": ["vip"],
            "custom": {"budget": "100k"},
            "created_at": "2026-11-23T10:00:00Z",
            "recycled_at": None,
        }
        for i, (owner, team, region) in enumerate(
            [(ME, TEAM, REGION), ("u-other", TEAM, REGION), ("u-far", "team-b", "south"), (ME, TEAM, REGION)]
        )
    ],
    "quotes": [
        {
            "id": f"quote-{i}",
            "owner_id": owner,
            "team": team,
            "region": REGION,
            "line_items": [
                {"product": "p", "unit_price": {"amount": "10.00", "currency": "CNY"}, "discount_percent": "5"},
                {"product": "q", "unit_price": {"amount": "20.00", "currency": "CNY"}, "discount_percent": ""},
                "not a mapping",
            ],
            "discount_total": {"amount": "1.50", "currency": "CNY"} if i else None,
            "max_discount_percent": "10",
            "total": {"amount": "28.50", "currency": "CNY"},
        }
        for i, (owner, team) in enumerate([(ME, TEAM), ("u-other", TEAM), ("u-far", "team-b"), ("u-far", "team-b")])
    ],
}

ROLE_SETS = [
    ("admin",),
    ("analyst",),
    ("marketing",),
    ("sales_rep",),
    ("sales_rep", "analyst"),
    ("analyst", "sales_rep"),
    ("sales_rep", "marketing"),
    ("sales_manager",),
    ("quote_reader", "sales_manager"),
    ("sales_manager", "quote_reader"),
    ("sales_rep", "quote_reader"),
]


def _runtime() -> SecurityRuntime:
    settings = SecuritySettings(dev_mode=True, dev_jwt_secret="s" * 40, database_url="sqlite+aiosqlite://")
    return SecurityRuntime(settings, policy=POLICY)


def _access(runtime: SecurityRuntime, principal: Principal, resource: str) -> Access:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""})
    decision = runtime.policy.decide(principal, resource, "read")
    assert decision.allowed
    return Access(runtime=runtime, request=request, principal=principal, decision=decision)


def _expected(
    decision: Decision, resource: str, record: Mapping[str, Any], grants: GrantSet, prefix: str, sensitive: list[str]
) -> dict[str, Any]:
    """The record as the rules give it, field by field, with nothing remembered."""
    spec = POLICY.resource(resource)
    nested = {name.rsplit(".", 1)[0] for name in spec.fields if "." in name}
    shown: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{prefix}{key}"
        rules = [decision.policy.field_rule(decision.readers[i], resource, path) for i in grants]
        rule = min(max(rules, default=FieldRule.HIDDEN), FieldRule.READ)
        if rule is FieldRule.HIDDEN:
            continue
        if rule is FieldRule.MASKED:
            shown[key] = mask_value(value, spec.field(path).type)
            continue
        if spec.field(path).sensitive and value not in (None, "", [], {}):
            sensitive.append(path)
        inner = f"{path}."
        if path in nested and isinstance(value, Mapping):
            shown[key] = _expected(decision, resource, value, grants, inner, sensitive)
        elif path in nested and isinstance(value, list):
            shown[key] = [
                _expected(decision, resource, item, grants, inner, sensitive) if isinstance(item, Mapping) else item
                for item in value
            ]
        else:
            shown[key] = value
    return shown


CASES = [
    (roles, resource)
    for roles in ROLE_SETS
    for resource in sorted(RECORDS)
    if POLICY.decide(Principal(user_id=ME, roles=roles), resource, "read").allowed
]


def _check_presentation(runtime: SecurityRuntime, roles: tuple[str, ...], resource: str) -> None:
    access = _access(runtime, Principal(user_id=ME, roles=roles, team=TEAM, region=REGION), resource)
    decision = access.decision
    records = RECORDS[resource]
    expected_reads: list[tuple[str, list[str]]] = []
    expected = []
    for record in records:
        sensitive: list[str] = []
        expected.append(_expected(decision, resource, record, decision.record_grants(record), "", sensitive))
        if sensitive:
            expected_reads.append((record["id"], sensitive))
    assert access.present_many(records) == expected
    assert access._sensitive_reads == expected_reads


@pytest.mark.parametrize(("roles", "resource"), CASES, ids=[f"{'+'.join(r)}-{resource}" for r, resource in CASES])
def test_present_shows_what_the_rules_give_field_by_field(roles: tuple[str, ...], resource: str) -> None:
    runtime = _runtime()
    # Two requests: the second presents from what the first worked out.
    _check_presentation(runtime, roles, resource)
    _check_presentation(runtime, roles, resource)


def test_requests_of_other_roles_and_resources_do_not_change_what_one_sees() -> None:
    runtime = _runtime()
    for roles, resource in [*CASES, *reversed(CASES)]:
        _check_presentation(runtime, roles, resource)


def test_rules_differ_per_record_and_between_callers_of_the_same_roles() -> None:
    runtime = _runtime()
    roles = ("sales_rep", "analyst")
    mine = RECORDS["leads"][0]
    # The rep who owns the lead reads its phone; another rep-and-analyst sees it masked, although
    # both requests share what the policy gives for these roles.
    owner = _access(runtime, Principal(user_id=ME, roles=roles, team=TEAM, region=REGION), "leads")
    other = _access(runtime, Principal(user_id="u-other", roles=roles, team=TEAM, region=REGION), "leads")
    assert owner.present(mine)["phone"] == "13812345678"
    assert other.present(mine)["phone"] == "138****5678"
    assert owner.present(mine)["phone"] == "13812345678"
    assert [lead["phone"] for lead in other.present_many(RECORDS["leads"])] == [
        "138****5678",
        "13812345678",
        "138****5678",
        "138****5678",
    ]


def test_a_manager_who_also_reads_every_quote_sees_discounts_in_the_team_only() -> None:
    runtime = _runtime()
    access = _access(runtime, Principal(user_id=ME, roles=("quote_reader", "sales_manager"), team=TEAM), "quotes")
    shown = access.present_many(RECORDS["quotes"])
    assert [[item.get("discount_percent") for item in quote["line_items"][:2]] for quote in shown] == [
        ["5", ""],
        ["5", ""],
        [None, None],
        [None, None],
    ]
    assert [quote["line_items"][2] for quote in shown] == ["not a mapping"] * 4
    assert ["discount_total" in quote for quote in shown] == [True, True, False, False]
    assert access._sensitive_reads == [
        ("quote-0", ["line_items.discount_percent", "max_discount_percent"]),
        ("quote-1", ["line_items.discount_percent", "discount_total", "max_discount_percent"]),
    ]
