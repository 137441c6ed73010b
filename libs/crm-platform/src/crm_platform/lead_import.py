"""How the columns of a lead import file map to lead fields. Shared by the leads service, which
imports, and the gateway, which checks before streaming that the caller may write every field
the file sets."""

from collections.abc import Mapping

IMPORTABLE_FIELDS = frozenset(
    {"name", "company", "title", "phone", "email", "source", "region", "industry", "tags", "external_id",
     "campaign_id", "owner_id", "team"}
)  # fmt: skip
# Header names understood without a column map (lower-cased), besides the field names themselves.
HEADER_ALIASES: Mapping[str, str] = {
    "lead source": "source",
    "prospect id": "external_id",
    "company name": "company",
    "job title": "title",
    "mobile": "phone",
    "phone number": "phone",
    "e-mail": "email",
    "email address": "email",
    "country": "region",
    "full name": "name",
}


def column_target(column: str, column_map: Mapping[str, str]) -> str:
    """The lead field a column fills, or "" (its values go to `custom`). An explicit column map
    decides alone; without one, field names and their aliases, case-insensitively."""
    if column_map:
        return column_map.get(column, "")
    lowered = column.strip().lower()
    return lowered if lowered in IMPORTABLE_FIELDS else HEADER_ALIASES.get(lowered, "")
