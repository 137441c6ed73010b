"""The demo data of `make run` (crm_devstack.demo) goes through the real gateway and leads service:
its leads arrive scored, graded and routed by the demo's rules, as a configured CRM's would."""

from typing import Any

import httpx
import pytest
from crm_devstack.demo import LEADS, seed_leads

pytestmark = pytest.mark.integration


async def test_the_demo_leads_arrive_scored_and_east_chinas_assigned_round_robin(
    env: Any, admin: httpx.AsyncClient
) -> None:
    said = await seed_leads(admin)

    listed = (await admin.get("/api/v1/leads", params={"sort": "name"})).json()["items"]
    by_name = {lead["name"]: lead for lead in listed}
    assert len(by_name) == len(LEADS) and said.startswith(f"{len(LEADS)} leads")
    # Referral (30) + phone (10); event (20) + phone + its campaign; target industry (25) + phone.
    assert (by_name["孙悦"]["score"], by_name["Kevin Wu"]["score"], by_name["Lily Huang"]["score"]) == (40, 30, 35)
    assert by_name["Kevin Wu"]["campaign_id"] and not by_name["孙悦"]["campaign_id"]
    east = [lead for lead in listed if lead["region"] == "cn-east"]
    assert sorted(lead["owner_id"] for lead in east) == ["u1", "u2"]  # one each, in turn
    assert {lead["team"] for lead in east} == {"east"}
    assert all(lead["in_pool"] for lead in listed if lead["region"] != "cn-east")
