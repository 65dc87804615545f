"""The pytest plugin through `pytester`: budgets, marker, fail-on, baseline, async, HTTP."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Logs

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
    ignore:Using `httpx` with `starlette.testclient` is deprecated
"""

# The inner suite's shared code: models with a lazy one-to-many, and instrumented engines.
CONFTEST = """
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import querywatch


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def seed(session):
    for a in range(1, 7):
        session.add(Author(id=a, name=f"author {a}", books=[
            Book(id=a * 10 + b, title=f"book {a}.{b}") for b in range(2)
        ]))
    session.commit()


@pytest.fixture
def engine():
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    querywatch.instrument(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
async def async_engine():
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=sa.pool.StaticPool)
    querywatch.instrument(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield engine
    querywatch.uninstrument(engine)
    await engine.dispose()
"""

N_PLUS_ONE_TEST = """
from sqlalchemy import select
from sqlalchemy.orm import Session
from conftest import Author


def test_list_authors(engine):
    with Session(engine) as session:
        for author in session.scalars(select(Author)):
            assert author.books
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with the inner suite's ini and conftest."""
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest("-p", "no:cacheprovider", "--strict-markers", *args)


def test_budget_within_limit_passes(suite: pytest.Pytester) -> None:
    """A test that runs no more statements than its budget passes."""
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(max_statements=2)
        def test_two(engine):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                conn.execute(sa.text("SELECT 2"))
        """
    )
    run(suite).assert_outcomes(passed=1)


def test_budget_exceeded_fails_with_count_and_shapes(suite: pytest.Pytester) -> None:
    """Going over the budget fails the test with the count, the budget and the shapes run."""
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(max_statements=2)
        def test_loop(engine):
            with engine.connect() as conn:
                for i in (1, 2, 3):
                    conn.execute(sa.text("SELECT name FROM authors WHERE id = :id"), {"id": i})
                conn.execute(sa.text("SELECT count(*) FROM books"))
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_loop _*",
            "querywatch: the test ran 4 statements, budget is 2 (max_statements=2)",
            "statements by shape, most executed first:",
            "     3 x select name from authors where id = ?",
            "     1 x select count(*) from books",
        ]
    )


def test_positional_budget(suite: pytest.Pytester) -> None:
    """`query_budget(1)` is the statement budget."""
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(1)
        def test_two(engine):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                conn.execute(sa.text("SELECT 2"))
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ran 2 statements, budget is 1*"])


def test_fixture_setup_does_not_count(suite: pytest.Pytester) -> None:
    """Statements run while fixtures are set up (seeding) do not count toward the budget."""
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.query_budget(max_statements=0)
        def test_nothing(engine):
            pass
        """
    )
    run(suite).assert_outcomes(passed=1)


def test_marker_registered_for_strict_markers(suite: pytest.Pytester) -> None:
    """`--strict-markers` accepts `query_budget`, and `--markers` documents it."""
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.query_budget(max_statements=5, n_plus_one="fail")
        def test_marked():
            pass
        """
    )
    run(suite).assert_outcomes(passed=1)
    run(suite, "--markers").stdout.fnmatch_lines(["@pytest.mark.query_budget(max_statements=None*"])


def test_marker_rejects_unknown_argument(suite: pytest.Pytester) -> None:
    """A misspelled marker argument fails the test and names the accepted ones."""
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.query_budget(max_statement=5)
        def test_typo():
            pass
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*query_budget: unknown argument 'max_statement'; accepted: max_statements*"]
    )


def test_fixture_exposes_live_report(suite: pytest.Pytester) -> None:
    """The `querywatch` fixture's report counts the test body's statements so far."""
    suite.makepyfile(
        """
        import sqlalchemy as sa

        def test_report(engine, querywatch):
            assert querywatch.report.kind == "test"
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            assert querywatch.report.statements == 1
            with querywatch.watch("block") as block:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 2"))
            assert block.statements == 1
            assert querywatch.report.statements == 2
        """
    )
    run(suite).assert_outcomes(passed=1)


def test_fixture_assertion_fails_the_test(suite: pytest.Pytester) -> None:
    """`querywatch.assert_max_statements` inside a test fails it with the budget message."""
    suite.makepyfile(
        """
        import sqlalchemy as sa

        def test_block(engine, querywatch):
            with querywatch.assert_max_statements(0):
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*querywatch: the block ran 1 statements, budget is 0*"])


def test_fail_on_n_plus_one_fails_with_actionable_message(suite: pytest.Pytester) -> None:
    """With `--querywatch-fail-on=n_plus_one` an N+1 fails the test with relationship, line,
    statement and fix."""
    suite.makepyfile(test_authors=N_PLUS_ONE_TEST)
    result = run(suite, "--querywatch-fail-on=n_plus_one")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "querywatch: 1 finding(s) fail this test (fail-on n_plus_one):",
            "  - N+1: Author.books lazy-loaded 6 times (*ms)",
            "      at: test_authors.py:9 in test_list_authors",
            "      statement: select books.id*from books where ? = books.author_id",
            "      fix: *selectinload(Author.books)*",
            "      id: *",
        ]
    )


def test_without_fail_on_n_plus_one_passes(suite: pytest.Pytester) -> None:
    """Without the switch (or a marker), an N+1 does not fail the test."""
    suite.makepyfile(test_authors=N_PLUS_ONE_TEST)
    run(suite).assert_outcomes(passed=1)


def test_fail_on_from_ini(suite: pytest.Pytester) -> None:
    """The `querywatch_fail_on` ini key works like the command-line switch."""
    suite.makeini(INI + "querywatch_fail_on = n_plus_one\n")
    suite.makepyfile(test_authors=N_PLUS_ONE_TEST)
    run(suite).assert_outcomes(failed=1)


def test_marker_fails_on_n_plus_one(suite: pytest.Pytester) -> None:
    """`query_budget(n_plus_one="fail")` fails that test on an N+1 without the global switch."""
    suite.makepyfile(
        test_authors=N_PLUS_ONE_TEST.replace(
            "def test_list_authors",
            '@pytest.mark.query_budget(n_plus_one="fail")\ndef test_list_authors',
        ).replace("from sqlalchemy import select", "import pytest\nfrom sqlalchemy import select")
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*finding(s) fail this test (query_budget(n_plus_one="fail"))*'])


def test_marker_ignore_overrides_fail_on(suite: pytest.Pytester) -> None:
    """`query_budget(n_plus_one="ignore")` exempts one test from `--querywatch-fail-on`."""
    suite.makepyfile(
        test_authors=N_PLUS_ONE_TEST.replace(
            "def test_list_authors",
            '@pytest.mark.query_budget(n_plus_one="ignore")\ndef test_list_authors',
        ).replace("from sqlalchemy import select", "import pytest\nfrom sqlalchemy import select")
    )
    run(suite, "--querywatch-fail-on=n_plus_one").assert_outcomes(passed=1)


def test_marker_threshold(suite: pytest.Pytester) -> None:
    """`query_budget(n_plus_one_threshold=2)` flags a loop the default threshold lets pass."""
    three = N_PLUS_ONE_TEST.replace("select(Author)", "select(Author).limit(3)")
    suite.makepyfile(
        test_default="import pytest\n" + three,
        test_strict=three.replace(
            "def test_list_authors",
            "import pytest\n\n\n@pytest.mark.query_budget(n_plus_one_threshold=2)\n"
            "def test_list_authors",
        ),
    )
    result = run(suite, "--querywatch-fail-on=n_plus_one")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_strict.py::test_list_authors*"])


def test_fail_on_rejects_unknown_kind(suite: pytest.Pytester) -> None:
    """An unknown kind in `--querywatch-fail-on` is a usage error naming the accepted kinds."""
    result = run(suite, "--querywatch-fail-on=n_plus_two")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown finding kind 'n_plus_two'; accepted: n_plus_one*"])


def test_baseline_adoption(suite: pytest.Pytester) -> None:
    """A written baseline lets known findings pass while a new one still fails."""
    suite.makepyfile(test_authors=N_PLUS_ONE_TEST)
    options = ("--querywatch-fail-on=n_plus_one", "--querywatch-baseline=qw-baseline.json")
    written = run(suite, *options, "--querywatch-update-baseline")
    written.assert_outcomes(passed=1)
    written.stdout.fnmatch_lines(["*wrote 1 finding(s) to the baseline *qw-baseline.json"])
    (entry,) = json.loads((suite.path / "qw-baseline.json").read_text())["findings"]
    assert (entry["kind"], entry["subject"]) == ("n_plus_one", "Author.books")
    assert entry["tests"] == ["test_authors.py::test_list_authors"]

    adopted = run(suite, *options)
    adopted.assert_outcomes(passed=1)
    adopted.stdout.fnmatch_lines(["*1 baselined finding(s) did not fail 1 test(s)"])

    # The loop on another line: another call site, so a new finding.
    moved = N_PLUS_ONE_TEST.replace("assert author.books", "\n            assert author.books")
    suite.makepyfile(test_new=moved)
    new = run(suite, *options)
    new.assert_outcomes(passed=1, failed=1)
    new.stdout.fnmatch_lines(["FAILED test_new.py::test_list_authors*"])


def test_stale_baseline_entry_is_reported(suite: pytest.Pytester) -> None:
    """A baseline entry whose tests ran without finding it is listed as stale."""
    suite.makepyfile("def test_clean():\n    pass\n")
    baseline = {
        "version": 1,
        "findings": [
            {
                "id": "0123456789ab",
                "kind": "n_plus_one",
                "subject": "Author.books",
                "callsite": "app/views.py:12 in list_authors",
                "tests": ["test_stale_baseline_entry_is_reported.py::test_clean"],
            }
        ],
    }
    (suite.path / "qw.json").write_text(json.dumps(baseline))
    result = run(suite, "--querywatch-fail-on=n_plus_one", "--querywatch-baseline=qw.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*= querywatch =*",
            "1 stale baseline entry (not found any more: delete them, or rerun with*",
            "  0123456789ab n_plus_one Author.books at app/views.py:12 in list_authors",
        ]
    )


def test_baseline_entry_of_unrun_test_is_not_stale(suite: pytest.Pytester) -> None:
    """Running a subset of the suite does not report the other tests' entries as stale."""
    suite.makepyfile("def test_clean():\n    pass\n")
    baseline = {
        "version": 1,
        "findings": [{"id": "0123456789ab", "kind": "n_plus_one", "tests": ["other.py::test_x"]}],
    }
    (suite.path / "qw.json").write_text(json.dumps(baseline))
    result = run(suite, "--querywatch-fail-on=n_plus_one", "--querywatch-baseline=qw.json")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*stale baseline*")


def test_missing_baseline_is_usage_error(suite: pytest.Pytester) -> None:
    """A baseline path that does not exist is a usage error (unless it is being written)."""
    result = run(suite, "--querywatch-baseline=missing.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*missing.json does not exist; create it with*"])


def test_async_test_budget(suite: pytest.Pytester) -> None:
    """An async test (pytest-asyncio) is watched like a sync one."""
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.mark.query_budget(max_statements=1)
        async def test_async(async_engine):
            async with async_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await conn.execute(sa.text("SELECT 2"))
        """
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test ran 2 statements, budget is 1*"])


def test_anyio_test_budget(suite: pytest.Pytester) -> None:
    """An anyio-marked async test (anyio's pytest plugin) is watched too."""
    suite.makeini(
        INI.replace("asyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n", "")
    )
    suite.makepyfile(
        """
        import pytest
        import sqlalchemy as sa

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        @pytest.mark.query_budget(max_statements=1)
        async def test_anyio(engine):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                conn.execute(sa.text("SELECT 2"))
        """
    )
    result = run(suite, "-p", "no:asyncio")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test ran 2 statements, budget is 1*"])


APP = """
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from querywatch.middleware import QueryWatchMiddleware


@pytest.fixture
def app(engine):
    app = FastAPI()
    app.add_middleware(QueryWatchMiddleware, metrics=False)

    @app.get("/authors")
    def authors():
        with engine.connect() as conn:
            return [
                conn.execute(sa.text("SELECT name FROM authors WHERE id = :id"), {"id": i}).scalar()
                for i in (1, 2, 3)
            ]

    @app.get("/authors/{author_id}")
    def author(author_id: int):
        with engine.connect() as conn:
            query = sa.text("SELECT name FROM authors WHERE id = :id")
            return conn.execute(query, {"id": author_id}).scalar()

    return app
"""


def test_testclient_requests_count_toward_budget(suite: pytest.Pytester) -> None:
    """Statements of requests sent with FastAPI's TestClient count toward the test's budget."""
    suite.makepyfile(
        test_app=APP
        + """
from fastapi.testclient import TestClient


@pytest.mark.query_budget(max_statements=5)
def test_two_requests(app):
    with TestClient(app) as client:
        assert client.get("/authors").status_code == 200
        assert client.get("/authors").status_code == 200
"""
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the test ran 6 statements, budget is 5*",
            "     6 x select name from authors where id = ?",
        ]
    )


def test_asgi_transport_requests_count_toward_budget(suite: pytest.Pytester) -> None:
    """Statements of requests sent through httpx's ASGITransport count toward the test's budget."""
    suite.makepyfile(
        test_app=APP
        + """
import httpx


@pytest.mark.query_budget(max_statements=3)
async def test_request(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/authors")).status_code == 200
        assert (await client.get("/authors")).status_code == 200
"""
    )
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test ran 6 statements, budget is 3*"])


def test_repeats_across_requests_are_not_findings(suite: pytest.Pytester) -> None:
    """One statement per request over six requests is neither an N+1 nor a duplicate."""
    suite.makepyfile(
        test_app=APP
        + """
from fastapi.testclient import TestClient


def test_each_author(app):
    with TestClient(app) as client:
        for author_id in (1, 2, 3, 4, 5, 6, 6):
            assert client.get(f"/authors/{author_id}").status_code == 200
"""
    )
    run(suite, "--querywatch-fail-on=any").assert_outcomes(passed=1)


def test_inert_when_unused(suite: pytest.Pytester) -> None:
    """A suite that uses neither fixture, marker nor option never activates the plugin."""
    suite.makepyfile("def test_plain():\n    pass\n")
    recorder = suite.inline_run("-p", "no:cacheprovider")
    recorder.assertoutcome(passed=1)
    (finish,) = recorder.getcalls("pytest_sessionfinish")
    assert finish.session.config.pluginmanager.get_plugin("querywatch-session") is None


# --- connections held across tests ---------------------------------------------------------------

# The FastAPI templates' test layout: one Session for the whole run, opened by a session-scoped
# fixture and shared by the test bodies and (through a dependency override) the app.
SHARED_SESSION_SUITE = """
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import querywatch
from conftest import Author, Base, seed
from querywatch.middleware import QueryWatchMiddleware


@pytest.fixture(scope="session")
def db_engine():
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    querywatch.instrument(engine)
    Base.metadata.create_all(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def db(db_engine):
    with Session(db_engine) as session:
        seed(session)
        yield session


@pytest.fixture(scope="module")
def client(db):
    app = FastAPI()
    app.add_middleware(QueryWatchMiddleware, metrics=False)

    def get_db():
        yield db

    @app.get("/authors/{author_id}")
    def read_author(author_id: int, session: Session = Depends(get_db)):
        return {"name": session.get(Author, author_id).name}

    @app.post("/authors/{author_id}")
    def rename_author(author_id: int, name: str, session: Session = Depends(get_db)):
        session.get(Author, author_id).name = name
        session.commit()
        return {"name": name}

    with TestClient(app) as client:
        yield client


def test_read_author(client, db):
    assert client.get("/authors/1").json() == {"name": "author 1"}
    assert db.get(Author, 2).name == "author 2"


def test_rename_author(client):
    assert client.post("/authors/3", params={"name": "renamed"}).json() == {"name": "renamed"}


def test_read_after_rename(client, db):
    assert client.get("/authors/3").json() == {"name": "renamed"}
    assert db.scalar(sa.select(sa.func.count()).select_from(Author)) == 6
"""


def test_a_session_scoped_db_fixture_is_no_leak_of_the_tests(suite: pytest.Pytester) -> None:
    """A session-scoped fixture's Session, holding its connection across tests and used by the
    test bodies and the app, fails no test with `--querywatch-fail-on=any`."""
    suite.makepyfile(test_shared=SHARED_SESSION_SUITE)
    run(suite, "--querywatch-fail-on=any").assert_outcomes(passed=3)


def test_a_session_left_open_by_the_test_fails_naming_where_it_was_opened(
    suite: pytest.Pytester,
) -> None:
    """A Session the test body opens and leaves open holding a connection fails the test with
    the line that opened it."""
    suite.makepyfile(
        test_leak="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session


        @pytest.fixture
        def left_open(engine):
            sessions = []
            yield sessions
            for session in sessions:
                session.close()


        def test_leak(engine, left_open):
            session = Session(engine)
            left_open.append(session)
            session.execute(sa.text("SELECT 1"))
        """
    )
    result = run(suite, "--querywatch-fail-on=connection_leak")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  - connection leak: a connection of pool '*' still checked out when the unit "
            "ended, held by the Session opened at test_leak.py:15 in test_leak",
            "      at: test_leak.py:17 in test_leak",
        ]
    )


# --- what a test unit reports --------------------------------------------------------------------


def test_repeats_across_requests_are_not_logged_for_the_test(
    suite: pytest.Pytester, logs: Logs
) -> None:
    """Seven requests that each load one author (the last two identical) log no finding, the
    test's own included: what the test does not fail on, it does not log either."""
    suite.makepyfile(
        test_app=APP
        + """
from fastapi.testclient import TestClient


def test_each_author(app):
    with TestClient(app) as client:
        for author_id in (1, 2, 3, 4, 5, 6, 6):
            assert client.get(f"/authors/{author_id}").status_code == 200
"""
    )
    run(suite, "--querywatch-fail-on=any").assert_outcomes(passed=1)
    assert [e for e in logs.events() if e["event"].startswith("querywatch.")] == []


def test_a_test_unit_logs_the_findings_it_fails_on(suite: pytest.Pytester, logs: Logs) -> None:
    """The N+1 a test body runs itself is logged once, by the test unit, and fails the test."""
    suite.makepyfile(test_authors=N_PLUS_ONE_TEST)
    run(suite, "--querywatch-fail-on=n_plus_one").assert_outcomes(failed=1)
    events = [e for e in logs.events() if e["event"].startswith("querywatch.")]
    assert [(e["event"], e["unit"], e["unit_kind"]) for e in events] == [
        ("querywatch.n_plus_one", "test_authors.py::test_list_authors", "test")
    ]
