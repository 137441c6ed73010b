"""`crm-analytics [serve|migrate|rebuild]`: the report server and the event projection.

`rebuild` empties the read models and moves the projection to a fresh consumer group, so the next
start replays every topic from its beginning. Run it with the service stopped (replicas scaled to
zero); the started service then rebuilds while it serves."""

import asyncio
import logging
import sys
from pathlib import Path
from typing import cast

from crm.analytics.v1 import analytics_service_pb2, analytics_service_pb2_grpc
from crm_platform import migrations
from crm_platform.config import ServiceSettings
from crm_platform.db import create_engine, transaction
from crm_platform.logging import configure_logging
from crm_platform.outbox import UnitOfWork
from crm_platform.service import ServiceApp, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine

from analytics import consumers
from analytics.config import AnalyticsSettings
from analytics.handlers import Reports
from analytics.repository import metadata
from analytics.servicer import AnalyticsServicer

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SERVICE_NAME = analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name

log = logging.getLogger(__name__)


def build(settings: ServiceSettings, engine: AsyncEngine) -> ServiceApp:
    analytics_settings = cast(AnalyticsSettings, settings)
    uow = UnitOfWork(engine, metadata, source=f"/crm/{settings.service_name}")
    reports = Reports(
        engine,
        reporting_currency=analytics_settings.reporting_currency,
        churn_policy=analytics_settings.churn_policy(),
    )
    servicer = AnalyticsServicer(reports)
    return ServiceApp(
        settings=settings,
        engine=engine,
        metadata=metadata,
        uow=uow,
        service_names=[SERVICE_NAME],
        register=lambda server: analytics_service_pb2_grpc.add_AnalyticsServiceServicer_to_server(servicer, server),
        consumers=[
            consumers.ProjectionConsumer(
                uow=uow,
                kafka=settings.kafka.model_copy(
                    update={"fetch_max_wait_ms": analytics_settings.projection_fetch_max_wait_ms}
                ),
                service=settings.service_name,
                group=analytics_settings.projection_group,
            )
        ],
    )


async def rebuild(database_url: str, group: str) -> str:
    engine = create_engine(database_url)
    try:
        async with transaction(engine) as conn:
            return await consumers.rebuild(conn, group)
    finally:
        await engine.dispose()


def main() -> None:
    settings = AnalyticsSettings()
    if sys.argv[1:2] == ["rebuild"]:
        configure_logging(settings.service_name, settings.log_level)
        url = settings.resolved_database_url()
        migrations.upgrade(MIGRATIONS, url)
        group = asyncio.run(rebuild(url, settings.projection_group))
        log.info("read models emptied; the next start replays every topic as consumer group %s", group)
        return
    run_cli(settings=settings, build=build, migrations_dir=MIGRATIONS)


if __name__ == "__main__":
    main()
