"""`instrument_all()` and `setup(app)` without an engine: engines created afterwards (sync and
async, SQLite and PostgreSQL) are counted, idempotently and undoably; and the one warning when
requests keep running on engines querywatch does not instrument."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine  # bound before instrument_all(), as in most apps
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import create_async_engine

import querywatch
from querywatch import _guard, middleware
from querywatch._instrumentation import instrumented_engines
from querywatch.fastapi import setup
from querywatch.middleware import QueryWatchMiddleware
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, Logs, require_postgres
from tests.web_apps import asgi_client, run_statements, run_statements_async, warm

ORIGINAL_HOOK = Dialect.__dict__["engine_created"]


@pytest.fixture
def auto() -> Iterator[querywatch.AutoInstrumentation]:
    """`instrument_all()` for the test, undone after it."""
    handle = querywatch.instrument_all()
    yield handle
    querywatch.uninstrument_all()
    assert Dialect.__dict__["engine_created"] is ORIGINAL_HOOK


def _sync_url(name: str) -> str:
    if name == "postgresql":
        require_postgres()
        return PSYCOPG_URL
    return "sqlite://"


def _async_url(name: str) -> str:
    if name == "asyncpg":
        require_postgres()
        return ASYNCPG_URL
    return "sqlite+aiosqlite://"


def _is_instrumented(engine: sa.Engine) -> bool:
    return any(handle.engine is engine for handle in instrumented_engines())


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sync_engine_created_afterwards_is_counted(
    auto: querywatch.AutoInstrumentation, database: str
) -> None:
    """An `Engine` created after `instrument_all()` (through a `create_engine` imported
    before it) has its statements counted."""
    engine = create_engine(_sync_url(database))
    try:
        warm(engine)
        with querywatch.watch("after") as report:
            run_statements(engine, 3)
        assert report.statements == 3
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["aiosqlite", "asyncpg"])
async def test_async_engine_created_afterwards_is_counted(
    auto: querywatch.AutoInstrumentation, database: str
) -> None:
    """An `AsyncEngine` created after `instrument_all()` has its statements counted."""
    engine = create_async_engine(_async_url(database))
    try:
        async with engine.connect():
            pass
        async with querywatch.watch("after") as report:
            await run_statements_async(engine, 3)
        assert report.statements == 3
    finally:
        await engine.dispose()


def test_instrument_all_is_idempotent(auto: querywatch.AutoInstrumentation) -> None:
    """A second `instrument_all()` returns the same handle, and engines are instrumented once."""
    assert querywatch.instrument_all() is auto
    engine = create_engine("sqlite://")
    warm(engine)
    with querywatch.watch("once") as report:
        run_statements(engine, 2)
    assert (report.statements, [h.engine for h in auto.instrumentations]) == (2, [engine])
    engine.dispose()


def test_engines_that_exist_already_are_left_alone(tmp_path: Any) -> None:
    """An engine created before `instrument_all()` is not instrumented by it."""
    engine = create_engine("sqlite://")
    querywatch.instrument_all()
    try:
        assert not _is_instrumented(engine)
    finally:
        querywatch.uninstrument_all()
        engine.dispose()


def test_undo_restores_everything() -> None:
    """`uninstrument_all()` restores SQLAlchemy's hook, detaches querywatch from the engines it
    instrumented, and engines created afterwards are left alone."""
    auto = querywatch.instrument_all()
    during = create_engine("sqlite://")
    assert _is_instrumented(during)
    assert querywatch.uninstrument_all() is True
    after = create_engine("sqlite://")
    for engine in (during, after):
        warm(engine)
    with querywatch.watch("undone") as report:
        run_statements(during, 2)
        run_statements(after, 2)
    assert (
        Dialect.__dict__["engine_created"] is ORIGINAL_HOOK,
        auto.removed,
        _is_instrumented(during) or _is_instrumented(after),
        "do_execute" in during.dialect.__dict__,
        report.statements,
        querywatch.uninstrument_all(),
    ) == (True, True, False, False, 0, False)
    during.dispose()
    after.dispose()


def test_engines_instrumented_by_hand_stay_instrumented(
    sqlite_engine: sa.Engine,
) -> None:
    """Undoing `instrument_all()` leaves the engines passed to `instrument()` instrumented."""
    querywatch.instrument_all()
    querywatch.uninstrument_all()
    assert _is_instrumented(sqlite_engine)


def test_a_failing_hook_never_breaks_create_engine(
    auto: querywatch.AutoInstrumentation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error inside querywatch's hook is swallowed: `create_engine()` returns a working
    engine (not instrumented)."""
    monkeypatch.setattr(_guard, "injected_faults", frozenset({"engine"}))
    engine = create_engine("sqlite://")
    monkeypatch.setattr(_guard, "injected_faults", frozenset())
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 7").scalar() == 7
    assert not _is_instrumented(engine)
    engine.dispose()


def test_auto_instrumented_engines_are_freed(auto: querywatch.AutoInstrumentation) -> None:
    """querywatch keeps no engine it instrumented on its own alive."""
    engine = create_engine("sqlite://")
    warm(engine)
    ref = weakref.ref(engine)
    engine.dispose()
    del engine
    gc.collect()
    assert ref() is None


async def test_setup_without_engine_counts_an_engine_swapped_in_later() -> None:
    """`setup(app)` without an engine: the app's engine, disposed and replaced by a test
    suite's own, keeps being counted."""
    app = FastAPI()
    registry = CollectorRegistry()
    setup(app, registry=registry)
    try:
        engines = [create_engine("sqlite://", connect_args={"check_same_thread": False})]

        @app.get("/count/{n}")
        def count(n: int) -> dict[str, int]:
            run_statements(engines[-1], n)
            return {}

        warm(engines[-1])
        async with asgi_client(app) as c:
            assert (await c.get("/count/2")).status_code == 200
            engines[-1].dispose()
            engines.append(create_engine("sqlite://", connect_args={"check_same_thread": False}))
            warm(engines[-1])
            assert (await c.get("/count/3")).status_code == 200
    finally:
        querywatch.uninstrument_all()
        for engine in engines:
            engine.dispose()
    labels = {"route": "/count/{n}", "method": "GET"}
    assert registry.get_sample_value("querywatch_request_db_statements_sum", labels) == 5


# -- requests on engines querywatch does not instrument ---------------------------------------


@pytest.fixture
def uninstrumented_engine() -> Iterator[sa.Engine]:
    """A SQLite engine usable from a threadpool, not instrumented."""
    engine = create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    warm(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def silent_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide count of silent requests, from zero (and warned of: not yet)."""
    monkeypatch.setattr(middleware, "_silent_requests", 0)
    monkeypatch.setattr(middleware, "_silent_warned", False)


def _app(engine: sa.Engine, statements: int = 1) -> FastAPI:
    app = FastAPI()

    @app.get("/db")
    def db() -> dict[str, int]:
        if statements:
            run_statements(engine, statements)
        else:
            with engine.connect():
                pass
        return {}

    @app.get("/health")
    def health() -> dict[str, int]:
        return {}

    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    return app


def _no_statements_events(logs: Logs) -> list[dict[str, Any]]:
    return [e for e in logs.events() if e["event"] == "querywatch.no_statements"]


async def test_requests_on_an_uninstrumented_engine_log_one_warning(
    uninstrumented_engine: sa.Engine, silent_count: None, logs: Logs
) -> None:
    """Requests that ran statements only on an engine querywatch does not instrument log
    `querywatch.no_statements` once, at the third such request."""
    app = _app(uninstrumented_engine)
    async with asgi_client(app) as c:
        for _ in range(6):
            assert (await c.get("/db")).status_code == 200
    (event,) = _no_statements_events(logs)
    assert (event["level"], event["requests"], event["route"]) == ("warning", 3, "/db")
    assert "querywatch.instrument_all()" in event["hint"]


async def test_requests_without_database_work_log_nothing(
    uninstrumented_engine: sa.Engine, silent_count: None, logs: Logs
) -> None:
    """Requests that use no database connection at all are not silent requests."""
    app = _app(uninstrumented_engine)
    async with asgi_client(app) as c:
        for _ in range(6):
            assert (await c.get("/health")).status_code == 200
    assert _no_statements_events(logs) == []


async def test_an_unused_connection_of_an_instrumented_engine_logs_nothing(
    sqlite_web_engine: sa.Engine, silent_count: None, logs: Logs
) -> None:
    """A connection of an instrumented engine checked out without a statement is not a sign
    of an uninstrumented engine."""
    warm(sqlite_web_engine)
    app = _app(sqlite_web_engine, statements=0)
    async with asgi_client(app) as c:
        for _ in range(6):
            assert (await c.get("/db")).status_code == 200
    assert _no_statements_events(logs) == []
