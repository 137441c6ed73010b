"""Signed internal calls (crm_platform.call_auth): a signature holds for the method, principal and
scopes it was made over, within the allowed clock skew, and for nothing else."""

import pytest
from crm_platform.call_auth import MAX_SKEW_SECONDS, SIGNATURE_KEY, sign, verify
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata, resource_scope_key

pytestmark = pytest.mark.unit

SECRET = b"s" * 48
METHOD = "/crm.accounts.v1.AccountsService/ListContacts"
NOW = 1_750_000_000.0


def rep_call() -> list[tuple[str, str | bytes]]:
    """What the gateway sends for a rep: principal, own scope, the scope on accounts sent along."""
    rep = Principal("rep-1", ("sales_rep",), team="east")
    metadata = list(outgoing_metadata(rep, RecordScope(ScopeKind.OWN, owner_id="rep-1"), "req-1"))
    own_accounts = RecordScope(ScopeKind.OWN, owner_id="rep-1").to_proto().SerializeToString()
    return [*metadata, (resource_scope_key("accounts"), own_accounts)]


def signed(metadata: list[tuple[str, str | bytes]], at: float = NOW) -> list[tuple[str, str | bytes]]:
    return [*metadata, (SIGNATURE_KEY, sign(SECRET, METHOD, metadata, at))]


def test_the_signature_is_the_time_and_a_hex_hmac() -> None:
    stamp, _, digest = sign(SECRET, METHOD, rep_call(), NOW).partition(".")

    assert stamp == "1750000000"
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_a_signed_call_holds_in_any_order_of_its_metadata() -> None:
    metadata = signed(rep_call())

    assert verify(SECRET, METHOD, metadata, NOW) is None
    assert verify(SECRET, METHOD, list(reversed(metadata)), NOW) is None


@pytest.mark.parametrize("skew", [-MAX_SKEW_SECONDS, MAX_SKEW_SECONDS])
def test_a_signature_holds_within_the_clock_skew(skew: int) -> None:
    assert verify(SECRET, METHOD, signed(rep_call()), NOW + skew) is None


@pytest.mark.parametrize("skew", [-MAX_SKEW_SECONDS - 1, MAX_SKEW_SECONDS + 1, 3600])
def test_a_stale_or_future_signature_is_refused(skew: int) -> None:
    reason = verify(SECRET, METHOD, signed(rep_call()), NOW + skew)

    assert reason is not None and "old" in reason


def test_an_unsigned_call_is_refused() -> None:
    reason = verify(SECRET, METHOD, rep_call(), NOW)

    assert reason is not None and SIGNATURE_KEY in reason and "not signed" in reason


def test_a_scope_widened_after_signing_is_refused() -> None:
    metadata = signed(rep_call())
    everything = RecordScope(ScopeKind.ALL).to_proto().SerializeToString()
    forged = [(key, everything if key == "x-crm-scope-bin" else value) for key, value in metadata]

    reason = verify(SECRET, METHOD, forged, NOW)

    assert reason is not None and "does not match" in reason


def test_another_principal_is_refused() -> None:
    admin = Principal("admin", ("admin",)).to_proto().SerializeToString()
    forged = [(key, admin if key == "x-crm-principal-bin" else value) for key, value in signed(rep_call())]

    assert verify(SECRET, METHOD, forged, NOW) is not None


def test_a_scope_added_or_dropped_after_signing_is_refused() -> None:
    metadata = signed(rep_call())
    everything = RecordScope(ScopeKind.ALL).to_proto().SerializeToString()
    added = [*metadata, (resource_scope_key("opportunities"), everything)]
    dropped = [(key, value) for key, value in metadata if key != resource_scope_key("accounts")]

    assert verify(SECRET, METHOD, added, NOW) is not None
    assert verify(SECRET, METHOD, dropped, NOW) is not None


def test_unsigned_metadata_may_change() -> None:
    """The request id, trace context and idempotency flags carry no authority."""
    metadata = [*signed(rep_call()), ("x-crm-idempotency-resume", "1"), ("x-request-id", "another")]

    assert verify(SECRET, METHOD, metadata, NOW) is None


def test_a_signature_holds_for_its_method_and_its_secret_only() -> None:
    metadata = signed(rep_call())

    assert verify(SECRET, "/crm.accounts.v1.AccountsService/DeleteAccount", metadata, NOW) is not None
    assert verify(b"t" * 48, METHOD, metadata, NOW) is not None


@pytest.mark.parametrize("value", ["", "1750000000", "1750000000.zz", "now.00ff", ".", "1750000000.abc"])
def test_a_malformed_signature_is_refused(value: str) -> None:
    assert verify(SECRET, METHOD, [*rep_call(), (SIGNATURE_KEY, value)], NOW) is not None
