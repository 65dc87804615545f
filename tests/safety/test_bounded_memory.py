"""Memory per unit of work is bounded, whatever the number of statements."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
import weakref
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import DetachedInstanceError

import querywatch
from querywatch import Report, _collection
from querywatch._collection import MAX_PARAMETER_KEYS, Collector, current_collector
from querywatch._orm import MAX_DISTINCT_PARENTS
from querywatch.fastapi import setup
from tests.models import Author, Base
from tests.web_apps import asgi_client


def _run(conn: sa.Connection, start: int, n: int) -> None:
    for i in range(start, start + n):
        conn.execute(sa.text("SELECT :i"), {"i": i})


def _collector() -> Collector:
    collector = current_collector()
    assert collector is not None
    return collector


def test_a_hundred_thousand_statements_are_counted_exactly(sqlite_engine: sa.Engine) -> None:
    """100,000 statements with distinct parameters: exact count, bounded structures."""
    with sqlite_engine.connect() as conn, querywatch.watch("huge") as report:
        _run(conn, 0, 100_000)
        collector = _collector()
        collector.fold()
        (shape,) = collector.shapes.values()
        (site,) = shape.sites.values()
        assert len(shape.last) == MAX_PARAMETER_KEYS
        assert len(site.parameter_keys) == MAX_PARAMETER_KEYS
    assert (report.statements, shape.count, len(report.queries)) == (100_000, 100_000, 200)


def test_memory_stays_flat_after_warm_up(sqlite_engine: sa.Engine) -> None:
    """Once the bounded structures are full, 20,000 more statements add almost nothing."""
    with sqlite_engine.connect() as conn, querywatch.watch("flat"):
        _run(conn, 0, 5_000)
        _collector().fold()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            _run(conn, 5_000, 20_000)
            _collector().fold()
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over 20,000 statements"


def test_lazy_loads_over_many_parents_keep_a_bounded_parent_set(sqlite_engine: sa.Engine) -> None:
    """3,000 lazy loads of one relationship: counted exactly, at most MAX_DISTINCT_PARENTS
    parents remembered, one N+1 finding."""
    Base.metadata.create_all(sqlite_engine)
    with Session(sqlite_engine) as s:
        s.add_all(Author(name=f"author {i}") for i in range(3_000))
        s.commit()
    with Session(sqlite_engine) as s, querywatch.watch("many parents") as report:
        for author in s.scalars(sa.select(Author)):
            _ = author.books
        (group,) = _collector().lazy.values()
        assert len(group.parents) == MAX_DISTINCT_PARENTS
    (finding,) = report.n_plus_one
    assert (finding.count, report.statements) == (3_000, 3_001)


def test_repeated_lazy_loads_after_close_are_merged_as_they_happen(
    sqlite_engine: sa.Engine,
) -> None:
    """10,000 caught DetachedInstanceErrors at one line hold one finding with the count."""
    Base.metadata.create_all(sqlite_engine)
    with Session(sqlite_engine) as s:
        s.add(Author(name="only"))
        s.commit()
    with Session(sqlite_engine) as s:
        author = s.scalars(sa.select(Author)).one()
    with querywatch.watch("after close") as report:
        for _ in range(10_000):
            with contextlib.suppress(DetachedInstanceError):
                _ = author.books
        assert len(_collector().after_close) == 1
    (finding,) = report.lazy_loads_after_close
    assert finding.count == 10_000


async def test_an_ended_request_is_freed_without_the_garbage_collector(
    web_library: sa.Engine,
) -> None:
    """A request's unit of work, with its report and findings (here an N+1), is freed by
    reference counting as soon as the request has ended: querywatch leaves no reference cycle
    for the garbage collector to find, request after request."""
    app = FastAPI()

    # async, and the Session closed in the endpoint: when the response is out, nothing of the
    # app's (a worker thread's context, a dependency's teardown) still holds the unit.
    @app.get("/authors")
    async def authors() -> list[int]:
        with Session(web_library) as db:
            return [len(a.books) for a in db.scalars(sa.select(Author).order_by(Author.id))]

    setup(app, web_library, registry=CollectorRegistry())
    seen: list[weakref.ref[Any]] = []

    def keep_weakly(report: Report) -> None:
        seen.extend([weakref.ref(report), weakref.ref(report._c)])

    # querywatch's own reporters only: a reporter an earlier test left (a console keeping the
    # last units) would hold the reports legitimately.
    saved = list(_collection._reporters)
    _collection._reporters[:] = [
        r
        for r in saved
        if getattr(r, "__module__", None) in ("querywatch._reporting", "querywatch._metrics")
    ]
    remove = querywatch.add_reporter(keep_weakly)
    try:
        async with asgi_client(app) as client:
            await client.get("/authors")  # the app's own first-request set-up
            seen.clear()
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    assert (await client.get("/authors")).status_code == 200
                alive = [ref() for ref in seen]
            finally:
                gc.enable()
    finally:
        remove()
        _collection._reporters[:] = saved
    assert len(seen) == 6
    assert alive == [None] * 6
