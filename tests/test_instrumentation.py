"""instrument()/uninstrument(): exact statement counts on real databases, and clean detaching."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import querywatch
from tests.models import Author, Base, Book, create_schema, seed


def _orm_core_text(engine: sa.Engine) -> None:
    with Session(engine) as session:
        session.scalars(sa.select(Author)).all()  # ORM: 1
        session.get(Author, 1)  # identity map miss: 1
    with engine.connect() as conn:
        conn.execute(sa.select(Book.id).where(Book.author_id == 1)).all()  # Core: 1
        conn.execute(sa.text("SELECT count(*) FROM books WHERE id > :n"), {"n": 3})  # text: 1
        conn.exec_driver_sql("SELECT 1")  # driver SQL: 1


def test_counts_orm_core_and_text_exactly(any_engine: sa.Engine) -> None:
    """ORM, Core, text() and driver SQL statements are each counted once."""
    engine = any_engine
    create_schema(engine)
    with Session(engine) as session:
        seed(session, authors=3)
    with querywatch.watch("count") as report:
        _orm_core_text(engine)
    assert report.statements == 5
    assert [q.operation for q in report.queries] == ["SELECT"] * 5
    assert report.db_seconds > 0


async def _async_orm_core_text(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        (await session.scalars(sa.select(Author))).all()
        await session.get(Author, 1)
    async with engine.connect() as conn:
        (await conn.execute(sa.select(Book.id).where(Book.author_id == 1))).all()
        await conn.execute(sa.text("SELECT count(*) FROM books WHERE id > :n"), {"n": 3})
        await conn.exec_driver_sql("SELECT 1")


async def test_counts_async_engines_exactly(any_async_engine: AsyncEngine) -> None:
    """An AsyncEngine (instrumented through sync_engine) counts the same five statements."""
    engine = any_async_engine
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session:
        await session.run_sync(lambda s: seed(s, authors=3))
    async with querywatch.watch("async-count") as report:
        await _async_orm_core_text(engine)
    assert report.statements == 5


def test_orm_flush_counts_each_insert(sqlite_engine: sa.Engine) -> None:
    """A flush of two rows of different tables is two INSERT statements (and no more)."""
    create_schema(sqlite_engine)
    with Session(sqlite_engine) as session, querywatch.watch("flush") as report:
        session.add(Author(id=1, name="a", books=[Book(id=1, title="t")]))
        session.flush()
    assert [q.operation for q in report.queries] == ["INSERT", "INSERT"]


def test_executemany_counts_once(sqlite_engine: sa.Engine) -> None:
    """A Core executemany is one cursor call, so one statement."""
    create_schema(sqlite_engine)
    with sqlite_engine.begin() as conn, querywatch.watch("many") as report:
        conn.execute(
            Base.metadata.tables["tags"].insert(), [{"id": i, "name": str(i)} for i in range(20)]
        )
    assert report.statements == 1


def test_statements_outside_a_unit_of_work_are_not_recorded(sqlite_engine: sa.Engine) -> None:
    """Listeners do nothing outside a unit of work: a later unit starts from zero."""
    with sqlite_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        with querywatch.watch("after") as report:
            conn.exec_driver_sql("SELECT 2")
    assert report.statements == 1


def test_failed_statement_is_counted_and_the_error_passes_unchanged(
    sqlite_engine: sa.Engine,
) -> None:
    """A database error reaches the caller untouched; the statement counts as failed."""
    with (
        sqlite_engine.connect() as conn,
        querywatch.watch("fails") as report,
        pytest.raises(sa.exc.OperationalError, match="no such table: missing"),
    ):
        conn.exec_driver_sql("SELECT * FROM missing")
    assert (report.statements, report.failed_statements) == (1, 1)


def test_instrument_is_idempotent(sqlite_engine: sa.Engine) -> None:
    """A second instrument() returns the same handle and does not double count."""
    handle = querywatch.instrument(sqlite_engine)
    assert querywatch.instrument(sqlite_engine) is handle
    with sqlite_engine.connect() as conn, querywatch.watch("once") as report:
        conn.exec_driver_sql("SELECT 1")
    assert report.statements == 1


def test_async_engine_and_its_sync_engine_share_one_handle() -> None:
    """Instrumenting an AsyncEngine is instrumenting its sync_engine."""
    engine = create_async_engine("sqlite+aiosqlite://")
    handle = querywatch.instrument(engine)
    assert querywatch.instrument(engine.sync_engine) is handle
    handle.remove()


def test_uninstrument_detaches_everything() -> None:
    """After uninstrument() the dialect is back to its own methods and nothing is recorded."""
    engine = sa.create_engine("sqlite://")
    before = dict(engine.dialect.__dict__)
    querywatch.instrument(engine)
    assert querywatch.uninstrument(engine) is True
    assert dict(engine.dialect.__dict__) == before
    with engine.connect() as conn, querywatch.watch("detached") as report:
        conn.exec_driver_sql("SELECT 1")
    assert report.statements == 0
    assert querywatch.uninstrument(engine) is False


def test_reinstrument_after_remove_records_again() -> None:
    """remove() then instrument() gives a new, working handle."""
    engine = sa.create_engine("sqlite://")
    first = querywatch.instrument(engine)
    first.remove()
    second = querywatch.instrument(engine)
    assert second is not first
    with engine.connect() as conn, querywatch.watch("again") as report:
        conn.exec_driver_sql("SELECT 1")
    assert report.statements == 1
    second.remove()


def test_instrumentation_does_not_keep_the_engine_alive() -> None:
    """An instrumented engine that the application drops is garbage-collected."""
    engine = sa.create_engine("sqlite://")
    querywatch.instrument(engine)
    with engine.connect() as conn, querywatch.watch("used"):
        conn.exec_driver_sql("SELECT 1")
    ref = weakref.ref(engine)
    engine.dispose()
    del engine, conn
    gc.collect()
    assert ref() is None


def test_default_name_has_no_credentials() -> None:
    """The engine's pool label is driver://host:port/db, without user or password."""
    engine = sa.create_engine("postgresql+psycopg://alice:s3cret@db.internal:6543/shop")
    handle = querywatch.instrument(engine)
    assert handle.name == "postgresql+psycopg://db.internal:6543/shop"
    handle.remove()


def test_explicit_name_is_used() -> None:
    """instrument(name=...) sets the pool label."""
    engine = sa.create_engine("sqlite://")
    handle = querywatch.instrument(engine, name="primary")
    assert handle.name == "primary"
    handle.remove()


def test_instrument_rejects_what_is_not_an_engine() -> None:
    """Passing a session (a common slip) fails at once with a clear message."""
    with pytest.raises(TypeError, match="takes a SQLAlchemy Engine or AsyncEngine, got Session"):
        querywatch.instrument(Session())  # type: ignore[arg-type]


def test_listeners_attached_through_the_handle_do_not_keep_the_engine_alive() -> None:
    """`handle.listen(engine, ...)` remembers its target weakly."""
    engine = sa.create_engine("sqlite://")
    handle = querywatch.instrument(engine)
    handle.listen(engine, "engine_connect", lambda conn: None)
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None


def test_works_without_greenlet() -> None:
    """SQLAlchemy 2.1 installs no greenlet by default: querywatch and its FastAPI glue still
    import, and a sync engine is audited."""
    code = (
        "import sys; sys.modules['greenlet'] = None\n"
        "import sqlalchemy as sa, querywatch, querywatch.fastapi\n"
        "engine = sa.create_engine('sqlite://')\n"
        "querywatch.instrument(engine)\n"
        "with engine.connect() as conn, querywatch.watch('no-greenlet') as report:\n"
        "    conn.exec_driver_sql('SELECT 1')\n"
        "print(report.statements)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
