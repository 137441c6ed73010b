"""A campaign's cost in its currency's minor unit, on SQLite and PostgreSQL: kept to the fils in a
three-decimal currency (1000 fils to the Kuwaiti dinar) and shown so."""

from decimal import Decimal
from typing import Any

import pytest
from crm_platform.errors import ValidationFailed
from crm_platform.money import Money
from leads.messages import campaign_to_proto

pytestmark = pytest.mark.integration


async def test_a_cost_in_kuwaiti_dinars_is_kept_and_shown_to_the_fils(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        campaign = await env.service.create_campaign({"name": "Gulf expo", "cost": Money(Decimal("12.345"), "KWD")}, "")
        with pytest.raises(ValidationFailed) as refused:
            await env.service.create_campaign({"name": "Too fine", "cost": Money(Decimal("12.3456"), "KWD")}, "")
        stored = await env.service.get_campaign(campaign["id"])
    assert stored["cost_amount"] == Decimal("12.345")  # NUMERIC(18, 2) made it 12.35
    assert campaign_to_proto(stored).cost.amount == "12.345"
    assert [(e.field, e.message) for e in refused.value.errors] == [("cost.amount", "at most 3 decimal places")]
