"""Sales use cases on PostgreSQL: gates, anti-collision, forecast SQL, the contract-to-cash flow,
idempotency, overdue detection with concurrent replicas, scope, account events."""

import asyncio
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from crm.audit.v1.events_pb2 import AuditRecorded
from crm.common.v1 import common_pb2
from crm.common.v1 import custom_fields_pb2 as cf_pb
from crm.erp.v1 import invoices_pb2, payments_pb2
from crm.sales.v1 import events_pb2, sales_pb2, sales_service_pb2
from crm_platform import idempotency
from crm_platform.cloudevents import CloudEventHeaders
from crm_platform.consumer import ReceivedEvent
from crm_platform.custom_fields_service import CustomFieldServicer
from crm_platform.errors import (
    AlreadyExists,
    Conflict,
    CrmError,
    NotFound,
    PermissionDenied,
    StaleVersion,
    ValidationFailed,
)
from crm_platform.ids import new_id
from crm_platform.money import Money
from crm_platform.timeutil import utcnow
from google.protobuf import json_format
from sales import domain as d
from sales import handlers as handlers_module
from sales import repository
from sales.__main__ import build_handlers
from sales.config import SalesSettings
from sales.consumers import SalesConsumers
from sales.handlers import (
    DEFAULT_PIPELINE_ID,
    OPPORTUNITY_ENTITY,
    ForecastQuery,
    ImportResult,
    ImportRow,
    LineItemIn,
    OpportunityIn,
    Page,
    SalesHandlers,
)
from sales.repository import custom_fields, idempotency_keys, metadata
from sales.servicer import SalesServicer
from sales.testing import Clock, as_user, make_handlers, migrated_engine
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


def cny(amount: str) -> Money:
    return Money(Decimal(amount), "CNY")


def kwd(amount: str) -> Money:
    return Money(Decimal(amount), "KWD")


def item(line: str = "GTX", price: str = "1000", quantity: str = "1", discount: str = "0") -> LineItemIn:
    return LineItemIn("p-" + line, line + " Basic", line, Decimal(quantity), cny(price), Decimal(discount))


async def outbox_types(engine: AsyncEngine) -> list[str]:
    outbox = metadata.tables["outbox"]
    async with engine.connect() as conn:
        return list((await conn.execute(select(outbox.c.type).order_by(outbox.c.seq))).scalars())


async def outbox_events(engine: AsyncEngine, event_type: str) -> list[bytes]:
    outbox = metadata.tables["outbox"]
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.payload).where(outbox.c.type == event_type).order_by(outbox.c.seq))
        return list(rows.scalars())


async def outbox_keyed(engine: AsyncEngine, event_type: str) -> list[tuple[str, bytes]]:
    """The (key, payload) of each event of `event_type` in the outbox, oldest first."""
    outbox = metadata.tables["outbox"]
    async with engine.connect() as conn:
        query = select(outbox.c.key, outbox.c.payload).where(outbox.c.type == event_type).order_by(outbox.c.seq)
        return [(key, payload) for key, payload in await conn.execute(query)]


async def won_deal(sales: SalesHandlers, amount: str = "50000", owner: str = "rep1") -> str:
    with as_user(owner, "sales_rep"):
        opp = await sales.create_opportunity(
            OpportunityIn(account_id="acc-1", name="Deal", primary_contact_id="c1", line_items=[item(price=amount)])
        )
        won = (await sales.win(opp.id, expected_version=0, close_date=None, amount=None)).record
    assert won.status == "won"
    return won.id


async def quote_updates(engine: AsyncEngine) -> list[tuple[str, events_pb2.QuoteUpdated]]:
    return [
        (key, events_pb2.QuoteUpdated.FromString(p)) for key, p in await outbox_keyed(engine, "crm.sales.quote.updated")
    ]


async def quote_approvals(engine: AsyncEngine) -> list[events_pb2.QuoteApproved]:
    return [events_pb2.QuoteApproved.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.approved")]


async def signed_contract(sales: SalesHandlers, amount: str = "50000") -> str:
    opportunity_id = await won_deal(sales, amount)
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        await sales.submit_contract(contract.id, expected_version=0)
    for role in d.contract_approval_chain(cny(amount), d.ContractThresholds()):
        with as_user(f"{role}-1", role):
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="ok")
    with as_user("rep1", "sales_rep"):
        signed = (await sales.sign_contract(contract.id, expected_version=0, signed_at=None)).record
    assert signed.status == "signed"
    return contract.id


async def direct_contract(
    sales: SalesHandlers,
    amount: str,
    *,
    idempotency_key: str = "",
    title: str = "T",
    currency: str = "CNY",
    owner_id: str = "",
) -> Any:
    """A contract without a deal, owned by the caller (or by `owner_id`, as a manager may set)."""
    return await sales.create_contract(
        idempotency_key=idempotency_key, opportunity_id="", account_id="acc-1", title=title,
        amount=Money(Decimal(amount), currency), owner_id=owner_id, team="", region="", starts_on=None, ends_on=None,
    )  # fmt: skip


def sales_with_rates(engine: AsyncEngine, **rates: str) -> SalesHandlers:
    """Handlers as `crm-sales serve` builds them, with these exchange rates to CNY."""
    settings = SalesSettings(contract_exchange_rates={currency: Decimal(rate) for currency, rate in rates.items()})
    return build_handlers(settings, engine)


def erp_invoice(
    contract_id: str, amount: str, number: str, reference: str, invoice_id: str = ""
) -> invoices_pb2.ErpInvoiceIssued:
    return invoices_pb2.ErpInvoiceIssued(
        contract_id=contract_id,
        amount=common_pb2.Money(amount=amount, currency="CNY"),
        number=number,
        external_reference=reference,
        invoice_id=invoice_id,
    )


async def erp_posts(sales: SalesHandlers, message: invoices_pb2.ErpInvoiceIssued) -> None:
    """Applies a posting as the consumer of erp.invoices.v1 does: in a transaction, as a new event."""
    headers = CloudEventHeaders(id=new_id(), type="erp.invoice.issued", source="/erp/sap", time=utcnow())
    event = ReceivedEvent(headers, message, message.contract_id, "erp.invoices.v1", 0, 0)
    async with sales.uow.begin() as tx:
        await SalesConsumers(sales).erp_invoice_issued(tx, event)


async def erp_refuses(sales: SalesHandlers, message: invoices_pb2.ErpInvoiceIssued) -> CrmError:
    """The domain error that sends a posting to the dead-letter topic."""
    with pytest.raises(CrmError) as raised:
        await erp_posts(sales, message)
    return raised.value


def fields_of(error: pytest.ExceptionInfo[ValidationFailed]) -> list[str]:
    return [e.field for e in error.value.errors]


def refusals(error: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str, str]]:
    return [(e.field, e.message) for e in error.value.errors]


def invoice_row(invoice: sales_pb2.Invoice) -> tuple[str, str, str, str]:
    return (invoice.status, invoice.number, invoice.amount.amount, invoice.external_reference)


# ---------------------------------------------------------------- pipelines and gates


async def test_the_default_pipeline_is_seeded_with_the_spec_stages(sales: SalesHandlers) -> None:
    pipeline = await sales.get_pipeline("")
    assert pipeline.is_default
    assert [(s.key, s.probability) for s in pipeline.stages] == [
        (s.key, format(s.probability, "f")) for s in d.DEFAULT_STAGES
    ]
    assert [tuple(s.required_fields) for s in pipeline.stages] == [s.required_fields for s in d.DEFAULT_STAGES]


async def test_a_stage_gate_names_the_missing_fields(sales: SalesHandlers, engine: AsyncEngine) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        assert opp.stage == "initial_contact" and opp.probability == "10"
        with pytest.raises(ValidationFailed) as raised:
            await sales.move_stage(opp.id, stage="quote_negotiation", expected_version=opp.version)
        assert [e.field for e in raised.value.errors] == [
            "primary_contact_id", "expected_close_date", "amount", "line_items",
        ]  # fmt: skip
        await sales.update_opportunity(
            opp.id,
            expected_version=opp.version,
            changes={"primary_contact_id": "c1", "expected_close_date": date(2026, 12, 31), "line_items": [item()]},
        )
        moved = (await sales.move_stage(opp.id, stage="quote_negotiation", expected_version=0)).record
        with pytest.raises(StaleVersion):
            await sales.move_stage(opp.id, stage="solution_demo", expected_version=opp.version)
    assert moved.stage == "quote_negotiation" and moved.probability == "75"
    assert moved.amount.amount == "1000.00"
    assert [(h.stage, h.HasField("exited_at")) for h in moved.stage_history] == [
        ("initial_contact", True),
        ("quote_negotiation", False),
    ]
    assert await outbox_types(engine) == [
        "crm.sales.opportunity.created",
        "crm.sales.opportunity.updated",
        "crm.sales.opportunity.stage_changed",
    ]


async def test_closing_goes_through_win_and_lose_only(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        with pytest.raises(ValidationFailed):
            await sales.move_stage(opp.id, stage="won", expected_version=0)
        with pytest.raises(ValidationFailed) as raised:
            await sales.win(opp.id, expected_version=0, close_date=None, amount=None)
        assert raised.value.errors[0].field == "amount"
        with pytest.raises(ValidationFailed):
            await sales.lose(opp.id, expected_version=0, reason=" ", close_date=None)
        lost = (await sales.lose(opp.id, expected_version=0, reason="budget", close_date=date(2026, 11, 20))).record
        assert (lost.status, lost.stage, lost.lost_reason, lost.close_date) == ("lost", "lost", "budget", "2026-11-20")
        with pytest.raises(Conflict):
            await sales.win(opp.id, expected_version=0, close_date=None, amount=cny("5"))


async def test_winning_a_deal_keeps_the_currency_of_its_line_items(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal", line_items=[item()]))
        with pytest.raises(ValidationFailed) as raised:
            await sales.win(opp.id, expected_version=0, close_date=None, amount=Money(Decimal(900), "USD"))
        assert fields_of(raised) == ["amount.currency"]
        won = (await sales.win(opp.id, expected_version=0, close_date=None, amount=cny("900"))).record
    assert (won.amount.amount, won.amount.currency) == ("900.00", "CNY")


# ---------------------------------------------------------------- anti-collision


async def test_anti_collision_names_the_open_deal_and_a_manager_override_is_recorded(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="A", line_items=[item("GTX")]))
        # Another product line, or the same owner, is no collision.
        await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="A2", line_items=[item("MG")]))
        await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="A3", product_line="GTX"))
    with as_user("bob", "sales_rep"):
        with pytest.raises(Conflict) as raised:
            await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="B", product_line="GTX"))
        assert raised.value.existing_id == first.id
        with pytest.raises(PermissionDenied):
            await sales.create_opportunity(
                OpportunityIn(account_id="acc-9", name="B", product_line="GTX"),
                override_collision=True,
                override_reason="bob owns the relationship",
            )
    with as_user("manager", "sales_manager"):
        with pytest.raises(ValidationFailed) as raised_reason:
            await sales.create_opportunity(
                OpportunityIn(account_id="acc-9", name="B", product_line="GTX", owner_id="bob"), override_collision=True
            )
        assert raised_reason.value.errors[0].field == "override_reason"
        overridden = await sales.create_opportunity(
            OpportunityIn(account_id="acc-9", name="B", product_line="GTX", owner_id="bob"),
            override_collision=True,
            override_reason="bob owns the relationship",
        )
    assert (overridden.owner_id, overridden.collision_override_by, overridden.colliding_opportunity_id) == (
        "bob", "manager", first.id,
    )  # fmt: skip
    [payload] = (await outbox_events(engine, "crm.sales.opportunity.created"))[-1:]
    assert events_pb2.OpportunityCreated.FromString(payload).opportunity.collision_override_reason == (
        "bob owns the relationship"
    )


async def test_a_deal_keeps_an_owner(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="A"))
        with pytest.raises(ValidationFailed) as raised:
            await sales.update_opportunity(deal.id, expected_version=0, changes={"owner_id": "  "})
        assert [e.field for e in raised.value.errors] == ["owner_id"]
        assert (await sales.get_opportunity(deal.id)).owner_id == "alice"


async def test_moving_a_deal_into_a_collision_needs_a_managers_override_with_a_reason(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="A", product_line="GTX"))
    with as_user("bob", "sales_rep"):
        moving = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="B", product_line="MG"))
        with pytest.raises(Conflict) as raised:
            await sales.update_opportunity(moving.id, expected_version=0, changes={"product_line": "GTX"})
        assert raised.value.existing_id == first.id
    with as_user("manager", "sales_manager"):
        with pytest.raises(ValidationFailed) as raised_reason:
            await sales.update_opportunity(
                moving.id, expected_version=0, changes={"product_line": "GTX"}, override_collision=True
            )
        assert raised_reason.value.errors[0].field == "override_reason"
        moved = (
            await sales.update_opportunity(
                moving.id,
                expected_version=0,
                changes={"product_line": "GTX"},
                override_collision=True,
                override_reason="bob runs the GTX roll-out",
            )
        ).record
    assert (moved.product_line, moved.collision_override_by, moved.colliding_opportunity_id) == (
        "GTX", "manager", first.id,
    )  # fmt: skip
    assert moved.collision_override_reason == "bob runs the GTX roll-out"


async def test_a_closed_deal_does_not_collide(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="A", product_line="GTX"))
        await sales.lose(first.id, expected_version=0, reason="no budget", close_date=None)
    with as_user("bob", "sales_rep"):
        second = await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="B", product_line="GTX"))
    assert second.owner_id == "bob"


async def test_a_collision_names_the_deal_it_meets_but_says_whose_only_to_who_may_read_it(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep", scope="own"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-c", name="Secret bid", product_line="X"))
    with as_user("bob", "sales_rep", scope="own"), pytest.raises(Conflict) as hidden:
        await sales.create_opportunity(OpportunityIn(account_id="acc-c", name="Mine", product_line="X"))
    with as_user("mgr", "sales_manager", scope="team"), pytest.raises(Conflict) as named:
        await sales.create_opportunity(OpportunityIn(account_id="acc-c", name="Team's", product_line="X"))

    assert hidden.value.existing_id == named.value.existing_id == first.id
    assert "Secret bid" not in hidden.value.detail and "alice" not in hidden.value.detail
    assert "'Secret bid'" in named.value.detail and "alice" in named.value.detail


async def test_concurrent_creations_by_two_owners_let_exactly_one_through(sales: SalesHandlers) -> None:
    async def create(owner: str) -> str:
        with as_user(owner, "sales_rep"):
            try:
                opp = await sales.create_opportunity(OpportunityIn(account_id="acc-r", name=owner, product_line="X"))
            except Conflict:
                return "conflict"
            return opp.id

    results = await asyncio.gather(*(create(f"rep{n}") for n in range(6)))
    assert sum(result != "conflict" for result in results) == 1


async def test_product_lines_collide_whatever_their_case_width_or_spacing(sales_each_database: SalesHandlers) -> None:
    sales = sales_each_database
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="A", product_line=" Cloud ERP "))
    with as_user("bob", "sales_rep"):
        existing = []
        full_width = "\uff23\uff4c\uff4f\uff55\uff44\u3000\uff25\uff32\uff30"  # as a Chinese IME types it
        for written in ("cloud erp", "CLOUD ERP", "Cloud  ERP", full_width):
            with pytest.raises(Conflict) as raised:
                await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="B", product_line=written))
            existing.append((raised.value.reason, raised.value.existing_id))
        # A deal without a product line of its own takes its first line item's, compared the same way.
        with pytest.raises(Conflict) as by_item:
            await sales.create_opportunity(OpportunityIn(account_id="acc-9", name="B", line_items=[item(" cloud erp")]))
        elsewhere = await sales.create_opportunity(
            OpportunityIn(account_id="acc-8", name="B", line_items=[item(" cloud  ERP ")])
        )
    assert existing == [("OPPORTUNITY_COLLISION", first.id)] * 4
    assert by_item.value.existing_id == first.id
    # Each deal shows its product line as it was written, trimmed.
    assert (first.product_line, elsewhere.product_line) == ("Cloud ERP", "cloud  ERP")


async def test_a_deal_moved_or_handed_into_a_product_line_written_otherwise_collides(
    sales_each_database: SalesHandlers,
) -> None:
    sales = sales_each_database
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="A", product_line="Cloud ERP"))
    with as_user("bob", "sales_rep"):
        moving = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="B", product_line="MG"))
        with pytest.raises(Conflict) as moved:
            await sales.update_opportunity(moving.id, expected_version=0, changes={"product_line": " CLOUD  erp "})
    with as_user("mgr", "sales_manager"):
        joint = await sales.create_opportunity(
            OpportunityIn(account_id="acc-7", name="C", product_line="cloud erp", owner_id="bob"),
            override_collision=True,
            override_reason="joint bid",
        )
        with pytest.raises(Conflict) as handed:  # carol would collide with alice's deal
            await sales.assign_opportunity(joint.id, expected_version=0, owner_id="carol", team="", region="")
        renamed = (
            await sales.update_opportunity(moving.id, expected_version=0, changes={"product_line": " Cloud ERP 2 "})
        ).record
    with as_user("bob", "sales_rep"):  # spelling the line otherwise does not move the deal into it again
        respelt = (
            await sales.update_opportunity(joint.id, expected_version=0, changes={"product_line": "Cloud ERP"})
        ).record
    assert [moved.value.existing_id, handed.value.existing_id] == [first.id, first.id]
    assert (joint.colliding_opportunity_id, renamed.product_line) == (first.id, "Cloud ERP 2")
    assert (respelt.product_line, respelt.collision_override_reason) == ("Cloud ERP", "joint bid")


# ---------------------------------------------------------------- idempotency and scope


async def test_a_repeated_idempotency_key_returns_the_first_result(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        data = OpportunityIn(account_id="acc-1", name="Deal", source_lead_id="lead-1")
        results = await asyncio.gather(
            *(sales.create_opportunity(data, idempotency_key="convert-lead-1") for _ in range(4))
        )
        listed = await sales.list_opportunities(Page(), account_id="acc-1")
    assert len({r.id for r in results}) == 1
    assert len(listed.items) == 1


async def test_idempotency_keys_are_per_caller(sales: SalesHandlers) -> None:
    """Two users sending one key make two requests: each gets their own record, never the other's
    (out of their scope); a user repeating a key gets their first result."""
    with as_user("repA", "sales_rep", team="east", scope="own"):
        first = await direct_contract(sales, "10", idempotency_key="contract-1", title="A's")
    with as_user("repB", "sales_rep", team="west", scope="own"):
        other = await direct_contract(sales, "20", idempotency_key="contract-1", title="B's")
        assert (await sales.get_contract(other.id)).title == "B's"
    with as_user("repA", "sales_rep", team="east", scope="own"):
        again = await direct_contract(sales, "10", idempotency_key="contract-1", title="A's again")
    assert other.id != first.id and (other.owner_id, other.team, other.title) == ("repB", "west", "B's")
    assert (again.id, again.title) == (first.id, "A's")


async def test_records_outside_the_scope_read_as_not_found(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep", scope="own"):
        mine = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Mine"))
    with as_user("bob", "sales_rep", scope="own"):
        with pytest.raises(NotFound):
            await sales.get_opportunity(mine.id)
        assert (await sales.list_opportunities(Page())).items == []
        with pytest.raises(NotFound):
            await sales.move_stage(mine.id, stage="needs_confirmed", expected_version=0)
    with as_user("carol", "sales_manager", team="east", scope="team"):
        assert [o.id for o in (await sales.list_opportunities(Page())).items] == [mine.id]


async def test_list_filters_and_paging(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        for n in range(7):
            opp = await sales.create_opportunity(OpportunityIn(account_id=f"acc-{n % 2}", name=f"Deal {n}"))
            if n % 3 == 0:
                await sales.lose(opp.id, expected_version=0, reason="x", close_date=None)
        seen: list[str] = []
        cursor = ""
        while True:
            page = await sales.list_opportunities(Page(limit=2, cursor=cursor), account_id="acc-0", statuses=["open"])
            seen += [o.name for o in page.items]
            cursor = page.next_cursor
            if not cursor:
                break
        with pytest.raises(ValidationFailed):
            await sales.list_opportunities(Page(), statuses=["maybe"])
    assert sorted(seen) == ["Deal 2", "Deal 4"]


async def test_the_deals_a_campaign_brought_are_listed_whoever_owns_them_for_who_sees_all(
    sales: SalesHandlers,
) -> None:
    with as_user("rep1", "sales_rep"):
        mine = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Expo deal", campaign_id="expo"))
        await sales.create_opportunity(OpportunityIn(account_id="acc-2", name="Walk-in"))
    with as_user("rep2", "sales_rep", scope="own"):
        theirs = await sales.create_opportunity(OpportunityIn(account_id="acc-3", name="Expo too", campaign_id="expo"))
        own_view = await sales.list_opportunities(Page(), campaign_id="expo")
    with as_user("admin", "admin"):
        everyone = await sales.list_opportunities(Page(), campaign_id="expo")

    assert [o.id for o in own_view.items] == [theirs.id]
    assert sorted(o.id for o in everyone.items) == sorted([mine.id, theirs.id])


# ---------------------------------------------------------------- forecast


async def test_forecast_sql_matches_the_domain_reference(sales: SalesHandlers) -> None:
    rng = random.Random(7)
    reference: list[d.ForecastDeal] = []
    stages = [s for s in d.DEFAULT_STAGES if s.outcome is d.Outcome.OPEN]
    rows = []
    for n in range(300):
        owner = f"rep{n % 4}"
        team = "east" if n % 4 < 2 else "west"
        stage = rng.choice(stages)
        amount = Decimal(rng.randint(1, 10_000_000)) / 100
        month_day = date(2026, rng.randint(1, 12), rng.randint(1, 28))
        status = rng.choice(["open", "open", "won", "lost"])
        category = rng.choice([None, *d.ForecastCategory])
        rows.append((owner, team, stage, amount, month_day, status, category))
    with as_user("admin", "admin"):
        for n, (owner, team, stage, amount, day, status, category) in enumerate(rows):
            opp = await sales.create_opportunity(
                OpportunityIn(
                    account_id=f"acc-{n}", name=f"D{n}", owner_id=owner, team=team, amount=cny(str(amount)),
                    expected_close_date=day, forecast_category=category, primary_contact_id="c", next_step="x",
                    line_items=[item()],
                )
            )  # fmt: skip
            if stage.key != "initial_contact":
                await sales.move_stage(opp.id, stage=stage.key, expected_version=0)
            if status == "won":
                await sales.win(opp.id, expected_version=0, close_date=day, amount=None)
            elif status == "lost":
                await sales.lose(opp.id, expected_version=0, reason="x", close_date=day)
            effective = category or d.default_forecast_category(stage.probability)
            reference.append(
                d.ForecastDeal(
                    d.OpportunityStatus(status),
                    amount,
                    "CNY",
                    stage.probability,
                    effective,
                    d.month_key(day),
                    owner,
                    team,
                )
            )
        for quarter in (False, True):
            for by_team in (False, True):
                got = await sales.forecast(ForecastQuery(quarter=quarter, by_team=by_team))
                expected = d.forecast(reference, quarter=quarter, by_team=by_team)
                assert [_line(x) for x in got] == [_line(x) for x in expected]
        ranged = await sales.forecast(
            ForecastQuery(from_date=date(2026, 4, 1), to_date=date(2026, 6, 30), owner_id="rep1")
        )
    assert {x.period for x in ranged} <= {"2026-04", "2026-05", "2026-06"}
    assert {x.group for x in ranged} == {"rep1"}


def _line(line: d.ForecastLine) -> tuple[Any, ...]:
    return (line.period, line.group, line.currency, line.pipeline, line.weighted, line.commit, line.best_case,
            line.closed_won, line.open_count, line.won_count)  # fmt: skip


async def test_import_is_idempotent_per_external_id_and_reports_rejected_rows(sales: SalesHandlers) -> None:
    rows = [
        ImportRow("X1", OpportunityIn(account_id="a", name="n1", owner_id="o1", stage="won", amount=cny("100")),
                  close_date=date(2017, 3, 1)),
        ImportRow(
            "X2", OpportunityIn(account_id="a", name="n2", owner_id="o1", stage="lost"), close_date=date(2017, 3, 2)
        ),
        ImportRow("X3", OpportunityIn(account_id="a", name="n3", owner_id="o2", stage="needs_confirmed")),
        ImportRow("X4", OpportunityIn(account_id="", name="n4", owner_id="o2", stage="won", amount=cny("1")),
                  close_date=date(2017, 3, 1)),
        ImportRow("X5", OpportunityIn(account_id="a", name="n5", owner_id="o2", stage="won", amount=cny("1"))),
    ]  # fmt: skip
    with as_user("admin", "admin"):
        first = await sales.import_opportunities("", rows)
        again = await sales.import_opportunities("", rows[:2])
        overall, by_owner = await sales.win_statistics(from_date=None, to_date=None)
    assert [r.outcome for r in first] == ["created", "created", "created", "rejected", "rejected"]
    assert first[3].errors[0].field == "account_id" and first[4].errors[0].field == "close_date"
    assert [(r.outcome, r.opportunity_id) for r in again] == [("existing", first[0].opportunity_id),
                                                              ("existing", first[1].opportunity_id)]  # fmt: skip
    assert [(s.won_amount, s.won_count, s.lost_count, s.win_rate) for s in overall] == [
        (Decimal("100"), 1, 1, Decimal("0.5000"))
    ]
    assert [s.owner_id for s in by_owner] == ["o1"]


async def test_concurrent_imports_of_one_deal_create_it_once_and_answer_existing(sales: SalesHandlers) -> None:
    """Two imports of the same file at once (a retried upload): one creates each deal, the other
    finds it, instead of failing its whole batch on the unique external id."""
    rows = [
        ImportRow(f"RACE-{n}", OpportunityIn(account_id="a", name=f"n{n}", owner_id="o1", stage="needs_confirmed"))
        for n in range(3)
    ]

    async def run() -> list[ImportResult]:
        with as_user("admin", "admin"):
            return await sales.import_opportunities("", rows)

    results = await asyncio.gather(*(run() for _ in range(4)))
    outcomes = sorted(r.outcome for batch in results for r in batch)
    assert outcomes == ["created"] * 3 + ["existing"] * 9
    assert len({r.opportunity_id for batch in results for r in batch}) == 3


async def test_an_import_row_the_caller_refuses_is_only_looked_up(sales: SalesHandlers) -> None:
    """The gateway refuses rows naming an account that is gone, unless they were imported before (a
    file sent again after a merge): such a row answers `existing`, or is rejected with the reason."""
    deal = OpportunityIn(account_id="acc-merged", name="n1", owner_id="o1", stage="needs_confirmed")
    gone = "account acc-merged was merged into acc-kept"
    with as_user("admin", "admin"):
        [first] = await sales.import_opportunities("", [ImportRow("REFUSED-1", deal)])
        again = await sales.import_opportunities(
            "", [ImportRow("REFUSED-1", deal, refusal=gone), ImportRow("REFUSED-2", deal, refusal=gone)]
        )
        listed = await sales.list_opportunities(Page(), account_id="acc-merged")
    assert [(r.outcome, r.opportunity_id) for r in again] == [("existing", first.opportunity_id), ("rejected", "")]
    assert [(e.field, e.message) for e in again[1].errors] == [("account_id", gone)]
    assert [o.id for o in listed.items] == [first.opportunity_id]


async def test_a_deal_imported_open_meets_anti_collision_as_a_created_one_does(sales: SalesHandlers) -> None:
    """An import is no way around 防撞单: a row that would be open beside another owner's open deal
    on its account and product line is rejected alone, with the reason a create gets; won and lost
    rows are history and stay exempt."""
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-i", name="A", product_line="Cloud ERP"))
    with as_user("bob", "sales_rep"):
        with pytest.raises(Conflict) as created:
            await sales.create_opportunity(OpportunityIn(account_id="acc-i", name="B", product_line="Cloud ERP"))
        results = await sales.import_opportunities(
            "",
            [
                ImportRow("B-open", OpportunityIn(account_id="acc-i", name="B", product_line="cloud  erp")),
                ImportRow("B-elsewhere", OpportunityIn(account_id="acc-j", name="B", product_line="Cloud ERP")),
                ImportRow(
                    "B-won",
                    OpportunityIn(account_id="acc-i", name="B", product_line="Cloud ERP", stage="won", amount=cny("5")),
                    close_date=date(2025, 3, 1),
                ),
                ImportRow(
                    "B-lost",
                    OpportunityIn(account_id="acc-i", name="B", product_line="Cloud ERP", stage="lost"),
                    close_date=date(2025, 4, 1),
                ),
            ],
        )
    with as_user("admin", "admin"):
        deals_on_acc_i = await sales.list_opportunities(Page(), account_id="acc-i", statuses=["open"])

    assert [r.outcome for r in results] == ["rejected", "created", "created", "created"]
    assert [(e.field, e.message) for e in results[0].errors] == [("product_line", created.value.detail)]
    assert [deal.id for deal in deals_on_acc_i.items] == [first.id]


async def test_a_manager_migrating_deals_overrides_anti_collision_for_the_file_and_each_deal_records_it(
    sales: SalesHandlers,
) -> None:
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-m", name="A", product_line="Cloud ERP"))
    row = ImportRow("M-1", OpportunityIn(account_id="acc-m", name="B", owner_id="bob", product_line="Cloud ERP"))
    with as_user("bob", "sales_rep"), pytest.raises(PermissionDenied) as refused:
        await sales.import_opportunities("", [row], override=True, override_reason="mine")
    with as_user("boss", "sales_manager"):
        with pytest.raises(ValidationFailed) as unexplained:
            await sales.import_opportunities("", [row], override=True, override_reason=" ")
        [result] = await sales.import_opportunities("", [row], override=True, override_reason="migration from SFDC")
        imported = await sales.get_opportunity(result.opportunity_id)

    assert refused.value.field == "override_collision"
    assert [e.field for e in unexplained.value.errors] == ["override_reason"]
    assert result.outcome == "created"
    assert (imported.collision_override_by, imported.collision_override_reason, imported.colliding_opportunity_id) == (
        "boss",
        "migration from SFDC",
        first.id,
    )


async def test_an_imported_deal_meets_the_open_deals_of_the_files_earlier_rows(sales: SalesHandlers) -> None:
    """Two rows of one file opening a deal on the same account and product line for two owners: the
    later one is rejected, naming the deal the earlier one became, as two creates would be."""
    rows = [
        ImportRow("F-1", OpportunityIn(account_id="acc-f", name="1", owner_id="alice", product_line="GTX")),
        ImportRow("F-2", OpportunityIn(account_id="acc-f", name="2", owner_id="alice", product_line="gtx")),
        ImportRow("F-3", OpportunityIn(account_id="acc-f", name="3", owner_id="bob", product_line="GTX")),
    ]
    with as_user("admin", "admin"):
        results = await sales.import_opportunities("", rows)

    assert [r.outcome for r in results] == ["created", "created", "rejected"]
    assert [e.field for e in results[2].errors] == ["product_line"]
    assert f"opportunity {results[0].opportunity_id} " in results[2].errors[0].message


async def test_concurrent_creations_and_imports_by_several_owners_let_exactly_one_deal_through(
    sales: SalesHandlers,
) -> None:
    """An import takes the lock a create takes: of deals opened at once on one account and product
    line by creates and imports of several owners, one is open at the end."""

    async def create(owner: str) -> bool:
        with as_user(owner, "sales_rep"):
            try:
                await sales.create_opportunity(OpportunityIn(account_id="acc-r", name=owner, product_line="X"))
            except Conflict:
                return False
            return True

    async def import_(owner: str) -> bool:
        with as_user(owner, "sales_rep"):
            row = ImportRow(f"ext-{owner}", OpportunityIn(account_id="acc-r", name=owner, product_line="X"))
            [result] = await sales.import_opportunities("", [row])
            return result.outcome == "created"

    opened = await asyncio.gather(
        *(create(f"creator{n}") for n in range(3)), *(import_(f"importer{n}") for n in range(3))
    )
    assert sum(opened) == 1


async def test_an_imported_external_id_answers_existing_only_to_who_may_read_the_deal(sales: SalesHandlers) -> None:
    """A row whose external_id another user's deal has is rejected, neither naming that deal nor
    confirming which it is, and creates nothing; who may read the deal gets it as `existing`."""
    with as_user("alice", "sales_rep", team="east", scope="own"):
        [imported] = await sales.import_opportunities(
            "", [ImportRow("SF-0001", OpportunityIn(account_id="acc-s", name="Secret deal"))]
        )
    with as_user("zoe", "sales_rep", team="west", scope="own"):
        [probed] = await sales.import_opportunities(
            "", [ImportRow("SF-0001", OpportunityIn(account_id="acc-z", name="Probe"))]
        )
    with as_user("mgr", "sales_manager", team="east", scope="team"):
        [found] = await sales.import_opportunities(
            "", [ImportRow("SF-0001", OpportunityIn(account_id="acc-s", name="Secret deal"))]
        )
    with as_user("admin", "admin"):
        probe_deals = await sales.list_opportunities(Page(), account_id="acc-z")

    assert (probed.outcome, probed.opportunity_id) == ("rejected", "")
    assert [(e.field, e.message) for e in probed.errors] == [
        ("external_id", "is already used by an opportunity outside your records")
    ]
    assert probe_deals.items == []
    assert (found.outcome, found.opportunity_id) == ("existing", imported.opportunity_id)


# ---------------------------------------------------------------- quotes


async def test_quote_discounts_need_the_right_approvers(sales: SalesHandlers, engine: AsyncEngine) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        cheap = await sales.create_quote(idempotency_key="", opportunity_id=opp.id, line_items=[item(discount="10")])
        steep = await sales.create_quote(idempotency_key="q2", opportunity_id=opp.id, line_items=[item(discount="35")])
        with pytest.raises(PermissionDenied):
            await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert cheap.status == "approved" and list(cheap.required_approvals) == []
    assert steep.status == "pending_approval" and list(steep.required_approvals) == ["sales_manager", "finance"]
    assert steep.total.amount == "650.00" and steep.discount_total.amount == "350.00"
    with as_user("fin", "finance"), pytest.raises(PermissionDenied):
        await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    with as_user("mgr", "sales_manager"):
        step = (
            await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="fine")
        ).record
    assert step.status == "pending_approval" and list(step.required_approvals) == ["finance"]
    with as_user("fin", "finance"):
        done = (await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")).record
    assert done.status == "approved" and [x.role for x in done.decisions] == ["sales_manager", "finance"]
    # Each approval is published: the cheap quote's as it was made, the steep one's at its last decision.
    approvals = [
        events_pb2.QuoteApproved.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.approved")
    ]
    assert [(e.quote.id, e.actor.user_id) for e in approvals] == [(cheap.id, "rep1"), (steep.id, "fin")]
    # The manager's step, a version of its own with the finance step still awaited, is an update of it.
    steps = [events_pb2.QuoteUpdated.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.updated")]
    assert [(e.quote.id, e.quote.version, list(e.changed_fields), e.actor.user_id) for e in steps] == [
        (steep.id, step.version, ["decisions"], "mgr")
    ]


async def test_new_line_items_within_every_threshold_approve_a_pending_quote_and_say_so(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        steep = await sales.create_quote(idempotency_key="", opportunity_id=opp.id, line_items=[item(discount="35")])
    with as_user("mgr", "sales_manager"):
        lowered = (await sales.update_quote(steep.id, expected_version=0, line_items=[item(discount="5")])).record
    assert lowered.status == "approved"
    [approved] = [
        events_pb2.QuoteApproved.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.approved")
    ]
    assert (approved.quote.id, approved.quote.version, approved.actor.user_id) == (steep.id, lowered.version, "mgr")


async def test_a_won_or_lost_deal_keeps_the_value_it_closed_with(sales: SalesHandlers) -> None:
    won_id = await won_deal(sales, "1000")
    with as_user("rep1", "sales_rep"):
        for changes in ({"amount": cny("999999")}, {"line_items": [item(price="999999")]}, {"product_line": "Other"}):
            with pytest.raises(Conflict) as refused:
                await sales.update_opportunity(won_id, expected_version=0, changes=changes)
            assert refused.value.reason == "ILLEGAL_STATE"
        renamed = (await sales.update_opportunity(won_id, expected_version=0, changes={"name": "Deal 2026"})).record
    assert (renamed.name, renamed.amount.amount) == ("Deal 2026", "1000.00")


async def test_a_lost_deal_or_one_with_a_contract_takes_no_new_quote(sales: SalesHandlers) -> None:
    contract_id = await signed_contract(sales, "1000")
    with as_user("admin", "admin"):
        contracted_deal = (await sales.get_contract(contract_id)).opportunity_id
    with as_user("rep1", "sales_rep"):
        lost = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Gone"))
        await sales.lose(lost.id, expected_version=0, reason="no budget", close_date=None)
        for deal_id, reason in ((lost.id, "ILLEGAL_STATE"), (contracted_deal, "HAS_CONTRACT")):
            with pytest.raises(Conflict) as refused:
                await sales.create_quote(idempotency_key="", opportunity_id=deal_id, line_items=[item()])
            assert refused.value.reason == reason


async def test_a_deal_deleted_with_its_quotes_publishes_each_quote_deleted(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Mistake"))
        quotes = [
            await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()]) for _ in "ab"
        ]
        await sales.delete_opportunity(deal.id, expected_version=0)
    deleted = [events_pb2.QuoteDeleted.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.deleted")]
    assert sorted((e.quote_id, e.opportunity_id) for e in deleted) == sorted((q.id, deal.id) for q in quotes)


async def test_nobody_approves_the_discounts_of_a_quote_they_created(sales: SalesHandlers) -> None:
    """Creating a quote submits it: its creator decides no step, and one person decides one step
    whatever roles they hold."""
    with as_user("mgr", "sales_manager"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        steep = await sales.create_quote(idempotency_key="", opportunity_id=opp.id, line_items=[item(discount="35")])
        with pytest.raises(PermissionDenied) as own:
            await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        with pytest.raises(PermissionDenied):
            await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.REJECTED, comment="")
    assert "mgr submitted this quote" in own.value.detail
    with as_user("boss", "sales_manager", "finance"):
        await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        with pytest.raises(PermissionDenied) as twice:
            await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert "already decided the sales_manager step" in twice.value.detail
    with as_user("fin", "finance"):
        done = (await sales.decide_quote(steep.id, expected_version=0, decision=d.Decision.APPROVED, comment="")).record
    assert done.status == "approved"
    assert [(x.role, x.approver_id) for x in done.decisions] == [("sales_manager", "boss"), ("finance", "fin")]


async def test_nobody_approves_the_discounts_of_a_quote_they_created_after_another_person_changed_them(
    sales: SalesHandlers,
) -> None:
    """The manager who made a quote chose its discount: once the owner changes its line items (and
    so submits them), the manager still decides no step of it, and another manager does."""
    opportunity_id = await won_deal(sales, "1000", owner="rep1")
    with as_user("mgr1", "sales_manager"):
        quote = await sales.create_quote(
            idempotency_key="", opportunity_id=opportunity_id, line_items=[item(discount="20")]
        )
    assert list(quote.required_approvals) == ["sales_manager"]
    with as_user("rep1", "sales_rep", scope="own"):
        changed = (
            await sales.update_quote(quote.id, expected_version=0, line_items=[item(quantity="2", discount="20")])
        ).record
    assert changed.status == "pending_approval"
    with as_user("mgr1", "sales_manager"), pytest.raises(PermissionDenied) as own:
        await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert own.value.detail == "mgr1 created this quote; another person must decide on it"
    with as_user("mgr2", "sales_manager"):
        done = (await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="")).record
    assert done.status == "approved"
    assert [(x.role, x.approver_id) for x in done.decisions] == [("sales_manager", "mgr2")]


async def test_quotes_move_with_their_deal_when_its_owner_changes(sales: SalesHandlers, engine: AsyncEngine) -> None:
    with as_user("alice", "sales_rep", team="east", scope="own"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
    with as_user("mgr", "sales_manager"):
        await sales.update_opportunity(deal.id, expected_version=0, changes={"owner_id": "bob", "team": "west"})
    with as_user("bob", "sales_rep", team="west", scope="own"):
        moved = await sales.get_quote(quote.id)
        assert [q.id for q in (await sales.list_quotes(Page(), opportunity_id=deal.id)).items] == [quote.id]
    assert (moved.owner_id, moved.team, moved.version) == ("bob", "west", quote.version + 1)
    # Published as it is now, so a consumer's copy follows the deal too.
    [(key, event)] = await quote_updates(engine)
    assert (key, event.quote, event.actor.user_id) == (quote.id, moved, "mgr")
    assert (list(event.changed_fields), event.reason) == (["owner_id", "team"], "crm.sales.opportunity.updated")
    assert list(event.voided_decisions) == []
    with as_user("alice", "sales_rep", team="east", scope="own"), pytest.raises(NotFound):
        await sales.get_quote(quote.id)


async def test_a_manager_hands_an_open_deal_to_another_owner_with_its_quotes(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("alice", "sales_rep", team="east", region="cn-east", scope="own"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
    with as_user("bob", "sales_rep", team="west", scope="own"), pytest.raises(NotFound):
        await sales.assign_opportunity(deal.id, expected_version=0, owner_id="bob", team="", region="")
    with as_user("mgr", "sales_manager"):
        with pytest.raises(StaleVersion):
            await sales.assign_opportunity(
                deal.id, expected_version=deal.version + 1, owner_id="bob", team="", region=""
            )
        with pytest.raises(ValidationFailed) as nobody:
            await sales.assign_opportunity(deal.id, expected_version=0, owner_id=" ", team="west", region="")
        assigned = (
            await sales.assign_opportunity(
                deal.id, expected_version=deal.version, owner_id="bob", team="west", region=""
            )
        ).record
        again = (await sales.assign_opportunity(deal.id, expected_version=0, owner_id="bob", team="", region="")).record
    assert nobody.value.errors[0].field == "owner_id"
    # The region was not given: it stays; assigning to the owner it has changes nothing.
    assert (assigned.owner_id, assigned.team, assigned.region, assigned.version) == ("bob", "west", "cn-east", 2)
    assert again == assigned
    with as_user("bob", "sales_rep", team="west", scope="own"):
        assert (await sales.get_quote(quote.id)).owner_id == "bob"
    with as_user("alice", "sales_rep", team="east", scope="own"), pytest.raises(NotFound):
        await sales.get_quote(quote.id)
    [payload] = await outbox_events(engine, "crm.sales.opportunity.assigned")
    event = events_pb2.OpportunityAssigned.FromString(payload)
    assert (event.opportunity.owner_id, event.previous_owner_id, list(event.changed_fields), event.actor.user_id) == (
        "bob", "alice", ["owner_id", "team"], "mgr",
    )  # fmt: skip
    [(key, moved)] = await quote_updates(engine)
    assert (key, moved.quote.owner_id, moved.quote.version) == (quote.id, "bob", quote.version + 1)
    assert (list(moved.changed_fields), moved.reason) == (["owner_id", "team"], "crm.sales.opportunity.assigned")


async def test_a_won_or_lost_deal_keeps_the_owner_its_close_credited(sales: SalesHandlers) -> None:
    won_id = await won_deal(sales, owner="alice")
    with as_user("alice", "sales_rep"):
        lost = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Lost"))
        await sales.lose(lost.id, expected_version=0, reason="no budget", close_date=None)
    refusals = []
    with as_user("mgr", "sales_manager"):
        for deal_id in (won_id, lost.id):
            with pytest.raises(Conflict) as assigning:
                await sales.assign_opportunity(deal_id, expected_version=0, owner_id="bob", team="", region="")
            with pytest.raises(Conflict) as patching:  # the same change through an update
                await sales.update_opportunity(deal_id, expected_version=0, changes={"team": "west"})
            refusals += [assigning.value.reason, patching.value.reason]
        # What does not change hands may still be corrected.
        renamed = (await sales.update_opportunity(won_id, expected_version=0, changes={"name": "Deal (2026)"})).record
    assert refusals == ["ILLEGAL_STATE"] * 4
    assert (renamed.owner_id, renamed.name) == ("alice", "Deal (2026)")


async def test_a_deal_handed_into_a_collision_needs_an_override_with_a_reason(sales: SalesHandlers) -> None:
    with as_user("alice", "sales_rep"):
        first = await sales.create_opportunity(OpportunityIn(account_id="acc-7", name="A", product_line="GTX"))
    with as_user("mgr", "sales_manager"):
        second = await sales.create_opportunity(
            OpportunityIn(account_id="acc-7", name="B", product_line="GTX", owner_id="bob"),
            override_collision=True,
            override_reason="joint bid",
        )
        with pytest.raises(Conflict) as raised:  # carol would collide with alice's deal
            await sales.assign_opportunity(second.id, expected_version=0, owner_id="carol", team="", region="")
        handed = (await sales.assign_opportunity(
            second.id, expected_version=0, owner_id="carol", team="", region="",
            override_collision=True, override_reason="bob left",
        )).record  # fmt: skip
    assert (raised.value.reason, raised.value.existing_id) == ("OPPORTUNITY_COLLISION", first.id)
    assert (handed.owner_id, handed.collision_override_reason) == ("carol", "bob left")


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize(
    ("amount", "chain"),
    [("50000", ["sales_manager"]), ("100000", ["sales_manager", "finance"]),
     ("1000000", ["sales_manager", "finance", "admin"])],
)  # fmt: skip
async def test_contract_approval_chain_by_amount(sales: SalesHandlers, amount: str, chain: list[str]) -> None:
    opportunity_id = await won_deal(sales, amount)
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        assert list(contract.approval_chain) == chain
        with pytest.raises(Conflict):
            await sales.sign_contract(contract.id, expected_version=0, signed_at=None)
        await sales.submit_contract(contract.id, expected_version=0)
    for index, role in enumerate(chain):
        wrong = next(r for r in ("finance", "admin", "sales_manager") if r != role)
        with as_user("wrong", wrong), pytest.raises(PermissionDenied):
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        with as_user(f"{role}-1", role):
            result = (
                await sales.decide_contract(
                    contract.id, expected_version=0, decision=d.Decision.APPROVED, comment=f"ok {index}"
                )
            ).record
    assert result.status == "approved"
    assert [(x.role, x.approver_id, x.decision, x.comment) for x in result.decisions] == [
        (role, f"{role}-1", "approved", f"ok {index}") for index, role in enumerate(chain)
    ]


async def test_rejected_contracts_can_be_resubmitted_and_every_decision_stays(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    opportunity_id = await won_deal(sales, "200000")
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        await sales.submit_contract(contract.id, expected_version=0)
    with as_user("m", "sales_manager"):
        await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    with as_user("f", "finance"):
        rejected = (
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.REJECTED, comment="terms")
        ).record
    assert rejected.status == "rejected"
    with as_user("rep1", "sales_rep"):
        again = (await sales.submit_contract(contract.id, expected_version=0)).record
    assert again.status == "pending_approval"
    with as_user("f", "finance"), pytest.raises(PermissionDenied):  # a new round starts with the manager again
        await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    with as_user("m", "sales_manager"):
        await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    with as_user("f", "finance"):
        approved = (
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"
    assert [(x.role, x.decision) for x in approved.decisions] == [
        ("sales_manager", "approved"), ("finance", "rejected"), ("sales_manager", "approved"), ("finance", "approved"),
    ]  # fmt: skip
    types = await outbox_types(engine)
    assert types.count("crm.sales.contract.approval_recorded") == 4
    assert types.count("crm.sales.contract.rejected") == 1 and types.count("crm.sales.contract.approved") == 1


async def test_nobody_approves_a_contract_they_submitted_or_two_steps_of_one_submission(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("mgr", "sales_manager"):
        contract = await direct_contract(sales, "200000")  # sales manager, then finance
        await sales.submit_contract(contract.id, expected_version=0)
        with pytest.raises(PermissionDenied) as own:
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert "mgr submitted this contract" in own.value.detail
    with as_user("boss", "sales_manager", "finance"):
        await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        with pytest.raises(PermissionDenied) as twice:
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert "already decided the sales_manager step" in twice.value.detail
    with as_user("fin", "finance"):
        approved = (
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"
    assert [(x.role, x.approver_id) for x in approved.decisions] == [("sales_manager", "boss"), ("finance", "fin")]
    assert (await outbox_types(engine)).count("crm.sales.contract.approval_recorded") == 2


@pytest.mark.parametrize("from_deal", [False, True], ids=["direct", "from-won-deal"])
async def test_nobody_approves_a_contract_they_created_when_another_person_submitted_it(
    sales: SalesHandlers, engine: AsyncEngine, from_deal: bool
) -> None:
    """A manager sets a contract's terms and its owner; the owner submits it. Below 100 000 the
    manager's step is the whole chain, so the manager approving it would approve their own terms
    alone: another manager decides."""
    opportunity_id = await won_deal(sales, "90000", owner="rep1") if from_deal else ""
    with as_user("mgr1", "sales_manager"):
        if from_deal:
            contract = await sales.create_contract(
                idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
                owner_id="", team="", region="", starts_on=None, ends_on=None,
            )  # fmt: skip
        else:
            contract = await direct_contract(sales, "90000", owner_id="rep1")
    assert (contract.owner_id, list(contract.approval_chain)) == ("rep1", ["sales_manager"])
    with as_user("rep1", "sales_rep", scope="own"):
        await sales.submit_contract(contract.id, expected_version=0)
    with as_user("mgr1", "sales_manager"):
        for decision in (d.Decision.APPROVED, d.Decision.REJECTED):
            with pytest.raises(PermissionDenied) as own:
                await sales.decide_contract(contract.id, expected_version=0, decision=decision, comment="")
            assert own.value.detail == "mgr1 created this contract; another person must decide on it"
    async with engine.connect() as conn:
        stored = (await conn.execute(select(repository.contracts.c.created_by, repository.contracts.c.submitted_by)
                                     .where(repository.contracts.c.id == contract.id))).one()  # fmt: skip
    assert tuple(stored) == ("mgr1", "rep1")
    with as_user("mgr2", "sales_manager"):
        approved = (
            await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"
    assert [(x.role, x.approver_id) for x in approved.decisions] == [("sales_manager", "mgr2")]
    assert (await outbox_types(engine)).count("crm.sales.contract.approval_recorded") == 1


async def test_a_contract_completes_only_when_paid_in_full(sales: SalesHandlers, engine: AsyncEngine) -> None:
    """Completion closes the receivable (the ERP closes it on contract.completed): nothing may be
    owed. Afterwards a payment is an over-payment; invoices may still follow, within the amount."""
    contract_id = await signed_contract(sales, "1000")
    with as_user("erp", "erp_integration"):
        await sales.record_payment(
            contract_id=contract_id, amount=cny("600"), received_at=None, method="wire", external_reference="P-1"
        )
    with as_user("rep1", "sales_rep"), pytest.raises(Conflict) as unpaid:
        await sales.complete_contract(contract_id, expected_version=0)
    assert unpaid.value.reason == "OUTSTANDING_BALANCE" and "400.00 CNY outstanding" in unpaid.value.detail
    with as_user("erp", "erp_integration"):
        await sales.record_payment(
            contract_id=contract_id, amount=cny("400"), received_at=None, method="wire", external_reference="P-2"
        )
    with as_user("rep1", "sales_rep"):
        completed = (await sales.complete_contract(contract_id, expected_version=0)).record
    assert completed.status == "completed"
    with as_user("erp", "erp_integration"), pytest.raises(ValidationFailed) as late:
        await sales.record_payment(
            contract_id=contract_id, amount=cny("0.01"), received_at=None, method="", external_reference="P-3"
        )
    assert "over-payment" in late.value.errors[0].message
    with as_user("fin", "finance"):
        invoice = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("1000"))
        issued = (await sales.issue_invoice(invoice.id, number="FP-1", issued_at=None)).record
        with pytest.raises(ValidationFailed):
            await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("0.01"))
    assert issued.status == "issued"
    assert (await outbox_types(engine)).count("crm.sales.contract.completed") == 1


async def test_contract_numbers_are_unique_per_month(sales: SalesHandlers, clock: Clock) -> None:
    numbers = []
    with as_user("rep1", "sales_rep"):
        results = await asyncio.gather(
            *(
                sales.create_contract(
                    idempotency_key="",
                    opportunity_id="",
                    account_id="acc",
                    title=f"T{n}",
                    amount=cny("10"),
                    owner_id="",
                    team="",
                    region="",
                    starts_on=None,
                    ends_on=None,
                )
                for n in range(8)
            )
        )
        numbers += [c.number for c in results]
        clock.now += timedelta(days=10)
        december = await sales.create_contract(
            idempotency_key="", opportunity_id="", account_id="acc", title="D", amount=cny("10"),
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
    assert sorted(numbers) == [f"CT-202611-{n:06d}" for n in range(1, 9)]
    assert december.number == "CT-202612-000001"


async def test_contracts_come_from_won_deals_or_direct_with_required_fields(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        opp = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Open deal"))
        with pytest.raises(Conflict):
            await sales.create_contract(
                idempotency_key="", opportunity_id=opp.id, account_id="", title="", amount=None,
                owner_id="", team="", region="", starts_on=None, ends_on=None,
            )  # fmt: skip
        with pytest.raises(ValidationFailed) as raised:
            await sales.create_contract(
                idempotency_key="", opportunity_id="", account_id="", title="", amount=None,
                owner_id="", team="", region="", starts_on=None, ends_on=None,
            )  # fmt: skip
    assert {e.field for e in raised.value.errors} == {"account_id", "title", "amount"}


async def test_contract_approval_chains_compare_amounts_converted_with_the_configured_rates(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SALES_CONTRACT_EXCHANGE_RATES", '{"USD": "7.10", "JPY": "0.047"}')
    sales = build_handlers(SalesSettings(), engine)
    with as_user("rep1", "sales_rep"):
        yen = await direct_contract(sales, "1000000", currency="JPY")  # 47 000 CNY
        dollars = await direct_contract(sales, "900000", currency="USD")  # 6 390 000 CNY
        just_over = await direct_contract(sales, "14084.51", currency="USD")  # 100 000.021 CNY
        submitted = [
            (await sales.submit_contract(contract.id, expected_version=0)).record
            for contract in (yen, dollars, just_over)
        ]
    assert [list(c.approval_chain) for c in (yen, dollars, just_over)] == [
        ["sales_manager"], ["sales_manager", "finance", "admin"], ["sales_manager", "finance"],
    ]  # fmt: skip
    assert [list(c.approval_chain) for c in submitted] == [list(c.approval_chain) for c in (yen, dollars, just_over)]
    with as_user("m", "sales_manager"):
        approved = (
            await sales.decide_contract(yen.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"


async def test_a_contract_in_a_currency_without_an_exchange_rate_is_refused_at_creation_and_submission(
    engine: AsyncEngine,
) -> None:
    """Without a rate its chain cannot be chosen: no draft that could never be submitted is made,
    and a draft whose rate was withdrawn since waits for one."""
    sales = sales_with_rates(engine, USD="7.10")
    with as_user("rep1", "sales_rep"):
        with pytest.raises(ValidationFailed) as raised:
            await direct_contract(sales, "900000", currency="EUR")
        assert fields_of(raised) == ["amount.currency"]
        assert "no exchange rate to CNY is configured for EUR" in raised.value.errors[0].message
        draft = await direct_contract(sales_with_rates(engine, USD="7.10", EUR="7.80"), "900000", currency="EUR")
        with pytest.raises(ValidationFailed) as raised:  # the EUR rate was withdrawn meanwhile
            await sales.submit_contract(draft.id, expected_version=0)
        assert fields_of(raised) == ["amount.currency"]
        assert (await sales.get_contract(draft.id)).status == "draft"
    with as_user("rep1", "sales_rep"):  # once finance configures the rate again, the same draft goes
        submitted = (
            await sales_with_rates(engine, USD="7.10", EUR="7.80").submit_contract(draft.id, expected_version=0)
        ).record
    assert (submitted.status, list(submitted.approval_chain)) == (
        "pending_approval",
        ["sales_manager", "finance", "admin"],
    )


async def test_a_submitted_contract_keeps_its_chain_when_the_rates_change_until_it_is_resubmitted(
    engine: AsyncEngine,
) -> None:
    with as_user("rep1", "sales_rep"):
        contract = await direct_contract(sales_with_rates(engine, USD="7.10"), "20000", currency="USD")  # 142 000 CNY
        await sales_with_rates(engine, USD="7.10").submit_contract(contract.id, expected_version=0)
    cheaper_dollar = sales_with_rates(engine, USD="4")  # 80 000 CNY: the manager alone, if submitted now
    with as_user("m", "sales_manager"):
        step = (
            await cheaper_dollar.decide_contract(
                contract.id, expected_version=0, decision=d.Decision.APPROVED, comment=""
            )
        ).record
    assert (step.status, list(step.approval_chain)) == ("pending_approval", ["sales_manager", "finance"])
    with as_user("f", "finance"):
        rejected = (
            await cheaper_dollar.decide_contract(
                contract.id, expected_version=0, decision=d.Decision.REJECTED, comment="terms"
            )
        ).record
    assert rejected.status == "rejected"
    with as_user("rep1", "sales_rep"):
        again = (await cheaper_dollar.submit_contract(contract.id, expected_version=0)).record
    assert list(again.approval_chain) == ["sales_manager"]  # a new submission, with the rates of now
    with as_user("m2", "sales_manager"):
        approved = (
            await cheaper_dollar.decide_contract(
                contract.id, expected_version=0, decision=d.Decision.APPROVED, comment=""
            )
        ).record
    assert approved.status == "approved"


async def contract_of_deal(sales: SalesHandlers, opportunity_id: str, amount: Money) -> Any:
    return await sales.create_contract(
        idempotency_key="", opportunity_id=opportunity_id, account_id="", title="Part", amount=amount,
        owner_id="", team="", region="", starts_on=None, ends_on=None,
    )  # fmt: skip


async def test_a_won_deal_split_into_contracts_under_a_threshold_is_approved_on_their_sum(
    sales: SalesHandlers,
) -> None:
    """A deal may have several contracts (a framework agreement and its call-offs), but each one's
    chain is chosen on its sum with the deal's other live contracts, at creation and at submission:
    five contracts of 99 999.99 from a deal won at 500 000 still need finance."""
    opportunity_id = await won_deal(sales, "500000")
    with as_user("rep1", "sales_rep"):
        parts = [await contract_of_deal(sales, opportunity_id, cny("99999.99")) for _ in range(5)]
        submitted = [(await sales.submit_contract(part.id, expected_version=0)).record for part in parts]

    assert [list(part.approval_chain) for part in parts] == [["sales_manager"]] + [["sales_manager", "finance"]] * 4
    assert [list(part.approval_chain) for part in submitted] == [["sales_manager", "finance"]] * 5


async def test_a_rejected_or_terminated_contract_no_longer_counts_towards_its_deals_chain(
    sales: SalesHandlers,
) -> None:
    opportunity_id = await won_deal(sales, "120000")
    with as_user("rep1", "sales_rep"):
        first = await contract_of_deal(sales, opportunity_id, cny("60000"))
        second = await contract_of_deal(sales, opportunity_id, cny("60000"))
        await sales.submit_contract(first.id, expected_version=0)
    with as_user("m", "sales_manager"):
        await sales.decide_contract(first.id, expected_version=0, decision=d.Decision.REJECTED, comment="terms")
    with as_user("rep1", "sales_rep"):
        beside_rejected = (await sales.submit_contract(second.id, expected_version=0)).record
    with as_user("m", "sales_manager"):
        await sales.decide_contract(second.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    with as_user("f", "finance"):
        await sales.terminate_contract(second.id, expected_version=0, reason="replaced")
    with as_user("rep1", "sales_rep"):
        beside_terminated = (await sales.submit_contract(first.id, expected_version=0)).record

    assert list(second.approval_chain) == ["sales_manager", "finance"]  # 60 000 beside 60 000
    assert list(beside_rejected.approval_chain) == ["sales_manager"]
    assert list(beside_terminated.approval_chain) == ["sales_manager"]  # the first, resubmitted


async def test_a_contract_made_from_a_deal_is_in_the_deals_currency(engine: AsyncEngine) -> None:
    sales = sales_with_rates(engine, USD="7.10")
    opportunity_id = await won_deal(sales, "500000")
    with as_user("rep1", "sales_rep"), pytest.raises(ValidationFailed) as raised:
        await contract_of_deal(sales, opportunity_id, Money(Decimal("14000"), "USD"))

    assert refusals(raised) == [("amount.currency", "must be the opportunity's currency CNY")]


# ---------------------------------------------------------------- payment plans, payments, invoices


async def test_contract_to_cash(sales: SalesHandlers, engine: AsyncEngine, clock: Clock) -> None:
    contract_id = await signed_contract(sales, "90000")
    today = clock().date()
    with as_user("rep1", "sales_rep"):
        with pytest.raises(ValidationFailed) as raised:
            await sales.create_payment_plan(
                idempotency_key="", contract_id=contract_id,
                installments=[
                    (today + timedelta(days=30), cny("30000")),
                    (today + timedelta(days=60), cny("59999.99")),
                ],
            )  # fmt: skip
        assert raised.value.errors[0].field == "installments"
        plan = await sales.create_payment_plan(
            idempotency_key="plan-1",
            contract_id=contract_id,
            installments=[(today + timedelta(days=d), cny("30000")) for d in (90, 30, 60)],
        )
        with pytest.raises(AlreadyExists):
            await sales.create_payment_plan(
                idempotency_key="", contract_id=contract_id, installments=[(today, cny("90000"))]
            )
        assert [i.due_date for i in plan.installments] == sorted(i.due_date for i in plan.installments)

        first, created = await sales.record_payment(
            contract_id=contract_id, amount=cny("45000"), received_at=None, method="wire", external_reference="BANK-1"
        )
        again, created_again = await sales.record_payment(
            contract_id=contract_id, amount=cny("45000"), received_at=None, method="wire", external_reference="BANK-1"
        )
        assert created and not created_again and again.id == first.id
        assert [(a.amount.amount) for a in first.allocations] == ["30000.00", "15000.00"]
        with pytest.raises(Conflict) as reused:  # another amount under a posted reference: another payment
            await sales.record_payment(
                contract_id=contract_id, amount=cny("45"), received_at=None, method="wire", external_reference="BANK-1"
            )
        assert "was posted for 45000.00 CNY" in reused.value.detail
        with pytest.raises(ValidationFailed) as over:
            await sales.record_payment(
                contract_id=contract_id, amount=cny("45000.01"), received_at=None, method="", external_reference="B-2"
            )
        assert over.value.errors[0].field == "amount"
        with pytest.raises(Conflict):
            other = await signed_contract(sales, "10")
            await sales.record_payment(
                contract_id=other, amount=cny("1"), received_at=None, method="", external_reference="BANK-1"
            )
        plan = await sales.get_payment_plan(contract_id)
        assert [(i.status, i.paid.amount) for i in plan.installments] == [
            ("paid", "30000.00"), ("partially_paid", "15000.00"), ("pending", "0.00"),
        ]  # fmt: skip

        invoice = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("60000"))
        with pytest.raises(ValidationFailed):
            await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("30000.01"))
        issued = (await sales.issue_invoice(invoice.id, number="INV-0001", issued_at=None)).record
        assert (issued.status, issued.number) == ("issued", "INV-0001")
        with pytest.raises(Conflict):
            await sales.issue_invoice(invoice.id, number="INV-0002", issued_at=None)
        await sales.void_invoice(invoice.id, reason="wrong title")
        second = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("90000"))
        with pytest.raises(AlreadyExists):
            await sales.issue_invoice(second.id, number="INV-0001", issued_at=None)
        receivables = await sales.list_receivables("acc-1", Page())
    [receivable] = [x for x in receivables.items if x.contract_id == contract_id]
    assert (receivable.paid.amount, receivable.outstanding.amount, receivable.invoiced.amount) == (
        "45000.00", "45000.00", "90000.00",
    )  # fmt: skip
    payloads = await outbox_events(engine, "crm.sales.payment.received")
    received = [events_pb2.PaymentReceived.FromString(p) for p in payloads]
    assert [(e.payment.external_reference, e.contract_outstanding.amount) for e in received] == [
        ("BANK-1", "45000.00"),
    ]
    types = await outbox_types(engine)
    for expected in ("crm.sales.payment_plan.created", "crm.sales.invoice.requested", "crm.sales.invoice.issued",
                     "crm.sales.invoice.voided", "crm.sales.contract.signed"):  # fmt: skip
        assert expected in types


async def test_a_quote_and_a_contract_in_kuwaiti_dinars_are_totalled_paid_and_shown_to_the_fils(
    engine: AsyncEngine, clock: Clock
) -> None:
    """A three-decimal currency (1000 fils to the dinar) end to end: what the API shows carries 3 places."""
    sales = sales_with_rates(engine, KWD="23.5")
    fils = LineItemIn("p-GTX", "GTX Basic", "GTX", Decimal(3), kwd("12.345"), Decimal("12.5"))
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Gulf deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[fils])
        contract = await direct_contract(sales, "100.005", currency="KWD")  # 2 350.12 CNY: the manager alone
        await sales.submit_contract(contract.id, expected_version=0)
    assert [(x.unit_price.amount, x.total.amount) for x in quote.line_items] == [("12.345", "32.406")]
    assert (quote.subtotal.amount, quote.discount_total.amount, quote.total.amount) == ("37.035", "4.629", "32.406")
    with as_user("mgr", "sales_manager"):
        await sales.decide_contract(contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    today = clock().date()
    with as_user("rep1", "sales_rep"):
        signed = (await sales.sign_contract(contract.id, expected_version=0, signed_at=None)).record
        plan = await sales.create_payment_plan(
            idempotency_key="", contract_id=contract.id,
            installments=[(today + timedelta(days=30 * n), kwd("33.335")) for n in (1, 2, 3)],
        )  # fmt: skip
        payment, _ = await sales.record_payment(
            contract_id=contract.id, amount=kwd("50.002"), received_at=None, method="wire", external_reference="K-1"
        )
        with pytest.raises(ValidationFailed) as over:
            await sales.request_invoice(idempotency_key="", contract_id=contract.id, amount=kwd("100.006"))
        invoice = await sales.request_invoice(idempotency_key="", contract_id=contract.id, amount=kwd("100.005"))
        receivables = await sales.list_receivables("acc-1", Page())
    assert signed.amount.amount == "100.005"
    assert [i.amount.amount for i in plan.installments] == ["33.335", "33.335", "33.335"]
    assert [a.amount.amount for a in payment.allocations] == ["33.335", "16.667"]
    assert over.value.errors[0].message == "100.006 KWD exceeds the uninvoiced 100.005 KWD"
    assert invoice.amount.amount == "100.005"
    [receivable] = [x for x in receivables.items if x.contract_id == contract.id]
    assert (receivable.paid.amount, receivable.outstanding.amount, receivable.invoiced.amount) == (
        "50.002", "50.003", "100.005",
    )  # fmt: skip


async def test_a_plans_unpaid_installments_are_rescheduled_and_its_paid_ones_stay(
    sales: SalesHandlers, engine: AsyncEngine, clock: Clock
) -> None:
    contract_id = await signed_contract(sales, "90000")
    day = clock().date()
    with as_user("fin", "finance"):
        plan = await sales.create_payment_plan(
            idempotency_key="", contract_id=contract_id,
            installments=[(day + timedelta(days=n), cny("30000")) for n in (30, 60, 90)],
        )  # fmt: skip
        await sales.record_payment(
            contract_id=contract_id, amount=cny("10000"), received_at=None, method="", external_reference="B-1"
        )
        first, second, third = plan.installments
        same = (
            await sales.update_payment_plan(
                contract_id,
                expected_version=1,
                installments=[(day + timedelta(days=n), cny("30000")) for n in (30, 60, 90)],
            )
        ).record
        # The second installment is split in two (its second half added at the end), the third moved.
        split = (await sales.update_payment_plan(
            contract_id, expected_version=1,
            installments=[(day + timedelta(days=30), cny("30000")), (day + timedelta(days=60), cny("15000")),
                          (day + timedelta(days=120), cny("30000")), (day + timedelta(days=75), cny("15000"))],
        )).record  # fmt: skip
        with pytest.raises(StaleVersion):
            await sales.update_payment_plan(contract_id, expected_version=1, installments=[(day, cny("90000"))])
        with pytest.raises(ValidationFailed) as short:
            await sales.update_payment_plan(
                contract_id, expected_version=2, installments=[(day + timedelta(days=30), cny("30000"))]
            )
        with pytest.raises(Conflict) as paid:
            await sales.update_payment_plan(
                contract_id, expected_version=2,
                installments=[(day + timedelta(days=31), cny("30000")), (day + timedelta(days=60), cny("60000"))],
            )  # fmt: skip
        merged = (await sales.update_payment_plan(
            contract_id, expected_version=2,
            installments=[(day + timedelta(days=30), cny("30000")), (day + timedelta(days=60), cny("60000"))],
        )).record  # fmt: skip
    assert (same.version, [i.id for i in same.installments]) == (1, [first.id, second.id, third.id])  # no change
    assert [(i.id, i.sequence, i.due_date, i.amount.amount, i.paid.amount) for i in split.installments] == [
        (first.id, 1, (day + timedelta(days=30)).isoformat(), "30000.00", "10000.00"),
        (second.id, 2, (day + timedelta(days=60)).isoformat(), "15000.00", "0.00"),
        (split.installments[2].id, 4, (day + timedelta(days=75)).isoformat(), "15000.00", "0.00"),
        (third.id, 3, (day + timedelta(days=120)).isoformat(), "30000.00", "0.00"),
    ]
    assert split.version == 2 and split.installments[2].id not in (first.id, second.id, third.id)
    assert short.value.errors[0].field == "installments"
    assert (paid.value.reason, paid.value.existing_id) == ("INSTALLMENT_PAID", first.id)
    assert "installments[0]" in paid.value.detail
    assert [(i.id, i.amount.amount) for i in merged.installments] == [(first.id, "30000.00"), (second.id, "60000.00")]
    updated = [
        events_pb2.PaymentPlanUpdated.FromString(p)
        for p in await outbox_events(engine, "crm.sales.payment_plan.updated")
    ]
    assert [(e.payment_plan.version, sorted(e.removed_installment_ids), e.actor.user_id) for e in updated] == [
        (2, [], "fin"), (3, sorted([third.id, split.installments[2].id]), "fin"),
    ]  # fmt: skip


async def test_contract_months_and_overdue_days_follow_the_business_time_zone(engine: AsyncEngine) -> None:
    """At 17:00 UTC on 30 November it is 1 December, 01:00, in Shanghai: a Shanghai business numbers
    the contract in December and holds the installment due on 30 November overdue."""
    clock = Clock(datetime(2026, 11, 1, 9, 0, tzinfo=UTC))
    shanghai = make_handlers(engine, clock, ZoneInfo("Asia/Shanghai"))
    contract_id = await signed_contract(shanghai, "1000")
    with as_user("fin", "finance"):
        await shanghai.create_payment_plan(
            idempotency_key="", contract_id=contract_id, installments=[(date(2026, 11, 30), cny("1000"))]
        )
    clock.now = datetime(2026, 11, 30, 17, 0, tzinfo=UTC)
    assert await make_handlers(engine, clock).mark_overdue_installments(10) == 0  # still 30 November in UTC
    assert await shanghai.mark_overdue_installments(10) == 1
    with as_user("rep1", "sales_rep"):
        december = await direct_contract(shanghai, "10")
    assert (await shanghai.get_contract(contract_id)).number.startswith("CT-202611-")
    assert december.number == "CT-202612-000001"


async def test_the_overdue_timer_leaves_an_installment_whose_contract_was_terminated_after_its_claim(
    sales: SalesHandlers, engine: AsyncEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer claims the installment while its contract is signed; the contract is terminated
    before the timer marks it: nothing is marked, and no installment.overdue follows contract.terminated."""
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        await sales.create_payment_plan(
            idempotency_key="", contract_id=contract_id, installments=[(clock().date(), cny("1000"))]
        )
    clock.now += timedelta(days=3)
    claimed, go_on = pause_at(monkeypatch, repository, "hold_signed_contracts")
    marking = asyncio.create_task(make_handlers(engine, clock).mark_overdue_installments(10))
    await claimed.wait()
    with as_user("fin", "finance"):
        await sales.terminate_contract(contract_id, expected_version=0, reason="customer insolvent")
    go_on.set()
    assert await marking == 0
    assert await outbox_events(engine, "crm.sales.installment.overdue") == []
    with as_user("fin", "finance"):
        [installment] = (await sales.get_payment_plan(contract_id)).installments
    assert installment.status == "pending"


async def test_a_rescheduled_overdue_installment_is_pending_again(sales: SalesHandlers, clock: Clock) -> None:
    contract_id = await signed_contract(sales, "1000")
    day = clock().date()
    with as_user("fin", "finance"):
        plan = await sales.create_payment_plan(
            idempotency_key="", contract_id=contract_id,
            installments=[(day + timedelta(days=5), cny("400")), (day + timedelta(days=10), cny("600"))],
        )  # fmt: skip
    clock.now += timedelta(days=7)
    assert await sales.mark_overdue_installments(10) == 1
    # No request made this change for the gateway to audit: the service's record goes with it.
    [audit] = [AuditRecorded.FromString(p) for p in await outbox_events(sales.engine, "crm.audit.record.recorded")]
    assert (audit.actor.user_id, audit.action, audit.resource, audit.record_id) == (
        "system",
        "mark_overdue",
        "payment_plans",
        plan.id,
    )
    assert (audit.method, audit.path) == ("JOB", "overdue-installments")
    due = (day + timedelta(days=5)).isoformat()
    assert audit.reason == f"installment 1 of contract {contract_id} was due on {due}"
    assert audit.fields == ["overdue_at", "status"]
    assert (audit.before["status"], audit.after["status"]) == ("pending", "overdue")
    with as_user("fin", "finance"):
        kept = (await sales.update_payment_plan(
            contract_id, expected_version=0,
            installments=[(day + timedelta(days=5), cny("400")), (day + timedelta(days=30), cny("600"))],
        )).record  # fmt: skip
        moved = (await sales.update_payment_plan(
            contract_id, expected_version=0,
            installments=[(day + timedelta(days=20), cny("400")), (day + timedelta(days=30), cny("600"))],
        )).record  # fmt: skip
    assert [i.status for i in kept.installments] == ["overdue", "pending"]  # unchanged: still overdue
    assert [i.status for i in moved.installments] == ["pending", "pending"]
    assert not moved.installments[0].HasField("overdue_at")


async def test_only_the_plan_of_a_contract_in_the_callers_sight_and_not_yet_done_with_changes(
    sales: SalesHandlers, clock: Clock
) -> None:
    contract_id = await signed_contract(sales, "1000")
    no_plan = await signed_contract(sales, "1000")
    day = clock().date()
    with as_user("fin", "finance"):
        await sales.create_payment_plan(idempotency_key="", contract_id=contract_id, installments=[(day, cny("1000"))])
    with as_user("bob", "sales_rep", scope="own"), pytest.raises(NotFound):
        await sales.update_payment_plan(contract_id, expected_version=0, installments=[(day, cny("1000"))])
    with as_user("fin", "finance"):
        with pytest.raises(NotFound):
            await sales.update_payment_plan(no_plan, expected_version=0, installments=[(day, cny("1000"))])
        await sales.terminate_contract(contract_id, expected_version=0, reason="customer insolvent")
        with pytest.raises(Conflict) as terminated:
            await sales.update_payment_plan(
                contract_id, expected_version=0, installments=[(day + timedelta(days=1), cny("1000"))]
            )
    assert terminated.value.reason == "ILLEGAL_STATE"


async def test_a_terminated_contracts_requested_invoices_can_only_be_voided(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("500"))
    with as_user("rep1", "sales_rep"):
        await sales.terminate_contract(contract_id, expected_version=0, reason="customer withdrew")
    with as_user("fin", "finance"):
        with pytest.raises(Conflict) as raised:
            await sales.issue_invoice(requested.id, number="FP-1", issued_at=None)
        voided = (await sales.void_invoice(requested.id, reason="contract terminated")).record
    assert raised.value.reason == "ILLEGAL_STATE" and "terminated" in raised.value.detail
    assert voided.status == "void"
    assert "crm.sales.invoice.issued" not in await outbox_types(engine)


async def test_the_erp_issues_the_invoice_the_crm_requested_once(sales: SalesHandlers, engine: AsyncEngine) -> None:
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("1000"))
    posting = erp_invoice(contract_id, "1000.00", "FP-1", "SAP-INV-1", invoice_id=requested.id)
    await erp_posts(sales, posting)
    await erp_posts(sales, posting)  # redelivered under a new event id
    # The same issue in a re-sent file under another reference changes nothing either.
    await erp_posts(sales, erp_invoice(contract_id, "1000.00", "FP-1", "SAP-INV-1-resent", invoice_id=requested.id))
    with as_user("fin", "finance"):
        invoices = (await sales.list_invoices(Page(), contract_id=contract_id)).items
        [receivable] = (await sales.list_receivables("acc-1", Page())).items
    assert [(i.id, *invoice_row(i)) for i in invoices] == [(requested.id, "issued", "FP-1", "1000.00", "SAP-INV-1")]
    assert receivable.invoiced.amount == "1000.00"
    issued = [events_pb2.InvoiceIssued.FromString(p) for p in await outbox_events(engine, "crm.sales.invoice.issued")]
    assert [(e.invoice.id, e.invoice.number, e.actor.user_id) for e in issued] == [(requested.id, "FP-1", "erp")]


async def test_an_erp_invoice_without_an_id_is_one_the_erp_raised_on_its_own(sales: SalesHandlers) -> None:
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("400"))
    await erp_posts(sales, erp_invoice(contract_id, "400.00", "FP-1", "SAP-1", invoice_id=requested.id))
    await erp_posts(sales, erp_invoice(contract_id, "600.00", "FP-2", "SAP-2"))
    beyond = await erp_refuses(sales, erp_invoice(contract_id, "0.01", "FP-3", "SAP-3"))
    assert isinstance(beyond, ValidationFailed) and "exceeds the uninvoiced 0.00" in beyond.errors[0].message
    with as_user("fin", "finance"):
        invoices = (await sales.list_invoices(Page(), contract_id=contract_id)).items
        [receivable] = (await sales.list_receivables("acc-1", Page())).items
    assert sorted(invoice_row(i) for i in invoices) == [
        ("issued", "FP-1", "400.00", "SAP-1"), ("issued", "FP-2", "600.00", "SAP-2"),
    ]  # fmt: skip
    assert [i.id for i in invoices if i.number == "FP-1"] == [requested.id]
    assert receivable.invoiced.amount == "1000.00"


async def test_every_erp_posting_is_audited_with_what_it_changed_as_the_gateway_audits_a_request(
    sales: SalesHandlers, engine: AsyncEngine, clock: Clock
) -> None:
    """Postings reach the CRM on Kafka, past the gateway that audits every request: the sales service
    publishes their audit records itself, in the posting's transaction (the gateway stores them)."""
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("400"))
    issue = erp_invoice(contract_id, "400.00", "FP-1", "SAP-1", invoice_id=requested.id)
    await erp_posts(sales, issue)
    await erp_posts(sales, issue)  # redelivered under a new event id: changes nothing
    await erp_posts(sales, erp_invoice(contract_id, "600.00", "FP-2", "SAP-2"))  # raised by the ERP
    payment = payments_pb2.ErpPaymentPosted(
        contract_id=contract_id, amount=common_pb2.Money(amount="250.00", currency="CNY"), external_reference="BANK-1"
    )
    headers = CloudEventHeaders(id="evt-pay-1", type="erp.payment.posted", source="/erp/sap", time=utcnow())
    async with sales.uow.begin() as tx:
        await SalesConsumers(sales).erp_payment_posted(
            tx, ReceivedEvent(headers, payment, contract_id, "erp.payments.v1", 3, 41)
        )
    await erp_refuses(sales, erp_invoice(contract_id, "0.01", "FP-3", "SAP-3"))  # rolled back: no record

    audits = [AuditRecorded.FromString(p) for p in await outbox_events(engine, "crm.audit.record.recorded")]
    with as_user("fin", "finance"):
        [raised] = [i for i in (await sales.list_invoices(Page(), contract_id=contract_id)).items if i.number == "FP-2"]
        [paid] = (await sales.list_payments(Page(), contract_id=contract_id)).items
    assert [(a.action, a.resource, a.record_id, list(a.fields)) for a in audits] == [
        ("update", "invoices", requested.id, ["external_reference", "issued_at", "number", "status", "version"]),
        ("replay", "invoices", requested.id, []),
        ("create", "invoices", raised.id, sorted(json_format.MessageToDict(raised, preserving_proto_field_name=True))),
        ("create", "payments", paid.id, sorted(json_format.MessageToDict(paid, preserving_proto_field_name=True))),
    ]
    update, replay, _, paid_audit = audits
    assert (dict(update.before), dict(update.after)) == (
        {"status": "requested", "number": None, "external_reference": None, "issued_at": None, "version": "1"},
        {
            "status": "issued",
            "number": "FP-1",
            "external_reference": "SAP-1",
            "issued_at": update.after["issued_at"],
            "version": "2",  # int64 in protobuf's JSON form
        },
    )
    assert not replay.HasField("before") and not replay.HasField("after") and "external_reference" in replay.reason
    assert not paid_audit.HasField("before") and paid_audit.after["amount"]["amount"] == "250.00"
    assert (paid_audit.actor.user_id, list(paid_audit.actor.roles), paid_audit.outcome) == (
        "erp",
        ["erp_integration"],
        "allowed",
    )
    assert (paid_audit.request_id, paid_audit.method, paid_audit.path, paid_audit.client_address) == (
        "evt-pay-1",
        "KAFKA",
        "erp.payments.v1/3/41",
        "/erp/sap",
    )
    assert paid_audit.occurred_at.ToDatetime(tzinfo=UTC) == clock.now
    assert [key for key, _ in await outbox_keyed(engine, "crm.audit.record.recorded")] == [a.record_id for a in audits]


async def test_the_erp_issues_a_requested_invoice_under_the_rules_of_the_api(sales: SalesHandlers) -> None:
    contract_id, elsewhere_id = await signed_contract(sales, "1000"), await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("400"))
        taken = await sales.request_invoice(idempotency_key="", contract_id=elsewhere_id, amount=cny("100"))
        await sales.issue_invoice(taken.id, number="FP-TAKEN", issued_at=None)

    wrong_amount = await erp_refuses(sales, erp_invoice(contract_id, "400.01", "FP-1", "R-1", requested.id))
    assert isinstance(wrong_amount, ValidationFailed) and wrong_amount.errors[0].field == "amount"
    other_contract = await erp_refuses(sales, erp_invoice(elsewhere_id, "400.00", "FP-1", "R-2", requested.id))
    assert isinstance(other_contract, ValidationFailed) and other_contract.errors[0].field == "invoice_id"
    unknown = await erp_refuses(sales, erp_invoice(contract_id, "400.00", "FP-1", "R-3", "no-such-invoice"))
    assert isinstance(unknown, NotFound)
    number_taken = await erp_refuses(sales, erp_invoice(contract_id, "400.00", "FP-TAKEN", "R-4", requested.id))
    assert isinstance(number_taken, AlreadyExists)
    with as_user("rep1", "sales_rep"):
        await sales.terminate_contract(contract_id, expected_version=0, reason="customer withdrew")
    terminated = await erp_refuses(sales, erp_invoice(contract_id, "400.00", "FP-1", "R-5", requested.id))
    assert isinstance(terminated, Conflict) and terminated.reason == "ILLEGAL_STATE"
    with as_user("fin", "finance"):
        assert invoice_row(await sales.get_invoice(requested.id)) == ("requested", "", "400.00", "")


async def test_payments_need_a_signed_contract(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id="", account_id="acc", title="T", amount=cny("10"),
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        with pytest.raises(Conflict):
            await sales.record_payment(
                contract_id=contract.id, amount=cny("1"), received_at=None, method="", external_reference="R"
            )


async def test_concurrent_postings_never_overpay(sales_each_database: SalesHandlers) -> None:
    """Also on SQLite, which has no row locks: write transactions there begin IMMEDIATE."""
    sales = sales_each_database
    contract_id = await signed_contract(sales, "1000")

    async def pay(n: int) -> str:
        with as_user("erp", "erp_integration"):
            try:
                await sales.record_payment(
                    contract_id=contract_id, amount=cny("300"), received_at=None, method="", external_reference=f"P{n}"
                )
            except ValidationFailed:
                return "rejected"
            return "booked"

    results = await asyncio.gather(*(pay(n) for n in range(6)))
    assert results.count("booked") == 3
    with as_user("rep1", "sales_rep"):
        contract = (await sales.list_receivables("acc-1", Page())).items[0]
    assert contract.paid.amount == "900.00"


async def test_a_payment_is_not_received_in_the_future_from_the_api_or_the_erp(
    sales: SalesHandlers, clock: Clock
) -> None:
    contract_id = await signed_contract(sales, "1000")
    far_future = datetime(2199, 6, 1, tzinfo=UTC)
    with as_user("fin", "finance"):
        with pytest.raises(ValidationFailed) as raised:
            await sales.record_payment(
                contract_id=contract_id, amount=cny("300"), received_at=far_future, method="wire",
                external_reference="BANK-FUTURE",
            )  # fmt: skip
        # A caller's clock a minute fast is allowed for.
        await sales.record_payment(
            contract_id=contract_id, amount=cny("100"), received_at=clock.now + timedelta(minutes=1), method="wire",
            external_reference="BANK-NOW",
        )  # fmt: skip
    posting = payments_pb2.ErpPaymentPosted(
        contract_id=contract_id, amount=common_pb2.Money(amount="300.00", currency="CNY"), external_reference="ERP-1"
    )
    posting.received_at.FromDatetime(far_future)
    headers = CloudEventHeaders(id=new_id(), type="erp.payment.posted", source="/erp/sap", time=utcnow())
    with pytest.raises(ValidationFailed) as refused_erp:  # the reason goes with it to the dead-letter topic
        async with sales.uow.begin() as tx:
            await SalesConsumers(sales).erp_payment_posted(
                tx, ReceivedEvent(headers, posting, contract_id, "erp.payments.v1", 0, 0)
            )
    assert fields_of(raised) == fields_of(refused_erp) == ["received_at"]
    assert "received_at: must not be in the future" in str(refused_erp.value)
    with as_user("fin", "finance"):
        [receivable] = [
            r for r in (await sales.list_receivables("acc-1", Page())).items if r.contract_id == contract_id
        ]
        payments = await sales.list_payments(Page(), contract_id=contract_id)
    assert receivable.paid.amount == "100.00"
    assert [p.external_reference for p in payments.items] == ["BANK-NOW"]


async def test_an_erp_posting_with_text_or_a_time_no_column_holds_is_refused_naming_the_field(
    sales: SalesHandlers,
) -> None:
    """A Kafka posting is not checked by the gateway: a NUL in its text, or a time past the year
    9999, is a validation error naming the field (dead-lettered at once with it), not a database
    error retried and then dead-lettered as raw SQL."""
    contract_id = await signed_contract(sales, "1000")
    headers = CloudEventHeaders(id=new_id(), type="erp.payment.posted", source="/erp/sap", time=utcnow())
    refused: list[list[tuple[str, str]]] = []
    year_10k = 253402300800
    for reference, method, seconds in (("BANK\x00-1", "wire", 0), ("BANK-2", "wi\x00re", 0), ("BANK-3", "", year_10k)):
        posting = payments_pb2.ErpPaymentPosted(
            contract_id=contract_id, amount=common_pb2.Money(amount="10.00", currency="CNY"),
            external_reference=reference, method=method,
        )  # fmt: skip
        posting.received_at.seconds = seconds
        with pytest.raises(ValidationFailed) as raised:
            async with sales.uow.begin() as tx:
                await SalesConsumers(sales).erp_payment_posted(
                    tx, ReceivedEvent(headers, posting, contract_id, "erp.payments.v1", 0, 0)
                )
        refused.append(refusals(raised))
    invoice = await erp_refuses(sales, erp_invoice(contract_id, "100.00", "FP\x00-9", "ERP-INV-1"))
    assert refused == [
        [("external_reference", "must not contain NUL characters")],
        [("method", "must not contain NUL characters")],
        [("received_at", "is not a time between the years 1 and 9999")],
    ]
    assert isinstance(invoice, ValidationFailed)
    assert [(e.field, e.message) for e in invoice.errors] == [("number", "must not contain NUL characters")]
    with as_user("fin", "finance"):
        assert list((await sales.list_payments(Page(), contract_id=contract_id)).items) == []


async def test_a_contract_is_not_signed_nor_an_invoice_issued_in_the_future(sales: SalesHandlers, clock: Clock) -> None:
    far_future = datetime(2199, 6, 1, tzinfo=UTC)
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        invoice = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("400"))
        with pytest.raises(ValidationFailed) as issued_later:
            await sales.issue_invoice(invoice.id, number="INV-1", issued_at=far_future)
    with pytest.raises(ValidationFailed) as erp_later:  # an ERP's posting: dead-lettered with the reason
        async with sales.uow.begin() as tx:
            await sales.record_erp_invoice(
                tx, contract_id=contract_id, amount=cny("100"), number="INV-2", issued_at=far_future,
                external_reference="ERP-INV-FUTURE",
            )  # fmt: skip
    assert fields_of(issued_later) == fields_of(erp_later) == ["issued_at"]
    opportunity_id = await won_deal(sales, "500")
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        with pytest.raises(ValidationFailed) as signed_later:
            await sales.sign_contract(contract.id, expected_version=0, signed_at=far_future)
    assert fields_of(signed_later) == ["signed_at"]


RECORD_PAYMENT = "/crm.sales.v1.SalesService/RecordPayment"


async def post_payment(sales: SalesHandlers, request: sales_service_pb2.RecordPaymentRequest) -> Any:
    """RecordPayment as the gRPC layer serves it: with the fingerprint of the keyed request."""
    with idempotency.serving_fingerprint(idempotency.request_fingerprint(request, RECORD_PAYMENT)):
        return await SalesServicer(sales).RecordPayment(request, context=None)  # type: ignore[arg-type]


async def test_a_payment_posted_again_under_its_idempotency_key_answers_as_the_first_time(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    contract_id = await signed_contract(sales, "1000")
    money = common_pb2.Money(amount="300.00", currency="CNY")

    def posting(key: str, reference: str, amount: common_pb2.Money = money) -> sales_service_pb2.RecordPaymentRequest:
        return sales_service_pb2.RecordPaymentRequest(
            contract_id=contract_id, amount=amount, external_reference=reference, idempotency_key=key
        )

    with as_user("fin", "finance"):
        first = await post_payment(sales, posting("retry-1", "MANUAL-1"))
        again = await post_payment(sales, posting("retry-1", "MANUAL-1"))
        with pytest.raises(ValidationFailed) as reused:  # the same key for another payment
            await post_payment(sales, posting("retry-1", "MANUAL-2", common_pb2.Money(amount="30.00", currency="CNY")))
        # A key first used for a reference posted before answers as that posting did: not created.
        repeat = await post_payment(sales, posting("retry-2", "MANUAL-1"))
        repeat_again = await post_payment(sales, posting("retry-2", "MANUAL-1"))
    with as_user("other", "finance"):  # keys are per caller: another user's is another request
        theirs = await post_payment(sales, posting("retry-1", "MANUAL-1"))
    assert (first.created, again.created, again.payment) == (True, True, first.payment)
    assert [(e.field, e.message) for e in reused.value.errors] == [
        ("idempotency_key", "was used with a different request")
    ]
    assert (repeat.created, repeat_again.created, repeat_again.payment.id) == (False, False, first.payment.id)
    assert (theirs.created, theirs.payment.id) == (False, first.payment.id)
    assert len(await outbox_events(engine, "crm.sales.payment.received")) == 1
    with as_user("fin", "finance"):
        payments = await sales.list_payments(Page(), contract_id=contract_id)
        receivables = await sales.list_receivables("acc-1", Page())
    assert [p.external_reference for p in payments.items] == ["MANUAL-1"]
    assert [r.paid.amount for r in receivables.items if r.contract_id == contract_id] == ["300.00"]


async def test_account_totals_cover_every_contract_and_lifetime_value_counts_closed_ones(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    running, completed, terminated = [await signed_contract(sales, "1000") for _ in range(3)]
    with as_user("erp", "erp_integration"):
        for contract_id, amount in ((running, "300"), (completed, "1000"), (terminated, "200")):
            await sales.record_payment(
                contract_id=contract_id, amount=cny(amount), received_at=None, method="", external_reference=contract_id
            )
    with as_user("rep1", "sales_rep"):
        await sales.complete_contract(completed, expected_version=0)
        await sales.terminate_contract(terminated, expected_version=0, reason="customer went bankrupt")
        page = await sales.list_receivables("acc-1", Page(limit=1))
    assert len(page.items) == 1 and page.next_cursor  # one contract listed, totals over all of them
    assert page.account.outstanding == {"CNY": Decimal("700.00")}  # the terminated contract is no longer owed
    assert page.account.lifetime_paid == {"CNY": Decimal("1500.00")}
    assert page.account.overdue == {"CNY": Decimal("0")}
    with as_user("someone-else", "sales_rep", scope="own"):  # totals respect the record scope like the list
        assert (await sales.list_receivables("acc-1", Page())).account.lifetime_paid == {}

    finished = [
        events_pb2.ContractCompleted.FromString(p) for p in await outbox_events(engine, "crm.sales.contract.completed")
    ]
    ended = [
        events_pb2.ContractTerminated.FromString(p)
        for p in await outbox_events(engine, "crm.sales.contract.terminated")
    ]
    assert [e.contract.id for e in finished] == [completed] and finished[0].contract.status == "completed"
    assert [e.contract.id for e in ended] == [terminated] and ended[0].reason == "customer went bankrupt"


# ---------------------------------------------------------------- other records a request's body names


async def test_a_quotes_or_contracts_opportunity_missing_or_outside_the_scope_is_a_422_naming_it(
    sales: SalesHandlers,
) -> None:
    opportunity_id = await won_deal(sales, owner="alice")

    async def contract_from(deal_id: str) -> sales_pb2.Contract:
        return await sales.create_contract(
            idempotency_key="", opportunity_id=deal_id, account_id="", title="", amount=None, owner_id="", team="",
            region="", starts_on=None, ends_on=None,
        )  # fmt: skip

    with as_user("bob", "sales_rep", scope="own"):
        for deal_id in (opportunity_id, "no-such-deal"):
            with pytest.raises(ValidationFailed) as quote:
                await sales.create_quote(idempotency_key="", opportunity_id=deal_id, line_items=[item()])
            with pytest.raises(ValidationFailed) as contract:
                await contract_from(deal_id)
            expected = [("opportunity_id", f"opportunity {deal_id} does not exist")]
            assert refusals(quote) == refusals(contract) == expected
    with as_user("alice", "sales_rep", scope="own"):
        quoted = await sales.create_quote(idempotency_key="", opportunity_id=opportunity_id, line_items=[item()])
        contracted = await contract_from(opportunity_id)
    assert quoted.opportunity_id == contracted.opportunity_id == opportunity_id


async def test_a_payments_or_invoices_contract_missing_or_outside_the_scope_is_a_422_naming_it(
    sales: SalesHandlers,
) -> None:
    contract_id = await signed_contract(sales)  # rep1's
    with as_user("fin-2", "finance", scope="own"):  # a scope that leaves rep1's contract out
        for wanted in (contract_id, "no-such-contract"):
            with pytest.raises(ValidationFailed) as payment:
                await sales.record_payment(
                    contract_id=wanted, amount=cny("10"), received_at=None, method="", external_reference=f"R-{wanted}"
                )
            with pytest.raises(ValidationFailed) as invoice:
                await sales.request_invoice(idempotency_key="", contract_id=wanted, amount=cny("10"))
            expected = [("contract_id", f"contract {wanted} does not exist")]
            assert refusals(payment) == refusals(invoice) == expected
    with as_user("fin-1", "finance"):
        paid, _ = await sales.record_payment(
            contract_id=contract_id, amount=cny("10"), received_at=None, method="", external_reference="R-1"
        )
        invoiced = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("10"))
    assert paid.contract_id == invoiced.contract_id == contract_id


async def test_a_new_deals_pipeline_that_does_not_exist_is_a_422_naming_it(sales: SalesHandlers) -> None:
    with as_user("admin", "admin"):
        with pytest.raises(ValidationFailed) as created:
            await sales.create_opportunity(OpportunityIn(account_id="a", name="n", pipeline_id="no-such-pipeline"))
        with pytest.raises(ValidationFailed) as imported:
            await sales.import_opportunities(
                "no-such-pipeline", [ImportRow("X1", OpportunityIn(account_id="a", name="n"))]
            )
        expected = [("pipeline_id", "pipeline no-such-pipeline does not exist")]
        assert refusals(created) == refusals(imported) == expected
        deal = await sales.create_opportunity(OpportunityIn(account_id="a", name="n", pipeline_id=DEFAULT_PIPELINE_ID))
    assert deal.pipeline_id == DEFAULT_PIPELINE_ID


# ---------------------------------------------------------------- input sized to its columns


async def test_text_longer_than_its_column_is_a_422_naming_the_field(sales: SalesHandlers) -> None:
    """Also for gRPC and ERP callers, whom the gateway's limits do not cover (PostgreSQL refused the
    text: a 500, and an ERP posting was retried before it was dead-lettered)."""
    contract_id = await signed_contract(sales, "1000")
    won, lost = d.DEFAULT_STAGES[-2:]

    async def refused(call: Any) -> list[str]:
        with pytest.raises(ValidationFailed) as raised:
            await call
        return fields_of(raised)

    def pay(method: str, reference: str) -> Any:
        return sales.record_payment(
            contract_id=contract_id, amount=cny("1"), received_at=None, method=method, external_reference=reference
        )

    def pipeline(name: str, first_stage_key: str) -> Any:
        stages = [d.Stage(first_stage_key, "First", Decimal(10)), won, lost]
        return sales.create_pipeline(idempotency_key="", name=name, stages=stages, is_default=False)

    with as_user("fin", "finance"):
        assert await refused(pay("m" * 65, "P-1")) == ["method"]
        assert await refused(pay("wire", "P" * 201)) == ["external_reference"]
        await pay("m" * 64, "P" * 200)
        requested = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("100"))
        assert await refused(sales.issue_invoice(requested.id, number="N" * 65, issued_at=None)) == ["number"]
        assert await refused(
            sales.request_invoice(idempotency_key="k" * 201, contract_id=contract_id, amount=cny("1"))
        ) == ["idempotency_key"]
    for posting, field in (
        (erp_invoice(contract_id, "100.00", "N" * 65, "R-1", requested.id), "number"),
        (erp_invoice(contract_id, "100.00", "N-1", "R" * 201, requested.id), "external_reference"),
    ):
        error = await erp_refuses(sales, posting)
        assert isinstance(error, ValidationFailed) and [e.field for e in error.errors] == [field]
    with as_user("admin", "admin"):
        assert await refused(pipeline("P", "k" * 65)) == ["stages[0].key"]
        assert await refused(pipeline("n" * 201, "first")) == ["name"]
        await pipeline("n" * 200, "k" * 64)
    with as_user("rep1", "sales_rep"):
        long_line = LineItemIn("p", "P", "L" * 201, Decimal(1), cny("1"), Decimal(0))
        assert await refused(
            sales.create_opportunity(OpportunityIn(account_id="a", name="n", line_items=[long_line]))
        ) == ["line_items[0].product_line"]


async def test_an_import_row_with_an_over_long_external_id_is_rejected_alone(sales: SalesHandlers) -> None:
    rows = [
        ImportRow("X" * 201, OpportunityIn(account_id="a", name="n1", owner_id="o1")),
        ImportRow("X" * 200, OpportunityIn(account_id="a", name="n2", owner_id="o1")),
    ]
    with as_user("admin", "admin"):
        results = await sales.import_opportunities("", rows)
    assert [(r.outcome, [e.field for e in r.errors]) for r in results] == [
        ("rejected", ["external_id"]), ("created", []),
    ]  # fmt: skip


# ---------------------------------------------------------------- overdue installments


async def test_overdue_installments_are_claimed_once_across_replicas(
    engine: AsyncEngine, sales: SalesHandlers, clock: Clock
) -> None:
    contract_ids = [await signed_contract(sales, "300") for _ in range(5)]
    today = clock().date()
    with as_user("rep1", "sales_rep"):
        for contract_id in contract_ids:
            await sales.create_payment_plan(
                idempotency_key="", contract_id=contract_id,
                installments=[(today + timedelta(days=n * 10), cny("100")) for n in (1, 2, 3)],
            )  # fmt: skip
        await sales.record_payment(
            contract_id=contract_ids[0], amount=cny("100"), received_at=None, method="", external_reference="early"
        )
    clock.now += timedelta(days=25)  # the first two installments of each contract are past due
    with as_user("erp", "erp_integration"):  # a partial payment before the timer runs does not skip its event
        await sales.record_payment(
            contract_id=contract_ids[1], amount=cny("30"), received_at=None, method="", external_reference="late"
        )
    replicas = [make_handlers(engine, clock) for _ in range(3)]
    counts = await asyncio.gather(*(replica.mark_overdue_installments(2) for replica in replicas for _ in range(4)))
    assert sum(counts) == 9  # 5 contracts x 2 due, less the one already paid
    assert await sales.mark_overdue_installments(100) == 0
    payloads = await outbox_events(engine, "crm.sales.installment.overdue")
    events = [events_pb2.InstallmentOverdue.FromString(p) for p in payloads]
    assert len({e.installment.id for e in events}) == 9
    assert all(e.account_id == "acc-1" and e.installment.status == "overdue" for e in events)
    with as_user("rep1", "sales_rep"):
        receivable = next(
            x for x in (await sales.list_receivables("acc-1", Page())).items if x.contract_id == contract_ids[1]
        )
    assert receivable.overdue.amount == "170.00"


# ---------------------------------------------------------------- account events


async def test_merged_and_transferred_accounts_repoint_deals_and_contracts(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("alice", "sales_rep"):
        open_deal = await sales.create_opportunity(OpportunityIn(account_id="dup", name="Open"))
        other_owner = await sales.create_opportunity(OpportunityIn(account_id="dup", name="Bob's", owner_id="bob"))
    contract_id = await signed_contract(sales, "100")
    async with sales.uow.begin() as tx:
        await sales.repoint_account(tx, duplicate_id="acc-1", survivor_id="dup")
    async with sales.uow.begin() as tx:
        await sales.follow_account_owner(
            tx, account_id="dup", previous_owner_id="alice", new_owner_id="dave", team="west", region=""
        )
    async with sales.uow.begin() as tx:
        await sales.repoint_account(tx, duplicate_id="dup", survivor_id="survivor")
    with as_user("admin", "admin"):
        moved = await sales.get_opportunity(open_deal.id)
        untouched = await sales.get_opportunity(other_owner.id)
        contract = await sales.get_contract(contract_id)
    assert (moved.account_id, moved.owner_id, moved.team) == ("survivor", "dave", "west")
    assert (untouched.account_id, untouched.owner_id) == ("survivor", "bob")
    assert contract.account_id == "survivor" and contract.owner_id == "rep1"
    updated = [
        events_pb2.OpportunityUpdated.FromString(p)
        for p in await outbox_events(engine, "crm.sales.opportunity.updated")
    ]
    assert ["owner_id", "team"] in [list(e.changed_fields) for e in updated]


async def test_a_deal_update_event_names_the_fields_of_the_deal_that_changed(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-f", name="Deal", amount=cny("500")))
        moved = await sales.update_opportunity(
            deal.id, expected_version=0, changes={"expected_close_date": date(2027, 3, 31)}
        )
        await sales.update_opportunity(
            deal.id, expected_version=moved.record.version, changes={"amount": Money(Decimal("500"), "USD")}
        )
    updated = [
        list(events_pb2.OpportunityUpdated.FromString(p).changed_fields)
        for p in await outbox_events(engine, "crm.sales.opportunity.updated")
    ]
    assert updated == [["expected_close_date"], ["amount"]]


async def test_quotes_move_with_their_deal_when_the_account_is_transferred(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("alice", "sales_rep", scope="own"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-t", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
    async with sales.uow.begin() as tx:
        await sales.follow_account_owner(
            tx, account_id="acc-t", previous_owner_id="alice", new_owner_id="dave", team="west", region=""
        )
    with as_user("dave", "sales_rep", team="west", scope="own"):
        moved = await sales.get_quote(quote.id)
    assert (moved.owner_id, moved.team, moved.region) == ("dave", "west", "cn-east")
    with as_user("alice", "sales_rep", scope="own"), pytest.raises(NotFound):
        await sales.get_quote(quote.id)
    [(key, event)] = await quote_updates(engine)
    assert (key, event.quote) == (quote.id, moved)
    assert (list(event.changed_fields), event.reason) == (["owner_id", "team"], "crm.accounts.account.transferred")


async def test_a_merge_publishes_each_contract_quote_and_invoice_it_moves_to_the_survivor(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    contract_id = await signed_contract(sales, "1000")  # of account acc-1
    with as_user("fin", "finance"):
        invoice = await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny("400"))
    with as_user("alice", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Next deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
    async with sales.uow.begin() as tx:
        await sales.repoint_account(tx, duplicate_id="acc-1", survivor_id="survivor")
    with as_user("admin", "admin"):
        contract = await sales.get_contract(contract_id)
        moved_invoice = await sales.get_invoice(invoice.id)
        moved_quote = await sales.get_quote(quote.id)
    [(quote_key, requoted)] = await quote_updates(engine)
    assert (quote_key, requoted.quote) == (quote.id, moved_quote)
    assert (moved_quote.account_id, moved_quote.version) == ("survivor", quote.version + 1)
    assert (list(requoted.changed_fields), requoted.reason) == (["account_id"], "crm.accounts.account.merged")
    [(contract_key, contract_payload)] = await outbox_keyed(engine, "crm.sales.contract.updated")
    updated = events_pb2.ContractUpdated.FromString(contract_payload)
    assert contract_key == contract_id
    assert updated.contract == contract  # the whole contract as it is now, its version included
    assert contract.account_id == "survivor"
    assert (list(updated.changed_fields), updated.reason) == (["account_id"], "crm.accounts.account.merged")
    [(invoice_key, invoice_payload)] = await outbox_keyed(engine, "crm.sales.invoice.updated")
    repointed = events_pb2.InvoiceUpdated.FromString(invoice_payload)
    assert invoice_key == invoice.id
    assert repointed.invoice == moved_invoice and moved_invoice.account_id == "survivor"
    assert moved_invoice.version == invoice.version + 1  # an ERP keeping the highest version takes the move
    assert (list(repointed.changed_fields), repointed.reason) == (["account_id"], "crm.accounts.account.merged")


async def test_a_transfer_publishes_each_running_contract_handed_to_the_new_owner(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    running = await signed_contract(sales, "1000")  # rep1's, team east, of account acc-1
    with as_user("bob", "sales_rep"):
        bobs = await direct_contract(sales, "500")
    async with sales.uow.begin() as tx:
        await sales.follow_account_owner(
            tx, account_id="acc-1", previous_owner_id="rep1", new_owner_id="dave", team="west", region=""
        )
    with as_user("admin", "admin"):
        contract = await sales.get_contract(running)
        untouched = await sales.get_contract(bobs.id)
    [(key, payload)] = await outbox_keyed(engine, "crm.sales.contract.updated")
    updated = events_pb2.ContractUpdated.FromString(payload)
    assert key == running
    assert updated.contract == contract  # the whole contract as it is now, its version included
    assert (contract.owner_id, contract.team, contract.region) == ("dave", "west", "cn-east")
    assert (list(updated.changed_fields), updated.reason) == (["owner_id", "team"], "crm.accounts.account.transferred")
    assert (untouched.owner_id, untouched.version) == ("bob", bobs.version)


# ---------------------------------------------------------------- SQLite: exact money without a decimal type


async def test_amounts_stay_exact_on_sqlite(tmp_path: Any) -> None:
    engine = await migrated_engine(f"sqlite+aiosqlite:///{tmp_path / 'sales.db'}")
    try:
        sales = make_handlers(engine, Clock())
        with as_user("rep1", "sales_rep"):
            for _ in range(10):
                await sales.create_opportunity(
                    OpportunityIn(account_id="a", name="d", amount=cny("0.10"), expected_close_date=date(2026, 12, 1))
                )
            [line] = await sales.forecast(ForecastQuery())
            assert line.pipeline == Decimal("1.00")  # 10 x 0.10 is 1.0000000000000002 in floats
            assert line.weighted == Decimal("0.10")
        async with engine.connect() as conn:
            count = await conn.scalar(select(func.count()).select_from(metadata.tables["opportunities"]))
        assert count == 10
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- custom fields


async def test_custom_fields_are_validated_on_every_write(sales: SalesHandlers) -> None:
    definitions = CustomFieldServicer(
        sales.engine, custom_fields, keys=idempotency_keys, entities=(OPPORTUNITY_ENTITY,)
    )

    async def upsert(**fields: Any) -> None:
        definition = cf_pb.CustomFieldDefinition(**fields)
        await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)

    await upsert(
        entity="opportunity", key="channel", label="Channel", type="enum", required=True, options=["direct", "partner"]
    )
    await upsert(entity="opportunity", key="budget", label="Budget", type="decimal")
    with pytest.raises(ValidationFailed) as wrong_entity:
        await upsert(entity="account", key="x", label="X", type="text")
    assert wrong_entity.value.errors[0].field == "entity"
    with as_user("rep1", "sales_rep"):
        with pytest.raises(ValidationFailed) as missing:
            await sales.create_opportunity(OpportunityIn(account_id="a", name="n"))
        assert [e.field for e in missing.value.errors] == ["custom.channel"]
        with pytest.raises(ValidationFailed) as invalid:
            await sales.create_opportunity(
                OpportunityIn(account_id="a", name="n", custom={"channel": "tv", "colour": "red"})
            )
        assert sorted(e.field for e in invalid.value.errors) == ["custom.channel", "custom.colour"]
        opp = await sales.create_opportunity(
            OpportunityIn(account_id="a", name="n", custom={"channel": "partner", "budget": "1200.50"})
        )
        updated = (
            await sales.update_opportunity(opp.id, expected_version=0, changes={"custom": {"budget": "99"}})
        ).record
        with pytest.raises(ValidationFailed):
            await sales.update_opportunity(opp.id, expected_version=0, changes={"custom": {"channel": None}})
    assert dict(updated.custom) == {"channel": "partner", "budget": "99"}
    listed = await definitions.ListCustomFields(cf_pb.ListCustomFieldsRequest(entity="opportunity"), None)
    assert [d.key for d in listed.items] == ["budget", "channel"]
    channel = cf_pb.DeleteCustomFieldRequest(entity="opportunity", key="channel")
    await definitions.DeleteCustomField(channel, None)
    with pytest.raises(NotFound):
        await definitions.DeleteCustomField(channel, None)


async def test_opportunities_are_filtered_by_custom_fields(sales: SalesHandlers, engine: AsyncEngine) -> None:
    """`ListOpportunities(custom=[...])` through the servicer: typed by the definitions (JSONB
    containment, GIN-indexed); an undefined key or an ill-typed value is refused naming `custom.<key>`."""
    from crm.sales.v1 import sales_service_pb2 as pb
    from sales.servicer import SalesServicer
    from sqlalchemy import text

    definitions = CustomFieldServicer(
        sales.engine, custom_fields, keys=idempotency_keys, entities=(OPPORTUNITY_ENTITY,)
    )
    for key, kind, options in (
        ("channel", "enum", ["direct", "partner"]),
        ("fleet", "number", []),
        ("due", "date", []),
    ):
        definition = cf_pb.CustomFieldDefinition(entity="opportunity", key=key, label=key, type=kind, options=options)
        await definitions.UpsertCustomField(cf_pb.UpsertCustomFieldRequest(definition=definition), None)
    servicer = SalesServicer(sales)

    async def listed(*pairs: tuple[str, str], **filters: Any) -> list[str]:
        custom = [cf_pb.CustomFieldFilter(key=key, value=value) for key, value in pairs]
        reply = await servicer.ListOpportunities(pb.ListOpportunitiesRequest(custom=custom, **filters), None)
        return sorted(o.name for o in reply.items)

    with as_user("rep1", "sales_rep"):
        await sales.create_opportunity(
            OpportunityIn(
                account_id="a1", name="fleet", custom={"channel": "partner", "fleet": 40, "due": "2026-06-30"}
            )
        )
        await sales.create_opportunity(
            OpportunityIn(account_id="a2", name="single", custom={"channel": "direct", "fleet": 1})
        )
        await sales.create_opportunity(OpportunityIn(account_id="a3", name="plain"))
        assert await listed(("channel", "partner")) == ["fleet"]
        assert await listed(("fleet", "1.0")) == ["single"]
        assert await listed(("due", "2026-06-30"), ("fleet", "40")) == ["fleet"]
        assert await listed(("channel", "direct"), account_id="a1") == []
        assert await listed() == ["fleet", "plain", "single"]
        with pytest.raises(ValidationFailed) as refused:
            await listed(("colour", "red"), ("channel", "tv"), ("due", "tomorrow"))
        assert [e.field for e in refused.value.errors] == ["custom.colour", "custom.channel", "custom.due"]
    async with engine.connect() as conn:
        index = await conn.scalar(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_opportunities_custom_gin'")
        )
    assert index is not None and "jsonb_path_ops" in index


async def test_deals_rot_after_their_stage_rotting_days(sales: SalesHandlers, clock: Clock) -> None:
    with as_user("rep1", "sales_rep"):
        fresh = await sales.create_opportunity(OpportunityIn(account_id="a", name="fresh"))
        stale = await sales.create_opportunity(OpportunityIn(account_id="a", name="stale", primary_contact_id="c"))
        clock.now += timedelta(days=10)
        await sales.move_stage(stale.id, stage="needs_confirmed", expected_version=0)  # 21 rotting days
        clock.now += timedelta(days=12)
        assert (await sales.get_opportunity(fresh.id)).rotting  # 22 days in initial_contact (14)
        assert not (await sales.get_opportunity(stale.id)).rotting  # 12 days in needs_confirmed (21)
        rotting = await sales.list_opportunities(Page(), rotting_only=True)
        assert [o.name for o in rotting.items] == ["fresh"]
        clock.now += timedelta(days=10)
        rotting = await sales.list_opportunities(Page(), rotting_only=True)
        assert sorted(o.name for o in rotting.items) == ["fresh", "stale"]
        await sales.lose(fresh.id, expected_version=0, reason="gone", close_date=None)
        rotting = await sales.list_opportunities(Page(), rotting_only=True)
        assert [o.name for o in rotting.items] == ["stale"]


async def test_a_write_that_leaves_a_rotting_deal_in_its_stage_answers_it_rotting(
    sales: SalesHandlers, clock: Clock, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="a", name="slow", primary_contact_id="c"))
        clock.now += timedelta(days=15)  # initial_contact rots after 14 days
        renamed = await sales.update_opportunity(deal.id, expected_version=0, changes={"name": "slower"})
        assert (renamed.record.rotting, renamed.previous.rotting) == (True, True)
        assert renamed.record.rotting == (await sales.get_opportunity(deal.id)).rotting
        unchanged = await sales.update_opportunity(deal.id, expected_version=0, changes={"name": "slower"})
        assert unchanged.record.rotting and unchanged.record.version == renamed.record.version
    with as_user("boss", "sales_manager"):
        handed = await sales.assign_opportunity(deal.id, expected_version=0, owner_id="rep2", team="", region="")
        assert handed.record.rotting and handed.record.owner_id == "rep2"
    # The events carry the write, not the clock's view of the deal at the time.
    [updated] = await outbox_events(engine, "crm.sales.opportunity.updated")
    assert not events_pb2.OpportunityUpdated.FromString(updated).opportunity.rotting
    with as_user("rep2", "sales_rep"):
        moved = await sales.move_stage(deal.id, stage="needs_confirmed", expected_version=0)
        assert not moved.record.rotting


async def test_deleting_a_deal_takes_its_quotes_but_not_one_with_a_contract(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("mgr", "sales_manager"):
        mistake = await sales.create_opportunity(OpportunityIn(account_id="a", name="typo", product_line="GTX"))
        await sales.create_quote(idempotency_key="", opportunity_id=mistake.id, line_items=[item()])
        with pytest.raises(StaleVersion):
            await sales.delete_opportunity(mistake.id, expected_version=7)
        await sales.delete_opportunity(mistake.id, expected_version=mistake.version)
        with pytest.raises(NotFound):
            await sales.get_opportunity(mistake.id)
        assert (await sales.list_quotes(Page(), opportunity_id=mistake.id)).items == []
    opportunity_id = await won_deal(sales, "10")
    with as_user("rep1", "sales_rep"):
        await sales.create_contract(
            idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        with pytest.raises(Conflict):
            await sales.delete_opportunity(opportunity_id, expected_version=0)
    deleted = await outbox_events(engine, "crm.sales.opportunity.deleted")
    assert [events_pb2.OpportunityDeleted.FromString(p).opportunity_id for p in deleted] == [mistake.id]


async def test_only_a_contract_that_never_took_effect_is_deleted_with_its_decisions(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    decisions = metadata.tables["contract_decisions"]
    with as_user("rep1", "sales_rep"):
        draft = await direct_contract(sales, "10")
        rejected = await direct_contract(sales, "200000")
        await sales.submit_contract(rejected.id, expected_version=0)
        pending = await direct_contract(sales, "200000")
        await sales.submit_contract(pending.id, expected_version=0)
    with as_user("m", "sales_manager"):
        await sales.decide_contract(rejected.id, expected_version=0, decision=d.Decision.REJECTED, comment="terms")
    signed_id = await signed_contract(sales)
    with as_user("bob", "sales_rep", scope="own"), pytest.raises(NotFound):
        await sales.delete_contract(draft.id, expected_version=0)
    with as_user("rep1", "sales_rep"):
        with pytest.raises(StaleVersion):
            await sales.delete_contract(draft.id, expected_version=draft.version + 1)
        await sales.delete_contract(draft.id, expected_version=draft.version)
        await sales.delete_contract(rejected.id, expected_version=0)
        with pytest.raises(Conflict) as in_approval:
            await sales.delete_contract(pending.id, expected_version=0)
        with pytest.raises(Conflict) as in_force:
            await sales.delete_contract(signed_id, expected_version=0)
        for gone in (draft.id, rejected.id):
            with pytest.raises(NotFound):
                await sales.get_contract(gone)
        assert (await sales.get_contract(signed_id)).status == "signed"
    assert (in_approval.value.reason, in_force.value.reason) == ("ILLEGAL_STATE", "CONTRACT_IN_FORCE")
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).where(decisions.c.contract_id == rejected.id)) == 0
    deleted = [
        events_pb2.ContractDeleted.FromString(p) for p in await outbox_events(engine, "crm.sales.contract.deleted")
    ]
    assert [(e.contract_id, e.account_id, e.actor.user_id) for e in deleted] == [
        (draft.id, "acc-1", "rep1"), (rejected.id, "acc-1", "rep1"),
    ]  # fmt: skip


async def settled_quotes(sales: SalesHandlers, deal_id: str) -> tuple[Any, Any]:
    """Two of rep1's quotes past changing: one on `deal_id` a manager rejected, one on a won deal
    that has its contract."""
    with as_user("rep1", "sales_rep"):
        rejected = await sales.create_quote(
            idempotency_key="", opportunity_id=deal_id, line_items=[item(discount="35")]
        )
    with as_user("mgr", "sales_manager"):
        await sales.decide_quote(rejected.id, expected_version=0, decision=d.Decision.REJECTED, comment="too steep")
    contracted_deal = await won_deal(sales, "10")
    with as_user("rep1", "sales_rep"):
        contracted = await sales.create_quote(
            idempotency_key="", opportunity_id=contracted_deal, line_items=[item(discount="35")]
        )
        await sales.create_contract(
            idempotency_key="", opportunity_id=contracted_deal, account_id="", title="", amount=None,
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
    return rejected, contracted


async def test_only_a_quote_before_approval_whose_deal_has_no_contract_is_deleted(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        pending = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item(discount="35")])
        approved = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
    rejected, contracted = await settled_quotes(sales, deal.id)
    with as_user("bob", "sales_rep", scope="own"), pytest.raises(NotFound):
        await sales.delete_quote(pending.id, expected_version=0)
    with as_user("rep1", "sales_rep"):
        with pytest.raises(StaleVersion):
            await sales.delete_quote(pending.id, expected_version=pending.version + 1)
        await sales.delete_quote(pending.id, expected_version=pending.version)
        await sales.delete_quote(rejected.id, expected_version=0)
        with pytest.raises(Conflict) as approved_refused:
            await sales.delete_quote(approved.id, expected_version=0)
        with pytest.raises(Conflict) as contract_refused:
            await sales.delete_quote(contracted.id, expected_version=0)
        remaining = (await sales.list_quotes(Page(), opportunity_id=deal.id)).items
    assert [q.id for q in remaining] == [approved.id]
    assert (approved_refused.value.reason, contract_refused.value.reason) == ("ILLEGAL_STATE", "HAS_CONTRACT")
    deleted = [events_pb2.QuoteDeleted.FromString(p) for p in await outbox_events(engine, "crm.sales.quote.deleted")]
    assert [(e.quote_id, e.opportunity_id, e.actor.user_id) for e in deleted] == [
        (pending.id, deal.id, "rep1"), (rejected.id, deal.id, "rep1"),
    ]  # fmt: skip


def pause_at(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes `module.name` wait, once called, until the second event is set (the first says it was
    called): a transaction paused there keeps the locks it took so far."""
    reached, go_on = asyncio.Event(), asyncio.Event()
    original = getattr(module, name)

    async def paused(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await go_on.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(module, name, paused)
    return reached, go_on


async def create_contract_from(sales: SalesHandlers, opportunity_id: str) -> Any:
    return await sales.create_contract(
        idempotency_key="", opportunity_id=opportunity_id, account_id="", title="", amount=None,
        owner_id="", team="", region="", starts_on=None, ends_on=None,
    )  # fmt: skip


async def test_a_quote_deleted_while_its_deal_gets_a_contract_waits_for_it_and_stays(
    sales: SalesHandlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the contract's creation holds its deal's lock, the contract not yet written, when
    the quote's deletion comes: the deletion waits, then finds the contract and refuses."""
    deal_id = await won_deal(sales)
    with as_user("rep1", "sales_rep"):
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal_id, line_items=[item(discount="35")])
    numbering, go_on = pause_at(monkeypatch, repository, "next_contract_sequence")  # after the deal's lock
    with as_user("rep1", "sales_rep"):
        creating = asyncio.create_task(create_contract_from(sales, deal_id))
        await numbering.wait()
        deleting = asyncio.create_task(sales.delete_quote(quote.id, expected_version=0))
        await asyncio.sleep(0.3)
        assert not deleting.done()  # it waits for the deal's row, which the creation holds

        go_on.set()
        contract = await creating
        with pytest.raises(Conflict) as refused:
            await deleting
        assert (await sales.get_quote(quote.id)).id == quote.id
    assert (refused.value.reason, refused.value.existing_id) == ("HAS_CONTRACT", contract.id)


async def test_a_contract_made_while_a_quote_of_its_deal_is_deleted_waits_for_the_deletion(
    sales: SalesHandlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the other order. The deletion holds the deal's lock while it looks for a contract;
    the contract is made once the deletion committed, from a deal whose quote is gone."""
    deal_id = await won_deal(sales)
    with as_user("rep1", "sales_rep"):
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal_id, line_items=[item(discount="35")])
    looking, go_on = pause_at(monkeypatch, handlers_module, "_refuse_if_deal_has_contract")
    with as_user("rep1", "sales_rep"):
        deleting = asyncio.create_task(sales.delete_quote(quote.id, expected_version=0))
        await looking.wait()
        creating = asyncio.create_task(create_contract_from(sales, deal_id))
        await asyncio.sleep(0.3)
        assert not creating.done()

        go_on.set()
        await deleting
        contract = await creating
        assert (await sales.list_quotes(Page(), opportunity_id=deal_id)).items == []
    assert contract.opportunity_id == deal_id


async def test_a_changed_quote_is_totalled_and_submitted_again_and_earlier_decisions_are_void(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item(discount="35")])
    with as_user("mgr", "sales_manager"):
        halfway = (
            await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="ok")
        ).record
    assert (halfway.status, list(halfway.required_approvals)) == ("pending_approval", ["finance"])
    with as_user("rep1", "sales_rep"):
        with pytest.raises(StaleVersion):
            await sales.update_quote(quote.id, expected_version=quote.version, line_items=[item(discount="20")])
        changed = (
            await sales.update_quote(
                quote.id, expected_version=halfway.version, line_items=[item(quantity="2", discount="20")]
            )
        ).record
        unchanged = (
            await sales.update_quote(quote.id, expected_version=0, line_items=[item(quantity="2", discount="20")])
        ).record
    # 20 % needs the sales manager alone, who decides again: the decision on 35 % no longer counts.
    assert (changed.status, list(changed.required_approvals), list(changed.decisions)) == (
        "pending_approval", ["sales_manager"], [],
    )  # fmt: skip
    assert (changed.subtotal.amount, changed.discount_total.amount, changed.total.amount) == (
        "2000.00", "400.00", "1600.00",
    )  # fmt: skip
    assert (changed.version, unchanged.version) == (halfway.version + 1, halfway.version + 1)
    step, payload = await outbox_events(engine, "crm.sales.quote.updated")  # the manager's step, then the change
    assert list(events_pb2.QuoteUpdated.FromString(step).changed_fields) == ["decisions"]
    event = events_pb2.QuoteUpdated.FromString(payload)
    assert (event.quote.status, event.actor.user_id) == ("pending_approval", "rep1")
    assert [(x.role, x.approver_id) for x in event.voided_decisions] == [("sales_manager", "mgr")]
    with as_user("mgr", "sales_manager"):
        approved = (
            await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"
    with as_user("rep1", "sales_rep"), pytest.raises(Conflict) as decided:
        await sales.update_quote(quote.id, expected_version=0, line_items=[item()])
    assert decided.value.reason == "ILLEGAL_STATE"


async def test_a_quote_changed_within_the_thresholds_needs_no_approval(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item(discount="35")])
        changed = (await sales.update_quote(quote.id, expected_version=0, line_items=[item(discount="10")])).record
        with pytest.raises(ValidationFailed) as empty:
            await sales.update_quote(changed.id, expected_version=0, line_items=[])
    assert (changed.status, list(changed.required_approvals), changed.total.amount) == ("approved", [], "900.00")
    assert empty.value.errors[0].field == "line_items"


async def test_who_changed_a_quotes_line_items_does_not_approve_them(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item(discount="20")])
    with as_user("mgr", "sales_manager"):
        await sales.update_quote(quote.id, expected_version=0, line_items=[item(discount="25")])
        with pytest.raises(PermissionDenied) as own:
            await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
    assert "mgr submitted this quote" in own.value.detail
    with as_user("mgr2", "sales_manager"):
        approved = (
            await sales.decide_quote(quote.id, expected_version=0, decision=d.Decision.APPROVED, comment="")
        ).record
    assert approved.status == "approved"


async def test_a_rejected_quote_or_one_whose_deal_has_a_contract_does_not_change(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
    rejected, contracted = await settled_quotes(sales, deal.id)
    with as_user("rep1", "sales_rep"):
        with pytest.raises(Conflict) as turned_down:
            await sales.update_quote(rejected.id, expected_version=0, line_items=[item(discount="10")])
        with pytest.raises(Conflict) as has_contract:
            await sales.update_quote(contracted.id, expected_version=0, line_items=[item(discount="10")])
    with as_user("bob", "sales_rep", scope="own"), pytest.raises(NotFound):
        await sales.update_quote(contracted.id, expected_version=0, line_items=[item()])
    assert (turned_down.value.reason, has_contract.value.reason) == ("ILLEGAL_STATE", "HAS_CONTRACT")


async def test_pipelines_are_created_replaced_and_deleted_with_their_deals_in_mind(sales: SalesHandlers) -> None:
    stages = [
        d.Stage("qualify", "Qualify", Decimal(20), rotting_days=7),
        d.Stage("propose", "Propose", Decimal(60), ("amount",)),
        d.Stage("won", "Won", Decimal(100), outcome=d.Outcome.WON),
        d.Stage("lost", "Lost", Decimal(0), outcome=d.Outcome.LOST),
    ]
    with as_user("admin", "admin"):
        pipeline = await sales.create_pipeline(idempotency_key="p-1", name="Partners", stages=stages, is_default=False)
        again = await sales.create_pipeline(idempotency_key="p-1", name="Partners", stages=stages, is_default=False)
        assert again.id == pipeline.id
        deal = await sales.create_opportunity(OpportunityIn(account_id="a", name="n", pipeline_id=pipeline.id))
        assert (deal.stage, deal.probability) == ("qualify", "20")
        with pytest.raises(Conflict):
            await sales.update_pipeline(
                pipeline.id, expected_version=0, name="Partners", stages=stages[1:], is_default=False
            )
        raised = [d.Stage("qualify", "Qualify", Decimal("33.5")), *stages[1:]]
        updated = (
            await sales.update_pipeline(
                pipeline.id, expected_version=pipeline.version, name="Partner deals", stages=raised, is_default=True
            )
        ).record
        assert updated.is_default and updated.name == "Partner deals"
        assert (await sales.get_opportunity(deal.id)).probability == "33.5"
        assert not (await sales.get_pipeline("default")).is_default
        with pytest.raises(Conflict):
            await sales.delete_pipeline(pipeline.id)  # the default now, and it has a deal
        with pytest.raises(StaleVersion):
            await sales.update_pipeline("default", expected_version=9, name="x", stages=stages, is_default=True)
        await sales.update_pipeline(
            "default", expected_version=0, name="Default", stages=list(d.DEFAULT_STAGES), is_default=True
        )
        await sales.delete_opportunity(deal.id, expected_version=0)
        await sales.delete_pipeline(pipeline.id)
        with pytest.raises(NotFound):
            await sales.get_pipeline(pipeline.id)


async def test_pipeline_changes_are_published_with_their_stages_in_order(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    stages = [
        d.Stage("qualify", "Qualify", Decimal(20)),
        d.Stage("propose", "Propose", Decimal("60.5"), ("amount",)),
        d.Stage("closed_won", "Won", Decimal(100), outcome=d.Outcome.WON),
        d.Stage("closed_lost", "Lost", Decimal(0), outcome=d.Outcome.LOST),
    ]
    reordered = [d.Stage("pilot", "Pilot", Decimal(40)), stages[1], stages[0], *stages[2:]]
    with as_user("admin", "admin"):
        pipeline = await sales.create_pipeline(idempotency_key="p-1", name="Partners", stages=stages, is_default=False)
        await sales.create_pipeline(idempotency_key="p-1", name="Partners", stages=stages, is_default=False)
        await sales.update_pipeline(pipeline.id, expected_version=1, name="Partners", stages=reordered, is_default=True)
        # The default again: the partners' pipeline no longer is, in its next version.
        await sales.update_pipeline(
            DEFAULT_PIPELINE_ID, expected_version=2, name="Default", stages=list(d.DEFAULT_STAGES), is_default=True
        )
        assert (await sales.get_pipeline(pipeline.id)).version == 3
        await sales.delete_pipeline(pipeline.id, expected_version=3)

    def stages_of(message: Any) -> list[tuple[int, str, str, str, str]]:
        return [(s.position, s.key, s.name, s.probability, s.outcome) for s in message.pipeline.stages]

    types = [t for t in await outbox_types(engine) if t.startswith("crm.sales.pipeline.")]
    assert types == [
        "crm.sales.pipeline.created",
        "crm.sales.pipeline.updated",  # the default, no longer the default
        "crm.sales.pipeline.updated",
        "crm.sales.pipeline.updated",  # the partners' pipeline, no longer the default
        "crm.sales.pipeline.updated",
        "crm.sales.pipeline.deleted",
    ]
    [(key, created)] = [
        (key, events_pb2.PipelineCreated.FromString(p))
        for key, p in await outbox_keyed(engine, "crm.sales.pipeline.created")
    ]
    assert (key, created.pipeline.id, created.pipeline.version, created.actor.user_id) == (
        pipeline.id, pipeline.id, 1, "admin"
    )  # fmt: skip
    assert stages_of(created) == [
        (0, "qualify", "Qualify", "20", "open"),
        (1, "propose", "Propose", "60.5", "open"),
        (2, "closed_won", "Won", "100", "won"),
        (3, "closed_lost", "Lost", "0", "lost"),
    ]
    updates = [
        (key, events_pb2.PipelineUpdated.FromString(p))
        for key, p in await outbox_keyed(engine, "crm.sales.pipeline.updated")
    ]
    assert [
        (key, u.pipeline.id, u.pipeline.version, u.pipeline.is_default, list(u.changed_fields)) for key, u in updates
    ] == [
        (DEFAULT_PIPELINE_ID, DEFAULT_PIPELINE_ID, 2, False, ["is_default"]),
        (pipeline.id, pipeline.id, 2, True, ["stages", "is_default"]),
        (pipeline.id, pipeline.id, 3, False, ["is_default"]),
        (DEFAULT_PIPELINE_ID, DEFAULT_PIPELINE_ID, 3, True, ["is_default"]),
    ]
    assert [s[1] for s in stages_of(updates[1][1])] == ["pilot", "propose", "qualify", "closed_won", "closed_lost"]
    assert stages_of(updates[2][1]) == stages_of(updates[1][1])
    assert [s[1] for s in stages_of(updates[0][1])] == [s.key for s in d.DEFAULT_STAGES]
    [(key, deleted)] = [
        (key, events_pb2.PipelineDeleted.FromString(p))
        for key, p in await outbox_keyed(engine, "crm.sales.pipeline.deleted")
    ]
    assert (key, deleted.pipeline.id, deleted.pipeline.version) == (pipeline.id, pipeline.id, 3)
    assert stages_of(deleted) == stages_of(updates[1][1])


async def test_quotes_payments_and_invoices_list_in_the_order_asked_for(sales: SalesHandlers, clock: Clock) -> None:
    contract_id = await signed_contract(sales, "1000")
    with as_user("fin", "finance"):
        for reference, days_ago in (("BANK-A", 3), ("BANK-B", 9)):  # entered in this order, received in the other
            clock.now += timedelta(minutes=1)
            await sales.record_payment(
                contract_id=contract_id, amount=cny("100"), received_at=clock.now - timedelta(days=days_ago),
                method="wire", external_reference=reference,
            )  # fmt: skip
        for amount in ("100", "200"):
            clock.now += timedelta(minutes=1)
            await sales.request_invoice(idempotency_key="", contract_id=contract_id, amount=cny(amount))

        async def payments(sort: str) -> list[str]:
            page = await sales.list_payments(Page(sort=sort), contract_id=contract_id)
            return [p.external_reference for p in page.items]

        async def invoices(sort: str) -> list[str]:
            page = await sales.list_invoices(Page(sort=sort), contract_id=contract_id)
            return [i.amount.amount for i in page.items]

        assert await payments("") == ["BANK-B", "BANK-A"]  # newest entry first
        assert await payments("received_at") == ["BANK-B", "BANK-A"]
        assert await payments("-received_at") == ["BANK-A", "BANK-B"]
        assert await payments("created_at") == ["BANK-A", "BANK-B"]
        assert await invoices("") == ["200.00", "100.00"]
        assert await invoices("requested_at") == ["100.00", "200.00"]
        with pytest.raises(ValidationFailed) as refused:
            await sales.list_invoices(Page(sort="amount"), contract_id=contract_id)
    assert fields_of(refused) == ["sort"]
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Quoted"))
        # Discounted, so awaiting approval: a quote not yet decided may change.
        first = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item(discount="35")])
        clock.now += timedelta(minutes=1)
        second = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item()])
        clock.now += timedelta(minutes=1)
        await sales.update_quote(first.id, expected_version=0, line_items=[item(price="900", discount="35")])
        oldest_first = await sales.list_quotes(Page(sort="created_at"), opportunity_id=deal.id)
        last_changed_first = await sales.list_quotes(Page(sort="-updated_at"), opportunity_id=deal.id)
    assert [q.id for q in oldest_first.items] == [first.id, second.id]
    assert [q.id for q in last_changed_first.items] == [first.id, second.id]


async def test_a_contract_is_corrected_while_a_draft_or_rejected_and_published_with_what_changed(
    sales: SalesHandlers, engine: AsyncEngine
) -> None:
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id="", account_id="acc-k", title="Typo Ltd support", amount=cny("500"),
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        fixed = await sales.update_contract(
            contract.id, expected_version=1, changes={"title": " Acme support ", "ends_on": date(2027, 12, 31)}
        )
        with pytest.raises(ValidationFailed) as backwards:
            await sales.update_contract(contract.id, expected_version=0, changes={"starts_on": date(2028, 1, 1)})
        with pytest.raises(StaleVersion):
            await sales.update_contract(contract.id, expected_version=1, changes={"title": "Late"})
        await sales.submit_contract(contract.id, expected_version=0)
        with pytest.raises(Conflict) as pending:
            await sales.update_contract(contract.id, expected_version=0, changes={"title": "During approval"})

    assert (fixed.record.title, fixed.record.ends_on, fixed.record.version) == ("Acme support", "2027-12-31", 2)
    assert [e.field for e in backwards.value.errors] == ["ends_on"]
    assert pending.value.reason == "ILLEGAL_STATE"
    [updated] = [
        events_pb2.ContractUpdated.FromString(p) for p in await outbox_events(engine, "crm.sales.contract.updated")
    ]
    assert (list(updated.changed_fields), updated.contract.version) == (["ends_on", "title"], 2)
