"""Pipelines in the read models, from the sales pipeline events applied through the consumer's
handlers (no broker): the funnel of a pipeline lists its open stages in the pipeline's order, those
without a deal too; an older snapshot of a pipeline applied late changes nothing, nor brings back a
deleted one; the default pipeline, seeded without an event, keeps its built-in order until it is
changed; the funnel across pipelines is as it was; a rebuild empties the pipelines too."""

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from analytics import domain
from analytics import repository as repo
from analytics.domain import ChurnPolicy
from analytics.handlers import ReportFilter, Reports
from analytics.testing import deliver
from crm.common.v1 import common_pb2
from crm.sales.v1 import events_pb2 as sales_events
from crm.sales.v1 import sales_pb2
from crm_platform.db import transaction
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.timeutil import to_timestamp, utcnow
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

ADMIN = (Principal(user_id="admin", roles=("admin",)), ALL_RECORDS)


@pytest.fixture
def reports(engine: AsyncEngine) -> Reports:
    return Reports(engine, reporting_currency="CNY", churn_policy=ChurnPolicy())


def pipeline(pipeline_id: str, version: int, *open_stages: str, deleted: bool = False) -> sales_pb2.Pipeline:
    keys = [*open_stages, "closed_won", "closed_lost"]
    outcomes = ["open"] * len(open_stages) + ["won", "lost"]
    return sales_pb2.Pipeline(
        id=pipeline_id,
        name=pipeline_id.title(),
        version=version,
        stages=[
            sales_pb2.Stage(key=key, name=key.title(), probability="10", position=position, outcome=outcome)
            for position, (key, outcome) in enumerate(zip(keys, outcomes, strict=True))
        ],
    )


def deal(deal_id: str, pipeline_id: str, path: list[str], status: str = "open", amount: str = "1000") -> Any:
    start = utcnow() - timedelta(days=30)
    history = [
        sales_pb2.StageEntry(
            stage=stage,
            entered_at=to_timestamp(start + timedelta(days=index)),
            exited_at=to_timestamp(start + timedelta(days=index + 1)) if index < len(path) - 1 else None,
        )
        for index, stage in enumerate(path)
    ]
    opportunity = sales_pb2.Opportunity(
        id=deal_id, account_id="A1", pipeline_id=pipeline_id, stage=path[-1], status=status, owner_id="r1",
        amount=common_pb2.Money(amount=amount, currency="CNY"), created_at=to_timestamp(start),
        closed_at=to_timestamp(start + timedelta(days=len(path))) if status != "open" else None,
        stage_history=history, version=len(path),
    )  # fmt: skip
    return sales_events.OpportunityCreated(opportunity=opportunity)


async def funnel_rows(reports: Reports, pipeline_id: str = "") -> list[tuple[str, int, int, Decimal | None]]:
    with acting_as(*ADMIN):
        funnel = await reports.sales_funnel(ReportFilter(), pipeline_id)
    return [(row.stage, row.count, row.reached, row.conversion_to_next) for row in funnel.stages]


async def stage_keys(reports: Reports, pipeline_id: str = "") -> list[str]:
    return [stage for stage, *_ in await funnel_rows(reports, pipeline_id)]


async def test_a_pipelines_funnel_follows_its_stage_order_empty_stages_included(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(
        engine,
        [
            sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "discovery", "proposal", "pilot", "review")),
            deal("O1", "partners", ["discovery", "pilot"]),  # skipped the proposal
            deal("O2", "partners", ["discovery", "closed_won"], "won"),
            deal("O3", "partners", ["discovery", "closed_lost"], "lost"),
            deal("O4", "default", ["initial_contact"]),  # another pipeline's
        ],
    )
    assert await funnel_rows(reports, "partners") == [
        ("discovery", 0, 3, Decimal("0.6667")),  # O1 and O2 moved on, O3 was lost there
        ("proposal", 0, 0, None),
        ("pilot", 1, 1, Decimal("0.0000")),
        ("review", 0, 0, None),
        ("won", 1, 1, None),
        ("lost", 1, 1, None),
    ]
    # Stages added and reordered: the funnel follows the pipeline as it is now.
    reordered = pipeline("partners", 2, "discovery", "pilot", "demo", "proposal", "review")
    await deliver(engine, [sales_events.PipelineUpdated(pipeline=reordered, changed_fields=["stages"])])
    assert await stage_keys(reports, "partners") == ["discovery", "pilot", "demo", "proposal", "review", "won", "lost"]


async def test_an_older_pipeline_update_applied_after_a_newer_one_changes_nothing(
    engine: AsyncEngine, reports: Reports
) -> None:
    created = sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "a", "b", "c"))
    newer = sales_events.PipelineUpdated(pipeline=pipeline("partners", 3, "c", "b", "a"), changed_fields=["stages"])
    older = sales_events.PipelineUpdated(pipeline=pipeline("partners", 2, "b", "a", "c"), changed_fields=["stages"])
    await deliver(engine, [created, newer, older, created])
    assert await stage_keys(reports, "partners") == ["c", "b", "a", "won", "lost"]
    async with engine.connect() as conn:
        assert (await conn.execute(select(repo.pipelines.c.version))).scalars().all() == [3]


async def test_a_deleted_pipeline_keeps_its_last_order_and_no_older_event_brings_it_back(
    engine: AsyncEngine, reports: Reports
) -> None:
    last = pipeline("partners", 2, "b", "a")
    await deliver(
        engine,
        [
            sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "a", "b")),
            sales_events.PipelineUpdated(pipeline=last, changed_fields=["stages"]),
            sales_events.PipelineDeleted(pipeline=last),
            # Applied late (another event id): a snapshot of the pipeline before its deletion.
            sales_events.PipelineUpdated(pipeline=last, changed_fields=["stages"]),
            sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "a", "b")),
        ],
    )
    p = repo.pipelines
    async with engine.connect() as conn:
        assert [tuple(row) for row in await conn.execute(select(p.c.id, p.c.deleted, p.c.version))] == [
            ("partners", True, 2)
        ]
    assert await stage_keys(reports, "partners") == ["b", "a", "won", "lost"]


async def test_the_default_pipeline_seeded_without_an_event_keeps_the_built_in_order_until_changed(
    engine: AsyncEngine, reports: Reports
) -> None:
    await deliver(engine, [deal("O1", "default", ["initial_contact", "needs_confirmed"])])
    assert await stage_keys(reports, "default") == [*domain.DEFAULT_OPEN_STAGES, "won", "lost"]
    # An unknown pipeline (created before pipelines were published) falls back to the same order.
    assert await stage_keys(reports, "older") == [*domain.DEFAULT_OPEN_STAGES, "won", "lost"]

    changed = sales_pb2.Pipeline(
        id="default", name="Default", is_default=True, version=2,
        stages=[
            sales_pb2.Stage(key=key, name=key, probability="10", position=position, outcome=outcome)
            for position, (key, outcome) in enumerate(
                [("initial_contact", "open"), ("qualified", "open"), ("needs_confirmed", "open"),
                 ("won", "won"), ("lost", "lost")]
            )
        ],
    )  # fmt: skip
    await deliver(engine, [sales_events.PipelineUpdated(pipeline=changed, changed_fields=["stages"])])
    assert await stage_keys(reports, "default") == ["initial_contact", "qualified", "needs_confirmed", "won", "lost"]


async def test_the_funnel_across_pipelines_is_unchanged_by_pipeline_events(
    engine: AsyncEngine, reports: Reports
) -> None:
    deals = [
        deal("O1", "default", ["initial_contact", "needs_confirmed"]),
        deal("O2", "partners", ["discovery", "pilot"]),
        deal("O3", "partners", ["discovery", "closed_won"], "won"),
    ]
    await deliver(engine, deals)
    before = await funnel_rows(reports)
    assert [stage for stage, *_ in before] == [
        *domain.DEFAULT_OPEN_STAGES, "discovery", "pilot", "closed_won", "won", "lost",
    ]  # fmt: skip
    await deliver(
        engine, [sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "pilot", "proposal", "discovery"))]
    )
    assert await funnel_rows(reports) == before


async def test_a_rebuild_forgets_the_pipelines_and_their_replay_brings_them_back(
    engine: AsyncEngine, reports: Reports
) -> None:
    events = [
        sales_events.PipelineCreated(pipeline=pipeline("partners", 1, "a", "b")),
        sales_events.PipelineUpdated(pipeline=pipeline("partners", 2, "b", "c", "a"), changed_fields=["stages"]),
    ]
    await deliver(engine, events)
    want = await stage_keys(reports, "partners")
    assert want == ["b", "c", "a", "won", "lost"]
    async with transaction(engine) as conn:
        await repo.start_next_generation(conn, "analytics-projection")
        assert await repo.count_rows(conn, repo.pipelines) == 0
    await deliver(engine, events)
    assert await stage_keys(reports, "partners") == want
