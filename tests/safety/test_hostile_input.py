"""Hostile input: request ids, paths, methods and statements chosen by an attacker (or a
buggy client) never break a request, never reach logs unvalidated, never grow the metrics'
label sets and never make querywatch hold or log megabytes."""

from __future__ import annotations

import gc
import random
import re
import string
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

import querywatch
from querywatch import Settings, fingerprint
from querywatch.fastapi import setup
from querywatch.fingerprinting import MAX_INPUT
from querywatch.middleware import KNOWN_METHODS, UNMATCHED_ROUTE
from tests.conftest import Logs
from tests.web_apps import fastapi_app, run_statements

Headers = Sequence[tuple[bytes, bytes]]
HEX_ID = re.compile(r"[0-9a-f]{32}")
TEN_MB = 10 * 1024 * 1024


async def call(
    app: Any, method: str, path: str, headers: Headers = ()
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """One request straight over ASGI (no HTTP client to clean up what a hostile client
    sends): the status and the response headers."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("203.0.113.7", 40000),
        "server": ("testserver", 80),
    }
    requested = False
    started: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:
            return {"type": "http.disconnect"}
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    await app(scope, receive, send)
    (start,) = started
    return start["status"], list(start.get("headers", ()))


def _app(engine: sa.Engine, registry: CollectorRegistry, **settings: Any) -> FastAPI:
    app = fastapi_app(engine)

    @app.get("/logged")
    def logged() -> dict[str, bool]:
        structlog.get_logger("app").info("app.event")
        run_statements(engine, 1)
        return {"ok": True}

    setup(app, engine, settings=Settings(log_requests="all", **settings), registry=registry)
    return app


def _request_ids(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [value for key, value in headers if key.lower() == b"x-request-id"]


# -- request ids ------------------------------------------------------------------------------

HOSTILE_IDS = {
    "64kb": b"r" * 65_536,
    "129-chars": b"r" * 129,
    "empty": b"",
    "crlf-injection": b"abc\r\nSet-Cookie: session=stolen",
    "lf-log-forging": b'abc\n{"event": "forged", "level": "critical"}',
    "nul": b"abc\x00def",
    "ansi-escape": b"\x1b[31mred\x1b[0m",
    "tab-and-space": b"abc\tdef ghi",
    "utf8-non-latin-1": "żółć-идентификатор-🐍".encode(),
    "invalid-utf8": b"\xff\xfe\xfd\x80",
    "json-quotes": b'"},"level":"critical',
    "percent-encoded-crlf": b"abc%0d%0aSet-Cookie:x",
}


@pytest.mark.parametrize("value", list(HOSTILE_IDS.values()), ids=list(HOSTILE_IDS))
async def test_hostile_request_id_is_replaced_everywhere(
    sqlite_web_engine: sa.Engine, logs: Logs, value: bytes
) -> None:
    """A hostile X-Request-ID never breaks the request: a fresh id replaces it in the one
    echoed header, in querywatch's events and in the app's own log lines."""
    app = _app(sqlite_web_engine, CollectorRegistry())
    status, headers = await call(app, "GET", "/logged", [(b"x-request-id", value)])
    assert status == 200
    (echoed,) = _request_ids(headers)
    assert HEX_ID.fullmatch(echoed.decode("ascii"))
    assert all(b"\r" not in v and b"\n" not in v for _, v in headers)
    events = logs.events()
    assert {e["event"] for e in events} == {"app.event", "querywatch.request"}
    assert {e["request_id"] for e in events} == {echoed.decode("ascii")}
    if value:
        assert value.decode("latin-1")[:32] not in logs.buffer.getvalue()


async def test_many_duplicate_request_id_headers_keep_the_first(
    sqlite_web_engine: sa.Engine, logs: Logs
) -> None:
    """Ten thousand X-Request-ID headers: the first decides, the response carries one."""
    app = _app(sqlite_web_engine, CollectorRegistry())
    headers = [(b"x-request-id", f"id-{i}".encode()) for i in range(10_000)]
    status, response_headers = await call(app, "GET", "/logged", headers)
    assert (status, _request_ids(response_headers)) == (200, [b"id-0"])
    assert {e["request_id"] for e in logs.events()} == {"id-0"}


async def test_hostile_first_duplicate_is_not_rescued_by_later_ones(
    sqlite_web_engine: sa.Engine, logs: Logs
) -> None:
    """When the first of many X-Request-ID headers is hostile, a fresh id is used, not a later
    header the client may have crafted to look sane."""
    app = _app(sqlite_web_engine, CollectorRegistry())
    headers = [(b"x-request-id", b"bad\r\nid"), *[(b"x-request-id", b"chosen")] * 100]
    _, response_headers = await call(app, "GET", "/logged", headers)
    (echoed,) = _request_ids(response_headers)
    assert HEX_ID.fullmatch(echoed.decode("ascii"))


# -- label cardinality --------------------------------------------------------------------------

ODD_METHODS = ["PROPFIND", "FOO", "MKCOL", "M-SEARCH", "BREW", "get", "Options", "GÉT", "X" * 300]


def _label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {
        sample.labels[label]
        for metric in registry.collect()
        for sample in metric.samples
        if label in sample.labels and metric.name.startswith("querywatch_")
    }


async def test_random_paths_and_methods_add_one_label_value_each(
    sqlite_web_engine: sa.Engine,
) -> None:
    """10,000 requests with random paths, random and non-standard methods and CORS preflights:
    the route label has one value for everything unmatched, the method label one for every
    non-standard method."""
    registry = CollectorRegistry()
    app = fastapi_app(sqlite_web_engine)
    app.add_middleware(
        CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["GET", "POST"]
    )
    setup(app, sqlite_web_engine, registry=registry)  # outermost: it sees the preflights
    rng = random.Random(8)
    alphabet = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@é€🐍 "
    statuses: set[int] = set()
    for i in range(10_000):
        word = "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
        path = f"/x{word}/{rng.randint(0, 10**9)}" if i % 10 else f"/items/{i % 7}"
        kind = i % 4
        if kind == 0:
            method = rng.choice(ODD_METHODS)
        elif kind == 1:
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, 12)))
        elif kind == 2:
            method = rng.choice(sorted(KNOWN_METHODS))
        else:
            method = "OPTIONS"  # a CORS preflight
        headers: list[tuple[bytes, bytes]] = []
        if method == "OPTIONS" and i % 2:
            origin = rng.choice([b"https://app.example", b"https://evil.example"])
            headers = [(b"origin", origin), (b"access-control-request-method", b"GET")]
        status, _ = await call(app, method, path, headers)
        statuses.add(status)
    assert {200, 400, 404, 405} <= statuses
    assert _label_values(registry, "route") == {UNMATCHED_ROUTE, "/items/{n}"}
    methods = _label_values(registry, "method")
    assert {"OTHER", "OPTIONS", "GET"} <= methods <= KNOWN_METHODS | {"OTHER"}


# -- huge statements ------------------------------------------------------------------------------


def _huge_select() -> str:
    """About 10 MB of SQL whose shape is long too: 1,500 columns, then a 10 MB string literal."""
    columns = ", ".join(f"1 AS c{i}" for i in range(1_500))
    return f"SELECT :id AS id, {columns}, '{'x' * TEN_MB}' AS blob"


async def test_huge_statement_loop_is_cut_in_log_events(
    sqlite_web_engine: sa.Engine, logs: Logs
) -> None:
    """A 10 MB statement run in an N+1 loop of a request is logged cut to `max_sql_length`,
    with the truncation marker, in lines of a few kilobytes."""
    statement = sa.text(_huge_select())
    app = fastapi_app(sqlite_web_engine)

    @app.get("/huge")
    def huge() -> dict[str, int]:
        with sqlite_web_engine.connect() as conn:
            for i in range(6):
                conn.execute(statement, {"id": i})
        return {"n": 6}

    setup(
        app, sqlite_web_engine, settings=Settings(log_requests="all"), registry=CollectorRegistry()
    )
    status, _ = await call(app, "GET", "/huge")
    assert status == 200
    by_event = {e["event"]: e for e in logs.events()}
    shape = by_event["querywatch.n_plus_one"]["fingerprint"]
    assert re.fullmatch(r"select \? as id, \? as c0, .*\.\.\. \[truncated \d+ chars\]", shape)
    assert len(shape) <= Settings().max_sql_length + 40
    assert by_event["querywatch.request"]["n_plus_one"] == 1
    assert max(len(line) for line in logs.lines) < 8_000


def test_giant_in_list_duplicate_logs_a_short_shape(sqlite_engine: sa.Engine, logs: Logs) -> None:
    """A statement with an IN list of 300,000 literals, run twice, is one duplicate finding
    whose logged shape is a few dozen characters."""
    sql = f"SELECT 1 WHERE 1 IN ({', '.join(map(str, range(300_000)))})"
    assert len(sql) > 2_000_000
    with querywatch.watch("in-list") as report, sqlite_engine.connect() as conn:
        for _ in range(2):
            conn.exec_driver_sql(sql)
    (finding,) = report.duplicates
    assert finding.fingerprint.startswith("select ? where ? in (?)")
    (line,) = logs.lines
    assert len(line) < 2_000


def _traced(run: Any) -> tuple[int, int]:
    """(memory still allocated after `run()`, peak during it), in bytes above the start."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - start, peak - start


def test_huge_statement_loop_holds_no_copies(sqlite_engine: sa.Engine) -> None:
    """Eight executions of one 10 MB statement in a unit of work allocate far less than one
    copy of it beyond what the same loop allocates outside any unit."""
    statement = _huge_select().replace(":id", "?")
    with sqlite_engine.connect() as conn:
        conn.exec_driver_sql(statement, (0,))  # the driver's statement cache is warm

        def loop() -> None:
            for i in range(8):
                conn.exec_driver_sql(statement, (i,))

        def watched() -> None:
            with querywatch.watch("huge") as report:
                loop()
            assert len(report.n_plus_one) == 1

        _, bare_peak = _traced(loop)
        retained, peak = _traced(watched)
    assert peak - bare_peak < TEN_MB // 10
    assert retained < TEN_MB // 10


@pytest.fixture
def uncached_engine() -> Iterator[sa.Engine]:
    """An instrumented in-memory SQLite engine whose driver caches no statement strings."""
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"cached_statements": 0}
    )
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


def test_distinct_huge_statements_are_released_when_the_unit_ends(
    uncached_engine: sa.Engine,
) -> None:
    """Five distinct 10 MB statements: once their unit of work has ended, querywatch keeps
    nothing of them but their (bounded) shapes."""
    with uncached_engine.connect() as conn:

        def run() -> None:
            with querywatch.watch("distinct") as report:
                for i in range(5):
                    conn.exec_driver_sql(f"SELECT ?, '{string.ascii_letters[i] * TEN_MB}'", (i,))
            assert report.statements == 5

        retained, _ = _traced(run)
    assert retained < TEN_MB // 10


# -- hostile SQL text ------------------------------------------------------------------------------


def _seconds(sql: str) -> float:
    started = time.perf_counter()
    fingerprint(sql + " ")  # a new string: never a cache hit
    return time.perf_counter() - started


@pytest.mark.parametrize("unit", ["$a$", "$$", "$ab", "E'\\", "e'\\'", "1_", "0x_", "$1$", "a$b"])
def test_literal_forms_cost_linear_time(unit: str) -> None:
    """Dollar quotes, escaped strings and underscored numbers repeated 4x longer cost about 4x
    the time, not 16x."""
    # Best of 9, the two sizes interleaved: a busy machine slows single runs, not the best.
    times = [(_seconds(unit * 5_000), _seconds(unit * 20_000)) for _ in range(9)]
    small = min(t[0] for t in times)
    large = min(t[1] for t in times)
    assert large < small * 12 + 0.005


def test_ten_megabyte_statement_fingerprints_in_bounded_time() -> None:
    """A 10 MB statement is fingerprinted from its first `MAX_INPUT` characters only."""
    started = time.perf_counter()
    shape = fingerprint("SELECT '" + "$$ E'\\" * (TEN_MB // 6))
    assert time.perf_counter() - started < 1.0
    assert len(shape) < MAX_INPUT
