"""fingerprint() under generated input: total on any object, bounded output, no literal leaks.

`tests/test_fingerprinting.py` holds the examples and the plain text/bytes properties; these
properties build SQL-ish input from a grammar (quotes, comments, dollar quotes, escapes,
placeholders, IN lists), where a tokenizer's edge cases live, for every dialect's tokenizer;
literals are built the way each dialect (or its driver) quotes them. The fingerprint cache is
off in every test, so each example does the real work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from pymysql.converters import escape_string as mysql_escape  # type: ignore[import-untyped]

from querywatch import fingerprint
from querywatch.fingerprinting import MAX_INPUT, TRUNCATED_MARKER, configure_cache, shape_of
from querywatch.settings import DEFAULT_SETTINGS

FAST = settings(max_examples=40, deadline=None)

#: None (the conservative tokenizer), every family, and the quoting modes of two of them.
DIALECTS = [
    None,
    "sqlite",
    "postgresql",
    "postgresql/backslash_escapes",
    "mysql",
    "mysql/ansi_quotes",
    "mysql/no_backslash_escapes",
    "mssql",
    "oracle",
]
dialects = st.sampled_from(DIALECTS)
#: Dialects whose '...' strings are standard: quotes doubled, backslashes plain.
STANDARD_DIALECTS = [None, "sqlite", "postgresql", "mysql/no_backslash_escapes", "mssql", "oracle"]

# Pieces a tokenizer has to get right: quotes of every kind, open and closed comments, dollar
# quotes and their tags, escapes, placeholder styles, casts, numbers, and characters whose
# lower case is longer than themselves.
TOKENS = (
    "SELECT", "select", "FROM t", "WHERE", "a.id", "=", "IN", "VALUES", "(", ")", ",", ";",
    " ", "\n", "\t", "'", "''", '"', '""', "`", "--", "/*", "*/", "#", "$$", "$a$", "$1",
    "?", ":name", "%s", "%(p)s", "::int", "e'", "E'", "N'", "X'", "\\", "\\'", "1", "-2",
    "3.5e3", "0x1f", ".5", "\x00", "\ud800", "\u0130", "\U0001f600", "\ufeff", "q'[", "]'",
    "q'!", "[", "]", "]]", "U&'", "-- ", "#>", "/**/", "\\",
)  # fmt: skip
soups = st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=60).map("".join)

# Words that appear nowhere in the statements built around them, and what surrounds them
# inside a literal: any text, or the quotes, escapes and dollars that end literals early.
secrets = st.text(alphabet="qjkvwxz", min_size=8, max_size=16)
contents = st.text(max_size=20) | st.text(alphabet="'\\$q a\n", max_size=12)
separators = st.sampled_from([" ", "  ", "\t", "\n", " /* note */ ", "/*x*/", " -- note\n"])


@pytest.fixture(autouse=True)
def _no_fingerprint_cache() -> Iterator[None]:
    # Cached results would hide the tokenizer from every repeated example.
    configure_cache(0)
    yield
    configure_cache(DEFAULT_SETTINGS.fingerprint_cache_size)


def standard_string(content: str) -> str:
    return "'" + content.replace("'", "''") + "'"


def escape_string(content: str) -> str:
    return "E'" + content.replace("\\", "\\\\").replace("'", "\\'") + "'"


@FAST
@given(soups, dialects)
def test_sql_token_soups_give_a_string(sql: str, dialect: str | None) -> None:
    """Any mix of quotes, comments, dollar quotes, escapes and placeholders gives a string, in
    every dialect."""
    assert isinstance(fingerprint(sql, dialect=dialect), str)


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@FAST
@given(
    st.none()
    | st.integers()
    | st.floats()
    | st.binary().map(bytearray)
    | st.binary().map(lambda data: memoryview(data))
    | soups.map(sa.text)
    | st.lists(st.integers())
    | st.just(_Unprintable())
)
def test_any_object_gives_a_string(sql: object) -> None:
    """None, numbers, byte buffers, TextClause objects and unprintable objects give a string."""
    assert isinstance(fingerprint(sql), str)


@pytest.mark.parametrize(
    "unit", ["\u0130", "x in(?)", "a ", "'", "/*", "$$", "(", "e'\\", '"\\', "[", "q'["]
)
@settings(max_examples=4, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_INPUT + 5_000), dialects)
@example(MAX_INPUT, None)
@example(MAX_INPUT + 5_000, "mysql")
def test_shape_length_is_bounded(unit: str, length: int, dialect: str | None) -> None:
    """A shape is at most twice its input, and never longer than MAX_INPUT plus the marker."""
    sql = (unit * (length // len(unit) + 1))[:length]
    shape = fingerprint(sql, dialect=dialect)
    assert len(shape) <= 2 * len(sql)
    assert len(shape) <= MAX_INPUT + len(TRUNCATED_MARKER)


@settings(max_examples=5, deadline=None)
@given(soups, st.integers(min_value=MAX_INPUT - 50, max_value=MAX_INPUT + 50), dialects)
@example("", MAX_INPUT, None)
@example("", MAX_INPUT + 1, "postgresql")
def test_truncation_marker_appears_exactly_when_input_is_cut(
    prefix: str, length: int, dialect: str | None
) -> None:
    """Input longer than MAX_INPUT ends with the marker; input that fits never does."""
    sql = (prefix + " x" * MAX_INPUT)[:length]
    assert fingerprint(sql, dialect=dialect).endswith(TRUNCATED_MARKER) == (len(sql) > MAX_INPUT)


@FAST
@given(secrets, contents, contents, st.sampled_from(["", "N", "X", "B"]))
def test_standard_string_literals_never_leak(
    secret: str, before: str, after: str, prefix: str
) -> None:
    """A standard string literal (quotes doubled, backslashes plain) never reaches the shape."""
    literal = prefix + standard_string(before + secret + after)
    assert secret not in fingerprint(f"SELECT * FROM users WHERE email = {literal} AND id = ?")


@FAST
@given(secrets, contents, contents, st.sampled_from(STANDARD_DIALECTS))
def test_standard_string_literals_never_leak_where_strings_are_standard(
    secret: str, before: str, after: str, dialect: str | None
) -> None:
    """In every dialect whose strings are standard, such a literal never reaches the shape."""
    literal = standard_string(before + secret + after)
    sql = f"SELECT * FROM users WHERE email = {literal} AND id = ?"
    assert secret not in fingerprint(sql, dialect=dialect)


def mysql_string(content: str, quote: str) -> str:
    """A MySQL string literal as the drivers (pymysql, mysqlclient) escape one."""
    return quote + str(mysql_escape(content)) + quote


@FAST
@given(
    secrets,
    contents,
    contents,
    st.sampled_from([("mysql", "'"), ("mysql", '"'), ("mariadb", '"'), ("mysql/ansi_quotes", "'")]),
)
def test_mysql_escaped_string_literals_never_leak(
    secret: str, before: str, after: str, dialect_and_quote: tuple[str, str]
) -> None:
    """A MySQL string escaped with backslashes, in '...' or (by default) "...", never reaches
    the shape."""
    dialect, quote = dialect_and_quote
    literal = mysql_string(before + secret + after, quote)
    sql = f"SELECT * FROM users WHERE email = {literal} AND id = %s"
    assert secret not in fingerprint(sql, dialect=dialect)


@FAST
@given(secrets, contents, contents)
def test_mysql_double_quoted_standard_literals_never_leak(
    secret: str, before: str, after: str
) -> None:
    """Under NO_BACKSLASH_ESCAPES, a "..." string with doubled quotes never reaches the shape."""
    content = before + secret + after
    literal = '"' + content.replace('"', '""') + '"'
    sql = f"SELECT * FROM users WHERE email = {literal} AND id = %s"
    assert secret not in fingerprint(sql, dialect="mysql/no_backslash_escapes")


comment_texts = st.text(alphabet="'\"`$[]q a/*\n", max_size=12)


@FAST
@given(secrets, comment_texts, st.sampled_from(["mysql", "mysql/ansi_quotes"]))
def test_mysql_comments_never_open_a_string(secret: str, note: str, dialect: str) -> None:
    """Quotes inside `#` and `-- ` comments never make the next string's content leak."""
    note = note.replace("\n", " ")
    literal = mysql_string(secret, "'")
    sql = f"SELECT a # {note}\nFROM t -- {note}\nWHERE b = {literal}"
    assert secret not in fingerprint(sql, dialect=dialect)


@FAST
@given(secrets, comment_texts, comment_texts, st.sampled_from(["postgresql", "mssql"]))
def test_nested_comments_never_open_a_string(
    secret: str, outer: str, inner: str, dialect: str
) -> None:
    """Quotes inside a nested block comment never make the next string's content leak."""
    outer, inner = (
        outer.replace("*/", "").replace("/*", ""),
        inner.replace("*/", "").replace("/*", ""),
    )
    sql = f"SELECT 1 /* {outer} /* {inner} */ {outer} */ FROM t WHERE b = {standard_string(secret)}"
    assert secret not in fingerprint(sql, dialect=dialect)


@FAST
@given(secrets, comment_texts, st.sampled_from(["sqlite", "mssql"]))
def test_bracketed_names_never_open_a_string(secret: str, name: str, dialect: str) -> None:
    """Quotes inside a [bracketed] name never make the next string's content leak."""
    name = name.replace("]", "")
    sql = f"SELECT [{name}] FROM t WHERE b = {standard_string(secret)} AND c = ?"
    assert secret not in fingerprint(sql, dialect=dialect)


@FAST
@given(
    secrets,
    st.text(alphabet="'\"q a[]{}<>()!\n", max_size=12),
    st.sampled_from(["[]", "{}", "<>", "()", "!!", "##", "~~"]),
    st.sampled_from(["q", "Q", "nq", "NQ"]),
)
def test_oracle_alternative_quotes_never_leak(
    secret: str, content: str, delimiters: str, prefix: str
) -> None:
    """An Oracle q'[...]' literal, any delimiter, never reaches the shape."""
    opening, closing = delimiters[0], delimiters[1]
    assume(closing + "'" not in content)
    sql = f"SELECT {prefix}'{opening}{content}{secret}{content}{closing}' FROM dual WHERE a = :a"
    assert secret not in fingerprint(sql, dialect="oracle")


@FAST
@given(secrets, contents, contents, st.sampled_from([None, "postgresql"]))
def test_escape_string_literals_never_leak(
    secret: str, before: str, after: str, dialect: str | None
) -> None:
    """A PostgreSQL E'...' literal with backslash escapes never reaches the shape."""
    literal = escape_string(before + secret + after)
    sql = f"SELECT * FROM users WHERE email = {literal} AND id = ?"
    assert secret not in fingerprint(sql, dialect=dialect)


@FAST
@given(secrets, contents, contents)
def test_strings_never_leak_with_standard_conforming_strings_off(
    secret: str, before: str, after: str
) -> None:
    """With standard_conforming_strings off, a '...' string with backslash escapes never
    reaches the shape."""
    literal = escape_string(before + secret + after)[1:]
    sql = f"SELECT * FROM users WHERE email = {literal} AND id = $1"
    assert secret not in fingerprint(sql, dialect="postgresql/backslash_escapes")


@FAST
@given(
    secrets,
    contents,
    contents,
    st.sampled_from(["", "q", "body"]),
    st.sampled_from([None, "postgresql"]),
)
def test_dollar_quoted_literals_never_leak(
    secret: str, before: str, after: str, tag: str, dialect: str | None
) -> None:
    """A PostgreSQL dollar-quoted literal never reaches the shape."""
    content = before + secret + after
    assume(f"${tag}$" not in content)
    sql = f"SELECT ${tag}${content}${tag}$ AS note FROM t"
    assert secret not in fingerprint(sql, dialect=dialect)


#: How each dialect quotes a literal, with the dialects that read it so.
literals = st.sampled_from(
    [
        (standard_string, None),
        (escape_string, None),
        (lambda c: f"$q${c}$q$", None),
        (standard_string, "sqlite"),
        (escape_string, "postgresql"),
        (lambda c: f"$q${c}$q$", "postgresql"),
        (lambda c: mysql_string(c, "'"), "mysql"),
        (lambda c: mysql_string(c, '"'), "mysql"),
        (lambda c: "N" + standard_string(c), "mssql"),
        (lambda c: f"q'[{c}]'", "oracle"),
    ]
)


@FAST
@given(secrets, contents, contents, literals, st.data())
def test_literals_cut_short_never_leak(
    secret: str,
    before: str,
    after: str,
    literal: tuple[Callable[[str], str], str | None],
    data: st.DataObject,
) -> None:
    """A literal cut anywhere after the secret (as truncation cuts it) never leaks either."""
    quote, dialect = literal
    quoted = quote(before + secret + after)
    assume("$q$" not in before + secret + after and "]'" not in before + secret + after)
    cut = data.draw(
        st.integers(min_value=quoted.index(secret) + len(secret), max_value=len(quoted))
    )
    assert secret not in fingerprint(f"SELECT * FROM t WHERE a = {quoted[:cut]}", dialect=dialect)


numbers = st.integers(min_value=10**6, max_value=10**12)
number_syntaxes = st.sampled_from(["{}", "-{}", "{}.25", "{}e3", ".{}", "{}E-2", "0x{:x}"])
contexts = st.sampled_from(["a = {}", "a IN (1, {})", "a > {} LIMIT 5", "f({},{})", "a={}"])


@FAST
@given(numbers, number_syntaxes, contexts, dialects)
def test_numeric_literals_never_leak(
    number: int, syntax: str, context: str, dialect: str | None
) -> None:
    """A number literal, in any syntax and position, never reaches the shape."""
    literal = syntax.format(number)
    shape = fingerprint(
        "SELECT * FROM t WHERE " + context.format(literal, literal), dialect=dialect
    )
    assert str(number) not in shape
    assert f"{number:x}" not in shape


in_items = st.sampled_from(["?", "%s", "$7", ":p_1", "%(id_1_1)s", "42", "-1.5", "'x'", "E'\\n'"])


@FAST
@given(st.lists(in_items, min_size=1, max_size=300), st.sampled_from([",", ", ", " ,\n  "]))
def test_in_lists_of_any_items_collapse(items: list[str], comma: str) -> None:
    """An IN list of placeholders and literals in any mix and spacing has the one-item shape."""
    sql = f"SELECT * FROM t WHERE t.id IN ({comma.join(items)}) AND t.x = 1"
    assert fingerprint(sql) == "select * from t where t.id in (?) and t.x = ?"


words = st.sampled_from(
    ["select", "t.id", "from", "t", "where", "=", "?", "and", "(", ")", ",", "in", "order", "by"]
)


@FAST
@given(st.lists(words, min_size=1, max_size=30), st.data(), dialects)
def test_spacing_and_comments_between_tokens_do_not_change_the_shape(
    tokens: list[str], data: st.DataObject, dialect: str | None
) -> None:
    """Any whitespace or comments between two tokens give the shape of a single space."""
    spaced = tokens[0] + "".join(data.draw(separators) + token for token in tokens[1:])
    assert fingerprint(spaced, dialect=dialect) == fingerprint(" ".join(tokens), dialect=dialect)


@FAST
@given(st.lists(words | separators | numbers.map(str) | secrets.map(standard_string)), dialects)
def test_a_shape_is_its_own_fingerprint(pieces: list[str], dialect: str | None) -> None:
    """Fingerprinting a shape again, in the same dialect, changes nothing."""
    shape = fingerprint(" ".join(pieces), dialect=dialect)
    assert fingerprint(shape, dialect=dialect) == shape


@FAST
@given(st.lists(words | numbers.map(str) | secrets.map(standard_string), min_size=1), dialects)
def test_a_statement_has_a_literal_hash_exactly_when_it_holds_a_literal(
    pieces: list[str], dialect: str | None
) -> None:
    """The literal hash is 0 when every value is a placeholder, and not 0 otherwise."""
    has_literal = any(piece[0] in "'0123456789" for piece in pieces)
    assert (shape_of(" ".join(pieces), dialect=dialect).literals != 0) == has_literal


@FAST
@given(soups, dialects)
def test_bytes_and_text_of_one_statement_share_a_shape(sql: str, dialect: str | None) -> None:
    """The UTF-8 bytes of a statement have the shape of its text."""
    assume("\ud800" not in sql)
    assert fingerprint(sql.encode(), dialect=dialect) == fingerprint(sql, dialect=dialect)
