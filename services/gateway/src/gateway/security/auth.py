"""Authentication: bearer JWTs (pinned algorithm, iss/aud/exp/nbf checked, keys from JWKS or the
dev-mode shared secret) and API keys for machine principals. Produces a `Principal`."""

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from crm_platform.principal import Principal

from gateway.security.problems import SecurityProblem, unauthenticated
from gateway.security.settings import SecuritySettings

API_KEY_HEADER = "x-api-key"
_REQUIRED_CLAIMS = ["exp", "iss", "aud"]
# Verified tokens remembered at most (a client sends the same token with every request).
MAX_VERIFIED_TOKENS = 10_000
# The services store an owner, a team and a region in at most this many characters: a longer one
# could own nothing it creates, nor be written to the audit trail.
MAX_IDENTITY_CLAIM = 200


class JwksCache:
    """Signing keys from a JWKS URL, cached; an unknown `kid` refetches at most once per interval."""

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        cache_seconds: float = 600.0,
        refetch_min_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._client = client
        self.cache_seconds = cache_seconds
        self.refetch_min_seconds = refetch_min_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    def stale(self) -> bool:
        """Is the key set due for its periodic refetch (the next `key` call does it)?"""
        return self._fetched_at is None or self._clock() - self._fetched_at > self.cache_seconds

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at > self.cache_seconds:
            await self._refresh(force=True)
        found = self._lookup(kid, algorithm)
        if found is None and await self._refresh(force=False):
            found = self._lookup(kid, algorithm)
        if found is None:
            raise unauthenticated("token signed with an unknown key")
        return found

    def _lookup(self, kid: str | None, algorithm: str) -> jwt.PyJWK | None:
        if kid is None:
            # Only unambiguous when the set has exactly one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        key = self._keys.get(kid)
        if key is None or (key.algorithm_name and key.algorithm_name != algorithm):
            return None
        return key

    async def _refresh(self, *, force: bool) -> bool:
        """Fetches the key set; returns False when rate-limited (a recent fetch already happened)."""
        async with self._lock:
            now = self._clock()
            if not force and self._fetched_at is not None and now - self._fetched_at < self.refetch_min_seconds:
                return False
            try:
                client = self._client or httpx.AsyncClient()
                try:
                    response = await client.get(self.url, timeout=self.timeout_seconds)
                finally:
                    if self._client is None:
                        await client.aclose()
                response.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(response.json()).keys
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
                self._fetched_at = now  # do not hammer a failing identity provider
                if not self._keys:
                    raise SecurityProblem(
                        503,
                        "Service Unavailable",
                        f"signing keys unavailable: {type(error).__name__}",
                        headers={"Retry-After": str(int(self.refetch_min_seconds))},
                    ) from error
                return False
            self.fetch_count += 1
            self._fetched_at = now
            self._keys = {key.key_id or f"_{index}": key for index, key in enumerate(keys)}
            return True


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def principal_from_claims(claims: Mapping[str, Any], settings: SecuritySettings) -> Principal:
    subject = _claim(claims, settings.claim_sub)
    if not isinstance(subject, str) or not subject:
        raise unauthenticated(f"token has no {settings.claim_sub!r} claim")
    roles = _claim(claims, settings.claim_roles)
    if isinstance(roles, str):
        roles = roles.replace(",", " ").split()
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise unauthenticated(f"token claim {settings.claim_roles!r} must be a list of role names")

    def text(path: str) -> str:
        value = _claim(claims, path)
        return value if isinstance(value, str) else ""

    principal = Principal(
        user_id=subject,
        roles=tuple(roles),
        team=text(settings.claim_team),
        region=text(settings.claim_region),
        name=text(settings.claim_name),
        kind="user",
    )
    for path, value in ((settings.claim_sub, subject), (settings.claim_team, principal.team),
                        (settings.claim_region, principal.region)):  # fmt: skip
        if len(value) > MAX_IDENTITY_CLAIM:
            raise unauthenticated(f"token claim {path!r} is longer than {MAX_IDENTITY_CLAIM} characters")
    return principal


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    # Wall-clock time from which the token's `exp` (with the leeway) refuses it.
    expires_at: float
    # The JWKS fetch whose keys verified it.
    key_set: int


class JwtVerifier:
    def __init__(
        self, settings: SecuritySettings, jwks: JwksCache | None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.jwks = jwks
        self._clock = clock
        self._verified: dict[str, _Verified] = {}

    async def verify(self, token: str) -> Principal:
        """The token's principal, or 401. A token verified before is taken again without decoding
        it and checking its signature (~70-100 us a request) until it expires, or until the signing
        keys are refetched: then it is verified again, against the new keys."""
        verified = self._verified.get(token)
        if verified is not None and self._still_valid(verified):
            return verified.principal
        principal, expires_at = await self._verify(token)
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            self._forget_expired()
        self._verified[token] = _Verified(principal, expires_at, self._key_set())
        return principal

    def _key_set(self) -> int:
        return self.jwks.fetch_count if self.jwks is not None else 0

    def _still_valid(self, verified: _Verified) -> bool:
        if self._clock() >= verified.expires_at:
            return False
        return self.jwks is None or (verified.key_set == self.jwks.fetch_count and not self.jwks.stale())

    def _forget_expired(self) -> None:
        now = self._clock()
        self._verified = {token: v for token, v in self._verified.items() if now < v.expires_at}
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            self._verified.clear()

    async def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal and when the token stops being accepted (`exp` plus the leeway)."""
        settings = self.settings
        algorithm = settings.algorithm
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise unauthenticated("malformed bearer token") from error
        # Pinned: a token naming another algorithm (none, HS256 with a public key, ...) is refused.
        if header.get("alg") != algorithm:
            raise unauthenticated(f"token algorithm must be {algorithm}")
        key: Any
        if settings.dev_mode:
            key = settings.dev_jwt_secret
        elif self.jwks is not None:
            kid = header.get("kid")
            key = await self.jwks.key(kid if isinstance(kid, str) else None, algorithm)
        else:
            raise unauthenticated("bearer tokens are not accepted: no JWKS URL is configured")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.jwt_leeway_seconds,
                options={"require": _REQUIRED_CLAIMS, "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError as error:
            raise unauthenticated("token expired") from error
        except jwt.ImmatureSignatureError as error:
            raise unauthenticated("token not yet valid") from error
        except jwt.InvalidAudienceError as error:
            raise unauthenticated("token audience is not accepted") from error
        except jwt.InvalidIssuerError as error:
            raise unauthenticated("token issuer is not accepted") from error
        except jwt.MissingRequiredClaimError as error:
            raise unauthenticated(f"token lacks the {error.claim!r} claim") from error
        except jwt.PyJWTError as error:
            raise unauthenticated("token signature or format is invalid") from error
        # `exp` as PyJWT reads it (an integer), so the token stops being taken when PyJWT would refuse it.
        return principal_from_claims(claims, settings), int(claims["exp"]) + settings.jwt_leeway_seconds


ApiKeyLookup = Callable[[str], Awaitable[Principal | None]]


class Authenticator:
    """Turns request headers into a Principal or raises 401."""

    def __init__(self, verifier: JwtVerifier, api_keys: ApiKeyLookup | None = None) -> None:
        self.verifier = verifier
        self.api_keys = api_keys

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        api_key = headers.get(API_KEY_HEADER)
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if not api_key and scheme.lower() == "apikey":
            api_key = credentials.strip()
        if api_key:
            if self.api_keys is None:
                raise unauthenticated("API keys are not accepted")
            principal = await self.api_keys(api_key.strip())
            if principal is None:
                raise unauthenticated("unknown or revoked API key")
            return principal
        if not authorization:
            raise unauthenticated("missing bearer token")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise unauthenticated("authorization must be 'Bearer <token>'")
        return await self.verifier.verify(credentials.strip())
