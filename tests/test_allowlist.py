"""The allowlist (relationship, fingerprint, call-site glob, finding id), stale entries, and the
`warn` and `raise` modes' output."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import querywatch
from querywatch import Settings
from querywatch._collection import QueryWatchWarning
from querywatch.findings import StaleAllowlistFinding
from tests.callsites import next_line
from tests.models import Author, create_schema, seed


@pytest.fixture
def engine(sqlite_engine: sa.Engine) -> sa.Engine:
    create_schema(sqlite_engine)
    with Session(sqlite_engine) as session:
        seed(session)
    return sqlite_engine


def _lazy_loop(engine: sa.Engine, settings: Settings) -> querywatch.Report:
    with querywatch.watch("loop", settings=settings) as report, Session(engine) as session:
        for author in session.scalars(sa.select(Author)):
            assert author.books
    return report


@pytest.mark.parametrize(
    "entry",
    ["Author.books", "tests/test_allowlist.py:*", "tests/*", "*in _lazy_loop"],
)
def test_allowlisted_finding_is_dropped(engine: sa.Engine, entry: str) -> None:
    """An entry naming the relationship or matching the call site removes the finding."""
    assert _lazy_loop(engine, Settings()).n_plus_one
    assert _lazy_loop(engine, Settings(allowlist=(entry,))).findings == ()


def test_allowlist_by_exact_call_site(engine: sa.Engine) -> None:
    """`path:line` (with or without ` in function`) names one call site exactly."""
    (finding,) = _lazy_loop(engine, Settings()).n_plus_one
    assert finding.callsite is not None
    path_and_line = finding.callsite.split(" in ")[0]
    for entry in (finding.callsite, path_and_line):
        assert _lazy_loop(engine, Settings(allowlist=(entry,))).findings == ()
    assert _lazy_loop(engine, Settings(allowlist=(path_and_line + "0",))).n_plus_one


def test_allowlist_by_finding_id(engine: sa.Engine) -> None:
    """A finding id (from a log line or baseline) removes exactly that finding."""
    (finding,) = _lazy_loop(engine, Settings()).n_plus_one
    assert _lazy_loop(engine, Settings(allowlist=(finding.id,))).findings == ()


def test_allowlist_by_sql_is_normalised_to_the_fingerprint(engine: sa.Engine) -> None:
    """A statement written with literals matches the fingerprint of the loop it stands for."""
    sql = "SELECT name FROM authors WHERE id = 42"
    settings = Settings(allowlist=(sql,))
    with querywatch.watch("sql", settings=settings) as report, engine.connect() as conn:
        for i in range(6):
            conn.execute(sa.text("SELECT name FROM authors WHERE id = :i"), {"i": i})
    assert report.findings == ()


def test_stale_entries_are_reported_when_asked(engine: sa.Engine) -> None:
    """With `report_stale_allowlist`, an entry that matched nothing becomes a finding."""
    settings = Settings(allowlist=("Author.books", "Book.tags"), report_stale_allowlist=True)
    report = _lazy_loop(engine, settings)
    (stale,) = report.findings
    assert isinstance(stale, StaleAllowlistFinding)
    assert stale.entry == "Book.tags"
    assert "stale allowlist entry 'Book.tags' matched nothing" in stale.describe()


def test_stale_entries_are_silent_by_default(engine: sa.Engine) -> None:
    """Without the setting, unused entries are not reported."""
    assert _lazy_loop(engine, Settings(allowlist=("Book.tags", "Author.books"))).findings == ()


def test_raise_mode_message_lists_each_finding_with_site_and_fix(engine: sa.Engine) -> None:
    """`NPlusOneDetected` names the unit, then one line per finding: subject, line, fix."""
    unit = querywatch.watch("orders", mode="raise")
    with pytest.raises(querywatch.NPlusOneDetected) as raised, unit, Session(engine) as session:  # noqa: PT012
        for author in session.scalars(sa.select(Author)):
            where = next_line()
            assert author.books
        with engine.connect() as conn:
            for _ in range(2):
                conn.execute(sa.text("SELECT 1 FROM authors WHERE id = :i"), {"i": 1})
    lines = str(raised.value).splitlines()
    assert lines[0] == "querywatch found 2 problem(s) in 'orders':"
    assert lines[1].startswith(f"  - N+1: Author.books ran 10 times at {where} (")
    assert lines[1].endswith(
        "fix: eager-load it: add .options(selectinload(Author.books)) to the query that loads "
        "the Author objects"
    )
    assert lines[2].startswith("  - duplicate query: the same statement with the same parameters")
    assert len(raised.value.findings) == 2


def test_warn_mode_warns_once_per_finding(engine: sa.Engine) -> None:
    """`warn` mode issues one QueryWatchWarning per finding, with the same text."""
    with pytest.warns(QueryWatchWarning, match=r"N\+1: Author\.books ran 10 times"):
        _lazy_loop(engine, Settings(mode="warn"))


def test_allowlist_sql_entry_matches_a_postgresql_shape_with_a_hash_operator(
    pg_engine: sa.Engine,
) -> None:
    """An entry written as SQL with PostgreSQL's `#` (XOR) operator matches the PostgreSQL
    shape, which keeps what follows the `#`."""
    sql = "SELECT CAST(:a AS int) # 3"
    settings = Settings(duplicate_threshold=2, allowlist=(sql,))
    with querywatch.watch("pg-xor", settings=settings) as report, pg_engine.connect() as conn:
        for _ in range(2):
            conn.execute(sa.text(sql), {"a": 5}).all()
    assert report.duplicates == ()
