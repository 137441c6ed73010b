from collections import deque
from datetime import UTC, datetime, timedelta

import pytest
from crm_platform.activities import follow_up_change
from crm_platform.errors import Conflict, ValidationFailed
from crm_platform.principal import RecordScope, ScopeKind
from crm_platform.timeutil import CLOCK_SKEW
from hypothesis import given
from hypothesis import strategies as st
from leads import domain
from leads.domain import AssignmentRule, FollowUpPolicy, ScoringRule, Thresholds

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def test_validation_names_every_bad_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_lead({"name": "x", "email": "nope", "phone": "abc", "source": "tv"})
    assert {e.field for e in caught.value.errors} == {"email", "phone", "source"}


def test_a_phone_longer_than_it_can_be_kept_is_refused_though_its_digits_make_a_number() -> None:
    padded = "139" + " " * 70 + "00139000"  # spaces are allowed in a phone, and this one normalises
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_lead({"name": "Li", "phone": padded})
    assert [(e.field, e.message) for e in caught.value.errors] == [("phone", "longer than 64 characters")]
    assert domain.validate_lead({"name": "Li", "phone": "139 0013 9000"}).phone_norm == "+8613900139000"


def test_create_needs_an_identifying_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_lead({"title": "CEO"})
    assert caught.value.errors[0].field == "name"
    assert domain.validate_lead({"external_id": "p-1"}).values["external_id"] == "p-1"


def test_validation_normalises_keys() -> None:
    clean = domain.validate_lead({"name": "Li", "email": "LI@X.CN", "phone": "13800138000", "tags": [" a", "a", "b"]})
    assert clean.email_norm == "li@x.cn"
    assert clean.phone_norm == "+8613800138000"
    assert clean.values["tags"] == ["a", "b"]


def test_source_mapping_keeps_the_original() -> None:
    assert domain.map_source("Olark Chat") == ("website", "Olark Chat")
    assert domain.map_source("Reference") == ("referral", "Reference")
    assert domain.map_source("Facebook") == ("ad", "Facebook")
    assert domain.map_source("WeChat") == ("wechat", "WeChat")
    assert domain.map_source("Something New") == ("other", "Something New")
    assert domain.map_source("") == ("import", "")
    assert domain.map_source("Partner X", {"Partner X": "referral"}) == ("referral", "Partner X")


def test_merge_fills_empty_fields_and_appends_tags() -> None:
    existing = {"name": "Li", "company": "", "email": "li@x.cn", "phone": "", "tags": ["a"], "custom": {"k": 1}}
    incoming = domain.validate_lead(
        {"name": "Other", "company": "ACME", "email": "other@x.cn", "phone": "13800138000", "tags": ["b", "a"],
         "custom": {"k": 2, "n": 3}}
    )  # fmt: skip
    changes = domain.merge_into(existing, incoming)
    assert changes == {
        "company": "ACME",
        "phone": "13800138000",
        "phone_norm": "+8613800138000",  # a filled phone becomes a dedupe key; the email was not filled
        "tags": ["a", "b"],
        "custom": {"k": 1, "n": 3},
    }


@pytest.mark.parametrize("value", [1.5, True, ["x"], {"a": 1}])
@pytest.mark.parametrize("field_name", ["name", "company", "email", "phone", "source", "status", "owner_id"])
def test_a_value_that_is_not_text_is_rejected_naming_its_field(field_name: str, value: object) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_lead({"external_id": "crm-1", field_name: value})
    assert [e.field for e in caught.value.errors] == [field_name]
    assert caught.value.errors[0].message == "must be text"


@pytest.mark.parametrize("tags", [[1, 2], [None], [{"a": 1}], "a;b", {"a": 1}])
def test_tags_must_be_a_list_of_text(tags: object) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_lead({"name": "Li", "tags": tags})
    assert [(e.field, e.message) for e in caught.value.errors] == [("tags", "must be a list of text")]


def test_activity_transitions() -> None:
    assert domain.status_after_activity("new", "call") == "contacted"
    assert domain.status_after_activity("new", "note") == "new"
    assert domain.status_after_activity("qualified", "call") == "qualified"
    with pytest.raises(Conflict):
        domain.ensure_open("converted", "convert")
    with pytest.raises(Conflict):
        domain.check_status_change("unqualified", "new", contacted=False)
    domain.check_status_change("contacted", "qualified", contacted=True)
    domain.check_status_change("qualified", "contacted", contacted=True)
    domain.check_status_change("qualified", "new", contacted=False)  # qualified by hand, never contacted
    with pytest.raises(Conflict):
        domain.check_status_change("qualified", "new", contacted=True)
    with pytest.raises(Conflict):
        domain.check_status_change("recycled", "new", contacted=True)


SCORING = [
    ScoringRule(id="r1", field="industry", operator="equals", value="Software", points=30),
    ScoringRule(id="r2", field="email", operator="present", points=20),
    ScoringRule(id="r3", activity_kind="visit", min_count=3, points=40),
    ScoringRule(id="r4", field="source", operator="in", value="ad, event", points=-10),
    ScoringRule(id="r5", field="custom.visits", operator="gte", value="5", points=30),
    ScoringRule(id="off", field="name", operator="present", points=50, enabled=False),
]


def test_scoring_sums_matching_rules() -> None:
    lead = {"industry": "software", "email": "a@b.cn", "source": "ad", "name": "x", "custom": {"visits": 7}}
    score, matched = domain.Scorer(SCORING).score(lead, {"visit": 3})
    assert matched == ["r1", "r2", "r3", "r4", "r5"]
    assert score == 100  # 110 capped


def test_scoring_floors_at_zero_and_grades() -> None:
    score, matched = domain.Scorer(SCORING).score({"source": "event"}, {})
    assert (score, matched) == (0, ["r4"])
    t = Thresholds(a=80, b=60, c=40)
    assert [domain.grade_for(s, t) for s in (100, 80, 79, 60, 40, 39, 0)] == ["A", "A", "B", "B", "C", "D", "D"]


@given(st.lists(st.integers(-100, 100), max_size=20))
def test_score_is_always_within_bounds(points: list[int]) -> None:
    rules = [ScoringRule(id=str(i), field="name", operator="present", points=p) for i, p in enumerate(points)]
    score, _ = domain.Scorer(rules).score({"name": "x"}, {})
    assert 0 <= score <= 100


def test_a_scorer_scores_many_leads_with_the_rules_prepared_once() -> None:
    scorer = domain.Scorer(SCORING)
    lead = {"industry": "Software ", "source": "Event", "custom": {"visits": "4.5"}}
    assert scorer.score(lead, {}) == (0, ["r4"])
    assert scorer.score({**lead, "industry": "software", "custom": {"visits": 5}}, {}) == (50, ["r1", "r4", "r5"])
    assert scorer.score({"tags": ["X", "y"]}, {}) == (0, [])
    tagged = domain.Scorer([ScoringRule(id="t", field="tags", operator="contains", value=" Vi ", points=10)])
    assert tagged.score({"tags": ["new", "VIP"]}, {}) == (10, ["t"])
    any_activity = domain.Scorer([ScoringRule(id="a", activity_kind="any", min_count=2, points=5)])
    assert any_activity.score({}, {"call": 1, "visit": 1}) == (5, ["a"])


def test_scoring_rule_validation() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_scoring_rule(ScoringRule(id="", field="salary", operator="like", points=500), "")
    assert {e.field for e in caught.value.errors} == {"name", "field", "operator", "points"}


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (ScoringRule(id="", field="industry", operator="equals", value=" ", points=10), "value"),
        (ScoringRule(id="", field="industry", operator="contains", value="", points=10), "value"),
        (ScoringRule(id="", field="region", operator="in", value="east,,west", points=10), "value"),
        (ScoringRule(id="", field="custom.visits", operator="gte", value="nan", points=10), "value"),
        (ScoringRule(id="", field="custom.visits", operator="lte", value="inf", points=10), "value"),
        (ScoringRule(id="", field="email", operator="present", value="x", points=10), "value"),
        (ScoringRule(id="", field="source", operator="equals", value="web", points=10), "value"),
        (ScoringRule(id="", field="source", operator="in", value="event, tv", points=10), "value"),
        (ScoringRule(id="", field="industry", operator="equals", value="software", points=0), "points"),
        (ScoringRule(id="", activity_kind="call", min_count=1, operator="gte", value="3", points=10), "field"),
        (ScoringRule(id="", field="custom.", operator="present", points=10), "field"),
    ],
)
def test_a_scoring_rule_that_could_never_match_or_never_count_is_refused(rule: ScoringRule, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_scoring_rule(rule, "rule")
    assert [e.field for e in caught.value.errors] == [field]


def test_scoring_rules_that_can_match_are_accepted() -> None:
    for rule in (
        ScoringRule(id="", field="source", operator="in", value="Event, referral", points=10),
        ScoringRule(id="", field="source", operator="contains", value="web", points=10),
        ScoringRule(id="", field="email", operator="absent", points=-10),
        ScoringRule(id="", field="custom.visits", operator="gte", value=" 3.5 ", points=5),
        ScoringRule(id="", activity_kind="any", min_count=2, points=5),
    ):
        domain.validate_scoring_rule(rule, "rule")


def _rule(**kw: object) -> AssignmentRule:
    base: dict[str, object] = {"id": "r", "position": 1, "user_ids": ("u1", "u2", "u3")}
    base.update(kw)
    return AssignmentRule(**base)  # type: ignore[arg-type]


def test_assignment_rules_match_in_order() -> None:
    rules = [
        _rule(id="east-hot", position=1, regions=frozenset({"East"}), min_score=60),
        _rule(id="east", position=2, regions=frozenset({"east"})),
        _rule(id="software", position=3, industries=frozenset({"Software"}), sources=frozenset({"ad"})),
    ]
    assert domain.first_matching_rule(rules, {"region": "East", "score": 70}).id == "east-hot"  # type: ignore[union-attr]
    assert domain.first_matching_rule(rules, {"region": "east", "score": 10}).id == "east"  # type: ignore[union-attr]
    assert domain.first_matching_rule(rules, {"industry": "software", "source": "ad"}).id == "software"  # type: ignore[union-attr]
    assert domain.first_matching_rule(rules, {"industry": "software", "source": "event"}) is None


def test_round_robin_starts_at_the_rep_whose_turn_it_is_and_skips_full_reps() -> None:
    rule = _rule(strategy="round_robin", capacity=2)
    assert [domain.pick_assignee(rule, {}, turn) for turn in range(5)] == ["u1", "u2", "u3", "u1", "u2"]
    assert domain.pick_assignee(rule, {"u2": 2}, 1) == "u3"
    assert domain.pick_assignee(rule, {"u3": 2}, 2) == "u1"  # wraps around
    assert domain.pick_assignee(rule, {"u1": 2, "u2": 2, "u3": 2}, 1) is None


def test_least_loaded_picks_the_lightest_rep_within_capacity_whatever_the_turn() -> None:
    rule = _rule(strategy="least_loaded", capacity=5)
    assert domain.pick_assignee(rule, {"u1": 3, "u2": 1, "u3": 1}, 0) == "u2"
    assert domain.pick_assignee(rule, {"u1": 3, "u2": 1, "u3": 1}, 2) == "u2"
    assert domain.pick_assignee(rule, {"u1": 5, "u2": 5, "u3": 4}, 0) == "u3"
    assert domain.pick_assignee(rule, {"u1": 5, "u2": 5, "u3": 5}, 0) is None
    assert domain.pick_assignee(_rule(strategy="least_loaded"), {"u1": 99, "u2": 100, "u3": 100}, 0) == "u1"


def test_loads_are_read_only_for_a_cap_or_a_least_loaded_pick() -> None:
    assert not domain.needs_loads(_rule(strategy="round_robin"))
    assert domain.needs_loads(_rule(strategy="round_robin", capacity=2))
    assert domain.needs_loads(_rule(strategy="least_loaded"))


def test_only_round_robin_picks_take_turns() -> None:
    round_robin, least_loaded = _rule(id="rr", strategy="round_robin"), _rule(id="ll", strategy="least_loaded")
    assert domain.takes_turns(round_robin) and not domain.takes_turns(least_loaded)
    assert domain.turns_wanted([round_robin, least_loaded, round_robin, least_loaded]) == {"rr": 2, "ll": 0}
    assert domain.turns_wanted([]) == {}


def test_an_import_batch_uses_its_turns_in_order_and_moves_its_loads() -> None:
    rule = _rule(strategy="round_robin", capacity=2, team="east")
    turns = {"r": deque([7, 8, 9])}
    assert domain.pick_in_batch(None, turns, {}) is None
    assert domain.pick_in_batch(rule, {}, {}) is None  # the rule was deleted since the rules were read
    assert domain.pick_in_batch(rule, turns, {}) == ("u2", "east", "r")  # turn 7
    assert domain.pick_in_batch(rule, turns, {"u3": 2}) == ("u1", "east", "r")  # turn 8: u3 is full
    assert domain.pick_in_batch(rule, turns, {"u1": 2, "u2": 2, "u3": 2}) == ("", "east", "r")  # turn 9: all
    # full, so the team's pool
    assert not turns["r"]
    least_loaded = _rule(strategy="least_loaded", team="east")
    assert domain.pick_in_batch(least_loaded, {"r": deque()}, {"u1": 1, "u2": 0, "u3": 1}) == ("u2", "east", "r")


def test_assignment_rule_validation() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_assignment_rule(_rule(strategy="random", user_ids=(), sources=frozenset({"tv"})), "x")
    assert {e.field for e in caught.value.errors} == {"strategy", "user_ids", "sources"}
    blanks = _rule(user_ids=("u1", " "), regions=frozenset({"east", ""}), industries=frozenset({" "}))
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_assignment_rule(blanks, "x")
    assert {e.field for e in caught.value.errors} == {"user_ids[1]", "regions", "industries"}
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_assignment_rule(_rule(user_ids=("u1", "u2", "u1"), team="   ", lead_team=" "), "x")
    assert {e.field for e in caught.value.errors} == {"user_ids", "team", "lead_team"}
    domain.validate_assignment_rule(_rule(sources=frozenset({"WeChat", "event"})), "x")  # matched case-blind


def test_first_contact_sla() -> None:
    policy = FollowUpPolicy(first_contact_hours=2)
    due = policy.first_contact_due(NOW)
    assert due == NOW + timedelta(hours=2)
    args = {"status": "new", "owner_id": "u1", "first_contacted_at": None, "due_at": due}
    assert not domain.is_first_contact_overdue(**args, now=NOW + timedelta(hours=1))
    assert domain.is_first_contact_overdue(**args, now=NOW + timedelta(hours=2))
    assert not domain.is_first_contact_overdue(**{**args, "first_contacted_at": NOW}, now=NOW + timedelta(hours=3))


def test_recycling_eligibility() -> None:
    policy = FollowUpPolicy(recycle_after_days=3)
    base = {"status": "new", "owner_id": "u1", "assigned_at": NOW - timedelta(days=4), "last_activity_at": None}
    assert domain.is_recyclable(**base, policy=policy, now=NOW)
    assert not domain.is_recyclable(**{**base, "last_activity_at": NOW - timedelta(days=1)}, policy=policy, now=NOW)
    assert domain.is_recyclable(
        **{**base, "status": "contacted", "last_activity_at": NOW - timedelta(days=3)}, policy=policy, now=NOW
    )
    assert not domain.is_recyclable(**{**base, "status": "qualified"}, policy=policy, now=NOW)
    assert not domain.is_recyclable(**{**base, "status": "converted"}, policy=policy, now=NOW)
    assert not domain.is_recyclable(**{**base, "owner_id": ""}, policy=policy, now=NOW)
    assert not domain.is_recyclable(**{**base, "assigned_at": NOW - timedelta(days=2)}, policy=policy, now=NOW)


def test_the_owner_a_lead_was_recycled_from_may_claim_it_back_only_after_the_cool_down() -> None:
    policy = FollowUpPolicy(pool_reclaim_cooldown_hours=24)
    recycled = {"recycled_from_id": "u1", "recycled_at": NOW, "policy": policy}
    with pytest.raises(Conflict) as caught:
        domain.ensure_reclaimable(claimant_id="u1", **recycled, now=NOW + timedelta(hours=23, minutes=59))
    assert caught.value.reason == "RECLAIM_COOLDOWN"
    assert "from 2026-01-11T12:00:00+00:00" in str(caught.value)  # until when
    domain.ensure_reclaimable(claimant_id="u1", **recycled, now=NOW + timedelta(hours=24))
    domain.ensure_reclaimable(claimant_id="u2", **recycled, now=NOW)  # anyone else at once
    # A lead never recycled (captured into the pool), or recycled before its owner was recorded.
    domain.ensure_reclaimable(claimant_id="u1", recycled_from_id="", recycled_at=None, policy=policy, now=NOW)
    domain.ensure_reclaimable(claimant_id="u1", recycled_from_id="", recycled_at=NOW, policy=policy, now=NOW)


def test_a_honeypot_is_a_field_name_people_never_fill() -> None:
    assert domain.validate_honeypot_field("") == []
    assert domain.validate_honeypot_field("fax_number") == []
    assert [e.field for e in domain.validate_honeypot_field("email")] == ["honeypot_field"]
    assert [e.field for e in domain.validate_honeypot_field("my field")] == ["honeypot_field"]
    assert [e.field for e in domain.validate_honeypot_field("   ")] == ["honeypot_field"]
    assert domain.fills_honeypot({"fax_number": "x"}, "fax_number")
    assert not domain.fills_honeypot({"fax_number": "  "}, "fax_number")
    assert not domain.fills_honeypot({"fax_number": "x"}, "")


def test_a_campaign_nothing_links_to_may_go() -> None:
    domain.ensure_campaign_unused(0, [])


@pytest.mark.parametrize(
    ("lead_count", "webform_ids", "named"),
    [
        (1, [], "in use by 1 lead:"),
        (3, [], "in use by 3 leads:"),
        (0, ["wf-1"], "in use by web form wf-1:"),
        (2, ["wf-1", "wf-2"], "in use by 2 leads and web forms wf-1, wf-2:"),
    ],
)
def test_a_campaign_in_use_stays_naming_its_links_and_to_end_it_instead(
    lead_count: int, webform_ids: list[str], named: str
) -> None:
    with pytest.raises(Conflict) as refused:
        domain.ensure_campaign_unused(lead_count, webform_ids)

    assert refused.value.reason == "CAMPAIGN_IN_USE"
    assert named in refused.value.detail and "end it (set its end date) instead" in refused.value.detail


# --- activities ----------------------------------------------------------------------------------

CALL = {"kind": "call", "outcome": " reached ", "notes": "", "occurred_at": NOW, "next_follow_up_at": None}


def test_an_activity_is_stored_with_its_outcome_trimmed() -> None:
    assert domain.checked_activity(CALL, NOW) == {**CALL, "outcome": "reached"}
    later = NOW + timedelta(days=1)
    assert domain.checked_activity({**CALL, "next_follow_up_at": later}, NOW)["next_follow_up_at"] == later


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"kind": "fax"}, ["kind"]),
        ({"kind": ""}, ["kind"]),
        ({"occurred_at": None}, ["occurred_at"]),  # an edit may not take away when it happened
        ({"occurred_at": NOW + CLOCK_SKEW + timedelta(seconds=1)}, ["occurred_at"]),
        ({"next_follow_up_at": NOW}, ["next_follow_up_at"]),
        ({"next_follow_up_at": NOW - timedelta(hours=1)}, ["next_follow_up_at"]),
        ({"kind": "fax", "occurred_at": NOW + timedelta(days=1)}, ["kind", "occurred_at"]),
    ],
)
def test_an_activity_names_every_field_at_fault(changes: dict[str, object], fields: list[str]) -> None:
    with pytest.raises(ValidationFailed) as refused:
        domain.checked_activity({**CALL, **changes}, NOW)
    assert [e.field for e in refused.value.errors] == fields


def test_last_activity_at_only_moves_forward() -> None:
    assert domain.advances_last_activity(None, NOW)
    assert domain.advances_last_activity(NOW, NOW + timedelta(minutes=1))
    assert not domain.advances_last_activity(NOW, NOW)
    assert not domain.advances_last_activity(NOW, NOW - timedelta(days=1))


def test_the_follow_up_task_follows_its_activitys_next_follow_up_at() -> None:
    later = NOW + timedelta(days=2)
    assert follow_up_change(later, has_open_task=True) == "move"
    assert follow_up_change(later, has_open_task=False) == "create"  # as logging it with that time would
    assert follow_up_change(None, has_open_task=True) == "cancel"
    assert follow_up_change(None, has_open_task=False) is None


def test_a_contact_does_the_first_contact_task_and_the_follow_ups_due_by_then_not_later_ones() -> None:
    assert domain.done_by_contact("first_contact", NOW + timedelta(hours=2), NOW)  # the SLA is met, due or not
    assert domain.done_by_contact("follow_up", NOW - timedelta(days=1), NOW)  # overdue
    assert domain.done_by_contact("follow_up", NOW, NOW)  # due as it happened
    assert not domain.done_by_contact("follow_up", NOW + timedelta(days=3), NOW)  # planned for later: still to do


def test_a_merge_names_the_dedupe_keys_it_would_fill() -> None:
    existing = {"name": "A", "email": "q1@x.cn", "phone": "", "external_id": ""}
    incoming = domain.validate_lead({"name": "Q3", "email": "q1@x.cn", "phone": "13700006169", "external_id": "X-1"})
    assert domain.keys_a_merge_fills(existing, incoming) == ["phone:+8613700006169", "external_id:X-1"]
    assert domain.keys_a_merge_fills({**existing, "phone": "1", "external_id": "Y"}, incoming) == []


def test_a_merge_leaves_unfilled_a_dedupe_key_another_open_lead_holds() -> None:
    existing = {"name": "A", "company": "", "email": "q1@x.cn", "phone": "", "tags": [], "custom": {}}
    incoming = domain.validate_lead({"name": "Q3", "email": "q1@x.cn", "phone": "13700006169", "company": "Co"})
    changes = domain.merge_into(existing, incoming, {"phone:+8613700006169"})
    assert changes == {"company": "Co"}  # neither phone nor phone_norm; the other values still merge
    assert domain.merge_into(existing, incoming, {"phone:+8613700000000"})["phone_norm"] == "+8613700006169"


def test_a_merge_leaves_unfilled_a_held_email_and_external_id_too() -> None:
    existing = {"name": "", "email": "", "phone": "+86 137 0000 6169", "external_id": "", "tags": [], "custom": {}}
    incoming = domain.validate_lead({"name": "Q", "email": " Q1@x.cn", "phone": "13700006169", "external_id": "X-1"})
    changes = domain.merge_into(existing, incoming, {"email:q1@x.cn", "external_id:X-1"})
    assert changes == {"name": "Q"}


@pytest.mark.parametrize(
    ("matched", "its_account", "into", "linked"),
    [
        ("c-1", "a-1", "a-1", "c-1"),
        ("c-1", "a-2", "a-1", ""),  # the person, at another company: a contact of this one is created
        ("c-1", "", "a-1", ""),  # gone, or out of the caller's sight
        ("", "", "a-1", ""),  # the lead matched nobody
        ("c-1", "", "", ""),
    ],
)
def test_a_conversion_links_the_matched_contact_only_when_it_is_a_live_contact_of_that_account(
    matched: str, its_account: str, into: str, linked: str
) -> None:
    assert (
        domain.contact_to_reuse(matched_contact_id=matched, matched_contact_account_id=its_account, account_id=into)
        == linked
    )


def test_a_converted_lead_answers_a_request_asking_for_nothing_new_and_refuses_one_asking_for_more() -> None:
    done = {"converted_account_id": "a-1", "converted_contact_id": "c-1", "converted_opportunity_id": ""}
    domain.ensure_repeats_conversion(account_id="", create_opportunity=False, **done)
    domain.ensure_repeats_conversion(account_id="a-1", create_opportunity=False, **done)
    with_deal = {**done, "converted_opportunity_id": "o-1"}
    domain.ensure_repeats_conversion(account_id="a-1", create_opportunity=True, **with_deal)
    with pytest.raises(Conflict) as other_account:
        domain.ensure_repeats_conversion(account_id="a-2", create_opportunity=False, **with_deal)
    assert other_account.value.reason == "ILLEGAL_TRANSITION"
    assert "account a-1, contact c-1 and opportunity o-1" in other_account.value.detail
    assert "account a-2" in other_account.value.detail
    with pytest.raises(Conflict) as more:
        domain.ensure_repeats_conversion(account_id="", create_opportunity=True, **done)
    assert "account a-1, contact c-1, no opportunity" in more.value.detail
    assert "an opportunity" in more.value.detail


def test_a_scorer_needs_activity_counts_only_for_an_enabled_rule_counting_activities() -> None:
    """The rescoring job counts a batch's activities only when a rule would read them."""
    fields = [ScoringRule(id="f", field="industry", operator="equals", value="software", points=10)]
    visits_off = ScoringRule(id="v", activity_kind="visit", min_count=1, points=20, enabled=False)
    assert not domain.Scorer(fields).counts_activities
    assert not domain.Scorer([*fields, visits_off]).counts_activities
    assert domain.Scorer([*fields, ScoringRule(id="a", activity_kind="any", min_count=1, points=5)]).counts_activities
    assert not domain.Scorer([]).counts_activities


def test_a_contact_made_before_the_lead_was_captured_counts_at_its_capture() -> None:
    captured = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    assert domain.counted_from_capture(datetime(2021, 6, 1, tzinfo=UTC), captured_at=captured) == captured
    later = captured + timedelta(hours=1)
    assert domain.counted_from_capture(later, captured_at=captured) == later


# --- who manages an assignment rule, and what is no new assignment --------------------------------

EAST_MANAGER = RecordScope(ScopeKind.TEAM, owner_id="m1", team="east", region="north")


EAST_LEADS_ONLY = ("lead_team", "you may manage only rules for the leads of team east")


@pytest.mark.parametrize(
    ("scope", "team", "lead_team", "regions", "refused"),
    [
        (RecordScope(ScopeKind.ALL), "west", "", [], None),
        (RecordScope(ScopeKind.ALL), "west", "east", [], None),
        (EAST_MANAGER, "east", "east", [], None),
        (EAST_MANAGER, "east", "EAST", ["south"], None),  # matched case-blind, as a region is
        (EAST_MANAGER, "east", "", [], EAST_LEADS_ONLY),  # a catch-all: every team's new leads
        (EAST_MANAGER, "east", "west", ["north"], EAST_LEADS_ONLY),
        (EAST_MANAGER, "west", "east", [], ("team", "you may manage only rules of team east")),
        (EAST_MANAGER, "", "east", ["north"], ("team", "you may manage only rules of team east")),
        (RecordScope(ScopeKind.REGION, region="north"), "west", "", ["North"], None),
        (
            RecordScope(ScopeKind.REGION, region="north"),
            "",
            "",
            ["north", "south"],
            ("regions", "you may manage only rules of region north"),
        ),
        (
            RecordScope(ScopeKind.REGION, region="north"),
            "",
            "",
            [],
            ("regions", "you may manage only rules of region north"),
        ),
        (
            RecordScope(ScopeKind.OWN, owner_id="r1", team="east"),
            "east",
            "east",
            [],
            ("team", "you may manage only rules of team east"),
        ),
    ],
)
def test_a_rule_is_managed_within_the_callers_scope_on_assigning_leads(
    scope: RecordScope, team: str, lead_team: str, regions: list[str], refused: tuple[str, str] | None
) -> None:
    error = domain.rule_scope_error(scope, team=team, lead_team=lead_team, regions=regions)
    assert (None if error is None else (error.field, error.message)) == refused


def test_a_team_managers_rule_is_their_teams_queue_unless_it_names_one() -> None:
    catch_all = _rule(team="east")
    assert domain.rule_in_callers_scope(catch_all, EAST_MANAGER).lead_team == "east"
    assert domain.rule_in_callers_scope(_rule(team="east", lead_team="west"), EAST_MANAGER).lead_team == "west"
    for others in (RecordScope(ScopeKind.ALL), RecordScope(ScopeKind.REGION, region="north")):
        assert domain.rule_in_callers_scope(catch_all, others) == catch_all  # any lead, as before


def test_a_rule_for_a_teams_leads_matches_only_leads_of_that_team() -> None:
    east_queue = _rule(id="east-queue", position=-1000, lead_team="east")
    anyone = _rule(id="anyone", position=1)
    rules = [east_queue, anyone]
    assert domain.first_matching_rule(rules, {"team": "East", "region": "cn-west"}).id == "east-queue"  # type: ignore[union-attr]
    assert domain.first_matching_rule(rules, {"team": "west", "region": "cn-west"}).id == "anyone"  # type: ignore[union-attr]
    assert domain.first_matching_rule(rules, {"region": "cn-west"}).id == "anyone"  # type: ignore[union-attr]
    assert domain.assignment_rule_matches(anyone, {"team": "west"})


@pytest.mark.parametrize("scope", [EAST_MANAGER, RecordScope(ScopeKind.REGION, region="north")])
def test_only_a_caller_assigning_in_every_scope_changes_the_companys_scoring(scope: RecordScope) -> None:
    assert domain.scoring_change_error(RecordScope(ScopeKind.ALL), "scoring rules") is None
    assert domain.scoring_change_error(scope, "scoring rules") == (
        "scoring rules apply to every lead: you may manage them only with the assign permission on all leads"
    )


@pytest.mark.parametrize(
    ("owner_id", "team", "unchanged"),
    [("u1", "", True), ("u1", "east", True), ("u1", "west", False), ("u2", "", False), ("", "", False)],
)
def test_assigning_a_lead_to_the_owner_and_team_it_has_is_no_new_assignment(
    owner_id: str, team: str, unchanged: bool
) -> None:
    lead = {"owner_id": "u1", "team": "east", "in_pool": False}
    assert domain.already_assigned(lead, owner_id=owner_id, team=team) is unchanged
    assert not domain.already_assigned({**lead, "in_pool": True}, owner_id="u1", team="")


@pytest.mark.parametrize(("team", "unchanged"), [("", True), ("east", True), ("west", False)])
def test_sending_a_pool_lead_to_the_pool_it_is_in_is_no_change(team: str, unchanged: bool) -> None:
    in_pool = {"owner_id": "", "team": "east", "in_pool": True}
    assert domain.already_assigned(in_pool, owner_id="", team=team) is unchanged
    assert not domain.already_assigned({**in_pool, "in_pool": False, "owner_id": "u1"}, owner_id="", team="")


WORKED = {"owner_id": "leaver", "in_pool": False, "status": "new"}


@pytest.mark.parametrize("status", ["new", "contacted", "qualified"])
def test_a_bulk_transfer_moves_a_lead_its_rep_is_working(status: str) -> None:
    assert domain.transferable({**WORKED, "status": status}, from_owner_id="leaver")


@pytest.mark.parametrize(
    "lead",
    [
        {**WORKED, "status": "converted"},  # stays with who converted it
        {**WORKED, "status": "unqualified"},  # disqualified: closed too
        {**WORKED, "owner_id": "", "in_pool": True, "status": "recycled"},  # in the pool: nobody's
        {**WORKED, "in_pool": True},  # in the pool, however it got there
        {**WORKED, "owner_id": "someone-else"},
    ],
)
def test_a_bulk_transfer_leaves_closed_pool_and_other_reps_leads(lead: dict[str, object]) -> None:
    assert not domain.transferable(lead, from_owner_id="leaver")


def test_a_bulk_transfer_from_nobody_moves_no_lead() -> None:
    assert not domain.transferable({**WORKED, "owner_id": "", "in_pool": True}, from_owner_id="")
    assert not domain.transferable({**WORKED, "owner_id": ""}, from_owner_id="")


@given(status=st.sampled_from(domain.STATUSES), in_pool=st.booleans(), owner=st.sampled_from(["leaver", "other", ""]))
def test_a_bulk_transfer_moves_exactly_the_owned_open_leads_out_of_the_pool(
    status: str, in_pool: bool, owner: str
) -> None:
    lead = {"owner_id": owner, "in_pool": in_pool, "status": status}
    moved = domain.transferable(lead, from_owner_id="leaver")
    assert moved == (owner == "leaver" and not in_pool and status in domain.OPEN_STATUSES and status != "recycled")


@pytest.mark.parametrize(
    ("given_ids", "errors"),
    [
        (("", "", ""), [("from_owner_id", "is required"), ("to_owner_id", "is required")]),
        (("leaver", "", ""), [("to_owner_id", "is required")]),
        ((" ", "\t", "  "), [(n, "must not be blank") for n in ("from_owner_id", "to_owner_id", "to_team")]),
        (("leaver", "leaver", ""), [("to_owner_id", "must differ from from_owner_id")]),
        (("leaver", "leaver", " "), [("to_team", "must not be blank")]),
    ],
)
def test_a_bulk_transfer_names_each_owner_id_missing_blank_or_the_same(
    given_ids: tuple[str, str, str], errors: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.check_transfer(*given_ids)
    assert [(e.field, e.message) for e in caught.value.errors] == errors


def test_a_bulk_transfer_to_another_rep_with_or_without_a_team_is_valid() -> None:
    domain.check_transfer("leaver", "taker", "")
    domain.check_transfer("leaver", "taker", "west")


@pytest.mark.parametrize(
    ("requested", "chosen", "created", "resumes"),
    [
        ("", "", False, True),  # nothing chosen yet
        ("acc-9", "", False, True),
        ("", "acc-new", True, True),  # the attempt made the account a request naming none asks for
        ("acc-new", "acc-new", True, True),  # named by the id the failed answer may have shown
        ("acc-1", "acc-new", True, False),
        ("acc-1", "acc-1", False, True),
        ("", "acc-1", False, False),
        ("acc-2", "acc-1", False, False),
    ],
)
def test_an_interrupted_conversion_resumes_for_a_request_asking_for_its_account(
    requested: str, chosen: str, created: bool, resumes: bool
) -> None:
    assert (
        domain.same_account_choice(requested_account_id=requested, account_id=chosen, account_created=created)
        is resumes
    )


def test_a_rule_may_route_to_a_teams_pool_without_naming_reps() -> None:
    team_only = AssignmentRule(id="r-team", position=1, user_ids=(), team="east")
    domain.validate_assignment_rule(team_only, "east queue")
    with pytest.raises(ValidationFailed) as refused:
        domain.validate_assignment_rule(AssignmentRule(id="r", position=1, user_ids=()), "nobody")
    assert [e.field for e in refused.value.errors] == ["user_ids"]
    assert not domain.takes_turns(team_only) and not domain.needs_loads(team_only)
    assert domain.pick_in_batch(team_only, {"r-team": deque()}, {}) == ("", "east", "r-team")


def test_a_full_rule_sends_its_lead_to_its_teams_pool_or_the_shared_one() -> None:
    capped = AssignmentRule(id="r1", position=1, user_ids=("u1",), capacity=1, team="east")
    assert domain.routed(capped, domain.pick_assignee(capped, {"u1": 1}, 0)) == ("", "east", "r1")
    teamless = AssignmentRule(id="r2", position=1, user_ids=("u1",), capacity=1)
    assert domain.routed(teamless, domain.pick_assignee(teamless, {"u1": 1}, 0)) is None
    assert domain.routed(teamless, "u1") == ("u1", "", "r2")


@pytest.mark.parametrize(
    ("filters", "fields"),
    [
        (domain.TaskFilters(), []),
        (domain.TaskFilters(status="done", due="today"), []),
        (domain.TaskFilters(status="finished"), ["status"]),
        (domain.TaskFilters(kind="call"), ["kind"]),
        (domain.TaskFilters(due="tomorrow"), ["due"]),
        (domain.TaskFilters(status="done", due="overdue"), ["due"]),
    ],
)
def test_task_filters_name_each_field_they_refuse(filters: domain.TaskFilters, fields: list[str]) -> None:
    assert [e.field for e in domain.task_filter_errors(filters)] == fields


def test_a_changes_event_names_lead_fields_not_storage_columns() -> None:
    changes = {"phone": "+86 138 0013 8000", "phone_norm": "8613800138000", "tags": ["vip"], "updated_at": NOW}
    assert domain.changed_lead_fields(changes) == ["phone", "tags"]


def test_a_leads_dedupe_keys_are_its_filled_email_phone_and_external_id() -> None:
    assert domain.dedupe_keys("li@x.cn", None, "p-1") == {"email": "email:li@x.cn", "external_id": "external_id:p-1"}
    assert domain.dedupe_keys("", "", "") == {}
    clean = domain.validate_lead({"name": "Li", "phone": "13800138000"})
    assert domain.dedupe_key_fields(clean) == {"phone": "phone:+8613800138000"}


def test_a_search_looks_for_its_digits_in_a_phone_and_its_text_elsewhere() -> None:
    assert domain.search_term("phone", "138 0013-8000") == "13800138000"
    assert domain.search_term("phone", "138") == ""  # too few digits to mean one phone
    assert domain.search_term("phone", "Room 1234, Acme Ltd") == ""  # mostly not digits: not a phone
    assert domain.search_term("name", "ACME Ltd") == "acme ltd"
