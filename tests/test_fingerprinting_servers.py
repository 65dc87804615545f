"""fingerprint(sql, dialect=...) against the servers themselves: MariaDB and PostgreSQL run each
statement and say what its literals are; the shape for that dialect holds none of them, and
keeps every part of the statement the server reads as SQL. `dialect_key()` on real engines.

These call `fingerprint()` directly; `tests/test_fingerprinting_end_to_end.py` checks the same
through `watch()`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymysql.converters import escape_string  # type: ignore[import-untyped]

from querywatch import fingerprint
from querywatch.fingerprinting import dialect_key
from tests.conftest import MARIADB_URL, PSYCOPG_URL, require_mariadb, require_postgres

SECRET = "QWSECRET"


def _run(engine: sa.Engine, sql: str) -> tuple[object, ...]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(sql).one()
    return tuple(row)


@pytest.fixture(scope="module")
def mariadb() -> Iterator[sa.Engine]:
    """A plain (uninstrumented) pymysql engine on the local MariaDB."""
    require_mariadb()
    engine = sa.create_engine(MARIADB_URL, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def postgres() -> Iterator[sa.Engine]:
    """A plain (uninstrumented) psycopg engine on the local PostgreSQL."""
    require_postgres()
    engine = sa.create_engine(PSYCOPG_URL, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def _mysql_mode_engine(sql_mode: str) -> sa.Engine:
    # SQLAlchemy reads @@sql_mode when it first connects, after pymysql's init_command ran.
    require_mariadb()
    return sa.create_engine(
        MARIADB_URL,
        poolclass=sa.pool.NullPool,
        connect_args={"init_command": f"SET SESSION sql_mode = '{sql_mode}'"},
    )


# -- MariaDB ------------------------------------------------------------------------------------

MARIADB_CASES = [
    # (statement, what MariaDB returns, the mysql shape)
    (
        f'SELECT \'it\\\'s {SECRET}1\' AS a, "{SECRET}2 \\"q\\" " AS b, 5 AS c',
        (f"it's {SECRET}1", f'{SECRET}2 "q" ', 5),
        "select ? as a, ? as b, ? as c",
    ),
    (
        f"SELECT 'C:\\\\' AS p, '{SECRET}' AS s",
        ("C:\\", SECRET),
        "select ? as p, ? as s",
    ),
    (
        f'SELECT "{SECRET} said ""hi""" AS a, \'x\'\'{SECRET}\' AS b',
        (f'{SECRET} said "hi"', f"x'{SECRET}"),
        "select ? as a, ? as b",
    ),
    (
        f"SELECT 1 AS a # {SECRET} it's\n, 2 AS b -- {SECRET} it's\n, 3 AS c",
        (1, 2, 3),
        "select ? as a , ? as b , ? as c",
    ),
    (
        "SELECT 5--1 AS a, 7 AS b",
        (6, 7),
        "select ?-? as a, ? as b",
    ),
    (
        f"SELECT N'\\'{SECRET}' AS a, X'4142' AS b, _utf8mb4'{SECRET}\\'' AS c",
        (f"'{SECRET}", b"AB", f"{SECRET}'"),
        "select ? as a, ? as b, _utf8mb4? as c",
    ),
]


@pytest.mark.mariadb
@pytest.mark.parametrize(
    ("sql", "row", "shape"),
    MARIADB_CASES,
    ids=[
        "backslash-escapes",
        "escaped-backslash",
        "doubled-quotes",
        "comments",
        "minus-minus",
        "prefixed",
    ],
)
def test_mariadb_literals_never_reach_the_shape(
    mariadb: sa.Engine, sql: str, row: tuple[object, ...], shape: str
) -> None:
    """Each literal MariaDB returns is a `?` in the mysql shape, and the rest stays."""
    assert _run(mariadb, sql) == row
    for dialect in ("mysql", "mariadb"):
        assert fingerprint(sql, dialect=dialect) == shape


@pytest.mark.mariadb
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(alphabet="'\"\\ qx\n\t#-/*", max_size=12),
    st.text(alphabet="'\"\\ qx\n\t#-/*", max_size=12),
    st.sampled_from(["'", '"']),
)
def test_driver_escaped_strings_never_leak_on_mariadb(
    mariadb: sa.Engine, before: str, after: str, quote: str
) -> None:
    """A string escaped the way pymysql escapes values, in either quote, is one literal."""
    content = before + SECRET + after
    literal = quote + str(escape_string(content)) + quote
    sql = f"SELECT {literal} AS a, 1 AS b"
    assert _run(mariadb, sql) == (content, 1)
    assert fingerprint(sql, dialect="mariadb") == "select ? as a, ? as b"


@pytest.mark.mariadb
def test_mariadb_ansi_quotes_mode_keeps_identifiers() -> None:
    """Under ANSI_QUOTES, dialect_key() says so and "..." stays an identifier in the shape."""
    engine = _mysql_mode_engine("ANSI_QUOTES")
    sql = f"SELECT 'it\\'s {SECRET}' AS \"Note\""
    try:
        with engine.connect() as conn:
            key = dialect_key(conn.dialect)
            assert tuple(conn.exec_driver_sql(sql).one()) == (f"it's {SECRET}",)
    finally:
        engine.dispose()
    assert key == "mysql/ansi_quotes"
    assert fingerprint(sql, dialect=key) == 'select ? as "Note"'


@pytest.mark.mariadb
def test_mariadb_no_backslash_escapes_mode_keeps_backslashes_plain() -> None:
    """Under NO_BACKSLASH_ESCAPES, dialect_key() says so and '\\' ends a string."""
    engine = _mysql_mode_engine("NO_BACKSLASH_ESCAPES")
    sql = f"SELECT 'C:\\' AS p, '{SECRET}' AS s"
    try:
        with engine.connect() as conn:
            key = dialect_key(conn.dialect)
            assert tuple(conn.exec_driver_sql(sql).one()) == ("C:\\", SECRET)
    finally:
        engine.dispose()
    assert key == "mysql/no_backslash_escapes"
    assert fingerprint(sql, dialect=key) == "select ? as p, ? as s"


@pytest.mark.mariadb
def test_dialect_key_of_a_default_mariadb_engine_is_mysql(mariadb: sa.Engine) -> None:
    """With the server's default sql_mode, the key is the dialect's name alone."""
    with mariadb.connect() as conn:
        assert dialect_key(conn.dialect) == "mysql"


# -- PostgreSQL ---------------------------------------------------------------------------------

POSTGRES_CASES = [
    (
        f"SELECT 5 # 3 AS x, '{{\"a\": \"{SECRET}\"}}'::jsonb #>> '{{a}}' AS y, 9 AS z",
        (6, SECRET, 9),
        "select ? # ? as x, ?::jsonb #>> ? as y, ? as z",
    ),
    (
        f"SELECT E'it\\'s {SECRET}' AS a, $q${SECRET}'$q$ AS b, $${SECRET}$$ AS c",
        (f"it's {SECRET}", f"{SECRET}'", SECRET),
        "select ? as a, ? as b, ? as c",
    ),
    (
        f"SELECT 'C:\\' AS p, '{SECRET}' AS s, U&'{SECRET}' AS u",
        ("C:\\", SECRET, SECRET),
        "select ? as p, ? as s, ? as u",
    ),
    (
        f"SELECT 1 /* a /* b */ it's */ + 1 AS n, '{SECRET}' AS s",
        (2, SECRET),
        "select ? + ? as n, ? as s",
    ),
    (
        f"SELECT 1--{SECRET} it's\n + 2 AS n",
        (3,),
        "select ? + ? as n",
    ),
]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("sql", "row", "shape"),
    POSTGRES_CASES,
    ids=["hash-operators", "escape-and-dollar", "standard-strings", "nested-comment", "dashes"],
)
def test_postgres_literals_never_reach_the_shape(
    postgres: sa.Engine, sql: str, row: tuple[object, ...], shape: str
) -> None:
    """Each literal PostgreSQL returns is a `?` in the postgresql shape, and every operator
    (`#` included) stays."""
    assert _run(postgres, sql) == row
    assert fingerprint(sql, dialect="postgresql") == shape


@pytest.mark.postgres
def test_dialect_key_of_a_postgres_engine_is_postgresql(postgres: sa.Engine) -> None:
    """With standard_conforming_strings on (the default), the key is the dialect's name."""
    with postgres.connect() as conn:
        assert dialect_key(conn.dialect) == "postgresql"


def test_dialect_key_of_a_sqlite_engine_is_sqlite(sqlite_engine: sa.Engine) -> None:
    """SQLite has no quoting modes: the key is the dialect's name."""
    with sqlite_engine.connect():
        assert dialect_key(sqlite_engine.dialect) == "sqlite"
