"""A service whose relay, consumer or job ends on its own does not go on serving without it: the
process stops with an error, so that its orchestrator restarts it (a consumer gone would leave its
read models frozen behind a ready pod, with nothing to tell)."""

import asyncio
import logging
from dataclasses import dataclass

import pytest
from crm_platform.config import KafkaSettings
from crm_platform.db import create_engine
from crm_platform.jobs import PeriodicJob
from crm_platform.service import BackgroundTaskEnded
from crm_platform.testing.sample_service import build_app, create_schema

pytestmark = pytest.mark.integration


@dataclass
class BrokenJob(PeriodicJob):
    async def run(self, stopping: asyncio.Event) -> None:
        raise RuntimeError("a bug the job's own retries do not cover")


async def _nothing() -> int:
    return 0


async def test_a_background_task_that_ends_on_its_own_stops_the_service_with_an_error(
    postgres_url: str, kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(postgres_url)
    await create_schema(engine)
    app = build_app(engine, kafka_settings)
    app.jobs.append(BrokenJob(name="broken", interval_seconds=60, run_once=_nothing))

    with pytest.raises(BackgroundTaskEnded, match="job-broken"):  # out of the event loop: the process exits 1
        await asyncio.wait_for(app.serve(), timeout=30)

    assert any(
        record.levelno == logging.ERROR and "job-broken ended on its own" in record.getMessage()
        for record in caplog.records
    )
