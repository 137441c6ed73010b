"""The gRPC server every service runs: health checking and reflection from the libraries, and one
interceptor that refuses calls not signed with the internal calls' secret (`call_auth`), sets the
caller's context (and a keyed request's fingerprint), bounds the deadline, maps domain errors, binds
a list's cursors to the list and its filters, answers a repeated key with the first answer it got
(marked `REPLAYED_METADATA`) and counts."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crm_platform import metrics
from crm_platform.call_auth import verify
from crm_platform.errors import CrmError
from crm_platform.grpc_errors import to_status
from crm_platform.idempotency import (
    REPLAYED_METADATA,
    answered_from_earlier,
    first_answer,
    keep_answer,
    serving_request,
)
from crm_platform.pagination import bind_cursor, page_fingerprint, unbind_cursor
from crm_platform.principal import acting_as, context_from_metadata
from crm_platform.telemetry import continued_trace

log = logging.getLogger(__name__)


_PAGE_REQUEST = "crm.common.v1.PageRequest"
# Peers whose refused calls are logged (once each): enough for a cluster's pods, and bounded, so a
# scan from many addresses cannot grow the set or flood the log.
_MAX_LOGGED_PEERS = 1024
_LISTS: dict[Any, bool] = {}  # by message descriptor: whether it asks for a page of a list


def _is_list(request: Any) -> bool:
    """Whether `request` asks for a page of a list (has a `page`; its answer has `page_info`)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return False
    known = _LISTS.get(descriptor)
    if known is None:
        page = descriptor.fields_by_name.get("page")
        known = _LISTS[descriptor] = page is not None and getattr(page.message_type, "full_name", "") == _PAGE_REQUEST
    return known


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, service: str, default_deadline_seconds: float, call_secret: str = "") -> None:
        self.service = service
        self.default_deadline_seconds = default_deadline_seconds
        self._secret = call_secret.encode()
        self._refused_peers: set[str] = set()
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        # A method's handler is the same object on every call: wrap it once, not per call.
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _refusal(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], context: grpc.aio.ServicerContext
    ) -> str | None:
        """Why the call's signature does not hold (None when it does, or when no secret is set);
        logged once per peer address."""
        if not self._secret:
            return None
        reason = verify(self._secret, method, metadata, time.time())
        if reason is not None:
            peer = str(context.peer()).rsplit(":", 1)[0]  # the address without the client's port
            if peer not in self._refused_peers and len(self._refused_peers) < _MAX_LOGGED_PEERS:
                self._refused_peers.add(peer)
                log.warning(
                    "%s refused a call to %s from %s, not logged again for that peer: %s",
                    self.service,
                    method,
                    peer,
                    reason,
                )
        return reason

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.default_deadline_seconds if remaining is None else min(remaining, self.default_deadline_seconds)

    def _wrap_unary(self, behaviour: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = context.invocation_metadata() or ()
            started = time.perf_counter()
            if (refused := self._refusal(method, metadata, context)) is not None:
                self._observe(method, grpc.StatusCode.UNAUTHENTICATED, started)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"internal call refused: {refused}")
            call = context_from_metadata(metadata)
            code = grpc.StatusCode.OK
            try:
                with (
                    acting_as(call.principal, call.scope, call.request_id),
                    serving_request(request, method, metadata),
                    continued_trace(metadata),
                ):
                    fingerprint = page_fingerprint(method, request) if _is_list(request) else ""
                    if fingerprint:
                        request.page.cursor = unbind_cursor(request.page.cursor, fingerprint)
                    async with asyncio.timeout(self._deadline(context)):
                        reply = await behaviour(request, context)
                    if fingerprint and reply.page_info.next_cursor:
                        reply.page_info.next_cursor = bind_cursor(reply.page_info.next_cursor, fingerprint)
                    if answered_from_earlier():
                        reply = first_answer(reply)
                        context.set_trailing_metadata((REPLAYED_METADATA,))
                    else:
                        await keep_answer(reply)
                    return reply
            except CrmError as error:
                status = to_status(error)
                code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, "deadline exceeded")
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method)
                await context.abort(code, "internal error")
            finally:
                self._observe(method, code, started)

        return wrapper

    def _wrap_stream(
        self, behaviour: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata() or ()
            started = time.perf_counter()
            if (refused := self._refusal(method, metadata, context)) is not None:
                self._observe(method, grpc.StatusCode.UNAUTHENTICATED, started)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"internal call refused: {refused}")
            call = context_from_metadata(metadata)
            code = grpc.StatusCode.OK
            try:
                with (
                    acting_as(call.principal, call.scope, call.request_id),
                    serving_request(request, method, metadata),
                    continued_trace(metadata),
                ):
                    async for item in behaviour(request, context):
                        yield item
            except CrmError as error:
                status = to_status(error)
                code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                self._observe(method, code, started)

        return wrapper

    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        name = method.rsplit("/", 1)[-1]
        metrics.RPC_REQUESTS.labels(self.service, name, code.name).inc()
        metrics.RPC_LATENCY.labels(self.service, name).observe(time.perf_counter() - started)


def server_options(max_connection_age_seconds: float, default_deadline_seconds: float) -> list[tuple[str, int]]:
    """Channel options of every service. An aged connection gets GOAWAY and the calls in flight get
    up to one default deadline to finish, so rebalancing never cuts a call short."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(default_deadline_seconds * 1000)),
        ]
    return options


# Readiness: how often the named services' check runs, and how long one may take (the readiness
# probe gives up after 3 s).
READINESS_INTERVAL_SECONDS = 5.0
READINESS_TIMEOUT_SECONDS = 2.0


class GrpcServer:
    """A grpc.aio server with health and reflection; SIGTERM → NOT_SERVING → stop(grace).

    Health: the server ("") is SERVING from start to stop, for liveness. The named services follow
    `readiness` too (a check that raises when the service cannot serve, e.g. its database does not
    answer): NOT_SERVING while it fails takes the pods out of rotation without restarting them.

    Calls must be signed with `call_secret` (`crm_platform.call_auth`), health and reflection
    excepted (probes, grpcurl); empty checks nothing (`ServiceApp` gives `CRM_INTERNAL_CALL_SECRET`)."""

    def __init__(
        self,
        *,
        service: str,
        service_names: list[str],
        register: Callable[[grpc.aio.Server], None],
        default_deadline_seconds: float = 30.0,
        max_connection_age_seconds: float = 0.0,
        readiness: Callable[[], Awaitable[None]] | None = None,
        call_secret: str = "",
    ) -> None:
        self._authenticates_calls = bool(call_secret)
        self.server = grpc.aio.server(
            interceptors=[CallInterceptor(service, default_deadline_seconds, call_secret)],
            options=server_options(max_connection_age_seconds, default_deadline_seconds),
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service = service
        self.service_names = service_names
        self.readiness = readiness
        self.readiness_interval_seconds = READINESS_INTERVAL_SECONDS
        self.readiness_timeout_seconds = READINESS_TIMEOUT_SECONDS
        self._ready: bool | None = None  # unknown until the first check
        self._watch: asyncio.Task[None] | None = None
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )

    async def start(self, host: str, port: int) -> int:
        bound = int(self.server.add_insecure_port(f"{host}:{port}"))
        await self.server.start()
        if not self._authenticates_calls:
            log.warning(
                "%s: internal calls are not authenticated (CRM_INTERNAL_CALL_SECRET is empty): whatever reaches "
                "port %d may call as any user, in any scope",
                self.service,
                bound,
            )
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.readiness is None:
            await self._set_ready(True)
        else:
            await self._set_ready(await self._passes(self.readiness))
            self._watch = asyncio.create_task(self._watch_readiness(self.readiness), name=f"{self.service}-readiness")
        return bound

    async def stop(self, grace: float) -> None:
        if self._watch is not None:  # first, so it cannot report SERVING again while calls drain
            self._watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)

    async def _watch_readiness(self, readiness: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.readiness_interval_seconds)
            await self._set_ready(await self._passes(readiness))

    async def _passes(self, readiness: Callable[[], Awaitable[None]]) -> bool:
        try:
            async with asyncio.timeout(self.readiness_timeout_seconds):
                await readiness()
        except Exception as error:  # noqa: BLE001 - whatever fails, the service cannot serve
            if self._ready is not False:  # logged once per outage, not on every check
                log.warning("%s not ready, its services go NOT_SERVING: %r", self.service, error)
            return False
        return True

    async def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        if ready and self._ready is False:
            log.info("%s ready again, its services SERVING", self.service)
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)
