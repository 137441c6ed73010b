"""Signed internal calls. The gateway and the services sign the principal and record scopes they put
in a call's metadata with a secret they share (`CRM_INTERNAL_CALL_SECRET`), and every service
refuses a call whose signature is missing, wrong or stale: without it, anything that reaches a
service's port could claim any user and scope `all`.

The signature, `x-crm-call-signature: <unix seconds>.<hex HMAC-SHA256>`, covers the time, the
method and every principal and scope entry of the metadata (the call's own scope and those sent
along for other resources), so none can be changed, added or dropped, nor the signature moved to
another method; a copied signature is good for `MAX_SKEW_SECONDS` at most.
"""

import hmac
from collections.abc import Iterable, Sequence

SIGNATURE_KEY = "x-crm-call-signature"
# Clocks of two pods may differ by this much either way; a signature older than this is refused.
MAX_SKEW_SECONDS = 300
# What the signature covers: `principal.PRINCIPAL_KEY`, `SCOPE_KEY` and every `resource_scope_key`.
SIGNED_KEY_PREFIXES = ("x-crm-principal", "x-crm-scope")


def _digest(secret: bytes, method: str, timestamp: int, metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    signed = sorted(
        (key, value if isinstance(value, bytes) else value.encode())
        for key, value in metadata
        if key.startswith(SIGNED_KEY_PREFIXES)
    )
    parts = [f"{timestamp}\n{method}\n".encode()]
    for key, value in signed:
        # Keys never hold a newline; a value is length-prefixed, so no two entries read alike.
        parts += (key.encode(), b"\n", len(value).to_bytes(4, "big"), value)
    return hmac.digest(secret, b"".join(parts), "sha256")


def sign(secret: bytes, method: str, metadata: Iterable[tuple[str, str | bytes]], now: float) -> str:
    """The `SIGNATURE_KEY` value for a call of `method` (`/package.Service/Method`) with `metadata`."""
    timestamp = int(now)
    return f"{timestamp}.{_digest(secret, method, timestamp, metadata).hex()}"


def verify(secret: bytes, method: str, metadata: Sequence[tuple[str, str | bytes]], now: float) -> str | None:
    """None when the call's signature holds, else why it does not."""
    signature = next((value for key, value in metadata if key == SIGNATURE_KEY), None)
    if signature is None:
        return f"the call is not signed ({SIGNATURE_KEY} missing)"
    text = signature if isinstance(signature, str) else signature.decode(errors="replace")
    stamp, _, given = text.partition(".")
    try:
        timestamp = int(stamp)
        digest = bytes.fromhex(given)
    except ValueError:
        return f"malformed {SIGNATURE_KEY}"
    if not hmac.compare_digest(digest, _digest(secret, method, timestamp, metadata)):
        return "the signature does not match: another secret, or principal or scope changed after signing"
    age = now - timestamp
    if abs(age) > MAX_SKEW_SECONDS:
        return f"the signature is {age:.0f} s old, beyond ±{MAX_SKEW_SECONDS} s: a replay, or a clock out of sync"
    return None
