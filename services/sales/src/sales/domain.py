"""Sales rules without I/O: pipelines and stage gates, anti-collision (防撞单), forecast arithmetic,
quote and contract approval chains, the contract status machine, payment plans, payment
allocation and invoice limits. Money is `Decimal` plus a currency everywhere; never a float.
"""

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import MAX_PREC, ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext
from enum import StrEnum

from crm_platform.errors import Conflict, FieldError, PermissionDenied, ValidationFailed
from crm_platform.money import CENT, MAX_AMOUNT, Money, amount_text, check_amount, minor_unit
from crm_platform.structs import text_problem
from crm_platform.timeutil import in_the_future

HUNDRED = Decimal(100)
# Longest id of another service's record (account, contact, lead, campaign) and longest text field.
REF_LENGTH = 64
NAME_LENGTH = 200
# Short codes: a stage key, a payment method, an invoice number (VARCHAR(64) columns).
CODE_LENGTH = 64
# External references (the idempotency key of postings) and Idempotency-Key values.
REFERENCE_LENGTH = 200
# A stage may let a deal sit for at most ten years before it rots (rotting is computed as a date).
MAX_ROTTING_DAYS = 3650
# Units on one line item; with MAX_AMOUNT as the unit price the line's gross stays computable.
MAX_QUANTITY = Decimal(1_000_000_000)


def check_texts(values: Mapping[str, str], limit: int) -> list[FieldError]:
    """Each value at most `limit` characters and storable (no NUL: an ERP's Kafka posting is not
    checked by the gateway)."""
    errors = []
    for name, value in values.items():
        problem = f"at most {limit} characters" if len(value) > limit else text_problem(value)
        if problem:
            errors.append(FieldError(name, problem))
    return errors


def quantize_money(value: Decimal, currency: str) -> Decimal:
    """Commercial rounding (half up) to the currency's minor unit (cents, fils, whole yen), applied
    once at the end of a computation."""
    return value.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def require_valid_amount(money: Money, *, field_name: str, allow_zero: bool = True) -> None:
    errors = check_amount(money.amount, field=f"{field_name}.amount", currency=money.currency, allow_zero=allow_zero)
    if errors:
        raise ValidationFailed(errors)


def parse_iso_date(text: str, *, field_name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValidationFailed([FieldError(field_name, f"{text!r} is not an ISO date (YYYY-MM-DD)")]) from None


def optional_date(text: str, *, field_name: str) -> date | None:
    return parse_iso_date(text, field_name=field_name) if text else None


# ---------------------------------------------------------------- pipelines and stages


class Outcome(StrEnum):
    OPEN = "open"
    WON = "won"
    LOST = "lost"


# Opportunity fields a stage gate may require (the names clients see in the API).
GATEABLE_FIELDS = frozenset(
    {
        "account_id",
        "primary_contact_id",
        "name",
        "amount",
        "expected_close_date",
        "line_items",
        "next_step",
        "product_line",
        "source_lead_id",
        "campaign_id",
    }
)


@dataclass(frozen=True, slots=True)
class Stage:
    key: str
    name: str
    probability: Decimal
    required_fields: tuple[str, ...] = ()
    rotting_days: int = 0
    outcome: Outcome = Outcome.OPEN


@dataclass(frozen=True, slots=True)
class Pipeline:
    id: str
    name: str
    stages: tuple[Stage, ...]
    is_default: bool = False

    def stage(self, key: str) -> Stage:
        for stage in self.stages:
            if stage.key == key:
                return stage
        known = ", ".join(s.key for s in self.stages)
        raise ValidationFailed([FieldError("stage", f"unknown stage {key!r} (pipeline stages: {known})")])

    def position(self, key: str) -> int:
        return [s.key for s in self.stages].index(self.stage(key).key)

    @property
    def first_open_stage(self) -> Stage:
        return next(s for s in self.stages if s.outcome is Outcome.OPEN)

    def outcome_stage(self, outcome: Outcome) -> Stage:
        for stage in self.stages:
            if stage.outcome is outcome:
                return stage
        raise ValidationFailed([FieldError("stage", f"pipeline {self.name!r} has no {outcome} stage")])


# The default pipeline of SPEC §6 (seed probabilities). The gates are what a manager expects
# before each step: someone to talk to, then a date, then what is sold and for how much.
DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("initial_contact", "Initial contact", Decimal(10), (), 14),
    Stage("needs_confirmed", "Needs confirmed", Decimal(25), ("primary_contact_id",), 21),
    Stage("solution_demo", "Solution demo", Decimal(50), ("expected_close_date",), 21),
    Stage("quote_negotiation", "Quote and negotiation", Decimal(75), ("amount", "line_items"), 30),
    Stage("contract_signing", "Contract signing", Decimal(90), ("next_step",), 30),
    Stage("won", "Won", Decimal(100), ("amount",), 0, Outcome.WON),
    Stage("lost", "Lost", Decimal(0), (), 0, Outcome.LOST),
)
DEFAULT_PIPELINE_NAME = "Default"


def validate_stages(stages: Sequence[Stage]) -> None:
    """A pipeline needs unique keys, probabilities 0..100, known gate fields, and one won and one
    lost stage after at least one open stage."""
    errors: list[FieldError] = []
    seen: set[str] = set()
    for index, stage in enumerate(stages):
        prefix = f"stages[{index}]"
        if not stage.key or not stage.key.replace("_", "").isalnum() or stage.key != stage.key.lower():
            errors.append(FieldError(f"{prefix}.key", "lower-case letters, digits and underscores"))
        elif len(stage.key) > CODE_LENGTH:  # a deal stores its stage key in a VARCHAR(64)
            errors.append(FieldError(f"{prefix}.key", f"at most {CODE_LENGTH} characters"))
        if stage.key in seen:
            errors.append(FieldError(f"{prefix}.key", f"duplicate stage key {stage.key!r}"))
        seen.add(stage.key)
        if not stage.name.strip():
            errors.append(FieldError(f"{prefix}.name", "must not be empty"))
        if not Decimal(0) <= stage.probability <= HUNDRED:
            errors.append(FieldError(f"{prefix}.probability", "must be between 0 and 100"))
        elif stage.probability != stage.probability.quantize(CENT):  # in range: quantize cannot overflow
            errors.append(FieldError(f"{prefix}.probability", "at most 2 decimal places"))
        if not 0 <= stage.rotting_days <= MAX_ROTTING_DAYS:
            errors.append(FieldError(f"{prefix}.rotting_days", f"must be between 0 and {MAX_ROTTING_DAYS}"))
        for name in stage.required_fields:
            if name not in GATEABLE_FIELDS:
                errors.append(
                    FieldError(
                        f"{prefix}.required_fields", f"{name!r} is not a gateable field ({sorted(GATEABLE_FIELDS)})"
                    )
                )
    outcomes = [s.outcome for s in stages]
    if Outcome.OPEN not in outcomes:
        errors.append(FieldError("stages", "needs at least one open stage"))
    for outcome in (Outcome.WON, Outcome.LOST):
        if outcomes.count(outcome) != 1:
            errors.append(FieldError("stages", f"needs exactly one {outcome} stage"))
    if errors:
        raise ValidationFailed(errors)


def field_is_filled(value: object) -> bool:
    """A gate field counts as filled when it holds something meaningful (an amount above zero)."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, Money):
        return value.amount > 0
    if isinstance(value, Decimal):
        return value > 0
    if isinstance(value, (list, tuple, dict)):
        return len(value) > 0
    return True


def missing_gate_fields(pipeline: Pipeline, target: str, fields: Mapping[str, object]) -> list[str]:
    """The fields required to enter `target` that are empty. For an open stage the gates of the
    open stages before it count too, so skipping stages never skips a gate; closing (won/lost)
    checks only the closing stage's own fields."""
    target_stage = pipeline.stage(target)
    required: list[str] = []
    gates = pipeline.stages if target_stage.outcome is Outcome.OPEN else (target_stage,)
    for stage in gates:
        required.extend(name for name in stage.required_fields if name not in required)
        if stage is target_stage:
            break
    return [name for name in required if not field_is_filled(fields.get(name))]


def check_stage_gate(pipeline: Pipeline, target: str, fields: Mapping[str, object]) -> None:
    missing = missing_gate_fields(pipeline, target, fields)
    if missing:
        raise ValidationFailed([FieldError(name, f"required to enter stage {target!r}") for name in missing])


# ---------------------------------------------------------------- line items


@dataclass(frozen=True, slots=True)
class LineItem:
    product_id: str
    product_name: str
    product_line: str
    quantity: Decimal
    unit_price: Money
    discount_percent: Decimal = Decimal(0)

    @property
    def gross(self) -> Decimal:
        return self.quantity * self.unit_price.amount

    @property
    def subtotal(self) -> Decimal:
        return quantize_money(self.gross, self.unit_price.currency)

    @property
    def discount(self) -> Decimal:
        return quantize_money(self.gross * self.discount_percent / HUNDRED, self.unit_price.currency)

    @property
    def total(self) -> Decimal:
        return self.subtotal - self.discount


def validate_line_items(items: Sequence[LineItem], *, field_name: str = "line_items") -> str | None:
    """Checks every item; returns the common currency (None without items)."""
    errors: list[FieldError] = []
    currencies = {item.unit_price.currency for item in items}
    for index, item in enumerate(items):
        prefix = f"{field_name}[{index}]"
        if not (item.product_id or item.product_name):
            errors.append(FieldError(f"{prefix}.product_id", "product_id or product_name is required"))
        # A deal without a product line of its own takes its first item's.
        errors.extend(check_texts({f"{prefix}.product_line": item.product_line}, NAME_LENGTH))
        price_errors = check_amount(
            item.unit_price.amount, field=f"{prefix}.unit_price.amount", currency=item.unit_price.currency
        )
        if item.quantity <= 0:
            errors.append(FieldError(f"{prefix}.quantity", "must be greater than zero"))
        elif item.quantity > MAX_QUANTITY:
            errors.append(FieldError(f"{prefix}.quantity", f"must not exceed {MAX_QUANTITY}"))
        elif not price_errors and item.gross > MAX_AMOUNT:
            errors.append(FieldError(f"{prefix}.quantity", f"quantity x unit price must not exceed {MAX_AMOUNT}"))
        errors.extend(price_errors)
        if not Decimal(0) <= item.discount_percent <= HUNDRED:
            errors.append(FieldError(f"{prefix}.discount_percent", "must be between 0 and 100"))
    if len(currencies) > 1:
        errors.append(FieldError(f"{field_name}", f"all line items need one currency, got {sorted(currencies)}"))
    # Every item is in range now, so the subtotal is computable; it is a money amount like any other.
    if not errors and sum((item.subtotal for item in items), Decimal(0)) > MAX_AMOUNT:
        errors.append(FieldError(f"{field_name}", f"the line items total more than {MAX_AMOUNT}"))
    if errors:
        raise ValidationFailed(errors)
    return next(iter(currencies)) if currencies else None


def check_line_currency(currency: str, line_currency: str | None) -> None:
    """A deal's amount is in the currency of its line items (when it has any)."""
    if line_currency and currency != line_currency:
        raise ValidationFailed([FieldError("amount.currency", f"must be the line items' currency {line_currency}")])


@dataclass(frozen=True, slots=True)
class Totals:
    subtotal: Decimal
    discount_total: Decimal
    total: Decimal
    max_discount_percent: Decimal


def line_totals(items: Sequence[LineItem]) -> Totals:
    subtotal = sum((item.subtotal for item in items), Decimal(0))
    discount = sum((item.discount for item in items), Decimal(0))
    max_discount = max((item.discount_percent for item in items), default=Decimal(0))
    return Totals(subtotal, discount, subtotal - discount, max_discount)


# ---------------------------------------------------------------- opportunities


class OpportunityStatus(StrEnum):
    OPEN = "open"
    WON = "won"
    LOST = "lost"


class ForecastCategory(StrEnum):
    PIPELINE = "pipeline"
    BEST_CASE = "best_case"
    COMMIT = "commit"
    OMITTED = "omitted"


def default_forecast_category(probability: Decimal) -> ForecastCategory:
    """Without an explicit category a deal is commit from 90 %, best case from 50 %."""
    if probability >= 90:
        return ForecastCategory.COMMIT
    if probability >= 50:
        return ForecastCategory.BEST_CASE
    return ForecastCategory.PIPELINE


def parse_forecast_category(text: str, *, field_name: str = "forecast_category") -> ForecastCategory | None:
    if not text:
        return None
    try:
        return ForecastCategory(text)
    except ValueError:
        allowed = ", ".join(c.value for c in ForecastCategory)
        raise ValidationFailed([FieldError(field_name, f"{text!r} is not one of {allowed}")]) from None


def require_open(status: str, *, record: str, record_id: str) -> None:
    if status != OpportunityStatus.OPEN:
        raise Conflict(
            f"{record} {record_id} is {status}; only open deals change stage or close", reason="ILLEGAL_STATE"
        )


def check_quotable(status: str, *, opportunity_id: str) -> None:
    """A deal is quoted while it is negotiated and once won, until its contract is made from the
    quotes; a lost deal is not (409)."""
    if status == OpportunityStatus.LOST:
        raise Conflict(f"opportunity {opportunity_id} is lost; a lost deal is not quoted", reason="ILLEGAL_STATE")


def check_owner_change(status: str, *, opportunity_id: str) -> None:
    """A deal changes hands (owner, team, region) only while it is open: a won or lost deal's close
    credited its owner, and win statistics, forecasts and commissions rely on it (409)."""
    if status != OpportunityStatus.OPEN:
        raise Conflict(
            f"opportunity {opportunity_id} is {status}; its close credited its owner, so only an open deal "
            "changes hands",
            reason="ILLEGAL_STATE",
        )


# What a deal's close counted: its value. Fixed once it is won or lost.
CLOSED_TERMS = frozenset({"amount", "currency", "line_items", "product_line"})


# Columns of a deal that its events name by another field, and columns derived from others that
# are no field of the deal: `changed_fields` name the fields of the `Opportunity` message.
_FIELD_OF_COLUMN = {"currency": "amount", "probability_bp": "probability"}
_DERIVED_COLUMNS = frozenset({"forecast_month", "product_line_key"})


def changed_opportunity_fields(columns: Iterable[str]) -> list[str]:
    """The deal's fields an update of these columns changed, as its event names them."""
    return sorted({_FIELD_OF_COLUMN.get(column, column) for column in columns if column not in _DERIVED_COLUMNS})


def check_closed_terms(status: str, changed: Iterable[str], *, opportunity_id: str) -> None:
    """A won or lost deal keeps the value it closed with: closed-won revenue, win statistics and the
    contract made from it rely on it (409)."""
    frozen = sorted(CLOSED_TERMS.intersection(changed))
    if status != OpportunityStatus.OPEN and frozen:
        raise Conflict(
            f"opportunity {opportunity_id} is {status}; {', '.join(frozen)} stay as it closed with them",
            reason="ILLEGAL_STATE",
        )


@dataclass(frozen=True, slots=True)
class OpenDeal:
    """What anti-collision needs to know about an existing open opportunity."""

    id: str
    owner_id: str
    name: str
    # Whether the caller may read it: only then does a refusal say whose it is and what it is called.
    visible: bool = False


MANAGER_ROLES = ("sales_manager", "admin")


def product_line_key(product_line: str) -> str:
    """A product line as anti-collision compares it: "Cloud ERP", "cloud  erp" and its full-width
    form (a Chinese IME's) are one line. NFKC, case-folded, inner whitespace collapsed, trimmed (NFKC
    again after folding, which may decompose a character: the key stays in normal form). Deals show
    the product line as written."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", product_line).casefold())
    return " ".join(folded.split())


def check_collision(
    *,
    owner_id: str,
    open_deals: Iterable[OpenDeal],
    override: bool,
    caller_roles: Sequence[str],
) -> OpenDeal | None:
    """防撞单: another owner's open deal on the same account and product line blocks a new one.
    A manager may override; the colliding deal is returned so the override can be recorded."""
    colliding = next((deal for deal in open_deals if deal.owner_id != owner_id), None)
    if colliding is None:
        return None
    if not override:
        which = f"({colliding.name!r}) of owner {colliding.owner_id} " if colliding.visible else "of another owner "
        raise Conflict(
            f"opportunity {colliding.id} {which}is already open on this account and product line",
            existing_id=colliding.id,
            reason="OPPORTUNITY_COLLISION",
        )
    check_may_override_collision(caller_roles)
    return colliding


def check_may_override_collision(caller_roles: Sequence[str]) -> None:
    """403 on `override_collision` for whom is neither a sales manager nor an admin."""
    if not any(role in MANAGER_ROLES for role in caller_roles):
        raise PermissionDenied("only a sales manager or admin may override anti-collision", field="override_collision")


def is_rotting(status: str, stage: Stage, entered_at: datetime | None, now: datetime) -> bool:
    """An open deal sitting in its stage longer than the stage's rotting days (0: never rots)."""
    if status != OpportunityStatus.OPEN or stage.rotting_days <= 0 or entered_at is None:
        return False
    return now - entered_at > timedelta(days=stage.rotting_days)


@dataclass(frozen=True, slots=True)
class StageVisit:
    stage: str
    entered_at: str
    exited_at: str = ""


def enter_stage(history: Sequence[StageVisit], stage: str, at: str) -> list[StageVisit]:
    """Closes the open visit and opens one for `stage` (times as RFC 3339 strings)."""
    closed = [replace(visit, exited_at=at) if not visit.exited_at else visit for visit in history]
    return [*closed, StageVisit(stage=stage, entered_at=at)]


# ---------------------------------------------------------------- forecast


def month_key(day: date) -> int:
    """The forecast bucket of a date as YYYYMM (stored, so SQL groups without date functions)."""
    return day.year * 100 + day.month


def period_label(month: int, *, quarter: bool) -> str:
    year, month_of_year = divmod(month, 100)
    if quarter:
        return f"{year}-Q{(month_of_year + 2) // 3}"
    return f"{year}-{month_of_year:02d}"


@dataclass(frozen=True, slots=True)
class ForecastDeal:
    """One deal as the forecast sees it (the reference for the SQL aggregation)."""

    status: OpportunityStatus
    amount: Decimal
    currency: str
    probability: Decimal
    category: ForecastCategory
    month: int
    owner_id: str
    team: str


@dataclass(slots=True)
class ForecastLine:
    period: str
    group: str
    currency: str
    pipeline: Decimal = Decimal(0)
    # Exact sum of amount x probability in percent; divided and rounded once in `weighted`.
    weighted_raw: Decimal = Decimal(0)
    commit: Decimal = Decimal(0)
    best_case: Decimal = Decimal(0)
    closed_won: Decimal = Decimal(0)
    open_count: int = 0
    won_count: int = 0

    @property
    def weighted(self) -> Decimal:
        return quantize_money(self.weighted_raw / HUNDRED, self.currency)


def forecast(deals: Iterable[ForecastDeal], *, quarter: bool, by_team: bool) -> list[ForecastLine]:
    """Pipeline, weighted, commit, best case (commit + best case) and closed won per period, group
    and currency. Lost and omitted deals count nowhere."""
    lines: dict[tuple[str, str, str], ForecastLine] = {}
    for deal in deals:
        if deal.status is OpportunityStatus.LOST:
            continue
        if deal.status is OpportunityStatus.OPEN and deal.category is ForecastCategory.OMITTED:
            continue
        key = (period_label(deal.month, quarter=quarter), deal.team if by_team else deal.owner_id, deal.currency)
        line = lines.setdefault(key, ForecastLine(*key))
        if deal.status is OpportunityStatus.WON:
            line.closed_won += deal.amount
            line.won_count += 1
            continue
        line.open_count += 1
        line.pipeline += deal.amount
        line.weighted_raw += deal.amount * deal.probability
        if deal.category is ForecastCategory.COMMIT:
            line.commit += deal.amount
        if deal.category in (ForecastCategory.COMMIT, ForecastCategory.BEST_CASE):
            line.best_case += deal.amount
    return [lines[key] for key in sorted(lines)]


def win_rate(won: int, lost: int) -> Decimal:
    """won / (won + lost) with 4 places; 0 when nothing closed."""
    if won + lost == 0:
        return Decimal("0.0000")
    return (Decimal(won) / Decimal(won + lost)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


# ---------------------------------------------------------------- targets and attainment

# A month (`2026-12`) or a quarter (`2026-Q4`): the labels of the forecast's periods.
_PERIOD = re.compile(r"([1-9][0-9]{3})-(?:(0[1-9]|1[0-2])|Q([1-4]))")
ATTAINMENT_PLACES = Decimal("0.0001")


@dataclass(frozen=True, slots=True)
class Period:
    """The months a target covers, as YYYYMM (the forecast's `month_key`), first and last inclusive."""

    first_month: int
    last_month: int

    @property
    def quarter(self) -> bool:
        return self.last_month != self.first_month

    @property
    def label(self) -> str:
        return period_label(self.first_month, quarter=self.quarter)


def parse_period(text: str, *, field_name: str = "period") -> Period:
    match = _PERIOD.fullmatch(text)
    if match is None:
        raise ValidationFailed(
            [FieldError(field_name, f"{text!r} is not a month (such as 2026-12) or a quarter (such as 2026-Q4)")]
        )
    year, month, quarter = match.groups()
    if month:
        first = int(year) * 100 + int(month)
        return Period(first, first)
    first = int(year) * 100 + (int(quarter) - 1) * 3 + 1
    return Period(first, first + 2)


def require_valid_target(amount: Money) -> None:
    """A target is a positive amount in whole minor units of its currency (422 naming the field)."""
    require_valid_amount(amount, field_name="amount", allow_zero=False)


@dataclass(frozen=True, slots=True)
class TargetAmount:
    """One target as attainment compares it: the forecast's period label and group."""

    period: str
    group: str
    currency: str
    amount: Decimal


@dataclass(slots=True)
class AttainmentLine:
    period: str
    group: str
    currency: str
    target: Decimal | None = None
    closed_won: Decimal = Decimal(0)
    commit: Decimal = Decimal(0)
    weighted: Decimal = Decimal(0)

    @property
    def attainment(self) -> Decimal | None:
        """closed won / target with 4 places (1.0250 = 102.5 %); None without a target."""
        if self.target is None:
            return None
        return (self.closed_won / self.target).quantize(ATTAINMENT_PLACES, rounding=ROUND_HALF_UP)


def whole_quarters(from_date: date | None, to_date: date | None) -> tuple[date | None, date | None]:
    """The range widened to the quarters it touches: a quarterly attainment asked for part of a
    quarter (quarter to date) still sees each month of it, for `quarter_targets`."""
    start = date(from_date.year, (from_date.month - 1) // 3 * 3 + 1, 1) if from_date else None
    end = date(to_date.year, (to_date.month - 1) // 3 * 3 + 3, 1) if to_date else None
    return start, end


def quarter_targets(quarterly: Iterable[TargetAmount], monthly: Iterable[TargetAmount]) -> list[TargetAmount]:
    """The targets of a quarterly attainment: the quarterly ones, and for a group with none in a
    quarter (in any currency), the sum of its monthly targets there, per currency, when each of the
    quarter's three months has one (a part of the quarter's months would read as the quarter's
    whole target). `monthly` targets carry their month's label ("2026-11")."""
    result = list(quarterly)
    set_quarters = {(target.period, target.group) for target in result}
    months: dict[tuple[str, str, str], list[Decimal]] = {}
    for target in monthly:
        year, month = target.period.split("-")
        quarter = period_label(int(year) * 100 + int(month), quarter=True)
        months.setdefault((quarter, target.group, target.currency), []).append(target.amount)
    for key, amounts in months.items():
        if key[:2] not in set_quarters and len(amounts) == 3:
            result.append(TargetAmount(*key, amount=sum(amounts, Decimal(0))))
    return result


def attainment(lines: Iterable[ForecastLine], targets: Iterable[TargetAmount]) -> list[AttainmentLine]:
    """Targets beside the forecast's closed won, commit and weighted, per period, group and
    currency: a target without deals has zero won, deals without a target have no target (None).
    Currencies are never converted: a target compares with the deals of its own currency."""
    rows: dict[tuple[str, str, str], AttainmentLine] = {}
    for line in lines:
        key = (line.period, line.group, line.currency)
        rows[key] = AttainmentLine(*key, closed_won=line.closed_won, commit=line.commit, weighted=line.weighted)
    for target in targets:
        key = (target.period, target.group, target.currency)
        rows.setdefault(key, AttainmentLine(*key)).target = target.amount
    return [rows[key] for key in sorted(rows)]


# ---------------------------------------------------------------- approvals


@dataclass(frozen=True, slots=True)
class QuoteThresholds:
    """Discount percentages above which a role must approve (SPEC: > 15 % manager, > 30 % finance)."""

    sales_manager: Decimal = Decimal(15)
    finance: Decimal = Decimal(30)


def quote_approval_chain(max_discount_percent: Decimal, thresholds: QuoteThresholds) -> list[str]:
    chain = []
    if max_discount_percent > thresholds.sales_manager:
        chain.append("sales_manager")
    if max_discount_percent > thresholds.finance:
        chain.append("finance")
    return chain


@dataclass(frozen=True, slots=True)
class ContractThresholds:
    """Amounts from which finance and admin join the chain (SPEC: ≥ 100k finance, ≥ 1M admin), in
    `currency`. `exchange_rates` say what one unit of each other currency is worth in `currency`."""

    finance: Decimal = Decimal(100_000)
    admin: Decimal = Decimal(1_000_000)
    currency: str = "CNY"
    exchange_rates: Mapping[str, Decimal] = field(default_factory=dict)


def amount_in_threshold_currency(amount: Money, thresholds: ContractThresholds) -> Decimal:
    """The contract amount in the thresholds' currency, rounded up to that currency's minor unit
    (cents, fils, whole yen) so that an amount just above a threshold after conversion stays above
    it. A currency without a configured rate is refused (422 on `amount.currency`), never compared
    as if it were the thresholds' currency."""
    if amount.currency == thresholds.currency:
        return amount.amount
    rate = thresholds.exchange_rates.get(amount.currency)
    if rate is None:
        configured = ", ".join(sorted([thresholds.currency, *thresholds.exchange_rates]))
        raise ValidationFailed(
            [
                FieldError(
                    "amount.currency",
                    f"no exchange rate to {thresholds.currency} is configured for {amount.currency}, so the "
                    f"approval chain cannot be chosen (configured: {configured})",
                )
            ]
        )
    # Unbounded precision: the product is exact (it has no more digits than its factors), so the
    # only rounding is the explicit one, upwards.
    with localcontext(prec=MAX_PREC):
        return (amount.amount * rate).quantize(minor_unit(thresholds.currency), rounding=ROUND_CEILING)


def contract_approval_chain(
    amount: Money, thresholds: ContractThresholds, *, alongside: Sequence[Money] = ()
) -> list[str]:
    """A sales manager always approves; finance from `finance`, then admin from `admin`, in order,
    comparing the amount converted to the thresholds' currency. `alongside`: the amounts of the
    other live contracts made from the same deal, compared together with this one, so that a deal
    split into contracts each under a threshold still meets it."""
    converted = sum((amount_in_threshold_currency(each, thresholds) for each in (amount, *alongside)), Decimal(0))
    chain = ["sales_manager"]
    if converted >= thresholds.finance:
        chain.append("finance")
    if converted >= thresholds.admin:
        chain.append("admin")
    return chain


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ApprovalStep:
    role: str
    approver_id: str
    decision: Decision
    comment: str = ""
    decided_at: str = ""


def pending_roles(chain: Sequence[str], decisions: Sequence[ApprovalStep]) -> list[str]:
    """Roles of the chain that have not approved yet, in chain order."""
    approved = [d.role for d in decisions if d.decision is Decision.APPROVED]
    return [role for role in chain if role not in approved]


def approving_role(chain: Sequence[str], decisions: Sequence[ApprovalStep], caller_roles: Sequence[str]) -> str:
    """The step the caller may decide: the chain is sequential, so only its next role counts.
    PermissionDenied names the role that is awaited."""
    pending = pending_roles(chain, decisions)
    if not pending:
        raise Conflict("nothing is waiting for approval", reason="ILLEGAL_STATE")
    if pending[0] not in caller_roles:
        raise PermissionDenied(f"approval step awaits role {pending[0]!r}; the caller has {sorted(caller_roles)}")
    return pending[0]


def check_separation_of_duties(
    approver_id: str, *, created_by: str, submitted_by: str, decisions: Sequence[ApprovalStep], record: str
) -> None:
    """Four eyes: whoever created a record, and whoever submitted it, does not decide on it (the
    creator set its terms even when another person submits them), and each step of one submission
    is decided by another person (one user holding several roles decides one step). `decisions`
    are those of the current submission; an unknown creator or submitter ("") is not checked."""
    if submitted_by and approver_id == submitted_by:
        raise PermissionDenied(f"{approver_id} submitted this {record}; another person must decide on it")
    if created_by and approver_id == created_by:
        raise PermissionDenied(f"{approver_id} created this {record}; another person must decide on it")
    earlier = next((step for step in decisions if step.approver_id == approver_id), None)
    if earlier is not None:
        raise PermissionDenied(
            f"{approver_id} already decided the {earlier.role} step of this {record}; "
            "another person must decide the next step"
        )


# ---------------------------------------------------------------- quotes


class QuoteStatus(StrEnum):
    DRAFT = "draft"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"


def initial_quote_status(chain: Sequence[str]) -> QuoteStatus:
    """A quote within every threshold needs nobody's approval."""
    return QuoteStatus.PENDING_APPROVAL if chain else QuoteStatus.APPROVED


@dataclass(frozen=True, slots=True)
class QuoteTerms:
    """What a quote's line items make of it: its currency, totals, approval chain and status."""

    currency: str
    totals: Totals
    approval_chain: list[str]
    status: QuoteStatus


def quote_terms(items: Sequence[LineItem], thresholds: QuoteThresholds) -> QuoteTerms:
    """The line items of a new or changed quote checked (at least one), totalled, and the discount
    approvals they need: every change of them is submitted for approval again."""
    if not items:
        raise ValidationFailed([FieldError("line_items", "a quote needs at least one line item")])
    currency = validate_line_items(items)
    assert currency is not None  # there are items
    totals = line_totals(items)
    chain = quote_approval_chain(totals.max_discount_percent, thresholds)
    return QuoteTerms(currency, totals, chain, initial_quote_status(chain))


# A quote changes until it is decided: an approved one may have gone to the customer, a rejected
# one was turned down as it stands (a new quote is made instead).
CHANGEABLE_QUOTES = frozenset({QuoteStatus.DRAFT, QuoteStatus.PENDING_APPROVAL})


def check_quote_changeable(status: str, *, quote_id: str) -> None:
    """Only a quote not yet approved or rejected takes new line items (409 otherwise)."""
    if status not in CHANGEABLE_QUOTES:
        raise Conflict(
            f"quote {quote_id} is {status}; only a quote not yet decided may change (make a new one)",
            reason="ILLEGAL_STATE",
        )


# An approved quote may have gone to the customer and been accepted: it stays on record.
DELETABLE_QUOTES = frozenset({QuoteStatus.DRAFT, QuoteStatus.PENDING_APPROVAL, QuoteStatus.REJECTED})


def check_quote_deletable(status: str, *, quote_id: str) -> None:
    """Only a quote before approval may be deleted (409 otherwise)."""
    if status not in DELETABLE_QUOTES:
        raise Conflict(
            f"quote {quote_id} is {status}; only a quote before approval may be deleted", reason="ILLEGAL_STATE"
        )


# ---------------------------------------------------------------- contracts


class ContractStatus(StrEnum):
    DRAFT = "draft"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    SIGNED = "signed"
    COMPLETED = "completed"
    TERMINATED = "terminated"


# Contracts that are in force or may yet be: a rejected one counts again once resubmitted, a
# terminated one no longer does.
LIVE_CONTRACT_STATUSES = frozenset(
    {
        ContractStatus.DRAFT,
        ContractStatus.PENDING_APPROVAL,
        ContractStatus.APPROVED,
        ContractStatus.SIGNED,
        ContractStatus.COMPLETED,
    }
)

# SPEC §6: draft → pending_approval → approved | rejected → signed → completed | terminated.
# A rejected contract may be resubmitted; an approved but unsigned one may be terminated.
CONTRACT_TRANSITIONS: Mapping[ContractStatus, frozenset[ContractStatus]] = {
    ContractStatus.DRAFT: frozenset({ContractStatus.PENDING_APPROVAL}),
    ContractStatus.PENDING_APPROVAL: frozenset({ContractStatus.APPROVED, ContractStatus.REJECTED}),
    ContractStatus.REJECTED: frozenset({ContractStatus.PENDING_APPROVAL}),
    ContractStatus.APPROVED: frozenset({ContractStatus.SIGNED, ContractStatus.TERMINATED}),
    ContractStatus.SIGNED: frozenset({ContractStatus.COMPLETED, ContractStatus.TERMINATED}),
    ContractStatus.COMPLETED: frozenset(),
    ContractStatus.TERMINATED: frozenset(),
}


def check_contract_transition(current: str, target: ContractStatus, *, contract_id: str) -> None:
    if target not in CONTRACT_TRANSITIONS[ContractStatus(current)]:
        raise Conflict(f"contract {contract_id} cannot go from {current} to {target}", reason="ILLEGAL_TRANSITION")


# A contract that never took effect: nothing was approved, signed or sent to the ERP as binding.
# A pending one must be rejected first, so its approvers see it leave their queue.
DELETABLE_CONTRACTS = frozenset({ContractStatus.DRAFT, ContractStatus.REJECTED})


def check_contract_deletable(status: str, *, contract_id: str) -> None:
    """Approved, signed, completed and terminated contracts are records the ERP and finance rely on;
    a pending one is in its approvers' hands (409 for all of them)."""
    if status not in DELETABLE_CONTRACTS:
        raise Conflict(
            f"contract {contract_id} is {status}; only a draft or rejected contract may be deleted",
            reason="ILLEGAL_STATE" if status == ContractStatus.PENDING_APPROVAL else "CONTRACT_IN_FORCE",
        )


def check_contract_editable(status: str, *, contract_id: str) -> None:
    """Its terms are changed while it is a draft or rejected (then submitted again): what approvers
    decide on, or what was approved or signed, stays as it was (409)."""
    if status not in DELETABLE_CONTRACTS:
        raise Conflict(
            f"contract {contract_id} is {status}; only a draft or rejected contract may be changed",
            reason="ILLEGAL_STATE" if status == ContractStatus.PENDING_APPROVAL else "CONTRACT_IN_FORCE",
        )


def contract_number(year: int, month: int, sequence: int) -> str:
    """`CT-YYYYMM-NNNNNN`; the sequence restarts every month."""
    if not 0 < sequence <= 999_999:
        raise ValueError(f"contract sequence {sequence} out of range for {year}-{month:02d}")
    return f"CT-{year:04d}{month:02d}-{sequence:06d}"


# Payments and invoices belong to contracts that are in force (signed) or done with (completed).
# A completed contract is paid in full, so a payment on it is an over-payment; invoices may still
# follow (invoicing often lags payment), within the contract amount.
CONTRACTS_IN_FORCE = frozenset({ContractStatus.SIGNED, ContractStatus.COMPLETED})
CONTRACTS_ACCEPTING_PLANS = frozenset({ContractStatus.APPROVED, ContractStatus.SIGNED})


def check_plan_accepted(status: str, *, contract_id: str) -> None:
    """A payment plan is made and changed while the contract is approved or signed: a completed one
    is paid, a terminated one is written off (409 otherwise)."""
    if status not in CONTRACTS_ACCEPTING_PLANS:
        raise Conflict(
            f"contract {contract_id} is {status}; payment plans need an approved or signed contract",
            reason="ILLEGAL_STATE",
        )


def check_same_posting(posted: Money, again: Money, *, reference: str, existing_id: str) -> None:
    """An ERP posting (payment, invoice) sent again under its external reference is a redelivery
    only when it carries the same money: another amount under a used reference is another posting,
    and answering it with the first would hide the ERP's bug (409)."""
    if posted.currency != again.currency or posted.amount != again.amount:
        raise Conflict(
            f"external_reference {reference!r} was posted for {amount_text(posted.amount, posted.currency)} "
            f"{posted.currency}; {amount_text(again.amount, again.currency)} {again.currency} needs its own reference",
            existing_id=existing_id,
            reason="REFERENCE_REUSED",
        )


def check_in_force(status: str, *, contract_id: str, what: str) -> None:
    """Payments and invoices (`what`) need a signed or completed contract: 409 otherwise."""
    if status not in CONTRACTS_IN_FORCE:
        raise Conflict(f"contract {contract_id} is {status}; {what} need a signed contract", reason="ILLEGAL_STATE")


def check_settled(amount: Money, paid: Decimal, *, contract_id: str) -> None:
    """Completing a contract closes its receivable (the ERP closes it too), so nothing may be owed."""
    outstanding = quantize_money(amount.amount - paid, amount.currency)
    if outstanding > 0:
        raise Conflict(
            f"contract {contract_id} still has {outstanding} {amount.currency} outstanding; "
            "it completes once paid in full (or terminate it)",
            reason="OUTSTANDING_BALANCE",
        )


# ---------------------------------------------------------------- payment plans and payments


@dataclass(frozen=True, slots=True)
class PlannedInstallment:
    due_date: date
    amount: Decimal


def validate_payment_plan(
    contract_amount: Money, installments: Sequence[tuple[date, Money]]
) -> list[PlannedInstallment]:
    """Installments in the contract currency, each above zero, summing exactly to the contract
    amount; returned sorted by due date (the allocation order)."""
    errors: list[FieldError] = []
    if not installments:
        errors.append(FieldError("installments", "at least one installment is required"))
    for index, (_, money) in enumerate(installments):
        if money.currency != contract_amount.currency:
            errors.append(
                FieldError(
                    f"installments[{index}].amount.currency",
                    f"must be the contract currency {contract_amount.currency}",
                )
            )
        errors.extend(
            check_amount(
                money.amount, field=f"installments[{index}].amount.amount", currency=money.currency, allow_zero=False
            )
        )
    total = sum((money.amount for _, money in installments), Decimal(0))
    if installments and total != contract_amount.amount:
        errors.append(
            FieldError(
                "installments",
                f"installments sum to {total} but the contract amount is "
                f"{contract_amount.amount} {contract_amount.currency}",
            )
        )
    if errors:
        raise ValidationFailed(errors)
    ordered = sorted(enumerate(installments), key=lambda pair: (pair[1][0], pair[0]))
    return [PlannedInstallment(due_date=day, amount=money.amount) for _, (day, money) in ordered]


class InstallmentStatus(StrEnum):
    PENDING = "pending"
    PARTIALLY_PAID = "partially_paid"
    PAID = "paid"
    OVERDUE = "overdue"


@dataclass(frozen=True, slots=True)
class InstallmentState:
    id: str
    sequence: int
    due_date: date
    amount: Decimal
    paid: Decimal
    status: InstallmentStatus

    @property
    def open_amount(self) -> Decimal:
        return self.amount - self.paid


@dataclass(frozen=True, slots=True)
class AllocationResult:
    allocations: list[tuple[str, Decimal]]
    installments: list[InstallmentState] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PlanChange:
    """What replacing a plan's installments does to the stored ones: `rescheduled` pairs an unpaid
    installment with what takes its place, `added` go after the last sequence in use."""

    rescheduled: list[tuple[InstallmentState, PlannedInstallment]]
    added: list[PlannedInstallment]
    removed: list[InstallmentState]

    @property
    def changes_nothing(self) -> bool:
        return not (self.rescheduled or self.added or self.removed)


def change_plan(current: Sequence[InstallmentState], new: Sequence[PlannedInstallment]) -> PlanChange:
    """`new[i]` takes the place of `current[i]` (the plan's installments as it lists them, by due
    date). One paid in full or in part is money booked against it, by the CRM and the ERP alike:
    it must come back as it is, else 409 naming it (`installments[i]`). An unpaid one takes its new
    due date and amount; those beyond the new list are removed, new ones beyond the plan added."""
    rescheduled: list[tuple[InstallmentState, PlannedInstallment]] = []
    for index, installment in enumerate(current):
        given = new[index] if index < len(new) else None
        unchanged = given is not None and (given.due_date, given.amount) == (installment.due_date, installment.amount)
        if installment.paid > 0 and not unchanged:
            raise Conflict(
                f"installments[{index}] (due {installment.due_date.isoformat()}) is paid in part or in full: "
                f"it cannot be {'removed' if given is None else 'changed'}",
                existing_id=installment.id,
                reason="INSTALLMENT_PAID",
            )
        if given is not None and not unchanged:
            rescheduled.append((installment, given))
    return PlanChange(rescheduled, list(new[len(current) :]), list(current[len(new) :]))


def status_after_payment(installment: InstallmentState, paid: Decimal) -> InstallmentStatus:
    """Paid in full closes an installment. Otherwise only the overdue timer makes it overdue (it alone
    publishes installment.overdue, which collections act on), so a payment keeps that status as it was."""
    if paid >= installment.amount:
        return InstallmentStatus.PAID
    if installment.status is InstallmentStatus.OVERDUE:
        return InstallmentStatus.OVERDUE
    return InstallmentStatus.PARTIALLY_PAID if paid > 0 else InstallmentStatus.PENDING


def past_errors(field_name: str, moment: datetime | None, now: datetime) -> list[FieldError]:
    """When something happened (a payment received, a contract signed, an invoice issued) is not in
    the future: not after now plus the clock skew allowed for a caller's or an ERP's fast clock
    (None: it happens now). A payment counts as paid from when it was received; an ERP's latest
    event of a contract or invoice carries the time."""
    if moment is not None and in_the_future(moment, now):
        return [FieldError(field_name, "must not be in the future")]
    return []


def check_payment(amount: Money, *, contract_amount: Money, already_paid: Decimal) -> None:
    """A payment is positive, in the contract currency and never more than what is still owed."""
    require_valid_amount(amount, field_name="amount", allow_zero=False)
    if amount.currency != contract_amount.currency:
        raise ValidationFailed(
            [FieldError("amount.currency", f"must be the contract currency {contract_amount.currency}")]
        )
    outstanding = quantize_money(contract_amount.amount - already_paid, contract_amount.currency)
    if amount.amount > outstanding:
        raise ValidationFailed(
            [
                FieldError(
                    "amount",
                    f"over-payment: {amount.amount} {amount.currency} exceeds the outstanding {outstanding} "
                    f"{contract_amount.currency}",
                )
            ]
        )


def allocate_payment(amount: Decimal, installments: Sequence[InstallmentState]) -> AllocationResult:
    """Fills the open installments oldest due date first (then by sequence). The caller has
    checked that `amount` does not exceed what is owed."""
    remaining = amount
    allocations: list[tuple[str, Decimal]] = []
    updated: list[InstallmentState] = []
    for installment in sorted(installments, key=lambda i: (i.due_date, i.sequence)):
        share = min(remaining, installment.open_amount) if remaining > 0 else Decimal(0)
        if share > 0:
            allocations.append((installment.id, share))
            paid = installment.paid + share
            installment = replace(installment, paid=paid, status=status_after_payment(installment, paid))
            remaining -= share
        updated.append(installment)
    if remaining > 0:
        raise ValidationFailed([FieldError("amount", f"over-payment: {remaining} left after every installment")])
    return AllocationResult(allocations=allocations, installments=updated)


# ---------------------------------------------------------------- invoices


class InvoiceStatus(StrEnum):
    REQUESTED = "requested"
    ISSUED = "issued"
    VOID = "void"


INVOICE_TRANSITIONS: Mapping[InvoiceStatus, frozenset[InvoiceStatus]] = {
    InvoiceStatus.REQUESTED: frozenset({InvoiceStatus.ISSUED, InvoiceStatus.VOID}),
    InvoiceStatus.ISSUED: frozenset({InvoiceStatus.VOID}),
    InvoiceStatus.VOID: frozenset(),
}


def check_invoice_transition(current: str, target: InvoiceStatus, *, invoice_id: str) -> None:
    if target not in INVOICE_TRANSITIONS[InvoiceStatus(current)]:
        raise Conflict(f"invoice {invoice_id} cannot go from {current} to {target}", reason="ILLEGAL_TRANSITION")


def check_issued_amount(amount: Money, *, requested: Money) -> None:
    """An invoice is issued for exactly the amount that was requested."""
    if amount.currency != requested.currency:
        raise ValidationFailed([FieldError("amount.currency", f"must be the requested currency {requested.currency}")])
    if amount.amount != requested.amount:
        raise ValidationFailed(
            [
                FieldError(
                    "amount",
                    f"must be the requested {amount_text(requested.amount, requested.currency)} {requested.currency}",
                )
            ]
        )


def check_invoice_amount(amount: Money, *, contract_amount: Money, already_invoiced: Decimal) -> None:
    """Requested and issued invoices together never exceed the contract amount (void ones free
    their amount again)."""
    require_valid_amount(amount, field_name="amount", allow_zero=False)
    if amount.currency != contract_amount.currency:
        raise ValidationFailed(
            [FieldError("amount.currency", f"must be the contract currency {contract_amount.currency}")]
        )
    uninvoiced = quantize_money(contract_amount.amount - already_invoiced, contract_amount.currency)
    if amount.amount > uninvoiced:
        raise ValidationFailed(
            [
                FieldError(
                    "amount",
                    f"{amount.amount} {amount.currency} exceeds the uninvoiced {uninvoiced} {contract_amount.currency}",
                )
            ]
        )
