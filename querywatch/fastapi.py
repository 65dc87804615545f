"""FastAPI (and Starlette) glue: `setup(app, engine)` in one line, and the serialization phase.

`setup()` instruments the engines (without engines: every engine created afterwards, see
`querywatch.instrument_all`), adds `QueryWatchMiddleware`, and serves the Prometheus metrics at
`metrics_path`. With FastAPI installed, lazy loads fired while a response model is
built from ORM objects (after the endpoint returned) are tagged `phase="serialization"`: FastAPI
builds responses in `fastapi.routing.serialize_response`, which is wrapped once per process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy.engine import Engine

from querywatch import _autoinstrument, _metrics
from querywatch._collection import default_settings
from querywatch._instrumentation import Instrumentation, instrument, sync_engine_of
from querywatch._serialization import install_serialization_hook
from querywatch.middleware import QueryWatchMiddleware
from querywatch.settings import Settings

try:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "querywatch.fastapi needs Starlette or FastAPI: pip install 'querywatch[fastapi]'"
    ) from exc

__all__ = ["install_serialization_hook", "metrics_endpoint", "setup"]  # the hook: re-exported

if TYPE_CHECKING:
    from typing import TypeAlias

    from prometheus_client import CollectorRegistry
    from sqlalchemy.ext.asyncio import AsyncEngine

    AnyEngine: TypeAlias = Engine | AsyncEngine
    Engines: TypeAlias = AnyEngine | Iterable[AnyEngine] | Mapping[str, AnyEngine]


def setup(
    app: Any,
    engine_or_engines: Engines | None = None,
    *,
    metrics_path: str | None = "/metrics",
    settings: Settings | None = None,
    registry: CollectorRegistry | None = None,
    metrics_enabled: bool = True,
    otel: bool = False,
    console: bool | None = None,
) -> list[Instrumentation]:
    """Audit `app` (FastAPI or Starlette): instrument the engines, add the middleware, and
    (unless `metrics_path` is None or `metrics_enabled` is false) serve Prometheus metrics.

    `engine_or_engines`: an engine, a list of engines, or `{"name": engine}` (the names
    become the `pool` label); None (the default): every engine created from now on, sync or
    async (`querywatch.instrument_all()`; undo with `querywatch.uninstrument_all()`), engines
    that exist already are not seen. `settings` become the process-wide default. `registry`: the
    Prometheus registry (default prometheus_client's global `REGISTRY`). Returns the engines'
    instrumentation handles. Call before the app starts serving. `otel=True` (or
    `settings.otel`): the OpenTelemetry bridge, see `querywatch.otel`. `console=True` (None:
    `settings.console`, i.e. `QUERYWATCH_CONSOLE` with `Settings.from_env()`): serve the live
    console at `settings.console_path` (`app.state.querywatch_console`), see
    `querywatch.console`.
    """
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"setup(settings=...) takes a querywatch.Settings, got {settings!r}")
    if engine_or_engines is None:
        handles = _autoinstrument.instrument_all(settings=settings).instrumentations
    else:
        handles = [
            instrument(engine, name=name, settings=settings)
            for name, engine in _named_engines(engine_or_engines)
        ]
    if metrics_path is not None and not metrics_path.startswith("/"):
        raise ValueError(f"setup(metrics_path=...) must start with '/', got {metrics_path!r}")
    serve = metrics_enabled and metrics_path is not None
    app.add_middleware(
        QueryWatchMiddleware,
        settings=settings,
        registry=registry,
        metrics=metrics_enabled,
        exclude_paths=(metrics_path,) if serve else (),
    )
    if serve:
        assert metrics_path is not None
        _metrics.install(registry)
        route = Route(metrics_path, metrics_endpoint(registry), methods=["GET"])
        add_route = getattr(app, "add_route", None)
        if add_route is not None:
            add_route(metrics_path, route.endpoint, methods=["GET"], include_in_schema=False)
        else:  # pragma: no cover - Starlette without add_route
            app.router.routes.append(route)
    resolved = settings if settings is not None else default_settings()
    if console if console is not None else resolved.console:
        _add_console(app, engine_or_engines, resolved)
    install_serialization_hook()
    if otel or (settings is not None and settings.otel):
        from querywatch import _otel_asgi  # deferred: OpenTelemetry is optional

        _otel_asgi.setup(app)
    return handles


def _add_console(app: Any, engines: Engines | None, settings: Settings) -> None:
    """Serve the console in front of the auditing middleware (added after it: outside it)."""
    # deferred: only when the console is on
    from querywatch.console import Console, ConsoleMiddleware

    given = [engine for _, engine in _named_engines(engines)] if engines is not None else []
    console = Console(settings=settings, engines=given)
    state = getattr(app, "state", None)
    if state is not None:
        state.querywatch_console = console
    app.add_middleware(ConsoleMiddleware, console=console)


def _named_engines(engines: Engines) -> list[tuple[str | None, AnyEngine]]:
    if sync_engine_of(engines) is not None:
        return [(None, engines)]  # type: ignore[list-item]
    if isinstance(engines, Mapping):
        return [(str(name), engine) for name, engine in engines.items()]
    if isinstance(engines, Iterable):
        return [(None, engine) for engine in engines]
    raise TypeError(
        f"setup() takes an Engine, an AsyncEngine, a list of them or a dict name -> engine, "
        f"got {type(engines).__name__}"
    )


def metrics_endpoint(
    registry: CollectorRegistry | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving `registry` in the Prometheus text format (every worker's
    metrics under `PROMETHEUS_MULTIPROC_DIR`)."""
    target = REGISTRY if registry is None else registry

    async def querywatch_metrics(request: Request) -> Response:
        if _metrics.multiprocess_mode():
            # deferred: multiprocess mode only when asked
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            scraped = CollectorRegistry()
            MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
            body = generate_latest(scraped)
        else:
            body = generate_latest(target)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return querywatch_metrics
