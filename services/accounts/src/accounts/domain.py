"""Pure rules of the accounts context: normalisation and dedupe, hierarchy, the public pool,
ownership transfer, merge, activities, reminders and task due windows. No I/O here."""

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import urlparse

from crm_platform.activities import follow_up_error, kind_error, occurred_at_error
from crm_platform.contact_points import normalise_email, normalise_phone
from crm_platform.errors import FieldError
from crm_platform.money import MAX_FIGURE, check_amount

TIERS = ("A", "B", "C", "D")
LIFECYCLES = ("prospect", "customer", "churned")
DECISION_ROLES = ("decision_maker", "influencer", "user", "gatekeeper")
TASK_STATUSES = ("open", "done", "cancelled")
SEGMENT_VISIBILITIES = ("user", "team")
MAX_NAME = 300
MAX_TAGS = 50
MAX_TAG_LENGTH = 64
# Reminder rules: a quiet spell of at most ten years, a task due within a year (the reminder job
# computes dates from both, which must stay representable).
MAX_INACTIVE_DAYS = 3650
MAX_DUE_IN_HOURS = 8760

# Legal-form words that do not tell two companies apart ("Acme Ltd" is "Acme Limited").
_LEGAL_SUFFIXES = (
    "incorporated", "inc", "corporation", "corp", "company", "co", "limited", "ltd", "llc", "plc",
    "gmbh", "ag", "sa", "bv", "group",
    "股份有限公司", "有限责任公司", "有限公司", "集团",
)  # fmt: skip
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalise_name(name: str) -> str:
    """Case-, width- and punctuation-insensitive company name without trailing legal forms."""
    text = unicodedata.normalize("NFKC", name).casefold()
    words = [w for w in _NON_WORD.split(text) if w]
    while len(words) > 1 and words[-1] in _LEGAL_SUFFIXES:
        words.pop()
    joined = " ".join(words)
    for suffix in _LEGAL_SUFFIXES:
        # Chinese names carry the legal form without a space: 华为技术有限公司.
        if not suffix.isascii() and joined.endswith(suffix) and len(joined) > len(suffix):
            joined = joined[: -len(suffix)]
            break
    return joined


def normalise_region(region: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", region).casefold().split())


def dedupe_key(name: str, region: str) -> str:
    """Two live accounts with the same key are duplicates."""
    return f"{normalise_name(name)}|{normalise_region(region)}"


def normalise_tags(tags: Iterable[str]) -> list[str]:
    """Trimmed, de-duplicated, order kept."""
    seen: dict[str, None] = {}
    for tag in tags:
        clean = " ".join(tag.split())
        if clean:
            seen.setdefault(clean, None)
    return list(seen)


def check_tags(tags: list[str], *, field_name: str = "tags") -> list[FieldError]:
    errors: list[FieldError] = []
    if len(tags) > MAX_TAGS:
        errors.append(FieldError(field_name, f"at most {MAX_TAGS} tags"))
    if any(len(t) > MAX_TAG_LENGTH for t in tags):
        errors.append(FieldError(field_name, f"a tag has at most {MAX_TAG_LENGTH} characters"))
    return errors


def check_account(values: Mapping[str, object], *, update: bool = False) -> list[FieldError]:
    """Errors in the account fields present in `values` (a create passes every field; an empty
    lifecycle there means the default, while an update cannot clear it)."""
    errors: list[FieldError] = []
    if "name" in values:
        name = str(values["name"] or "").strip()
        if not name:
            errors.append(FieldError("name", "is required"))
        elif len(name) > MAX_NAME:
            errors.append(FieldError("name", f"must be at most {MAX_NAME} characters"))
    tier = values.get("tier")
    if tier and tier not in TIERS:
        errors.append(FieldError("tier", f"must be one of {', '.join(TIERS)}"))
    lifecycle = values.get("lifecycle")
    if (lifecycle or (update and "lifecycle" in values)) and lifecycle not in LIFECYCLES:
        errors.append(FieldError("lifecycle", f"must be one of {', '.join(LIFECYCLES)}"))
    website = values.get("website")
    if website and not _looks_like_website(str(website)):
        errors.append(FieldError("website", "must be a host name or http(s) URL"))
    for money_field in ("annual_revenue", "credit_limit"):
        amount = values.get(money_field)
        if isinstance(amount, Decimal):
            currency = str(values.get(f"{money_field}_currency") or "")
            errors.extend(check_amount(amount, field=f"{money_field}.amount", currency=currency, maximum=MAX_FIGURE))
    tags = values.get("tags")
    if isinstance(tags, list):
        errors.extend(check_tags(tags))
    return errors


def _looks_like_website(text: str) -> bool:
    parsed = urlparse(text if "://" in text else f"http://{text}")
    return parsed.scheme in ("http", "https") and "." in (parsed.hostname or "")


def check_contact(values: Mapping[str, object]) -> list[FieldError]:
    errors: list[FieldError] = []
    if "name" in values and not str(values["name"] or "").strip():
        errors.append(FieldError("name", "is required"))
    if "account_id" in values and not values["account_id"]:
        errors.append(FieldError("account_id", "is required"))
    email = values.get("email")
    if email:
        try:
            normalise_email(str(email))
        except ValueError:
            errors.append(FieldError("email", "must be an email address"))
    for phone_field in ("phone", "mobile"):
        phone = values.get(phone_field)
        if phone:
            try:
                normalise_phone(str(phone))
            except ValueError:
                errors.append(FieldError(phone_field, "must be a phone number (8 to 15 digits with the country code)"))
    role = values.get("decision_role")
    if role and role not in DECISION_ROLES:
        errors.append(FieldError("decision_role", f"must be one of {', '.join(DECISION_ROLES)}"))
    tags = values.get("tags")
    if isinstance(tags, list):
        errors.extend(check_tags(tags))
    return errors


def contact_owner(*, account_owner_id: str, caller_id: str) -> str:
    """A contact belongs to its account's owner, wherever it was created or moved from; on an account
    in the public pool (no owner) to the caller who adds or moves it there."""
    return account_owner_id or caller_id


# --- hierarchy -------------------------------------------------------------------------------


def parent_cycle(account_id: str, new_parent_id: str, parent_of: Mapping[str, str | None]) -> bool:
    """True when making `new_parent_id` the parent of `account_id` closes a loop.

    `parent_of` maps account ids to their current parents, for at least the new parent's ancestors.
    """
    seen: set[str] = set()
    current: str | None = new_parent_id
    while current:
        if current == account_id:
            return True
        if current in seen:  # an existing loop in the data: refuse to extend it
            return True
        seen.add(current)
        current = parent_of.get(current)
    return False


def heir_in_line(survivor_id: str, duplicate_id: str, parent_of: Mapping[str, str | None]) -> str | None:
    """The survivor or its ancestor whose parent is the duplicate, when the duplicate sits above the survivor.

    A merge re-points the duplicate's children at the survivor; this one child must take the duplicate's
    place instead, or the hierarchy would loop. `parent_of` holds the survivor's ancestors.
    """
    seen: set[str] = set()
    current: str | None = survivor_id
    while current and current not in seen:
        seen.add(current)
        parent = parent_of.get(current)
        if parent == duplicate_id:
            return current
        current = parent
    return None


# --- public pool (公海) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """Days without activity after which an owned account returns to the pool, per tier."""

    inactivity_days: Mapping[str, int] = field(default_factory=lambda: {"A": 30, "B": 15, "C": 7, "D": 7})
    # Pool claims one rep may make in a rolling 24 hours.
    claim_limit_per_day: int = 20
    # After releasing (or losing by inactivity) an account, its previous owner waits this long to re-claim.
    cooldown: timedelta = timedelta(hours=72)


def inactivity_anchor(
    *, last_activity_at: datetime | None, claimed_at: datetime | None, created_at: datetime
) -> datetime:
    """The moment inactivity is counted from: the latest of activity, claim and creation."""
    return max(t for t in (last_activity_at, claimed_at, created_at) if t is not None)


def return_cutoffs(policy: PoolPolicy, now: datetime) -> dict[str, datetime]:
    """Per tier: an owned account whose inactivity anchor is before the cutoff returns to the pool."""
    return {tier: now - timedelta(days=days) for tier, days in policy.inactivity_days.items() if days > 0}


def due_for_return(policy: PoolPolicy, *, tier: str, in_pool: bool, anchor: datetime, now: datetime) -> bool:
    cutoff = return_cutoffs(policy, now).get(tier or "C")
    return not in_pool and cutoff is not None and anchor < cutoff


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    allowed: bool
    # "", "not_in_pool", "claim_limit" or "cooldown"
    reason: str = ""
    detail: str = ""


def decide_claim(
    policy: PoolPolicy,
    *,
    claimant_id: str,
    in_pool: bool,
    released_by_id: str,
    released_at: datetime | None,
    claims_last_24h: int,
    now: datetime,
) -> ClaimDecision:
    if not in_pool:
        return ClaimDecision(False, "not_in_pool", "the account is not in the public pool")
    if claims_last_24h >= policy.claim_limit_per_day:
        return ClaimDecision(
            False, "claim_limit", f"claim limit of {policy.claim_limit_per_day} accounts per 24 hours reached"
        )
    if released_by_id == claimant_id and released_at is not None and now < released_at + policy.cooldown:
        until = released_at + policy.cooldown
        return ClaimDecision(False, "cooldown", f"released by you; claimable again after {until.isoformat()}")
    return ClaimDecision(True)


# --- merge ------------------------------------------------------------------------------------

MERGE_FILL_FIELDS = ("industry", "size", "address", "website", "parent_id", "tier")


def merge_changes(survivor: Mapping[str, object], duplicate: Mapping[str, object]) -> dict[str, object]:
    """What the survivor takes from the duplicate: empty fields filled, tags and custom values unioned."""
    changes: dict[str, object] = {}
    for name in MERGE_FILL_FIELDS:
        if not survivor.get(name) and duplicate.get(name) and duplicate.get(name) != survivor.get("id"):
            changes[name] = duplicate[name]
    for money in ("annual_revenue", "credit_limit"):
        if survivor.get(money) is None and duplicate.get(money) is not None:
            changes[money] = duplicate[money]
            changes[f"{money}_currency"] = duplicate.get(f"{money}_currency")
    tags = normalise_tags([*_strings(survivor.get("tags")), *_strings(duplicate.get("tags"))])
    if tags != list(_strings(survivor.get("tags"))):
        changes["tags"] = tags
    survivor_custom = survivor.get("custom") or {}
    duplicate_custom = duplicate.get("custom") or {}
    if isinstance(survivor_custom, dict) and isinstance(duplicate_custom, dict):
        custom = {**duplicate_custom, **survivor_custom}
        if custom != survivor_custom:
            changes["custom"] = custom
    return changes


def check_merge(
    *, survivor_id: str, duplicate_id: str, survivor_merged_into: str, duplicate_merged_into: str
) -> list[FieldError]:
    if survivor_id == duplicate_id:
        return [FieldError("duplicate_id", "an account cannot be merged into itself")]
    if survivor_merged_into:
        return [FieldError("survivor_id", f"was merged into {survivor_merged_into}")]
    if duplicate_merged_into:
        return [FieldError("duplicate_id", f"was already merged into {duplicate_merged_into}")]
    return []


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


# --- activities -------------------------------------------------------------------------------


def check_activity(values: Mapping[str, object], *, now: datetime) -> list[FieldError]:
    """Errors in the activity fields present in `values`: a logged activity passes its kind and time,
    a correction the fields it changes. What happened has happened: it is not in the future; its
    follow-up comes after it."""
    occurred_error = occurred_at_error(values["occurred_at"], now) if "occurred_at" in values else None
    errors = [
        kind_error(values["kind"]) if "kind" in values else None,
        occurred_error,
        follow_up_error(values.get("occurred_at"), values.get("next_follow_up_at")) if not occurred_error else None,
    ]
    return [error for error in errors if error is not None]


# --- tasks and reminders ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reminder:
    """A rule like "A-tier account not contacted in 3 days" (自动提示)."""

    tiers: tuple[str, ...]
    inactive_days: int


def check_reminder_rule(*, name: str, tiers: Iterable[str], inactive_days: int, due_in_hours: int) -> list[FieldError]:
    errors: list[FieldError] = []
    if not name.strip():
        errors.append(FieldError("name", "is required"))
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        errors.append(FieldError("tiers", f"unknown tiers {', '.join(bad)}; allowed: {', '.join(TIERS)}"))
    if not 1 <= inactive_days <= MAX_INACTIVE_DAYS:
        errors.append(FieldError("inactive_days", f"must be between 1 and {MAX_INACTIVE_DAYS}"))
    if not 0 <= due_in_hours <= MAX_DUE_IN_HOURS:
        errors.append(FieldError("due_in_hours", f"must be between 0 and {MAX_DUE_IN_HOURS}"))
    return errors


def reminder_fires(rule: Reminder, *, tier: str, in_pool: bool, anchor: datetime, now: datetime) -> bool:
    """The rule applies to an owned account of a matching tier that has been quiet long enough."""
    if in_pool or (rule.tiers and tier not in rule.tiers):
        return False
    return anchor <= now - timedelta(days=rule.inactive_days)
