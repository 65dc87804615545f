"""Statement shapes: `fingerprint(sql)` turns a SQL string into the shape shared by every
execution of "the same query", whatever its literal values, placeholder style or IN-list length.

One left-to-right pass of a regular expression whose every branch is linear (no nested
quantifiers; unterminated strings and comments run to the end of the input), followed by two
collapsing passes of the same kind. The result is lower-cased outside quoted identifiers, like
Percona's pt-fingerprint. Results are cached per statement string in a bounded dict, so the
statement strings SQLAlchemy reuses from its compiled cache cost a lookup.
"""

from __future__ import annotations

import re
from itertools import islice

__all__ = ["fingerprint", "fingerprint_and_operation", "operation_of"]

#: Statements longer than this are fingerprinted on their first `MAX_INPUT` characters.
MAX_INPUT = 100_000
#: Statements longer than this are not cached (the cache must stay small).
MAX_CACHED_LENGTH = 10_000
TRUNCATED_MARKER = " /* querywatch: truncated */"

_TOKEN = re.compile(
    r"""
      (?P<comment>--[^\n]*|/\*[\s\S]*?(?:\*/|\Z)|\#(?![>-])[^\n]*)
    | (?P<escaped>(?<![\w$])[eE]'[^'\\]*(?:(?:\\[\s\S]?|'')[^'\\]*)*(?:'|\Z))
    | (?P<string>(?:[eEnNbBxX](?='))?'[^']*(?:''[^']*)*(?:'|\Z))
    | (?P<dollar>(?<![\w$])\$(?P<tag>(?:[^\W\d]\w*)?)\$[\s\S]*?(?:\$(?P=tag)\$|\Z))
    | (?P<quoted>"[^"]*(?:""[^"]*)*(?:"|\Z)|`[^`]*(?:``[^`]*)*(?:`|\Z))
    | (?P<param>
          (?:__)?\[POSTCOMPILE_\w+(?:~~[^\]]*)?\]
        | \$\d+
        | %\(\w+\)s
        | %s
        | \?
        | (?<![:\w]):[A-Za-z_]\w*
      )(?:::[A-Za-z_]\w*(?:\s+(?:with|without)\s+time\s+zone)?(?:\([\d,\s]*\))?(?:\[\])*)?
    | (?P<number>(?<![\w.])[-+]?(?:0[xX][0-9a-fA-F_]+|0[oObB][0-7_]+
          |\d[\d_]*(?:\.[\d_]*)?(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?)(?![\w.]))
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)
# `x IN (?, ?, ?)` and `= ANY (?)` style lists collapse to one placeholder, whatever their length.
# A list cut short by truncation (no closing parenthesis before the end) collapses too.
_IN_LIST = re.compile(r"\b(in|values)\s*\(\s*\?(?:\s*,\s*\?)*\s*(?:,\s*)?(?:\)|\Z)", re.IGNORECASE)
# A multi-row VALUES of placeholders (executemany batches, insertmanyvalues) collapses to one row.
_VALUES_ROWS = re.compile(r"(\((?:\?|, )+\))(?:\s*,\s*\((?:\?|, )+\))+")
_SPACES = re.compile(r"  +")
_FIRST_WORD = re.compile(r"\s*\(*\s*([a-z]+)")
_DML = re.compile(r"\b(insert|update|delete)\b")

_OPERATIONS = {"select": "SELECT", "insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}

_cache: dict[str, tuple[str, str]] = {}
_cache_size = 2048


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "space":
        return " "
    if kind == "comment":
        return " "
    if kind == "quoted":
        return match.group()
    return "?"


def _normalise_outside_quotes(text: str) -> str:
    # Quoted identifiers keep their case and spaces; everything else is case-insensitive SQL, in
    # which the spaces a comment and the whitespace around it became are one separator.
    if '"' not in text and "`" not in text:
        return _SPACES.sub(" ", text.lower())
    parts = re.split(r'("[^"]*(?:""[^"]*)*(?:"|\Z)|`[^`]*(?:``[^`]*)*(?:`|\Z))', text)
    return "".join(
        part if i % 2 else _SPACES.sub(" ", part.lower()) for i, part in enumerate(parts)
    )


def _compute(sql: str) -> str:
    truncated = len(sql) > MAX_INPUT
    if truncated:
        sql = sql[:MAX_INPUT]
    shape = _TOKEN.sub(_replace, sql)
    shape = _normalise_outside_quotes(shape)
    shape = _IN_LIST.sub(lambda m: m.group(1) + " (?)", shape)
    shape = _VALUES_ROWS.sub(r"\1", shape)
    shape = shape.strip().rstrip("; ")
    if len(shape) > MAX_INPUT:
        # Lower-casing (U+0130 becomes two characters) and `in(?)` -> `in (?)` can lengthen a
        # shape: cut it too, so that no shape is longer than MAX_INPUT plus the marker.
        shape, truncated = shape[:MAX_INPUT], True
    return shape + TRUNCATED_MARKER if truncated else shape


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


def fingerprint_and_operation(sql: object) -> tuple[str, str]:
    """The fingerprint of `sql` and its operation, cached per statement string."""
    cached = _cache.get(sql) if type(sql) is str else None
    if cached is not None:
        return cached
    text = _as_text(sql)
    try:
        shape = _compute(text)
    except Exception:  # pragma: no cover - the expressions are total; this is the last resort
        shape = "<unparseable statement>"
    result = (shape, operation_of(shape))
    if type(sql) is str and len(sql) <= MAX_CACHED_LENGTH and _cache_size:
        if len(_cache) >= _cache_size:
            # Drop the oldest half (dicts keep insertion order): cheap, and hits stay a lookup.
            for key in list(islice(_cache, len(_cache) // 2 or 1)):
                del _cache[key]
        _cache[sql] = result
    return result


def fingerprint(sql: object) -> str:
    """The shape of a SQL statement: literals, placeholders, IN lists, comments and whitespace
    normalised, so every execution of the same query has the same fingerprint.

    Accepts any input (bytes are decoded leniently) and never raises.
    """
    return fingerprint_and_operation(sql)[0]


def configure_cache(size: int) -> None:
    """Bound the per-process fingerprint cache to `size` statement strings."""
    global _cache_size
    _cache_size = size
    while len(_cache) > size:
        del _cache[next(iter(_cache))]


def cache_len() -> int:
    """Statement strings currently cached (for tests and the soak benchmark)."""
    return len(_cache)


def _as_text(sql: object) -> str:
    if isinstance(sql, str):
        return sql
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace")
    try:
        return str(sql)
    except Exception:
        return "<unprintable statement>"
