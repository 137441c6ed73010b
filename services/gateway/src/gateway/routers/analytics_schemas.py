"""The JSON answers of the report routes (`gateway.routers.analytics`) as the OpenAPI document shows them.

Documentation only: the routes name these models in `responses=`, which FastAPI puts in the
OpenAPI document without validating any answer (the same routes answer CSV with `format=csv`).
The routes print the analytics service's messages with `analytics.plain`; these models follow it:
counts are numbers (not the decimal strings of protobuf's JSON mapping), a rate is a decimal
string between "0" and "1" with 4 places, a duration or an average a decimal string with 2, each
null when there is nothing to divide by.

Field rules apply to the money only: it is shown as the caller sees the field it is summed from
(deal, campaign or contract amounts), so a money field is left out for a caller who may not read
that field, and its `amount` is `"***"` when masked; it is null when the report has no such amount.
Money sums count only the records in the report currency (`currency`).
What would give that money away (an ROI, the detail of an overdue-installments reason) is left out
unless the caller sees the money in clear.
"""

from typing import Literal

from pydantic import BaseModel, Field

from gateway.conventions import MoneyOut, Time

Rate = str | None  # "0" to "1" with 4 places ("0.6667"); null when there is nothing to divide by
Mean = str | None  # a mean duration or CSAT score with 2 places ("3.50"); null when there is nothing to average


class FunnelStage(BaseModel):
    stage: str = Field(description="an open stage of the pipeline, or won or lost")
    count: int = Field(description="deals now in this open stage, or closed won or lost")
    amount: MoneyOut | None = Field(default=None, description="the amount of those deals")
    reached: int = Field(description="deals that ever entered this stage")
    conversion_to_next: Rate = Field(
        description="share of the deals that reached this stage that reached the next open stage or won; "
        "null for won and lost"
    )
    mean_days_in_stage: Mean = Field(description="mean days spent in this stage by the deals that left it")


class SalesFunnel(BaseModel):
    """The deals created in the period, by stage."""

    stages: list[FunnelStage] = Field(description="the open stages in pipeline order, then won and lost")
    opportunities: int = Field(description="deals created in the period")
    open_count: int
    won_count: int
    lost_count: int
    win_rate: Rate = Field(description="won / (won + lost)")
    won_amount: MoneyOut | None = None
    average_deal_size: MoneyOut | None = Field(
        default=None, description="won amount per won deal; null without a won deal in the report currency"
    )
    mean_sales_cycle_days: Mean = Field(description="mean days from creation to won, over the won deals")


class LeadSourceRow(BaseModel):
    key: str = Field(description='the source (`group_by=source`) or the campaign id (`group_by=campaign`; "" for none)')
    name: str = Field(description='the campaign\'s name (`group_by=campaign`); "" otherwise')
    leads: int = Field(description="leads created in the period")
    contacted: int = Field(description="of them, leads contacted at least once")
    contacted_rate: Rate = Field(description="contacted / leads")
    converted: int = Field(description="of them, leads converted")
    converted_rate: Rate = Field(description="converted / leads")
    mean_first_contact_hours: Mean = Field(description="mean hours from creation to first contact")
    won_revenue: MoneyOut | None = Field(default=None, description="the amount of won deals converted from these leads")
    cost: MoneyOut | None = Field(
        default=None, description="the campaign's cost (`group_by=campaign`); null otherwise or in another currency"
    )
    roi: str | None = Field(
        default=None,
        description="(won_revenue - cost) / cost with 4 places, any sign; null without a cost; "
        "left out unless both amounts are shown in clear",
    )


class LeadSourceReport(BaseModel):
    rows: list[LeadSourceRow] = Field(description="by key")


class RepPerformanceRow(BaseModel):
    """A rep's work in one team (a rep who moved teams has a row per team)."""

    owner_id: str
    team: str
    activities: int = Field(description="activities the rep logged (calls, visits, notes, lead follow-ups)")
    tasks: int = Field(description="tasks due in the period, cancelled ones not counted")
    tasks_completed: int
    task_completion_rate: Rate = Field(description="tasks_completed / tasks")
    won_count: int = Field(description="deals the rep won in the period, by their close date")
    won_amount: MoneyOut | None = None
    csat_responses: int = Field(description="CSAT responses to tickets assigned to the rep")
    csat_average: Mean = Field(description="mean CSAT score (1 to 5)")
    data_completeness: Rate = Field(
        description="mean share of filled key fields of the rep's leads, accounts, contacts and opportunities "
        "created in the period"
    )


class RepPerformanceReport(BaseModel):
    rows: list[RepPerformanceRow] = Field(description="by owner_id, then team")


class ServiceReport(BaseModel):
    """The tickets created in the period and the CSAT responses submitted in it."""

    tickets: int
    backlog: int = Field(description="tickets not resolved or closed (regardless of the period's end)")
    first_response_met: int
    first_response_breached: int
    first_response_compliance: Rate = Field(description="met / (met + breached)")
    resolution_met: int
    resolution_breached: int
    resolution_compliance: Rate = Field(description="met / (met + breached)")
    mean_first_response_minutes: Mean
    mean_resolution_hours: Mean
    csat_responses: int
    csat_average: Mean = Field(description="mean CSAT score (1 to 5)")
    csat_satisfied_rate: Rate = Field(description="share of responses scoring 4 or 5")
    open_urgent: int = Field(description='open tickets of priority "urgent"')


class ChurnReason(BaseModel):
    code: str = Field(description="NO_ACTIVITY, OVERDUE_INSTALLMENTS, OPEN_URGENT_TICKETS or LOW_CSAT")
    detail: str | None = Field(
        default=None,
        description="what was found; left out of OVERDUE_INSTALLMENTS (it states the overdue amount) "
        "unless contract amounts are shown in clear",
    )


class CustomerValueRow(BaseModel):
    account_id: str
    account_name: str
    owner_id: str
    team: str
    won_amount: MoneyOut | None = Field(
        default=None, description="the amount of the account's deals won in the period, by their close date"
    )
    paid_amount: MoneyOut | None = Field(default=None, description="payments received on the account's contracts")
    churn_risk: str = Field(description="low (no reason), medium (one reason) or high (two or more)")
    reasons: list[ChurnReason]
    last_activity_at: Time


class CustomerValuePage(BaseModel):
    items: list[CustomerValueRow] = Field(
        description="by `ordered_by`: value (highest paid amount first, then won amount, then account id) or "
        "name (account name, then account id)"
    )
    ordered_by: Literal["value", "name"] = Field(
        description="value; name for a caller not shown both amounts in clear, to whom the ranking would tell "
        "which accounts paid more"
    )
    next_cursor: str | None = Field(description="the `cursor` of the next page; null on the last")


class KeyFieldFill(BaseModel):
    field: str = Field(description="a key field of the entity")
    filled: int = Field(description="records with the field filled")
    rate: Rate = Field(description="filled / records")


class CompletenessRow(BaseModel):
    entity: str = Field(description="lead, account, contact or opportunity: a row of each, in that order")
    records: int = Field(description="records created in the period")
    completeness: Rate = Field(description="mean share of filled key fields per record")
    fields: list[KeyFieldFill]


class DataCompleteness(BaseModel):
    rows: list[CompletenessRow]
