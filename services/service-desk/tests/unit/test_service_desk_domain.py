"""Service-desk rules without I/O: status machine, SLA due times (VIP raise), warning and breach
thresholds, dispatch choice, CSAT validation and return visits."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from crm_platform.errors import Conflict, ValidationFailed
from hypothesis import given
from hypothesis import strategies as st
from service_desk import domain
from service_desk.domain import FIRST_RESPONSE, AgentLoad, SlaClock

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


# --- status machine --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("new", "in_progress"),
        ("assigned", "waiting_customer"),
        ("in_progress", "resolved"),
        ("waiting_customer", "in_progress"),
        ("resolved", "closed"),
        ("resolved", "reopened"),
        ("reopened", "resolved"),
    ],
)
def test_legal_transitions_pass(current: str, target: str) -> None:
    domain.check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("closed", "reopened"),
        ("closed", "in_progress"),
        ("new", "reopened"),
        ("in_progress", "closed"),
        ("resolved", "in_progress"),
        ("new", "assigned"),  # only by assigning someone
        ("in_progress", "new"),
    ],
)
def test_illegal_transitions_are_conflicts(current: str, target: str) -> None:
    with pytest.raises(Conflict) as caught:
        domain.check_transition(current, target)
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert current in caught.value.detail and target in caught.value.detail


def test_unknown_status_names_the_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.check_transition("new", "done")
    assert caught.value.errors[0].field == "status"


def test_every_status_has_a_row_and_closed_is_terminal() -> None:
    assert set(domain.TRANSITIONS) == set(domain.STATUSES)
    assert domain.TRANSITIONS["closed"] == frozenset()


def test_assignment_moves_new_and_reopened_to_assigned_only() -> None:
    assert domain.status_after_assignment("new") == "assigned"
    assert domain.status_after_assignment("reopened") == "assigned"
    assert domain.status_after_assignment("in_progress") == "in_progress"
    with pytest.raises(Conflict):
        domain.status_after_assignment("resolved")


def test_only_an_open_ticket_never_resolved_may_be_deleted() -> None:
    for status in ("new", "assigned", "in_progress", "waiting_customer"):
        domain.check_ticket_deletable(status, resolved_once=False, ticket_id="t-1")
    refusals = {}
    for status, resolved_once in (("resolved", True), ("reopened", True), ("closed", True), ("closed", False)):
        with pytest.raises(Conflict) as caught:
            domain.check_ticket_deletable(status, resolved_once=resolved_once, ticket_id="t-1")
        assert caught.value.detail.startswith(f"ticket t-1 is {status}:")
        refusals[status, resolved_once] = caught.value.reason
    assert set(refusals.values()) == {"TICKET_ON_RECORD"}


def test_a_ticket_worked_on_again_after_a_reopening_is_still_one_that_was_resolved() -> None:
    """Resolved, then reopened, a ticket comes back to statuses a ticket never resolved has: its
    first resolution, not its status, keeps it (and the survey answer it may have) from deletion."""
    reached, frontier = set(domain.DONE_STATUSES), list(domain.DONE_STATUSES)
    while frontier:
        for target in domain.TRANSITIONS[frontier.pop()] - reached:
            reached.add(target)
            frontier.append(target)
    assert reached & domain.DELETABLE_STATUSES == {"in_progress", "waiting_customer"}
    for status in ("in_progress", "waiting_customer"):
        with pytest.raises(Conflict) as caught:
            domain.check_ticket_deletable(status, resolved_once=True, ticket_id="t-1")
        assert caught.value.reason == "TICKET_ON_RECORD"
        assert f"is {status} after it was resolved and reopened" in caught.value.detail


# --- SLA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "first", "resolution"),
    [("urgent", 15, 240), ("high", 60, 480), ("normal", 240, 1440), ("low", 480, 4320)],
)
def test_default_sla_due_times(priority: str, first: int, resolution: int) -> None:
    due = domain.sla_due(T0, domain.DEFAULT_SLA[priority])
    assert due.first_response_due_at == T0 + timedelta(minutes=first)
    assert due.resolution_due_at == T0 + timedelta(minutes=resolution)


@pytest.mark.parametrize(
    ("priority", "tier", "expected"),
    [
        ("low", "A", "normal"),
        ("normal", "A", "high"),
        ("high", "a", "urgent"),
        ("urgent", "A", "urgent"),
        ("low", "B", "low"),
        ("high", "", "high"),
    ],
)
def test_vip_accounts_are_raised_one_priority(priority: str, tier: str, expected: str) -> None:
    assert domain.effective_priority(priority, tier) == expected


def test_vip_normal_ticket_gets_the_high_targets() -> None:
    due = domain.sla_due(T0, domain.DEFAULT_SLA[domain.effective_priority("normal", "A")])
    assert due.first_response_due_at == T0 + timedelta(hours=1)
    assert due.resolution_due_at == T0 + timedelta(hours=8)


def test_waiting_for_the_customer_moves_only_the_resolution_target() -> None:
    due = domain.sla_due(T0, domain.DEFAULT_SLA["high"], timedelta(hours=2))
    assert due.first_response_due_at == T0 + timedelta(hours=1)
    assert due.resolution_due_at == T0 + timedelta(hours=10)


def _clock(**overrides: object) -> SlaClock:
    values: dict[str, object] = {
        "target": "first_response",
        "started_at": T0,
        "due_at": T0 + timedelta(minutes=100),
        "met": False,
        "warned": False,
        "breached": False,
    }
    values.update(overrides)
    return SlaClock(**values)  # type: ignore[arg-type]


def test_warning_at_eighty_percent_not_before() -> None:
    clock = _clock()
    assert domain.sla_signals([clock], T0 + timedelta(minutes=79, seconds=59)) == []
    signals = domain.sla_signals([clock], T0 + timedelta(minutes=80))
    assert [(s.target, s.kind) for s in signals] == [("first_response", "warning")]


def test_breach_at_due_time_and_each_signal_once() -> None:
    warned = _clock(warned=True)
    assert domain.sla_signals([warned], T0 + timedelta(minutes=99)) == []
    assert [s.kind for s in domain.sla_signals([warned], T0 + timedelta(minutes=100))] == ["breach"]
    done = _clock(warned=True, breached=True)
    assert domain.sla_signals([done], T0 + timedelta(days=5)) == []


def test_late_timer_announces_warning_and_breach_together() -> None:
    signals = domain.sla_signals([_clock()], T0 + timedelta(minutes=500))
    assert [s.kind for s in signals] == ["warning", "breach"]


def test_a_target_met_at_or_past_its_due_time_is_breached_at_once_though_the_timer_was_silent() -> None:
    running, answered = _clock(), _clock(met=True)
    due = T0 + timedelta(minutes=100)

    late = domain.breaches_at_stop([running], [answered], due)

    assert [(s.target, s.kind, s.due_at) for s in late] == [("first_response", "breach", due)]
    assert domain.breaches_at_stop([running], [answered], due - timedelta(seconds=1)) == []  # in time
    announced = _clock(warned=True, breached=True)
    assert domain.breaches_at_stop([announced], [replace(announced, met=True)], due + timedelta(hours=1)) == []
    assert domain.breaches_at_stop([answered], [answered], due + timedelta(hours=1)) == []  # stopped before
    assert domain.breaches_at_stop([running], [running], due + timedelta(hours=1)) == []  # still running: the timer's


def test_met_targets_are_silent_and_need_no_check() -> None:
    met = _clock(met=True)
    assert domain.sla_signals([met], T0 + timedelta(days=1)) == []
    assert domain.next_sla_check([met]) is None


def test_next_check_is_the_earliest_pending_threshold() -> None:
    first = _clock()
    resolution = _clock(target="resolution", due_at=T0 + timedelta(minutes=1000))
    assert domain.next_sla_check([first, resolution]) == T0 + timedelta(minutes=80)
    assert domain.next_sla_check([_clock(warned=True), resolution]) == T0 + timedelta(minutes=100)
    assert domain.next_sla_check([_clock(warned=True, breached=True), resolution]) == T0 + timedelta(minutes=800)


@given(st.integers(min_value=1, max_value=100_000), st.integers(min_value=0, max_value=200_000))
def test_warning_always_precedes_breach(minutes: int, elapsed_seconds: int) -> None:
    clock = _clock(due_at=T0 + timedelta(minutes=minutes))
    kinds = [s.kind for s in domain.sla_signals([clock], T0 + timedelta(seconds=elapsed_seconds))]
    assert kinds in ([], ["warning"], ["warning", "breach"])
    assert domain.warning_at(T0, clock.due_at) <= clock.due_at


def test_a_retimed_clock_drops_a_breach_its_later_due_time_no_longer_holds() -> None:
    # Breached at 15 minutes as urgent; lowered at 30 minutes to low (8 h): within time, not even at 80 %.
    clock = _clock(due_at=T0 + timedelta(hours=8), warned=True, breached=True)
    retimed = domain.retimed_clock(clock, T0 + timedelta(minutes=30))
    assert (retimed.warned, retimed.breached) == (False, False)
    assert domain.next_sla_check([retimed]) == T0 + timedelta(hours=6, minutes=24)  # warned again at 80 %


def test_a_retimed_clock_keeps_what_still_holds() -> None:
    late = _clock(due_at=T0 + timedelta(minutes=60), warned=True, breached=True)
    assert domain.retimed_clock(late, T0 + timedelta(minutes=90)) == late
    nearly = domain.retimed_clock(late, T0 + timedelta(minutes=50))  # past 80 % of 60 minutes, not past 60
    assert (nearly.warned, nearly.breached) == (True, False)
    assert domain.next_sla_check([nearly]) == T0 + timedelta(minutes=60)


def test_a_retimed_clock_leaves_new_announcements_to_the_timer() -> None:
    # Raised: now past the new due time, but warnings and breaches go out from the timer, with events.
    raised = domain.retimed_clock(_clock(due_at=T0 + timedelta(minutes=15)), T0 + timedelta(minutes=30))
    assert (raised.warned, raised.breached) == (False, False)
    assert [s.kind for s in domain.sla_signals([raised], T0 + timedelta(minutes=30))] == ["warning", "breach"]


def test_a_paused_clock_is_judged_at_its_pause_and_a_met_one_keeps_its_verdict() -> None:
    paused = _clock(
        target="resolution", due_at=T0 + timedelta(hours=72), met=True, warned=True, breached=True,
        paused_at=T0 + timedelta(hours=5),
    )  # fmt: skip
    retimed = domain.retimed_clock(paused, T0 + timedelta(days=10))
    assert (retimed.warned, retimed.breached) == (False, False)
    answered_late = _clock(due_at=T0 + timedelta(hours=8), met=True, warned=True, breached=True)
    assert domain.retimed_clock(answered_late, T0 + timedelta(minutes=30)) == answered_late


@pytest.mark.parametrize(
    ("escalated", "reason", "breached", "expected"),
    [
        (True, "sla_breached_first_response", set(), (False, "")),
        (True, "sla_breached_first_response", {"first_response"}, (True, "sla_breached_first_response")),
        (True, "sla_breached_resolution", {"first_response"}, (True, "sla_breached_first_response")),
        (True, "no_agent_available", set(), (True, "no_agent_available")),
        (False, "", set(), (False, "")),
    ],
)
def test_a_breach_escalation_lifts_with_the_breach_and_others_stay(
    escalated: bool, reason: str, breached: set[str], expected: tuple[bool, str]
) -> None:
    clocks = [_clock(target=target, breached=target in breached) for target in ("first_response", "resolution")]
    assert domain.escalation_after_retiming(escalated, reason, clocks) == expected


def test_an_account_deletion_closes_every_ticket_not_closed_yet() -> None:
    assert {*domain.OPEN_STATUSES, "resolved"} == domain.CLOSED_WITH_THE_ACCOUNT


def test_sla_targets_validation_names_fields() -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_sla_targets(0, -1)
    assert {e.field for e in caught.value.errors} == {"first_response_minutes", "resolution_minutes"}
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_sla_targets(60, 30)
    assert caught.value.errors[0].field == "resolution_minutes"


# --- dispatch --------------------------------------------------------------------------------------


def _agent(agent_id: str, *, skills: tuple[str, ...] = ("billing",), region: str = "east", **kw: object) -> AgentLoad:
    values: dict[str, object] = {"capacity": 5, "available": True, "open_tickets": 0}
    values.update(kw)
    return AgentLoad(id=agent_id, skills=skills, region=region, **values)  # type: ignore[arg-type]


def test_dispatch_picks_the_least_loaded_matching_agent() -> None:
    agents = [
        _agent("a", open_tickets=3),
        _agent("b", open_tickets=1),
        _agent("c", open_tickets=0, skills=("network",)),  # wrong skill
        _agent("d", open_tickets=0, region="west"),  # wrong region
        _agent("e", open_tickets=0, available=False),  # away
        _agent("f", open_tickets=5, capacity=5),  # full
    ]
    choice = domain.choose_agent(agents, category="billing", region="east")
    assert choice is not None and choice.id == "b"


def test_dispatch_ties_break_on_id_and_none_means_queued() -> None:
    agents = [_agent("z", open_tickets=1), _agent("m", open_tickets=1)]
    assert domain.choose_agent(agents, category="billing", region="east").id == "m"  # type: ignore[union-attr]
    assert domain.choose_agent(agents, category="hardware", region="east") is None
    assert domain.choose_agent([], category="billing", region="east") is None


def test_ticket_without_category_or_region_goes_to_anyone_free() -> None:
    agents = [_agent("a", open_tickets=2), _agent("b", open_tickets=1, region="west", skills=())]
    assert domain.choose_agent(agents, category="", region="").id == "b"  # type: ignore[union-attr]


# --- CSAT, return visits, validation ---------------------------------------------------------------


@pytest.mark.parametrize("score", [0, 6, -1])
def test_csat_score_out_of_range_names_score(score: int) -> None:
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_csat("resolved", True, score, "")
    assert caught.value.errors[0].field == "score"


def test_csat_needs_a_resolved_ticket_and_a_short_comment() -> None:
    domain.validate_csat("resolved", True, 5, "great")
    domain.validate_csat("closed", True, 1, "")
    with pytest.raises(Conflict):
        domain.validate_csat("in_progress", False, 4, "")
    with pytest.raises(ValidationFailed) as caught:
        domain.validate_csat("resolved", True, 3, "x" * 2001)
    assert caught.value.errors[0].field == "comment"


def test_csat_needs_a_ticket_that_was_resolved_not_just_closed() -> None:
    with pytest.raises(Conflict) as caught:
        domain.validate_csat("closed", False, 5, "")
    assert caught.value.reason == "TICKET_NOT_RESOLVED"


def test_a_person_may_assign_across_skill_and_region_but_not_to_an_agent_away_or_full() -> None:
    domain.check_manual_assignment("a", True, 3, 2)
    with pytest.raises(Conflict) as away:
        domain.check_manual_assignment("a", False, 3, 0)
    with pytest.raises(Conflict) as full:
        domain.check_manual_assignment("a", True, 3, 3)
    assert (away.value.reason, full.value.reason) == ("AGENT_UNAVAILABLE", "AGENT_AT_CAPACITY")


def test_return_visit_only_for_tier_a() -> None:
    assert domain.return_visit_due(T0, "A", 3) == T0 + timedelta(days=3)
    assert domain.return_visit_due(T0, "B", 3) is None
    assert domain.return_visit_due(T0, "", 3) is None


def test_only_an_open_return_visit_can_be_done() -> None:
    domain.check_visit_completion("open")
    with pytest.raises(Conflict) as done:
        domain.check_visit_completion("done")
    with pytest.raises(Conflict) as cancelled:
        domain.check_visit_completion("cancelled")
    assert (done.value.reason, cancelled.value.reason) == ("ALREADY_DONE", "ILLEGAL_TRANSITION")


def test_ticket_validation_names_each_field() -> None:
    errors = domain.validate_ticket({"subject": " ", "channel": "fax", "priority": "p1", "tags": [""]}, partial=False)
    assert {e.field for e in errors} == {"subject", "channel", "priority", "tags"}
    assert domain.validate_ticket({"priority": "low"}, partial=True) == []


def test_search_terms_are_tsquery_safe_words() -> None:
    assert domain.search_terms("Can't log in: password reset!! the VPN") == ["log", "password", "reset", "vpn"]
    assert domain.search_terms("a:* | b & c", min_length=1, stop_words=False) == ["a", "b", "c"]


def test_search_terms_cut_chinese_into_overlapping_character_pairs_and_keep_latin_words() -> None:
    pairs = ["打印", "印机", "机无", "无法", "法启", "启动", "请重", "重启"]
    assert domain.search_terms("打印机无法启动。请重启") == pairs
    # A lone character is a term of its own; Latin words next to CJK stay words, short ones only in searches.
    assert domain.search_terms("VPN连不上 卡 win10 3号楼", min_length=1, stop_words=False) == [
        "vpn", "连不", "不上", "卡", "win10", "3", "号楼",
    ]  # fmt: skip
    assert domain.search_terms("Outlook 打不开 in 3号楼") == ["outlook", "打不", "不开", "号楼"]


def test_a_ticket_never_worked_is_closed_directly_and_one_reopened_after_a_resolution_is_not() -> None:
    domain.check_transition("new", "closed")
    domain.check_transition("assigned", "closed")
    with pytest.raises(Conflict) as refused:
        domain.check_transition("assigned", "closed", resolved_once=True)
    assert refused.value.reason == "ILLEGAL_TRANSITION"
    domain.check_transition("resolved", "closed", resolved_once=True)


def test_a_target_met_for_good_is_neither_running_nor_paused() -> None:
    now = datetime(2026, 1, 5, 9, tzinfo=UTC)
    answered = SlaClock(FIRST_RESPONSE, now, now + timedelta(hours=1), met=True, warned=False, breached=False)
    assert domain.met_for_good(answered)
    assert not domain.met_for_good(replace(answered, met=False))
    assert not domain.met_for_good(replace(answered, paused_at=now))  # resolved: may be reopened
