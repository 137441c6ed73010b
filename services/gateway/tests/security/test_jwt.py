"""Authentication: production mode verifies RS256 tokens against a JWKS; every forged, expired or
misaddressed token is a 401. Dev mode accepts HS256 tokens from `crm-token`."""

import base64
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gateway.security.audit import AuditQuery
from gateway.security.auth import JwksCache, JwtVerifier
from gateway.security.problems import SecurityProblem
from gateway.security.settings import SecuritySettings
from gateway.token_cli import issue_dev_token
from gateway.token_cli import main as token_main

pytestmark = pytest.mark.integration

ISSUER = "https://idp.example/realms/crm"
AUDIENCE = "crm-api"
JWKS_URL = "https://idp.example/jwks"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


SIGNING_KEY = _key()
OTHER_KEY = _key()


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


class JwksServer:
    """The identity provider's JWKS endpoint, counting fetches."""

    def __init__(self) -> None:
        self.keys = [_jwk(SIGNING_KEY, "k1")]
        self.fetches = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        return httpx.Response(200, json={"keys": self.keys})


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "name": "Ursula",
        "roles": ["sales_rep"],
        "team": "east",
        "region": "cn-east",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


def rs256(payload: dict[str, Any], key: rsa.RSAPrivateKey = SIGNING_KEY, kid: str | None = "k1") -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm="RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hs256_with_public_key(payload: dict[str, Any]) -> str:
    """The classic key-confusion attack: HMAC keyed with the RSA public key's PEM."""
    pem = SIGNING_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def tampered(payload: dict[str, Any]) -> str:
    token = rs256(payload)
    header, _body, signature = token.split(".")
    forged = b64(json.dumps({**payload, "roles": ["admin"]}).encode())
    return f"{header}.{forged}.{signature}"


@pytest.fixture
def jwks() -> JwksServer:
    return JwksServer()


@pytest.fixture
async def prod_gateway(make_gateway: Any, jwks: JwksServer) -> Any:
    client = httpx.AsyncClient(transport=httpx.MockTransport(jwks.handler))
    gateway = await make_gateway(
        dev_mode=False,
        dev_jwt_secret="",
        jwks_url=JWKS_URL,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_leeway_seconds=0,
        jwks_client=client,
    )
    yield gateway
    await client.aclose()


async def test_valid_rs256_token_is_accepted(prod_gateway: Any) -> None:
    response = await prod_gateway.client.get("/api/v1/me", headers={"Authorization": f"Bearer {rs256(claims())}"})
    assert response.status_code == 200, response.text
    me = response.json()
    assert (me["user_id"], me["roles"], me["team"], me["region"], me["name"]) == (
        "u1",
        ["sales_rep"],
        "east",
        "cn-east",
        "Ursula",
    )


NEGATIVE = {
    "alg_none": lambda: unsigned(claims()),
    "hs256_signed_with_rs256_public_key": lambda: hs256_with_public_key(claims()),
    "wrong_aud": lambda: rs256(claims(aud="someone-else")),
    "wrong_iss": lambda: rs256(claims(iss="https://evil.example")),
    "expired": lambda: rs256(claims(exp=int(time.time()) - 60)),
    "missing_exp": lambda: rs256(claims(exp=None)),
    "not_yet_valid": lambda: rs256(claims(nbf=int(time.time()) + 600)),
    "unknown_kid": lambda: rs256(claims(), key=OTHER_KEY, kid="k-unknown"),
    "known_kid_wrong_key": lambda: rs256(claims(), key=OTHER_KEY, kid="k1"),
    "tampered_signature": lambda: tampered(claims()),
    "garbage": lambda: "not.a.jwt",
    "roles_not_a_list": lambda: rs256(claims(roles={"admin": True})),
    "missing_sub": lambda: rs256(claims(sub=None)),
    # Longer than the services store an owner, a team or a region in.
    "sub_too_long": lambda: rs256(claims(sub="u" * 201)),
    "team_too_long": lambda: rs256(claims(team="t" * 201)),
    "region_too_long": lambda: rs256(claims(region="r" * 201)),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
async def test_bad_tokens_are_401(prod_gateway: Any, case: str) -> None:
    token = NEGATIVE[case]()
    response = await prod_gateway.client.get("/api/v1/fake/leads", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, (case, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    # A denied request is audited.
    rows, _ = await prod_gateway.runtime.audit.query(AuditQuery(action="denied"))
    assert rows and rows[0]["status_code"] == 401 and rows[0]["outcome"] == "denied"


@pytest.mark.parametrize("header", ["", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  "])
async def test_missing_or_malformed_authorization_is_401(prod_gateway: Any, header: str) -> None:
    headers = {"Authorization": header} if header else {}
    response = await prod_gateway.client.get("/api/v1/me", headers=headers)
    assert response.status_code == 401


async def test_unknown_kid_refetches_jwks_once_then_rate_limits(prod_gateway: Any, jwks: JwksServer) -> None:
    good = {"Authorization": f"Bearer {rs256(claims())}"}
    assert (await prod_gateway.client.get("/api/v1/me", headers=good)).status_code == 200
    assert jwks.fetches == 1
    assert (await prod_gateway.client.get("/api/v1/me", headers=good)).status_code == 200
    assert jwks.fetches == 1  # cached
    # The provider rotates in a new key: the first unknown kid refetches (within the rate limit,
    # the cache was filled at start, so no refetch is allowed yet) ...
    jwks.keys.append(_jwk(OTHER_KEY, "k2"))
    rotated = {"Authorization": f"Bearer {rs256(claims(), key=OTHER_KEY, kid='k2')}"}
    for _ in range(5):
        assert (await prod_gateway.client.get("/api/v1/me", headers=rotated)).status_code == 401
    assert jwks.fetches == 1  # unknown kids within the refetch interval never hit the provider


async def test_unknown_kid_refetch_picks_up_rotated_key(jwks: JwksServer) -> None:
    now = [1000.0]
    client = httpx.AsyncClient(transport=httpx.MockTransport(jwks.handler))
    cache = JwksCache(JWKS_URL, client=client, refetch_min_seconds=30, clock=lambda: now[0])
    await cache.key("k1", "RS256")
    assert jwks.fetches == 1
    jwks.keys.append(_jwk(OTHER_KEY, "k2"))
    now[0] += 31
    assert (await cache.key("k2", "RS256")).key_id == "k2"
    assert jwks.fetches == 2
    with pytest.raises(Exception, match="unknown key"):
        await cache.key("k3", "RS256")  # refetch allowed only after 30 s: none happened
    assert jwks.fetches == 2
    await client.aclose()


async def test_dev_mode_accepts_dev_tokens_only(gateway: Any, auth_headers: Any) -> None:
    assert (await gateway.client.get("/api/v1/me", headers=auth_headers("sales_rep"))).status_code == 200
    now = int(time.time())
    forged = [
        issue_dev_token(secret="another-secret-" + "y" * 40, sub="u1", roles=["admin"]),
        jwt.encode({**claims(iss="crm-dev", aud="crm")}, SIGNING_KEY, algorithm="RS256"),
        jwt.encode({**claims(iss="crm-dev", aud="other", exp=now + 60)}, gateway.runtime.settings.dev_jwt_secret),
        jwt.encode({**claims(iss="someone", aud="crm", exp=now + 60)}, gateway.runtime.settings.dev_jwt_secret),
    ]
    for token in forged:
        response = await gateway.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token


class CountingDecode:
    """`jwt.decode`, counting the tokens it decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._decode = jwt.decode
        monkeypatch.setattr(jwt, "decode", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._decode(*args, **kwargs)


async def test_a_verified_token_is_taken_again_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "d" * 40
    now = [time.time()]
    verifier = JwtVerifier(
        SecuritySettings(dev_mode=True, dev_jwt_secret=secret, jwt_leeway_seconds=30), None, clock=lambda: now[0]
    )
    decode = CountingDecode(monkeypatch)
    exp = int(now[0]) + 600
    token = jwt.encode({**claims(iss="crm-dev", aud="crm", exp=exp)}, secret)
    first = await verifier.verify(token)
    assert (first.user_id, first.roles) == ("u1", ("sales_rep",))
    assert await verifier.verify(token) == first
    assert decode.calls == 1
    # Up to `exp` plus the leeway, as PyJWT accepts it; from then on verified again (and refused).
    now[0] = exp + 29.9
    assert await verifier.verify(token) == first
    assert decode.calls == 1
    now[0] = exp + 30
    assert await verifier.verify(token) == first  # the real clock has not reached `exp`: PyJWT takes it
    assert decode.calls == 2
    # Refused tokens are never remembered.
    forged = issue_dev_token(secret="e" * 40, sub="u1", roles=["admin"])
    for _ in range(2):
        with pytest.raises(SecurityProblem):
            await verifier.verify(forged)
    assert decode.calls == 4


async def test_tokens_are_verified_again_when_the_signing_keys_are_refetched(
    jwks: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monotonic = [1000.0]
    client = httpx.AsyncClient(transport=httpx.MockTransport(jwks.handler))
    cache = JwksCache(JWKS_URL, client=client, cache_seconds=600, clock=lambda: monotonic[0])
    settings = SecuritySettings(jwks_url=JWKS_URL, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    verifier = JwtVerifier(settings, cache)
    decode = CountingDecode(monkeypatch)
    token = rs256(claims())
    await verifier.verify(token)
    await verifier.verify(token)
    assert (jwks.fetches, decode.calls) == (1, 1)
    # The provider drops the key; once the key set is due for its refetch, the token is refused.
    jwks.keys = [_jwk(OTHER_KEY, "k2")]
    monotonic[0] += 601
    with pytest.raises(SecurityProblem, match="unknown key"):
        await verifier.verify(token)
    assert jwks.fetches == 2
    await client.aclose()


def test_crm_token_cli_prints_a_verifiable_dev_token(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "s" * 40
    code = token_main(
        ["--sub", "u9", "--roles", "sales_rep,marketing", "--team", "t", "--region", "r", "--secret", secret]
    )
    assert code == 0
    token = capsys.readouterr().out.strip()
    decoded = jwt.decode(token, secret, algorithms=["HS256"], audience="crm", issuer="crm-dev")
    assert decoded["sub"] == "u9" and decoded["roles"] == ["sales_rep", "marketing"]
    assert (decoded["team"], decoded["region"]) == ("t", "r")
    assert decoded["exp"] > decoded["nbf"]


def test_crm_token_cli_uses_the_secret_of_make_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any, tmp_path: Any
) -> None:
    monkeypatch.delenv("CRM_GATEWAY_DEV_JWT_SECRET", raising=False)
    monkeypatch.setenv("CRM_DATA_DIR", str(tmp_path))
    (tmp_path / "dev-jwt-secret").write_text("k" * 48 + "\n")
    assert token_main(["--sub", "u1", "--roles", "admin"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.decode(token, "k" * 48, algorithms=["HS256"], audience="crm", issuer="crm-dev")["sub"] == "u1"


def test_crm_token_cli_refuses_a_short_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any, tmp_path: Any
) -> None:
    monkeypatch.delenv("CRM_GATEWAY_DEV_JWT_SECRET", raising=False)
    monkeypatch.setenv("CRM_DATA_DIR", str(tmp_path))
    assert token_main(["--sub", "u9"]) == 2
    assert "CRM_GATEWAY_DEV_JWT_SECRET" in capsys.readouterr().err
