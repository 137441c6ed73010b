"""`held_exclusively`: work of several transactions that two requests must not interleave runs one
holder at a time, whether the other holder is in this process or in another replica (an engine of
its own, on PostgreSQL); a holder that fails or is cancelled lets the next one in; and a transaction
can tell, without waiting, which names are held now (`held_now`), keeping the free ones from being
taken until it ends (PostgreSQL)."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from crm_platform.db import create_engine, held_exclusively, held_now, transaction
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


@pytest.fixture
async def engines(each_database_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two engines on one database: two replicas on PostgreSQL (SQLite deployments are one process,
    so there the second is the first)."""
    first = create_engine(each_database_url)
    second = create_engine(each_database_url) if first.dialect.name == "postgresql" else first
    yield first, second
    await first.dispose()
    await second.dispose()


async def _hold(engine: AsyncEngine, name: str, log: list[str], who: str) -> None:
    async with held_exclusively(engine, name):
        log.append(f"{who} in")
        await asyncio.sleep(0.05)
        log.append(f"{who} out")


async def test_holders_of_one_name_take_turns_across_replicas(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    log: list[str] = []

    await asyncio.gather(*(_hold(engine, "import:1", log, f"h{n}") for n, engine in enumerate([*engines, *engines])))

    assert [entry.split()[1] for entry in log] == ["in", "out"] * 4
    assert all(log[n].split()[0] == log[n + 1].split()[0] for n in range(0, 8, 2))


async def test_other_names_do_not_wait(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    log: list[str] = []

    await asyncio.gather(_hold(engines[0], "import:1", log, "a"), _hold(engines[1], "import:2", log, "b"))

    assert sorted(log[:2]) == ["a in", "b in"]  # both held at once


async def test_a_holder_that_fails_or_is_cancelled_lets_the_next_in(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    with pytest.raises(RuntimeError):
        async with held_exclusively(engines[0], "convert:7"):
            raise RuntimeError("the work failed")
    waiting = asyncio.create_task(_hold(engines[0], "convert:7", [], "w"))
    async with held_exclusively(engines[1], "convert:7"):
        cancelled = asyncio.create_task(_hold(engines[0], "convert:7", [], "c"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
    await asyncio.wait_for(waiting, timeout=5)

    async with asyncio.timeout(5):
        async with held_exclusively(engines[1], "convert:7"):
            pass


async def test_a_transaction_tells_which_names_are_held_now_without_waiting(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    inside, leave = asyncio.Event(), asyncio.Event()

    async def converting() -> None:
        async with held_exclusively(engines[1], "convert:1"):
            inside.set()
            await leave.wait()

    holder = asyncio.create_task(converting())
    await asyncio.wait_for(inside.wait(), timeout=5)
    async with asyncio.timeout(5), transaction(engines[0]) as conn:
        held = await held_now(conn, {"convert:1", "convert:2"})
    leave.set()
    await holder

    assert held == {"convert:1"}


async def test_a_name_found_free_is_not_taken_until_the_transaction_that_looked_ends(postgres_url: str) -> None:
    """On PostgreSQL, across replicas (SQLite's writing transactions run one at a time anyway)."""
    looking, holding = create_engine(postgres_url), create_engine(postgres_url)
    log: list[str] = []
    try:
        async with transaction(looking) as conn:
            assert await held_now(conn, {"convert:3"}) == set()
            later = asyncio.create_task(_hold(holding, "convert:3", log, "later"))
            await asyncio.sleep(0.2)
            assert log == []  # it waits for the transaction
        await asyncio.wait_for(later, timeout=5)
    finally:
        await looking.dispose()
        await holding.dispose()
    assert log == ["later in", "later out"]
