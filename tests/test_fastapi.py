"""`querywatch.fastapi.setup()`: one call wires engines, middleware and /metrics; response-model
serialization is its own phase."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, field_validator

import querywatch
from querywatch import Report, _callsite
from querywatch._collection import current_collector
from querywatch.fastapi import setup
from querywatch.middleware import QueryWatchMiddleware
from tests.web_apps import asgi_client, fastapi_app


async def test_setup_wires_middleware_and_metrics(sqlite_web_engine: sa.Engine) -> None:
    """After `setup(app, engine)` requests are audited and /metrics serves their figures."""
    registry = CollectorRegistry()
    app = fastapi_app(sqlite_web_engine)
    handles = setup(app, sqlite_web_engine, registry=registry)
    assert [h.engine for h in handles] == [sqlite_web_engine]
    async with asgi_client(app) as c:
        await c.get("/items/2")
        body = (await c.get("/metrics")).text
    assert 'querywatch_request_db_statements_sum{method="GET",route="/items/{n}"} 2.0' in body
    assert "/metrics" not in app.openapi()["paths"]


async def test_named_engines_become_pool_labels() -> None:
    """`setup(app, {"name": engine})` uses the names as the `pool` label."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool,
                              connect_args={"check_same_thread": False})  # fmt: skip
    registry = CollectorRegistry()
    app = fastapi_app(engine)
    setup(app, {"primary": engine}, registry=registry)
    try:
        async with asgi_client(app) as c:
            await c.get("/items/1")
        labels = {"pool": "primary", "operation": "SELECT"}
        count = registry.get_sample_value("querywatch_db_statement_duration_seconds_count", labels)
        assert count == 1
    finally:
        querywatch.uninstrument(engine)
        engine.dispose()


async def test_metrics_path_none_serves_no_metrics(sqlite_web_engine: sa.Engine) -> None:
    """`metrics_path=None` audits requests but adds no route."""
    app = fastapi_app(sqlite_web_engine)
    setup(app, sqlite_web_engine, registry=CollectorRegistry(), metrics_path=None)
    async with asgi_client(app) as c:
        assert (await c.get("/metrics")).status_code == 404


def test_setup_rejects_what_is_not_an_engine() -> None:
    """A wrong engine argument fails at setup, naming what is accepted."""
    with pytest.raises(TypeError, match="Engine"):
        setup(FastAPI(), 42, registry=CollectorRegistry())  # type: ignore[arg-type]


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Starlette, importing querywatch.fastapi says which extra to install."""
    monkeypatch.setitem(sys.modules, "starlette.requests", None)
    monkeypatch.delitem(sys.modules, "querywatch.fastapi")
    with pytest.raises(ImportError, match=r"pip install 'querywatch\[fastapi\]'"):
        importlib.import_module("querywatch.fastapi")


async def test_response_model_is_built_in_the_serialization_phase(
    sqlite_web_engine: sa.Engine,
) -> None:
    """While FastAPI builds the response model the unit's phase is `serialization`; the
    endpoint itself runs in `handler`."""
    phases: list[str] = []

    class Out(BaseModel):
        value: int

        @field_validator("value")
        @classmethod
        def record_phase(cls, value: int) -> int:
            collector = current_collector()
            phases.append(collector.phase if collector else "none")
            return value

    app = FastAPI()

    @app.get("/out", response_model=Out)
    async def out() -> Any:
        collector = current_collector()
        phases.append(collector.phase if collector else "none")
        return {"value": 1}

    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    async with asgi_client(app) as c:
        assert (await c.get("/out")).json() == {"value": 1}
    assert phases == ["handler", "serialization"]


@pytest.mark.parametrize(
    ("path", "phase"), [("/authors", "serialization"), ("/authors-in-handler", "handler")]
)
async def test_lazy_loads_are_tagged_with_their_phase(
    web_library: sa.Engine, reports: list[Report], path: str, phase: str
) -> None:
    """Lazy loads fired while the response model reads ORM relationships are `serialization`
    (findings and metrics); those in the endpoint are `handler`."""
    registry = CollectorRegistry()
    app = fastapi_app(web_library)
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    async with asgi_client(app) as c:
        response = await c.get(path)
    assert len(response.json()) == 10
    (finding,) = [f for r in reports for f in r.n_plus_one]
    assert (finding.relationship, finding.phase) == ("Author.books", phase)
    labels = {"route": path, "phase": phase}
    assert registry.get_sample_value("querywatch_lazy_loads_total", labels) == 10
    assert registry.get_sample_value("querywatch_n_plus_one_total", {"route": path}) == 1


async def test_serialization_findings_name_the_endpoint(
    web_library: sa.Engine, reports: list[Report]
) -> None:
    """Pydantic reads ORM attributes from compiled code, so no user line is on the stack: the
    finding's call site is the endpoint whose response was being built."""
    app = fastapi_app(web_library)
    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    async with asgi_client(app) as c:
        await c.get("/authors")
    (finding,) = [f for r in reports for f in r.n_plus_one]
    (endpoint,) = [r.endpoint for r in app.routes if getattr(r, "path", None) == "/authors"]
    line = inspect.getsourcelines(endpoint)[1]
    assert finding.callsite == f"tests/web_apps.py:{line} in authors (serializing its response)"


async def test_the_endpoint_site_follows_the_project_root(
    web_library: sa.Engine, reports: list[Report]
) -> None:
    """The endpoint's call site is formatted once per endpoint, and again when the project root
    changes: call sites are shown relative to it."""
    app = fastapi_app(web_library)
    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    previous = _callsite.project_root()
    async with asgi_client(app) as c:
        await c.get("/authors")
        _callsite.set_project_root(str(Path(previous) / "tests"))
        try:
            await c.get("/authors")
        finally:
            _callsite.set_project_root(previous)
    files = [str(f.callsite).split(":")[0] for r in reports for f in r.n_plus_one]
    assert files == ["tests/web_apps.py", "web_apps.py"]
