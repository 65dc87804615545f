"""fingerprint(sql, dialect=...): each dialect's strings, comments and quoted identifiers; the
literal hash of `shape_of()`; one cache per dialect family.

Statements here are not run: `tests/test_fingerprinting_servers.py` runs them on MariaDB and
PostgreSQL, which say how they read them.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querywatch import fingerprint
from querywatch.fingerprinting import (
    StatementShape,
    cache_for,
    cache_len,
    configure_cache,
    dialect_key,
    fingerprint_and_operation,
    shape_of,
)

SECRET = "QWSECRET"
#: Every name SQLAlchemy's own dialects use, a flagged variant of each family, and None.
DIALECTS = [
    None,
    "sqlite",
    "postgresql",
    "postgresql/backslash_escapes",
    "mysql",
    "mariadb",
    "mysql/ansi_quotes",
    "mysql/no_backslash_escapes",
    "mssql",
    "oracle",
]
MYSQL_MODES = ["mysql", "mariadb", "mysql/ansi_quotes"]


def _shape(sql: str, dialect: str | None) -> str:
    shape = fingerprint(sql, dialect=dialect)
    assert SECRET.lower() not in shape.lower(), shape
    return shape


# -- MySQL and MariaDB ---------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", MYSQL_MODES)
def test_mysql_backslash_escaped_quote_does_not_end_a_string(dialect: str) -> None:
    """In MySQL, `\\'` inside '...' is a quote, not the end of the string."""
    sql = f"SELECT * FROM u WHERE pw = 'it\\'s {SECRET}' AND id = 5"
    assert _shape(sql, dialect) == "select * from u where pw = ? and id = ?"


@pytest.mark.parametrize("dialect", MYSQL_MODES)
def test_mysql_escaped_backslash_ends_a_string(dialect: str) -> None:
    """In MySQL, '...\\\\' ends with an escaped backslash: what follows is SQL again."""
    sql = f"SELECT * FROM u WHERE path = 'C:\\\\' AND pw = '{SECRET}' AND id = 5"
    assert _shape(sql, dialect) == "select * from u where path = ? and pw = ? and id = ?"


@pytest.mark.parametrize("dialect", ["mysql", "mariadb"])
def test_mysql_double_quoted_strings_are_literals(dialect: str) -> None:
    """With MySQL's default sql_mode, "..." is a string literal, backslash escapes and all."""
    sql = f'SELECT * FROM u WHERE name = "{SECRET} said \\"hi\\" and ""bye""" AND id = 5'
    assert _shape(sql, dialect) == "select * from u where name = ? and id = ?"


def test_mysql_ansi_quotes_keep_double_quoted_identifiers() -> None:
    """With ANSI_QUOTES, "..." is an identifier and keeps its case."""
    sql = f"SELECT \"Name\" FROM `Users` WHERE pw = 'x\\'{SECRET}'"
    assert _shape(sql, "mysql/ansi_quotes") == 'select "Name" from `Users` where pw = ?'


def test_mysql_no_backslash_escapes_keeps_backslashes_plain() -> None:
    """With NO_BACKSLASH_ESCAPES, a backslash before the closing quote is a character."""
    sql = f"SELECT * FROM u WHERE path = 'C:\\' AND pw = '{SECRET}'"
    shape = _shape(sql, "mysql/no_backslash_escapes")
    assert shape == "select * from u where path = ? and pw = ?"


@pytest.mark.parametrize("dialect", MYSQL_MODES)
def test_mysql_hash_starts_a_comment(dialect: str) -> None:
    """In MySQL, `#` starts a comment to the end of the line, `#>` included."""
    sql = f"SELECT a FROM t # {SECRET}\nWHERE b #>> '{SECRET}'\nAND c = 1"
    assert _shape(sql, dialect) == "select a from t where b and c = ?"


@pytest.mark.parametrize("dialect", MYSQL_MODES)
def test_mysql_double_dash_comment_needs_a_space(dialect: str) -> None:
    """`-- ` starts a comment; `--1` is minus minus one, as MySQL reads it."""
    assert _shape(f"SELECT 1 -- {SECRET}\n FROM t", dialect) == "select ? from t"
    assert _shape(f"SELECT 1 --\t{SECRET}", dialect) == "select ?"
    assert _shape("SELECT a--1 FROM t", dialect) == "select a-? from t"


@pytest.mark.parametrize("dialect", MYSQL_MODES)
def test_mysql_prefixed_strings_are_literals(dialect: str) -> None:
    """N'...', X'...' and B'...' are literals, with backslash escapes where MySQL has them."""
    sql = f"SELECT N'\\'{SECRET}', X'51', b'01' FROM t"
    assert _shape(sql, dialect) == "select ?, ?, ? from t"


def test_mariadb_and_mysql_read_alike() -> None:
    """MariaDB and MySQL share one tokenizer and one cache."""
    assert cache_for("mariadb") is cache_for("mysql")


# -- PostgreSQL -----------------------------------------------------------------------------------


def test_postgres_hash_is_xor_not_a_comment() -> None:
    """`#` is PostgreSQL's XOR: the rest of the statement stays in the shape."""
    sql = "SELECT a # b AS x FROM t WHERE id = 5 AND flags # 3 = 0"
    assert _shape(sql, "postgresql") == "select a # b as x from t where id = ? and flags # ? = ?"


def test_postgres_json_path_operators_stay() -> None:
    """`#>`, `#>>` and `#-` are operators; their arguments are literals."""
    sql = f"SELECT data #> '{{a}}', data #>> '{{{SECRET}}}', data #- '{{b}}' FROM t"
    assert _shape(sql, "postgresql") == "select data #> ?, data #>> ?, data #- ? from t"


def test_postgres_nested_comment_ends_where_postgres_ends_it() -> None:
    """A quote inside a nested comment does not open a string."""
    sql = f"SELECT 1 /* a /* b */ it's */ FROM t WHERE pw = '{SECRET}'"
    assert _shape(sql, "postgresql") == "select ? from t where pw = ?"


def test_postgres_comment_nested_three_deep_runs_to_the_end() -> None:
    """Beyond two levels of nesting, the comment takes the rest: the shape is cut, no secret
    leaks."""
    sql = f"SELECT 1 /* a /* b /* c */ it's */ */ FROM t WHERE pw = '{SECRET}'"
    assert _shape(sql, "postgresql") == "select ?"


def test_postgres_standard_strings_keep_backslashes_plain() -> None:
    """With standard_conforming_strings on, '...\\' ends at the quote after the backslash."""
    sql = f"SELECT 'C:\\' AS path, '{SECRET}' AS pw"
    assert _shape(sql, "postgresql") == "select ? as path, ? as pw"


def test_postgres_backslash_escapes_mode_reads_every_string_like_e_strings() -> None:
    """With standard_conforming_strings off, '\\'' is a quote inside the string."""
    sql = f"SELECT 'it\\'s {SECRET}' AS pw, 1 AS n"
    assert _shape(sql, "postgresql/backslash_escapes") == "select ? as pw, ? as n"


def test_postgres_escape_unicode_and_dollar_strings_are_literals() -> None:
    """E'...', U&'...' and $tag$...$tag$ are literals."""
    sql = f"SELECT E'\\'{SECRET}', U&'{SECRET}', $q${SECRET}$q$, $${SECRET}$$ FROM t"
    assert _shape(sql, "postgresql") == "select ?, ?, ?, ? from t"


def test_postgres_quoted_identifiers_keep_their_case() -> None:
    """Double-quoted identifiers stay as written."""
    assert _shape('SELECT "User".id FROM "User"', "postgresql") == 'select "User".id from "User"'


# -- SQLite, SQL Server, Oracle -------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "mssql"])
def test_bracketed_identifiers_are_not_strings(dialect: str) -> None:
    """A quote inside [brackets] is part of the name, not the start of a string."""
    sql = f"SELECT [it's] FROM [Order Details] WHERE pw = '{SECRET}'"
    assert _shape(sql, dialect) == "select [it's] from [Order Details] where pw = ?"


@pytest.mark.parametrize("dialect", ["sqlite", "mssql"])
def test_postcompile_is_not_a_bracketed_identifier(dialect: str) -> None:
    """SQLAlchemy's `__[POSTCOMPILE_x]` is still a parameter where brackets quote names."""
    sql = "SELECT b.id FROM b WHERE b.id IN (__[POSTCOMPILE_id_1])"
    assert _shape(sql, dialect) == "select b.id from b where b.id in (?)"


def test_mssql_temp_tables_are_not_comments() -> None:
    """`#temp` is a SQL Server table name: the rest of the statement stays."""
    sql = f"SELECT * FROM #tmp WHERE [a]]b] = N'{SECRET}' /* x /* y */ it's */ AND c = 1"
    assert _shape(sql, "mssql") == "select * from #tmp where [a]]b] = ? and c = ?"


@pytest.mark.parametrize(
    "literal",
    [
        f"q'[it's {SECRET}]'",
        f"Q'{{{SECRET}'s}}'",
        f"q'<{SECRET}'>'",
        f"q'({SECRET}')'",
        f"nq'!{SECRET}'s!'",
    ],
)
def test_oracle_alternative_quoting_is_a_literal(literal: str) -> None:
    """Oracle's q'[...]' strings (any delimiter, optional N) are literals, quotes and all."""
    sql = f"SELECT {literal} AS note FROM dual WHERE id = :id"
    assert _shape(sql, "oracle") == "select ? as note from dual where id = ?"


# -- every dialect ------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_sqlalchemy_statements_have_one_shape_in_every_dialect(dialect: str | None) -> None:
    """A statement of names, placeholders, numbers and plain strings has the same shape
    whichever dialect reads it."""
    sql = "SELECT a.id, a.name FROM a WHERE a.id = %(id_1)s AND a.kind = 'x' AND a.n IN (1, 2)"
    assert fingerprint(sql, dialect=dialect) == fingerprint(sql)


words = st.sampled_from(
    ["select", "a.id", "from", "t", "where", "=", "?", "%s", ":p", "and", "(", ")", ",", "in"]
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(words | st.integers(0, 10**6).map(str), min_size=1, max_size=25),
    st.sampled_from(DIALECTS),
)
def test_plain_statements_share_their_shape_across_dialects(
    tokens: list[str], dialect: str | None
) -> None:
    """Without quotes, comments or backslashes, every dialect gives the conservative shape."""
    sql = " ".join(tokens)
    assert fingerprint(sql, dialect=dialect) == fingerprint(sql)


@pytest.mark.parametrize("dialect", ["snowflake", "", "MYSQL", "mysql/bogus_flag/", "postgresql/"])
def test_unknown_dialect_names_read_like_their_family_or_conservatively(dialect: str) -> None:
    """A name no family claims gets the conservative tokenizer; unknown flags are ignored."""
    sql = "SELECT a # b FROM t WHERE c = 'x'"
    expected = {"mysql/bogus_flag/": "mysql", "postgresql/": "postgresql"}.get(dialect)
    assert fingerprint(sql, dialect=dialect) == fingerprint(sql, dialect=expected)


@pytest.mark.parametrize("dialect", [["mysql"], 3, object()])
def test_a_dialect_that_is_not_a_string_never_raises(dialect: object) -> None:
    """A dialect of the wrong type gets the conservative tokenizer instead of an error."""
    sql = "SELECT a # b FROM t"
    assert fingerprint(sql, dialect=dialect) == fingerprint(sql)  # type: ignore[arg-type]


# -- literals: the same shape, different statements ----------------------------------------------


def test_pasted_values_share_a_shape_but_not_a_literal_hash() -> None:
    """`id = 5` and `id = 7` have one shape and different literal hashes."""
    five = shape_of("select * from t where id = 5")
    seven = shape_of("select * from t where id = 7")
    assert five.shape == seven.shape == "select * from t where id = ?"
    assert five.literals != seven.literals


def test_equal_literals_have_equal_hashes_whatever_the_spacing() -> None:
    """Whitespace and comments change neither the shape nor the literal hash."""
    plain = shape_of("SELECT * FROM t WHERE name = 'bob' AND id = 5")
    spaced = shape_of("select *\n  from t /* tag */ where name = 'bob'   and id = 5")
    assert spaced.shape == plain.shape
    assert spaced.literals == plain.literals != 0


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("placeholder", ["?", "%s", "%(id_1)s", "$1", "$1::INTEGER", ":id_1"])
def test_bound_parameters_are_not_literals(placeholder: str, dialect: str | None) -> None:
    """A statement whose only values are placeholders has literal hash 0."""
    sql = f"SELECT a.id FROM a WHERE a.id = {placeholder} -- note"
    assert shape_of(sql, dialect=dialect).literals == 0


@pytest.mark.parametrize(
    "literal", ["5", "-2.5e3", "'x'", "E'x'", "$$x$$", "0x1F", "N'x'", "'' ", "1 IN (2, 3)"]
)
def test_every_literal_kind_sets_the_literal_hash(literal: str) -> None:
    """Numbers, strings of every quoting and IN lists of literals give a literal hash."""
    assert shape_of(f"SELECT * FROM t WHERE a = {literal}", dialect="postgresql").literals != 0


def test_shape_of_agrees_with_fingerprint_and_operation() -> None:
    """`shape_of()` is the fingerprint, the operation and the literal hash of one statement."""
    sql = "UPDATE t SET a = 'x' WHERE id = 3"
    result = shape_of(sql, dialect="sqlite")
    assert isinstance(result, StatementShape)
    assert (result.shape, result.operation) == fingerprint_and_operation(sql, dialect="sqlite")
    assert result.operation == "UPDATE"


# -- caches ---------------------------------------------------------------------------------


def test_each_dialect_family_has_its_own_cache() -> None:
    """One statement string is cached once per family, with that family's shape."""
    sql = "SELECT a # b FROM t WHERE id = 41"
    assert shape_of(sql, dialect="postgresql").shape == "select a # b from t where id = ?"
    assert shape_of(sql).shape == "select a"
    assert cache_for("postgresql")[sql].shape == "select a # b from t where id = ?"
    assert cache_for(None)[sql].shape == "select a"


def test_cache_for_returns_what_shape_of_returns() -> None:
    """A cache hit is the very result `shape_of()` gave."""
    sql = 'SELECT * FROM t WHERE name = "x" AND id = 42'
    result = shape_of(sql, dialect="mariadb")
    assert cache_for("mariadb").get(sql) is result
    assert cache_for("mysql").get(sql) is result


def test_cache_for_keeps_one_dict_per_family() -> None:
    """`cache_for()` returns the same dict on every call, also after `configure_cache()`."""
    before = cache_for("oracle")
    configure_cache(10)
    assert cache_for("oracle") is before
    assert cache_for("snowflake") is cache_for(None)
    assert cache_for("postgresql") is not cache_for(None)


def test_configure_cache_bounds_every_family() -> None:
    """The size set by `configure_cache()` bounds each family's cache; `cache_len()` sums them."""
    for i in range(50):
        for dialect in ("sqlite", "postgresql", "mysql"):
            shape_of(f"SELECT {i} FROM t{i}", dialect=dialect)
    configure_cache(10)
    sizes = [len(cache_for(d)) for d in ("sqlite", "postgresql", "mysql")]
    assert sizes == [10, 10, 10]
    assert cache_len() >= 30
    for i in range(50):
        shape_of(f"SELECT {i} FROM u{i}", dialect="sqlite")
    assert len(cache_for("sqlite")) <= 10


def test_a_zero_cache_caches_nothing() -> None:
    """`configure_cache(0)` switches every family's cache off."""
    configure_cache(0)
    for dialect in DIALECTS:
        shape_of("SELECT 1 FROM nowhere_cached", dialect=dialect)
    assert cache_len() == 0


# -- dialect_key -----------------------------------------------------------------------------


class _FakeDialect:
    """Only what `dialect_key()` reads: SQLAlchemy's Dialect attributes of those names."""

    def __init__(self, name: object, **attributes: object) -> None:
        self.name = name
        self.server_version_info: tuple[int, ...] | None = (1, 0)
        for key, value in attributes.items():
            setattr(self, key, value)


@pytest.mark.parametrize(
    ("dialect", "key"),
    [
        (_FakeDialect("sqlite"), "sqlite"),
        (_FakeDialect("postgresql", _backslash_escapes=False), "postgresql"),
        (_FakeDialect("postgresql", _backslash_escapes=True), "postgresql/backslash_escapes"),
        (_FakeDialect("mysql", _server_ansiquotes=False, _backslash_escapes=True), "mysql"),
        (_FakeDialect("mariadb", _server_ansiquotes=True), "mariadb/ansi_quotes"),
        (
            _FakeDialect("mysql", _server_ansiquotes=True, _backslash_escapes=False),
            "mysql/ansi_quotes/no_backslash_escapes",
        ),
        (_FakeDialect(None), None),
        (object(), None),
    ],
)
def test_dialect_key_names_the_family_and_its_quoting_modes(
    dialect: object, key: str | None
) -> None:
    """`dialect_key()` is the dialect's name plus the quoting modes SQLAlchemy detected."""
    assert dialect_key(dialect) == key


def test_dialect_key_before_the_first_connection_is_the_name() -> None:
    """Before a dialect has connected, its modes are class defaults: the key is the name."""
    dialect = _FakeDialect("postgresql", _backslash_escapes=True)
    dialect.server_version_info = None
    assert dialect_key(dialect) == "postgresql"


# -- linear time, per dialect -------------------------------------------------------------------


def _seconds(sql: str, dialect: str) -> float:
    started = time.perf_counter()
    fingerprint(sql + " ", dialect=dialect)  # a new string: no cache hit
    return time.perf_counter() - started


@pytest.mark.parametrize(
    ("dialect", "unit"),
    [
        ("mysql", "'\\"),
        ("mysql", '"x\\"'),
        ("mysql", "-- "),
        ("mysql", "#\n"),
        ("mysql/ansi_quotes/no_backslash_escapes", "\"'"),
        ("postgresql", "/*"),
        ("postgresql", "/* /* */"),
        ("postgresql", "/**/*"),
        ("postgresql", "E'\\'"),
        ("postgresql/backslash_escapes", "'\\"),
        ("sqlite", "["),
        ("mssql", "[a]]"),
        ("mssql", "/*/*"),
        ("oracle", "q'["),
        ("oracle", "q'!"),
    ],
)
def test_cost_grows_linearly_in_every_dialect(dialect: str, unit: str) -> None:
    """Doubling a pathological input twice costs about four times as much, in each dialect."""
    small = min(_seconds(unit * 5_000, dialect) for _ in range(5))
    large = min(_seconds(unit * 20_000, dialect) for _ in range(5))
    assert large < small * 12 + 0.005
