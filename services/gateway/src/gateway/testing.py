"""Helpers for tests of the gateway (and of code that uses it): edits of the default policy."""

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

# A change to the default policy document before a gateway loads it.
PolicyEdit = Callable[[dict[str, Any]], None]
# `await role_client(role, *edits, upstream="host:port")` (the fixture of the gateway's security tests).
RoleClient = Callable[..., Awaitable[httpx.AsyncClient]]


def grant_fields(role: str, resource: str, **rules: str) -> PolicyEdit:
    """Field rules added to one grant of the default policy."""

    def edit(policy: dict[str, Any]) -> None:
        policy["roles"][role]["grants"][resource].setdefault("fields", {}).update(rules)

    return edit
