"""Sales rules without I/O: stage gates, anti-collision, forecast arithmetic, target periods and
attainment, approval chains,
the contract status machine, payment plans, allocation, over-payment and invoice limits."""

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from crm_platform.errors import Conflict, PermissionDenied, ValidationFailed
from crm_platform.money import CENT, Money, check_amount
from crm_platform.timeutil import CLOCK_SKEW
from hypothesis import given, settings
from hypothesis import strategies as st
from sales import domain as d

pytestmark = pytest.mark.unit

DEFAULT = d.Pipeline(id="p1", name="Default", stages=d.DEFAULT_STAGES, is_default=True)
TODAY = date(2026, 11, 23)

cents = st.integers(min_value=1, max_value=10**11).map(lambda n: Decimal(n).scaleb(-2))


def cny(amount: str | Decimal) -> Money:
    return Money(Decimal(amount), "CNY")


def kwd(amount: str | Decimal) -> Money:
    """Kuwaiti dinars: a three-decimal currency (1000 fils), rounded to the fils."""
    return Money(Decimal(amount), "KWD")


# ---------------------------------------------------------------- stage gates


def test_default_pipeline_is_valid_and_matches_the_spec() -> None:
    d.validate_stages(d.DEFAULT_STAGES)
    assert [(s.key, int(s.probability)) for s in d.DEFAULT_STAGES] == [
        ("initial_contact", 10),
        ("needs_confirmed", 25),
        ("solution_demo", 50),
        ("quote_negotiation", 75),
        ("contract_signing", 90),
        ("won", 100),
        ("lost", 0),
    ]


def test_gate_names_every_missing_field_including_skipped_stages() -> None:
    fields: dict[str, object] = {"primary_contact_id": "", "expected_close_date": "", "amount": cny("0")}
    missing = d.missing_gate_fields(DEFAULT, "quote_negotiation", fields)
    assert missing == ["primary_contact_id", "expected_close_date", "amount", "line_items"]
    with pytest.raises(ValidationFailed) as raised:
        d.check_stage_gate(DEFAULT, "solution_demo", fields)
    assert [e.field for e in raised.value.errors] == ["primary_contact_id", "expected_close_date"]


def test_gate_passes_when_fields_are_filled() -> None:
    fields: dict[str, object] = {
        "primary_contact_id": "c1",
        "expected_close_date": "2026-12-31",
        "amount": cny("10"),
        "line_items": ["x"],
        "next_step": "sign",
    }
    d.check_stage_gate(DEFAULT, "contract_signing", fields)


def test_lost_stage_does_not_inherit_open_gates_but_won_needs_an_amount() -> None:
    assert d.missing_gate_fields(DEFAULT, "lost", {}) == []
    assert "amount" in d.missing_gate_fields(DEFAULT, "won", {"amount": cny("0")})


def test_unknown_stage_names_the_field() -> None:
    with pytest.raises(ValidationFailed) as raised:
        DEFAULT.stage("nope")
    assert raised.value.errors[0].field == "stage"


def test_pipeline_validation_names_bad_stages() -> None:
    stages = (
        d.Stage("a", "A", Decimal(120)),
        d.Stage("a", "", Decimal(10), ("colour",)),
        d.Stage("w", "W", Decimal(100), outcome=d.Outcome.WON),
    )
    with pytest.raises(ValidationFailed) as raised:
        d.validate_stages(stages)
    fields = {e.field for e in raised.value.errors}
    assert {"stages[0].probability", "stages[1].key", "stages[1].name", "stages[1].required_fields", "stages"} <= fields


# ---------------------------------------------------------------- anti-collision


def test_collision_with_another_owner_is_a_conflict_naming_the_deal() -> None:
    deals = [d.OpenDeal(id="o1", owner_id="alice", name="ERP rollout")]
    with pytest.raises(Conflict) as raised:
        d.check_collision(owner_id="bob", open_deals=deals, override=False, caller_roles=["sales_rep"])
    assert raised.value.existing_id == "o1"
    assert "o1" in raised.value.detail
    # Its name and owner only to a caller who may read the deal.
    assert "alice" not in raised.value.detail and "ERP rollout" not in raised.value.detail
    visible = [d.OpenDeal(id="o1", owner_id="alice", name="ERP rollout", visible=True)]
    with pytest.raises(Conflict) as named:
        d.check_collision(owner_id="bob", open_deals=visible, override=False, caller_roles=["sales_manager"])
    assert "'ERP rollout' of owner alice" in named.value.detail.replace("(", "").replace(")", "")


def test_same_owner_does_not_collide() -> None:
    deals = [d.OpenDeal(id="o1", owner_id="alice", name="x")]
    assert d.check_collision(owner_id="alice", open_deals=deals, override=False, caller_roles=[]) is None


def test_only_managers_may_override_and_the_collision_is_returned() -> None:
    deals = [d.OpenDeal(id="o1", owner_id="alice", name="x")]
    with pytest.raises(PermissionDenied):
        d.check_collision(owner_id="bob", open_deals=deals, override=True, caller_roles=["sales_rep"])
    hit = d.check_collision(owner_id="bob", open_deals=deals, override=True, caller_roles=["sales_manager"])
    assert hit is not None and hit.id == "o1"


def test_product_lines_are_compared_whatever_their_case_width_or_spacing() -> None:
    full_width = "\uff23\uff4c\uff4f\uff55\uff44\u3000\uff25\uff32\uff30"  # as a Chinese IME types it
    written = ["Cloud ERP", "cloud erp", "CLOUD ERP", "Cloud  ERP", " Cloud ERP ", "Cloud\tERP", full_width]
    assert {d.product_line_key(line) for line in written} == {"cloud erp"}
    assert d.product_line_key("STRASSE") == d.product_line_key("Straße")  # case-folded, not only lower-cased
    # Words stay apart and other lines stay other lines.
    assert len({d.product_line_key(line) for line in ("Cloud ERP", "CloudERP", "Cloud CRM")}) == 3
    assert d.product_line_key("  ") == ""


def test_only_an_open_deal_changes_hands() -> None:
    d.check_owner_change("open", opportunity_id="o")
    for status in ("won", "lost"):
        with pytest.raises(Conflict) as raised:
            d.check_owner_change(status, opportunity_id="o")
        assert raised.value.reason == "ILLEGAL_STATE" and "credited its owner" in raised.value.detail


# ---------------------------------------------------------------- line items


def test_line_totals_apply_discounts_per_line() -> None:
    items = [
        d.LineItem("p1", "GTX Pro", "GTX", Decimal(3), cny("4821"), Decimal("12.5")),
        d.LineItem("p2", "MG Special", "MG", Decimal(1), cny("55"), Decimal(0)),
    ]
    totals = d.line_totals(items)
    assert totals.subtotal == Decimal("14518")
    assert totals.discount_total == Decimal("1807.88")  # 14463 x 12.5 % = 1807.875 → half up
    assert totals.total == Decimal("12710.12")
    assert totals.max_discount_percent == Decimal("12.5")


def test_line_totals_in_a_currency_without_minor_units_round_to_whole_units() -> None:
    yen = Money(Decimal("999"), "JPY")
    items = [
        d.LineItem("p1", "GTX Pro", "GTX", Decimal("1.5"), yen, Decimal(15)),  # 1498.5 gross
    ]
    totals = d.line_totals(items)
    assert totals.subtotal == Decimal(1499)  # half up
    assert totals.discount_total == Decimal(225)  # 1498.5 x 15 % = 224.775
    assert totals.total == Decimal(1274)


def test_line_totals_in_a_three_decimal_currency_round_to_the_thousandth() -> None:
    items = [d.LineItem("p1", "GTX Pro", "GTX", Decimal(3), kwd("12.345"), Decimal("12.5"))]
    assert d.validate_line_items(items) == "KWD"
    totals = d.line_totals(items)
    assert totals.subtotal == Decimal("37.035")
    assert totals.discount_total == Decimal("4.629")  # 37.035 x 12.5 % = 4.629375
    assert totals.total == Decimal("32.406")


def test_a_price_in_a_three_decimal_currency_has_at_most_three_places() -> None:
    items = [d.LineItem("p1", "GTX Pro", "GTX", Decimal(1), kwd("12.3456"))]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items(items)
    assert [(e.field, e.message) for e in raised.value.errors] == [
        ("line_items[0].unit_price.amount", "at most 3 decimal places")
    ]


def test_a_price_in_a_currency_without_minor_units_is_whole() -> None:
    items = [d.LineItem("p1", "GTX Pro", "GTX", Decimal(1), Money(Decimal("999.50"), "JPY"))]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items(items)
    assert [e.field for e in raised.value.errors] == ["line_items[0].unit_price.amount"]


def test_line_items_need_one_currency_and_sane_values() -> None:
    items = [
        d.LineItem("p1", "A", "L", Decimal(0), cny("1"), Decimal(101)),
        d.LineItem("p2", "B", "L", Decimal(1), Money(Decimal(1), "USD")),
    ]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items(items)
    fields = {e.field for e in raised.value.errors}
    assert fields == {"line_items[0].quantity", "line_items[0].discount_percent", "line_items"}


def test_amount_precision_and_sign_are_checked() -> None:
    assert check_amount(Decimal("1.005"), field="amount", currency="CNY")[0].message == "at most 2 decimal places"
    assert check_amount(Decimal("-1"), field="amount", currency="CNY")[0].field == "amount"
    assert check_amount(Decimal("0"), field="amount", currency="CNY", allow_zero=False)


@pytest.mark.parametrize("amount", ["1e30", "-1e30", "1e999999"])
def test_huge_amounts_are_validation_errors_not_decimal_overflows(amount: str) -> None:
    # Regression (fuzz): quantizing such a value overflowed the decimal context -> 500.
    errors = check_amount(Decimal(amount), field="amount", currency="CNY")
    assert [e.field for e in errors] == ["amount"]


def test_line_item_quantities_and_totals_stay_in_range() -> None:
    # Regression (fuzz): a quantity of 1e30 made the line total overflow (decimal context, NUMERIC column).
    items = [
        d.LineItem("p1", "A", "L", Decimal("1e30"), cny("1")),
        d.LineItem("p2", "B", "L", Decimal(1_000_000), cny("999999999999.99")),
    ]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items(items)
    assert [e.field for e in raised.value.errors] == ["line_items[0].quantity", "line_items[1].quantity"]
    in_range_but_too_much = [d.LineItem(f"p{i}", "A", "L", Decimal(1), cny("999999999999.99")) for i in range(2)]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items(in_range_but_too_much)
    assert [e.field for e in raised.value.errors] == ["line_items"]


def test_stage_probability_and_rotting_days_are_bounded() -> None:
    # Regression (fuzz): probability "1e30" overflowed quantize -> 500; rotting days beyond what a
    # date can subtract broke every `rotting` query once such a pipeline existed.
    stages = [
        d.Stage("a", "A", Decimal("1e30"), rotting_days=d.MAX_ROTTING_DAYS + 1),
        *d.DEFAULT_STAGES[-2:],
    ]
    with pytest.raises(ValidationFailed) as raised:
        d.validate_stages(stages)
    assert {e.field: e.message for e in raised.value.errors} == {
        "stages[0].probability": "must be between 0 and 100",
        "stages[0].rotting_days": f"must be between 0 and {d.MAX_ROTTING_DAYS}",
    }
    d.validate_stages([d.Stage("a", "A", Decimal(10), rotting_days=d.MAX_ROTTING_DAYS), *d.DEFAULT_STAGES[-2:]])


def test_a_stage_key_fits_the_column_deals_store_it_in() -> None:
    longest = "k" * d.CODE_LENGTH
    d.validate_stages([d.Stage(longest, "A", Decimal(10)), *d.DEFAULT_STAGES[-2:]])
    with pytest.raises(ValidationFailed) as raised:
        d.validate_stages([d.Stage(longest + "k", "A", Decimal(10)), *d.DEFAULT_STAGES[-2:]])
    assert {e.field: e.message for e in raised.value.errors} == {"stages[0].key": "at most 64 characters"}


def test_a_line_items_product_line_fits_the_deals_product_line() -> None:
    d.validate_line_items([d.LineItem("p", "P", "L" * d.NAME_LENGTH, Decimal(1), cny("1"))])
    with pytest.raises(ValidationFailed) as raised:
        d.validate_line_items([d.LineItem("p", "P", "L" * (d.NAME_LENGTH + 1), Decimal(1), cny("1"))])
    assert [e.field for e in raised.value.errors] == ["line_items[0].product_line"]


def test_a_deals_amount_is_in_its_line_items_currency() -> None:
    d.check_line_currency("CNY", "CNY")
    d.check_line_currency("USD", None)  # without line items any currency goes
    with pytest.raises(ValidationFailed) as raised:
        d.check_line_currency("USD", "CNY")
    assert raised.value.errors[0].field == "amount.currency" and "CNY" in raised.value.errors[0].message


# ---------------------------------------------------------------- forecast


def deal(
    status: str, amount: str, probability: int, category: str, month: int, owner: str = "a", team: str = "t"
) -> d.ForecastDeal:
    return d.ForecastDeal(
        status=d.OpportunityStatus(status),
        amount=Decimal(amount),
        currency="CNY",
        probability=Decimal(probability),
        category=d.ForecastCategory(category),
        month=month,
        owner_id=owner,
        team=team,
    )


def test_forecast_columns() -> None:
    deals = [
        deal("open", "1000", 10, "pipeline", 202611),
        deal("open", "2000", 50, "best_case", 202611),
        deal("open", "3000", 90, "commit", 202611),
        deal("open", "4000", 75, "omitted", 202611),
        deal("won", "5000", 100, "commit", 202611),
        deal("lost", "6000", 0, "pipeline", 202611),
    ]
    [line] = d.forecast(deals, quarter=False, by_team=False)
    assert (line.period, line.group, line.currency) == ("2026-11", "a", "CNY")
    assert line.pipeline == Decimal(6000)
    assert line.weighted == Decimal("3800.00")  # 100 + 1000 + 2700
    assert line.commit == Decimal(3000)
    assert line.best_case == Decimal(5000)
    assert line.closed_won == Decimal(5000)
    assert (line.open_count, line.won_count) == (3, 1)


def test_the_weighted_forecast_is_rounded_to_the_currencys_minor_unit() -> None:
    half = d.ForecastDeal(
        d.OpportunityStatus.OPEN, Decimal("1.235"), "KWD", Decimal(50), d.ForecastCategory.PIPELINE, 202611, "a", "t"
    )
    [line] = d.forecast([half], quarter=False, by_team=False)
    assert line.weighted == Decimal("0.618")  # 0.6175, half up


def test_forecast_groups_by_quarter_and_team() -> None:
    deals = [
        deal("open", "1", 10, "pipeline", 202610, owner="a", team="east"),
        deal("open", "2", 10, "pipeline", 202612, owner="b", team="east"),
        deal("open", "4", 10, "pipeline", 202701, owner="c", team="east"),
        deal("open", "8", 10, "pipeline", 202611, owner="d", team="west"),
    ]
    lines = d.forecast(deals, quarter=True, by_team=True)
    assert [(x.period, x.group, x.pipeline) for x in lines] == [
        ("2026-Q4", "east", Decimal(3)),
        ("2026-Q4", "west", Decimal(8)),
        ("2027-Q1", "east", Decimal(4)),
    ]


@settings(max_examples=200)
@given(st.lists(st.tuples(cents, st.integers(0, 100), st.sampled_from(list(d.ForecastCategory))), max_size=30))
def test_forecast_invariants(rows: list[tuple[Decimal, int, d.ForecastCategory]]) -> None:
    deals = [
        d.ForecastDeal(d.OpportunityStatus.OPEN, amount, "CNY", Decimal(p), category, 202611, "a", "t")
        for amount, p, category in rows
    ]
    lines = d.forecast(deals, quarter=False, by_team=False)
    counted = [x for x in deals if x.category is not d.ForecastCategory.OMITTED]
    if not counted:
        assert lines == []
        return
    [line] = lines
    assert line.pipeline == sum(x.amount for x in counted)
    assert line.commit <= line.best_case <= line.pipeline
    assert Decimal(0) <= line.weighted <= line.pipeline
    # Rounded once: never more than half a cent away from the exact weighted sum.
    exact = sum((x.amount * x.probability for x in counted), Decimal(0)) / 100
    assert abs(line.weighted - exact) <= Decimal("0.005")


def test_win_rate() -> None:
    assert d.win_rate(2, 1) == Decimal("0.6667")
    assert d.win_rate(0, 0) == Decimal("0.0000")


def test_period_labels() -> None:
    assert d.month_key(date(2026, 3, 31)) == 202603
    assert d.period_label(202603, quarter=True) == "2026-Q1"
    assert d.period_label(202612, quarter=False) == "2026-12"


# ---------------------------------------------------------------- targets and attainment


@pytest.mark.parametrize(
    ("text", "first", "last", "quarter"),
    [
        ("2026-12", 202612, 202612, False),
        ("2026-01", 202601, 202601, False),
        ("2026-Q1", 202601, 202603, True),
        ("2026-Q4", 202610, 202612, True),
    ],
)
def test_a_target_period_is_a_month_or_a_quarter_labelled_as_the_forecast_labels_it(
    text: str, first: int, last: int, quarter: bool
) -> None:
    period = d.parse_period(text)
    assert (period.first_month, period.last_month, period.quarter, period.label) == (first, last, quarter, text)
    assert d.period_label(d.month_key(date(first // 100, first % 100, 1)), quarter=quarter) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026",
        "2026-13",
        "2026-00",
        "2026-1",
        "2026-Q0",
        "2026-Q5",
        "2026-q4",
        "0999-01",
        " 2026-12",
        "2026-12 ",
        "\uff12\uff10\uff12\uff16-12",  # full-width digits: [0-9], not \d
    ],
)
def test_an_ill_formed_period_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        d.parse_period(text)
    assert [e.field for e in refused.value.errors] == ["period"]


@pytest.mark.parametrize(
    ("money", "message"),
    [
        (cny("0"), "must be greater than zero"),
        (cny("-5"), "must be greater than zero"),
        (cny("10.001"), "at most 2 decimal places"),
        (Money(Decimal("10.5"), "JPY"), "JPY has no minor unit: a whole amount, without decimal places"),
    ],
)
def test_a_target_is_a_positive_amount_in_whole_minor_units(money: Money, message: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        d.require_valid_target(money)
    assert [(e.field, e.message) for e in refused.value.errors] == [("amount.amount", message)]
    d.require_valid_target(kwd("10.125"))


def test_attainment_sets_targets_beside_the_forecast_per_period_group_and_currency() -> None:
    lines = d.forecast(
        [
            deal("won", "60000", 100, "commit", 202612, owner="a"),
            deal("open", "30000", 90, "commit", 202612, owner="a"),
            deal("won", "5000", 100, "commit", 202612, owner="b"),
        ],
        quarter=False,
        by_team=False,
    )
    targets = [
        d.TargetAmount("2026-12", "a", "CNY", Decimal("80000")),
        d.TargetAmount("2026-12", "a", "USD", Decimal("1000")),  # another currency: never converted
        d.TargetAmount("2026-12", "c", "CNY", Decimal("3")),  # no deals: nothing won
    ]
    rows = d.attainment(lines, targets)
    assert [(r.group, r.currency, r.target, r.closed_won, r.attainment, r.commit, r.weighted) for r in rows] == [
        ("a", "CNY", Decimal(80000), Decimal(60000), Decimal("0.7500"), Decimal(30000), Decimal("27000.00")),
        ("a", "USD", Decimal(1000), Decimal(0), Decimal("0.0000"), Decimal(0), Decimal(0)),
        ("b", "CNY", None, Decimal(5000), None, Decimal(0), Decimal("0.00")),  # won without a target
        ("c", "CNY", Decimal(3), Decimal(0), Decimal("0.0000"), Decimal(0), Decimal(0)),
    ]


def test_attainment_is_rounded_half_up_to_four_places_and_may_exceed_one() -> None:
    row = d.AttainmentLine("2026-Q4", "east", "CNY", target=Decimal(3), closed_won=Decimal(2))
    assert row.attainment == Decimal("0.6667")
    row.closed_won = Decimal("3.0001")  # 1.000033...
    assert row.attainment == Decimal("1.0000")
    row.closed_won = Decimal("999999999999.99") * 1000  # far above a tiny target: still exact
    row.target = Decimal("0.01")
    assert row.attainment == Decimal("99999999999999000.0000")


def test_a_quarter_without_its_own_target_takes_the_sum_of_its_three_monthly_ones() -> None:
    def target(period: str, group: str, amount: int, currency: str = "CNY") -> d.TargetAmount:
        return d.TargetAmount(period, group, currency, Decimal(amount))

    quarterly = [target("2026-Q4", "set", 500)]
    monthly = [
        *(target(month, "set", 100) for month in ("2026-10", "2026-11", "2026-12")),  # its own quarter target wins
        *(target(month, "months", 100 + n) for n, month in enumerate(("2026-10", "2026-11", "2026-12"))),
        target("2026-10", "part", 100),  # two months of three: no quarterly target
        target("2026-11", "part", 100),
        *(target(month, "usd", 10, "USD") for month in ("2027-01", "2027-02", "2027-03")),
        target("2027-01", "mixed", 10), target("2027-02", "mixed", 10), target("2027-03", "mixed", 10, "USD"),
        # Its own quarterly target is in USD: the quarter has one, its CNY months make none.
        *(target(month, "usd-quarter", 10) for month in ("2026-10", "2026-11", "2026-12")),
    ]  # fmt: skip
    quarterly.append(target("2026-Q4", "usd-quarter", 90, "USD"))

    assert sorted(d.quarter_targets(quarterly, monthly), key=lambda t: (t.group, t.currency)) == [
        target("2026-Q4", "months", 303),
        target("2026-Q4", "set", 500),
        target("2027-Q1", "usd", 30, "USD"),
        target("2026-Q4", "usd-quarter", 90, "USD"),
    ]


@pytest.mark.parametrize(
    ("from_date", "to_date", "widened"),
    [
        (date(2026, 11, 15), date(2026, 11, 20), (date(2026, 10, 1), date(2026, 12, 1))),
        (date(2026, 1, 1), date(2026, 3, 31), (date(2026, 1, 1), date(2026, 3, 1))),
        (date(2026, 12, 31), date(2027, 1, 1), (date(2026, 10, 1), date(2027, 3, 1))),
        (None, date(2026, 8, 2), (None, date(2026, 9, 1))),
        (None, None, (None, None)),
    ],
)
def test_a_quarterly_attainment_reads_the_targets_of_whole_quarters(
    from_date: date | None, to_date: date | None, widened: tuple[date | None, date | None]
) -> None:
    assert d.whole_quarters(from_date, to_date) == widened


# ---------------------------------------------------------------- approvals


@pytest.mark.parametrize(
    ("discount", "chain"),
    [
        ("0", []),
        ("15", []),
        ("15.01", ["sales_manager"]),
        ("30", ["sales_manager"]),
        ("30.5", ["sales_manager", "finance"]),
    ],
)
def test_quote_approval_chain(discount: str, chain: list[str]) -> None:
    assert d.quote_approval_chain(Decimal(discount), d.QuoteThresholds()) == chain


@pytest.mark.parametrize(
    ("amount", "chain"),
    [
        ("99999.99", ["sales_manager"]),
        ("100000", ["sales_manager", "finance"]),
        ("999999.99", ["sales_manager", "finance"]),
        ("1000000", ["sales_manager", "finance", "admin"]),
    ],
)
def test_contract_approval_chain(amount: str, chain: list[str]) -> None:
    assert d.contract_approval_chain(cny(amount), d.ContractThresholds()) == chain


def test_contract_thresholds_are_configurable() -> None:
    thresholds = d.ContractThresholds(finance=Decimal(10), admin=Decimal(20))
    assert d.contract_approval_chain(cny("15"), thresholds) == ["sales_manager", "finance"]


RATES = d.ContractThresholds(exchange_rates={"USD": Decimal("7.10"), "JPY": Decimal("0.047")})


@pytest.mark.parametrize(
    ("amount", "chain"),
    [
        (Money(Decimal(1_000_000), "JPY"), ["sales_manager"]),  # 47 000 CNY
        (Money(Decimal(900_000), "USD"), ["sales_manager", "finance", "admin"]),  # 6 390 000 CNY
        (Money(Decimal("14084.50"), "USD"), ["sales_manager"]),  # 99 999.95 CNY
        (Money(Decimal("14084.51"), "USD"), ["sales_manager", "finance"]),  # 100 000.021 CNY
    ],
)
def test_contract_amounts_are_converted_to_the_threshold_currency_before_choosing_the_chain(
    amount: Money, chain: list[str]
) -> None:
    assert d.contract_approval_chain(amount, RATES) == chain


def test_thresholds_may_be_in_another_currency_than_cny() -> None:
    thresholds = d.ContractThresholds(currency="USD", exchange_rates={"CNY": Decimal("0.14")})
    assert d.contract_approval_chain(Money(Decimal(100_000), "USD"), thresholds) == ["sales_manager", "finance"]
    assert d.contract_approval_chain(cny("100000"), thresholds) == ["sales_manager"]  # 14 000 USD


@pytest.mark.parametrize(
    ("amount", "rate"),
    [
        ("99999.99", "1.00000001"),  # 99 999.990999...: a fraction of a cent under 100 000
        # More digits than the default decimal context (28) keeps: its rounding would land on 99 999.99.
        ("1", "99999.99000000000000000000000001"),
    ],
)
def test_conversion_rounds_up_so_an_amount_at_a_threshold_never_slips_under_it(amount: str, rate: str) -> None:
    thresholds = d.ContractThresholds(exchange_rates={"USD": Decimal(rate)})
    assert d.amount_in_threshold_currency(Money(Decimal(amount), "USD"), thresholds) == Decimal("100000.00")
    assert d.contract_approval_chain(Money(Decimal(amount), "USD"), thresholds) == ["sales_manager", "finance"]


@pytest.mark.parametrize(
    ("currency", "rate", "converted"),
    [
        ("KWD", "0.3071234", Decimal("307.124")),  # 307.1234 KWD, up to the fils
        ("JPY", "151.234", Decimal(151234)),  # exact in whole yen
        ("JPY", "151.2345", Decimal(151235)),  # 151 234.5 JPY, up to the yen
    ],
)
def test_conversion_rounds_up_to_the_minor_unit_of_the_threshold_currency(
    currency: str, rate: str, converted: Decimal
) -> None:
    thresholds = d.ContractThresholds(currency=currency, exchange_rates={"USD": Decimal(rate)})
    assert d.amount_in_threshold_currency(Money(Decimal("1000.00"), "USD"), thresholds) == converted


@given(cents, st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(1000), places=12))
def test_a_converted_amount_is_the_exact_product_rounded_up_to_the_cent(amount: Decimal, rate: Decimal) -> None:
    thresholds = d.ContractThresholds(exchange_rates={"USD": rate})
    converted = d.amount_in_threshold_currency(Money(amount, "USD"), thresholds)
    exact = Fraction(amount) * Fraction(rate)
    assert converted == converted.quantize(CENT)
    assert exact <= Fraction(converted) < exact + Fraction(1, 100)


def test_a_currency_without_an_exchange_rate_is_refused_not_taken_for_the_threshold_currency() -> None:
    with pytest.raises(ValidationFailed) as raised:
        d.contract_approval_chain(Money(Decimal(1), "EUR"), RATES)
    [error] = raised.value.errors
    assert error.field == "amount.currency"
    assert "no exchange rate to CNY is configured for EUR" in error.message
    assert "configured: CNY, JPY, USD" in error.message


def test_approvals_are_sequential_and_by_role() -> None:
    chain = ["sales_manager", "finance"]
    with pytest.raises(PermissionDenied) as raised:
        d.approving_role(chain, [], ["finance"])
    assert "sales_manager" in raised.value.detail
    assert d.approving_role(chain, [], ["sales_rep", "sales_manager"]) == "sales_manager"
    done = [d.ApprovalStep("sales_manager", "m1", d.Decision.APPROVED)]
    assert d.pending_roles(chain, done) == ["finance"]
    assert d.approving_role(chain, done, ["finance"]) == "finance"
    with pytest.raises(Conflict):
        d.approving_role(chain, [*done, d.ApprovalStep("finance", "f1", d.Decision.APPROVED)], ["finance"])


def test_the_submitter_never_decides_on_what_they_submitted() -> None:
    d.check_separation_of_duties("m1", created_by="rep1", submitted_by="rep1", decisions=[], record="contract")
    with pytest.raises(PermissionDenied) as raised:
        d.check_separation_of_duties("m1", created_by="m1", submitted_by="m1", decisions=[], record="contract")
    assert "m1 submitted this contract" in raised.value.detail


@pytest.mark.parametrize("record", ["contract", "quote"])
def test_the_creator_never_decides_on_what_they_created_whoever_submitted_it(record: str) -> None:
    """A manager who set a contract's terms (and another owner) approves nothing of it when the
    owner submits it; nor does a quote's creator once another person changed its line items."""
    with pytest.raises(PermissionDenied) as raised:
        d.check_separation_of_duties("mgr1", created_by="mgr1", submitted_by="rep1", decisions=[], record=record)
    assert raised.value.detail == f"mgr1 created this {record}; another person must decide on it"
    d.check_separation_of_duties("mgr2", created_by="mgr1", submitted_by="rep1", decisions=[], record=record)


def test_the_creator_is_refused_at_every_step_not_only_the_first() -> None:
    done = [d.ApprovalStep("sales_manager", "mgr2", d.Decision.APPROVED)]
    with pytest.raises(PermissionDenied) as raised:
        d.check_separation_of_duties("fin1", created_by="fin1", submitted_by="rep1", decisions=done, record="contract")
    assert "fin1 created this contract" in raised.value.detail


def test_one_person_decides_one_step_of_a_submission_whatever_roles_they_hold() -> None:
    done = [d.ApprovalStep("sales_manager", "boss", d.Decision.APPROVED)]
    d.check_separation_of_duties("fin", created_by="rep1", submitted_by="rep1", decisions=done, record="quote")
    with pytest.raises(PermissionDenied) as raised:
        d.check_separation_of_duties("boss", created_by="rep1", submitted_by="rep1", decisions=done, record="quote")
    assert "already decided the sales_manager step" in raised.value.detail


def test_an_unknown_submitter_or_creator_is_not_held_against_anyone() -> None:
    # Records older than migration 0008 have no submitter (""), contracts older than 0016 no creator.
    d.check_separation_of_duties("m1", created_by="", submitted_by="", decisions=[], record="contract")
    d.check_separation_of_duties("m1", created_by="", submitted_by="rep1", decisions=[], record="contract")
    with pytest.raises(PermissionDenied):  # an unknown creator does not excuse the submitter
        d.check_separation_of_duties("rep1", created_by="", submitted_by="rep1", decisions=[], record="contract")


# ---------------------------------------------------------------- contract status machine


def test_contract_transitions() -> None:
    d.check_contract_transition("draft", d.ContractStatus.PENDING_APPROVAL, contract_id="c")
    d.check_contract_transition("rejected", d.ContractStatus.PENDING_APPROVAL, contract_id="c")
    d.check_contract_transition("signed", d.ContractStatus.COMPLETED, contract_id="c")
    for current, target in [
        ("draft", d.ContractStatus.SIGNED),
        ("pending_approval", d.ContractStatus.SIGNED),
        ("rejected", d.ContractStatus.SIGNED),
        ("completed", d.ContractStatus.TERMINATED),
        ("terminated", d.ContractStatus.SIGNED),
        ("approved", d.ContractStatus.COMPLETED),
    ]:
        with pytest.raises(Conflict):
            d.check_contract_transition(current, target, contract_id="c")


def test_only_a_contract_that_never_took_effect_may_be_deleted() -> None:
    for status in ("draft", "rejected"):
        d.check_contract_deletable(status, contract_id="c")
    refusals = {}
    for status in ("pending_approval", "approved", "signed", "completed", "terminated"):
        with pytest.raises(Conflict) as raised:
            d.check_contract_deletable(status, contract_id="c")
        refusals[status] = raised.value.reason
    assert refusals == {
        "pending_approval": "ILLEGAL_STATE", "approved": "CONTRACT_IN_FORCE", "signed": "CONTRACT_IN_FORCE",
        "completed": "CONTRACT_IN_FORCE", "terminated": "CONTRACT_IN_FORCE",
    }  # fmt: skip


def test_a_quotes_line_items_give_its_totals_and_the_approvals_they_need() -> None:
    lines = [d.LineItem("p1", "GTX", "GTX", Decimal(2), cny("1000"), Decimal(20))]
    terms = d.quote_terms(lines, d.QuoteThresholds())
    assert (terms.currency, terms.totals.total, terms.approval_chain, terms.status) == (
        "CNY", Decimal("1600.00"), ["sales_manager"], d.QuoteStatus.PENDING_APPROVAL,
    )  # fmt: skip
    within = d.quote_terms([replace(lines[0], discount_percent=Decimal(15))], d.QuoteThresholds())
    assert (within.approval_chain, within.status) == ([], d.QuoteStatus.APPROVED)
    with pytest.raises(ValidationFailed) as none:
        d.quote_terms([], d.QuoteThresholds())
    assert none.value.errors[0].field == "line_items"


def test_only_a_quote_not_yet_decided_may_change() -> None:
    for status in ("draft", "pending_approval"):
        d.check_quote_changeable(status, quote_id="q")
    for status in ("approved", "rejected"):
        with pytest.raises(Conflict) as raised:
            d.check_quote_changeable(status, quote_id="q")
        assert raised.value.reason == "ILLEGAL_STATE"


def test_only_a_quote_before_approval_may_be_deleted() -> None:
    for status in ("draft", "pending_approval", "rejected"):
        d.check_quote_deletable(status, quote_id="q")
    with pytest.raises(Conflict) as raised:
        d.check_quote_deletable("approved", quote_id="q")
    assert raised.value.reason == "ILLEGAL_STATE"


def test_a_contract_completes_only_when_paid_in_full() -> None:
    d.check_settled(cny("1000"), Decimal("1000.0000"), contract_id="c")
    with pytest.raises(Conflict) as raised:
        d.check_settled(cny("1000"), Decimal("999.99"), contract_id="c")
    assert raised.value.reason == "OUTSTANDING_BALANCE" and "0.01 CNY outstanding" in raised.value.detail


def test_a_contract_in_a_three_decimal_currency_owing_a_fils_does_not_complete() -> None:
    d.check_settled(kwd("100.005"), Decimal("100.0050"), contract_id="c")
    with pytest.raises(Conflict) as raised:
        d.check_settled(kwd("100.005"), Decimal("100.004"), contract_id="c")
    assert "0.001 KWD outstanding" in raised.value.detail


def test_payments_and_invoices_need_a_contract_in_force() -> None:
    for status in ("signed", "completed"):
        d.check_in_force(status, contract_id="c", what="invoices")
    for status in ("draft", "pending_approval", "approved", "rejected", "terminated"):
        with pytest.raises(Conflict) as raised:
            d.check_in_force(status, contract_id="c", what="invoices")
        assert raised.value.reason == "ILLEGAL_STATE"


def test_contract_numbers() -> None:
    assert d.contract_number(2026, 11, 123) == "CT-202611-000123"
    with pytest.raises(ValueError):
        d.contract_number(2026, 11, 1_000_000)


# ---------------------------------------------------------------- payment plans


def test_plan_must_sum_exactly_to_the_contract_amount() -> None:
    with pytest.raises(ValidationFailed) as raised:
        d.validate_payment_plan(cny("100"), [(TODAY, cny("50")), (TODAY, cny("49.99"))])
    assert raised.value.errors[0].field == "installments"
    plan = d.validate_payment_plan(cny("100"), [(TODAY + timedelta(days=30), cny("60")), (TODAY, cny("40"))])
    assert [p.amount for p in plan] == [Decimal(40), Decimal(60)]


def test_plan_rejects_other_currencies_and_zero_installments() -> None:
    with pytest.raises(ValidationFailed) as raised:
        d.validate_payment_plan(cny("100"), [(TODAY, Money(Decimal(100), "USD")), (TODAY, cny("0"))])
    fields = {e.field for e in raised.value.errors}
    assert {"installments[0].amount.currency", "installments[1].amount.amount"} <= fields


def test_a_plan_in_a_three_decimal_currency_splits_to_the_fils() -> None:
    thirds = [(TODAY + timedelta(days=30 * i), kwd(part)) for i, part in enumerate(["33.335", "33.335", "33.335"])]
    assert [p.amount for p in d.validate_payment_plan(kwd("100.005"), thirds)] == [Decimal("33.335")] * 3
    with pytest.raises(ValidationFailed) as raised:
        d.validate_payment_plan(kwd("100.005"), [(TODAY, kwd("50.0025")), (TODAY, kwd("50.0025"))])
    assert [e.message for e in raised.value.errors] == ["at most 3 decimal places"] * 2


@given(st.lists(cents, min_size=1, max_size=12))
def test_any_split_of_the_amount_is_accepted(parts: list[Decimal]) -> None:
    total = sum(parts, Decimal(0))
    installments = [(TODAY + timedelta(days=30 * i), cny(p)) for i, p in enumerate(parts)]
    plan = d.validate_payment_plan(cny(total), installments)
    assert sum(p.amount for p in plan) == total


# ---------------------------------------------------------------- payments


def installments(*amounts: str, paid: tuple[str, ...] = ()) -> list[d.InstallmentState]:
    return [
        d.InstallmentState(
            id=f"i{n}",
            sequence=n,
            due_date=TODAY + timedelta(days=30 * (n - 1)),
            amount=Decimal(amount),
            paid=Decimal(paid[n - 1]) if n <= len(paid) else Decimal(0),
            status=d.InstallmentStatus.PAID if n <= len(paid) else d.InstallmentStatus.PENDING,
        )
        for n, amount in enumerate(amounts, start=1)
    ]


def planned(days: int, amount: str) -> d.PlannedInstallment:
    return d.PlannedInstallment(due_date=TODAY + timedelta(days=days), amount=Decimal(amount))


def test_a_plans_unpaid_installments_take_the_new_ones_place_by_place() -> None:
    current = installments("30", "30", "40", paid=("10",))
    change = d.change_plan(current, [planned(0, "30"), planned(45, "30"), planned(60, "20"), planned(90, "20")])
    assert [(old.id, new) for old, new in change.rescheduled] == [
        ("i2", planned(45, "30")), ("i3", planned(60, "20")),
    ]  # fmt: skip
    assert (change.added, change.removed, change.changes_nothing) == ([planned(90, "20")], [], False)
    shorter = d.change_plan(current, [planned(0, "30"), planned(30, "70")])
    assert ([old.id for old, _ in shorter.rescheduled], [old.id for old in shorter.removed]) == (["i2"], ["i3"])
    assert d.change_plan(current, [planned(0, "30.00"), planned(30, "30"), planned(60, "40")]).changes_nothing


@pytest.mark.parametrize(
    ("new", "what"),
    [
        ([planned(1, "30"), planned(30, "70")], "changed"),  # another due date
        ([planned(0, "25"), planned(30, "75")], "changed"),  # another amount
        ([planned(30, "100")], "changed"),  # another installment in its place
    ],
)
def test_an_installment_paid_in_part_or_in_full_never_changes(new: list[d.PlannedInstallment], what: str) -> None:
    current = installments("30", "30", "40", paid=("30", "5"))
    with pytest.raises(Conflict) as raised:
        d.change_plan(current, new)
    assert (raised.value.reason, raised.value.existing_id) == ("INSTALLMENT_PAID", "i1")
    assert raised.value.detail.startswith("installments[0] ") and raised.value.detail.endswith(f"cannot be {what}")


def test_a_partly_paid_installment_is_not_removed() -> None:
    first, second = installments("30", "70")
    partly = replace(second, paid=Decimal(1), status=d.InstallmentStatus.PARTIALLY_PAID)
    with pytest.raises(Conflict) as raised:
        d.change_plan([first, partly], [planned(0, "30")])
    assert raised.value.existing_id == "i2" and "installments[1]" in raised.value.detail
    assert raised.value.detail.endswith("cannot be removed")


def test_plans_are_made_and_changed_while_the_contract_is_approved_or_signed() -> None:
    for status in ("approved", "signed"):
        d.check_plan_accepted(status, contract_id="c")
    for status in ("draft", "pending_approval", "rejected", "completed", "terminated"):
        with pytest.raises(Conflict) as raised:
            d.check_plan_accepted(status, contract_id="c")
        assert raised.value.reason == "ILLEGAL_STATE"


def test_allocation_fills_oldest_due_first() -> None:
    result = d.allocate_payment(Decimal(150), installments("100", "100", "100"))
    assert result.allocations == [("i1", Decimal(100)), ("i2", Decimal(50))]
    assert [i.status for i in result.installments] == ["paid", "partially_paid", "pending"]


def test_allocation_skips_paid_installments_and_keeps_overdue_status() -> None:
    first, second, third = installments("100", "100", "100", paid=("100",))
    marked = replace(second, status=d.InstallmentStatus.OVERDUE)
    result = d.allocate_payment(Decimal(130), [first, marked, third])
    assert result.allocations == [("i2", Decimal(100)), ("i3", Decimal(30))]
    assert [i.status for i in result.installments] == ["paid", "paid", "partially_paid"]
    result = d.allocate_payment(Decimal(30), [first, marked, third])
    assert result.installments[1].status == d.InstallmentStatus.OVERDUE


def test_a_payment_never_makes_an_installment_overdue() -> None:
    """Past due but not yet marked: the overdue timer marks it and publishes installment.overdue."""
    first, second = installments("100", "100")
    result = d.allocate_payment(Decimal(30), [first, second])
    assert result.installments[0].status == d.InstallmentStatus.PARTIALLY_PAID


def test_over_payment_is_rejected() -> None:
    with pytest.raises(ValidationFailed) as raised:
        d.check_payment(cny("100.01"), contract_amount=cny("300"), already_paid=Decimal(200))
    assert raised.value.errors[0].field == "amount"
    assert "over-payment" in raised.value.errors[0].message
    with pytest.raises(ValidationFailed):
        d.allocate_payment(Decimal("300.01"), installments("100", "100", "100"))
    with pytest.raises(ValidationFailed) as raised:
        d.check_payment(Money(Decimal(1), "USD"), contract_amount=cny("300"), already_paid=Decimal(0))
    assert raised.value.errors[0].field == "amount.currency"


def test_a_payment_in_a_three_decimal_currency_may_settle_the_last_fils() -> None:
    d.check_payment(kwd("0.005"), contract_amount=kwd("100.005"), already_paid=Decimal(100))
    with pytest.raises(ValidationFailed) as raised:
        d.check_payment(kwd("0.006"), contract_amount=kwd("100.005"), already_paid=Decimal(100))
    assert [(e.field, e.message) for e in raised.value.errors] == [
        ("amount", "over-payment: 0.006 KWD exceeds the outstanding 0.005 KWD")
    ]
    result = d.allocate_payment(Decimal("50.002"), installments("33.335", "33.335", "33.335"))
    assert result.allocations == [("i1", Decimal("33.335")), ("i2", Decimal("16.667"))]


def test_a_payment_is_not_received_in_the_future() -> None:
    now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    # Not given: received now. A clock a little fast is allowed for.
    for received_at in (None, now - timedelta(days=400), now, now + CLOCK_SKEW):
        assert d.past_errors("received_at", received_at, now) == []
    for received_at in (now + CLOCK_SKEW + timedelta(seconds=1), datetime(2199, 6, 1, tzinfo=UTC)):
        assert [e.field for e in d.past_errors("received_at", received_at, now)] == ["received_at"]


@settings(max_examples=200)
@given(st.lists(cents, min_size=1, max_size=8), st.lists(cents, min_size=1, max_size=8))
def test_allocation_conserves_money(plan: list[Decimal], payments: list[Decimal]) -> None:
    state = installments(*(str(p) for p in plan))
    contract_total = sum(plan, Decimal(0))
    paid = Decimal(0)
    for amount in payments:
        if amount > contract_total - paid:
            with pytest.raises(ValidationFailed):
                d.check_payment(cny(amount), contract_amount=cny(contract_total), already_paid=paid)
            continue
        d.check_payment(cny(amount), contract_amount=cny(contract_total), already_paid=paid)
        result = d.allocate_payment(amount, state)
        assert sum(share for _, share in result.allocations) == amount
        state = result.installments
        paid += amount
        assert all(Decimal(0) <= i.paid <= i.amount for i in state)
        assert sum(i.paid for i in state) == paid
        # Oldest first: no installment holds money while an earlier one is still open.
        opened = [i.open_amount > 0 for i in state]
        funded = [i.paid > 0 for i in state]
        for index in range(1, len(state)):
            if funded[index]:
                assert not opened[index - 1]


# ---------------------------------------------------------------- invoices


def test_invoice_never_above_the_uninvoiced_amount() -> None:
    d.check_invoice_amount(cny("50"), contract_amount=cny("100"), already_invoiced=Decimal(50))
    with pytest.raises(ValidationFailed) as raised:
        d.check_invoice_amount(cny("50.01"), contract_amount=cny("100"), already_invoiced=Decimal(50))
    assert raised.value.errors[0].field == "amount"


def test_invoices_in_a_three_decimal_currency_are_limited_to_the_fils() -> None:
    d.check_invoice_amount(kwd("50.005"), contract_amount=kwd("100.005"), already_invoiced=Decimal(50))
    with pytest.raises(ValidationFailed) as raised:
        d.check_invoice_amount(kwd("50.006"), contract_amount=kwd("100.005"), already_invoiced=Decimal(50))
    assert [(e.field, e.message) for e in raised.value.errors] == [
        ("amount", "50.006 KWD exceeds the uninvoiced 50.005 KWD")
    ]
    with pytest.raises(ValidationFailed) as raised:
        d.check_issued_amount(kwd("400.12"), requested=kwd("400.1250"))
    assert {e.field: e.message for e in raised.value.errors} == {"amount": "must be the requested 400.125 KWD"}


@given(st.lists(cents, min_size=1, max_size=10), cents)
def test_invoices_accepted_in_sequence_never_exceed_the_contract(requests: list[Decimal], total: Decimal) -> None:
    invoiced = Decimal(0)
    for amount in requests:
        try:
            d.check_invoice_amount(cny(amount), contract_amount=cny(total), already_invoiced=invoiced)
        except ValidationFailed:
            assert amount > total - invoiced
            continue
        invoiced += amount
        assert invoiced <= total


def test_an_invoice_is_issued_for_exactly_the_requested_amount() -> None:
    d.check_issued_amount(cny("400.00"), requested=cny("400.0000"))
    with pytest.raises(ValidationFailed) as raised:
        d.check_issued_amount(cny("400.01"), requested=cny("400"))
    assert {e.field: e.message for e in raised.value.errors} == {"amount": "must be the requested 400.00 CNY"}
    with pytest.raises(ValidationFailed) as raised:
        d.check_issued_amount(Money(Decimal(400), "USD"), requested=cny("400"))
    assert raised.value.errors[0].field == "amount.currency"


def test_invoice_transitions() -> None:
    d.check_invoice_transition("requested", d.InvoiceStatus.ISSUED, invoice_id="i")
    d.check_invoice_transition("issued", d.InvoiceStatus.VOID, invoice_id="i")
    with pytest.raises(Conflict):
        d.check_invoice_transition("void", d.InvoiceStatus.ISSUED, invoice_id="i")
    with pytest.raises(Conflict):
        d.check_invoice_transition("issued", d.InvoiceStatus.ISSUED, invoice_id="i")


def test_stage_history_closes_the_previous_visit() -> None:
    history = d.enter_stage([], "initial_contact", "t1")
    history = d.enter_stage(history, "needs_confirmed", "t2")
    assert history == [
        d.StageVisit("initial_contact", "t1", "t2"),
        d.StageVisit("needs_confirmed", "t2", ""),
    ]


def test_rotting_rule() -> None:
    stage = d.Stage("s", "S", Decimal(10), rotting_days=3)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not d.is_rotting("open", stage, start, start + timedelta(days=3))
    assert d.is_rotting("open", stage, start, start + timedelta(days=3, seconds=1))
    assert not d.is_rotting("won", stage, start, start + timedelta(days=30))
    assert not d.is_rotting("open", d.Stage("s", "S", Decimal(10)), start, start + timedelta(days=300))


def test_an_erp_posting_sent_again_under_its_reference_must_carry_the_same_money() -> None:
    posted = cny("100")
    d.check_same_posting(posted, Money(Decimal("100.00"), "CNY"), reference="P1", existing_id="pay-1")
    for other in (cny("200"), Money(Decimal("100"), "USD")):
        with pytest.raises(Conflict) as refused:
            d.check_same_posting(posted, other, reference="P1", existing_id="pay-1")
        assert refused.value.reason == "REFERENCE_REUSED"
    with pytest.raises(Conflict) as refused:
        d.check_same_posting(kwd("12.345"), kwd("12.346"), reference="P2", existing_id="pay-2")
    assert "was posted for 12.345 KWD; 12.346 KWD needs its own reference" in refused.value.detail


def test_a_deals_event_names_the_fields_of_the_deal_not_its_columns() -> None:
    """The currency is part of `amount`; the forecast month and product line key follow from other
    fields and are no field of the deal."""
    assert d.changed_opportunity_fields(["expected_close_date", "forecast_month"]) == ["expected_close_date"]
    assert d.changed_opportunity_fields(["amount", "currency"]) == ["amount"]
    assert d.changed_opportunity_fields(["currency"]) == ["amount"]
    assert d.changed_opportunity_fields(["product_line", "product_line_key", "stage", "probability_bp"]) == [
        "probability",
        "product_line",
        "stage",
    ]
