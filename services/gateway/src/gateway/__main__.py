"""`crm-gateway [serve|migrate]`: serves the REST API with uvicorn, or migrates the gateway's own
store (audit trail, API keys, outbox) — what the Kubernetes migration Job runs."""

import argparse

import uvicorn
from crm_platform.logging import configure_logging
from crm_platform.metrics import serve_metrics
from crm_platform.service import freeze_startup_objects
from crm_platform.telemetry import configure_telemetry, instrument_engine

from gateway.app import create_app
from gateway.config import Settings
from gateway.security.runtime import database_url
from gateway.security.store import migrate


def main() -> None:
    parser = argparse.ArgumentParser(prog="crm-gateway")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.service_name, settings.log_level)
    if args.command == "migrate":
        migrate(database_url(settings))
        return
    configure_telemetry(settings.service_name)
    serve_metrics(settings.metrics_port)
    app = create_app(settings)
    instrument_engine(app.state.security.engine)
    freeze_startup_objects()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )


if __name__ == "__main__":
    main()
