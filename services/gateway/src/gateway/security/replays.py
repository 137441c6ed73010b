"""The kept answers of writes sent with `Idempotency-Key` whose service takes no key
(`gateway.replays`), in the gateway's database, shared by its replicas."""

from dataclasses import dataclass
from datetime import timedelta

from crm_platform.db import insert_ignore, transaction
from crm_platform.errors import Conflict
from crm_platform.timeutil import utcnow
from fastapi.exceptions import RequestValidationError
from sqlalchemy import and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.security.store import write_replays

# A first request claiming its key longer ago than this, still unanswered, stopped with its gateway.
STALLED_AFTER = timedelta(minutes=2)
IN_PROGRESS = "REQUEST_IN_PROGRESS"
REUSED = "was used for another request; send a new key"


def key_refused(key: str, message: str) -> RequestValidationError:
    """A 422 naming the `Idempotency-Key` header."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("header", "Idempotency-Key"), "msg": message, "input": key}]
    )


@dataclass(frozen=True, slots=True)
class KeptAnswer:
    status_code: int
    headers: dict[str, str]
    body: bytes


class WriteReplays:
    """The kept answers of keyed writes, in the gateway's database (shared by its replicas)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def claim(self, caller: str, route: str, key: str, fingerprint: str) -> KeptAnswer | None:
        """None when this request now holds the key (run it, then `keep` or `release`); the kept
        answer of the same request; else 422 (another request) or 409 (still running)."""
        now = utcnow()
        r = write_replays.c
        row = {
            **{"caller": caller, "route": route, "key": key, "fingerprint": fingerprint, "created_at": now},
            **{"status_code": None, "headers": {}, "body": b""},  # while the first request runs
        }
        async with transaction(self.engine) as conn:
            if await insert_ignore(conn, write_replays, row, keys=["caller", "route", "key"]):
                return None
            named = and_(r.caller == caller, r.route == route, r.key == key)
            kept = (await conn.execute(select(write_replays).where(named))).one()
            if kept.fingerprint != fingerprint:
                raise key_refused(key, REUSED)
            if kept.status_code is not None:
                return KeptAnswer(kept.status_code, dict(kept.headers), bytes(kept.body))
            stalled = await conn.execute(
                update(write_replays)
                .where(named, r.status_code.is_(None), r.created_at < now - STALLED_AFTER)
                .values(created_at=now)
            )
            if stalled.rowcount == 1:
                return None
        raise Conflict(
            "the first request under this Idempotency-Key is still running; retry shortly", reason=IN_PROGRESS
        )

    async def keep(self, caller: str, route: str, key: str, answer: KeptAnswer) -> None:
        r = write_replays.c
        async with transaction(self.engine) as conn:
            await conn.execute(
                update(write_replays)
                .where(r.caller == caller, r.route == route, r.key == key)
                .values(status_code=answer.status_code, headers=answer.headers, body=answer.body)
            )

    async def release(self, caller: str, route: str, key: str) -> None:
        """The first request failed: the key is free for a retry to run again."""
        r = write_replays.c
        async with transaction(self.engine) as conn:
            await conn.execute(delete(write_replays).where(r.caller == caller, r.route == route, r.key == key))
