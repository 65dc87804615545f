"""Query-shape snapshots: the SQL statements a test runs, kept in a reviewable file.

A test's *record* is its statements in execution order, each as its shape: the fingerprint,
with what does not change behaviour normalised away (`normalise`: anonymous alias numbers,
SQLAlchemy 2.0's `table.col AS table_col` labels). Consecutive repeats are one line with a
count, and the requests the test sent through `QueryWatchMiddleware` (a `TestClient`, an httpx
`ASGITransport`) are each a line naming the method and route template, their statements under
it. Records live in `<module>.querywatch.yml` beside the test module, by dialect, then by test
id. A run whose record differs fails with a unified diff and the call sites of the statements
it added.

Here: following a test unit (`Recorder`) and building its record (`build`); the file format
(`render_file`, `parse_file`; files are rewritten under a lock and replaced atomically, so
pytest-xdist workers never lose or tear one); the check and its messages; `assert_query_snapshot`
for any test framework (re-exported by `querywatch.testing`); and the pytest plugin's session
part (`SnapshotSession`). pytest is imported for type checking only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

if sys.platform == "win32":  # pragma: no cover - CI runs on Linux
    import msvcrt
else:
    import fcntl

if TYPE_CHECKING:
    import pytest

    from querywatch._collection import Query, Report
    from querywatch.settings import Settings
    from querywatch.testing import WatchedUnit

__all__ = [
    "MAX_RECORDED_STATEMENTS",
    "SUFFIX",
    "Recorder",
    "SnapshotBlocks",
    "SnapshotFileError",
    "SnapshotSession",
    "TestSnapshot",
    "assert_query_snapshot",
    "mode_of",
    "normalise",
    "parse_file",
    "render_file",
]

#: Statements recorded per test (a test unit keeps at least this many in `report.queries`);
#: beyond it the record says how many more ran.
MAX_RECORDED_STATEMENTS = 2000
#: Record files are named `<module>` + SUFFIX.
SUFFIX = ".querywatch.yml"
#: Longest shape written in full; a longer one is cut and ends with a hash of the whole.
MAX_LINE = 2000
#: Call sites listed per added statement in a failure message.
MAX_CALLSITES_SHOWN = 3
#: The repeat marker of a collapsed line: `shape <multiplication sign> n`.
TIMES = " \u00d7 "

#: A record item: a statement line, or a request / named block with the items run inside it.
Item: TypeAlias = "str | tuple[str, tuple[Item, ...]]"
Items: TypeAlias = "tuple[Item, ...]"
#: A record file's contents: dialect -> test id -> record.
Records: TypeAlias = "dict[str, dict[str, Items]]"


class SnapshotFileError(Exception):
    """A record file that cannot be read: its path, the line, and what is wrong."""


# --- shapes ---------------------------------------------------------------------------------

_IDENT = r'(?:"[^"]*"|`[^`]*`|\[[^\]]*\]|[^\W\d][\w$]*)'
#: `expression AS label`, where the expression is `qualifier.column` or ends with `)`.
_LABEL = re.compile(rf"(?:(?P<q>{_IDENT})\.(?P<c>{_IDENT})|(?P<paren>\))) as (?P<label>{_IDENT})")
#: Names SQLAlchemy makes up: anonymous labels and parameters, numbered aliases.
_ANONYMOUS = re.compile(r"(?:anon|param)_\d+")
_NUMBERED = re.compile(r"\b([^\W\d][\w$]*?)_(\d+)\b")
_FUNCTION_BEFORE = re.compile(r"([^\W\d][\w$]*)\s*$")
#: Shapes seen by `normalise` (cleared when full: bounded like the fingerprint cache).
_MAX_NORMALISED = 4096
_normalised: dict[str, str] = {}


def _unquote(name: str) -> str:
    if name[:1] in ('"', "`", "["):
        return name[1:-1]
    return name


def _generated_label(match: re.Match[str], shape: str) -> bool:
    """Whether the label of `match` is one SQLAlchemy derived from its expression."""
    label = _unquote(match["label"])
    if match["paren"]:
        start = _open_paren(shape, match.start())
        if shape.startswith("(select ", start):
            return False  # a subquery's alias is part of the statement's structure
        if _ANONYMOUS.fullmatch(label):
            return True
        # `count(*) AS count_1`: a function's anonymous label.
        function = _FUNCTION_BEFORE.search(shape, 0, start)
        return bool(function and re.fullmatch(re.escape(function[1]) + r"_\d+", label))
    if _ANONYMOUS.fullmatch(label):
        return True
    qualifier, column = _unquote(match["q"]), _unquote(match["c"])
    derived = f"{qualifier}_{column}"
    if label in (derived, column) or re.fullmatch(re.escape(column) + r"_\d+", label):
        return True
    # A label longer than the dialect allows is cut and suffixed: `<start>_<counter>`.
    cut = re.fullmatch(r"(.{16,})_[0-9a-f]+", label)
    return bool(cut and derived.startswith(cut[1]))


def _open_paren(shape: str, close: int) -> int:
    """The index of the `(` that the `)` at `close` closes (0 when unbalanced)."""
    depth = 0
    for index in range(close, -1, -1):
        char = shape[index]
        if char == ")":
            depth += 1
        elif char == "(":
            depth -= 1
            if depth == 0:
                return index
    return 0


def normalise(shape: str) -> str:
    """A statement shape as a snapshot records it: SQLAlchemy's generated column labels dropped
    (2.0 writes `authors.id AS authors_id` where 2.1 writes `authors.id`; `count(*) AS count_1`)
    unless the statement refers to them, and anonymous names (`anon_1`, `param_1`, `authors_1`)
    numbered by their first appearance. Literals, IN lists and placeholders are already uniform
    in the fingerprint."""
    cached = _normalised.get(shape)
    if cached is not None:
        return cached
    result = shape
    if " as " in result:
        pieces: list[str] = []
        last = 0
        for match in _LABEL.finditer(result):
            label = match["label"]
            if _generated_label(match, result) and (
                len(re.findall(rf"(?<![\w$]){re.escape(label)}(?![\w$])", result)) == 1
            ):
                pieces.append(result[last : match.start("label") - 4])
                last = match.end()
        pieces.append(result[last:])
        result = "".join(pieces)
    if "_" in result:
        result = _renumber(result)
    if len(_normalised) >= _MAX_NORMALISED:
        _normalised.clear()
    _normalised[shape] = result
    return result


def _renumber(shape: str) -> str:
    introduced = {
        _unquote(m["label"]) for m in re.finditer(rf" as (?P<label>{_IDENT})", shape)
    } | set(_ANONYMOUS.findall(shape))
    numbered = {name for name in introduced if _NUMBERED.fullmatch(name)}
    if not numbered:
        return shape
    names: dict[str, str] = {}
    counters: dict[str, int] = {}

    def renumber(match: re.Match[str]) -> str:
        name = match[0]
        if name not in numbered:
            return name
        new = names.get(name)
        if new is None:
            base = match[1]
            counters[base] = counters.get(base, 0) + 1
            new = names[name] = f"{base}_{counters[base]}"
        return new

    return _NUMBERED.sub(renumber, shape)


def _line(shape: str) -> str:
    text = normalise(shape)
    if len(text) > MAX_LINE:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        text = f"{text[:MAX_LINE]} … [{digest}]"
    return text


# --- the record of a test -------------------------------------------------------------------


@dataclass
class Span:
    """A request or named block: a range of the test unit's statements, and when it ran
    (`perf_counter`; for a request, its start is worked out from its duration)."""

    start: int
    end: int
    header: str
    opened: float
    closed: float
    children: list[Span] = field(default_factory=list)


@dataclass
class Entry:
    """A line of a record being built: a statement (children None) or a request / block."""

    text: str
    count: int = 1
    children: list[Entry] | None = None
    #: where the statements of this line ran (statements only), distinct, in order
    callsites: list[str] = field(default_factory=list)

    def item(self) -> Item:
        text = self.text if self.count == 1 else f"{self.text}{TIMES}{self.count}"
        if self.children is None:
            return text
        return (text, tuple(child.item() for child in self.children))


class Recorder:
    """Follows one test unit while it runs: the requests nested in it and the named blocks
    entered in it, each as the range of the test's statements it ran, and when.

    A nested request's range is known when it ends: the reporter sees it with all its
    statements already counted in the test unit, so it covers the last `statements` of them.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        self.spans: list[Span] = []
        self.blocks: list[Span] = []
        self._remove: Callable[[], None] | None = None

    def start(self) -> None:
        from querywatch import add_reporter  # deferred: loaded by the plugin, lazily

        self._remove = add_reporter(self._finished)

    def stop(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _finished(self, finished: Report) -> None:
        if finished.kind != "request" or finished is self.report:
            return
        parent = finished.parent
        while parent is not None and parent is not self.report:
            parent = parent.parent
        if parent is None:
            return  # a request of another unit of work (another thread's job)
        closed = time.perf_counter()
        http = finished.http
        end = self.report.statements
        header = f"{http.method} {http.route}" if http is not None else finished.name
        start = max(0, end - finished.statements)
        self.spans.append(Span(start, end, header, closed - finished.duration_seconds, closed))

    def position(self) -> int:
        """How many statements the test has run so far."""
        from querywatch import current_report  # deferred: loaded by the plugin, lazily

        current = current_report()
        if current is not None and current is not self.report:
            # A block boundary inside a nested unit (`querywatch.watch()`): reading its
            # queries folds what it ran so far into the test's count.
            current.queries  # noqa: B018
        return self.report.statements

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        if not isinstance(name, str) or not name.strip():
            raise TypeError("a snapshot block needs a non-empty name")
        start = self.position()
        opened = time.perf_counter()
        try:
            yield
        finally:
            span = Span(start, self.position(), name.strip(), opened, time.perf_counter())
            self.spans.append(span)
            self.blocks.append(span)


def _inside(span: Span, outer: Span) -> bool:
    """Whether `span` ran inside `outer`: within its statements, and ended while it ran (a
    request that ran no statement, at the edge of another, is inside it only by time)."""
    return (
        outer.start <= span.start
        and span.end <= outer.end
        and outer.opened <= span.closed <= outer.closed
    )


def _tree(spans: Sequence[Span]) -> list[Span]:
    """Spans nested in each other, each level in the order they ran (children reset first)."""
    roots: list[Span] = []
    stack: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.opened, -s.closed)):
        span.children = []
        while stack and not _inside(span, stack[-1]):
            stack.pop()
        (stack[-1].children if stack else roots).append(span)
        stack.append(span)
    return roots


def _statements(queries: Sequence[Query], start: int, end: int) -> list[Entry]:
    kept = len(queries)
    entries = [
        Entry(_line(query.fingerprint), callsites=[query.callsite] if query.callsite else [])
        for query in queries[start : min(end, kept)]
    ]
    missing = end - max(start, kept)
    if missing > 0:
        entries.append(
            Entry(
                f"… {missing} more statement{'s' if missing != 1 else ''}, not recorded "
                f"(a snapshot records the first {kept})"
            )
        )
    return entries


def _entries(queries: Sequence[Query], start: int, end: int, spans: list[Span]) -> list[Entry]:
    entries: list[Entry] = []
    position = start
    for span in spans:
        begin = max(span.start, position)
        entries.extend(_statements(queries, position, begin))
        finish = max(span.end, begin)
        inner = _entries(queries, begin, finish, span.children)
        entries.append(Entry(span.header, children=inner))
        position = finish
    entries.extend(_statements(queries, position, end))
    return entries


def _items(entries: list[Entry] | None) -> Items:
    return tuple(entry.item() for entry in entries or ())


def _collapse(entries: list[Entry]) -> list[Entry]:
    """Consecutive repeats of one line as one line with a count (`shape x n`)."""
    collapsed: list[Entry] = []
    for entry in entries:
        if entry.children is not None:
            entry.children = _collapse(entry.children)
        previous = collapsed[-1] if collapsed else None
        if (
            previous is not None
            and previous.text == entry.text
            and (previous.children is None) == (entry.children is None)
            and (entry.children is None or _items(previous.children) == _items(entry.children))
        ):
            previous.count += entry.count
            for site in entry.callsites:
                if site not in previous.callsites:
                    previous.callsites.append(site)
        else:
            collapsed.append(entry)
    return collapsed


@dataclass
class Built:
    """The record of a test as this run made it."""

    entries: list[Entry]
    #: the dialect section it belongs in (None: the test ran no statement)
    dialect: str | None
    statements: int

    @property
    def items(self) -> Items:
        return tuple(entry.item() for entry in self.entries)


def _dialect_names() -> dict[str, str]:
    # deferred: loaded by the plugin, lazily
    from querywatch._instrumentation import instrumented_engines

    names: dict[str, str] = {}
    for handle in instrumented_engines():
        engine = handle.engine
        if engine is not None:
            names[handle.name] = engine.dialect.name
    return names


def _dialect(pools: set[str]) -> str | None:
    if not pools:
        return None
    known = _dialect_names()
    dialects = set()
    for pool in pools:
        name = known.get(pool)
        if name is None:  # an engine gone already: its default name starts with the driver
            name = pool.split("://", 1)[0].split("+", 1)[0] if "://" in pool else pool
        dialects.add(name)
    return "+".join(sorted(dialects))


def build(recorder: Recorder, *, whole: bool) -> Built:
    """The record of the test unit `recorder` followed: every statement (`whole`), or only the
    named blocks."""
    report = recorder.report
    queries = report.queries
    statements = report.statements
    roots = _tree(recorder.spans)
    if whole:
        entries = _entries(queries, 0, statements, roots)
    else:
        blocks = [span for span in roots if any(span is block for block in recorder.blocks)]
        entries = [
            Entry(span.header, children=_entries(queries, span.start, span.end, span.children))
            for span in blocks
        ]
    return Built(_collapse(entries), _dialect({query.pool for query in queries}), statements)


# --- the record file ------------------------------------------------------------------------

_UNSAFE_START = frozenset("-?:,[]{}#&*!|>'\"%@`~= ")
_RESERVED = re.compile(
    r"(?i)(?:null|true|false|yes|no|on|off|y|n|<<|[-+]?(?:\.inf|\.nan)|0x[0-9a-f_]+|0o?[0-7_]+"
    r"|0b[01_]+|[-+]?(?:\d[\d_]*)?\.?[\d_]*(?:e[-+]?\d+)?|[-+]?\d[\d_]*(?::[0-5]?\d)+(?:\.\d*)?"
    r"|\d{4}-\d\d?-\d\d?.*)"
)


def _escape(char: str) -> str:
    code = ord(char)
    if char == '"':
        return '\\"'
    if char == "\\":
        return "\\\\"
    if (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or code in (0x2028, 0x2029, 0xFEFF, 0xFFFE, 0xFFFF)
        or 0xD800 <= code <= 0xDFFF
    ):
        return f"\\u{code:04x}"
    return char


def _plain(text: str) -> bool:
    return bool(
        text
        and text[0] not in _UNSAFE_START
        and text == text.strip()
        and ": " not in text
        and " #" not in text
        and not text.endswith(":")
        and all(_escape(char) == char for char in text)
        and not _RESERVED.fullmatch(text)
    )


def _scalar(text: str) -> str:
    """`text` as a YAML scalar: plain when that reads back as the same string, else quoted."""
    if _plain(text):
        return text
    return '"' + "".join(map(_escape, text)) + '"'


HEADER = (
    "# querywatch query-shape snapshots of {module}: the SQL statements of each test, in order,\n"
    "# by database dialect and test (`shape \u00d7 n`: n in a row; requests under METHOD /route).\n"
    "# A test whose statements change fails with a diff. After an intended change, rewrite:\n"
    "#   pytest --querywatch-snapshot-update\n"
)


def _emit(items: Items, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for item in items:
        if isinstance(item, str):
            lines.append(f"{pad}- {_scalar(item)}")
            continue
        header, children = item
        if children:
            lines.append(f"{pad}- {_scalar(header)}:")
            _emit(children, indent + 4, lines)
        else:
            lines.append(f"{pad}- {_scalar(header)}: []")


def render_file(records: Records, *, module: str) -> str:
    """A record file: dialects, then tests, sorted; one statement per line."""
    lines = [HEADER.format(module=module).rstrip("\n")]
    for dialect in sorted(records):
        tests = records[dialect]
        if not tests:
            continue
        lines.append(f"{_scalar(dialect)}:")
        for test in sorted(tests):
            items = tests[test]
            if items:
                lines.append(f"  {_scalar(test)}:")
                _emit(items, 4, lines)
            else:
                lines.append(f"  {_scalar(test)}: []")
    return "\n".join(lines) + "\n"


def _read_scalar(text: str, where: str) -> tuple[str, str]:
    """The scalar at the start of `text`, and what follows it."""
    if text.startswith('"'):
        index = 1
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            if char == '"':
                try:
                    return json.loads(text[: index + 1]), text[index + 1 :]
                except ValueError as exc:
                    raise SnapshotFileError(f"{where}: bad double-quoted string: {exc}") from None
            index += 1
        raise SnapshotFileError(f"{where}: unterminated double-quoted string")
    if text.startswith("'"):
        index = 1
        chunks: list[str] = []
        while index < len(text):
            end = text.find("'", index)
            if end < 0:
                break
            chunks.append(text[index:end])
            if text[end + 1 : end + 2] == "'":
                chunks.append("'")
                index = end + 2
                continue
            return "".join(chunks), text[end + 1 :]
        raise SnapshotFileError(f"{where}: unterminated single-quoted string")
    comment = text.find(" #")
    if comment >= 0:
        text = text[:comment]
    colon = text.find(": ")
    if colon < 0 and text.rstrip().endswith(":"):
        colon = len(text.rstrip()) - 1
    if colon < 0:
        return text.strip(), ""
    return text[:colon].strip(), text[colon:]


@dataclass
class _Line:
    number: int
    indent: int
    text: str


def _mapping_key(line: _Line, where: str) -> tuple[str, bool]:
    """`key:` (True: a block follows) or `key: []` (False)."""
    key, rest = _read_scalar(line.text, where)
    rest = rest.strip()
    if rest == ":":
        return key, True
    if rest.startswith(":") and rest[1:].strip() in ("[]", "{}"):
        return key, False
    raise SnapshotFileError(f"{where}: expected `{key}:`")


def _sequence(lines: list[_Line], index: int, indent: int, path: str) -> tuple[Items, int]:
    items: list[Item] = []
    while index < len(lines) and lines[index].indent >= indent:
        line = lines[index]
        where = f"{path}:{line.number}"
        if line.indent != indent or not (line.text == "-" or line.text.startswith("- ")):
            raise SnapshotFileError(f"{where}: expected a `- ` item at column {indent + 1}")
        body = line.text[2:].strip()
        value, rest = _read_scalar(body, where)
        rest = rest.strip()
        index += 1
        if not rest:
            items.append(value)
        elif rest == ":":
            if index < len(lines) and lines[index].indent > indent:
                children, index = _sequence(lines, index, lines[index].indent, path)
            else:
                children = ()
            items.append((value, children))
        elif rest.startswith(":") and rest[1:].strip() == "[]":
            items.append((value, ()))
        else:
            raise SnapshotFileError(f"{where}: unexpected {rest!r}")
    return tuple(items), index


def parse_file(text: str, path: str) -> Records:
    """The records of a file written by `render_file` (any YAML of the same shape, in the block
    style, with plain, single- or double-quoted scalars)."""
    lines: list[_Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise SnapshotFileError(f"{path}:{number}: tabs are not allowed for indentation")
        lines.append(_Line(number, len(raw) - len(raw.lstrip(" ")), stripped))
    records: Records = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        where = f"{path}:{line.number}"
        if line.indent != 0:
            raise SnapshotFileError(f"{where}: expected a dialect name at column 1")
        dialect, block = _mapping_key(line, where)
        tests = records.setdefault(dialect, {})
        index += 1
        if not block or index >= len(lines) or lines[index].indent == 0:
            continue
        test_indent = lines[index].indent
        while index < len(lines) and lines[index].indent > 0:
            line = lines[index]
            where = f"{path}:{line.number}"
            if line.indent != test_indent:
                raise SnapshotFileError(f"{where}: expected a test id at column {test_indent + 1}")
            test, block = _mapping_key(line, where)
            index += 1
            items: Items = ()
            if block and index < len(lines) and lines[index].indent > test_indent:
                items, index = _sequence(lines, index, lines[index].indent, path)
            elif (
                block
                and index < len(lines)
                and lines[index].indent == test_indent
                and lines[index].text.startswith("- ")
            ):  # a sequence not indented under its key
                items, index = _sequence(lines, index, test_indent, path)
            tests[test] = items
    return records


def record_path(module: Path, *, directory: Path | None, rootdir: Path) -> Path:
    """Where the records of the tests in `module` are kept."""
    name = (module.stem if module.suffix == ".py" else module.name) + SUFFIX
    if directory is None:
        return module.with_name(name)
    try:
        relative = module.parent.relative_to(rootdir)
    except ValueError:
        relative = Path()
    return directory / relative / name


def _module_of(record: Path) -> str:
    """The name of the test module whose records `record` keeps."""
    name = record.name[: -len(SUFFIX)]
    return name if Path(name).suffix else name + ".py"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the record files of `path`'s directory, across processes
    (pytest-xdist workers). The record file itself cannot carry the lock (it is replaced, not
    rewritten), and a lock file beside it would litter the repository: on POSIX the directory
    is locked (`flock`); on Windows a lock file in the temporary directory is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":  # pragma: no cover - CI runs on Linux
        digest = hashlib.sha1(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:20]
        lock = Path(tempfile.gettempdir()) / f"querywatch-snapshot-{digest}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_records(path: Path) -> Records:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return parse_file(text, str(path))


def _write(path: Path, text: str | None) -> None:
    """Replace `path` with `text` in one step (None: delete it)."""
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def update_file(
    path: Path,
    changes: dict[tuple[str, str], Items],
    *,
    keep: Callable[[str], bool] | None = None,
) -> int:
    """Apply `changes` ((dialect, test) -> record) to the file at `path`, under its lock, read
    afresh (another process may have written it); with `keep`, also remove the records of tests
    for which it returns False. Returns the number of records removed."""
    with _locked(path):
        try:
            before = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            before = None
        records = parse_file(before, str(path)) if before is not None else {}
        removed = 0
        if keep is not None:
            for tests in records.values():
                for test in [test for test in tests if not keep(test)]:
                    del tests[test]
                    removed += 1
        for (dialect, test), items in changes.items():
            records.setdefault(dialect, {})[test] = items
        records = {dialect: tests for dialect, tests in records.items() if tests}
        after = render_file(records, module=_module_of(path)) if records else None
        if after != before:
            _write(path, after)
        return removed


# --- comparing ------------------------------------------------------------------------------


def _item_line(item: Item, depth: int) -> str:
    pad = "  " * depth
    if isinstance(item, str):
        return pad + item
    return pad + item[0] + (":" if item[1] else ": []")


def display(items: Items, depth: int = 0) -> list[str]:
    """A record as indented lines (what a failure diff shows)."""
    lines: list[str] = []
    for item in items:
        lines.append(_item_line(item, depth))
        if not isinstance(item, str):
            lines.extend(display(item[1], depth + 1))
    return lines


def _display_sites(entries: list[Entry], depth: int = 0) -> list[tuple[str, list[str]]]:
    lines: list[tuple[str, list[str]]] = []
    for entry in entries:
        lines.append((_item_line(entry.item(), depth), entry.callsites))
        if entry.children is not None:
            lines.extend(_display_sites(entry.children, depth + 1))
    return lines


def _range(start: int, stop: int) -> str:
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start if not length else start + 1},{length}"


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_difference(recorded: Items, built: Built, *, where: str) -> str:
    """The failure message of a record that differs: a unified diff (recorded -> this run), then
    where each added statement ran."""
    old = display(recorded)
    new_sites = _display_sites(built.entries)
    new = [line for line, _ in new_sites]
    lines = [f"querywatch: the SQL statements of this test differ from its snapshot ({where}):"]
    lines += ["--- snapshot", "+++ this run"]
    added: list[int] = []
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for group in matcher.get_grouped_opcodes(3):
        first, last = group[0], group[-1]
        lines.append(f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                lines += [" " + line for line in old[a1:a2]]
                continue
            lines += ["-" + line for line in old[a1:a2]]
            lines += ["+" + line for line in new[b1:b2]]
            added.extend(range(b1, b2))
    located = [(new_sites[i][0].strip(), new_sites[i][1]) for i in added if new_sites[i][1]]
    if located:
        lines.append("added statements ran at:")
        for text, sites in located:
            lines.append(f"  {_clip(text)}")
            lines.extend(f"      {site}" for site in sites[:MAX_CALLSITES_SHOWN])
            if len(sites) > MAX_CALLSITES_SHOWN:
                lines.append(f"      ... and {len(sites) - MAX_CALLSITES_SHOWN} more call sites")
    return "\n".join(lines)


def describe_missing(built: Built, *, where: str) -> str:
    lines = [f"querywatch: this test has no snapshot record ({where}); it ran:"]
    lines += ["  " + line for line in display(built.items)] or ["  (no statements)"]
    return "\n".join(lines)


# --- for any test framework -----------------------------------------------------------------


def _section(built: Built, recorded: dict[str, Items]) -> list[str]:
    """The dialect sections the record of this run is compared with: its dialect, or, for a
    test that ran no statement, every section that holds a record of it."""
    if built.dialect is not None:
        return [built.dialect]
    return sorted(recorded)


#: The last settings given to `_settings`, and what it made of them (validation costs more
#: than the rest of a snapshot).
_last_settings: tuple[Settings, Settings] | None = None


def _settings(settings: Settings | None) -> Settings:
    """`settings` (default: the process-wide ones) keeping enough statements for a record."""
    global _last_settings
    from querywatch._collection import default_settings  # deferred: loaded by the plugin, lazily

    base = settings if settings is not None else default_settings()
    if base.max_queries >= MAX_RECORDED_STATEMENTS:
        return base
    last = _last_settings
    if last is not None and last[0] is base:
        return last[1]
    replaced = base.replace(max_queries=MAX_RECORDED_STATEMENTS)
    _last_settings = (base, replaced)
    return replaced


@dataclass
class Outcome:
    """What checking one test's record found: a failure message (or ""), and the records to
    write ((dialect, test) -> record; new ones and, when updating, changed ones)."""

    message: str = ""
    #: whether a record differs (else what failed was a missing record, in strict mode)
    differs: bool = False
    new: dict[tuple[str, str], Items] = field(default_factory=dict)
    changed: dict[tuple[str, str], Items] = field(default_factory=dict)


def check(
    built: Built,
    records: Records,
    test: str,
    *,
    update: bool,
    strict: bool,
    where: Callable[[str], str],
) -> Outcome:
    """Compare this run's record of `test` with the file's records."""
    outcome = Outcome()
    recorded = {dialect: tests[test] for dialect, tests in records.items() if test in tests}
    items = built.items
    messages: list[str] = []
    for dialect in _section(built, recorded):
        previous = recorded.get(dialect)
        if previous is None:
            if not items:
                continue  # nothing to record
            if strict and not update:
                messages.append(describe_missing(built, where=where(dialect)))
            else:
                outcome.new[(dialect, test)] = items
        elif previous != items:
            if update:
                outcome.changed[(dialect, test)] = items
            else:
                outcome.differs = True
                messages.append(describe_difference(previous, built, where=where(dialect)))
    outcome.message = "\n\n".join(messages)
    return outcome


class assert_query_snapshot:  # used like a function
    """Record the SQL statements a block runs and compare them with a snapshot record.

    `with assert_query_snapshot("tests/test_views.querywatch.yml", "AuthorsTest.test_list"):`
    The record (statement shapes in order, requests under `METHOD /route`) is kept in `path`
    under the engine's dialect and `name`. A missing record is written (unless `strict`); a
    different one raises `QueryAssertionError` with a unified diff and the call sites of the
    added statements; `update=True` rewrites it instead. Usable with `async with` too.
    """

    __slots__ = ("_name", "_path", "_recorder", "_strict", "_unit", "_update")

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        update: bool = False,
        strict: bool = False,
        settings: Settings | None = None,
    ) -> None:
        from querywatch.testing import WatchedUnit  # deferred: loaded by the plugin, lazily

        if not isinstance(name, str) or not name:
            raise TypeError("assert_query_snapshot needs a non-empty record name")
        self._path = Path(path)
        self._name = name
        self._update = update
        self._strict = strict
        self._unit: WatchedUnit = WatchedUnit(name, settings=_settings(settings))
        self._recorder: Recorder | None = None

    def __enter__(self) -> Report:
        report = self._unit.open()
        self._recorder = Recorder(report)
        self._recorder.start()
        return report

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        recorder = self._recorder
        assert recorder is not None, "assert_query_snapshot exited without being entered"
        try:
            self._unit.close(exc_type, exc, tb)
        finally:
            recorder.stop()
        if exc_type is None:
            self._check(recorder)

    async def __aenter__(self) -> Report:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _check(self, recorder: Recorder) -> None:
        from querywatch.testing import QueryAssertionError  # deferred: loaded by the plugin, lazily

        built = build(recorder, whole=True)
        path = self._path
        outcome = check(
            built,
            read_records(path),
            self._name,
            update=self._update,
            strict=self._strict,
            where=lambda dialect: f"{path}, {dialect}: {self._name}",
        )
        changes = {**outcome.new, **outcome.changed}
        if changes:
            update_file(path, changes)
        if outcome.message:
            hint = "rewrite the record if the change is intended" if outcome.differs else "write it"
            hint += ": assert_query_snapshot(..., update=True)"
            raise QueryAssertionError(f"{outcome.message}\n{hint}", report=recorder.report)


# --- the pytest plugin's session part -------------------------------------------------------


def mode_of(item: pytest.Item, *, marker: str, fixture: str, suite_wide: bool) -> str | None:
    """`whole` (record the test), `blocks` (only its named blocks) or None."""
    mark = item.get_closest_marker(marker)
    if mark is not None:
        enabled = mark.args[0] if mark.args else mark.kwargs.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{marker}(enabled): True or False, got {enabled!r}")
    else:
        enabled = suite_wide
    if enabled:
        return "whole"
    if fixture in getattr(item, "fixturenames", ()):
        return "blocks"
    return None


def _test_id(nodeid: str) -> str:
    """The node id within its module: `TestAuthors::test_get[sqlite]`."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


class TestSnapshot:
    """One test's snapshot: its recorder while the body runs, then the check."""

    __test__ = False  # not a test class, whatever pytest's naming rules say

    def __init__(self, session: SnapshotSession, item: pytest.Item, *, whole: bool) -> None:
        self.session = session
        self.nodeid = item.nodeid
        self.test = _test_id(item.nodeid)
        self.path = session.record_path(Path(item.path))
        self.whole = whole
        self.recorder: Recorder | None = None

    def settings(self, settings: Settings | None) -> Settings:
        """The test unit's settings: enough statements kept for the record."""
        return _settings(settings)

    def start(self, report: Report) -> None:
        self.recorder = Recorder(report)
        self.recorder.start()

    def stop(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()

    def block(self, name: str) -> Any:
        if self.recorder is None:
            raise RuntimeError(
                "querywatch_snapshot blocks record the test body: use them in the test, not "
                "in a fixture's setup or teardown"
            )
        return self.recorder.block(name)

    def finish(self) -> str:
        """Check the record of the test body that just passed; the failure message, or ""."""
        self.stop()
        assert self.recorder is not None
        session = self.session
        built = build(self.recorder, whole=self.whole)
        try:
            records = session.records(self.path)
        except SnapshotFileError as exc:
            return f"querywatch: cannot read the snapshot records: {exc}"
        outcome = check(
            built,
            records,
            self.test,
            update=session.update,
            strict=session.strict,
            where=lambda dialect: f"{session.shown(self.path)}, {dialect}: {self.test}",
        )
        session.record(self.path, outcome)
        if not outcome.message:
            return ""
        hint = "rewrite the record if the change is intended" if outcome.differs else "write it"
        return f"{outcome.message}\n{hint}: pytest --querywatch-snapshot-update '{self.nodeid}'"


class SnapshotSession:
    """The snapshot part of a pytest session: the record files it read, what to write at the
    end (under a lock, read afresh: xdist workers share files), and in update runs the records
    of tests that no longer exist."""

    def __init__(
        self,
        config: pytest.Config,
        *,
        update: bool,
        strict: bool,
        directory: Path | None,
    ) -> None:
        self.config = config
        self.rootdir = Path(config.rootpath)
        self.update = update
        self.strict = strict
        self.directory = directory
        self._records: dict[Path, Records] = {}
        self._paths: dict[Path, Path] = {}
        self._changes: dict[Path, dict[tuple[str, str], Items]] = {}
        self.new = 0
        self.changed = 0
        self.removed = 0
        #: update runs: module -> test ids collected (deselected ones included)
        self.collected: dict[Path, set[str]] = {}
        self.collect_failed = False
        #: record files that could not be updated, with the reason
        self.errors: list[str] = []
        self.is_worker = hasattr(config, "workerinput")

    # -- per test

    def test(self, item: pytest.Item, *, whole: bool) -> TestSnapshot:
        return TestSnapshot(self, item, whole=whole)

    def record_path(self, module: Path) -> Path:
        path = self._paths.get(module)
        if path is None:
            path = self._paths[module] = record_path(
                module, directory=self.directory, rootdir=self.rootdir
            )
        return path

    def shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.rootdir))
        except ValueError:
            return str(path)

    def records(self, path: Path) -> Records:
        records = self._records.get(path)
        if records is None:
            records = self._records[path] = read_records(path)
        return records

    def record(self, path: Path, outcome: Outcome) -> None:
        if outcome.new or outcome.changed:
            self._changes.setdefault(path, {}).update({**outcome.new, **outcome.changed})
            self.new += len(outcome.new)
            self.changed += len(outcome.changed)

    # -- stale records (update runs)

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        if self.update:
            self.collected.setdefault(Path(item.path), set()).add(_test_id(item.nodeid))

    def pytest_collectstart(self, collector: pytest.Collector) -> None:
        # A module with no test left still has its record file checked for stale records.
        path = Path(collector.path)
        if self.update and "::" not in collector.nodeid and path.suffix == ".py" and path.is_file():
            self.collected.setdefault(path, set())

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_failed = True  # nothing is stale when not everything was collected

    def _narrowed(self) -> tuple[set[Path], list[Path]]:
        """Modules the command line narrowed to some of their tests, and the directories it
        named (where a record file whose module is gone is stale)."""
        narrowed: set[Path] = set()
        directories: list[Path] = []
        invocation = Path(self.config.invocation_params.dir)
        for arg in self.config.args:
            target = (invocation / arg.split("::", 1)[0]).resolve()
            if "::" in arg:
                narrowed.add(target)
            elif target.is_dir():
                directories.append(target)
        return narrowed, directories

    def _stale_plan(self) -> dict[Path, Callable[[str], bool]]:
        """Record file -> which of its tests still exist, for the files whose tests were all
        collected; a record file whose module is gone keeps nothing."""
        if not self.update or self.collect_failed or self.config.getoption("lf", False):
            return {}
        narrowed, directories = self._narrowed()
        plan: dict[Path, Callable[[str], bool]] = {}
        folders: set[Path] = set()
        for module, tests in self.collected.items():
            resolved = module.resolve()
            if resolved in narrowed:
                continue
            plan[record_path(module, directory=self.directory, rootdir=self.rootdir)] = (
                tests.__contains__
            )
            if any(resolved.parent == d or d in resolved.parents for d in directories):
                folders.add(module.parent)
        for folder in folders:
            mirror = record_path(folder / "x.py", directory=self.directory, rootdir=self.rootdir)
            for record in mirror.parent.glob("*" + SUFFIX):
                module = folder / _module_of(record)
                if record not in plan and not module.exists():
                    plan[record] = lambda test: False
        return plan

    # -- the end

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        plan = self._stale_plan()
        for path in sorted(set(self._changes) | {p for p in plan if p.exists()}):
            try:
                self.removed += update_file(path, self._changes.get(path, {}), keep=plan.get(path))
            except (SnapshotFileError, OSError) as exc:
                self.errors.append(f"{self.shown(path)} not updated: {exc}")
        if self.is_worker:
            output = getattr(self.config, "workeroutput", None)
            if output is not None:
                output["querywatch_snapshots"] = (
                    self.new,
                    self.changed,
                    self.removed,
                    self.errors,
                )

    def add_worker(self, output: dict[str, Any]) -> None:
        """Add what a pytest-xdist worker wrote and removed (in the controller)."""
        counts = output.get("querywatch_snapshots")
        if counts:
            new, changed, removed, errors = counts
            self.new += new
            self.changed += changed
            self.removed += removed
            self.errors.extend(errors)

    def summary(self) -> list[str]:
        lines: list[str] = list(self.errors)
        if self.new:
            lines.append(f"{self.new} new snapshot record{'s' if self.new != 1 else ''} written")
        if self.changed:
            s = "s" if self.changed != 1 else ""
            lines.append(f"{self.changed} snapshot record{s} rewritten")
        if self.removed:
            s = "s" if self.removed != 1 else ""
            lines.append(f"{self.removed} stale snapshot record{s} removed")
        return lines

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.summary()
        if lines:
            terminalreporter.write_sep("=", "querywatch snapshots")
            for line in lines:
                terminalreporter.write_line(line)


class SnapshotBlocks:
    """What the `querywatch_snapshot` fixture gives a test: `with querywatch_snapshot("after
    login"):` records the block's statements under that name in the test's snapshot."""

    def __init__(self, current: Callable[[], TestSnapshot | None]) -> None:
        self._current = current

    def __call__(self, name: str) -> _Block:
        return _Block(self._current, name)


class _Block:
    __slots__ = ("_context", "_current", "_name")

    def __init__(self, current: Callable[[], TestSnapshot | None], name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise TypeError("a snapshot block needs a non-empty name")
        self._current = current
        self._name = name
        self._context: Any = None

    def __enter__(self) -> None:
        snapshot = self._current()
        if snapshot is None:
            raise RuntimeError(
                "querywatch_snapshot blocks record the test body: use them in the test, not "
                "in a fixture's setup or teardown"
            )
        self._context = snapshot.block(self._name)
        self._context.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._context.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
