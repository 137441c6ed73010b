"""API routers turn a request away by path before matching it against their routes, and route
exactly as FastAPI does otherwise."""

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from gateway.routing import ResourceRouter
from starlette.routing import Match

pytestmark = pytest.mark.unit


def _app() -> tuple[FastAPI, ResourceRouter, ResourceRouter]:
    things, others = ResourceRouter(), ResourceRouter()

    @things.get("/things/{thing_id}")
    async def get_thing(thing_id: str) -> dict[str, str]:
        return {"thing": thing_id}

    @things.get("/things")
    async def list_things() -> dict[str, str]:
        return {"list": "things"}

    @things.get("/thing-kinds")
    async def thing_kinds() -> dict[str, str]:
        return {"list": "kinds"}

    @others.get("/others")
    async def list_others() -> dict[str, str]:
        return {"list": "others"}

    app = FastAPI()
    app.include_router(things)
    app.include_router(others)
    return app, things, others


def _scope(path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": [], "query_string": b""}


def test_a_router_admits_only_paths_under_its_routes_literal_prefixes() -> None:
    _, things, others = _app()

    assert things.literal_prefixes() == ("/api/v1/thing-kinds", "/api/v1/things")
    assert things.matches(_scope("/api/v1/others")) == (Match.NONE, {})
    assert others.matches(_scope("/api/v1/things/7")) == (Match.NONE, {})
    assert things.matches(_scope("/crm/api/v1/others", root_path="/crm")) == (Match.NONE, {})


async def test_requests_reach_their_routes_and_misses_are_404_or_405() -> None:
    app, _, _ = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        thing = await client.get("/api/v1/things/7")
        kinds = await client.get("/api/v1/thing-kinds")
        others = await client.get("/api/v1/others")
        missing = await client.get("/api/v1/nothing")
        wrong_method = await client.post("/api/v1/things/7")

    assert thing.json() == {"thing": "7"} and kinds.json() == {"list": "kinds"} and others.json() == {"list": "others"}
    assert missing.status_code == 404
    assert wrong_method.status_code == 405


def test_routes_added_later_widen_the_gate() -> None:
    _, things, _ = _app()
    assert things.matches(_scope("/api/v1/widgets")) == (Match.NONE, {})

    @things.get("/widgets")
    async def list_widgets() -> dict[str, str]:
        return {}

    assert "/api/v1/widgets" in things.literal_prefixes()
