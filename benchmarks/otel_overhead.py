"""OpenTelemetry bridge overhead: `querywatch.otel` enabled versus disabled, on PostgreSQL.

The detection benchmark's 21-statement N+1 (`select(Author)` for 20 authors, then one lazy load
of `author.books` per author, in a fresh Session, psycopg 3) inside `querywatch.watch()` inside a
span, both sides identical but for the bridge:

- `sdk`: the OpenTelemetry SDK (a `TracerProvider` exporting each span to an
  `InMemorySpanExporter` through a `SimpleSpanProcessor`, a `MeterProvider` with an
  `InMemoryMetricReader`). Enabled, the bridge puts the N+1 event and the summary attributes on
  the span, records the unit's instruments and the pool histograms.
- `api`: `opentelemetry-api` only (no SDK configured): spans are no-ops, and so is the bridge.

`--stack` measures the whole FastAPI stack instead (raw ASGI calls to a sync endpoint running the
same N+1, the app traced by opentelemetry-instrumentation-fastapi with the SDK above, set up with
`otel=True` versus `otel=False`; the middleware's structlog events rendered as JSON into
/dev/null, so the trace ids added to them are measured too).

Rounds alternate in one process so machine drift cancels; best-of and the median of per-round
ratios, wall and this process's CPU time. On a loaded machine those ratios move by several per
cent from run to run, far more than the bridge costs, so the bridge's own work is also timed
alone (CPU µs, best of the rounds): its reporter on the finished N+1 unit inside a span, the
pool observer on a checkout+checkin, and the log fields, each against the same loop without it.

    python benchmarks/otel_overhead.py [--requests 200] [--rounds 15] [--url ...] [--stack]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import sqlalchemy as sa
from _common import (
    POSTGRES_URL,
    Base,
    asgi_get,
    build,
    interleaved,
    print_ratio,
    request,
    timed,
)
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import querywatch
import querywatch.fastapi
import querywatch.otel
from querywatch import _reporting


class Sdk:
    """The SDK side: providers of its own (the global ones stay unset, for the `api` side)."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.meter_provider = MeterProvider(
            metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False
        )


def unit_loop(engine: sa.Engine, tracer: trace.Tracer, n: int) -> Callable[[], None]:
    def loop() -> None:
        for _ in range(n):
            with tracer.start_as_current_span("request"), querywatch.watch("bench") as report:
                request(engine)
        assert report.statements == 21, report
        assert len(report.n_plus_one) == 1, report

    return loop


@contextlib.contextmanager
def bridge(on: bool, **providers: Any) -> Iterator[None]:
    if on:
        querywatch.otel.enable(**providers)
    try:
        yield
    finally:
        querywatch.otel.disable()


def compare(
    label: str,
    rounds: int,
    n: int,
    off: Callable[[], tuple[float, float]],
    on: Callable[[], tuple[float, float]],
) -> None:
    off(), on()  # warm-up: connections, compiled caches, instruments
    results = interleaved(rounds, {"off": off, "on": on})
    for name, index in (("wall", 0), ("cpu ", 1)):
        b = [t[index] / n for t in results["off"]]
        w = [t[index] / n for t in results["on"]]
        print_ratio(f"{label:<22} {name}", b, w, per="request", names=("off", "on"))


def bench_units(args: argparse.Namespace, engine: sa.Engine, sdk: Sdk) -> None:
    sdk_tracer = sdk.tracer_provider.get_tracer("bench")
    api_tracer = trace.get_tracer("bench")  # no SDK configured: no-op spans
    providers = {"tracer_provider": sdk.tracer_provider, "meter_provider": sdk.meter_provider}

    def run(tracer: trace.Tracer, on: bool, **options: Any) -> tuple[float, float]:
        sdk.spans.clear()
        with bridge(on, **options):
            return timed(unit_loop(engine, tracer, args.requests))

    compare(
        "sdk, watch() in a span",
        args.rounds,
        args.requests,
        lambda: run(sdk_tracer, False),
        lambda: run(sdk_tracer, True, **providers),
    )
    compare(
        "api only (no SDK)",
        args.rounds,
        args.requests,
        lambda: run(api_tracer, False),
        lambda: run(api_tracer, True),
    )


def bench_parts(args: argparse.Namespace, engine: sa.Engine, sdk: Sdk) -> None:
    """The bridge's own work, each part timed alone against the same loop without it."""
    sdk_providers: dict[str, Any] = {
        "tracer_provider": sdk.tracer_provider,
        "meter_provider": sdk.meter_provider,
    }
    for label, tracer, providers in (
        ("sdk", sdk.tracer_provider.get_tracer("bench"), sdk_providers),
        ("api only", trace.get_tracer("bench"), {}),
    ):
        querywatch.otel.enable(**providers)
        try:
            time_parts(label, tracer, engine, sdk, args.rounds)
        finally:
            querywatch.otel.disable()


def time_parts(label: str, tracer: trace.Tracer, engine: sa.Engine, sdk: Sdk, rounds: int) -> None:
    from querywatch import pool

    n = 2000
    stats = pool.stats_for(engine)
    state = querywatch.otel._bridge
    assert stats is not None
    assert state is not None
    assert state.instruments is not None
    reporter, observer = state.report, state.instruments.observe_pool
    with tracer.start_as_current_span("request"), querywatch.watch("bench") as report:
        request(engine)

    def spans(work: Callable[[], object]) -> None:
        for _ in range(n):
            with tracer.start_as_current_span("request"):
                work()

    def cycles(observe: bool) -> None:
        for _ in range(n):
            stats.wait.observe(0.0)  # what a checkout and a checkin add to PoolStats
            stats.use.observe(0.001)
            if observe:
                observer(stats)
                observer(stats)

    parts: tuple[tuple[str, Callable[[], None], Callable[[], None]], ...] = (
        ("reporter, per unit", lambda: spans(lambda: None),
         lambda: spans(lambda: reporter(report))),
        ("pool observer, per checkout+checkin", lambda: cycles(False), lambda: cycles(True)),
        ("log fields, per unit", lambda: spans(lambda: None),
         lambda: spans(lambda: querywatch.otel.trace_fields(report))),
    )  # fmt: skip

    def cpu(loop: Callable[[], None]) -> float:
        sdk.spans.clear()
        return timed(loop)[1]

    for name, without, with_it in parts:
        cpus = interleaved(
            rounds, {"without": partial(cpu, without), "with": partial(cpu, with_it)}
        )
        added = min(cpus["with"]) - min(cpus["without"])
        print(f"{label:<9} {name:<36} +{added / n * 1e6:6.1f} µs CPU")


def bench_stack(args: argparse.Namespace, url: str, sdk: Sdk) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    def app(otel: bool) -> Any:
        engine = sa.create_engine(url)
        application = FastAPI()

        @application.get("/nplus1")
        def nplus1() -> int:
            return request(engine)

        FastAPIInstrumentor.instrument_app(
            application, tracer_provider=sdk.tracer_provider, meter_provider=sdk.meter_provider
        )
        querywatch.fastapi.setup(
            application, engine, registry=CollectorRegistry(), metrics_path=None, otel=otel
        )
        querywatch.otel.disable()  # toggled per round below
        return application

    async def call(application: Any) -> None:
        assert await asgi_get(application, "/nplus1") == 200

    import os

    import structlog

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=devnull),
        cache_logger_on_first_use=True,
    )
    loop = asyncio.new_event_loop()
    plain, bridged = app(otel=False), app(otel=True)
    providers = {"tracer_provider": sdk.tracer_provider, "meter_provider": sdk.meter_provider}

    def run(application: Any, on: bool) -> tuple[float, float]:
        sdk.spans.clear()

        async def requests() -> None:
            for _ in range(args.requests):
                await call(application)

        with bridge(on, **providers):
            return timed(lambda: loop.run_until_complete(requests()))

    compare(
        "sdk, FastAPI stack",
        args.rounds,
        args.requests,
        lambda: run(plain, False),
        lambda: run(bridged, True),
    )
    loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--url", default=POSTGRES_URL)
    parser.add_argument("--stack", action="store_true", help="the whole FastAPI stack instead")
    args = parser.parse_args()
    engine = build(args.url)
    querywatch.instrument(engine)
    # The bridge is what is measured, not log lines: instrument() installed the structlog
    # reporter, which goes again (the middleware of --stack installs it once more).
    _reporting.uninstall()
    sdk = Sdk()
    print(
        f"SQLAlchemy {sa.__version__}, PostgreSQL (psycopg), {args.rounds} interleaved rounds x "
        f"{args.requests} requests of 21 statements (one N+1 finding each)"
    )
    if args.stack:
        bench_stack(args, args.url, sdk)
    else:
        bench_units(args, engine, sdk)
        bench_parts(args, engine, sdk)
    Base.metadata.drop_all(engine)


if __name__ == "__main__":
    main()
