"""Dialect-aware fingerprints end to end: statements with secrets in their literals run through
instrumented engines inside `watch()`, on SQLite, MariaDB and PostgreSQL; no secret reaches
`report.fingerprints` or `report.queries`, and each shape is the one its engine's dialect reads.

Needs the fold to fingerprint each statement with its engine's dialect
(`fingerprinting.cache_for(dialect)` / `shape_of(sql, dialect=...)`).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import querywatch
from querywatch import Report, fingerprint

SECRET = "QWSECRET"


def _exposed(report: Report) -> str:
    return repr(report.fingerprints) + repr(report.queries)


def _watch(engine: sa.Engine, *statements: str) -> Report:
    _connect_once(engine)
    with querywatch.watch("dialects") as report, engine.connect() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql).all()
    return report


def _connect_once(engine: sa.Engine) -> None:
    # The dialect's first-connect queries (sql_mode, version) belong to no unit.
    with engine.connect():
        pass


def assert_no_secret(report: Report) -> None:
    assert SECRET.lower() not in _exposed(report).lower(), _exposed(report)


# -- MariaDB ------------------------------------------------------------------------------------

MARIADB_STRINGS = (
    f"SELECT 'it\\'s {SECRET}' AS a, 1 AS b",
    f'SELECT "{SECRET} said \\"hi\\"" AS a, 2 AS b',
    f"SELECT 'C:\\\\' AS p, '{SECRET}' AS s",
)


@pytest.mark.mariadb
def test_mariadb_strings_never_reach_the_report(mariadb_engine: sa.Engine) -> None:
    """Backslash-escaped quotes and double-quoted strings on MariaDB leave no secret in the
    report's fingerprints or queries."""
    assert_no_secret(_watch(mariadb_engine, *MARIADB_STRINGS))


@pytest.mark.mariadb
def test_mariadb_shapes_are_the_mysql_shapes(mariadb_engine: sa.Engine) -> None:
    """Each statement run on MariaDB is reported under its mysql fingerprint."""
    report = _watch(mariadb_engine, *MARIADB_STRINGS)
    expected = {fingerprint(sql, dialect="mysql") for sql in MARIADB_STRINGS}
    assert set(report.fingerprints) == expected


@pytest.mark.mariadb
def test_mariadb_comments_never_reach_the_report(mariadb_engine: sa.Engine) -> None:
    """`#` and `-- ` comments holding a quote and a secret leave neither in the report."""
    report = _watch(
        mariadb_engine, f"SELECT 1 AS a # {SECRET} it's\n, '{SECRET}' AS b -- {SECRET}'s\n"
    )
    assert_no_secret(report)
    assert set(report.fingerprints) == {"select ? as a , ? as b"}


@pytest.mark.mariadb
def test_mariadb_text_with_bound_and_pasted_values_keeps_no_secret(
    mariadb_engine: sa.Engine,
) -> None:
    """A `text()` statement with a bound parameter and a pasted escaped literal keeps no
    secret."""
    statement = sa.text(f"SELECT :n AS n, 'it\\'s {SECRET}' AS s")
    _connect_once(mariadb_engine)
    with querywatch.watch("dialects") as report, mariadb_engine.connect() as conn:
        assert conn.execute(statement, {"n": 1}).one() == (1, f"it's {SECRET}")
    assert_no_secret(report)


# -- PostgreSQL ---------------------------------------------------------------------------------

XOR = f"SELECT 5 # 3 AS x, '{{\"a\": \"{SECRET}\"}}'::jsonb #>> '{{a}}' AS y, 9 AS z"
XOR_SHAPE = "select ? # ? as x, ?::jsonb #>> ? as y, ? as z"


@pytest.mark.postgres
def test_postgres_shape_continues_after_hash(pg_engine: sa.Engine) -> None:
    """`#` (XOR) and `#>>` on PostgreSQL are operators: the shape keeps what follows them."""
    report = _watch(pg_engine, XOR)
    assert set(report.fingerprints) == {XOR_SHAPE}


@pytest.mark.postgres
async def test_asyncpg_shape_continues_after_hash(asyncpg_engine: AsyncEngine) -> None:
    """The same holds through asyncpg."""
    async with asyncpg_engine.connect():
        pass
    async with querywatch.watch("dialects") as report, asyncpg_engine.connect() as conn:
        assert (await conn.exec_driver_sql(XOR)).one() == (6, SECRET, 9)
    assert set(report.fingerprints) == {XOR_SHAPE}


@pytest.mark.postgres
def test_postgres_strings_never_reach_the_report(pg_engine: sa.Engine) -> None:
    """E'' strings, dollar quotes, U&'' strings, a quote inside a nested comment and JSON
    operator arguments on PostgreSQL leave no secret in the report."""
    report = _watch(
        pg_engine,
        XOR,
        f"SELECT E'it\\'s {SECRET}' AS a, $q${SECRET}'$q$ AS b, U&'{SECRET}' AS c",
        f"SELECT 1 /* a /* b */ it's */ + 1 AS n, '{SECRET}' AS s",
    )
    assert_no_secret(report)


# -- SQLite -------------------------------------------------------------------------------------


def test_sqlite_bracketed_names_never_open_a_string(sqlite_engine: sa.Engine) -> None:
    """A quote inside a [bracketed] SQLite name does not let the next string's secret leak."""
    report = _watch(sqlite_engine, f"SELECT 1 AS [it's], '{SECRET}' AS s")
    assert_no_secret(report)
    assert set(report.fingerprints) == {"select ? as [it's], ? as s"}
