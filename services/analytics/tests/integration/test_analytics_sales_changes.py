"""Sales changes in the read models, events applied through the consumer's handlers (no broker): a
deal handed to another owner is theirs in the reports, as after any update of the deal; a payment
plan's replaced installments are what its contract owes, and when."""

from decimal import Decimal

import pytest
from analytics import repository as repo
from analytics.testing import deliver
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


async def test_a_deal_handed_to_another_owner_counts_for_them(engine: AsyncEngine) -> None:
    def deal(owner_id: str, team: str, version: int) -> sales_pb2.Opportunity:
        return sales_pb2.Opportunity(
            id="O1", account_id="A1", status="open", owner_id=owner_id, team=team, region="north", version=version
        )

    assigned = sales_events.OpportunityAssigned(
        opportunity=deal("bob", "west", 2), previous_owner_id="alice", changed_fields=["owner_id", "team"]
    )
    await deliver(engine, [sales_events.OpportunityCreated(opportunity=deal("alice", "east", 1)), assigned])
    # A redelivered creation (an older snapshot) does not give the deal back.
    await deliver(engine, [sales_events.OpportunityCreated(opportunity=deal("alice", "east", 1))])

    o = repo.opportunities
    async with engine.connect() as conn:
        rows = (await conn.execute(select(o.c.owner_id, o.c.team, o.c.region, o.c.version))).all()
    assert [tuple(row) for row in rows] == [("bob", "west", "north", 2)]


def installment(
    number: int, due_date: str, amount: str, paid: str = "0.00", status: str = "pending"
) -> sales_pb2.Installment:
    return sales_pb2.Installment(
        id=f"I{number}", sequence=number, due_date=due_date, status=status,
        amount=common_pb2.Money(amount=amount, currency="CNY"), paid=common_pb2.Money(amount=paid, currency="CNY"),
    )  # fmt: skip


async def test_a_replaced_plan_owes_its_new_installments_and_keeps_what_was_paid(engine: AsyncEngine) -> None:
    created = sales_pb2.PaymentPlan(
        id="P1", contract_id="K1",
        installments=[installment(1, "2027-01-31", "30.00", paid="10.00", status="partially_paid"),
                      installment(2, "2027-02-28", "30.00"), installment(3, "2027-03-31", "40.00")],
    )  # fmt: skip
    overdue = sales_events.InstallmentOverdue(
        contract_id="K1", account_id="A1", installment=installment(2, "2027-02-28", "30.00", status="overdue")
    )
    # The first installment's snapshot holds a later payment's allocation too: the read model counts
    # that payment by its allocation, so it keeps the 10.00 received before the plan.
    replaced = sales_events.PaymentPlanUpdated(
        payment_plan=sales_pb2.PaymentPlan(
            id="P1", contract_id="K1", version=2,
            installments=[installment(1, "2027-01-31", "30.00", paid="30.00", status="paid"),
                          installment(2, "2027-04-30", "30.00"), installment(4, "2027-05-31", "40.00")],
        ),
        removed_installment_ids=["I3"],
    )  # fmt: skip
    await deliver(engine, [sales_events.PaymentPlanCreated(payment_plan=created), overdue, replaced])

    i = repo.installments
    async with engine.connect() as conn:
        rows = (await conn.execute(select(i.c.id, i.c.due_date, i.c.paid, i.c.overdue).order_by(i.c.id))).all()
    assert [(row.id, row.due_date, row.paid, row.overdue) for row in rows] == [
        ("I1", "2027-01-31", Decimal(10), False),
        ("I2", "2027-04-30", Decimal(0), False),
        ("I4", "2027-05-31", Decimal(0), False),
    ]


async def test_a_contract_handed_to_the_accounts_new_owner_counts_for_them(engine: AsyncEngine) -> None:
    def contract(owner_id: str, team: str, version: int) -> sales_pb2.Contract:
        return sales_pb2.Contract(
            id="K1", account_id="A1", status="signed", owner_id=owner_id, team=team, region="north", version=version
        )

    transferred = sales_events.ContractUpdated(
        contract=contract("dave", "west", 6),
        changed_fields=["owner_id", "team"],
        reason="crm.accounts.account.transferred",
    )
    await deliver(engine, [sales_events.ContractSigned(contract=contract("alice", "east", 5)), transferred])
    # A redelivered signature (an older snapshot) does not give the contract back.
    await deliver(engine, [sales_events.ContractSigned(contract=contract("alice", "east", 5))])

    k = repo.contracts
    async with engine.connect() as conn:
        rows = (await conn.execute(select(k.c.owner_id, k.c.team, k.c.region, k.c.version))).all()
    assert [tuple(row) for row in rows] == [("dave", "west", "north", 6)]
