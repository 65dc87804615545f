"""Test units (`querywatch.testing`, the pytest plugin) report only what they judge, and no unit
name of a unit that is not an HTTP request becomes a metric label value."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import querywatch
from querywatch import _metrics
from querywatch.testing import WatchedUnit, assert_no_n_plus_one
from tests.conftest import Logs

ROUTE_COUNTERS = (
    "querywatch_n_plus_one_total",
    "querywatch_lazy_loads_total",
    "querywatch_duplicate_queries_total",
    "querywatch_lazy_loads_after_close_total",
    "querywatch_db_pool_leaked_connections_total",
)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry with the querywatch metrics installed."""
    registry = CollectorRegistry()
    _metrics.install(registry)
    return registry


def read_name(engine: sa.Engine, author_id: int) -> None:
    """One lookup by id, always from this line: a loop over it from one unit is an N+1."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT :id AS name"), {"id": author_id}).scalar()


def run_jobs_in(assertion: AbstractContextManager[Any], engine: sa.Engine) -> None:
    """A job that looks six authors up one by one, inside `assertion`."""
    with assertion, querywatch.watch("nightly-import"):
        for author_id in range(1, 7):
            read_name(engine, author_id)


def routes(registry: CollectorRegistry) -> set[str]:
    """Every `route` label value of the counters of finished units."""
    return {
        sample.labels["route"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name in ROUTE_COUNTERS and "route" in sample.labels
    }


def findings_logged(logs: Logs) -> list[tuple[str, str]]:
    """(event, unit) of every finding event logged."""
    return [
        (event["event"], event.get("unit", event.get("route")))
        for event in logs.events()
        if event["event"] != "querywatch.request"
    ]


def test_a_test_unit_does_not_add_up_the_statements_of_its_jobs(
    sqlite_engine: sa.Engine, logs: Logs, registry: CollectorRegistry
) -> None:
    """Six jobs that each look one author up are no N+1 of the test around them: not on its
    report, not judged, not logged, not counted."""
    unit = WatchedUnit("tests/test_x.py::test_jobs")
    with unit as report:
        for author_id in range(1, 7):
            with querywatch.watch("job"):
                read_name(sqlite_engine, author_id)
    assert report.statements == 6
    assert (report.findings, unit.findings) == ((), ())
    assert findings_logged(logs) == []
    assert routes(registry) == set()


def test_a_test_unit_reports_what_its_body_runs_itself(
    sqlite_engine: sa.Engine, logs: Logs, registry: CollectorRegistry
) -> None:
    """With nothing nested, the test body's own N+1 is on its report, judged, logged once with
    the test's name, and counted under `route="<test>"`."""
    unit = WatchedUnit("tests/test_x.py::test_loop")
    with unit as report:
        for author_id in range(1, 7):
            read_name(sqlite_engine, author_id)
    (finding,) = report.findings
    assert unit.findings == (finding,)
    assert findings_logged(logs) == [("querywatch.n_plus_one", "tests/test_x.py::test_loop")]
    labels = {"route": "<test>"}
    assert registry.get_sample_value("querywatch_n_plus_one_total", labels) == 1
    assert routes(registry) == {"<test>"}


def test_a_jobs_finding_is_judged_by_the_test_and_reported_by_the_job(
    sqlite_engine: sa.Engine, logs: Logs, registry: CollectorRegistry
) -> None:
    """A job's N+1 inside a test unit fails the assertion, is logged once (by the job) and
    counted under `route="<job>"`."""
    with pytest.raises(AssertionError, match="N\\+1"):
        run_jobs_in(assert_no_n_plus_one(), sqlite_engine)
    assert findings_logged(logs) == [("querywatch.n_plus_one", "nightly-import")]
    assert registry.get_sample_value("querywatch_n_plus_one_total", {"route": "<job>"}) == 1
    assert routes(registry) == {"<job>"}


def test_a_leak_of_a_job_counts_its_connections_under_the_job_kind(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """Two connections leaked from one line of a job count 2, with the pool and `<job>`."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leaks.sqlite", poolclass=sa.pool.QueuePool)
    querywatch.instrument(engine, name="imports")
    left_open = []
    try:
        with querywatch.watch("import 2026-11-30"):
            for _ in range(2):
                left_open.append(engine.connect())
    finally:
        for conn in left_open:
            conn.close()
        querywatch.uninstrument(engine)
        engine.dispose()
    labels = {"pool": "imports", "route": "<job>"}
    assert registry.get_sample_value("querywatch_db_pool_leaked_connections_total", labels) == 2
    assert routes(registry) == {"<job>"}
