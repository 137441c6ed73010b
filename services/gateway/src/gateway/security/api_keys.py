"""API keys for machine principals (ERP integrations, webforms): stored as SHA-256 hashes, shown
in plain text exactly once, at creation."""

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crm_platform.db import transaction
from crm_platform.ids import new_id
from crm_platform.pagination import bind_cursor, keyset_page, list_fingerprint, next_cursor, unbind_cursor
from crm_platform.principal import Principal, RecordScope, ScopeKind
from crm_platform.timeutil import as_utc, utcnow
from sqlalchemy import ColumnElement, false, insert, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.security.store import api_keys

KEY_PREFIX = "crmk_"
_LISTING = list_fingerprint("api_keys", b"")  # what a cursor of the key listing is bound to


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key that named another request (another body) of the same creator."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _in_scope(scope: RecordScope) -> ColumnElement[bool]:
    """The keys a record scope covers: a key is its creator's (`owner`), of the team and region it acts in."""
    match scope.kind:
        case ScopeKind.ALL:
            return true()
        case ScopeKind.OWN:
            return api_keys.c.created_by == scope.owner_id if scope.owner_id else false()
        case ScopeKind.TEAM:
            return api_keys.c.team == scope.team if scope.team else false()
        case ScopeKind.REGION:
            return api_keys.c.region == scope.region if scope.region else false()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    prefix: str
    principal_id: str
    roles: tuple[str, ...]
    team: str
    region: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def principal(self) -> Principal:
        return Principal(
            user_id=self.principal_id,
            roles=self.roles,
            team=self.team,
            region=self.region,
            name=self.name,
            kind="api_key",
        )

    def in_scope(self, scope: RecordScope) -> bool:
        """The in-memory twin of `_in_scope`."""
        return scope.allows(owner_id=self.created_by, team=self.team, region=self.region)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "principal_id": self.principal_id,
            "roles": list(self.roles),
            "team": self.team,
            "region": self.region,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


def _record(row: Mapping[Any, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        principal_id=row["principal_id"],
        roles=tuple(row["roles"] or ()),
        team=row["team"],
        region=row["region"],
        created_by=row["created_by"],
        created_at=as_utc(row["created_at"]),
        expires_at=as_utc(row["expires_at"]) if row["expires_at"] else None,
        revoked_at=as_utc(row["revoked_at"]) if row["revoked_at"] else None,
    )


class ApiKeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        *,
        name: str,
        principal_id: str,
        roles: Sequence[str],
        team: str = "",
        region: str = "",
        created_by: str,
        expires_at: datetime | None = None,
        idempotency_key: str = "",
        request_digest: str = "",
    ) -> tuple[ApiKeyRecord, str | None]:
        """Returns the record and the plain key (never stored). A request repeated under its
        `idempotency_key` (the creator's own) answers with the key it created and no plain key: that
        was shown once; the digest of another request's body under the key is `IdempotencyKeyReused`."""
        key = generate_key()
        row = {
            "id": new_id(),
            "name": name,
            "key_hash": hash_key(key),
            "prefix": key[: len(KEY_PREFIX) + 6],
            "principal_id": principal_id,
            "roles": list(roles),
            "team": team,
            "region": region,
            "created_by": created_by,
            "created_at": utcnow(),
            "expires_at": expires_at,
            "revoked_at": None,
            "idempotency_key": idempotency_key or None,
            "request_digest": request_digest or None,
        }
        try:
            async with transaction(self.engine) as conn:
                if earlier := await self._created_under(conn, created_by, idempotency_key, request_digest):
                    return earlier, None
                await conn.execute(insert(api_keys), [row])
        except IntegrityError:
            if not idempotency_key:
                raise
            async with self.engine.connect() as conn:  # a request under the same key created it meanwhile
                if earlier := await self._created_under(conn, created_by, idempotency_key, request_digest):
                    return earlier, None
            raise
        return _record(row), key

    @staticmethod
    async def _created_under(
        conn: AsyncConnection, created_by: str, idempotency_key: str, request_digest: str
    ) -> ApiKeyRecord | None:
        if not idempotency_key:
            return None
        query = select(api_keys).where(
            api_keys.c.created_by == created_by, api_keys.c.idempotency_key == idempotency_key
        )
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        if row["request_digest"] != request_digest:
            raise IdempotencyKeyReused(idempotency_key)
        return _record(row)

    async def list(self, scope: RecordScope, *, limit: int, cursor: str = "") -> tuple[list[ApiKeyRecord], str]:
        """The keys in `scope` in the order they were created (ids are time-ordered), one page at a
        time: the page and the cursor of the next one ('' after the last)."""
        query = keyset_page(
            select(api_keys).where(_in_scope(scope)), sort_column=api_keys.c.id, id_column=api_keys.c.id,
            descending=False, cursor=unbind_cursor(cursor, _LISTING), limit=limit,
        )  # fmt: skip
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        following = next_cursor(rows, sort_key="id", descending=False, limit=limit)
        return [_record(row._mapping) for row in rows[:limit]], bind_cursor(following, _LISTING)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _record(row._mapping) if row is not None else None

    async def revoke(self, key_id: str) -> ApiKeyRecord | None:
        async with transaction(self.engine) as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _record(row._mapping) if row is not None else None

    async def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for an unknown, revoked or expired key."""
        if not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == digest))).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        record = _record(row._mapping)
        now = utcnow()
        if record.revoked_at is not None or (record.expires_at is not None and record.expires_at <= now):
            return None
        return record.principal()
