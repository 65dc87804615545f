"""watch() and the Report: live figures, final figures, nesting, isolation, bounded memory."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import querywatch
from querywatch import Settings
from querywatch._collection import current_collector


def _run(engine: sa.Engine, n: int) -> None:
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(sa.text("SELECT :i"), {"i": i})


def test_report_is_live_inside_the_block_and_final_after(sqlite_engine: sa.Engine) -> None:
    """Inside the block the report shows the figures so far; after it they are final."""
    with querywatch.watch("live") as report:
        _run(sqlite_engine, 2)
        assert (report.statements, report.final) == (2, False)
        _run(sqlite_engine, 1)
    assert (report.statements, report.final) == (3, True)
    _run(sqlite_engine, 5)
    assert report.statements == 3


async def test_async_with_yields_the_report(aiosqlite_engine: AsyncEngine) -> None:
    """`async with watch(...)` works like `with`."""
    async with querywatch.watch("async") as report, aiosqlite_engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    assert report.statements == 1


def test_nested_unit_counts_in_both(sqlite_engine: sa.Engine) -> None:
    """An inner unit is its own unit; its statements also count in the enclosing unit."""
    with querywatch.watch("outer") as outer:
        _run(sqlite_engine, 1)
        with querywatch.watch("inner") as inner:
            _run(sqlite_engine, 2)
        _run(sqlite_engine, 1)
    assert (outer.statements, inner.statements) == (4, 2)
    assert sum(outer.fingerprints.values()) == 4


def test_the_unit_of_work_is_reset_after_the_block(sqlite_engine: sa.Engine) -> None:
    """Leaving a block restores the enclosing unit (or none)."""
    with querywatch.watch("outer"):
        outer = current_collector()
        with querywatch.watch("inner"):
            pass
        assert current_collector() is outer
    assert current_collector() is None


def test_the_unit_ends_when_the_block_raises(sqlite_engine: sa.Engine) -> None:
    """The user's exception passes through unchanged and the report is final."""

    def work() -> querywatch.Report:
        with querywatch.watch("raises") as report:
            _run(sqlite_engine, 1)
            seen.append(report)
            raise KeyError("boom")

    seen: list[querywatch.Report] = []
    with pytest.raises(KeyError, match="boom"):
        work()
    assert (seen[0].statements, seen[0].final) == (1, True)


def test_watch_cannot_be_entered_twice() -> None:
    """Reusing a watch object is a programming error, reported clearly."""
    w = querywatch.watch("once")
    with w:
        pass
    with pytest.raises(RuntimeError, match="entered only once"), w:
        pass


def test_watch_needs_a_name() -> None:
    """An empty name is rejected."""
    with pytest.raises(TypeError, match="non-empty name"):
        querywatch.watch("")


def test_queries_kept_are_capped_but_counts_stay_exact(sqlite_engine: sa.Engine) -> None:
    """Beyond max_queries no statement is kept, yet the count and shapes stay exact."""
    with querywatch.watch("capped", settings=Settings(max_queries=10)) as report:
        _run(sqlite_engine, 1000)
    assert (report.statements, len(report.queries)) == (1000, 10)
    assert report.fingerprints == {"select ?": 1000}


def test_distinct_shapes_tracked_are_capped(sqlite_engine: sa.Engine) -> None:
    """Beyond max_shapes new shapes are not tracked, and the count stays exact."""
    with (
        querywatch.watch("shapes", settings=Settings(max_shapes=5)) as report,
        sqlite_engine.connect() as conn,
    ):
        for i in range(50):
            conn.exec_driver_sql(f"SELECT {i} AS c{i}")
    assert report.statements == 50
    assert len(report.fingerprints) == 5


def test_disabled_settings_record_nothing(sqlite_engine: sa.Engine) -> None:
    """enabled=False: the unit exists but records nothing."""
    with querywatch.watch("off", settings=Settings(enabled=False)) as report:
        _run(sqlite_engine, 3)
    assert report.statements == 0


def test_threads_never_see_each_others_statements() -> None:
    """50 concurrent threads, each in its own unit, each count exactly their own statements."""
    engine = sa.create_engine("sqlite://", pool_size=60)
    querywatch.instrument(engine)
    barrier = threading.Barrier(50)
    counts: dict[int, int] = {}

    def work(i: int) -> None:
        with querywatch.watch(f"thread-{i}") as report:
            barrier.wait()
            _run(engine, i + 1)
        counts[i] = report.statements

    threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    querywatch.uninstrument(engine)
    assert counts == {i: i + 1 for i in range(50)}


async def test_tasks_never_see_each_others_statements(tmp_path: Path) -> None:
    """50 concurrent asyncio tasks, each in its own unit, count exactly their own statements."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/tasks.db", pool_size=50)
    querywatch.instrument(engine)
    start = asyncio.Event()

    async def work(i: int) -> int:
        async with querywatch.watch(f"task-{i}") as report:
            await start.wait()
            async with engine.connect() as conn:
                for j in range(i + 1):
                    await conn.execute(sa.text("SELECT :j"), {"j": j})
                    await asyncio.sleep(0)
        return report.statements

    tasks = [asyncio.create_task(work(i)) for i in range(50)]
    await asyncio.sleep(0)
    start.set()
    counts = await asyncio.gather(*tasks)
    querywatch.uninstrument(engine)
    await engine.dispose()
    assert counts == [i + 1 for i in range(50)]


async def test_unit_follows_work_into_the_threadpool(sqlite_engine: sa.Engine) -> None:
    """Sync code run by anyio's threadpool (as Starlette runs sync endpoints) records into the
    unit that awaited it."""
    async with querywatch.watch("pool") as report:
        await anyio.to_thread.run_sync(_run, sqlite_engine, 3)
    assert report.statements == 3
