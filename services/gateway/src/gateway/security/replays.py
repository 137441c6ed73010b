"""The kept answers of writes sent with `Idempotency-Key` whose service takes no key
(`gateway.replays`), in the gateway's database, shared by its replicas."""

import secrets
from dataclasses import dataclass
from datetime import timedelta

from crm_platform.db import insert_ignore, transaction
from crm_platform.errors import Conflict
from crm_platform.timeutil import utcnow
from fastapi.exceptions import RequestValidationError
from sqlalchemy import and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.security.store import write_replays

# A first request claiming its key longer ago than this, still unanswered, stopped with its gateway:
# longer than any request the gateway serves may take (an import part has 10 minutes).
STALLED_AFTER = timedelta(minutes=15)
# Claims that meet a key just released or expired between two statements try again this often.
CLAIM_ATTEMPTS = 3
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


@dataclass(frozen=True, slots=True)
class Claim:
    """A key this request holds; only it keeps its answer or releases it (a request that took over a
    stalled key holds another token: the stalled one, should it end after all, changes nothing)."""

    token: str


class WriteReplays:
    """The kept answers of keyed writes, in the gateway's database (shared by its replicas)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def claim(self, caller: str, route: str, key: str, fingerprint: str) -> KeptAnswer | Claim:
        """The key for this request (run it, then `keep` or `release` its claim), or the kept answer
        of the same request; else 422 (another request) or 409 (still running)."""
        r = write_replays.c
        named = and_(r.caller == caller, r.route == route, r.key == key)
        token = secrets.token_hex(16)
        for _ in range(CLAIM_ATTEMPTS):
            now = utcnow()
            row = {
                **{"caller": caller, "route": route, "key": key, "fingerprint": fingerprint, "created_at": now},
                **{"claim_token": token, "status_code": None, "headers": {}, "body": b""},  # while it runs
            }
            async with transaction(self.engine) as conn:
                if await insert_ignore(conn, write_replays, row, keys=["caller", "route", "key"]):
                    return Claim(token)
                kept = (await conn.execute(select(write_replays).where(named))).first()
                if kept is None:
                    continue  # released or expired since the insert met it: claim it again
                if kept.fingerprint != fingerprint:
                    raise key_refused(key, REUSED)
                if kept.status_code is not None:
                    return KeptAnswer(kept.status_code, dict(kept.headers), bytes(kept.body))
                stalled = await conn.execute(
                    update(write_replays)
                    .where(named, r.status_code.is_(None), r.created_at < now - STALLED_AFTER)
                    .values(created_at=now, claim_token=token)
                )
                if stalled.rowcount == 1:
                    return Claim(token)
            break
        raise Conflict(
            "the first request under this Idempotency-Key is still running; retry shortly", reason=IN_PROGRESS
        )

    async def keep(self, caller: str, route: str, key: str, claim: Claim, answer: KeptAnswer) -> None:
        r = write_replays.c
        async with transaction(self.engine) as conn:
            await conn.execute(
                update(write_replays)
                .where(r.caller == caller, r.route == route, r.key == key, r.claim_token == claim.token)
                .values(status_code=answer.status_code, headers=answer.headers, body=answer.body)
            )

    async def release(self, caller: str, route: str, key: str, claim: Claim) -> None:
        """The first request failed: the key is free for a retry to run again."""
        r = write_replays.c
        held = (r.caller == caller, r.route == route, r.key == key, r.claim_token == claim.token)
        async with transaction(self.engine) as conn:
            await conn.execute(delete(write_replays).where(*held))
