"""Async database engines: PostgreSQL (asyncpg) in production, SQLite (aiosqlite) as the embedded default."""

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Insert,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DatabaseError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeDecorator

from crm_platform.config import DATABASE_MAX_OVERFLOW, DATABASE_POOL_SIZE


def normalise_url(url: str) -> str:
    """Accepts plain `postgresql://` and `sqlite:///` URLs and picks the async driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def create_engine(
    url: str, *, pool_size: int = DATABASE_POOL_SIZE, max_overflow: int = DATABASE_MAX_OVERFLOW
) -> AsyncEngine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, json_serializer=json_text)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path; connections are recycled
    # instead, and a connection that died mid-pool fails one transaction, which the caller retries.
    # The pool keeps `pool_size` connections once opened; an overflow connection is closed when it
    # comes back, so `pool_size` must cover the usual concurrency or every burst reconnects (a new
    # backend, and every statement prepared again).
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=1800, json_serializer=json_text
    )


def probe_engine(engine: AsyncEngine) -> AsyncEngine:
    """An engine to `engine`'s database that opens a connection for each use and keeps none: for a
    health check, which must not wait behind the requests for a pooled connection (a pod whose pool
    is busy is busy, not broken: taken out of rotation, it would pass its load on to the others)."""
    return create_async_engine(engine.url, poolclass=NullPool)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the relay read while a request writes; busy_timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def single_statements(engine: AsyncEngine) -> AsyncEngine:
    """The engine (same pool) for work done in one statement: no BEGIN and COMMIT/ROLLBACK round
    trips around it. A lone statement is atomic by itself, and under READ COMMITTED a lone SELECT
    sees exactly what it would see in a transaction. Work of several statements, or that needs one
    snapshot or a transaction-local setting, uses `engine.begin()` / `engine.connect()`."""
    autocommit = _SINGLE_STATEMENTS.get(engine)
    if autocommit is None:  # made once per engine: building the proxy costs as much as a statement
        autocommit = _SINGLE_STATEMENTS[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
    return autocommit


_SINGLE_STATEMENTS: "weakref.WeakKeyDictionary[AsyncEngine, AsyncEngine]" = weakref.WeakKeyDictionary()


def insert_from_json(table: Table, param: str, columns: Sequence[str] | None = None) -> Insert:
    """INSERT INTO `table` the rows of one JSON-array parameter (`json_rows`), in the array's order
    (PostgreSQL): any number of rows in one bound value and one statement text, also usable as a
    CTE of a larger statement. Keys missing from a row are NULL."""
    names = list(columns) if columns is not None else list(table.c.keys())
    rows = (
        func.json_populate_recordset(literal_column(f"NULL::{table.name}"), cast(bindparam(param, type_=Text), JSON))
        .table_valued(*names, with_ordinality="ordinality")
        .alias(f"{param}_rows")
    )
    return insert(table).from_select(names, select(*[rows.c[name] for name in names]).order_by(rows.c.ordinality))


def json_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The parameter of `insert_from_json`: times in ISO 8601, bytes in bytea's hex format."""
    return json_text(rows, default=_json_value)


def json_text(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """JSON text for the database (the engines' `json_serializer`, COPY records, `json_rows`):
    orjson, about nine times as fast as the standard library on the records stored (custom
    fields, event headers); the standard library for what orjson refuses (an integer beyond 64
    bits)."""
    try:
        return orjson.dumps(value, default=default).decode()
    except TypeError:
        return json.dumps(value, default=default, separators=(",", ":"), ensure_ascii=False)


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def driver_connection(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, in `conn`'s transaction. SQLAlchemy's asyncpg adapter
    begins the transaction lazily, on the first statement; if none ran yet, it is begun here (the
    BEGIN round trip the first statement would have cost). On a `single_statements` connection
    there is none to begin."""
    sync = conn.sync_connection
    if sync is not None and not sync.invalidated and not sync.closed:
        pooled = sync.connection  # held by `conn`: no I/O, and no greenlet to switch to
    else:
        pooled = await conn.get_raw_connection()  # reconnects
    adapter: Any = pooled.dbapi_connection
    driver = adapter.driver_connection
    if not driver.is_in_transaction() and not _autocommit(conn):
        await adapter._start_transaction()  # what the adapter runs before its first statement
    return driver


def _autocommit(conn: AsyncConnection) -> bool:
    options = conn.sync_connection.get_execution_options() if conn.sync_connection is not None else {}
    return bool(options.get("isolation_level") == "AUTOCOMMIT")


_REQUIRED = object()


class DriverStatement:
    """A statement compiled once for asyncpg and run on the driver connection itself (PostgreSQL),
    for the few statements of a hot path. It skips what SQLAlchemy does on every execution (cache
    key, parameter and result processing): about 80 µs of CPU a statement, measured on 2 cores,
    where asyncpg's own work is about 50 µs. Parameters get the same type processing as through
    SQLAlchemy; rows are asyncpg records (JSON values decoded by the codecs SQLAlchemy registers).
    Inside `engine.begin()` it runs in that transaction (`driver_connection`)."""

    def __init__(self, statement: ClauseElement) -> None:
        dialect = asyncpg_dialect(json_serializer=json_text)  # type: ignore[no-untyped-call]
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        binds = [compiled.binds[name] for name in compiled.positiontup or ()]
        # A value written into the statement (a LIMIT, say) is its default; the others are required.
        self._params = [
            (bind.key, bind.type.bind_processor(dialect), _REQUIRED if bind.required else bind.value) for bind in binds
        ]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        args = []
        for name, process, default in self._params:
            value = params[name] if default is _REQUIRED or name in params else default
            args.append(value if process is None else process(value))
        return args

    async def fetch(self, conn: AsyncConnection, params: Mapping[str, Any]) -> list[Any]:
        return await self._run(conn, params, "fetch")  # type: ignore[no-any-return]

    async def fetchrow(self, conn: AsyncConnection, params: Mapping[str, Any]) -> Any:
        return await self._run(conn, params, "fetchrow")

    async def execute(self, conn: AsyncConnection, params: Mapping[str, Any]) -> None:
        await self._run(conn, params, "execute")

    async def _run(self, conn: AsyncConnection, params: Mapping[str, Any], method: str) -> Any:
        args = self.args(params)
        try:
            driver = await driver_connection(conn)
            return await getattr(driver, method)(self.sql, *args)
        except Exception as error:
            # The adapter's BEGIN raises its own translation of the driver's error, caused by it.
            cause = error if isinstance(error, _DRIVER_ERRORS) else error.__cause__
            if not isinstance(cause, _DRIVER_ERRORS):
                raise
            lost = connection_lost(cause)
            if lost:  # as SQLAlchemy does on a disconnect: the pool opens a new connection in its place
                await conn.invalidate()
            raise _as_sqlalchemy_error(self.sql, args, cause, invalidated=lost) from error


_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# The driver's errors as SQLAlchemy raises them, so callers catch one kind (`IntegrityError`, ...).
_SQLALCHEMY_ERRORS: tuple[tuple[type[Exception], type[DBAPIError]], ...] = (
    (asyncpg.IntegrityConstraintViolationError, IntegrityError),
    (asyncpg.SyntaxOrAccessError, ProgrammingError),
    (asyncpg.InterfaceError, InterfaceError),
    (asyncpg.PostgresError, DatabaseError),
    (OSError, OperationalError),
)


def _as_sqlalchemy_error(sql: str, args: list[Any], error: Exception, *, invalidated: bool) -> DBAPIError:
    kind = next(sqlalchemy for driver, sqlalchemy in _SQLALCHEMY_ERRORS if isinstance(error, driver))
    return kind(sql, args, error, hide_parameters=True, connection_invalidated=invalidated)


# SQLSTATE classes of a database that cannot serve now and will again: a connection lost or refused
# (08), too few resources (53: too many clients, a full disk), an operator's shutdown or a start-up (57P).
_UNAVAILABLE_STATES = ("08", "53", "57P")


def sqlstate(error: BaseException) -> str:
    """The SQLSTATE of a database error, however wrapped (SQLAlchemy's `orig`, the adapter's
    cause), or ''."""
    seen: BaseException | None = error
    for _ in range(4):  # the wrappings are a few deep
        if seen is None:
            break
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        seen = getattr(seen, "orig", None) or seen.__cause__
    return ""


def database_unavailable(error: BaseException) -> bool:
    """The database refused or lost the connection, or cannot serve for now: worth waiting for."""
    return sqlstate(error).startswith(_UNAVAILABLE_STATES)


def connection_lost(error: BaseException) -> bool:
    """The driver's connection is gone (closed, reset, shut down by the server): not to be used again."""
    if isinstance(error, OSError):
        return True
    if isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error):
        return True
    return sqlstate(error).startswith(("08", "57P"))


class UtcDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that reads back aware UTC times from SQLite as well. SQLite keeps no
    offset, so its times came back naive, and comparing one with an aware time (the clock, a
    request's time) raised TypeError: a lead's second activity, the SLA and recycling timers failed
    under `make run`. PostgreSQL returns aware times already; there the type adds no processing."""

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        return datetime  # keyset cursors restore their times by it (crm_platform.pagination)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name == "sqlite":
            return super().result_processor(dialect, coltype)
        return self.impl_instance.result_processor(dialect, coltype)  # as a TypeDecorator without one


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One database transaction that may write: committed when the block ends, rolled back on an
    exception.

    On SQLite it takes the database's write lock first (BEGIN IMMEDIATE). SQLite ignores FOR UPDATE,
    and its driver only begins at the first write, after the reads a use case decides on: two
    postings could both see the same balance, two creates miss each other's duplicate. With the lock
    first, writing transactions run one at a time there. Reads on other connections go on (WAL);
    a writing transaction must not write on a second connection, which would wait on itself.
    """
    async with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection


_LOCKED_FOR_TRANSACTION = text("SELECT pg_advisory_xact_lock(hashtext(:name))")
_SHARED_FOR_TRANSACTION = text("SELECT pg_advisory_xact_lock_shared(hashtext(:name))")


async def lock_for_transaction(conn: AsyncConnection, name: str, *, shared: bool = False) -> None:
    """Holds `name` until the connection's transaction ends: checks of one thing that rows alone
    cannot lock (a count, a set with no row yet) run one at a time, on any replica; `shared` holders
    run together, and wait for (or hold off) an exclusive one. PostgreSQL's transaction advisory
    lock; SQLite's writing transactions run one at a time anyway (`transaction`)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_SHARED_FOR_TRANSACTION if shared else _LOCKED_FOR_TRANSACTION, {"name": name})


# In the order of the locks themselves (two names may share a hash): two batches sharing names
# take them in one order, and wait on each other instead of deadlocking.
_ALL_LOCKED_FOR_TRANSACTION = text(
    "SELECT count(pg_advisory_xact_lock(lock)) FROM"
    " (SELECT DISTINCT hashtext(name) AS lock FROM unnest(CAST(:names AS text[])) AS name ORDER BY 1) AS locks"
)


async def lock_all_for_transaction(conn: AsyncConnection, names: Iterable[str]) -> None:
    """`lock_for_transaction` for many names in one statement (a batch's keys)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_ALL_LOCKED_FOR_TRANSACTION, {"names": sorted(set(names))})


# The key space of `held_exclusively`: PostgreSQL's two-key advisory locks, apart from the one-key
# locks transactions take (dedupe keys), so a name's hash never meets those.
_HELD_LOCK_SPACE = 0x43524D  # "CRM"
_HELD = text("SELECT pg_advisory_lock(CAST(:space AS int), hashtext(:name))")
_RELEASED = text("SELECT pg_advisory_unlock(CAST(:space AS int), hashtext(:name))")
_held_here: "weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock]" = weakref.WeakValueDictionary()


@asynccontextmanager
async def held_exclusively(engine: AsyncEngine, name: str) -> AsyncIterator[None]:
    """Runs the block while no other holds `name`, on any replica: for work of several transactions
    that two requests must not interleave (two runs of one import part, two conversions of a lead).
    A later caller waits until the block ends. Within a process, waiters queue on a lock of the
    process (one database connection per name, not per waiter); across replicas, on a PostgreSQL
    session advisory lock held on a connection of its own, which the server releases should the
    process die. SQLite deployments are one process: its lock is enough there."""
    key = (id(engine), name)
    local = _held_here.get(key)
    if local is None:
        local = _held_here[key] = asyncio.Lock()
    async with local:
        if engine.dialect.name != "postgresql":
            yield
            return
        params = {"space": _HELD_LOCK_SPACE, "name": name}
        async with engine.connect() as conn:
            try:
                await conn.execute(_HELD, params)
                await conn.commit()  # the lock is the session's: no transaction stays open meanwhile
                yield
                await conn.execute(_RELEASED, params)
                await conn.commit()
            except BaseException:
                # Released or not (an error, a cancellation mid-call), the session goes: the server
                # drops its locks with it, and no pooled connection keeps one.
                await conn.invalidate()
                raise


# Tries each name's lock for the transaction (a try never waits, so the order does not matter):
# those `held_exclusively` holds, on any replica, are not got, and answered.
_TRIED_FOR_TRANSACTION = text(
    "SELECT name FROM unnest(CAST(:names AS text[])) AS name"
    " WHERE NOT pg_try_advisory_xact_lock(CAST(:space AS int), hashtext(name))"
)


async def held_now(conn: AsyncConnection, names: Collection[str]) -> set[str]:
    """Those of `names` that a `held_exclusively` block of `conn`'s engine holds now, told without
    waiting. On PostgreSQL, on any replica; and each name found free is then held by `conn`'s
    transaction until it ends, so no such block begins meanwhile. On SQLite, in this process (a
    SQLite deployment is one process)."""
    if not names:
        return set()
    if conn.dialect.name == "postgresql":
        return set(await conn.scalars(_TRIED_FOR_TRANSACTION, {"names": sorted(names), "space": _HELD_LOCK_SPACE}))
    return {name for name in names if (local := _held_here.get((id(conn.engine), name))) is not None and local.locked()}


async def delete_expired(engine: AsyncEngine, table: Table, stamp: str, *, before: datetime, limit: int) -> int:
    """Deletes up to `limit` rows whose `stamp` column is before `before`; returns how many.
    Replicas running this at once delete each row once."""
    keys = list(table.primary_key.columns)
    expired = select(*keys).where(table.c[stamp] < before).limit(limit)
    async with transaction(engine) as conn:
        result = await conn.execute(delete(table).where(tuple_(*keys).in_(expired)))
    return int(result.rowcount)


async def insert_ignore(conn: AsyncConnection, table: Table, values: dict[str, Any], *, keys: list[str]) -> bool:
    """INSERT ... ON CONFLICT (keys) DO NOTHING; True when the row was new."""
    row = await insert_on_conflict(
        conn,
        table,
        values,
        lambda insert: insert.on_conflict_do_nothing(index_elements=keys).returning(literal_column("1")),
        shape=("do nothing", tuple(keys)),
    )
    return row is not None


async def insert_on_conflict(
    conn: AsyncConnection,
    table: Table,
    values: Mapping[str, Any],
    on_conflict: Callable[[Any], Any],
    *,
    shape: Hashable,
) -> Any:
    """`on_conflict(INSERT INTO table of the values' columns)` (it adds ON CONFLICT, maybe
    RETURNING) executed with `values`; the row it returned, or None. SQLAlchemy compiles a dialect's
    INSERT ... ON CONFLICT again on every execution (it has no cache key): on PostgreSQL this one
    is compiled once per table, columns and `shape`, which names what `on_conflict` adds."""
    names = tuple(values)
    if conn.dialect.name == "postgresql":
        statement = driver_statement(
            (table, names, shape),
            lambda: on_conflict(
                postgresql.insert(table).values({name: bindparam(name, type_=table.c[name].type) for name in names})
            ),
        )
        return await statement.fetchrow(conn, values)
    result = await conn.execute(on_conflict(sqlite.insert(table).values(dict(values))))
    return result.first() if result.returns_rows else None


def driver_statement(shape: Hashable, build: Callable[[], ClauseElement]) -> "DriverStatement":
    """The `DriverStatement` of `build()`, built once per `shape` (what the statement depends on:
    its table object, column names, options)."""
    statement = _DRIVER_STATEMENTS.get(shape)
    if statement is None:
        statement = _DRIVER_STATEMENTS[shape] = DriverStatement(build())
    return statement


_DRIVER_STATEMENTS: dict[Hashable, "DriverStatement"] = {}
