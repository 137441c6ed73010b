"""Activities (calls, e-mails, meetings, visits, notes, WeChat messages) as both services that log
them check them and decide whose they are: the leads service on a lead, the accounts service on an
account. Analytics scopes them by the same rule."""

from datetime import UTC, datetime, timedelta

from crm_platform.errors import FieldError
from crm_platform.principal import RecordScope
from crm_platform.timeutil import in_the_future

ACTIVITY_KINDS = ("call", "email", "meeting", "visit", "note", "wechat")


def kind_error(kind: object) -> FieldError | None:
    if kind in ACTIVITY_KINDS:
        return None
    return FieldError("kind", f"must be one of {', '.join(ACTIVITY_KINDS)}")


def occurred_at_error(occurred_at: object, now: datetime) -> FieldError | None:
    """What happened has happened: an activity's time is given, and not in the future."""
    if not isinstance(occurred_at, datetime):
        return FieldError("occurred_at", "is required")
    if in_the_future(occurred_at, now):
        return FieldError("occurred_at", "must not be in the future")
    return None


def may_change_activity(scope: RecordScope, *, actor_id: str, team: str, region: str) -> bool:
    """May a caller with this scope on activities change one? An activity is the own record of who
    logged it, in the team and region of the lead or account it was logged on: with `own` a rep
    corrects what they logged, with `team` a manager what was logged on the team's records."""
    return scope.allows(owner_id=actor_id, team=team, region=region)


def follow_up_error(occurred_at: object, next_follow_up_at: object) -> FieldError | None:
    """A follow-up is planned after what happened, not before it."""
    if (
        isinstance(next_follow_up_at, datetime)
        and isinstance(occurred_at, datetime)
        and next_follow_up_at <= occurred_at
    ):
        return FieldError("next_follow_up_at", "must be after occurred_at")
    return None


def follow_up_change(next_follow_up_at: datetime | None, has_open_task: bool) -> str | None:
    """What becomes of the follow-up task an activity planned when its `next_follow_up_at` changes
    to this (None: cleared, or the activity deleted): `move` its open task there, `create` one when
    it has none open (as logging it with that time would have), `cancel` the open one, or nothing."""
    if next_follow_up_at is None:
        return "cancel" if has_open_task else None
    return "move" if has_open_task else "create"


# `?due=` of the task lists (an account's, a lead's).
DUE_FILTERS = ("today", "overdue")


def due_before(due: str, now: datetime) -> datetime:
    """The end of an open task list's due window: `overdue`, due before now; `today`, due by the end
    of the current UTC day, with those of earlier days still open (nothing due slips out of the day's
    list). Both services' task lists mean the same by them."""
    if due == "overdue":
        return now
    if due == "today":
        start_of_day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return start_of_day + timedelta(days=1)
    raise ValueError(f"due must be one of {', '.join(DUE_FILTERS)}")
