"""Who holds a leaked connection: a connection is a unit's leak only when the Session or
Connection holding it was opened during that unit, and the finding names where it was opened."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from typing import NoReturn

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import querywatch
from querywatch import _guard
from querywatch import pool as qw_pool


def here() -> str:
    """`tests/test_pool_owners.py:N in function` of the caller's *next* line."""
    frame = sys._getframe(1)
    return f"tests/test_pool_owners.py:{frame.f_lineno + 1} in {frame.f_code.co_name}"


class AppSession(Session):
    """A Session subclass with its own `__init__`, like the ones applications define."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine, expire_on_commit=False)


@pytest.fixture
def queue_engine(tmp_path: object) -> Iterator[sa.Engine]:
    """An instrumented SQLite file engine with a QueuePool (a connection per checkout)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/owners.sqlite", poolclass=sa.pool.QueuePool)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


# --- Sessions opened before the unit ------------------------------------------------------------


def test_a_session_opened_before_the_units_is_never_their_leak(any_engine: sa.Engine) -> None:
    """A Session opened like a session-scoped fixture's, holding a connection across several
    units (and checking a new one out after a commit), is a leak of none of them."""
    reports = []
    with Session(any_engine) as shared:
        for name in ("test_one", "test_two", "test_three"):
            with querywatch.watch(name, kind="test") as report:
                shared.execute(sa.text("SELECT 1"))
                if name == "test_two":
                    shared.commit()  # gives the connection back; the next statement takes one
                    shared.execute(sa.text("SELECT 2"))
            reports.append(report)
    assert [report.leaks for report in reports] == [(), (), ()]
    assert [report.pool.checkouts for report in reports] == [1, 1, 0]


async def test_an_async_session_opened_before_the_units_is_never_their_leak(
    any_async_engine: AsyncEngine,
) -> None:
    """An AsyncSession opened before the units and holding its connection across them is a
    leak of none of them."""
    reports = []
    async with AsyncSession(any_async_engine) as shared:
        for name in ("test_one", "test_two"):
            async with querywatch.watch(name, kind="test") as report:
                await shared.execute(sa.text("SELECT 1"))
            reports.append(report)
    assert [report.leaks for report in reports] == [(), ()]
    assert reports[0].pool.checkouts == 1


def test_a_sessionmaker_session_opened_before_the_unit_is_not_its_leak(
    queue_engine: sa.Engine,
) -> None:
    """Sessions from a `sessionmaker` (a Session subclass it creates) follow the same rule."""
    factory = sessionmaker(queue_engine)
    with factory() as shared, querywatch.watch("request") as report:
        shared.execute(sa.text("SELECT 1"))
    assert report.leaks == ()


def test_a_session_opened_in_an_enclosing_unit_is_only_that_units_leak(
    queue_engine: sa.Engine,
) -> None:
    """A Session opened in a test body and used by a request nested in it is not the request's
    leak; it is the test's, naming the line in the test that opened it."""
    with querywatch.watch("test_x", kind="test") as test:
        opened = here()
        session = Session(queue_engine)
        with querywatch.watch("GET /items", kind="request") as request:
            session.execute(sa.text("SELECT 1"))
    session.close()
    assert request.leaks == ()
    (leak,) = test.leaks
    assert (leak.opened_at, leak.owner, leak.unit) == (opened, "Session", "test_x")


# --- Sessions and Connections opened in the unit ------------------------------------------------


def test_a_sessionmaker_session_left_open_names_the_line_that_opened_it(
    any_engine: sa.Engine,
) -> None:
    """A `sessionmaker` Session opened in the unit and left open is a leak naming its line."""
    factory = sessionmaker(any_engine)
    with querywatch.watch("job") as report:
        opened = here()
        session = factory()
        session.execute(sa.text("SELECT 1"))
    session.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.owner) == (opened, "Session")


async def test_an_async_sessionmaker_session_left_open_is_an_async_session_leak(
    any_async_engine: AsyncEngine,
) -> None:
    """An `async_sessionmaker` session left open is a leak of an `AsyncSession`, at its line."""
    factory = async_sessionmaker(any_async_engine)
    async with querywatch.watch("job") as report:
        opened = here()
        session = factory()
        await session.execute(sa.text("SELECT 1"))
    await session.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.owner) == (opened, "AsyncSession")


def test_a_session_subclass_is_named_by_its_class(queue_engine: sa.Engine) -> None:
    """A Session subclass with its own `__init__` is stamped too, and named by its class."""
    with querywatch.watch("job") as report:
        opened = here()
        session = AppSession(queue_engine)
        session.execute(sa.text("SELECT 1"))
    session.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.owner) == (opened, "AppSession")


def test_an_engine_connect_left_open_is_a_leak_naming_its_line(any_engine: sa.Engine) -> None:
    """A Connection opened in the unit and left open is a leak: opened and checked out at the
    same line."""
    with querywatch.watch("job") as report:
        opened = here()
        conn = any_engine.connect()
    conn.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.callsite, leak.owner) == (opened, opened, "Connection")


async def test_an_async_engine_connect_left_open_is_a_leak_naming_its_line(
    any_async_engine: AsyncEngine,
) -> None:
    """An AsyncConnection opened in the unit and left open is a leak at its awaiting line."""
    async with querywatch.watch("job") as report:
        opened = here()
        conn = await any_async_engine.connect()
    await conn.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.owner) == (opened, "Connection")


def test_a_connection_opened_before_the_unit_is_not_its_leak(any_engine: sa.Engine) -> None:
    """A Connection opened before the unit and still open after it is no leak of it."""
    with any_engine.connect() as conn:
        with querywatch.watch("borrower") as report:
            conn.exec_driver_sql("SELECT 1")
        assert report.leaks == ()


def test_a_session_bound_to_a_connection_leaves_the_leak_to_the_connection(
    queue_engine: sa.Engine,
) -> None:
    """`Session(bind=conn)` joins a Connection it was given: a leak is the Connection's, at the
    line that opened it."""
    with querywatch.watch("job") as report:
        opened = here()
        conn = queue_engine.connect()
        session = Session(bind=conn)
        session.execute(sa.text("SELECT 1"))
    session.close()
    conn.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.owner) == (opened, "Connection")


def test_a_session_bound_to_an_older_connection_is_no_leak(queue_engine: sa.Engine) -> None:
    """A Session opened in the unit on a Connection opened before it (the join-an-external-
    transaction test pattern) leaves no leak behind."""
    with queue_engine.connect() as conn:
        with querywatch.watch("test_x", kind="test") as report:
            session = Session(bind=conn, join_transaction_mode="create_savepoint")
            session.execute(sa.text("SELECT 1"))
        session.close()
    assert report.leaks == ()


def test_a_session_that_gave_its_connection_back_is_no_leak(any_engine: sa.Engine) -> None:
    """A Session left open after `commit()` holds no connection: no leak."""
    with querywatch.watch("job") as report:
        session = Session(any_engine)
        session.execute(sa.text("SELECT 1"))
        session.commit()
    session.close()
    assert report.leaks == ()


def test_connections_of_sessions_opened_at_one_line_are_one_finding(
    queue_engine: sa.Engine,
) -> None:
    """Two Sessions opened at one line and left open make one finding with two connections."""
    sessions = []
    with querywatch.watch("job") as report:
        for _ in range(2):
            opened = here()
            session = Session(queue_engine)
            session.execute(sa.text("SELECT 1"))
            sessions.append(session)
    for session in sessions:
        session.close()
    (leak,) = report.leaks
    assert (leak.opened_at, leak.connections) == (opened, 2)


def test_a_leak_message_says_what_is_true(queue_engine: sa.Engine) -> None:
    """The message says the connection was still checked out when the unit ended, by which
    Session opened where, and how to fix it; never that it was "never returned"."""
    with querywatch.watch("nightly-import") as report:
        opened = here()
        session = Session(queue_engine)
        checked_out = here()
        session.execute(sa.text("SELECT 1"))
    session.close()
    (leak,) = report.leaks
    assert leak.describe().startswith(
        f"connection leak: a connection of pool {leak.pool!r} was still checked out when the "
        f"unit of work 'nightly-import' ended ({leak.held_seconds:.2f} s), held by a Session "
        f"opened at {opened} (which checked it out at {checked_out}); fix: close the Session"
    )
    assert "never" not in leak.describe()


# --- lifecycle and safety -------------------------------------------------------------------------


def test_uninstrumenting_the_last_engine_restores_session_init() -> None:
    """With no instrumented engine left, `Session.__init__` is SQLAlchemy's again (the
    `after_begin` listener stays, inert); instrumenting wraps it again, once."""
    gc.collect()
    assert qw_pool.stats_for_all() == [], "another test left an engine instrumented"
    current = Session.__dict__["__init__"]
    original = getattr(current, "__wrapped__", current)  # a dropped engine's wrapper: still on
    engine = sa.create_engine("sqlite://")
    querywatch.instrument(engine)
    try:
        assert qw_pool.session_hooks_installed()
        assert Session.__dict__["__init__"].__wrapped__ is original
    finally:
        querywatch.uninstrument(engine)
        engine.dispose()
    assert not qw_pool.session_hooks_installed()
    assert Session.__dict__["__init__"] is original
    assert sa.event.contains(Session, "after_begin", qw_pool._session_began)


def test_sessions_opened_outside_a_unit_are_not_stamped(queue_engine: sa.Engine) -> None:
    """Opening a Session with no unit of work running sets nothing on it."""
    with Session(queue_engine) as session:
        assert not any(name.startswith("_querywatch_") for name in vars(session))


def fail(*args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError("querywatch bug")


def test_a_failing_stamp_never_breaks_the_session(
    queue_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An internal error while stamping a Session is counted and swallowed: the Session
    works."""
    _guard.raise_internal_errors = False
    monkeypatch.setattr(qw_pool._callsite, "capture_for", fail)
    before = _guard.internal_error_counts().get("pool", 0)
    with querywatch.watch("faulty"), Session(queue_engine) as session:
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
    # The stamp, and the checkout (which captures its call site the same way).
    assert _guard.internal_error_counts().get("pool", 0) == before + 2


def test_a_failing_after_begin_never_breaks_the_transaction(
    queue_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An internal error while matching a Session's transaction to its connection is counted
    and swallowed: the statement runs and the transaction commits."""
    _guard.raise_internal_errors = False
    monkeypatch.setattr(qw_pool, "_session_kind", fail)
    before = _guard.internal_error_counts().get("pool", 0)
    with querywatch.watch("faulty"), Session(queue_engine) as session:
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
        session.commit()
    assert _guard.internal_error_counts().get("pool", 0) == before + 1
