"""One gRPC channel per upstream service for the whole process, and cached stubs on it."""

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from crm.common.v1 import custom_fields_pb2
from crm_platform.grpc_client import create_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

StubT = TypeVar("StubT")

# Only reads are retried by the channel: a retried write could apply twice.
IDEMPOTENT_PREFIXES = ("Get", "List", "Search", "Find", "Check")
# Shared contracts an upstream may serve beside its own service (custom fields: every owning service).
SHARED_SERVICES = (custom_fields_pb2.DESCRIPTOR.services_by_name["CustomFieldService"].full_name,)


class UpstreamNotConfigured(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} service is not configured")
        self.name = name


class Upstreams:
    def __init__(self, targets: dict[str, str], *, deadline_seconds: float, call_secret: str = "") -> None:
        self.targets = targets
        self.deadline_seconds = deadline_seconds
        # Signs every call's principal and scope (crm_platform.call_auth); empty signs nothing.
        self.call_secret = call_secret
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, object], Any] = {}

    def channel(self, name: str) -> grpc.aio.Channel:
        if name not in self.targets:
            raise UpstreamNotConfigured(name)
        if name not in self._channels:
            self._channels[name] = create_channel(
                self.targets[name],
                idempotent_methods=_idempotent_methods(name),
                default_deadline_seconds=self.deadline_seconds,
                call_secret=self.call_secret,
            )
        return self._channels[name]

    def stub(self, name: str, stub_type: Callable[[grpc.aio.Channel], StubT]) -> StubT:
        """e.g. `upstreams.stub("leads", LeadsServiceStub)`."""
        key = (name, stub_type)
        if key not in self._stubs:
            self._stubs[key] = stub_type(self.channel(name))
        stub: StubT = self._stubs[key]
        return stub

    async def health(self, timeout_seconds: float = 1.0) -> dict[str, str]:
        """Each upstream's gRPC health status (SERVING, NOT_SERVING, or the error): of its own service,
        which is NOT_SERVING while its database does not answer (the server's, "", stays SERVING)."""

        async def check(name: str) -> tuple[str, str]:
            try:
                reply = await health_pb2_grpc.HealthStub(self.channel(name)).Check(
                    health_pb2.HealthCheckRequest(service=_own_service(name)), timeout=timeout_seconds
                )
                return name, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                return name, error.code().name

        return dict(await asyncio.gather(*(check(name) for name in self.targets)))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
        self._stubs.clear()


def _idempotent_methods(name: str) -> list[tuple[str, str]]:
    """Read methods of the upstream's service, found in the generated descriptors."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    package = _package(name)
    methods: list[tuple[str, str]] = []
    for service_name in [*_service_names(package), *SHARED_SERVICES]:
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            continue
        methods += [(service.full_name, m.name) for m in service.methods if m.name.startswith(IDEMPOTENT_PREFIXES)]
    return methods


def _own_service(name: str) -> str:
    """The upstream's own gRPC service (`crm.leads.v1.LeadsService`), "" (the server) if unknown."""
    return next(iter(_service_names(_package(name))), "")


def _package(name: str) -> str:
    """The upstream's proto package: `crm.<package>.v1`."""
    return {"service_desk": "servicedesk"}.get(name, name)


def _service_names(package: str) -> list[str]:
    """`crm.leads.v1.LeadsService` style names, after importing the package's generated module."""
    import importlib

    module_name = f"crm.{package}.v1.{package}_service_pb2"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    return [service.full_name for service in module.DESCRIPTOR.services_by_name.values()]
