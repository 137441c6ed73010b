"""Open leads are rescored when the scoring rules or the grade thresholds change (SPEC §4: the score
is recomputed on every change): the write returns at once, and the rescoring job of every replica
walks the open leads scored under an older scoring generation, in batches."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from alembic import command
from crm_platform.migrations import alembic_config
from crm_platform.testing.plans import generic_plan
from leads import repository as repo
from leads.__main__ import MIGRATIONS
from leads.domain import ScoringRule, Thresholds
from leads.handlers import ActivityInput
from sqlalchemy import event, func, select, text, update

pytestmark = pytest.mark.integration

SOFTWARE = ScoringRule(id="", field="industry", operator="equals", value="software", points=60)


async def scored_events(env: Any, key: str | None = None) -> int:
    outbox = repo.metadata.tables["outbox"]
    query = select(func.count()).where(outbox.c.type == "crm.leads.lead.scored")
    if key is not None:
        query = query.where(outbox.c.key == key)
    async with env.engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


async def history(env: Any, lead_id: str) -> list[tuple[int, str]]:
    h = repo.score_history.c
    async with env.engine.connect() as conn:
        rows = await conn.execute(select(h.score, h.grade).where(h.lead_id == lead_id).order_by(h.id))
        return [(score, grade) for score, grade in rows]


async def stored(env: Any, lead_id: str) -> Any:
    async with env.engine.connect() as conn:
        return await repo.load_lead(conn, lead_id)


async def rescore_until_done(*services: Any) -> int:
    """Runs the job on every replica at once until a round finds nothing: the leads it acted on."""
    acted = 0
    while sum(done := await asyncio.gather(*(s.rescore_stale_leads() for s in services))):
        acted += sum(done)
    return acted


@asynccontextmanager
async def replica(env: Any, **settings: Any) -> AsyncIterator[Any]:
    """Another instance of the service with its own engine (and settings), as a second pod runs it."""
    from crm_platform.db import create_engine
    from crm_platform.outbox import UnitOfWork
    from leads.handlers import LeadsService

    engine = create_engine(env.url)
    try:
        yield LeadsService(
            engine=engine,
            uow=UnitOfWork(engine, repo.metadata, source="crm/leads"),
            settings=env.service.settings.model_copy(update=settings),
            clock=env.clock,
        )
    finally:
        await engine.dispose()


async def test_a_rule_change_rescores_the_open_leads_and_leaves_the_closed_ones(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_scoring_rule(SOFTWARE, "software", "")
        await env.service.set_thresholds(Thresholds(a=85, b=50, c=30))
        software, _ = await env.service.create_lead({"name": "sw", "industry": "software"})
        retail, _ = await env.service.create_lead({"name": "retail", "industry": "retail"})
        lost, _ = await env.service.create_lead({"name": "lost", "industry": "software"})
        lost = (await env.service.disqualify(lost["id"], "no budget", 0)).record
        won, _ = await env.service.create_lead({"name": "won", "industry": "software"})
    async with env.engine.begin() as conn:  # as a conversion leaves it (the saga is tested elsewhere)
        await conn.execute(update(repo.leads).where(repo.leads.c.id == won["id"]).values(status="converted"))
    assert (software["score"], software["grade"]) == (60, "B")
    events_before = await scored_events(env)

    with env.acting("admin", roles=("admin",)):
        await env.service.update_scoring_rule(
            ScoringRule(id=rule["id"], field="industry", operator="equals", value="software", points=35), "sw", 1
        )
    # The write returned without touching a lead: the job rescores them.
    assert (await stored(env, software["id"]))["score"] == 60
    assert await env.service.rescore_stale_leads() == 2  # software and retail: the open ones
    assert await env.service.rescore_stale_leads() == 0

    moved = await stored(env, software["id"])
    assert (moved["score"], moved["grade"], moved["version"]) == (35, "C", software["version"] + 1)
    assert moved["updated_at"] == env.clock()
    assert await history(env, software["id"]) == [(60, "B"), (35, "C")]
    assert await scored_events(env, software["id"]) == 1
    # Retail scored 0 before and after: its generation is recorded, nothing else.
    kept = await stored(env, retail["id"])
    assert (kept["score"], kept["version"]) == (0, retail["version"])
    assert kept["scoring_generation"] == moved["scoring_generation"] > retail["scoring_generation"]
    assert await history(env, retail["id"]) == [(0, "D")]
    # The closed leads keep the score they closed with.
    for closed in (lost, won):
        assert (await stored(env, closed["id"]))["score"] == 60
        assert await history(env, closed["id"]) == [(60, "B")]
    assert await scored_events(env) == events_before + 1


async def test_a_new_rule_and_a_deleted_rule_rescore_too(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        lead, _ = await env.service.create_lead({"name": "x", "industry": "software", "email": "x@a.cn"})
        email = await env.service.create_scoring_rule(
            ScoringRule(id="", field="email", operator="present", points=20), "email", ""
        )
        assert await env.service.rescore_stale_leads() == 1
        assert (await stored(env, lead["id"]))["score"] == 20
        await env.service.delete_scoring_rule(email["id"])
        assert await env.service.rescore_stale_leads() == 1
    assert await history(env, lead["id"]) == [(0, "D"), (20, "D"), (0, "D")]


async def test_a_threshold_change_regrades_the_open_leads(env: Any) -> None:
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(SOFTWARE, "software", "")
        await env.service.set_thresholds(Thresholds(a=85, b=50, c=30))
        lead, _ = await env.service.create_lead({"name": "sw", "industry": "software"})
        await env.service.set_thresholds(Thresholds(a=60, b=40, c=20))
    assert await env.service.rescore_stale_leads() == 1
    regraded = await stored(env, lead["id"])
    assert (regraded["score"], regraded["grade"]) == (60, "A")
    h = repo.score_history.c
    async with env.engine.connect() as conn:
        last = (await conn.execute(select(repo.score_history).order_by(h.id.desc()).limit(1))).mappings().one()
    assert (last["previous_score"], last["score"], last["previous_grade"], last["grade"]) == (60, 60, "B", "A")
    assert await scored_events(env, lead["id"]) == 1


async def test_activity_count_rules_count_a_batch_in_one_query(env: Any) -> None:
    with env.acting():
        leads = [(await env.service.create_lead({"name": f"v{i}"}))[0] for i in range(6)]
        for lead in leads[:4]:
            await env.service.log_activity(ActivityInput(lead_id=lead["id"], kind="visit"))
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(
            ScoringRule(id="", activity_kind="visit", min_count=1, points=40), "visited", ""
        )
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(env.engine.sync_engine, "before_cursor_execute", seen)
    try:
        assert await env.service.rescore_stale_leads() == 6
    finally:
        event.remove(env.engine.sync_engine, "before_cursor_execute", seen)
    assert sum("FROM lead_activities" in s for s in statements) == 1
    assert [(await stored(env, lead["id"]))["score"] for lead in leads] == [40, 40, 40, 40, 0, 0]


async def test_two_replicas_rescore_each_lead_once(env_each_database: Any) -> None:
    env = env_each_database
    with env.acting():
        leads = [(await env.service.create_lead({"name": f"s{i}", "industry": "software"}))[0] for i in range(12)]
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(SOFTWARE, "software", "")
    env.service.settings = env.service.settings.model_copy(update={"jobs_batch_size": 5})
    async with replica(env) as other:
        assert await rescore_until_done(env.service, other) == 12
    assert await scored_events(env) == 12
    for lead in leads:
        assert await history(env, lead["id"]) == [(0, "D"), (60, "B")]


async def test_a_lead_scored_under_the_new_rules_is_not_rescored_again(env: Any) -> None:
    with env.acting():
        old, _ = await env.service.create_lead({"name": "old", "industry": "software"})
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(SOFTWARE, "software", "")
    with env.acting():
        new, _ = await env.service.create_lead({"name": "new", "industry": "software"})
    assert new["score"] == 60
    assert await env.service.rescore_stale_leads() == 1  # the old one only
    assert await history(env, new["id"]) == [(60, "B")]
    assert await history(env, old["id"]) == [(0, "D"), (60, "B")]


async def test_a_replica_scoring_with_rules_cached_before_a_change_leaves_its_leads_due(env: Any) -> None:
    """Rules are cached per replica: a lead scored there with the old rules after a change made on
    another records the old generation, and is rescored; the job itself reloads its rules."""
    async with replica(env, rules_cache_seconds=3600) as stale:
        with env.acting():
            await stale.rules.get()  # cached before the change
        with env.acting("admin", roles=("admin",)):
            await env.service.create_scoring_rule(SOFTWARE, "software", "")
        with env.acting():
            lead, _ = await stale.create_lead({"name": "late", "industry": "software"})
        assert lead["score"] == 0  # the old rules
        assert await stale.rescore_stale_leads() == 1  # by the current rules, not its cache
    assert (await stored(env, lead["id"]))["score"] == 60
    assert await env.service.rescore_stale_leads() == 0


async def test_a_rule_change_while_a_pass_runs_is_applied_by_the_next_pass(env: Any) -> None:
    with env.acting():
        leads = [(await env.service.create_lead({"name": f"p{i}", "industry": "software"}))[0] for i in range(3)]
    with env.acting("admin", roles=("admin",)):
        rule = await env.service.create_scoring_rule(SOFTWARE, "software", "")
    rescored = env.service._rescored
    changed: list[bool] = []

    async def change_midway(*args: Any) -> Any:
        if not changed:  # committed while the pass holds its leads, with the rules it read before
            changed.append(True)
            with env.acting("admin", roles=("admin",)):
                await env.service.update_scoring_rule(
                    ScoringRule(id=rule["id"], field="industry", operator="equals", value="software", points=90),
                    "software",
                    1,
                )
        return await rescored(*args)

    env.service._rescored = change_midway
    assert await env.service.rescore_stale_leads() == 3
    assert [(await stored(env, lead["id"]))["score"] for lead in leads] == [60, 60, 60]
    assert await env.service.rescore_stale_leads() == 3  # scored under the rules before the change
    assert await env.service.rescore_stale_leads() == 0
    for lead in leads:
        assert await history(env, lead["id"]) == [(0, "D"), (60, "B"), (90, "A")]


async def test_the_rescoring_job_walks_only_the_open_leads_scored_under_older_rules(env: Any) -> None:
    """At scale nearly every lead is scored under the current rules: a pass with nothing to do
    must not read the open leads, and one with work must read only those it rescores."""
    async with env.engine.connect() as conn:
        current = await repo.current_scoring_generation(conn)
    async with env.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO leads (id, name, source, status, tags, custom, created_at, updated_at, scoring_generation)"
                " SELECT 'seed-' || g, 'Seed', 'website',"
                "  CASE WHEN g % 3 = 0 THEN 'converted' WHEN g % 2 = 1 THEN 'new' ELSE 'qualified' END,"
                "  '[]', '{}', now(), now(), CASE WHEN g <= 9 THEN 0 ELSE :current END"
                " FROM generate_series(1, 20000) AS g"
            ),
            {"current": current},
        )
        await conn.execute(text("ANALYZE leads"))
        plan = await generic_plan(conn, repo.leads_scored_before(current, 200))
    assert "Index Scan using ix_leads_scoring_due on leads" in plan, plan
    assert await env.service.rescore_stale_leads() == 6  # seed-1, 2, 4, 5, 7, 8; 3, 6, 9 are converted
    assert await env.service.rescore_stale_leads() == 0


async def test_the_leads_scored_before_the_upgrade_are_checked_once(env_each_database: Any) -> None:
    """Migration 0019: leads scored before it may be stale (the fault it fixes), so each open one is
    rescored once after the upgrade; on SQLite the column is added without copying the table, so
    the triggers counting owners' open leads stay."""
    env = env_each_database
    with env.acting("admin", roles=("admin",)):
        await env.service.create_scoring_rule(SOFTWARE, "software", "")
        before, _ = await env.service.create_lead({"name": "before", "industry": "software", "owner_id": "rep1"})
    async with env.engine.begin() as conn:  # a rule changed before the upgrade left the lead stale
        await conn.execute(update(repo.scoring_rules).values(points=70))
    await env.engine.dispose()  # no connection keeps statements prepared against the old table
    config = alembic_config(MIGRATIONS, env.url)
    await asyncio.to_thread(command.downgrade, config, "0018")
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await env.service.rescore_stale_leads() == 1
    assert await env.service.rescore_stale_leads() == 0
    assert await history(env, before["id"]) == [(60, "B"), (70, "B")]
    with env.acting():
        await env.service.create_lead({"name": "after", "owner_id": "rep1"})
    assert await env.loads_kept() == await env.loads_counted() == {"rep1": 2}
