"""`crm-accounts [serve|migrate]`: the gRPC server, outbox relay, sales-activity consumer and timers."""

from pathlib import Path

import grpc
from crm.accounts.v1 import accounts_service_pb2, accounts_service_pb2_grpc
from crm.common.v1 import custom_fields_pb2_grpc
from crm_platform import custom_fields_service
from crm_platform.config import ServiceSettings
from crm_platform.outbox import UnitOfWork
from crm_platform.service import ServiceApp, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine

from accounts.config import AccountsSettings
from accounts.consumers import build_consumer
from accounts.handlers import OWNED_ENTITIES, Context
from accounts.jobs import build_jobs
from accounts.repository import custom_fields, idempotency_keys, metadata
from accounts.servicer import AccountsServicer

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SERVICE_NAME = accounts_service_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name
TOPIC = "crm.accounts.v1"


def build(settings: ServiceSettings, engine: AsyncEngine) -> ServiceApp:
    assert isinstance(settings, AccountsSettings)
    return build_with_context(settings, engine)[0]


def build_with_context(settings: AccountsSettings, engine: AsyncEngine) -> tuple[ServiceApp, Context]:
    """The app and the handlers' context it serves with (tests drive the context's clock)."""
    uow = UnitOfWork(engine, metadata, source=f"/crm/{settings.service_name}")
    ctx = Context(uow=uow, policy=settings.pool_policy(), default_country_code=settings.default_country_code)
    servicer = AccountsServicer(ctx)
    # The clock through ctx: tests replace ctx.clock after building the app.
    definitions = custom_fields_service.CustomFieldServicer(
        engine, custom_fields, keys=idempotency_keys, entities=OWNED_ENTITIES, clock=lambda: ctx.clock()
    )

    def register(server: grpc.aio.Server) -> None:
        accounts_service_pb2_grpc.add_AccountsServiceServicer_to_server(servicer, server)
        custom_fields_pb2_grpc.add_CustomFieldServiceServicer_to_server(definitions, server)

    app = ServiceApp(
        settings=settings,
        engine=engine,
        metadata=metadata,
        uow=uow,
        service_names=[SERVICE_NAME, custom_fields_service.SERVICE_NAME],
        register=register,
        topics=[TOPIC],
        consumers=[build_consumer(uow, settings.kafka)],
        jobs=build_jobs(ctx, settings),
    )
    return app, ctx


def main() -> None:
    run_cli(settings=AccountsSettings(), build=build, migrations_dir=MIGRATIONS)


if __name__ == "__main__":
    main()
