"""Transactional outbox: events are rows written in the business transaction, and a relay
publishes them to Kafka afterwards — so an event exists exactly when its change committed.

Ordering: the relay publishes a key's rows in insertion order and never overtakes a row of the
same key that is unpublished (locked by another replica or waiting for a retry). A row is deleted
once the broker has acknowledged it (in the pass's transaction): Kafka keeps the events, and a
delete costs the database less than marking the row (no new row version or index entries).
"""

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Delete,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crm_platform import metrics
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import OUTBOX_LINGER_SECONDS, KafkaSettings
from crm_platform.db import DriverStatement, UtcDateTime, insert_from_json, is_postgres, transaction
from crm_platform.errors import FieldError, ValidationFailed
from crm_platform.ids import new_id
from crm_platform.kafka import create_producer, partition_for, stop_quietly
from crm_platform.timeutil import as_utc, utcnow

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "crm_outbox"

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
_SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")


def add_messaging_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Adds the outbox and inbox (processed events) tables to a service's metadata."""
    retrying = and_(Column("published_at").is_(None), Column("next_attempt_at").isnot(None))
    outbox = Table(
        "outbox",
        metadata,
        Column("seq", _SEQ_TYPE, primary_key=True, autoincrement=True),
        Column("id", String(36), nullable=False, unique=True),
        Column("topic", String(200), nullable=False),
        Column("key", String(200), nullable=False),
        Column("type", String(200), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("published_at", UtcDateTime()),
        Column("attempts", Integer, nullable=False, server_default="0"),
        Column("next_attempt_at", UtcDateTime()),
        Column("last_error", Text),
        Index(
            "ix_outbox_pending",
            "seq",
            postgresql_where=Column("published_at").is_(None),
            sqlite_where=Column("published_at").is_(None),
        ),
        Index("ix_outbox_key_pending", "key", "seq", postgresql_where=Column("published_at").is_(None)),
        # The rows that failed at least once, for the claim's check that a row is not behind one
        # waiting out its backoff (`claim_statement`). Rows are deleted once published, so it is
        # normally empty and the check, run on every pass, costs next to nothing.
        Index("ix_outbox_retrying", "key", "seq", postgresql_where=retrying, sqlite_where=retrying),
        # A relay deletes the rows the broker acknowledged; relays before 2026-12 marked them
        # published and kept them a day, and housekeeping deletes those by this index. It holds
        # published rows only, so a pass's claim of pending rows has one index to use,
        # ix_outbox_pending, in seq order. Were pending rows in it too, a planner with stale
        # statistics (after a burst of inserts, as an import makes) fetched every pending row
        # through it and sorted them all, on disk, on every pass.
        Index(
            "ix_outbox_published_at",
            "published_at",
            postgresql_where=Column("published_at").isnot(None),
            sqlite_where=Column("published_at").isnot(None),
        ),
    )
    inbox = Table(
        "processed_events",
        metadata,
        Column("consumer", String(200), nullable=False),
        Column("event_id", String(200), nullable=False),
        Column("processed_at", UtcDateTime(), nullable=False),
        PrimaryKeyConstraint("consumer", "event_id"),
        # The processed-events-expiry job deletes the oldest rows by it (`ServiceApp`).
        Index("ix_processed_events_processed_at", "processed_at"),
    )
    return outbox, inbox


def outbox_table(metadata: MetaData) -> Table:
    return metadata.tables["outbox"]


@dataclass(slots=True)
class PendingEvent:
    message: Message
    key: str
    subject: str
    # The trace the event was published in, which its consumers continue: taken when it is queued,
    # not when the transaction commits, by which time a batch of consumed events has left each
    # event's own span (an ERP's traceparent goes on through the posting it sent).
    trace: Context = field(default_factory=otel_context.get_current)


# Kafka's default limit on a record (message.max.bytes, 1 MiB) less room for its key and headers.
MAX_EVENT_BYTES = 1_000_000


@dataclass(slots=True)
class Transaction:
    """What a handler gets inside a unit of work: the connection and a place to publish events."""

    conn: AsyncConnection
    source: str
    _events: list[PendingEvent] = field(default_factory=list)
    _written: int = 0  # events at the front of _events that the handler wrote itself

    def publish(self, message: Message, *, key: str, subject: str = "") -> None:
        """Queues an event; it is written to the outbox in this transaction, published after commit.
        An event the broker would refuse (`MAX_EVENT_BYTES`) fails the write now, with a 422: in the
        outbox it could never go out, and every later event of its record would wait behind it."""
        spec_of(message)  # fail now, in the handler, if this is not an event message
        size = message.ByteSize()
        if size > MAX_EVENT_BYTES:
            raise ValidationFailed(
                [
                    FieldError(
                        "record", f"is too large to publish: its event has {size} bytes, at most {MAX_EVENT_BYTES}"
                    )
                ]
            )
        self._events.append(PendingEvent(message=message, key=key, subject=subject or key))

    @property
    def events(self) -> list[PendingEvent]:
        return list(self._events)

    def take_outbox_rows(self, now: datetime) -> list[dict[str, Any]]:
        """The outbox rows of the events published so far and not yet taken, for a handler that
        writes them in its own statement (a round trip less on a hot path); the unit of work then
        writes only the events published after this."""
        rows = outbox_rows(self._events[self._written :], source=self.source, now=now)
        self._written = len(self._events)
        return rows

    def untaken_events(self) -> list[PendingEvent]:
        return self._events[self._written :]


# The columns of the rows `outbox_rows` makes.
OUTBOX_ROW_COLUMNS = ("id", "topic", "key", "type", "payload", "headers", "created_at")


def insert_outbox_json(outbox: Table, param: str = "events") -> Insert:
    """INSERT INTO outbox the `outbox_rows` given as one JSON parameter (`db.json_rows`), keeping
    their order in the seqs: for a handler that writes its events in its own statement (PostgreSQL)."""
    return insert_from_json(outbox, param, OUTBOX_ROW_COLUMNS)


def outbox_rows(events: list[PendingEvent], *, source: str, now: datetime) -> list[dict[str, Any]]:
    carriers: dict[int, dict[str, str]] = {}  # one per trace: a request's events share theirs
    rows = []
    for pending in events:
        carrier = carriers.get(id(pending.trace))
        if carrier is None:
            carrier = carriers[id(pending.trace)] = {}
            propagate.inject(carrier, context=pending.trace)  # the trace continues in the consumers
        spec = spec_of(pending.message)
        event_id = new_id()
        headers = CloudEventHeaders(
            id=event_id,
            type=spec.type,
            source=source,
            time=now,
            subject=pending.subject,
            dataschema=spec.schema,
            traceparent=carrier.get("traceparent", ""),
            tracestate=carrier.get("tracestate", ""),
        )
        rows.append(
            {
                "id": event_id,
                "topic": spec.topic,
                "key": pending.key,
                "type": spec.type,
                "payload": pending.message.SerializeToString(),
                "headers": headers.text_pairs(),
                "created_at": now,
            }
        )
    return rows


class UnitOfWork:
    """Runs a use case in one transaction and writes its events to the outbox in that transaction."""

    def __init__(self, engine: AsyncEngine, metadata: MetaData, *, source: str) -> None:
        self.engine = engine
        self.outbox = outbox_table(metadata)
        self.source = source
        self._listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Called after every commit that wrote events (the in-process relay wakes up at once)."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Transaction]:
        async with transaction(self.engine) as conn:
            tx = Transaction(conn=conn, source=self.source)
            yield tx
            if untaken := tx.untaken_events():
                await conn.execute(insert(self.outbox), outbox_rows(untaken, source=self.source, now=utcnow()))
        if tx.events:
            for listener in self._listeners:
                listener()


def backoff_seconds(attempts: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter: attempt 1 waits up to 0.5 s, then 1 s, 2 s, ... 60 s."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempts - 1)))


def claim_statement(outbox: Table, *, limit: int, due_only: bool) -> Select[Any]:
    """One pass's rows, oldest first, each with `held_back`: an older unpublished row of its key is
    outside the pass (claimed by another replica, or waiting out a retry backoff), so it must not
    go now — a key's rows go in order, never overtaking one. On PostgreSQL the rows are locked
    (skipping those another replica holds) until the pass commits. One statement: the `held_back`
    subquery sees what the claim saw.

    With `due_only`, a row behind an older row of its key that waits out a backoff is not claimed
    at all: claimed, it would only be held back, and a key with a backlog behind a failed row would
    fill every pass's `limit` with such rows while the other keys' rows wait. The probe goes
    through ix_outbox_retrying, which holds only rows that failed (normally none)."""
    query = select(
        outbox.c.seq,
        outbox.c.id,
        outbox.c.topic,
        outbox.c.key,
        outbox.c.payload,
        outbox.c.headers,
        outbox.c.created_at,
        outbox.c.attempts,
    ).where(outbox.c.published_at.is_(None))
    if due_only:
        now = bindparam("now", type_=outbox.c.created_at.type)
        retrying = outbox.alias("retrying")
        # OFFSET 0 keeps PostgreSQL from turning the probe into an anti join: planned while few
        # rows backed off, that join read them all and compared each claimed row with every one
        # (measured: 390 ms a pass with 10,000 rows backing off, against 3 ms with a probe per row).
        behind_a_retry = exists(
            select(retrying.c.seq)
            .where(
                retrying.c.published_at.is_(None),
                retrying.c.next_attempt_at > now,
                retrying.c.key == outbox.c.key,
                retrying.c.seq < outbox.c.seq,
            )
            .offset(literal_column("0"))
        )
        query = query.where(
            or_(outbox.c.next_attempt_at.is_(None), outbox.c.next_attempt_at <= now),
            ~behind_a_retry,
        )
    claimed = query.order_by(outbox.c.seq).limit(limit).with_for_update(skip_locked=True).cte("claimed")
    older = outbox.alias("older")
    held_back = exists().where(
        older.c.published_at.is_(None),
        older.c.key == claimed.c.key,
        older.c.seq < claimed.c.seq,
        older.c.seq.not_in(select(claimed.c.seq)),
    )
    return select(claimed, held_back.label("held_back")).order_by(claimed.c.seq)


def publishable(rows: list[Any]) -> list[Any]:
    """The claimed rows that may go now (see `claim_statement`)."""
    return [row for row in rows if not row.held_back]


def delete_published_statement(outbox: Table, postgres: bool) -> Delete:
    """Deletes the rows whose seq is in param `seqs` (the broker acknowledged them). On PostgreSQL as
    `= ANY(array)`: one parameter and one statement text, whatever the pass's size."""
    if postgres:
        seqs = outbox.c.seq == any_(bindparam("seqs", type_=ARRAY(outbox.c.seq.type)))
    else:
        seqs = outbox.c.seq.in_(bindparam("seqs", expanding=True))
    return delete(outbox).where(seqs)


# The relay's statements are prepared once per connection, and after five runs PostgreSQL keeps a
# generic plan made while the outbox was (nearly) empty. For a burst of rows (an import) that plan
# may scan and sort the whole burst for the claim and the delete, or check each claimed row's
# `held_back` by walking every older pending row instead of probing its key: a pass then costs
# seconds of database CPU instead of milliseconds (measured: 2.7 s against 2 ms for 500 of 60,000
# pending rows; in a 60,000-row import, passes of 8 to 170 ms against 3 ms, and the relay fell
# seconds behind). So a pass may use index scans only, and while a burst drains (the last pass
# claimed a full batch) it plans its statements for the outbox as it is. Small passes keep the
# cached plan: planning each one would add about a fifth to the database CPU of a lead create.
_INDEX_SCANS_ONLY = "set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)"
_PASS_PLANNING = text(f"SELECT {_INDEX_SCANS_ONLY}")
_BURST_PASS_PLANNING = text(f"SELECT {_INDEX_SCANS_ONLY}, set_config('plan_cache_mode', 'force_custom_plan', true)")


class _ClaimedRow(NamedTuple):
    """A claimed row as the relay reads it (on PostgreSQL from the driver's record)."""

    seq: int
    id: str
    topic: str
    key: str
    payload: bytes
    headers: list[list[str]]
    created_at: datetime
    attempts: int
    held_back: bool


# What asyncpg reads from a DSN's query (every other name it sends to the server as a setting).
_DSN_OPTIONS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "dbname",
        "database",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslnegotiation",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "passfile",
        "service",
        "krbsrvname",
        "gsslib",
    }
)


def listen_dsn(url: URL) -> str:
    """The engine's URL as a DSN for the relay's own asyncpg LISTEN connection. The engine's query
    holds keywords of asyncpg's connect() and options of SQLAlchemy's dialect: `?ssl=require` is
    `sslmode` in a DSN, and any other name that is not a DSN option is left out, since asyncpg would
    send it to the server as a setting, which refuses the connection. Hosts given in the query (a
    Unix socket, several hosts) are kept; repeated ones are joined, as a DSN lists them."""
    query: dict[str, str] = {}
    for name, value in url.query.items():
        name = "sslmode" if name == "ssl" else name
        if name in _DSN_OPTIONS:
            query[name] = value if isinstance(value, str) else ",".join(value)
    return url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


# A pass that fails (the database does not answer) is retried after a wait doubling from the first
# to the last of these; while passes keep failing, a warning at most this often, not one per pass.
FAILED_PASS_RETRY_SECONDS = (0.1, 5.0)
FAILED_PASS_LOG_SECONDS = 60.0


class OutboxRelay:
    """Publishes outbox rows to Kafka: per-key order, retries with backoff, survives broker outages."""

    def __init__(
        self,
        engine: AsyncEngine,
        metadata: MetaData,
        kafka: KafkaSettings,
        *,
        service: str,
        batch_size: int = 500,
        poll_seconds: float = 0.05,
        linger_seconds: float = OUTBOX_LINGER_SECONDS,
    ) -> None:
        self.engine = engine
        self.outbox = outbox_table(metadata)
        self.kafka = kafka
        self.service = service
        self.batch_size = batch_size
        # PostgreSQL wakes the relay by NOTIFY; the poll is then only a safety net for retries.
        self._fast_poll_seconds = poll_seconds
        self._slow_poll_seconds = max(poll_seconds, 1.0)
        self.poll_seconds = poll_seconds if not is_postgres(engine) else self._slow_poll_seconds
        self.linger_seconds = linger_seconds
        self._last_pass_started = float("-inf")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._producer: Any = None
        self._listen_connection: Any = None
        self._last_housekeeping = 0.0
        self._claim_due = claim_statement(self.outbox, limit=batch_size, due_only=True)
        self._claim_all = claim_statement(self.outbox, limit=batch_size, due_only=False)
        self._delete_published = delete_published_statement(self.outbox, is_postgres(engine))
        if is_postgres(engine):
            # A pass runs on every burst of commits: its statements skip SQLAlchemy's per-execution work.
            self._driver_claim_due = DriverStatement(self._claim_due)
            self._driver_claim_all = DriverStatement(self._claim_all)
            self._driver_delete_published = DriverStatement(self._delete_published)
            self._driver_pass_planning = DriverStatement(_PASS_PLANNING)
            self._driver_burst_pass_planning = DriverStatement(_BURST_PASS_PLANNING)
        self._draining_burst = False  # the last pass claimed a full batch
        self._failed_passes = 0  # in a row
        self._failure_logged_at = 0.0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await self._listen()
        # The relay's own queries are plumbing, not part of any request: no root trace per pass.
        with suppress_instrumentation():
            try:
                while not self._stopping.is_set():
                    # Cleared before the pass, so a commit (or NOTIFY) during the pass is not lost.
                    self._wake.clear()
                    self._last_pass_started = asyncio.get_running_loop().time()
                    try:
                        published = await self.publish_pending()
                    except Exception as error:  # noqa: BLE001 - logged by _pass_failed; the next pass retries
                        self._pass_failed(error)
                        # Waits out the backoff, unless stopped, or woken by a commit: the database
                        # answers again, and what was just written need not wait the rest of it.
                        await _first_of(self._stopping, self._wake, timeout=self._retry_seconds())
                        continue
                    self._pass_succeeded()
                    await self._housekeeping()
                    if published >= self.batch_size:
                        continue  # a full batch: more may be waiting
                    with suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                        await asyncio.sleep(self._linger())
            finally:
                await self._close()

    def _pass_failed(self, error: Exception) -> None:
        """Logs the first failure in a row with its traceback, then a short warning at most every
        `FAILED_PASS_LOG_SECONDS`: an outage must not bury the rest of the log."""
        self._failed_passes += 1
        now = asyncio.get_running_loop().time()
        if self._failed_passes == 1:
            log.error("outbox relay pass failed; retrying with backoff", exc_info=error)
        elif now - self._failure_logged_at >= FAILED_PASS_LOG_SECONDS:
            log.warning("outbox relay passes still failing (%d in a row): %r", self._failed_passes, error)
        else:
            return
        self._failure_logged_at = now

    def _pass_succeeded(self) -> None:
        if self._failed_passes:
            log.info("outbox relay passes succeed again after %d failed", self._failed_passes)
            self._failed_passes = 0

    def _retry_seconds(self) -> float:
        """The wait before retrying a failed pass: doubles with each failure in a row, up to the cap."""
        first, cap = FAILED_PASS_RETRY_SECONDS
        doublings = min(self._failed_passes - 1, 20)  # bounded: a long outage must not overflow the float
        return min(cap, first * 2.0**doublings)

    def _linger(self) -> float:
        """How long a commit that woke the relay waits for its pass: passes start at least
        `linger_seconds` apart. Under load a pass so carries the commits of many requests (one
        transaction and one produce request for them all: a pass per commit cost a tenth of a lead
        create's CPU), while the first commit after a quiet spell is published at once."""
        return max(0.0, self._last_pass_started + self.linger_seconds - asyncio.get_running_loop().time())

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def drain(self, wait_seconds: float) -> int | None:
        """Publishes what is pending (graceful shutdown) in passes started within `wait_seconds`;
        returns the rows left behind, None when the database could not tell (logged)."""
        with suppress_instrumentation():
            try:
                return await self._drain(wait_seconds)
            finally:
                await self._close()

    async def _drain(self, wait_seconds: float) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while loop.time() < deadline:
            try:
                published = await self.publish_pending(ignore_backoff=True)
            except Exception as error:  # noqa: BLE001 - logged by _pass_failed; retried until the deadline
                self._pass_failed(error)
                await asyncio.sleep(min(self._retry_seconds(), max(0.0, deadline - loop.time())))
                continue
            self._pass_succeeded()
            if published == 0:
                break
        try:
            return await self.backlog()
        except Exception as error:  # noqa: BLE001 - shutdown goes on: the next start publishes what is left
            log.warning("outbox: could not count the rows left for the next start: %r", error)
            return None

    async def backlog(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(self.outbox).where(self.outbox.c.published_at.is_(None))
            )
        return int(count or 0)

    async def publish_pending(self, *, ignore_backoff: bool = False) -> int:
        """One pass: claims a batch, publishes it, deletes what the broker acknowledged; the rest wait
        out a backoff."""
        table = self.outbox
        async with self.engine.begin() as conn:
            rows = await self._claim(conn, ignore_backoff)
            rows = publishable(rows)
            if not rows:
                return 0
            sent, failed = await self._send(rows)
            acked_at = utcnow()
            if sent:
                await self._delete(conn, [row.seq for row in sent])
                latency = metrics.OUTBOX_LATENCY.labels(self.service)
                for row in sent:
                    latency.observe((acked_at - as_utc(row.created_at)).total_seconds())
                metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(sent))
            for row, error in failed:
                await conn.execute(
                    update(table)
                    .where(table.c.seq == row.seq)
                    .values(
                        attempts=row.attempts + 1,
                        next_attempt_at=acked_at + timedelta(seconds=backoff_seconds(row.attempts + 1)),
                        last_error=error[:2000],
                    )
                )
            if failed:
                metrics.OUTBOX_FAILURES.labels(self.service).inc(len(failed))
        return len(sent)

    async def _claim(self, conn: AsyncConnection, ignore_backoff: bool) -> list[Any]:
        params = {} if ignore_backoff else {"now": utcnow()}
        if is_postgres(self.engine):
            planning = self._driver_burst_pass_planning if self._draining_burst else self._driver_pass_planning
            await planning.execute(conn, {})  # for the pass's transaction
            statement = self._driver_claim_all if ignore_backoff else self._driver_claim_due
            rows: list[Any] = [_ClaimedRow(*record) for record in await statement.fetch(conn, params)]
        else:
            rows = list(await conn.execute(self._claim_all if ignore_backoff else self._claim_due, params))
        self._draining_burst = len(rows) >= self.batch_size
        return rows

    async def _delete(self, conn: AsyncConnection, seqs: list[int]) -> None:
        if is_postgres(self.engine):
            await self._driver_delete_published.execute(conn, {"seqs": seqs})
        else:
            await conn.execute(self._delete_published, {"seqs": seqs})

    async def _send(self, rows: list[Any]) -> tuple[list[Any], list[tuple[Any, str]]]:
        """(acknowledged rows, failed rows each with its error). Every wait is bounded: a broker that
        hangs fails the batch into the retry backoff instead of holding the relay (or its rows' locks).

        A topic whose partitions the broker does not tell (missing, not authorized, or no answer in
        time) fails its own rows only: the other topics' rows go in the same pass.

        A partition's batches go one after another, each once the broker acknowledged the one
        before: after a batch fails, the later batches of its partition are not sent and wait with
        it, so a key's later event never overtakes an earlier one that has to be retried."""
        sent: list[Any] = []
        errors: dict[int, str] = {}  # why a row was not sent, by seq
        error = ""  # why the others were not: the broker down or hung
        try:
            producer = await self._ensure_producer()
            partitions, unresolved = await self._partitions(producer, {row.topic for row in rows})
            errors.update((row.seq, unresolved[row.topic]) for row in rows if row.topic in unresolved)
            batches = self._pack(producer, [row for row in rows if row.topic in partitions], partitions)

            async def deliver(topic_partition: tuple[str, int], partition_batches: list[tuple[Any, list[Any]]]) -> None:
                for index, (batch, batch_rows) in enumerate(partition_batches):
                    try:
                        await (await producer.send_batch(batch, topic_partition[0], partition=topic_partition[1]))
                    except Exception as failure:  # noqa: BLE001 - this partition's rest waits for a retry
                        reason = _describe(failure)
                        for _, waiting in partition_batches[index:]:
                            errors.update((row.seq, reason) for row in waiting)
                        return
                    sent.extend(batch_rows)

            await asyncio.wait_for(
                asyncio.gather(*(deliver(tp, partition_batches) for tp, partition_batches in batches.items())),
                self.kafka.send_timeout_seconds * 2,
            )
        except Exception as failure:  # noqa: BLE001 - broker down or hung: what is unacknowledged waits
            error = _describe(failure)
        acknowledged = {row.seq for row in sent}
        failed = [(row, errors.get(row.seq, error)) for row in rows if row.seq not in acknowledged]
        if failed:
            await self._reset_producer()
        return sent, failed

    async def _partitions(self, producer: Any, topics: set[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
        """The partitions of each topic the broker tells within the send timeout, and why it did not
        tell those of the others. Asked all at once: a missing topic costs the pass one timeout."""
        ordered = list(topics)
        answers = await asyncio.gather(
            *(asyncio.wait_for(producer.partitions_for(topic), self.kafka.send_timeout_seconds) for topic in ordered),
            return_exceptions=True,
        )
        partitions: dict[str, list[int]] = {}
        unresolved: dict[str, str] = {}
        for topic, answer in zip(ordered, answers, strict=True):
            if isinstance(answer, BaseException):
                unresolved[topic] = _describe(answer)
            else:
                partitions[topic] = sorted(answer)
        return partitions, unresolved

    def _pack(
        self, producer: Any, rows: list[Any], partitions: dict[str, list[int]]
    ) -> dict[tuple[str, int], list[tuple[Any, list[Any]]]]:
        """The rows packed into record batches per topic partition, in seq order: for each partition,
        its batches with the rows each carries.

        A batch per partition costs far less than a `send()` per row (a future, a metadata check and
        a producer span each). Rows carry the traceparent of the request that wrote them, so
        consumers continue that trace."""
        batches: dict[tuple[str, int], list[tuple[Any, list[Any]]]] = {}
        for row in rows:
            key = row.key.encode()
            topic_partition = (row.topic, partition_for(key, partitions[row.topic]))
            headers = [(name, value.encode()) for name, value in row.headers]
            partition_batches = batches.setdefault(topic_partition, [])
            if partition_batches:
                batch, batch_rows = partition_batches[-1]
                if batch.append(key=key, value=row.payload, timestamp=None, headers=headers) is not None:
                    batch_rows.append(row)
                    continue
            batch = producer.create_batch()  # the first of its partition, or the last one is full
            batch.append(key=key, value=row.payload, timestamp=None, headers=headers)  # a first row always fits
            partition_batches.append((batch, [row]))
        return batches

    async def _ensure_producer(self) -> Any:
        if self._producer is None:
            producer = create_producer(self.kafka, client_id=f"{self.service}-outbox")
            try:
                await asyncio.wait_for(producer.start(), self.kafka.send_timeout_seconds)
            except BaseException:
                await stop_quietly(producer)
                raise
            self._producer = producer
        return self._producer

    async def _reset_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_quietly(producer)

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_housekeeping < 5.0:
            return
        self._last_housekeeping = loop.time()
        if self._listen_connection is None:
            await self._listen()
        try:
            async with self.engine.begin() as conn:  # rows that relays before 2026-12 marked instead
                await conn.execute(delete(self.outbox).where(self.outbox.c.published_at.isnot(None)))
            metrics.OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
        except Exception:
            log.exception("outbox housekeeping failed")

    async def _listen(self) -> None:
        """On PostgreSQL, a trigger NOTIFYs on insert so replicas wake without polling delay.
        Until a LISTEN connection stands (and while it is lost) the relay polls quickly."""
        if not is_postgres(self.engine):
            return
        import asyncpg  # only needed on PostgreSQL

        dsn = listen_dsn(self.engine.url)
        try:
            connection = await asyncio.wait_for(asyncpg.connect(dsn), self.kafka.send_timeout_seconds)
            await connection.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
            connection.add_termination_listener(self._lost_listen_connection)
        except Exception:
            log.warning("outbox relay could not LISTEN; polling until it can", exc_info=True)
            self._listen_connection = None
            self.poll_seconds = self._fast_poll_seconds
            return
        self._listen_connection = connection
        self.poll_seconds = self._slow_poll_seconds

    def _lost_listen_connection(self, connection: Any) -> None:
        if connection is not self._listen_connection:
            return  # closed by _close()
        log.warning("outbox relay lost its LISTEN connection; polling until it is back")
        self._listen_connection = None
        self.poll_seconds = self._fast_poll_seconds

    async def _close(self) -> None:
        await self._reset_producer()
        if self._listen_connection is not None:
            connection, self._listen_connection = self._listen_connection, None
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception:
                log.warning("could not close the LISTEN connection", exc_info=True)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    """Returns when one of `events` is set, or after `timeout` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
