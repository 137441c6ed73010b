"""Service-desk rules without I/O: the ticket status machine, SLA targets and timers, dispatch,
CSAT and return-visit scheduling, and input validation."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from crm_platform.errors import Conflict, FieldError, ValidationFailed

CHANNELS = ("phone", "email", "web", "wechat", "api")
PRIORITIES = ("urgent", "high", "normal", "low")  # most urgent first
STATUSES = ("new", "assigned", "in_progress", "waiting_customer", "resolved", "closed", "reopened")
OPEN_STATUSES = ("new", "assigned", "in_progress", "waiting_customer", "reopened")
DONE_STATUSES = ("resolved", "closed")
VIP_TIER = "A"

# Which status a ticket may move to from each status. `assigned` is reached only by assigning.
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"in_progress", "resolved", "closed"}),
    "assigned": frozenset({"in_progress", "waiting_customer", "resolved", "closed"}),
    "in_progress": frozenset({"waiting_customer", "resolved"}),
    "waiting_customer": frozenset({"in_progress", "resolved"}),
    "resolved": frozenset({"closed", "reopened"}),
    "closed": frozenset(),
    "reopened": frozenset({"in_progress", "waiting_customer", "resolved"}),
}
# Statuses that need someone working on the ticket.
NEEDS_ASSIGNEE = frozenset({"in_progress", "waiting_customer"})
# Reaching one of these means the customer has been answered.
RESPONDING_STATUSES = frozenset({"in_progress", "waiting_customer", "resolved"})
# While the customer owes an answer, or has a resolution to accept, the resolution clock stops (the
# time is added to its target): a ticket reopened days after it was resolved in time is not late.
PAUSING_STATUSES = frozenset({"waiting_customer", "resolved"})
ASSIGNABLE_STATUSES = frozenset({"new", "assigned", "in_progress", "waiting_customer", "reopened"})
# When its account is deleted, every ticket not yet closed is closed, from any status: there is no
# customer left to answer, to resolve for or to accept a resolution. The tickets stay as history.
CLOSED_WITH_THE_ACCOUNT = frozenset(STATUSES) - {"closed"}
# The tickets that take their account's tier when it changes, or the survivor's on a merge: the open
# ones, re-timed at once, and the resolved ones, which may be reopened and then be worked at it. A
# resolved ticket keeps the effective priority and due times its resolution was judged against until
# it is reopened: closed instead, that verdict is final. A closed ticket keeps the tier it was served at.
TAKE_THE_ACCOUNTS_TIER = frozenset(OPEN_STATUSES) | {"resolved"}
# A ticket that should never have been one (spam, a test, a duplicate) may be deleted while it is open
# and was never resolved: not reopened, nor worked on again after a reopening. Once resolved or closed
# it is a service record: SLA compliance, resolution times and CSAT averages count it, and a survey
# answer or a return visit (both follow a resolution) may hang on it.
DELETABLE_STATUSES = frozenset(OPEN_STATUSES) - {"reopened"}

WARNING_FRACTION = 0.8
FIRST_RESPONSE = "first_response"
RESOLUTION = "resolution"


def check_transition(current: str, target: str, *, resolved_once: bool = False) -> None:
    """Raises Conflict (HTTP 409) for a move the status machine does not allow. Closing a ticket
    that was never worked (spam, a duplicate) skips the resolution; one reopened after a resolution
    (`resolved_once`), assigned again since or not, is closed after it is resolved again."""
    if target not in STATUSES:
        raise ValidationFailed([FieldError("status", f"must be one of {', '.join(STATUSES)}")])
    if target not in TRANSITIONS[current]:
        raise Conflict(f"a {current} ticket cannot become {target}", reason="ILLEGAL_TRANSITION")
    if target == "closed" and current != "resolved" and resolved_once:
        raise Conflict(
            f"a {current} ticket reopened after its resolution is resolved again before it is closed",
            reason="ILLEGAL_TRANSITION",
        )


def check_ticket_deletable(status: str, *, resolved_once: bool, ticket_id: str) -> None:
    """Raises Conflict (HTTP 409) for a ticket resolved or closed, now or before a reopening
    (`resolved_once`): the service it records stays in the reports. A spam ticket closed already
    stays, closed."""
    if status in DELETABLE_STATUSES and not resolved_once:
        return
    state = f"{status} after it was resolved and reopened" if status in DELETABLE_STATUSES else status
    raise Conflict(
        f"ticket {ticket_id} is {state}: a ticket once resolved or closed is a service record; only an "
        "open ticket never resolved may be deleted",
        reason="TICKET_ON_RECORD",
    )


# Why a ticket no agent could take was escalated: lifted when it is assigned.
NO_AGENT_AVAILABLE = "no_agent_available"


def status_after_assignment(current: str) -> str:
    if current not in ASSIGNABLE_STATUSES:
        raise Conflict(f"a {current} ticket cannot be assigned", reason="ILLEGAL_TRANSITION")
    return "assigned" if current in ("new", "reopened") else current


# --- SLA -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlaTargets:
    first_response_minutes: int
    resolution_minutes: int


DEFAULT_SLA: dict[str, SlaTargets] = {
    "urgent": SlaTargets(15, 4 * 60),
    "high": SlaTargets(60, 8 * 60),
    "normal": SlaTargets(4 * 60, 24 * 60),
    "low": SlaTargets(8 * 60, 72 * 60),
}


def effective_priority(priority: str, account_tier: str) -> str:
    """Tier-A (VIP) accounts are served one priority higher (VIP 优先安排); urgent stays urgent."""
    if account_tier.upper() != VIP_TIER:
        return priority
    return PRIORITIES[max(0, PRIORITIES.index(priority) - 1)]


@dataclass(frozen=True, slots=True)
class SlaDue:
    first_response_due_at: datetime
    resolution_due_at: datetime


def sla_due(created_at: datetime, targets: SlaTargets, paused: timedelta = timedelta(0)) -> SlaDue:
    """Due times from creation; time spent waiting for the customer moves the resolution target."""
    return SlaDue(
        first_response_due_at=created_at + timedelta(minutes=targets.first_response_minutes),
        resolution_due_at=created_at + timedelta(minutes=targets.resolution_minutes) + paused,
    )


def warning_at(started_at: datetime, due_at: datetime) -> datetime:
    """80 % of the way from the start to the due time."""
    return started_at + (due_at - started_at) * WARNING_FRACTION


@dataclass(frozen=True, slots=True)
class SlaClock:
    """One SLA target of a ticket and what has been said about it."""

    target: str
    started_at: datetime
    due_at: datetime
    met: bool  # answered / resolved: the target no longer runs
    warned: bool
    breached: bool
    # Set while a met target may run again (waiting for the customer, resolved): since when.
    paused_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SlaSignal:
    target: str
    kind: str  # "warning" or "breach"
    due_at: datetime


def breaches_at_stop(before: Sequence[SlaClock], after: Sequence[SlaClock], now: datetime) -> list[SlaSignal]:
    """The breaches a change owes for the clocks it stops (an answer, a resolution, a wait for the
    customer) at or past their due time: late is late, though the timer, which looks only every few
    seconds, had not said so yet. Each is announced once: not when the timer already did."""
    return [
        SlaSignal(stopped.target, "breach", running.due_at)
        for running, stopped in zip(before, after, strict=True)
        if not running.met and stopped.met and not running.breached and now >= running.due_at
    ]


def sla_signals(clocks: Iterable[SlaClock], now: datetime) -> list[SlaSignal]:
    """What the timer must announce now. A breach without a prior warning announces both, once."""
    signals: list[SlaSignal] = []
    for clock in clocks:
        if clock.met:
            continue
        if not clock.warned and now >= warning_at(clock.started_at, clock.due_at):
            signals.append(SlaSignal(clock.target, "warning", clock.due_at))
        if not clock.breached and now >= clock.due_at:
            signals.append(SlaSignal(clock.target, "breach", clock.due_at))
    return signals


def next_sla_check(clocks: Iterable[SlaClock]) -> datetime | None:
    """When the timer should look at the ticket next (None: nothing left to announce)."""
    moments: list[datetime] = []
    for clock in clocks:
        if clock.met:
            continue
        if not clock.warned:
            moments.append(warning_at(clock.started_at, clock.due_at))
        elif not clock.breached:
            moments.append(clock.due_at)
    return min(moments) if moments else None


def met_for_good(clock: SlaClock) -> bool:
    """A target met and not to run again (answered; a resolution is paused, as it may be reopened):
    its due time and verdict stay as they were judged, whatever targets later apply."""
    return clock.met and clock.paused_at is None


def retimed_clock(clock: SlaClock, now: datetime) -> SlaClock:
    """The clock after its due time moved (another priority or account tier): it keeps only the
    warning and the breach that still hold, judged where the clock stands (now while it runs, at the
    pause while paused); a target met for good keeps its verdict. What the new due time makes due is
    the timer's to announce; what no longer holds is announced again if it comes true later."""
    if met_for_good(clock):
        return clock
    at = clock.paused_at or now
    return replace(
        clock,
        warned=clock.warned and at >= warning_at(clock.started_at, clock.due_at),
        breached=clock.breached and at >= clock.due_at,
    )


BREACH_ESCALATION_PREFIX = "sla_breached_"


def breach_escalation(target: str) -> str:
    """The escalation reason of a breached target."""
    return f"{BREACH_ESCALATION_PREFIX}{target}"


def describe_breach(breach: SlaSignal) -> str:
    """A breach as the audit trail gives it the reason of its escalation."""
    return f"{breach.target} SLA breached (due {breach.due_at.isoformat()})"


def escalation_after_retiming(escalated: bool, reason: str, clocks: Sequence[SlaClock]) -> tuple[bool, str]:
    """An escalation for a breach lifts with the breach, or names the breach still holding; any
    other escalation (no agent available) stays."""
    if not reason.startswith(BREACH_ESCALATION_PREFIX):
        return escalated, reason
    holding = [breach_escalation(clock.target) for clock in clocks if clock.breached]
    if reason in holding:
        return escalated, reason
    return (True, holding[0]) if holding else (False, "")


def validate_sla_targets(first_response_minutes: int, resolution_minutes: int) -> SlaTargets:
    errors = []
    if first_response_minutes <= 0:
        errors.append(FieldError("first_response_minutes", "must be a positive number of minutes"))
    if resolution_minutes <= 0:
        errors.append(FieldError("resolution_minutes", "must be a positive number of minutes"))
    if not errors and resolution_minutes < first_response_minutes:
        errors.append(FieldError("resolution_minutes", "must not be shorter than first_response_minutes"))
    if errors:
        raise ValidationFailed(errors)
    return SlaTargets(first_response_minutes, resolution_minutes)


# --- dispatch --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentLoad:
    id: str
    skills: tuple[str, ...]
    region: str
    capacity: int
    available: bool
    open_tickets: int


def choose_agent(agents: Sequence[AgentLoad], *, category: str, region: str) -> AgentLoad | None:
    """The available agent with the category as a skill, in the ticket's region, with room left
    and the fewest open tickets (ties: the lowest id, so the choice is deterministic)."""
    candidates = [
        agent
        for agent in agents
        if agent.available
        and agent.open_tickets < agent.capacity
        and (not category or category in agent.skills)
        and (not region or agent.region == region)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda agent: (agent.open_tickets, agent.id))


def check_manual_assignment(agent_id: str, available: bool, capacity: int, open_tickets: int) -> None:
    """A ticket given to a named agent: any skill or region, but never to one away or at capacity."""
    if not available:
        raise Conflict(f"agent {agent_id} is not available", reason="AGENT_UNAVAILABLE")
    if open_tickets >= capacity:
        raise Conflict(
            f"agent {agent_id} has {open_tickets} open tickets, the capacity of {capacity}", reason="AGENT_AT_CAPACITY"
        )


# --- CSAT and return visits ------------------------------------------------------------------------

CSAT_COMMENT_MAX = 2000


def validate_csat(status: str, resolved: bool, score: int, comment: str) -> None:
    """A survey answers a ticket that was resolved (`resolved`: it has a resolution time), whether
    or not it is closed since; one closed without a resolution (spam, a duplicate) takes none."""
    errors = []
    if not 1 <= score <= 5:
        errors.append(FieldError("score", "must be an integer from 1 to 5"))
    if len(comment) > CSAT_COMMENT_MAX:
        errors.append(FieldError("comment", f"must be at most {CSAT_COMMENT_MAX} characters"))
    if errors:
        raise ValidationFailed(errors)
    if status not in DONE_STATUSES:
        raise Conflict(f"a survey needs a resolved ticket; this one is {status}", reason="TICKET_NOT_RESOLVED")
    if not resolved:
        raise Conflict("a survey needs a resolved ticket; this one was closed unresolved", reason="TICKET_NOT_RESOLVED")


# Who gave a CSAT answer: entered by staff (SubmitCsat), or by the customer through the ticket's
# survey link (SubmitCsatSurvey). One answer per ticket, whichever gives it first.
STAFF_CHANNEL = "staff"
CUSTOMER_CHANNEL = "customer"
CSAT_CHANNELS = (STAFF_CHANNEL, CUSTOMER_CHANNEL)
# Random bytes of a survey key (`secrets.token_urlsafe`): 32 URL-safe characters.
SURVEY_KEY_BYTES = 24


def survey_expires_at(resolved_at: datetime, valid_days: float) -> datetime:
    """The end of the time a ticket's survey link takes an answer: `valid_days` after the ticket's
    (current) resolution. A ticket resolved again after a reopening starts it again."""
    return resolved_at + timedelta(days=valid_days)


def survey_refusal(status: str, resolved_at: datetime | None, now: datetime, valid_days: float) -> Conflict | None:
    """Why a ticket's survey link takes no answer now (None: it takes one). It answers a resolved
    ticket (closed since or not, as `validate_csat`): not one open again (reopened, and worked on
    since) nor one closed without a resolution (TICKET_NOT_RESOLVED); and only until
    `survey_expires_at` (SURVEY_EXPIRED). Whether an answer was given already is the caller's to
    check (one per ticket, staff answers included)."""
    if status not in DONE_STATUSES or resolved_at is None:
        state = status if status not in DONE_STATUSES else "closed without a resolution"
        return Conflict(
            f"the survey takes an answer once the ticket is resolved; it is {state}", reason="TICKET_NOT_RESOLVED"
        )
    expires_at = survey_expires_at(resolved_at, valid_days)
    if now >= expires_at:
        return Conflict(
            f"the survey took answers until {expires_at.isoformat()}, {valid_days:g} days after the ticket was "
            "resolved",
            reason="SURVEY_EXPIRED",
        )
    return None


def check_survey_answerable(status: str, resolved_at: datetime | None, now: datetime, valid_days: float) -> None:
    """Raises the `survey_refusal` (HTTP 409) of a survey that takes no answer now."""
    refusal = survey_refusal(status, resolved_at, now, valid_days)
    if refusal is not None:
        raise refusal


# A return visit is open until done, or cancelled when its account is deleted (nobody to call).
RETURN_VISIT_STATUSES = ("open", "done", "cancelled")
VISIT_CANCELLED_WITH_THE_ACCOUNT = "account_deleted"


def check_visit_completion(status: str) -> None:
    """Raises Conflict (HTTP 409) unless the return visit is open: only an open one can be done."""
    if status == "done":
        raise Conflict("the return visit is already done", reason="ALREADY_DONE")
    if status != "open":
        raise Conflict(f"a {status} return visit cannot be done", reason="ILLEGAL_TRANSITION")


def return_visit_due(resolved_at: datetime, account_tier: str, days: float) -> datetime | None:
    """Tier-A accounts get a follow-up call `days` after resolution (回访); others none."""
    if account_tier.upper() != VIP_TIER:
        return None
    return resolved_at + timedelta(days=days)


# --- input validation ------------------------------------------------------------------------------

TEXT_LIMITS = {
    "subject": 500,
    "description": 20_000,
    "category": 100,
    "region": 100,
    "team": 100,
    "account_id": 64,
    "contact_id": 64,
}


def validate_ticket(values: Mapping[str, Any], *, partial: bool) -> list[FieldError]:
    """Field errors of ticket input; `partial` (an update) checks only the given fields."""
    errors: list[FieldError] = []

    def given(name: str) -> bool:
        return name in values or not partial

    if given("subject") and not str(values.get("subject", "")).strip():
        errors.append(FieldError("subject", "is required"))
    if given("channel") and values.get("channel") not in CHANNELS:
        errors.append(FieldError("channel", f"must be one of {', '.join(CHANNELS)}"))
    if given("priority") and values.get("priority") not in PRIORITIES:
        errors.append(FieldError("priority", f"must be one of {', '.join(PRIORITIES)}"))
    for name, limit in TEXT_LIMITS.items():
        if name in values and len(str(values[name] or "")) > limit:
            errors.append(FieldError(name, f"must be at most {limit} characters"))
    tags = values.get("tags") or []
    if any(not str(tag).strip() or len(str(tag)) > 100 for tag in tags):
        errors.append(FieldError("tags", "each tag must be 1 to 100 characters"))
    return errors


def validate_agent(values: Mapping[str, Any], *, partial: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    if not partial and not str(values.get("id", "")).strip():
        errors.append(FieldError("id", "is required (the agent's user id)"))
    if (not partial or "name" in values) and not str(values.get("name", "")).strip():
        errors.append(FieldError("name", "is required"))
    if "capacity" in values and not 0 <= int(values["capacity"]) <= 1000:
        errors.append(FieldError("capacity", "must be from 0 to 1000"))
    if any(not str(skill).strip() for skill in values.get("skills") or []):
        errors.append(FieldError("skills", "must not contain empty names"))
    return errors


def validate_article(values: Mapping[str, Any], *, partial: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    if (not partial or "title" in values) and not str(values.get("title", "")).strip():
        errors.append(FieldError("title", "is required"))
    if "title" in values and len(str(values["title"])) > 300:
        errors.append(FieldError("title", "must be at most 300 characters"))
    if (not partial or "body" in values) and not str(values.get("body", "")).strip():
        errors.append(FieldError("body", "is required"))
    return errors


def search_terms(text: str, *, limit: int = 12, min_length: int = 3, stop_words: bool = True) -> list[str]:
    """Distinct lower-case terms of letters or digits (safe inside a tsquery), for KB searches:
    words, and for a run of CJK characters, which has no spaces between its words, the overlapping
    pairs of characters (a lone character as itself), so a part of a phrase finds the phrase.
    Suggestions from a ticket also drop short and stop words (CJK pairs are kept: two characters
    mostly make a word)."""
    terms: list[str] = []
    for run in _term_runs(text.lower()):
        if is_cjk(run[0]):
            candidates = [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
        elif len(run) >= min_length and not (stop_words and run in STOP_WORDS):
            candidates = [run]
        else:
            continue
        terms += [term for term in candidates if term not in terms]
    return terms[:limit]


# Han ideographs (with extension A and the compatibility block) and kana: scripts written without
# spaces between words. Hangul is written with spaces, so it is split into words like Latin.
CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF))


def is_cjk(char: str) -> bool:
    return any(low <= ord(char) <= high for low, high in CJK_RANGES)


def _term_runs(text: str) -> list[str]:
    """The runs of letters or digits, cut also where CJK meets other characters (`vpn连不上`)."""
    runs: list[str] = []
    current = ""
    for char in text + " ":
        if char.isalnum() and (not current or is_cjk(char) == is_cjk(current[-1])):
            current += char
            continue
        if current:
            runs.append(current)
        current = char if char.isalnum() else ""
    return runs


STOP_WORDS = frozenset(
    {
        "the",
        "and",
        "for",
        "with",
        "that",
        "this",
        "from",
        "have",
        "has",
        "not",
        "are",
        "was",
        "were",
        "you",
        "your",
        "our",
        "but",
        "can",
        "cannot",
        "when",
        "what",
        "how",
        "why",
        "who",
        "please",
        "thanks",
        "thank",
        "any",
        "all",
        "get",
        "got",
        "its",
        "into",
        "out",
        "about",
        "after",
        "before",
        "there",
        "their",
        "they",
        "them",
        "then",
        "than",
        "too",
        "very",
        "just",
        "also",
        "does",
        "did",
        "doing",
        "been",
        "being",
    }
)
