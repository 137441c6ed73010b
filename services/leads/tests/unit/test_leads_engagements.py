"""Web behaviour in lead scoring (反复看产品页就打个高分): engagement rules count a lead's engagements
by kind and URL (case-insensitive), at least `min_count`; rules that could never count are refused
naming the field; an engagement a marketing system reports is checked item by item, and a lead's
engagements are listed of one known kind or of every kind."""

from datetime import UTC, datetime, timedelta

import pytest
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.timeutil import CLOCK_SKEW
from leads import domain
from leads.domain import EngagementInput, ScoringRule

NOW = datetime(2026, 12, 18, 9, 0, tzinfo=UTC)
PRODUCT_VIEWS = ScoringRule(id="p", engagement_kind="page_view", url_contains="/Product", min_count=3, points=30)


def test_three_views_of_a_product_page_score_the_rules_points() -> None:
    scorer = domain.Scorer([PRODUCT_VIEWS])
    views = {("page_view", "https://x.cn/PRODUCT/a"): 2, ("page_view", "https://x.cn/product/b?utm=1"): 1}

    assert scorer.score({}, {}, views) == (30, ["p"])


@pytest.mark.parametrize(
    "counts",
    [
        {},
        {("page_view", "https://x.cn/product/a"): 2},  # fewer than min_count
        {("page_view", "https://x.cn/pricing"): 5},  # another URL
        {("email_click", "https://x.cn/product/a"): 5},  # another kind
        {("page_view", "https://x.cn/product"): 1, ("page_view", "https://x.cn/prod"): 4},
    ],
)
def test_an_engagement_rule_counts_only_its_kind_and_url(counts: domain.EngagementCounts) -> None:
    assert domain.Scorer([PRODUCT_VIEWS]).score({}, {}, counts) == (0, [])


def test_an_engagement_rule_without_a_url_counts_every_engagement_of_its_kind() -> None:
    opens = ScoringRule(id="o", engagement_kind="email_open", min_count=2, points=10)
    counts = {("email_open", ""): 1, ("email_open", "https://mail/x"): 1, ("page_view", ""): 9}

    assert domain.engagement_count("email_open", "", counts) == 2
    assert domain.Scorer([opens]).score({}, {}, counts) == (10, ["o"])


def test_engagements_are_no_activities_and_activities_no_engagements() -> None:
    calls = ScoringRule(id="c", activity_kind="any", min_count=1, points=20)
    scorer = domain.Scorer([calls, PRODUCT_VIEWS])

    assert scorer.score({}, {}, {("page_view", "/product"): 5}) == (30, ["p"])
    assert scorer.score({}, {"call": 5}) == (20, ["c"])  # no engagements given: none counted


def test_a_scorer_names_the_engagement_kinds_its_enabled_rules_count() -> None:
    off = ScoringRule(id="d", engagement_kind="download", min_count=1, points=5, enabled=False)
    field = ScoringRule(id="f", field="email", operator="present", points=5)

    assert domain.Scorer([PRODUCT_VIEWS, off, field]).engagement_kinds == {"page_view"}
    assert domain.Scorer([off, field]).engagement_kinds == frozenset()


def test_engagement_rules_that_can_count_are_accepted() -> None:
    for rule in (
        PRODUCT_VIEWS,
        ScoringRule(id="", engagement_kind="webinar", min_count=1, points=-5),
        ScoringRule(id="", engagement_kind="download", url_contains="whitepaper.pdf", min_count=1, points=10),
    ):
        domain.validate_scoring_rule(rule, "rule")


@pytest.mark.parametrize(
    ("rule", "fields"),
    [
        (ScoringRule(id="", engagement_kind="page_visit", min_count=1, points=10), ["engagement_kind"]),
        (ScoringRule(id="", engagement_kind="any", min_count=1, points=10), ["engagement_kind"]),
        (ScoringRule(id="", engagement_kind="page_view", min_count=0, points=10), ["min_count"]),
        (ScoringRule(id="", engagement_kind="page_view", url_contains="  ", min_count=1, points=10), ["url_contains"]),
        # URLs are kept trimmed: " /pricing" would never match one.
        (
            ScoringRule(id="", engagement_kind="page_view", url_contains=" /pricing", min_count=1, points=10),
            ["url_contains"],
        ),
        (
            ScoringRule(id="", engagement_kind="page_view", url_contains="x" * 2001, min_count=1, points=10),
            ["url_contains"],
        ),
        (ScoringRule(id="", engagement_kind="page_view", min_count=1, field="email", points=10), ["field"]),
        (
            ScoringRule(id="", engagement_kind="page_view", activity_kind="call", min_count=1, points=10),
            ["engagement_kind"],
        ),
        (ScoringRule(id="", activity_kind="call", url_contains="/product", min_count=1, points=10), ["url_contains"]),
        (
            ScoringRule(id="", field="email", operator="present", url_contains="/product", points=10),
            ["url_contains"],
        ),
        (ScoringRule(id="", engagement_kind="page_view", min_count=1, points=0), ["points"]),
    ],
)
def test_an_engagement_rule_that_could_never_count_is_refused_naming_the_field(
    rule: ScoringRule, fields: list[str]
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_scoring_rule(rule, "rule")
    assert [e.field for e in caught.value.errors] == fields


def _item(**given: object) -> EngagementInput:
    values: dict[str, object] = {
        "kind": "page_view",
        "external_id": "evt-1",
        "occurred_at": NOW - timedelta(minutes=5),
        "url": " https://x.cn/product ",
        "lead_id": "lead-1",
    }
    values.update(given)
    return EngagementInput(**values)  # type: ignore[arg-type]


def test_an_engagement_is_stored_trimmed_with_its_email_normalised() -> None:
    checked = domain.checked_engagement(_item(lead_id="", email=" Ann@Example.COM ", external_id=" e1 "), NOW)

    assert checked == domain.CheckedEngagement(
        kind="page_view",
        external_id="e1",
        occurred_at=NOW - timedelta(minutes=5),
        url="https://x.cn/product",
        lead_id="",
        email_norm="ann@example.com",
    )


def test_an_engagement_within_the_clock_skew_is_accepted() -> None:
    assert not isinstance(domain.checked_engagement(_item(occurred_at=NOW + CLOCK_SKEW), NOW), FieldError)


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"kind": "call"}, "kind"),
        ({"kind": ""}, "kind"),
        ({"external_id": "  "}, "external_id"),
        ({"external_id": "e" * 201}, "external_id"),
        ({"url": "u" * 2001}, "url"),
        ({"occurred_at": None}, "occurred_at"),
        ({"occurred_at": NOW + CLOCK_SKEW + timedelta(seconds=1)}, "occurred_at"),
        ({"lead_id": ""}, "lead_id"),
        ({"email": "a@b.cn"}, "lead_id"),  # both
        ({"lead_id": "", "email": "not an email"}, "email"),
    ],
)
def test_an_engagement_at_fault_names_its_field(given: dict[str, object], field: str) -> None:
    error = domain.checked_engagement(_item(**given), NOW)

    assert isinstance(error, FieldError)
    assert error.field == field


def test_a_call_records_at_most_500_engagements() -> None:
    domain.check_engagement_count(domain.MAX_ENGAGEMENTS)
    with pytest.raises(ValidationFailed) as caught:
        domain.check_engagement_count(domain.MAX_ENGAGEMENTS + 1)
    assert [e.field for e in caught.value.errors] == ["items"]


@pytest.mark.parametrize("kind", ["", *domain.ENGAGEMENT_KINDS])
def test_a_leads_engagements_are_listed_of_every_kind_or_of_one(kind: str) -> None:
    assert domain.engagement_filter_error(kind) is None


@pytest.mark.parametrize("kind", ["page_visit", "Page_View", " page_view"])
def test_a_list_of_a_kind_that_is_none_is_refused_naming_kind(kind: str) -> None:
    error = domain.engagement_filter_error(kind)
    assert error is not None and error.field == "kind"
    assert error.message == "is not one of page_view, email_open, email_click, download, webinar"
