"""Checks of what writes answer for the audit trail (`crm_platform.changes.Change`)."""

from collections.abc import Iterable, Mapping
from typing import Any

from crm_platform.changes import Change


def _value(record: Any, name: str) -> Any:
    """A field of a row mapping, a row or a message."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def assert_one_after_another(changes: Iterable[Change[Any]], field: str, *, first: Any, version: int = 1) -> None:
    """Concurrent writes to one record, sorted by the version each made: each write's `previous` is
    exactly the record the write before it made (no change is audited twice or lost), and the first
    one's is the record as it was (`field` == `first`, at `version`)."""
    chain = sorted(changes, key=lambda change: _value(change.record, "version"))
    made = list(range(version + 1, version + 1 + len(chain)))
    assert [_value(change.previous, "version") for change in chain] == [version, *made[:-1]]
    assert [_value(change.record, "version") for change in chain] == made
    assert [_value(change.previous, field) for change in chain] == [
        first,
        *(_value(c.record, field) for c in chain[:-1]),
    ]
