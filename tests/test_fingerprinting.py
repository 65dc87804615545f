"""fingerprint(): statement shapes, equivalence classes, and total, linear behaviour."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querywatch import fingerprint
from querywatch.fingerprinting import MAX_INPUT, TRUNCATED_MARKER, cache_for, operation_of


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a.id FROM a WHERE a.id = ?",
        "SELECT a.id FROM a WHERE a.id = %s",
        "SELECT a.id FROM a WHERE a.id = %(id_1)s",
        "SELECT a.id FROM a WHERE a.id = $1",
        "SELECT a.id FROM a WHERE a.id = $1::INTEGER",
        "SELECT a.id FROM a WHERE a.id = :id_1",
        "select a.id from a where a.id = 42",
        "SELECT a.id\n  FROM a\n WHERE a.id = -7 /* controller='authors',route='/a' */",
        "SELECT a.id FROM a WHERE a.id = 'forty-two'",
        "SELECT a.id FROM a WHERE a.id = 4.2e1;",
    ],
)
def test_placeholder_styles_literals_comments_and_whitespace_share_one_shape(sql: str) -> None:
    """Every placeholder style, literal, cast, comment and spacing gives the same fingerprint."""
    assert fingerprint(sql) == "select a.id from a where a.id = ?"


@pytest.mark.parametrize("n", [1, 2, 500])
def test_in_lists_of_any_length_share_one_shape(n: int) -> None:
    """IN lists of 1, 2 and 500 items (placeholders or literals) collapse to one shape."""
    placeholders = ", ".join("?" for _ in range(n))
    literals = ", ".join(str(i) for i in range(n))
    expected = "select b.id from b where b.author_id in (?)"
    assert fingerprint(f"SELECT b.id FROM b WHERE b.author_id IN ({placeholders})") == expected
    assert fingerprint(f"SELECT b.id FROM b WHERE b.author_id IN ({literals})") == expected


def test_postcompile_expanding_form_matches_expanded_list() -> None:
    """SQLAlchemy's `__[POSTCOMPILE_x]` form has the shape of the expanded list."""
    assert fingerprint("SELECT b.id FROM b WHERE b.id IN (__[POSTCOMPILE_id_1])") == fingerprint(
        "SELECT b.id FROM b WHERE b.id IN (%(id_1_1)s, %(id_1_2)s, %(id_1_3)s)"
    )


def test_different_tables_have_different_shapes() -> None:
    """Statements on different tables never share a fingerprint."""
    assert fingerprint("SELECT * FROM authors WHERE id = 1") != fingerprint(
        "SELECT * FROM books WHERE id = 1"
    )


def test_different_columns_have_different_shapes() -> None:
    """A different filter column is a different shape."""
    assert fingerprint("SELECT * FROM t WHERE a = 1") != fingerprint("SELECT * FROM t WHERE b = 1")


def test_quoted_identifiers_keep_their_case() -> None:
    """Double-quoted identifiers are case-sensitive in SQL and stay as written."""
    assert fingerprint('SELECT "User".id FROM "User"') == 'select "User".id from "User"'


def test_multi_row_values_collapse_to_one_row() -> None:
    """Batched INSERT ... VALUES rows share the shape of a one-row insert."""
    assert fingerprint("INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?)") == fingerprint(
        "INSERT INTO t (a, b) VALUES (1, 'x')"
    )


def test_identifiers_containing_digits_are_not_literals() -> None:
    """`table1` and `col_2` are names, not numbers."""
    assert fingerprint("SELECT col_2 FROM table1") == "select col_2 from table1"


def test_postgres_cast_on_a_column_is_kept() -> None:
    """A cast of a column is part of the shape; only casts of placeholders are dropped."""
    assert fingerprint("SELECT created::date FROM t") == "select created::date from t"


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("  (SELECT 1) UNION (SELECT 2)", "SELECT"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("update t set a = 1", "UPDATE"),
        ("DELETE FROM t", "DELETE"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT"),
        ("WITH x AS (SELECT 1) DELETE FROM t WHERE id IN (SELECT * FROM x)", "DELETE"),
        ("BEGIN", "OTHER"),
        ("SAVEPOINT sa_1", "OTHER"),
        ("", "OTHER"),
    ],
)
def test_operation_is_classified(sql: str, operation: str) -> None:
    """The operation is SELECT, INSERT, UPDATE, DELETE or OTHER."""
    assert operation_of(fingerprint(sql)) == operation


def test_bytes_are_decoded_not_rejected() -> None:
    """bytes-like input is fingerprinted, with undecodable bytes replaced."""
    shape = fingerprint(b"SELECT \xff\xfe FROM t WHERE id = 3")
    assert shape == "select \ufffd\ufffd from t where id = ?"


def test_unterminated_string_and_comment_do_not_raise() -> None:
    """Unbalanced quotes and comments run to the end of the input instead of failing."""
    assert fingerprint("SELECT 'abc") == "select ?"
    assert fingerprint("SELECT 1 /* never closed") == "select ?"


def test_huge_statement_is_truncated_with_a_marker() -> None:
    """Input beyond MAX_INPUT is cut, and the shape says so."""
    shape = fingerprint("SELECT * FROM t WHERE id IN (" + "1, " * MAX_INPUT + "1)")
    assert shape == "select * from t where id in (?)" + TRUNCATED_MARKER


def test_cache_is_bounded() -> None:
    """Thousands of distinct statements never grow the cache past its bound."""
    for i in range(10_000):
        fingerprint(f"SELECT {i} FROM t{i}")
    assert len(cache_for(None)) <= 2048


def _seconds(sql: str) -> float:
    started = time.perf_counter()
    fingerprint(sql + " ")  # a new string: no cache hit
    return time.perf_counter() - started


@pytest.mark.parametrize(
    "unit",
    ["'", "/*", "--\n", "a:b ", "$1::int ", "IN (?, ", '"x', "`", "\\'", "0x1 ", "(((", "e'"],
)
def test_cost_grows_linearly_with_input(unit: str) -> None:
    """Doubling a pathological input twice costs about four times as much, not sixteen."""
    small = min(_seconds(unit * 5_000) for _ in range(3))
    large = min(_seconds(unit * 20_000) for _ in range(3))
    assert large < small * 12 + 0.005


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_gives_a_string(sql: str) -> None:
    """Arbitrary text never makes fingerprint() raise."""
    assert isinstance(fingerprint(sql), str)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_any_bytes_give_a_string(sql: bytes) -> None:
    """Arbitrary bytes never make fingerprint() raise."""
    assert isinstance(fingerprint(sql), str)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(), min_size=1, max_size=50), st.lists(st.integers(), min_size=1))
def test_integer_in_lists_always_collapse(first: list[int], second: list[int]) -> None:
    """Any two integer IN lists give the same shape."""

    def sql(values: list[int]) -> str:
        return f"SELECT * FROM t WHERE id IN ({', '.join(map(str, values))})"

    assert fingerprint(sql(first)) == fingerprint(sql(second))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="'\\"), max_size=40))
def test_string_literals_never_leak_into_the_shape(secret: str) -> None:
    """Whatever a string literal contains, the shape holds only a placeholder for it."""
    assert fingerprint(f"SELECT * FROM users WHERE email = '{secret}'") == (
        "select * from users where email = ?"
    )


def test_postgres_json_path_operators_are_not_comments() -> None:
    """`#>`, `#>>` and `#-` are PostgreSQL JSON operators: the rest of the line stays in the
    shape (its literals stripped), while `# text` is still a MySQL comment."""
    assert fingerprint("SELECT data #>> '{a,b}' FROM t WHERE id = 5") == (
        "select data #>> ? from t where id = ?"
    )
    assert fingerprint("SELECT data #- '{a}' FROM t") == "select data #- ? from t"
    assert fingerprint("SELECT 1 # a comment\nFROM t") == "select ? from t"
