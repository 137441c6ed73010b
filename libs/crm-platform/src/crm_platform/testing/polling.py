"""Waiting in tests for what happens asynchronously (an event consumed, a projection updated)."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    read: Callable[[], Awaitable[T]],
    until: Callable[[T], object] = bool,
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
) -> T:
    """Reads until `until(value)` holds (by default: the value is truthy) or `timeout` seconds have
    passed, and returns the last value read: the caller asserts on it, so a timeout fails showing
    what was there instead of a bare TimeoutError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await read()
    while not until(value) and loop.time() < deadline:
        await asyncio.sleep(interval)
        value = await read()
    return value
