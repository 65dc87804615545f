"""The OpenTelemetry bridge, with the real SDK (in-memory span exporter and metric reader), next
to opentelemetry-instrumentation-fastapi/-asgi/-sqlalchemy and FastAPI's own telemetry."""

from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import querywatch
import querywatch.fastapi
import querywatch.otel
from querywatch import _guard
from querywatch import pool as qw_pool
from querywatch.middleware import QueryWatchMiddleware
from querywatch.otel import finding_attributes
from tests.conftest import PSYCOPG_URL, Logs, require_postgres
from tests.models import Author, Base, create_schema, seed
from tests.web_apps import asgi_client

AUTHORS = 10
#: `select authors` and one lazy load of `Author.books` per author.
N_PLUS_ONE_STATEMENTS = 1 + AUTHORS
SECRET = "s3cret-value-9f2c"


@dataclass
class Telemetry:
    """An OpenTelemetry SDK of the test's own: spans into memory, metrics read on demand."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("tests")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def server_span(self) -> ReadableSpan:
        (span,) = [s for s in self.spans() if s.kind is SpanKind.SERVER]
        return span

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """The data points of metric `name` at a fresh collection, by sorted attributes."""
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found[tuple(sorted((point.attributes or {}).items()))] = point
        return found

    def enable(self, **options: Any) -> None:
        querywatch.otel.enable(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """A fresh SDK (never the global providers); the bridge is disabled afterwards."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Telemetry(tracer_provider, exporter, meter_provider, reader)
    querywatch.otel.disable()
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def bridge(telemetry: Telemetry) -> Telemetry:
    """The bridge enabled on the test's SDK."""
    telemetry.enable()
    return telemetry


@pytest.fixture
def library(web_engine: sa.Engine) -> sa.Engine:
    """The shared models, seeded (10 authors with 3 books), on SQLite, then PostgreSQL."""
    create_schema(web_engine)
    with Session(web_engine) as session:
        seed(session)
    return web_engine


@pytest.fixture
async def async_library(any_async_engine: AsyncEngine) -> AsyncEngine:
    """The shared models, seeded, on aiosqlite, then asyncpg."""
    async with any_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(any_async_engine) as session:
        await session.run_sync(seed)
    return any_async_engine


@pytest.fixture
def sqlalchemy_tracing(telemetry: Telemetry) -> Iterator[Telemetry]:
    """opentelemetry-instrumentation-sqlalchemy, undone afterwards (it also wraps
    `create_engine` process-wide). Its version range may not list the installed SQLAlchemy
    minor yet: the dependency check is skipped, the instrumentation itself is unchanged."""
    yield telemetry
    SQLAlchemyInstrumentor().uninstrument()


def trace_engine(telemetry: Telemetry, engine: sa.Engine | AsyncEngine) -> None:
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine if isinstance(engine, AsyncEngine) else engine,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        skip_dep_check=True,
    )


def trace_app(telemetry: Telemetry, app: FastAPI) -> None:
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )


def audit(app: FastAPI, engine: sa.Engine | AsyncEngine, **options: Any) -> None:
    querywatch.fastapi.setup(
        app, engine, registry=CollectorRegistry(), metrics_path=None, otel=True, **options
    )


def run_statements(engine: sa.Engine, n: int) -> None:
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(sa.select(sa.literal(i)))


def library_app(
    engine: sa.Engine | None = None, async_engine: AsyncEngine | None = None, **options: Any
) -> FastAPI:
    """An app with an N+1 endpoint (sync and async), a duplicate query carrying a secret, a
    background task, a clean endpoint and one that raises; `options` go to `FastAPI()`."""
    app = FastAPI(**options)
    if engine is not None:

        @app.get("/authors")
        def authors() -> dict[str, int]:
            with Session(engine) as session:
                found = session.scalars(sa.select(Author).order_by(Author.id)).all()
                return {"books": sum(len(author.books) for author in found)}

        @app.get("/duplicate")
        def duplicate(name: str) -> dict[str, int]:
            with Session(engine) as session:
                for _ in range(2):
                    session.scalar(sa.select(sa.func.count(Author.id)).where(Author.name == name))
            return {}

        @app.get("/background")
        def background(tasks: BackgroundTasks) -> dict[str, int]:
            run_statements(engine, 1)
            tasks.add_task(run_statements, engine, 3)
            return {}

        @app.get("/clean")
        def clean() -> dict[str, int]:
            run_statements(engine, 1)
            return {}

        @app.get("/boom")
        def boom() -> None:
            load_books_one_by_one(engine)
            raise RuntimeError("the app's own error")

    if async_engine is not None:

        @app.get("/async/authors")
        async def async_authors() -> dict[str, int]:
            async with AsyncSession(async_engine) as session:
                found = (await session.scalars(sa.select(Author).order_by(Author.id))).all()
                return {"books": sum([len(await a.awaitable_attrs.books) for a in found])}

    return app


def load_books_one_by_one(engine: sa.Engine) -> None:
    """An N+1 outside any web framework: `Author.books` lazy-loaded per author."""
    with Session(engine) as session:
        for author in session.scalars(sa.select(Author)):
            _ = author.books


async def get(app: FastAPI, path: str) -> int:
    async with asgi_client(app) as client:
        return (await client.get(path)).status_code


def events_of(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(event.attributes or {}) for event in span.events if event.name == name]


def as_exported(attributes: dict[str, Any]) -> dict[str, Any]:
    """Attributes as the SDK keeps them (sequences become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}


# -- findings on the server span --------------------------------------------------------------


@pytest.mark.parametrize("order", ["tracing first", "querywatch first"])
async def test_an_n_plus_one_request_puts_its_finding_on_the_server_span(
    library: sa.Engine,
    sqlalchemy_tracing: Telemetry,
    reports: list[querywatch.Report],
    order: str,
) -> None:
    """Next to the FastAPI and SQLAlchemy instrumentations (set up before or after querywatch),
    the N+1 request's server span carries a `querywatch.n_plus_one` event with the finding's
    log fields."""
    telemetry = sqlalchemy_tracing
    telemetry.enable()
    app = library_app(library)
    if order == "tracing first":
        trace_app(telemetry, app)
        trace_engine(telemetry, library)
        audit(app, library)
    else:
        audit(app, library)
        trace_app(telemetry, app)
        trace_engine(telemetry, library)
    assert await get(app, "/authors") == 200
    (finding,) = reports[-1].n_plus_one
    (event,) = events_of(telemetry.server_span(), "querywatch.n_plus_one")
    assert event == as_exported(finding_attributes(finding, 2000))
    assert event["querywatch.relationship"] == "Author.books"
    assert event["querywatch.count"] == AUTHORS
    assert event["querywatch.callsite"].startswith("tests/test_otel.py:")
    assert event["querywatch.finding_id"] == finding.id


async def test_an_async_n_plus_one_request_puts_its_finding_on_the_server_span(
    async_library: AsyncEngine, sqlalchemy_tracing: Telemetry, reports: list[querywatch.Report]
) -> None:
    """An async endpoint (aiosqlite, asyncpg) loading `Author.books` per author gets the same
    event on its server span."""
    telemetry = sqlalchemy_tracing
    telemetry.enable()
    app = library_app(async_engine=async_library)
    trace_app(telemetry, app)
    trace_engine(telemetry, async_library)
    audit(app, async_library)
    assert await get(app, "/async/authors") == 200
    (finding,) = reports[-1].n_plus_one
    (event,) = events_of(telemetry.server_span(), "querywatch.n_plus_one")
    assert (event["querywatch.relationship"], event["querywatch.count"]) == ("Author.books", 10)
    assert event["querywatch.finding_id"] == finding.id


async def test_the_server_span_carries_the_unit_summary(
    library: sa.Engine, bridge: Telemetry, reports: list[querywatch.Report]
) -> None:
    """The server span gets the statement count, database time, findings per kind and pool
    figures, so a trace search can find the requests with an N+1."""
    app = library_app(library)
    trace_app(bridge, app)
    audit(app, library)
    await get(app, "/authors")
    report = reports[-1]
    attributes = bridge.server_span().attributes or {}
    assert attributes["querywatch.db.statements"] == report.statements == N_PLUS_ONE_STATEMENTS
    assert attributes["querywatch.db.duration_ms"] == round(report.db_seconds * 1000, 3)
    assert attributes["querywatch.findings"] == 1
    assert attributes["querywatch.n_plus_one"] == 1
    assert "querywatch.duplicate_query" not in attributes  # kinds not found: absent (zero)
    assert attributes["querywatch.pool.checkouts"] == report.pool.checkouts == 1
    assert attributes["querywatch.pool.wait_ms"] == round(report.pool.wait_seconds * 1000, 3)


@pytest.mark.parametrize("order", ["tracing first", "querywatch first"])
async def test_statement_spans_stay_children_of_the_server_span_and_count_once(
    library: sa.Engine,
    sqlalchemy_tracing: Telemetry,
    reports: list[querywatch.Report],
    order: str,
) -> None:
    """With both instrumentations on one engine, each statement is one client span whose parent
    is the server span, and querywatch counts the statements it counts without them."""
    telemetry = sqlalchemy_tracing
    telemetry.enable()
    app = library_app(library)
    if order == "tracing first":
        trace_engine(telemetry, library)
        trace_app(telemetry, app)
    audit(app, library)
    if order == "querywatch first":
        trace_engine(telemetry, library)
        trace_app(telemetry, app)
    await get(app, "/authors")
    spans = telemetry.spans()
    server = telemetry.server_span()
    statements = [s for s in spans if s.kind is SpanKind.CLIENT and s.name != "connect"]
    assert len(statements) == reports[-1].statements == N_PLUS_ONE_STATEMENTS
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id
               for s in statements)  # fmt: skip
    assert len({s.context.span_id for s in spans}) == len(spans)
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}


async def test_an_asgi_middleware_added_before_setup_still_gets_the_findings(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """An `OpenTelemetryMiddleware` added with `add_middleware` before `setup()` (so inside
    querywatch's, as Starlette orders them) still gets the events on its server span."""
    app = library_app(library)
    app.add_middleware(
        OpenTelemetryMiddleware,
        tracer_provider=bridge.tracer_provider,
        meter_provider=bridge.meter_provider,
    )
    audit(app, library)
    await get(app, "/authors")
    assert len(events_of(bridge.server_span(), "querywatch.n_plus_one")) == 1


async def test_fastapi_own_telemetry_server_span_gets_the_findings(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """FastAPI's built-in telemetry (`FastAPI(telemetry=...)`) ends its server span when the
    response is sent; the span still carries the events and the summary."""
    app = library_app(
        library,
        telemetry={
            "tracer_provider": bridge.tracer_provider,
            "meter_provider": bridge.meter_provider,
            "logs": False,
        },
    )
    audit(app, library)
    await get(app, "/authors")
    server = bridge.server_span()
    assert len(events_of(server, "querywatch.n_plus_one")) == 1
    assert (server.attributes or {})["querywatch.n_plus_one"] == 1


async def test_an_ended_server_span_gets_a_querywatch_child_span_instead(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """With `QueryWatchMiddleware` added by hand (nothing holds the server span open, so it has
    ended when the unit closes), the events and summary go on a `querywatch <unit>` child of
    the server span, which spans the unit of work."""
    app = library_app(library)
    trace_app(bridge, app)
    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    await get(app, "/authors")
    server = bridge.server_span()
    (child,) = [s for s in bridge.spans() if s.name == "querywatch GET /authors"]
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id
    assert len(events_of(child, "querywatch.n_plus_one")) == 1
    assert (child.attributes or {})["querywatch.n_plus_one"] == 1
    assert not events_of(server, "querywatch.n_plus_one")
    assert (child.start_time or 0) < (server.end_time or 0) < (child.end_time or 0)


async def test_the_server_span_ends_when_the_response_is_sent_and_counts_background_work(
    library: sa.Engine, sqlalchemy_tracing: Telemetry, reports: list[querywatch.Report]
) -> None:
    """The server span keeps the end time the tracing middleware gave it (before the background
    task's statements start), while its summary counts those statements too."""
    telemetry = sqlalchemy_tracing
    telemetry.enable()
    app = library_app(library)
    trace_app(telemetry, app)
    trace_engine(telemetry, library)
    audit(app, library)
    await get(app, "/background")
    server = telemetry.server_span()
    statements = [s for s in telemetry.spans() if s.kind is SpanKind.CLIENT and s.name != "connect"]
    assert len(statements) == reports[-1].statements == 4
    later = sorted(s.start_time or 0 for s in statements)[1:]  # the background task's three
    assert server.end_time is not None
    assert server.end_time <= min(later)
    assert (server.attributes or {})["querywatch.db.statements"] == 4


async def test_a_request_that_raises_still_gets_its_findings_on_one_server_span(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """An unhandled exception (a 500 sent by Starlette outside querywatch's middleware): the
    server span is exported once, with the events, and the status the tracing gave it."""
    app = library_app(library)
    trace_app(bridge, app)
    audit(app, library)
    async with asgi_client(app, raise_app_exceptions=False) as client:
        assert (await client.get("/boom")).status_code == 500
    server = bridge.server_span()
    assert len(events_of(server, "querywatch.n_plus_one")) == 1
    assert (server.attributes or {})["http.status_code"] == 500


async def test_an_unsampled_request_records_nothing_on_traces(
    library: sa.Engine, telemetry: Telemetry
) -> None:
    """In a trace the sampler drops, no span is exported, none is made up by querywatch."""
    unsampled = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    unsampled.add_span_processor(SimpleSpanProcessor(telemetry.exporter))
    querywatch.otel.enable(tracer_provider=unsampled, meter_provider=telemetry.meter_provider)
    app = library_app(library)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=unsampled)
    audit(app, library, settings=querywatch.Settings(otel_finding_spans=True))
    assert await get(app, "/authors") == 200
    assert telemetry.spans() == []


async def test_a_job_inside_a_user_span_puts_its_findings_on_that_span(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """A `watch()` block inside the user's own span decorates that span (no web framework)."""
    with bridge.tracer.start_as_current_span("nightly-report"), querywatch.watch("nightly"):
        load_books_one_by_one(library)
    (span,) = bridge.spans()
    assert span.name == "nightly-report"
    assert len(events_of(span, "querywatch.n_plus_one")) == 1
    attributes = span.attributes or {}
    assert (attributes["querywatch.unit.name"], attributes["querywatch.unit.kind"]) == (
        "nightly",
        "job",
    )


def test_a_unit_outside_any_span_exports_no_span(library: sa.Engine, bridge: Telemetry) -> None:
    """Without an active span nothing is recorded on traces: no span is made up."""
    with querywatch.watch("outside"):
        load_books_one_by_one(library)
    assert bridge.spans() == []


async def test_bound_values_reach_span_events_only_with_log_parameters(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """A duplicate query's bound value is on its span event only when `log_parameters=True`."""
    seen: list[str] = []
    for log_parameters in (False, True):
        bridge.exporter.clear()
        app = library_app(library)
        trace_app(bridge, app)
        audit(app, library, settings=querywatch.Settings(log_parameters=log_parameters))
        await get(app, f"/duplicate?name={SECRET}")
        server = bridge.server_span()
        (event,) = events_of(server, "querywatch.duplicate_query")
        ours = {k: v for k, v in (server.attributes or {}).items() if k.startswith("querywatch.")}
        seen.append(repr([event, ours]))  # (the URL in the span's HTTP attributes is not ours)
    assert SECRET not in seen[0]
    assert SECRET in seen[1]


def test_the_fingerprint_on_an_event_is_cut_to_max_sql_length(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """Statement shapes on span events are cut to `Settings.max_sql_length`, as in logs."""
    settings = querywatch.Settings(max_sql_length=80)
    with bridge.tracer.start_as_current_span("job"), querywatch.watch("cut", settings=settings):
        load_books_one_by_one(library)
    (event,) = events_of(bridge.spans()[0], "querywatch.n_plus_one")
    assert event["querywatch.fingerprint"].startswith("select books.id")
    assert "... [truncated " in event["querywatch.fingerprint"]
    assert len(event["querywatch.fingerprint"].split("...")[0]) == 80


async def test_finding_spans_are_children_of_the_server_span_when_enabled(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """`otel_finding_spans=True` adds a child span per finding, with the event's attributes."""
    app = library_app(library)
    trace_app(bridge, app)
    audit(app, library, settings=querywatch.Settings(otel_finding_spans=True))
    await get(app, "/authors")
    server = bridge.server_span()
    (child,) = [s for s in bridge.spans() if s.name == "querywatch.n_plus_one"]
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id
    assert dict(child.attributes or {}) == events_of(server, "querywatch.n_plus_one")[0]


# -- logs linked to traces ------------------------------------------------------------------


async def test_log_events_carry_the_trace_and_span_ids_of_the_server_span(
    library: sa.Engine, bridge: Telemetry, logs: Logs
) -> None:
    """The finding and request log events carry the exported server span's W3C trace and span
    ids."""
    app = library_app(library)
    trace_app(bridge, app)
    audit(app, library)
    await get(app, "/authors")
    server = bridge.server_span().context
    events = [e for e in logs.events() if e["event"].startswith("querywatch.")]
    assert [e["event"] for e in events] == ["querywatch.n_plus_one", "querywatch.request"]
    for event in events:
        assert event["trace_id"] == f"{server.trace_id:032x}"
        assert event["span_id"] == f"{server.span_id:016x}"


def test_log_events_carry_no_trace_ids_outside_a_span(
    library: sa.Engine, bridge: Telemetry, logs: Logs
) -> None:
    """Outside any span, log events have no trace fields."""
    with querywatch.watch("outside"):
        load_books_one_by_one(library)
    (event,) = logs.events()
    assert "trace_id" not in event
    assert "span_id" not in event


# -- instruments -------------------------------------------------------------------------------


def pool_name(name: str, **more: str) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({"db.client.connection.pool.name": name, **more}.items()))


def values(telemetry: Telemetry, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {key: point.value for key, point in telemetry.points(metric).items()}


@pytest.fixture
def queue_pool(tmp_path: Path) -> Iterator[sa.Engine]:
    """A SQLite file behind a QueuePool of 3 (+2 overflow), instrumented as pool `files`."""
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'pool.db'}", poolclass=sa.pool.QueuePool, pool_size=3,
        max_overflow=2,
    )  # fmt: skip
    querywatch.instrument(engine, name="files")
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


def test_pool_instruments_follow_the_semantic_conventions(
    queue_pool: sa.Engine, bridge: Telemetry
) -> None:
    """Connections by state, limits and pending requests are the `db.client.connection.*`
    instruments, with the pool's name, read from `PoolStats` at collection time."""
    held = [queue_pool.connect() for _ in range(3)]
    held.pop().close()
    try:
        assert values(bridge, "db.client.connection.count") == {
            pool_name("files", **{"db.client.connection.state": "used"}): 2,
            pool_name("files", **{"db.client.connection.state": "idle"}): 1,
        }
        assert values(bridge, "db.client.connection.max") == {pool_name("files"): 5}
        assert values(bridge, "db.client.connection.idle.max") == {pool_name("files"): 3}
        assert values(bridge, "db.client.connection.pending_requests") == {pool_name("files"): 0}
        assert values(bridge, "db.client.connection.timeouts") == {pool_name("files"): 0}
        stats = qw_pool.stats_for(queue_pool)
        assert stats is not None
        (use,) = bridge.points("db.client.connection.use_time").values()
        assert (use.count, use.sum) == (stats.use.count, stats.use.sum) == (1, use.sum)
        assert list(use.explicit_bounds) == list(qw_pool.USE_BUCKETS)
    finally:
        for conn in held:
            conn.close()


@pytest.mark.postgres
def test_pool_instruments_report_what_pool_stats_reports_under_contention(
    bridge: Telemetry,
) -> None:
    """Four threads starved by an exhausted PostgreSQL pool: pending requests read 4 while they
    wait, and afterwards timeouts, waits and uses equal `PoolStats` (timeouts = raised)."""
    require_postgres()
    engine = sa.create_engine(PSYCOPG_URL, pool_size=1, max_overflow=0, pool_timeout=0.2)
    querywatch.instrument(engine, name="contended")
    stats = qw_pool.stats_for(engine)
    assert stats is not None
    waiting: list[dict[tuple[tuple[str, Any], ...], Any]] = []

    def observe(s: qw_pool.PoolStats) -> None:
        # Called as a checkout starts waiting, before it blocks: the fourth one reads 4.
        if s is stats and s.pending == 4 and not waiting:
            waiting.append(values(bridge, "db.client.connection.pending_requests"))
            waiting.append(values(bridge, "db.client.connection.count"))

    remove = qw_pool.add_observer(observe)
    raised: list[int] = []
    barrier = threading.Barrier(4)

    def starve(i: int) -> None:
        barrier.wait()
        try:
            engine.connect()
        except sa.exc.TimeoutError:
            raised.append(i)

    try:
        with engine.connect():  # the only connection
            threads = [threading.Thread(target=starve, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
        assert waiting[0] == {pool_name("contended"): 4}
        assert waiting[1] == {
            pool_name("contended", **{"db.client.connection.state": "used"}): 1,
            pool_name("contended", **{"db.client.connection.state": "idle"}): 0,
        }
        timeouts = values(bridge, "db.client.connection.timeouts")
        assert timeouts == {pool_name("contended"): len(raised)}
        assert len(raised) == stats.checkout_timeouts_total == 4
        (wait,) = bridge.points("db.client.connection.wait_time").values()
        assert wait.count == stats.wait.count == 5
        assert wait.sum == pytest.approx(stats.wait.sum)
        (use,) = bridge.points("db.client.connection.use_time").values()
        assert (use.count, use.sum) == (stats.use.count, pytest.approx(stats.use.sum))
    finally:
        remove()
        querywatch.uninstrument(engine)
        engine.dispose()


async def test_requests_record_the_statement_histogram_and_the_finding_counter(
    library: sa.Engine, bridge: Telemetry
) -> None:
    """Each request records its statements and database time per route and method, and each
    finding counts once under its kind."""
    app = library_app(library)
    audit(app, library)
    await get(app, "/authors")
    await get(app, "/authors")
    route = {"http.route": "/authors", "http.request.method": "GET"}
    (statements,) = bridge.points("querywatch.request.db.statements").values()
    assert dict(statements.attributes or {}) == route
    assert (statements.count, statements.sum) == (2, 2 * N_PLUS_ONE_STATEMENTS)
    assert values(bridge, "querywatch.findings") == {
        tuple(sorted({"http.route": "/authors", "querywatch.unit.kind": "request",
                      "querywatch.finding.kind": "n_plus_one"}.items())): 2,
    }  # fmt: skip


def test_disabling_leaves_no_callbacks_behind(telemetry: Telemetry) -> None:
    """After `disable()` the instruments' callbacks report nothing, units decorate no span,
    and an engine used while enabled is freed."""
    telemetry.enable()
    engine = sa.create_engine("sqlite://")
    querywatch.instrument(engine)
    run_statements(engine, 1)
    assert telemetry.points("db.client.connection.count")
    querywatch.otel.disable()
    assert not querywatch.otel.is_enabled()
    for name in (
        "db.client.connection.count",
        "db.client.connection.pending_requests",
        "db.client.connection.timeouts",
        "querywatch.db.client.connection.checkouts",
    ):
        assert telemetry.points(name) == {}  # fmt: skip
    with telemetry.tracer.start_as_current_span("after"), querywatch.watch("after"):
        run_statements(engine, 1)
    (span,) = telemetry.spans()
    assert not any(key.startswith("querywatch.") for key in span.attributes or {})
    stats = qw_pool.stats_for(engine)
    assert stats is not None
    assert stats.wait.count == 2  # two checkouts, only the first while enabled
    (wait,) = telemetry.points("db.client.connection.wait_time").values()
    assert wait.count == 1
    ref = weakref.ref(engine)
    del stats
    querywatch.uninstrument(engine)
    engine.dispose()
    del engine
    gc.collect()
    assert ref() is None


def test_enabling_again_reuses_the_instruments(queue_pool: sa.Engine, telemetry: Telemetry) -> None:
    """`enable()` after `disable()` (or twice) on one meter provider creates no second set of
    instruments: each pool figure is reported once, not twice."""
    telemetry.enable()
    querywatch.otel.disable()
    telemetry.enable()
    telemetry.enable()
    with queue_pool.connect():
        assert values(telemetry, "db.client.connection.count") == {
            pool_name("files", **{"db.client.connection.state": "used"}): 1,
            pool_name("files", **{"db.client.connection.state": "idle"}): 0,
        }


# -- failure and packaging ---------------------------------------------------------------------


def test_failing_instrument_callbacks_report_nothing_and_are_counted(
    queue_pool: sa.Engine, bridge: Telemetry
) -> None:
    """With the `otel` component failing, a collection still succeeds, without querywatch's
    figures, and each failure is an internal error of `otel`."""
    with queue_pool.connect():
        pass
    before = _guard.internal_error_counts().get("otel", 0)
    _guard.injected_faults = frozenset({"otel"})
    assert bridge.points("db.client.connection.count") == {}
    assert _guard.internal_error_counts().get("otel", 0) > before


def test_importing_querywatch_does_not_import_opentelemetry() -> None:
    """`import querywatch` and a unit of work load no OpenTelemetry module."""
    code = (
        "import sys, querywatch\n"
        "with querywatch.watch('job'):\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without opentelemetry-api, importing querywatch.otel says which extra to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "querywatch.otel")
    with pytest.raises(ImportError, match=r"pip install 'querywatch\[otel\]'"):
        importlib.import_module("querywatch.otel")


def test_settings_otel_turns_the_bridge_on_in_setup(library: sa.Engine) -> None:
    """`setup(..., settings=Settings.from_env())` with `QUERYWATCH_OTEL=1` enables the bridge."""
    settings = querywatch.Settings.from_env({"QUERYWATCH_OTEL": "1"})
    try:
        querywatch.fastapi.setup(
            library_app(library), library, settings=settings, registry=CollectorRegistry()
        )
        assert querywatch.otel.is_enabled()
    finally:
        querywatch.otel.disable()
