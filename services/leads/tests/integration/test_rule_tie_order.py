"""Assignment rules at the same `position` are tried in the order they were created
(docs/lead-assignment.md), also after the first one was changed: on PostgreSQL an update writes the
row anew, after the other one, so the order the table gives back is not the order of creation."""

from typing import Any

import pytest
from leads.domain import AssignmentRule

pytestmark = pytest.mark.integration


async def test_rules_at_one_position_are_tried_in_creation_order_after_an_update(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        first = await env.service.create_assignment_rule(AssignmentRule(id="", position=5, user_ids=("u1",)), "A", "")
        await env.service.create_assignment_rule(AssignmentRule(id="", position=5, user_ids=("u2",)), "B", "")
        await env.service.update_assignment_rule(
            AssignmentRule(id=first["id"], position=5, user_ids=("u1",)), "A renamed", first["version"]
        )
        env.service.rules.invalidate()
        lead, _ = await env.service.create_lead({"name": "Routed"})

    assert lead["owner_id"] == "u1"
