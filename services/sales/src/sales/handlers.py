"""Use cases of the sales service: one method per command, each in one unit of work that loads,
decides with `domain`, writes, and appends its events to the outbox.

The caller (principal and record scope) comes from `crm_platform.principal`; jobs and consumers
run as the system with full scope. Records outside the caller's scope read as NotFound.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

from crm.sales.v1 import events_pb2, sales_pb2
from crm_platform import custom_fields as cf
from crm_platform import idempotency
from crm_platform.audit import audit_of_job
from crm_platform.changes import Change
from crm_platform.cloudevents import spec_of
from crm_platform.custom_field_filters import custom_clauses, load_filters
from crm_platform.custom_fields_service import load_definitions
from crm_platform.db import insert_ignore, lock_all_for_transaction, lock_for_transaction
from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    FieldError,
    NotFound,
    PermissionDenied,
    StaleVersion,
    ValidationFailed,
    missing_reference,
)
from crm_platform.ids import new_id
from crm_platform.money import Money
from crm_platform.outbox import Transaction, UnitOfWork
from crm_platform.pagination import keyset_page, next_cursor, page_limit, parse_sort
from crm_platform.principal import (
    ALL_RECORDS,
    Principal,
    RecordScope,
    current_principal,
    current_scope,
    scope_clause,
)
from crm_platform.timeutil import as_utc, utcnow
from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from sales import domain as d
from sales import repository as r
from sales import views as v

DEFAULT_PIPELINE_ID = "default"
# The overdue timer, by the name its audit records give it (see jobs).
OVERDUE_JOB = "overdue-installments"
OPPORTUNITY_ENTITY = "opportunity"
# The columns a record scope reads (SPEC §9): who owns a record, in which team and region.
OWNERSHIP = ("owner_id", "team", "region")
DISCOUNT_FIELD = "line_items.discount_percent"
# The columns each list sorts by (`sort=`, `-` for descending), the first by default, newest first.
QUOTE_SORTS = ("created_at", "updated_at")
PAYMENT_SORTS = ("created_at", "received_at")
INVOICE_SORTS = ("requested_at",)
TARGET_SORTS = ("created_at", "updated_at")
# What a contract's update may change (its amount, account and deal are what it was made from).
CONTRACT_EDITABLE = ("title", "starts_on", "ends_on")
# The `reason` of the events a change of another record causes (a quote following its deal; a deal,
# contract or invoice its account): that change's event type.
OPPORTUNITY_UPDATED = spec_of(events_pb2.OpportunityUpdated).type
OPPORTUNITY_ASSIGNED = spec_of(events_pb2.OpportunityAssigned).type
ACCOUNT_MERGED = "crm.accounts.account.merged"
ACCOUNT_TRANSFERRED = "crm.accounts.account.transferred"


@dataclass(frozen=True, slots=True)
class LineItemIn:
    product_id: str
    product_name: str
    product_line: str
    quantity: Decimal
    unit_price: Money
    discount_percent: Decimal

    def to_domain(self) -> d.LineItem:
        return d.LineItem(
            self.product_id, self.product_name, self.product_line, self.quantity, self.unit_price, self.discount_percent
        )


@dataclass(slots=True)
class OpportunityIn:
    """What a new opportunity is made of (the API's and the import's common shape)."""

    account_id: str
    name: str
    pipeline_id: str = ""
    stage: str = ""
    primary_contact_id: str = ""
    amount: Money | None = None
    expected_close_date: date | None = None
    owner_id: str = ""
    team: str = ""
    region: str = ""
    source_lead_id: str = ""
    campaign_id: str = ""
    line_items: list[LineItemIn] = field(default_factory=list)
    next_step: str = ""
    product_line: str = ""
    tags: list[str] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)
    forecast_category: d.ForecastCategory | None = None


@dataclass(frozen=True, slots=True)
class InvoicePosting:
    """What an ERP's invoice posting did: the invoice after it, as it was before (None: the posting
    raised it), and whether it changed anything (a redelivery, or its reference posted again, does not)."""

    invoice: sales_pb2.Invoice
    previous: sales_pb2.Invoice | None
    changed: bool


@dataclass(slots=True)
class ImportRow:
    external_id: str
    opportunity: OpportunityIn
    close_date: date | None = None
    lost_reason: str = ""
    engaged_at: datetime | None = None
    refusal: str = ""  # the caller's reason to refuse the row unless it was imported before


@dataclass(frozen=True, slots=True)
class Page:
    limit: int = 0
    cursor: str = ""
    sort: str = ""


@dataclass(slots=True)
class PageOf:
    items: list[Any]
    next_cursor: str


@dataclass(slots=True)
class ImportResult:
    row: int
    external_id: str
    outcome: str
    opportunity_id: str = ""
    errors: list[FieldError] = field(default_factory=list)


@dataclass(slots=True)
class ForecastQuery:
    quarter: bool = False
    by_team: bool = False
    from_date: date | None = None
    to_date: date | None = None
    owner_id: str = ""
    team: str = ""
    pipeline_id: str = ""


@dataclass(slots=True)
class OwnerStats:
    owner_id: str
    currency: str
    won_amount: Decimal
    won_count: int
    lost_count: int

    @property
    def win_rate(self) -> Decimal:
        return d.win_rate(self.won_count, self.lost_count)


@dataclass(slots=True)
class Receivables:
    items: list[sales_pb2.Receivable]
    next_cursor: str
    total_outstanding: dict[str, Decimal]
    total_overdue: dict[str, Decimal]
    account: r.AccountTotals


def _check_discounts_replaceable(
    row: RowMapping, discounts_scope: RecordScope | None, resource: str, resources: str
) -> None:
    """New line items for a record that has discounts drop them: only who may set discounts, within
    the scope where they may (None: nowhere, PERMISSION_DENIED naming the field; a record out of
    that scope is NOT_FOUND, as one out of the caller's scope is)."""
    if discounts_scope is None:
        raise PermissionDenied(f"you may not set field '{DISCOUNT_FIELD}' of {resources}", field=DISCOUNT_FIELD)
    if not discounts_scope.allows(owner_id=row["owner_id"], team=row["team"], region=row["region"]):
        raise NotFound(resource, row["id"])


def _check_version(row: RowMapping, expected_version: int, resource: str) -> None:
    if expected_version and row["version"] != expected_version:
        raise StaleVersion(resource, row["id"], row["version"])


def _require(value: str, field_name: str) -> None:
    if not value.strip():
        raise ValidationFailed([FieldError(field_name, "is required")])


def _check_texts(values: dict[str, str], limit: int) -> None:
    """Text longer than its column, or that no column holds (NUL), is a 422 naming the field
    (PostgreSQL would refuse it: a 500)."""
    refused = d.check_texts(values, limit)
    if refused:
        raise ValidationFailed(refused)


def _check_pipeline(name: str, stages: Sequence[d.Stage]) -> None:
    _require(name, "name")
    _check_texts({"name": name.strip()}, d.NAME_LENGTH)
    d.validate_stages(stages)


# Idempotency keys are per caller (the principal's user id): another user's key of the same
# text is another request, and never answers with a record of theirs.
_idempotency_keys = idempotency.CallerKeys(r.idempotency_keys)


async def _claim(conn: AsyncConnection, *, operation: str, key: str, resource_id: str, now: datetime) -> str | None:
    """Claims the caller's `key` for the resource about to be created: None when it is ours, else
    the first resource's id (a concurrent first use waits on the row lock, then sees its result)."""
    return await _idempotency_keys.claim(conn, operation, key, resource_id, now)


async def _referenced(
    conn: AsyncConnection,
    table: Table,
    record_id: str,
    *,
    field_name: str,
    resource: str,
    scope: RecordScope | None = None,
    lock: bool = False,
) -> RowMapping:
    """A record a request's body names in `field_name`, within `scope`: one not there is a 422 naming
    the field (`missing_reference`), never the 404 of the record a path addresses."""
    row = await r.load(conn, table, record_id, scope=scope, lock=lock)
    if row is None:
        raise missing_reference(field_name, resource, record_id)
    return row


async def _refuse_if_deal_has_contract(
    conn: AsyncConnection, opportunity_id: str, message: Callable[[str], str]
) -> None:
    """409 HAS_CONTRACT, saying `message(contract id)`, when the deal has a contract: what the
    contract was made from stays."""
    contract_id = await conn.scalar(
        select(r.contracts.c.id).where(r.contracts.c.opportunity_id == opportunity_id).limit(1)
    )
    if contract_id is not None:
        raise Conflict(message(str(contract_id)), existing_id=str(contract_id), reason="HAS_CONTRACT")


def _line_currency(line_items: Sequence[dict[str, str]]) -> str | None:
    """The currency of stored line items (validated to be one), None without items."""
    return next((item["currency"] for item in line_items), None)


def _collision_lock(account_id: str, product_line_key: str) -> str:
    """The lock that serialises anti-collision checks of one account and product line across
    replicas, however each spells the line (PostgreSQL; SQLite has a single writer anyway)."""
    return f"opp:{account_id}:{product_line_key}"


def _colliding(
    owner_id: str, open_deals: Iterable[RowMapping | dict[str, Any]], *, override: bool
) -> d.OpenDeal | None:
    """`domain.check_collision` of a deal about to be open under `owner_id` among `open_deals` of
    its account and product line (rows, or an import's new deals), for the caller: a deal is named
    with its owner only to a caller who may read it."""
    scope = current_scope()
    return d.check_collision(
        owner_id=owner_id,
        open_deals=[
            d.OpenDeal(
                deal["id"],
                deal["owner_id"],
                deal["name"],
                scope.allows(owner_id=deal["owner_id"], team=deal["team"], region=deal["region"]),
            )
            for deal in open_deals
        ],
        override=override,
        caller_roles=current_principal().roles,
    )


def _stamp(value: datetime) -> str:
    return as_utc(value).isoformat()


def _category_is(*categories: d.ForecastCategory) -> Any:
    """SQL: the deal's forecast category is one of `categories` — the explicit one, else the one
    its stage probability gives (the thresholds of `domain.default_forecast_category`). Plain
    boolean terms, so PostgreSQL evaluates no CASE per aggregate."""
    o = r.opportunities
    derived = {
        d.ForecastCategory.COMMIT: o.c.probability_bp >= 9000,
        d.ForecastCategory.BEST_CASE: and_(o.c.probability_bp >= 5000, o.c.probability_bp < 9000),
        d.ForecastCategory.PIPELINE: o.c.probability_bp < 5000,
    }
    terms: list[ColumnElement[bool]] = [o.c.forecast_category.in_([c.value for c in categories])]
    terms += [and_(o.c.forecast_category == "", derived[c]) for c in categories if c in derived]
    return or_(*terms)


def _target_filters(
    *, from_date: date | None, to_date: date | None, owner_id: str, team: str
) -> list[ColumnElement[bool]]:
    """SQL: targets in the caller's scope whose period overlaps `from_date`..`to_date` (inclusive),
    of `owner_id` and `team` when given."""
    t = r.targets
    clauses = [scope_clause(t, current_scope())]
    if from_date:
        clauses.append(t.c.last_month >= d.month_key(from_date))
    if to_date:
        clauses.append(t.c.first_month <= d.month_key(to_date))
    if owner_id:
        clauses.append(t.c.owner_id == owner_id)
    if team:
        clauses.append(t.c.team == team)
    return clauses


class SalesHandlers:
    def __init__(
        self,
        uow: UnitOfWork,
        *,
        quote_thresholds: d.QuoteThresholds,
        contract_thresholds: d.ContractThresholds,
        default_currency: str = "CNY",
        import_max_rows: int = 5_000,
        clock: Callable[[], datetime] = utcnow,
        timezone: tzinfo = UTC,
    ) -> None:
        self.uow = uow
        self.engine = uow.engine
        self.quote_thresholds = quote_thresholds
        self.contract_thresholds = contract_thresholds
        self.default_currency = default_currency
        self.import_max_rows = import_max_rows
        self.clock = clock
        self.timezone = timezone

    def local_now(self) -> datetime:
        """Now on the business's calendar (`CRM_SALES_BUSINESS_TIMEZONE`): 1 December 07:00 in
        Shanghai is still 30 November in UTC."""
        return self.clock().astimezone(self.timezone)

    def today(self) -> date:
        return self.local_now().date()

    # ------------------------------------------------------------ pipelines

    async def create_pipeline(
        self, *, idempotency_key: str, name: str, stages: Sequence[d.Stage], is_default: bool
    ) -> sales_pb2.Pipeline:
        _check_pipeline(name, stages)
        principal = current_principal()
        async with self.uow.begin() as tx:
            pipeline_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="pipeline", key=idempotency_key, resource_id=pipeline_id, now=self.clock()
                )
                if existing:
                    return v.pipeline_proto(await self._pipeline_row(tx.conn, existing))
            if is_default:
                await self._demote_default(tx, pipeline_id, principal)
            values = {
                "id": pipeline_id,
                "name": name.strip(),
                "stages": [v.stage_json(s) for s in stages],
                "is_default": is_default,
                "created_at": self.clock(),
                "version": 1,
            }
            await tx.conn.execute(insert(r.pipelines).values(values))
            proto = v.pipeline_proto(values)
            tx.publish(events_pb2.PipelineCreated(pipeline=proto, actor=v.actor(principal)), key=pipeline_id)
            return proto

    async def update_pipeline(
        self, pipeline_id: str, *, expected_version: int, name: str, stages: Sequence[d.Stage], is_default: bool
    ) -> Change[sales_pb2.Pipeline]:
        _check_pipeline(name, stages)
        principal = current_principal()
        p, o = r.pipelines, r.opportunities
        async with self.uow.begin() as tx:
            row = await r.load(tx.conn, p, pipeline_id, lock=True)
            if row is None:
                raise NotFound("pipeline", pipeline_id)
            _check_version(row, expected_version, "pipeline")
            if row["is_default"] and not is_default:
                raise ValidationFailed([FieldError("is_default", "make another pipeline the default instead")])
            kept = {stage.key for stage in stages}
            used = await tx.conn.execute(
                select(o.c.stage, func.count())
                .where(o.c.pipeline_id == pipeline_id, o.c.status == d.OpportunityStatus.OPEN.value)
                .group_by(o.c.stage)
            )
            for stage_key, count in used:
                if stage_key not in kept:
                    raise Conflict(
                        f"stage {stage_key!r} still holds {count} open deals; move them first", reason="STAGE_IN_USE"
                    )
            if is_default:
                await self._demote_default(tx, pipeline_id, principal)
            values = {
                "name": name.strip(),
                "stages": [v.stage_json(stage) for stage in stages],
                "is_default": is_default,
                "version": row["version"] + 1,
            }
            await tx.conn.execute(update(p).where(p.c.id == pipeline_id).values(values))
            before = v.pipeline_domain(row)
            changed = [
                field_name
                for field_name, was, now in (
                    ("name", before.name, values["name"]),
                    ("stages", before.stages, tuple(stages)),
                    ("is_default", before.is_default, is_default),
                )
                if was != now
            ]
            # The weighted forecast uses the stage probability: open deals follow the new one.
            for stage in stages:
                await tx.conn.execute(
                    update(o)
                    .where(
                        o.c.pipeline_id == pipeline_id,
                        o.c.stage == stage.key,
                        o.c.status == d.OpportunityStatus.OPEN.value,
                        o.c.probability_bp != int(stage.probability * 100),
                    )
                    .values(probability_bp=int(stage.probability * 100))
                )
            proto = v.pipeline_proto({**row, **values})
            tx.publish(
                events_pb2.PipelineUpdated(pipeline=proto, changed_fields=changed, actor=v.actor(principal)),
                key=pipeline_id,
            )
            return Change(proto, v.pipeline_proto(row))

    async def delete_pipeline(self, pipeline_id: str, *, expected_version: int = 0) -> sales_pb2.Pipeline:
        """Deletes a pipeline no deal uses; returns it as it was (for the caller's audit trail)."""
        principal = current_principal()
        p, o = r.pipelines, r.opportunities
        async with self.uow.begin() as tx:
            row = await r.load(tx.conn, p, pipeline_id, lock=True)
            if row is None:
                raise NotFound("pipeline", pipeline_id)
            _check_version(row, expected_version, "pipeline")
            if row["is_default"]:
                raise Conflict("the default pipeline cannot be deleted", reason="DEFAULT_PIPELINE")
            if await tx.conn.scalar(select(o.c.id).where(o.c.pipeline_id == pipeline_id).limit(1)) is not None:
                raise Conflict(f"pipeline {pipeline_id} has deals", reason="PIPELINE_IN_USE")
            await tx.conn.execute(delete(p).where(p.c.id == pipeline_id))
            deleted = v.pipeline_proto(row)
            tx.publish(events_pb2.PipelineDeleted(pipeline=deleted, actor=v.actor(principal)), key=pipeline_id)
            return deleted

    async def get_pipeline(self, pipeline_id: str) -> sales_pb2.Pipeline:
        async with self.engine.connect() as conn:
            return v.pipeline_proto(await self._pipeline_row(conn, pipeline_id))

    async def list_pipelines(self, page: Page) -> PageOf:
        limit = page_limit(page.limit)
        p = r.pipelines
        query = keyset_page(
            select(p), sort_column=p.c.created_at, id_column=p.c.id, descending=False, cursor=page.cursor, limit=limit
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return PageOf(
            [v.pipeline_proto(row) for row in rows[:limit]],
            next_cursor(rows, sort_key="created_at", descending=False, limit=limit),
        )

    async def _demote_default(self, tx: Transaction, pipeline_id: str, principal: Principal) -> None:
        """`pipeline_id` becomes the default: the pipeline that was (any other marked so) no longer is,
        in its next version, published as pipeline.updated like any change of it."""
        p = r.pipelines
        query = select(p).where(p.c.is_default.is_(True), p.c.id != pipeline_id).order_by(p.c.id).with_for_update()
        for row in (await tx.conn.execute(query)).mappings().all():
            values = {"is_default": False, "version": row["version"] + 1}
            await tx.conn.execute(update(p).where(p.c.id == row["id"]).values(values))
            tx.publish(
                events_pb2.PipelineUpdated(
                    pipeline=v.pipeline_proto({**row, **values}),
                    changed_fields=["is_default"],
                    actor=v.actor(principal),
                ),
                key=row["id"],
            )

    async def _pipeline_row(self, conn: AsyncConnection, pipeline_id: str) -> RowMapping:
        p = r.pipelines
        query = select(p).where(p.c.id == pipeline_id) if pipeline_id else select(p).where(p.c.is_default.is_(True))
        row = (await conn.execute(query.limit(1))).mappings().first()
        if row is None:
            raise NotFound("pipeline", pipeline_id or "default")
        return row

    async def _pipeline(self, conn: AsyncConnection, pipeline_id: str) -> d.Pipeline:
        return v.pipeline_domain(await self._pipeline_row(conn, pipeline_id))

    async def _pipeline_of_new_deals(self, conn: AsyncConnection, pipeline_id: str) -> d.Pipeline:
        """The pipeline a request's body names (`pipeline_id`) for new deals; without one, the default."""
        if not pipeline_id:
            return await self._pipeline(conn, "")
        row = await _referenced(conn, r.pipelines, pipeline_id, field_name="pipeline_id", resource="pipeline")
        return v.pipeline_domain(row)

    # ------------------------------------------------------------ opportunities

    async def create_opportunity(
        self,
        data: OpportunityIn,
        *,
        idempotency_key: str = "",
        override_collision: bool = False,
        override_reason: str = "",
    ) -> sales_pb2.Opportunity:
        principal = current_principal()
        async with self.uow.begin() as tx:
            opportunity_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="opportunity", key=idempotency_key, resource_id=opportunity_id, now=self.clock()
                )
                if existing:
                    return v.opportunity_proto(await self._opportunity_row(tx.conn, existing, scope=None))
            pipeline = await self._pipeline_of_new_deals(tx.conn, data.pipeline_id)
            definitions = await load_definitions(tx.conn, r.custom_fields, OPPORTUNITY_ENTITY)
            values = self._new_opportunity_values(opportunity_id, data, pipeline, principal, definitions)
            stage = pipeline.stage(values["stage"])
            if stage.outcome is not d.Outcome.OPEN:
                raise ValidationFailed(
                    [FieldError("stage", "a new opportunity starts in an open stage; use win or lose")]
                )
            d.check_stage_gate(pipeline, stage.key, self._gate_fields(values))
            if values["product_line_key"]:
                values.update(
                    await self._check_collision(
                        tx.conn, account_id=data.account_id, product_line_key=values["product_line_key"],
                        owner_id=values["owner_id"], exclude_id="", override=override_collision,
                        override_reason=override_reason,
                    )
                )  # fmt: skip
            await tx.conn.execute(insert(r.opportunities).values(values))
            proto = v.opportunity_proto(values)
            tx.publish(events_pb2.OpportunityCreated(opportunity=proto, actor=v.actor(principal)), key=opportunity_id)
            return proto

    def _new_opportunity_values(
        self,
        opportunity_id: str,
        data: OpportunityIn,
        pipeline: d.Pipeline,
        principal: Principal,
        definitions: Sequence[cf.FieldDefinition],
    ) -> dict[str, Any]:
        errors = []
        if not data.account_id.strip():
            errors.append(FieldError("account_id", "is required"))
        if not data.name.strip():
            errors.append(FieldError("name", "is required"))
        refs = {"account_id": data.account_id, "primary_contact_id": data.primary_contact_id,
                "source_lead_id": data.source_lead_id, "campaign_id": data.campaign_id}  # fmt: skip
        texts = {"name": data.name, "owner_id": data.owner_id, "team": data.team, "region": data.region,
                 "product_line": data.product_line}  # fmt: skip
        errors += d.check_texts(refs, d.REF_LENGTH) + d.check_texts(texts, d.NAME_LENGTH)
        errors += cf.validate(definitions, data.custom)
        if errors:
            raise ValidationFailed(errors)
        items = [item.to_domain() for item in data.line_items]
        line_currency = d.validate_line_items(items)
        totals = d.line_totals(items)
        if data.amount is not None:
            d.require_valid_amount(data.amount, field_name="amount")
            d.check_line_currency(data.amount.currency, line_currency)
            amount = data.amount
        else:
            amount = Money(totals.total, line_currency or self.default_currency)
        stage = pipeline.stage(data.stage) if data.stage else pipeline.first_open_stage
        now = self.clock()
        product_line = data.product_line.strip() or next((line for i in items if (line := i.product_line.strip())), "")
        return {
            "id": opportunity_id,
            "account_id": data.account_id.strip(),
            "primary_contact_id": data.primary_contact_id,
            "name": data.name.strip(),
            "pipeline_id": pipeline.id,
            "stage": stage.key,
            "probability_bp": int(stage.probability * 100),
            "amount": amount.amount,
            "currency": amount.currency,
            "expected_close_date": data.expected_close_date,
            "close_date": None,
            "forecast_month": d.month_key(data.expected_close_date) if data.expected_close_date else None,
            "forecast_category": data.forecast_category.value if data.forecast_category else "",
            "owner_id": data.owner_id or principal.user_id,
            "team": data.team or principal.team,
            "region": data.region or principal.region,
            "source_lead_id": data.source_lead_id,
            "campaign_id": data.campaign_id,
            "status": d.OpportunityStatus.OPEN.value,
            "lost_reason": "",
            "next_step": data.next_step,
            "product_line": product_line,
            "product_line_key": d.product_line_key(product_line),
            "line_items": [v.line_item_json(item) for item in items],
            "stage_history": [{"stage": stage.key, "entered_at": _stamp(now), "exited_at": ""}],
            "stage_entered_at": now,
            "tags": list(dict.fromkeys(data.tags)),
            "custom": cf.coerce(definitions, data.custom),
            "collision_override_by": "",
            "collision_override_reason": "",
            "colliding_opportunity_id": "",
            "external_id": None,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "version": 1,
        }

    @staticmethod
    def _gate_fields(values: RowMapping | dict[str, Any]) -> dict[str, object]:
        return {
            name: (Money(values["amount"], values["currency"]) if name == "amount" else values.get(name))
            for name in d.GATEABLE_FIELDS
        }

    async def _check_collision(
        self,
        conn: AsyncConnection,
        *,
        account_id: str,
        product_line_key: str,
        owner_id: str,
        exclude_id: str,
        override: bool,
        override_reason: str,
    ) -> dict[str, Any]:
        """防撞单 for a deal about to be open on this account and product line (its normalised
        `domain.product_line_key`) under `owner_id`: 409 on another owner's open deal, unless a
        manager overrides with a reason; then the override's columns (who, why, over which deal) to
        store with the deal."""
        await lock_for_transaction(conn, _collision_lock(account_id, product_line_key))
        line = (account_id, product_line_key)
        open_deals = (await r.open_deals_on(conn, [line], exclude_id=exclude_id)).get(line, [])
        colliding = _colliding(owner_id, open_deals, override=override)
        if colliding is None:
            return {}
        if not override_reason.strip():
            raise ValidationFailed([FieldError("override_reason", "is required to override anti-collision")])
        return {
            "collision_override_by": current_principal().user_id,
            "collision_override_reason": override_reason.strip(),
            "colliding_opportunity_id": colliding.id,
        }

    async def _opportunity_row(
        self, conn: AsyncConnection, opportunity_id: str, *, scope: RecordScope | None, lock: bool = False
    ) -> RowMapping:
        row = await r.load(conn, r.opportunities, opportunity_id, scope=scope, lock=lock)
        if row is None:
            raise NotFound("opportunity", opportunity_id)
        return row

    async def _pipelines(self, conn: AsyncConnection) -> dict[str, d.Pipeline]:
        rows = (await conn.execute(select(r.pipelines))).mappings().all()
        return {row["id"]: v.pipeline_domain(row) for row in rows}

    async def _read_out(
        self, conn: AsyncConnection, rows: Sequence[RowMapping | dict[str, Any]]
    ) -> list[sales_pb2.Opportunity]:
        """Opportunities as the API returns them, with `rotting` computed against their stages."""
        pipelines = await self._pipelines(conn)
        return [v.opportunity_proto(row, rotting=self._rotting(pipelines.get(row["pipeline_id"]), row)) for row in rows]

    def _rotting(self, pipeline: d.Pipeline | None, row: RowMapping | dict[str, Any]) -> bool:
        """Whether a deal is rotting now, by its pipeline's stage (a deal of no known stage is not)."""
        stage = next((s for s in pipeline.stages if s.key == row["stage"]), None) if pipeline else None
        entered = row["stage_entered_at"]
        return stage is not None and d.is_rotting(
            row["status"], stage, as_utc(entered) if entered else None, self.clock()
        )

    async def _answered(
        self, conn: AsyncConnection, row: RowMapping, after: sales_pb2.Opportunity
    ) -> Change[sales_pb2.Opportunity]:
        """A write that leaves the deal in its stage (update, assign) answers it as a read would, with
        `rotting` before and after (the same: the stage and its entry are unchanged); the event's
        copy is left without it, a fact of the write rather than of the clock."""
        rotting = self._rotting(await self._pipeline(conn, row["pipeline_id"]), row)
        answer = sales_pb2.Opportunity()
        answer.CopyFrom(after)
        answer.rotting = rotting
        return Change(answer, v.opportunity_proto(row, rotting=rotting))

    async def get_opportunity(self, opportunity_id: str) -> sales_pb2.Opportunity:
        async with self.engine.connect() as conn:
            row = await self._opportunity_row(conn, opportunity_id, scope=current_scope())
            [proto] = await self._read_out(conn, [row])
            return proto

    async def list_opportunities(
        self,
        page: Page,
        *,
        account_id: str = "",
        statuses: Sequence[str] = (),
        owner_id: str = "",
        team: str = "",
        stage: str = "",
        pipeline_id: str = "",
        product_line: str = "",
        campaign_id: str = "",
        q: str = "",
        rotting_only: bool = False,
        custom: Sequence[tuple[str, str]] = (),
    ) -> PageOf:
        o = r.opportunities
        query = select(o).where(scope_clause(o, current_scope()))
        if rotting_only:
            async with self.engine.connect() as conn:
                pipelines = await self._pipelines(conn)
            query = query.where(self._rotting_clause(pipelines))
        for status in statuses:
            if status not in d.OpportunityStatus.__members__.values():
                raise ValidationFailed([FieldError("status", f"{status!r} is not one of open, won, lost")])
        if statuses:
            query = query.where(o.c.status.in_(list(statuses)))
        for column, value in (
            (o.c.account_id, account_id),
            (o.c.owner_id, owner_id),
            (o.c.team, team),
            (o.c.stage, stage),
            (o.c.pipeline_id, pipeline_id),
            (o.c.product_line, product_line),
            (o.c.campaign_id, campaign_id),
        ):
            if value:
                query = query.where(column == value)
        if q:
            query = query.where(func.lower(o.c.name).contains(q.lower(), autoescape=True))
        sortable = {
            "created_at": o.c.created_at,
            "updated_at": o.c.updated_at,
            "expected_close_date": o.c.expected_close_date,
            "amount": o.c.amount,
            "name": o.c.name,
        }
        column, descending = parse_sort(page.sort, sortable, default="-created_at")
        limit = page_limit(page.limit)
        async with self.engine.connect() as conn:
            filters = await load_filters(conn, r.custom_fields, OPPORTUNITY_ENTITY, custom)
            query = query.where(*custom_clauses(conn, o.c.custom, filters))
            query = keyset_page(
                query, sort_column=column, id_column=o.c.id, descending=descending, cursor=page.cursor, limit=limit
            )
            rows = (await conn.execute(query)).mappings().all()
            items = await self._read_out(conn, rows[:limit])
        return PageOf(items, next_cursor(rows, sort_key=column.key, descending=descending, limit=limit))

    def _rotting_clause(self, pipelines: dict[str, d.Pipeline]) -> ColumnElement[bool]:
        """SQL twin of `domain.is_rotting`: open deals past their stage's rotting days."""
        o = r.opportunities
        now = self.clock()
        terms: list[ColumnElement[bool]] = [
            and_(
                o.c.pipeline_id == pipeline.id,
                o.c.stage == stage.key,
                o.c.stage_entered_at < now - timedelta(days=stage.rotting_days),
            )
            for pipeline in pipelines.values()
            for stage in pipeline.stages
            if stage.outcome is d.Outcome.OPEN and stage.rotting_days > 0
        ]
        return and_(o.c.status == d.OpportunityStatus.OPEN.value, or_(*terms) if terms else false())

    async def update_opportunity(
        self,
        opportunity_id: str,
        *,
        expected_version: int,
        changes: dict[str, Any],
        override_collision: bool = False,
        override_reason: str = "",
        discounts_scope: RecordScope | None = ALL_RECORDS,
    ) -> Change[sales_pb2.Opportunity]:
        """`changes` maps mask paths to new values (amount as Money, line_items as LineItemIn,
        expected_close_date as date or None, forecast_category as ForecastCategory or None).
        New line items replace a deal's discounts: a deal that has any gets them only within
        `discounts_scope`, the caller's scope as one who may set discounts (None: they may not,
        PERMISSION_DENIED naming the field)."""
        principal = current_principal()
        allowed = {
            "name", "primary_contact_id", "amount", "expected_close_date", "owner_id", "team", "region",
            "line_items", "next_step", "product_line", "tags", "custom", "forecast_category",
        }  # fmt: skip
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValidationFailed([FieldError("update_mask", f"cannot update {', '.join(unknown)}")])
        texts = {name: value for name, value in changes.items() if isinstance(value, str) and name != "next_step"}
        refused = d.check_texts({k: v for k, v in texts.items() if k == "primary_contact_id"}, d.REF_LENGTH)
        refused += d.check_texts({k: v for k, v in texts.items() if k != "primary_contact_id"}, d.NAME_LENGTH)
        if refused:
            raise ValidationFailed(refused)
        async with self.uow.begin() as tx:
            row = await self._opportunity_row(tx.conn, opportunity_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "opportunity")
            values: dict[str, Any] = {}
            for name, value in changes.items():
                if name == "amount":
                    d.require_valid_amount(value, field_name="amount")
                    values.update(amount=value.amount, currency=value.currency)
                elif name == "line_items":
                    if any(Decimal(item.get("discount_percent") or 0) > 0 for item in row["line_items"]):
                        _check_discounts_replaceable(row, discounts_scope, "opportunity", "opportunities")
                    items = [item.to_domain() for item in value]
                    currency = d.validate_line_items(items)
                    values["line_items"] = [v.line_item_json(item) for item in items]
                    if "amount" not in changes and items:
                        values.update(amount=d.line_totals(items).total, currency=currency)
                elif name == "expected_close_date":
                    values["expected_close_date"] = value
                    if row["status"] == d.OpportunityStatus.OPEN:
                        values["forecast_month"] = d.month_key(value) if value else None
                elif name == "forecast_category":
                    values["forecast_category"] = value.value if value else ""
                elif name in ("name", "owner_id"):  # a deal always has a name and an owner
                    _require(value, name)
                    values[name] = value.strip()
                elif name == "product_line":
                    values["product_line"] = value.strip()
                elif name == "tags":
                    values["tags"] = list(dict.fromkeys(value))
                elif name == "custom":
                    # Keys given replace their values (null or "" clears one); other keys stay.
                    definitions = await load_definitions(tx.conn, r.custom_fields, OPPORTUNITY_ENTITY)
                    errors = cf.validate(definitions, value, partial=True)
                    if errors:
                        raise ValidationFailed(errors)
                    kept = {k: v for k, v in row["custom"].items() if k not in value}
                    values["custom"] = {**kept, **cf.coerce(definitions, value)}
                else:
                    values[name] = value
            merged = {**row, **values}
            d.check_line_currency(merged["currency"], _line_currency(merged["line_items"]))
            changed = sorted(name for name in values if values[name] != row[name])
            if not changed:
                return await self._answered(tx.conn, row, v.opportunity_proto(row))
            if set(OWNERSHIP) & set(changed):
                d.check_owner_change(row["status"], opportunity_id=opportunity_id)
            d.check_closed_terms(row["status"], changed, opportunity_id=opportunity_id)
            proto = await self._save_opportunity(
                tx, row, values, changed, override_collision, override_reason, reason=OPPORTUNITY_UPDATED
            )
            tx.publish(
                events_pb2.OpportunityUpdated(
                    opportunity=proto, changed_fields=d.changed_opportunity_fields(changed), actor=v.actor(principal)
                ),
                key=opportunity_id,
            )
            return await self._answered(tx.conn, row, proto)

    async def assign_opportunity(
        self,
        opportunity_id: str,
        *,
        expected_version: int,
        owner_id: str,
        team: str,
        region: str,
        override_collision: bool = False,
        override_reason: str = "",
    ) -> Change[sales_pb2.Opportunity]:
        """Hands an open deal to `owner_id` (a rep leaves, territories change), and to `team` and
        `region` when given; its quotes follow it. The new owner is held to anti-collision as an
        update of the owner is."""
        principal = current_principal()
        _require(owner_id, "owner_id")
        given = {"owner_id": owner_id.strip(), "team": team.strip(), "region": region.strip()}
        _check_texts(given, d.NAME_LENGTH)
        async with self.uow.begin() as tx:
            row = await self._opportunity_row(tx.conn, opportunity_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "opportunity")
            d.check_owner_change(row["status"], opportunity_id=opportunity_id)
            values = {name: value for name, value in given.items() if value and value != row[name]}
            if not values:
                return await self._answered(tx.conn, row, v.opportunity_proto(row))
            changed = sorted(values)
            proto = await self._save_opportunity(
                tx, row, values, changed, override_collision, override_reason, reason=OPPORTUNITY_ASSIGNED
            )
            tx.publish(
                events_pb2.OpportunityAssigned(
                    opportunity=proto, previous_owner_id=row["owner_id"], changed_fields=changed,
                    actor=v.actor(principal),
                ),
                key=opportunity_id,
            )  # fmt: skip
            return await self._answered(tx.conn, row, proto)

    async def _save_opportunity(
        self,
        tx: Transaction,
        row: RowMapping,
        values: dict[str, Any],
        changed: Sequence[str],
        override_collision: bool,
        override_reason: str,
        *,
        reason: str,
    ) -> sales_pb2.Opportunity:
        """Writes `values` (the `changed` fields among them) to a locked deal: a new owner or product
        line of an open deal passes anti-collision first (the same line spelt otherwise is not a new
        one), and a new owner, team or region takes the deal's quotes along (`reason`: the event
        type of the deal's change, the quotes' events give it)."""
        conn = tx.conn
        if "product_line" in values:
            values["product_line_key"] = d.product_line_key(values["product_line"])
        merged = {**row, **values}
        moved = merged["owner_id"] != row["owner_id"] or merged["product_line_key"] != row["product_line_key"]
        if row["status"] == d.OpportunityStatus.OPEN and moved and merged["product_line_key"]:
            values.update(
                await self._check_collision(
                    conn, account_id=merged["account_id"], product_line_key=merged["product_line_key"],
                    owner_id=merged["owner_id"], exclude_id=row["id"], override=override_collision,
                    override_reason=override_reason,
                )
            )  # fmt: skip
        values.update(updated_at=self.clock(), version=row["version"] + 1)
        await conn.execute(update(r.opportunities).where(r.opportunities.c.id == row["id"]).values(values))
        if set(OWNERSHIP) & set(changed):
            ownership = {name: merged[name] for name in OWNERSHIP}
            await self._quotes_follow(tx, r.quotes.c.opportunity_id == row["id"], ownership, reason=reason)
        return v.opportunity_proto({**row, **values})

    async def _quotes_follow(
        self, tx: Transaction, which: ColumnElement[bool], changes: dict[str, Any], *, reason: str
    ) -> None:
        """Quotes carry their deal's owner, team and region (copied when created; they are read in
        that scope) and its account: the quotes `which` selects take `changes` of those along, in the
        transaction of the change they follow, so a deal's new owner sees them and the previous one
        no longer does. Each one changed is saved in its next version and published as it is now,
        with the event type of the cause as `reason`."""
        q = r.quotes
        rows = (await tx.conn.execute(select(q).where(which).with_for_update())).mappings().all()
        moved = [row for row in rows if any(row[name] != value for name, value in changes.items())]
        if not moved:
            return
        now = self.clock()
        await tx.conn.execute(
            update(q)
            .where(q.c.id.in_([row["id"] for row in moved]))
            .values(**changes, updated_at=now, version=q.c.version + 1)
        )
        actor = v.actor(current_principal())
        for row in moved:
            quote = v.quote_proto({**row, **changes, "updated_at": now, "version": row["version"] + 1})
            changed = sorted(name for name, value in changes.items() if row[name] != value)
            tx.publish(
                events_pb2.QuoteUpdated(quote=quote, changed_fields=changed, reason=reason, actor=actor), key=row["id"]
            )

    async def delete_opportunity(self, opportunity_id: str, *, expected_version: int) -> sales_pb2.Opportunity:
        """A deal entered by mistake, with its quotes; returns it as it was (for the caller's audit trail)."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._opportunity_row(tx.conn, opportunity_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "opportunity")
            await _refuse_if_deal_has_contract(
                tx.conn,
                opportunity_id,
                lambda contract: (
                    f"opportunity {opportunity_id} has contract {contract}; close it as won or lost instead"
                ),
            )
            deleted = v.opportunity_proto(row)
            quotes = await tx.conn.scalars(
                delete(r.quotes).where(r.quotes.c.opportunity_id == opportunity_id).returning(r.quotes.c.id)
            )
            for quote_id in sorted(quotes):  # gone with their deal: published as a deleted quote is
                tx.publish(
                    events_pb2.QuoteDeleted(quote_id=quote_id, opportunity_id=opportunity_id, actor=v.actor(principal)),
                    key=quote_id,
                )
            await tx.conn.execute(delete(r.opportunities).where(r.opportunities.c.id == opportunity_id))
            tx.publish(
                events_pb2.OpportunityDeleted(
                    opportunity_id=opportunity_id, account_id=row["account_id"], actor=v.actor(principal)
                ),
                key=opportunity_id,
            )
            return deleted

    async def move_stage(
        self, opportunity_id: str, *, stage: str, expected_version: int
    ) -> Change[sales_pb2.Opportunity]:
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._opportunity_row(tx.conn, opportunity_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "opportunity")
            d.require_open(row["status"], record="opportunity", record_id=opportunity_id)
            pipeline = await self._pipeline(tx.conn, row["pipeline_id"])
            target = pipeline.stage(stage)
            if target.outcome is not d.Outcome.OPEN:
                raise ValidationFailed([FieldError("stage", f"{stage!r} closes the deal: use win or lose")])
            previous = v.opportunity_proto(row)
            if target.key == row["stage"]:
                return Change(v.opportunity_proto(row), previous)
            d.check_stage_gate(pipeline, target.key, self._gate_fields(row))
            now = self.clock()
            values = {
                "stage": target.key,
                "probability_bp": int(target.probability * 100),
                "stage_history": self._enter(row, target.key, now),
                "stage_entered_at": now,
                "updated_at": now,
                "version": row["version"] + 1,
            }
            await tx.conn.execute(update(r.opportunities).where(r.opportunities.c.id == opportunity_id).values(values))
            proto = v.opportunity_proto({**row, **values})
            tx.publish(
                events_pb2.OpportunityStageChanged(
                    opportunity=proto, from_stage=row["stage"], to_stage=target.key, actor=v.actor(principal)
                ),
                key=opportunity_id,
            )
            return Change(proto, previous)

    @staticmethod
    def _enter(row: RowMapping | dict[str, Any], stage: str, now: datetime) -> list[dict[str, str]]:
        history = [d.StageVisit(x["stage"], x["entered_at"], x["exited_at"]) for x in row["stage_history"]]
        return [
            {"stage": x.stage, "entered_at": x.entered_at, "exited_at": x.exited_at}
            for x in d.enter_stage(history, stage, _stamp(now))
        ]

    async def win(
        self, opportunity_id: str, *, expected_version: int, close_date: date | None, amount: Money | None
    ) -> Change[sales_pb2.Opportunity]:
        return await self._close(
            opportunity_id, d.Outcome.WON, expected_version=expected_version, close_date=close_date, amount=amount
        )

    async def lose(
        self, opportunity_id: str, *, expected_version: int, reason: str, close_date: date | None
    ) -> Change[sales_pb2.Opportunity]:
        _require(reason, "reason")
        return await self._close(
            opportunity_id, d.Outcome.LOST, expected_version=expected_version, close_date=close_date, reason=reason
        )

    async def _close(
        self,
        opportunity_id: str,
        outcome: d.Outcome,
        *,
        expected_version: int,
        close_date: date | None,
        amount: Money | None = None,
        reason: str = "",
    ) -> Change[sales_pb2.Opportunity]:
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._opportunity_row(tx.conn, opportunity_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "opportunity")
            d.require_open(row["status"], record="opportunity", record_id=opportunity_id)
            pipeline = await self._pipeline(tx.conn, row["pipeline_id"])
            stage = pipeline.outcome_stage(outcome)
            values: dict[str, Any] = {}
            if amount is not None:
                d.require_valid_amount(amount, field_name="amount")
                d.check_line_currency(amount.currency, _line_currency(row["line_items"]))
                values.update(amount=amount.amount, currency=amount.currency)
            d.check_stage_gate(pipeline, stage.key, self._gate_fields({**row, **values}))
            now = self.clock()
            closed_on = close_date or self.today()
            values.update(
                status=outcome.value,
                stage=stage.key,
                probability_bp=int(stage.probability * 100),
                close_date=closed_on,
                forecast_month=d.month_key(closed_on),
                lost_reason=reason,
                stage_history=self._enter(row, stage.key, now),
                stage_entered_at=now,
                closed_at=now,
                updated_at=now,
                version=row["version"] + 1,
            )
            await tx.conn.execute(update(r.opportunities).where(r.opportunities.c.id == opportunity_id).values(values))
            proto = v.opportunity_proto({**row, **values})
            event = (
                events_pb2.OpportunityWon(opportunity=proto, actor=v.actor(principal))
                if outcome is d.Outcome.WON
                else events_pb2.OpportunityLost(opportunity=proto, reason=reason, actor=v.actor(principal))
            )
            tx.publish(event, key=opportunity_id)
            return Change(proto, v.opportunity_proto(row))

    async def import_opportunities(
        self, pipeline_id: str, rows: Sequence[ImportRow], *, override: bool = False, override_reason: str = ""
    ) -> list[ImportResult]:
        """Loads deals of another system as they are (open at a stage, won or lost), each row
        validated and answered on its own. Stage gates are checks on how deals move here, so imported
        deals skip them. Anti-collision is a check on who works a deal now: a deal imported open meets
        it as a created one does, won or lost history does not; a manager migrating another CRM's
        deals overrides it for the file (`override`, with a reason each such deal records, as a
        created one does). A repeated `external_id` answers `existing` with the first deal when the
        caller may read it; the row is rejected otherwise."""
        if len(rows) > self.import_max_rows:
            raise ValidationFailed([FieldError("rows", f"at most {self.import_max_rows} rows per call")])
        principal = current_principal()
        if override:  # refused at once, not row by row
            d.check_may_override_collision(principal.roles)
            if not override_reason.strip():
                raise ValidationFailed([FieldError("override_reason", "is required to override anti-collision")])
        scope = current_scope()
        results: dict[int, ImportResult] = {}
        async with self.uow.begin() as tx:
            pipeline = await self._pipeline_of_new_deals(tx.conn, pipeline_id)
            definitions = await load_definitions(tx.conn, r.custom_fields, OPPORTUNITY_ENTITY)
            external_ids = [row.external_id for row in rows if row.external_id]
            # Another import of the same deals waits here, then finds them existing (the unique
            # index alone would fail its whole batch).
            await lock_all_for_transaction(tx.conn, (f"opportunity-external-id:{key}" for key in external_ids))
            imported = await r.deals_by_external_id(tx.conn, external_ids)
            # Each row on its own first: what it answers, or the deal it would be.
            built: dict[int, dict[str, Any]] = {}
            invalid: dict[int, list[FieldError]] = {}
            for index, row in enumerate(rows):
                if not row.external_id.strip():
                    refused = [FieldError("external_id", "is required")]
                    results[index] = ImportResult(index, "", "rejected", errors=refused)
                elif refused := d.check_texts({"external_id": row.external_id}, d.REFERENCE_LENGTH):
                    results[index] = ImportResult(index, row.external_id, "rejected", errors=refused)
                elif (deal := imported.get(row.external_id)) is not None:
                    if scope.allows(owner_id=deal["owner_id"], team=deal["team"], region=deal["region"]):
                        results[index] = ImportResult(index, row.external_id, "existing", deal["id"])
                    else:  # neither named nor confirmed: the caller may not read it
                        refused = [FieldError("external_id", "is already used by an opportunity outside your records")]
                        results[index] = ImportResult(index, row.external_id, "rejected", errors=refused)
                elif not row.refusal:
                    try:
                        built[index] = self._import_values(row, pipeline, principal, definitions)
                    except ValidationFailed as error:
                        invalid[index] = error.errors
            # 防撞单, as on a create: a deal imported open takes its account and product line's lock
            # (all of the file's at once, in one order, so that two imports wait on each other rather
            # than deadlock) and meets the open deals stored and those of the file's earlier rows.
            opening = {
                index: (values["account_id"], values["product_line_key"])
                for index, values in built.items()
                if values["status"] == d.OpportunityStatus.OPEN and values["product_line_key"]
            }
            await lock_all_for_transaction(tx.conn, (_collision_lock(*line) for line in opening.values()))
            open_deals = await r.open_deals_on(tx.conn, set(opening.values()))
            created: dict[str, str] = {}  # external id -> the deal this file creates for it
            new_rows: list[dict[str, Any]] = []
            for index, row in enumerate(rows):
                if index in results:
                    continue
                if row.external_id in created:
                    results[index] = ImportResult(index, row.external_id, "existing", created[row.external_id])
                    continue
                refused = [FieldError("account_id", row.refusal)] if row.refusal else invalid.get(index, [])
                if not refused and index in opening:
                    deals = open_deals.setdefault(opening[index], [])
                    try:
                        colliding = _colliding(built[index]["owner_id"], deals, override=override)
                    except Conflict as collision:
                        refused = [FieldError("product_line", collision.detail)]
                    else:
                        if colliding is not None:  # overridden, recorded as on a create
                            built[index].update(
                                collision_override_by=principal.user_id,
                                collision_override_reason=override_reason.strip(),
                                colliding_opportunity_id=colliding.id,
                            )
                        deals.append(built[index])  # the file's later rows meet it
                if refused:
                    results[index] = ImportResult(index, row.external_id, "rejected", errors=refused)
                    continue
                values = built[index]
                created[row.external_id] = values["id"]
                new_rows.append(values)
                results[index] = ImportResult(index, row.external_id, "created", values["id"])
            if new_rows:
                await tx.conn.execute(insert(r.opportunities), new_rows)
            actor = v.actor(principal)
            for values in new_rows:
                proto = v.opportunity_proto(values)
                tx.publish(events_pb2.OpportunityCreated(opportunity=proto, actor=actor), key=values["id"])
                if values["status"] == d.OpportunityStatus.WON:
                    tx.publish(events_pb2.OpportunityWon(opportunity=proto, actor=actor), key=values["id"])
                elif values["status"] == d.OpportunityStatus.LOST:
                    tx.publish(
                        events_pb2.OpportunityLost(opportunity=proto, reason=values["lost_reason"], actor=actor),
                        key=values["id"],
                    )
        return [results[index] for index in range(len(rows))]

    def _import_values(
        self, row: ImportRow, pipeline: d.Pipeline, principal: Principal, definitions: Sequence[cf.FieldDefinition]
    ) -> dict[str, Any]:
        data = row.opportunity
        stage = pipeline.stage(data.stage) if data.stage else pipeline.first_open_stage
        values = self._new_opportunity_values(new_id(), data, pipeline, principal, definitions)
        values["external_id"] = row.external_id
        engaged = row.engaged_at or self.clock()
        values["stage_history"] = [{"stage": stage.key, "entered_at": _stamp(engaged), "exited_at": ""}]
        values["stage_entered_at"] = engaged
        values["created_at"] = engaged
        if stage.outcome is d.Outcome.OPEN:
            return values
        if row.close_date is None:
            raise ValidationFailed([FieldError("close_date", f"is required for a {stage.outcome} deal")])
        if stage.outcome is d.Outcome.WON and values["amount"] <= 0:
            raise ValidationFailed([FieldError("amount", "a won deal needs an amount above zero")])
        closed_at = datetime.combine(row.close_date, datetime.min.time(), tzinfo=engaged.tzinfo)
        values.update(
            status=stage.outcome.value,
            close_date=row.close_date,
            forecast_month=d.month_key(row.close_date),
            lost_reason=row.lost_reason,
            closed_at=closed_at,
            stage_entered_at=closed_at,
        )
        return values

    # ------------------------------------------------------------ forecast and statistics

    async def forecast(self, query: ForecastQuery) -> list[d.ForecastLine]:
        """Pipeline, weighted, commit, best case and closed won per period, group and currency,
        aggregated in SQL with exact decimals (see `domain.forecast` for the definitions)."""
        o = r.opportunities
        month = o.c.forecast_month
        period = (month // 100) * 10 + ((month % 100) + 2) // 3 if query.quarter else month
        period = type_coerce(period, Integer())
        group = o.c.team if query.by_team else o.c.owner_id
        is_open = o.c.status == d.OpportunityStatus.OPEN.value
        is_won = o.c.status == d.OpportunityStatus.WON.value
        commit = _category_is(d.ForecastCategory.COMMIT)
        best_case = _category_is(d.ForecastCategory.COMMIT, d.ForecastCategory.BEST_CASE)
        omitted = o.c.forecast_category == d.ForecastCategory.OMITTED.value

        def amount_where(condition: Any) -> Any:
            return type_coerce(func.sum(o.c.amount).filter(condition), r.Amount())

        statement = (
            select(
                period.label("period"),
                group.label("grp"),
                o.c.currency,
                amount_where(is_open).label("pipeline"),
                type_coerce(func.sum(o.c.amount * o.c.probability_bp).filter(is_open), r.Amount()).label("weighted_bp"),
                amount_where(and_(is_open, commit)).label("commit"),
                amount_where(and_(is_open, best_case)).label("best_case"),
                amount_where(is_won).label("closed_won"),
                func.count().filter(is_open).label("open_count"),
                func.count().filter(is_won).label("won_count"),
            )
            .where(scope_clause(o, current_scope()), month.is_not(None), or_(and_(is_open, ~omitted), is_won))
            .group_by(period, group, o.c.currency)
        )
        if query.from_date:
            statement = statement.where(month >= d.month_key(query.from_date))
        if query.to_date:
            statement = statement.where(month <= d.month_key(query.to_date))
        for column, value in (
            (o.c.owner_id, query.owner_id),
            (o.c.team, query.team),
            (o.c.pipeline_id, query.pipeline_id),
        ):
            if value:
                statement = statement.where(column == value)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        lines = []
        for row in rows:
            key = int(row["period"])
            label = f"{key // 10}-Q{key % 10}" if query.quarter else d.period_label(key, quarter=False)
            lines.append(
                d.ForecastLine(
                    period=label,
                    group=row["grp"],
                    currency=row["currency"],
                    pipeline=r.as_amount(row["pipeline"]),
                    # amount x basis points / 100 = amount x percent, as ForecastLine expects.
                    weighted_raw=r.as_amount(row["weighted_bp"]) / 100,
                    commit=r.as_amount(row["commit"]),
                    best_case=r.as_amount(row["best_case"]),
                    closed_won=r.as_amount(row["closed_won"]),
                    open_count=int(row["open_count"] or 0),
                    won_count=int(row["won_count"] or 0),
                )
            )
        return sorted(lines, key=lambda line: (line.period, line.group, line.currency))

    async def win_statistics(
        self, *, from_date: date | None, to_date: date | None, team: str = ""
    ) -> tuple[list[OwnerStats], list[OwnerStats]]:
        """Won amount, won and lost counts per owner and currency, and overall per currency."""
        o = r.opportunities
        is_won = o.c.status == d.OpportunityStatus.WON.value
        is_lost = o.c.status == d.OpportunityStatus.LOST.value
        statement = (
            select(
                o.c.owner_id,
                o.c.currency,
                r.amount_sum(case((is_won, o.c.amount))).label("won_amount"),
                func.sum(case((is_won, 1), else_=0)).label("won_count"),
                func.sum(case((is_lost, 1), else_=0)).label("lost_count"),
            )
            .where(scope_clause(o, current_scope()), or_(is_won, is_lost))
            .group_by(o.c.owner_id, o.c.currency)
            .order_by(o.c.owner_id, o.c.currency)
        )
        if from_date:
            statement = statement.where(o.c.close_date >= from_date)
        if to_date:
            statement = statement.where(o.c.close_date <= to_date)
        if team:
            statement = statement.where(o.c.team == team)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        by_owner = [
            OwnerStats(
                owner_id=row["owner_id"],
                currency=row["currency"],
                won_amount=r.as_amount(row["won_amount"]),
                won_count=int(row["won_count"] or 0),
                lost_count=int(row["lost_count"] or 0),
            )
            for row in rows
        ]
        overall: dict[str, OwnerStats] = {}
        for stats in by_owner:
            total = overall.setdefault(stats.currency, OwnerStats("", stats.currency, Decimal(0), 0, 0))
            total.won_amount += stats.won_amount
            total.won_count += stats.won_count
            total.lost_count += stats.lost_count
        return [overall[c] for c in sorted(overall)], by_owner

    # ------------------------------------------------------------ targets and attainment

    async def create_target(
        self, *, idempotency_key: str, owner_id: str, team: str, period: str, amount: Money
    ) -> sales_pb2.Target:
        """An owner's target (`owner_id`, stored with `team` for record scope) or, without an owner,
        a team's; `team` defaults to the caller's. ALREADY_EXISTS when the owner or team has one for
        the period (named when the caller may read it)."""
        principal = current_principal()
        months = d.parse_period(period)
        d.require_valid_target(amount)
        team = team or principal.team
        _check_texts({"owner_id": owner_id, "team": team}, d.NAME_LENGTH)
        if not owner_id:
            _require(team, "team")
        if not current_scope().allows(owner_id=owner_id, team=team, region=""):
            raise PermissionDenied("you may not create targets outside your record scope")
        async with self.uow.begin() as tx:
            target_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="target", key=idempotency_key, resource_id=target_id, now=self.clock()
                )
                if existing:
                    return v.target_proto(await self._target_row(tx.conn, existing, scope=None))
            now = self.clock()
            values = {
                "id": target_id,
                "owner_id": owner_id,
                "team": team,
                "region": "",
                "period": months.label,
                "first_month": months.first_month,
                "last_month": months.last_month,
                "amount": amount.amount,
                "currency": amount.currency,
                "set_by": principal.user_id,
                "created_at": now,
                "updated_at": now,
                "version": 1,
            }
            try:
                async with tx.conn.begin_nested():
                    await tx.conn.execute(insert(r.targets).values(values))
            except IntegrityError:
                raise await self._target_taken(tx.conn, owner_id=owner_id, team=team, period=months.label) from None
            return v.target_proto(values)

    async def _target_taken(self, conn: AsyncConnection, *, owner_id: str, team: str, period: str) -> AlreadyExists:
        """The 409 of a second target for an owner or team and period: the existing one is named only
        to a caller who may read it, as a read would (never reveal a record out of scope)."""
        t = r.targets
        holder = t.c.owner_id == owner_id if owner_id else and_(t.c.owner_id == "", t.c.team == team)
        existing = (await conn.execute(select(t).where(holder, t.c.period == period))).mappings().first()
        whose = f"owner {owner_id}" if owner_id else f"team {team}"
        detail = f"{whose} already has a target for {period}"
        if existing is not None and current_scope().allows(
            owner_id=existing["owner_id"], team=existing["team"], region=""
        ):
            return AlreadyExists(detail, existing_id=existing["id"])
        return AlreadyExists(detail)

    async def get_target(self, target_id: str) -> sales_pb2.Target:
        async with self.engine.connect() as conn:
            return v.target_proto(await self._target_row(conn, target_id, scope=current_scope()))

    async def list_targets(
        self, page: Page, *, from_date: date | None, to_date: date | None, owner_id: str = "", team: str = ""
    ) -> PageOf:
        t = r.targets
        query = select(t).where(*_target_filters(from_date=from_date, to_date=to_date, owner_id=owner_id, team=team))
        return await self._page(query, t, page, v.target_proto, sortable=TARGET_SORTS)

    async def update_target(self, target_id: str, *, expected_version: int, amount: Money) -> Change[sales_pb2.Target]:
        """A new amount for a target in the caller's scope (its owner, team and period name it)."""
        d.require_valid_target(amount)
        async with self.uow.begin() as tx:
            row = await self._target_row(tx.conn, target_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "target")
            values = {
                "amount": amount.amount,
                "currency": amount.currency,
                "set_by": current_principal().user_id,
                "updated_at": self.clock(),
                "version": row["version"] + 1,
            }
            await tx.conn.execute(update(r.targets).where(r.targets.c.id == target_id).values(values))
            return Change(v.target_proto({**row, **values}), v.target_proto(row))

    async def delete_target(self, target_id: str, *, expected_version: int) -> sales_pb2.Target:
        """Deletes a target in the caller's scope; returns it as it was (for the caller's audit trail)."""
        async with self.uow.begin() as tx:
            row = await self._target_row(tx.conn, target_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "target")
            await tx.conn.execute(delete(r.targets).where(r.targets.c.id == target_id))
            return v.target_proto(row)

    async def _target_row(
        self, conn: AsyncConnection, target_id: str, *, scope: RecordScope | None, lock: bool = False
    ) -> RowMapping:
        row = await r.load(conn, r.targets, target_id, scope=scope, lock=lock)
        if row is None:
            raise NotFound("target", target_id)
        return row

    async def attainment(self, query: ForecastQuery) -> list[d.AttainmentLine]:
        """Targets beside the forecast of their periods and groups (`domain.attainment`): monthly
        targets by month and quarterly ones by quarter (or, without one, the sum of the quarter's
        three monthly targets: `domain.quarter_targets`), owners' targets by owner and teams' by
        team. Closed won, commit and weighted are the forecast's own (`forecast`), in the same scope."""
        t = r.targets
        lines = await self.forecast(query)
        statement = select(
            t.c.period, t.c.owner_id, t.c.team, t.c.currency, t.c.amount, t.c.first_month, t.c.last_month
        )
        # Of a quarterly attainment, every month of the quarters asked for: a quarter's three monthly
        # targets make its target when it has none of its own.
        from_date, to_date = (
            d.whole_quarters(query.from_date, query.to_date) if query.quarter else (query.from_date, query.to_date)
        )
        statement = statement.where(
            *_target_filters(from_date=from_date, to_date=to_date, owner_id=query.owner_id, team=query.team),
            t.c.owner_id == "" if query.by_team else t.c.owner_id != "",
        )
        if not query.quarter:
            statement = statement.where(t.c.last_month == t.c.first_month)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        quarterly: list[d.TargetAmount] = []
        monthly: list[d.TargetAmount] = []
        for row in rows:
            target = d.TargetAmount(
                period=row["period"],
                group=row["team"] if query.by_team else row["owner_id"],
                currency=row["currency"],
                amount=row["amount"],
            )
            (quarterly if row["last_month"] > row["first_month"] else monthly).append(target)
        return d.attainment(lines, d.quarter_targets(quarterly, monthly) if query.quarter else monthly)

    # ------------------------------------------------------------ quotes

    async def create_quote(
        self, *, idempotency_key: str, opportunity_id: str, line_items: Sequence[LineItemIn]
    ) -> sales_pb2.Quote:
        principal = current_principal()
        _require(opportunity_id, "opportunity_id")
        terms = self._quote_terms(line_items)
        async with self.uow.begin() as tx:
            quote_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="quote", key=idempotency_key, resource_id=quote_id, now=self.clock()
                )
                if existing:
                    return v.quote_proto(await self._quote_row(tx.conn, existing, scope=None))
            # Locked as a contract's create locks it: a quote and a contract of one deal never race.
            opportunity = await _referenced(
                tx.conn,
                r.opportunities,
                opportunity_id,
                field_name="opportunity_id",
                resource="opportunity",
                scope=current_scope(),
                lock=True,
            )
            d.check_quotable(opportunity["status"], opportunity_id=opportunity_id)
            await _refuse_if_deal_has_contract(
                tx.conn,
                opportunity_id,
                lambda contract: f"opportunity {opportunity_id} has contract {contract}, made from its quotes",
            )
            now = self.clock()
            values = {
                "id": quote_id,
                "opportunity_id": opportunity_id,
                "account_id": opportunity["account_id"],
                **terms,
                "owner_id": opportunity["owner_id"],
                "team": opportunity["team"],
                "region": opportunity["region"],
                "created_at": now,
                "updated_at": now,
                "version": 1,
                "created_by": principal.user_id,
                "submitted_by": principal.user_id,
            }
            await tx.conn.execute(insert(r.quotes).values(values))
            proto = v.quote_proto(values)
            tx.publish(events_pb2.QuoteCreated(quote=proto, actor=v.actor(principal)), key=quote_id)
            if proto.status == d.QuoteStatus.APPROVED:  # within every threshold: approved as it is made
                tx.publish(events_pb2.QuoteApproved(quote=proto, actor=v.actor(principal)), key=quote_id)
            return proto

    def _quote_terms(self, line_items: Sequence[LineItemIn]) -> dict[str, Any]:
        """The columns a quote's line items set (`domain.quote_terms`), submitted for approval
        afresh: no decision made on other line items counts for them."""
        items = [item.to_domain() for item in line_items]
        terms = d.quote_terms(items, self.quote_thresholds)
        return {
            "line_items": [v.line_item_json(item) for item in items],
            "subtotal": terms.totals.subtotal,
            "discount_total": terms.totals.discount_total,
            "total": terms.totals.total,
            "currency": terms.currency,
            "max_discount_percent": terms.totals.max_discount_percent,
            "status": terms.status.value,
            "approval_chain": terms.approval_chain,
            "decisions": [],
        }

    async def _quote_row(
        self, conn: AsyncConnection, quote_id: str, *, scope: RecordScope | None, lock: bool = False
    ) -> RowMapping:
        row = await r.load(conn, r.quotes, quote_id, scope=scope, lock=lock)
        if row is None:
            raise NotFound("quote", quote_id)
        return row

    async def _quote_to_change(
        self,
        conn: AsyncConnection,
        quote_id: str,
        expected_version: int,
        *,
        discounts_scope: RecordScope | None = ALL_RECORDS,
    ) -> RowMapping:
        """The caller's quote, locked for a change or a deletion at `expected_version`, while its
        deal has no contract. Its deal is locked first, as `create_contract` locks it (and as
        `update_opportunity` locks it before the quotes that follow it): a contract being made from
        the deal meanwhile is either committed and found here, or made after this commits.
        A quote that has discounts must also be within `discounts_scope` (None: nowhere, a
        PERMISSION_DENIED naming the field; elsewhere NOT_FOUND, as out of the caller's scope)."""
        row = await self._quote_row(conn, quote_id, scope=current_scope())
        await r.load(conn, r.opportunities, row["opportunity_id"], lock=True)
        row = await self._quote_row(conn, quote_id, scope=current_scope(), lock=True)
        if row["max_discount_percent"] > 0:
            _check_discounts_replaceable(row, discounts_scope, "quote", "quotes")
        _check_version(row, expected_version, "quote")
        # Contracts refer to the deal, not to one of its quotes: once the deal has a contract,
        # every quote of it is part of what the contract was negotiated from.
        await _refuse_if_deal_has_contract(
            conn, row["opportunity_id"], lambda contract: f"quote {quote_id} belongs to a deal with contract {contract}"
        )
        return row

    async def get_quote(self, quote_id: str) -> sales_pb2.Quote:
        async with self.engine.connect() as conn:
            return v.quote_proto(await self._quote_row(conn, quote_id, scope=current_scope()))

    async def list_quotes(self, page: Page, *, opportunity_id: str = "", status: str = "") -> PageOf:
        q = r.quotes
        query = select(q).where(scope_clause(q, current_scope()))
        if opportunity_id:
            query = query.where(q.c.opportunity_id == opportunity_id)
        if status:
            query = query.where(q.c.status == status)
        return await self._page(query, q, page, v.quote_proto, sortable=QUOTE_SORTS)

    async def decide_quote(
        self, quote_id: str, *, expected_version: int, decision: d.Decision, comment: str
    ) -> Change[sales_pb2.Quote]:
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._quote_row(tx.conn, quote_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "quote")
            if row["status"] != d.QuoteStatus.PENDING_APPROVAL:
                raise Conflict(f"quote {quote_id} is {row['status']}, not pending approval", reason="ILLEGAL_STATE")
            steps = [d.ApprovalStep(x["role"], x["approver_id"], d.Decision(x["decision"])) for x in row["decisions"]]
            role = d.approving_role(row["approval_chain"], steps, principal.roles)
            # Creating a quote, or changing its line items, submits its discounts for approval; its
            # creator, who chose them first, decides on none of its versions either.
            d.check_separation_of_duties(
                principal.user_id,
                created_by=row["created_by"],
                submitted_by=row["submitted_by"],
                decisions=steps,
                record="quote",
            )
            now = self.clock()
            record = {
                "role": role,
                "approver_id": principal.user_id,
                "decision": decision.value,
                "comment": comment,
                "decided_at": _stamp(now),
            }
            decisions = [*row["decisions"], record]
            steps.append(d.ApprovalStep(role, principal.user_id, decision))
            if decision is d.Decision.REJECTED:
                status = d.QuoteStatus.REJECTED
            elif d.pending_roles(row["approval_chain"], steps):
                status = d.QuoteStatus.PENDING_APPROVAL
            else:
                status = d.QuoteStatus.APPROVED
            values = {"decisions": decisions, "status": status.value, "updated_at": now, "version": row["version"] + 1}
            await tx.conn.execute(update(r.quotes).where(r.quotes.c.id == quote_id).values(values))
            proto = v.quote_proto({**row, **values})
            if status is d.QuoteStatus.APPROVED:
                tx.publish(events_pb2.QuoteApproved(quote=proto, actor=v.actor(principal)), key=quote_id)
            elif status is d.QuoteStatus.REJECTED:
                tx.publish(
                    events_pb2.QuoteRejected(quote=proto, comment=comment, actor=v.actor(principal)), key=quote_id
                )
            else:  # a step of its chain decided, the next awaited: a new version all the same
                step = events_pb2.QuoteUpdated(quote=proto, changed_fields=["decisions"], actor=v.actor(principal))
                tx.publish(step, key=quote_id)
            return Change(proto, v.quote_proto(row))

    async def update_quote(
        self,
        quote_id: str,
        *,
        expected_version: int,
        line_items: Sequence[LineItemIn],
        discounts_scope: RecordScope | None = ALL_RECORDS,
    ) -> Change[sales_pb2.Quote]:
        """New line items for a quote not yet decided, whose deal has no contract: totals and the
        approvals they need are computed again, and decisions made on the previous ones are void
        (it waits for its whole chain again; the answer's status says so). The caller submitted them.
        New line items replace a quote's discounts: one that has any changes only within
        `discounts_scope`, the caller's scope as one who may set discounts (None: they may not,
        PERMISSION_DENIED naming the field)."""
        principal = current_principal()
        terms = self._quote_terms(line_items)
        async with self.uow.begin() as tx:
            row = await self._quote_to_change(tx.conn, quote_id, expected_version, discounts_scope=discounts_scope)
            d.check_quote_changeable(row["status"], quote_id=quote_id)
            previous = v.quote_proto(row)
            if terms["line_items"] == row["line_items"]:
                return Change(previous, previous)
            values = {
                **terms, "submitted_by": principal.user_id, "updated_at": self.clock(), "version": row["version"] + 1,
            }  # fmt: skip
            await tx.conn.execute(update(r.quotes).where(r.quotes.c.id == quote_id).values(values))
            proto = v.quote_proto({**row, **values})
            tx.publish(
                events_pb2.QuoteUpdated(
                    quote=proto,
                    voided_decisions=[v.decision_proto(x) for x in row["decisions"]],
                    actor=v.actor(principal),
                ),
                key=quote_id,
            )
            if proto.status == d.QuoteStatus.APPROVED:  # new line items within every threshold
                tx.publish(events_pb2.QuoteApproved(quote=proto, actor=v.actor(principal)), key=quote_id)
            return Change(proto, previous)

    async def delete_quote(self, quote_id: str, *, expected_version: int) -> sales_pb2.Quote:
        """A quote before approval, entered by mistake or superseded, whose deal has no contract;
        returns it as it was (for the caller's audit trail)."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._quote_to_change(tx.conn, quote_id, expected_version)
            d.check_quote_deletable(row["status"], quote_id=quote_id)
            await tx.conn.execute(delete(r.quotes).where(r.quotes.c.id == quote_id))
            tx.publish(
                events_pb2.QuoteDeleted(
                    quote_id=quote_id, opportunity_id=row["opportunity_id"], actor=v.actor(principal)
                ),
                key=quote_id,
            )
            return v.quote_proto(row)

    # ------------------------------------------------------------ contracts

    async def create_contract(
        self,
        *,
        idempotency_key: str,
        opportunity_id: str,
        account_id: str,
        title: str,
        amount: Money | None,
        owner_id: str,
        team: str,
        region: str,
        starts_on: date | None,
        ends_on: date | None,
    ) -> sales_pb2.Contract:
        principal = current_principal()
        if starts_on and ends_on and ends_on < starts_on:
            raise ValidationFailed([FieldError("ends_on", "must not be before starts_on")])
        async with self.uow.begin() as tx:
            contract_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="contract", key=idempotency_key, resource_id=contract_id, now=self.clock()
                )
                if existing:
                    return await self._contract_proto(tx.conn, await self._contract_row(tx.conn, existing, scope=None))
            if opportunity_id:
                # Locked as a quote's change or deletion locks it (`_quote_to_change`), and as the
                # deal's deletion does: none of them misses the contract made from it meanwhile.
                opportunity = await _referenced(
                    tx.conn,
                    r.opportunities,
                    opportunity_id,
                    field_name="opportunity_id",
                    resource="opportunity",
                    scope=current_scope(),
                    lock=True,
                )
                if opportunity["status"] != d.OpportunityStatus.WON:
                    raise Conflict(
                        f"opportunity {opportunity_id} is {opportunity['status']}; contracts come from won deals",
                        existing_id=opportunity_id,
                        reason="ILLEGAL_STATE",
                    )
                if account_id and account_id != opportunity["account_id"]:
                    raise ValidationFailed([FieldError("account_id", "differs from the opportunity's account")])
                account_id = opportunity["account_id"]
                # In the deal's currency: its contracts are approved on their sum (`_approval_chain`).
                if amount is not None and amount.currency != opportunity["currency"]:
                    refused = f"must be the opportunity's currency {opportunity['currency']}"
                    raise ValidationFailed([FieldError("amount.currency", refused)])
                amount = amount or Money(opportunity["amount"], opportunity["currency"])
                title = title or opportunity["name"]
                owner_id = owner_id or opportunity["owner_id"]
                team = team or opportunity["team"]
                region = region or opportunity["region"]
            errors = []
            if not account_id:
                errors.append(FieldError("account_id", "is required without an opportunity"))
            if not title.strip():
                errors.append(FieldError("title", "is required"))
            if amount is None:
                errors.append(FieldError("amount", "is required without an opportunity"))
            errors += d.check_texts({"account_id": account_id}, d.REF_LENGTH)
            errors += d.check_texts(
                {"title": title, "owner_id": owner_id, "team": team, "region": region}, d.NAME_LENGTH
            )
            if errors:
                raise ValidationFailed(errors)
            assert amount is not None
            d.require_valid_amount(amount, field_name="amount", allow_zero=False)
            now = self.clock()
            local = self.local_now()
            sequence = await r.next_contract_sequence(tx.conn, d.month_key(local.date()))
            values = {
                "id": contract_id,
                "number": d.contract_number(local.year, local.month, sequence),
                "opportunity_id": opportunity_id,
                "account_id": account_id,
                "title": title.strip(),
                "amount": amount.amount,
                "currency": amount.currency,
                "paid_amount": Decimal(0),
                "invoiced_amount": Decimal(0),
                "status": d.ContractStatus.DRAFT.value,
                "approval_chain": await self._approval_chain(tx.conn, contract_id, opportunity_id, amount),
                "approval_round": 0,
                "owner_id": owner_id or principal.user_id,
                "team": team or principal.team,
                "region": region or principal.region,
                "starts_on": starts_on,
                "ends_on": ends_on,
                "signed_at": None,
                "completed_at": None,
                "terminated_at": None,
                "terminated_reason": "",
                "created_at": now,
                "updated_at": now,
                "version": 1,
                # Whoever sets the terms never approves them, even when another person submits them.
                "created_by": principal.user_id,
            }
            await tx.conn.execute(insert(r.contracts).values(values))
            proto = v.contract_proto(values, [])
            tx.publish(events_pb2.ContractCreated(contract=proto, actor=v.actor(principal)), key=contract_id)
            return proto

    async def _approval_chain(
        self, conn: AsyncConnection, contract_id: str, opportunity_id: str, amount: Money
    ) -> list[str]:
        """The chain of a contract of `amount`, chosen on its sum with the other live contracts made
        from the same deal: splitting a won deal into contracts under a threshold buys nothing.
        Several contracts of one deal (a framework agreement and its call-offs) stay allowed."""
        alongside: list[Money] = []
        if opportunity_id:
            c = r.contracts
            others = await conn.execute(
                select(c.c.amount, c.c.currency).where(
                    c.c.opportunity_id == opportunity_id,
                    c.c.id != contract_id,
                    c.c.status.in_([status.value for status in d.LIVE_CONTRACT_STATUSES]),
                )
            )
            alongside = [Money(other_amount, currency) for other_amount, currency in others]
        return d.contract_approval_chain(amount, self.contract_thresholds, alongside=alongside)

    async def _contract_row(
        self, conn: AsyncConnection, contract_id: str, *, scope: RecordScope | None, lock: bool = False
    ) -> RowMapping:
        row = await r.load(conn, r.contracts, contract_id, scope=scope, lock=lock)
        if row is None:
            raise NotFound("contract", contract_id)
        return row

    async def _contract_proto(self, conn: AsyncConnection, row: RowMapping | dict[str, Any]) -> sales_pb2.Contract:
        return v.contract_proto(row, await r.contract_decisions_of(conn, row["id"]))

    async def get_contract(self, contract_id: str) -> sales_pb2.Contract:
        async with self.engine.connect() as conn:
            return await self._contract_proto(conn, await self._contract_row(conn, contract_id, scope=current_scope()))

    async def list_contracts(
        self, page: Page, *, account_id: str = "", status: str = "", opportunity_id: str = "", owner_id: str = ""
    ) -> PageOf:
        c = r.contracts
        query = select(c).where(scope_clause(c, current_scope()))
        for column, value in (
            (c.c.account_id, account_id),
            (c.c.status, status),
            (c.c.opportunity_id, opportunity_id),
            (c.c.owner_id, owner_id),
        ):
            if value:
                query = query.where(column == value)
        limit = page_limit(page.limit)
        column, descending = parse_sort(
            page.sort, {"created_at": c.c.created_at, "updated_at": c.c.updated_at}, default="-created_at"
        )
        query = keyset_page(
            query, sort_column=column, id_column=c.c.id, descending=descending, cursor=page.cursor, limit=limit
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
            decisions: dict[str, list[RowMapping]] = {}
            ids = [row["id"] for row in rows[:limit]]
            if ids:
                found = await conn.execute(
                    select(r.contract_decisions)
                    .where(r.contract_decisions.c.contract_id.in_(ids))
                    .order_by(r.contract_decisions.c.decided_at, r.contract_decisions.c.id)
                )
                for decision in found.mappings():
                    decisions.setdefault(decision["contract_id"], []).append(decision)
        items = [v.contract_proto(row, decisions.get(row["id"], [])) for row in rows[:limit]]
        return PageOf(items, next_cursor(rows, sort_key=column.key, descending=descending, limit=limit))

    async def submit_contract(self, contract_id: str, *, expected_version: int) -> Change[sales_pb2.Contract]:
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "contract")
            d.check_contract_transition(row["status"], d.ContractStatus.PENDING_APPROVAL, contract_id=contract_id)
            previous = await self._contract_proto(tx.conn, row)
            # The chain is fixed here, with the rates of now: decisions follow it even if rates change.
            chain = await self._approval_chain(
                tx.conn, contract_id, row["opportunity_id"], Money(row["amount"], row["currency"])
            )
            values = {
                "status": d.ContractStatus.PENDING_APPROVAL.value,
                "approval_chain": chain,
                "approval_round": row["approval_round"] + 1,
                "submitted_by": principal.user_id,
            }
            proto = await self._save_contract(tx, row, values)
            tx.publish(events_pb2.ContractSubmitted(contract=proto, actor=v.actor(principal)), key=contract_id)
            return Change(proto, previous)

    async def decide_contract(
        self, contract_id: str, *, expected_version: int, decision: d.Decision, comment: str
    ) -> Change[sales_pb2.Contract]:
        """One step of the chain, decided by the role the chain waits for (from the principal), by
        someone who neither created nor submitted the contract, nor decided an earlier step of this
        round."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "contract")
            target = d.ContractStatus.APPROVED if decision is d.Decision.APPROVED else d.ContractStatus.REJECTED
            if row["status"] != d.ContractStatus.PENDING_APPROVAL:
                d.check_contract_transition(row["status"], target, contract_id=contract_id)
            history = await r.contract_decisions_of(tx.conn, contract_id)
            steps = [
                d.ApprovalStep(x["role"], x["approver_id"], d.Decision(x["decision"]))
                for x in history
                if x["round"] == row["approval_round"]
            ]
            role = d.approving_role(row["approval_chain"], steps, principal.roles)
            d.check_separation_of_duties(
                principal.user_id,
                created_by=row["created_by"],
                submitted_by=row["submitted_by"],
                decisions=steps,
                record="contract",
            )
            now = self.clock()
            record = {
                "id": new_id(),
                "contract_id": contract_id,
                "round": row["approval_round"],
                "role": role,
                "approver_id": principal.user_id,
                "decision": decision.value,
                "comment": comment,
                "decided_at": now,
            }
            await tx.conn.execute(insert(r.contract_decisions).values(record))
            steps.append(d.ApprovalStep(role, principal.user_id, decision))
            values: dict[str, Any] = {}
            if decision is d.Decision.REJECTED:
                values["status"] = d.ContractStatus.REJECTED.value
            elif not d.pending_roles(row["approval_chain"], steps):
                values["status"] = d.ContractStatus.APPROVED.value
            proto = await self._save_contract(tx, row, values)
            actor = v.actor(principal)
            tx.publish(
                events_pb2.ContractApprovalRecorded(contract=proto, decision=v.decision_proto(record), actor=actor),
                key=contract_id,
            )
            if values.get("status") == d.ContractStatus.APPROVED:
                tx.publish(events_pb2.ContractApproved(contract=proto, actor=actor), key=contract_id)
            elif values.get("status") == d.ContractStatus.REJECTED:
                tx.publish(events_pb2.ContractRejected(contract=proto, comment=comment, actor=actor), key=contract_id)
            return Change(proto, v.contract_proto(row, history))

    async def sign_contract(
        self, contract_id: str, *, expected_version: int, signed_at: datetime | None
    ) -> Change[sales_pb2.Contract]:
        if errors := d.past_errors("signed_at", signed_at, self.clock()):
            raise ValidationFailed(errors)
        return await self._move_contract(
            contract_id, d.ContractStatus.SIGNED, expected_version=expected_version,
            extra={"signed_at": signed_at or self.clock()},
        )  # fmt: skip

    async def complete_contract(self, contract_id: str, *, expected_version: int) -> Change[sales_pb2.Contract]:
        return await self._move_contract(
            contract_id, d.ContractStatus.COMPLETED, expected_version=expected_version,
            extra={"completed_at": self.clock()},
        )  # fmt: skip

    async def terminate_contract(
        self, contract_id: str, *, expected_version: int, reason: str
    ) -> Change[sales_pb2.Contract]:
        _require(reason, "reason")
        return await self._move_contract(
            contract_id, d.ContractStatus.TERMINATED, expected_version=expected_version,
            extra={"terminated_at": self.clock(), "terminated_reason": reason.strip()},
        )  # fmt: skip

    async def _move_contract(
        self, contract_id: str, target: d.ContractStatus, *, expected_version: int, extra: dict[str, Any]
    ) -> Change[sales_pb2.Contract]:
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "contract")
            d.check_contract_transition(row["status"], target, contract_id=contract_id)
            if target is d.ContractStatus.COMPLETED:
                d.check_settled(Money(row["amount"], row["currency"]), row["paid_amount"], contract_id=contract_id)
            previous = await self._contract_proto(tx.conn, row)
            proto = await self._save_contract(tx, row, {"status": target.value, **extra})
            actor = v.actor(principal)
            event: Any
            match target:
                case d.ContractStatus.SIGNED:
                    event = events_pb2.ContractSigned(contract=proto, actor=actor)
                case d.ContractStatus.COMPLETED:
                    event = events_pb2.ContractCompleted(contract=proto, actor=actor)
                case _:
                    event = events_pb2.ContractTerminated(
                        contract=proto, reason=extra.get("terminated_reason", ""), actor=actor
                    )
            tx.publish(event, key=contract_id)
            return Change(proto, previous)

    async def update_contract(
        self, contract_id: str, *, expected_version: int, changes: Mapping[str, Any]
    ) -> Change[sales_pb2.Contract]:
        """Corrects a draft or rejected contract's title and term (`changes` of CONTRACT_EDITABLE);
        published as contract.updated with the fields that changed."""
        principal = current_principal()
        unknown = sorted(set(changes) - set(CONTRACT_EDITABLE))
        if unknown:
            raise ValidationFailed([FieldError(unknown[0], "cannot be changed on a contract")])
        if "title" in changes:
            _require(changes["title"], "title")
            _check_texts({"title": changes["title"].strip()}, d.NAME_LENGTH)
            changes = {**changes, "title": changes["title"].strip()}
        async with self.uow.begin() as tx:
            row = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "contract")
            d.check_contract_editable(row["status"], contract_id=contract_id)
            starts_on, ends_on = changes.get("starts_on", row["starts_on"]), changes.get("ends_on", row["ends_on"])
            if starts_on and ends_on and ends_on < starts_on:
                raise ValidationFailed([FieldError("ends_on", "must not be before starts_on")])
            previous = await self._contract_proto(tx.conn, row)
            changed = sorted(name for name, value in changes.items() if row[name] != value)
            if not changed:
                return Change(previous, previous)
            proto = await self._save_contract(tx, row, {name: changes[name] for name in changed})
            tx.publish(
                events_pb2.ContractUpdated(contract=proto, changed_fields=changed, actor=v.actor(principal)),
                key=contract_id,
            )
            return Change(proto, previous)

    async def delete_contract(self, contract_id: str, *, expected_version: int) -> sales_pb2.Contract:
        """A contract that never took effect (draft or rejected), with its approval decisions;
        returns it as it was (for the caller's audit trail)."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            row = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            _check_version(row, expected_version, "contract")
            d.check_contract_deletable(row["status"], contract_id=contract_id)
            # Plans, payments and invoices need an approved or signed contract; one found on a draft
            # is money the ERP knows about, never deleted along with it.
            for table, what in (
                (r.payment_plans, "a payment plan"),
                (r.payments, "payments"),
                (r.invoices, "invoices"),
            ):
                found = await tx.conn.scalar(select(table.c.id).where(table.c.contract_id == contract_id).limit(1))
                if found is not None:
                    raise Conflict(
                        f"contract {contract_id} has {what}", existing_id=str(found), reason="CONTRACT_IN_FORCE"
                    )
            deleted = await self._contract_proto(tx.conn, row)
            await tx.conn.execute(delete(r.contract_decisions).where(r.contract_decisions.c.contract_id == contract_id))
            await tx.conn.execute(delete(r.contracts).where(r.contracts.c.id == contract_id))
            tx.publish(
                events_pb2.ContractDeleted(
                    contract_id=contract_id, account_id=row["account_id"], actor=v.actor(principal)
                ),
                key=contract_id,
            )
            return deleted

    async def _save_contract(self, tx: Transaction, row: RowMapping, values: dict[str, Any]) -> sales_pb2.Contract:
        values = {**values, "updated_at": self.clock(), "version": row["version"] + 1}
        await tx.conn.execute(update(r.contracts).where(r.contracts.c.id == row["id"]).values(values))
        return await self._contract_proto(tx.conn, {**row, **values})

    # ------------------------------------------------------------ payment plans

    async def create_payment_plan(
        self, *, idempotency_key: str, contract_id: str, installments: Sequence[tuple[date, Money]]
    ) -> sales_pb2.PaymentPlan:
        principal = current_principal()
        async with self.uow.begin() as tx:
            plan_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="payment_plan", key=idempotency_key, resource_id=plan_id, now=self.clock()
                )
                if existing:
                    return await self._plan_proto(tx.conn, existing_plan_id=existing)
            contract = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            d.check_plan_accepted(contract["status"], contract_id=contract_id)
            present = await r.plan_of(tx.conn, contract_id)
            if present is not None:
                raise AlreadyExists(
                    f"contract {contract_id} already has payment plan {present['id']}", existing_id=present["id"]
                )
            contract_amount = Money(contract["amount"], contract["currency"])
            planned = d.validate_payment_plan(contract_amount, installments)
            now = self.clock()
            plan = {
                "id": plan_id,
                "contract_id": contract_id,
                "total": contract_amount.amount,
                "currency": contract_amount.currency,
                "created_at": now,
                "version": 1,
            }
            await tx.conn.execute(insert(r.payment_plans).values(plan))
            rows = [self._new_installment(plan, sequence, item) for sequence, item in enumerate(planned, start=1)]
            await tx.conn.execute(insert(r.installments), rows)
            # Money already received before the plan existed is allocated to it now.
            if contract["paid_amount"] > 0:
                states = [self._installment_state(row) for row in rows]
                allocated = d.allocate_payment(contract["paid_amount"], states)
                await self._save_installments(tx.conn, allocated.installments)
                rows = [
                    dict(row, paid=s.paid, status=s.status.value)
                    for row, s in zip(rows, allocated.installments, strict=True)
                ]
            proto = v.plan_proto(plan, rows)
            tx.publish(
                events_pb2.PaymentPlanCreated(
                    payment_plan=proto,
                    contract_amount=v.money(contract_amount.amount, contract_amount.currency),
                    actor=v.actor(principal),
                ),
                key=contract_id,
            )
            return proto

    async def update_payment_plan(
        self, contract_id: str, *, expected_version: int, installments: Sequence[tuple[date, Money]]
    ) -> Change[sales_pb2.PaymentPlan]:
        """Replaces the installments of a contract's plan, position by position as it lists them
        (`domain.change_plan`): those paid in full or in part stay as they are, the others keep
        their id where they keep their place and are pending again when they change (the overdue
        timer judges their new due date). Under the contract's lock, as payments are allocated."""
        principal = current_principal()
        async with self.uow.begin() as tx:
            contract = await self._contract_row(tx.conn, contract_id, scope=current_scope(), lock=True)
            plan = await r.plan_of(tx.conn, contract_id)
            if plan is None:
                raise NotFound("payment plan", contract_id)
            _check_version(plan, expected_version, "payment plan")
            d.check_plan_accepted(contract["status"], contract_id=contract_id)
            contract_amount = Money(contract["amount"], contract["currency"])
            d.validate_payment_plan(contract_amount, installments)
            rows = await r.installments_of(tx.conn, contract_id, lock=True)
            previous = v.plan_proto(plan, rows)
            change = d.change_plan(
                [self._installment_state(row) for row in rows],
                [d.PlannedInstallment(due_date=day, amount=money.amount) for day, money in installments],
            )
            if change.changes_nothing:
                return Change(previous, previous)
            i = r.installments
            for installment, planned in change.rescheduled:
                await tx.conn.execute(
                    update(i)
                    .where(i.c.id == installment.id)
                    .values(
                        due_date=planned.due_date,
                        amount=planned.amount,
                        status=d.InstallmentStatus.PENDING.value,
                        overdue_at=None,
                    )
                )
            removed = [installment.id for installment in change.removed]
            if removed:
                await tx.conn.execute(delete(i).where(i.c.id.in_(removed)))
            last = max((row["sequence"] for row in rows), default=0)
            added = [
                self._new_installment(plan, sequence, planned)
                for sequence, planned in enumerate(change.added, start=last + 1)
            ]
            if added:
                await tx.conn.execute(insert(i), added)
            version = plan["version"] + 1
            await tx.conn.execute(
                update(r.payment_plans).where(r.payment_plans.c.id == plan["id"]).values(version=version)
            )
            proto = v.plan_proto({**plan, "version": version}, await r.installments_of(tx.conn, contract_id))
            tx.publish(
                events_pb2.PaymentPlanUpdated(
                    payment_plan=proto,
                    contract_amount=v.money(contract_amount.amount, contract_amount.currency),
                    removed_installment_ids=removed,
                    actor=v.actor(principal),
                ),
                key=contract_id,
            )
            return Change(proto, previous)

    async def _plan_proto(
        self, conn: AsyncConnection, *, contract_id: str = "", existing_plan_id: str = ""
    ) -> sales_pb2.PaymentPlan:
        p = r.payment_plans
        query = (
            select(p).where(p.c.id == existing_plan_id)
            if existing_plan_id
            else select(p).where(p.c.contract_id == contract_id)
        )
        plan = (await conn.execute(query)).mappings().first()
        if plan is None:
            raise NotFound("payment plan", contract_id or existing_plan_id)
        return v.plan_proto(plan, await r.installments_of(conn, plan["contract_id"]))

    async def get_payment_plan(self, contract_id: str) -> sales_pb2.PaymentPlan:
        async with self.engine.connect() as conn:
            await self._contract_row(conn, contract_id, scope=current_scope())
            return await self._plan_proto(conn, contract_id=contract_id)

    @staticmethod
    def _new_installment(
        plan: RowMapping | dict[str, Any], sequence: int, planned: d.PlannedInstallment
    ) -> dict[str, Any]:
        """A pending installment of `plan`, nothing paid on it yet."""
        return {
            "id": new_id(),
            "plan_id": plan["id"],
            "contract_id": plan["contract_id"],
            "sequence": sequence,
            "due_date": planned.due_date,
            "amount": planned.amount,
            "paid": Decimal(0),
            "currency": plan["currency"],
            "status": d.InstallmentStatus.PENDING.value,
            "overdue_at": None,
        }

    @staticmethod
    def _installment_state(row: RowMapping | dict[str, Any]) -> d.InstallmentState:
        return d.InstallmentState(
            id=row["id"],
            sequence=row["sequence"],
            due_date=row["due_date"],
            amount=row["amount"],
            paid=row["paid"],
            status=d.InstallmentStatus(row["status"]),
        )

    @staticmethod
    async def _save_installments(conn: AsyncConnection, states: Sequence[d.InstallmentState]) -> None:
        i = r.installments
        for state in states:
            await conn.execute(update(i).where(i.c.id == state.id).values(paid=state.paid, status=state.status.value))

    # ------------------------------------------------------------ payments

    async def record_payment(
        self,
        *,
        contract_id: str,
        amount: Money,
        received_at: datetime | None,
        method: str,
        external_reference: str,
        idempotency_key: str = "",
        scope: RecordScope | None = None,
    ) -> tuple[sales_pb2.Payment, bool]:
        """Books a payment once per external reference and allocates it to installments oldest
        first. Returns the payment and whether it was new (False: the first result of the reference).
        A retrying client's `idempotency_key` answers the same request again as its first use was
        answered, both; another request under it is refused, as for every create."""
        caller = current_principal().user_id
        async with self.uow.begin() as tx:
            payment_id = new_id()
            earlier = await idempotency.claim(
                tx.conn, r.idempotency_keys, operation="payment", caller=caller, key=idempotency_key,
                result={"id": payment_id, "created": True}, now=self.clock(),
            )  # fmt: skip
            if isinstance(earlier, dict):
                first = await r.load(tx.conn, r.payments, earlier["id"])
                assert first is not None  # payments are never deleted
                return v.payment_proto(first), bool(earlier["created"])
            payment, created = await self.record_payment_in(
                tx,
                contract_id=contract_id,
                amount=amount,
                received_at=received_at,
                method=method,
                external_reference=external_reference,
                scope=current_scope() if scope is None else scope,
                payment_id=payment_id,
            )
            if not created:  # the reference's first payment answered: so will a repeat of the key
                await idempotency.settle(
                    tx.conn, r.idempotency_keys, operation="payment", caller=caller, key=idempotency_key,
                    result={"id": payment.id, "created": False},
                )  # fmt: skip
            return payment, created

    async def record_payment_in(
        self,
        tx: Transaction,
        *,
        contract_id: str,
        amount: Money,
        received_at: datetime | None,
        method: str,
        external_reference: str,
        scope: RecordScope,
        payment_id: str = "",
    ) -> tuple[sales_pb2.Payment, bool]:
        """`record_payment` inside a given transaction (the ERP consumer's, with its inbox row); a
        new payment gets `payment_id` when given."""
        principal = current_principal()
        reference = external_reference.strip()
        errors = []
        if not reference:
            errors.append(FieldError("external_reference", "is required (it is the idempotency key)"))
        if not contract_id:
            errors.append(FieldError("contract_id", "is required"))
        errors += d.check_texts({"external_reference": reference}, d.REFERENCE_LENGTH)
        errors += d.check_texts({"method": method.strip()}, d.CODE_LENGTH)
        errors += d.past_errors("received_at", received_at, self.clock())
        if errors:
            raise ValidationFailed(errors)
        contract = await _referenced(
            tx.conn, r.contracts, contract_id, field_name="contract_id", resource="contract", scope=scope, lock=True
        )
        # Checked under the contract lock, so a concurrent posting of the same reference sees ours.
        existing = await r.payment_by_reference(tx.conn, reference)
        if existing is not None:
            if existing["contract_id"] != contract_id:
                raise Conflict(
                    f"external_reference {reference!r} was posted for contract {existing['contract_id']}",
                    existing_id=existing["id"],
                    reason="REFERENCE_REUSED",
                )
            posted = Money(existing["amount"], existing["currency"])
            d.check_same_posting(posted, amount, reference=reference, existing_id=existing["id"])
            return v.payment_proto(existing), False
        # A completed contract is in force but paid in full: check_payment refuses an over-payment.
        d.check_in_force(contract["status"], contract_id=contract_id, what="payments")
        contract_amount = Money(contract["amount"], contract["currency"])
        d.check_payment(amount, contract_amount=contract_amount, already_paid=contract["paid_amount"])
        now = self.clock()
        rows = await r.installments_of(tx.conn, contract_id, lock=True)
        allocations: list[tuple[str, Decimal]] = []
        if rows:
            result = d.allocate_payment(amount.amount, [self._installment_state(row) for row in rows])
            allocations = result.allocations
            changed = {installment_id for installment_id, _ in allocations}
            await self._save_installments(tx.conn, [s for s in result.installments if s.id in changed])
        payment = {
            "id": payment_id or new_id(),
            "contract_id": contract_id,
            "account_id": contract["account_id"],
            "amount": amount.amount,
            "currency": amount.currency,
            "received_at": received_at or now,
            "method": method.strip(),
            "external_reference": reference,
            "allocations": [{"installment_id": i, "amount": format(a, "f")} for i, a in allocations],
            "created_at": now,
        }
        # The contract lock serialises postings of one contract; a reference reused concurrently on
        # another contract is caught here (no savepoint needed: nothing is written on conflict).
        if not await insert_ignore(tx.conn, r.payments, payment, keys=["external_reference"]):
            raise Conflict(f"external_reference {reference!r} is already used", reason="REFERENCE_REUSED")
        paid = contract["paid_amount"] + amount.amount
        await tx.conn.execute(
            update(r.contracts)
            .where(r.contracts.c.id == contract_id)
            .values(paid_amount=paid, updated_at=now, version=contract["version"] + 1)
        )
        proto = v.payment_proto(payment)
        tx.publish(
            events_pb2.PaymentReceived(
                payment=proto,
                contract_outstanding=v.money(contract_amount.amount - paid, contract_amount.currency),
                actor=v.actor(principal),
            ),
            key=contract_id,
        )
        return proto, True

    async def list_payments(self, page: Page, *, contract_id: str = "", account_id: str = "") -> PageOf:
        p, c = r.payments, r.contracts
        query = select(p).join(c, c.c.id == p.c.contract_id).where(scope_clause(c, current_scope()))
        if contract_id:
            query = query.where(p.c.contract_id == contract_id)
        if account_id:
            query = query.where(p.c.account_id == account_id)
        return await self._page(query, p, page, v.payment_proto, sortable=PAYMENT_SORTS)

    async def list_receivables(self, account_id: str, page: Page) -> Receivables:
        _require(account_id, "account_id")
        c = r.contracts
        query = select(c).where(
            scope_clause(c, current_scope()),
            c.c.account_id == account_id,
            c.c.status.in_([s.value for s in d.CONTRACTS_IN_FORCE]),
        )
        limit = page_limit(page.limit)
        query = keyset_page(
            query, sort_column=c.c.created_at, id_column=c.c.id, descending=True, cursor=page.cursor, limit=limit
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
            ids = [row["id"] for row in rows[:limit]]
            overdue = await r.overdue_amounts(conn, ids, self.today())
            due = await r.next_due_dates(conn, ids)
            in_force = [s.value for s in d.CONTRACTS_IN_FORCE]
            account = await r.account_totals(conn, account_id, current_scope(), in_force, self.today())
        items = []
        outstanding_total: dict[str, Decimal] = {}
        overdue_total: dict[str, Decimal] = {}
        for row in rows[:limit]:
            currency = row["currency"]
            outstanding = row["amount"] - row["paid_amount"]
            late = overdue.get(row["id"], Decimal(0))
            outstanding_total[currency] = outstanding_total.get(currency, Decimal(0)) + outstanding
            overdue_total[currency] = overdue_total.get(currency, Decimal(0)) + late
            items.append(
                sales_pb2.Receivable(
                    contract_id=row["id"],
                    contract_number=row["number"],
                    account_id=row["account_id"],
                    status=row["status"],
                    amount=v.money(row["amount"], currency),
                    paid=v.money(row["paid_amount"], currency),
                    outstanding=v.money(outstanding, currency),
                    overdue=v.money(late, currency),
                    invoiced=v.money(row["invoiced_amount"], currency),
                    next_due_date=v.iso(due.get(row["id"])),
                )
            )
        return Receivables(
            items,
            next_cursor(rows, sort_key="created_at", descending=True, limit=limit),
            outstanding_total,
            overdue_total,
            account,
        )

    # ------------------------------------------------------------ overdue installments (timer)

    async def mark_overdue_installments(self, batch_size: int) -> int:
        """Claims open installments of signed contracts past their due date (SKIP LOCKED: replicas
        share the work), marks them overdue and publishes one event each, in one transaction."""
        i, c = r.installments, r.contracts
        today = self.today()
        claim = (
            select(i)
            .join(c, c.c.id == i.c.contract_id)
            .where(
                i.c.status.in_([d.InstallmentStatus.PENDING.value, d.InstallmentStatus.PARTIALLY_PAID.value]),
                i.c.due_date < today,
                c.c.status == d.ContractStatus.SIGNED.value,
            )
            .order_by(i.c.due_date, i.c.id)
            .limit(batch_size)
        )
        if self.engine.dialect.name == "postgresql":
            claim = claim.with_for_update(skip_locked=True, of=i)
        async with self.uow.begin() as tx:
            claimed = (await tx.conn.execute(claim)).mappings().all()
            # The claim read the contracts as signed without holding them: the ERP must never get
            # installment.overdue after contract.terminated.
            accounts = await r.hold_signed_contracts(tx.conn, {row["contract_id"] for row in claimed})
            rows = [row for row in claimed if row["contract_id"] in accounts]
            if not rows:
                return 0
            now = self.clock()
            await tx.conn.execute(
                update(i)
                .where(i.c.id.in_([row["id"] for row in rows]))
                .values(status=d.InstallmentStatus.OVERDUE.value, overdue_at=now)
            )
            for row in rows:
                installment = v.installment_proto(
                    {**row, "status": d.InstallmentStatus.OVERDUE.value, "overdue_at": now}
                )
                tx.publish(
                    events_pb2.InstallmentOverdue(
                        contract_id=row["contract_id"], installment=installment, account_id=accounts[row["contract_id"]]
                    ),
                    key=row["contract_id"],
                )
                # No request made this change for the gateway to audit: the record goes with it.
                audit = audit_of_job(
                    OVERDUE_JOB,
                    action="mark_overdue",
                    resource="payment_plans",
                    record_id=row["plan_id"],
                    record=installment,
                    previous=v.installment_proto(row),
                    occurred_at=now,
                    reason=f"installment {row['sequence']} of contract {row['contract_id']} "
                    f"was due on {row['due_date'].isoformat()}",
                )
                tx.publish(audit, key=row["contract_id"])
            return len(rows)

    # ------------------------------------------------------------ invoices

    async def request_invoice(self, *, idempotency_key: str, contract_id: str, amount: Money) -> sales_pb2.Invoice:
        principal = current_principal()
        async with self.uow.begin() as tx:
            invoice_id = new_id()
            if idempotency_key:
                existing = await _claim(
                    tx.conn, operation="invoice", key=idempotency_key, resource_id=invoice_id, now=self.clock()
                )
                if existing:
                    return v.invoice_proto(await self._invoice_row(tx.conn, existing))
            contract = await _referenced(
                tx.conn,
                r.contracts,
                contract_id,
                field_name="contract_id",
                resource="contract",
                scope=current_scope(),
                lock=True,
            )
            values = await self._new_invoice(tx, contract, amount, invoice_id=invoice_id)
            proto = v.invoice_proto(values)
            tx.publish(events_pb2.InvoiceRequested(invoice=proto, actor=v.actor(principal)), key=invoice_id)
            return proto

    async def _new_invoice(
        self,
        tx: Transaction,
        contract: RowMapping,
        amount: Money,
        *,
        invoice_id: str,
        number: str = "",
        issued_at: datetime | None = None,
        external_reference: str = "",
    ) -> dict[str, Any]:
        """Checks the limit under the contract lock and writes the invoice (requested, or issued
        when a number is given) and the contract's new invoiced amount."""
        d.check_in_force(contract["status"], contract_id=contract["id"], what="invoices")
        d.check_invoice_amount(
            amount,
            contract_amount=Money(contract["amount"], contract["currency"]),
            already_invoiced=contract["invoiced_amount"],
        )
        now = self.clock()
        values = {
            "id": invoice_id,
            "contract_id": contract["id"],
            "account_id": contract["account_id"],
            "number": number or None,
            "amount": amount.amount,
            "currency": amount.currency,
            "status": (d.InvoiceStatus.ISSUED if number else d.InvoiceStatus.REQUESTED).value,
            "external_reference": external_reference or None,
            "requested_at": issued_at or now,
            "issued_at": (issued_at or now) if number else None,
            "voided_at": None,
            "void_reason": "",
            "version": 1,
        }
        try:
            async with tx.conn.begin_nested():
                await tx.conn.execute(insert(r.invoices).values(values))
        except IntegrityError:
            raise AlreadyExists(f"invoice number {number!r} is already used") from None
        await tx.conn.execute(
            update(r.contracts)
            .where(r.contracts.c.id == contract["id"])
            .values(
                invoiced_amount=contract["invoiced_amount"] + amount.amount,
                updated_at=now,
                version=contract["version"] + 1,
            )
        )
        return values

    async def _invoice_row(
        self, conn: AsyncConnection, invoice_id: str, *, scope: RecordScope | None = None, lock: bool = False
    ) -> RowMapping:
        query = select(r.invoices).where(r.invoices.c.id == invoice_id)
        if scope is not None:
            query = query.join(r.contracts, r.contracts.c.id == r.invoices.c.contract_id).where(
                scope_clause(r.contracts, scope)
            )
        if lock:
            query = query.with_for_update(of=r.invoices) if conn.dialect.name == "postgresql" else query
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound("invoice", invoice_id)
        return row

    async def get_invoice(self, invoice_id: str) -> sales_pb2.Invoice:
        async with self.engine.connect() as conn:
            return v.invoice_proto(await self._invoice_row(conn, invoice_id, scope=current_scope()))

    async def list_invoices(
        self, page: Page, *, contract_id: str = "", status: str = "", account_id: str = ""
    ) -> PageOf:
        i, c = r.invoices, r.contracts
        query = select(i).join(c, c.c.id == i.c.contract_id).where(scope_clause(c, current_scope()))
        for column, value in ((i.c.contract_id, contract_id), (i.c.status, status), (i.c.account_id, account_id)):
            if value:
                query = query.where(column == value)
        return await self._page(query, i, page, v.invoice_proto, sortable=INVOICE_SORTS)

    async def issue_invoice(
        self, invoice_id: str, *, number: str, issued_at: datetime | None, expected_version: int = 0
    ) -> Change[sales_pb2.Invoice]:
        _require(number, "number")
        _check_texts({"number": number.strip()}, d.CODE_LENGTH)
        if errors := d.past_errors("issued_at", issued_at, self.clock()):
            raise ValidationFailed(errors)
        async with self.uow.begin() as tx:
            row = await self._invoice_row(tx.conn, invoice_id, scope=current_scope())
            # Lock order contract → invoice, the same as requesting and voiding; the contract's status
            # cannot change (terminated) while its invoice is issued.
            contract = await self._contract_row(tx.conn, row["contract_id"], scope=None, lock=True)
            row = await self._invoice_row(tx.conn, invoice_id, lock=True)
            _check_version(row, expected_version, "invoice")
            issued = await self._issue(tx, contract, row, number=number.strip(), issued_at=issued_at)
            return Change(issued, v.invoice_proto(row))

    async def _issue(
        self,
        tx: Transaction,
        contract: RowMapping,
        row: RowMapping,
        *,
        number: str,
        issued_at: datetime | None,
        external_reference: str = "",
    ) -> sales_pb2.Invoice:
        """Gives a requested invoice its number while its contract is in force (a terminated
        contract's requested invoices can only be voided). Its amount is already counted as invoiced."""
        d.check_invoice_transition(row["status"], d.InvoiceStatus.ISSUED, invoice_id=row["id"])
        d.check_in_force(contract["status"], contract_id=contract["id"], what="invoices")
        values: dict[str, Any] = {
            "status": d.InvoiceStatus.ISSUED.value,
            "number": number,
            "issued_at": issued_at or self.clock(),
            "version": row["version"] + 1,
        }
        if external_reference:
            values["external_reference"] = external_reference
        try:
            async with tx.conn.begin_nested():
                await tx.conn.execute(update(r.invoices).where(r.invoices.c.id == row["id"]).values(values))
        except IntegrityError:
            raise AlreadyExists(f"invoice number {number!r} is already used") from None
        proto = v.invoice_proto({**row, **values})
        tx.publish(events_pb2.InvoiceIssued(invoice=proto, actor=v.actor(current_principal())), key=row["id"])
        return proto

    async def void_invoice(
        self, invoice_id: str, *, reason: str, expected_version: int = 0
    ) -> Change[sales_pb2.Invoice]:
        principal = current_principal()
        _require(reason, "reason")
        async with self.uow.begin() as tx:
            row = await self._invoice_row(tx.conn, invoice_id, scope=current_scope())
            # Lock order contract → invoice, the same as issuing and requesting.
            contract = await self._contract_row(tx.conn, row["contract_id"], scope=None, lock=True)
            row = await self._invoice_row(tx.conn, invoice_id, lock=True)
            _check_version(row, expected_version, "invoice")
            d.check_invoice_transition(row["status"], d.InvoiceStatus.VOID, invoice_id=invoice_id)
            now = self.clock()
            values = {
                "status": d.InvoiceStatus.VOID.value,
                "voided_at": now,
                "void_reason": reason.strip(),
                "version": row["version"] + 1,
            }
            await tx.conn.execute(update(r.invoices).where(r.invoices.c.id == invoice_id).values(values))
            await tx.conn.execute(
                update(r.contracts)
                .where(r.contracts.c.id == contract["id"])
                .values(
                    invoiced_amount=contract["invoiced_amount"] - row["amount"],
                    updated_at=now,
                    version=contract["version"] + 1,
                )
            )
            proto = v.invoice_proto({**row, **values})
            tx.publish(
                events_pb2.InvoiceVoided(invoice=proto, reason=reason.strip(), actor=v.actor(principal)), key=invoice_id
            )
            return Change(proto, v.invoice_proto(row))

    async def record_erp_invoice(
        self,
        tx: Transaction,
        *,
        contract_id: str,
        amount: Money,
        number: str,
        issued_at: datetime | None,
        external_reference: str,
        invoice_id: str = "",
    ) -> InvoicePosting:
        """An invoice the ERP issued, idempotent by external reference. With `invoice_id`: the
        invoice the CRM requested (invoice.requested), issued with the ERP's number under the rules of
        issuing it over the API, for exactly the requested amount; a redelivery after it was issued
        with that number changes nothing. Without: an invoice the ERP raised on its own, under the
        limit of requesting one."""
        reference, number = external_reference.strip(), number.strip()
        errors = []
        if not reference:
            errors.append(FieldError("external_reference", "is required (it is the idempotency key)"))
        if not number:
            errors.append(FieldError("number", "is required"))
        if not contract_id:
            errors.append(FieldError("contract_id", "is required"))
        errors += d.check_texts({"external_reference": reference}, d.REFERENCE_LENGTH)
        errors += d.check_texts({"number": number}, d.CODE_LENGTH)
        errors += d.past_errors("issued_at", issued_at, self.clock())
        if errors:
            raise ValidationFailed(errors)
        contract = await self._contract_row(tx.conn, contract_id, scope=None, lock=True)
        existing = await r.invoice_by_reference(tx.conn, reference)
        if existing is not None:
            if existing["contract_id"] != contract_id or (invoice_id and existing["id"] != invoice_id):
                raise Conflict(
                    f"external_reference {reference!r} was posted for invoice {existing['id']} "
                    f"of contract {existing['contract_id']}",
                    existing_id=existing["id"],
                    reason="REFERENCE_REUSED",
                )
            posted = Money(existing["amount"], existing["currency"])
            d.check_same_posting(posted, amount, reference=reference, existing_id=existing["id"])
            return InvoicePosting(v.invoice_proto(existing), v.invoice_proto(existing), changed=False)
        if invoice_id:
            row = await self._invoice_row(tx.conn, invoice_id, lock=True)
            if row["contract_id"] != contract_id:
                raise ValidationFailed(
                    [FieldError("invoice_id", f"is an invoice of contract {row['contract_id']}, not of {contract_id}")]
                )
            d.check_issued_amount(amount, requested=Money(row["amount"], row["currency"]))
            before = v.invoice_proto(row)
            if row["status"] == d.InvoiceStatus.ISSUED and row["number"] == number:
                return InvoicePosting(before, before, changed=False)
            issued = await self._issue(
                tx, contract, row, number=number, issued_at=issued_at, external_reference=reference
            )
            return InvoicePosting(issued, before, changed=True)
        values = await self._new_invoice(
            tx, contract, amount, invoice_id=new_id(), number=number, issued_at=issued_at, external_reference=reference
        )
        proto = v.invoice_proto(values)
        tx.publish(events_pb2.InvoiceIssued(invoice=proto, actor=v.actor(current_principal())), key=values["id"])
        return InvoicePosting(proto, None, changed=True)

    # ------------------------------------------------------------ account events

    async def repoint_account(self, tx: Transaction, *, duplicate_id: str, survivor_id: str) -> int:
        """account.merged: every record of the duplicate now belongs to the survivor. Each moved deal,
        contract, quote and invoice is published as it is now; a payment names its contract, not the account."""
        o, c, i = r.opportunities, r.contracts, r.invoices
        moved = (
            (await tx.conn.execute(select(o).where(o.c.account_id == duplicate_id).with_for_update())).mappings().all()
        )
        contracts = (
            (await tx.conn.execute(select(c).where(c.c.account_id == duplicate_id).with_for_update())).mappings().all()
        )
        invoices = (
            (await tx.conn.execute(select(i).where(i.c.account_id == duplicate_id).with_for_update())).mappings().all()
        )
        now = self.clock()
        if moved:
            await tx.conn.execute(
                update(o)
                .where(o.c.account_id == duplicate_id)
                .values(account_id=survivor_id, updated_at=now, version=o.c.version + 1)
            )
        await self._contracts_follow_account(tx, contracts, {"account_id": survivor_id}, now=now, reason=ACCOUNT_MERGED)
        moved_quotes = r.quotes.c.account_id == duplicate_id
        await self._quotes_follow(tx, moved_quotes, {"account_id": survivor_id}, reason=ACCOUNT_MERGED)
        await tx.conn.execute(
            update(r.payments).where(r.payments.c.account_id == duplicate_id).values(account_id=survivor_id)
        )
        # An invoice is versioned as the ERP keeps it: the moved one is its next version, not the same.
        await tx.conn.execute(
            update(i).where(i.c.account_id == duplicate_id).values(account_id=survivor_id, version=i.c.version + 1)
        )
        actor = v.actor(current_principal())
        for row in moved:
            proto = v.opportunity_proto(
                {**row, "account_id": survivor_id, "updated_at": now, "version": row["version"] + 1}
            )
            tx.publish(
                events_pb2.OpportunityUpdated(opportunity=proto, changed_fields=["account_id"], actor=actor),
                key=row["id"],
            )
        for row in invoices:
            tx.publish(
                events_pb2.InvoiceUpdated(
                    invoice=v.invoice_proto({**row, "account_id": survivor_id, "version": row["version"] + 1}),
                    changed_fields=["account_id"],
                    reason=ACCOUNT_MERGED,
                    actor=actor,
                ),
                key=row["id"],
            )
        return len(moved)

    async def follow_account_owner(
        self, tx: Transaction, *, account_id: str, previous_owner_id: str, new_owner_id: str, team: str, region: str
    ) -> int:
        """account.transferred: the previous owner's open deals and running contracts of the
        account move to the new owner (人走客户不走), each published as it is now."""
        o, c = r.opportunities, r.contracts
        now = self.clock()
        moved = (
            (
                await tx.conn.execute(
                    select(o)
                    .where(
                        o.c.account_id == account_id,
                        o.c.owner_id == previous_owner_id,
                        o.c.status == d.OpportunityStatus.OPEN.value,
                    )
                    .with_for_update()
                )
            )
            .mappings()
            .all()
        )
        contracts = (
            (
                await tx.conn.execute(
                    select(c)
                    .where(
                        c.c.account_id == account_id,
                        c.c.owner_id == previous_owner_id,
                        c.c.status.in_(r.ACTIVE_CONTRACT_STATUSES),
                    )
                    .with_for_update()
                )
            )
            .mappings()
            .all()
        )
        values: dict[str, Any] = {"owner_id": new_owner_id, "updated_at": now}
        if team:
            values["team"] = team
        if region:
            values["region"] = region
        ownership = {name: values[name] for name in OWNERSHIP if name in values}
        if moved:
            moved_ids = [row["id"] for row in moved]
            await tx.conn.execute(update(o).where(o.c.id.in_(moved_ids)).values(**values, version=o.c.version + 1))
            await self._quotes_follow(
                tx, r.quotes.c.opportunity_id.in_(moved_ids), ownership, reason=ACCOUNT_TRANSFERRED
            )
        await self._contracts_follow_account(tx, contracts, ownership, now=now, reason=ACCOUNT_TRANSFERRED)
        principal = current_principal()
        for row in moved:
            changed = sorted(name for name in ownership if ownership[name] != row[name])
            proto = v.opportunity_proto({**row, **values, "version": row["version"] + 1})
            tx.publish(
                events_pb2.OpportunityUpdated(opportunity=proto, changed_fields=changed, actor=v.actor(principal)),
                key=row["id"],
            )
        return len(moved)

    async def _contracts_follow_account(
        self, tx: Transaction, rows: Sequence[RowMapping], changes: dict[str, Any], *, now: datetime, reason: str
    ) -> None:
        """Saves `changes` to the contracts `rows` (locked), each in its next version, and publishes
        each as it is now: an ERP's latest event of a contract names its account and owner."""
        if not rows:
            return
        c = r.contracts
        await tx.conn.execute(
            update(c)
            .where(c.c.id.in_([row["id"] for row in rows]))
            .values(**changes, updated_at=now, version=c.c.version + 1)
        )
        actor = v.actor(current_principal())
        for row in rows:
            contract = await self._contract_proto(
                tx.conn, {**row, **changes, "updated_at": now, "version": row["version"] + 1}
            )
            changed = sorted(name for name in changes if changes[name] != row[name])
            tx.publish(
                events_pb2.ContractUpdated(contract=contract, changed_fields=changed, reason=reason, actor=actor),
                key=row["id"],
            )

    # ------------------------------------------------------------ shared paging

    async def _page(
        self,
        query: Any,
        table: Any,
        page: Page,
        convert: Callable[[v.Row], Any],
        *,
        sortable: Sequence[str] = ("created_at",),
    ) -> PageOf:
        """A keyset page of `query`, sorted by `page.sort` among the `sortable` columns of `table`
        (newest first by the first of them when none is asked for)."""
        column, descending = parse_sort(
            page.sort, {name: table.c[name] for name in sortable}, default=f"-{sortable[0]}"
        )
        limit = page_limit(page.limit)
        query = keyset_page(
            query, sort_column=column, id_column=table.c.id, descending=descending, cursor=page.cursor, limit=limit
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return PageOf(
            [convert(row) for row in rows[:limit]],
            next_cursor(rows, sort_key=column.key, descending=descending, limit=limit),
        )
