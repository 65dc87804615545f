"""What querywatch reports: one frozen dataclass per finding kind, each describing itself.

Every finding has a stable `id` (a hash of its kind, its subject and its call site, never of
parameter values) so users can baseline and allowlist it, a `describe()` line for humans and
exception messages, and `as_log_fields()` with JSON-friendly values for structured logs. Each
class also owns what the rest of querywatch says about it - its `subject`, `headline`, `fix`,
`baseline_key`, `allowlist_keys` and log `level` - so nobody else dispatches on `kind` strings.

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

__all__ = [
    "MAX_PARAMETER_EXAMPLES",
    "MAX_PARAMETER_LENGTH",
    "BulkWriteFinding",
    "ConnectionLeakFinding",
    "DuplicateQueryFinding",
    "Finding",
    "LazyLoadAfterCloseFinding",
    "NPlusOneFinding",
    "StaleAllowlistFinding",
    "StatementFinding",
    "finding_id",
    "parameter_example",
]

#: Example parameter sets a finding carries when `Settings.log_parameters` is on.
MAX_PARAMETER_EXAMPLES = 3
#: Longest example parameter set, in characters.
MAX_PARAMETER_LENGTH = 200


def finding_id(kind: str, subject: str, callsite: str | None) -> str:
    """A stable 12-hex-digit id for a finding: the same problem in the same function, same
    id. Line numbers are left out, so that an edit elsewhere in the file keeps the id (and the
    baselines and allowlists that use it)."""
    key = (kind, subject, callsite)
    known = _finding_ids.get(key)
    if known is not None:  # the same finding on every request of a route
        return known
    raw = f"{kind}\x00{subject}\x00{stable_site(callsite)}".encode("utf-8", "replace")
    made = hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:12]
    if len(subject) <= _MAX_REMEMBERED_SUBJECT:  # a fingerprint may be long: not kept
        if len(_finding_ids) >= _MAX_FINDING_IDS:
            _finding_ids.clear()
        _finding_ids[key] = made
    return made


#: (kind, subject, call site) -> finding id, for findings that recur; bounded.
_finding_ids: dict[tuple[str, str, str | None], str] = {}
_MAX_FINDING_IDS = 4096
_MAX_REMEMBERED_SUBJECT = 1000


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
    #: The level of that event: `warning`, or `error` for what already failed in the app.
    level: ClassVar[str] = "warning"
    #: Whether it explains a statement count (a budget failure lists it as a likely cause).
    explains_statements: ClassVar[bool] = False

    id: str
    callsite: str | None

    @classmethod
    def id_for(cls, subject: str, callsite: str | None) -> str:
        """The `id` of a finding of this class about `subject` at `callsite` (`finding_id`)."""
        return finding_id(cls.kind, subject, callsite)

    def describe(self) -> str:  # pragma: no cover - every subclass overrides
        return f"{self.kind} at {self.callsite}"

    @property
    def subject(self) -> str:  # pragma: no cover - every subclass overrides
        """What the finding is about, in a few words (a relationship, a statement shape...)."""
        return self.kind

    @property
    def headline(self) -> str:
        """One line saying what happened, without where or the fix (test failure messages)."""
        return self.describe()

    @property
    def fix(self) -> str:  # pragma: no cover - every subclass overrides
        """How to fix it."""
        return ""

    @property
    def statement(self) -> str | None:
        """The statement shape involved, when there is one."""
        return None

    @property
    def phase(self) -> str:
        """Where in the unit it happened: `handler`, or `serialization` while a response was
        being built."""
        return "handler"

    @property
    def where(self) -> str:
        """The call site, or `unknown call site`."""
        return self.callsite or "unknown call site"

    @property
    def baseline_key(self) -> str:
        """What a baseline file says the finding is (for the humans reading it; the id is the
        key that matches)."""
        return self.subject[:200]

    @property
    def allowlist_keys(self) -> frozenset[str]:
        """The allowlist entries that hide it exactly (call-site globs match besides)."""
        return frozenset((self.id,))

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
class StatementFinding(Finding):
    """Base of the findings about one statement shape run too often: N+1, bulk writes,
    duplicates."""

    explains_statements: ClassVar[bool] = True

    fingerprint: str
    operation: str
    count: int
    seconds: float
    suggestion: str

    @property
    def subject(self) -> str:
        return self.fingerprint[:120]

    @property
    def fix(self) -> str:
        return self.suggestion

    @property
    def statement(self) -> str | None:
        return self.fingerprint or None

    @property
    def baseline_key(self) -> str:
        return self.fingerprint[:200]

    @property
    def allowlist_keys(self) -> frozenset[str]:
        keys = super().allowlist_keys
        return keys | {self.fingerprint} if self.fingerprint else keys

    @property
    def _ms(self) -> str:
        return f"{self.seconds * 1000:.1f} ms"


@dataclass(frozen=True)
class NPlusOneFinding(StatementFinding):
    """One statement shape run once per object of a loop: lazy loads or a per-item query."""

    kind: ClassVar[str] = "n_plus_one"
    event: ClassVar[str] = "querywatch.n_plus_one"

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

    @property
    def subject(self) -> str:
        """The relationship, the reloaded attributes of a model, or the statement shape."""
        if self.relationship:
            return self.relationship
        if self.model:
            return f"{self._reloaded} attributes of {self.model} ({', '.join(self.attributes)})"
        return self.fingerprint[:120]

    @property
    def _reloaded(self) -> str:
        return "expired" if self.pattern == "expired_load" else "deferred"

    def describe(self) -> str:
        return (
            f"N+1: {self.subject} ran {self.count} times at {self.where} "
            f"({self._ms}); fix: {self.suggestion}"
        )

    @property
    def headline(self) -> str:
        if self.relationship:
            return f"N+1: {self.relationship} lazy-loaded {self.count} times ({self._ms})"
        if self.model:
            verb = "reloaded" if self.pattern == "expired_load" else "loaded"
            return f"N+1: {self.subject} {verb} {self.count} times ({self._ms})"
        return f"N+1: one statement ran {self.count} times from one call site ({self._ms})"

    @property
    def baseline_key(self) -> str:
        return (self.relationship or self.fingerprint)[:200]

    @property
    def allowlist_keys(self) -> frozenset[str]:
        keys = set(super().allowlist_keys)
        if self.relationship:
            keys.add(self.relationship)
        if self.model:
            keys.add(self.model)
        keys.update(f"{self.model}.{attribute}" for attribute in self.attributes)
        return frozenset(keys)


@dataclass(frozen=True)
class BulkWriteFinding(StatementFinding):
    """One INSERT/UPDATE/DELETE shape executed once per item of a loop: a bulk candidate."""

    kind: ClassVar[str] = "bulk_write"
    event: ClassVar[str] = "querywatch.bulk_write"

    #: Examples of the bound parameters (only with `Settings.log_parameters`).
    parameters: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"{self.operation} in a loop: {self.count} statements at {self.where}; "
            f"fix: {self.suggestion}"
        )

    @property
    def headline(self) -> str:
        return f"{self.operation} in a loop: {self.count} statements ({self._ms})"


@dataclass(frozen=True)
class DuplicateQueryFinding(StatementFinding):
    """A read repeated with identical parameters in the same transaction, with nothing
    written in between: the unit could have answered it from what it already had."""

    kind: ClassVar[str] = "duplicate_query"
    event: ClassVar[str] = "querywatch.duplicate_query"

    #: Examples of the repeated bound parameters (only with `Settings.log_parameters`).
    parameters: tuple[str, ...] = ()
    #: Every call site that ran the statement, the first execution's first.
    callsites: tuple[str, ...] = ()
    #: When every execution ran at one line (a shared helper): the lines that called it.
    callers: tuple[str, ...] = ()

    def describe(self) -> str:
        sites = ", then ".join(self.callsites) or self.where
        if self.callers:
            sites += f" (called from {', then '.join(self.callers)})"
        return (
            f"duplicate query: the same statement with the same parameters ran {self.count} "
            f"times in one transaction with nothing written in between, at {sites}: "
            f"{self.subject}; fix: {self.suggestion}"
        )

    @property
    def headline(self) -> str:
        return f"duplicate query: ran {self.count} times with the same parameters"


@dataclass(frozen=True)
class LazyLoadAfterCloseFinding(Finding):
    """An unloaded attribute touched on an object whose session is gone (or outside a greenlet)."""

    kind: ClassVar[str] = "lazy_load_after_close"
    event: ClassVar[str] = "querywatch.lazy_load_after_close"
    level: ClassVar[str] = "error"

    model: str
    attribute: str
    #: `DetachedInstanceError` or `MissingGreenlet`.
    error: str
    suggestion: str
    phase: str = "handler"
    #: Times it happened at this call site in the unit of work.
    count: int = 1

    @property
    def subject(self) -> str:
        """`Model.attribute`."""
        return f"{self.model}.{self.attribute}"

    @property
    def fix(self) -> str:
        return self.suggestion

    def describe(self) -> str:
        return (
            f"lazy load after close: {self.subject} ({self.error}) at {self.where}; "
            f"fix: {self.suggestion}"
        )

    @property
    def headline(self) -> str:
        return f"lazy load after close: {self.subject} ({self.error})"

    @property
    def allowlist_keys(self) -> frozenset[str]:
        if not self.model:
            return super().allowlist_keys
        return frozenset((self.id, self.model, self.subject))


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

    @property
    def subject(self) -> str:
        """The pool's name."""
        return self.pool

    @property
    def fix(self) -> str:
        return self.suggestion

    @property
    def headline(self) -> str:
        opened = self.opened_at or self.where
        return (
            f"connection leak: a connection of pool {self.pool!r} still checked out when the "
            f"unit ended, held by the {self.owner} opened at {opened}"
        )

    def describe(self) -> str:
        several = self.connections != 1
        what = f"{self.connections} connections" if several else "a connection"
        was = "were" if several else "was"
        opened = self.opened_at or self.where
        unit = f" {self.unit!r}" if self.unit else ""
        if self.owner == "Connection":
            held = f"the Connection{'s' if several else ''} opened at {opened}"
        else:
            article = "an" if self.owner[:1] in "AEIOU" else "a"
            owners = f"{self.owner}s" if several else f"{article} {self.owner}"
            them = "them" if several else "it"
            held = f"{owners} opened at {opened} (which checked {them} out at {self.where})"
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

    @property
    def subject(self) -> str:
        """The allowlist entry."""
        return self.entry

    @property
    def fix(self) -> str:
        return self.suggestion

    def describe(self) -> str:
        return f"stale allowlist entry {self.entry!r} matched nothing; fix: {self.suggestion}"
