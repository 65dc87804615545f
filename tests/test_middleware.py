"""QueryWatchMiddleware: one unit of work per HTTP request, route templates, request ids,
exceptions, disconnects and concurrency, on real FastAPI and Starlette apps."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import string
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import querywatch
from querywatch import Report, Settings
from querywatch.middleware import UNMATCHED_ROUTE, QueryWatchMiddleware
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.web_apps import Boom, asgi_client, fastapi_app, run_statements, starlette_app


def _http(reports: list[Report]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r.http) for r in reports if r.http is not None]


def _with_middleware(app: Any, **kwargs: Any) -> Any:
    """Add the middleware (own registry). Engines are warmed first by `fastapi_app`."""
    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry(), **kwargs)
    return app


async def test_request_is_one_unit_of_work(web_engine: sa.Engine, reports: list[Report]) -> None:
    """A request's report holds its statements and method, route template and status."""
    app = _with_middleware(fastapi_app(web_engine))
    async with asgi_client(app) as c:
        response = await c.get("/items/4")
    (report,) = reports
    assert (report.kind, report.name, report.statements) == ("request", "GET /items/{n}", 4)
    assert report.http is not None
    assert {k: getattr(report.http, k) for k in ("method", "route", "status")} == {
        "method": "GET",
        "route": "/items/{n}",
        "status": 200,
    }
    assert report.http.request_id == response.headers["x-request-id"]


async def test_lifespan_and_websocket_scopes_pass_through(reports: list[Report]) -> None:
    """Non-HTTP scopes reach the app with the very receive/send they came with, unaudited."""
    seen: list[tuple[str, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], receive, send))

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    middleware = QueryWatchMiddleware(app, registry=CollectorRegistry())
    await middleware({"type": "lifespan"}, receive, send)
    await middleware({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert seen == [("lifespan", receive, send), ("websocket", receive, send)]
    assert reports == []


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/things/7", "/v1/things/{thing_id}"),
        ("/sub/s/abc", "/sub/s/{q}"),
        ("/items/2", "/items/{n}"),
    ],
)
async def test_route_label_is_the_template(
    sqlite_web_engine: sa.Engine, reports: list[Report], path: str, route: str
) -> None:
    """Routers included with a prefix and mounted sub-apps resolve to the full template."""
    app = _with_middleware(fastapi_app(sqlite_web_engine))
    async with asgi_client(app) as c:
        assert (await c.get(path)).status_code == 200
    assert [h["route"] for h in _http(reports)] == [route]


async def test_route_label_ignores_the_server_root_path(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """Behind a proxy prefix (`root_path`), the label is the app's template without it."""
    app = _with_middleware(fastapi_app(sqlite_web_engine))
    async with asgi_client(app, root_path="/api") as c:
        assert (await c.get("/api/v1/things/7")).status_code == 200
        assert (await c.get("/api/sub/s/x")).status_code == 200
    assert [h["route"] for h in _http(reports)] == ["/v1/things/{thing_id}", "/sub/s/{q}"]


async def test_starlette_routes_and_parameterised_mounts(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """Plain Starlette: route templates, and a mount's own parameters put back by name."""
    app = _with_middleware(starlette_app(sqlite_web_engine))
    async with asgi_client(app) as c:
        assert (await c.get("/items/3")).status_code == 200
        assert (await c.get("/m/acme/x/1")).status_code == 200
    assert [h["route"] for h in _http(reports)] == ["/items/{n}", "/m/{tenant}/x/{y}"]
    assert reports[0].statements == 3


async def test_unmatched_and_unknown_methods_collapse(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """404s share one route label, and a method outside HTTP's set is `OTHER`."""
    app = _with_middleware(fastapi_app(sqlite_web_engine))
    async with asgi_client(app) as c:
        assert (await c.get("/no/such/path")).status_code == 404
        assert (await c.request("BREW", "/items/1")).status_code == 405
    assert [(h["method"], h["route"], h["status"]) for h in _http(reports)] == [
        ("GET", UNMATCHED_ROUTE, 404),
        ("OTHER", "/items/{n}", 405),
    ]


async def test_thousand_random_paths_add_no_label_values(sqlite_web_engine: sa.Engine) -> None:
    """1,000 random unmatched paths leave exactly one route label value in the registry."""
    registry = CollectorRegistry()
    app = fastapi_app(sqlite_web_engine)
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    rng = random.Random(5)
    async with asgi_client(app) as c:
        for _ in range(1000):
            word = "".join(rng.choices(string.ascii_letters + string.digits, k=12))
            await c.get(f"/{word}/{rng.randint(0, 10**6)}")
        await c.get("/items/1")
    routes = {
        sample.labels["route"]
        for metric in registry.collect()
        if metric.name == "querywatch_request_db_statements"
        for sample in metric.samples
    }
    assert routes == {UNMATCHED_ROUTE, "/items/{n}"}


async def test_app_exception_passes_through_and_is_reported(
    web_engine: sa.Engine, reports: list[Report]
) -> None:
    """The app's exception reaches the caller unchanged; the request is reported with 500."""
    app = _with_middleware(fastapi_app(web_engine))
    async with asgi_client(app) as c:
        with pytest.raises(Boom, match="the app's own error"):
            await c.get("/boom")
    (http,) = _http(reports)
    assert (http["route"], http["status"], http["error"]) == ("/boom", 500, "Boom")
    assert reports[0].statements == 1


async def test_client_disconnect_is_reported(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """A client that goes away before the response still yields a report (status 499)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        run_statements(sqlite_web_engine, 2)
        message = await receive()
        assert message["type"] == "http.disconnect"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent to a client that left")

    middleware = QueryWatchMiddleware(app, registry=CollectorRegistry())
    scope = {"type": "http", "method": "GET", "path": "/slow", "headers": []}
    await middleware(scope, receive, send)
    (http,) = _http(reports)
    assert (http["status"], http["disconnected"], reports[0].statements) == (499, True, 2)


async def test_cancelled_request_is_reported(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """A request cancelled mid-flight (server dropping the client) is reported, then cancelled."""
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        run_statements(sqlite_web_engine, 1)
        started.set()
        await asyncio.Event().wait()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    middleware = QueryWatchMiddleware(app, registry=CollectorRegistry())
    scope = {"type": "http", "method": "GET", "path": "/slow", "headers": []}
    task = asyncio.ensure_future(middleware(scope, receive, send))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (http,) = _http(reports)
    assert (http["status"], http["disconnected"], reports[0].statements) == (499, True, 1)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("req-42.abc", True), ("x" * 129, False), ("bad id\n", False), ("", False)],
)
async def test_request_id_round_trip(
    sqlite_web_engine: sa.Engine, reports: list[Report], sent: str, kept: bool
) -> None:
    """A sane X-Request-ID is echoed and bound for the app's logs; others are replaced."""
    app = _with_middleware(fastapi_app(sqlite_web_engine))
    async with asgi_client(app) as c:
        response = await c.get("/context", headers={"X-Request-ID": sent})
    echoed = response.headers["x-request-id"]
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent
        assert len(echoed) == 32
        assert set(echoed) <= set(string.hexdigits)
    assert response.json() == {"request_id": echoed}
    assert _http(reports)[0]["request_id"] == echoed
    import structlog

    assert "request_id" not in structlog.contextvars.get_contextvars()


async def test_request_id_header_is_configurable(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """`Settings.request_id_header` names the header read and echoed."""
    settings = Settings(request_id_header="X-Correlation-ID")
    app = _with_middleware(fastapi_app(sqlite_web_engine), settings=settings)
    async with asgi_client(app) as c:
        response = await c.get("/items/1", headers={"X-Correlation-ID": "abc"})
    assert response.headers["x-correlation-id"] == "abc"
    assert "x-request-id" not in response.headers


@pytest.mark.parametrize("enabled", [False, True])
async def test_server_timing_header(
    sqlite_web_engine: sa.Engine, reports: list[Report], enabled: bool
) -> None:
    """`Settings.server_timing` adds `db;dur=...;desc="N statements"`; off by default."""
    settings = Settings(server_timing=enabled)
    app = _with_middleware(fastapi_app(sqlite_web_engine), settings=settings)
    async with asgi_client(app) as c:
        response = await c.get("/items/3")
    header = response.headers.get("server-timing")
    if not enabled:
        assert header is None
        return
    assert header is not None
    assert header.startswith("db;dur=")
    assert header.endswith(';desc="3 statements"')


async def test_excluded_paths_are_not_audited(
    sqlite_web_engine: sa.Engine, reports: list[Report]
) -> None:
    """Paths in `exclude_paths` pass through without a unit of work."""
    app = _with_middleware(fastapi_app(sqlite_web_engine), exclude_paths=["/items/1"])
    async with asgi_client(app) as c:
        await c.get("/items/1")
        await c.get("/items/2")
    assert [h["route"] for h in _http(reports)] == ["/items/{n}"]
    assert reports[0].statements == 2


@pytest.fixture(params=["sqlite", "postgresql"])
async def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A sync and an async engine on one database (a SQLite file, or PostgreSQL)."""
    if request.param == "postgresql":
        require_postgres()
        engine = sa.create_engine(PSYCOPG_URL, pool_size=20)
        async_engine = create_async_engine(ASYNCPG_URL, pool_size=20)
    else:
        path = tmp_path / "db.sqlite"
        engine = sa.create_engine(f"sqlite:///{path}", pool_size=20)
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", pool_size=20)
    querywatch.instrument(engine)
    querywatch.instrument(async_engine)
    async with async_engine.connect():
        pass  # the dialect's first-connect queries are not the app's
    yield engine, async_engine
    querywatch.uninstrument(engine)
    querywatch.uninstrument(async_engine)
    engine.dispose()
    await async_engine.dispose()


async def test_concurrent_requests_never_mix_their_counts(
    engines: tuple[sa.Engine, AsyncEngine], reports: list[Report]
) -> None:
    """200 concurrent requests, sync and async endpoints mixed: each reports its own count."""
    engine, async_engine = engines
    app = _with_middleware(fastapi_app(engine, async_engine))
    rng = random.Random(7)
    plan = [(i, rng.choice(["/items", "/async/items"]), rng.randint(0, 9)) for i in range(200)]
    async with asgi_client(app) as c:
        responses = await asyncio.gather(
            *(
                c.get(f"{prefix}/{n}", params={"tag": i}, headers={"x-request-id": f"r{i}"})
                for i, prefix, n in plan
            )
        )
    assert all(r.status_code == 200 for r in responses)
    by_id = {r.http.request_id: r for r in reports if r.http is not None}
    assert len(by_id) == 200
    for i, prefix, n in plan:
        report = by_id[f"r{i}"]
        assert report.statements == n, (i, prefix)
        assert report.http is not None
        assert report.http.route == f"{prefix}/{{n}}"


def test_middleware_keeps_no_per_request_state(sqlite_web_engine: sa.Engine) -> None:
    """The middleware's attributes are its configuration only (per-request state is local)."""
    middleware = QueryWatchMiddleware(fastapi_app(sqlite_web_engine), registry=CollectorRegistry())
    assert set(vars(middleware)) == {"app", "settings", "exclude_paths", "metrics"}


def test_settings_must_be_settings(sqlite_web_engine: sa.Engine) -> None:
    """A wrong `settings` argument fails at construction, naming the expected type."""
    with pytest.raises(TypeError, match=r"querywatch\.Settings"):
        QueryWatchMiddleware(fastapi_app(sqlite_web_engine), settings={"mode": "raise"})  # type: ignore[arg-type]
