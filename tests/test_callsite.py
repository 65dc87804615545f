"""Call sites: the user line behind a statement, found cheaply and exactly, sync and async."""

from __future__ import annotations

import inspect

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import querywatch
from querywatch._collection import Collector, current_collector


def _sites(collector: Collector) -> dict[str | None, int]:
    collector.fold()
    (shape,) = collector.shapes.values()
    return {site: stats.count for site, stats in shape.sites.items()}


def _line(offset: int) -> int:
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    assert caller is not None
    return caller.f_lineno + offset


def test_repeated_statement_is_attributed_to_the_user_line(sqlite_engine: sa.Engine) -> None:
    """Each execution of a loop is credited to the line in the test that ran it."""
    with sqlite_engine.connect() as conn, querywatch.watch("loop"):
        collector = current_collector()
        line = _line(2)
        for i in range(5):
            conn.execute(sa.text("SELECT :i"), {"i": i})
        assert collector is not None
        sites = _sites(collector)
    name = "test_repeated_statement_is_attributed_to_the_user_line"
    assert sites == {f"tests/test_callsite.py:{line} in {name}": 5}


def test_same_statement_from_two_lines_is_split_exactly(sqlite_engine: sa.Engine) -> None:
    """When one statement runs from two lines, each line gets its own exact count."""
    with sqlite_engine.connect() as conn, querywatch.watch("two-lines"):
        collector = current_collector()
        first = _line(2)
        for i in range(4):
            conn.execute(sa.text("SELECT :i"), {"i": i})
            conn.execute(sa.text("SELECT :i"), {"i": -i})
        assert collector is not None
        sites = _sites(collector)
    name = "test_same_statement_from_two_lines_is_split_exactly"
    assert sites == {
        f"tests/test_callsite.py:{first} in {name}": 4,
        f"tests/test_callsite.py:{first + 1} in {name}": 4,
    }


async def test_async_statement_is_attributed_through_the_greenlet(
    aiosqlite_engine: AsyncEngine,
) -> None:
    """Under the asyncio extension the call site is the awaiting line of the coroutine."""
    async with aiosqlite_engine.connect() as conn, querywatch.watch("async-loop"):
        collector = current_collector()
        line = _line(2)
        for i in range(3):
            await conn.execute(sa.text("SELECT :i"), {"i": i})
        assert collector is not None
        sites = _sites(collector)
    name = "test_async_statement_is_attributed_through_the_greenlet"
    assert sites == {f"tests/test_callsite.py:{line} in {name}": 3}
