"""Leads through the real gateway and service, against minimal baselines started here, same run,
same PostgreSQL, same load generator.

1. Create lead: gateway (JWT auth, policy, audit) -> gRPC -> leads service (validation, dedupe
   with advisory lock, scoring, assignment rules, outbox) vs a minimal FastAPI -> grpc.aio ->
   asyncpg INSERT path. Target ratio (requests/s) >= 0.6.
2. Get lead by id: the same two paths, reading. Target ratio >= 0.7.
3. List with two filters (status + source) over BENCH_LEADS_LIST rows, through the gateway:
   target p99 <= 20 ms at 1,000,000.
4. Bulk import through the gateway (CSV in 900 KB parts, dedupe on): Leads.csv repeated to
   BENCH_LEADS_IMPORT rows with fresh ids and emails. Target >= 20,000 rows/s at 100,000.

    .venv/bin/python bench/bench_leads.py        (defaults run in a few minutes on 2 cores)
    BENCH_LEADS_LIST=1000000 BENCH_LEADS_IMPORT=100000 .venv/bin/python bench/bench_leads.py
"""

import asyncio
import csv
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import httpx
from crm_platform import migrations
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from gateway.token_cli import issue_dev_token

ROOT = Path(__file__).resolve().parents[1]
LEADS_CSV = ROOT / ".." / "shared" / "datasets" / "x-education-leads" / "Leads.csv"
MIGRATIONS = ROOT / "services" / "leads" / "migrations"
REQUESTS = int(os.environ.get("BENCH_LEADS_REQUESTS", "3000"))
CONCURRENCY = int(os.environ.get("BENCH_LEADS_CONCURRENCY", "16"))
LIST_ROWS = int(os.environ.get("BENCH_LEADS_LIST", "200000"))
LIST_QUERIES = int(os.environ.get("BENCH_LEADS_LIST_QUERIES", "500"))
IMPORT_ROWS = int(os.environ.get("BENCH_LEADS_IMPORT", "30000"))
PART_BYTES = 900_000
SECRET = "bench-secret-" + uuid.uuid4().hex
BIN = Path(sys.executable).parent

# The baseline: the least a FastAPI -> gRPC -> PostgreSQL create/read can do (no auth, no rules).
BASELINE_SERVICE = textwrap.dedent(
    """
    import asyncio, sys, uuid, datetime
    import asyncpg, grpc
    from crm.leads.v1 import leads_pb2, leads_service_pb2 as pb, leads_service_pb2_grpc as rpc

    class Minimal(rpc.LeadsServiceServicer):
        def __init__(self, pool):
            self.pool = pool
        async def CreateLead(self, request, context):
            lead_id = str(uuid.uuid4())
            now = datetime.datetime.now(datetime.UTC)
            await self.pool.execute(
                "INSERT INTO baseline_leads (id, name, email, phone, source, created_at) VALUES ($1,$2,$3,$4,$5,$6)",
                lead_id, request.lead.name, request.lead.email, request.lead.phone, request.lead.source, now)
            return pb.CreateLeadResponse(lead=leads_pb2.Lead(id=lead_id, name=request.lead.name,
                email=request.lead.email, phone=request.lead.phone, source=request.lead.source, status="new"))
        async def GetLead(self, request, context):
            row = await self.pool.fetchrow("SELECT * FROM baseline_leads WHERE id = $1", request.lead_id)
            return pb.GetLeadResponse(lead=leads_pb2.Lead(id=row["id"], name=row["name"], email=row["email"],
                phone=row["phone"], source=row["source"], status="new"))

    async def main(url, port):
        pool = await asyncpg.create_pool(url, min_size=10, max_size=10)
        await pool.execute("CREATE TABLE IF NOT EXISTS baseline_leads (id text PRIMARY KEY, name text, email text,"
                           " phone text, source text, created_at timestamptz)")
        server = grpc.aio.server()
        rpc.add_LeadsServiceServicer_to_server(Minimal(pool), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)
BASELINE_HTTP = textwrap.dedent(
    """
    import os
    import grpc, uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from crm.leads.v1 import leads_service_pb2 as pb, leads_service_pb2_grpc as rpc

    app = FastAPI()
    stub = None

    class LeadIn(BaseModel):
        name: str = ""
        email: str = ""
        phone: str = ""
        source: str = ""

    def get_stub():
        global stub
        if stub is None:
            stub = rpc.LeadsServiceStub(grpc.aio.insecure_channel(os.environ["TARGET"]))
        return stub

    def body(lead):
        return {"id": lead.id, "name": lead.name, "email": lead.email, "phone": lead.phone,
                "source": lead.source, "status": lead.status}

    @app.post("/api/v1/leads", status_code=201)
    async def create(lead: LeadIn):
        reply = await get_stub().CreateLead(pb.CreateLeadRequest(lead=pb.LeadInput(**lead.model_dump())), timeout=10)
        return body(reply.lead)

    @app.get("/api/v1/leads/{lead_id}")
    async def get(lead_id: str):
        reply = await get_stub().GetLead(pb.GetLeadRequest(lead_id=lead_id), timeout=10)
        return body(reply.lead)

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
    """
)


class Processes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        self.children.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for child in reversed(self.children):
            child.terminate()
        for child in self.children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not infra.port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.1)


def lead_body(n: int) -> dict[str, str]:
    return {"name": f"Bench {n}", "email": f"bench{n}-{uuid.uuid4().hex[:8]}@example.cn",
            "phone": f"13{random.randrange(10**9):09d}", "source": "website"}  # fmt: skip


async def load(
    base_url: str, headers: dict[str, str], call: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]
) -> dict[str, object]:
    latencies: list[float] = []
    counter = iter(range(REQUESTS))
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for n in counter:
            started = time.perf_counter()
            response = await call(client, n)
            latencies.append(time.perf_counter() - started)
            if response.status_code >= 300:
                errors += 1
                if errors == 1:
                    print("  first error:", response.status_code, response.text[:300], flush=True)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as client:
        for n in range(50):  # warm-up: connections, caches, JIT-free but lazy imports
            await call(client, REQUESTS + n)
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return {"requests/s": REQUESTS / elapsed, **summary_ms(latencies), "errors": errors}


async def grpc_load(target: str) -> dict[str, object]:
    """The leads service alone (no HTTP, no gateway): where the create time goes."""
    from crm.leads.v1 import leads_service_pb2 as pb
    from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceStub
    from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata

    metadata = outgoing_metadata(Principal(user_id="bench", roles=("admin",), team="east"), RecordScope(ScopeKind.ALL))
    latencies: list[float] = []
    counter = iter(range(REQUESTS))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = LeadsServiceStub(channel)

        async def worker() -> None:
            for n in counter:
                request = pb.CreateLeadRequest(lead=pb.LeadInput(**lead_body(n)))
                started = time.perf_counter()
                await stub.CreateLead(request, metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return {"requests/s": REQUESTS / elapsed, **summary_ms(latencies), "errors": 0}


async def seed_rules(client: httpx.AsyncClient) -> None:
    """A realistic configuration: three scoring rules and a round-robin assignment rule with a cap."""
    for rule in (
        {"name": "website", "field": "source", "operator": "equals", "value": "website", "points": 20},
        {"name": "has email", "field": "email", "operator": "present", "points": 15},
        {"name": "engaged", "activity_kind": "any", "min_count": 2, "points": 30},
    ):
        (await client.post("/api/v1/lead-scoring-rules", json=rule)).raise_for_status()
    rule = {"name": "web leads", "sources": ["website"], "user_ids": [f"rep{i}" for i in range(10)],
            "strategy": "round_robin", "capacity": 1_000_000}  # fmt: skip
    (await client.post("/api/v1/lead-assignment-rules", json=rule)).raise_for_status()


async def bulk_seed(url: str, rows: int) -> None:
    """`rows` leads straight into the table with COPY (spread over statuses and sources)."""
    statuses = ["new", "contacted", "qualified", "unqualified", "converted", "recycled"]
    sources = ["website", "webform", "ad", "event", "referral", "wechat", "phone", "email", "import", "other"]
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rng = random.Random(7)
    try:
        batch = 100_000
        for start in range(0, rows, batch):
            records = []
            for n in range(start, min(rows, start + batch)):
                created = base + timedelta(seconds=n * 20)
                lead_id = f"{uuid.UUID(int=(int(created.timestamp() * 1000) << 80) | n)}"
                records.append((lead_id, f"Seed {n}", rng.choice(sources), rng.choice(statuses),
                                f"rep{n % 50}", "east", "[]", "{}", created, created))  # fmt: skip
            await connection.copy_records_to_table(
                "leads",
                records=records,
                columns=["id", "name", "source", "status", "owner_id", "team", "tags", "custom", "created_at",
                         "updated_at"],
            )  # fmt: skip
        await connection.execute("ANALYZE leads")
    finally:
        await connection.close()


def import_file(rows: int) -> bytes:
    """Leads.csv repeated to `rows` data rows; each copy gets fresh Prospect IDs and an email column."""
    with LEADS_CSV.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        source_rows = list(reader)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*header, "Email"])
    for n in range(rows):
        row = list(source_rows[n % len(source_rows)])
        row[0] = f"{row[0]}-{n // len(source_rows)}"
        writer.writerow([*row, f"prospect{n}@bench.example"])
    return out.getvalue().encode()


async def main(admin_url: str) -> int:
    leads_db = await infra.create_database(admin_url, prefix="bench_leads")
    gateway_db = await infra.create_database(admin_url, prefix="bench_gateway")
    baseline_db = await infra.create_database(admin_url, prefix="bench_baseline")
    await asyncio.to_thread(migrations.upgrade, MIGRATIONS, leads_db)
    work = Path(tempfile.mkdtemp(prefix="bench-leads-"))
    processes = Processes(work)
    broker = infra.TansuBroker(log_path=work / "tansu.log")
    broker.start()
    ports = {name: infra.free_port() for name in ("leads", "gateway", "baseline_grpc", "baseline_http")}
    try:
        processes.start("leads", [str(BIN / "crm-leads"), "serve"], {
            "CRM_LEADS_DATABASE_URL": leads_db, "CRM_LEADS_GRPC_PORT": str(ports["leads"]),
            "CRM_LEADS_METRICS_PORT": "0", "CRM_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CRM_LEADS_LOG_LEVEL": "WARNING",
        })  # fmt: skip
        processes.start("gateway", [str(BIN / "crm-gateway")], {
            "CRM_GATEWAY_PORT": str(ports["gateway"]), "CRM_GATEWAY_LEADS_TARGET": f"127.0.0.1:{ports['leads']}",
            "CRM_GATEWAY_ACCOUNTS_TARGET": "", "CRM_GATEWAY_SALES_TARGET": "", "CRM_GATEWAY_SERVICE_DESK_TARGET": "",
            "CRM_GATEWAY_ANALYTICS_TARGET": "", "CRM_GATEWAY_DEV_MODE": "true", "CRM_GATEWAY_DEV_JWT_SECRET": SECRET,
            "CRM_GATEWAY_DATABASE_URL": gateway_db, "CRM_GATEWAY_MIGRATE_ON_START": "true",
            "CRM_GATEWAY_RATE_LIMIT_PER_SECOND": "1000000", "CRM_GATEWAY_RATE_LIMIT_BURST": "1000000",
            "CRM_GATEWAY_LOG_LEVEL": "WARNING", "CRM_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        })  # fmt: skip
        processes.start("baseline_grpc", [sys.executable, "-c", BASELINE_SERVICE,
                                          baseline_db, str(ports["baseline_grpc"])], {})  # fmt: skip
        processes.start("baseline_http", [sys.executable, "-c", BASELINE_HTTP], {
            "PORT": str(ports["baseline_http"]), "TARGET": f"127.0.0.1:{ports['baseline_grpc']}",
        })  # fmt: skip
        for name in ("leads", "gateway", "baseline_grpc", "baseline_http"):
            wait_port(ports[name])
        token = issue_dev_token(secret=SECRET, sub="bench-admin", roles=["admin"], team="east", region="cn-east")
        auth = {"Authorization": f"Bearer {token}"}
        gateway_url = f"http://127.0.0.1:{ports['gateway']}"
        baseline_url = f"http://127.0.0.1:{ports['baseline_http']}"
        async with httpx.AsyncClient(base_url=gateway_url, headers=auth, timeout=30) as admin:
            await seed_rules(admin)

        created: dict[str, list[str]] = {"crm": [], "baseline": []}

        def creator(kind: str) -> Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]:
            async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
                response = await client.post("/api/v1/leads", json=lead_body(n))
                if response.status_code == 201:
                    created[kind].append(response.json()["id"])
                return response

            return call

        def reader(kind: str) -> Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]:
            async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
                ids = created[kind]
                return await client.get(f"/api/v1/leads/{ids[n % len(ids)]}")

            return call

        results: list[dict[str, object]] = []
        grpc_create = await grpc_load(f"127.0.0.1:{ports['leads']}")
        base_create = await load(baseline_url, {}, creator("baseline"))
        crm_create = await load(gateway_url, auth, creator("crm"))
        base_get = await load(baseline_url, {}, reader("baseline"))
        crm_get = await load(gateway_url, auth, reader("crm"))
        for name, crm, base, target in (("create lead", crm_create, base_create, 0.6),
                                        ("get lead", crm_get, base_get, 0.7)):  # fmt: skip
            ratio = float(crm["requests/s"]) / float(base["requests/s"])  # type: ignore[arg-type]
            results.append({"operation": f"{name}: CRM gateway", **crm})
            results.append({"operation": f"{name}: minimal baseline", **base})
            results.append({"operation": f"{name}: ratio (target >= {target})", "requests/s": ratio})
        results.append({"operation": "create lead: leads gRPC direct (no gateway)", **grpc_create})
        print_table(f"Create / get through HTTP, {CONCURRENCY} concurrent clients, {REQUESTS} requests", results)

        # List with two filters over a large table.
        await bulk_seed(leads_db, LIST_ROWS)
        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=gateway_url, headers=auth, timeout=30) as client:
            combos = [("new", "website"), ("contacted", "ad"), ("qualified", "event"), ("recycled", "referral")]
            for n in range(LIST_QUERIES + 20):
                status, source = combos[n % len(combos)]
                started = time.perf_counter()
                response = await client.get("/api/v1/leads", params={"status": status, "source": source, "limit": 50})
                if n >= 20:
                    latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                assert len(response.json()["items"]) == 50
        print_table(
            f"List status+source, 50 per page, over {LIST_ROWS:,} leads (gateway, sequential)",
            [{"operation": "GET /leads?status=&source=", **summary_ms(latencies), "target p99_ms": 20.0}],
        )

        # Bulk import in parts through the gateway, dedupe on (emails and Prospect IDs are new).
        data = import_file(IMPORT_ROWS)
        parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
        columns = json.dumps({"Prospect ID": "external_id", "Lead Source": "source", "Country": "region",
                              "Email": "email"})  # fmt: skip
        async with httpx.AsyncClient(base_url=gateway_url, headers=auth, timeout=600) as client:
            started = time.perf_counter()
            for number, part in enumerate(parts, start=1):
                response = await client.post(
                    "/api/v1/leads/import",
                    params={"import_key": "bench", "column_map": columns, "part": number,
                            "final": number == len(parts)},
                    content=part, headers={"Content-Type": "text/csv"},
                )  # fmt: skip
                response.raise_for_status()
            elapsed = time.perf_counter() - started
        progress = response.json()["import"]["progress"]
        print_table(
            f"Bulk import through the gateway: Leads.csv repeated to {IMPORT_ROWS:,} rows, {len(parts)} parts",
            [{"rows": IMPORT_ROWS, "accepted": progress.get("accepted", "0"), "rejected": progress.get("rejected", "0"),
              "seconds": elapsed, "rows/s": IMPORT_ROWS / elapsed, "target rows/s": 20000}],
        )  # fmt: skip
        return 0
    finally:
        processes.stop()
        broker.stop()
        for url in (leads_db, gateway_db, baseline_db):
            await infra.drop_database(admin_url, url)


if __name__ == "__main__":
    admin = infra.postgres_admin_url()
    if admin is None:
        print("PostgreSQL is required for this benchmark", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(admin)))
