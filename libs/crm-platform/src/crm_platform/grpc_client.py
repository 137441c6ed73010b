"""gRPC client channels: one per target per process, a deadline on every call, and retries only
for methods the caller declares idempotent (through the channel's service config)."""

import json
from collections.abc import Iterable
from typing import Any

import grpc


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


class _DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Gives every unary call a deadline when the caller did not set one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self.seconds)
        return await continuation(client_call_details, request)


def create_channel(
    target: str,
    *,
    idempotent_methods: Iterable[tuple[str, str]] = (),
    default_deadline_seconds: float = 10.0,
) -> grpc.aio.Channel:
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(idempotent_methods)),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=[_DefaultDeadline(default_deadline_seconds)])
