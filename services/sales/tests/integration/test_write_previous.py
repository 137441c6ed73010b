"""A write answers with the record as it was before it (`previous`), read under the record's row lock
in the write's transaction: the gateway audits exactly what this write changed, even when other
writes to the same record run at the same time. None of these writes takes an Idempotency-Key, so
each answers a `previous`. New line items on a quote that has discounts come only from a caller who
may set discounts (`discounts_scope`), checked under the same lock."""

import asyncio
from decimal import Decimal

import pytest
from crm_platform.errors import NotFound, PermissionDenied
from crm_platform.money import Money
from crm_platform.principal import RecordScope, ScopeKind
from crm_platform.testing.changes import assert_one_after_another
from sales import domain as d
from sales.handlers import LineItemIn, OpportunityIn, SalesHandlers
from sales.testing import as_user

pytestmark = pytest.mark.integration


def item(discount: str = "0") -> LineItemIn:
    return LineItemIn("p-GTX", "GTX Basic", "GTX", Decimal(1), Money(Decimal(1000), "CNY"), Decimal(discount))


async def test_concurrent_updates_each_answer_the_version_they_changed(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        changes = await asyncio.gather(
            *(sales.update_opportunity(deal.id, expected_version=0, changes={"name": f"Deal {n}"}) for n in range(8))
        )

    assert_one_after_another(changes, "name", first="Deal")


async def test_a_write_that_changes_nothing_answers_the_record_as_before_and_after(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        renamed = await sales.update_opportunity(deal.id, expected_version=0, changes={"name": "Deal"})
    with as_user("mgr", "sales_manager"):
        assigned = await sales.assign_opportunity(deal.id, expected_version=0, owner_id="rep1", team="", region="")

    assert renamed.previous == renamed.record == deal
    assert assigned.previous == assigned.record == deal


async def test_a_delete_answers_the_record_as_it_was(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal", primary_contact_id="c1"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item("35")])
        moved = await sales.move_stage(deal.id, stage="needs_confirmed", expected_version=0)
        deleted_quote = await sales.delete_quote(quote.id, expected_version=0)
        deleted_deal = await sales.delete_opportunity(deal.id, expected_version=0)

    assert (moved.previous.stage, moved.record.stage) == ("initial_contact", "needs_confirmed")
    assert deleted_quote == quote
    assert deleted_deal == moved.record


async def test_a_contract_step_answers_the_contract_before_it(sales: SalesHandlers) -> None:
    with as_user("rep1", "sales_rep"):
        contract = await sales.create_contract(
            idempotency_key="", opportunity_id="", account_id="acc-1", title="T", amount=Money(Decimal(1000), "CNY"),
            owner_id="", team="", region="", starts_on=None, ends_on=None,
        )  # fmt: skip
        submitted = await sales.submit_contract(contract.id, expected_version=0)
    with as_user("mgr", "sales_manager"):
        approved = await sales.decide_contract(
            contract.id, expected_version=0, decision=d.Decision.APPROVED, comment="ok"
        )

    assert submitted.previous == contract
    assert (submitted.previous.status, submitted.record.status) == ("draft", "pending_approval")
    assert approved.previous == submitted.record
    assert (len(approved.previous.decisions), len(approved.record.decisions)) == (0, 1)


async def test_new_line_items_replace_a_quotes_discounts_only_within_the_discounts_scope(
    sales: SalesHandlers,
) -> None:
    with as_user("rep1", "sales_rep"):
        deal = await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="Deal"))
        quote = await sales.create_quote(idempotency_key="", opportunity_id=deal.id, line_items=[item("35")])
        with pytest.raises(PermissionDenied) as refused:  # the caller may set no discount
            await sales.update_quote(quote.id, expected_version=0, line_items=[item()], discounts_scope=None)
    with as_user("mgr", "sales_manager"):
        with pytest.raises(NotFound):  # the quote is not where the caller may set discounts
            await sales.update_quote(
                quote.id, expected_version=0, line_items=[item()], discounts_scope=RecordScope(ScopeKind.OWN, "mgr")
            )
        replaced = await sales.update_quote(
            quote.id,
            expected_version=0,
            line_items=[item("20")],
            discounts_scope=RecordScope(ScopeKind.TEAM, team="east"),
        )

    assert (refused.value.field, refused.value.detail) == (
        "line_items.discount_percent", "you may not set field 'line_items.discount_percent' of quotes",
    )  # fmt: skip
    assert replaced.previous == quote
    assert (replaced.previous.max_discount_percent, replaced.record.max_discount_percent) == ("35", "20")


async def test_new_line_items_replace_a_deals_discounts_only_within_the_discounts_scope(sales: SalesHandlers) -> None:
    with as_user("mgr", "sales_manager"):
        deal = await sales.create_opportunity(
            OpportunityIn(account_id="acc-1", name="Deal", owner_id="rep1", line_items=[item("25")])
        )
    with as_user("rep1", "sales_rep"):
        with pytest.raises(PermissionDenied) as refused:  # the caller may set no discount
            await sales.update_opportunity(
                deal.id, expected_version=0, changes={"line_items": [item()]}, discounts_scope=None
            )
        renamed = await sales.update_opportunity(
            deal.id, expected_version=0, changes={"name": "Deal II"}, discounts_scope=None
        )
    with as_user("mgr", "sales_manager"):
        with pytest.raises(NotFound):  # the deal is not where the caller may set discounts
            await sales.update_opportunity(
                deal.id,
                expected_version=0,
                changes={"line_items": [item()]},
                discounts_scope=RecordScope(ScopeKind.OWN, "mgr"),
            )
        replaced = await sales.update_opportunity(
            deal.id,
            expected_version=0,
            changes={"line_items": [item()]},
            discounts_scope=RecordScope(ScopeKind.TEAM, team="east"),
        )
    with as_user("rep1", "sales_rep"):  # no discount left to lose
        again = await sales.update_opportunity(
            deal.id, expected_version=0, changes={"line_items": [item(), item()]}, discounts_scope=None
        )

    assert (refused.value.field, refused.value.detail) == (
        "line_items.discount_percent", "you may not set field 'line_items.discount_percent' of opportunities",
    )  # fmt: skip
    assert renamed.record.name == "Deal II"
    assert [i.discount_percent for i in replaced.previous.line_items] == ["25"]
    assert (replaced.previous.amount.amount, replaced.record.amount.amount) == ("750.00", "1000.00")
    assert again.record.amount.amount == "2000.00"
