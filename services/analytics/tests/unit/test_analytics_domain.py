"""Report arithmetic: rates, ROI, CSAT, SLA outcomes, funnel conversion, churn-risk rules."""

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from analytics import domain
from analytics.domain import (
    AccountHealth,
    ChurnPolicy,
    Deal,
    LeadFact,
    StageVisit,
    TicketFact,
    WonDeal,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


# ------------------------------------------------------------------------------------------ rates


def test_rate_is_four_places_and_undefined_without_denominator() -> None:
    assert domain.rate(2, 3) == Decimal("0.6667")
    assert domain.rate(1, 8) == Decimal("0.1250")
    assert domain.rate(0, 5) == Decimal("0.0000")
    assert domain.rate(3, 0) is None


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=10_000))
def test_rate_of_a_part_is_between_zero_and_one(part: int, extra: int) -> None:
    value = domain.rate(part, part + extra)
    assert value is not None
    assert Decimal(0) <= value <= Decimal(1)
    # Within half a unit of the last place of the exact quotient.
    assert abs(value - Decimal(part) / Decimal(part + extra)) <= Decimal("0.00005")


def test_roi_is_net_gain_over_cost() -> None:
    assert domain.roi(Decimal("15000"), Decimal("5000")) == Decimal("2.0000")
    assert domain.roi(Decimal("0"), Decimal("5000")) == Decimal("-1.0000")
    assert domain.roi(Decimal("100"), Decimal("0")) is None


@given(
    st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False),
    st.decimals(min_value=Decimal("0.01"), max_value=10**9, places=2, allow_nan=False),
)
def test_roi_sign_follows_profit(revenue: Decimal, cost: Decimal) -> None:
    value = domain.roi(revenue, cost)
    assert value is not None
    assert value >= Decimal(-1)
    if revenue > cost * Decimal("1.0001"):
        assert value > 0
    if revenue < cost * Decimal("0.9999"):
        assert value < 0


def test_durations_are_exact_decimals() -> None:
    assert domain.in_units(timedelta(hours=18), domain.HOUR) == Decimal(18)
    assert domain.in_units(timedelta(minutes=90), domain.HOUR) == Decimal("1.5")
    assert domain.in_units(timedelta(days=3, hours=12), domain.DAY) == Decimal("3.5")


def test_money_sum_keeps_only_the_report_currency() -> None:
    amounts = [(Decimal("10.10"), "CNY"), (Decimal("5"), "USD"), (None, "CNY"), (Decimal("0.20"), "CNY")]
    assert domain.money_sum(amounts, "CNY") == Decimal("10.30")
    assert domain.money_sum(amounts, "EUR") == Decimal(0)


# ------------------------------------------------------------------------------------------- CSAT


def test_csat_average_and_satisfied_share() -> None:
    result = domain.csat([5, 4, 3, 1])
    assert result.average == Decimal("3.25")
    assert result.satisfied_rate == Decimal("0.5000")
    assert result.responses == 4
    empty = domain.csat([])
    assert empty.average is None and empty.satisfied_rate is None


@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=200))
def test_csat_matches_a_direct_count(scores: list[int]) -> None:
    result = domain.csat(scores)
    assert result.satisfied_rate == domain.rate(len([s for s in scores if s >= 4]), len(scores))
    assert result.average is not None and Decimal(1) <= result.average <= Decimal(5)


# -------------------------------------------------------------------------------------------- SLA


def test_sla_outcomes() -> None:
    due = at(1)
    assert domain.sla_outcome(None, None, breached=False, now=at(5)) is None
    assert domain.sla_outcome(due, at(0.5), breached=False, now=at(5)) == "met"
    assert domain.sla_outcome(due, at(1), breached=False, now=at(5)) == "met"
    assert domain.sla_outcome(due, at(2), breached=False, now=at(5)) == "breached"
    assert domain.sla_outcome(due, None, breached=False, now=at(0.5)) == "pending"
    assert domain.sla_outcome(due, None, breached=False, now=at(2)) == "breached"
    # The service-desk's breach event is final even if our clock would say otherwise.
    assert domain.sla_outcome(due, at(0.5), breached=True, now=at(0.5)) == "breached"
    # A clock the service desk ended short of its target (the ticket resolved or closed) runs late
    # no more; one paused while the customer is waited on is pending; a reported breach stays.
    assert domain.sla_outcome(due, None, breached=False, now=at(5), clock=domain.CLOCK_ENDED) == "met"
    assert domain.sla_outcome(due, None, breached=False, now=at(5), clock=domain.CLOCK_PAUSED) == "pending"
    assert domain.sla_outcome(due, None, breached=True, now=at(5), clock=domain.CLOCK_ENDED) == "breached"
    assert domain.sla_outcome(due, None, breached=True, now=at(5), clock=domain.CLOCK_PAUSED) == "breached"


def test_a_reported_breach_holds_where_the_clock_reached_the_due_time_of_a_later_version() -> None:
    """As the service desk judges a breach again when a priority or tier change moves its due time."""
    breached = at(1)  # reported when the first response, due at 1 h, ran out
    # Re-timed at the 2nd hour, due at the 4th now: the clock has not reached it, the desk lifts it.
    assert not domain.breach_holds(breached, at(4), met_for_good=False, judged_at=at(2))
    # Re-timed at the 5th hour: the new due time passed too, the breach holds.
    assert domain.breach_holds(breached, at(4), met_for_good=False, judged_at=at(5))
    # A target met for good keeps its verdict, whatever its due time now.
    assert domain.breach_holds(breached, at(4), met_for_good=True, judged_at=at(2))
    # A breach reported before its time was kept stays as reported; a version without a time is
    # judged at the breach.
    assert domain.breach_holds(None, at(4), met_for_good=False, judged_at=at(2))
    assert not domain.breach_holds(breached, at(4), met_for_good=False, judged_at=None)


def test_the_desks_resolution_clock_stops_when_the_ticket_moves_to_wait_for_the_customer_or_is_resolved() -> None:
    assert domain.resolution_paused_at("waiting_customer", at(2), "in_progress", None) == at(2)
    assert domain.resolution_paused_at("waiting_customer", at(3), "waiting_customer", at(2)) == at(2)
    assert domain.resolution_paused_at("resolved", at(4), "waiting_customer", at(2)) == at(4)
    assert domain.resolution_paused_at("in_progress", at(5), "waiting_customer", at(2)) is None


def test_service_summary() -> None:
    tickets = [
        # first response in 30 min (met), resolved in 4 h (met)
        TicketFact("t1", "high", "resolved", T0, at(1), at(0.5), at(8), at(4)),
        # first response after 2 h (breached), still open, resolution pending
        TicketFact("t2", "urgent", "in_progress", T0, at(1), at(2), at(24), None),
        # no response and past due: breached; the service reported the resolution breach too
        TicketFact("t3", "normal", "new", T0, at(1), None, at(3), None, resolution_breached=True),
    ]
    summary = domain.service_summary(tickets, [5, 4, 2], now=at(5))
    assert (summary.tickets, summary.backlog, summary.open_urgent) == (3, 2, 1)
    assert (summary.first_response_met, summary.first_response_breached) == (1, 2)
    assert summary.first_response_compliance == Decimal("0.3333")
    assert (summary.resolution_met, summary.resolution_breached) == (1, 1)
    assert summary.resolution_compliance == Decimal("0.5000")
    assert summary.mean_first_response_minutes == Decimal("75.00")  # (30 + 120) / 2
    assert summary.mean_resolution_hours == Decimal("4.00")
    assert summary.csat.average == Decimal("3.67")
    assert summary.csat.satisfied_rate == Decimal("0.6667")


def sla_counts(ticket: TicketFact, now: datetime) -> tuple[tuple[int, int], tuple[int, int]]:
    """(met, breached) of the first response and of the resolution of one ticket."""
    summary = domain.service_summary([ticket], [], now=now)
    return (
        (summary.first_response_met, summary.first_response_breached),
        (summary.resolution_met, summary.resolution_breached),
    )


def test_a_ticket_closed_before_its_due_times_met_them_however_late_it_is_looked_at() -> None:
    # Closed (spam, or with its account) within 30 minutes, never answered nor resolved: the service
    # desk stopped both clocks then, and its timer never looks at a closed ticket again.
    closed = TicketFact("t", "high", "closed", T0, at(1), None, at(8), None)
    assert sla_counts(closed, now=at(0.75)) == ((1, 0), (1, 0))
    assert sla_counts(closed, now=at(48)) == ((1, 0), (1, 0))


def test_a_ticket_closed_after_its_due_time_unanswered_is_breached_as_the_service_desk_reported() -> None:
    # Open and unanswered past its due time, the ticket's first-response breach is reported (and
    # escalated) by the desk's timer on its next pass, before anyone closes it: breached.
    reported = TicketFact("t", "high", "closed", T0, at(1), None, at(8), None, first_response_breached=True)
    assert sla_counts(reported, now=at(48)) == ((0, 1), (1, 0))
    # Closed in the moments before that pass, the clock stopped unreported: the desk never sends the
    # breach nor escalates the ticket, and counts the target as met, as we do.
    unreported = TicketFact("t", "high", "closed", T0, at(1), None, at(8), None)
    assert sla_counts(unreported, now=at(48)) == ((1, 0), (1, 0))


def test_a_ticket_waiting_for_the_customer_past_its_resolution_due_time_is_not_breached_while_it_waits() -> None:
    # Answered in 30 minutes, waiting for the customer from the 2nd hour, its resolution due at 8 h:
    # the desk's resolution clock stands still, so the original due time passing breaches nothing.
    waiting = TicketFact("t", "high", "waiting_customer", T0, at(1), at(0.5), at(8), None)
    assert sla_counts(waiting, now=at(30)) == ((1, 0), (0, 0))
    # Running again at the 30th hour, its due time moved by the 28 hours waited (36 h): in time...
    resumed = replace(waiting, status="in_progress", resolution_due_at=at(36))
    assert sla_counts(resumed, now=at(31)) == ((1, 0), (0, 0))
    # ...until that passes while it runs.
    assert sla_counts(resumed, now=at(37)) == ((1, 0), (0, 1))
    # A breach the desk reported before the wait stays one.
    assert sla_counts(replace(waiting, resolution_breached=True), now=at(30)) == ((1, 0), (0, 1))


def test_a_ticket_resolved_after_waiting_for_the_customer_past_its_due_time_met_its_resolution() -> None:
    # Waiting from the 2nd hour, resolved at the 30th: the clock stood still from the 2nd hour on,
    # so the resolution came within its 8 working hours (the desk reported no breach).
    resolved = TicketFact("t", "high", "resolved", T0, at(1), at(0.5), at(8), at(30))
    assert sla_counts(resolved, now=at(31)) == ((1, 0), (1, 0))


# ----------------------------------------------------------------------------------------- funnel


def deal(deal_id: str, path: list[str], status: str = "open", amount: str | None = "1000", days: float = 0) -> Deal:
    history = tuple(
        StageVisit(stage, T0 + timedelta(days=index), T0 + timedelta(days=index + 1) if index < len(path) - 1 else None)
        for index, stage in enumerate(path)
    )
    return Deal(
        id=deal_id,
        stage=path[-1],
        status=status,
        amount=Decimal(amount) if amount is not None else None,
        currency="CNY",
        created_at=T0,
        closed_at=T0 + timedelta(days=days) if status != "open" else None,
        history=history,
    )


def test_funnel_counts_conversion_win_rate_and_cycle() -> None:
    deals = [
        deal("a", ["initial_contact"]),
        deal("b", ["initial_contact", "needs_confirmed"], amount="2000"),
        deal("c", ["initial_contact", "needs_confirmed", "won"], "won", "3000", days=10),
        deal("d", ["initial_contact", "lost"], "lost", "500", days=3),
        # skipped a stage: counts as moving on from initial_contact
        deal("e", ["initial_contact", "solution_demo", "won"], "won", "5000", days=20),
    ]
    funnel = domain.sales_funnel(deals, "CNY")
    by_stage = {row.stage: row for row in funnel.stages}
    assert [row.stage for row in funnel.stages][:5] == list(domain.DEFAULT_OPEN_STAGES)
    assert by_stage["initial_contact"].count == 1
    assert by_stage["initial_contact"].amount == Decimal("1000")
    assert by_stage["initial_contact"].reached == 5
    # b, c, e moved past initial_contact (d was lost there): 3 of 5
    assert by_stage["initial_contact"].conversion_to_next == Decimal("0.6000")
    # b (open) and c (won) reached needs_confirmed; only c moved on
    assert by_stage["needs_confirmed"].reached == 2
    assert by_stage["needs_confirmed"].conversion_to_next == Decimal("0.5000")
    assert by_stage["initial_contact"].mean_days_in_stage == Decimal("1.00")
    assert by_stage["quote_negotiation"].conversion_to_next is None
    assert (by_stage["won"].count, by_stage["won"].amount) == (2, Decimal("8000"))
    assert (by_stage["lost"].count, by_stage["lost"].amount) == (1, Decimal("500"))
    assert (funnel.opportunities, funnel.open_count, funnel.won_count, funnel.lost_count) == (5, 2, 2, 1)
    assert funnel.win_rate == Decimal("0.6667")
    assert funnel.won_amount == Decimal("8000")
    assert funnel.average_deal_size == Decimal("4000.00")
    assert funnel.mean_sales_cycle_days == Decimal("15.00")


def test_funnel_appends_unknown_stages_and_handles_no_deals() -> None:
    custom = domain.sales_funnel([deal("x", ["discovery", "pilot"])], "CNY")
    assert [row.stage for row in custom.stages][-4:] == ["discovery", "pilot", "won", "lost"]
    empty = domain.sales_funnel([], "CNY")
    assert empty.win_rate is None and empty.average_deal_size is None and empty.won_amount == 0


PARTNERS = [  # listed out of order: the positions are the pipeline's order
    domain.PipelineStage("discovery", 0),
    domain.PipelineStage("pilot", 2),
    domain.PipelineStage("closed_won", 3, "won"),
    domain.PipelineStage("proposal", 1),
    domain.PipelineStage("closed_lost", 4, "lost"),
]


def test_a_pipelines_stages_are_in_its_order_and_those_it_has_no_event_for_in_the_defaults() -> None:
    assert domain.funnel_stages(PARTNERS) == domain.FunnelStages(
        open=("discovery", "proposal", "pilot"), closed=frozenset({"closed_won", "closed_lost"})
    )
    assert domain.funnel_stages(None) == domain.FunnelStages(domain.DEFAULT_OPEN_STAGES)
    # Equal positions (a producer that sets none) keep the order the stages are listed in.
    listed = [domain.PipelineStage("b"), domain.PipelineStage("a"), domain.PipelineStage("c", 0, "won")]
    assert domain.funnel_stages(listed) == domain.FunnelStages(open=("b", "a"), closed=frozenset({"c"}))


def test_a_pipelines_funnel_lists_every_open_stage_in_its_order_and_converts_along_it() -> None:
    deals = [
        deal("a", ["discovery", "pilot"]),  # skipped the proposal
        deal("b", ["discovery", "proposal", "closed_won"], "won", "3000", days=10),
        deal("c", ["discovery", "closed_lost"], "lost", days=2),
        # a stage the pipeline no longer has, in a closed deal's history: after the pipeline's own
        deal("d", ["discovery", "workshop", "closed_lost"], "lost", days=4),
    ]
    funnel = domain.sales_funnel(deals, "CNY", domain.funnel_stages(PARTNERS))
    rows = [(row.stage, row.count, row.reached, row.conversion_to_next) for row in funnel.stages]
    assert rows == [
        ("discovery", 0, 4, Decimal("0.7500")),  # a, b and d moved on, c was lost there
        ("proposal", 0, 1, Decimal("1.0000")),
        ("pilot", 1, 1, Decimal("0.0000")),
        ("workshop", 0, 1, Decimal("0.0000")),
        ("won", 1, 1, None),
        ("lost", 2, 2, None),
    ]
    # No deal yet: every open stage at zero, in the pipeline's order.
    empty = domain.sales_funnel([], "CNY", domain.funnel_stages(PARTNERS))
    assert [(row.stage, row.count, row.reached) for row in empty.stages] == [
        ("discovery", 0, 0), ("proposal", 0, 0), ("pilot", 0, 0), ("won", 0, 0), ("lost", 0, 0),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("currency", "amounts", "average"),
    [
        ("CNY", ("1234.56", "1234.58"), Decimal("1234.57")),
        ("KWD", ("1.234", "1.236"), Decimal("1.235")),  # fils, not rounded to 1.24
        ("JPY", ("1000", "1001"), Decimal(1000)),  # 1000.5 JPY: whole yen, half to even
    ],
)
def test_the_average_deal_size_is_in_the_currencys_minor_unit(
    currency: str, amounts: tuple[str, str], average: Decimal
) -> None:
    won = [replace(deal(str(i), ["won"], "won", amount), currency=currency) for i, amount in enumerate(amounts)]
    size = domain.sales_funnel(won, currency).average_deal_size
    assert (size, str(size)) == (average, str(average))


@given(st.lists(st.sampled_from(["open", "won", "lost"]), max_size=40))
def test_win_rate_ignores_open_deals(statuses: list[str]) -> None:
    deals = [deal(str(i), ["initial_contact"], status) for i, status in enumerate(statuses)]
    funnel = domain.sales_funnel(deals, "CNY")
    won, lost = statuses.count("won"), statuses.count("lost")
    assert funnel.win_rate == domain.rate(won, won + lost)
    for row in funnel.stages:
        assert row.conversion_to_next is None or Decimal(0) <= row.conversion_to_next <= 1


# ----------------------------------------------------------------------------------- lead sources


def lead(lead_id: str, source: str, campaign: str, contacted_after_h: float | None, converted_to: str = "") -> LeadFact:
    return LeadFact(
        id=lead_id,
        source=source,
        campaign_id=campaign,
        status="converted" if converted_to else ("contacted" if contacted_after_h is not None else "new"),
        created_at=T0,
        first_contacted_at=at(contacted_after_h) if contacted_after_h is not None else None,
        converted_opportunity_id=converted_to,
    )


def test_lead_sources_by_source_and_by_campaign() -> None:
    leads = [
        lead("l1", "web_form", "c1", 2, converted_to="o1"),
        lead("l2", "web_form", "c1", 4),
        lead("l3", "web_form", "", None),
        lead("l4", "trade_show", "c2", 18, converted_to="o2"),
    ]
    won = [
        WonDeal("o1", "l1", Decimal("12000"), "CNY"),
        # found through the deal's source lead only
        WonDeal("o3", "l2", Decimal("3000"), "CNY"),
        WonDeal("o9", "elsewhere", Decimal("99999"), "CNY"),
    ]
    rows = {row.key: row for row in domain.lead_source_report(leads, won, "CNY", by_campaign=False)}
    web = rows["web_form"]
    assert (web.leads, web.contacted, web.converted) == (3, 2, 1)
    assert web.contacted_rate == Decimal("0.6667")
    assert web.converted_rate == Decimal("0.3333")
    assert web.mean_first_contact_hours == Decimal("3.00")
    assert web.won_revenue == Decimal("15000")
    assert web.cost is None and web.roi is None
    assert rows["trade_show"].won_revenue == 0  # o2 was not won

    campaigns = {
        "c1": domain.CampaignCost("c1", "Spring webinar", Decimal("5000"), "CNY"),
        "c2": domain.CampaignCost("c2", "Expo", Decimal("20000"), "USD"),
    }
    by_campaign = {
        row.key: row for row in domain.lead_source_report(leads, won, "CNY", by_campaign=True, campaigns=campaigns)
    }
    assert by_campaign["c1"].name == "Spring webinar"
    assert by_campaign["c1"].cost == Decimal("5000")
    assert by_campaign["c1"].roi == Decimal("2.0000")
    # a cost in another currency is not compared with CNY revenue
    assert by_campaign["c2"].cost is None and by_campaign["c2"].roi is None
    assert by_campaign[""].leads == 1

    # A campaign that ran and brought no lead is listed with what it cost.
    idle = {**campaigns, "c9": domain.CampaignCost("c9", "Billboard", Decimal("800"), "CNY")}
    with_idle = {
        row.key: row
        for row in domain.lead_source_report(
            leads, won, "CNY", by_campaign=True, campaigns=idle, listed_campaigns=["c9", "c1"]
        )
    }
    assert (with_idle["c9"].leads, with_idle["c9"].cost, with_idle["c9"].roi) == (0, Decimal("800"), Decimal("-1"))
    assert with_idle["c9"].contacted_rate is None and with_idle["c9"].won_revenue == 0
    assert with_idle["c1"] == by_campaign["c1"]
    assert "c9" not in {
        row.key for row in domain.lead_source_report(leads, won, "CNY", by_campaign=False, listed_campaigns=["c9"])
    }


def test_every_won_deal_naming_a_lead_counts_for_its_source() -> None:
    leads = [lead("l1", "web_form", "c1", 1, converted_to="o1")]
    won = [
        WonDeal("o1", "l1", Decimal("100"), "CNY"),  # the conversion's deal
        WonDeal("o2", "l1", Decimal("900"), "CNY"),  # later deals with the same customer
        WonDeal("o3", "l1", Decimal("50"), "CNY"),
    ]
    [row] = domain.lead_source_report(leads, won, "CNY", by_campaign=False)
    assert row.won_revenue == Decimal("1050")


@pytest.mark.parametrize(
    ("starts_on", "ends_on", "ran"),
    [
        (date(2026, 11, 1), date(2026, 11, 30), True),
        (date(2026, 10, 1), date(2026, 10, 31), False),  # ended the day before the period
        (date(2026, 10, 1), date(2026, 11, 1), True),  # its last day is the period's first
        (date(2026, 12, 1), None, False),  # starts when the period ends
        (None, None, True),  # no run given: always running
        (None, date(2026, 10, 31), False),
    ],
)
def test_a_campaign_ran_in_a_period_when_their_days_overlap(starts_on: Any, ends_on: Any, ran: bool) -> None:
    november = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert domain.ran_within(starts_on, ends_on, *november) is ran
    assert domain.ran_within(starts_on, ends_on, None, None)


SHANGHAI = timezone(timedelta(hours=8))


@pytest.mark.parametrize(
    ("moment", "day"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), date(2026, 1, 1)),  # a day begins at its own start
        (datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), date(2026, 1, 2)),
        (datetime(2026, 1, 1, tzinfo=SHANGHAI), date(2026, 1, 1)),  # 31 December 16:00 UTC
        (datetime(2026, 2, 1, tzinfo=SHANGHAI), date(2026, 2, 1)),
    ],
)
def test_the_first_day_from_a_moment_begins_at_or_after_it(moment: datetime, day: date) -> None:
    assert domain.first_day_from(moment) == day


def test_a_months_bounds_in_utc_or_east_of_it_hold_the_days_of_that_month() -> None:
    """As sales' attainment counts a close date in its month."""
    for zone in (UTC, SHANGHAI, timezone(timedelta(hours=14))):
        first, end = (domain.first_day_from(datetime(2026, month, 1, tzinfo=zone)) for month in (1, 2))
        assert (first, end) == (date(2026, 1, 1), date(2026, 2, 1))


# -------------------------------------------------------------------------------- rep performance


def test_rep_rows_and_task_counting() -> None:
    tally = domain.RepTally(owner_id="rep1", team="east", activities=7)
    for status in ("done", "done", "open", "cancelled"):
        domain.count_task(tally, status)
    tally.won_count, tally.won_amount = 2, Decimal("8000")
    tally.csat_scores += [5, 3]
    tally.completeness += [Decimal("0.5"), Decimal("1")]
    (row,) = domain.rep_rows([tally])
    assert (row.tasks, row.tasks_completed, row.task_completion_rate) == (3, 2, Decimal("0.6667"))
    assert row.csat.average == Decimal("4.00")
    assert row.data_completeness == Decimal("0.7500")
    assert row.won_amount == Decimal("8000")


def test_a_reps_figures_are_kept_per_team_of_the_records_and_unowned_records_are_nobodys() -> None:
    tallies: dict[tuple[str, str], domain.RepTally] = {}
    domain.tally_for(tallies, "rep1", "B").won_count += 1
    domain.tally_for(tallies, "rep1", "A").activities += 2
    domain.tally_for(tallies, "rep1", "B").won_count += 1
    domain.tally_for(tallies, "", "A").activities += 5  # e.g. an unassigned ticket's CSAT
    rows = domain.rep_rows(tallies.values())
    assert [(row.owner_id, row.team, row.activities, row.won_count) for row in rows] == [
        ("rep1", "A", 2, 0),
        ("rep1", "B", 0, 2),
    ]


# ------------------------------------------------------------------------------ data completeness


def test_filled_fields_and_completeness() -> None:
    filled = domain.filled_fields(
        {"name": "Li Lei", "company": "  ", "phone": "138", "email": None, "source": "web"}, domain.LEAD_KEY_FIELDS
    )
    assert filled == ["name", "phone", "source"]
    assert domain.completeness(filled, domain.LEAD_KEY_FIELDS) == Decimal("0.3750")
    row = domain.completeness_row("lead", [filled, list(domain.LEAD_KEY_FIELDS)], domain.LEAD_KEY_FIELDS)
    assert row.records == 2
    assert row.completeness == Decimal("0.6875")
    assert ("name", 2, Decimal("1.0000")) in row.fields
    assert ("company", 1, Decimal("0.5000")) in row.fields


CONTACT = {"name": "Li Lei", "title": "CTO", "phone": "021-5555", "mobile": "", "email": "l@a.cn"}


def test_a_contacts_key_fields_are_its_name_title_phone_email_and_decision_role() -> None:
    full = domain.contact_filled(**CONTACT, decision_role="decision_maker")
    assert full == ["name", "title", "phone", "email", "decision_role"] == list(domain.CONTACT_KEY_FIELDS)
    assert domain.completeness(full, domain.CONTACT_KEY_FIELDS) == Decimal("1.0000")
    sparse = domain.contact_filled(name="Han", title=" ", phone="", mobile="", email="", decision_role="")
    assert sparse == ["name"]
    assert domain.completeness(sparse, domain.CONTACT_KEY_FIELDS) == Decimal("0.2000")


@pytest.mark.parametrize(
    ("phone", "mobile", "filled"),
    [("021-5555", "", True), ("", "13800000000", True), ("  ", "13800000000", True), ("021-5555", "138", True),
     ("", "", False), (" ", " ", False)],
)  # fmt: skip
def test_a_contacts_phone_is_filled_by_a_landline_or_a_mobile(phone: str, mobile: str, filled: bool) -> None:
    fields = domain.contact_filled(**{**CONTACT, "phone": phone, "mobile": mobile}, decision_role="")
    assert ("phone" in fields) is filled


DEAL: dict[str, Any] = {
    "amount": Decimal("12000"),
    "expected_close_date": "2026-12-31",
    "primary_contact_id": "c-1",
    "line_items": 2,
    "product_line": "CRM Pro",
    "next_step": "demo on Friday",
}


def test_a_deals_key_fields_are_amount_close_date_primary_contact_products_and_next_step() -> None:
    full = domain.opportunity_filled(**DEAL)
    assert full == ["amount", "expected_close_date", "primary_contact", "products", "next_step"]
    assert full == list(domain.OPPORTUNITY_KEY_FIELDS)
    bare = domain.opportunity_filled(
        amount=None, expected_close_date="", primary_contact_id="", line_items=0, product_line="", next_step=" "
    )
    assert bare == []
    assert domain.completeness(bare, domain.OPPORTUNITY_KEY_FIELDS) == Decimal("0.0000")


@pytest.mark.parametrize(
    ("amount", "filled"),
    # Sales gives a deal created with neither an amount nor line items an amount of 0: none was given.
    [(Decimal("0.01"), True), (Decimal("12000"), True), (Decimal(0), False), (Decimal("0.0000"), False), (None, False)],
)
def test_a_deals_amount_is_filled_above_zero_only(amount: Decimal | None, filled: bool) -> None:
    assert ("amount" in domain.opportunity_filled(**{**DEAL, "amount": amount})) is filled


@pytest.mark.parametrize(
    ("line_items", "product_line", "filled"),
    [(1, "", True), (3, "CRM Pro", True), (0, "CRM Pro", True), (0, "", False), (0, "  ", False)],
)
def test_a_deals_products_are_its_line_items_or_its_product_line(
    line_items: int, product_line: str, filled: bool
) -> None:
    fields = domain.opportunity_filled(**{**DEAL, "line_items": line_items, "product_line": product_line})
    assert ("products" in fields) is filled


def test_a_contact_and_a_deal_row_count_each_key_field() -> None:
    deals = [
        domain.opportunity_filled(**DEAL),
        domain.opportunity_filled(**{**DEAL, "amount": Decimal(0), "next_step": "", "primary_contact_id": ""}),
    ]
    row = domain.completeness_row("opportunity", deals, domain.OPPORTUNITY_KEY_FIELDS)
    assert (row.entity, row.records, row.completeness) == ("opportunity", 2, Decimal("0.7000"))
    assert row.fields == [
        ("amount", 1, Decimal("0.5000")),
        ("expected_close_date", 2, Decimal("1.0000")),
        ("primary_contact", 1, Decimal("0.5000")),
        ("products", 2, Decimal("1.0000")),
        ("next_step", 1, Decimal("0.5000")),
    ]
    assert domain.completeness_row("contact", [], domain.CONTACT_KEY_FIELDS).fields == [
        (name, 0, None) for name in domain.CONTACT_KEY_FIELDS
    ]


@given(st.lists(st.sets(st.sampled_from(domain.ACCOUNT_KEY_FIELDS)), max_size=30))
def test_completeness_is_a_share(records: list[set[str]]) -> None:
    row = domain.completeness_row("account", [sorted(r) for r in records], domain.ACCOUNT_KEY_FIELDS)
    assert row.records == len(records)
    if records:
        assert row.completeness is not None and Decimal(0) <= row.completeness <= 1
    else:
        assert row.completeness is None


# ------------------------------------------------------------------------------------- churn risk


def health(**changes: object) -> AccountHealth:
    values: dict[str, object] = {
        "account_id": "a1",
        "created_at": T0 - timedelta(days=400),
        "last_activity_at": at(-24),
        "overdue_installments": 0,
        "overdue_amount": Decimal(0),
        "currency": "CNY",
        "open_urgent_tickets": 0,
        "csat_scores": (),
    }
    values.update(changes)
    return AccountHealth(**values)  # type: ignore[arg-type]


def codes(reasons: list[domain.ChurnReason]) -> list[str]:
    return [reason.code for reason in reasons]


def test_healthy_account_has_no_churn_reason() -> None:
    reasons = domain.churn_reasons(health(csat_scores=(5, 4)), ChurnPolicy(), now=T0)
    assert reasons == [] and domain.churn_risk(reasons) == "low"


def test_each_churn_rule() -> None:
    policy = ChurnPolicy(no_activity_days=30)
    assert codes(domain.churn_reasons(health(last_activity_at=T0 - timedelta(days=31)), policy, T0)) == ["NO_ACTIVITY"]
    assert codes(domain.churn_reasons(health(last_activity_at=T0 - timedelta(days=30)), policy, T0)) == []
    # never any activity: the account's age counts
    assert codes(domain.churn_reasons(health(last_activity_at=None), policy, T0)) == ["NO_ACTIVITY"]
    overdue = domain.churn_reasons(health(overdue_installments=2, overdue_amount=Decimal("300.50")), policy, T0)
    assert codes(overdue) == ["OVERDUE_INSTALLMENTS"] and "300.50 CNY" in overdue[0].detail
    assert codes(domain.churn_reasons(health(open_urgent_tickets=1), policy, T0)) == ["OPEN_URGENT_TICKETS"]
    assert codes(domain.churn_reasons(health(csat_scores=(2, 3)), policy, T0)) == ["LOW_CSAT"]
    assert codes(domain.churn_reasons(health(csat_scores=(3, 3)), policy, T0)) == []
    many = domain.churn_reasons(health(last_activity_at=None, open_urgent_tickets=1, csat_scores=(1,)), policy, T0)
    assert codes(many) == ["NO_ACTIVITY", "OPEN_URGENT_TICKETS", "LOW_CSAT"]
    assert domain.churn_risk(many) == "high"
    assert domain.churn_risk(many[:1]) == "medium"


@pytest.mark.parametrize(
    ("currency", "stored", "shown"),
    [
        ("CNY", "13954.5000", "13954.50 CNY"),  # stored amounts carry 4 places; shown in cents
        ("JPY", "849.0000", "849 JPY"),  # whole yen
        ("BHD", "12.3450", "12.345 BHD"),  # fils
    ],
)
def test_the_overdue_amount_of_a_churn_reason_is_shown_in_the_currencys_minor_unit(
    currency: str, stored: str, shown: str
) -> None:
    overdue = health(overdue_installments=1, overdue_amount=Decimal(stored), currency=currency)
    [reason] = domain.churn_reasons(overdue, ChurnPolicy(), T0)
    assert reason.detail == f"1 overdue installment(s), {shown}"


def test_low_csat_needs_enough_responses() -> None:
    policy = ChurnPolicy(min_csat_responses=3)
    assert domain.churn_reasons(health(csat_scores=(1, 1)), policy, T0) == []
    assert codes(domain.churn_reasons(health(csat_scores=(1, 1, 1)), policy, T0)) == ["LOW_CSAT"]


def test_money_received_before_the_plan_and_later_allocations_both_pay_an_installment() -> None:
    # 100 due; 50 received before the plan existed (applied when it was created), 30 allocated later.
    assert domain.outstanding(Decimal(100), Decimal(50), Decimal(30)) == Decimal(20)
    assert domain.outstanding(Decimal(100), Decimal(0), Decimal(30)) == Decimal(70)
    assert domain.outstanding(Decimal(100), Decimal(50), Decimal(50)) == Decimal(0)


@given(
    st.decimals(min_value=0, max_value=10_000, places=2),
    st.decimals(min_value=0, max_value=10_000, places=2),
    st.decimals(min_value=0, max_value=10_000, places=2),
)
def test_outstanding_never_negative_nor_above_amount(amount: Decimal, paid: Decimal, allocated: Decimal) -> None:
    owed = domain.outstanding(amount, paid, allocated)
    assert Decimal(0) <= owed <= amount
    assert owed == max(Decimal(0), amount - paid - allocated)


def test_a_campaign_that_won_in_another_currency_has_no_roi_in_this_one() -> None:
    """A 100 USD campaign that won 5000 CNY: seen in USD its CNY revenue cannot be counted (there
    are no exchange rates), so its ROI is unknown, never a loss of 100%."""
    leads = [lead("l1", "email", "c3", 1, converted_to="o1"), lead("l2", "email", "c4", 1, converted_to="o2")]
    won = [WonDeal("o1", "l1", Decimal("5000"), "CNY"), WonDeal("o2", "l2", Decimal("300"), "USD")]
    campaigns = {
        "c3": domain.CampaignCost("c3", "Ads", Decimal("100"), "USD"),
        "c4": domain.CampaignCost("c4", "Mail", Decimal("100"), "USD"),
    }
    rows = {row.key: row for row in domain.lead_source_report(leads, won, "USD", by_campaign=True, campaigns=campaigns)}
    assert (rows["c3"].cost, rows["c3"].won_revenue, rows["c3"].roi) == (Decimal("100"), Decimal("0"), None)
    assert rows["c4"].roi == Decimal("2.0000")  # all of its revenue in USD: an ROI


def test_a_ranked_page_resumes_just_after_the_account_the_page_before_ended_on() -> None:
    ranked = ["a", "b", "c", "d"]
    assert domain.resume_at((2, "b"), ranked) == 2  # where it was
    assert domain.resume_at((2, "b"), ["b", "a", "c", "d"]) == 1  # moved up since: after it, wherever it is
    assert domain.resume_at((2, "b"), ["a", "c", "d"]) == 2  # gone (merged): at the position
    assert domain.resume_at((9, "z"), ranked) == 4  # past the end: an empty page
