"""Identifiers: time-ordered UUIDv7 strings, so primary keys index well and sort by creation."""

import uuid_utils


def new_id() -> str:
    return str(uuid_utils.uuid7())
