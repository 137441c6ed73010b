"""An import is seen by who started it and in the record scope of its leads' owner (K review: a team
manager got 404 on their rep's import): the rep's team manager and region manager see it, a manager
of another team and another rep of the same team do not, and an admin sees every import."""

from typing import Any

import pytest
from crm_platform.errors import NotFound
from crm_platform.principal import ScopeKind

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("user", "team", "scope", "seen"),
    [
        ("rep1", "east", ScopeKind.OWN, True),  # who started it
        ("boss-east", "east", ScopeKind.TEAM, True),
        ("boss-cn-east", "any", ScopeKind.REGION, True),  # the region of `env.acting` is cn-east
        ("admin", "hq", ScopeKind.ALL, True),
        ("boss-west", "west", ScopeKind.TEAM, False),
        ("rep2", "east", ScopeKind.OWN, False),
    ],
)
async def test_an_import_is_seen_in_its_owners_record_scope(
    env_each_database: Any, user: str, team: str, scope: ScopeKind, seen: bool
) -> None:
    env = env_each_database
    with env.acting("rep1", team="east"):
        await env.service.start_import("imp-1", "csv")

    with env.acting(user, roles=("sales_manager",), team=team, scope=scope):
        if seen:
            assert (await env.service.get_import("imp-1"))["owner_id"] == "rep1"
        else:
            with pytest.raises(NotFound):
                await env.service.get_import("imp-1")
