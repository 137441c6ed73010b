"""Normalised email addresses and phone numbers: the dedupe and matching keys every context uses,
so that a lead and a contact with the same number meet on the same key."""

import re

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_ALLOWED = re.compile(r"^\+?[\d\s\-().]+$")
# E.164 allows at most 15 digits; fewer than 8 with the country code is a short code, not a line.
_PHONE_DIGITS = range(8, 16)


def normalise_email(raw: str) -> str:
    """Trimmed and lower-cased; raises ValueError when it is not an address."""
    value = raw.strip().lower()
    if len(value) > 254 or not _EMAIL.match(value):
        raise ValueError(f"{raw!r} is not an email address")
    return value


def normalise_phone(raw: str, default_country: str = "86") -> str:
    """E.164: '+' and the digits with their country code ('138 0013 8000' -> '+8613800138000').

    A leading '+' or '00' marks an international number; a national one gets `default_country`,
    its trunk '0' dropped. Raises ValueError on letters or an implausible number of digits.
    """
    value = raw.strip()
    if not value or not _PHONE_ALLOWED.match(value):
        raise ValueError(f"{raw!r} is not a phone number")
    digits = re.sub(r"\D", "", value)
    if value.startswith("+"):
        full = digits
    elif digits.startswith("00"):
        full = digits[2:]
    else:
        full = default_country + digits.lstrip("0")
    if len(full) not in _PHONE_DIGITS:
        raise ValueError(f"{raw!r} has {len(digits)} digits, not a phone number")
    return "+" + full
