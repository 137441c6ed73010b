"""Idempotency keys, shared: a creating call records its key with what it created, so a repeated
call answers with the first result instead of creating again.

One table per service database (`idempotency_keys`, see `idempotency_table`), keyed by the operation,
the caller (the principal's user id; "" where keys are not per caller) and the key. The recorded
result is JSON: an id (`str`) or a small object (`dict`). `CallerKeys` serves the services whose keys
are per caller and whose result is an id.

Two ways to record a key, both inside the caller's transaction, so the key and what it created
commit (or roll back) together:

- `claim`, before creating: INSERT ... ON CONFLICT DO NOTHING. A concurrent first use of the key
  holds the row lock until it commits; the second waits, then gets the first result back and
  creates nothing. When the call ends in something else than it claimed for, `settle` records that.
  The way for every new call site.
- `remember`, after creating, following a `recall` at the start (leads' conversion still works so):
  a plain INSERT. A concurrent duplicate that committed first makes it raise
  `sqlalchemy.exc.IntegrityError`, rolling back everything this transaction created; the caller
  may then `recall` the winner's result.

A key names one request: reused with a different one (a client bug the first result would hide),
it is refused (ValidationFailed naming `idempotency_key`, which the gateway answers as a 422 naming
the `Idempotency-Key` header) and nothing is done, as the IETF Idempotency-Key draft and payment
APIs answer. The gRPC layer takes each keyed request's fingerprint (`request_fingerprint`,
`serving_fingerprint`); `claim` and `remember` record it with the key, and `recall` (so `claim`
finding the key taken) compares it. Keys recorded without one (before revision
`idempotency_fingerprint`, or by a call from no gRPC request) answer any request with their first
result, as before; so are calls that resume what their key began (`RESUMING_METADATA`) answered.
Such a call's keys are not the caller's (`RESUMED_CALLER`): a lead conversion begun by one person
is resumed, or undone, by whoever comes next, and finds what its key made. Its keys carry a nonce
of the saga, so no caller can plant a record under one.

A call may ask only for the result its key already has (`REPLAY_ONLY_METADATA`): the gateway sends a
keyed request so when a check of its own fails now (a record another service owns, merged or out of
reach since) but may have passed for the key's first request. A key used before answers as ever; a
new one is refused (Conflict `NOTHING_TO_REPLAY`) and nothing is done, so the gateway answers its
check's failure.

A repeat gets the answer the key's first request got, byte for byte: the record as it was then,
though it may have changed since (SPEC §3: a repeated key returns the first result). The gRPC layer
keeps each keyed call's answer with the keys it claimed once its transaction committed
(`keep_answer`), and answers a repeat with it (`first_answer`); the handler still finds the key
taken and does nothing again. A key whose first answer was not kept (recorded before revision
`idempotency_answers`, or the statement keeping it failed) answers with the record as it is now.

An answer given with the result a key already had says so: the gRPC layer sends it with the trailing
metadata `REPLAYED_METADATA` (`recall` marks the call it serves, `answered_from_earlier`), so the
gateway audits the repeat as such rather than as a second create.

Keys are kept for a retention period (`ServiceSettings.idempotency_retention_hours`, a day by
default, as payment APIs do): every service runs a job deleting older ones (`ServiceApp`), so the
table holds the keys of the retry window, not every key ever sent.
"""

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from google.protobuf.message import Message
from sqlalchemy import (
    JSON,
    Column,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crm_platform.db import UtcDateTime, insert_ignore, single_statements
from crm_platform.errors import Conflict, CrmError, FieldError, ValidationFailed
from crm_platform.principal import current_principal

log = logging.getLogger(__name__)

TABLE_NAME = "idempotency_keys"

T = TypeVar("T")
# What a call remembers: the id of what it created, or a small JSON object.
Result: TypeAlias = str | dict[str, Any]
# The longest key the table holds (the gateway's Idempotency-Key header allows as many).
KEY_LENGTH = 200
# A fingerprint: a SHA-256 digest in hex.
FINGERPRINT_LENGTH = 64
# gRPC metadata of a call that resumes work its key began, and wants the first result whatever
# the request holds now: a lead conversion's step, retried after its answer was lost, sends the
# lead and the options as they are by then.
RESUMING_METADATA = ("x-crm-idempotency-resume", "1")
REUSED_KEY_MESSAGE = "was used with a different request"
# gRPC metadata of a call that wants only the result its key already has (see the module's doc).
REPLAY_ONLY_METADATA = ("x-crm-idempotency-replay-only", "1")
NOTHING_TO_REPLAY = "NOTHING_TO_REPLAY"
# The `caller` column of the keys of resuming calls: shared by every caller (no user id has an @
# in front).
RESUMED_CALLER = "@resumed"
# gRPC trailing metadata of an answer given with the result its key's earlier request had: nothing
# was done again.
REPLAYED_METADATA = ("x-crm-idempotency-replayed", "1")

_fingerprint: ContextVar[str | None] = ContextVar("crm_request_fingerprint", default=None)
_replay_only: ContextVar[bool] = ContextVar("crm_replay_only", default=False)
_resuming: ContextVar[bool] = ContextVar("crm_resuming", default=False)


class _Answer:
    """Of the call being served: was it answered with an earlier result, and the first request's
    answer if it was kept; which keys it claimed (their rows keep its answer). A mutable cell, so
    that a `recall` or `claim` in a task of the handler's marks it too."""

    __slots__ = ("claimed", "first_reply", "from_earlier")

    def __init__(self) -> None:
        self.from_earlier = False
        self.first_reply: bytes | None = None
        self.claimed: dict[tuple[str, str, str], tuple[AsyncEngine, Table]] = {}


_answer: ContextVar[_Answer | None] = ContextVar("crm_idempotency_answer", default=None)


def request_fingerprint(
    request: Any, method: str, metadata: Sequence[tuple[str, str | bytes]] | None = None
) -> str | None:
    """What tells a keyed request from another: the method and the request without its key. None
    for a request without an `idempotency_key` (so calls without one pay nothing) and for a call
    that resumes what its key began (`RESUMING_METADATA`)."""
    if not isinstance(request, Message) or not getattr(request, "idempotency_key", ""):
        return None
    if RESUMING_METADATA in (metadata or ()):
        return None
    unkeyed = type(request)()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("idempotency_key")
    digest = hashlib.sha256(method.encode())
    digest.update(b"\0")
    digest.update(unkeyed.SerializeToString(deterministic=True))  # deterministic: map entries sorted
    return digest.hexdigest()


@contextmanager
def serving_fingerprint(
    fingerprint: str | None, *, replay_only: bool = False, resuming: bool = False
) -> Iterator[None]:
    """The fingerprint of the request being served, for every key it claims or remembers; whether
    it wants only a result its key already has (`REPLAY_ONLY_METADATA`), and whether it resumes
    what its key began (`RESUMING_METADATA`)."""
    token = _fingerprint.set(fingerprint)
    replay_token = _replay_only.set(replay_only)
    resuming_token = _resuming.set(resuming)
    answer_token = _answer.set(_Answer())
    try:
        yield
    finally:
        _answer.reset(answer_token)
        _resuming.reset(resuming_token)
        _replay_only.reset(replay_token)
        _fingerprint.reset(token)


def answer_from_earlier(first_reply: bytes | None = None) -> None:
    """Marks the call being served as answered with an earlier result (`REPLAYED_METADATA`), where
    no `recall` of a key finds it: an import part sent again under its import key."""
    if (answer := _answer.get()) is not None:
        answer.from_earlier = True
        answer.first_reply = first_reply


def first_answer(reply: T) -> T:
    """The answer of the call being served: the one its key's first request got, where it was kept
    (`keep_answer`), in place of `reply`, which the handler built from the record as it is now
    (SPEC §3: a repeated key returns the first result). Else `reply`: for a key recorded before
    answers were kept, or whose first answer was lost (`keep_answer`)."""
    answer = _answer.get()
    if answer is None or answer.first_reply is None or not isinstance(reply, Message):
        return reply
    kind, _, data = answer.first_reply.partition(b"\0")
    if kind != _kind(reply):  # kept by another method under the same operation: not this answer
        return reply
    return type(reply).FromString(data)


def _kind(reply: Message) -> bytes:
    return reply.DESCRIPTOR.full_name.encode()


async def keep_answer(reply: Any) -> None:
    """Keeps the answer of the call being served with each key it claimed, for `first_answer`. Runs
    once the call's transaction committed, in a statement of its own: should it fail, the work
    stands and only the answer is not kept, and a repeat answers with the record as it is then."""
    answer = _answer.get()
    if answer is None or not answer.claimed or not isinstance(reply, Message):
        return
    data = _kind(reply) + b"\0" + reply.SerializeToString()  # its type first: `first_answer` checks it
    for (operation, caller, key), (engine, table) in answer.claimed.items():
        c = table.c
        kept = update(table).where(c.operation == operation, c.caller == caller, c.key == key).values(answer=data)
        try:
            async with single_statements(engine).connect() as conn:
                await conn.execute(kept)
        except (SQLAlchemyError, OSError) as error:
            log.warning("the answer of %s under key %r was not kept: %s", operation, key, error)


def _note_claimed(conn: AsyncConnection, table: Table, operation: str, caller: str, key: str) -> None:
    """The call being served now holds `key`: `keep_answer` keeps its answer with it."""
    if (answer := _answer.get()) is not None:
        answer.claimed[(operation, caller, key)] = (conn.engine, table)


def answered_from_earlier() -> bool:
    """Did the request being served get the result its key already had (`recall`, so `claim`
    finding the key taken)? The gRPC layer then answers with `REPLAYED_METADATA`."""
    answer = _answer.get()
    return answer is not None and answer.from_earlier


def replayed(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Does an answer's (trailing) metadata say it was given with an earlier result?"""
    return REPLAYED_METADATA in tuple(metadata)


@contextmanager
def serving_request(request: Any, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Iterator[None]:
    """`serving_fingerprint` for a gRPC request as it came, with its metadata."""
    given = tuple(metadata or ())
    with serving_fingerprint(
        request_fingerprint(request, method, metadata),
        replay_only=REPLAY_ONLY_METADATA in given,
        resuming=RESUMING_METADATA in given,
    ):
        yield


def idempotency_table(metadata: MetaData, name: str = TABLE_NAME, *, fingerprinted: bool = True) -> Table:
    """Adds the idempotency key table to a service's metadata (each service's migrations create it).
    `fingerprinted=False`: the table as the revisions that moved to it made it, before fingerprints
    and kept answers."""
    # The request that used a key, and the answer it got (`keep_answer`): added by later revisions.
    later: list[Column[Any]] = [
        Column("fingerprint", String(FINGERPRINT_LENGTH), nullable=True),
        Column("answer", LargeBinary, nullable=True),
    ]
    return Table(
        name,
        metadata,
        Column("operation", String(64), nullable=False),
        Column("caller", String(200), nullable=False, server_default=""),
        Column("key", String(KEY_LENGTH), nullable=False),
        Column("result", JSON, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        *(later if fingerprinted else []),
        PrimaryKeyConstraint("operation", "caller", "key"),
    )


def _checked(key: str) -> str:
    """A key the table can hold: a longer one is the caller's error (422), not the database's (500)."""
    if len(key) > KEY_LENGTH:
        raise ValidationFailed([FieldError("idempotency_key", f"must be at most {KEY_LENGTH} characters")])
    return key


async def recall(conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str) -> Result | None:
    """The result remembered for `key`, or None (always None for an empty key: no idempotency asked).
    Raises ValidationFailed when the key was used with another request than the one being served."""
    if not _checked(key):
        return None
    c = table.c
    stored = (
        await conn.execute(
            select(c.result, c.fingerprint, c.answer).where(c.operation == operation, c.caller == caller, c.key == key)
        )
    ).first()
    if stored is None:
        return None
    current = _fingerprint.get()
    if stored.fingerprint is not None and current is not None and stored.fingerprint != current:
        raise ValidationFailed([FieldError("idempotency_key", REUSED_KEY_MESSAGE)])
    answer_from_earlier(stored.answer)
    return _result(stored.result)


async def claim(
    conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result, now: datetime
) -> Result | None:
    """Records `key` for what this call is about to create. None when the key is now this call's
    (also for an empty key); otherwise the first use's result, and the caller must not create.
    Raises ValidationFailed when the first use was another request (`recall`), and Conflict
    NOTHING_TO_REPLAY when the call wants only an earlier result and there is none."""
    if _replay_only.get() and not key:
        raise _nothing_to_replay()
    if not _checked(key):
        return None
    values = {
        "operation": operation, "caller": caller, "key": key, "result": result, "created_at": now,
        "fingerprint": _fingerprint.get(),
    }  # fmt: skip
    if await insert_ignore(conn, table, values, keys=["operation", "caller", "key"]):
        if _replay_only.get():
            raise _nothing_to_replay()  # the caller's transaction rolls the key back
        _note_claimed(conn, table, operation, caller, key)
        return None
    return await recall(conn, table, operation=operation, caller=caller, key=key)


async def earlier_record(conn: AsyncConnection, table: Table, record_id: str, *, gone: CrmError) -> Row[Any]:
    """The record a key's first request created, read back to answer a repeat of it. Deleted since
    (a ticket, an activity logged by mistake), the repeat answers `gone`, a 404 on what it was for,
    and brings nothing back."""
    row = (await conn.execute(select(table).where(table.c.id == record_id))).first()
    if row is None:
        raise gone
    return row


def _nothing_to_replay() -> Conflict:
    return Conflict("no earlier request under this key to answer again", reason=NOTHING_TO_REPLAY)


async def settle(conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result) -> None:
    """Replaces the result `claim` recorded, in the claiming transaction, when the call ended in
    something else than it claimed for (nothing for an empty key)."""
    if key:
        c = table.c
        await conn.execute(
            update(table).where(c.operation == operation, c.caller == caller, c.key == key).values(result=result)
        )


async def remember(
    conn: AsyncConnection, table: Table, *, operation: str, caller: str, key: str, result: Result, now: datetime
) -> None:
    """Records `key` with what this call created (nothing for an empty key). Raises IntegrityError
    when a concurrent call with the same key committed first."""
    if key:
        await conn.execute(
            insert(table).values(
                operation=operation, caller=caller, key=key, result=result, created_at=now,
                fingerprint=_fingerprint.get(),
            )
        )  # fmt: skip
        _note_claimed(conn, table, operation, caller, key)


@dataclass(frozen=True, slots=True)
class CallerKeys:
    """Keys per calling principal whose result is the id of what the call created (or acted on)."""

    table: Table

    async def claim(self, conn: AsyncConnection, operation: str, key: str, result_id: str, now: datetime) -> str | None:
        """`claim` for the caller, at the start of the transaction, with the id the call will answer
        with: None when the key is now this call's (or empty), else the first call's id, and this
        call must not do the work. A resuming call's key is everyone's (`RESUMED_CALLER`); one its
        first request recorded as its caller's, before keys of resuming calls were shared, still
        answers."""
        caller = current_principal().user_id
        if _resuming.get():
            earlier = await recall(conn, self.table, operation=operation, caller=caller, key=key)
            if earlier is not None:
                return str(earlier)
            caller = RESUMED_CALLER
        earlier = await claim(conn, self.table, operation=operation, caller=caller, key=key, result=result_id, now=now)
        return None if earlier is None else str(earlier)


def _result(stored: Any) -> Result:
    if isinstance(stored, dict):
        return dict(stored)
    return str(stored)
