"""aiokafka clients configured from `KafkaSettings` (SASL/TLS for real clusters), with timeouts
around every call that is known to hang while the broker is down."""

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable, Sequence
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


# The events are the record the analytics read models are rebuilt from: kept, never compacted (a
# record's events share its key). Operators who create the topics themselves are told the same.
TOPIC_CONFIG = {"retention.ms": "-1", "cleanup.policy": "delete"}


async def ensure_topics(settings: KafkaSettings, topics: list[str], *, wait_seconds: float = 15.0) -> None:
    """Creates missing topics (local and test brokers), their events kept (`TOPIC_CONFIG`).
    Existing topics are left alone."""
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
                    topic_configs=TOPIC_CONFIG,
                )
                for topic in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica was faster
                await asyncio.wait_for(admin.create_topics(new_topics), wait_seconds)
            log.info("created topics %s", ", ".join(missing))
    finally:
        await stop_quietly(admin)


async def ensure_topics_or_wait(settings: KafkaSettings, topics: list[str]) -> None:
    """`ensure_topics` at a process's start: a broker that is not there yet is logged, not raised;
    the outbox relay and the consumers wait for it."""
    try:
        await ensure_topics(settings, topics)
    except Exception as error:  # noqa: BLE001 - the broker may come later
        log.warning("could not ensure topics %s: %s", topics, error)


_MURMUR2_M = 0x5BD1E995
_WORDS_OF_LENGTH: dict[int, Callable[[bytes], tuple[int, ...]]] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a record key (Java client's `Utils.murmur2`, unsigned), as aiokafka's
    `DefaultPartitioner` computes it, at about twice its speed: the key's 4-byte words are read in
    one call instead of byte by byte. An import publishes thousands of keys a second."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = _WORDS_OF_LENGTH.get(length)
    if words is None:
        words = _WORDS_OF_LENGTH[length] = struct.Struct(f"<{length // 4}I").unpack_from
    for k in words(data):
        k = (k * _MURMUR2_M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _MURMUR2_M) & 0xFFFFFFFF
        h = ((h * _MURMUR2_M) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail:
        end = length - tail
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * _MURMUR2_M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _MURMUR2_M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition of a keyed record among a topic's partitions (sorted), as every Kafka client's
    default partitioner picks it: a key's records always land on one partition, in order."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
