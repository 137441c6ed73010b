"""How the columns of a lead import file map to lead fields. Shared by the leads service, which
imports, and the gateway, which checks before streaming that the caller may write every field
the file sets."""

import re
import unicodedata
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
    # Chinese exports (备注, remarks, stays a custom field).
    "姓名": "name",
    "名字": "name",
    "联系人": "name",
    "手机": "phone",
    "手机号": "phone",
    "手机号码": "phone",
    "电话": "phone",
    "联系电话": "phone",
    "邮箱": "email",
    "电子邮箱": "email",
    "电子邮件": "email",
    "邮件": "email",
    "公司": "company",
    "公司名称": "company",
    "单位": "company",
    "企业名称": "company",
    "职位": "title",
    "职务": "title",
    "头衔": "title",
    "来源": "source",
    "线索来源": "source",
    "地区": "region",
    "区域": "region",
    "行业": "industry",
    "标签": "tags",
}


def column_target(column: str, column_map: Mapping[str, str]) -> str:
    """The lead field a column fills, or "" (its values go to `custom`). An explicit column map
    decides alone; without one, field names and their aliases, case-insensitively."""
    if column_map:
        return column_map.get(column, "")
    lowered = unicodedata.normalize("NFKC", column).strip().lower()  # full-width forms as their plain ones
    return lowered if lowered in IMPORTABLE_FIELDS else HEADER_ALIASES.get(lowered, "")


# Same length bound as a defined key (crm_platform.custom_fields.KEY_PATTERN).
_MAX_KEY = 63


def custom_key(header: str) -> str:
    """'Total Time Spent on Website' -> 'total_time_spent_on_website'; '备注' -> '备注'.

    Letters of any script are kept (NFKC-normalised, lower-cased), so two non-ASCII headers do not
    collide; everything else becomes '_'. Only ASCII keys can be defined custom fields; the others
    are kept as undefined keys, as imports keep every column (the leads service's `checked_custom(lenient=True)`).
    """
    # A column named as the REST field is (`custom.budget`, as exports name it) files under its key.
    text = unicodedata.normalize("NFKC", header).strip().lower().removeprefix("custom.")
    key = re.sub(r"[\W_]+", "_", text).strip("_")[:_MAX_KEY].rstrip("_")
    return key or "column"
