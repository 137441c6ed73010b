"""Normalised email addresses and phone numbers: the dedupe and matching keys every context uses,
so that a lead and a contact with the same number meet on the same key.

Both run for every imported row, so they use a few compiled regexes and the standard library only.
"""

import re
import unicodedata

# --- email ------------------------------------------------------------------------------------------

# Pasted from chat apps and spreadsheets; invisible, so they would split one address into two keys.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))
# ASCII characters allowed unquoted in a local part (RFC 5322 atext plus '.'); any other ASCII
# character (space, <>()[],;:"\ ...) means the cell holds more than an address.
_LOCAL_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~.")
_DOMAIN_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def normalise_email(raw: str) -> str:
    """NFKC, invisible characters removed, trimmed, lower-cased, IDN domain as punycode.

    Raises ValueError when it is not a single unquoted address (an annotation after it, 'a@x..cn').
    """
    value = unicodedata.normalize("NFKC", raw).translate(_INVISIBLE).strip().lower()
    local, at, domain = value.rpartition("@")
    if not at or len(value) > 254 or not _valid_local(local):
        raise ValueError(f"{raw!r} is not an email address")
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        raise ValueError(f"{raw!r} is not an email address")
    return f"{local}@{ascii_domain}"


def _valid_local(local: str) -> bool:
    if not local or len(local) > 64 or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    # Non-ASCII letters are allowed (internationalised addresses); non-ASCII punctuation, symbols
    # and spaces (full-width brackets, 【】, ideographic space) are not.
    return all(c in _LOCAL_ASCII if c.isascii() else unicodedata.category(c)[0] in "LNM" for c in local)


def _ascii_domain(domain: str) -> str | None:
    """The domain as lower-case ASCII (punycode for IDN), or None when it is not a host name."""
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii").lower()
        except UnicodeError:  # empty or over-long label, or a character IDNA prohibits
            return None
    labels = domain.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        return None
    return domain


# --- phone ------------------------------------------------------------------------------------------

# '(+86) 138…' and '+86 …': the plus may sit inside the opening bracket.
_INTERNATIONAL = re.compile(r"^\(?\s*\+")
_PHONE_ALLOWED = re.compile(r"^[\d\s\-().]+$")
# Explicit extension markers; the extension is not part of the line, so not part of the key.
_EXTENSION = re.compile(r"\s*(?:转|分机|ext\.?|x|#)\s*\d{1,6}$", re.IGNORECASE)
# '-801' after a landline is also an extension, but only tried when the whole is no valid number
# (a mobile written 138-0013-8000 must keep its last group).
_DASH_EXTENSION = re.compile(r"\s*-\s*\d{1,6}$")
# '+86 (0)10 …': the bracketed trunk 0 is not dialled after a country code.
_BRACKETED_TRUNK = re.compile(r"\(\s*0\s*\)")
# Chinese national significant numbers (after the trunk 0): an 11-digit mobile 1[3-9]…, or a landline
# of a 2-digit area code (10, 2x) with 8 digits or a 3-digit one (3xx-9xx) with 7 or 8.
_CN_NUMBER = re.compile(r"^(?:1[3-9]\d{9}|(?:10|2\d)\d{8}|[3-9]\d{2}\d{7,8})$")
# Written nationally a landline keeps its trunk 0 (without it '852 9123 4567' would read as area 852).
_CN_NATIONAL = re.compile(r"^(?:0?1[3-9]\d{9}|0(?:(?:10|2\d)\d{8}|[3-9]\d{2}\d{7,8}))$")
# Hong Kong, Macau and Taiwan numbers written without '+' by Chinese users: code -> local digits.
# Unambiguous beside default-86 national numbers, which always start with 0 or 1.
_NEIGHBOURS = {"852": 8, "853": 8, "886": 9}
# E.164 allows at most 15 digits; fewer than 8 with the country code is a short code, not a line.
_E164_DIGITS = range(8, 16)


# ITU-T E.164 country codes: 1 (NANP) and 7 have one digit, these two, every other code three.
# fmt: off
_TWO_DIGIT_COUNTRY_CODES = frozenset({
    "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48", "49",
    "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81", "82", "84",
    "86", "90", "91", "92", "93", "94", "95", "98",
})
# fmt: on


def split_country_code(digits: str) -> tuple[str, str]:
    """The country code and the national number of an international number's digits
    ('8613800138000' -> ('86', '13800138000')), by the code's first digits."""
    length = 1 if digits[:1] in ("1", "7") else 2 if digits[:2] in _TWO_DIGIT_COUNTRY_CODES else 3
    return digits[:length], digits[length:]


def normalise_phone(raw: str, default_country: str = "86") -> str:
    """E.164: '+' and the digits with their country code ('138 0013 8000' -> '+8613800138000').

    NFKC first (full-width digits from a Chinese IME); an extension ('转801', 'ext 801', 'x801',
    '#801', '-801' after a landline) is dropped. A leading '+' or '00' marks an international
    number; a national one gets `default_country`, its trunk '0' dropped. With default country 86,
    '86…'/'086…' followed by a complete Chinese number and '852'/'853'/'886' followed by a local
    number of the right length are read as country codes. +86 numbers must be a mobile (1[3-9] and
    9 digits) or a landline (area code and 7-8 digits); others need a country code not starting
    with 0 and 8-15 digits in all. Raises ValueError otherwise.
    """
    value = _EXTENSION.sub("", unicodedata.normalize("NFKC", raw).strip())
    full = _e164_digits(value, default_country)
    if full is None and (without := _DASH_EXTENSION.sub("", value)) != value:
        full = _e164_digits(without, default_country)
    if full is None:
        raise ValueError(f"{raw!r} is not a phone number")
    return "+" + full


def _e164_digits(value: str, default_country: str) -> str | None:
    """The country code and national digits of `value` (no extension), or None when invalid."""
    international = _INTERNATIONAL.match(value)
    body = value[international.end() :] if international else value
    if not body or not _PHONE_ALLOWED.match(body):
        return None
    digits = re.sub(r"\D", "", _BRACKETED_TRUNK.sub("", body))
    if international:
        return _checked(digits)
    if digits.startswith("00"):
        return _checked(digits[2:])
    if default_country != "86":
        # No national numbering plan known here, so a written-out country code cannot be told apart.
        return _checked(default_country + digits.lstrip("0"))
    if _CN_NATIONAL.match(digits):
        return "86" + digits.removeprefix("0")
    for prefix in ("86", "086"):
        if digits.startswith(prefix) and _CN_NUMBER.match(national := digits[len(prefix) :].removeprefix("0")):
            return "86" + national
    for code, length in _NEIGHBOURS.items():
        if digits.startswith(code) and len(digits) == len(code) + length:
            return digits
    return None


def _checked(full: str) -> str | None:
    """`full` (country code and number) when plausible: +86 by the Chinese plan, others by E.164 length."""
    if full.startswith("86"):
        national = full[2:].removeprefix("0")  # '+86 010 …': trunk 0 written after the code
        return "86" + national if _CN_NUMBER.match(national) else None
    if full.startswith("0") or len(full) not in _E164_DIGITS:
        return None
    return full
