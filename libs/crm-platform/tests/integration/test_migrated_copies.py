"""A test's empty database is brought to head by copying one migrated once per session: the copy
must be what Alembic itself would have made, and a database already holding something must be
migrated by Alembic, not replaced. Two migrators of one database at once take turns."""

import asyncio
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.testing.database import migrate_to_head
from sqlalchemy import inspect, text

pytestmark = pytest.mark.integration

ACCOUNTS_MIGRATIONS = Path(__file__).resolve().parents[4] / "services" / "accounts" / "migrations"


async def _schema(url: str) -> tuple[str, dict[str, list[str]]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            revision = await connection.scalar(text("SELECT version_num FROM alembic_version"))

            def columns(sync_connection: object) -> dict[str, list[str]]:
                inspector = inspect(sync_connection)
                return {
                    table: sorted(column["name"] for column in inspector.get_columns(table))
                    for table in inspector.get_table_names()
                }

            return str(revision), await connection.run_sync(columns)
    finally:
        await engine.dispose()


async def test_an_empty_database_is_copied_to_the_head_alembic_makes(each_database_url: str, tmp_path: Path) -> None:
    await migrate_to_head(each_database_url, ACCOUNTS_MIGRATIONS)
    reference = f"sqlite+aiosqlite:///{tmp_path / 'reference.db'}"
    await asyncio.to_thread(migrations.upgrade, ACCOUNTS_MIGRATIONS, reference)

    copied_revision, copied_tables = await _schema(each_database_url)
    reference_revision, reference_tables = await _schema(reference)
    assert copied_revision == reference_revision
    assert copied_tables == reference_tables
    assert "accounts" in copied_tables


async def test_a_database_already_holding_rows_is_migrated_in_place(each_database_url: str) -> None:
    await asyncio.to_thread(migrations.upgrade, ACCOUNTS_MIGRATIONS, each_database_url, "0001")
    engine = create_engine(each_database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE kept (note TEXT)"))
            await connection.execute(text("INSERT INTO kept VALUES ('still here')"))

        await migrate_to_head(each_database_url, ACCOUNTS_MIGRATIONS)

        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT note FROM kept")) == "still here"
    finally:
        await engine.dispose()
    revision, _ = await _schema(each_database_url)
    assert revision != "0001"


async def test_two_migrators_of_one_database_at_once_both_succeed(postgres_url: str) -> None:
    """Replicas that migrate at start, or a migration Job beside a pod that does: processes of their
    own, as in a deployment (Alembic's context is one per process)."""
    script = "import sys; from pathlib import Path; from crm_platform import migrations; "
    script += "migrations.upgrade(Path(sys.argv[1]), sys.argv[2])"
    migrators = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(ACCOUNTS_MIGRATIONS), postgres_url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [await migrator.communicate() for migrator in migrators]

    assert [migrator.returncode for migrator in migrators] == [0, 0], [err.decode()[-600:] for _, err in results]
    revision, _ = await _schema(postgres_url)
    assert revision == (await _head_revision())


async def _head_revision() -> str:
    script = ScriptDirectory.from_config(migrations.alembic_config(ACCOUNTS_MIGRATIONS, "sqlite://"))
    return str(script.get_current_head())
