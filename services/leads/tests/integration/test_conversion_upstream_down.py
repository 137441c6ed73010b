"""A conversion step whose service is down fails as Unavailable naming the step and the service;
gRPC's own text (hosts, ports, library messages) goes to the log, never to the caller."""

import socket
from collections.abc import AsyncIterator

import pytest
from crm_platform.errors import Unavailable
from leads.handlers import ConvertRequest
from leads.upstream import GrpcConversionPorts

pytestmark = pytest.mark.integration

LEAD = {
    "id": "l1",
    "company": "Acme",
    "name": "Li Lei",
    "owner_id": "rep1",
    "team": "east",
    "region": "north",
    "campaign_id": "",
}


@pytest.fixture
async def ports_of_services_down() -> AsyncIterator[GrpcConversionPorts]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{probe.getsockname()[1]}"  # closed again with the probe: nothing listens there
    ports = GrpcConversionPorts(down, down, deadline_seconds=5)
    yield ports
    await ports.close()


async def test_an_opportunity_step_with_sales_down_names_the_sales_service_and_no_host(
    ports_of_services_down: GrpcConversionPorts, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(Unavailable) as caught:
        await ports_of_services_down.create_opportunity(
            key="l1:1:opportunity", account_id="a1", contact_id="c1", lead=LEAD, request=ConvertRequest("l1")
        )

    assert caught.value.detail == "opportunity failed: the sales service is unavailable"
    assert "127.0.0.1" in caplog.text  # the whole of gRPC's message stays in the log


async def test_an_account_step_with_accounts_down_names_the_accounts_service(
    ports_of_services_down: GrpcConversionPorts,
) -> None:
    with pytest.raises(Unavailable) as caught:
        await ports_of_services_down.get_account("a1")

    assert caught.value.detail == "account failed: the accounts service is unavailable"
