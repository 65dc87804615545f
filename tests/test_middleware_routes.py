"""Route labels on the installed FastAPI and Starlette: every route a request matched is labelled
with its template (plain Starlette routes served by FastAPI's router included), read back from a
real Prometheus registry."""

from __future__ import annotations

import warnings
from pathlib import Path

from fastapi import APIRouter, FastAPI, WebSocket
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from querywatch import Report
from querywatch.middleware import QueryWatchMiddleware
from tests.web_apps import asgi_client

with warnings.catch_warnings():
    # Starlette >= 1.x asks for httpx2 behind its TestClient; the httpx fallback works the same.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient


async def plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("plain")


def _audited(app: FastAPI | Starlette) -> CollectorRegistry:
    """Add the middleware to `app` with a registry of its own, and return that registry."""
    registry = CollectorRegistry()
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    return registry


def _labels(registry: CollectorRegistry) -> dict[str, float]:
    """Requests counted per `route` label value."""
    counts: dict[str, float] = {}
    for family in registry.collect():
        if family.name != "querywatch_request_db_statements":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                route = sample.labels["route"]
                counts[route] = counts.get(route, 0) + sample.value
    return counts


async def _get_all(app: FastAPI | Starlette, *paths: str) -> None:
    async with asgi_client(app) as c:
        for path in paths:
            response = await c.get(path)
            assert response.status_code == 200, (path, response.status_code)


async def test_fastapi_docs_and_openapi_are_labelled_by_their_path() -> None:
    """`/docs`, `/redoc` and `/openapi.json` (plain Starlette routes) get their own labels."""
    app = FastAPI()
    registry = _audited(app)
    await _get_all(app, "/docs", "/redoc", "/openapi.json")
    assert _labels(registry) == {"/docs": 1, "/redoc": 1, "/openapi.json": 1}


async def test_add_route_is_labelled_by_its_template() -> None:
    """A route added with `app.add_route` is labelled with its template, not the raw path."""
    app = FastAPI()
    app.add_route("/plain/{name}", plain)
    registry = _audited(app)
    await _get_all(app, "/plain/a", "/plain/b")
    assert _labels(registry) == {"/plain/{name}": 2}


async def test_one_endpoint_on_two_paths_gets_each_template() -> None:
    """An endpoint added on two paths is labelled with the template each request matched."""
    app = FastAPI()
    app.add_route("/first/{name}", plain)
    app.add_route("/second/{name}", plain)
    registry = _audited(app)
    await _get_all(app, "/second/x", "/first/y", "/second/z")
    assert _labels(registry) == {"/first/{name}": 1, "/second/{name}": 2}


async def test_included_router_with_prefix_keeps_the_prefix() -> None:
    """A route of a router included with a prefix is labelled prefix + template."""
    router = APIRouter(prefix="/v1")

    @router.get("/things/{thing_id}")
    def thing(thing_id: int) -> int:
        return thing_id

    app = FastAPI()
    app.include_router(router)
    registry = _audited(app)
    await _get_all(app, "/v1/things/7")
    assert _labels(registry) == {"/v1/things/{thing_id}": 1}


async def test_mounted_fastapi_app_routes_carry_the_mount_prefix() -> None:
    """Plain and API routes of a mounted FastAPI app are labelled mount prefix + template."""
    sub = FastAPI()
    sub.add_route("/plain/{name}", plain)

    @sub.get("/api/{n}")
    def api(n: int) -> int:
        return n

    app = FastAPI()
    app.mount("/sub", sub)
    registry = _audited(app)
    await _get_all(app, "/sub/plain/x", "/sub/api/3", "/sub/docs")
    assert _labels(registry) == {"/sub/plain/{name}": 1, "/sub/api/{n}": 1, "/sub/docs": 1}


async def test_mounted_static_files_share_one_label(tmp_path: Path) -> None:
    """Files served by a mounted `StaticFiles` share the label `<prefix>/{path}`."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=tmp_path), name="static")
    registry = _audited(app)
    await _get_all(app, "/static/a.txt", "/static/b.txt")
    assert _labels(registry) == {"/static/{path}": 2}


async def test_mount_of_routes_with_a_parameter() -> None:
    """A `Mount` of plain routes inside a FastAPI app: the mount's parameter is named back."""
    app = FastAPI()
    app.router.routes.append(Mount("/t/{tenant}", routes=[Route("/x/{y}", plain)]))
    registry = _audited(app)
    await _get_all(app, "/t/acme/x/1", "/t/other/x/2")
    assert _labels(registry) == {"/t/{tenant}/x/{y}": 2}


async def test_fastapi_app_mounted_in_a_starlette_app() -> None:
    """A FastAPI app mounted in a Starlette app: its plain routes are labelled too."""
    inner = FastAPI()
    inner.add_route("/plain/{name}", plain)
    app = Starlette(routes=[Mount("/api", inner)])
    registry = _audited(app)
    await _get_all(app, "/api/plain/x", "/api/openapi.json")
    assert _labels(registry) == {"/api/plain/{name}": 1, "/api/openapi.json": 1}


async def test_requests_no_route_matched_stay_unmatched() -> None:
    """A 404 next to plain routes is still labelled `<unmatched>`."""
    app = FastAPI()
    app.add_route("/plain/{name}", plain)
    registry = _audited(app)
    async with asgi_client(app) as c:
        assert (await c.get("/nowhere")).status_code == 404
    assert _labels(registry) == {"<unmatched>": 1}


def test_websockets_pass_through_unaudited(reports: list[Report]) -> None:
    """A real websocket session through the middleware works and opens no unit of work."""
    app = FastAPI()

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    registry = _audited(app)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("ping")
        assert ws.receive_text() == "ping"
    assert reports == []
    assert _labels(registry) == {}
