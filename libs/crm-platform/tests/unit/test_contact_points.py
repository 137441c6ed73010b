"""Email and phone matching keys, shared by every context (a lead meets a contact on them)."""

import pytest
from crm_platform.contact_points import normalise_email, normalise_phone
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("138 0013 8000", "+8613800138000"),
        ("+86 138-0013-8000", "+8613800138000"),
        ("0086 13800138000", "+8613800138000"),
        ("(010) 6552 9988", "+861065529988"),
        ("010-12345678", "+861012345678"),
        ("+1 (415) 555-0100", "+14155550100"),
    ],
)
def test_phone_numbers_become_e164(raw: str, expected: str) -> None:
    assert normalise_phone(raw) == expected


def test_a_national_number_takes_the_configured_country() -> None:
    assert normalise_phone("(415) 555-0100", default_country="1") == "+14155550100"


@pytest.mark.parametrize("raw", ["", "abc", "n/a", "12", "+1 555 CALL NOW", "1234567890123456789"])
def test_malformed_phones_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="phone number"):
        normalise_phone(raw)


@given(st.from_regex(r"\+?[1-9][0-9]{9,12}", fullmatch=True))
def test_phone_normalisation_is_idempotent(raw: str) -> None:
    once = normalise_phone(raw)
    assert normalise_phone(once) == once


def test_emails_are_trimmed_and_lower_cased() -> None:
    assert normalise_email("  Li.Lei@Example.COM ") == "li.lei@example.com"


@pytest.mark.parametrize("bad", ["no-at-sign", "a@b", "two@@example.com", "sp ace@example.com", "x" * 250 + "@a.com"])
def test_malformed_emails_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="email address"):
        normalise_email(bad)
