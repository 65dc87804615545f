"""Query-shape snapshots (`querywatch._snapshots`): through `pytester` on SQLite and PostgreSQL,
through `assert_query_snapshot` without the plugin, and the record file format itself."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

# The inner suites import these: imported here, `pytester`'s in-process runs find them loaded
# (each run drops only the modules it imported itself), and each run is faster by a second.
import httpx  # noqa: F401
import pytest
import sqlalchemy as sa
import sqlalchemy.ext.asyncio
import yaml

with warnings.catch_warnings():
    # Starlette >= 1.x asks for httpx2 behind its TestClient; the httpx fallback works the same.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    import fastapi.testclient  # noqa: F401

import querywatch
import querywatch.middleware
from querywatch._snapshots import normalise, parse_file, render_file
from querywatch.testing import QueryAssertionError, assert_query_snapshot
from tests.conftest import PSYCOPG_URL, require_postgres

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
    ignore:Using `httpx` with `starlette.testclient` is deprecated
"""

# The inner suite's models, an engine seeded while instrumented (fixture setup: never recorded)
# and a FastAPI app. Table names of their own: the PostgreSQL run database is shared.
CONFTEST = """
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import querywatch
from querywatch.middleware import QueryWatchMiddleware

URL = {url!r}


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "snap_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list["Book"]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "snap_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("snap_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
def engine():
    if URL.startswith("sqlite"):
        engine = sa.create_engine(
            URL, poolclass=sa.pool.StaticPool, connect_args={{"check_same_thread": False}}
        )
    else:
        engine = sa.create_engine(URL)
    querywatch.instrument(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for a in range(1, 7):
            books = [Book(id=a * 10 + b, title=f"book {{b}}") for b in range(2)]
            session.add(Author(id=a, name=f"author {{a}}", books=books))
        session.commit()
    yield engine
    Base.metadata.drop_all(engine)
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
def app(engine):
    app = FastAPI()
    app.add_middleware(QueryWatchMiddleware, metrics=False)

    @app.get("/authors/{{author_id}}/books")
    def books(author_id: int):
        with Session(engine) as session:
            return [book.title for book in session.get(Author, author_id).books]

    @app.get("/health")
    def health():
        return "ok"

    return app
"""

MODULE = """
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from conftest import Author, Book

pytestmark = pytest.mark.querywatch_snapshot


def test_authors(engine):
    with Session(engine) as session:
        authors = session.scalars(select(Author).options(selectinload(Author.books))).all()
        assert len(authors) == 6


def test_book(engine):
    with Session(engine) as session:
        assert session.get(Book, 10).title == "book 0"
"""

AUTHORS = "select snap_authors.id, snap_authors.name from snap_authors"
BOOKS_IN = (
    "select snap_books.author_id, snap_books.id, snap_books.title from snap_books "
    "where snap_books.author_id in (?) order by snap_books.id"
)
BOOK_BY_ID = (
    "select snap_books.id, snap_books.title, snap_books.author_id from snap_books "
    "where snap_books.id = ?"
)
BOOKS_OF = (
    "select snap_books.id, snap_books.title, snap_books.author_id from snap_books "
    "where ? = snap_books.author_id order by snap_books.id"
)
AUTHOR_BY_ID = f"{AUTHORS} where snap_authors.id = ?"

#: Options of every inner run: no cache, and no hypothesis plugin (its end-of-session summary
#: costs more than a whole inner run).
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

HEADER = """\
# querywatch query-shape snapshots of test_snap.py: the SQL statements of each test, in order,
# by database dialect and test (`shape \u00d7 n`: n in a row; requests under METHOD /route).
# A test whose statements change fails with a diff. After an intended change, rewrite:
#   pytest --querywatch-snapshot-update
"""


class Suite:
    """A pytester directory with the inner suite, on one database."""

    def __init__(self, pytester: pytest.Pytester, dialect: str) -> None:
        self.pytester = pytester
        self.dialect = dialect

    @property
    def path(self) -> Path:
        return self.pytester.path

    def module(self, source: str = MODULE, name: str = "test_snap") -> None:
        self.pytester.makepyfile(**{name: source})

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest(*QUIET, "--strict-markers", *args)

    def record(self, name: str = "test_snap") -> str:
        return (self.path / f"{name}.querywatch.yml").read_text(encoding="utf-8")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def suite(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> Suite:
    """The inner suite on SQLite, then on PostgreSQL (psycopg 3)."""
    if request.param == "postgresql":
        require_postgres()
        url = PSYCOPG_URL
    else:
        url = "sqlite://"
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST.format(url=url))
    return Suite(pytester, request.param)


@pytest.fixture
def sqlite_suite(pytester: pytest.Pytester) -> Suite:
    """The inner suite on SQLite only (behaviour that does not depend on the database)."""
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST.format(url="sqlite://"))
    return Suite(pytester, "sqlite")


def assert_lines(result: pytest.RunResult, expected: list[str]) -> None:
    """`expected` appears in the run's output as consecutive lines, exactly."""
    lines = result.outlines
    for start in range(len(lines) - len(expected) + 1):
        if lines[start : start + len(expected)] == expected:
            return
    raise AssertionError(
        "lines not found:\n" + "\n".join(expected) + "\n\nin:\n" + result.stdout.str()
    )


def recorded(suite: Suite) -> str:
    """The record file of MODULE, as it is written on a first run."""
    return (
        HEADER
        + f"{suite.dialect}:\n"
        + "  test_authors:\n"
        + f"    - {AUTHORS}\n"
        + f"    - {BOOKS_IN}\n"
        + "  test_book:\n"
        + f"    - {BOOK_BY_ID}\n"
    )


# --- record, re-run, change, update ------------------------------------------------------------


def test_first_run_writes_the_record_and_passes(suite: Suite) -> None:
    """A first run writes each test's statements, in order, beside the module, and passes."""
    suite.module()
    result = suite.run()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["2 new snapshot records written"])
    assert suite.record() == recorded(suite)


def test_record_file_is_yaml(suite: Suite) -> None:
    """The record file reads as YAML: dialect, then test id, then one statement per item."""
    suite.module()
    suite.run()
    assert yaml.safe_load(suite.record()) == {
        suite.dialect: {"test_authors": [AUTHORS, BOOKS_IN], "test_book": [BOOK_BY_ID]}
    }


def test_unchanged_rerun_passes_and_leaves_the_file(suite: Suite) -> None:
    """A second run with the same statements passes and does not touch the file."""
    suite.module()
    suite.run()
    before = (suite.path / "test_snap.querywatch.yml").stat().st_mtime_ns
    result = suite.run("--querywatch-snapshot-strict")
    result.assert_outcomes(passed=2)
    assert "snapshot record" not in result.stdout.str()
    assert (suite.path / "test_snap.querywatch.yml").stat().st_mtime_ns == before


def test_added_n_plus_one_fails_with_the_diff_and_its_call_site(suite: Suite) -> None:
    """Replacing an eager load by lazy loads fails with the diff and where the loads ran."""
    suite.module()
    suite.run()
    suite.module(
        MODULE.replace(
            "authors = session.scalars(select(Author).options(selectinload(Author.books))).all()",
            "authors = session.scalars(select(Author)).all()\n"
            "        assert all(author.books for author in authors)",
        )
    )
    result = suite.run()
    result.assert_outcomes(failed=1, passed=1)
    assert_lines(
        result,
        [
            "querywatch: the SQL statements of this test differ from its snapshot "
            f"(test_snap.querywatch.yml, {suite.dialect}: test_authors):",
            "--- snapshot",
            "+++ this run",
            "@@ -1,2 +1,2 @@",
            f" {AUTHORS}",
            f"-{BOOKS_IN}",
            f"+{BOOKS_OF} \u00d7 6",
            "added statements ran at:",
            f"  {BOOKS_OF} \u00d7 6",
            "      test_snap.py:13 in test_authors",
            "rewrite the record if the change is intended: "
            "pytest --querywatch-snapshot-update 'test_snap.py::test_authors'",
        ],
    )


def test_replaced_query_fails_with_the_diff(suite: Suite) -> None:
    """A statement replaced by another shows as one line removed and one added, with its line."""
    suite.module()
    suite.run()
    suite.module(
        MODULE.replace(
            'assert session.get(Book, 10).title == "book 0"',
            'assert session.scalars(select(Book).where(Book.title == "book 0")).first()',
        )
    )
    result = suite.run()
    result.assert_outcomes(failed=1, passed=1)
    by_title = BOOK_BY_ID.replace("snap_books.id = ?", "snap_books.title = ?")
    assert_lines(
        result,
        [
            "@@ -1 +1 @@",
            f"-{BOOK_BY_ID}",
            f"+{by_title}",
            "added statements ran at:",
            f"  {by_title}",
            "      test_snap.py:18 in test_book",
        ],
    )


def test_removed_query_fails_with_the_diff(suite: Suite) -> None:
    """A statement that no longer runs shows as a removed line, with no call site to show."""
    suite.module()
    suite.run()
    suite.module(MODULE.replace(".options(selectinload(Author.books))", ""))
    result = suite.run()
    result.assert_outcomes(failed=1, passed=1)
    assert_lines(result, ["@@ -1,2 +1 @@", f" {AUTHORS}", f"-{BOOKS_IN}"])
    assert "added statements ran at:" not in result.stdout.str()


def test_update_rewrites_the_changed_record(suite: Suite) -> None:
    """`--querywatch-snapshot-update` passes and writes the new statements to the record."""
    suite.module()
    suite.run()
    suite.module(MODULE.replace(".options(selectinload(Author.books))", ""))
    result = suite.run("--querywatch-snapshot-update")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["1 snapshot record rewritten"])
    assert suite.record() == recorded(suite).replace(f"    - {BOOKS_IN}\n", "")
    suite.run("--querywatch-snapshot-strict").assert_outcomes(passed=2)


def test_a_new_dialect_gets_its_own_section(pytester: pytest.Pytester) -> None:
    """The same tests run on PostgreSQL after SQLite add a postgresql section beside sqlite's."""
    require_postgres()
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST.format(url="sqlite://"))
    pytester.makepyfile(test_snap=MODULE)
    pytester.runpytest(*QUIET).assert_outcomes(passed=2)
    pytester.makeconftest(CONFTEST.format(url=PSYCOPG_URL))
    pytester.runpytest(*QUIET).assert_outcomes(passed=2)
    records = yaml.safe_load((pytester.path / "test_snap.querywatch.yml").read_text("utf-8"))
    assert records["postgresql"] == records["sqlite"]


# --- what a record holds -----------------------------------------------------------------------


def test_requests_are_recorded_under_method_and_route(suite: Suite) -> None:
    """Requests sent with a TestClient are lines naming the route template, statements under
    them; identical requests in a row are one line with a count."""
    suite.module(
        """
import pytest
from fastapi.testclient import TestClient

@pytest.mark.querywatch_snapshot
def test_pages(app):
    with TestClient(app) as client:
        for author_id in (1, 2, 3):
            assert client.get(f"/authors/{author_id}/books").status_code == 200
        assert client.get("/health").status_code == 200
"""
    )
    suite.run().assert_outcomes(passed=1)
    assert suite.record().split("\n", 4)[4] == (
        f"{suite.dialect}:\n"
        "  test_pages:\n"
        "    - GET /authors/{author_id}/books \u00d7 3:\n"
        f"        - {AUTHOR_BY_ID}\n"
        f"        - {BOOKS_OF}\n"
        "    - GET /health: []\n"
    )


def test_asgi_transport_requests_in_an_async_test(sqlite_suite: Suite) -> None:
    """An async test's requests through httpx's ASGITransport are recorded like TestClient's."""
    sqlite_suite.module(
        """
import httpx
import pytest

@pytest.mark.querywatch_snapshot
async def test_page(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/authors/4/books")).status_code == 200
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record())["sqlite"]["test_page"] == [
        {"GET /authors/{author_id}/books": [AUTHOR_BY_ID, BOOKS_OF]}
    ]


def test_async_engine_statements_are_recorded(sqlite_suite: Suite) -> None:
    """An async test's statements on an aiosqlite engine are recorded in order."""
    sqlite_suite.module(
        """
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import querywatch

@pytest.mark.querywatch_snapshot
async def test_async():
    engine = create_async_engine("sqlite+aiosqlite://")
    querywatch.instrument(engine)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            await conn.execute(sa.text("SELECT 2"))
    finally:
        querywatch.uninstrument(engine)
        await engine.dispose()
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record()) == {
        "sqlite": {"test_async": ["select ? \u00d7 2"]}
    }


def test_unittest_testcase_is_recorded(sqlite_suite: Suite) -> None:
    """A unittest.TestCase method carrying the marker is recorded under Class::method."""
    sqlite_suite.module(
        """
import unittest

import pytest
import sqlalchemy as sa

import querywatch

@pytest.mark.querywatch_snapshot
class CountTest(unittest.TestCase):
    def test_count(self):
        engine = sa.create_engine("sqlite://")
        querywatch.instrument(engine)
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM sqlite_master")
            self.assertEqual(conn.execute(query).scalar(), 0)
        querywatch.uninstrument(engine)
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record()) == {
        "sqlite": {"CountTest::test_count": ["select count(*) from sqlite_master"]}
    }


def test_parametrized_ids_are_record_keys(sqlite_suite: Suite) -> None:
    """Each parametrized case has its own record, keyed by its id."""
    sqlite_suite.module(
        """
import pytest
from sqlalchemy.orm import Session
from conftest import Author

@pytest.mark.querywatch_snapshot
@pytest.mark.parametrize("ids", [[1], [1, 2]], ids=["one", "two: a pair"])
def test_get(engine, ids):
    with Session(engine) as session:
        for author_id in ids:
            session.get(Author, author_id)
"""
    )
    sqlite_suite.run().assert_outcomes(passed=2)
    assert yaml.safe_load(sqlite_suite.record()) == {
        "sqlite": {
            "test_get[one]": [AUTHOR_BY_ID],
            "test_get[two: a pair]": [f"{AUTHOR_BY_ID} \u00d7 2"],
        }
    }


def test_named_blocks_of_the_fixture(sqlite_suite: Suite) -> None:
    """Without the marker, the `querywatch_snapshot` fixture records only its named blocks."""
    sqlite_suite.module(
        """
from sqlalchemy.orm import Session
from conftest import Author

def test_login(engine, querywatch_snapshot):
    with Session(engine) as session:
        session.get(Author, 1)
        with querywatch_snapshot("after login"):
            session.get(Author, 2).books
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record()) == {
        "sqlite": {"test_login": [{"after login": [AUTHOR_BY_ID, BOOKS_OF]}]}
    }


def test_requests_in_a_named_block_nest_under_it(sqlite_suite: Suite) -> None:
    """Requests sent inside a named block are listed under it, those before and after are not,
    even when they ran no statement."""
    sqlite_suite.module(
        """
import pytest
from fastapi.testclient import TestClient

@pytest.mark.querywatch_snapshot
def test_flow(app, querywatch_snapshot):
    with TestClient(app) as client:
        client.get("/health")
        with querywatch_snapshot("author page"):
            client.get("/authors/1/books")
            client.get("/health")
        client.get("/health")
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record())["sqlite"]["test_flow"] == [
        {"GET /health": []},
        {
            "author page": [
                {"GET /authors/{author_id}/books": [AUTHOR_BY_ID, BOOKS_OF]},
                {"GET /health": []},
            ]
        },
        {"GET /health": []},
    ]


def test_statements_beyond_the_cap_are_counted(sqlite_suite: Suite) -> None:
    """A test that runs more statements than a snapshot keeps says how many more ran."""
    sqlite_suite.module(
        """
import pytest
import sqlalchemy as sa

@pytest.mark.querywatch_snapshot
def test_many(engine):
    with engine.connect() as conn:
        for i in range(2003):
            conn.execute(sa.text("SELECT :i"), {"i": i})
"""
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert yaml.safe_load(sqlite_suite.record())["sqlite"]["test_many"] == [
        "select ? \u00d7 2000",
        "\u2026 3 more statements, not recorded (a snapshot records the first 2000)",
    ]


def test_a_test_without_statements_gets_no_record(sqlite_suite: Suite) -> None:
    """A marked test that runs no SQL writes no record file."""
    sqlite_suite.module(
        "import pytest\n\n@pytest.mark.querywatch_snapshot\ndef test_nothing():\n    pass\n"
    )
    sqlite_suite.run().assert_outcomes(passed=1)
    assert not (sqlite_suite.path / "test_snap.querywatch.yml").exists()


def test_a_failing_test_writes_no_record(sqlite_suite: Suite) -> None:
    """A test whose body fails is not recorded: its statements are not the ones it means."""
    sqlite_suite.module(MODULE.replace('== "book 0"', '== "nope"'))
    sqlite_suite.run().assert_outcomes(passed=1, failed=1)
    assert "test_book" not in yaml.safe_load(sqlite_suite.record())["sqlite"]


# --- opting in -------------------------------------------------------------------------------

UNMARKED = MODULE.replace("pytestmark = pytest.mark.querywatch_snapshot\n", "")


def test_option_records_every_test(sqlite_suite: Suite) -> None:
    """`--querywatch-snapshot` records tests that carry no marker."""
    sqlite_suite.module(UNMARKED)
    sqlite_suite.run("--querywatch-snapshot").assert_outcomes(passed=2)
    assert sqlite_suite.record() == recorded(sqlite_suite)


def test_ini_key_records_every_test(sqlite_suite: Suite) -> None:
    """The `querywatch_snapshot = true` ini key records every test like the option."""
    sqlite_suite.pytester.makeini(INI + "querywatch_snapshot = true\n")
    sqlite_suite.module(UNMARKED)
    sqlite_suite.run().assert_outcomes(passed=2)
    assert sqlite_suite.record() == recorded(sqlite_suite)


def test_marker_false_opts_a_test_out(sqlite_suite: Suite) -> None:
    """`querywatch_snapshot(False)` leaves a test out of a suite-wide snapshot."""
    sqlite_suite.module(
        UNMARKED.replace("def test_book", "@pytest.mark.querywatch_snapshot(False)\ndef test_book")
    )
    sqlite_suite.run("--querywatch-snapshot").assert_outcomes(passed=2)
    assert list(yaml.safe_load(sqlite_suite.record())["sqlite"]) == ["test_authors"]


def test_unmarked_tests_are_not_recorded(sqlite_suite: Suite) -> None:
    """Without marker, fixture, option or ini key, nothing is recorded."""
    sqlite_suite.module(UNMARKED)
    sqlite_suite.run().assert_outcomes(passed=2)
    assert not list(sqlite_suite.path.glob("*.querywatch.yml"))


def test_snapshot_dir_ini_key(sqlite_suite: Suite) -> None:
    """`querywatch_snapshot_dir` keeps the record files in one directory, mirroring the tests'."""
    sqlite_suite.pytester.makeini(INI + "querywatch_snapshot_dir = snapshots\n")
    (sqlite_suite.path / "sub").mkdir()
    (sqlite_suite.path / "sub" / "test_snap.py").write_text(MODULE, encoding="utf-8")
    sqlite_suite.run().assert_outcomes(passed=2)
    assert (sqlite_suite.path / "snapshots" / "sub" / "test_snap.querywatch.yml").read_text(
        "utf-8"
    ) == recorded(sqlite_suite)
    assert not (sqlite_suite.path / "sub" / "test_snap.querywatch.yml").exists()


def test_marker_with_a_bad_argument_fails_the_test(sqlite_suite: Suite) -> None:
    """`querywatch_snapshot("yes")` fails the test, naming what it takes."""
    sqlite_suite.module(
        "import pytest\n\n@pytest.mark.querywatch_snapshot('yes')\ndef test_x():\n    pass\n"
    )
    result = sqlite_suite.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*querywatch_snapshot(enabled): True or False, got 'yes'*"])


# --- strict, stale --------------------------------------------------------------------------


def test_strict_fails_on_a_missing_record(suite: Suite) -> None:
    """`--querywatch-snapshot-strict` fails a test without a record, listing its statements."""
    suite.module()
    result = suite.run("--querywatch-snapshot-strict")
    result.assert_outcomes(failed=2)
    assert_lines(
        result,
        [
            "querywatch: this test has no snapshot record "
            f"(test_snap.querywatch.yml, {suite.dialect}: test_book); it ran:",
            f"  {BOOK_BY_ID}",
            "write it: pytest --querywatch-snapshot-update 'test_snap.py::test_book'",
        ],
    )
    assert not (suite.path / "test_snap.querywatch.yml").exists()


def test_update_removes_records_of_tests_that_are_gone(sqlite_suite: Suite) -> None:
    """An update run removes the records of tests no longer in their module, and says so."""
    sqlite_suite.module()
    sqlite_suite.run()
    sqlite_suite.module(MODULE[: MODULE.index("def test_book")])
    result = sqlite_suite.run("--querywatch-snapshot-update")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["1 stale snapshot record removed"])
    assert list(yaml.safe_load(sqlite_suite.record())["sqlite"]) == ["test_authors"]


def test_update_removes_the_record_file_of_a_deleted_module(sqlite_suite: Suite) -> None:
    """An update run deletes the record file of a test module that no longer exists."""
    sqlite_suite.module()
    sqlite_suite.module(name="test_other")
    sqlite_suite.run().assert_outcomes(passed=4)
    (sqlite_suite.path / "test_other.py").unlink()
    result = sqlite_suite.run("--querywatch-snapshot-update")
    result.stdout.fnmatch_lines(["2 stale snapshot records removed"])
    assert not (sqlite_suite.path / "test_other.querywatch.yml").exists()
    assert sqlite_suite.record() == recorded(sqlite_suite)


def test_update_keeps_records_of_tests_not_selected(sqlite_suite: Suite) -> None:
    """Records of tests left out by a node id or deselected by -k are not stale."""
    sqlite_suite.module()
    sqlite_suite.run()
    sqlite_suite.run("--querywatch-snapshot-update", "test_snap.py::test_book")
    sqlite_suite.run("--querywatch-snapshot-update", "-k", "test_book")
    assert sqlite_suite.record() == recorded(sqlite_suite)


# --- alongside the other features -----------------------------------------------------------


def test_budget_fail_on_and_snapshot_report_together(sqlite_suite: Suite) -> None:
    """A test over its budget, with an N+1 and a changed snapshot, fails with all three."""
    sqlite_suite.module()
    sqlite_suite.run()
    sqlite_suite.module(
        MODULE.replace(
            "def test_authors",
            "@pytest.mark.query_budget(max_statements=3)\ndef test_authors",
        ).replace(
            ".options(selectinload(Author.books))).all()",
            ").all()\n        assert all(author.books for author in authors)",
        )
    )
    result = sqlite_suite.run("--querywatch-fail-on=n_plus_one")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "querywatch: the test ran 7 statements, budget is 3 (max_statements=3)",
            "*N+1: Author.books lazy-loaded 6 times*",
            "querywatch: the SQL statements of this test differ from its snapshot*",
        ]
    )


def test_baseline_and_snapshot_pass_together(sqlite_suite: Suite) -> None:
    """A baselined N+1 does not fail a test whose snapshot matches."""
    sqlite_suite.module(MODULE.replace(".options(selectinload(Author.books))", ""))
    sqlite_suite.module(
        MODULE.replace(
            ".options(selectinload(Author.books))).all()",
            ").all()\n        assert all(author.books for author in authors)",
        )
    )
    args = ("--querywatch-fail-on=n_plus_one", "--querywatch-baseline=baseline.json")
    sqlite_suite.run(*args, "--querywatch-update-baseline").assert_outcomes(passed=2)
    sqlite_suite.run(*args, "--querywatch-snapshot-strict").assert_outcomes(passed=2)


# --- SQLAlchemy 2.0 and 2.1, xdist ----------------------------------------------------------


def test_committed_record_passes_on_this_sqlalchemy(pytester: pytest.Pytester) -> None:
    """The record written on SQLAlchemy 2.0 passes, strict, on the installed SQLAlchemy."""
    pytester.makeini(INI)
    for name in ("shop_suite.py", "shop_suite.querywatch.yml"):
        shutil.copy(HERE / "snapshot_fixture" / name, pytester.path / name)
    result = pytester.runpytest(*QUIET, "--querywatch-snapshot-strict", "shop_suite.py")
    result.assert_outcomes(passed=5)


@pytest.mark.parametrize(
    ("sqlalchemy_20", "sqlalchemy_21"),
    [
        (
            "select books.id as books_id, books.title as books_title from books where books.id = ?",
            "select books.id, books.title from books where books.id = ?",
        ),
        (
            "select books_1.id as books_1_id, tags.id as tags_id from books as books_1 join tags "
            "on tags.id = books_1.tag_id",
            "select books_1.id, tags.id from books as books_1 join tags "
            "on tags.id = books_1.tag_id",
        ),
        (
            "select count(*) as count_1 from (select authors.id as authors_id from authors "
            "where authors.id > ?) as anon_1",
            "select count(*) as count_1 from (select authors.id from authors "
            "where authors.id > ?) as anon_1",
        ),
    ],
    ids=["get", "aliased", "query-count"],
)
def test_labels_of_2_0_and_2_1_normalise_alike(sqlalchemy_20: str, sqlalchemy_21: str) -> None:
    """The column labels SQLAlchemy 2.0 adds (`t.c AS t_c`) and 2.1 leaves out make one shape."""
    assert normalise(sqlalchemy_20) == normalise(sqlalchemy_21)


def test_anonymous_names_are_numbered_by_appearance() -> None:
    """`anon_2` first in the text reads as `anon_1`: numbering moves, the shape does not."""
    assert normalise(
        "select anon_2.n from (select count(*) as n from books) as anon_2 where anon_2.n > ?"
    ) == ("select anon_1.n from (select count(*) as n from books) as anon_1 where anon_1.n > ?")


def test_labels_the_statement_refers_to_are_kept() -> None:
    """A generated label that the statement uses elsewhere (a subquery column) stays."""
    shape = "select anon_1.authors_id from (select authors.id as authors_id from authors) as anon_1"
    assert normalise(shape) == shape


def test_xdist_workers_write_every_record(pytester: pytest.Pytester) -> None:
    """Two pytest-xdist workers recording tests of the same modules lose no record."""
    pytest.importorskip("xdist")
    pytester.makeini(INI)
    tests = "\n".join(
        f"def test_{i}(engine):\n"
        f"    with engine.connect() as conn:\n"
        f"        conn.execute(sa.text('SELECT {i} FROM sqlite_master'))\n"
        for i in range(12)
    )
    source = (
        "import pytest\nimport sqlalchemy as sa\nimport querywatch\n\n"
        "pytestmark = pytest.mark.querywatch_snapshot\n\n"
        "@pytest.fixture\ndef engine():\n"
        "    engine = sa.create_engine('sqlite://')\n    querywatch.instrument(engine)\n"
        "    yield engine\n    querywatch.uninstrument(engine)\n\n" + tests
    )
    pytester.makepyfile(test_one=source, test_two=source)
    result = pytester.runpytest_subprocess(*QUIET, "-n", "2", "-v")
    result.assert_outcomes(passed=24)
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*"])
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*"])
    result.stdout.fnmatch_lines(["24 new snapshot records written"])
    for name in ("test_one", "test_two"):
        records = yaml.safe_load((pytester.path / f"{name}.querywatch.yml").read_text("utf-8"))
        assert sorted(records["sqlite"]) == sorted(f"test_{i}" for i in range(12))
    rerun = pytester.runpytest_subprocess(*QUIET, "-n", "2", "--querywatch-snapshot-strict")
    rerun.assert_outcomes(passed=24)


# --- assert_query_snapshot, without the plugin -----------------------------------------------


def test_assert_query_snapshot_writes_then_compares(
    tmp_path: Path, sqlite_engine: sa.Engine
) -> None:
    """The helper writes a missing record, passes on the same statements and fails on others."""
    path = tmp_path / "views.querywatch.yml"

    def run(sql: str) -> None:
        with assert_query_snapshot(path, "ViewsTest.test_count"), sqlite_engine.connect() as conn:
            conn.execute(sa.text(sql))

    run("SELECT count(*) FROM sqlite_master")
    run("SELECT count(*) FROM sqlite_master")
    with pytest.raises(QueryAssertionError) as failure:
        run("SELECT name FROM sqlite_master")
    assert str(failure.value).splitlines()[1:6] == [
        "--- snapshot",
        "+++ this run",
        "@@ -1 +1 @@",
        "-select count(*) from sqlite_master",
        "+select name from sqlite_master",
    ]


def test_assert_query_snapshot_update_rewrites(tmp_path: Path, sqlite_engine: sa.Engine) -> None:
    """`update=True` rewrites a record that differs instead of failing."""
    path = tmp_path / "views.querywatch.yml"
    for sql in ("SELECT 1", "SELECT name FROM sqlite_master"):
        with assert_query_snapshot(path, "t", update=True), sqlite_engine.connect() as conn:
            conn.execute(sa.text(sql))
    assert yaml.safe_load(path.read_text("utf-8")) == {
        "sqlite": {"t": ["select name from sqlite_master"]}
    }


def test_assert_query_snapshot_strict_fails_on_missing(
    tmp_path: Path, sqlite_engine: sa.Engine
) -> None:
    """`strict=True` fails on a missing record and writes nothing."""
    path = tmp_path / "views.querywatch.yml"
    snapshot = assert_query_snapshot(path, "t", strict=True)
    with pytest.raises(QueryAssertionError, match="has no snapshot record"):
        run_in(snapshot, sqlite_engine)
    assert not path.exists()


def run_in(snapshot: assert_query_snapshot, engine: sa.Engine) -> None:
    with snapshot, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


# --- the file format -------------------------------------------------------------------------

AWKWARD = [
    "select a: b from t",
    "select x #> ? from t",
    "- starts like an item",
    "ends with a colon:",
    'say "hi" \\ back',
    "true",
    "123",
    "",
    "line\nbreak\ttab\x00nul\u2028sep",
    "caf\u00e9 \u00d7 2",
    "'quoted'",
]


def test_awkward_strings_round_trip_and_read_as_yaml() -> None:
    """Strings YAML would misread are quoted: our reader and PyYAML read back the same data."""
    records = {
        "sqlite": {
            "test_x[a: b]": tuple(AWKWARD),
            "test_y": (("GET /a/{id}", tuple(AWKWARD[:3])), ("after login", ())),
            "test_z": (),
        }
    }
    text = render_file(records, module="test_x.py")
    assert parse_file(text, "x.yml") == records
    assert yaml.safe_load(text) == {
        "sqlite": {
            "test_x[a: b]": AWKWARD,
            "test_y": [{"GET /a/{id}": AWKWARD[:3]}, {"after login": []}],
            "test_z": [],
        }
    }


def test_unreadable_record_file_fails_naming_file_and_line(sqlite_suite: Suite) -> None:
    """A record file that cannot be read fails its tests with the file and the line."""
    sqlite_suite.module()
    (sqlite_suite.path / "test_snap.querywatch.yml").write_text(
        "sqlite:\n  test_book:\n    - ok\n   bad indent\n", encoding="utf-8"
    )
    result = sqlite_suite.run()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*cannot read the snapshot records: *test_snap.querywatch.yml:4: *"]
    )


def test_report_parent_names_the_enclosing_unit(sqlite_engine: sa.Engine) -> None:
    """`Report.parent` is the report of the unit a unit is nested in, None at the top."""
    with querywatch.watch("outer") as outer, querywatch.watch("inner") as inner:
        pass
    assert inner.parent is outer
    assert outer.parent is None
