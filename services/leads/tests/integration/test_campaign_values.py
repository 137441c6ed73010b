"""A campaign's values, on SQLite and PostgreSQL: its cost kept to the fils in a three-decimal
currency (1000 fils to the Kuwaiti dinar) and shown so; its period never ending before it starts."""

from decimal import Decimal
from typing import Any

import pytest
from crm.leads.v1 import events_pb2
from crm_platform.errors import ValidationFailed
from crm_platform.money import Money
from crm_platform.testing.outbox import outbox_events
from leads import repository as repo
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


async def test_a_period_changed_one_date_at_a_time_must_still_end_after_it_starts(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        period = {"name": "June", "starts_on": "2026-06-01", "ends_on": "2026-06-30"}
        june = await env.service.create_campaign(period, "")
        with pytest.raises(ValidationFailed) as early_end:
            await env.service.update_campaign(june["id"], {"ends_on": "2026-01-01"}, ["ends_on"], 0)
        with pytest.raises(ValidationFailed) as late_start:
            await env.service.update_campaign(june["id"], {"starts_on": "2026-07-01"}, ["starts_on"], 0)
        moved = (
            await env.service.update_campaign(
                june["id"], {"starts_on": "2026-07-01", "ends_on": "2026-07-31"}, ["starts_on", "ends_on"], 0
            )
        ).record
        open_ended = (await env.service.update_campaign(moved["id"], {"ends_on": ""}, ["ends_on"], 0)).record
    assert [e.field for e in early_end.value.errors] == ["ends_on"]
    assert [e.field for e in late_start.value.errors] == ["starts_on"]
    assert (str(moved["starts_on"]), str(moved["ends_on"])) == ("2026-07-01", "2026-07-31")
    assert open_ended["ends_on"] is None and moved["version"] == 2 and open_ended["version"] == 3


async def test_an_update_that_changes_nothing_makes_no_version_and_no_event_and_names_only_what_changed(
    env_each_database: Any,
) -> None:
    env = env_each_database
    with env.acting("mkt", roles=("marketing",)):
        fair = await env.service.create_campaign(
            {"name": "Fair", "channel": "email", "cost": Money(Decimal("100"), "CNY")}, ""
        )
        same = await env.service.update_campaign(
            fair["id"], {"channel": "email", "cost": Money(Decimal("100.00"), "CNY")}, ["channel", "cost"], 0
        )
        moved = await env.service.update_campaign(
            fair["id"], {"channel": "email", "cost": Money(Decimal("120"), "CNY")}, ["channel", "cost"], 0
        )

    assert same.record["version"] == 1
    assert moved.record["version"] == 2
    updates = [
        events_pb2.CampaignUpdated.FromString(payload)
        for event_type, payload in await outbox_events(env.engine, repo.metadata, fair["id"])
        if event_type.endswith("campaign.updated")
    ]
    assert [list(event.changed_fields) for event in updates] == [["cost"]]
