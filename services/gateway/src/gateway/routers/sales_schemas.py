"""The answers of the sales routes (`gateway.routers.sales`) as the OpenAPI document shows them.

Documentation only, as `gateway.routers.lead_schemas`: the routes name these models in `responses=`,
which FastAPI puts in the OpenAPI document without validating any answer. The routes build their
answers from the sales service's messages (`opportunity_dict`, `quote_dict`, `contract_dict`,
`receivables_view`, ...); these models follow them.

Every field of a record but its id is optional and may be null: the caller's field rules leave
hidden fields out and mask masked ones (`gateway.security.masking`: numbers and booleans show as
null, an amount as `"***"`). The rules reach inside a record's lists too: a line item's
`discount_percent` is hidden by default, and a masked list masks its items' values. What a route
adds around its records (a page's cursor, the import's results, win statistics' counts, an
account's receivables) is always there, but for money shown as the caller sees the amounts it is
computed from. Versions and counts are JSON numbers.
"""

from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, Field

from gateway.conventions import MoneyOut, Time

Day = Annotated[str | None, Field(description="a date (YYYY-MM-DD); null when not set")]
Record = TypeVar("Record", bound=BaseModel)


class Page(BaseModel, Generic[Record]):
    items: list[Record]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")


class Stage(BaseModel):
    key: str | None = None
    name: str | None = None
    probability: str | None = Field(default=None, description='win probability, percent as a decimal string ("25")')
    required_fields: list[str] | None = Field(
        default=None, description="the stage gate: the deal fields that must be filled to enter the stage"
    )
    rotting_days: int | None = Field(default=None, description="a deal longer in the stage is rotting; 0: never")
    position: int | None = None
    outcome: str | None = Field(default=None, description="open, won or lost: what entering the stage means")


class Pipeline(BaseModel):
    """A pipeline (`ETag` of its PUT carries its `version`)."""

    id: str
    name: str | None = None
    is_default: bool | None = None
    stages: list[Stage] | None = None
    created_at: Time = None
    version: int | None = None


class LineItem(BaseModel):
    product_id: str | None = None
    product_name: str | None = None
    product_line: str | None = None
    quantity: str | None = Field(default=None, description='a decimal string, e.g. "2"')
    unit_price: MoneyOut | None = None
    discount_percent: str | None = Field(
        default=None, description='percent as a decimal string ("12.5"); hidden unless the field rules show it'
    )
    total: MoneyOut | None = None


class StageEntry(BaseModel):
    stage: str | None = None
    entered_at: Time = None
    exited_at: Time = None


class Opportunity(BaseModel):
    """A deal as the caller may see it (`ETag` carries its `version`)."""

    id: str
    account_id: str | None = None
    primary_contact_id: str | None = None
    name: str | None = None
    pipeline_id: str | None = None
    stage: str | None = Field(default=None, description="the key of its stage in its pipeline")
    probability: str | None = Field(
        default=None, description="the win probability of its stage, percent as a decimal string"
    )
    amount: MoneyOut | None = None
    expected_close_date: Day = None
    close_date: str | None = Field(default=None, description="the date (YYYY-MM-DD) it was won or lost")
    owner_id: str | None = None
    team: str | None = None
    region: str | None = None
    source_lead_id: str | None = None
    campaign_id: str | None = None
    line_items: list[LineItem] | None = None
    status: str | None = Field(default=None, description="open, won or lost")
    lost_reason: str | None = None
    stage_history: list[StageEntry] | None = None
    next_step: str | None = None
    product_line: str | None = None
    forecast_category: str | None = Field(
        default=None, description="pipeline, best_case, commit or omitted: the forecast column an open deal counts in"
    )
    tags: list[str] | None = None
    custom: dict[str, Any] | None = None
    collision_override_by: str | None = Field(
        default=None,
        description="the manager who wrote it despite an open deal of another owner on its account and product line",
    )
    collision_override_reason: str | None = None
    colliding_opportunity_id: str | None = Field(default=None, description="the open deal that override was over")
    stage_entered_at: Time = None
    rotting: bool | None = Field(default=None, description="open and longer in its stage than its rotting days")
    created_at: Time = None
    updated_at: Time = None
    closed_at: Time = None
    version: int | None = None


class ApprovalDecision(BaseModel):
    role: str | None = Field(default=None, description="the role of the approval step")
    approver_id: str | None = None
    decision: str | None = Field(default=None, description="approved or rejected")
    comment: str | None = None
    decided_at: Time = None


class Quote(BaseModel):
    """A quote (`ETag` carries its `version`)."""

    id: str
    opportunity_id: str | None = None
    account_id: str | None = None
    line_items: list[LineItem] | None = None
    subtotal: MoneyOut | None = None
    discount_total: MoneyOut | None = None
    total: MoneyOut | None = None
    max_discount_percent: str | None = Field(
        default=None, description="the largest discount of its line items, percent as a decimal string"
    )
    status: str | None = Field(default=None, description="draft, pending_approval, approved or rejected")
    required_approvals: list[str] | None = Field(
        default=None, description="the roles whose approval its discounts still need"
    )
    decisions: list[ApprovalDecision] | None = None
    owner_id: str | None = None
    team: str | None = None
    region: str | None = None
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class Contract(BaseModel):
    """A contract (`ETag` carries its `version`)."""

    id: str
    number: str | None = Field(default=None, description='unique, e.g. "CT-202611-000123"')
    opportunity_id: str | None = Field(default=None, description="null for a direct contract")
    account_id: str | None = None
    title: str | None = None
    amount: MoneyOut | None = None
    status: str | None = Field(
        default=None, description="draft, pending_approval, approved, rejected, signed, completed or terminated"
    )
    approval_chain: list[str] | None = Field(
        default=None, description="the roles that approve it, in order: sales_manager, then finance and admin by amount"
    )
    decisions: list[ApprovalDecision] | None = None
    owner_id: str | None = None
    team: str | None = None
    region: str | None = None
    starts_on: Day = None
    ends_on: Day = None
    signed_at: Time = None
    completed_at: Time = None
    terminated_at: Time = None
    terminated_reason: str | None = None
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class Installment(BaseModel):
    id: str | None = None
    sequence: int | None = None
    due_date: Day = None
    amount: MoneyOut | None = None
    paid: MoneyOut | None = None
    status: str | None = Field(default=None, description="pending, partially_paid, paid or overdue")
    overdue_at: Time = None


class PaymentPlan(BaseModel):
    """A contract's installments (`ETag` carries its `version`, which payments do not change)."""

    id: str
    contract_id: str | None = None
    total: MoneyOut | None = None
    installments: list[Installment] | None = Field(default=None, description="by due date")
    created_at: Time = None
    version: int | None = None


class Allocation(BaseModel):
    installment_id: str | None = None
    amount: MoneyOut | None = None


class Payment(BaseModel):
    id: str
    contract_id: str | None = None
    amount: MoneyOut | None = None
    received_at: Time = None
    method: str | None = None
    external_reference: str | None = Field(default=None, description="unique: posting it again answers this payment")
    allocations: list[Allocation] | None = Field(default=None, description="what it paid of which installment")
    created_at: Time = None


class Invoice(BaseModel):
    """An invoice (`ETag` carries its `version`)."""

    id: str
    contract_id: str | None = None
    account_id: str | None = None
    number: str | None = Field(default=None, description="null until issued")
    amount: MoneyOut | None = None
    status: str | None = Field(default=None, description="requested, issued or void")
    external_reference: str | None = None
    requested_at: Time = None
    issued_at: Time = None
    voided_at: Time = None
    void_reason: str | None = None
    version: int | None = None


# Money computed from a contract's amount, shown as the caller sees that amount.
ContractMoney = Annotated[
    MoneyOut | None, Field(default=None, description="left out when the caller may not see contracts' amount")
]
CurrencyTotals = Annotated[
    list[MoneyOut],
    Field(default_factory=list, description="per currency; left out when the caller may not see contracts' amount"),
]


class Receivable(BaseModel):
    """What is owed on one contract in force."""

    contract_id: str
    contract_number: str
    account_id: str
    status: str = Field(description="the contract's status")
    amount: ContractMoney
    paid: ContractMoney
    outstanding: ContractMoney
    overdue: ContractMoney
    invoiced: ContractMoney
    next_due_date: str | None = Field(
        description="the due date (YYYY-MM-DD) of its earliest installment not paid in full; null when none is"
    )


class Receivables(BaseModel):
    """A page of an account's receivables. `total_*` add up the page's contracts, `account_*` all the
    account's contracts the caller may see; `lifetime_value` is what the account ever paid, on any
    contract."""

    items: list[Receivable]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")
    total_outstanding: CurrencyTotals
    total_overdue: CurrencyTotals
    account_outstanding: CurrencyTotals
    account_overdue: CurrencyTotals
    lifetime_value: CurrencyTotals


class ImportFieldError(BaseModel):
    field: str
    message: str


class OpportunityImportResult(BaseModel):
    row: int = Field(description="the row's 0-based position in the request's `rows`")
    external_id: str
    outcome: str = Field(description="created, existing (imported before under `external_id`) or rejected")
    opportunity_id: str | None = Field(description="the deal created or imported before; null when rejected")
    errors: list[ImportFieldError] = Field(description="why the row was rejected")


class OpportunityImportAnswer(BaseModel):
    created: int
    rejected: int
    results: list[OpportunityImportResult] = Field(description="one per row, in the request's order")


class ForecastRow(BaseModel):
    period: str | None = Field(default=None, description='"2026-11" by month, "2026-Q4" by quarter')
    group: str | None = Field(default=None, description="the owner id or the team, as grouped")
    currency: str | None = None
    pipeline: MoneyOut | None = Field(default=None, description="open deals not omitted from the forecast")
    weighted: MoneyOut | None = Field(default=None, description="open deals times their stage's probability")
    commit: MoneyOut | None = Field(default=None, description="open deals in the commit category")
    best_case: MoneyOut | None = Field(default=None, description="open deals in the commit or best_case category")
    closed_won: MoneyOut | None = None
    open_count: int | None = None
    won_count: int | None = None


class Forecast(BaseModel):
    period: str = Field(description="month or quarter")
    group_by: str = Field(description="owner or team")
    rows: list[ForecastRow] = Field(description="one per period, group and currency")


class Target(BaseModel):
    """A sales target of an owner or a team for a month or a quarter (`ETag` carries its `version`)."""

    id: str
    owner_id: str | None = Field(default=None, description="the owner the target is for; null for a team's target")
    team: str | None = Field(default=None, description="the team whose target it is, or the owner's team")
    period: str | None = Field(default=None, description='"2026-12" (a month) or "2026-Q4" (a quarter)')
    amount: MoneyOut | None = None
    set_by: str | None = Field(default=None, description="who set the current amount")
    created_at: Time = None
    updated_at: Time = None
    version: int | None = None


class AttainmentRow(BaseModel):
    period: str | None = Field(default=None, description='"2026-11" by month, "2026-Q4" by quarter')
    group: str | None = Field(default=None, description="the owner id or the team, as grouped")
    currency: str | None = None
    target: MoneyOut | None = Field(
        default=None, description="null when the group has no target for the period in this currency"
    )
    closed_won: MoneyOut | None = Field(default=None, description="deals won in the period (zero when none)")
    attainment: str | None = Field(
        default=None, description='closed_won / target with 4 places ("1.0250" is 102.5 %); null without a target'
    )
    commit: MoneyOut | None = Field(default=None, description="open deals in the commit category")
    weighted: MoneyOut | None = Field(default=None, description="open deals times their stage's probability")


class Attainment(BaseModel):
    period: str = Field(description="month or quarter")
    group_by: str = Field(description="owner or team")
    rows: list[AttainmentRow] = Field(description="one per period, group and currency")


class WinStatistics(BaseModel):
    owner_id: str | None = Field(description="null in the overall rows")
    currency: str
    won_amount: MoneyOut | None = Field(
        default=None, description="shown as the caller sees deals' amount; left out without a grant to read deals"
    )
    won_count: int
    lost_count: int
    win_rate: str = Field(description='won / (won + lost) as a decimal string with 4 places, e.g. "0.6315"')


class WinStatisticsReport(BaseModel):
    overall: list[WinStatistics] = Field(description="one per currency")
    by_owner: list[WinStatistics] = Field(description="one per owner and currency")
