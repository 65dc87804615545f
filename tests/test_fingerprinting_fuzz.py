"""fingerprint() under generated input: total on any object, bounded output, no literal leaks.

`tests/test_fingerprinting.py` holds the examples and the plain text/bytes properties; these
properties build SQL-ish input from a grammar (quotes, comments, dollar quotes, escapes,
placeholders, IN lists), where a tokenizer's edge cases live. The fingerprint cache is off in
every test, so each example does the real work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from querywatch import fingerprint
from querywatch.fingerprinting import MAX_INPUT, TRUNCATED_MARKER, configure_cache
from querywatch.settings import DEFAULT_SETTINGS

FAST = settings(max_examples=40, deadline=None)

# Pieces a tokenizer has to get right: quotes of every kind, open and closed comments, dollar
# quotes and their tags, escapes, placeholder styles, casts, numbers, and characters whose
# lower case is longer than themselves.
TOKENS = (
    "SELECT", "select", "FROM t", "WHERE", "a.id", "=", "IN", "VALUES", "(", ")", ",", ";",
    " ", "\n", "\t", "'", "''", '"', '""', "`", "--", "/*", "*/", "#", "$$", "$a$", "$1",
    "?", ":name", "%s", "%(p)s", "::int", "e'", "E'", "N'", "X'", "\\", "\\'", "1", "-2",
    "3.5e3", "0x1f", ".5", "\x00", "\ud800", "\u0130", "\U0001f600", "\ufeff",
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
@given(soups)
def test_sql_token_soups_give_a_string(sql: str) -> None:
    """Any mix of quotes, comments, dollar quotes, escapes and placeholders gives a string."""
    assert isinstance(fingerprint(sql), str)


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


@pytest.mark.parametrize("unit", ["\u0130", "x in(?)", "a ", "'", "/*", "$$", "(", "e'\\"])
@settings(max_examples=4, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_INPUT + 5_000))
@example(MAX_INPUT)
@example(MAX_INPUT + 5_000)
def test_shape_length_is_bounded(unit: str, length: int) -> None:
    """A shape is at most twice its input, and never longer than MAX_INPUT plus the marker."""
    sql = (unit * (length // len(unit) + 1))[:length]
    shape = fingerprint(sql)
    assert len(shape) <= 2 * len(sql)
    assert len(shape) <= MAX_INPUT + len(TRUNCATED_MARKER)


@settings(max_examples=5, deadline=None)
@given(soups, st.integers(min_value=MAX_INPUT - 50, max_value=MAX_INPUT + 50))
@example("", MAX_INPUT)
@example("", MAX_INPUT + 1)
def test_truncation_marker_appears_exactly_when_input_is_cut(prefix: str, length: int) -> None:
    """Input longer than MAX_INPUT ends with the marker; input that fits never does."""
    sql = (prefix + " x" * MAX_INPUT)[:length]
    assert fingerprint(sql).endswith(TRUNCATED_MARKER) == (len(sql) > MAX_INPUT)


@FAST
@given(secrets, contents, contents, st.sampled_from(["", "N", "X", "B"]))
def test_standard_string_literals_never_leak(
    secret: str, before: str, after: str, prefix: str
) -> None:
    """A standard string literal (quotes doubled, backslashes plain) never reaches the shape."""
    literal = prefix + standard_string(before + secret + after)
    assert secret not in fingerprint(f"SELECT * FROM users WHERE email = {literal} AND id = ?")


@FAST
@given(secrets, contents, contents)
def test_escape_string_literals_never_leak(secret: str, before: str, after: str) -> None:
    """A PostgreSQL E'...' literal with backslash escapes never reaches the shape."""
    literal = escape_string(before + secret + after)
    assert secret not in fingerprint(f"SELECT * FROM users WHERE email = {literal} AND id = ?")


@FAST
@given(secrets, contents, contents, st.sampled_from(["", "q", "body"]))
def test_dollar_quoted_literals_never_leak(secret: str, before: str, after: str, tag: str) -> None:
    """A PostgreSQL dollar-quoted literal never reaches the shape."""
    content = before + secret + after
    assume(f"${tag}$" not in content)
    sql = f"SELECT ${tag}${content}${tag}$ AS note FROM t"
    assert secret not in fingerprint(sql)


literals = st.sampled_from([standard_string, escape_string, lambda c: f"$q${c}$q$"])


@FAST
@given(secrets, contents, contents, literals, st.data())
def test_literals_cut_short_never_leak(
    secret: str, before: str, after: str, literal: Callable[[str], str], data: st.DataObject
) -> None:
    """A literal cut anywhere after the secret (as truncation cuts it) never leaks either."""
    quoted = literal(before + secret + after)
    assume("$q$" not in before + secret + after)
    cut = data.draw(
        st.integers(min_value=quoted.index(secret) + len(secret), max_value=len(quoted))
    )
    assert secret not in fingerprint(f"SELECT * FROM t WHERE a = {quoted[:cut]}")


numbers = st.integers(min_value=10**6, max_value=10**12)
number_syntaxes = st.sampled_from(["{}", "-{}", "{}.25", "{}e3", ".{}", "{}E-2", "0x{:x}"])
contexts = st.sampled_from(["a = {}", "a IN (1, {})", "a > {} LIMIT 5", "f({},{})", "a={}"])


@FAST
@given(numbers, number_syntaxes, contexts)
def test_numeric_literals_never_leak(number: int, syntax: str, context: str) -> None:
    """A number literal, in any syntax and position, never reaches the shape."""
    literal = syntax.format(number)
    shape = fingerprint("SELECT * FROM t WHERE " + context.format(literal, literal))
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
@given(st.lists(words, min_size=1, max_size=30), st.data())
def test_spacing_and_comments_between_tokens_do_not_change_the_shape(
    tokens: list[str], data: st.DataObject
) -> None:
    """Any whitespace or comments between two tokens give the shape of a single space."""
    spaced = tokens[0] + "".join(data.draw(separators) + token for token in tokens[1:])
    assert fingerprint(spaced) == fingerprint(" ".join(tokens))


@FAST
@given(st.lists(words | separators | numbers.map(str) | secrets.map(standard_string)))
def test_a_shape_is_its_own_fingerprint(pieces: list[str]) -> None:
    """Fingerprinting a shape again changes nothing."""
    shape = fingerprint(" ".join(pieces))
    assert fingerprint(shape) == shape


@FAST
@given(soups)
def test_bytes_and_text_of_one_statement_share_a_shape(sql: str) -> None:
    """The UTF-8 bytes of a statement have the shape of its text."""
    assume("\ud800" not in sql)
    assert fingerprint(sql.encode()) == fingerprint(sql)
