"""Pool auditing under contention: waits, pending checkouts, timeouts and a storm, on PostgreSQL.

Holding a connection for a while *is* the scenario here (`time.sleep` / `asyncio.sleep` while a
connection is checked out); starts are synchronised with barriers and events, never sleeps.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import querywatch
from querywatch import pool as qw_pool
from querywatch._collection import PoolReport
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres

HOLD = 0.3
#: Thread start-up and scheduling on a small, busy machine.
TOLERANCE = 0.12


@pytest.fixture
def pg_pool() -> Iterator[Callable[..., sa.Engine]]:
    """Build instrumented psycopg engines with the given pool arguments; disposed after."""
    require_postgres()
    engines: list[sa.Engine] = []

    def make(**kw: Any) -> sa.Engine:
        engine = sa.create_engine(PSYCOPG_URL, **kw)
        querywatch.instrument(engine)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        querywatch.uninstrument(engine)
        engine.dispose()


@pytest.fixture
async def asyncpg_pool() -> AsyncIterator[Callable[..., AsyncEngine]]:
    """Build instrumented asyncpg engines with the given pool arguments; disposed after."""
    require_postgres()
    engines: list[AsyncEngine] = []

    def make(**kw: Any) -> AsyncEngine:
        engine = create_async_engine(ASYNCPG_URL, **kw)
        querywatch.instrument(engine)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        querywatch.uninstrument(engine)
        await engine.dispose()


def stats_of(engine: sa.Engine | AsyncEngine) -> qw_pool.PoolStats:
    stats = qw_pool.stats_for(engine)
    assert stats is not None
    return stats


def warm(engine: sa.Engine, n: int) -> None:
    """Open `n` connections up front, so the scenario measures waiting, not connecting."""
    conns = [engine.connect() for _ in range(n)]
    for conn in conns:
        conn.close()


def run_threads(n: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def assert_waits(waits: list[float], expected: list[float]) -> None:
    assert len(waits) == len(expected)
    for got, want in zip(sorted(waits), expected, strict=True):
        assert abs(got - want) < TOLERANCE, (sorted(waits), expected)


EXPECTED_WAITS = [0.0, 0.0, HOLD, HOLD, 2 * HOLD]


def test_waits_match_a_pool_of_two_shared_by_five_threads(
    pg_pool: Callable[..., sa.Engine],
) -> None:
    """Five threads holding a connection 0.3 s on a pool of two wait about 0, 0, .3, .3, .6 s."""
    engine = pg_pool(pool_size=2, max_overflow=0, pool_timeout=10)
    warm(engine, 2)
    before = stats_of(engine).snapshot()
    barrier = threading.Barrier(5)
    reports: list[PoolReport] = []

    def worker(i: int) -> None:
        barrier.wait()
        with querywatch.watch(f"worker-{i}") as report, engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            time.sleep(HOLD)
        reports.append(report.pool)

    run_threads(5, worker)
    assert_waits([r.wait_seconds for r in reports], EXPECTED_WAITS)
    assert [r.checkouts for r in reports] == [1] * 5
    stats = stats_of(engine)
    assert stats.wait.count - before.wait.count == 5
    assert abs((stats.wait.sum - before.wait.sum) - 4 * HOLD) < 3 * TOLERANCE
    assert stats.use.count - before.use.count == 5
    assert stats.use.sum - before.use.sum >= 5 * HOLD


async def test_waits_match_a_pool_of_two_shared_by_five_tasks(
    asyncpg_pool: Callable[..., AsyncEngine],
) -> None:
    """Five asyncio tasks holding a connection 0.3 s on a pool of two wait 0, 0, .3, .3, .6 s."""
    engine = asyncpg_pool(pool_size=2, max_overflow=0, pool_timeout=10)
    async with engine.connect(), engine.connect():
        pass  # warm: two connections open
    start = asyncio.Event()
    waits: list[float] = []

    async def worker(i: int) -> None:
        await start.wait()
        async with querywatch.watch(f"task-{i}") as report, engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
            await asyncio.sleep(HOLD)
        waits.append(report.pool.wait_seconds)

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await asyncio.sleep(0)  # let every task reach `start.wait()`
    start.set()
    await asyncio.gather(*tasks)
    assert_waits(waits, EXPECTED_WAITS)


def test_every_timeout_of_an_exhausted_pool_is_counted_from_threads(
    pg_pool: Callable[..., sa.Engine],
) -> None:
    """Four threads timing out on an exhausted pool are four timeouts; then the app serves."""
    engine = pg_pool(pool_size=1, max_overflow=0, pool_timeout=0.2)
    stats = stats_of(engine)
    most_pending = 0

    def observe(s: qw_pool.PoolStats) -> None:
        nonlocal most_pending
        if s is stats:
            most_pending = max(most_pending, s.state().pending)

    remove = qw_pool.add_observer(observe)
    reports: list[PoolReport] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        with querywatch.watch(f"starved-{i}") as report, pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        reports.append(report.pool)

    try:
        with engine.connect():  # the only connection
            run_threads(4, worker)
    finally:
        remove()
    assert stats.checkout_timeouts_total == 4
    assert [r.timeouts for r in reports] == [1] * 4
    assert all(r.wait_seconds >= 0.2 for r in reports)
    assert most_pending == 4
    assert stats.state().pending == 0
    with querywatch.watch("served") as report, engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    assert (report.pool.checkouts, report.pool.timeouts) == (1, 0)
    assert stats.checkout_timeouts_total == 4


async def test_every_timeout_of_an_exhausted_pool_is_counted_from_tasks(
    asyncpg_pool: Callable[..., AsyncEngine],
) -> None:
    """Four asyncio tasks timing out on an exhausted pool are four timeouts; then it serves."""
    engine = asyncpg_pool(pool_size=1, max_overflow=0, pool_timeout=0.2)
    stats = stats_of(engine)
    timeouts: list[int] = []

    async def worker(i: int) -> None:
        async with querywatch.watch(f"starved-{i}") as report:
            with pytest.raises(sa.exc.TimeoutError):
                await engine.connect()
        timeouts.append(report.pool.timeouts)

    async with engine.connect():  # the only connection
        await asyncio.gather(*(worker(i) for i in range(4)))
    assert stats.checkout_timeouts_total == 4
    assert timeouts == [1] * 4
    assert stats.state().pending == 0
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT 1")).scalar() == 1
    assert stats.checkouts_total == 2


def test_state_agrees_with_pool_status_after_a_storm(pg_pool: Callable[..., sa.Engine]) -> None:
    """After eight threads churn through a small pool, the figures match `pool.status()`."""
    engine = pg_pool(pool_size=3, max_overflow=2, pool_timeout=10)
    stats = stats_of(engine)
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(25):  # eight threads, five connections at most: overflow and waits
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")

    run_threads(8, worker)
    held = [engine.connect(), engine.connect()]
    try:
        state = stats.state()
        status = engine.pool.status()
        _size, idle, overflow, out = map(int, re.findall(r"-?\d+", status))
        assert (state.used, state.idle, state.max) == (out, idle, 5)
        assert state.overflow == max(0, overflow)
        assert state.pending == 0
        assert stats.checked_out == out == 2
        assert stats.checkouts_total == stats.checkins_total + 2
        assert stats.wait.count == stats.checkouts_total
        assert stats.use.count == stats.checkins_total
        assert stats.checkout_timeouts_total == 0
    finally:
        for conn in held:
            conn.close()
    assert stats.state().used == 0
