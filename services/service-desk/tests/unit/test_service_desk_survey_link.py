"""The rules of a ticket's survey link without I/O: until when it takes the customer's answer
(`survey_valid_days` after the ticket's current resolution), and in which states."""

from datetime import UTC, datetime, timedelta

import pytest
from crm_platform.errors import Conflict
from hypothesis import given
from hypothesis import strategies as st
from service_desk import domain

pytestmark = pytest.mark.unit

RESOLVED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
DAYS = 30.0


def test_the_link_expires_the_valid_days_after_the_resolution() -> None:
    assert domain.survey_expires_at(RESOLVED, DAYS) == RESOLVED + timedelta(days=30)
    assert domain.survey_expires_at(RESOLVED, 0.5) == RESOLVED + timedelta(hours=12)


@pytest.mark.parametrize("status", ["resolved", "closed"])
def test_a_resolved_ticket_closed_since_or_not_takes_an_answer_until_the_link_expires(status: str) -> None:
    assert domain.survey_refusal(status, RESOLVED, RESOLVED, DAYS) is None
    last_moment = RESOLVED + timedelta(days=30) - timedelta(microseconds=1)
    assert domain.survey_refusal(status, RESOLVED, last_moment, DAYS) is None
    domain.check_survey_answerable(status, RESOLVED, last_moment, DAYS)  # raises nothing


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(days=400)])
def test_an_expired_link_is_refused_with_its_reason(late: timedelta) -> None:
    now = RESOLVED + timedelta(days=30) + late
    refusal = domain.survey_refusal("resolved", RESOLVED, now, DAYS)
    assert refusal is not None and refusal.reason == "SURVEY_EXPIRED"
    assert "30 days after the ticket was resolved" in refusal.detail
    with pytest.raises(Conflict) as caught:
        domain.check_survey_answerable("closed", RESOLVED, now, DAYS)
    assert caught.value.reason == "SURVEY_EXPIRED"


@pytest.mark.parametrize("status", sorted(domain.OPEN_STATUSES))
def test_a_ticket_open_again_or_never_resolved_takes_no_answer(status: str) -> None:
    """A reopened ticket keeps its link, which takes an answer again once it is resolved again."""
    refusal = domain.survey_refusal(status, None, RESOLVED, DAYS)
    assert refusal is not None and refusal.reason == "TICKET_NOT_RESOLVED"
    assert status in refusal.detail


def test_a_ticket_closed_without_a_resolution_takes_no_answer() -> None:
    """Reopened, then closed with its account: its link shows, but takes nothing."""
    refusal = domain.survey_refusal("closed", None, RESOLVED, DAYS)
    assert refusal is not None and refusal.reason == "TICKET_NOT_RESOLVED"
    assert "closed without a resolution" in refusal.detail


@given(
    status=st.sampled_from(domain.STATUSES),
    resolved=st.booleans(),
    elapsed_hours=st.integers(min_value=0, max_value=24 * 100),
    days=st.integers(min_value=1, max_value=90),
)
def test_answerable_exactly_when_resolved_and_inside_the_valid_days(
    status: str, resolved: bool, elapsed_hours: int, days: int
) -> None:
    now = RESOLVED + timedelta(hours=elapsed_hours)
    refusal = domain.survey_refusal(status, RESOLVED if resolved else None, now, days)
    expected = status in domain.DONE_STATUSES and resolved and elapsed_hours < days * 24
    assert (refusal is None) == expected


def test_the_answer_channels_are_staff_and_customer() -> None:
    assert domain.CSAT_CHANNELS == ("staff", "customer")
