"""Report use cases: read the read models within the caller's record scope and the filters, then
let the pure functions of `domain` do the arithmetic."""

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.money import parse_currency
from crm_platform.pagination import NOT_ISSUED, decode_cursor, encode_cursor, page_limit
from crm_platform.principal import current_scope, scope_clause
from crm_platform.timeutil import as_utc, utcnow
from sqlalchemy import ColumnElement, FromClause, Select, Subquery, Table, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from analytics import domain
from analytics import repository as repo

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class ReportFilter:
    period_from: datetime | None = None
    period_to: datetime | None = None
    owner_id: str = ""
    team: str = ""
    source: str = ""
    currency: str = ""

    def validated(self, default_currency: str) -> "ReportFilter":
        if self.period_from and self.period_to and self.period_from >= self.period_to:
            raise ValidationFailed([FieldError("filter.period_to", "must be after period_from")])
        currency = parse_currency(self.currency or default_currency, field="filter.currency")
        return ReportFilter(self.period_from, self.period_to, self.owner_id, self.team, self.source, currency)


@dataclass(frozen=True, slots=True)
class CustomerValueRow:
    account_id: str
    account_name: str
    owner_id: str
    team: str
    won_amount: Decimal
    paid_amount: Decimal
    churn_risk: str
    reasons: list[domain.ChurnReason]
    last_activity_at: datetime | None


@dataclass(frozen=True, slots=True)
class CustomerValuePage:
    rows: list[CustomerValueRow]
    next_cursor: str


def _period(column: Any, f: ReportFilter) -> list[ColumnElement[bool]]:
    conditions = []
    if f.period_from is not None:
        conditions.append(column >= f.period_from)
    if f.period_to is not None:
        conditions.append(column < f.period_to)
    return conditions


def _won_in_period(deals: Table, f: ReportFilter) -> list[ColumnElement[bool]]:
    """Deals won in the period by the date they were won (`close_date`, which sales may back-date and
    counts the win's attainment by), a date being in the period when it begins in it (00:00 UTC:
    `domain.first_day_from`); a deal projected without that date by when the win was recorded."""
    dated: list[ColumnElement[bool]] = [deals.c.close_date.is_not(None)]
    if f.period_from is not None:
        dated.append(deals.c.close_date >= domain.first_day_from(f.period_from))
    if f.period_to is not None:
        dated.append(deals.c.close_date < domain.first_day_from(f.period_to))
    recorded = [deals.c.close_date.is_(None), *_period(deals.c.closed_at, f)]
    return [deals.c.status == domain.WON, or_(and_(*dated), and_(*recorded))]


def _in_scope(records: FromClause) -> ColumnElement[bool]:
    """The caller's record scope on `records`' own owner_id, team and region columns."""
    # scope_clause reads only those columns, which a subquery can carry as well as a table.
    return scope_clause(cast(Table, records), current_scope())


def _owned(records: FromClause, f: ReportFilter) -> list[ColumnElement[bool]]:
    """The caller's record scope plus the owner and team filters."""
    conditions = [_in_scope(records)]
    if f.owner_id:
        conditions.append(records.c.owner_id == f.owner_id)
    if f.team:
        conditions.append(records.c.team == f.team)
    return conditions


def _activity_records() -> Subquery:
    """Activities with a scope, which they do not carry: an activity is its actor's own (as the
    accounts service has it), in the team and region of the lead or account it was logged on. One
    whose lead or account is not known yet has neither, so only an unlimited scope counts it."""
    a, lead, account = repo.activities, repo.leads, repo.accounts
    return (
        select(
            a.c.actor_id.label("owner_id"),
            func.coalesce(lead.c.team, account.c.team, "").label("team"),
            func.coalesce(lead.c.region, account.c.region, "").label("region"),
            a.c.occurred_at,
        )
        .select_from(a.outerjoin(lead, lead.c.id == a.c.lead_id).outerjoin(account, account.c.id == a.c.account_id))
        .subquery("activity_records")
    )


@dataclass(frozen=True, slots=True)
class _Completeness:
    """The records of an entity whose key fields make its data completeness: `table`'s rows where
    `counted` holds (and the report's own scope, owner, team and period)."""

    entity: str
    table: Table
    key_fields: tuple[str, ...]
    counted: tuple[ColumnElement[bool], ...] = ()


def _completeness_entities() -> tuple[_Completeness, ...]:
    """Leads, accounts, contacts and deals, each by its own owner, team, region and creation time.
    A deleted contact is a tombstone, left out; so is a deal projected before its key fields were
    kept (until its next event or a rebuild), and an account deleted or merged into another (its
    survivor is the customer's record now, as in customer value)."""
    ac = repo.accounts
    return (
        _Completeness("lead", repo.leads, domain.LEAD_KEY_FIELDS),
        _Completeness("account", ac, domain.ACCOUNT_KEY_FIELDS, (ac.c.merged_into_id == "", ac.c.deleted.is_(False))),
        _Completeness("contact", repo.contacts, domain.CONTACT_KEY_FIELDS, (repo.contacts.c.deleted.is_(False),)),
        _Completeness(
            "opportunity",
            repo.opportunities,
            domain.OPPORTUNITY_KEY_FIELDS,
            (repo.opportunities.c.completeness.is_not(None),),
        ),
    )


def _history(raw: Sequence[dict[str, Any]] | None) -> tuple[domain.StageVisit, ...]:
    def parse(text: str | None) -> datetime | None:
        return as_utc(datetime.fromisoformat(text)) if text else None

    return tuple(
        domain.StageVisit(entry["stage"], parse(entry.get("entered_at")), parse(entry.get("exited_at")))
        for entry in raw or ()
    )


def _pipeline_stages(raw: Sequence[dict[str, Any]] | None) -> list[domain.PipelineStage] | None:
    """The stages `rm_pipelines` holds in order; None for a pipeline it does not hold."""
    if raw is None:
        return None
    return [
        domain.PipelineStage(stage["key"], position, stage.get("outcome") or domain.OPEN)
        for position, stage in enumerate(raw)
    ]


def _utc(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


class Reports:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        reporting_currency: str,
        churn_policy: domain.ChurnPolicy,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.reporting_currency = reporting_currency
        self.churn_policy = churn_policy
        self.clock = clock

    def _filter(self, f: ReportFilter) -> ReportFilter:
        return f.validated(self.reporting_currency)

    # ------------------------------------------------------------------------------------ funnel

    async def sales_funnel(self, f: ReportFilter, pipeline_id: str = "") -> domain.Funnel:
        """Of one pipeline (`pipeline_id`): its open stages in its order, as its latest event gave
        them (a deleted one's last), the default pipeline's order for one no event told of. Across
        pipelines: the default pipeline's stages, then others as they first appear."""
        f = self._filter(f)
        o = repo.opportunities
        conditions = [*_owned(o, f), *_period(o.c.created_at, f)]
        if pipeline_id:
            conditions.append(o.c.pipeline_id == pipeline_id)
        if f.source:
            from_source = select(repo.leads.c.id).where(repo.leads.c.source == f.source)
            converted = select(repo.leads.c.converted_opportunity_id).where(repo.leads.c.source == f.source)
            conditions.append(or_(o.c.source_lead_id.in_(from_source), o.c.id.in_(converted)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(o).where(*conditions))).all()
            stages = (
                domain.funnel_stages(_pipeline_stages(await repo.pipeline_stages(conn, pipeline_id)))
                if pipeline_id
                else domain.DEFAULT_FUNNEL_STAGES
            )
        deals = [
            domain.Deal(
                id=row.id,
                stage=row.stage,
                status=row.status,
                amount=row.amount,
                currency=row.currency,
                created_at=as_utc(row.created_at),
                closed_at=_utc(row.closed_at),
                history=_history(row.history),
            )
            for row in rows
            if row.created_at is not None
        ]
        return domain.sales_funnel(deals, f.currency, stages)

    # ------------------------------------------------------------------------------ lead sources

    async def lead_sources(self, f: ReportFilter, *, by_campaign: bool) -> list[domain.LeadSourceRow]:
        f = self._filter(f)
        lead_table, o = repo.leads, repo.opportunities
        conditions = [*_owned(lead_table, f), *_period(lead_table.c.created_at, f)]
        if f.source:
            conditions.append(lead_table.c.source == f.source)
        async with self.engine.connect() as conn:
            lead_rows = (await conn.execute(select(lead_table).where(*conditions))).all()
            selected = select(lead_table.c.id).where(*conditions)
            converted = select(lead_table.c.converted_opportunity_id).where(*conditions)
            # A lead in scope does not bring the deal it became into scope: its revenue counts only
            # for a caller who may see that deal.
            won_rows = (
                await conn.execute(
                    select(o.c.id, o.c.source_lead_id, o.c.amount, o.c.currency).where(
                        _in_scope(o),
                        o.c.status == domain.WON,
                        or_(o.c.source_lead_id.in_(selected), o.c.id.in_(converted)),
                    )
                )
            ).all()
            campaign_ids = {row.campaign_id for row in lead_rows if row.campaign_id}
            campaign_rows = (
                (await conn.execute(select(repo.campaigns).where(repo.campaigns.c.id.in_(campaign_ids)))).all()
                if by_campaign and campaign_ids
                else []
            )
            # Unless the report is narrowed to some leads (an owner, a team, a source), every campaign
            # in scope that ran in the period has its row, one that brought no lead too.
            running = (
                [
                    row
                    for row in await conn.execute(select(repo.campaigns).where(_in_scope(repo.campaigns)))
                    if domain.ran_within(row.starts_on, row.ends_on, f.period_from, f.period_to)
                ]
                if by_campaign and not (f.owner_id or f.team or f.source)
                else []
            )
        leads = [
            domain.LeadFact(
                id=row.id,
                source=row.source,
                campaign_id=row.campaign_id,
                status=row.status,
                created_at=as_utc(row.created_at),
                first_contacted_at=_utc(row.first_contacted_at),
                converted_opportunity_id=row.converted_opportunity_id,
            )
            for row in lead_rows
            if row.created_at is not None
        ]
        won = [domain.WonDeal(row.id, row.source_lead_id, row.amount, row.currency) for row in won_rows]
        campaigns = {
            row.id: domain.CampaignCost(row.id, row.name, row.cost, row.currency) for row in [*campaign_rows, *running]
        }
        return domain.lead_source_report(
            leads,
            won,
            f.currency,
            by_campaign=by_campaign,
            campaigns=campaigns,
            listed_campaigns=[row.id for row in running],
        )

    # --------------------------------------------------------------------------- rep performance

    async def rep_performance(self, f: ReportFilter) -> list[domain.RepRow]:
        """Every figure counts only the caller's in-scope records (by each record's own owner, team
        and region), under the record's owner and team: a rep appears wherever they have in-scope
        records, and a rep who moved teams appears under each team with that team's records only.
        Data completeness is the mean share of filled key fields of the rep's records created in the
        period, whichever entity (leads, accounts, contacts, deals), as the data-completeness
        report counts them."""
        f = self._filter(f)
        tallies: dict[tuple[str, str], domain.RepTally] = {}
        async with self.engine.connect() as conn:
            a = _activity_records()
            for owner_id, team, count in await conn.execute(
                select(a.c.owner_id, a.c.team, func.count())
                .where(*_owned(a, f), *_period(a.c.occurred_at, f))
                .group_by(a.c.owner_id, a.c.team)
            ):
                domain.tally_for(tallies, owner_id, team).activities += int(count)
            t = repo.tasks
            for owner_id, team, status in await conn.execute(
                select(t.c.owner_id, t.c.team, t.c.status).where(*_owned(t, f), *_period(t.c.due_at, f))
            ):
                domain.count_task(domain.tally_for(tallies, owner_id, team), status)
            o = repo.opportunities
            for owner_id, team, amount, currency in await conn.execute(
                select(o.c.owner_id, o.c.team, o.c.amount, o.c.currency).where(*_owned(o, f), *_won_in_period(o, f))
            ):
                tally = domain.tally_for(tallies, owner_id, team)
                tally.won_count += 1
                tally.won_amount += domain.money_sum([(amount, currency)], f.currency)
            c, tk = repo.csat_responses, repo.tickets
            for owner_id, team, score in await conn.execute(
                select(tk.c.owner_id, tk.c.team, c.c.score)
                .select_from(c.join(tk, tk.c.id == c.c.ticket_id))
                .where(*_owned(tk, f), *_period(c.c.submitted_at, f))
            ):
                domain.tally_for(tallies, owner_id, team).csat_scores.append(int(score))
            for entity in _completeness_entities():
                table = entity.table
                for owner_id, team, share in await conn.execute(
                    select(table.c.owner_id, table.c.team, table.c.completeness).where(
                        *_owned(table, f), *_period(table.c.created_at, f), *entity.counted
                    )
                ):
                    domain.tally_for(tallies, owner_id, team).completeness.append(Decimal(share))
        return domain.rep_rows(tallies.values())

    # ----------------------------------------------------------------------------------- service

    async def service(self, f: ReportFilter) -> domain.ServiceSummary:
        f = self._filter(f)
        tk, c = repo.tickets, repo.csat_responses
        owned = _owned(tk, f)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(tk).where(*owned, *_period(tk.c.created_at, f)))).all()
            scores = (
                await conn.execute(
                    select(c.c.score)
                    .select_from(c.join(tk, tk.c.id == c.c.ticket_id))
                    .where(*owned, *_period(c.c.submitted_at, f))
                )
            ).scalars()
            score_list = [int(score) for score in scores]
        tickets = [
            domain.TicketFact(
                id=row.id,
                priority=row.priority,
                status=row.status,
                created_at=as_utc(row.created_at),
                first_response_due_at=_utc(row.first_response_due_at),
                first_responded_at=_utc(row.first_responded_at),
                resolution_due_at=_utc(row.resolution_due_at),
                resolved_at=_utc(row.resolved_at),
                first_response_breached=row.first_response_breached,
                resolution_breached=row.resolution_breached,
            )
            for row in rows
            if row.created_at is not None
        ]
        return domain.service_summary(tickets, score_list, self.clock())

    # ---------------------------------------------------------------------------- customer value

    async def customer_value(
        self, f: ReportFilter, *, at_risk_only: bool, limit: int, cursor: str, by_name: bool = False
    ) -> CustomerValuePage:
        """The accounts ranked by value (paid, then won), or `by_name`: the ranking itself would
        tell a caller not shown the amounts which accounts paid more."""
        f = self._filter(f)
        size = page_limit(limit)
        after = self._cursor(cursor)
        ac = repo.accounts
        listed = (*_owned(ac, f), ac.c.merged_into_id == "", ac.c.deleted.is_(False))
        async with self.engine.connect() as conn:
            accounts = (await conn.execute(select(ac).where(*listed))).all()
            # Each figure is read for the accounts of this same query, as a subquery: a list of their
            # ids would be one bind parameter each, more than a database takes in a large scope.
            facts = await self._account_facts(conn, select(ac.c.id).where(*listed), f)
        now = self.clock()
        rows = []
        for account in accounts:
            fact = facts[account.id]
            last = max(
                (moment for moment in (_utc(account.last_activity_at), fact["last_activity"]) if moment is not None),
                default=None,
            )
            health = domain.AccountHealth(
                account_id=account.id,
                created_at=_utc(account.created_at),
                last_activity_at=last,
                overdue_installments=fact["overdue_count"],
                overdue_amount=fact["overdue_amount"],
                currency=f.currency,
                open_urgent_tickets=fact["urgent"],
                csat_scores=tuple(fact["scores"]),
            )
            reasons = domain.churn_reasons(health, self.churn_policy, now)
            if at_risk_only and not reasons:
                continue
            rows.append(
                CustomerValueRow(
                    account_id=account.id,
                    account_name=account.name,
                    owner_id=account.owner_id,
                    team=account.team,
                    won_amount=fact["won"],
                    paid_amount=fact["paid"],
                    churn_risk=domain.churn_risk(reasons),
                    reasons=reasons,
                    last_activity_at=last,
                )
            )
        rows.sort(key=_name_order if by_name else _value_order)
        start = 0 if after is None else domain.resume_at(after, [row.account_id for row in rows])
        page = rows[start : start + size]
        if len(rows) <= start + size:
            return CustomerValuePage(rows=page, next_cursor="")
        # The page's end by position and account, not by the amounts it is sorted on: a cursor is
        # readable by whoever holds it, and the caller may not be shown what the accounts paid.
        return CustomerValuePage(rows=page, next_cursor=encode_cursor([start + size, page[-1].account_id]))

    @staticmethod
    def _cursor(cursor: str) -> tuple[int, str] | None:
        if not cursor:
            return None
        try:
            position, account_id = decode_cursor(cursor)
            if not (type(position) is int and position > 0 and isinstance(account_id, str)):
                raise TypeError("not a cursor of this list")  # as `next_cursor` above writes them
            return position, account_id
        except (ValidationFailed, TypeError, ValueError):
            raise ValidationFailed([FieldError("cursor", NOT_ISSUED)]) from None

    async def _account_facts(
        self, conn: AsyncConnection, listed: Select[tuple[str]], f: ReportFilter
    ) -> defaultdict[str, dict[str, Any]]:
        """The figures of the accounts `listed` selects, by account id, zero for one without any. Each
        query selects the accounts anew: one that came into scope since the list was read may have
        figures here too, which nobody reads."""
        facts: defaultdict[str, dict[str, Any]] = defaultdict(
            lambda: {
                "won": Decimal(0),
                "paid": Decimal(0),
                "last_activity": None,
                "overdue_count": 0,
                "overdue_amount": Decimal(0),
                "urgent": 0,
                "scores": [],
            }
        )
        # The account being in scope is not enough: each figure counts only the caller's in-scope
        # records of it (a payment and an installment by their contract, a CSAT response by its
        # ticket), as the 360 view filters each of its parts and analytics obey the same rules
        # (SPEC §5, §9). The owner and team filters choose accounts, not records. The activity
        # timeline is not limited: it is readable with the account, like its last_activity_at.
        o, p, k = repo.opportunities, repo.payments, repo.contracts
        for account_id, amount, currency in await conn.execute(
            select(o.c.account_id, o.c.amount, o.c.currency).where(
                o.c.account_id.in_(listed), _in_scope(o), *_won_in_period(o, f)
            )
        ):
            facts[account_id]["won"] += domain.money_sum([(amount, currency)], f.currency)
        for account_id, amount, currency in await conn.execute(
            select(k.c.account_id, p.c.amount, p.c.currency)
            .select_from(p.join(k, k.c.id == p.c.contract_id))
            .where(k.c.account_id.in_(listed), _in_scope(k), *_period(p.c.received_at, f))
        ):
            facts[account_id]["paid"] += domain.money_sum([(amount, currency)], f.currency)
        a = repo.activities
        for account_id, latest in await conn.execute(
            select(a.c.account_id, func.max(a.c.occurred_at)).where(a.c.account_id.in_(listed)).group_by(a.c.account_id)
        ):
            facts[account_id]["last_activity"] = _utc(latest)
        await self._overdue(conn, facts, listed, f.currency)
        tk = repo.tickets
        for account_id, count in await conn.execute(
            select(tk.c.account_id, func.count())
            .where(
                tk.c.account_id.in_(listed),
                _in_scope(tk),
                tk.c.priority == domain.URGENT,
                tk.c.status.not_in(domain.TICKET_DONE_STATUSES),
            )
            .group_by(tk.c.account_id)
        ):
            facts[account_id]["urgent"] = int(count)
        c = repo.csat_responses
        for account_id, score in await conn.execute(
            select(func.coalesce(func.nullif(c.c.account_id, ""), tk.c.account_id), c.c.score)
            .select_from(c.outerjoin(tk, tk.c.id == c.c.ticket_id))
            .where(
                or_(c.c.account_id.in_(listed), and_(c.c.account_id == "", tk.c.account_id.in_(listed))),
                _in_scope(tk),
            )
        ):
            facts[account_id]["scores"].append(int(score))
        return facts

    async def _overdue(
        self, conn: AsyncConnection, facts: dict[str, dict[str, Any]], listed: Select[tuple[str]], currency: str
    ) -> None:
        i, k, al = repo.installments, repo.contracts, repo.allocations
        allocated = (
            select(al.c.installment_id, func.sum(al.c.amount).label("total")).group_by(al.c.installment_id).subquery()
        )
        account = func.coalesce(func.nullif(i.c.account_id, ""), k.c.account_id)
        rows = await conn.execute(
            select(account.label("account_id"), i.c.amount, i.c.paid, i.c.currency, allocated.c.total)
            .select_from(
                i.outerjoin(k, k.c.id == i.c.contract_id).outerjoin(allocated, allocated.c.installment_id == i.c.id)
            )
            .where(
                i.c.overdue.is_(True),
                account.in_(listed),
                _in_scope(k),
                # A terminated contract's installments are written off, however late they were (one of
                # a contract not projected yet still counts).
                k.c.status.is_distinct_from(domain.CONTRACT_TERMINATED),
            )
        )
        for account_id, amount, paid_before_plan, code, total in rows:
            owed = domain.outstanding(Decimal(amount), Decimal(paid_before_plan), Decimal(total or 0))
            if owed > 0:
                facts[account_id]["overdue_count"] += 1
                if code == currency:
                    facts[account_id]["overdue_amount"] += owed

    # ------------------------------------------------------------------------- data completeness

    async def data_completeness(self, f: ReportFilter) -> list[domain.CompletenessRow]:
        """A row per entity (lead, account, contact, opportunity), one without records too."""
        f = self._filter(f)
        result = []
        async with self.engine.connect() as conn:
            for entity in _completeness_entities():
                table = entity.table
                filled = (
                    await conn.execute(
                        select(table.c.filled).where(
                            *_owned(table, f), *_period(table.c.created_at, f), *entity.counted
                        )
                    )
                ).scalars()
                result.append(
                    domain.completeness_row(entity.entity, [list(value) for value in filled], entity.key_fields)
                )
        return result


def _value_order(row: CustomerValueRow) -> tuple[Decimal, Decimal, str]:
    return -row.paid_amount, -row.won_amount, row.account_id


def _name_order(row: CustomerValueRow) -> tuple[str, str]:
    return row.account_name.casefold(), row.account_id
