"""A service's database for a test: migrated to head, then its engine, disposed afterwards.

Running a service's Alembic revisions costs most of a second, and hundreds of tests each want a
fresh database at head. So a test's database that is still empty is made a copy of one migrated
once per session instead: `CREATE DATABASE … TEMPLATE` on PostgreSQL, a file copy for SQLite. A
database that holds anything already (a test migrating a second service into it, or to an older
revision first) is migrated by Alembic as before.
"""

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.testing import infra

# Databases the test fixtures created (theirs to replace): their URL → the admin URL of their server.
_test_postgres: dict[str, str] = {}
# (admin URL, migrations directory) → a database migrated to head this session, to copy.
_postgres_templates: dict[tuple[str, Path], str] = {}
# migrations directory → a SQLite file migrated to head this session, to copy.
_sqlite_templates: dict[Path, Path] = {}
_sqlite_template_dir = tempfile.TemporaryDirectory(prefix="crm-sqlite-templates-")


def note_test_postgres(admin_url: str, url: str) -> None:
    """Marks a database the test fixtures just created, so that while empty it may be replaced by a copy."""
    _test_postgres[url] = admin_url


async def drop_templates() -> None:
    """Drops the PostgreSQL templates made this session (the fixtures call it at the session's end)."""
    for (admin_url, _), url in list(_postgres_templates.items()):
        await infra.drop_database(admin_url, url)
    _postgres_templates.clear()
    _test_postgres.clear()


async def migrate_to_head(url: str, migrations_dir: Path) -> None:
    """Brings the database at `url` to the head of `migrations_dir`, by copy where it is still empty."""
    if url in _test_postgres and await _postgres_is_empty(url):
        await _copy_postgres_template(_test_postgres[url], url, migrations_dir)
        return
    sqlite_path = _sqlite_file(url)
    if sqlite_path is not None and not sqlite_path.exists():
        shutil.copyfile(await _sqlite_template(migrations_dir), sqlite_path)
        return
    await asyncio.to_thread(migrations.upgrade, migrations_dir, url)  # Alembic runs its own event loop


@asynccontextmanager
async def migrated_engine(url: str, migrations_dir: Path) -> AsyncIterator[AsyncEngine]:
    await migrate_to_head(url, migrations_dir)
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _postgres_is_empty(url: str) -> bool:
    connection = await asyncpg.connect(url)
    try:
        relations: int = await connection.fetchval(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        )
    finally:
        await connection.close()
    return relations == 0


async def _copy_postgres_template(admin_url: str, url: str, migrations_dir: Path) -> None:
    template = _postgres_templates.get((admin_url, migrations_dir))
    if template is None:
        template = await infra.create_database(admin_url, prefix="crm_template")
        await asyncio.to_thread(migrations.upgrade, migrations_dir, template)
        _postgres_templates[(admin_url, migrations_dir)] = template
    name, template_name = url.rsplit("/", 1)[1], template.rsplit("/", 1)[1]
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    finally:
        await connection.close()


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


async def _sqlite_template(migrations_dir: Path) -> Path:
    template = _sqlite_templates.get(migrations_dir)
    if template is None:
        template = Path(_sqlite_template_dir.name) / f"{len(_sqlite_templates)}.db"
        await asyncio.to_thread(migrations.upgrade, migrations_dir, f"sqlite+aiosqlite:///{template}")
        _sqlite_templates[migrations_dir] = template
    return template
