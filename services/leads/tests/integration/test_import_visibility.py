"""An import is seen by who started it and in the record scope of its leads' owner (K review: a team
manager got 404 on their rep's import): the rep's team manager and region manager see it, a manager
of another team and another rep of the same team do not, and an admin sees every import. The list
of imports holds exactly those, newest first."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from crm_platform.errors import NotFound, ValidationFailed
from crm_platform.principal import ScopeKind
from leads.handlers import ImportOptions, ImportSpec
from leads.importing import RowMapper

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
        listed, _ = await env.service.list_imports(status="", limit=50, cursor="")
        if seen:
            assert (await env.service.get_import("imp-1"))["owner_id"] == "rep1"
        else:
            with pytest.raises(NotFound):
                await env.service.get_import("imp-1")

    assert [row["id"] for row in listed] == (["imp-1"] if seen else [])


async def test_imports_are_listed_newest_first_a_page_at_a_time_and_by_status(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("rep1", team="east"):
        for key in ("imp-a", "imp-b", "imp-c"):
            await env.service.start_import(key, "csv")
            env.clock.advance(minutes=1)
        await env.service.import_part(_csv_spec("imp-b"), _chunks(b"name\nAnn\n"))  # completes it

    with env.acting("rep1", team="east", scope=ScopeKind.OWN):
        first, cursor = await env.service.list_imports(status="", limit=2, cursor="")
        rest, last = await env.service.list_imports(status="", limit=2, cursor=cursor)
        running, _ = await env.service.list_imports(status="running", limit=50, cursor="")
        with pytest.raises(ValidationFailed) as unknown:
            await env.service.list_imports(status="done", limit=50, cursor="")

    assert [row["id"] for row in first + rest] == ["imp-c", "imp-b", "imp-a"] and cursor and not last
    assert [row["id"] for row in running] == ["imp-c", "imp-a"]
    assert unknown.value.errors[0].field == "status"


def _csv_spec(import_id: str) -> ImportSpec:
    options = ImportOptions(mapper=RowMapper(column_map={}, source_map={}, campaign_id=""), on_duplicate="reject")
    return ImportSpec(import_id=import_id, format="csv", options=options)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body
