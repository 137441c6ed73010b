"""Sales: forecast latency over many opportunities, and payment posting throughput through the
ERP inbound topic, on PostgreSQL and a local broker.

1. Forecast (SQL aggregation, Decimal results) over BENCH_SALES_OPPORTUNITIES opportunities
   (default 100,000, the issue's size), several shapes: company-wide by owner per month, by team
   per quarter, one rep's own deals, one team. Baseline in the same run: reading one opportunity
   by primary key through the same handler layer; each figure is also a ratio to it.
2. Payment postings (BENCH_SALES_PAYMENTS, default 2,000; 10 % of them sent twice, as ERP retries)
   on `erp.payments.v1`, consumed by the running service (idempotent consumer, contract row lock,
   allocation, outbox event). Baseline in the same run: the same bookings through the handler
   directly, without Kafka.

    .venv/bin/python bench/bench_sales.py
    BENCH_SALES_PAYMENTS=20000 .venv/bin/python bench/bench_sales.py
"""

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from crm.common.v1 import common_pb2
from crm.erp.v1 import payments_pb2
from crm_platform.cloudevents import CloudEventHeaders, spec_of
from crm_platform.config import KafkaSettings
from crm_platform.ids import new_id
from crm_platform.kafka import ensure_topics
from crm_platform.money import Money
from crm_platform.principal import ALL_RECORDS, Principal, RecordScope, ScopeKind, acting_as
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from crm_platform.timeutil import utcnow
from sales import domain as d
from sales.__main__ import build
from sales.config import SalesSettings
from sales.handlers import ForecastQuery, SalesHandlers
from sales.repository import contracts, installments, payment_plans, payments
from sales.testing import make_handlers, migrated_engine
from sqlalchemy import func, insert, select

OPPORTUNITIES = int(os.environ.get("BENCH_SALES_OPPORTUNITIES", "100000"))
PAYMENTS = int(os.environ.get("BENCH_SALES_PAYMENTS", "2000"))
QUERIES = int(os.environ.get("BENCH_SALES_QUERIES", "200"))
SEED = 20261123
OWNERS = [f"rep-{n:03d}" for n in range(300)]
TEAMS = [f"team-{n:02d}" for n in range(20)]
STAGES = [s for s in d.DEFAULT_STAGES if s.outcome is d.Outcome.OPEN]
ADMIN = Principal(user_id="bench-admin", roles=("admin",))


async def load_opportunities(url: str, count: int) -> list[str]:
    """COPY `count` deals (70 % open across the stages, 20 % won, 10 % lost) over two years."""
    rng = random.Random(SEED)
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    ids: list[str] = []
    columns = [
        "id", "account_id", "name", "pipeline_id", "stage", "probability_bp", "amount", "currency",
        "expected_close_date", "close_date", "forecast_month", "forecast_category", "owner_id", "team", "region",
        "status", "line_items", "stage_history", "tags", "custom", "created_at", "updated_at", "version",
    ]  # fmt: skip
    try:
        batch: list[tuple[Any, ...]] = []
        now = datetime(2026, 11, 23, tzinfo=UTC)
        for n in range(count):
            opportunity_id = new_id()
            owner = rng.randrange(len(OWNERS))
            roll = rng.random()
            day = date(2026, 1, 1) + timedelta(days=rng.randrange(730))
            amount = Decimal(rng.randrange(1_000, 5_000_000)) / 100
            if roll < 0.7:
                stage, status, close = rng.choice(STAGES), "open", None
            elif roll < 0.9:
                stage, status, close = d.DEFAULT_STAGES[-2], "won", day
            else:
                stage, status, close = d.DEFAULT_STAGES[-1], "lost", day
            category = rng.choice(["", "", "", "commit", "best_case", "omitted"]) if status == "open" else ""
            batch.append(
                (
                    opportunity_id,
                    f"acc-{rng.randrange(50_000)}",
                    f"Deal {n}",
                    "default",
                    stage.key,
                    int(stage.probability * 100),
                    amount,
                    "CNY",
                    day if status == "open" else None,
                    close,
                    d.month_key(day),
                    category,
                    OWNERS[owner],
                    TEAMS[owner % len(TEAMS)],
                    "cn-east",
                    status,
                    "[]",
                    json.dumps([{"stage": stage.key, "entered_at": now.isoformat(), "exited_at": ""}]),
                    "[]",
                    "{}",
                    now,
                    now,
                    1,
                )
            )
            ids.append(opportunity_id)
            if len(batch) == 50_000:
                await connection.copy_records_to_table("opportunities", records=batch, columns=columns)
                batch = []
        if batch:
            await connection.copy_records_to_table("opportunities", records=batch, columns=columns)
        # As autovacuum would: the visibility map lets the forecast use index-only scans.
        await connection.execute("VACUUM ANALYZE opportunities")
    finally:
        await connection.close()
    return ids


async def measure(operation: Callable[[int], Awaitable[Any]], runs: int) -> list[float]:
    for n in range(10):  # warm the pool and the caches
        await operation(n)
    samples = []
    for n in range(runs):
        started = time.perf_counter()
        await operation(n)
        samples.append(time.perf_counter() - started)
    return samples


async def forecast_bench(sales: SalesHandlers, ids: list[str]) -> list[dict[str, object]]:
    rng = random.Random(SEED + 1)
    picked = rng.sample(ids, min(200, len(ids)))
    year = ForecastQuery(from_date=date(2026, 1, 1), to_date=date(2026, 12, 31))

    async def by_id(n: int) -> Any:
        with acting_as(ADMIN, ALL_RECORDS):
            return await sales.get_opportunity(picked[n % len(picked)])

    async def company_by_owner(n: int) -> Any:
        with acting_as(ADMIN, ALL_RECORDS):
            return await sales.forecast(year)

    async def company_by_team_quarter(n: int) -> Any:
        with acting_as(ADMIN, ALL_RECORDS):
            return await sales.forecast(ForecastQuery(quarter=True, by_team=True))

    async def own(n: int) -> Any:
        owner = OWNERS[n % len(OWNERS)]
        with acting_as(Principal(user_id=owner, roles=("sales_rep",)), RecordScope(ScopeKind.OWN, owner_id=owner)):
            return await sales.forecast(ForecastQuery())

    async def team(n: int) -> Any:
        name = TEAMS[n % len(TEAMS)]
        with acting_as(
            Principal(user_id="mgr", roles=("sales_manager",), team=name), RecordScope(ScopeKind.TEAM, team=name)
        ):
            return await sales.forecast(ForecastQuery(quarter=True))

    baseline = summary_ms(await measure(by_id, QUERIES))
    rows: list[dict[str, object]] = [
        {"operation": "get opportunity by id (baseline)", **baseline, "p99 / baseline": 1.0}
    ]
    for label, operation in (
        ("forecast: all, by owner, month, 1 year", company_by_owner),
        ("forecast: all, by team, quarter, all time", company_by_team_quarter),
        ("forecast: one rep's own deals", own),
        ("forecast: one team, quarter", team),
    ):
        figures = summary_ms(await measure(operation, max(20, QUERIES // 4)))
        rows.append({"operation": label, **figures, "p99 / baseline": figures["p99_ms"] / baseline["p99_ms"]})
    return rows


async def signed_contracts(sales: SalesHandlers, count: int) -> list[str]:
    """Signed contracts of 1,000,000.00 each with a 12-installment plan, written directly."""
    now = utcnow()
    ids = [new_id() for _ in range(count)]
    async with sales.uow.begin() as tx:
        await tx.conn.execute(
            insert(contracts),
            [
                {
                    "id": contract_id,
                    "number": f"CT-BENCH-{n:06d}",
                    "opportunity_id": "",
                    "account_id": f"acc-{n}",
                    "title": "bench",
                    "amount": Decimal(1_000_000),
                    "currency": "CNY",
                    "paid_amount": Decimal(0),
                    "invoiced_amount": Decimal(0),
                    "status": "signed",
                    "approval_chain": ["sales_manager"],
                    "approval_round": 1,
                    "owner_id": "rep",
                    "team": "east",
                    "region": "cn-east",
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                }
                for n, contract_id in enumerate(ids)
            ],
        )
        plans = [{"id": new_id(), "contract_id": c, "total": Decimal(1_000_000), "currency": "CNY", "created_at": now}
                 for c in ids]  # fmt: skip
        await tx.conn.execute(insert(payment_plans), plans)
        await tx.conn.execute(
            insert(installments),
            [
                {
                    "id": new_id(),
                    "plan_id": plan["id"],
                    "contract_id": plan["contract_id"],
                    "sequence": k,
                    "due_date": date(2027, k, 1),
                    "amount": Decimal("83333.33") if k < 12 else Decimal("83333.37"),
                    "paid": Decimal(0),
                    "currency": "CNY",
                    "status": "pending",
                }
                for plan in plans
                for k in range(1, 13)
            ],
        )
    return ids


async def payment_count(sales: SalesHandlers) -> int:
    async with sales.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(payments)) or 0)


async def payments_bench(admin_url: str, broker: infra.TansuBroker) -> list[dict[str, object]]:
    url = await infra.create_database(admin_url, prefix="crm_bench_sales_pay")
    engine = await migrated_engine(url)
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=50)
    try:
        sales = make_handlers(engine, utcnow)
        contract_ids = await signed_contracts(sales, max(50, PAYMENTS // 20))
        rng = random.Random(SEED + 2)
        postings = [(rng.choice(contract_ids), f"BENCH-{n}") for n in range(PAYMENTS)]

        # Baseline: the same kind of booking through the handler, no Kafka (another reference range).
        direct = postings[: max(200, PAYMENTS // 5)]
        started = time.perf_counter()
        with acting_as(ADMIN, ALL_RECORDS):
            for contract_id, reference in direct:
                await sales.record_payment(
                    contract_id=contract_id, amount=Money(Decimal("10.00"), "CNY"), received_at=None, method="wire",
                    external_reference=f"direct-{reference}",
                )  # fmt: skip
        direct_rate = len(direct) / (time.perf_counter() - started)

        await ensure_topics(kafka, ["erp.payments.v1", "erp.payments.v1.dlt", "crm.sales.v1"])
        app = build(SalesSettings(grpc_port=0, kafka=kafka, shutdown_grace_seconds=5.0), engine)
        await app.start()
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(consumer.ready.wait() for consumer in app.consumers))
            before = await payment_count(sales)
            duplicates = rng.sample(postings, PAYMENTS // 10)
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
            await producer.start()
            started = time.perf_counter()
            try:
                for contract_id, reference in postings + duplicates:
                    message = payments_pb2.ErpPaymentPosted(
                        contract_id=contract_id,
                        amount=common_pb2.Money(amount="10.00", currency="CNY"),
                        method="wire",
                        external_reference=reference,
                    )
                    spec = spec_of(message)
                    headers = CloudEventHeaders(
                        id=new_id(), type=spec.type, source="/bench/erp", time=utcnow(), subject=contract_id,
                        dataschema=spec.schema,
                    ).encode()  # fmt: skip
                    await producer.send(spec.topic, value=message.SerializeToString(), key=contract_id.encode(),
                                        headers=headers)  # fmt: skip
                await producer.flush()
            finally:
                await producer.stop()
            produced = time.perf_counter() - started
            async with asyncio.timeout(600):
                while await payment_count(sales) - before < PAYMENTS:
                    await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(2.0)  # duplicates still in flight must not book anything
            booked = await payment_count(sales) - before
        finally:
            await app.stop()
        kafka_rate = PAYMENTS / elapsed
        return [
            {"path": "handler, no Kafka (baseline)", "messages": len(direct), "booked": len(direct),
             "payments/s": direct_rate, "ratio": 1.0},
            {"path": f"erp.payments.v1 consumer (+{len(duplicates)} duplicates)",
             "messages": len(postings) + len(duplicates), "booked": booked, "payments/s": kafka_rate,
             "ratio": kafka_rate / direct_rate, "produce_s": produced},
        ]  # fmt: skip
    finally:
        await engine.dispose()
        await infra.drop_database(admin_url, url)


async def main(admin_url: str) -> int:
    url = await infra.create_database(admin_url, prefix="crm_bench_sales")
    engine = await migrated_engine(url)
    try:
        loaded = time.perf_counter()
        ids = await load_opportunities(url, OPPORTUNITIES)
        print(f"loaded {OPPORTUNITIES:,} opportunities in {time.perf_counter() - loaded:.1f} s")
        sales = make_handlers(engine, utcnow)
        print_table(f"Forecast over {OPPORTUNITIES:,} opportunities (ms)", await forecast_bench(sales, ids))
    finally:
        await engine.dispose()
        await infra.drop_database(admin_url, url)
    broker = infra.TansuBroker()
    broker.start()
    try:
        rows = await payments_bench(admin_url, broker)
    finally:
        broker.stop()
    print_table(f"Payment postings ({PAYMENTS:,} distinct references, 1 partition key per contract)", rows)
    if rows[1]["booked"] != PAYMENTS:
        print(f"ERROR: {rows[1]['booked']} payments booked for {PAYMENTS} distinct references", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    admin = infra.postgres_admin_url()
    if admin is None:
        print("PostgreSQL is required (CRM_TEST_POSTGRES_URL or 127.0.0.1:5432)", file=sys.stderr)
        sys.exit(1)
    sys.exit(asyncio.run(main(admin)))
