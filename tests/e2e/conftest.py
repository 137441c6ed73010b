"""The whole system, started once per test session: PostgreSQL databases, a broker, every service
and the gateway as separate processes. Tests talk to it only through the REST API and Kafka."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from crm_devstack.stack import RunningStack, start_stack, stop_stack
from crm_platform.testing import infra


@pytest.fixture(scope="session")
def stack(postgres_admin_url: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    if postgres_admin_url is None:
        if infra.in_ci():
            pytest.fail("PostgreSQL is required for the e2e tests in CI", pytrace=False)
        pytest.skip("PostgreSQL is not available for the e2e tests")
    work_dir: Path = tmp_path_factory.mktemp("stack")
    running = start_stack(postgres_admin_url=postgres_admin_url, work_dir=work_dir)
    yield running
    stop_stack(running, postgres_admin_url)
