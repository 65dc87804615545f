"""querywatch.console: the ring buffer, the JSON API, the security rules and the settings, over
real SQLite through httpx's ASGI transport (the browser tests are in test_console_browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import querywatch
import querywatch.fastapi
from querywatch import ConfigError, _collection, _guard
from querywatch.console import Console, _api
from querywatch.console._app import COOKIE, CSP, cookie_value
from tests.web_apps import warm

TOKEN = "s3cret-token-0123456789"
LOOPBACK = ("127.0.0.1", 40000)
REMOTE = ("203.0.113.7", 40000)
_LOOP = sa.text("SELECT :i AS item")


def _shop_app(engine: sa.Engine, settings: querywatch.Settings) -> FastAPI:
    """A FastAPI app with an N+1 endpoint (a statement per item), a clean one and a write loop."""
    warm(engine)
    app = FastAPI()

    @app.get("/items/{item_id}")
    def items(item_id: int) -> dict[str, int]:
        with engine.connect() as conn:
            for i in range(8):
                conn.execute(_LOOP, {"i": i})  # the N+1
        return {"item_id": item_id}

    @app.get("/clean")
    def clean() -> dict[str, int]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {}

    querywatch.fastapi.setup(app, engine, settings=settings, registry=CollectorRegistry())
    return app


@pytest.fixture
def make_app(
    sqlite_web_engine: sa.Engine,
) -> Iterator[Callable[..., FastAPI]]:
    """Build console-enabled apps on the test's SQLite engine; their consoles are closed after."""
    apps: list[FastAPI] = []

    def make(**settings: Any) -> FastAPI:
        app = _shop_app(sqlite_web_engine, querywatch.Settings(console=True, **settings))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.querywatch_console.close()


@pytest.fixture
async def open_client() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """httpx clients on the ASGI transport, from a chosen client address and host."""
    clients: list[httpx.AsyncClient] = []

    def make(
        app: Any, client: tuple[str, int] = LOOPBACK, host: str = "127.0.0.1:8000"
    ) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app, client=client)
        made = httpx.AsyncClient(transport=transport, base_url=f"http://{host}")
        clients.append(made)
        return made

    yield make
    for made in clients:
        await made.aclose()


def _record(console: Console, n: int, engine: sa.Engine) -> None:
    for i in range(n):
        with querywatch.watch(f"job-{i}"), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))


# --- ring buffer --------------------------------------------------------------------------


def test_buffer_keeps_only_the_last_units(sqlite_web_engine: sa.Engine) -> None:
    """With console_units=3, five units leave the newest three, newest first."""
    console = Console(settings=querywatch.Settings(console=True, console_units=3))
    try:
        _record(console, 5, sqlite_web_engine)
        assert [unit.name for unit in console.buffer] == ["job-4", "job-3", "job-2"]
    finally:
        console.close()


def test_unit_that_left_the_buffer_is_gone(sqlite_web_engine: sa.Engine) -> None:
    """A unit pushed out of the buffer is no longer found by its id; the newest is."""
    console = Console(settings=querywatch.Settings(console=True, console_units=2))
    try:
        _record(console, 3, sqlite_web_engine)
        assert console.buffer.get(1) is None
        newest = console.buffer.get(console.buffer.latest_id)
        assert newest is not None
        assert newest.name == "job-2"
    finally:
        console.close()


def test_snapshot_keeps_at_most_max_queries_statements(sqlite_web_engine: sa.Engine) -> None:
    """A unit's snapshot keeps the first `max_queries` statements and the exact count."""
    console = Console(settings=querywatch.Settings(console=True))
    settings = querywatch.Settings(max_queries=4)
    try:
        with querywatch.watch("big", settings=settings), sqlite_web_engine.connect() as conn:
            for i in range(10):
                conn.execute(sa.text(f"SELECT {i}"))
        (unit,) = console.buffer
        assert (unit.statements, len(unit.queries)) == (10, 4)
    finally:
        console.close()


def test_nothing_is_recorded_while_the_console_is_off(sqlite_web_engine: sa.Engine) -> None:
    """Without a console no reporter is added, and a closed console records nothing more."""
    app = _shop_app(sqlite_web_engine, querywatch.Settings())
    assert not hasattr(app.state, "querywatch_console")
    assert not any(isinstance(getattr(r, "__self__", None), Console) for r in _reporters())
    console = Console(settings=querywatch.Settings(console=True))
    console.close()
    _record(console, 2, sqlite_web_engine)
    assert len(console.buffer) == 0
    assert not any(isinstance(getattr(r, "__self__", None), Console) for r in _reporters())


def _reporters() -> list[Any]:
    return list(_collection._reporters)


# --- JSON API -----------------------------------------------------------------------------


async def test_units_api_lists_requests_newest_first(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """/api/units lists each request with route, path, status, statements and finding kinds."""
    client = open_client(make_app())
    await client.get("/items/7")
    await client.get("/clean")
    units = (await client.get("/_querywatch/api/units")).json()["units"]
    assert [
        (u["route"], u["path"], u["status"], u["statements"], u["findings"]) for u in units
    ] == [
        ("/clean", "/clean", 200, 1, {}),
        ("/items/{item_id}", "/items/7", 200, 8, {"n_plus_one": 1}),
    ]


async def test_units_api_filters(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """`findings=1`, `route=`, `finding=` and `after=` narrow the list."""
    client = open_client(make_app())
    await client.get("/items/1")
    await client.get("/clean")
    api = "/_querywatch/api/units"

    async def routes(**params: str) -> list[str]:
        return [u["route"] for u in (await client.get(api, params=params)).json()["units"]]

    assert await routes(findings="1") == ["/items/{item_id}"]
    assert await routes(route="clean") == ["/clean"]
    assert await routes(finding="bulk_write") == []
    latest = (await client.get(api)).json()["latest"]
    await client.get("/clean")
    assert await routes(after=str(latest)) == ["/clean"]


async def test_units_api_slower_than_filter(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """`slower_ms` drops units faster than it (none of these requests takes an hour)."""
    client = open_client(make_app())
    await client.get("/clean")
    params = {"slower_ms": "3600000"}
    assert (await client.get("/_querywatch/api/units", params=params)).json()["units"] == []


async def test_unit_api_groups_the_repeated_statement(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """/api/units/{id} groups the repeated statement (8 runs), tagged N+1, with its call site."""
    client = open_client(make_app())
    await client.get("/items/3")
    unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
    unit = (await client.get(f"/_querywatch/api/units/{unit_id}")).json()
    (group,) = unit["groups"]
    assert (group["count"], group["finding"], group["fingerprint"]) == (
        8,
        "n_plus_one",
        "select ? as item",
    )
    assert group["callsite"].startswith("tests/test_console.py:")
    assert [s["group"] for s in unit["statement_list"]] == [0] * 8
    (finding,) = unit["finding_list"]
    assert "loop" in finding["fix"] or "one query" in finding["fix"]


async def test_unit_api_shows_pool_figures_and_request_id(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """The unit document carries the pool figures and the request id the client sent."""
    client = open_client(make_app())
    await client.get("/clean", headers={"X-Request-ID": "req-42"})
    unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
    unit = (await client.get(f"/_querywatch/api/units/{unit_id}")).json()
    assert unit["request_id"] == "req-42"
    assert (unit["pool"]["checkouts"], unit["pool"]["leaked"]) == (1, 0)


async def test_unit_api_unknown_id_is_404(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A unit id that is not (or no longer) in the buffer answers 404."""
    client = open_client(make_app())
    assert (await client.get("/_querywatch/api/units/999")).status_code == 404


async def test_parameters_appear_only_with_log_parameters(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Finding parameter examples are in the unit document only with log_parameters=True."""
    shown: dict[bool, Any] = {}
    for log_parameters in (False, True):
        client = open_client(make_app(log_parameters=log_parameters))
        await client.get("/items/5")
        unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
        unit = (await client.get(f"/_querywatch/api/units/{unit_id}")).json()
        shown[log_parameters] = unit["finding_list"][0].get("parameters")
        await client.aclose()
    assert shown[False] is None
    assert shown[True]
    assert shown[True][0] == "(0,)"


async def test_routes_api_aggregates_per_route(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """/api/routes gives per route template the requests, statements median/p95/max and N+1 rate."""
    client = open_client(make_app())
    for i in range(3):
        await client.get(f"/items/{i}")
    await client.get("/clean")
    routes = {r["route"]: r for r in (await client.get("/_querywatch/api/routes")).json()["routes"]}
    items = routes["/items/{item_id}"]
    assert (items["requests"], items["statements_median"], items["statements_p95"]) == (3, 8, 8)
    assert (items["n_plus_one_rate"], items["last_finding"]) == (1.0, "n_plus_one")
    assert (routes["/clean"]["n_plus_one_rate"], routes["/clean"]["statements_max"]) == (0.0, 1)


async def test_editor_links_follow_console_editor(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """With console_editor='vscode' a call site links to vscode://file/<absolute path>:<line>."""
    client = open_client(make_app(console_editor="vscode"))
    await client.get("/items/1")
    unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
    group = (await client.get(f"/_querywatch/api/units/{unit_id}")).json()["groups"][0]
    line = group["callsite"].split(":")[1].split()[0]
    assert group["editor_url"] == f"vscode://file/{__file__}:{line}"


async def test_console_requests_are_never_audited(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Requests to the console open no unit of work: the list does not grow from reading it."""
    client = open_client(make_app())
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await client.get("/_querywatch/api/units")
        await client.get("/_querywatch/")
    assert (await client.get("/_querywatch/api/units")).json()["units"] == []
    assert logs == []


async def test_page_and_static_files_are_served_with_csp(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """The page and its static files carry the strict Content-Security-Policy."""
    client = open_client(make_app())
    for path in (
        "/_querywatch/",
        "/_querywatch/static/console.js",
        "/_querywatch/static/console.css",
    ):
        response = await client.get(path)
        assert (response.status_code, response.headers["content-security-policy"]) == (200, CSP)
    assert "'unsafe-inline'" not in CSP


async def test_console_path_is_configurable(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """console_path moves the console; the default path is then the app's own (404)."""
    client = open_client(make_app(console_path="/internal/qw"))
    assert (await client.get("/internal/qw/api/units")).status_code == 200
    assert (await client.get("/_querywatch/api/units")).status_code == 404


async def test_console_mounts_on_a_plain_starlette_app(
    sqlite_web_engine: sa.Engine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """`Console.wrap()` serves the console in front of any ASGI app audited by the middleware."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    app.add_middleware(querywatch.QueryWatchMiddleware, registry=CollectorRegistry())
    console = Console(settings=querywatch.Settings(console=True))
    try:
        client = open_client(console.wrap(app))
        assert (await client.get("/")).text == "hi"
        units = (await client.get("/_querywatch/api/units")).json()["units"]
        assert [u["route"] for u in units] == ["/"]
    finally:
        console.close()


async def test_setup_reads_console_from_settings_env(
    sqlite_web_engine: sa.Engine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """QUERYWATCH_CONSOLE=1 through Settings.from_env() turns the console on in setup()."""
    settings = querywatch.Settings.from_env({"QUERYWATCH_CONSOLE": "1"})
    app = _shop_app(sqlite_web_engine, settings)
    try:
        assert (await open_client(app).get("/_querywatch/api/units")).status_code == 200
    finally:
        app.state.querywatch_console.close()


# --- security -----------------------------------------------------------------------------


async def test_non_loopback_client_gets_404(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Without a token, a client that is not loopback gets the app's own 404."""
    client = open_client(make_app(), client=REMOTE)
    for path in ("/_querywatch/", "/_querywatch/api/units", "/_querywatch/static/console.js"):
        response = await client.get(path)
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


async def test_loopback_client_with_a_foreign_host_gets_404(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A loopback client asking for another host name (DNS rebinding) gets 404."""
    client = open_client(make_app(), host="attacker.example:8000")
    assert (await client.get("/_querywatch/api/units")).status_code == 404


async def test_token_is_required_from_every_client(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """With console_token, loopback and remote clients without it, or with a wrong one, get 404."""
    app = make_app(console_token=TOKEN)
    for address in (LOOPBACK, REMOTE):
        client = open_client(app, client=address)
        assert (await client.get("/_querywatch/api/units")).status_code == 404
        wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
        assert (await client.get("/_querywatch/api/units", headers=wrong)).status_code == 404


async def test_bearer_token_opens_the_console(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A remote client presenting `Authorization: Bearer <token>` is served."""
    client = open_client(make_app(console_token=TOKEN), client=REMOTE)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/_querywatch/api/units", headers=headers)).status_code == 200


async def test_login_sets_a_cookie_that_opens_the_console(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """/login?token= sets an HttpOnly, SameSite=Strict cookie (not the token) that is accepted."""
    client = open_client(make_app(console_token=TOKEN), client=REMOTE)
    login = await client.get("/_querywatch/login", params={"token": TOKEN})
    assert (login.status_code, login.headers["location"]) == (303, "/_querywatch/")
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={cookie_value(TOKEN)};")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    assert (await client.get("/_querywatch/api/units")).status_code == 200


async def test_login_with_a_wrong_token_gets_404(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A wrong login token gets 404 and no cookie."""
    client = open_client(make_app(console_token=TOKEN), client=REMOTE)
    login = await client.get("/_querywatch/login", params={"token": "nope" * 5})
    assert (login.status_code, "set-cookie" in login.headers) == (404, False)


async def test_post_without_the_console_header_is_refused(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A POST without the console's own header (a cross-site form) does nothing."""
    client = open_client(make_app(log_parameters=True, console_explain=True))
    await client.get("/items/1")
    unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
    path = f"/_querywatch/api/units/{unit_id}/groups/0/explain"
    assert (await client.post(path)).status_code == 404
    assert (await client.post(path, headers={"X-Querywatch-Console": "1"})).status_code == 200


async def test_exposed_bind_without_token_logs_a_warning(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """The first request to a server bound beyond loopback, with no token, logs a warning once."""
    # httpx's ASGI transport puts the URL's host in scope["server"]: the bind address
    client = open_client(make_app(), host="192.0.2.1:8000")
    with structlog.testing.capture_logs() as logs:
        await client.get("/clean")
        await client.get("/clean")
    exposed = [e for e in logs if e["event"] == "querywatch.console_exposed"]
    assert [e["bind"] for e in exposed] == ["192.0.2.1"]


async def test_loopback_bind_logs_no_warning(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A server bound to loopback logs no console_exposed warning."""
    client = open_client(make_app())
    with structlog.testing.capture_logs() as logs:
        await client.get("/clean")
    assert [e for e in logs if e["event"] == "querywatch.console_exposed"] == []


# --- EXPLAIN ------------------------------------------------------------------------------


async def _explain(client: httpx.AsyncClient, group: int = 0) -> httpx.Response:
    unit_id = (await client.get("/_querywatch/api/units")).json()["latest"]
    path = f"/_querywatch/api/units/{unit_id}/groups/{group}/explain"
    return await client.post(path, headers={"X-Querywatch-Console": "1"})


async def test_explain_shows_the_sqlite_plan(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """EXPLAIN QUERY PLAN of a captured SELECT comes back as columns and rows."""
    client = open_client(make_app(log_parameters=True, console_explain=True))
    await client.get("/items/1")
    plan = (await _explain(client)).json()
    assert (plan["dialect"], "detail" in plan["columns"]) == ("sqlite", True)


async def test_explain_is_off_by_default(
    make_app: Callable[..., FastAPI], open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Without console_explain the explain call is refused and no group offers it."""
    client = open_client(make_app())
    await client.get("/items/1")
    assert (await _explain(client)).status_code == 403


def _write_app(engine: sa.Engine) -> FastAPI:
    app = FastAPI()

    @app.post("/write")
    def write() -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS console_w (n INTEGER)"))
            conn.execute(sa.text("INSERT INTO console_w (n) VALUES (1)"))
        return {}

    settings = querywatch.Settings(console=True, log_parameters=True, console_explain=True)
    querywatch.fastapi.setup(app, engine, settings=settings, registry=CollectorRegistry())
    return app


async def test_explain_refuses_a_write(
    sqlite_web_engine: sa.Engine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """An INSERT is never explained (nor run again)."""
    warm(sqlite_web_engine)
    app = _write_app(sqlite_web_engine)
    try:
        client = open_client(app)
        await client.post("/write")
        response = await _explain(client, group=1)
        assert (response.status_code, response.json()["error"]) == (
            400,
            "only SELECT statements are explained",
        )
        with sqlite_web_engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM console_w")) == 1
    finally:
        app.state.querywatch_console.close()


@pytest.mark.postgres
async def test_explain_shows_the_postgresql_plan(
    pg_engine: sa.Engine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """On PostgreSQL the plan is EXPLAIN's text, read in a read-only transaction."""
    app = _shop_app(
        pg_engine, querywatch.Settings(console=True, log_parameters=True, console_explain=True)
    )
    try:
        client = open_client(app)
        await client.get("/items/1")
        plan = (await _explain(client)).json()
        assert (plan["dialect"], plan["columns"]) == ("postgresql", ["QUERY PLAN"])
        assert plan["rows"][0][0].startswith("Result")
    finally:
        app.state.querywatch_console.close()


@pytest.mark.mariadb
async def test_explain_shows_the_mariadb_plan(
    mariadb_engine: sa.Engine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """On MariaDB the plan is EXPLAIN's table (id, select_type, table, ...)."""
    app = _shop_app(
        mariadb_engine,
        querywatch.Settings(console=True, log_parameters=True, console_explain=True),
    )
    try:
        client = open_client(app)
        await client.get("/items/1")
        plan = (await _explain(client)).json()
        assert (plan["dialect"], plan["columns"][:2]) == ("mysql", ["id", "select_type"])
    finally:
        app.state.querywatch_console.close()


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"console_path": "_querywatch"}, "console_path"),
        ({"console_path": "/qw/"}, "console_path"),
        ({"console_path": "/<script>"}, "console_path"),
        ({"console_units": 0}, "console_units"),
        ({"console_token": "short"}, "console_token"),
        ({"console_explain": True}, "console_explain"),
        ({"console_editor": "javascript:alert('{path}')"}, "console_editor"),
        ({"console_editor": "vscode://file/"}, "console_editor"),
        ({"console": "yes"}, "console"),
    ],
)
def test_bad_console_settings_fail_naming_the_setting(
    changes: dict[str, Any], setting: str
) -> None:
    """An invalid console setting raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        querywatch.Settings(**changes)


def test_console_token_never_appears_in_the_settings_repr() -> None:
    """The token is a secret: repr(Settings) leaves it out."""
    assert TOKEN not in repr(querywatch.Settings(console_token=TOKEN))


def test_console_settings_from_env() -> None:
    """Each console setting is read from its QUERYWATCH_ variable."""
    settings = querywatch.Settings.from_env(
        {
            "QUERYWATCH_CONSOLE": "true",
            "QUERYWATCH_CONSOLE_PATH": "/debug/queries",
            "QUERYWATCH_CONSOLE_UNITS": "50",
            "QUERYWATCH_CONSOLE_TOKEN": TOKEN,
            "QUERYWATCH_CONSOLE_EDITOR": "pycharm",
        }
    )
    assert (settings.console, settings.console_path, settings.console_units) == (
        True,
        "/debug/queries",
        50,
    )
    assert (settings.console_token, settings.console_editor) == (TOKEN, "pycharm")


def test_snapshot_cuts_huge_statement_shapes(sqlite_web_engine: sa.Engine) -> None:
    """A statement shape longer than max_sql_length is kept cut to it: a unit has a bounded size."""
    console = Console(settings=querywatch.Settings(console=True))
    settings = querywatch.Settings(max_sql_length=100)
    columns = ", ".join(f"1 AS c{i}" for i in range(60))
    try:
        with querywatch.watch("wide", settings=settings), sqlite_web_engine.connect() as conn:
            conn.execute(sa.text(f"SELECT {columns}"))
        ((shape, *_),) = next(iter(console.buffer)).queries
        assert (len(shape), shape.endswith("\u2026")) == (102, True)
    finally:
        console.close()


async def test_explain_runs_on_an_async_engine(
    aiosqlite_engine: AsyncEngine, open_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A SELECT captured on an AsyncEngine is explained through that engine."""
    app = FastAPI()

    @app.get("/rows")
    async def rows() -> dict[str, int]:
        async with aiosqlite_engine.connect() as conn:
            await conn.execute(sa.text("SELECT :n AS n"), {"n": 1})
        return {}

    settings = querywatch.Settings(console=True, log_parameters=True, console_explain=True)
    querywatch.fastapi.setup(app, aiosqlite_engine, settings=settings, registry=CollectorRegistry())
    try:
        client = open_client(app)
        await client.get("/rows")
        plan = (await _explain(client)).json()
        assert (plan["dialect"], "detail" in plan["columns"]) == ("sqlite", True)
    finally:
        app.state.querywatch_console.close()


async def test_console_bug_is_logged_never_raised_into_the_app(
    make_app: Callable[..., FastAPI],
    open_client: Callable[..., httpx.AsyncClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failing console answers 500 itself and counts an internal error; the app still works."""
    monkeypatch.setattr(_guard, "raise_internal_errors", False)
    app = make_app()
    client = open_client(app)

    def broken(*args: Any) -> Any:
        raise RuntimeError("console bug")

    monkeypatch.setattr(_api, "units", broken)
    before = _guard.internal_error_counts().get("console", 0)
    assert (await client.get("/_querywatch/api/units")).status_code == 500
    assert _guard.internal_error_counts()["console"] == before + 1
    assert (await client.get("/clean")).status_code == 200
