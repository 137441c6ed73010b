"""Leads (issue 4): the real gateway and leads service against a minimal stack started here, in the
same run, on the same PostgreSQL, driven by the same load generator.

1. Create lead: gateway (JWT auth, policy, audit) -> gRPC -> leads service (validation, dedupe with
   advisory locks, scoring, round-robin assignment with a cap, outbox) vs a minimal FastAPI ->
   grpc.aio -> asyncpg INSERT path. Target: ratio of requests/s >= 0.6.
2. Get lead by id through the same two stacks. Target: ratio >= 0.7.
3. List with two filters (status + source, newest first, 50 per page) over BENCH_LEADS_LIST leads
   loaded with COPY (statuses follow age, as in a CRM in use), measured at the leads service's gRPC
   ListLeads, sequentially; through the gateway for information. Target: p99 <= 20 ms at 1,000,000.
4. Bulk import as the product does it: POST /leads/import through the gateway in CSV parts under
   the 1 MiB body limit, one import key, dedupe on (on_duplicate=reject). Leads.csv repeated to
   BENCH_LEADS_IMPORT rows, each copy with its own Prospect IDs (so every row is new and checked
   against the table), into the table of step 3. Target: >= 20,000 rows/s at 100,000 rows. For a
   ratio, the same parts are then imported the least way possible: parsed here and COPYed into
   the same table (same indexes), every column kept, no dedupe, scoring, assignment or events.

Fairness: both sides of a ratio get the same client (one httpx client per side, keep-alive), the
same concurrency, the same request bodies and a warm-up; the measured rounds alternate CRM and
baseline in ABBA order, so drift from other work on the machine hits both alike. A ratio is total
requests / total seconds of the CRM's rounds over the baseline's. CPU time per request is read
from /proc for every process (and the PostgreSQL backends of each database): it says where the
time goes even when the machine is busy. The databases created here are dropped at the end.

    .venv/bin/python -m bench leads       (the issue's sizes; about 10 minutes on 2 cores)
    BENCH_LEADS_LIST=100000 BENCH_LEADS_IMPORT=20000 BENCH_LEADS_REQUESTS=300 .venv/bin/python -m bench leads
    BENCH_LEADS_PROFILE=1 ...   also runs the leads service and the gateway under cProfile
"""

import asyncio
import csv
import io
import json
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from crm.common.v1 import common_pb2
from crm.leads.v1 import leads_service_pb2
from crm.leads.v1.leads_service_pb2_grpc import LeadsServiceStub
from crm_platform import migrations
from crm_platform.grpc_client import create_channel
from crm_platform.ids import new_id
from crm_platform.principal import Principal, RecordScope, ScopeKind, outgoing_metadata
from crm_platform.service import run_event_loop
from crm_platform.testing import infra
from crm_platform.testing.bench import print_table, summary_ms
from gateway.token_cli import issue_dev_token
from leads.domain import SOURCE_ALIASES

ROOT = Path(__file__).resolve().parents[1]
LEADS_CSV = ROOT.parent / "shared" / "datasets" / "x-education-leads" / "Leads.csv"
MIGRATIONS = ROOT / "services" / "leads" / "migrations"
REQUESTS = int(os.environ.get("BENCH_LEADS_REQUESTS", "1000"))  # per side and round
ROUNDS = int(os.environ.get("BENCH_LEADS_ROUNDS", "4"))
WARMUP = int(os.environ.get("BENCH_LEADS_WARMUP", "200"))
CONCURRENCY = int(os.environ.get("BENCH_LEADS_CONCURRENCY", "16"))
LIST_ROWS = int(os.environ.get("BENCH_LEADS_LIST", "1000000"))
LIST_QUERIES = int(os.environ.get("BENCH_LEADS_LIST_QUERIES", "2000"))
IMPORT_ROWS = int(os.environ.get("BENCH_LEADS_IMPORT", "100000"))
PROFILE = os.environ.get("BENCH_LEADS_PROFILE", "") not in ("", "0")
PART_BYTES = 1_000_000  # the gateway refuses bodies over 1 MiB
SECRET = "bench-secret-" + uuid.uuid4().hex
# The gateway signs its calls to the leads service with it, and the service checks them, as deployed.
INTERNAL_CALL_SECRET = "bench-internal-calls-" + uuid.uuid4().hex
BIN = Path(sys.executable).parent

# A CRM that has run for a while: the newest leads are mostly new, the oldest mostly worked to an
# end, so the matches of a status filter are not spread evenly over the (time-ordered) ids.
STATUSES_BY_AGE = [  # (from this fraction of the table on, oldest first): weights
    (0.9, {"new": 70, "contacted": 20, "qualified": 8, "unqualified": 2}),
    (0.6, {"new": 10, "contacted": 35, "qualified": 20, "unqualified": 15, "converted": 10, "recycled": 10}),
    (0.0, {"contacted": 10, "qualified": 10, "unqualified": 30, "converted": 30, "recycled": 20}),
]
SOURCES = {
    "website": 30, "webform": 15, "ad": 15, "event": 8, "referral": 8, "wechat": 8, "phone": 5, "email": 5,
    "import": 4, "other": 2,
}  # fmt: skip
# Common and rare pairs (0.2% to 3% of the table), of young and of old leads.
LIST_FILTERS = [
    ("new", "website"), ("contacted", "ad"), ("qualified", "event"), ("unqualified", "wechat"),
    ("converted", "referral"), ("recycled", "email"), ("new", "other"), ("converted", "other"),
]  # fmt: skip


# --- the minimal stack (two child processes running this file) -----------------------------------


def baseline_grpc(url: str, port: int) -> None:
    """grpc.aio server: one asyncpg INSERT per create, one SELECT by primary key per get."""
    from crm.leads.v1 import leads_pb2
    from crm.leads.v1 import leads_service_pb2 as pb
    from crm.leads.v1 import leads_service_pb2_grpc as rpc

    def lead(lead_id: str, name: str, email: str, phone: str, source: str) -> Any:
        return leads_pb2.Lead(id=lead_id, name=name, email=email, phone=phone, source=source, status="new")

    class Minimal(rpc.LeadsServiceServicer):  # type: ignore[misc]
        def __init__(self, pool: asyncpg.Pool) -> None:
            self.pool = pool

        async def CreateLead(self, request: Any, context: Any) -> Any:
            lead_id, given = str(uuid.uuid4()), request.lead
            await self.pool.execute(
                "INSERT INTO baseline_leads (id, name, email, phone, source, created_at) VALUES ($1,$2,$3,$4,$5,$6)",
                *(lead_id, given.name, given.email, given.phone, given.source, datetime.now(UTC)),
            )
            return pb.CreateLeadResponse(lead=lead(lead_id, given.name, given.email, given.phone, given.source))

        async def GetLead(self, request: Any, context: Any) -> Any:
            row = await self.pool.fetchrow("SELECT * FROM baseline_leads WHERE id = $1", request.lead_id)
            return pb.GetLeadResponse(lead=lead(row["id"], row["name"], row["email"], row["phone"], row["source"]))

    async def serve() -> None:
        pool = await asyncpg.create_pool(url, min_size=10, max_size=10)
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS baseline_leads"
            " (id text PRIMARY KEY, name text, email text, phone text, source text, created_at timestamptz)"
        )
        server = grpc.aio.server()
        rpc.add_LeadsServiceServicer_to_server(Minimal(pool), server)  # type: ignore[abstract]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    run_event_loop(serve())  # the services' event loop


def baseline_http(port: int, target: str) -> None:
    """FastAPI on uvicorn (as the gateway) -> one gRPC call; no auth, no policy, no audit."""
    import uvicorn
    from crm.leads.v1 import leads_service_pb2 as pb
    from crm.leads.v1 import leads_service_pb2_grpc as rpc
    from fastapi import FastAPI
    from pydantic import BaseModel

    app = FastAPI()
    stubs: list[Any] = []

    class LeadIn(BaseModel):
        name: str = ""
        email: str = ""
        phone: str = ""
        source: str = ""

    def stub() -> Any:
        if not stubs:  # the channel is made on the server's event loop
            stubs.append(rpc.LeadsServiceStub(grpc.aio.insecure_channel(target)))
        return stubs[0]

    def body(lead: Any) -> dict[str, str]:
        fields = ("id", "name", "email", "phone", "source", "status")
        return {name: getattr(lead, name) for name in fields}

    @app.post("/api/v1/leads", status_code=201)
    async def create(lead: LeadIn) -> dict[str, str]:
        request = pb.CreateLeadRequest(lead=pb.LeadInput(**lead.model_dump()))
        return body((await stub().CreateLead(request, timeout=10)).lead)

    @app.get("/api/v1/leads/{lead_id}")
    async def get(lead_id: str) -> dict[str, str]:
        return body((await stub().GetLead(pb.GetLeadRequest(lead_id=lead_id), timeout=10)).lead)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def profiled(out: str, module: str, args: list[str]) -> None:
    """Runs `module.main()` under cProfile; the services stop cleanly on SIGTERM, then this dumps."""
    import cProfile
    import importlib
    import signal

    # uvicorn raises the SIGTERM it handled again once it has shut down: end by SystemExit instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.argv = [module, *args]
    profile = cProfile.Profile()
    profile.enable()
    try:
        importlib.import_module(module).main()
    finally:
        profile.disable()
        profile.dump_stats(out)


# --- processes and their CPU time ----------------------------------------------------------------


class Processes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        child = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.children.append(child)
        self.pids[name] = child.pid

    def check(self) -> None:
        for child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"{child.args!r} exited with {child.returncode}; logs in {self.work}")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_port(processes: Processes, port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not infra.port_open("127.0.0.1", port):
        processes.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.1)


def service_command(name: str, module: str, args: list[str], work: Path) -> list[str]:
    if PROFILE:
        return [sys.executable, __file__, "profile", str(work / f"{name}.prof"), module, *args]
    return [str(BIN / f"crm-{name}"), *args]


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class CpuMeter:
    """CPU seconds used so far by our processes and by the PostgreSQL backends of our databases."""

    def __init__(self, pids: dict[str, int], databases: dict[str, str]) -> None:
        self.pids = pids
        self.databases = databases  # database name -> what to call its backends

    def snapshot(self) -> dict[str, float]:
        used = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        used["client"] = cpu_seconds(os.getpid())
        for path in Path("/proc").iterdir():
            if not path.name.isdigit():
                continue
            try:
                title = (path / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres: "):  # "postgres: 15/main: user database host(port) state"
                component = next((c for db, c in self.databases.items() if db in title.split()), None)
                if component:
                    used[component] = used.get(component, 0.0) + cpu_seconds(int(path.name))
        return used

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {name: seconds - before.get(name, 0.0) for name, seconds in self.snapshot().items()}


# --- closed-loop load, CRM vs baseline -----------------------------------------------------------

Call = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


class Side:
    """One side of a ratio: its client, and the latencies, seconds and CPU of its measured rounds."""

    def __init__(self, name: str, base_url: str, headers: dict[str, str], meter: CpuMeter) -> None:
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a round
        # never reuses a connection the server is closing (a ReadError after a pause of the other side).
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=2.0)
        self.name = name
        self.meter = meter
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60)
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.requests = 0
        self.errors = 0
        self.round_rates: list[float] = []
        self.cpu: dict[str, float] = {}

    async def run(self, call: Call, first: int, count: int, *, measured: bool = True) -> None:
        """Requests `first` .. `first + count - 1`, by CONCURRENCY workers that each wait for their answer."""
        numbers = iter(range(first, first + count))
        latencies: list[float] = []

        async def worker() -> None:
            for n in numbers:
                started = time.perf_counter()
                response = await call(self.client, n)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 300:
                    self.errors += 1
                    if self.errors <= 3:
                        print(f"  {self.name}: {response.status_code} {response.text[:300]}", flush=True)

        before = self.meter.snapshot()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        used = self.meter.since(before)
        if measured:
            for component, seconds in used.items():
                self.cpu[component] = self.cpu.get(component, 0.0) + seconds
            self.latencies += latencies
            self.seconds += elapsed
            self.requests += count
            self.round_rates.append(count / elapsed)

    def row(self, operation: str) -> dict[str, object]:
        rate = self.requests / self.seconds
        return {"operation": operation, "requests": self.requests, "requests/s": rate, **summary_ms(self.latencies)}

    def cpu_row(self, operation: str, http: str, service: str, databases: tuple[str, ...]) -> dict[str, object]:
        """CPU milliseconds per request of each part of this side's stack."""
        parts = {
            "client": self.cpu.get("client", 0.0),
            "http front": self.cpu.get(http, 0.0),
            "gRPC service": self.cpu.get(service, 0.0),
            "postgres": sum(self.cpu.get(db, 0.0) for db in databases),
            "broker": self.cpu.get("broker", 0.0) if self.name == "crm" else 0.0,
        }
        per = 1000 / self.requests
        return {"operation": operation, **{k: v * per for k, v in parts.items()}, "total": sum(parts.values()) * per}


async def compare(crm: Side, base: Side, crm_call: Call, base_call: Call) -> float:
    """Warm-up, then ROUNDS rounds in ABBA order; the ratio of requests/s, CRM over baseline."""
    crm.reset()
    base.reset()
    await crm.run(crm_call, 0, WARMUP, measured=False)
    await base.run(base_call, 0, WARMUP, measured=False)
    for number in range(ROUNDS):
        first = WARMUP + number * REQUESTS
        pairs = [(crm, crm_call), (base, base_call)]
        for side, call in pairs if number % 4 in (0, 3) else reversed(pairs):
            await side.run(call, first, REQUESTS)
    for side in (crm, base):
        if side.errors:
            raise RuntimeError(f"{side.name}: {side.errors} requests failed")
    return (crm.requests / crm.seconds) / (base.requests / base.seconds)


PHONE_BASE = random.randrange(10**9)  # a run's phones follow on from here: distinct, so never a duplicate


def lead_body(n: int) -> dict[str, str]:
    return {
        "name": f"Bench {n}",
        "email": f"bench{n}-{uuid.uuid4().hex[:8]}@example.cn",
        "phone": f"13{(PHONE_BASE + n) % 10**9:09d}",
        "source": "website",
    }


async def seed_rules(client: httpx.AsyncClient) -> None:
    """A realistic configuration: three scoring rules and a round-robin assignment rule with a cap."""
    for rule in (
        {"name": "website", "field": "source", "operator": "equals", "value": "website", "points": 20},
        {"name": "has email", "field": "email", "operator": "present", "points": 15},
        {"name": "engaged", "activity_kind": "any", "min_count": 2, "points": 30},
    ):
        (await client.post("/api/v1/lead-scoring-rules", json=rule)).raise_for_status()
    rule = {
        "name": "web leads",
        "sources": ["website"],
        "user_ids": [f"rep{i}" for i in range(10)],
        "strategy": "round_robin",
        "capacity": 1_000_000,
    }
    (await client.post("/api/v1/lead-assignment-rules", json=rule)).raise_for_status()


async def create_and_get(crm: Side, base: Side, summary: dict[str, float]) -> None:
    created: dict[str, list[str]] = {"crm": [], "baseline": []}

    def creator(kind: str) -> Call:
        async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
            response = await client.post("/api/v1/leads", json=lead_body(n))
            if response.status_code == 201:
                created[kind].append(response.json()["id"])
            return response

        return call

    def reader(kind: str) -> Call:
        async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
            ids = created[kind]
            return await client.get(f"/api/v1/leads/{ids[(n * 7919) % len(ids)]}")

        return call

    rows: list[dict[str, object]] = []
    cpu_rows: list[dict[str, object]] = []
    for name, make, target in (("create lead", creator, 0.6), ("get lead", reader, 0.7)):
        ratio = await compare(crm, base, make("crm"), make("baseline"))
        summary[f"{name} ratio"] = ratio
        rounds = [c / b for c, b in zip(crm.round_rates, base.round_rates, strict=True)]
        rows += [
            crm.row(f"{name}: CRM (gateway -> leads)"),
            base.row(f"{name}: minimal baseline"),
            {
                "operation": f"{name}: ratio CRM / baseline",
                "requests/s": ratio,
                "p50_ms": f"rounds {min(rounds):.2f}-{max(rounds):.2f}",
                "p99_ms": f"target >= {target}",
                "mean_ms": "ok" if ratio >= target else "MISSED",
            },
        ]
        crm_cpu = crm.cpu_row(f"{name}: CRM", "gateway", "leads", ("pg_leads", "pg_gateway"))
        base_cpu = base.cpu_row(f"{name}: baseline", "baseline_http", "baseline_grpc", ("pg_baseline",))
        # What the ratio would be if the CPU were the only limit (less noisy on a shared machine).
        cpu_ratio = float(base_cpu["total"]) / float(crm_cpu["total"])  # type: ignore[arg-type]
        cpu_rows += [crm_cpu, base_cpu, {"operation": f"{name}: baseline / CRM", "total": cpu_ratio}]
    print_table(
        f"Create / get lead over HTTP: {CONCURRENCY} concurrent clients, warm-up {WARMUP}, then {ROUNDS} rounds "
        f"x {REQUESTS} requests per side (ABBA)",
        rows,
    )
    print_table("CPU milliseconds per request, by process (of 2,000 ms per second on 2 cores)", cpu_rows)


# --- list over a large table ---------------------------------------------------------------------


def weighted(weights: dict[str, int], rng: random.Random, count: int) -> list[str]:
    return rng.choices(list(weights), weights=list(weights.values()), k=count)


async def current_scoring_generation(connection: asyncpg.Connection) -> int:
    """The generation of the scoring rules now: leads COPYed in record it, as if scored by the
    service, so that its rescoring job (which walks leads scored under older rules) leaves them
    alone instead of working through them while the bench measures."""
    return int(await connection.fetchval("SELECT generation FROM scoring_generation"))


async def bulk_seed(url: str, rows: int) -> float:
    """`rows` leads straight into the table with COPY (the secondary indexes dropped first and built
    after, as for a backfill), spread over 50 reps; returns the seconds it took."""
    started = time.perf_counter()
    connection = await asyncpg.connect(url)
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rng = random.Random(7)
    columns = [
        "id", "name", "email", "email_norm", "source", "status", "owner_id", "team", "tags", "custom", "created_at",
        "updated_at", "scoring_generation",
    ]  # fmt: skip
    try:
        generation = await current_scoring_generation(connection)
        indexes = await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'leads' AND indexname <> 'leads_pkey'"
        )
        for index in indexes:
            await connection.execute(f'DROP INDEX "{index["indexname"]}"')
        for start in range(0, rows, 100_000):
            count = min(rows, start + 100_000) - start
            sources = weighted(SOURCES, rng, count)
            records = []
            for i in range(count):
                n = start + i
                statuses = next(weights for since, weights in STATUSES_BY_AGE if n / rows >= since)
                created = base + timedelta(seconds=n * 20)
                # Time-ordered like the service's ids: milliseconds first.
                lead_id = str(uuid.UUID(int=(int(created.timestamp() * 1000) << 80) | (7 << 76) | n))
                email = f"seed{n}@example.cn"
                status = weighted(statuses, rng, 1)[0]
                owner = f"rep{n % 50}"
                records.append(
                    (
                        lead_id,
                        f"Seed {n}",
                        email,
                        email,
                        sources[i],
                        status,
                        owner,
                        "east",
                        "[]",
                        "{}",
                        created,
                        created,
                        generation,
                    )
                )
            await connection.copy_records_to_table("leads", records=records, columns=columns)
        for index in indexes:
            await connection.execute(index["indexdef"])
        await connection.execute("VACUUM ANALYZE leads")
    finally:
        await connection.close()
    return time.perf_counter() - started


async def list_latencies(query: Callable[[str, str], Awaitable[int]]) -> list[float]:
    """First pages of the filter pairs in turn, one at a time (after a warm-up pass)."""
    for n in range(50):
        await query(*LIST_FILTERS[n % len(LIST_FILTERS)])
    latencies: list[float] = []
    for n in range(LIST_QUERIES):
        status, source = LIST_FILTERS[n % len(LIST_FILTERS)]
        started = time.perf_counter()
        items = await query(status, source)
        latencies.append(time.perf_counter() - started)
        if items != 50 and LIST_ROWS >= 100_000:
            raise RuntimeError(f"{status} + {source}: {items} leads, not 50")
    return latencies


async def list_leads(leads_target: str, gateway: httpx.AsyncClient, summary: dict[str, float]) -> None:
    admin = Principal(user_id="bench-admin", roles=("admin",), team="east")
    metadata = outgoing_metadata(admin, RecordScope(ScopeKind.ALL))
    async with create_channel(leads_target, call_secret=INTERNAL_CALL_SECRET) as channel:
        stub = LeadsServiceStub(channel)

        async def by_grpc(status: str, source: str) -> int:
            page = common_pb2.PageRequest(limit=50)
            request = leads_service_pb2.ListLeadsRequest(statuses=[status], sources=[source], page=page)
            return len((await stub.ListLeads(request, metadata=metadata, timeout=30)).items)

        grpc_latencies = await list_latencies(by_grpc)

    async def by_gateway(status: str, source: str) -> int:
        response = await gateway.get("/api/v1/leads", params={"status": status, "source": source, "limit": 50})
        response.raise_for_status()
        return len(response.json()["items"])

    gateway_latencies = await list_latencies(by_gateway)
    rows: list[dict[str, object]] = []
    for name, samples in (
        ("leads service, gRPC ListLeads (the target)", grpc_latencies),
        ("through the gateway (HTTP, auth, field policy)", gateway_latencies),
    ):
        stats = summary_ms(samples)
        result = "ok" if stats["p99_ms"] <= 20 else "MISSED"
        rows.append({"operation": name, "queries": len(samples), **stats, "target": "p99 <= 20 ms", "": result})
    summary["list p99 ms"] = summary_ms(grpc_latencies)["p99_ms"]
    print_table(
        f"List status + source, newest first, 50 per page, over {LIST_ROWS:,} leads "
        f"({len(LIST_FILTERS)} filter pairs of 0.2%-3% of the leads in turn, one query at a time)",
        rows,
    )


# --- bulk import ---------------------------------------------------------------------------------


def import_parts(rows: int) -> list[bytes]:
    """Leads.csv repeated to `rows` data rows (each copy's Prospect IDs suffixed with its number),
    cut at line ends into parts under the body limit; the first part carries the header."""
    with LEADS_CSV.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        source_rows = list(reader)
    parts: list[bytes] = []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for n in range(rows):
        row = source_rows[n % len(source_rows)]
        writer.writerow([f"{row[0]}-{n // len(source_rows)}", *row[1:]])
        if out.tell() > PART_BYTES - 4000:
            parts.append(out.getvalue().encode())
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
    if out.tell():
        parts.append(out.getvalue().encode())
    return parts


async def outbox_drained(url: str, started: float) -> float:
    """Seconds from `started` until the leads service's outbox is empty (every event published)."""
    connection = await asyncpg.connect(url)
    try:
        while await connection.fetchval("SELECT count(*) FROM outbox"):
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return time.perf_counter() - started


async def bulk_import(gateway: httpx.AsyncClient, meter: CpuMeter, summary: dict[str, float], leads_db: str) -> None:
    parts = import_parts(IMPORT_ROWS)
    columns = json.dumps({"Prospect ID": "external_id", "Lead Source": "source", "Country": "region"})
    before = meter.snapshot()
    started = time.perf_counter()
    for number, part in enumerate(parts, start=1):
        final = number == len(parts)
        response = await gateway.post(
            "/api/v1/leads/import",
            params={"import_key": "bench-import", "column_map": columns, "part": number, "final": final},
            content=part,
            headers={"Content-Type": "text/csv"},
        )
        response.raise_for_status()
    elapsed = time.perf_counter() - started
    # The relay publishes the import's events meanwhile; CPU is counted until it has published them
    # all, so that work is not left outside the window (less of it falls inside when it lags).
    published = await outbox_drained(leads_db, started)
    used = meter.since(before)
    progress = response.json()["import"]["progress"]
    rate = IMPORT_ROWS / elapsed
    baseline_rate, baseline_used = await baseline_import(leads_db, parts, meter)
    summary["import rows/s"] = rate
    summary["import ratio"] = rate / baseline_rate
    print_table(
        f"Bulk import: {LEADS_CSV.name} (9,240 rows) repeated to {IMPORT_ROWS:,} rows in {len(parts)} CSV parts,"
        f" into the table of {LIST_ROWS:,}+ leads. CRM: through the gateway, on_duplicate=reject (dedupe, scoring,"
        " assignment, an event per lead). Baseline: the bench parses the same parts and COPYs the rows into the"
        " same table (same indexes) in batches of 2,000, nothing else",
        [
            {
                "path": "CRM import",
                "rows": IMPORT_ROWS,
                "accepted": int(progress.get("accepted", 0)),
                "rejected": int(progress.get("rejected", 0)),
                "rows/s": rate,
                "ratio": rate / baseline_rate,
                "events out after s": published,
                "target": ">= 20,000 rows/s",
                "": "ok" if rate >= 20_000 else "MISSED",
            },
            {"path": "baseline: parse + COPY", "rows": IMPORT_ROWS, "rows/s": baseline_rate, "ratio": 1.0},
        ],
    )
    per_row = {name: used.get(name, 0.0) * 1e6 / IMPORT_ROWS for name in ("client", "gateway", "leads", "pg_leads")}
    per_row["broker"] = used.get("broker", 0.0) * 1e6 / IMPORT_ROWS
    baseline_per_row = {name: baseline_used.get(name, 0.0) * 1e6 / IMPORT_ROWS for name in ("client", "pg_leads")}
    print_table(
        "CPU microseconds per imported row, by process, until every event is published (the leads service's"
        " outbox relay publishes meanwhile); the baseline's importer is the bench client",
        [
            {"path": "CRM import", **per_row, "total": sum(per_row.values())},
            {"path": "baseline", **baseline_per_row, "total": sum(baseline_per_row.values())},
        ],
    )


async def baseline_import(url: str, parts: list[bytes], meter: CpuMeter) -> tuple[float, dict[str, float]]:
    """The least an import can do with the same file: parse each part, keep every column (the mapped
    ones as fields, the rest as JSON), and COPY the rows into the leads table with its indexes, one
    transaction per 2,000 rows. Returns rows/s and the CPU used."""
    connection = await asyncpg.connect(url)
    columns = ["id", "external_id", "source", "region", "status", "tags", "custom", "import_id", "created_at"]
    columns += ["updated_at", "scoring_generation"]
    rows = 0
    try:
        generation = await current_scoring_generation(connection)
        before = meter.snapshot()
        started = time.perf_counter()
        for part in parts:
            reader = csv.reader(io.StringIO(part.decode()))
            header = next(reader)
            keys = [name.strip().lower().replace(" ", "_") for name in header]
            records: list[tuple[Any, ...]] = []
            for values in reader:
                now = datetime.now(UTC)
                custom = {key: value for key, value in zip(keys[1:], values[1:], strict=True) if value}
                source = SOURCE_ALIASES.get(custom.pop("lead_source", "").lower(), "other")
                region = custom.pop("country", "")
                custom_json = json.dumps(custom)
                row = (new_id(), values[0], source, region, "new", "[]", custom_json, "baseline", now, now, generation)
                records.append(row)
                if len(records) == 2_000:
                    await _copy_batch(connection, records, columns)
                    rows += len(records)
                    records = []
            await _copy_batch(connection, records, columns)
            rows += len(records)
        elapsed = time.perf_counter() - started
        used = meter.since(before)
    finally:
        await connection.close()
    return rows / elapsed, used


async def _copy_batch(connection: asyncpg.Connection, records: list[tuple[Any, ...]], columns: list[str]) -> None:
    if records:
        async with connection.transaction():
            await connection.copy_records_to_table("leads", records=records, columns=columns)


# --- the run -------------------------------------------------------------------------------------


async def main(admin_url: str) -> int:
    leads_db = await infra.create_database(admin_url, prefix="bench_leads")
    gateway_db = await infra.create_database(admin_url, prefix="bench_gateway")
    baseline_db = await infra.create_database(admin_url, prefix="bench_baseline")
    work = Path(tempfile.mkdtemp(prefix="bench-leads-"))
    processes = Processes(work)
    broker = infra.TansuBroker(log_path=work / "tansu.log")
    clients: list[httpx.AsyncClient] = []
    ok = False
    try:
        await asyncio.to_thread(migrations.upgrade, MIGRATIONS, leads_db)
        broker.start()
        assert broker.process is not None
        ports = {name: infra.free_port() for name in ("leads", "gateway", "baseline_grpc", "baseline_http")}
        leads_env = {
            "CRM_LEADS_DATABASE_URL": leads_db,
            "CRM_LEADS_GRPC_PORT": str(ports["leads"]),
            "CRM_LEADS_METRICS_PORT": "0",
            "CRM_LEADS_LOG_LEVEL": "WARNING",
            "CRM_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CRM_INTERNAL_CALL_SECRET": INTERNAL_CALL_SECRET,
        }
        gateway_env = {
            "CRM_GATEWAY_PORT": str(ports["gateway"]),
            "CRM_GATEWAY_METRICS_PORT": "0",
            "CRM_GATEWAY_LEADS_TARGET": f"127.0.0.1:{ports['leads']}",
            **{f"CRM_GATEWAY_{name}_TARGET": "" for name in ("ACCOUNTS", "SALES", "SERVICE_DESK", "ANALYTICS")},
            "CRM_GATEWAY_DEV_MODE": "true",
            "CRM_GATEWAY_DEV_JWT_SECRET": SECRET,
            "CRM_GATEWAY_DATABASE_URL": gateway_db,
            "CRM_GATEWAY_MIGRATE_ON_START": "true",
            "CRM_GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
            "CRM_GATEWAY_RATE_LIMIT_BURST": "1000000",
            "CRM_GATEWAY_LOG_LEVEL": "WARNING",
            "CRM_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CRM_INTERNAL_CALL_SECRET": INTERNAL_CALL_SECRET,
        }
        processes.start("leads", service_command("leads", "leads.__main__", ["serve"], work), leads_env)
        processes.start("gateway", service_command("gateway", "gateway.__main__", [], work), gateway_env)
        me = [sys.executable, __file__]
        processes.start("baseline_grpc", [*me, "baseline-grpc", baseline_db, str(ports["baseline_grpc"])], {})
        target = f"127.0.0.1:{ports['baseline_grpc']}"
        processes.start("baseline_http", [*me, "baseline-http", str(ports["baseline_http"]), target], {})
        for port in ports.values():
            wait_port(processes, port)

        token = issue_dev_token(secret=SECRET, sub="bench-admin", roles=["admin"], team="east", region="cn-east")
        name_of = {leads_db: "pg_leads", gateway_db: "pg_gateway", baseline_db: "pg_baseline"}
        meter = CpuMeter(
            {**processes.pids, "broker": broker.process.pid},
            {url.rsplit("/", 1)[1]: name for url, name in name_of.items()},
        )
        crm = Side("crm", f"http://127.0.0.1:{ports['gateway']}", {"Authorization": f"Bearer {token}"}, meter)
        base = Side("baseline", f"http://127.0.0.1:{ports['baseline_http']}", {}, meter)
        clients += [crm.client, base.client]
        await seed_rules(crm.client)
        print(f"services up, logs in {work}", flush=True)

        summary: dict[str, float] = {}
        await create_and_get(crm, base, summary)
        processes.check()
        seconds = await bulk_seed(leads_db, LIST_ROWS)
        print(f"\nloaded {LIST_ROWS:,} leads with COPY and built the indexes in {seconds:.1f} s", flush=True)
        await list_leads(f"127.0.0.1:{ports['leads']}", crm.client, summary)
        await bulk_import(crm.client, meter, summary, leads_db)
        processes.check()
        print_table(
            "Summary",
            [
                {
                    "create ratio (>= 0.6)": summary["create lead ratio"],
                    "get ratio (>= 0.7)": summary["get lead ratio"],
                    "list p99 ms (<= 20)": summary["list p99 ms"],
                    "import rows/s (>= 20,000)": summary["import rows/s"],
                    "import ratio to parse + COPY": summary["import ratio"],
                }
            ],
        )
        ok = True
        return 0
    finally:
        for client in clients:
            await client.aclose()
        processes.stop()
        broker.stop()
        for url in (leads_db, gateway_db, baseline_db):
            await infra.drop_database(admin_url, url)
        if PROFILE:
            for name in ("leads", "gateway"):
                if (work / f"{name}.prof").exists():
                    print(f"\n--- {name}: cProfile, by own time ({work / f'{name}.prof'})")
                    pstats.Stats(str(work / f"{name}.prof")).sort_stats("tottime").print_stats(40)
        elif ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["baseline-grpc"]:
        baseline_grpc(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["baseline-http"]:
        baseline_http(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1:2] == ["profile"]:
        profiled(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        admin = infra.postgres_admin_url()  # a blocking probe: before the event loop starts
        if admin is None:
            print("PostgreSQL is required for this benchmark", file=sys.stderr)
            sys.exit(2)
        sys.exit(asyncio.run(main(admin)))
