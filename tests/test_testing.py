"""`querywatch.testing`: statement budgets and N+1 assertions usable without pytest."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, selectinload

import querywatch
from querywatch import _collection
from querywatch.testing import QueryAssertionError, assert_max_statements, assert_no_n_plus_one
from tests.models import Author, create_schema, seed

pytest_plugins = ["pytester"]


def run_statements(engine: sa.Engine, count: int) -> None:
    with engine.connect() as conn:
        for i in range(count):
            conn.execute(sa.text("SELECT :i"), {"i": i})


def read_books(engine: sa.Engine, *, eager: bool = False, limit: int | None = None) -> None:
    """Touch every author's books: lazy loads, unless `eager`."""
    query = sa.select(Author).limit(limit)
    if eager:
        query = query.options(selectinload(Author.books))
    with Session(engine) as session:
        for author in session.scalars(query):
            assert author.books


def run_in(assertion: AbstractContextManager[Any], fn: Any, *args: Any) -> None:
    with assertion:
        fn(*args)


def fail_inside(engine: sa.Engine) -> None:
    with assert_max_statements(0):
        run_statements(engine, 1)
        raise KeyError("mine")


def nested_job(engine: sa.Engine) -> None:
    with assert_max_statements(1), querywatch.watch("job"):
        run_statements(engine, 2)


async def two_async_statements(engine: AsyncEngine) -> None:
    async with assert_max_statements(1), engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        await conn.execute(sa.text("SELECT 2"))


@pytest.fixture
def library(sqlite_engine: sa.Engine) -> sa.Engine:
    """The shared models, seeded with 10 authors of 3 books each."""
    create_schema(sqlite_engine)
    with Session(sqlite_engine) as session:
        seed(session)
    return sqlite_engine


def test_within_budget_passes(sqlite_engine: sa.Engine) -> None:
    """A block that runs exactly its budget passes and yields its final report."""
    with assert_max_statements(2) as report:
        run_statements(sqlite_engine, 2)
    assert (report.final, report.statements, report.kind) == (True, 2, "test")


def test_over_budget_message(sqlite_engine: sa.Engine) -> None:
    """Going over the budget raises with the count, the budget and the statement shapes."""
    with pytest.raises(QueryAssertionError) as caught:
        run_in(assert_max_statements(2), run_statements, sqlite_engine, 3)
    assert str(caught.value) == (
        "querywatch: the block ran 3 statements, budget is 2 (max_statements=2)\n"
        "statements by shape, most executed first:\n"
        "     3 x select ?"
    )
    assert caught.value.report.statements == 3


def test_failure_is_an_assertion_error(sqlite_engine: sa.Engine) -> None:
    """The failure is an AssertionError, so unittest counts it as a failure, not an error."""
    with pytest.raises(AssertionError):
        run_in(assert_max_statements(0), run_statements, sqlite_engine, 1)


def test_block_exception_passes_through(sqlite_engine: sa.Engine) -> None:
    """An exception raised by the block is not replaced by a budget failure."""
    with pytest.raises(KeyError):
        fail_inside(sqlite_engine)


def test_nested_unit_counts(sqlite_engine: sa.Engine) -> None:
    """Statements of a `watch()` unit opened inside the block count toward it."""
    with pytest.raises(QueryAssertionError):
        nested_job(sqlite_engine)


def test_unit_in_thread_without_context_counts(tmp_path: object) -> None:
    """A unit opened in a thread that did not inherit the context (a portal thread) counts."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    querywatch.instrument(engine)
    try:

        def job() -> None:
            # A new thread starts with an empty context, like a portal that does not copy it.
            assert _collection.current_collector() is None
            with querywatch.watch("request-in-portal"):
                run_statements(engine, 2)

        with assert_max_statements(5) as report:
            worker = threading.Thread(target=job)
            worker.start()
            worker.join()
        assert report.statements == 2
    finally:
        querywatch.uninstrument(engine)
        engine.dispose()


def test_fallback_parent_reset_after_block(sqlite_engine: sa.Engine) -> None:
    """After the block, units opened with no current unit are top-level again."""
    with assert_max_statements(5):
        pass
    with querywatch.watch("after") as report:
        assert report.parent is None


async def test_async_block(aiosqlite_engine: AsyncEngine) -> None:
    """`async with` works and counts the statements of an async engine."""
    with pytest.raises(QueryAssertionError, match="ran 2 statements, budget is 1"):
        await two_async_statements(aiosqlite_engine)


@pytest.mark.parametrize("value", [-1, "3", True])
def test_invalid_budget_rejected(value: object) -> None:
    """A budget that is not an integer >= 0 is rejected at construction."""
    with pytest.raises((TypeError, ValueError), match="max_statements"):
        assert_max_statements(value)  # type: ignore[arg-type]


def test_no_n_plus_one_passes_with_eager_loading(library: sa.Engine) -> None:
    """An eager-loaded loop passes `assert_no_n_plus_one`."""
    with assert_no_n_plus_one() as report:
        read_books(library, eager=True)
    assert report.statements == 2


def test_no_n_plus_one_fails_on_lazy_loads(library: sa.Engine) -> None:
    """A lazy-loading loop fails with the relationship, the call site and the fix."""
    with pytest.raises(QueryAssertionError) as caught:
        run_in(assert_no_n_plus_one(), read_books, library)
    message = str(caught.value)
    assert message.startswith("querywatch: 1 N+1 finding(s) in the block:\n")
    assert "N+1: Author.books lazy-loaded 10 times" in message
    assert "at: tests/test_testing.py:" in message
    assert "selectinload(Author.books)" in message
    assert [f.relationship for f in caught.value.findings] == ["Author.books"]


def read_names_after_commit(engine: sa.Engine) -> None:
    """Touch every author's name after a commit expired them: one reload per author."""
    with Session(engine) as session:
        authors = session.scalars(sa.select(Author)).all()
        session.commit()
        for author in authors:
            assert author.name


def test_no_n_plus_one_names_the_model_of_expired_attributes(library: sa.Engine) -> None:
    """Attributes reloaded object by object after a commit fail with the model and the
    attributes, as the finding describes itself, not as an anonymous statement."""
    with pytest.raises(QueryAssertionError) as caught:
        run_in(assert_no_n_plus_one(), read_names_after_commit, library)
    message = str(caught.value)
    assert "N+1: expired attributes of Author (name) reloaded 10 times" in message
    assert "one statement ran" not in message
    assert "expire_on_commit=False" in message


def test_no_n_plus_one_threshold(library: sa.Engine) -> None:
    """`threshold=2` flags a loop of three lazy loads the default threshold lets pass."""
    with assert_no_n_plus_one():
        read_books(library, limit=3)
    with pytest.raises(QueryAssertionError):
        run_in(assert_no_n_plus_one(threshold=2), partial(read_books, library, limit=3))


def test_unittest_reports_a_failure(pytester: pytest.Pytester) -> None:
    """In a unittest.TestCase an exceeded budget is a test failure."""
    pytester.makepyfile(
        """
        import unittest
        import sqlalchemy as sa
        import querywatch
        from querywatch.testing import assert_max_statements

        class Budget(unittest.TestCase):
            def test_budget(self):
                engine = sa.create_engine("sqlite://")
                querywatch.instrument(engine)
                self.addCleanup(engine.dispose)
                with assert_max_statements(0), engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))

        if __name__ == "__main__":
            unittest.main()
        """
    )
    result = pytester.runpython(pytester.path / "test_unittest_reports_a_failure.py")
    assert result.ret == 1
    result.stderr.fnmatch_lines(
        [
            "*querywatch.testing.QueryAssertionError: querywatch: the block ran 1 statements*",
            "FAILED (failures=1)",
        ]
    )
