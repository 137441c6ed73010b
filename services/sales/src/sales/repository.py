"""Tables of the sales service (SQLAlchemy Core) and the queries the handlers share.

Money columns are `Amount`: NUMERIC(20, 4) on PostgreSQL; on SQLite (no decimal type, its
NUMERIC is a float) an integer of ten-thousandths, so sums stay exact there too. Every amount has
a currency column beside it.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from crm_platform.custom_fields_service import definitions_table
from crm_platform.db import UtcDateTime, insert_ignore
from crm_platform.idempotency import idempotency_table
from crm_platform.outbox import add_messaging_tables
from crm_platform.principal import RecordScope, scope_clause
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    func,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from sales.domain import CODE_LENGTH, REF_LENGTH, ContractStatus, OpportunityStatus

SCALE = Decimal("10000")


class Amount(TypeDecorator[Decimal]):
    """Exact money amounts on every dialect (see the module docstring)."""

    impl = Numeric(20, 4)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, 4, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return int((Decimal(value) * SCALE).to_integral_exact())

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)) / SCALE
        return Decimal(value)

    @property
    def python_type(self) -> type[Decimal]:
        return Decimal


metadata = MetaData()
add_messaging_tables(metadata)

_JSON = JSON().with_variant(JSONB(), "postgresql")
_ID = String(36)
# Ids of other services' records: opaque, up to REF_LENGTH characters.
_REF = String(REF_LENGTH)
_TS = UtcDateTime()
_NAME = String(200)
_CCY = String(3)


def _money(name: str) -> Column[Decimal]:
    return Column(name, Amount(), nullable=False, server_default="0")


pipelines = Table(
    "pipelines",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("name", _NAME, nullable=False),
    # Ordered stage definitions; small and always read whole.
    Column("stages", _JSON, nullable=False),
    Column("is_default", Boolean, nullable=False),
    Column("created_at", _TS, nullable=False),
    Column("version", BigInteger, nullable=False),
)

opportunities = Table(
    "opportunities",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("account_id", _REF, nullable=False),
    Column("primary_contact_id", _REF, nullable=False, server_default=""),
    Column("name", _NAME, nullable=False),
    Column("pipeline_id", _ID, ForeignKey("pipelines.id"), nullable=False),
    Column("stage", String(CODE_LENGTH), nullable=False),
    # Win probability of the stage in basis points (2500 = 25 %), so weighted sums are exact.
    Column("probability_bp", Integer, nullable=False),
    _money("amount"),
    Column("currency", _CCY, nullable=False),
    Column("expected_close_date", Date),
    Column("close_date", Date),
    # YYYYMM of the close date (closed deals) or the expected close date (open ones): the forecast bucket.
    Column("forecast_month", Integer),
    Column("forecast_category", String(16), nullable=False),
    Column("owner_id", _NAME, nullable=False),
    Column("team", _NAME, nullable=False, server_default=""),
    Column("region", _NAME, nullable=False, server_default=""),
    Column("source_lead_id", _REF, nullable=False, server_default=""),
    Column("campaign_id", _REF, nullable=False, server_default=""),
    Column("status", String(8), nullable=False),
    Column("lost_reason", Text, nullable=False, server_default=""),
    Column("next_step", Text, nullable=False, server_default=""),
    Column("product_line", _NAME, nullable=False, server_default=""),
    # Amounts inside are decimal strings.
    Column("line_items", _JSON, nullable=False),
    Column("stage_history", _JSON, nullable=False),
    Column("tags", _JSON, nullable=False),
    Column("custom", _JSON, nullable=False),
    Column("collision_override_by", _NAME, nullable=False, server_default=""),
    Column("collision_override_reason", Text, nullable=False, server_default=""),
    Column("colliding_opportunity_id", _ID, nullable=False, server_default=""),
    Column("external_id", _NAME),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("closed_at", _TS),
    Column("version", BigInteger, nullable=False),
    Column("stage_entered_at", _TS),
    # The product line as anti-collision compares it (`domain.product_line_key`, migration 0015).
    # Text: normalising may lengthen what fit in 200 characters ("ß" folds to "ss").
    Column("product_line_key", Text, nullable=False, server_default=""),
    UniqueConstraint("external_id", name="uq_opportunities_external_id"),
    # Rotting deals: open ones by stage and how long they have been there.
    Index("ix_opportunities_rotting", "status", "stage", "stage_entered_at"),
    Index("ix_opportunities_account_status", "account_id", "status"),
    # Anti-collision looks up open deals by account and normalised product line.
    Index("ix_opportunities_collision", "account_id", "product_line_key", "status"),
    Index("ix_opportunities_owner_status", "owner_id", "status"),
    Index("ix_opportunities_team_status", "team", "status"),
    Index("ix_opportunities_region", "region"),
    Index("ix_opportunities_campaign", "campaign_id"),
    # The forecast reads only these columns: an index-only scan instead of the wide rows.
    Index(
        "ix_opportunities_forecast_cover",
        "forecast_month",
        postgresql_include=[
            "owner_id",
            "team",
            "region",
            "currency",
            "status",
            "probability_bp",
            "forecast_category",
            "amount",
            "pipeline_id",
            "close_date",
        ],
    ),
    Index("ix_opportunities_stage", "pipeline_id", "stage"),
    Index("ix_opportunities_created", "created_at", "id"),
)

quotes = Table(
    "quotes",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("opportunity_id", _ID, ForeignKey("opportunities.id"), nullable=False),
    Column("account_id", _REF, nullable=False),
    Column("line_items", _JSON, nullable=False),
    _money("subtotal"),
    _money("discount_total"),
    _money("total"),
    Column("currency", _CCY, nullable=False),
    Column("max_discount_percent", Numeric(7, 4), nullable=False),
    Column("status", String(20), nullable=False),
    Column("approval_chain", _JSON, nullable=False),
    Column("decisions", _JSON, nullable=False),
    Column("owner_id", _NAME, nullable=False),
    Column("team", _NAME, nullable=False, server_default=""),
    Column("region", _NAME, nullable=False, server_default=""),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    # Who created the quote: never one of its approvers. "" for quotes older than 0008.
    Column("created_by", _NAME, nullable=False, server_default=""),
    # Who submitted its current line items for approval (its creator, or whoever changed them
    # since): never their approver. "" for quotes older than 0008.
    Column("submitted_by", _NAME, nullable=False, server_default=""),
    Index("ix_quotes_opportunity", "opportunity_id", "created_at"),
    Index("ix_quotes_status", "status"),
    Index("ix_quotes_owner", "owner_id"),
    Index("ix_quotes_team", "team"),
)

contracts = Table(
    "contracts",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("number", String(32), nullable=False, unique=True),
    Column("opportunity_id", _ID, nullable=False, server_default=""),
    Column("account_id", _REF, nullable=False),
    Column("title", _NAME, nullable=False),
    _money("amount"),
    Column("currency", _CCY, nullable=False),
    # Kept with the contract under its row lock: what was paid and invoiced (non-void) so far.
    _money("paid_amount"),
    _money("invoiced_amount"),
    Column("status", String(20), nullable=False),
    Column("approval_chain", _JSON, nullable=False),
    # Resubmitting a rejected contract starts a new round; earlier decisions stay on record.
    Column("approval_round", Integer, nullable=False, server_default="0"),
    Column("owner_id", _NAME, nullable=False),
    Column("team", _NAME, nullable=False, server_default=""),
    Column("region", _NAME, nullable=False, server_default=""),
    Column("starts_on", Date),
    Column("ends_on", Date),
    Column("signed_at", _TS),
    Column("completed_at", _TS),
    Column("terminated_at", _TS),
    Column("terminated_reason", Text, nullable=False, server_default=""),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    # Who submitted the current approval round: never one of its approvers. "" before 0008.
    Column("submitted_by", _NAME, nullable=False, server_default=""),
    # Who created the contract, setting its terms: never one of its approvers. "" before 0016.
    Column("created_by", _NAME, nullable=False, server_default=""),
    Index("ix_contracts_account_status", "account_id", "status"),
    Index("ix_contracts_opportunity", "opportunity_id"),
    Index("ix_contracts_owner", "owner_id"),
    Index("ix_contracts_team", "team"),
    Index("ix_contracts_region", "region"),
    Index("ix_contracts_created", "created_at", "id"),
)

# Every approval decision, append-only: who, which role, what, when, why.
contract_decisions = Table(
    "contract_decisions",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("contract_id", _ID, ForeignKey("contracts.id"), nullable=False),
    Column("round", Integer, nullable=False),
    Column("role", String(64), nullable=False),
    Column("approver_id", _NAME, nullable=False),
    Column("decision", String(16), nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("decided_at", _TS, nullable=False),
    Index("ix_contract_decisions_contract", "contract_id", "decided_at"),
)

# The last contract number handed out per month (row-locked by the UPDATE that increments it).
contract_sequences = Table(
    "contract_sequences",
    metadata,
    Column("month", Integer, primary_key=True),
    Column("last_value", Integer, nullable=False),
)

payment_plans = Table(
    "payment_plans",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("contract_id", _ID, ForeignKey("contracts.id"), nullable=False, unique=True),
    _money("total"),
    Column("currency", _CCY, nullable=False),
    Column("created_at", _TS, nullable=False),
    # Counts the replacements of its installments; payments do not change it.
    Column("version", BigInteger, nullable=False, server_default="1"),
)

installments = Table(
    "installments",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("plan_id", _ID, ForeignKey("payment_plans.id"), nullable=False),
    Column("contract_id", _ID, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("due_date", Date, nullable=False),
    _money("amount"),
    _money("paid"),
    Column("currency", _CCY, nullable=False),
    Column("status", String(16), nullable=False),
    Column("overdue_at", _TS),
    Index("ix_installments_contract", "contract_id", "due_date", "sequence"),
    # The overdue timer's claim: open installments by due date.
    Index("ix_installments_due", "status", "due_date"),
)

payments = Table(
    "payments",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("contract_id", _ID, ForeignKey("contracts.id"), nullable=False),
    Column("account_id", _REF, nullable=False),
    _money("amount"),
    Column("currency", _CCY, nullable=False),
    Column("received_at", _TS, nullable=False),
    Column("method", String(CODE_LENGTH), nullable=False, server_default=""),
    # The idempotency key of postings (API and ERP topic alike).
    Column("external_reference", _NAME, nullable=False, unique=True),
    Column("allocations", _JSON, nullable=False),
    Column("created_at", _TS, nullable=False),
    Index("ix_payments_contract", "contract_id", "created_at"),
    Index("ix_payments_account", "account_id"),
)

invoices = Table(
    "invoices",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("contract_id", _ID, ForeignKey("contracts.id"), nullable=False),
    Column("account_id", _REF, nullable=False),
    Column("number", String(CODE_LENGTH), unique=True),
    _money("amount"),
    Column("currency", _CCY, nullable=False),
    Column("status", String(16), nullable=False),
    Column("external_reference", _NAME, unique=True),
    Column("requested_at", _TS, nullable=False),
    Column("issued_at", _TS),
    Column("voided_at", _TS),
    Column("void_reason", Text, nullable=False, server_default=""),
    Column("version", BigInteger, nullable=False),
    Index("ix_invoices_contract", "contract_id", "requested_at"),
    Index("ix_invoices_account", "account_id"),
    Index("ix_invoices_status", "status"),
)

# Sales targets (业绩目标): an owner's (owner_id and their team) or a team's (owner_id ""), per
# month or quarter. Region is always "": `scope_clause` reads targets as it reads other records.
targets = Table(
    "targets",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("owner_id", _NAME, nullable=False, server_default=""),
    Column("team", _NAME, nullable=False, server_default=""),
    Column("region", _NAME, nullable=False, server_default=""),
    # "2026-12" or "2026-Q4"; its months as YYYYMM, so range filters compare integers.
    Column("period", String(7), nullable=False),
    Column("first_month", Integer, nullable=False),
    Column("last_month", Integer, nullable=False),
    _money("amount"),
    Column("currency", _CCY, nullable=False),
    Column("set_by", _NAME, nullable=False),
    Column("created_at", _TS, nullable=False),
    Column("updated_at", _TS, nullable=False),
    Column("version", BigInteger, nullable=False),
    # One target per owner and period, one per team and period (a team's target has no owner).
    Index(
        "uq_targets_owner_period",
        "owner_id",
        "period",
        unique=True,
        postgresql_where=text("owner_id <> ''"),
        sqlite_where=text("owner_id <> ''"),
    ),
    Index(
        "uq_targets_team_period",
        "team",
        "period",
        unique=True,
        postgresql_where=text("owner_id = ''"),
        sqlite_where=text("owner_id = ''"),
    ),
    Index("ix_targets_team_months", "team", "first_month"),
    Index("ix_targets_created", "created_at", "id"),
)

# Definitions of the custom fields of opportunities (served by crm_platform's CustomFieldServicer).
custom_fields = definitions_table(metadata, "custom_fields")

# Creating calls remember their idempotency key with what they created.
idempotency_keys = idempotency_table(metadata)


# ---------------------------------------------------------------- shared queries


async def load(
    conn: AsyncConnection, table: Table, record_id: str, *, scope: RecordScope | None = None, lock: bool = False
) -> RowMapping | None:
    """One row by id, within the caller's scope; locked for update when the caller will change it."""
    query = select(table).where(table.c.id == record_id)
    if scope is not None:
        query = query.where(scope_clause(table, scope))
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).mappings().first()


# Values a query names at once in an IN list (well within every driver's limit).
IN_LIST_CHUNK = 1000


async def deals_by_external_id(conn: AsyncConnection, external_ids: Sequence[str]) -> dict[str, RowMapping]:
    """The deals already imported under `external_ids`, by external id: their id and who owns them."""
    o = opportunities
    found: dict[str, RowMapping] = {}
    for start in range(0, len(external_ids), IN_LIST_CHUNK):
        query = select(o.c.external_id, o.c.id, o.c.owner_id, o.c.team, o.c.region).where(
            o.c.external_id.in_(external_ids[start : start + IN_LIST_CHUNK])
        )
        found.update({row["external_id"]: row for row in (await conn.execute(query)).mappings()})
    return found


async def open_deals_on(
    conn: AsyncConnection, lines: Collection[tuple[str, str]], *, exclude_id: str = ""
) -> dict[tuple[str, str], list[RowMapping | dict[str, Any]]]:
    """Open opportunities of each (account id, normalised product line) of `lines`, every owner,
    oldest first (anti-collision)."""
    o = opportunities
    found: dict[tuple[str, str], list[RowMapping | dict[str, Any]]] = {}
    ordered = sorted(lines)
    for start in range(0, len(ordered), IN_LIST_CHUNK):
        query = (
            select(o.c.id, o.c.owner_id, o.c.name, o.c.team, o.c.region, o.c.account_id, o.c.product_line_key)
            .where(
                tuple_(o.c.account_id, o.c.product_line_key).in_(ordered[start : start + IN_LIST_CHUNK]),
                o.c.status == OpportunityStatus.OPEN.value,
            )
            .order_by(o.c.created_at, o.c.id)
        )
        if exclude_id:
            query = query.where(o.c.id != exclude_id)
        for row in (await conn.execute(query)).mappings():
            found.setdefault((row["account_id"], row["product_line_key"]), []).append(row)
    return found


async def next_contract_sequence(conn: AsyncConnection, month: int) -> int:
    """Increments the month's counter under its row lock; the first contract of a month creates it."""
    await insert_ignore(conn, contract_sequences, {"month": month, "last_value": 0}, keys=["month"])
    result = await conn.execute(
        update(contract_sequences)
        .where(contract_sequences.c.month == month)
        .values(last_value=contract_sequences.c.last_value + 1)
        .returning(contract_sequences.c.last_value)
    )
    return int(result.scalar_one())


async def hold_signed_contracts(conn: AsyncConnection, contract_ids: Collection[str]) -> dict[str, str]:
    """The account of each of these contracts still signed, each held (FOR SHARE) until the
    transaction ends: one terminated or completed meanwhile is left out, and so is one being changed
    right now (SKIP LOCKED: its change may wait on rows this transaction holds, and it is seen as it
    ends by the next round)."""
    if not contract_ids:
        return {}
    query = select(contracts.c.id, contracts.c.account_id).where(
        contracts.c.id.in_(sorted(contract_ids)), contracts.c.status == ContractStatus.SIGNED.value
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True, skip_locked=True)
    return {contract_id: account_id for contract_id, account_id in await conn.execute(query)}


async def contract_decisions_of(conn: AsyncConnection, contract_id: str) -> Sequence[RowMapping]:
    return (
        (
            await conn.execute(
                select(contract_decisions)
                .where(contract_decisions.c.contract_id == contract_id)
                .order_by(contract_decisions.c.decided_at, contract_decisions.c.id)
            )
        )
        .mappings()
        .all()
    )


async def plan_of(conn: AsyncConnection, contract_id: str) -> RowMapping | None:
    return (
        (await conn.execute(select(payment_plans).where(payment_plans.c.contract_id == contract_id))).mappings().first()
    )


async def installments_of(conn: AsyncConnection, contract_id: str, *, lock: bool = False) -> Sequence[RowMapping]:
    query = (
        select(installments)
        .where(installments.c.contract_id == contract_id)
        .order_by(installments.c.due_date, installments.c.sequence)
    )
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).mappings().all()


async def payment_by_reference(conn: AsyncConnection, reference: str) -> RowMapping | None:
    return (await conn.execute(select(payments).where(payments.c.external_reference == reference))).mappings().first()


async def invoice_by_reference(conn: AsyncConnection, reference: str) -> RowMapping | None:
    return (await conn.execute(select(invoices).where(invoices.c.external_reference == reference))).mappings().first()


async def overdue_amounts(conn: AsyncConnection, contract_ids: Sequence[str], today: date) -> dict[str, Decimal]:
    """What is past due and unpaid per contract."""
    if not contract_ids:
        return {}
    rows = await conn.execute(
        select(installments.c.contract_id, amount_sum(installments.c.amount - installments.c.paid))
        .where(
            installments.c.contract_id.in_(contract_ids),
            installments.c.due_date < today,
            installments.c.paid < installments.c.amount,
        )
        .group_by(installments.c.contract_id)
    )
    return {contract_id: as_amount(total) for contract_id, total in rows}


@dataclass(frozen=True, slots=True)
class AccountTotals:
    """Per currency, over every contract of one account the caller may see."""

    outstanding: dict[str, Decimal]
    overdue: dict[str, Decimal]
    lifetime_paid: dict[str, Decimal]


async def account_totals(
    conn: AsyncConnection, account_id: str, scope: RecordScope, in_force: Sequence[str], today: date
) -> AccountTotals:
    """Two grouped aggregates, however many contracts the account has (the page shows only some)."""
    c, i = contracts, installments
    of_account = (c.c.account_id == account_id, scope_clause(c, scope))
    in_force_clause = c.c.status.in_(list(in_force))
    money = await conn.execute(
        select(
            c.c.currency,
            amount_sum(case((in_force_clause, c.c.amount - c.c.paid_amount), else_=0)),
            amount_sum(c.c.paid_amount),
        )
        .where(*of_account)
        .group_by(c.c.currency)
    )
    outstanding: dict[str, Decimal] = {}
    lifetime: dict[str, Decimal] = {}
    for currency, owed, paid in money:
        outstanding[currency], lifetime[currency] = as_amount(owed), as_amount(paid)
    late = await conn.execute(
        select(c.c.currency, amount_sum(i.c.amount - i.c.paid))
        .join(c, c.c.id == i.c.contract_id)
        .where(*of_account, in_force_clause, i.c.due_date < today, i.c.paid < i.c.amount)
        .group_by(c.c.currency)
    )
    overdue = {currency: Decimal(0) for currency in outstanding} | {
        currency: as_amount(total) for currency, total in late
    }
    return AccountTotals(outstanding, overdue, lifetime)


async def next_due_dates(conn: AsyncConnection, contract_ids: Sequence[str]) -> dict[str, date]:
    if not contract_ids:
        return {}
    rows = await conn.execute(
        select(installments.c.contract_id, func.min(installments.c.due_date))
        .where(installments.c.contract_id.in_(contract_ids), installments.c.paid < installments.c.amount)
        .group_by(installments.c.contract_id)
    )
    return {contract_id: due for contract_id, due in rows}


def amount_sum(expression: ColumnElement[Any]) -> ColumnElement[Decimal]:
    """SUM of an amount expression read back through `Amount` (arithmetic on the columns would
    otherwise lose the type, and with it SQLite's scaling)."""
    return type_coerce(func.sum(expression), Amount())


def as_amount(value: Any) -> Decimal:
    """Aggregates of an Amount expression come back through its type; None (no rows) is zero."""
    return Decimal(0) if value is None else Decimal(value)


ACTIVE_CONTRACT_STATUSES = tuple(
    s.value
    for s in (
        ContractStatus.DRAFT,
        ContractStatus.PENDING_APPROVAL,
        ContractStatus.APPROVED,
        ContractStatus.REJECTED,
        ContractStatus.SIGNED,
    )
)
