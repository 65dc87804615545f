"""Memory per unit of work is bounded, whatever the number of statements."""

from __future__ import annotations

import gc
import tracemalloc

import sqlalchemy as sa

import querywatch
from querywatch.collection import MAX_PARAMETER_KEYS, Collector, current_collector


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
        assert len(shape.parameter_counts) == MAX_PARAMETER_KEYS
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
