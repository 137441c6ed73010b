"""Open leads per owner (`lead_owner_loads`, kept by triggers): equal to a count of the leads
themselves after every kind of write, on SQLite and PostgreSQL."""

from typing import Any

import pytest
from leads import repository as repo
from leads.domain import AssignmentRule
from leads.handlers import ActivityInput, ConvertRequest
from sqlalchemy import delete

pytestmark = pytest.mark.integration


async def test_open_leads_per_owner_follow_every_write(env_each_database: Any) -> None:
    env = env_each_database
    steps: list[tuple[str, dict[str, int]]] = []

    async def step(name: str) -> None:
        steps.append((name, await env.loads_kept()))
        assert steps[-1][1] == await env.loads_counted(), name

    with env.acting("admin", roles=("admin",)):
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="round_robin", capacity=10), "all", ""
        )
        created = [(await env.service.create_lead({"name": f"L{i}"}))[0] for i in range(4)]
        await step("assigned by the rule")
        own, _ = await env.service.create_lead({"name": "Own", "owner_id": "u3"})
        await step("created with an owner")
        moved = (await env.service.assign(created[0]["id"], "u2", "", created[0]["version"])).record
        await step("reassigned")
        await env.service.disqualify(created[1]["id"], "no budget", created[1]["version"])
        await step("disqualified")
        await env.service.log_activity(ActivityInput(lead_id=moved["id"], kind="call"))
        await step("contacted (still open)")
        await env.service.convert(ConvertRequest(lead_id=own["id"]))
        await step("converted")
    with env.acting("u1"):
        await env.service.release(created[2]["id"], "not mine")
    await step("released to the pool")
    with env.acting("u4"):
        await env.service.claim(created[2]["id"])
    await step("claimed")
    async with env.engine.begin() as conn:
        await conn.execute(delete(repo.leads).where(repo.leads.c.id == created[3]["id"]))
    await step("deleted")

    assert [loads for _, loads in steps] == [
        {"u1": 2, "u2": 2},
        {"u1": 2, "u2": 2, "u3": 1},
        {"u1": 1, "u2": 3, "u3": 1},
        {"u1": 1, "u2": 2, "u3": 1},
        {"u1": 1, "u2": 2, "u3": 1},
        {"u1": 1, "u2": 2},
        {"u2": 2},
        {"u2": 2, "u4": 1},
        {"u2": 1, "u4": 1},
    ]


async def test_the_capacity_counts_leads_held_before_the_rule(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        for i in range(2):
            await env.service.create_lead({"name": f"held {i}", "owner_id": "u1"})
        await env.service.create_assignment_rule(
            AssignmentRule(id="", position=1, user_ids=("u1", "u2"), strategy="least_loaded", capacity=2), "all", ""
        )
        owners = [(await env.service.create_lead({"name": f"n{i}"}))[0]["owner_id"] for i in range(3)]
    assert owners == ["u2", "u2", ""]  # u1 is full from the start; u2 fills; then the pool
