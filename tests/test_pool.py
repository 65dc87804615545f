"""Pool auditing: exact counts, leaks, pool classes, dispose, several engines, invalidation."""

from __future__ import annotations

import gc
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import querywatch
from querywatch import _guard
from querywatch import pool as qw_pool
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres

EngineFactory = Callable[..., sa.Engine]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    """Build instrumented sync engines (`url` defaults to a SQLite file); disposed after."""
    engines: list[sa.Engine] = []

    def make(url: str | None = None, *, name: str | None = None, **kw: Any) -> sa.Engine:
        if url is None:
            url = f"sqlite:///{tmp_path / f'db{len(engines)}.sqlite'}"
        elif url.startswith("postgresql"):
            require_postgres()
        engine = sa.create_engine(url, **kw)
        querywatch.instrument(engine, name=name)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        querywatch.uninstrument(engine)
        engine.dispose()


def stats_of(engine: sa.Engine | AsyncEngine) -> qw_pool.PoolStats:
    stats = qw_pool.stats_for(engine)
    assert stats is not None
    return stats


def here() -> str:
    """`tests/test_pool.py:N in function` of the caller's *next* line."""
    frame = sys._getframe(1)
    return f"tests/test_pool.py:{frame.f_lineno + 1} in {frame.f_code.co_name}"


# --- exact counts ------------------------------------------------------------------------------


def test_checkouts_and_checkins_are_counted_exactly(any_engine: sa.Engine) -> None:
    """Three connections used one after another are three checkouts and three checkins."""
    stats = stats_of(any_engine)
    before = stats.snapshot()
    with querywatch.watch("three") as report:
        for _ in range(3):
            with any_engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
    assert report.pool.checkouts == 3
    assert report.pool.max_held == 1
    assert report.pool.leaked == 0
    assert stats.checkouts_total - before.checkouts_total == 3
    assert stats.checkins_total - before.checkins_total == 3
    assert stats.use.count - before.use.count == 3
    assert stats.wait.count - before.wait.count == 3


async def test_async_checkouts_and_checkins_are_counted_exactly(
    any_async_engine: AsyncEngine,
) -> None:
    """Async engines count checkouts and checkins exactly too."""
    stats = stats_of(any_async_engine)
    before = stats.snapshot()
    async with querywatch.watch("three") as report:
        for _ in range(3):
            async with any_async_engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
    assert report.pool.checkouts == 3
    assert stats.checkouts_total - before.checkouts_total == 3
    assert stats.checkins_total - before.checkins_total == 3


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_connections_held_at_once_are_counted(make_engine: EngineFactory, database: str) -> None:
    """`max_held` is the most connections the unit held at the same time."""
    engine = make_engine(PSYCOPG_URL if database == "postgresql" else None)
    with querywatch.watch("two at once") as report, engine.connect(), engine.connect():
        pass
    with engine.connect():
        pass
    assert report.pool.max_held == 2
    assert report.pool.checkouts == 2


def test_checkouts_outside_a_unit_only_count_process_wide(make_engine: EngineFactory) -> None:
    """A checkout with no unit of work running counts in the process-wide figures only."""
    engine = make_engine()
    with engine.connect():
        pass
    with querywatch.watch("empty") as report:
        pass
    assert stats_of(engine).checkouts_total == 1
    assert report.pool.checkouts == 0


def test_pool_listeners_do_not_slow_statements(make_engine: EngineFactory) -> None:
    """Pool auditing adds no engine-level listener (those switch statements to a slower path)."""
    engine = make_engine()
    assert engine._has_events is False
    assert engine.dialect._has_events is False


# --- leaks -------------------------------------------------------------------------------------


def test_a_leaked_session_is_a_finding_with_its_call_site_and_unit(any_engine: sa.Engine) -> None:
    """A Session opened in the unit and left open holding a connection is a leak, naming the
    line that opened it, the line that checked the connection out, and the unit."""
    with querywatch.watch("nightly-import") as report:
        opened = here()
        session = Session(any_engine)
        checked_out = here()
        session.execute(sa.text("SELECT 1"))
    try:
        assert report.pool.leaked == 1
        (leak,) = report.leaks
        assert (leak.opened_at, leak.callsite, leak.owner) == (opened, checked_out, "Session")
        assert leak.unit == "nightly-import"
        assert leak.pool == querywatch.instrument(any_engine).name
        assert leak.connections == 1
        assert leak.held_seconds >= 0
        assert "nightly-import" in leak.describe()
    finally:
        session.close()


async def test_a_leaked_async_session_is_a_finding(any_async_engine: AsyncEngine) -> None:
    """An AsyncSession opened in the unit and left open is a leak naming the line that opened
    it and the awaiting line that checked the connection out."""
    async with querywatch.watch("async-job") as report:
        opened = here()
        session = AsyncSession(any_async_engine)
        checked_out = here()
        await session.execute(sa.text("SELECT 1"))
    try:
        (leak,) = report.leaks
        assert (leak.opened_at, leak.callsite, leak.owner) == (opened, checked_out, "AsyncSession")
        assert leak.unit == "async-job"
    finally:
        await session.close()


def test_a_closed_session_is_no_leak(any_engine: sa.Engine) -> None:
    """A Session closed before the unit ends leaves nothing behind."""
    with querywatch.watch("tidy") as report, Session(any_engine) as session:
        session.execute(sa.text("SELECT 1"))
    assert report.leaks == ()
    assert report.pool.checkouts == 1


def test_a_connection_checked_out_before_the_unit_is_no_leak_of_it(
    make_engine: EngineFactory,
) -> None:
    """Only connections checked out *during* the unit of work can leak from it."""
    engine = make_engine()
    with engine.connect() as conn:
        with querywatch.watch("borrower") as report:
            conn.exec_driver_sql("SELECT 1")
        assert report.leaks == ()


def test_leaks_from_one_site_are_one_finding(make_engine: EngineFactory) -> None:
    """Several connections leaked from the same line make one finding with their count."""
    engine = make_engine()
    conns = []
    with querywatch.watch("loop") as report:
        for _ in range(3):
            conns.append(engine.connect())
    for conn in conns:
        conn.close()
    (leak,) = report.leaks
    assert leak.connections == 3


def test_report_counts_leaked_connections_not_findings(make_engine: EngineFactory) -> None:
    """`report.pool.leaked` is the number of connections left out, whatever their grouping."""
    engine = make_engine()
    conns = []
    with querywatch.watch("loop") as report:
        for _ in range(3):
            conns.append(engine.connect())
    for conn in conns:
        conn.close()
    assert (len(report.leaks), report.pool.leaked) == (1, 3)


def test_a_leak_is_reported_once_by_the_innermost_unit(make_engine: EngineFactory) -> None:
    """A connection leaked by a nested unit and still out at the outer end is reported once."""
    engine = make_engine()
    with querywatch.watch("request") as outer, querywatch.watch("job") as inner:
        conn = engine.connect()
    conn.close()
    (inner_leak,) = inner.leaks
    (outer_leak,) = outer.leaks
    assert inner_leak.id == outer_leak.id
    assert outer.findings_to_report() == ()
    assert inner.findings_to_report() == (inner_leak,)


def test_a_connection_returned_after_the_unit_no_longer_counts_as_held(
    make_engine: EngineFactory,
) -> None:
    """Returning a leaked connection later clears it from the unit's held connections."""
    engine = make_engine()
    with querywatch.watch("late") as report:
        conn = engine.connect()
    conn.close()
    assert report.pool.leaked == 1
    assert stats_of(engine).checked_out == 0


def test_a_failing_leak_check_never_breaks_the_unit(make_engine: EngineFactory) -> None:
    """An internal error in the leak check is swallowed: the unit of work still ends."""
    engine = make_engine()
    _guard.raise_internal_errors = False
    with querywatch.watch("faulty") as report:
        conn = engine.connect()
        # Only the leak check at the end of the unit fails: the checkout was recorded.
        _guard.injected_faults = frozenset({"pool"})
        before = _guard.internal_error_counts().get("pool", 0)
    after = _guard.internal_error_counts().get("pool", 0)
    _guard.injected_faults = frozenset()
    conn.close()
    assert report.final
    assert after == before + 1


def test_a_failing_observer_never_breaks_a_checkout(make_engine: EngineFactory) -> None:
    """An observer that raises is an internal error; the connection is still handed out."""
    engine = make_engine()
    _guard.raise_internal_errors = False

    def broken(stats: qw_pool.PoolStats) -> None:
        raise RuntimeError("observer bug")

    remove = qw_pool.add_observer(broken)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        remove()
    assert stats_of(engine).checkouts_total == 1


# --- pool classes ------------------------------------------------------------------------------


def test_queue_pool_reports_every_figure(make_engine: EngineFactory) -> None:
    """QueuePool: used, idle, max (pool_size + max_overflow) and overflow, from the pool."""
    engine = make_engine(poolclass=sa.pool.QueuePool, pool_size=2, max_overflow=3)
    conns = [engine.connect() for _ in range(3)]  # the third one is an overflow connection
    conns.pop().close()  # back into the queue, which has room
    state = stats_of(engine).state()
    assert state == qw_pool.PoolState("QueuePool", used=2, idle=1, max=5, overflow=1, pending=0)
    conns += [engine.connect(), engine.connect()]
    state = stats_of(engine).state()
    assert (state.used, state.idle, state.overflow) == (4, 0, 2)
    for conn in conns:
        conn.close()  # two fill the queue, two overflow connections are closed
    state = stats_of(engine).state()
    assert (state.used, state.idle, state.overflow) == (0, 2, 0)


def test_unbounded_queue_pool_reports_unlimited(make_engine: EngineFactory) -> None:
    """A QueuePool with max_overflow=-1 has no max: None, and `unlimited` says so."""
    engine = make_engine(poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=-1)
    with engine.connect(), engine.connect():
        state = stats_of(engine).state()
    assert (state.max, state.unlimited, state.used) == (None, True, 2)


def test_null_pool_reports_what_it_knows(make_engine: EngineFactory) -> None:
    """NullPool: connections out, never idle ones, unlimited; no overflow figure."""
    engine = make_engine(poolclass=sa.pool.NullPool)
    with engine.connect(), engine.connect():
        state = stats_of(engine).state()
    assert state == qw_pool.PoolState(
        "NullPool", used=2, idle=0, max=None, overflow=None, pending=0, unlimited=True
    )
    assert stats_of(engine).state().used == 0


@pytest.mark.parametrize("poolclass", [sa.pool.StaticPool, sa.pool.SingletonThreadPool])
def test_single_connection_pools_report_only_what_is_checked_out(
    make_engine: EngineFactory, poolclass: type[sa.pool.Pool]
) -> None:
    """StaticPool and SingletonThreadPool: only `used` and `pending`; the rest is absent."""
    engine = make_engine(poolclass=poolclass)
    with engine.connect():
        state = stats_of(engine).state()
    assert state == qw_pool.PoolState(
        poolclass.__name__, used=1, idle=None, max=None, overflow=None, pending=0
    )


def test_singleton_thread_pool_nested_connect_is_one_checkout(make_engine: EngineFactory) -> None:
    """SingletonThreadPool hands a thread its connection again: still one checkout."""
    engine = make_engine(poolclass=sa.pool.SingletonThreadPool)
    raw = engine.pool.connect()
    again = engine.pool.connect()
    again.close()
    raw.close()
    stats = stats_of(engine)
    assert (stats.checkouts_total, stats.checkins_total, stats.checked_out) == (1, 1, 0)


async def test_async_adapted_queue_pool_reports_every_figure() -> None:
    """AsyncAdaptedQueuePool (asyncpg's default) reports like a QueuePool."""
    require_postgres()
    engine = create_async_engine(ASYNCPG_URL, pool_size=2, max_overflow=1)
    querywatch.instrument(engine)
    try:
        async with engine.connect(), engine.connect():
            state = stats_of(engine).state()
        assert state == qw_pool.PoolState(
            "AsyncAdaptedQueuePool", used=2, idle=0, max=3, overflow=0, pending=0
        )
        assert stats_of(engine).state().idle == 2
    finally:
        querywatch.uninstrument(engine)
        await engine.dispose()


# --- creation, invalidation, recycling ---------------------------------------------------------


def test_opening_a_connection_is_timed_and_not_counted_as_waiting(
    make_engine: EngineFactory,
) -> None:
    """A new DBAPI connection's time goes to `create`, not to the checkout's wait."""
    engine = make_engine(PSYCOPG_URL, poolclass=sa.pool.NullPool)
    with engine.connect():
        pass
    with engine.connect():
        pass
    stats = stats_of(engine)
    assert stats.connections_opened_total == stats.create.count == 2
    assert stats.connections_closed_total == 2
    assert stats.create.sum > stats.wait.sum


def test_pre_ping_replaces_a_dead_connection_and_counts_it(make_engine: EngineFactory) -> None:
    """pool_pre_ping finds a terminated connection: one hard invalidation, a reconnect, served."""
    engine = make_engine(PSYCOPG_URL, pool_pre_ping=True, pool_size=1)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    killer = sa.create_engine(PSYCOPG_URL, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    killer.dispose()
    with querywatch.watch("after the kill") as report, engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    stats = stats_of(engine)
    assert stats.invalidations_total == {"hard": 1, "soft": 0}
    assert stats.connections_opened_total == 2
    assert stats.connections_closed_total == 1
    assert report.pool.checkouts == 1
    assert stats.checked_out == 0


def test_soft_invalidation_is_counted_and_the_connection_replaced(
    make_engine: EngineFactory,
) -> None:
    """A soft-invalidated connection is counted, and recycled at its next checkout."""
    engine = make_engine(poolclass=sa.pool.QueuePool, pool_size=1)
    with engine.connect() as conn:
        conn.connection.invalidate(soft=True)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    stats = stats_of(engine)
    assert stats.invalidations_total == {"hard": 0, "soft": 1}
    assert (stats.connections_opened_total, stats.connections_closed_total) == (2, 1)
    assert stats.checkouts_total == stats.checkins_total == 2


def test_an_invalidated_checked_out_connection_is_still_checked_in(
    make_engine: EngineFactory,
) -> None:
    """Invalidating a connection in use counts a hard invalidation and still a checkin."""
    engine = make_engine(PSYCOPG_URL)
    with querywatch.watch("broken") as report, engine.connect() as conn:
        conn.invalidate()
    stats = stats_of(engine)
    assert stats.invalidations_total["hard"] == 1
    assert stats.checkins_total == 1
    assert report.leaks == ()


def test_recycled_connections_are_counted_open_and_closed(make_engine: EngineFactory) -> None:
    """pool_recycle replaces connections: opened and closed counts stay one apart."""
    engine = make_engine(PSYCOPG_URL, pool_recycle=0, pool_size=1)
    for _ in range(3):
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    stats = stats_of(engine)
    assert stats.connections_closed_total >= 3
    assert stats.connections_opened_total == stats.connections_closed_total + 1
    assert stats.checkouts_total == 3


def test_a_detached_connection_is_no_longer_checked_out(make_engine: EngineFactory) -> None:
    """`detach()` takes a connection out of the pool: not held, not leaked; its close counts."""
    engine = make_engine(poolclass=sa.pool.QueuePool)
    with querywatch.watch("detach") as report:
        raw = engine.raw_connection()
        raw.detach()
    assert report.leaks == ()
    assert stats_of(engine).checked_out == 0
    raw.close()
    assert stats_of(engine).connections_closed_total == 1


# --- dispose, several engines, uninstrument ----------------------------------------------------


def test_dispose_keeps_the_auditing_on_the_new_pool(make_engine: EngineFactory) -> None:
    """After engine.dispose(), the new pool is audited: checkouts, timeouts and state."""
    engine = make_engine(PSYCOPG_URL, pool_size=1, max_overflow=0, pool_timeout=0.05)
    old = engine.connect()
    first_pool = engine.pool
    engine.dispose()
    with engine.connect():
        with querywatch.watch("exhausted") as report, pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        assert stats_of(engine).state().used == 1
    old.close()
    first_pool.dispose()  # it got its connection back: close it (the engine no longer does)
    stats = stats_of(engine)
    assert report.pool.timeouts == 1
    assert stats.checkout_timeouts_total == 1
    assert stats.checkouts_total == stats.checkins_total == 2
    engine.dispose()
    engine.dispose()
    with engine.connect():
        assert stats.checkouts_total == 3


def test_several_engines_are_kept_apart(make_engine: EngineFactory) -> None:
    """Each engine has its own statistics and `pool` name; leaks name the right pool."""
    orders = make_engine(name="orders", poolclass=sa.pool.QueuePool)
    users = make_engine(name="users", poolclass=sa.pool.QueuePool)
    with querywatch.watch("two pools") as report:
        with orders.connect(), orders.connect():
            pass
        leaked = users.connect()
    leaked.close()
    assert [s.name for s in qw_pool.stats_for_all()][-2:] == ["orders", "users"]
    assert (stats_of(orders).checkouts_total, stats_of(users).checkouts_total) == (2, 1)
    assert [leak.pool for leak in report.leaks] == ["users"]
    assert report.pool.checkouts == 3


def test_uninstrument_restores_the_pool(make_engine: EngineFactory) -> None:
    """uninstrument() removes the wrappers and listeners, on the current and disposed pools."""
    engine = make_engine(poolclass=sa.pool.QueuePool)
    first = engine.pool
    engine.dispose()
    querywatch.uninstrument(engine)
    for pool in (first, engine.pool):
        assert not {"connect", "_return_conn", "recreate"} & set(pool.__dict__)
    for pool in (first, engine.pool):
        listeners = [
            fn
            for name in ("connect", "close", "close_detached", "invalidate", "detach")
            for fn in getattr(pool.dispatch, name)
        ]
        assert not [fn for fn in listeners if fn.__module__ == "querywatch.pool"]
    assert qw_pool.stats_for(engine) is None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1


def test_a_dropped_engine_is_freed_without_uninstrument() -> None:
    """querywatch keeps no engine alive: a dropped, disposed engine is garbage-collected."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool)
    querywatch.instrument(engine)
    with engine.connect():
        pass
    engine.dispose()
    with engine.connect():
        pass
    stats = stats_of(engine)
    engine_ref, pool_ref = weakref.ref(engine), weakref.ref(engine.pool)
    del engine
    gc.collect()
    assert engine_ref() is None
    assert pool_ref() is None
    assert stats not in qw_pool.stats_for_all()


def test_observers_see_the_connection_back_in_the_pool(make_engine: EngineFactory) -> None:
    """Observers run after a checkin has put the connection back (unlike the `checkin` event)."""
    engine = make_engine(poolclass=sa.pool.QueuePool, pool_size=2)
    seen: list[tuple[int | None, int | None, int]] = []

    def observe(stats: qw_pool.PoolStats) -> None:
        state = stats.state()
        seen.append((state.used, state.idle, state.pending))

    remove = qw_pool.add_observer(observe)
    try:
        with engine.connect():
            pass
    finally:
        remove()
    # no idle connection: may wait; checked out; checked in and back in the pool
    assert seen == [(0, 0, 1), (1, 0, 0), (0, 1, 0)]


def test_histograms_are_ready_for_prometheus(make_engine: EngineFactory) -> None:
    """`cumulative()` gives Prometheus' `le` buckets: monotonic, ending at (+Inf, count)."""
    engine = make_engine()
    with engine.connect():
        pass
    stats = stats_of(engine)
    hist = stats.use
    buckets = hist.cumulative()
    assert [b for b, _ in buckets][:-1] == list(qw_pool.USE_BUCKETS)
    assert buckets[-1] == (float("inf"), 1)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)
    assert re.fullmatch(
        r"<querywatch.PoolStats '.*': 1 checkouts, 0 timeouts>", repr(stats_of(engine))
    )
