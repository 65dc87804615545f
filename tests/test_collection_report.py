"""`querywatch._collection.Report`: what reporters read of a finished unit, all public."""

from __future__ import annotations

import dataclasses
import weakref

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

import querywatch
from querywatch import Settings, _guard
from querywatch._collection import STATEMENT_BUCKETS
from querywatch.middleware import QueryWatchMiddleware
from tests.models import Author, create_schema, seed
from tests.web_apps import asgi_client, fastapi_app


def test_shape_durations_count_the_units_own_statements(sqlite_engine: sa.Engine) -> None:
    """One entry per shape that ran in the unit itself, bucketed; a nested unit's are its own."""
    with querywatch.watch("outer") as outer, sqlite_engine.connect() as conn:
        for _ in range(3):
            conn.exec_driver_sql("SELECT 1")
        with querywatch.watch("inner") as inner:
            conn.exec_driver_sql("SELECT 2")
    (shape,) = outer.shape_durations
    assert (shape.operation, sum(shape.buckets)) == ("SELECT", 3)
    assert shape.pool == "sqlite:///"  # the engine's pool name (`instrument(name=...)`)
    assert len(shape.buckets) == len(STATEMENT_BUCKETS) + 1
    assert shape.seconds > 0
    assert [sum(s.buckets) for s in inner.shape_durations] == [1]


def test_durations_of_unrepeated_statements_are_the_folded_ones(sqlite_engine: sa.Engine) -> None:
    """A unit whose statements all differ in shape is folded only when its shapes are read,
    and reports the same durations either way."""
    with querywatch.watch("distinct") as report, sqlite_engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t (x) VALUES (1)")
        conn.exec_driver_sql("SELECT x FROM t")
    assert report._c.unfolded is not None  # the fold was left to the readers
    unfolded = sorted(report.shape_durations, key=lambda d: d.operation)
    assert report.fingerprints == {
        "create table t (x integer)": 1,
        "insert into t (x) values (?)": 1,
        "select x from t": 1,
    }
    assert sorted(report.shape_durations, key=lambda d: d.operation) == unfolded
    assert report.other_pool_durations == ()


def test_durations_beyond_max_shapes_are_the_folded_ones(sqlite_engine: sa.Engine) -> None:
    """A unit of more distinct statements than `max_shapes` reports the durations of the shapes
    it keeps, whether its shapes were read first or not."""
    with (
        querywatch.watch("many", settings=Settings(max_shapes=2)) as report,
        sqlite_engine.connect() as conn,
    ):
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t (x) VALUES (1)")
        conn.exec_driver_sql("SELECT x FROM t")
    assert [sum(d.buckets) for d in report.shape_durations] == [1, 1]
    assert len(report.fingerprints) == 2


class _Unhashable:
    """A bound value whose hash fails with an error SQLAlchemy's drivers never raise."""

    def __hash__(self) -> int:
        raise ValueError("no hash for this value")

    def __conform__(self, protocol: object) -> int:  # sqlite3 binds it as 1
        return 1


def test_a_fold_that_fails_after_the_unit_ended_never_raises(sqlite_engine: sa.Engine) -> None:
    """Reading the shapes of an ended unit whose fold was left to the readers, when that fold
    fails: an internal error, counted, and the reader gets what could be folded."""
    _guard.raise_internal_errors = False
    before = _guard.internal_error_counts().get("collector", 0)
    with querywatch.watch("odd value") as report, sqlite_engine.connect() as conn:
        conn.exec_driver_sql("SELECT ?", (_Unhashable(),))
    assert report.statements == 1
    assert report.fingerprints == {"select ?": 1}  # what the fold made before it failed
    assert _guard.internal_error_counts().get("collector", 0) == before + 1


def test_other_pool_durations_are_empty_on_one_engine(sqlite_engine: sa.Engine) -> None:
    """Statements of shapes first seen on another pool are listed apart; one engine has none."""
    with querywatch.watch("one engine") as report, sqlite_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert report.other_pool_durations == ()


def test_lazy_loads_by_phase(sqlite_engine: sa.Engine) -> None:
    """Lazy loads are counted per phase, those of nested units included."""
    create_schema(sqlite_engine)
    with Session(sqlite_engine) as session:
        seed(session)
    with querywatch.watch("outer") as outer, Session(sqlite_engine) as session:
        authors = session.scalars(sa.select(Author).limit(3)).all()
        with querywatch.watch("inner") as inner:
            for author in authors:
                assert author.books
    assert inner.lazy_loads == {"handler": 3}
    assert outer.lazy_loads == {"handler": 3}


def test_metrics_of_a_job_are_every_registrys(sqlite_engine: sa.Engine) -> None:
    """A unit no middleware served records into every registry (`metrics` is None)."""
    with querywatch.watch("job") as report:
        pass
    assert report.metrics is None


def test_a_report_can_be_referenced_weakly() -> None:
    """Reporters may key their per-unit state on the report without keeping it alive."""
    with querywatch.watch("weak") as report:
        pass
    assert weakref.ref(report)() is report


async def test_the_records_of_a_request_are_whole_dataclasses(sqlite_web_engine: sa.Engine) -> None:
    """`report.http`, `report.pool` and `report.shape_durations` (made without their dataclass
    `__init__`, once per unit) have every field of their class, and equal the same record made
    by their constructor."""
    reports: list[querywatch.Report] = []
    app = fastapi_app(sqlite_web_engine)
    app.add_middleware(QueryWatchMiddleware, registry=CollectorRegistry())
    remove = querywatch.add_reporter(reports.append)
    try:
        async with asgi_client(app) as c:
            await c.get("/items/2")
    finally:
        remove()
    (report,) = reports
    records = [report.http, report.pool, *report.shape_durations]
    assert len(records) == 3
    for record in records:
        assert record is not None
        names = {f.name for f in dataclasses.fields(record)}
        assert set(vars(record)) == names
        assert type(record)(**dataclasses.asdict(record)) == record
