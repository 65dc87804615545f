"""Prometheus metrics: exact values read back from a real registry and from a /metrics scrape,
built once per registry, valid for promtool, and summed over worker processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import querywatch
from querywatch import _guard, _metrics
from querywatch._collection import STATEMENT_BUCKETS
from querywatch._instrumentation import instrumented_engines
from querywatch.fastapi import setup
from querywatch.middleware import QueryWatchMiddleware
from tests.web_apps import asgi_client, fastapi_app, run_statements


def _pool(engine: sa.Engine) -> str:
    (handle,) = [h for h in instrumented_engines() if h.engine is engine]
    return handle.name


async def test_request_histograms_are_exact(web_engine: sa.Engine) -> None:
    """Statements per request land in the right buckets of their route and method."""
    registry = CollectorRegistry()
    app = fastapi_app(web_engine)
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    async with asgi_client(app) as c:
        for n in (0, 3, 3, 21):
            await c.get(f"/items/{n}")
    labels = {"route": "/items/{n}", "method": "GET"}

    def sample(suffix: str, **extra: str) -> float | None:
        return registry.get_sample_value(
            f"querywatch_request_db_statements{suffix}", {**labels, **extra}
        )

    assert sample("_count") == 4
    assert sample("_sum") == 27
    assert [sample("_bucket", le=le) for le in ("0.0", "2.0", "3.0", "13.0", "21.0")] == [
        1,
        1,
        3,
        3,
        4,
    ]
    assert registry.get_sample_value("querywatch_request_db_seconds_count", labels) == 4


async def test_statement_durations_are_flushed_per_bucket(web_engine: sa.Engine) -> None:
    """The statement histogram counts every statement of a request once, with the exact sum."""
    registry = CollectorRegistry()
    seen: list[querywatch.Report] = []
    remove = querywatch.add_reporter(seen.append)
    app = fastapi_app(web_engine)
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    try:
        async with asgi_client(app) as c:
            await c.get("/items/7")
    finally:
        remove()
    labels = {"pool": _pool(web_engine), "operation": "SELECT"}
    name = "querywatch_db_statement_duration_seconds"
    assert registry.get_sample_value(f"{name}_count", labels) == 7
    assert registry.get_sample_value(f"{name}_sum", labels) == pytest.approx(seen[0].db_seconds)
    top = repr(float(STATEMENT_BUCKETS[-1]))
    assert registry.get_sample_value(f"{name}_bucket", {**labels, "le": top}) == 7


def test_nested_units_count_each_statement_once(sqlite_web_engine: sa.Engine) -> None:
    """A job inside a job: each statement reaches the statement histogram once."""
    registry = CollectorRegistry()
    _metrics.install(registry)
    with querywatch.watch("outer"):
        run_statements(sqlite_web_engine, 2)
        with querywatch.watch("inner"):
            run_statements(sqlite_web_engine, 3, tag=1)
    labels = {"pool": _pool(sqlite_web_engine), "operation": "SELECT"}
    count = registry.get_sample_value("querywatch_db_statement_duration_seconds_count", labels)
    assert count == 5


def test_units_recorded_by_many_threads_at_once_are_all_counted(
    sqlite_web_engine: sa.Engine,
) -> None:
    """One finished unit recorded 2,000 times by each of 8 threads at once, switching threads
    as often as the interpreter can: every observation reaches the histograms."""
    # The values are written with `+=` under the metrics' lock. CPython 3.11 does not switch
    # threads inside such a statement either, so this holds the outcome, not the lock itself;
    # the lock is what keeps it on an interpreter that would (free-threaded builds).
    registry = CollectorRegistry()
    metrics = _metrics.install(registry)
    with querywatch.watch("job") as report:
        run_statements(sqlite_web_engine, 2)
    # Recorded again and again below, with no database work in between: the threads collide
    # on the same histogram values as often as they can.
    baseline = registry.get_sample_value(
        "querywatch_db_statement_duration_seconds_count",
        {"pool": _pool(sqlite_web_engine), "operation": "SELECT"},
    )
    start = threading.Barrier(8)

    def record() -> None:
        start.wait()
        for _ in range(2000):
            metrics.record(report)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=record) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    labels = {"pool": _pool(sqlite_web_engine), "operation": "SELECT"}
    name = "querywatch_db_statement_duration_seconds"
    assert registry.get_sample_value(f"{name}_count", labels) == (baseline or 0) + 8 * 2000 * 2
    top = repr(float(STATEMENT_BUCKETS[-1]))
    expected = (baseline or 0) + 8 * 2000 * 2
    assert registry.get_sample_value(f"{name}_bucket", {**labels, "le": top}) == expected


def test_install_is_idempotent_per_registry() -> None:
    """Installing twice into one registry returns the same metrics (no duplicate error)."""
    registry = CollectorRegistry()
    assert _metrics.install(registry) is _metrics.install(registry)


async def test_apps_built_many_times_and_rebuilt_stacks(sqlite_web_engine: sa.Engine) -> None:
    """Many apps on one registry, and Starlette rebuilding a stack, never duplicate metrics."""
    registry = CollectorRegistry()
    for _ in range(5):
        app = fastapi_app(sqlite_web_engine)
        setup(app, sqlite_web_engine, registry=registry)
        app.middleware_stack = app.build_middleware_stack()
        app.middleware_stack = app.build_middleware_stack()
        async with asgi_client(app) as c:
            assert (await c.get("/items/1")).status_code == 200
    labels = {"route": "/items/{n}", "method": "GET"}
    assert registry.get_sample_value("querywatch_request_db_statements_count", labels) == 5


def test_internal_errors_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error swallowed by the guard increments its component's counter."""
    registry = CollectorRegistry()
    _metrics.install(registry)
    monkeypatch.setattr(_guard, "raise_internal_errors", False)
    with _guard.guard("reporter"):
        raise ValueError("a bug of ours")
    value = registry.get_sample_value("querywatch_internal_errors_total", {"component": "reporter"})
    assert value == 1


async def test_pool_metrics_read_at_scrape_time(web_engine: sa.Engine) -> None:
    """Pool counters and gauges come from the pool's own statistics when Prometheus scrapes."""
    from querywatch import pool

    registry = CollectorRegistry()
    app = fastapi_app(web_engine)
    setup(app, web_engine, registry=registry)
    async with asgi_client(app) as c:
        for n in (1, 2, 3):
            await c.get(f"/items/{n}")
    name = _pool(web_engine)
    stats = pool.stats_for(web_engine)
    assert stats is not None
    checkouts = registry.get_sample_value("querywatch_db_pool_checkouts_total", {"pool": name})
    assert checkouts == stats.checkouts_total >= 3
    used = registry.get_sample_value(
        "querywatch_db_pool_connections", {"pool": name, "state": "used"}
    )
    assert used == 0
    wait_count = registry.get_sample_value("querywatch_db_pool_wait_seconds_count", {"pool": name})
    assert wait_count == stats.wait.count
    if web_engine.dialect.name == "postgresql":
        maximum = registry.get_sample_value("querywatch_db_pool_connections_max", {"pool": name})
        assert maximum == 15  # QueuePool default: pool_size 5 + max_overflow 10


async def test_metrics_scrape_is_exact_and_passes_promtool(web_engine: sa.Engine) -> None:
    """A real /metrics scrape holds the exact figures and passes `promtool check metrics`."""
    registry = CollectorRegistry()
    app = fastapi_app(web_engine)
    setup(app, web_engine, registry=registry)
    async with asgi_client(app) as c:
        await c.get("/items/5")
        await c.get("/v1/things/1")
        scrape = await c.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    sums = {
        s.labels["route"]: s.value
        for s in families["querywatch_request_db_statements"].samples
        if s.name.endswith("_sum")
    }
    assert sums == {"/items/{n}": 5, "/v1/things/{thing_id}": 1}  # /metrics itself is excluded
    _promtool_check(scrape.text)


def _promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx, sqlalchemy as sa
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry
    from querywatch.fastapi import setup

    mode, db, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = sa.create_engine(f"sqlite:///{db}")
    app = FastAPI()

    @app.get("/items/{n}")
    def items(n: int) -> dict:
        with engine.connect() as conn:
            for i in range(n):
                conn.execute(sa.select(sa.bindparam("i", type_=sa.Integer)), {"i": i})
        return {}

    setup(app, {"main": engine}, registry=CollectorRegistry())

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            if mode == "scrape":
                sys.stdout.write((await c.get("/metrics")).text)
                return
            for _ in range(requests):
                assert (await c.get("/items/3")).status_code == 200

    asyncio.run(main())
    """
)


def test_multiprocess_workers_sum_up(tmp_path: Path) -> None:
    """Two worker processes write into one PROMETHEUS_MULTIPROC_DIR; a scrape sums them."""
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    directory = tmp_path / "prom"
    directory.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    db = tmp_path / "db.sqlite"
    workers = [
        subprocess.Popen([sys.executable, str(script), "serve", str(db), str(n)], env=env)
        for n in (2, 5)
    ]
    assert [w.wait(timeout=60) for w in workers] == [0, 0]
    scraped = subprocess.run(
        [sys.executable, str(script), "scrape", str(db), "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    (count,) = [
        s.value
        for s in families["querywatch_request_db_statements"].samples
        if s.name.endswith("_count")
    ]
    assert count == 7
    statements = [
        s.value
        for s in families["querywatch_db_statement_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert statements == [21]
    checkouts = [s.value for s in families["querywatch_db_pool_checkouts"].samples]
    assert checkouts == [7]
    _promtool_check(scraped)
    # gunicorn's child_exit hook: a dead worker's live gauges leave the sum.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    labels = {"pool": "main", "state": "idle"}
    assert registry.get_sample_value("querywatch_db_pool_connections", labels) == 2
    mark_process_dead(workers[0].pid, path=str(directory))  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    assert registry.get_sample_value("querywatch_db_pool_connections", labels) == 1


def test_fastapi_app_is_importable_without_a_registry_argument() -> None:
    """`install()` without a registry uses prometheus_client's global REGISTRY, once."""
    from prometheus_client import REGISTRY

    assert _metrics.install() is _metrics.install(REGISTRY)
    assert isinstance(FastAPI(), FastAPI)


def test_lazy_loads_in_nested_units_are_counted_once(sqlite_web_engine: sa.Engine) -> None:
    """Lazy loads of a job nested in another count once, under the innermost unit's name."""
    from sqlalchemy.orm import Session

    from tests.models import Author, create_schema, seed

    create_schema(sqlite_web_engine)
    with Session(sqlite_web_engine) as session:
        seed(session)
    registry = CollectorRegistry()
    _metrics.install(registry)
    with querywatch.watch("outer"), Session(sqlite_web_engine) as session:
        authors = session.scalars(sa.select(Author).order_by(Author.id)).all()
        with querywatch.watch("inner"):
            for author in authors[:4]:
                _ = author.books
        for author in authors[4:]:
            _ = author.books

    def lazy(route: str) -> float | None:
        labels = {"route": route, "phase": "handler"}
        return registry.get_sample_value("querywatch_lazy_loads_total", labels)

    # Both are jobs, labelled `<job>`: 4 + 6 loads, not the outer unit's 10 counted again.
    assert lazy("<job>") == 10


async def test_requests_count_only_in_their_own_apps_registry(
    sqlite_web_engine: sa.Engine,
) -> None:
    """Two apps in one process, each with its own registry: a request counts in its app's
    registry only, and an app set up without metrics counts in none."""
    first, second, unmetered = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    apps = []
    for registry, enabled in ((first, True), (second, True), (unmetered, False)):
        app = fastapi_app(sqlite_web_engine)
        app.add_middleware(QueryWatchMiddleware, registry=registry, metrics=enabled)
        apps.append(app)
    for app, requests in zip(apps, (1, 2, 4), strict=True):
        async with asgi_client(app) as c:
            for _ in range(requests):
                await c.get("/items/1")
    labels = {"route": "/items/{n}", "method": "GET"}
    counts = [
        registry.get_sample_value("querywatch_request_db_statements_count", labels)
        for registry in (first, second, unmetered)
    ]
    assert counts == [1, 2, None]


def test_jobs_count_in_every_registry(sqlite_engine: sa.Engine) -> None:
    """A `watch()` unit belongs to no app: its findings count in every installed registry."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    for registry in registries:
        _metrics.install(registry)
    with querywatch.watch("nightly"), sqlite_engine.connect() as conn:
        for _ in range(2):
            conn.exec_driver_sql("SELECT 1")
    assert [
        r.get_sample_value("querywatch_duplicate_queries_total", {"route": "<job>"})
        for r in registries
    ] == [1, 1]


_RELOAD = textwrap.dedent(
    """
    import asyncio, importlib, json, sys
    import httpx, sqlalchemy as sa
    from fastapi import FastAPI
    from prometheus_client import REGISTRY

    forget = sys.argv[1]  # "all": every querywatch module; "metrics": querywatch._metrics only
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )

    def app_set_up() -> FastAPI:
        from querywatch.fastapi import setup  # the copy imported now

        app = FastAPI()

        @app.get("/items/{n}")
        def items(n: int) -> dict:
            with engine.connect() as conn:
                for i in range(n):
                    conn.execute(sa.select(sa.bindparam("i", type_=sa.Integer)), {"i": i})
            return {}

        setup(app, engine)  # prometheus_client's default REGISTRY
        return app

    async def get(app: FastAPI, path: str, times: int) -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for _ in range(times):
                response = await c.get(path)
                assert response.status_code == 200, response.status_code
            return response.text

    first = app_set_up()
    asyncio.run(get(first, "/items/2", 1))
    for name in [m for m in sys.modules if m == "querywatch" or m.startswith("querywatch.")]:
        if forget == "all" or name == "querywatch._metrics":
            del sys.modules[name]
    importlib.import_module("querywatch._metrics")  # a fresh copy, as the next test's import
    second = app_set_up()
    asyncio.run(get(second, "/items/2", 2))
    asyncio.run(get(first, "/items/2", 4))
    with importlib.import_module("querywatch").watch("job"), engine.connect() as conn:
        for _ in range(2):
            conn.exec_driver_sql("SELECT 1")
    labels = {"route": "/items/{n}", "method": "GET"}
    duplicates = [
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "querywatch_duplicate_queries_total"
    ]
    print(json.dumps({
        "requests": REGISTRY.get_sample_value("querywatch_request_db_statements_count", labels),
        "statements": REGISTRY.get_sample_value("querywatch_request_db_statements_sum", labels),
        "duplicates": duplicates,
        "scraped": "querywatch_request_db_statements_count" in asyncio.run(
            get(second, "/metrics", 1)
        ),
    }))
    """
)


@pytest.mark.parametrize("forget", ["all", "metrics"])
def test_setup_again_after_querywatch_modules_were_reimported(tmp_path: Path, forget: str) -> None:
    """`setup()` again on the default registry, after a fixture deleted querywatch's modules
    from `sys.modules` (all of them, or `querywatch._metrics` alone) and they were imported
    again: the metrics already registered are reused, and every unit counts once."""
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    result = subprocess.run(
        [sys.executable, str(script), forget],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.splitlines()[-1]  # after the log lines
    assert json.loads(last_line) == {
        "requests": 7,
        "statements": 14,
        "duplicates": [1],
        "scraped": True,
    }
