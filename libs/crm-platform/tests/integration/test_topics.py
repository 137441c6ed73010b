"""The topics the CRM creates itself keep their events, uncompacted: they are what the analytics
read models are rebuilt from, and a record's events share its key."""

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from crm_platform.config import KafkaSettings
from crm_platform.kafka import client_options, ensure_topics

pytestmark = pytest.mark.integration


async def test_a_topic_the_crm_creates_keeps_every_event_and_is_never_compacted(kafka_settings: KafkaSettings) -> None:
    topic = f"crm.kept-{uuid.uuid4().hex[:8]}.v1"

    await ensure_topics(kafka_settings, [topic])

    admin = AIOKafkaAdminClient(**client_options(kafka_settings))
    await admin.start()
    try:
        [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [resource] = described.resources
    configs = {entry[0]: entry[1] for entry in resource[4]}
    assert configs["retention.ms"] == "-1" and configs["cleanup.policy"] == "delete"
