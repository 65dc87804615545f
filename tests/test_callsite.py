"""Call sites: the user line behind a statement, found cheaply and exactly, sync and async."""

from __future__ import annotations

import asyncio
import inspect
import sys
from types import FrameType

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import querywatch
from querywatch._callsite import Where, _up, where_for
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


def _where_here(key: str) -> Where:
    return where_for(key, 0)  # the site: this line; its caller: whoever called this function


def test_a_helper_names_the_user_line_that_called_it() -> None:
    """A call site in a helper comes with the user line that called the helper."""
    line = _line(1)
    site, caller = _where_here("callsite-test-direct")
    assert (site or "").endswith("in _where_here")
    assert (
        caller
        == f"tests/test_callsite.py:{line} in test_a_helper_names_the_user_line_that_called_it"
    )


def test_a_function_an_event_loop_ran_names_no_caller() -> None:
    """A function a framework called (here a task an event loop ran) names no caller: the next
    user frame out started the loop; it did not call the function."""

    async def task() -> Where:
        return _where_here("callsite-test-task")

    site, caller = asyncio.run(task())
    assert (site or "").endswith("in _where_here")
    assert (caller or "").endswith("in task")  # the task called the helper

    async def endpoint() -> Where:
        return where_for("callsite-test-endpoint", 0)

    site, caller = asyncio.run(endpoint())
    assert (site or "").endswith("in endpoint")
    assert caller is None


def test_frames_outwards_are_the_stacks_own() -> None:
    """Walking out from a frame, level by level, finds the frames the interpreter has there,
    and nothing past the outermost."""

    def nested(levels: int) -> list[tuple[FrameType | None, FrameType | None]]:
        if levels:
            return nested(levels - 1)
        here = sys._getframe(0)
        pairs: list[tuple[FrameType | None, FrameType | None]] = []
        frame: FrameType | None = here
        steps = 0
        while frame is not None:
            pairs.append((_up(here, steps), frame))
            frame = frame.f_back
            steps += 1
        for beyond in range(steps, steps + 20):
            pairs.append((_up(here, beyond), None))
        return pairs

    for found, expected in nested(30):
        assert found is expected


def test_a_function_called_directly_after_a_framework_called_it_names_its_caller() -> None:
    """The same function, run as a task first and then awaited by user code, names that user
    code as its caller the second time: what a framework called is remembered as such."""

    async def endpoint() -> Where:
        return where_for("callsite-test-both", 0)

    async def main() -> Where:
        return await endpoint()

    line = _line(-2)  # `return await endpoint()`
    _, by_framework = asyncio.run(endpoint())
    _, by_user = asyncio.run(main())
    assert by_framework is None
    assert by_user == f"tests/test_callsite.py:{line} in main"
