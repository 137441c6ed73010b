"""Helpers for tests and benchmarks of the sales service: a migrated database, handlers wired
to it, a settable clock, and acting as a caller the gateway authenticated."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo
from pathlib import Path

from crm_platform.db import create_engine
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing.database import migrate_to_head
from sqlalchemy.ext.asyncio import AsyncEngine

from sales import domain as d
from sales.handlers import SalesHandlers
from sales.repository import metadata

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class Clock:
    """A clock moved by hand (overdue detection, contract numbers)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def migrated_engine(url: str) -> AsyncEngine:
    await migrate_to_head(url, MIGRATIONS)
    return create_engine(url)


def make_handlers(engine: AsyncEngine, clock: Callable[[], datetime], timezone: tzinfo = UTC) -> SalesHandlers:
    return SalesHandlers(
        UnitOfWork(engine, metadata, source="/crm/sales"),
        quote_thresholds=d.QuoteThresholds(),
        contract_thresholds=d.ContractThresholds(),
        clock=clock,
        timezone=timezone,
    )


@contextmanager
def as_user(
    user_id: str, *roles: str, team: str = "east", region: str = "cn-east", scope: str = "all"
) -> Iterator[None]:
    """Acts as a caller the gateway authenticated, with the record scope its policy decided."""
    principal = Principal(user_id=user_id, roles=roles, team=team, region=region)
    record_scope = (
        ALL_RECORDS if scope == "all" else RecordScope(ScopeKind(scope), owner_id=user_id, team=team, region=region)
    )
    with acting_as(principal, record_scope):
        yield
