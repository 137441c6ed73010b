"""Masking by field type: what a `masked` field shows, and how PII is written into audit records."""

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from crm_platform.contact_points import split_country_code

MASK = "***"


def mask_phone(value: str) -> str:
    """`13812345678` -> `138****5678`, `+86 138 1234 5678` -> `+86 138****5678` (the country code
    shown, the national number masked as a national one); short numbers keep only their last two digits."""
    digits = "".join(ch for ch in value if ch.isdigit())
    if value.lstrip().startswith("+") and digits:
        country, national = split_country_code(digits)
        return f"+{country} {_mask_digits(national)}"
    return _mask_digits(digits)


def _mask_digits(digits: str) -> str:
    if len(digits) >= 8:  # the last four shown, and at most three in front: four or more always hidden
        shown = min(3, len(digits) - 8)
        return f"{digits[:shown]}{'*' * (len(digits) - shown - 4)}{digits[-4:]}"
    if len(digits) >= 3:
        return f"{'*' * (len(digits) - 2)}{digits[-2:]}"
    return "****"


def mask_email(value: str) -> str:
    """`john@example.com` -> `j***@example.com`."""
    local, sep, domain = value.partition("@")
    if not sep:
        return mask_text(value)
    return f"{local[:1]}***@{domain}"


def url_without_query(url: str) -> str:
    """The URL's scheme, host and path only: `https://x.cn/p?u=jane%40example.com#top` ->
    `https://x.cn/p`. A tracking link carries who clicked in its query string or fragment, in any
    encoding (an address percent-encoded once or twice, a phone number, non-ASCII text) that no
    pattern would catch, so both go, as does any user information before the host. A URL without a
    host (`mailto:jane@example.com`, `tel:...`) is that person: only its scheme is shown, and of
    text that is no URL at all, nothing."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed `[` of an IPv6 host: no URL
        return ""
    host = parts.netloc.rpartition("@")[2]
    if not host:
        return f"{parts.scheme}:" if parts.scheme else ""
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def mask_text(value: str) -> str:
    """Keeps the first character so a person can still tell records apart."""
    return f"{value[:1]}{MASK}" if value else value


def mask_value(value: Any, field_type: str) -> Any:
    """A masked rendering that keeps the JSON type where one exists: strings stay strings, money
    keeps its currency; numbers, dates and booleans become null (no partial number is meaningful)."""
    if value is None or value == "":
        return value
    if field_type in ("date", "datetime"):  # JSON text, but a client parses it as a time: "***" would not parse
        return None
    if field_type == "phone" and isinstance(value, str):
        return mask_phone(value)
    if field_type == "email" and isinstance(value, str):
        return mask_email(value)
    if field_type == "money" and isinstance(value, dict):
        return {**value, "amount": MASK}
    if isinstance(value, str) and field_type in ("text", "url", "id", "percent", "decimal"):
        return mask_text(value) if field_type in ("text", "url") else MASK
    if isinstance(value, list):
        return [mask_value(item, field_type) for item in value]
    if isinstance(value, dict):
        return {key: mask_value(item, "text") for key, item in value.items()}
    if isinstance(value, str):
        return MASK
    return None
