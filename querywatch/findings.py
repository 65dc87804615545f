"""What querywatch reports: one frozen dataclass per finding kind.

Every finding has a stable `id` (a hash of its kind, its subject and its call site, never of
parameter values) so users can baseline and allowlist it, a `describe()` line for humans and
exception messages, and `as_log_fields()` with JSON-friendly values for structured logs.

Findings about statements carry bound parameter values only when `Settings.log_parameters` is
on: a few examples, each a `repr` cut to `MAX_PARAMETER_LENGTH` characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import reprlib
from dataclasses import dataclass
from typing import Any, ClassVar

from querywatch._callsite import stable_site

#: Example parameter sets a finding carries when `Settings.log_parameters` is on.
MAX_PARAMETER_EXAMPLES = 3
#: Longest example parameter set, in characters.
MAX_PARAMETER_LENGTH = 200


def finding_id(kind: str, subject: str, callsite: str | None) -> str:
    """A stable 12-hex-digit id for a finding: the same problem in the same function, same
    id. Line numbers are left out, so that an edit elsewhere in the file keeps the id (and the
    baselines and allowlists that use it)."""
    raw = f"{kind}\x00{subject}\x00{stable_site(callsite)}".encode("utf-8", "replace")
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:12]


class _ParameterRepr(reprlib.Repr):
    """`reprlib` with byte strings cut before they are copied, like `str` already is: the
    cost of an example never depends on the size of a value."""

    def __init__(self) -> None:
        super().__init__()
        # Several values fit in one example; the example as a whole is cut afterwards.
        self.maxlevel = 3
        self.maxstring = self.maxother = 80
        self.maxlong = 40

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return self.repr_bytes(bytes(x[: self.maxstring + 1]), level)


_parameter_repr = _ParameterRepr()


def parameter_example(parameters: Any) -> str:
    """A bounded `repr` of one statement's bound parameters (at most `MAX_PARAMETER_LENGTH`
    characters, whatever the size of the values); never raises."""
    try:
        text = _parameter_repr.repr(parameters)
    except Exception:  # reprlib guards `__repr__` of objects, not of containers' own code
        text = f"<{type(parameters).__name__}>"
    if len(text) > MAX_PARAMETER_LENGTH:
        text = text[: MAX_PARAMETER_LENGTH - 3] + "..."
    return text


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [truncated {len(text) - limit} chars]"


@dataclass(frozen=True)
class Finding:
    """Base of every finding."""

    kind: ClassVar[str] = "finding"
    #: The log event emitted for this finding kind.
    event: ClassVar[str] = "querywatch.finding"

    id: str
    callsite: str | None

    def describe(self) -> str:  # pragma: no cover - every subclass overrides
        return f"{self.kind} at {self.callsite}"

    def as_log_fields(self, *, max_sql_length: int = 2000) -> dict[str, Any]:
        """The finding's fields as JSON-friendly values; statement shapes are clipped."""
        fields: dict[str, Any] = {"finding_id": self.id, "kind": self.kind}
        for f in dataclasses.fields(self):
            if f.name == "id":
                continue
            value = getattr(self, f.name)
            if f.name == "fingerprint" and isinstance(value, str):
                value = _clip(value, max_sql_length)
            elif f.name == "parameters" and not value:
                continue  # only with `Settings.log_parameters`: absent, not empty, otherwise
            elif isinstance(value, float):
                value = round(value, 6)
            elif isinstance(value, tuple):
                value = list(value)
            fields[f.name] = value
        return fields


@dataclass(frozen=True)
class NPlusOneFinding(Finding):
    """One statement shape run once per object of a loop: lazy loads or a per-item query."""

    kind: ClassVar[str] = "n_plus_one"
    event: ClassVar[str] = "querywatch.n_plus_one"

    fingerprint: str
    operation: str
    count: int
    seconds: float
    suggestion: str
    #: `Author.books` for an ORM lazy load, `None` for a statement-shape (backstop) finding.
    relationship: str | None = None
    #: `lazy_load`, `expired_load`, `deferred_load`, `statement_loop`.
    pattern: str = "statement_loop"
    #: Where the loads ran: `handler`, or `serialization` while a response was being built.
    phase: str = "handler"
    #: The model whose expired or deferred attributes were reloaded (`None` otherwise).
    model: str | None = None
    #: The attributes touched that triggered those reloads, sorted.
    attributes: tuple[str, ...] = ()
    #: Distinct parent objects (lazy loads) or distinct parameter sets (statement loops).
    distinct: int = 0
    #: Examples of the bound parameters (only with `Settings.log_parameters`).
    parameters: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.relationship:
            subject = self.relationship
        elif self.model:
            kind = "expired" if self.pattern == "expired_load" else "deferred"
            subject = f"{kind} attributes of {self.model} ({', '.join(self.attributes)})"
        else:
            subject = self.fingerprint[:120]
        return (
            f"N+1: {subject} ran {self.count} times at {self.callsite or 'unknown call site'} "
            f"({self.seconds * 1000:.1f} ms); fix: {self.suggestion}"
        )


@dataclass(frozen=True)
class BulkWriteFinding(Finding):
    """One INSERT/UPDATE/DELETE shape executed once per item of a loop: a bulk candidate."""

    kind: ClassVar[str] = "bulk_write"
    event: ClassVar[str] = "querywatch.bulk_write"

    fingerprint: str
    operation: str
    count: int
    seconds: float
    suggestion: str
    #: Examples of the bound parameters (only with `Settings.log_parameters`).
    parameters: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"{self.operation} in a loop: {self.count} statements at "
            f"{self.callsite or 'unknown call site'}; fix: {self.suggestion}"
        )


@dataclass(frozen=True)
class DuplicateQueryFinding(Finding):
    """A read repeated with identical parameters in the same transaction, with nothing
    written in between: the unit could have answered it from what it already had."""

    kind: ClassVar[str] = "duplicate_query"
    event: ClassVar[str] = "querywatch.duplicate_query"

    fingerprint: str
    operation: str
    count: int
    seconds: float
    suggestion: str
    #: Examples of the repeated bound parameters (only with `Settings.log_parameters`).
    parameters: tuple[str, ...] = ()
    #: Every call site that ran the statement, the first execution's first.
    callsites: tuple[str, ...] = ()
    #: When every execution ran at one line (a shared helper): the lines that called it.
    callers: tuple[str, ...] = ()

    def describe(self) -> str:
        sites = ", then ".join(self.callsites) or self.callsite or "unknown call site"
        if self.callers:
            sites += f" (called from {', then '.join(self.callers)})"
        return (
            f"duplicate query: the same statement with the same parameters ran {self.count} "
            f"times in one transaction with nothing written in between, at {sites}: "
            f"{self.fingerprint[:120]}; fix: {self.suggestion}"
        )


@dataclass(frozen=True)
class LazyLoadAfterCloseFinding(Finding):
    """An unloaded attribute touched on an object whose session is gone (or outside a greenlet)."""

    kind: ClassVar[str] = "lazy_load_after_close"
    event: ClassVar[str] = "querywatch.lazy_load_after_close"

    model: str
    attribute: str
    #: `DetachedInstanceError` or `MissingGreenlet`.
    error: str
    suggestion: str
    phase: str = "handler"
    #: Times it happened at this call site in the unit of work.
    count: int = 1

    def describe(self) -> str:
        return (
            f"lazy load after close: {self.model}.{self.attribute} ({self.error}) at "
            f"{self.callsite or 'unknown call site'}; fix: {self.suggestion}"
        )


@dataclass(frozen=True)
class ConnectionLeakFinding(Finding):
    """A connection still checked out when its unit of work ended, held by a Session or
    Connection opened during that unit (one opened before it began is not its leak).

    `callsite` is the line that checked the connection out; `opened_at` is where its owner was
    opened - for a Connection (`engine.connect()`) the same line, for a Session the line that
    created it, which is where the fix goes."""

    kind: ClassVar[str] = "connection_leak"
    event: ClassVar[str] = "querywatch.connection_leak"

    pool: str
    held_seconds: float
    suggestion: str
    #: The unit of work the connection leaked from (`GET /items/{id}`, a `watch()` name).
    unit: str | None = None
    #: Connections leaked from this owner's call site in the unit of work.
    connections: int = 1
    #: What holds the connection: `Session`, `AsyncSession` (or a Session subclass's name), or
    #: `Connection` (`engine.connect()`, `engine.raw_connection()`).
    owner: str = "Connection"
    #: Where the owner was opened (the Session created, the Connection checked out).
    opened_at: str | None = None

    def describe(self) -> str:
        several = self.connections != 1
        what = f"{self.connections} connections" if several else "a connection"
        was = "were" if several else "was"
        opened = self.opened_at or self.callsite or "unknown call site"
        unit = f" {self.unit!r}" if self.unit else ""
        if self.owner == "Connection":
            held = f"the Connection{'s' if several else ''} opened at {opened}"
        else:
            article = "an" if self.owner[:1] in "AEIOU" else "a"
            owners = f"{self.owner}s" if several else f"{article} {self.owner}"
            them = "them" if several else "it"
            checked_out = self.callsite or "unknown call site"
            held = f"{owners} opened at {opened} (which checked {them} out at {checked_out})"
        return (
            f"connection leak: {what} of pool {self.pool!r} {was} still checked out when the "
            f"unit of work{unit} ended ({self.held_seconds:.2f} s), held by {held}; "
            f"fix: {self.suggestion}"
        )


@dataclass(frozen=True)
class StaleAllowlistFinding(Finding):
    """An allowlist entry that matched no finding in a unit of work (reported only when
    `Settings.report_stale_allowlist` is on): the problem it hid is gone, or it is mistyped."""

    kind: ClassVar[str] = "stale_allowlist_entry"
    event: ClassVar[str] = "querywatch.stale_allowlist_entry"

    entry: str
    suggestion: str

    def describe(self) -> str:
        return f"stale allowlist entry {self.entry!r} matched nothing; fix: {self.suggestion}"
