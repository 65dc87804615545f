"""Statement shapes: `fingerprint(sql)` turns a SQL string into the shape shared by every
execution of "the same query", whatever its literal values, placeholder style or IN-list length.

Literals, comments and quoted identifiers are spelled differently by each SQL dialect, so the
tokenizer is chosen by the dialect's name (`dialect="mysql"`, SQLAlchemy's `engine.dialect.name`):
MySQL and MariaDB escape quotes with backslashes and quote strings with `"` too; PostgreSQL has
`E'...'` and dollar-quoted strings, nested comments and a `#` operator; Oracle has `q'[...]'`;
SQLite and SQL Server quote identifiers in brackets. Without a dialect (or with one not listed),
the conservative tokenizer reads a little of each.

One left-to-right pass of a regular expression whose every branch is linear (loops only over
characters that cannot end them, never two ways to match the same text; unterminated strings
and comments run to the end of the input), followed by two collapsing passes of the same kind.
The result is lower-cased outside quoted identifiers, like Percona's pt-fingerprint. Results are
cached per statement string in a bounded dict per dialect family, so the statement strings
SQLAlchemy reuses from its compiled cache cost a lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import islice
from typing import NamedTuple

__all__ = [
    "StatementShape",
    "cache_for",
    "dialect_key",
    "fingerprint",
    "fingerprint_and_operation",
    "operation_of",
    "shape_of",
]

#: Statements longer than this are fingerprinted on their first `MAX_INPUT` characters.
MAX_INPUT = 100_000
#: Statements longer than this are not cached (the cache must stay small).
MAX_CACHED_LENGTH = 10_000
TRUNCATED_MARKER = " /* querywatch: truncated */"
UNPARSEABLE = "<unparseable statement>"


class StatementShape(NamedTuple):
    """What fingerprinting learns about one statement string."""

    #: The fingerprint.
    shape: str
    #: SELECT, INSERT, UPDATE, DELETE or OTHER.
    operation: str
    #: 0 when the statement holds no literal (its values, if any, are bound parameters);
    #: otherwise a hash of the literals' text, equal for equal literals: two statements of one
    #: shape with different literals (an id pasted into `text()`) are different statements.
    literals: int


# -- the tokens of each dialect family ---------------------------------------------------------
# Every alternation below is tried at one position at a time; a branch that cannot start there
# fails on its first character. `first` is a lookahead of the characters any branch starts
# with, so that ordinary characters (most of a statement) fail once instead of once per branch.

_LINE_COMMENT = r"--[^\n]*"
_BLOCK_COMMENT = r"/\*[\s\S]*?(?:\*/|\Z)"
# PostgreSQL and SQL Server nest block comments. A body holds neither `/*` nor `*/`; two levels
# are followed exactly, and a third opening runs the comment to the end of the input (a shape
# lost, never a literal leaked).
_BODY = r"[^*/]*(?:(?:\*(?!/)|/(?!\*))[^*/]*)*"
_NESTED_COMMENT = rf"/\*{_BODY}(?:/\*{_BODY}(?:\*/|/\*[\s\S]*|\Z){_BODY})*(?:\*/|\Z)"
# MySQL and MariaDB: `-- ` needs a space or control character after it (`1--1` is 1 - -1), and
# `#` starts a comment. The conservative tokenizer leaves PostgreSQL's `#>`, `#>>`, `#-` alone.
_MYSQL_LINE_COMMENT = r"--(?=[\x00-\x20\x7f]|\Z)[^\n]*|\#[^\n]*"
_HASH_COMMENT = r"\#(?![>-])[^\n]*"

# Strings: quotes doubled, backslashes plain; or backslash escapes too (MySQL's default, E'').
_STANDARD = r"'[^']*(?:''[^']*)*(?:'|\Z)"
_BACKSLASHED = r"'[^'\\]*(?:(?:\\[\s\S]?|'')[^'\\]*)*(?:'|\Z)"
_DOUBLE_STANDARD = r'"[^"]*(?:""[^"]*)*(?:"|\Z)'
_DOUBLE_BACKSLASHED = r'"[^"\\]*(?:(?:\\[\s\S]?|"")[^"\\]*)*(?:"|\Z)'
_E_STRING = rf"(?<![\w$])[eE]{_BACKSLASHED}"
_DOLLAR = r"(?<![\w$])\$(?P<tag>(?:[^\W\d]\w*)?)\$[\s\S]*?(?:\$(?P=tag)\$|\Z)"
# Oracle's alternative quoting: q'[...]', q'{...}', q'<...>', q'(...)' or q'!...!' (any
# character but whitespace), with an optional N.
_Q_QUOTE = (
    r"(?<![\w$\#])[nN]?[qQ]'(?:\[[\s\S]*?(?:\]'|\Z)|\{[\s\S]*?(?:\}'|\Z)|<[\s\S]*?(?:>'|\Z)"
    r"|\([\s\S]*?(?:\)'|\Z)|(?P<delimiter>\S)[\s\S]*?(?:(?P=delimiter)'|\Z))"
)

_BACKTICKS = r"`[^`]*(?:``[^`]*)*(?:`|\Z)"
_SQLITE_BRACKETS = r"\[[^\]]*(?:\]|\Z)"
_MSSQL_BRACKETS = r"\[[^\]]*(?:\]\][^\]]*)*(?:\]|\Z)"

_PARAM = r"""(?P<param>
      (?:__)?\[POSTCOMPILE_\w+(?:~~[^\]]*)?\]
    | \$\d+
    | %\(\w+\)s
    | %s
    | \?
    | (?<![:\w]):[A-Za-z_]\w*
  )(?:::[A-Za-z_]\w*(?:\s+(?:with|without)\s+time\s+zone)?(?:\([\d,\s]*\))?(?:\[\])*)?"""
_NUMBER = r"""(?P<number>(?<![\w.])[-+]?(?:0[xX][0-9a-fA-F_]+|0[oObB][0-7_]+
      |\d[\d_]*(?:\.[\d_]*)?(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?)(?![\w.]))"""
#: First characters of the parameter, number and space branches, shared by every family.
_COMMON_FIRST = r"_\[$%?:\d.+\-\s"


class _Lexer:
    """How one family of dialects spells comments, literals and quoted identifiers, and the
    cache of the shapes it made."""

    __slots__ = ("cache", "name", "quote_chars", "quoted", "token")

    def __init__(
        self,
        name: str,
        *,
        first: str,
        comment: str,
        literal: str,
        quoted: str,
        quote_chars: str,
        param_first: bool = True,
    ) -> None:
        self.name = name
        # The parameter branch goes before quoted identifiers, so that SQLAlchemy's
        # `[POSTCOMPILE_x]` is not read as a bracketed identifier (the conservative order,
        # which has no brackets, is kept as it always was).
        params_and_quoted = (
            [_PARAM, rf"(?P<quoted>{quoted})"]
            if param_first
            else [rf"(?P<quoted>{quoted})", _PARAM]
        )
        branches = [
            rf"(?P<comment>{comment})",
            rf"(?P<literal>{literal})",
            *params_and_quoted,
            _NUMBER,
            r"(?P<space>\s+)",
        ]
        self.token = re.compile(rf"(?={first})(?:{'|'.join(branches)})", re.VERBOSE)
        self.quoted = re.compile(f"({quoted})")
        self.quote_chars = quote_chars
        self.cache: dict[str, StatementShape] = {}


def _conservative() -> _Lexer:
    # Reads a little of each dialect: `#` comments (but not `#>`), E'' and dollar quotes,
    # "..." and `...` identifiers. Quotes doubled; backslashes escape only in E''.
    return _Lexer(
        "",
        first=rf"[{_COMMON_FIRST}/\#'\"`]|[eEnNbBxX]'",
        comment=f"{_LINE_COMMENT}|{_BLOCK_COMMENT}|{_HASH_COMMENT}",
        literal=rf"{_E_STRING}|(?:[eEnNbBxX](?='))?{_STANDARD}|{_DOLLAR}",
        quoted=f"{_DOUBLE_STANDARD}|{_BACKTICKS}",
        quote_chars='"`',
        param_first=False,
    )


def _mysql(flags: frozenset[str]) -> _Lexer:
    # With the server's default sql_mode, "..." is a string and a backslash escapes the next
    # character in both kinds of string; ANSI_QUOTES makes "..." an identifier, and
    # NO_BACKSLASH_ESCAPES makes backslashes plain.
    single = _STANDARD if "no_backslash_escapes" in flags else _BACKSLASHED
    double = _DOUBLE_STANDARD if "no_backslash_escapes" in flags else _DOUBLE_BACKSLASHED
    ansi = "ansi_quotes" in flags
    return _Lexer(
        "/".join(["mysql", *sorted(flags)]),
        first=rf"[{_COMMON_FIRST}/\#'\"`]|[nNbBxX]'",
        comment=f"{_MYSQL_LINE_COMMENT}|{_BLOCK_COMMENT}",
        literal=f"[nNbBxX]?{single}" if ansi else f"[nNbBxX]?{single}|{double}",
        quoted=f"{_DOUBLE_STANDARD}|{_BACKTICKS}" if ansi else _BACKTICKS,
        quote_chars='"`' if ansi else "`",
    )


def _postgresql(flags: frozenset[str]) -> _Lexer:
    # `#` is an operator (XOR, #>, #>>, #-), never a comment. standard_conforming_strings=off
    # (reported by SQLAlchemy as backslash escapes) makes every '...' string read like E''.
    single = _BACKSLASHED if "backslash_escapes" in flags else _STANDARD
    return _Lexer(
        "/".join(["postgresql", *sorted(flags)]),
        first=rf"[{_COMMON_FIRST}/'\"]|[eEnNbBxX]'|[uU]&'",
        comment=f"{_LINE_COMMENT}|{_NESTED_COMMENT}",
        literal=rf"{_E_STRING}|(?:[nNbBxX]|[uU]&)?{single}|{_DOLLAR}",
        quoted=_DOUBLE_STANDARD,
        quote_chars='"',
    )


def _sqlite(flags: frozenset[str]) -> _Lexer:
    return _Lexer(
        "sqlite",
        first=rf"[{_COMMON_FIRST}/'\"`]|[nNbBxX]'",
        comment=f"{_LINE_COMMENT}|{_BLOCK_COMMENT}",
        literal=f"[nNbBxX]?{_STANDARD}",
        quoted=f"{_DOUBLE_STANDARD}|{_BACKTICKS}|{_SQLITE_BRACKETS}",
        quote_chars='"`[',
    )


def _mssql(flags: frozenset[str]) -> _Lexer:
    # `#temp` is a table name, not a comment; block comments nest.
    return _Lexer(
        "mssql",
        first=rf"[{_COMMON_FIRST}/'\"]|[nNbBxX]'",
        comment=f"{_LINE_COMMENT}|{_NESTED_COMMENT}",
        literal=f"[nNbBxX]?{_STANDARD}",
        quoted=f"{_DOUBLE_STANDARD}|{_MSSQL_BRACKETS}",
        quote_chars='"[',
    )


def _oracle(flags: frozenset[str]) -> _Lexer:
    return _Lexer(
        "oracle",
        first=rf"[{_COMMON_FIRST}/'\"]|[nNbBxX]'|[nN]?[qQ]'",
        comment=f"{_LINE_COMMENT}|{_BLOCK_COMMENT}",
        literal=f"{_Q_QUOTE}|[nNbBxX]?{_STANDARD}",
        quoted=_DOUBLE_STANDARD,
        quote_chars='"',
    )


#: SQLAlchemy dialect names -> the tokenizer of their family. Other names get the conservative one.
_FAMILIES: dict[str, Callable[[frozenset[str]], _Lexer]] = {
    "mysql": _mysql,
    "mariadb": _mysql,
    "postgresql": _postgresql,
    "sqlite": _sqlite,
    "mssql": _mssql,
    "oracle": _oracle,
}
#: The `/flag` suffixes `dialect_key()` adds, per family.
_FLAGS: dict[Callable[[frozenset[str]], _Lexer], frozenset[str]] = {
    _mysql: frozenset({"ansi_quotes", "no_backslash_escapes"}),
    _postgresql: frozenset({"backslash_escapes"}),
}
#: Distinct `dialect=` values remembered; beyond, a new value is resolved on every call.
_MAX_DIALECT_NAMES = 256

_CONSERVATIVE = _conservative()
#: Tokenizers built so far, by family and flags (each built on first use: importing stays cheap).
_lexers: dict[str, _Lexer] = {"": _CONSERVATIVE}
#: `dialect=` values seen so far -> their tokenizer: resolving a dialect is a lookup.
_by_dialect: dict[str | None, _Lexer] = {None: _CONSERVATIVE}

_cache_size = 2048

# `x IN (?, ?, ?)` and `= ANY (?)` style lists collapse to one placeholder, whatever their length.
# A list cut short by truncation (no closing parenthesis before the end) collapses too.
_IN_LIST = re.compile(r"\b(in|values)\s*\(\s*\?(?:\s*,\s*\?)*\s*(?:,\s*)?(?:\)|\Z)", re.IGNORECASE)
# A multi-row VALUES of placeholders (executemany batches, insertmanyvalues) collapses to one row.
_VALUES_ROWS = re.compile(r"(\((?:\?|, )+\))(?:\s*,\s*\((?:\?|, )+\))+")
_SPACES = re.compile(r"  +")
_FIRST_WORD = re.compile(r"\s*\(*\s*([a-z]+)")
_DML = re.compile(r"\b(insert|update|delete)\b")

_OPERATIONS = {"select": "SELECT", "insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}


def _lexer_for(dialect: object) -> _Lexer:
    try:
        return _by_dialect[dialect]  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    if not isinstance(dialect, str):
        return _CONSERVATIVE
    name, *flag_list = dialect.split("/")
    family = _FAMILIES.get(name)
    if family is None:
        lexer = _CONSERVATIVE
    else:
        flags = frozenset(flag_list) & _FLAGS.get(family, frozenset())
        key = "/".join([family.__name__.lstrip("_"), *sorted(flags)])
        lexer = _lexers.get(key) or _lexers.setdefault(key, family(flags))
    if len(_by_dialect) < _MAX_DIALECT_NAMES:
        _by_dialect[dialect] = lexer
    return lexer


def dialect_key(dialect: object) -> str | None:
    """The `dialect=` value for a SQLAlchemy `Dialect`: its name, plus the quoting modes
    SQLAlchemy detected on the server when it first connected — `mysql/ansi_quotes`,
    `mysql/no_backslash_escapes`, `postgresql/backslash_escapes` (standard_conforming_strings
    off). Before the engine's first connection it is the bare name; never raises."""
    try:
        name = dialect.name  # type: ignore[attr-defined]
        if not isinstance(name, str):
            return None
        family = _FAMILIES.get(name)
        flags = []
        if getattr(dialect, "server_version_info", None) is None:
            # Not connected yet: the modes are class defaults (SQLAlchemy 2.0's PostgreSQL
            # dialect assumes backslash escapes until it asks the server).
            return name
        if family is _mysql:
            if getattr(dialect, "_server_ansiquotes", False) is True:
                flags.append("ansi_quotes")
            if getattr(dialect, "_backslash_escapes", True) is False:
                flags.append("no_backslash_escapes")
        elif family is _postgresql and getattr(dialect, "_backslash_escapes", False) is True:
            flags.append("backslash_escapes")
        return "/".join([name, *flags])
    except Exception:
        return None


def cache_for(dialect: str | None) -> dict[str, StatementShape]:
    """The shapes cached for `dialect`'s family, by statement string: `cache_for(d).get(sql)`
    is what `shape_of(sql, dialect=d)` returns, when cached. The dict is the same object for
    the life of the process; read it, never write it."""
    try:
        return _by_dialect[dialect].cache
    except (KeyError, TypeError):
        return _lexer_for(dialect).cache


def _normalise_outside_quotes(text: str, lexer: _Lexer) -> str:
    # Quoted identifiers keep their case and spaces; everything else is case-insensitive SQL, in
    # which the spaces a comment and the whitespace around it became are one separator.
    if not any(char in text for char in lexer.quote_chars):
        return _SPACES.sub(" ", text.lower())
    parts = lexer.quoted.split(text)
    return "".join(
        part if i % 2 else _SPACES.sub(" ", part.lower()) for i, part in enumerate(parts)
    )


def _compute(sql: str, lexer: _Lexer) -> StatementShape:
    truncated = len(sql) > MAX_INPUT
    if truncated:
        sql = sql[:MAX_INPUT]
    literals: list[str] = []

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup
        if kind == "space" or kind == "comment":
            return " "
        if kind == "quoted":
            return match.group()
        if kind != "param":
            literals.append(match.group())
        return "?"

    shape = lexer.token.sub(replace, sql)
    shape = _normalise_outside_quotes(shape, lexer)
    shape = _IN_LIST.sub(lambda m: m.group(1) + " (?)", shape)
    shape = _VALUES_ROWS.sub(r"\1", shape)
    shape = shape.strip().rstrip("; ")
    if len(shape) > MAX_INPUT:
        # Lower-casing (U+0130 becomes two characters) and `in(?)` -> `in (?)` can lengthen a
        # shape: cut it too, so that no shape is longer than MAX_INPUT plus the marker.
        shape, truncated = shape[:MAX_INPUT], True
    if truncated:
        shape += TRUNCATED_MARKER
    return StatementShape(
        shape, operation_of(shape), (hash(tuple(literals)) or 1) if literals else 0
    )


def operation_of(shape: str) -> str:
    """SELECT, INSERT, UPDATE, DELETE or OTHER, for a fingerprint."""
    match = _FIRST_WORD.match(shape)
    if match is None:
        return "OTHER"
    word = match.group(1)
    if word == "with":
        dml = _DML.search(shape)
        return _OPERATIONS[dml.group(1)] if dml else "SELECT"
    return _OPERATIONS.get(word, "OTHER")


def shape_of(sql: object, *, dialect: str | None = None) -> StatementShape:
    """The fingerprint, operation and literal hash of `sql` as `dialect` (a SQLAlchemy dialect
    name, or None for the conservative tokenizer) reads it, cached per statement string."""
    try:
        lexer = _by_dialect[dialect]
    except (KeyError, TypeError):
        lexer = _lexer_for(dialect)
    if type(sql) is str:
        cached = lexer.cache.get(sql)
        if cached is not None:
            return cached
    return _shape_and_cache(sql, lexer)


def _shape_and_cache(sql: object, lexer: _Lexer) -> StatementShape:
    text = _as_text(sql)
    try:
        result = _compute(text, lexer)
    except Exception:  # pragma: no cover - the expressions are total; this is the last resort
        result = StatementShape(UNPARSEABLE, "OTHER", 0)
    if type(sql) is str and len(sql) <= MAX_CACHED_LENGTH and _cache_size:
        cache = lexer.cache
        if len(cache) >= _cache_size:
            # Drop the oldest half (dicts keep insertion order): cheap, and hits stay a lookup.
            for key in list(islice(cache, len(cache) // 2 or 1)):
                del cache[key]
        cache[sql] = result
    return result


def fingerprint_and_operation(sql: object, *, dialect: str | None = None) -> tuple[str, str]:
    """The fingerprint of `sql` and its operation, cached per statement string."""
    try:
        lexer = _by_dialect[dialect]
    except (KeyError, TypeError):
        lexer = _lexer_for(dialect)
    result = lexer.cache.get(sql) if type(sql) is str else None
    if result is None:
        result = _shape_and_cache(sql, lexer)
    return result[0], result[1]


def fingerprint(sql: object, *, dialect: str | None = None) -> str:
    """The shape of a SQL statement: literals, placeholders, IN lists, comments and whitespace
    normalised, so every execution of the same query has the same fingerprint.

    `dialect` is SQLAlchemy's dialect name (`engine.dialect.name`: "postgresql", "mysql",
    "mariadb", "sqlite", "mssql", "oracle"), which decides how strings, comments and quoted
    identifiers are spelled; None (or another name) reads a little of each. Accepts any input
    (bytes are decoded leniently) and never raises.
    """
    return shape_of(sql, dialect=dialect)[0]


def configure_cache(size: int) -> None:
    """Bound each dialect family's fingerprint cache to `size` statement strings."""
    global _cache_size
    _cache_size = size
    for lexer in list(_lexers.values()):
        cache = lexer.cache
        while len(cache) > size:
            del cache[next(iter(cache))]


def caches() -> tuple[dict[str, StatementShape], ...]:
    """The fingerprint cache of every dialect family in use (for tests and benchmarks)."""
    return tuple(lexer.cache for lexer in list(_lexers.values()))


def cache_len() -> int:
    """Statement strings currently cached, over every dialect family (for tests and the soak
    benchmark)."""
    return sum(len(cache) for cache in caches())


def _as_text(sql: object) -> str:
    if isinstance(sql, str):
        return sql
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace")
    try:
        return str(sql)
    except Exception:
        return "<unprintable statement>"
