"""What a write answers for the caller's audit trail: the record after it, and as it was before it."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Record = TypeVar("Record")
Message = TypeVar("Message")


@dataclass(frozen=True, slots=True)
class Change(Generic[Record]):
    """A record after a write and as it was before it (`previous`): read under the record's row lock
    in the write's transaction, so no other write comes between the two. The record itself when the
    write changed nothing; None for an answer repeating an Idempotency-Key's earlier result (nothing
    was changed then)."""

    record: Record
    previous: Record | None


def previous_message(to_message: Callable[[Record], Message], previous: Record | None) -> Message | None:
    """`previous` as a response's `previous` field: unset (None) when there is none."""
    return to_message(previous) if previous is not None else None
