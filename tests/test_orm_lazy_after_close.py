"""Lazy loads after close: DetachedInstanceError and MissingGreenlet are recorded with the model,
attribute and user line, and the original exception still reaches the caller."""

from __future__ import annotations

import contextlib
import gc

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import MissingGreenlet, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import DetachedInstanceError

import querywatch
from querywatch import _orm
from tests.callsites import next_line
from tests.models import Author, Base, Book, create_schema, seed


def _detached_book(engine: sa.Engine) -> Book:
    create_schema(engine)
    with Session(engine) as session:
        seed(session)
        book = session.get(Book, 1)
        assert book is not None
    return book


def test_detached_relationship_is_recorded_and_the_error_reaches_the_caller(
    any_engine: sa.Engine,
) -> None:
    """Touching an unloaded relationship of a detached object: finding, then the same error."""
    book = _detached_book(any_engine)
    where = next_line(3)
    with querywatch.watch("detached") as report:  # noqa: SIM117 - the order is the point
        with pytest.raises(DetachedInstanceError, match="is not bound to a Session"):
            book.chapters  # noqa: B018 - the attribute access is the test
    (finding,) = report.lazy_loads_after_close
    assert (finding.model, finding.attribute, finding.error) == (
        "Book",
        "chapters",
        "DetachedInstanceError",
    )
    assert finding.callsite == where
    assert "selectinload(Book.chapters)" in finding.suggestion


def test_expired_attribute_after_close_is_recorded(sqlite_engine: sa.Engine) -> None:
    """An attribute expired by commit and read after the session closed is recorded."""
    create_schema(sqlite_engine)
    with Session(sqlite_engine) as session:
        seed(session)
        author = session.get(Author, 1)
        session.commit()
    where = next_line(2)
    with querywatch.watch("expired") as report, pytest.raises(DetachedInstanceError):
        author.name  # type: ignore[union-attr]  # noqa: B018
    (finding,) = report.lazy_loads_after_close
    assert (finding.model, finding.attribute, finding.callsite) == ("Author", "name", where)
    assert "expire_on_commit=False" in finding.suggestion


def test_recorded_even_when_user_code_swallows_the_error(sqlite_engine: sa.Engine) -> None:
    """A serializer that catches the error still hid a bug: the finding is recorded."""
    book = _detached_book(sqlite_engine)
    with querywatch.watch("swallowed") as report, contextlib.suppress(DetachedInstanceError):
        book.tags  # noqa: B018
    assert [f.attribute for f in report.lazy_loads_after_close] == ["tags"]


def test_repeats_at_one_line_are_one_finding(sqlite_engine: sa.Engine) -> None:
    """The same attribute failing at the same line is one finding with a count."""
    book = _detached_book(sqlite_engine)
    with querywatch.watch("repeats") as report:
        for _ in range(3):
            with pytest.raises(DetachedInstanceError):
                book.chapters  # noqa: B018
    (finding,) = report.lazy_loads_after_close
    assert finding.count == 3


def test_outside_a_unit_the_error_passes_untouched(sqlite_engine: sa.Engine) -> None:
    """With no unit of work, the hook only passes the exception on."""
    book = _detached_book(sqlite_engine)
    with pytest.raises(DetachedInstanceError):
        book.chapters  # noqa: B018


def test_raise_mode_raises_after_the_unit_not_instead_of_the_error(
    sqlite_engine: sa.Engine,
) -> None:
    """In `raise` mode the swallowed error becomes NPlusOneDetected at the end of the unit."""
    book = _detached_book(sqlite_engine)
    unit = querywatch.watch("strict", mode="raise")
    message = r"Book\.chapters \(DetachedInstanceError\)"
    with (
        pytest.raises(querywatch.NPlusOneDetected, match=message),
        unit,
        contextlib.suppress(DetachedInstanceError),
    ):
        book.chapters  # noqa: B018


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_missing_greenlet_is_recorded_and_reaches_the_caller(
    any_async_engine: AsyncEngine,
) -> None:
    """A lazy load in async code outside a greenlet: finding, then the original MissingGreenlet."""
    async with any_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(any_async_engine) as session:
        await session.run_sync(seed)
    async with querywatch.watch("greenlet") as report, AsyncSession(any_async_engine) as session:
        author = await session.get(Author, 1)
        assert author is not None
        where = next_line(2)
        with pytest.raises((MissingGreenlet, StatementError)) as raised:
            author.books  # noqa: B018
    # SQLAlchemy 2.1 wraps it in a StatementError for some drivers: either way, SQLAlchemy's own.
    error = raised.value
    assert isinstance(error, MissingGreenlet) or isinstance(error.orig, MissingGreenlet)  # type: ignore[attr-defined]
    gc.collect()  # the driver's abandoned cursor coroutine is collected here, not in a later test
    (finding,) = report.lazy_loads_after_close
    assert (finding.model, finding.attribute) == ("Author", "books")
    assert finding.error == "MissingGreenlet"
    assert finding.callsite == where
    assert "awaitable_attrs.books" in finding.suggestion


def test_uninstall_restores_sqlalchemy() -> None:
    """`uninstall()` puts SQLAlchemy's method back; `ensure_installed()` hooks it again, once."""
    impl_class = _orm._attribute_impl_class()
    _orm.ensure_installed()
    hooked = impl_class._fire_loader_callables
    assert getattr(hooked, "_querywatch_hook", False)
    _orm.uninstall()
    try:
        assert impl_class._fire_loader_callables is hooked.__wrapped__
        assert not _orm.installed()
    finally:
        _orm.ensure_installed()
        _orm.ensure_installed()
    assert getattr(impl_class._fire_loader_callables, "_querywatch_hook", False)
    assert impl_class._fire_loader_callables.__wrapped__ is hooked.__wrapped__


def test_the_hook_goes_when_the_last_engine_is_uninstrumented() -> None:
    """With the handle passed in, removing the last instrumentation removes the hook."""
    from querywatch._instrumentation import instrumented_engines

    engine = sa.create_engine("sqlite://")
    others = instrumented_engines()
    handle = querywatch.instrument(engine)
    _orm.ensure_installed(handle)
    try:
        querywatch.uninstrument(engine)
        assert _orm.installed() == bool(others)
    finally:
        _orm.ensure_installed()
        engine.dispose()
