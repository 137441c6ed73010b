"""Every component's Alembic history, on SQLite and PostgreSQL: a fresh database migrates to head,
back down to base and up again (what `helm upgrade` and a rollback rely on), and a revision that
reshapes a table keeps its rows both ways."""

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from crm_platform import idempotency, migrations
from crm_platform.db import create_engine
from crm_platform.migrations import alembic_config
from sqlalchemy import MetaData, Table, insert, inspect, select
from sqlalchemy.ext.asyncio import AsyncConnection

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ["gateway", "leads", "accounts", "sales", "service-desk", "analytics"]
MESSAGING_TABLES = {"outbox", "processed_events"}


async def _migrate(component: str, url: str, direction: str, revision: str) -> None:
    config = alembic_config(REPO / "services" / component / "migrations", url)
    step = command.upgrade if direction == "up" else command.downgrade
    await asyncio.to_thread(step, config, revision)


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names: list[str] = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_database_migrates_up_down_and_up_again(component: str, each_database_url: str) -> None:
    await _migrate(component, each_database_url, "up", "head")
    at_head = await _tables(each_database_url)
    assert at_head >= MESSAGING_TABLES

    await _migrate(component, each_database_url, "down", "base")
    assert await _tables(each_database_url) == set()

    await _migrate(component, each_database_url, "up", "head")
    assert await _tables(each_database_url) == at_head


# Per service: the revision before the shared idempotency table, one key as that revision stored it,
# and how the shared table answers for it.
OWN_IDEMPOTENCY_KEYS = {
    "accounts": (
        "0002",
        {"operation": "create_account", "caller": "u1", "key": "k1", "result_id": "acc-1"},
        ("u1", "acc-1"),
    ),
    "leads": (
        "0004",
        {"operation": "convert", "principal_id": "u1", "key": "k1", "response": b'{"account_id": "a", "lead_id": "l"}'},
        ("u1", {"account_id": "a", "lead_id": "l"}),
    ),
    "sales": ("0005", {"operation": "contract", "key": "k1", "resource_id": "ct-1"}, ("", "ct-1")),
    "service-desk": (
        "0005",
        {"operation": "create_ticket", "principal_id": "u1", "key": "k1", "result_id": "t-1"},
        ("u1", "t-1"),
    ),
}


async def _reflected(conn: AsyncConnection, name: str = idempotency.TABLE_NAME) -> Table:
    table: Table = await conn.run_sync(lambda sync: Table(name, MetaData(), autoload_with=sync))
    return table


@pytest.mark.parametrize("component", sorted(OWN_IDEMPOTENCY_KEYS))
async def test_idempotency_keys_survive_the_move_to_the_shared_table(
    component: str, each_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, own_row, (caller, result) = OWN_IDEMPOTENCY_KEYS[component]
    operation = own_row["operation"]
    monkeypatch.setattr(migrations, "REPLACE_TABLE_BATCH_ROWS", 2)  # several pages for the rows below
    await _migrate(component, each_database_url, "up", before)
    engine = create_engine(each_database_url)
    extra = [{**own_row, "key": f"k{n}"} for n in range(2, 6)]
    try:
        async with engine.begin() as conn:
            own = await _reflected(conn)
            created_at = datetime(2026, 11, 30, tzinfo=UTC)
            await conn.execute(insert(own), [{**row, "created_at": created_at} for row in [own_row, *extra]])

        await _migrate(component, each_database_url, "up", "head")
        async with engine.connect() as conn:
            shared = await _reflected(conn)
            # Kept without a fingerprint: the first result answers whatever request repeats the key.
            with idempotency.serving_fingerprint("f" * idempotency.FINGERPRINT_LENGTH):
                recalled = await idempotency.recall(conn, shared, operation=operation, caller=caller, key="k1")
        assert recalled == result
        assert "fingerprint" in shared.c

        await _migrate(component, each_database_url, "down", before)
        async with engine.connect() as conn:
            own = await _reflected(conn)
            rows = [dict(row) for row in (await conn.execute(select(own).order_by(own.c.key))).mappings()]
        assert [{name: row[name] for name in own_row} for row in rows] == [own_row, *extra]
    finally:
        await engine.dispose()


async def test_open_leads_per_owner_are_counted_from_the_leads_already_there(each_database_url: str) -> None:
    await _migrate("leads", each_database_url, "up", "0005")
    engine = create_engine(each_database_url)
    now = datetime(2026, 12, 5, tzinfo=UTC)
    try:
        async with engine.begin() as conn:
            leads = await _reflected(conn, "leads")
            rules = await _reflected(conn, "assignment_rules")
            base: dict[str, Any] = {"source": "other", "tags": [], "custom": {}, "created_at": now, "updated_at": now}
            await conn.execute(
                insert(leads),
                [
                    {**base, "id": "l1", "owner_id": "u1", "status": "new"},
                    {**base, "id": "l2", "owner_id": "u1", "status": "converted"},
                    {**base, "id": "l3", "owner_id": "u2", "status": "contacted"},
                    {**base, "id": "l4", "owner_id": "", "status": "recycled"},
                ],
            )
            await conn.execute(
                insert(rules).values(
                    id="r1", name="r", position=1, regions=[], industries=[], sources=[], user_ids=["u1", "u3"],
                    strategy="round_robin",
                )
            )  # fmt: skip

        await _migrate("leads", each_database_url, "up", "head")
        async with engine.begin() as conn:
            await conn.execute(insert(leads).values(**base, id="l5", owner_id="u2", status="new"))
        async with engine.connect() as conn:
            loads = await _reflected(conn, "lead_owner_loads")
            kept = {owner: n for owner, n in await conn.execute(select(loads.c.owner_id, loads.c.open_leads))}
        # Every rep of a rule has a row on PostgreSQL (a create waits on it); SQLite needs none.
        assert kept == ({"u1": 1, "u2": 2, "u3": 0} if engine.dialect.name == "postgresql" else {"u1": 1, "u2": 2})
    finally:
        await engine.dispose()


async def test_round_robin_goes_on_from_the_old_pointer_in_turns(each_database_url: str) -> None:
    from leads import repository as repo  # the service's own reading of the turns

    await _migrate("leads", each_database_url, "up", "0007")
    engine = create_engine(each_database_url)
    rule: dict[str, Any] = {"name": "r", "position": 1, "regions": [], "industries": [], "sources": [],
                            "user_ids": ["u1", "u2", "u3"], "strategy": "round_robin"}  # fmt: skip
    try:
        async with engine.begin() as conn:
            rules = await _reflected(conn, "assignment_rules")
            await conn.execute(
                insert(rules),
                [{**rule, "id": "r1", "last_user_id": "u2"}, {**rule, "id": "r2", "last_user_id": ""}],
            )
        await _migrate("leads", each_database_url, "up", "head")
        async with engine.begin() as conn:
            # r1's previous lead went to u2, so its next turn is u3's (place 2); r2 starts at u1.
            assert await repo.take_turns(conn, {"r1": 2, "r2": 1}) == {"r1": [2, 3], "r2": [0]}
            await conn.execute(repo.assignment_rules.delete().where(repo.assignment_rules.c.id == "r1"))
            assert await repo.take_turns(conn, {"r1": 1, "r2": 1}) == {"r2": [1]}
            # The previous release, still serving during the rollout, writes rules and pointers as before.
            await conn.execute(insert(rules).values(**rule, id="r3", last_user_id=""))
            await conn.execute(rules.update().where(rules.c.id == "r3").values(last_user_id="u1"))
            assert await repo.take_turns(conn, {"r3": 1}) == {"r3": [0]}
        await _migrate("leads", each_database_url, "down", "0007")
        await _migrate("leads", each_database_url, "up", "head")
        async with engine.begin() as conn:
            # Back on the previous release, which went on from its own pointer (left at "" here).
            assert await repo.take_turns(conn, {"r2": 1}) == {"r2": [0]}
    finally:
        await engine.dispose()


async def test_web_forms_made_before_versions_start_at_version_1(each_database_url: str) -> None:
    await _migrate("leads", each_database_url, "up", "0012")
    engine = create_engine(each_database_url)
    form = {"id": "w1", "name": "Expo", "form_key": "k" * 32, "rate_limit_per_minute": 60,
            "created_at": datetime(2026, 12, 6, tzinfo=UTC)}  # fmt: skip
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(await _reflected(conn, "webforms")).values(form))

        await _migrate("leads", each_database_url, "up", "0013")
        async with engine.connect() as conn:
            webforms = await _reflected(conn, "webforms")
            assert (await conn.execute(select(webforms.c.name, webforms.c.version))).all() == [("Expo", 1)]

        await _migrate("leads", each_database_url, "down", "0012")
        async with engine.connect() as conn:
            webforms = await _reflected(conn, "webforms")
            assert (await conn.execute(select(webforms.c.name))).all() == [("Expo",)]
            assert "version" not in webforms.c
    finally:
        await engine.dispose()


async def test_campaign_costs_keep_their_thousandths_after_0015(each_database_url: str) -> None:
    from leads import repository as repo  # the service's own reading of the costs

    await _migrate("leads", each_database_url, "up", "0014")
    engine = create_engine(each_database_url)
    now = datetime(2026, 12, 9, tzinfo=UTC)
    try:
        async with engine.begin() as conn:
            campaigns = await _reflected(conn, "campaigns")
            await conn.execute(
                insert(campaigns).values(
                    id="c1", name="Expo", cost_amount=Decimal("1500.25"), cost_currency="EUR", created_at=now,
                    updated_at=now,
                )
            )  # fmt: skip

        await _migrate("leads", each_database_url, "up", "0015")
        async with engine.begin() as conn:
            await conn.execute(
                insert(repo.campaigns).values(
                    id="c2", name="Gulf", cost_amount=Decimal("12.345"), cost_currency="KWD", created_at=now,
                    updated_at=now,
                )
            )  # fmt: skip
            costs = dict((await conn.execute(select(repo.campaigns.c.id, repo.campaigns.c.cost_amount))).all())
        # 12.345 KWD was 12.35 in NUMERIC(18, 2): 5 fils more than the campaign cost.
        assert costs == {"c1": Decimal("1500.25"), "c2": Decimal("12.345")}
    finally:
        await engine.dispose()
