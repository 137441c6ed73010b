"""gRPC client channels: one per target per process, a deadline on every call, calls signed with the
internal calls' secret (`call_auth`), and retries only for methods the caller declares idempotent
(through the channel's service config). Within `noting_replays`, the keyed calls a service answered
with their key's earlier result are noted."""

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import grpc

from crm_platform.call_auth import SIGNATURE_KEY, sign
from crm_platform.idempotency import replayed


class _Replays:
    """Of the innermost `noting_replays`: was a keyed call answered with an earlier result? A mutable
    cell, shared with the tasks the interceptors run in (they get a copy of the caller's context)."""

    __slots__ = ("noted",)

    def __init__(self) -> None:
        self.noted = False


_replays: ContextVar[_Replays | None] = ContextVar("crm_noted_replays", default=None)


def retry_service_config(idempotent_methods: Iterable[tuple[str, str]]) -> str:
    """Service config retrying UNAVAILABLE for the given (service, method) pairs only."""
    names = [{"service": service, "method": method} for service, method in idempotent_methods]
    config: dict[str, Any] = {"methodConfig": []}
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


def _signed(client_call_details: Any, secret: bytes) -> Any:
    """The call's details with its metadata signed (`call_auth.SIGNATURE_KEY`)."""
    metadata = tuple(client_call_details.metadata or ())
    method = client_call_details.method
    signature = sign(secret, method if isinstance(method, str) else method.decode(), metadata, time.time())
    return client_call_details._replace(metadata=grpc.aio.Metadata(*metadata, (SIGNATURE_KEY, signature)))


class _DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Gives every unary call a deadline when the caller did not set one, and signs it when the
    channel has a secret (one interceptor for both, as each interceptor adds a step to every call)."""

    def __init__(self, seconds: float, secret: bytes) -> None:
        self.seconds = seconds
        self.secret = secret

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self.seconds)
        if self.secret:
            client_call_details = _signed(client_call_details, self.secret)
        return await continuation(client_call_details, request)


class _SignStreams(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Signs a client-streaming call (a lead import part). There are no server-streaming calls to
    sign: one added later is refused unsigned by the services, and needs its own interceptor here."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_signed(client_call_details, self.secret), request_iterator)


class _NoteReplays(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Notes a keyed call answered with its key's earlier result (`REPLAYED_METADATA`) for
    `noting_replays`. Calls without an `idempotency_key`, or made while nothing notes, pass by."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        # Interceptors run in a task of their own: the list is shared with the caller's context.
        replays = _replays.get()
        keyed = bool(getattr(request, "idempotency_key", ""))
        if replays is not None and keyed and replayed(await call.trailing_metadata()):
            replays.noted = True
        return call


class _NoteStreamReplays(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """`_NoteReplays` for a client-streaming call (an import part): its key travels in the stream's
    first message, and a service marks only a call its key answered with the earlier result."""

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        call = await continuation(client_call_details, request_iterator)
        replays = _replays.get()
        if replays is not None and replayed(await call.trailing_metadata()):
            replays.noted = True
        return call


@contextmanager
def noting_replays() -> Iterator[None]:
    """Notes whether a keyed call made in this context (tasks started in it included) was answered
    by its service with the result its Idempotency-Key already had (`replay_noted`)."""
    token = _replays.set(_Replays())
    try:
        yield
    finally:
        _replays.reset(token)


def note_replay() -> None:
    """Notes, for the innermost `noting_replays`, a keyed write answered with its earlier result by
    the caller itself (the gateway's own records: API keys)."""
    replays = _replays.get()
    if replays is not None:
        replays.noted = True


def replay_noted() -> bool:
    """Did the innermost `noting_replays` note an answer given with an earlier result? (False
    outside one.) One keyed write per request: the gateway's routes make no second."""
    replays = _replays.get()
    return replays is not None and replays.noted


def create_channel(
    target: str,
    *,
    idempotent_methods: Iterable[tuple[str, str]] = (),
    default_deadline_seconds: float = 10.0,
    call_secret: str = "",
) -> grpc.aio.Channel:
    """A channel to `target` whose calls are signed with `call_secret` (`CRM_INTERNAL_CALL_SECRET`);
    empty signs nothing, for services that check nothing either."""
    secret = call_secret.encode()
    interceptors: list[Any] = [_DefaultDeadline(default_deadline_seconds, secret), _NoteReplays(), _NoteStreamReplays()]
    if secret:
        interceptors.append(_SignStreams(secret))
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(idempotent_methods)),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
