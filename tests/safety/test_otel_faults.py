"""Fault injection into the OpenTelemetry bridge: with component `otel` failing on every call,
the fault matrix's FastAPI app (traced by opentelemetry-instrumentation-fastapi) answers and
writes exactly as it does without querywatch, and every failure is counted under `otel` alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import querywatch
import querywatch.fastapi
import querywatch.otel
from querywatch import _guard
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.safety.test_faults import SCENARIO, Databases, Outcome, build_app, drive


@pytest.fixture(params=["sqlite", "postgresql"])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    """The fault matrix's seeded sync and async engines (SQLite file, then PostgreSQL)."""
    if request.param == "postgresql":
        require_postgres()
        url, async_url = PSYCOPG_URL, ASYNCPG_URL
    else:
        path = tmp_path / "faults.db"
        url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    db = Databases(sa.create_engine(url), create_async_engine(async_url), url)
    await db.reseed()
    yield db
    for engine in (db.engine, db.async_engine):
        querywatch.uninstrument(engine)
    await db.async_engine.dispose()
    db.engine.dispose()


@dataclass
class Tracing:
    provider: TracerProvider
    exporter: InMemorySpanExporter


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    """The test's own SDK (spans into memory), with the bridge enabled on it; disabled after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    querywatch.otel.enable(tracer_provider=provider, meter_provider=meter_provider)
    yield Tracing(provider, exporter)
    querywatch.otel.disable()
    provider.shutdown()
    meter_provider.shutdown()


async def run(db: Databases, provider: TracerProvider, *, audited: bool) -> Outcome:
    leaked: list[sa.Connection] = []
    app = build_app(db, leaked)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    if audited:
        querywatch.fastapi.setup(
            app,
            {"main": db.engine, "async": db.async_engine},
            registry=CollectorRegistry(),
            otel=True,
        )
    try:
        return await drive(app, db)
    finally:
        for conn in leaked:
            conn.close()


async def test_a_failing_bridge_leaves_the_app_unchanged_and_is_counted(
    databases: Databases, tracing: Tracing
) -> None:
    """With `otel` raising on every call, responses, status codes, bodies and database writes
    equal an unaudited run's, every request still has its server span (without querywatch's
    attributes), and only `otel` counts internal errors."""
    exporter = tracing.exporter
    baseline = await run(databases, tracing.provider, audited=False)
    await databases.reseed()
    exporter.clear()
    before = _guard.internal_error_counts()
    _guard.injected_faults = frozenset({"otel"})
    faulty = await run(databases, tracing.provider, audited=True)
    _guard.injected_faults = frozenset()

    assert faulty.responses == baseline.responses
    assert faulty.rows == baseline.rows
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == len(SCENARIO)
    assert not any(k.startswith("querywatch.") for s in servers for k in s.attributes or {})
    after = _guard.internal_error_counts()
    grew = {c for c in after if after[c] != before.get(c, 0)}
    assert grew == {"otel"}
    # Per request at least: the span hold, the reporter and the log fields.
    assert after["otel"] - before.get("otel", 0) >= 3 * len(SCENARIO)
