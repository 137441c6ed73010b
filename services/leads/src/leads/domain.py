"""Pure rules of the leads context: validation, normalisation, dedupe keys, scoring, assignment,
state transitions, follow-up SLA and recycling. No I/O here; handlers load, decide with these, write.
"""

import math
import re
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from crm_platform.activities import ACTIVITY_KINDS, DUE_FILTERS, follow_up_error, kind_error, occurred_at_error
from crm_platform.contact_points import normalise_email, normalise_phone
from crm_platform.errors import Conflict, FieldError, ValidationFailed
from crm_platform.principal import RecordScope, ScopeKind

SOURCES = ("website", "webform", "ad", "event", "referral", "wechat", "phone", "email", "import", "other")
STATUSES = ("new", "contacted", "qualified", "unqualified", "converted", "recycled")
# Statuses a caller may set with an update; the others only come from their commands.
SETTABLE_STATUSES = ("new", "contacted", "qualified")
OPEN_STATUSES = ("new", "contacted", "qualified", "recycled")
# Owned leads in these statuses return to the pool when nobody works them (qualified ones stay).
RECYCLABLE_STATUSES = ("new", "contacted")
# Activities that count as contacting the lead (a note is internal).
CONTACT_KINDS = frozenset({"call", "email", "meeting", "visit", "wechat"})
ON_DUPLICATE = ("reject", "merge", "allow")
# Web behaviour a marketing system reports (`record_engagements`): counted by scoring rules, never a
# contact (no first contact, status, SLA or recycling clock moves by one).
ENGAGEMENT_KINDS = ("page_view", "email_open", "email_click", "download", "webinar")
MAX_ENGAGEMENT_URL = 2000
MAX_ENGAGEMENTS = 500  # items of one RecordLeadEngagements call
STRATEGIES = ("round_robin", "least_loaded")
GRADES = ("A", "B", "C", "D")
SCORING_OPERATORS = ("equals", "not_equals", "contains", "in", "present", "absent", "gte", "lte")
SCORING_FIELDS = (
    "name",
    "company",
    "title",
    "phone",
    "email",
    "source",
    "source_detail",
    "region",
    "industry",
    "tags",
    "campaign_id",
)
TEXT_FIELDS = ("name", "company", "title", "region", "industry", "team", "owner_id", "campaign_id")
MAX_TEXT = 200
MAX_TAGS = 50
MAX_PHONE = 64  # as given, spaces and dashes included (the column's width)

# The import's built-in source table: values seen in real lead exports (Leads.csv of X Education
# among them), lower-cased, onto the SPEC's source enum. The original value is kept in
# `source_detail`, so nothing of the file is lost and counts can be compared on either.
SOURCE_ALIASES: Mapping[str, str] = {
    "google": "website",
    "bing": "website",
    "organic search": "website",
    "direct traffic": "website",
    "welingak website": "website",
    "welearn": "website",
    "welearnblog_home": "website",
    "blog": "website",
    "olark chat": "website",
    "live chat": "website",
    "referral sites": "referral",
    "reference": "referral",
    "facebook": "ad",
    "social media": "ad",
    "youtubechannel": "ad",
    "pay per click ads": "ad",
    "click2call": "phone",
    "nc_edm": "email",
    "press_release": "other",
    "testone": "other",
    "web form": "webform",
    "landing page": "webform",
    "trade show": "event",
    "seminar": "event",
    "weixin": "wechat",
    "微信": "wechat",
}


def map_source(raw: str, extra: Mapping[str, str] | None = None, default: str = "import") -> tuple[str, str]:
    """(source enum, original value) for an imported source value; unknown values are `other`."""
    value = raw.strip()
    if not value:
        return default, ""
    key = value.lower()
    if extra and value in extra:
        return extra[value], value
    if key in SOURCES:
        return key, value
    return SOURCE_ALIASES.get(key, "other"), value


def clean_tags(tags: Iterable[str]) -> list[str]:
    """Trimmed, non-empty, unique, in first-seen order."""
    seen: dict[str, None] = {}
    for tag in tags:
        tag = tag.strip()
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


@dataclass(slots=True)
class CleanLead:
    """Validated, normalised input for one lead (only the fields that were given)."""

    values: dict[str, Any]
    email_norm: str | None = None
    phone_norm: str | None = None


def validate_lead(
    data: Mapping[str, Any], *, partial: bool = False, prefix: str = "", default_country: str = "86"
) -> CleanLead:
    """Validates and normalises lead input, naming every offending field.

    `partial` (an update) checks only the fields present; a create needs something that
    identifies the lead: a name, company, email, phone or external id.
    """
    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    email_norm = phone_norm = None

    def err(name: str, message: str) -> None:
        errors.append(FieldError(prefix + name, message))

    def text(name: str) -> str | None:
        """The field's trimmed text ('' when null); None, with the error noted, when it is not text
        (a JSON import row can carry any value)."""
        value = data[name]
        if value is None:
            return ""
        if not isinstance(value, str):
            err(name, "must be text")
            return None
        return value.strip()

    for name in (*TEXT_FIELDS, "title", "external_id", "source_detail"):
        if name in data and (given := text(name)) is not None:
            if len(given) > MAX_TEXT:
                err(name, f"longer than {MAX_TEXT} characters")
            values[name] = given
    if "email" in data and (raw := text("email")) is not None:
        values["email"] = raw
        if raw:
            try:
                email_norm = normalise_email(raw)
                values["email"] = email_norm
            except ValueError as exc:
                err("email", str(exc))
    if "phone" in data and (raw := text("phone")) is not None:
        values["phone"] = raw
        if len(raw) > MAX_PHONE:
            err("phone", f"longer than {MAX_PHONE} characters")
        elif raw:
            try:
                phone_norm = normalise_phone(raw, default_country)
            except ValueError as exc:
                err("phone", str(exc))
    if "source" in data and (source := text("source")) is not None:
        source = source.lower()
        if source and source not in SOURCES:
            err("source", f"{data['source']!r} is not one of {', '.join(SOURCES)}")
        values["source"] = source or "other"
    if data.get("status") and (status := text("status")) is not None:
        status = status.lower()
        if status not in SETTABLE_STATUSES:
            err("status", f"{data['status']!r} is not one of {', '.join(SETTABLE_STATUSES)}")
        values["status"] = status
    if "tags" in data:
        given_tags = data["tags"] or []
        if not isinstance(given_tags, list | tuple) or not all(isinstance(tag, str) for tag in given_tags):
            err("tags", "must be a list of text")
        else:
            tags = clean_tags(given_tags)
            if len(tags) > MAX_TAGS:
                err("tags", f"more than {MAX_TAGS} tags")
            values["tags"] = tags
    if "custom" in data:
        custom = data["custom"] or {}
        if not isinstance(custom, Mapping):
            err("custom", "must be an object")
        else:
            values["custom"] = dict(custom)
    if not partial and not any(values.get(k) for k in ("name", "company", "email", "phone", "external_id")):
        err("name", "a lead needs a name, company, email, phone or external_id")
    if partial and "name" in values and not values["name"] and not data.get("company"):
        err("name", "must not be empty")
    if errors:
        raise ValidationFailed(errors)
    return CleanLead(values, email_norm, phone_norm)


def dedupe_keys(email_norm: str | None, phone_norm: str | None, external_id: str | None) -> dict[str, str]:
    """A lead's dedupe keys by the field that carries each, as they are written and locked
    ("email:<norm>", "phone:<norm>", "external_id:<id>"); empty values carry none."""
    keys: dict[str, str] = {}
    if email_norm:
        keys["email"] = f"email:{email_norm}"
    if phone_norm:
        keys["phone"] = f"phone:{phone_norm}"
    if external_id:
        keys["external_id"] = f"external_id:{external_id}"
    return keys


def dedupe_key_fields(clean: CleanLead) -> dict[str, str]:
    """The input's dedupe keys by the field that carries each (`dedupe_keys`)."""
    return dedupe_keys(clean.email_norm, clean.phone_norm, clean.values.get("external_id"))


def changed_lead_fields(changes: Mapping[str, Any]) -> list[str]:
    """The fields a lead's change names in its event: not the normalised dedupe keys (storage,
    derived from email and phone) nor `updated_at` (every change moves it)."""
    return sorted(name for name in changes if not name.endswith("_norm") and name != "updated_at")


def keys_a_merge_fills(existing: Mapping[Any, Any], clean: CleanLead) -> list[str]:
    """The dedupe keys `merge_into` would give `existing` (those of its empty fields): the ones to
    look for on other open leads before merging."""
    return [key for name, key in dedupe_key_fields(clean).items() if not existing.get(name)]


def merge_into(existing: Mapping[Any, Any], clean: CleanLead, held: Collection[str] = ()) -> dict[str, Any]:
    """What `on_duplicate=merge` changes: empty fields filled from the input (with their dedupe
    keys), tags appended, custom keys added. A dedupe key that another open lead holds (`held`) is
    not filled: two open leads would then share it, which an update refuses (409); the other
    values still merge."""
    incoming = clean.values
    withheld = {name for name, key in dedupe_key_fields(clean).items() if key in held}
    changes: dict[str, Any] = {}
    for name, value in incoming.items():
        if name in ("tags", "custom", "status", "owner_id", "team") or name in withheld:
            continue
        if value and not existing.get(name):
            changes[name] = value
    new_tags = clean_tags([*(existing.get("tags") or []), *(incoming.get("tags") or [])])
    if new_tags != list(existing.get("tags") or []):
        changes["tags"] = new_tags
    incoming_custom = incoming.get("custom") or {}
    existing_custom = dict(existing.get("custom") or {})
    added = {k: v for k, v in incoming_custom.items() if k not in existing_custom}
    if added:
        changes["custom"] = {**existing_custom, **added}
    if "email" in changes:
        changes["email_norm"] = clean.email_norm
    if "phone" in changes:
        changes["phone_norm"] = clean.phone_norm
    return changes


# --- web forms ----------------------------------------------------------------------------------

# The form fields that fill the lead's own fields; any other field is kept as custom data.
WEBFORM_LEAD_FIELDS = ("name", "company", "title", "phone", "email", "region", "industry")
_HONEYPOT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def validate_honeypot_field(name: str) -> list[FieldError]:
    """A honeypot is a field people never see: it cannot be one a real visitor fills in."""
    if not name:
        return []
    if not _HONEYPOT_NAME.fullmatch(name):  # blank included: it would silently be no honeypot
        return [FieldError("honeypot_field", "must be a field name: letters, digits and _, at most 64")]
    if name in WEBFORM_LEAD_FIELDS:
        return [FieldError("honeypot_field", f"{name!r} is a field the form captures")]
    return []


def fills_honeypot(fields: Mapping[str, str], honeypot_field: str) -> bool:
    return bool(honeypot_field) and bool(fields.get(honeypot_field, "").strip())


# --- state transitions -------------------------------------------------------------------------


def says_contacted(status: str) -> bool:
    """A status that only a lead somebody has contacted can have."""
    return status in ("contacted", "qualified")


def ensure_open(status: str, action: str) -> None:
    if status not in OPEN_STATUSES:
        raise Conflict(f"cannot {action} a lead in status {status}", reason="ILLEGAL_TRANSITION")


def ensure_deletable(status: str, conversion_state: str | None) -> None:
    """A converted lead stays: the account, contact and opportunity it became point back at it.
    Nor may a lead go while a conversion attempt holds records upstream that only its saga can undo
    (`conversion_state` is that of its saga row, None without one)."""
    if status == "converted":
        raise Conflict(
            "cannot delete a converted lead: the account, contact and opportunity it became point back at it",
            reason="LEAD_CONVERTED",
        )
    if conversion_state in ("running", "compensating"):
        raise Conflict(
            "cannot delete a lead while its conversion is under way: retry the conversion or wait for it",
            reason="CONVERSION_IN_PROGRESS",
        )


def ensure_campaign_unused(lead_count: int, webform_ids: Sequence[str]) -> None:
    """A campaign that leads or web forms link to stays: deleting it would leave their links
    pointing nowhere and take its leads out of its ROI history. Ending it keeps both."""
    uses = []
    if lead_count:
        uses.append(f"{lead_count} lead{'s' if lead_count != 1 else ''}")
    if webform_ids:
        uses.append(f"web form{'s' if len(webform_ids) != 1 else ''} {', '.join(webform_ids)}")
    if uses:
        raise Conflict(
            f"cannot delete a campaign in use by {' and '.join(uses)}: end it (set its end date) instead",
            reason="CAMPAIGN_IN_USE",
        )


def status_after_activity(status: str, kind: str) -> str:
    """A contact activity moves a new (or recycled) lead to `contacted`; other statuses stay."""
    if kind in CONTACT_KINDS and status in ("new", "recycled"):
        return "contacted"
    return status


def check_status_change(current: str, new: str, *, contacted: bool) -> None:
    """Updates may move between new, contacted and qualified of an open lead only; a lead somebody
    has contacted is no longer `new` (it would be new with a first contact, and its SLA met)."""
    if new == current:
        return
    if current not in OPEN_STATUSES or new not in SETTABLE_STATUSES:
        raise Conflict(f"cannot change status from {current} to {new}", reason="ILLEGAL_TRANSITION")
    if new == "new" and contacted:
        raise Conflict(f"cannot change status from {current} to new: it was contacted", reason="ILLEGAL_TRANSITION")


def counted_from_capture(occurred_at: datetime, *, captured_at: datetime) -> datetime:
    """When an activity counts on the lead's own clocks (`first_contacted_at`, `last_activity_at`):
    one made before the lead was captured (a backdated call, a person met before being entered)
    counts at the capture, so the time to first contact is never negative and the lead's last
    activity never precedes the lead. The activity keeps its own `occurred_at`."""
    return max(occurred_at, captured_at)


def already_assigned(lead: Mapping[Any, Any], *, owner_id: str, team: str) -> bool:
    """Is assigning `lead` to `owner_id` (in `team`, "" keeping its own; owner "": the pool) no
    change? Then nothing happens: a new assignment would restart the first-contact SLA and clear
    an overdue flag, and one to the pool it is in would only publish it again."""
    if team not in ("", lead["team"]):
        return False
    return bool(lead["in_pool"]) if not owner_id else not lead["in_pool"] and lead["owner_id"] == owner_id


def status_after_claim(first_contacted_at: datetime | None) -> str:
    return "contacted" if first_contacted_at else "new"


# --- bulk transfer (人走客户不走) ------------------------------------------------------------------

# The statuses of a lead its owner is working. A `recycled` lead is open too, but in the pool until a
# claim or an assignment gives it an owner (and `new` or `contacted` back).
TRANSFERABLE_STATUSES = ("new", "contacted", "qualified")


def transferable(lead: Mapping[Any, Any], *, from_owner_id: str) -> bool:
    """Does a bulk transfer of `from_owner_id`'s leads to another rep move `lead`? Only a lead they
    are working: theirs, out of the pool and open (`TRANSFERABLE_STATUSES`). A converted or
    disqualified lead stays with who closed it, which its history and the analytics by owner keep
    saying; a pool lead is nobody's to hand over. `leads.repository.transferable_from` is this rule
    as the transfer's UPDATE applies it."""
    return (
        bool(from_owner_id)
        and lead["owner_id"] == from_owner_id
        and not lead["in_pool"]
        and lead["status"] in TRANSFERABLE_STATUSES
    )


def check_transfer(from_owner_id: str, to_owner_id: str, to_team: str) -> None:
    """A bulk transfer names the rep whose leads go and the rep who takes them, two different ones;
    a team is optional ("" keeps each lead's own), but only spaces would be a team nobody sees."""
    errors: list[FieldError] = []
    for name, value, required in (
        ("from_owner_id", from_owner_id, True),
        ("to_owner_id", to_owner_id, True),
        ("to_team", to_team, False),
    ):
        if required and not value:
            errors.append(FieldError(name, "is required"))
        elif value and not value.strip():
            errors.append(FieldError(name, "must not be blank"))
    if not errors and from_owner_id == to_owner_id:
        errors.append(FieldError("to_owner_id", "must differ from from_owner_id"))
    if errors:
        raise ValidationFailed(errors)


# --- conversion ---------------------------------------------------------------------------------


def same_account_choice(*, requested_account_id: str, account_id: str, account_created: bool) -> bool:
    """Does a conversion request ask for the account an interrupted attempt chose? An attempt that
    has chosen none yet (`account_id` "") suits any request; any suits a request naming its account;
    one that created an account suits a request naming none too."""
    if not account_id or requested_account_id == account_id:
        return True
    return account_created and not requested_account_id


def contact_to_reuse(*, matched_contact_id: str, matched_contact_account_id: str, account_id: str) -> str:
    """The contact a conversion into `account_id` links instead of creating one: the lead's matched
    contact when it is a live contact of that very account (`matched_contact_account_id` is its
    account as read now, "" when it is gone or out of the caller's sight). "" means create one, as
    for a new account or a contact of another account: it is the person, but not at this company."""
    if matched_contact_id and account_id and matched_contact_account_id == account_id:
        return matched_contact_id
    return ""


def ensure_repeats_conversion(
    *,
    account_id: str,
    create_opportunity: bool,
    converted_account_id: str,
    converted_contact_id: str,
    converted_opportunity_id: str,
) -> None:
    """A converted lead answers a conversion request again with its links when the request asks for
    nothing the conversion did not do (no account or the one it went into; no opportunity, or it got
    one): a client retrying without an Idempotency-Key keeps working. Another account, or an
    opportunity it did not get, is a 409 naming what it became, never silently ignored."""
    asked: list[str] = []
    if account_id and account_id != converted_account_id:
        asked.append(f"account {account_id}")
    if create_opportunity and not converted_opportunity_id:
        asked.append("an opportunity")
    if not asked:
        return
    became = f"account {converted_account_id}, contact {converted_contact_id}"
    became += f" and opportunity {converted_opportunity_id}" if converted_opportunity_id else ", no opportunity"
    raise Conflict(
        f"the lead is already converted (into {became}); it cannot be converted again into {' and '.join(asked)}",
        reason="ILLEGAL_TRANSITION",
    )


# --- activities ---------------------------------------------------------------------------------

# What an activity says happened: what is logged, and what an edit may correct.
ACTIVITY_FIELDS = ("kind", "outcome", "notes", "occurred_at", "next_follow_up_at")


def checked_activity(activity: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """An activity's ACTIVITY_FIELDS as logged, or as an edit leaves them, checked (a 422 naming each
    field at fault) and as stored (the outcome trimmed)."""
    occurred, follow_up = activity["occurred_at"], activity["next_follow_up_at"]
    time_error = occurred_at_error(occurred, now)
    errors = [error for error in (kind_error(activity["kind"]), time_error) if error is not None]
    if time_error is None and (follow_up_problem := follow_up_error(occurred, follow_up)) is not None:
        errors.append(follow_up_problem)
    if errors:
        raise ValidationFailed(errors)
    return {**activity, "outcome": activity["outcome"].strip()}


def advances_last_activity(last_activity_at: datetime | None, occurred_at: datetime) -> bool:
    """`last_activity_at` is a high-water mark: an activity (logged, or edited to a later time)
    moves it forward, and nothing moves it back."""
    return last_activity_at is None or occurred_at > last_activity_at


def done_by_contact(task_kind: str, due_at: datetime, occurred_at: datetime) -> bool:
    """Whether a contact activity that happened at `occurred_at` does an open task: the first
    contact always (its SLA is met), a follow-up only when due by then. A follow-up planned for a
    later date stays open: contact in between (a WeChat the day after a call) does not replace it."""
    return task_kind == "first_contact" or due_at <= occurred_at


# --- engagements (web behaviour) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngagementInput:
    """One engagement a marketing system reports: on the lead `lead_id`, or on the caller's one open
    lead with `email`; `external_id` is the sender's id of the event (a resend counts once)."""

    kind: str
    external_id: str
    occurred_at: datetime | None
    url: str = ""
    lead_id: str = ""
    email: str = ""


@dataclass(frozen=True, slots=True)
class CheckedEngagement:
    """An engagement as stored: trimmed, its email normalised as dedupe normalises it."""

    kind: str
    external_id: str
    occurred_at: datetime
    url: str
    lead_id: str
    email_norm: str


def checked_engagement(item: EngagementInput, now: datetime) -> CheckedEngagement | FieldError:
    """The engagement as stored, or the first thing wrong with it (its field unprefixed: the call
    names it `items[<i>].<field>`). What happened has happened: `occurred_at` is required and not in
    the future (beyond the clock skew allowed), as an activity's."""
    lead_id, email = item.lead_id.strip(), item.email.strip()
    external_id, url = item.external_id.strip(), item.url.strip()
    if lead_id and email:
        return FieldError("lead_id", "name the lead by lead_id or by email, not both")
    if not lead_id and not email:
        return FieldError("lead_id", "name the lead by lead_id or by email")
    email_norm = ""
    if email:
        try:
            email_norm = normalise_email(email)
        except ValueError as exc:
            return FieldError("email", str(exc))
    if item.kind not in ENGAGEMENT_KINDS:
        return FieldError("kind", f"must be one of {', '.join(ENGAGEMENT_KINDS)}")
    if not external_id:
        return FieldError("external_id", "is required: the sender's id of the event, so that a resend counts once")
    if len(external_id) > MAX_TEXT:
        return FieldError("external_id", f"longer than {MAX_TEXT} characters")
    if len(url) > MAX_ENGAGEMENT_URL:
        return FieldError("url", f"longer than {MAX_ENGAGEMENT_URL} characters")
    if (time_error := occurred_at_error(item.occurred_at, now)) is not None:
        return time_error
    assert item.occurred_at is not None  # occurred_at_error refuses None
    return CheckedEngagement(item.kind, external_id, item.occurred_at, url, lead_id, email_norm)


def engagement_filter_error(kind: str) -> FieldError | None:
    """The `kind` a lead's engagements are listed by: empty (every kind) or one of ENGAGEMENT_KINDS."""
    if kind and kind not in ENGAGEMENT_KINDS:
        return FieldError("kind", f"is not one of {', '.join(ENGAGEMENT_KINDS)}")
    return None


def check_engagement_count(count: int) -> None:
    """One call records at most MAX_ENGAGEMENTS: a larger batch is refused whole (nothing recorded)."""
    if count > MAX_ENGAGEMENTS:
        raise ValidationFailed(
            [FieldError("items", f"at most {MAX_ENGAGEMENTS} engagements per call, not {count}: send them in parts")]
        )


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScoringRule:
    id: str
    points: int
    field: str = ""
    operator: str = ""
    value: str = ""
    activity_kind: str = ""
    min_count: int = 0
    enabled: bool = True
    # An engagement count: engagements of this kind (ENGAGEMENT_KINDS), those whose URL contains
    # `url_contains` (case-insensitive; "" any), at least `min_count` of them.
    engagement_kind: str = ""
    url_contains: str = ""


@dataclass(frozen=True, slots=True)
class Thresholds:
    a: int = 80
    b: int = 60
    c: int = 40


def validate_scoring_rule(rule: ScoringRule, name: str) -> None:
    """A rule that could never match, or never change a score, is refused: it would sit in the rule
    list looking like it works."""
    errors: list[FieldError] = []
    if not name.strip():
        errors.append(FieldError("name", "must not be empty"))
    if not -100 <= rule.points <= 100 or rule.points == 0:
        errors.append(FieldError("points", "must be between -100 and 100, and not 0"))
    if rule.url_contains and not rule.engagement_kind:
        errors.append(FieldError("url_contains", "only an engagement rule (engagement_kind) looks at URLs"))
    if rule.activity_kind and rule.engagement_kind:
        errors.append(FieldError("engagement_kind", "a rule counts either activities or engagements, not both"))
    elif rule.activity_kind:
        if rule.activity_kind not in (*ACTIVITY_KINDS, "any"):
            errors.append(FieldError("activity_kind", f"{rule.activity_kind!r} is not an activity kind or 'any'"))
        if rule.min_count < 1:
            errors.append(FieldError("min_count", "must be at least 1 for an activity rule"))
        if rule.field or rule.operator or rule.value:
            errors.append(FieldError("field", "a rule is either a field condition or an activity count"))
    elif rule.engagement_kind:
        if rule.engagement_kind not in ENGAGEMENT_KINDS:
            errors.append(
                FieldError(
                    "engagement_kind",
                    f"{rule.engagement_kind!r} is not an engagement kind; kinds are {', '.join(ENGAGEMENT_KINDS)}",
                )
            )
        if rule.min_count < 1:
            errors.append(FieldError("min_count", "must be at least 1 for an engagement rule"))
        if rule.url_contains and not rule.url_contains.strip():  # spaces: no URL a person visits
            errors.append(FieldError("url_contains", "must not be blank (leave it empty for any URL)"))
        elif rule.url_contains != rule.url_contains.strip():  # URLs are kept trimmed: it would never match
            errors.append(FieldError("url_contains", "must not begin or end with spaces"))
        elif len(rule.url_contains) > MAX_ENGAGEMENT_URL:
            errors.append(FieldError("url_contains", f"longer than {MAX_ENGAGEMENT_URL} characters"))
        if rule.field or rule.operator or rule.value:
            errors.append(FieldError("field", "a rule is either a field condition or an engagement count"))
    else:
        if not (rule.field in SCORING_FIELDS or (rule.field.startswith("custom.") and rule.field != "custom.")):
            errors.append(FieldError("field", f"{rule.field!r} is not a scorable field"))
        if rule.operator not in SCORING_OPERATORS:
            errors.append(FieldError("operator", f"{rule.operator!r} is not one of {', '.join(SCORING_OPERATORS)}"))
        else:
            errors.extend(_condition_value_errors(rule))
    if errors:
        raise ValidationFailed(errors)


def _condition_value_errors(rule: ScoringRule) -> list[FieldError]:
    """What is wrong with a field condition's value for its operator and field."""
    value = rule.value.strip()
    if rule.operator in ("present", "absent"):
        return [FieldError("value", f"must be empty for {rule.operator}")] if value else []
    if rule.operator in ("gte", "lte"):
        limit = _as_number(value)
        return (
            [] if limit is not None and math.isfinite(limit) else [FieldError("value", "must be a number for gte/lte")]
        )
    options = [option.strip() for option in value.split(",")] if rule.operator == "in" else [value]
    if not all(options):
        what = "a comma-separated list without blank items" if rule.operator == "in" else "a non-blank value"
        return [FieldError("value", f"must be {what} for {rule.operator}")]
    if rule.field == "source" and rule.operator != "contains":
        # A lead's source is always one of SOURCES (imports map theirs): any other value never matches.
        unknown = sorted({option for option in options if option.lower() not in SOURCES})
        if unknown:
            return [FieldError("value", f"{', '.join(unknown)} is not a source; sources are {', '.join(SOURCES)}")]
    return []


def validate_thresholds(t: Thresholds) -> None:
    if not 0 <= t.c <= t.b <= t.a <= 100:
        raise ValidationFailed([FieldError("thresholds", "need 0 <= c <= b <= a <= 100")])


def _field_value(lead: Mapping[str, Any], name: str) -> Any:
    if name.startswith("custom."):
        return (lead.get("custom") or {}).get(name.removeprefix("custom."))
    return lead.get(name)


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Condition:
    """A scoring rule with its value prepared once (lower-cased, split, parsed), not per lead."""

    rule: ScoringRule
    expected: str
    options: frozenset[str]
    limit: float | None
    url_needle: str = ""


def _condition(rule: ScoringRule) -> _Condition:
    options = frozenset(v.strip().lower() for v in rule.value.split(",")) if rule.operator == "in" else frozenset()
    limit = _as_number(rule.value) if rule.operator in ("gte", "lte") else None
    return _Condition(rule, rule.value.strip().lower(), options, limit, rule.url_contains.lower())


# A lead's engagements as the scorer counts them: how many of each kind at each URL, {(kind, url): n}
# (`leads.repository.engagement_counts_of`), so that a rule's URL condition is decided here.
EngagementCounts = Mapping[tuple[str, str], int]
NO_ENGAGEMENTS: EngagementCounts = {}


def engagement_count(kind: str, url_contains: str, counts: EngagementCounts) -> int:
    """How many of a lead's engagements an engagement rule counts: those of `kind` whose URL
    contains `url_contains`, case-insensitively ("" any URL, none included)."""
    needle = url_contains.lower()
    return sum(n for (k, url), n in counts.items() if k == kind and needle in url.lower())


def _condition_matches(
    condition: _Condition,
    lead: Mapping[str, Any],
    activity_counts: Mapping[str, int],
    engagement_counts: EngagementCounts,
) -> bool:
    rule = condition.rule
    if rule.engagement_kind:
        return engagement_count(rule.engagement_kind, condition.url_needle, engagement_counts) >= rule.min_count
    if rule.activity_kind:
        count = (
            sum(activity_counts.values()) if rule.activity_kind == "any" else activity_counts.get(rule.activity_kind, 0)
        )
        return count >= rule.min_count
    actual = _field_value(lead, rule.field)
    expected = condition.expected
    if isinstance(actual, list):
        texts = [str(v).lower() for v in actual]
    else:
        texts = [] if actual in (None, "") else [str(actual).lower()]
    match rule.operator:
        case "present":
            return bool(texts)
        case "absent":
            return not texts
        case "equals":
            return expected in texts
        case "not_equals":
            return expected not in texts
        case "contains":
            return any(expected in t for t in texts)
        case "in":
            return any(t in condition.options for t in texts)
        case "gte" | "lte":
            number = _as_number(actual)
            if number is None or condition.limit is None:
                return False
            return number >= condition.limit if rule.operator == "gte" else number <= condition.limit
    return False


class Scorer:
    """The enabled scoring rules prepared once, to score many leads (an import scores every row)."""

    def __init__(self, rules: Sequence[ScoringRule]) -> None:
        self._conditions = [_condition(r) for r in rules if r.enabled]

    def score(
        self,
        lead: Mapping[str, Any],
        activity_counts: Mapping[str, int],
        engagement_counts: EngagementCounts = NO_ENGAGEMENTS,
    ) -> tuple[int, list[str]]:
        """Sum of the matching rules' points, capped to 0..100, and the ids of those rules."""
        matched = [c.rule for c in self._conditions if _condition_matches(c, lead, activity_counts, engagement_counts)]
        total = sum(r.points for r in matched)
        return max(0, min(100, total)), [r.id for r in matched]

    @property
    def counts_activities(self) -> bool:
        """Whether an enabled rule counts activities: else a lead scores the same whatever its
        activities, and they need not be counted."""
        return any(c.rule.activity_kind for c in self._conditions)

    @property
    def engagement_kinds(self) -> frozenset[str]:
        """The engagement kinds enabled rules count: only those need counting (none: no engagement
        changes a score)."""
        return frozenset(c.rule.engagement_kind for c in self._conditions if c.rule.engagement_kind)


def grade_for(score: int, t: Thresholds) -> str:
    if score >= t.a:
        return "A"
    if score >= t.b:
        return "B"
    if score >= t.c:
        return "C"
    return "D"


def scoring_change_error(scope: RecordScope, what: str) -> str | None:
    """Why the caller may not change the scoring's `what` ("scoring rules", "grade thresholds"), or
    None when they may. Every lead of the company is scored and graded by them, and routed by its
    score, so a caller who assigns leads within one team or region may not: only in every scope."""
    if scope.kind == ScopeKind.ALL:
        return None
    return f"{what} apply to every lead: you may manage them only with the assign permission on all leads"


# --- assignment ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignmentRule:
    id: str
    position: int
    user_ids: tuple[str, ...]
    strategy: str = "round_robin"
    team: str = ""
    regions: frozenset[str] = frozenset()
    industries: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    min_score: int = 0
    max_score: int = 0
    capacity: int = 0
    enabled: bool = True
    # The team whose leads the rule matches ("": any lead): a team's queue, as a team manager's rules are.
    lead_team: str = ""


def validate_assignment_rule(rule: AssignmentRule, name: str) -> None:
    errors: list[FieldError] = []
    if not name.strip():
        errors.append(FieldError("name", "must not be empty"))
    if rule.strategy not in STRATEGIES:
        errors.append(FieldError("strategy", f"{rule.strategy!r} is not one of {', '.join(STRATEGIES)}"))
    if not rule.user_ids and not rule.team.strip():
        errors.append(FieldError("user_ids", "a rule assigns to at least one user, or to a team's pool"))
    elif blanks := [index for index, user_id in enumerate(rule.user_ids) if not user_id.strip()]:
        # an empty row of a user picker, refused: dropped, it could turn a rule for reps into a team pool's
        errors.extend(FieldError(f"user_ids[{index}]", "must not be a blank user id") for index in blanks)
    elif len(set(rule.user_ids)) != len(rule.user_ids):  # a rep twice would take two turns
        errors.append(FieldError("user_ids", "must not name a user twice"))
    for field_name, team in (("team", rule.team), ("lead_team", rule.lead_team)):
        if team and not team.strip():
            errors.append(FieldError(field_name, "must not be blank"))
    for field_name, options in (("regions", rule.regions), ("industries", rule.industries)):
        if not all(option.strip() for option in options):  # a trailing comma, not "leads without one"
            errors.append(FieldError(field_name, "must not contain a blank value"))
    bad_sources = sorted(source for source in rule.sources if source.lower() not in SOURCES)  # matched case-blind
    if bad_sources:
        errors.append(FieldError("sources", f"unknown sources {', '.join(bad_sources)}"))
    if rule.capacity < 0:
        errors.append(FieldError("capacity", "must not be negative"))
    if not 0 <= rule.min_score <= 100 or not 0 <= rule.max_score <= 100:
        errors.append(FieldError("min_score", "scores are between 0 and 100"))
    elif rule.max_score and rule.max_score < rule.min_score:
        errors.append(FieldError("max_score", "must not be below min_score"))
    if errors:
        raise ValidationFailed(errors)


def _casefold_in(value: str, options: frozenset[str]) -> bool:
    return not options or value.lower() in {o.lower() for o in options}


def assignment_rule_matches(rule: AssignmentRule, lead: Mapping[str, Any]) -> bool:
    score = int(lead.get("score") or 0)
    return (
        rule.enabled
        and (not rule.lead_team or str(lead.get("team") or "").lower() == rule.lead_team.lower())
        and _casefold_in(str(lead.get("region") or ""), rule.regions)
        and _casefold_in(str(lead.get("industry") or ""), rule.industries)
        and _casefold_in(str(lead.get("source") or ""), rule.sources)
        and score >= rule.min_score
        and (not rule.max_score or score <= rule.max_score)
    )


def rule_in_callers_scope(rule: AssignmentRule, scope: RecordScope) -> AssignmentRule:
    """`rule` as a caller in `scope` saves it: a team manager's rule that names no `lead_team` is
    their team's queue (`rule_scope_error`)."""
    if scope.kind == ScopeKind.TEAM and not rule.lead_team:
        return replace(rule, lead_team=scope.team)
    return rule


def rule_scope_error(scope: RecordScope, *, team: str, lead_team: str, regions: Collection[str]) -> FieldError | None:
    """Why the caller may not manage an assignment rule taking the leads of `lead_team` / from
    `regions` to `team` (None when they may). A rule decides whose leads go where, so it is held
    to the caller's scope on assigning leads, as `/assign` is: a team manager manages the rules
    that route their team's leads (`lead_team`) within their team (`team`), so their rules cannot
    take another team's leads, however early or broad; a region's manager the rules of their
    region only; assigning in every scope, any rule."""
    match scope.kind:
        case ScopeKind.ALL:
            return None
        case ScopeKind.TEAM if scope.team and team == scope.team and lead_team.lower() == scope.team.lower():
            return None
        case ScopeKind.TEAM if scope.team and team == scope.team:
            return FieldError("lead_team", f"you may manage only rules for the leads of team {scope.team}")
        case ScopeKind.REGION if regions and all(r.casefold() == scope.region.casefold() for r in regions):
            return None
        case ScopeKind.REGION:
            return FieldError("regions", f"you may manage only rules of region {scope.region}")
    return FieldError(
        "team", f"you may manage only rules of team {scope.team}" if scope.team else "you may manage no rule"
    )


def first_matching_rule(rules: Sequence[AssignmentRule], lead: Mapping[str, Any]) -> AssignmentRule | None:
    for rule in sorted(rules, key=lambda r: r.position):
        if assignment_rule_matches(rule, lead):
            return rule
    return None


def needs_loads(rule: AssignmentRule) -> bool:
    """Whether picking by `rule` needs its reps' open leads: for a cap, or the least loaded rep."""
    return bool(rule.user_ids) and (rule.capacity > 0 or rule.strategy == "least_loaded")


def pick_assignee(rule: AssignmentRule, loads: Mapping[str, int], turn: int) -> str | None:
    """The rep who gets the lead, or None when every rep is at capacity.

    round_robin: the rep whose turn it is, or the next one in list order with room. `turn` numbers
    the rule's assignments (`repo.take_turns`), so rep `turn % len(user_ids)` starts; a turn taken
    and not used (a create that failed) only moves the rotation on. least_loaded: the rep with the
    fewest open leads (ties in list order), whatever the turn. `loads` counts each rep's open leads.
    """
    users = list(rule.user_ids)
    eligible = [u for u in users if not rule.capacity or loads.get(u, 0) < rule.capacity]  # none: a team's rule
    if not eligible:
        return None
    if rule.strategy == "least_loaded":
        return min(eligible, key=lambda u: (loads.get(u, 0), users.index(u)))
    start = turn % len(users)
    for offset in range(len(users)):
        candidate = users[(start + offset) % len(users)]
        if candidate in eligible:
            return candidate
    return None


def takes_turns(rule: AssignmentRule) -> bool:
    """Whether picking by `rule` uses a turn of its rotation (a team's rule without reps has none)."""
    return rule.strategy == "round_robin" and bool(rule.user_ids)


def turns_wanted(rules: Iterable[AssignmentRule]) -> dict[str, int]:
    """Per rule, the turns an import batch takes for the leads it assigns by these rules (one rule
    per lead): a round-robin rule one per lead, a least-loaded rule none (it is still looked up,
    to see it was not deleted)."""
    wanted: dict[str, int] = {}
    for rule in rules:
        wanted[rule.id] = wanted.get(rule.id, 0) + (1 if takes_turns(rule) else 0)
    return wanted


def pick_in_batch(
    rule: AssignmentRule | None, turns: Mapping[str, deque[int]], loads: Mapping[str, int]
) -> tuple[str, str, str] | None:
    """(owner, team, rule id) for a lead of an import batch, from the turns the batch took for its
    rules (a round-robin pick uses up the rule's next one) and the reps' open leads as the batch
    has moved them so far; None sends it to the pool (no rule, a rule deleted since the rules were
    read, every rep at capacity)."""
    if rule is None or rule.id not in turns:
        return None
    turn = turns[rule.id].popleft() if takes_turns(rule) else 0
    return routed(rule, pick_assignee(rule, loads, turn))


def routed(rule: AssignmentRule, user: str | None) -> tuple[str, str, str] | None:
    """(owner, team, rule id) of a lead `rule` matched, given the rep picked (None: none has room,
    or the rule names none). Without a rep the lead goes to the pool: to the rule's team's pool
    when it names a team (owner ""), to the shared pool otherwise (None)."""
    if user is not None:
        return user, rule.team, rule.id
    return ("", rule.team, rule.id) if rule.team else None


# --- follow-up SLA and recycling ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FollowUpPolicy:
    first_contact_hours: float = 2.0
    recycle_after_days: float = 3.0
    pool_claim_limit: int = 20
    # How long the owner a lead was recycled from may not claim it back (`ensure_reclaimable`).
    pool_reclaim_cooldown_hours: float = 24.0

    def first_contact_due(self, assigned_at: datetime) -> datetime:
        return assigned_at + timedelta(hours=self.first_contact_hours)

    def recycle_cutoff(self, now: datetime) -> datetime:
        """Leads whose last activity (or assignment, if none) is before this are recycled."""
        return now - timedelta(days=self.recycle_after_days)


def is_first_contact_overdue(
    *, status: str, owner_id: str, first_contacted_at: datetime | None, due_at: datetime | None, now: datetime
) -> bool:
    return bool(owner_id) and status in ("new",) and first_contacted_at is None and due_at is not None and due_at <= now


def is_recyclable(
    *,
    status: str,
    owner_id: str,
    assigned_at: datetime | None,
    last_activity_at: datetime | None,
    policy: FollowUpPolicy,
    now: datetime,
) -> bool:
    """An owned new or contacted lead nobody has worked for N days returns to the pool.

    Qualified leads stay with their owner (someone is converting them); closed ones never move.
    """
    if not owner_id or assigned_at is None or status not in RECYCLABLE_STATUSES:
        return False
    last_touch = max(assigned_at, last_activity_at) if last_activity_at else assigned_at
    return last_touch <= policy.recycle_cutoff(now)


def ensure_reclaimable(
    *, claimant_id: str, recycled_from_id: str, recycled_at: datetime | None, policy: FollowUpPolicy, now: datetime
) -> None:
    """The owner a lead was recycled from (it went idle, or they released it) may not claim it back
    within the cool-down: the claim would restart its SLA and recycling clocks, so a rep could hold
    a lead for ever without working it. Others may claim it, and a manager may assign it to anyone."""
    if claimant_id != recycled_from_id or recycled_at is None:
        return
    until = recycled_at + timedelta(hours=policy.pool_reclaim_cooldown_hours)
    if now < until:
        raise Conflict(
            f"this lead was recycled from you at {recycled_at.isoformat()}: "
            f"you may claim it again from {until.isoformat()}",
            reason="RECLAIM_COOLDOWN",
        )


TASK_STATUSES = ("open", "done", "cancelled")
TASK_KINDS = ("first_contact", "follow_up")


@dataclass(frozen=True, slots=True)
class TaskFilters:
    """The filters of the lead tasks across leads (`list_scoped_tasks`)."""

    owner_id: str = ""
    status: str = "open"
    kind: str = ""
    # overdue or today (`crm_platform.activities.due_before`); empty: any due time
    due: str = ""


def task_filter_errors(f: TaskFilters) -> list[FieldError]:
    errors = []
    if f.status not in TASK_STATUSES:
        errors.append(FieldError("status", f"is not one of {', '.join(TASK_STATUSES)}"))
    if f.kind and f.kind not in TASK_KINDS:
        errors.append(FieldError("kind", f"is not one of {', '.join(TASK_KINDS)}"))
    if f.due and f.due not in DUE_FILTERS:
        errors.append(FieldError("due", f"is not one of {', '.join(DUE_FILTERS)}"))
    elif f.due == "overdue" and f.status != "open":
        errors.append(FieldError("due", "overdue tasks are open ones: leave status out or make it open"))
    return errors


@dataclass(slots=True)
class ImportCounters:
    rows_seen: int = 0
    accepted: int = 0
    merged: int = 0
    rejected: int = 0
    skipped: int = 0
    rejected_rows: list[tuple[int, str, str]] = field(default_factory=list)


# Fewer digits than this in a search find too many phones to be meant as one.
MIN_PHONE_SEARCH_DIGITS = 4


def search_term(field: str, q: str) -> str:
    """What `q` looks for in a searched field: its text in lower case, or in a phone its digits
    (as phones are kept normalised: `138 0013` -> `1380013`); "" when it cannot be one there."""
    if field != "phone":
        return q.lower()
    digits = "".join(ch for ch in q if ch in "0123456789")
    return digits if len(digits) >= MIN_PHONE_SEARCH_DIGITS and len(digits) * 2 >= len(q.strip()) else ""
