"""`crm-service-desk [serve|migrate]`: the gRPC server, outbox relay, accounts consumer and timers."""

from pathlib import Path

import grpc
from crm.common.v1 import custom_fields_pb2_grpc
from crm.servicedesk.v1 import servicedesk_service_pb2, servicedesk_service_pb2_grpc
from crm_platform import custom_fields_service
from crm_platform.audit import AUDIT_TOPIC
from crm_platform.config import ServiceSettings
from crm_platform.outbox import UnitOfWork
from crm_platform.service import ServiceApp, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine

from service_desk.config import ServiceDeskSettings
from service_desk.consumers import build_consumer
from service_desk.handlers import TICKET_ENTITY, Context
from service_desk.jobs import build_jobs
from service_desk.repository import custom_fields, idempotency_keys, metadata
from service_desk.servicer import ServiceDeskServicer

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SERVICE_NAME = servicedesk_service_pb2.DESCRIPTOR.services_by_name["ServiceDeskService"].full_name
TOPIC = "crm.service.v1"


def build(settings: ServiceSettings, engine: AsyncEngine) -> ServiceApp:
    assert isinstance(settings, ServiceDeskSettings)
    return build_with_context(settings, engine)[0]


def build_with_context(settings: ServiceDeskSettings, engine: AsyncEngine) -> tuple[ServiceApp, Context]:
    """The app and the handlers' context it serves with (tests drive the context's clock)."""
    uow = UnitOfWork(engine, metadata, source=f"/crm/{settings.service_name}")
    ctx = Context(
        uow=uow,
        return_visit_days=settings.return_visit_days,
        suggestions=settings.suggestions,
        survey_valid_days=settings.survey_valid_days,
    )
    servicer = ServiceDeskServicer(ctx)
    # The clock through ctx: tests replace ctx.clock after building the app.
    definitions = custom_fields_service.CustomFieldServicer(
        engine, custom_fields, keys=idempotency_keys, entities=(TICKET_ENTITY,), clock=lambda: ctx.clock()
    )

    def register(server: grpc.aio.Server) -> None:
        servicedesk_service_pb2_grpc.add_ServiceDeskServiceServicer_to_server(servicer, server)
        custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(definitions, server)

    app = ServiceApp(
        settings=settings,
        engine=engine,
        metadata=metadata,
        uow=uow,
        service_names=[SERVICE_NAME, custom_fields_service.SERVICE_NAME],
        register=register,
        topics=[TOPIC, AUDIT_TOPIC],  # audit records of the SLA and dispatch timers
        consumers=[build_consumer(uow, settings.kafka, settings.service_name)],
        jobs=build_jobs(ctx, settings),
    )
    return app, ctx


def main() -> None:
    run_cli(settings=ServiceDeskSettings(), build=build, migrations_dir=MIGRATIONS)


if __name__ == "__main__":
    main()
