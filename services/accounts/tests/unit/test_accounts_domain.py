"""Pure rules of the accounts context."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from accounts import domain
from accounts.domain import PoolPolicy
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Acme Corporation", "ACME corp."),
        ("Acme, Inc.", "acme"),
        ("  Blue   Sky Ltd ", "blue sky limited"),
        ("\uff21\uff23\uff2d\uff25", "acme"),  # full-width ACME
        ("华为技术有限公司", "华为技术"),
    ],
)
def test_names_that_normalise_equal(a: str, b: str) -> None:
    assert domain.normalise_name(a) == domain.normalise_name(b)


def test_distinct_names_stay_distinct_and_legal_word_alone_is_kept() -> None:
    assert domain.normalise_name("Acme") != domain.normalise_name("Acme Tools")
    assert domain.normalise_name("Company") == "company"
    assert domain.dedupe_key("Acme Inc", "East ") == domain.dedupe_key("acme", "east")
    assert domain.dedupe_key("Acme", "East") != domain.dedupe_key("Acme", "West")


@given(st.text(max_size=40))
def test_normalise_name_is_idempotent(name: str) -> None:
    once = domain.normalise_name(name)
    assert domain.normalise_name(once) == once


def test_normalise_tags() -> None:
    assert domain.normalise_tags([" vip ", "vip", "", "key  account"]) == ["vip", "key account"]


def test_account_validation_names_fields() -> None:
    errors = domain.check_account(
        {"name": " ", "tier": "Z", "lifecycle": "lost", "website": "nope", "credit_limit": Decimal("-1")}
    )
    assert {e.field for e in errors} == {"name", "tier", "lifecycle", "website", "credit_limit.amount"}
    assert domain.check_account({"name": "Acme", "tier": "A", "website": "acme.com"}) == []
    # Sector values are free data (the Maven dataset has typos such as "technolgy").
    assert domain.check_account({"name": "Acme", "industry": "technolgy"}) == []


def test_a_create_may_leave_the_lifecycle_empty_for_its_default_but_an_update_cannot_clear_it() -> None:
    assert domain.check_account({"name": "Acme", "lifecycle": ""}) == []
    for cleared in ("", None):
        [error] = domain.check_account({"lifecycle": cleared}, update=True)
        assert error.field == "lifecycle" and error.message.startswith("must be one of")
    assert domain.check_account({"lifecycle": "customer"}, update=True) == []
    assert domain.check_account({"tier": "A"}, update=True) == []


def test_contact_validation() -> None:
    errors = domain.check_contact({"name": "", "email": "x", "phone": "12", "decision_role": "boss"})
    assert {e.field for e in errors} == {"name", "email", "phone", "decision_role"}


def test_a_contact_belongs_to_its_accounts_owner_or_on_a_pool_account_to_the_caller() -> None:
    assert domain.contact_owner(account_owner_id="rep-2", caller_id="mgr") == "rep-2"
    assert domain.contact_owner(account_owner_id="", caller_id="rep-1") == "rep-1"


def test_hierarchy_cycles() -> None:
    parents: dict[str, str | None] = {"b": "a", "c": "b", "a": None}
    assert domain.parent_cycle("a", "c", parents)  # a -> c -> b -> a
    assert domain.parent_cycle("a", "a", parents)
    assert not domain.parent_cycle("c", "a", parents)
    assert not domain.parent_cycle("x", "c", parents)
    assert domain.parent_cycle("x", "p", {"p": "q", "q": "p"})  # never extend an existing loop


def test_pool_return_eligibility_per_tier() -> None:
    policy = PoolPolicy()
    quiet_20_days = NOW - timedelta(days=20)
    assert not domain.due_for_return(policy, tier="A", in_pool=False, anchor=quiet_20_days, now=NOW)
    assert domain.due_for_return(policy, tier="B", in_pool=False, anchor=quiet_20_days, now=NOW)
    assert domain.due_for_return(policy, tier="C", in_pool=False, anchor=NOW - timedelta(days=8), now=NOW)
    assert not domain.due_for_return(policy, tier="C", in_pool=True, anchor=quiet_20_days, now=NOW)
    custom = PoolPolicy(inactivity_days={"A": 60})
    assert not domain.due_for_return(custom, tier="A", in_pool=False, anchor=NOW - timedelta(days=59), now=NOW)
    assert not domain.due_for_return(custom, tier="B", in_pool=False, anchor=quiet_20_days, now=NOW)


def test_inactivity_anchor_is_latest_event() -> None:
    created = NOW - timedelta(days=100)
    claimed = NOW - timedelta(days=3)
    assert domain.inactivity_anchor(last_activity_at=None, claimed_at=claimed, created_at=created) == claimed
    assert domain.inactivity_anchor(last_activity_at=NOW, claimed_at=claimed, created_at=created) == NOW


def _claim(policy: PoolPolicy, **kw: object) -> domain.ClaimDecision:
    args: dict[str, object] = {
        "claimant_id": "rep-2",
        "in_pool": True,
        "released_by_id": "rep-1",
        "released_at": NOW - timedelta(hours=1),
        "claims_last_24h": 0,
        "now": NOW,
    }
    args.update(kw)
    return domain.decide_claim(policy, **args)  # type: ignore[arg-type]


def test_claim_limit_and_cooldown() -> None:
    policy = PoolPolicy(claim_limit_per_day=2, cooldown=timedelta(hours=24))
    assert _claim(policy).allowed
    assert _claim(policy, in_pool=False).reason == "not_in_pool"
    assert _claim(policy, claims_last_24h=2).reason == "claim_limit"
    assert _claim(policy, claimant_id="rep-1").reason == "cooldown"
    assert _claim(policy, claimant_id="rep-1", released_at=NOW - timedelta(hours=25)).allowed


def test_merge_changes_fill_and_union() -> None:
    survivor = {"id": "s", "industry": "", "tags": ["vip"], "custom": {"a": 1}, "credit_limit": None}
    duplicate = {
        "id": "d",
        "industry": "retail",
        "tags": ["vip", "east"],
        "custom": {"a": 2, "b": 3},
        "credit_limit": Decimal("10"),
        "credit_limit_currency": "CNY",
        "parent_id": "s",
    }
    changes = domain.merge_changes(survivor, duplicate)
    assert changes == {
        "industry": "retail",
        "tags": ["vip", "east"],
        "custom": {"a": 1, "b": 3},
        "credit_limit": Decimal("10"),
        "credit_limit_currency": "CNY",
    }
    assert domain.check_merge(survivor_id="a", duplicate_id="a", survivor_merged_into="", duplicate_merged_into="")
    assert domain.check_merge(survivor_id="a", duplicate_id="b", survivor_merged_into="", duplicate_merged_into="c")
    assert not domain.check_merge(survivor_id="a", duplicate_id="b", survivor_merged_into="", duplicate_merged_into="")


def test_an_activity_is_checked_for_the_fields_given_as_logged_and_as_corrected() -> None:
    assert domain.check_activity({"kind": "visit", "occurred_at": NOW}, now=NOW) == []
    assert domain.check_activity({"kind": "call", "occurred_at": NOW + timedelta(minutes=5)}, now=NOW) == []
    assert domain.check_activity({"subject": "", "notes": "typo fixed"}, now=NOW) == []  # a correction of text
    errors = domain.check_activity({"kind": "lunch", "occurred_at": NOW + timedelta(minutes=6)}, now=NOW)
    assert [(e.field, e.message) for e in errors] == [
        ("kind", "must be one of call, email, meeting, visit, note, wechat"),
        ("occurred_at", "must not be in the future"),
    ]
    cleared = domain.check_activity({"kind": "", "occurred_at": None}, now=NOW)
    assert [(e.field, e.message) for e in cleared] == [
        ("kind", "must be one of call, email, meeting, visit, note, wechat"),
        ("occurred_at", "is required"),
    ]


def test_reminder_rules() -> None:
    rule = domain.Reminder(tiers=("A",), inactive_days=3)
    assert domain.reminder_fires(rule, tier="A", in_pool=False, anchor=NOW - timedelta(days=3), now=NOW)
    assert not domain.reminder_fires(rule, tier="A", in_pool=False, anchor=NOW - timedelta(days=2), now=NOW)
    assert not domain.reminder_fires(rule, tier="B", in_pool=False, anchor=NOW - timedelta(days=9), now=NOW)
    assert not domain.reminder_fires(rule, tier="A", in_pool=True, anchor=NOW - timedelta(days=9), now=NOW)
    errors = domain.check_reminder_rule(name="", tiers=["E"], inactive_days=0, due_in_hours=-1)
    assert {e.field for e in errors} == {"name", "tiers", "inactive_days", "due_in_hours"}


def test_reminder_rule_periods_are_bounded() -> None:
    # Regression (fuzz): periods beyond what a date can add or subtract were accepted, and the
    # reminder job failed on them (`now - timedelta(days=...)` overflows).
    errors = domain.check_reminder_rule(name="r", tiers=[], inactive_days=2_000_000_000, due_in_hours=2_000_000_000)
    assert {e.field for e in errors} == {"inactive_days", "due_in_hours"}
    most = domain.check_reminder_rule(
        name="r", tiers=[], inactive_days=domain.MAX_INACTIVE_DAYS, due_in_hours=domain.MAX_DUE_IN_HOURS
    )
    assert most == []
    rule = domain.Reminder(tiers=(), inactive_days=domain.MAX_INACTIVE_DAYS)
    assert not domain.reminder_fires(rule, tier="A", in_pool=False, anchor=NOW, now=NOW)


def test_heir_in_line_is_the_child_of_the_duplicate_on_the_survivors_path() -> None:
    parent_of = {"plant": "division", "division": "holding", "holding": "group", "group": None}
    assert domain.heir_in_line("plant", "holding", parent_of) == "division"
    assert domain.heir_in_line("plant", "division", parent_of) == "plant"
    assert domain.heir_in_line("plant", "elsewhere", parent_of) is None
    assert domain.heir_in_line("a", "z", {"a": "b", "b": "a"}) is None  # a loop in old data ends the walk
