"""Service desk at scale, through the handlers (SQLAlchemy Core) on PostgreSQL: ticket creation with
auto-dispatch, an account's open tickets (the 360 view's call), knowledge-base full-text search
(GIN tsvector), and the SLA timer's throughput with one and with two racing replicas.

Baseline in the same run: reading one ticket by primary key through the same handler layer. Each
latency is also given as a ratio to that baseline.

    .venv/bin/python bench/bench_service_desk.py                 (100,000 tickets, 10,000 articles)
    BENCH_TICKETS=1000000 BENCH_ARTICLES=100000 .venv/bin/python bench/bench_service_desk.py
"""

import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, Principal, acting_as
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from service_desk import handlers
from service_desk.__main__ import MIGRATIONS
from service_desk.handlers import Context, Page
from service_desk.repository import TicketFilter, metadata

TICKETS = int(os.environ.get("BENCH_TICKETS", "100000"))
ARTICLES = int(os.environ.get("BENCH_ARTICLES", "10000"))
QUERIES = int(os.environ.get("BENCH_QUERIES", "300"))
DUE_TICKETS = int(os.environ.get("BENCH_DUE_TICKETS", "5000"))
SEED = 20261123
REGIONS = ["cn-east", "cn-north", "cn-south", "cn-west", "apac", "emea", "amer"]
CATEGORIES = [f"cat-{n:02d}" for n in range(20)]
WORDS = [
    "router",
    "firmware",
    "invoice",
    "refund",
    "password",
    "reset",
    "vpn",
    "printer",
    "battery",
    "screen",
    "login",
    "account",
    "billing",
    "network",
    "cable",
    "driver",
    "update",
    "install",
    "crash",
    "error",
    "timeout",
    "license",
    "upgrade",
    "warranty",
    "delivery",
]
OPEN = "ARRAY['new','assigned','in_progress','waiting_customer','reopened']"


def _array(words: list[str]) -> str:
    return "ARRAY[" + ",".join(f"'{w}'" for w in words) + "]"


async def load(url: str) -> list[str]:
    """Agents (20 per region, 3 skills each), tickets over 5,000 accounts (10 % open), articles of
    60 words from a 20,000-word vocabulary plus 3 support words; returns some account ids."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"SELECT setseed({SEED % 1000} / 1000.0)")
        await connection.execute(
            f"""
            INSERT INTO agents (id, name, skills, region, team, capacity, available, created_at, updated_at, version)
            SELECT 'agent-' || g, 'Agent ' || g,
                   json_build_array(({_array(CATEGORIES)})[1 + g % 20], ({_array(CATEGORIES)})[1 + (g * 7) % 20],
                                    ({_array(CATEGORIES)})[1 + (g * 13) % 20]),
                   ({_array(REGIONS)})[1 + g % {len(REGIONS)}], 'desk', 1000000, true, now(), now(), 1
            FROM generate_series(1, {20 * len(REGIONS)}) AS g
            """
        )
        await connection.execute(
            f"""
            INSERT INTO tickets (id, account_id, contact_id, subject, description, channel, category, priority,
                                 effective_priority, account_tier, status, assignee_id, owner_id, team, region, tags,
                                 custom, escalated, escalation_reason, created_by_id, first_response_due_at,
                                 resolution_due_at, created_at, updated_at, version)
            SELECT lpad(to_hex(g), 8, '0') || '-0000-7000-8000-000000000000', 'acc-' || (g % 5000), '',
                   'ticket ' || g, '', 'web', ({_array(CATEGORIES)})[1 + g % 20], 'normal', 'normal', '',
                   CASE WHEN g % 10 = 0 THEN 'in_progress' ELSE 'closed' END,
                   'agent-' || (1 + g % {20 * len(REGIONS)}), 'agent-' || (1 + g % {20 * len(REGIONS)}), 'desk',
                   ({_array(REGIONS)})[1 + g % {len(REGIONS)}], '[]', '{{}}', false, '', 'bench',
                   now() + interval '1 day', now() + interval '2 days', now() - g * interval '1 second',
                   now() - g * interval '1 second', 1
            FROM generate_series(1, {TICKETS}) AS g
            """
        )
        await connection.execute(
            f"""
            INSERT INTO kb_articles (id, title, body, category, tags, published, author_id, created_at, updated_at,
                                     version)
            SELECT 'kb-' || g,
                   initcap(({_array(WORDS)})[1 + floor(random() * {len(WORDS)})::int]) || ' '
                       || ({_array(WORDS)})[1 + floor(random() * {len(WORDS)})::int] || ' ' || g,
                   (SELECT string_agg('w' || floor(random() * 20000)::int, ' ') FROM generate_series(1, 60 + g * 0))
                       || ' ' || ({_array(WORDS)})[1 + floor(random() * {len(WORDS)})::int],
                   ({_array(CATEGORIES)})[1 + g % 20], '[]', true, 'bench', now(), now(), 1
            FROM generate_series(1, {ARTICLES}) AS g
            """
        )
        await connection.execute("ANALYZE")
        rows = await connection.fetch("SELECT DISTINCT account_id FROM tickets LIMIT 500")
    finally:
        await connection.close()
    return [r["account_id"] for r in rows]


async def measure(name: str, operation: Callable[[int], Awaitable[Any]], runs: int) -> tuple[str, list[float]]:
    print(f"  {name} ...", flush=True)
    for n in range(10):  # warm the pool and the caches
        await operation(n)
    samples = []
    for n in range(runs):
        started = time.perf_counter()
        await operation(n)
        samples.append(time.perf_counter() - started)
    return name, samples


async def concurrent_rate(operation: Callable[[int], Awaitable[Any]], count: int) -> float:
    """Operations per second with `count` of them started at once."""
    started = time.perf_counter()
    await asyncio.gather(*(operation(n) for n in range(count)))
    return count / (time.perf_counter() - started)


async def sla_throughput(url: str, replicas: int) -> tuple[float, int, int]:
    """Makes up to DUE_TICKETS open tickets due for a warning, then drains them with `replicas` timers
    racing (each its own engine); returns tickets/s, the tickets made due and the warnings written."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("DELETE FROM outbox")
        status = await connection.execute(
            f"""
            UPDATE tickets SET first_response_warned_at = NULL, first_response_breached_at = NULL,
                   resolution_warned_at = NULL, resolution_breached_at = NULL, first_responded_at = NULL,
                   created_at = now() - interval '100 minutes', first_response_due_at = now() + interval '20 minutes',
                   resolution_due_at = now() + interval '1 day', next_sla_check_at = now() - interval '1 minute'
            WHERE id IN (SELECT id FROM tickets WHERE status = ANY({OPEN}) ORDER BY id LIMIT {DUE_TICKETS})
            """
        )
        due = int(status.split()[-1])
    finally:
        await connection.close()
    print(f"  SLA timer with {replicas} replica(s) ...", flush=True)
    engines = [create_engine(url) for _ in range(replicas)]
    contexts = [Context(uow=UnitOfWork(engine, metadata, source="/bench")) for engine in engines]

    async def drain(ctx: Context) -> None:
        while await handlers.run_sla_timer(ctx, batch_size=500):
            pass

    started = time.perf_counter()
    with acting_as(Principal(user_id="system", roles=("system",)), ALL_RECORDS):
        await asyncio.gather(*(drain(ctx) for ctx in contexts))
    elapsed = time.perf_counter() - started
    for engine in engines:
        await engine.dispose()
    connection = await asyncpg.connect(url)
    try:
        warnings = await connection.fetchval(
            "SELECT count(*) FROM outbox WHERE type = 'crm.service.ticket.sla_warning'"
        )
    finally:
        await connection.close()
    return due / elapsed, due, int(warnings)


async def main(admin_url: str) -> int:
    url = await infra.create_database(admin_url, prefix="crm_bench_service_desk")
    try:
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, url)
        loaded = time.perf_counter()
        accounts = await load(url)
        print(f"loaded {TICKETS:,} tickets and {ARTICLES:,} articles in {time.perf_counter() - loaded:.1f} s")
        engine = create_engine(url)
        ctx = Context(uow=UnitOfWork(engine, metadata, source="/bench"))
        rng = random.Random(SEED)
        async with engine.connect() as conn:
            ids = [r[0] for r in await conn.exec_driver_sql("SELECT id FROM tickets ORDER BY random() LIMIT 300")]
        open_statuses = ["new", "assigned", "in_progress", "waiting_customer", "reopened"]

        async def by_id(n: int) -> Any:
            return await handlers.get_ticket(ctx, ids[n % len(ids)])

        async def create(n: int) -> Any:
            values = {
                "subject": f"{rng.choice(WORDS)} {rng.choice(WORDS)} broken",
                "channel": "web",
                "category": rng.choice(CATEGORIES),
                "region": rng.choice(REGIONS),
            }
            ticket, _ = await handlers.create_ticket(ctx, values, idempotency_key="")
            assert ticket["assignee_id"], "every ticket should find an agent in this data"
            return ticket

        async def create_queued(n: int) -> Any:
            values = {"subject": f"{rng.choice(WORDS)} issue", "channel": "web", "region": rng.choice(REGIONS)}
            return await handlers.create_ticket(ctx, values, idempotency_key="", skip_dispatch=True)

        async def account_open(n: int) -> Any:
            f = TicketFilter(account_id=accounts[n % len(accounts)], statuses=open_statuses)
            return await handlers.list_tickets(ctx, f, Page(limit=20))

        async def kb_search(n: int) -> Any:
            q = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
            return await handlers.search_articles(ctx, q, category="", limit=10, include_unpublished=False)

        results: list[tuple[str, list[float]]] = []
        with acting_as(Principal(user_id="bench-admin", roles=("admin",)), ALL_RECORDS):
            results.append(await measure("baseline: get ticket by id", by_id, QUERIES))
            results.append(await measure("create, no dispatch (queued)", create_queued, QUERIES))
            results.append(await measure("create + auto-dispatch (20 agents/region)", create, QUERIES))
            results.append(await measure("account's open tickets (360 view)", account_open, QUERIES))
            results.append(await measure("KB full-text search, 2 words", kb_search, QUERIES))
            # 200 concurrent creates over 7 regions: those of one region contend for its agents.
            # The baseline is as many concurrent creates that leave the ticket queued.
            queued_rate = await concurrent_rate(create_queued, 200)
            dispatched_rate = await concurrent_rate(create, 200)
        await engine.dispose()
        one_rate, one_due, one_warnings = await sla_throughput(url, 1)
        two_rate, two_due, two_warnings = await sla_throughput(url, 2)
    finally:
        await infra.drop_database(admin_url, url)

    baseline = summary_ms(results[0][1])
    rows: list[dict[str, object]] = []
    for name, samples in results:
        stats = summary_ms(samples)
        rows.append(
            {
                "operation": name,
                "p50_ms": stats["p50_ms"],
                "p99_ms": stats["p99_ms"],
                "p99_vs_baseline": stats["p99_ms"] / baseline["p99_ms"],
            }
        )
    print_table(f"service desk: {TICKETS:,} tickets, {ARTICLES:,} articles, {QUERIES} runs each", rows)
    print_table(
        "throughput",
        [
            {"what": "baseline: create, no dispatch, 200 concurrent", "per_second": queued_rate, "check": ""},
            {
                "what": "create + dispatch, 200 concurrent",
                "per_second": dispatched_rate,
                "check": f"{dispatched_rate / queued_rate:.2f} x baseline",
            },
            {
                "what": f"SLA timer, 1 replica, {one_due:,} due",
                "per_second": one_rate,
                "check": "one warning each" if one_warnings == one_due else f"{one_warnings} warnings",
            },
            {
                "what": f"SLA timer, 2 replicas racing, {two_due:,} due",
                "per_second": two_rate,
                "check": "one warning each" if two_warnings == two_due else f"{two_warnings} warnings",
            },
        ],
    )
    return 0


if __name__ == "__main__":
    admin = infra.postgres_admin_url()  # blocking probe: before the event loop starts
    if admin is None:
        print("PostgreSQL is required for this benchmark", file=sys.stderr)
        sys.exit(1)
    sys.exit(asyncio.run(main(admin)))
