"""Waits until the gateway is ready, seeds demo data into an empty system, prints the URL and a
dev token, then stays up (honcho stops the whole stack when any of its processes ends)."""

import asyncio
import os
import signal
import sys
import time

import httpx
from gateway.token_cli import issue_dev_token

from crm_devstack.demo import seed_if_empty

READY_TIMEOUT_SECONDS = 120


async def wait_until_ready(client: httpx.AsyncClient) -> dict[str, str]:
    started = time.monotonic()
    last: dict[str, str] = {}
    while time.monotonic() - started < READY_TIMEOUT_SECONDS:
        try:
            response = await client.get("/readyz")
            last = response.json().get("dependencies", {})
            if response.status_code == 200 and response.json().get("status") == "ready":
                return last
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the gateway was not ready within {READY_TIMEOUT_SECONDS}s: {last}")


async def main() -> None:
    port = os.environ.get("CRM_GATEWAY_PORT", "8080")
    base_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    token = issue_dev_token(
        secret=os.environ["CRM_GATEWAY_DEV_JWT_SECRET"],
        sub="demo-admin",
        name="Demo Admin",
        roles=["admin"],
        team="hq",
        region="cn-east",
        ttl_seconds=7 * 24 * 3600,
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        dependencies = await wait_until_ready(client)
        ready_after = time.monotonic() - started
        client.headers["Authorization"] = f"Bearer {token}"
        seeded = await seed_if_empty(client)
    lines = [
        "",
        "=" * 72,
        f"  CRM is up after {ready_after:.1f}s: {base_url}",
        f"  API docs:  {base_url}/docs",
        f"  services:  {', '.join(f'{name}={status}' for name, status in sorted(dependencies.items()))}",
        f"  demo data: {seeded}",
        '  dev token (admin, 7 days; more with `make token ARGS="--sub u1 --roles sales_rep"`):',
        f"  {token}",
        f"  try: curl -H 'Authorization: Bearer <token>' {base_url}/api/v1/me",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except TimeoutError as error:
        print(f"announce: {error}", file=sys.stderr)
        sys.exit(1)
