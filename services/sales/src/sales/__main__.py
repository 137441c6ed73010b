"""`crm-sales [serve|migrate]`: the sales service's gRPC server, outbox relay, consumers and timers."""

from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
from crm.accounts.v1 import events_pb2 as account_events
from crm.common.v1 import custom_fields_pb2_grpc
from crm.erp.v1 import invoices_pb2, payments_pb2
from crm.sales.v1 import sales_service_pb2, sales_service_pb2_grpc
from crm_platform import custom_fields_service
from crm_platform.audit import AUDIT_TOPIC
from crm_platform.config import ServiceSettings
from crm_platform.consumer import EventConsumer
from crm_platform.outbox import UnitOfWork
from crm_platform.service import ServiceApp, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine

from sales.config import SalesSettings
from sales.consumers import SalesConsumers
from sales.handlers import OPPORTUNITY_ENTITY, SalesHandlers
from sales.jobs import overdue_installments_job
from sales.repository import custom_fields, idempotency_keys, metadata
from sales.servicer import SalesServicer

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SERVICE_NAME = sales_service_pb2.DESCRIPTOR.services_by_name["SalesService"].full_name
SOURCE = "/crm/sales"


def build_handlers(settings: SalesSettings, engine: AsyncEngine) -> SalesHandlers:
    return SalesHandlers(
        UnitOfWork(engine, metadata, source=SOURCE),
        quote_thresholds=settings.quote_thresholds(),
        contract_thresholds=settings.contract_thresholds(),
        default_currency=settings.default_currency,
        import_max_rows=settings.import_max_rows,
        timezone=ZoneInfo(settings.business_timezone),
    )


def build(settings: ServiceSettings, engine: AsyncEngine) -> ServiceApp:
    assert isinstance(settings, SalesSettings)
    handlers = build_handlers(settings, engine)
    consumers = SalesConsumers(handlers)
    servicer = SalesServicer(handlers)
    definitions = custom_fields_service.CustomFieldServicer(
        engine, custom_fields, keys=idempotency_keys, entities=(OPPORTUNITY_ENTITY,), clock=handlers.clock
    )

    def register(server: grpc.aio.Server) -> None:
        sales_service_pb2_grpc.add_SalesServiceServicer_to_server(servicer, server)
        custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(definitions, server)

    return ServiceApp(
        settings=settings,
        engine=engine,
        metadata=metadata,
        uow=handlers.uow,
        service_names=[SERVICE_NAME, custom_fields_service.SERVICE_NAME],
        register=register,
        topics=["crm.sales.v1", AUDIT_TOPIC],  # audit records of the ERP's postings and the overdue timer
        consumers=[
            EventConsumer(
                name="sales-erp",
                handlers={
                    payments_pb2.ErpPaymentPosted: consumers.erp_payment_posted,
                    invoices_pb2.ErpInvoiceIssued: consumers.erp_invoice_issued,
                },
                only_these_types=True,  # an ERP's mistyped posting is dead-lettered, not passed over
                uow=handlers.uow,
                metadata=metadata,
                kafka=settings.kafka,
                service=settings.service_name,
            ),
            EventConsumer(
                name="sales-accounts",
                handlers={
                    account_events.AccountMerged: consumers.account_merged,
                    account_events.AccountTransferred: consumers.account_transferred,
                },
                uow=handlers.uow,
                metadata=metadata,
                kafka=settings.kafka,
                service=settings.service_name,
            ),
        ],
        jobs=[
            overdue_installments_job(
                handlers, interval_seconds=settings.overdue_interval_seconds, batch_size=settings.overdue_batch_size
            )
        ],
    )


def main() -> None:
    run_cli(settings=SalesSettings(), build=build, migrations_dir=MIGRATIONS)


if __name__ == "__main__":
    main()
