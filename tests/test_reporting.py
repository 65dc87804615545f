"""The structlog reporter: JSON events parsed from structlog's real output, levels, the
`log_requests` policy, a finding logged once per route per `log_finding_interval`, and finding
events of units that are not HTTP requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import querywatch
from querywatch import Settings, _reporting
from querywatch.middleware import QueryWatchMiddleware
from tests.conftest import Logs
from tests.web_apps import asgi_client, fastapi_app


def _app(engine: sa.Engine, settings: Settings) -> Any:
    app = fastapi_app(engine)
    app.add_middleware(QueryWatchMiddleware, settings=settings, registry=CollectorRegistry())
    return app


async def test_request_event_fields(sqlite_web_engine: sa.Engine, logs: Logs) -> None:
    """`querywatch.request` carries method, route, status, timings, counts, JSON-clean, at info."""
    app = _app(sqlite_web_engine, Settings(log_requests="all"))
    async with asgi_client(app) as c:
        await c.get("/items/3", headers={"X-Request-ID": "req-1"})
    (event,) = logs.events()
    assert event["event"] == "querywatch.request"
    assert event["level"] == "info"
    expected = {
        "method": "GET",
        "route": "/items/{n}",
        "status": 200,
        "request_id": "req-1",
        "db_statements": 3,
        "findings": 0,
        "n_plus_one": 0,
        "duplicate_query": 0,
        "lazy_load_after_close": 0,
        "connection_leak": 0,
        "pool_timeout": 0,
        "pool_leaked": 0,
    }
    assert {k: event[k] for k in expected} == expected
    assert event["duration_ms"] >= event["db_ms"] >= 0
    assert event["pool_checkouts"] == 1


@pytest.mark.parametrize(
    ("policy", "logged"),
    [("all", 1), ("findings", 0), ("none", 0), ("sampled", 1)],
)
async def test_log_requests_policy_for_clean_requests(
    sqlite_web_engine: sa.Engine, logs: Logs, policy: str, logged: int
) -> None:
    """Clean requests are logged for `all`, never for `findings`/`none`, by rate for `sampled`."""
    settings = Settings(log_requests=policy, log_sample_rate=1.0)  # type: ignore[arg-type]
    app = _app(sqlite_web_engine, settings)
    async with asgi_client(app) as c:
        await c.get("/items/1")
    assert len(logs.events()) == logged


async def test_sampled_at_rate_zero_logs_no_clean_request(
    sqlite_web_engine: sa.Engine, logs: Logs
) -> None:
    """`sampled` with `log_sample_rate=0` logs no clean request."""
    app = _app(sqlite_web_engine, Settings(log_requests="sampled", log_sample_rate=0.0))
    async with asgi_client(app) as c:
        for _ in range(20):
            await c.get("/items/1")
    assert logs.events() == []


@pytest.fixture
def file_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    """An instrumented SQLite file engine with a real queue pool (a leak is a held connection)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


def test_job_findings_are_logged_with_the_unit_name(file_engine: sa.Engine, logs: Logs) -> None:
    """A `watch()` unit logs its findings with `unit=<name>` and no request event."""
    with querywatch.watch("nightly-import"):
        leaked = file_engine.connect()  # never closed inside the unit: a leak
        leaked.exec_driver_sql("SELECT 1")
    leaked.close()
    (event,) = [e for e in logs.events() if e["event"] == "querywatch.connection_leak"]
    assert event["unit"] == "nightly-import"
    assert event["level"] == "warning"
    assert event["kind"] == "connection_leak"
    assert len(event["finding_id"]) == 12
    assert "route" not in event
    assert not [e for e in logs.events() if e["event"] == "querywatch.request"]


async def test_request_findings_carry_route_and_request_id(
    file_engine: sa.Engine, logs: Logs
) -> None:
    """A finding of a request is logged with its route and request id, and the request event
    (logged because it has findings) counts it at warning level."""
    from fastapi import FastAPI

    app = FastAPI()
    held: list[Any] = []

    @app.get("/leak/{n}")
    def leak(n: int) -> dict[str, int]:
        held.append(file_engine.connect())
        return {"n": n}

    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    async with asgi_client(app) as c:
        await c.get("/leak/1", headers={"X-Request-ID": "abc"})
    for conn in held:
        conn.close()
    by_event = {e["event"]: e for e in logs.events()}
    leak_event = by_event["querywatch.connection_leak"]
    assert (leak_event["route"], leak_event["request_id"]) == ("/leak/{n}", "abc")
    request = by_event["querywatch.request"]
    assert (request["level"], request["connection_leak"], request["findings"]) == ("warning", 1, 1)


def test_disabled_settings_log_nothing(file_engine: sa.Engine, logs: Logs) -> None:
    """With `enabled=False` a unit of work logs nothing, even a would-be leak."""
    with querywatch.watch("off", settings=Settings(enabled=False)):
        conn = file_engine.connect()
    conn.close()
    assert logs.events() == []


class _Clock:
    """The reporter's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _n_plus_ones(logs: Logs) -> list[dict[str, Any]]:
    return [e for e in logs.events() if e["event"] == "querywatch.n_plus_one"]


def _requests(logs: Logs) -> list[dict[str, Any]]:
    return [e for e in logs.events() if e["event"] == "querywatch.request"]


async def test_a_repeated_finding_is_logged_once_per_interval_with_its_repeats(
    web_library: sa.Engine, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same N+1 on the same route logs once per `log_finding_interval`: the requests in
    between log neither it nor a request event, and the next event says how many they were;
    the metrics count every request's finding."""
    clock = _Clock()
    monkeypatch.setattr(_reporting, "time", clock)
    registry = CollectorRegistry()
    app = fastapi_app(web_library)
    app.add_middleware(QueryWatchMiddleware, registry=registry)
    async with asgi_client(app) as c:
        await c.get("/authors")
        clock.now += 10
        await c.get("/authors")
        await c.get("/authors")
        first = (len(_n_plus_ones(logs)), len(_requests(logs)))
        clock.now += 60
        await c.get("/authors")
    assert first == (1, 1)
    events = _n_plus_ones(logs)
    assert [e.get("repeats") for e in events] == [None, 2]
    assert events[0]["finding_id"] == events[1]["finding_id"]
    assert len(_requests(logs)) == 2
    total = registry.get_sample_value("querywatch_n_plus_one_total", {"route": "/authors"})
    assert total == 4


async def test_interval_zero_logs_every_request_finding(web_library: sa.Engine, logs: Logs) -> None:
    """`log_finding_interval=0` logs the finding of every request."""
    app = _app(web_library, Settings(log_finding_interval=0))
    async with asgi_client(app) as c:
        for _ in range(3):
            await c.get("/authors")
    assert [e.get("repeats") for e in _n_plus_ones(logs)] == [None, None, None]
    assert len(_requests(logs)) == 3


def test_a_job_logs_a_repeated_finding_once_per_interval(
    file_engine: sa.Engine, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job name run again and again (a unit per queue message) logs the same finding once
    per `log_finding_interval`, the next event counting the runs in between."""
    clock = _Clock()
    monkeypatch.setattr(_reporting, "time", clock)
    for advance in (0, 10, 10, 60):
        clock.now += advance
        with querywatch.watch("consume-order"):
            leaked = file_engine.connect()
            leaked.exec_driver_sql("SELECT 1")
        leaked.close()
    leaks = [e for e in logs.events() if e["event"] == "querywatch.connection_leak"]
    assert [e.get("repeats") for e in leaks] == [None, 2]
    assert leaks[0]["unit"] == "consume-order"


def test_other_jobs_log_their_findings_on_their_own(file_engine: sa.Engine, logs: Logs) -> None:
    """Jobs of other names each log the finding they share: the interval is per job name."""
    for name in ("import-authors", "import-books"):
        with querywatch.watch(name):
            leaked = file_engine.connect()
            leaked.exec_driver_sql("SELECT 1")
        leaked.close()
    leaks = [e for e in logs.events() if e["event"] == "querywatch.connection_leak"]
    assert [e["unit"] for e in leaks] == ["import-authors", "import-books"]


def test_test_units_log_every_finding(file_engine: sa.Engine, logs: Logs) -> None:
    """Units of kind `test` (the pytest plugin's, `querywatch.testing`'s) log each finding,
    however often the same one recurs."""
    for _ in range(2):
        with querywatch.watch("test_import", kind="test"):
            leaked = file_engine.connect()
            leaked.exec_driver_sql("SELECT 1")
        leaked.close()
    leaks = [e for e in logs.events() if e["event"] == "querywatch.connection_leak"]
    assert len(leaks) == 2
    assert leaks[0]["finding_id"] == leaks[1]["finding_id"]
