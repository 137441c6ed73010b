"""`crm-leads [serve|migrate]`: the gRPC server, outbox relay, contact consumer and timers."""

from pathlib import Path
from typing import cast

import grpc
from crm.common.v1 import custom_fields_pb2_grpc
from crm.leads.v1 import leads_service_pb2_grpc
from crm_platform import custom_fields_service
from crm_platform.audit import AUDIT_TOPIC
from crm_platform.config import ServiceSettings
from crm_platform.outbox import UnitOfWork
from crm_platform.service import ServiceApp, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine

from leads import repository as repo
from leads.config import LeadsSettings
from leads.consumers import build_consumer
from leads.handlers import LEAD_ENTITY, LeadsService
from leads.jobs import build_jobs
from leads.upstream import GrpcConversionPorts

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SERVICE_NAME = "crm.leads.v1.LeadsService"


def custom_field_servicer(service: LeadsService) -> custom_fields_service.CustomFieldServicer:
    """Lead definitions over crm.common.v1.CustomFieldService; a change reloads this replica's cached rules
    (which hold the definitions the lead writes are validated against)."""
    return custom_fields_service.CustomFieldServicer(
        service.engine,
        repo.custom_fields,
        keys=repo.idempotency,
        entities=(LEAD_ENTITY,),
        clock=service.clock,
        on_change=service.rules.invalidate,
    )


def build(settings: ServiceSettings, engine: AsyncEngine) -> ServiceApp:
    leads_settings = cast(LeadsSettings, settings)
    uow = UnitOfWork(engine, repo.metadata, source="crm/leads")
    ports = GrpcConversionPorts(
        leads_settings.accounts_target,
        leads_settings.sales_target,
        leads_settings.upstream_deadline_seconds,
        call_secret=leads_settings.internal_calls.secret,
    )
    service = LeadsService(engine=engine, uow=uow, settings=leads_settings, ports=ports)

    from leads.servicer import LeadsServicer

    def register(server: grpc.aio.Server) -> None:
        leads_service_pb2_grpc.add_LeadsServiceServicer_to_server(LeadsServicer(service), server)
        custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(custom_field_servicer(service), server)

    return ServiceApp(
        settings=settings,
        engine=engine,
        metadata=repo.metadata,
        uow=uow,
        service_names=[SERVICE_NAME, custom_fields_service.SERVICE_NAME],
        register=register,
        topics=["crm.leads.v1", AUDIT_TOPIC],  # audit records of the SLA and recycling timers
        consumers=[build_consumer(uow, settings.kafka, leads_settings.default_country_code)],
        jobs=build_jobs(service),
    )


def main() -> None:
    run_cli(settings=LeadsSettings(), build=build, migrations_dir=MIGRATIONS)


if __name__ == "__main__":
    main()
