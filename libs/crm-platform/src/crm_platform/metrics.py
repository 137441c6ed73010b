"""Prometheus metrics every service exposes (request rate, latency, errors, outbox, consumers)."""

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter("crm_rpc_requests_total", "gRPC requests handled", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "crm_rpc_duration_seconds",
    "gRPC request duration",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_BACKLOG = Gauge("crm_outbox_backlog", "Outbox rows not yet published", ["service"])
OUTBOX_PUBLISHED = Counter("crm_outbox_published_total", "Outbox rows published", ["service"])
OUTBOX_FAILURES = Counter("crm_outbox_publish_failures_total", "Outbox publish attempts that failed", ["service"])
OUTBOX_LATENCY = Histogram(
    "crm_outbox_publish_latency_seconds",
    "From outbox insert to broker acknowledgement",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CONSUMER_PROCESSED = Counter(
    "crm_consumer_processed_total", "Events applied by consumers", ["service", "topic", "outcome"]
)
CONSUMER_LAG = Gauge("crm_consumer_lag", "Records behind the partition end", ["service", "topic", "partition"])
DEAD_LETTERS = Counter("crm_dead_letters_total", "Messages sent to a dead-letter topic", ["service", "topic"])


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Starts the /metrics endpoint on its own port; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
