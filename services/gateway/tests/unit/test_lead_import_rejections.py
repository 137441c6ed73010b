"""An import's rejection reasons quote the values they refuse; shown to a caller who reads the field
masked, the quoted value is masked, however the service quoted it."""

import pytest
from gateway.routers.leads import _masked_quotes


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("li.wei@example.com x", "'l***@example.com x'"),
        # repr quotes a value holding an apostrophe in double quotes...
        ("o'neil@example.com (home)", "'o***@example.com (home)'"),
        # ...and escapes the quote when the value holds both kinds.
        ("o'neil\"s@example.com", "'o***@example.com'"),
    ],
)
def test_an_email_a_reason_quotes_is_masked_in_either_quotes(value: str, masked: str) -> None:
    reason = f"{value!r} is not an email address"
    assert _masked_quotes(reason, "email") == f"{masked} is not an email address"
    assert "neil" not in _masked_quotes(reason, "email") and "li.wei" not in _masked_quotes(reason, "email")


def test_a_custom_value_a_reason_quotes_is_masked_whole() -> None:
    address = "Shanghai Pudong, Room 5'B"
    reason = f"{address!r} is longer than 10 characters"
    assert _masked_quotes(reason, "custom.address") == "'***' is longer than 10 characters"
