"""Migration 0015, on SQLite and PostgreSQL: deals stored before it are compared by their normalised
product line (anti-collision) as the deals written after it are."""

import asyncio
from typing import Any

import pytest
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.errors import Conflict
from sales import repository as r
from sales.handlers import DEFAULT_PIPELINE_ID, OpportunityIn
from sales.testing import MIGRATIONS, Clock, as_user, make_handlers
from sqlalchemy import insert, select

pytestmark = pytest.mark.integration

# "Cloud CRM" in full-width letters with an ideographic space, as a Chinese IME types it.
FULL_WIDTH_CLOUD_CRM = "\uff23\uff4c\uff4f\uff55\uff44\u3000\uff23\uff32\uff2d"


def deal_before_0015(opportunity_id: str, product_line: str, clock: Clock) -> dict[str, Any]:
    """An open deal of alice's on acc-1 with the columns it had at revision 0014."""
    return {
        "id": opportunity_id, "account_id": "acc-1", "name": opportunity_id, "pipeline_id": DEFAULT_PIPELINE_ID,
        "stage": "initial_contact", "probability_bp": 1000, "currency": "CNY", "forecast_category": "",
        "owner_id": "alice", "status": "open", "product_line": product_line, "line_items": [], "stage_history": [],
        "tags": [], "custom": {}, "created_at": clock.now, "updated_at": clock.now, "version": 1,
    }  # fmt: skip


async def test_deals_open_before_0015_collide_whatever_their_product_line_is_spelt(
    each_database_url: str, clock: Clock
) -> None:
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, each_database_url, "0014")
    engine = create_engine(each_database_url)
    try:
        async with engine.begin() as conn:
            before = [("o1", "Cloud ERP"), ("o2", ""), ("o3", FULL_WIDTH_CLOUD_CRM), ("o4", "cloud  crm")]
            await conn.execute(insert(r.opportunities), [deal_before_0015(i, line, clock) for i, line in before])
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, each_database_url)
        async with engine.connect() as conn:
            o = r.opportunities
            rows = await conn.execute(select(o.c.id, o.c.product_line, o.c.product_line_key))
            stored = {opportunity_id: (line, key) for opportunity_id, line, key in rows}
        sales = make_handlers(engine, clock)
        with as_user("bob", "sales_rep"), pytest.raises(Conflict) as raised:
            await sales.create_opportunity(OpportunityIn(account_id="acc-1", name="B", product_line="CLOUD erp"))
    finally:
        await engine.dispose()
    assert stored == {
        "o1": ("Cloud ERP", "cloud erp"), "o2": ("", ""), "o3": (FULL_WIDTH_CLOUD_CRM, "cloud crm"),
        "o4": ("cloud  crm", "cloud crm"),
    }  # fmt: skip
    assert (raised.value.reason, raised.value.existing_id) == ("OPPORTUNITY_COLLISION", "o1")
