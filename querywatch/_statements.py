"""What a statement does, read from its text: the tables it reads or writes, whether it is
transaction control, and which of its placeholders page through a result or hold an IN list.

Ground-level helpers for the unit of work's fold and for the detectors. Everything here reads
a fingerprint (lower-cased, literals replaced by `?`) or, for placeholder positions, the raw
statement string SQLAlchemy sent; results about raw strings are cached per string (bounded).
Every pattern is linear: no nested quantifiers.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "in_list_length",
    "is_control",
    "is_paged",
    "paging_slots",
    "table_written",
    "tables_read",
]

# Transaction control and session settings: never a loop or a duplicate worth reporting.
_CONTROL = re.compile(
    r"\s*(?:begin|start\s+transaction|savepoint|release|rollback|commit|end|set|reset|show|"
    r"pragma|discard|deallocate|listen|unlisten|notify|checkpoint|vacuum|analyze)\b"
)
# Control statements after which earlier reads may no longer hold (a rollback to a savepoint
# undoes writes; a commit or rollback ends the transaction).
_BOUNDARY = re.compile(r"\s*(?:begin|start\s+transaction|savepoint|release|rollback|commit|end)\b")
_NAME_PART = r'(?:"[^"]*"|`[^`]*`|[\w$]+)'
_TABLE = rf"(?:{_NAME_PART}\.)*{_NAME_PART}"
_ALIAS = (
    r"(?:\s+(?:as\s+)?(?!(?:where|join|on|left|right|inner|outer|cross|full|natural|group|order|"
    r"limit|offset|union|having|window|for|using|returning|lateral)\b)\w+)?"
)
_READ_TABLES = re.compile(rf"\b(?:from|join)\s+({_TABLE}{_ALIAS}(?:\s*,\s*{_TABLE}{_ALIAS})*)")
_NAME = re.compile(r'"([^"]*)"|`([^`]*)`|([\w$]+)')
_WRITE_TABLE = re.compile(
    rf"^\s*(?:insert\s+(?:ignore\s+)?into|update|delete\s+from|replace\s+into)\s+({_TABLE})"
)
_PAGED = re.compile(r"\blimit\s+\?|\boffset\s+\?|\bfetch\s+(?:first|next)\b")

# Placeholders of every DB-API style SQLAlchemy emits, in a raw statement.
_PLACEHOLDER = re.compile(r"\?|%s|%\((\w+)\)s|\$(\d+)|(?<![:\w]):([A-Za-z_]\w*)")
# What precedes a placeholder that pages: LIMIT / OFFSET / FETCH FIRST, MySQL's `LIMIT ?, ?`,
# or a range comparison (keyset pagination: `WHERE id > ? ORDER BY id LIMIT ?`).
_PAGING_BEFORE = re.compile(
    r"(?:\blimit\s+(?:\S+\s*,\s*)?|\boffset\s+|\bfetch\s+(?:first|next)\s+|[<>]=?\s*)$",
    re.IGNORECASE,
)
# An IN list of placeholders, as SQLAlchemy expands it: `IN (?, ?, ?)`, `IN (%(id_1_1)s, ...)`.
_PH = r"(?:\?|%s|%\(\w+\)s|\$\d+|:\w+)(?:::\w+(?:\s+\w+)*(?:\([\d,\s]*\))?(?:\[\])*)?"
_IN_LIST = re.compile(rf"\bin\s*\(\s*({_PH}(?:\s*,\s*{_PH})*)\s*\)", re.IGNORECASE)
_ANY = re.compile(r"=\s*any\s*\(", re.IGNORECASE)

_MAX_CACHED = 4096
_MAX_CACHED_LENGTH = 10_000
#: Where a placeholder is looked at for what precedes it.
_LOOKBEHIND = 40
#: The end of a long statement that is searched for LIMIT / OFFSET / keyset placeholders.
_TAIL = 2_000

Slots = frozenset[int | str]
_slots_cache: dict[str, Slots] = {}
_in_cache: dict[str, int] = {}


def is_control(fingerprint: str) -> bool:
    """Transaction control or a session setting (`begin`, `savepoint`, `set`, `pragma` ...)."""
    return _CONTROL.match(fingerprint) is not None


def is_boundary(fingerprint: str) -> bool:
    """A statement that begins or ends a transaction or a savepoint."""
    return _BOUNDARY.match(fingerprint) is not None


_TABLE_AT = re.compile(r"\s*(" + _TABLE + ")")


def _table_name(item: str) -> str | None:
    """The table of `schema.table alias` (the last part of the name, unquoted)."""
    match = _TABLE_AT.match(item)
    if match is None:
        return None
    parts = _NAME.findall(match.group(1))
    if not parts:
        return None
    quoted, backticked, bare = parts[-1]
    return quoted or backticked or bare.rsplit(".", 1)[-1] or None


def tables_read(fingerprint: str) -> frozenset[str]:
    """The tables after FROM and JOIN (schema dropped); empty when none can be read off."""
    tables: set[str] = set()
    for listed in _READ_TABLES.findall(fingerprint):
        for item in listed.split(","):
            name = _table_name(item)
            if name:
                tables.add(name)
    return frozenset(tables)


def table_written(fingerprint: str) -> str | None:
    """The table an INSERT / UPDATE / DELETE writes (schema dropped), else None."""
    match = _WRITE_TABLE.match(fingerprint)
    if match is None:
        return None
    return _table_name(match.group(1))


def is_paged(fingerprint: str) -> bool:
    """The statement has a LIMIT, OFFSET or FETCH FIRST placeholder."""
    return _PAGED.search(fingerprint) is not None


def paging_slots(statement: str) -> Slots:
    """The placeholders of a raw statement that page through a result: LIMIT, OFFSET and
    keyset (`> ?`) values, as positions (`?`, `%s`, `$n` counted from 0) or names (`%(x)s`,
    `:x`). A loop whose only changing values sit there walks pages of one result."""
    slots = _slots_cache.get(statement)
    if slots is not None:
        return slots
    found: set[int | str] = set()
    text, first = statement, 0
    if len(statement) > _MAX_CACHED_LENGTH:
        # A long statement (a huge IN list) is not cached, so this runs per execution: LIMIT,
        # OFFSET and keyset values sit at its end, so only the tail is looked at, and the
        # positional placeholders before it are counted in C.
        head, text = statement[:-_TAIL], statement[-_TAIL:]
        first = head.count("?") + head.count("%s")
    for position, match in enumerate(_PLACEHOLDER.finditer(text), first):
        before = text[max(0, match.start() - _LOOKBEHIND) : match.start()]
        if _PAGING_BEFORE.search(before) is None:
            continue
        named, dollar, colon = match.groups()
        if named or colon:
            found.add(named or colon)
        elif dollar:
            found.add(int(dollar) - 1)
        else:
            found.add(position)
    slots = frozenset(found)
    if len(statement) <= _MAX_CACHED_LENGTH:
        if len(_slots_cache) >= _MAX_CACHED:
            _slots_cache.clear()
        _slots_cache[statement] = slots
    return slots


def filter_values(parameters: Any, slots: Slots) -> Any:
    """The bound values of a statement without those in `slots` (what selects the rows, as
    opposed to which page of them)."""
    if not slots:
        return parameters
    if isinstance(parameters, dict):
        return tuple(item for item in parameters.items() if item[0] not in slots)
    if isinstance(parameters, (tuple, list)):
        return tuple(value for index, value in enumerate(parameters) if index not in slots)
    return parameters


def in_list_length(statement: str, parameters: Any) -> int:
    """How many values the statement's IN lists (or `= ANY(array)` values) hold."""
    length = _in_cache.get(statement)
    if length is None and len(statement) > _MAX_CACHED_LENGTH:
        # Not cached, so per execution: the commas stand for the list's length (the rest of
        # the shape is the same from one execution to the next), counted in C.
        return statement.count(",") + 1
    if length is None:
        length = sum(group.count(",") + 1 for group in _IN_LIST.findall(statement))
        if len(statement) <= _MAX_CACHED_LENGTH:
            if len(_in_cache) >= _MAX_CACHED:
                _in_cache.clear()
            _in_cache[statement] = length
    if length == 0 and _ANY.search(statement) is not None:
        values = parameters.values() if isinstance(parameters, dict) else parameters
        if isinstance(values, (tuple, list, type({}.values()))):
            for value in values:
                if isinstance(value, (list, tuple)):
                    length += len(value)
    return length
