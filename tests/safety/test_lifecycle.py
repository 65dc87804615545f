"""Lifecycle: engines created and dropped in a loop, uninstrument and re-instrument, and apps built
many times in one process leave no handles, listeners, threads, pool statistics or memory behind.

Each loop runs its engines through every way an application lets go of one: `dispose()`,
`uninstrument()` then `dispose()`, and dropping it without either (on a `NullPool`, so that no
DBAPI connection is left for the garbage collector to close).
"""

from __future__ import annotations

import gc
import threading
import tracemalloc
import warnings
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.event import registry as event_registry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.middleware.gzip import GZipMiddleware

import querywatch
from querywatch import _callsite, _collection, _guard, _metrics
from querywatch import pool as qw_pool
from querywatch._instrumentation import instrumented_engines, sync_engine_of
from querywatch.fastapi import setup
from querywatch.middleware import QueryWatchMiddleware
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.web_apps import asgi_client, run_statements, run_statements_async, warm

with warnings.catch_warnings():
    # Starlette >= 1.x asks for httpx2 behind its TestClient; the httpx fallback works the same.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

#: The methods querywatch sets on an engine's dialect instance and pool instance.
DIALECT_METHODS = (
    "do_execute",
    "do_executemany",
    "do_execute_no_params",
    "do_commit",
    "do_rollback",
)
POOL_METHODS = ("connect", "_return_conn", "recreate")
#: Pool event listeners querywatch registers per engine (connect, close, close_detached,
#: invalidate, soft_invalidate, detach).
POOL_LISTENERS = 6
#: Retained memory allowed after a loop of engines, warm-up excluded. 1,000 SQLite engines keep
#: about 200 KB (hash tables grown to their high-water mark, SQLAlchemy's own caches; 440 KB
#: while each engine left its pool call-site memo behind). One engine that is not freed keeps
#: about 38 KB: five leaked engines, or 190 more bytes kept per engine, go over it.
ENGINE_LOOP_MEMORY_BOUND = 384 * 1024


def _collect() -> None:
    """Collect until nothing more is freed: objects freed by finalizers free others next pass."""
    for _ in range(5):
        if not gc.collect():
            return


def _querywatch_listeners() -> int:
    """Listener registrations of querywatch functions on any SQLAlchemy event target (instances
    and classes alike), read from SQLAlchemy's event registry."""
    count = 0
    for collections in list(event_registry._key_to_collection.values()):
        for listener_ref in list(collections.values()):
            fn = listener_ref()
            if fn is not None and getattr(fn, "__module__", "").startswith("querywatch"):
                count += 1
    return count


def _registry_entries() -> int:
    return len(event_registry._key_to_collection) + len(event_registry._collection_to_key)


def _site_memos() -> int:
    """Call-site memos of pool checkouts (one key per instrumented engine)."""
    return sum(1 for key in list(_callsite._memos) if str(key).startswith("\x00querywatch.pool "))


def _overrides(engine: sa.Engine) -> set[str]:
    """The methods set on this engine's dialect and pool instances (querywatch's wrappers)."""
    return {name for name in DIALECT_METHODS if name in vars(engine.dialect)} | {
        name for name in POOL_METHODS if name in vars(engine.pool)
    }


def _instances(cls: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, cls))


@dataclass(frozen=True)
class Leftovers:
    """What a loop left behind once its engines were let go and garbage was collected."""

    engines: int = 0  # engines of the loop still alive
    pool_stats: int = 0  # their `PoolStats` still alive
    handles: int = 0  # live instrumentation handles beyond those before the loop
    listeners: int = 0  # querywatch listeners on SQLAlchemy event targets beyond those before
    registry_entries: int = 0  # SQLAlchemy event registry entries beyond those before
    threads: int = 0  # threads started in the loop and still running
    site_memos: int = 0  # pool call-site memos beyond those before


class Churn:
    """Measures a loop of engines: `track()` each one, `finish()` after the last. A warm-up
    loop is not measured (`trace_memory=False`: tracing makes the loop twice as slow)."""

    def __init__(self, *, trace_memory: bool = True) -> None:
        _collect()
        self.engines: list[weakref.ref[sa.Engine]] = []
        self.stats: list[weakref.ref[qw_pool.PoolStats]] = []
        self.handles = len(instrumented_engines())
        self.listeners = _querywatch_listeners()
        self.registry_entries = _registry_entries()
        self.threads = set(threading.enumerate())
        self.site_memos = _site_memos()
        self.trace_memory = trace_memory
        if trace_memory:
            tracemalloc.start()
        self.memory = self._traced() if trace_memory else 0
        #: retained bytes allocated during the loop (set by `finish()`)
        self.memory_growth = 0

    @staticmethod
    def _traced() -> int:
        # Our own bookkeeping (the weak references kept per engine) is not the engines' memory.
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])
        return sum(stat.size for stat in snapshot.statistics("filename"))

    def track(self, engine: sa.Engine | AsyncEngine) -> None:
        sync_engine = sync_engine_of(engine)
        stats = qw_pool.stats_for(engine)
        assert sync_engine is not None
        assert stats is not None
        self.engines.append(weakref.ref(sync_engine))
        self.stats.append(weakref.ref(stats))

    def finish(self) -> Leftovers:
        _collect()
        if self.trace_memory:
            self.memory_growth = self._traced() - self.memory
            tracemalloc.stop()
        started = set(threading.enumerate()) - self.threads
        for thread in started:
            thread.join(timeout=10)  # a thread that is closing down may still be running
        return Leftovers(
            engines=sum(ref() is not None for ref in self.engines),
            pool_stats=sum(ref() is not None for ref in self.stats),
            handles=len(instrumented_engines()) - self.handles,
            listeners=_querywatch_listeners() - self.listeners,
            registry_entries=_registry_entries() - self.registry_entries,
            threads=sum(thread.is_alive() for thread in started),
            site_memos=_site_memos() - self.site_memos,
        )


def _let_go(engine: sa.Engine, how: str) -> None:
    """End an engine's life the way `how` says; uninstrumenting restores its own methods."""
    if how == "uninstrument":
        assert querywatch.uninstrument(engine)
        assert _overrides(engine) == set()
    if how != "drop":
        engine.dispose()


async def _let_go_async(engine: AsyncEngine, how: str) -> None:
    if how == "uninstrument":
        assert querywatch.uninstrument(engine)
        assert _overrides(engine.sync_engine) == set()
    if how != "drop":
        await engine.dispose()


def _sync_cycle(churn: Churn, make: Callable[[], sa.Engine], how: str) -> None:
    engine = make()
    querywatch.instrument(engine)
    churn.track(engine)
    warm(engine)  # a dialect's first-connect queries are not the unit's
    with querywatch.watch("lifecycle") as report:
        run_statements(engine, 2)
    assert (report.statements, report.pool.checkouts) == (2, 1)
    _let_go(engine, how)


async def _async_cycle(churn: Churn, make: Callable[[], AsyncEngine], how: str) -> None:
    engine = make()
    querywatch.instrument(engine)
    churn.track(engine)
    async with engine.connect():
        pass
    async with querywatch.watch("lifecycle") as report:
        await run_statements_async(engine, 2)
    assert (report.statements, report.pool.checkouts) == (2, 1)
    await _let_go_async(engine, how)


def _sqlite_variants(tmp_path: Path) -> list[tuple[Callable[[], sa.Engine], str]]:
    url = f"sqlite:///{tmp_path / 'lifecycle.sqlite'}"
    return [
        (lambda: sa.create_engine(url), "dispose"),  # QueuePool
        (lambda: sa.create_engine(url), "uninstrument"),
        (lambda: sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool), "dispose"),
        (lambda: sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool), "uninstrument"),
        (lambda: sa.create_engine("sqlite://"), "dispose"),  # SingletonThreadPool
        (lambda: sa.create_engine(url, poolclass=sa.pool.NullPool), "drop"),
    ]


def test_a_thousand_sqlite_engines_leave_nothing_behind(tmp_path: Path) -> None:
    """1,000 SQLite engines instrumented, used in a unit of work and let go (disposed,
    uninstrumented or dropped) leave no engine, handle, listener, thread, pool statistics or
    memory behind."""
    variants = _sqlite_variants(tmp_path)
    warm_up = Churn(trace_memory=False)
    for i in range(60):  # first-use caches (fingerprints, call sites, SQLAlchemy's own)
        _sync_cycle(warm_up, *variants[i % len(variants)])
    warm_up.finish()
    churn = Churn()
    for i in range(1000):
        _sync_cycle(churn, *variants[i % len(variants)])
    assert churn.finish() == Leftovers()
    assert churn.memory_growth < ENGINE_LOOP_MEMORY_BOUND, churn.memory_growth


def test_psycopg_engines_leave_nothing_behind() -> None:
    """100 PostgreSQL (psycopg) engines instrumented, used and let go leave nothing behind."""
    require_postgres()
    variants = [
        (lambda: sa.create_engine(PSYCOPG_URL), "dispose"),
        (lambda: sa.create_engine(PSYCOPG_URL), "uninstrument"),
        (lambda: sa.create_engine(PSYCOPG_URL, poolclass=sa.pool.NullPool), "drop"),
    ]
    warm_up = Churn(trace_memory=False)
    for i in range(6):
        _sync_cycle(warm_up, *variants[i % len(variants)])
    warm_up.finish()
    churn = Churn()
    for i in range(100):
        _sync_cycle(churn, *variants[i % len(variants)])
    assert churn.finish() == Leftovers()
    assert churn.memory_growth < ENGINE_LOOP_MEMORY_BOUND, churn.memory_growth


async def _async_churn(variants: list[tuple[Callable[[], AsyncEngine], str]], n: int) -> Churn:
    warm_up = Churn(trace_memory=False)
    for i in range(2 * len(variants)):
        await _async_cycle(warm_up, *variants[i % len(variants)])
    warm_up.finish()
    churn = Churn()
    for i in range(n):
        await _async_cycle(churn, *variants[i % len(variants)])
    return churn


async def test_aiosqlite_engines_disposed_with_await_leave_nothing_behind(tmp_path: Path) -> None:
    """100 aiosqlite engines (a worker thread per connection) instrumented, used and let go with
    `await engine.dispose()` leave no thread, listener, handle or memory behind."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'lifecycle.sqlite'}"
    churn = await _async_churn(
        [
            (lambda: create_async_engine(url), "dispose"),  # AsyncAdaptedQueuePool
            (lambda: create_async_engine(url), "uninstrument"),
            (
                lambda: create_async_engine("sqlite+aiosqlite://", poolclass=sa.pool.StaticPool),
                "dispose",
            ),
            (lambda: create_async_engine(url, poolclass=sa.pool.NullPool), "drop"),
        ],
        100,
    )
    assert churn.finish() == Leftovers()
    assert churn.memory_growth < ENGINE_LOOP_MEMORY_BOUND, churn.memory_growth


async def test_asyncpg_engines_disposed_with_await_leave_nothing_behind() -> None:
    """50 PostgreSQL (asyncpg) engines instrumented, used and let go leave nothing behind."""
    require_postgres()
    churn = await _async_churn(
        [
            (lambda: create_async_engine(ASYNCPG_URL), "dispose"),
            (lambda: create_async_engine(ASYNCPG_URL), "uninstrument"),
            (lambda: create_async_engine(ASYNCPG_URL, poolclass=sa.pool.NullPool), "drop"),
        ],
        50,
    )
    assert churn.finish() == Leftovers()
    assert churn.memory_growth < ENGINE_LOOP_MEMORY_BOUND, churn.memory_growth


def test_reinstrumenting_one_engine_counts_exactly_and_attaches_once(tmp_path: Path) -> None:
    """Uninstrumenting and re-instrumenting one engine five times (disposing it in between
    every other time, instrumenting twice each time) counts every statement and checkout once,
    records nothing while detached, and never stacks wrappers or listeners."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'again.sqlite'}")  # QueuePool
    warm(engine)
    _collect()  # earlier tests' engines, and their listeners
    listeners = _querywatch_listeners()
    rounds = []
    for round_ in range(5):
        handle = querywatch.instrument(engine)
        again = querywatch.instrument(engine)
        with querywatch.watch("attached") as report:
            run_statements(engine, 3)
            run_statements(engine, 1, tag=1)  # other parameters: not a duplicate
        stats = qw_pool.stats_for(engine)
        assert stats is not None
        attached = (
            again is handle,
            report.statements,
            report.pool.checkouts,
            stats.checkouts_total,
            _querywatch_listeners() - listeners,
            sorted(_overrides(engine)),
        )
        querywatch.uninstrument(engine)
        with querywatch.watch("detached") as detached:
            run_statements(engine, 2)
        rounds.append((attached, detached.statements, _querywatch_listeners() - listeners))
        if round_ % 2:
            engine.dispose()
    all_methods = sorted(DIALECT_METHODS + POOL_METHODS)
    assert rounds == [((True, 4, 2, 2, POOL_LISTENERS, all_methods), 0, 0)] * 5
    assert _overrides(engine) == set()
    engine.dispose()


def test_pool_statistics_continue_across_dispose(tmp_path: Path) -> None:
    """One instrumented engine disposed ten times keeps one `PoolStats`, whose counters add up
    every checkout and every connection opened and closed."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'dispose.sqlite'}")
    _collect()  # earlier tests' engines, and their listeners
    listeners = _querywatch_listeners()
    querywatch.instrument(engine)
    stats = qw_pool.stats_for(engine)
    assert stats is not None
    for _ in range(10):
        run_statements(engine, 1)
        engine.dispose()
    _collect()  # the disposed pools, and the listeners SQLAlchemy copied onto each
    seen = (
        qw_pool.stats_for(engine) is stats,
        stats.checkouts_total,
        stats.connections_opened_total,
        stats.connections_closed_total,
        _querywatch_listeners() - listeners,
    )
    querywatch.uninstrument(engine)
    assert seen == (True, 10, 10, 10, POOL_LISTENERS)


# -- apps built many times ---------------------------------------------------------------------

ROUTE = {"route": "/lifecycle/{n}", "method": "GET"}
REQUESTS = "querywatch_request_db_statements_count"
#: Bytes allocated by querywatch's own code (innermost frame) and still held after building and
#: serving 50 apps (150 requests): per-request state must not outlive its request. What shows
#: up is CPython's free lists (dicts and lists kept for reuse: 0.4-6 KB measured), so 160 bytes
#: kept per request go over it.
APP_LOOP_MEMORY_BOUND = 24 * 1024


def _app(engine: sa.Engine, registry: CollectorRegistry | None, **kwargs: Any) -> FastAPI:
    app = FastAPI(**kwargs)

    @app.get("/lifecycle/{n}")
    async def lifecycle(n: int) -> dict[str, int]:
        run_statements(engine, n)
        return {"n": n}

    setup(app, engine, registry=registry)
    return app


async def _serve_and_rebuild(app: FastAPI) -> None:
    """Three requests: before and after Starlette rebuilds the stack for a middleware added
    after the first request, and after `build_middleware_stack()` is called again."""
    async with asgi_client(app) as client:
        assert (await client.get("/lifecycle/2")).status_code == 200
        app.middleware_stack = None  # what Starlette needs to accept another middleware
        app.add_middleware(GZipMiddleware)
        assert (await client.get("/lifecycle/2")).status_code == 200
        app.middleware_stack = app.build_middleware_stack()
        assert (await client.get("/lifecycle/2")).status_code == 200


@dataclass(frozen=True)
class AppsOutcome:
    """What building and serving apps in a loop did."""

    requests_counted: int  # requests in the metrics series (each app's own, or the default's)
    reporters_added: int  # collection reporters beyond those before
    subscribers_added: int  # guard subscribers beyond those before
    middlewares_alive: int  # QueryWatchMiddleware instances beyond those before
    metrics_alive: int  # live QueryWatchMetrics beyond those before


async def _build_apps(engine: sa.Engine, *, fresh_registry: bool) -> tuple[AppsOutcome, int]:
    """Build, serve and drop 200 apps after 20 of warm-up: the outcome, and the bytes
    querywatch's own code allocated over the last 50 and still holds."""

    async def build_and_serve() -> int:
        registry = CollectorRegistry() if fresh_registry else None
        before = (registry or REGISTRY).get_sample_value(REQUESTS, ROUTE) or 0
        await _serve_and_rebuild(_app(engine, registry))
        after = (registry or REGISTRY).get_sample_value(REQUESTS, ROUTE) or 0
        return int(after - before)

    for _ in range(20):
        await build_and_serve()
    _collect()
    reporters, subscribers = len(_collection._reporters), len(_guard._subscribers)
    middlewares, live_metrics = _instances(QueryWatchMiddleware), len(_metrics._live)
    counted = 0
    for _ in range(150):
        counted += await build_and_serve()
    # Memory over the last 50 only: tracing makes each app three times slower.
    _collect()
    tracemalloc.start()
    ours = [tracemalloc.Filter(True, f"*{Path(querywatch.__file__).parent}*")]
    before = tracemalloc.take_snapshot().filter_traces(ours)
    for _ in range(50):
        counted += await build_and_serve()
    _collect()
    after = tracemalloc.take_snapshot().filter_traces(ours)
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    outcome = AppsOutcome(
        requests_counted=counted,
        reporters_added=len(_collection._reporters) - reporters,
        subscribers_added=len(_guard._subscribers) - subscribers,
        middlewares_alive=_instances(QueryWatchMiddleware) - middlewares,
        metrics_alive=len(_metrics._live) - live_metrics,
    )
    return outcome, growth


async def test_apps_built_many_times_on_the_default_registry(
    sqlite_web_engine: sa.Engine,
) -> None:
    """200 apps set up on prometheus_client's default registry, each rebuilding its middleware
    stack twice, count every request once in one series and accumulate nothing."""
    outcome, growth = await _build_apps(sqlite_web_engine, fresh_registry=False)
    assert outcome == AppsOutcome(600, 0, 0, 0, 0)
    assert growth < APP_LOOP_MEMORY_BOUND, growth


async def test_apps_built_many_times_on_fresh_registries(sqlite_web_engine: sa.Engine) -> None:
    """200 apps each set up on a fresh registry, each rebuilding its middleware stack twice,
    count every request once in their own registry, and leave no metrics behind once dropped."""
    outcome, growth = await _build_apps(sqlite_web_engine, fresh_registry=True)
    assert outcome == AppsOutcome(600, 0, 0, 0, 0)
    assert growth < APP_LOOP_MEMORY_BOUND, growth


def test_testclient_lifespan_started_and_stopped_repeatedly(sqlite_web_engine: sa.Engine) -> None:
    """One app served by 30 TestClients in turn (lifespan started and stopped each time, sync
    endpoint in the threadpool) runs every lifespan, counts every request once and leaves no
    thread behind."""
    lifespans: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifespans.append("started")
        yield
        lifespans.append("stopped")

    registry = CollectorRegistry()
    app = _app(sqlite_web_engine, registry, lifespan=lifespan)

    @app.get("/sync/{n}")
    def sync_endpoint(n: int) -> dict[str, int]:
        run_statements(sqlite_web_engine, n)
        return {"n": n}

    threads = set(threading.enumerate())
    for _ in range(30):
        with TestClient(app) as client:
            assert client.get("/lifecycle/2").status_code == 200
            assert client.get("/sync/1").status_code == 200
    started = set(threading.enumerate()) - threads
    for thread in started:
        thread.join(timeout=10)
    sync_route = {"route": "/sync/{n}", "method": "GET"}
    assert (
        lifespans.count("started"),
        lifespans.count("stopped"),
        registry.get_sample_value(REQUESTS, ROUTE),
        registry.get_sample_value(REQUESTS, sync_route),
        registry.get_sample_value("querywatch_request_db_statements_sum", sync_route),
        sum(thread.is_alive() for thread in started),
    ) == (30, 30, 30, 30, 30, 0)
