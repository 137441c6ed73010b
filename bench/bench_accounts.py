"""Account name search (`q=`) and tag filter at scale, through the accounts handlers (SQLAlchemy Core)
on PostgreSQL: one multicolumn GIN index on the tags array and the name's trigrams (pg_trgm).

Baseline in the same run: reading one account by primary key through the same handler layer.
Each figure is also given as a ratio to that baseline. Target (issue 5): p99 <= 20 ms at 1,000,000.

    .venv/bin/python bench/bench_accounts.py           (100,000 accounts)
    BENCH_ACCOUNTS=1000000 .venv/bin/python bench/bench_accounts.py
"""

import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from accounts import handlers
from accounts.__main__ import MIGRATIONS
from accounts.domain import PoolPolicy
from accounts.handlers import Context
from accounts.repository import AccountFilter, metadata, parse_page
from crm_platform import migrations
from crm_platform.db import create_engine
from crm_platform.outbox import UnitOfWork
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms

ACCOUNTS = int(os.environ.get("BENCH_ACCOUNTS", "100000"))
QUERIES = int(os.environ.get("BENCH_QUERIES", "400"))
SEED = 20261123
SYLLABLES = [
    "zen",
    "tri",
    "bio",
    "qua",
    "lux",
    "nor",
    "vel",
    "cor",
    "dyn",
    "max",
    "pro",
    "sol",
    "ter",
    "vix",
    "amp",
    "bel",
    "cap",
    "del",
    "fin",
    "gal",
    "hex",
    "ion",
    "jet",
    "kin",
    "lum",
    "mod",
    "neo",
    "orb",
]
SECOND = [
    "Holdings",
    "Systems",
    "Foods",
    "Logistics",
    "Labs",
    "Trading",
    "Medical",
    "Energy",
    "Textiles",
    "Motors",
    "Capital",
    "Networks",
    "Retail",
    "Pharma",
    "Robotics",
    "Media",
    "Agri",
    "Steel",
    "Games",
    "Travel",
]
TAGS = [f"tag-{n:03d}" for n in range(200)]
REGIONS = ["cn-east", "cn-north", "cn-south", "cn-west", "apac", "emea", "amer"]
OWNERS = [f"rep-{n:04d}" for n in range(2000)]


def _sql_array(words: list[str]) -> str:
    return "ARRAY[" + ",".join(f"'{w}'" for w in words) + "]"


async def load(url: str, count: int) -> tuple[list[str], list[str]]:
    """Generates `count` accounts inside PostgreSQL (GIN indexes built afterwards, as a backfill would):
    names from 3 random syllables + a business word + a number, 1-3 tags of 200, 2,000 owners."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    syllables = _sql_array(SYLLABLES)
    try:
        await connection.execute("DROP INDEX ix_accounts_tags_name_gin")
        await connection.execute(f"SELECT setseed({SEED % 1000} / 1000.0)")
        await connection.execute(
            f"""
            INSERT INTO accounts (id, name, dedupe_key, region, tier, owner_id, team, tags, custom, created_at,
                                  updated_at)
            SELECT lpad(to_hex(g), 8, '0') || '-0000-7000-8000-000000000000', name, lower(name), region, tier,
                   'rep-' || lpad((g % 2000)::text, 4, '0'), 'east', tags, '{{}}', created, created
            FROM (
                SELECT g,
                       initcap(({syllables})[1 + floor(random() * {len(SYLLABLES)})::int]
                               || ({syllables})[1 + floor(random() * {len(SYLLABLES)})::int]
                               || ({syllables})[1 + floor(random() * {len(SYLLABLES)})::int])
                           || ' ' || ({_sql_array(SECOND)})[1 + floor(random() * {len(SECOND)})::int]
                           || ' ' || g AS name,
                       ({_sql_array(REGIONS)})[1 + floor(random() * {len(REGIONS)})::int] AS region,
                       (ARRAY['A', 'B', 'C', 'D'])[1 + floor(random() * 4)::int] AS tier,
                       (SELECT array_agg(DISTINCT 'tag-' || lpad(floor(random() * 200)::int::text, 3, '0'))
                        FROM generate_series(1, 1 + floor(random() * 3)::int + g * 0)) AS tags,
                       timestamptz '2025-01-01' + g * interval '10 seconds' AS created
                FROM generate_series(1, {count}) AS g
            ) AS generated
            """
        )
        # As migration 0002: one multicolumn GIN index serves tags @>, name ILIKE and both together.
        await connection.execute(
            "CREATE INDEX ix_accounts_tags_name_gin ON accounts USING gin (tags, name gin_trgm_ops)"
        )
        # As after any backfill: vacuum now, so autovacuum does not run into the measurements, and
        # checkpoint, so the load's dirty pages are not written out under them.
        await connection.execute("VACUUM ANALYZE accounts")
        await connection.execute("CHECKPOINT")
        sample = await connection.fetch("SELECT id, name FROM accounts ORDER BY random() LIMIT 400")
    finally:
        await connection.close()
    return [r["id"] for r in sample], [r["name"] for r in sample]


async def measure(operation: Callable[[int], Awaitable[Any]], runs: int) -> list[float]:
    for n in range(20):  # warm the pool and the caches
        await operation(n)
    samples = []
    for n in range(runs):
        started = time.perf_counter()
        await operation(n)
        samples.append(time.perf_counter() - started)
    return samples


async def main(admin_url: str) -> int:
    url = await infra.create_database(admin_url, prefix="crm_bench_accounts")
    try:
        await asyncio.to_thread(migrations.upgrade, Path(MIGRATIONS), url)
        loaded = time.perf_counter()
        ids, names = await load(url, ACCOUNTS)
        print(f"loaded {ACCOUNTS:,} accounts and built the GIN indexes in {time.perf_counter() - loaded:.1f} s")
        engine = create_engine(url)
        ctx = Context(uow=UnitOfWork(engine, metadata, source="/bench"), policy=PoolPolicy())
        rng = random.Random(SEED + 1)
        page = parse_page(50, "", "")
        # A user typing part of one company's name (selective), and one common word (broad).
        typed = [n.split(" ")[0][: rng.randint(5, 9)] + " " + n.split(" ")[1][:3] for n in rng.sample(names, 200)]
        broad = [rng.choice(SECOND) for _ in range(200)]
        picked_ids = rng.sample(ids, 200)
        admin = Principal(user_id="bench-admin", roles=("admin",))
        rep_scope = RecordScope(ScopeKind.OWN, owner_id=OWNERS[7])

        async def by_id(n: int) -> Any:
            return await handlers.get_account(ctx, picked_ids[n % len(picked_ids)])

        async def search(n: int) -> Any:
            return await handlers.list_accounts(ctx, AccountFilter(q=typed[n % len(typed)]), [], page, "", "")

        async def search_broad(n: int) -> Any:
            return await handlers.list_accounts(ctx, AccountFilter(q=broad[n % len(broad)]), [], page, "", "")

        async def tag(n: int) -> Any:
            return await handlers.list_accounts(ctx, AccountFilter(tags=[TAGS[n % len(TAGS)]]), [], page, "", "")

        async def tag_and_search(n: int) -> Any:
            f = AccountFilter(tags=[TAGS[n % len(TAGS)]], q=broad[n % len(broad)])
            return await handlers.list_accounts(ctx, f, [], page, "", "")

        results: list[tuple[str, list[float]]] = []
        with acting_as(admin, ALL_RECORDS):
            results.append(("baseline: get by id", await measure(by_id, QUERIES)))
            results.append(("name search, typed prefix (q)", await measure(search, QUERIES)))
            results.append(("name search, common word (q)", await measure(search_broad, QUERIES)))
            results.append(("tag filter (tag=)", await measure(tag, QUERIES)))
            results.append(("tag + common word", await measure(tag_and_search, QUERIES)))
        with acting_as(Principal(user_id=OWNERS[7], roles=("sales_rep",)), rep_scope):
            results.append(("rep scope + tag filter", await measure(tag, QUERIES)))
        await engine.dispose()
    finally:
        await infra.drop_database(admin_url, url)

    baseline = summary_ms(results[0][1])
    rows: list[dict[str, object]] = []
    for name, samples in results:
        stats = summary_ms(samples)
        rows.append(
            {
                "query": name,
                "p50_ms": stats["p50_ms"],
                "p99_ms": stats["p99_ms"],
                "p99_vs_baseline": stats["p99_ms"] / baseline["p99_ms"],
                "target_p99_20ms": "ok" if stats["p99_ms"] <= 20 else "MISSED",
            }
        )
    print_table(f"accounts: {ACCOUNTS:,} rows, {QUERIES} queries each, page size 50", rows)
    return 0


if __name__ == "__main__":
    admin = infra.postgres_admin_url()  # blocking probe: before the event loop starts
    if admin is None:
        print("PostgreSQL is required for this benchmark", file=sys.stderr)
        sys.exit(1)
    sys.exit(asyncio.run(main(admin)))
