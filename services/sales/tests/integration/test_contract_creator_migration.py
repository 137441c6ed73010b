"""Migration 0016, on SQLite and PostgreSQL: contracts stored before it have no recorded creator
(""), which holds nobody back; their submitter is still refused."""

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.errors import PermissionDenied
from sales import domain as d
from sales import repository as r
from sales.testing import MIGRATIONS, Clock, as_user, make_handlers
from sqlalchemy import insert, select

pytestmark = pytest.mark.integration


def contract_before_0016(contract_id: str, clock: Clock) -> dict[str, Any]:
    """A contract of rep1's, submitted by rep1 and awaiting its manager, with the columns it had at
    revision 0015."""
    return {
        "id": contract_id, "number": "CT-202611-000001", "opportunity_id": "", "account_id": "acc-1", "title": "T",
        "amount": Decimal(90000), "currency": "CNY", "paid_amount": Decimal(0), "invoiced_amount": Decimal(0),
        "status": "pending_approval", "approval_chain": ["sales_manager"], "approval_round": 1, "owner_id": "rep1",
        "team": "east", "region": "cn-east", "created_at": clock.now, "updated_at": clock.now, "version": 1,
        "submitted_by": "rep1",
    }  # fmt: skip


async def test_contracts_stored_before_0016_have_an_unknown_creator(each_database_url: str, clock: Clock) -> None:
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, each_database_url, "0015")
    engine = create_engine(each_database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(r.contracts), [contract_before_0016("c1", clock)])
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, each_database_url)
        async with engine.connect() as conn:
            created_by = await conn.scalar(select(r.contracts.c.created_by).where(r.contracts.c.id == "c1"))
        sales = make_handlers(engine, clock)
        with as_user("rep1", "sales_rep", "sales_manager"), pytest.raises(PermissionDenied) as own:
            await sales.decide_contract("c1", expected_version=0, decision=d.Decision.APPROVED, comment="")
        with as_user("mgr1", "sales_manager"):
            approved = (
                await sales.decide_contract("c1", expected_version=0, decision=d.Decision.APPROVED, comment="")
            ).record
    finally:
        await engine.dispose()
    assert created_by == ""  # not guessed from the submitter
    assert "rep1 submitted this contract" in own.value.detail
    assert approved.status == "approved"
