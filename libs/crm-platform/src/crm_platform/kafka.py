"""aiokafka clients configured from `KafkaSettings` (SASL/TLS for real clusters), with timeouts
around every call that is known to hang while the broker is down."""

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from crm_platform.config import KafkaSettings

log = logging.getLogger(__name__)


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by producers, consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The brokers' CA (or the system's) and, for mTLS, the client certificate. A file that cannot
    be read or a key that does not match its certificate stops the service at start, naming both."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    except OSError as error:  # ssl.SSLError is one
        files = ", ".join(f"{name}={getattr(settings, name)}" for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
        raise RuntimeError(f"the Kafka TLS files cannot be used ({files}): {error}") from error
    return context


def create_producer(settings: KafkaSettings, *, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=2,
        request_timeout_ms=int(settings.send_timeout_seconds * 1000),
        **client_options(settings),
    )


async def stop_quietly(client: Any, wait_seconds: float = 5.0) -> None:
    """aiokafka's stop() can hang while the broker is unreachable; never let it block shutdown."""
    try:
        # The admin client closes; producers and consumers stop.
        closing = client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop()
        await asyncio.wait_for(closing, wait_seconds)
    except Exception as error:  # noqa: BLE001 - shutting down; nothing else to do with it
        log.warning("kafka client did not stop cleanly: %s", error)


async def ensure_topics(settings: KafkaSettings, topics: list[str], *, wait_seconds: float = 15.0) -> None:
    """Creates missing topics (local and test brokers). Existing topics are left alone."""
    if not settings.create_topics or not topics:
        return
    admin = AIOKafkaAdminClient(request_timeout_ms=int(wait_seconds * 1000), **client_options(settings))
    await asyncio.wait_for(admin.start(), wait_seconds)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), wait_seconds))
        missing = [topic for topic in dict.fromkeys(topics) if topic not in existing]
        if missing:
            new_topics = [
                NewTopic(
                    name=topic,
                    num_partitions=settings.topic_partitions,
                    replication_factor=settings.replication_factor,
                )
                for topic in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica was faster
                await asyncio.wait_for(admin.create_topics(new_topics), wait_seconds)
            log.info("created topics %s", ", ".join(missing))
    finally:
        await stop_quietly(admin)
