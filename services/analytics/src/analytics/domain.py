"""Report arithmetic without I/O: the read models hand over plain facts, these functions turn them
into report rows. Money stays Decimal; a rate is a Decimal in [0, 1] or None when undefined."""

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol, TypeVar

from crm_platform.money import amount_text, minor_unit

RATE_PLACES = Decimal("0.0001")
DURATION_PLACES = Decimal("0.01")
ZERO = Decimal(0)

# The default pipeline's open stages in order (SPEC §6), as the sales database is seeded with them
# (without an event): the order of a pipeline no pipeline event told of, and of the funnel across
# pipelines. Stages not among the known ones follow in the order they first appear. Closed deals are
# reported as the "won" and "lost" rows.
DEFAULT_OPEN_STAGES = ("initial_contact", "needs_confirmed", "solution_demo", "quote_negotiation", "contract_signing")
WON = "won"
LOST = "lost"
OPEN = "open"

SATISFIED_SCORE = 4
URGENT = "urgent"
TASK_DONE = "done"
TASK_CANCELLED = "cancelled"
TICKET_DONE_STATUSES = frozenset({"resolved", "closed"})
# Written off: sales no longer counts what it owes as a receivable.
CONTRACT_TERMINATED = "terminated"

# Key fields whose share of filled values is an entity's data completeness (信息完整率).
LEAD_KEY_FIELDS = ("name", "company", "title", "phone", "email", "source", "industry", "region")
ACCOUNT_KEY_FIELDS = ("name", "industry", "size", "region", "address", "website", "annual_revenue", "tier")
# A contact: who they are (name, title), whether they decide the purchase (decision_role) and how to
# reach them (phone: a landline or a mobile number, either is one to call; email).
CONTACT_KEY_FIELDS = ("name", "title", "phone", "email", "decision_role")
# A deal: what a forecast and a pipeline review need of it: what it is worth (amount, above zero),
# when it should close (expected_close_date), with whom (primary_contact), what is sold (products:
# line items, or the product line it names) and what happens next (next_step).
OPPORTUNITY_KEY_FIELDS = ("amount", "expected_close_date", "primary_contact", "products", "next_step")


def rate(numerator: int | Decimal, denominator: int | Decimal) -> Decimal | None:
    """numerator / denominator to 4 places; None when there is nothing to divide by."""
    if denominator == 0:
        return None
    return (Decimal(numerator) / Decimal(denominator)).quantize(RATE_PLACES, rounding=ROUND_HALF_EVEN)


def mean(values: Sequence[Decimal]) -> Decimal | None:
    if not values:
        return None
    return (sum(values, ZERO) / len(values)).quantize(DURATION_PLACES, rounding=ROUND_HALF_EVEN)


def in_units(delta: timedelta, unit: timedelta) -> Decimal:
    """A duration as an exact Decimal number of `unit` (no float on the way)."""
    micros = Decimal(delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds)
    unit_micros = Decimal(unit.days * 86_400_000_000 + unit.seconds * 1_000_000 + unit.microseconds)
    return micros / unit_micros


DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def roi(revenue: Decimal, cost: Decimal) -> Decimal | None:
    """Return on investment (revenue - cost) / cost; None without a positive cost."""
    if cost <= 0:
        return None
    return ((revenue - cost) / cost).quantize(RATE_PLACES, rounding=ROUND_HALF_EVEN)


def money_sum(amounts: Iterable[tuple[Decimal | None, str]], currency: str) -> Decimal:
    """Sum of the amounts in `currency`; other currencies and missing amounts are left out."""
    return sum((amount for amount, code in amounts if amount is not None and code == currency), ZERO)


# ------------------------------------------------------------------------------------------ funnel


@dataclass(frozen=True, slots=True)
class StageVisit:
    stage: str
    entered_at: datetime | None
    exited_at: datetime | None


@dataclass(frozen=True, slots=True)
class Deal:
    id: str
    stage: str
    status: str  # open, won, lost
    amount: Decimal | None
    currency: str
    created_at: datetime
    closed_at: datetime | None
    history: tuple[StageVisit, ...] = ()

    def stages_reached(self) -> set[str]:
        return {visit.stage for visit in self.history} | {self.stage}


@dataclass(frozen=True, slots=True)
class FunnelStageRow:
    stage: str
    count: int
    amount: Decimal
    reached: int
    conversion_to_next: Decimal | None
    mean_days_in_stage: Decimal | None


@dataclass(frozen=True, slots=True)
class Funnel:
    stages: list[FunnelStageRow]
    opportunities: int
    open_count: int
    won_count: int
    lost_count: int
    win_rate: Decimal | None
    won_amount: Decimal
    average_deal_size: Decimal | None
    mean_sales_cycle_days: Decimal | None


@dataclass(frozen=True, slots=True)
class PipelineStage:
    """A stage as the pipeline events give it: `position` in the pipeline, `outcome` open, won or lost."""

    key: str
    position: int = 0
    outcome: str = OPEN


@dataclass(frozen=True, slots=True)
class FunnelStages:
    """What a funnel needs of a pipeline: its open stages in order, and the keys of its closed stages
    (deals there are the won and lost rows, whatever the stage is called)."""

    open: tuple[str, ...]
    closed: frozenset[str] = frozenset()


DEFAULT_FUNNEL_STAGES = FunnelStages(DEFAULT_OPEN_STAGES)


class Positioned(Protocol):
    @property
    def position(self) -> int: ...


StageT = TypeVar("StageT", bound=Positioned)


def ordered_stages(stages: Iterable[StageT]) -> list[StageT]:
    """A pipeline's stages in its order: by position, as listed where positions are equal."""
    return sorted(stages, key=lambda stage: stage.position)


def funnel_stages(stages: Sequence[PipelineStage] | None) -> FunnelStages:
    """The stages of a pipeline's funnel: its open stages in its order and its closed ones; the
    default pipeline's order for a pipeline no event told of (None). A stage that is neither won nor
    lost is open."""
    if stages is None:
        return DEFAULT_FUNNEL_STAGES
    ordered = ordered_stages(stages)
    return FunnelStages(
        open=tuple(stage.key for stage in ordered if stage.outcome not in (WON, LOST)),
        closed=frozenset(stage.key for stage in ordered if stage.outcome in (WON, LOST)),
    )


def stage_order(
    deals: Iterable[Deal], known: Sequence[str] = DEFAULT_OPEN_STAGES, closed: Iterable[str] = ()
) -> list[str]:
    """Open stages in pipeline order: the known ones first, then others as they first appear (a stage
    its pipeline no longer has, in a closed deal's history; a pipeline's stage no event told of).
    Won and lost stages (`closed`, besides `won` and `lost`) are no open stage."""
    not_open = {WON, LOST, *closed}
    order = [stage for stage in known if stage not in not_open]
    for deal in deals:
        for stage in [visit.stage for visit in deal.history] + [deal.stage]:
            if stage not in order and stage not in not_open:
                order.append(stage)
    return order


def sales_funnel(deals: Sequence[Deal], currency: str, stages: FunnelStages = DEFAULT_FUNNEL_STAGES) -> Funnel:
    """A row per open stage in order (the known `stages` first, those without a deal at zero), each
    with its conversion to the next along that order; then the won and lost rows."""
    open_stages = stage_order(deals, stages.open, stages.closed)
    rows: list[FunnelStageRow] = []
    for index, stage in enumerate(open_stages):
        here = [d for d in deals if d.status == OPEN and d.stage == stage]
        reached = [d for d in deals if stage in d.stages_reached()]
        later = set(open_stages[index + 1 :]) | {WON}
        moved_on = [d for d in reached if d.status == WON or d.stages_reached() & later]
        durations = [
            in_units(visit.exited_at - visit.entered_at, DAY)
            for d in deals
            for visit in d.history
            if visit.stage == stage and visit.entered_at is not None and visit.exited_at is not None
        ]
        rows.append(
            FunnelStageRow(
                stage=stage,
                count=len(here),
                amount=money_sum(((d.amount, d.currency) for d in here), currency),
                reached=len(reached),
                conversion_to_next=rate(len(moved_on), len(reached)),
                mean_days_in_stage=mean(durations),
            )
        )
    won = [d for d in deals if d.status == WON]
    lost = [d for d in deals if d.status == LOST]
    for outcome, closed in ((WON, won), (LOST, lost)):
        rows.append(
            FunnelStageRow(
                stage=outcome,
                count=len(closed),
                amount=money_sum(((d.amount, d.currency) for d in closed), currency),
                reached=len(closed),
                conversion_to_next=None,
                mean_days_in_stage=None,
            )
        )
    won_amount = money_sum(((d.amount, d.currency) for d in won), currency)
    won_in_currency = [d for d in won if d.amount is not None and d.currency == currency]
    cycles = [in_units(d.closed_at - d.created_at, DAY) for d in won if d.closed_at is not None]
    return Funnel(
        stages=rows,
        opportunities=len(deals),
        open_count=sum(1 for d in deals if d.status == OPEN),
        won_count=len(won),
        lost_count=len(lost),
        win_rate=rate(len(won), len(won) + len(lost)),
        won_amount=won_amount,
        average_deal_size=(
            (won_amount / len(won_in_currency)).quantize(minor_unit(currency), rounding=ROUND_HALF_EVEN)
            if won_in_currency
            else None
        ),
        mean_sales_cycle_days=mean(cycles),
    )


# ---------------------------------------------------------------------------------- lead sources


@dataclass(frozen=True, slots=True)
class LeadFact:
    id: str
    source: str
    campaign_id: str
    status: str
    created_at: datetime
    first_contacted_at: datetime | None
    converted_opportunity_id: str


@dataclass(frozen=True, slots=True)
class WonDeal:
    id: str
    source_lead_id: str
    amount: Decimal | None
    currency: str


@dataclass(frozen=True, slots=True)
class CampaignCost:
    id: str
    name: str
    cost: Decimal | None
    currency: str


@dataclass(frozen=True, slots=True)
class LeadSourceRow:
    key: str
    name: str
    leads: int
    contacted: int
    contacted_rate: Decimal | None
    converted: int
    converted_rate: Decimal | None
    mean_first_contact_hours: Decimal | None
    won_revenue: Decimal
    cost: Decimal | None
    roi: Decimal | None


def ran_within(
    starts_on: date | None, ends_on: date | None, period_from: datetime | None, period_to: datetime | None
) -> bool:
    """Whether a campaign's run (whole UTC days; an end left unset is open) overlaps the period
    [period_from, period_to) (either end open when unset)."""
    if period_to is not None and starts_on is not None and datetime.combine(starts_on, time.min, UTC) >= period_to:
        return False
    if period_from is not None and ends_on is not None:
        return datetime.combine(ends_on + timedelta(days=1), time.min, UTC) > period_from
    return True


def first_day_from(moment: datetime) -> date:
    """The first day beginning (00:00 UTC, as a campaign's days) at or after `moment`. A date begins
    within the period [period_from, period_to) when it is from `first_day_from(period_from)` and
    before `first_day_from(period_to)`."""
    day = moment.astimezone(UTC).date()
    return day if datetime.combine(day, time.min, UTC) >= moment else day + timedelta(days=1)


def lead_source_report(
    leads: Sequence[LeadFact],
    won_deals: Sequence[WonDeal],
    currency: str,
    *,
    by_campaign: bool,
    campaigns: Mapping[str, CampaignCost] | None = None,
    listed_campaigns: Iterable[str] = (),
) -> list[LeadSourceRow]:
    """Rows per source (or campaign), sorted by key. A won deal counts for the lead it came from,
    found from either side (the deal's source lead or the lead's converted opportunity). By campaign,
    the `listed_campaigns` have a row even without a lead (what they cost, and an ROI of -1)."""
    won_by_id = {deal.id: deal for deal in won_deals}
    # Several deals may name one source lead (a conversion's, then more with the same customer).
    won_by_lead: dict[str, list[WonDeal]] = defaultdict(list)
    for won in won_deals:
        if won.source_lead_id:
            won_by_lead[won.source_lead_id].append(won)
    groups: dict[str, list[LeadFact]] = defaultdict(list)
    for campaign_id in listed_campaigns if by_campaign else ():
        groups[campaign_id] = []
    for lead in leads:
        groups[lead.campaign_id if by_campaign else lead.source].append(lead)
    rows = []
    for key in sorted(groups):
        members = groups[key]
        contacted = [lead for lead in members if lead.first_contacted_at is not None]
        converted = [lead for lead in members if lead.status == "converted" or lead.converted_opportunity_id]
        deals: dict[str, WonDeal] = {}
        for lead in members:
            for deal in (*won_by_lead.get(lead.id, ()), won_by_id.get(lead.converted_opportunity_id)):
                if deal is not None:
                    deals[deal.id] = deal
        revenue = money_sum(((deal.amount, deal.currency) for deal in deals.values()), currency)
        campaign = (campaigns or {}).get(key) if by_campaign else None
        cost = campaign.cost if campaign is not None and campaign.currency == currency else None
        # Revenue won in another currency is left out of the sum (there are no exchange rates): an
        # ROI on the rest would state a loss or a gain that did not happen, so there is none.
        revenue_complete = all(deal.amount is None or deal.currency == currency for deal in deals.values())
        rows.append(
            LeadSourceRow(
                key=key,
                name=campaign.name if campaign is not None else "",
                leads=len(members),
                contacted=len(contacted),
                contacted_rate=rate(len(contacted), len(members)),
                converted=len(converted),
                converted_rate=rate(len(converted), len(members)),
                mean_first_contact_hours=mean(
                    [
                        in_units(lead.first_contacted_at - lead.created_at, HOUR)
                        for lead in members
                        if lead.first_contacted_at is not None
                    ]
                ),
                won_revenue=revenue,
                cost=cost,
                roi=roi(revenue, cost) if cost is not None and revenue_complete else None,
            )
        )
    return rows


# --------------------------------------------------------------------------------------- service


@dataclass(frozen=True, slots=True)
class TicketFact:
    id: str
    priority: str
    status: str
    created_at: datetime
    first_response_due_at: datetime | None
    first_responded_at: datetime | None
    resolution_due_at: datetime | None
    resolved_at: datetime | None
    first_response_breached: bool = False
    resolution_breached: bool = False


# Where the service desk's clock of an SLA target stands (its handlers' `_clocks`): running; paused
# while the customer is waited on (the resolution clock; the desk adds the wait to the due time when
# it runs again); or ended, the ticket resolved or closed. The desk also pauses the resolution clock
# of a resolved ticket, should it be reopened; a resolved ticket counts as done here until it is.
CLOCK_RUNNING = "running"
CLOCK_PAUSED = "paused"
CLOCK_ENDED = "ended"
RESOLUTION_PAUSING_STATUSES = frozenset({"waiting_customer"})


# The statuses in which the service desk's own resolution clock stands still (its PAUSING_STATUSES):
# when it re-times a ticket there, it judges that clock where it stopped.
DESK_PAUSING_STATUSES = RESOLUTION_PAUSING_STATUSES | {"resolved"}


def resolution_paused_at(
    status: str, changed_at: datetime | None, before_status: str, before_paused_at: datetime | None
) -> datetime | None:
    """When the desk's resolution clock of a ticket now in `status` stopped; None while it runs. The
    desk stops it whenever the ticket moves into a pausing status: at the version that moved it
    there (`changed_at`, its update time), or as before for a ticket that stays there."""
    if status not in DESK_PAUSING_STATUSES:
        return None
    return before_paused_at if status == before_status else changed_at


def breach_holds(
    breached_at: datetime | None, due_at: datetime | None, *, met_for_good: bool, judged_at: datetime | None
) -> bool:
    """Whether a breach the desk reported at `breached_at` holds on a later version of the ticket whose
    target is due at `due_at`, as the desk judges it again when a priority or tier change moves the
    due time (its `retimed_clock`): a target met for good keeps its verdict; any other breach holds
    only if the clock, where it stands (`judged_at`: when that version was made while the clock runs,
    when it stopped while paused), reached the due time. A version that did not re-time the ticket
    keeps a breach: its due time is the one breached, or moved on by a pause the breach came before.
    A breach of unknown time (reported before the read model kept it) stays as reported; a version
    without its time is judged at the breach."""
    if breached_at is None or due_at is None or met_for_good:
        return True
    return (judged_at or breached_at) >= due_at


def sla_clock(status: str, *, pauses_for_the_customer: bool) -> str:
    """The state of a target's clock on a ticket in `status`."""
    if status in TICKET_DONE_STATUSES:
        return CLOCK_ENDED
    if pauses_for_the_customer and status in RESOLUTION_PAUSING_STATUSES:
        return CLOCK_PAUSED
    return CLOCK_RUNNING


def sla_outcome(
    due: datetime | None, done: datetime | None, *, breached: bool, now: datetime, clock: str = CLOCK_RUNNING
) -> str | None:
    """ "met", "breached" or "pending" for one SLA target; None when the ticket has no such target.
    The service's own breach event wins: its clock decided, ours only fills in until it speaks. The
    desk's timer reports a breach only of a clock still running past its due time, so a clock that
    ended short of its target without one is met, and a paused one is pending."""
    if due is None:
        return None
    if breached:
        return "breached"
    if done is not None:
        return "met" if done <= due else "breached"
    if clock == CLOCK_ENDED:
        return "met"
    if clock == CLOCK_PAUSED:
        return "pending"
    return "breached" if now > due else "pending"


@dataclass(frozen=True, slots=True)
class Csat:
    average: Decimal | None
    satisfied_rate: Decimal | None
    responses: int


def csat(scores: Sequence[int]) -> Csat:
    average = (Decimal(sum(scores)) / len(scores)).quantize(DURATION_PLACES) if scores else None
    satisfied = sum(1 for score in scores if score >= SATISFIED_SCORE)
    return Csat(average=average, satisfied_rate=rate(satisfied, len(scores)), responses=len(scores))


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    tickets: int
    backlog: int
    open_urgent: int
    first_response_met: int
    first_response_breached: int
    first_response_compliance: Decimal | None
    resolution_met: int
    resolution_breached: int
    resolution_compliance: Decimal | None
    mean_first_response_minutes: Decimal | None
    mean_resolution_hours: Decimal | None
    csat: Csat


def service_summary(tickets: Sequence[TicketFact], scores: Sequence[int], now: datetime) -> ServiceSummary:
    first = [
        sla_outcome(
            t.first_response_due_at,
            t.first_responded_at,
            breached=t.first_response_breached,
            now=now,
            clock=sla_clock(t.status, pauses_for_the_customer=False),
        )
        for t in tickets
    ]
    # The time a ticket was resolved is not its resolution clock's reading: the clock stood still
    # while the customer was waited on, for a time the ticket's events do not date. Whether it ran
    # out before the resolution is the desk's breach report alone.
    resolution = [
        sla_outcome(
            t.resolution_due_at,
            None,
            breached=t.resolution_breached,
            now=now,
            clock=sla_clock(t.status, pauses_for_the_customer=True),
        )
        for t in tickets
    ]
    open_tickets = [t for t in tickets if t.status not in TICKET_DONE_STATUSES]
    return ServiceSummary(
        tickets=len(tickets),
        backlog=len(open_tickets),
        open_urgent=sum(1 for t in open_tickets if t.priority == URGENT),
        first_response_met=first.count("met"),
        first_response_breached=first.count("breached"),
        first_response_compliance=rate(first.count("met"), first.count("met") + first.count("breached")),
        resolution_met=resolution.count("met"),
        resolution_breached=resolution.count("breached"),
        resolution_compliance=rate(resolution.count("met"), resolution.count("met") + resolution.count("breached")),
        mean_first_response_minutes=mean(
            [in_units(t.first_responded_at - t.created_at, MINUTE) for t in tickets if t.first_responded_at]
        ),
        mean_resolution_hours=mean([in_units(t.resolved_at - t.created_at, HOUR) for t in tickets if t.resolved_at]),
        csat=csat(scores),
    )


# ------------------------------------------------------------------------------- rep performance


@dataclass(slots=True)
class RepTally:
    owner_id: str
    team: str = ""
    activities: int = 0
    tasks: int = 0
    tasks_completed: int = 0
    won_count: int = 0
    won_amount: Decimal = ZERO
    csat_scores: list[int] = field(default_factory=list)
    completeness: list[Decimal] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RepRow:
    owner_id: str
    team: str
    activities: int
    tasks: int
    tasks_completed: int
    task_completion_rate: Decimal | None
    won_count: int
    won_amount: Decimal
    csat: Csat
    data_completeness: Decimal | None


def count_task(tally: RepTally, status: str) -> None:
    """A cancelled task is not work the rep owed, so it counts neither way."""
    if status == TASK_CANCELLED:
        return
    tally.tasks += 1
    tally.tasks_completed += status == TASK_DONE


def tally_for(tallies: dict[tuple[str, str], RepTally], owner_id: str, team: str) -> RepTally:
    """The tally a record counts in: its owner's, within the record's own team. A rep who moved
    teams therefore has a row per team, each holding only that team's records."""
    return tallies.setdefault((owner_id, team), RepTally(owner_id=owner_id, team=team))


def rep_rows(tallies: Iterable[RepTally]) -> list[RepRow]:
    """One row per rep and team, by owner then team; records without an owner are no rep's work."""
    rows = []
    for tally in sorted(tallies, key=lambda t: (t.owner_id, t.team)):
        if not tally.owner_id:
            continue
        fill = (
            (sum(tally.completeness, ZERO) / len(tally.completeness)).quantize(RATE_PLACES)
            if tally.completeness
            else None
        )
        rows.append(
            RepRow(
                owner_id=tally.owner_id,
                team=tally.team,
                activities=tally.activities,
                tasks=tally.tasks,
                tasks_completed=tally.tasks_completed,
                task_completion_rate=rate(tally.tasks_completed, tally.tasks),
                won_count=tally.won_count,
                won_amount=tally.won_amount,
                csat=csat(tally.csat_scores),
                data_completeness=fill,
            )
        )
    return rows


# ---------------------------------------------------------------------------- data completeness


def _has_value(value: object) -> bool:
    """Blank strings and missing values hold none."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def filled_fields(values: Mapping[str, object], key_fields: Sequence[str]) -> list[str]:
    """The key fields holding a value (blank strings and missing values are not filled)."""
    return [name for name in key_fields if _has_value(values.get(name))]


def contact_filled(*, name: str, title: str, phone: str, mobile: str, email: str, decision_role: str) -> list[str]:
    """A contact's filled key fields (`CONTACT_KEY_FIELDS`): its phone is filled by a landline or a
    mobile number."""
    values = {
        "name": name,
        "title": title,
        "phone": phone if _has_value(phone) else mobile,
        "email": email,
        "decision_role": decision_role,
    }
    return filled_fields(values, CONTACT_KEY_FIELDS)


def opportunity_filled(
    *,
    amount: Decimal | None,
    expected_close_date: str,
    primary_contact_id: str,
    line_items: int,
    product_line: str,
    next_step: str,
) -> list[str]:
    """A deal's filled key fields (`OPPORTUNITY_KEY_FIELDS`). Its amount counts only above zero:
    sales gives a deal created with neither an amount nor line items an amount of 0. Its products
    are its `line_items` (how many), or the product line it names without any."""
    values = {
        "amount": amount if amount is not None and amount > 0 else None,
        "expected_close_date": expected_close_date,
        "primary_contact": primary_contact_id,
        "products": "line items" if line_items > 0 else product_line,
        "next_step": next_step,
    }
    return filled_fields(values, OPPORTUNITY_KEY_FIELDS)


def completeness(filled: Sequence[str], key_fields: Sequence[str]) -> Decimal:
    return rate(len(set(filled) & set(key_fields)), len(key_fields)) or ZERO


@dataclass(frozen=True, slots=True)
class CompletenessRow:
    entity: str
    records: int
    completeness: Decimal | None
    fields: list[tuple[str, int, Decimal | None]]


def completeness_row(entity: str, records: Sequence[Sequence[str]], key_fields: Sequence[str]) -> CompletenessRow:
    """`records` are each record's filled key fields."""
    per_field = [(name, sum(1 for filled in records if name in filled)) for name in key_fields]
    shares = [completeness(filled, key_fields) for filled in records]
    overall = (sum(shares, ZERO) / len(shares)).quantize(RATE_PLACES) if shares else None
    return CompletenessRow(
        entity=entity,
        records=len(records),
        completeness=overall,
        fields=[(name, count, rate(count, len(records))) for name, count in per_field],
    )


# ------------------------------------------------------------------------------------ churn risk


@dataclass(frozen=True, slots=True)
class ChurnPolicy:
    no_activity_days: int = 30
    # An average CSAT below this is a reason (with at least `min_csat_responses` responses).
    low_csat_below: Decimal = Decimal(3)
    min_csat_responses: int = 1


@dataclass(frozen=True, slots=True)
class AccountHealth:
    account_id: str
    created_at: datetime | None
    last_activity_at: datetime | None
    overdue_installments: int
    overdue_amount: Decimal
    currency: str
    open_urgent_tickets: int
    csat_scores: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChurnReason:
    code: str
    detail: str


def churn_reasons(health: AccountHealth, policy: ChurnPolicy, now: datetime) -> list[ChurnReason]:
    reasons = []
    last = health.last_activity_at or health.created_at
    if last is not None and now - last > timedelta(days=policy.no_activity_days):
        days = (now - last).days
        what = "no activity" if health.last_activity_at else "no activity since creation"
        reasons.append(ChurnReason("NO_ACTIVITY", f"{what} for {days} days (limit {policy.no_activity_days})"))
    if health.overdue_installments:
        reasons.append(
            ChurnReason(
                "OVERDUE_INSTALLMENTS",
                # Stored amounts carry 4 places: shown in the currency's minor unit, as money is everywhere.
                f"{health.overdue_installments} overdue installment(s), "
                f"{amount_text(health.overdue_amount, health.currency)} {health.currency}",
            )
        )
    if health.open_urgent_tickets:
        reasons.append(ChurnReason("OPEN_URGENT_TICKETS", f"{health.open_urgent_tickets} open urgent ticket(s)"))
    if len(health.csat_scores) >= policy.min_csat_responses:
        score = csat(health.csat_scores).average
        if score is not None and score < policy.low_csat_below:
            reasons.append(ChurnReason("LOW_CSAT", f"average CSAT {score} below {policy.low_csat_below}"))
    return reasons


def churn_risk(reasons: Sequence[ChurnReason]) -> str:
    if not reasons:
        return "low"
    return "medium" if len(reasons) == 1 else "high"


def outstanding(amount: Decimal, paid_before_plan: Decimal, allocated: Decimal) -> Decimal:
    """What is still owed on an installment. Sales applies money received before the payment plan
    existed when it creates the plan (the plan's paid amounts, with no allocations), and every later
    payment through allocations: the two are separate money, so both are paid."""
    return max(ZERO, amount - paid_before_plan - allocated)


def resume_at(after: tuple[int, str], account_ids: Sequence[str]) -> int:
    """Where the next page of a ranked list starts, from the page before's end (`after`: its end
    position and its last account). Just after that account, wherever the ranking now puts it (the
    amounts moved since); at the position when the account left the list (merged, deleted)."""
    position, account_id = after
    if position <= len(account_ids) and account_ids[position - 1] == account_id:
        return position
    try:
        return account_ids.index(account_id) + 1
    except ValueError:
        return min(position, len(account_ids))
