"""The policy file: validation with line numbers, and the decision function (no I/O)."""

import pytest
from crm_platform.principal import Principal, ScopeKind
from gateway.security.masking import mask_email, mask_phone, mask_value, url_without_query
from gateway.security.policy import ACTIONS, FieldRule, Policy, PolicyError, load_policy, parse_policy

pytestmark = pytest.mark.unit

SPEC_ROLES = {
    "admin",
    "sales_manager",
    "sales_rep",
    "marketing",
    "service_agent",
    "service_manager",
    "finance",
    "analyst",
    "erp_integration",
}
SPEC_RESOURCES = {
    "leads",
    "campaigns",
    "accounts",
    "contacts",
    "activities",
    "tasks",
    "segments",
    "custom_fields",
    "opportunities",
    "pipelines",
    "quotes",
    "contracts",
    "payment_plans",
    "payments",
    "invoices",
    "forecast",
    "targets",
    "tickets",
    "audit_events",
    "api_keys",
    "reports",
}


def who(*roles: str, user: str = "u1", team: str = "t1", region: str = "r1") -> Principal:
    return Principal(user_id=user, roles=roles, team=team, region=region)


def test_default_policy_has_the_spec_roles_and_resources() -> None:
    policy = load_policy()
    assert set(policy.roles) == SPEC_ROLES
    assert set(policy.resources) >= SPEC_RESOURCES


def test_spec_field_defaults() -> None:
    policy = load_policy()
    for role in ("marketing", "analyst"):
        for resource in ("leads", "contacts"):
            decision = policy.decide(who(role), resource, "read")
            assert decision.read_rule("phone") is FieldRule.MASKED, (role, resource)
            assert decision.read_rule("email") is FieldRule.MASKED, (role, resource)
    agent = policy.decide(who("service_agent"), "accounts", "read")
    assert agent.read_rule("annual_revenue") is FieldRule.HIDDEN
    assert agent.read_rule("credit_limit") is FieldRule.HIDDEN
    for role in ("sales_manager", "finance", "admin"):
        quotes = policy.decide(who(role), "quotes", "read")
        assert quotes.read_rule("discount_total") is FieldRule.READ, role
        assert quotes.read_rule("line_items.discount_percent") is FieldRule.READ, role
    for role in ("sales_rep", "analyst"):
        opportunities = policy.decide(who(role), "opportunities", "read")
        assert opportunities.read_rule("line_items.discount_percent") is FieldRule.HIDDEN, role
        assert opportunities.read_rule("line_items.unit_price") is FieldRule.READ, role
    # Only managers may change owner_id (and team): of leads, and of the campaigns marketing runs.
    assert policy.decide(who("sales_rep"), "leads", "update").write_rule("owner_id") is FieldRule.READ
    assert policy.decide(who("sales_manager"), "leads", "update").write_rule("owner_id") is FieldRule.WRITE
    for action in ("create", "update"):
        marketing = policy.decide(who("marketing"), "campaigns", action)
        assert (marketing.write_rule("owner_id"), marketing.write_rule("team")) == (FieldRule.READ, FieldRule.READ)
        assert marketing.write_rule("name") is FieldRule.WRITE
    assert policy.decide(who("admin"), "campaigns", "update").write_rule("owner_id") is FieldRule.WRITE


def test_readonly_fields_are_never_writable_even_for_admin() -> None:
    decision = load_policy().decide(who("admin"), "leads", "update")
    assert decision.write_rule("id") is FieldRule.READ
    assert decision.write_rule("score") is FieldRule.READ
    assert decision.write_rule("phone") is FieldRule.WRITE


def test_a_create_rule_lets_the_field_be_set_when_creating_and_only_read_afterwards() -> None:
    """An agent files a ticket in a customer's region, but may not move their ticket out of the
    region their manager works later."""
    policy = load_policy()
    agent = who("service_agent")
    assert policy.decide(agent, "tickets", "create").write_rule("region") is FieldRule.WRITE
    update = policy.decide(agent, "tickets", "update")
    assert update.write_rule("region") is FieldRule.READ
    assert update.narrow_to_writers(["subject", "region"]) == "region"
    assert update.read_rule("region") is FieldRule.READ
    assert policy.effective(agent)["tickets"]["fields"]["region"] == "create"
    # A manager of the region still moves tickets.
    assert policy.decide(who("service_manager"), "tickets", "update").write_rule("region") is FieldRule.WRITE


def test_several_roles_take_the_widest_scope_of_the_roles_granting_the_action() -> None:
    policy = load_policy()
    both = who("sales_rep", "marketing")
    read = policy.decide(both, "leads", "read")
    assert read.scope is not None and read.scope.kind is ScopeKind.ALL  # marketing: all > rep: own
    # Export only via marketing: scope of the roles that grant the action.
    export = policy.decide(both, "leads", "export")
    assert export.allowed and export.scope is not None and export.scope.kind is ScopeKind.ALL
    rep_and_agent = who("sales_rep", "service_agent")
    update = policy.decide(rep_and_agent, "tickets", "update")
    assert update.scope is not None and update.scope.kind is ScopeKind.OWN


OWN_RECORD = {"owner_id": "u1", "team": "t1", "region": "r1"}
OTHER_RECORD = {"owner_id": "u2", "team": "t2", "region": "r2"}


@pytest.mark.parametrize(
    ("roles", "resource"), [(("marketing", "sales_rep"), "leads"), (("analyst", "sales_rep"), "contacts")]
)
def test_a_roles_field_rules_apply_only_to_the_records_its_scope_covers(roles: tuple[str, ...], resource: str) -> None:
    read = load_policy().decide(who(*roles), resource, "read")
    # The rep reads the phones of their own records; the other role lists every record, phones masked.
    assert read.read_rule("phone", read.record_grants(OWN_RECORD)) is FieldRule.READ
    assert read.read_rule("phone", read.record_grants(OTHER_RECORD)) is FieldRule.MASKED
    # A record without owner fields falls to the widest-scope grants.
    assert read.read_rule("phone", read.record_grants({})) is FieldRule.MASKED
    # Rules for no one record (filters, derived values) are those that cover every listed record.
    assert read.read_rule("phone") is FieldRule.MASKED
    # What the caller sees on at least some records (GET /me, export columns).
    assert read.best_read_rule("phone") is FieldRule.READ


def test_nested_fields_follow_the_grants_covering_the_top_level_record() -> None:
    read = load_policy().decide(who("analyst", "sales_manager"), "opportunities", "read")
    team_deal, other_deal = read.record_grants({"owner_id": "u9", "team": "t1"}), read.record_grants(OTHER_RECORD)
    assert read.read_rule("line_items.discount_percent", team_deal) is FieldRule.READ
    assert read.read_rule("line_items.discount_percent", other_deal) is FieldRule.HIDDEN


def test_a_write_takes_the_scope_of_the_grants_that_may_set_every_field() -> None:
    policy = load_policy()
    phone = policy.decide(who("marketing", "sales_rep"), "leads", "update")
    assert phone.narrow_to_writers(["phone"]) is None
    assert phone.scope is not None and phone.scope.kind is ScopeKind.OWN  # only the rep may set phones
    assert phone.scope.owner_id == "u1"
    name = policy.decide(who("marketing", "sales_rep"), "leads", "update")
    assert name.narrow_to_writers(["name"]) is None
    assert name.scope is not None and name.scope.kind is ScopeKind.ALL  # marketing may set names anywhere
    # Narrowing never widens again: a second write check within the same request keeps the own scope.
    assert phone.narrow_to_writers(["name"]) is None
    assert phone.scope.kind is ScopeKind.OWN
    # A field no grant may set is refused by name, as with one role.
    assert policy.decide(who("marketing", "sales_rep"), "leads", "update").narrow_to_writers(["owner_id"]) == "owner_id"


def test_fields_settable_only_by_different_grants_are_refused_together() -> None:
    policy = parse_policy(
        "version: 1\n"
        "resources:\n  leads: {actions: [read, update], fields: {name: {}, phone: {}, team: {}}}\n"
        "roles:\n"
        "  rep: {grants: {leads: {actions: [read, update], scope: own, fields: {team: read}}}}\n"
        "  editor: {grants: {leads: {actions: [read, update], scope: all, fields: {phone: read}}}}\n"
    )
    update = policy.decide(who("rep", "editor"), "leads", "update")
    # Each field has a grant that may set it, none may set both: the widest (editor's) refuses phone.
    assert update.narrow_to_writers(["team", "phone"]) == "phone"
    assert update.scope is not None and update.scope.kind is ScopeKind.ALL  # a refused write narrows nothing


def test_unknown_roles_grant_nothing() -> None:
    decision = load_policy().decide(who("superuser"), "leads", "read")
    assert not decision.allowed and decision.scope is None


def test_scope_carries_the_callers_identity() -> None:
    decision = load_policy().decide(who("sales_manager", user="m1", team="east", region="cn"), "leads", "read")
    assert decision.scope is not None
    assert (decision.scope.kind, decision.scope.owner_id, decision.scope.team) == (ScopeKind.TEAM, "m1", "east")


def test_effective_rules_for_me() -> None:
    rules = load_policy().effective(who("marketing"))
    assert "contracts" not in rules
    assert rules["leads"]["actions"] == ["read", "create", "update", "export"]
    assert rules["leads"]["fields"]["phone"] == "masked"
    assert rules["leads"]["fields"]["name"] == "write"
    assert rules["leads"]["fields"]["owner_id"] == "read"
    assert rules["accounts"]["fields"]["name"] == "read"
    assert rules["leads"]["scopes"]["export"] == "all"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("version: 1\nresources: {}\nroles:\n  x:\n    grants:\n      leads: {actions: [read]}\n", 6, "leads"),
        (
            "version: 1\nresources:\n  leads:\n    actions: [read, fly]\nroles: {}\n",
            4,
            "unknown action 'fly'",
        ),
        (
            "version: 1\nresources:\n  leads:\n    actions: [read]\nroles:\n  r:\n    grants:\n"
            "      leads: {actions: [read], scope: galaxy}\n",
            8,
            "scope",
        ),
        (
            "version: 1\nresources:\n  leads:\n    actions: [read]\n    fields: {name: {}}\nroles:\n  r:\n"
            "    grants:\n      leads: {actions: [read], fields: {nmae: read}}\n",
            9,
            "unknown field 'nmae'",
        ),
        (
            "version: 1\nresources:\n  leads:\n    actions: [read]\n    fields:\n      phone: {type: phone, "
            "default: invisible}\nroles: {}\n",
            6,
            "default",
        ),
        ("version: 1\nresources:\n  leads:\n    actions: [read\nroles: {}\n", 5, "invalid YAML"),
        ("version: 2\nresources: {}\nroles: {}\n", 1, "version"),
        (
            "version: 1\nresources:\n  leads:\n    actions: [read]\n  leads:\n    actions: [read]\nroles: {}\n",
            5,
            "duplicate key 'leads'",
        ),
    ],
)
def test_bad_policy_names_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_policy(text, source="bad.yaml")
    message = str(error.value)
    assert f"bad.yaml, line {line}:" in message, message
    assert fragment in message, message


def test_missing_policy_file_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy("/nonexistent/policy.yaml")


def test_action_vocabulary_is_closed() -> None:
    policy: Policy = load_policy()
    with pytest.raises(ValueError, match="unknown action"):
        policy.decide(who("admin"), "leads", "fly")
    for spec in policy.resources.values():
        assert set(spec.actions) <= set(ACTIONS)


def test_masking() -> None:
    assert mask_phone("13812345678") == "138****5678"
    assert mask_phone("+86 138-1234-5678") == "+86 138****5678"  # the country code is no secret
    assert mask_phone("+1 415 555 2671") == "+1 41****2671"
    assert mask_phone("+852 9123 4567") == "+852 ****4567"  # four digits hidden however short the number
    assert mask_phone("+44 20 7946 0958") == "+44 20****0958"
    assert mask_email("john@example.com") == "j***@example.com"
    assert mask_value({"amount": "10.00", "currency": "CNY"}, "money") == {"amount": "***", "currency": "CNY"}
    assert mask_value("Shanghai Road 1", "text") == "S***"
    assert mask_value(42, "number") is None
    assert mask_value(None, "phone") is None


RESOURCE_MESSAGES = {
    "leads": ("crm.leads.v1.leads_pb2", "Lead"),
    "campaigns": ("crm.leads.v1.leads_pb2", "Campaign"),
    "accounts": ("crm.accounts.v1.accounts_pb2", "Account"),
    "contacts": ("crm.accounts.v1.accounts_pb2", "Contact"),
    "opportunities": ("crm.sales.v1.sales_pb2", "Opportunity"),
    "quotes": ("crm.sales.v1.sales_pb2", "Quote"),
    "contracts": ("crm.sales.v1.sales_pb2", "Contract"),
    "payments": ("crm.sales.v1.sales_pb2", "Payment"),
    "invoices": ("crm.sales.v1.sales_pb2", "Invoice"),
    "payment_plans": ("crm.sales.v1.sales_pb2", "PaymentPlan"),
    "pipelines": ("crm.sales.v1.sales_pb2", "Pipeline"),
    "targets": ("crm.sales.v1.sales_pb2", "Target"),
    "tickets": ("crm.servicedesk.v1.servicedesk_pb2", "Ticket"),
    "sla_policies": ("crm.servicedesk.v1.servicedesk_pb2", "SlaPolicy"),
    "agents": ("crm.servicedesk.v1.servicedesk_pb2", "Agent"),
    "return_visits": ("crm.servicedesk.v1.servicedesk_pb2", "ReturnVisit"),
    "kb_articles": ("crm.servicedesk.v1.servicedesk_pb2", "KbArticle"),
}
PERSONAL = ("phone", "mobile", "email", "wechat", "address")


def test_policy_declares_the_contract_fields_and_flags_personal_data() -> None:
    """Every field of a resource message is declared (so /me and exports list it, and a field added
    to a message cannot reach callers before the policy says who sees it); a field that holds
    personal data must be flagged `pii`, so the audit trail masks it."""
    import importlib

    policy = load_policy()
    undeclared: list[str] = []
    for resource, (module, name) in RESOURCE_MESSAGES.items():
        message = getattr(importlib.import_module(module), name)
        spec = policy.resource(resource)
        for field in message.DESCRIPTOR.fields:
            declared = spec.fields.get(field.name, None)
            if field.name not in spec.fields:
                undeclared.append(f"{resource}.{field.name}")
            if any(word in field.name for word in PERSONAL):
                assert declared is not None and declared.pii, f"{resource}.{field.name} must be declared pii"
    assert undeclared == [], "fields not in the default policy"


@pytest.mark.parametrize(
    ("role", "actions", "scope"),
    [
        ("sales_manager", {"read", "create", "update", "delete"}, ScopeKind.TEAM),
        ("sales_rep", {"read"}, ScopeKind.OWN),
        ("finance", {"read"}, ScopeKind.ALL),
        ("analyst", {"read"}, ScopeKind.ALL),
        ("admin", {"read", "create", "update", "delete"}, ScopeKind.ALL),
    ],
)
def test_targets_are_set_by_managers_for_their_team_and_read_by_reps_finance_and_analysts(
    role: str, actions: set[str], scope: ScopeKind
) -> None:
    policy = load_policy()
    for action in ("read", "create", "update", "delete"):
        decision = policy.decide(who(role), "targets", action)
        assert decision.allowed == (action in actions), (role, action)
        if decision.allowed:
            assert decision.scope is not None and decision.scope.kind is scope
    for role_without in ("marketing", "service_agent", "service_manager", "erp_integration"):
        assert not policy.decide(who(role_without), "targets", "read").allowed
    assert policy.resource("targets").field("amount").type == "money"


def test_claim_names_are_configurable() -> None:
    from gateway.security.auth import principal_from_claims
    from gateway.security.settings import SecuritySettings

    settings = SecuritySettings(
        jwks_url="https://idp/jwks",
        jwt_issuer="https://idp",
        jwt_audience="crm",
        claim_sub="preferred_username",
        claim_roles="realm_access.roles",
        claim_team="org.team",
        claim_region="org.region",
        claim_name="given_name",
    )
    claims = {
        "preferred_username": "li.wei",
        "given_name": "Li",
        "realm_access": {"roles": ["sales_rep", "offline_access"]},
        "org": {"team": "east", "region": "cn-east"},
    }
    principal = principal_from_claims(claims, settings)
    assert (principal.user_id, principal.name, principal.team, principal.region) == ("li.wei", "Li", "east", "cn-east")
    assert principal.roles == ("sales_rep", "offline_access")
    # Roles the policy does not know grant nothing.
    assert not load_policy().decide(principal, "contracts", "approve").allowed
    space_separated = principal_from_claims({**claims, "realm_access": {"roles": "sales_rep marketing"}}, settings)
    assert space_separated.roles == ("sales_rep", "marketing")


def test_settings_refuse_unsafe_configurations() -> None:
    from gateway.security.settings import SecuritySettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DEV_JWT_SECRET"):
        SecuritySettings(dev_mode=True, dev_jwt_secret="short")
    with pytest.raises(ValidationError, match="asymmetric"):
        SecuritySettings(jwt_algorithm="HS256")
    with pytest.raises(ValidationError, match="asymmetric"):
        SecuritySettings(jwt_algorithm="none")
    with pytest.raises(ValidationError, match="ISSUER"):
        SecuritySettings(jwks_url="https://idp/jwks")
    dev = SecuritySettings(dev_mode=True, dev_jwt_secret="s" * 32)
    assert (dev.algorithm, dev.issuer, dev.audience) == ("HS256", "crm-dev", "crm")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://x.cn/product?u=jane%40example.com&ref=mail#top", "https://x.cn/product"),
        ("https://x.cn:8443/p/?mobile=13812345678", "https://x.cn:8443/p/"),
        ("https://jane:secret@x.cn/p", "https://x.cn/p"),  # user information before the host goes too
        ("//x.cn/p?u=jane@example.com", "//x.cn/p"),
        ("https://x.cn", "https://x.cn"),
        ("mailto:jane@example.com", "mailto:"),  # no host: the rest is the person
        ("tel:+8613812345678", "tel:"),
        ("jane@example.com", ""),  # no URL at all
        ("https://[x.cn/p?u=jane@example.com", ""),  # an unclosed IPv6 host: no URL
        ("", ""),
    ],
)
def test_a_url_without_its_query_keeps_its_scheme_host_and_path_only(url: str, shown: str) -> None:
    assert url_without_query(url) == shown
