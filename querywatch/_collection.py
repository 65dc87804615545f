"""Units of work: the collector the statement, ORM and pool hooks record into, `watch()`, and
the `Report`.

Data flows one way. The hooks record into the collector of the current unit of work (a
ContextVar, default `None`, set and reset only by `watch()`, the middleware and the pytest
plugin). When the unit ends, the stages it was given run - the pool's leak check, then the
detectors (`add_finisher`, `add_detector`, wired by `querywatch.instrument()`) - the report is
final, and the reporters (`add_reporter`: structlog, Prometheus, OpenTelemetry) receive it. This
module imports none of them.

Nesting: a unit opened inside another is its own unit. Everything it records also counts in
every enclosing unit (a request's statement count includes the job it ran inline, and a test's
report includes the requests it made), while each finding is *reported* (logged, counted in
metrics) once, by the innermost unit that found it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain, groupby, repeat
from operator import itemgetter, sub
from types import TracebackType
from typing import Any, TypeVar, cast
from uuid import UUID

from querywatch import _callsite, _guard, _statements, fingerprinting
from querywatch._callsite import Where
from querywatch._guard import internal_error
from querywatch.exceptions import FindingsDetected, warn_finding
from querywatch.exceptions import QueryWatchWarning as QueryWatchWarning  # it lived here
from querywatch.findings import (
    MAX_PARAMETER_EXAMPLES,
    BulkWriteFinding,
    ConnectionLeakFinding,
    DuplicateQueryFinding,
    Finding,
    LazyLoadAfterCloseFinding,
    NPlusOneFinding,
    parameter_example,
)
from querywatch.fingerprinting import StatementShape, cache_for, dialect_key, shape_of
from querywatch.settings import DEFAULT_SETTINGS, Mode, Settings

__all__ = [
    "Collector",
    "HttpRequest",
    "PoolReport",
    "Query",
    "Report",
    "ShapeDurations",
    "StatementDuration",
    "add_reporter",
    "configure",
    "current_report",
    "watch",
]

_D = TypeVar("_D")

#: Upper bounds of `querywatch_db_statement_duration_seconds`, in seconds.
STATEMENT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Statements buffered by the hot path before they are folded into the shapes.
FOLD_EVERY = 256

#: Distinct parameter sets remembered per statement shape (for duplicate detection).
MAX_PARAMETER_KEYS = 1024
#: Distinct call sites remembered per statement shape.
MAX_CALLSITES = 64
#: Durations kept of statements whose shape was first seen on another engine.
MAX_OTHER_POOL_DURATIONS = 1024

#: The collector of the unit of work running in this context: what the capture hooks record into.
current_unit: ContextVar[Collector | None] = ContextVar("querywatch_collector", default=None)
#: The parent of units opened where no unit is current (a thread that did not inherit the
#: context): the pytest plugin's test unit, so that requests a `TestClient` serves from its
#: portal thread count toward the test whichever way anyio propagates the context.
_fallback_parent: Collector | None = None

_settings = DEFAULT_SETTINGS
_reporters: list[Callable[[Report], None]] = []
#: What runs when a unit of work ends, before its findings are detected: (guard component,
#: function) - the pool's leak check. Given by `querywatch.instrument()`: this module imports
#: none of the stages it runs.
_finishers: list[tuple[str, Callable[[Collector], None]]] = []
#: The detectors: a finished unit's record -> its findings (given by `querywatch.instrument()`).
_detectors: list[Callable[[Collector], list[Finding]]] = []


def add_finisher(component: str, finish: Callable[[Collector], None]) -> None:
    """Run `finish(collector)` when each unit of work ends, before detection (once, however
    often it is added). Errors are the guard's, under `component`."""
    if (component, finish) not in _finishers:
        _finishers.append((component, finish))


def add_detector(detect: Callable[[Collector], list[Finding]]) -> None:
    """Run `detect(collector)` when each unit of work ends: its findings are the unit's (once,
    however often it is added)."""
    if detect not in _detectors:
        _detectors.append(detect)


def configure(settings: Settings) -> None:
    """Make `settings` the default of every unit of work opened from now on."""
    global _settings
    if not isinstance(settings, Settings):
        raise TypeError(f"configure() takes a querywatch.Settings, got {type(settings).__name__}")
    _settings = settings
    fingerprinting.configure_cache(settings.fingerprint_cache_size)
    _callsite.set_project_root(settings.project_root)


def default_settings() -> Settings:
    """The settings a unit of work gets when it is given none."""
    return _settings


def add_reporter(reporter: Callable[[Report], None]) -> Callable[[], None]:
    """Call `reporter(report)` for every finished unit of work; returns the removal function."""
    _reporters.append(reporter)

    def remove() -> None:
        if reporter in _reporters:
            _reporters.remove(reporter)

    return remove


@dataclass(frozen=True)
class Query:
    """One statement kept on the report (up to `Settings.max_queries` per unit of work)."""

    fingerprint: str
    operation: str
    seconds: float
    pool: str
    #: The line of user code that ran it (`path:LINE in function`), when there was one.
    callsite: str | None = None


class Site:
    """Executions of one statement shape from one call site."""

    __slots__ = ("count", "examples", "filter_keys", "in_lengths", "parameter_keys", "seconds")

    def __init__(self, info: ShapeInfo) -> None:
        self.count = 0
        self.seconds = 0.0
        #: hashes of the distinct (statement, parameters) executed here
        self.parameter_keys: set[int] = set()
        #: for a paged shape: hashes of the distinct values that select rows (the parameters
        #: without LIMIT, OFFSET and keyset values); None for other shapes
        self.filter_keys: set[int | None] | None = set() if info.paged else None
        #: for a shape with an IN list: list length -> executions; None for other shapes
        self.in_lengths: dict[int, int] | None = {} if info.in_list else None
        #: parameter hash -> clipped repr of the first distinct parameter sets, only when
        #: `Settings.log_parameters` is on (see `Collector.fold`)
        self.examples: dict[int | None, str] | None = None


class ShapeInfo:
    """What a statement shape does, read once from its fingerprint (shared by every unit)."""

    __slots__ = ("boundary", "in_list", "paged", "reads", "table", "tables", "written")

    def __init__(self, fingerprint: str, operation: str) -> None:
        self.reads = operation == "SELECT"
        self.tables = _statements.tables_read(fingerprint) if self.reads else frozenset()
        #: the one table read, when there is exactly one
        self.table = next(iter(self.tables)) if len(self.tables) == 1 else ""
        self.written = (
            _statements.table_written(fingerprint)
            if operation in ("INSERT", "UPDATE", "DELETE")
            else None
        )
        self.boundary = operation == "OTHER" and _statements.is_boundary(fingerprint)
        self.paged = self.reads and _statements.is_paged(fingerprint)
        self.in_list = " in (?)" in fingerprint or "any(?)" in fingerprint


_MAX_SHAPE_INFOS = 4096
_shape_infos: dict[str, ShapeInfo] = {}


def shape_info(fingerprint: str, operation: str) -> ShapeInfo:
    info = _shape_infos.get(fingerprint)
    if info is None:
        info = ShapeInfo(fingerprint, operation)
        if len(_shape_infos) >= _MAX_SHAPE_INFOS:
            _shape_infos.clear()
        _shape_infos[fingerprint] = info
    return info


#: A read repeated after this many seconds of idle time (not spent in the database) is a
#: deliberate re-read - a polling loop that waits for a change made elsewhere - not a duplicate.
#: Long enough that a garbage-collection pause or a busy CPU between two reads is not taken
#: for a wait (which would hide a real duplicate).
POLL_INTERVAL = 0.2
#: Call sites (with their callers) remembered per duplicated statement.
MAX_DUPLICATE_SITES = 8


class Duplicate:
    """Redundant executions of one statement with one parameter set: repeats in the same
    transaction, with no write in between, that the unit could have answered itself."""

    __slots__ = ("examples", "most", "redundant", "wheres")

    def __init__(self, first: Where) -> None:
        #: the longest run of identical executions
        self.most = 1
        #: executions that repeated an earlier one
        self.redundant = 0
        #: (call site, caller) of the executions involved, first one first
        self.wheres: list[Where] = [first]
        #: a clipped repr of the parameters (`Settings.log_parameters` only)
        self.examples: str | None = None


class Shape:
    """What one unit of work executed of one statement shape."""

    __slots__ = (
        "bucket_seconds",
        "buckets",
        "count",
        "duplicates",
        "fingerprint",
        "info",
        "last",
        "operation",
        "pool",
        "seconds",
        "sites",
    )

    def __init__(self, fingerprint: str, operation: str, pool: str) -> None:
        self.fingerprint = fingerprint
        self.operation = operation
        self.pool = pool
        self.info = shape_info(fingerprint, operation)
        self.count = 0
        self.seconds = 0.0
        #: executions of the innermost unit per bucket of STATEMENT_BUCKETS (+Inf last)
        self.buckets = [0] * (len(STATEMENT_BUCKETS) + 1)
        #: total seconds of the executions counted in `buckets` (the histogram's sum)
        self.bucket_seconds = 0.0
        #: parameter hash -> (state the read saw, its idle clock - wall time not spent running
        #: statements, where, length of its run of identical reads); never the values
        self.last: dict[int, tuple[tuple[Any, int, int], float, Where, int]] = {}
        #: parameter hash -> its redundant repeats
        self.duplicates: dict[int, Duplicate] = {}
        #: call site -> executions there
        self.sites: dict[str | None, Site] = {}


class LazyGroup:
    """Lazy loads of one relationship (or expired attributes of one model) from one call site."""

    __slots__ = (
        "attributes",
        "count",
        "fingerprint",
        "parents",
        "pattern",
        "phases",
        "seconds",
        "subject",
        "suggestion",
    )

    def __init__(self, subject: str, pattern: str) -> None:
        self.subject = subject
        self.pattern = pattern
        self.count = 0
        self.seconds = 0.0
        self.fingerprint = ""
        self.parents: set[int] = set()
        self.phases: dict[str, int] = {}
        #: the attributes whose loads were counted (the relationship's key, or expired columns)
        self.attributes: set[str] = set()
        #: the fix, worked out once when the group is created
        self.suggestion = ""


class PoolUsage:
    """Connection-pool activity of one unit of work."""

    __slots__ = ("checkouts", "held", "leaked", "max_held", "timeouts", "wait_seconds")

    def __init__(self) -> None:
        self.checkouts = 0
        self.wait_seconds = 0.0
        self.timeouts = 0
        self.max_held = 0
        #: id(connection record) -> (pool name, checkout time, call site or None, owner): the
        #: owner is None for the Connection that checked it out, else a Session's (type name,
        #: call site where it was opened); see `querywatch.pool`
        self.held: dict[int, tuple[str, float, str | None, tuple[str, str | None] | None]] = {}
        self.leaked: list[ConnectionLeakFinding] = []


@dataclass(frozen=True)
class HttpRequest:
    """The HTTP request a unit of work served (`Report.http`)."""

    method: str
    #: the route template (`/authors/{author_id}`), never the raw path
    route: str
    #: the raw path, as the client sent it (not a metric label: unbounded)
    path: str
    #: the response status; 499 when the client went away first, 500 on an exception
    status: int
    request_id: str
    #: the client disconnected before the response was complete
    disconnected: bool = False
    #: the exception class name, when the app raised
    error: str | None = None


def frozen(cls: type[_D], /, **fields: Any) -> _D:
    """An instance of the frozen (dict-based) dataclass `cls` with every one of its `fields`
    given, made without its `__init__`, which sets each field through `object.__setattr__`
    (two thirds of its cost). For the records made once per unit of work: `HttpRequest`,
    `PoolReport`, `ShapeDurations`."""
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


def http_request(
    method: str,
    route: str,
    path: str,
    status: int,
    request_id: str,
    disconnected: bool,
    error: str | None,
) -> HttpRequest:
    """`HttpRequest(...)`, as fast as `frozen()` makes it (the middleware makes one per
    request)."""
    return frozen(
        HttpRequest,
        method=method,
        route=route,
        path=path,
        status=status,
        request_id=request_id,
        disconnected=disconnected,
        error=error,
    )


@dataclass(frozen=True)
class PoolReport:
    """The pool figures of a unit of work."""

    checkouts: int
    wait_seconds: float
    timeouts: int
    max_held: int
    #: Connections still checked out when the unit ended (its leaks).
    leaked: int


@dataclass(frozen=True)
class ShapeDurations:
    """The durations of one statement shape's executions in a unit of work itself (not in
    the units nested in it), counted per bucket of `STATEMENT_BUCKETS`."""

    pool: str
    operation: str
    #: Executions per bucket of `STATEMENT_BUCKETS`, not cumulative, the +Inf bucket last.
    buckets: tuple[int, ...]
    #: Total seconds of those executions.
    seconds: float


@dataclass(frozen=True)
class StatementDuration:
    """One statement of a unit of work whose shape was first seen on another engine's pool
    (kept one by one, up to `MAX_OTHER_POOL_DURATIONS`)."""

    pool: str
    operation: str
    seconds: float


#: One recorded execution, as the hot path appends it: (statement, parameters, start time,
#: seconds, (pool name, SQLAlchemy dialect), (call site, caller), transaction serial).
Pending = tuple[str, Any, float, float, tuple[str, Any], Where, "int | None"]


class Collector:
    """The mutable record of one unit of work: statement hooks append to it, the fold turns
    what they appended into shapes, and the detectors read it when the unit ends."""

    __slots__ = (
        "__weakref__",
        "_report",
        "_report_ref",
        "active",
        "after_close",
        "barrier",
        "chain",
        "counted",
        "db_clock",
        "db_counted",
        "failed_statements",
        "findings",
        "finished",
        "http",
        "kept",
        "kind",
        "last_context",
        "last_page",
        "lazy",
        "lock",
        "max_queries",
        "max_shapes",
        "metrics",
        "name",
        "nested_finding_ids",
        "other_pool_durations",
        "parent",
        "pending",
        "phase",
        "pool",
        "queries",
        "settings",
        "shapes",
        "started",
        "table_writes",
        "unfolded",
        "untracked_statements",
        "writes",
    )  # fmt: skip

    def __init__(
        self, name: str, settings: Settings, parent: Collector | None, kind: str = "job"
    ) -> None:
        self.name = name
        self.kind = kind
        self.settings = settings
        self.parent = parent
        self.chain: tuple[Collector, ...] = (self, *parent.chain) if parent else (self,)
        #: The Prometheus metrics this unit records into, set by the middleware that serves it
        #: (and inherited by units nested in it); None: every registry metrics were installed in.
        self.metrics: tuple[Any, ...] | None = parent.metrics if parent else None
        self.started = time.perf_counter()
        self.finished: float | None = None
        #: Recording: enabled by the settings and not yet finished. The hot path reads only this.
        self.active = settings.enabled
        self.max_queries = settings.max_queries
        self.max_shapes = settings.max_shapes
        #: Statements and their database time, folded into this unit (its own and, once they
        #: fold, those of the units nested in it); `statements` adds what is pending.
        self.counted = 0
        self.db_counted = 0.0
        self.failed_statements = 0
        #: Taken by whatever updates this unit other than the statement hook's append: the
        #: fold, the ORM and pool hooks, the rare paths. Several threads may write one unit (a
        #: request fanning out with a copied context); the hook's one `list.append` is atomic,
        #: and everything else is done under this lock, so counts stay exact.
        self.lock = threading.RLock()
        #: The first `max_queries` statements, a run at a time: (fingerprint, operation, the
        #: seconds of each execution, pool, call site); `kept` counts the executions.
        self.queries: list[tuple[str, str, list[float], str, str | None]] = []
        self.kept = 0
        #: Statements not folded yet, in execution order. Only ever appended to by the hook
        #: and trimmed from the front by the fold: it stays the same list object, so an append
        #: racing a fold in another thread is never lost.
        self.pending: list[Pending] = []
        #: A weak reference to the execution context of the last insertmanyvalues statement:
        #: the pages of one execution share it.
        self.last_context: Any = None
        #: Where that statement's entry is: its position counted from the unit's first statement.
        self.last_page = -1
        self.shapes: dict[str, Shape] = {}
        self.untracked_statements = 0
        #: What the fold has seen so far: database time, writes per table, all writes, and
        #: transaction boundaries sent as statements (savepoints, a COMMIT sent as text).
        self.db_clock = 0.0
        self.table_writes: dict[str, int] = {}
        self.writes = 0
        self.barrier = 0
        self.lazy: dict[tuple[str, str | None], LazyGroup] = {}
        self.after_close: list[LazyLoadAfterCloseFinding] = []
        self.pool = PoolUsage()
        #: (pool, operation, seconds) of statements whose shape was first seen on another pool
        self.other_pool_durations: list[tuple[str, str, float]] = []
        #: Set when the unit ended with statements no two of which share a shape (see
        #: `close_unit`): (pool, operation, seconds) of each, and the fold left to whoever
        #: reads the shapes.
        self.unfolded: list[tuple[str, str, float]] | None = None
        self.phase = "handler"
        self.http: HttpRequest | None = None
        self.findings: tuple[Finding, ...] | None = None
        self.nested_finding_ids: set[str] = set()
        #: The unit's report: held here while the unit is open, weakly once it has ended (see
        #: `release`).
        self._report: Report | None = Report(self)
        self._report_ref: weakref.ref[Report] | None = None

    @property
    def report(self) -> Report:
        """The unit's `Report` (the same object for as long as anything holds it)."""
        report = self._report
        if report is None:
            ref = self._report_ref
            report = ref() if ref is not None else None
            if report is None:
                report = Report(self)
                self._report_ref = weakref.ref(report)
        return report

    def release(self) -> None:
        """Drop the references that make an ended unit a cycle (its report, and `chain`, which
        holds the unit itself): it records nothing more, and is then freed as soon as nothing
        holds it rather than by the garbage collector."""
        report = self._report
        if report is not None:
            self._report_ref = weakref.ref(report)
            self._report = None
        self.chain = ()

    @property
    def closed(self) -> bool:
        return self.finished is not None

    @property
    def statements(self) -> int:
        """Statements executed, exact (an `executemany` batch counts once). Read under the
        lock: a fold in another thread counts its batch before it leaves `pending`, and a
        reader in between would see it twice (the ORM hook, which tells whether a load ran SQL
        by this figure before and after, would miss or misplace the load)."""
        with self.lock:
            return self.counted + len(self.pending)

    @property
    def db_seconds(self) -> float:
        """Time spent in the driver executing statements."""
        return self.db_counted + sum([entry[3] for entry in self.pending])

    def add_failure(self) -> None:
        with self.lock:
            self.failed_statements += 1

    def first_page(self, context: Any) -> None:
        """The statement just appended is the first page of an insertmanyvalues execution."""
        with self.lock:
            self.last_context = weakref.ref(context)
            self.last_page = self.counted + len(self.pending) - 1

    def add_page(self, seconds: float) -> None:
        """Add another page of the last insertmanyvalues statement's execution (its time, not
        a statement)."""
        with self.lock:
            pending = self.pending
            index = self.last_page - self.counted
            if 0 <= index < len(pending):
                entry = pending[index]
                pending[index] = (entry[0], entry[1], entry[2], entry[3] + seconds, *entry[4:])
            else:  # the first page was folded already: the time is added where it went
                for c in self.chain:
                    with c.lock:
                        c.db_counted += seconds

    def fold(self) -> None:
        """Fold the buffered statements into shapes, sites and parameter counts, here and in
        every enclosing unit. Called by the hot path every `FOLD_EVERY` statements, and before
        anything reads the shapes."""
        pending = self.pending
        if not pending:
            return
        with self.lock:
            taken = len(pending)
            if not taken:
                return
            batch = pending[:taken]
            seconds = sum(map(_SECONDS, batch))
            # Counted and taken out of `pending` under the lock, which `statements` reads
            # under too: no reader sees the batch twice or not at all.
            self.counted += taken
            self.db_counted += seconds
            del pending[:taken]
            self._fold(batch, True)
        if self.parent is None:
            return
        for c in self.chain[1:]:
            with c.lock:
                c.counted += taken
                c.db_counted += seconds
                c._fold(batch, False)

    def unfolded_statements(self) -> list[tuple[str, str, float]] | None:
        """`unfolded`, while it still describes every statement of the unit: not folded since,
        and nothing recorded after it was made (a statement of another thread that passed the
        hook's `active` check as the unit ended). Read under the lock."""
        unfolded = self.unfolded
        if unfolded is None or self.counted or len(self.pending) != len(unfolded):
            return None
        return unfolded

    def fold_for_reading(self) -> None:
        """`fold()` for a reader of the shapes (a `Report` property): what it cannot fold is an
        internal error, counted and logged, never raised into the code reading the report."""
        if self.pending:
            try:
                self.fold()
            except Exception as exc:
                internal_error("collector", exc)

    def _fold(self, pending: list[Pending], innermost: bool) -> None:
        # Consecutive executions of one statement from one place in one transaction (the body
        # of a loop) form a run: its shape, site, counters and the state its reads see are
        # worked out once per run, and its per-execution figures (durations, parameter hashes,
        # idle clocks) with C-level iteration (`map`, `zip`, `accumulate`), not a Python step
        # per statement. Python loops per execution remain only for what needs them: paged
        # shapes, IN lists, parameter examples, and reads whose repeats are not plainly
        # duplicates (`_reads_one_by_one`).
        shapes = self.shapes
        queries = self.queries
        room = self.max_queries - self.kept
        examples: dict[int, str] | None = {} if self.settings.log_parameters else None
        table_writes = self.table_writes
        other_durations = self.other_pool_durations
        clock = self.db_clock
        last_source: Any = None
        cache: dict[str, StatementShape] = {}
        dialect: str | None = None
        pool = ""
        index = 0
        for (statement, where, source, txn), group in groupby(pending, _RUN):
            run = list(group)
            n = len(run)
            start = index
            index += n
            if source is not last_source:
                last_source = source
                pool = source[0]
                dialect, cache = _dialect_of(source)
            shaped = cache.get(statement)
            if shaped is None:
                shaped = shape_of(statement, dialect=dialect)
            fingerprint, operation, _ = shaped
            shape = shapes.get(fingerprint)
            if shape is None and len(shapes) < self.max_shapes:
                shape = shapes[fingerprint] = Shape(fingerprint, operation, pool)
            if n == 1:  # the common case outside loops: no iteration machinery
                seconds = [run[0][3]]
                befores = [clock]
                clock += seconds[0]
            else:
                seconds = list(map(_SECONDS, run))
                # The database clock before each execution (and after the run, last).
                befores = list(accumulate(seconds, initial=clock))
                clock = befores.pop()
            if shape is not None:
                # The shape's own string: the queries of a long statement (too long for the
                # fingerprint cache, so fingerprinted anew each time) share one copy.
                fingerprint = shape.fingerprint
            if room > 0:
                taken = min(room, n)
                queries.append(
                    (fingerprint, operation, seconds if taken == n else seconds[:taken], pool,
                     where[0])
                )  # fmt: skip
                self.kept += taken
                room -= taken
            if shape is None:
                self.untracked_statements += n
                continue
            info = shape.info
            run_seconds = sum(seconds)
            shape.count += n
            shape.seconds += run_seconds
            # Durations feed the statement histogram once, from the innermost unit.
            if innermost and pool == shape.pool:
                shape.bucket_seconds += run_seconds
                buckets = shape.buckets
                lowest = bisect_left(STATEMENT_BUCKETS, seconds[0] if n == 1 else min(seconds))
                if n == 1 or lowest == bisect_left(STATEMENT_BUCKETS, max(seconds)):
                    buckets[lowest] += n
                else:
                    for bucket in map(_BUCKET, seconds):
                        buckets[bucket] += 1
            elif innermost and len(other_durations) < MAX_OTHER_POOL_DURATIONS:
                other_durations.extend(
                    zip(repeat(pool, MAX_OTHER_POOL_DURATIONS - len(other_durations)),
                        repeat(operation), seconds)
                )  # fmt: skip
            if n == 1:
                parameters = [run[0][1]]
                keys = [_parameter_key(statement, parameters[0])]
            else:
                parameters = list(map(_PARAMETERS, run))
                keys = _parameter_keys(statement, parameters)
            sites = shape.sites
            site = sites.get(where[0])
            if site is None and len(sites) < MAX_CALLSITES:
                site = sites[where[0]] = Site(info)
            if site is not None:
                site.count += n
                site.seconds += run_seconds
                known = site.parameter_keys
                if n > 1:
                    _add_keys(known, keys)
                elif keys[0] is not None and len(known) < MAX_PARAMETER_KEYS:
                    known.add(keys[0])
                filters = site.filter_keys
                if filters is not None:
                    slots = _statements.paging_slots(statement)
                    for values in parameters:
                        if len(filters) >= MAX_PARAMETER_KEYS:
                            break
                        filters.add(_hash(_statements.filter_values(values, slots)))
                lengths = site.in_lengths
                if lengths is not None:
                    for values in parameters:
                        length = _statements.in_list_length(statement, values)
                        if length in lengths or len(lengths) < MAX_IN_LENGTHS:
                            lengths[length] = lengths.get(length, 0) + 1
                if examples is not None:
                    kept = site.examples
                    if kept is None:
                        kept = site.examples = {}
                    for offset, key in enumerate(keys):
                        if len(kept) >= MAX_PARAMETER_EXAMPLES:
                            break
                        if key not in kept:
                            kept[key] = _example(examples, pending, start + offset)
            written = info.written
            if written is not None:
                table_writes[written] = table_writes.get(written, 0) + n
                self.writes += n
                continue
            if not info.reads:
                if info.boundary or operation != "OTHER":
                    self.barrier += n  # writes whose table cannot be read off: anything changed
                continue
            # Duplicates: a read repeated in the same state - its transaction, the boundaries
            # sent as statements, the writes to the tables it reads - without a pause between
            # (idle time: wall time not spent running statements) is redundant. Within a run
            # nothing is written: the state is the run's.
            tables = info.tables
            if not tables:
                seen = self.writes
            elif len(tables) == 1:
                seen = table_writes.get(info.table, 0)
            else:
                seen = sum(table_writes.get(table, 0) for table in tables)
            state = (txn, self.barrier, seen)
            if n == 1:
                idle = run[0][2] - befores[0]
                key = keys[0]
                last_reads = shape.last
                if key not in last_reads and len(last_reads) < MAX_PARAMETER_KEYS:
                    # A first read of these values (the common case): nothing to compare.
                    if key is not None:
                        last_reads[key] = (state, idle, where, 1)
                    continue
                idles = [idle]
            else:
                idles = list(map(sub, map(_T0, run), befores))
            if (
                n > 1
                and examples is None
                and None not in keys
                and _reads_at_once(shape, cast("list[int]", keys), idles, state, where)
            ):
                continue
            _reads_one_by_one(shape, keys, idles, state, where, examples, pending, start)
        self.db_clock = clock


#: The dialect attribute that keeps its (dialect key, fingerprint cache) once it has connected
#: (before, the key may still change: see `fingerprinting.dialect_key`).
_DIALECT_ATTR = "_querywatch_dialect_key"


def _dialect_of(source: tuple[str, Any]) -> tuple[str | None, dict[str, StatementShape]]:
    """The dialect key of a statement's source and the fingerprint cache of that dialect."""
    dialect = source[1]
    known: tuple[str | None, dict[str, StatementShape]] | None = getattr(
        dialect, _DIALECT_ATTR, None
    )
    if known is not None:
        return known
    key = dialect_key(dialect)
    known = (key, cache_for(key))
    if getattr(dialect, "server_version_info", None) is not None:
        with contextlib.suppress(Exception):  # a dialect that takes no attributes
            setattr(dialect, _DIALECT_ATTR, known)
    return known


#: A pending entry's run: (statement, (call site, caller), source, transaction).
_RUN = itemgetter(0, 5, 4, 6)
_PARAMETERS = itemgetter(1)
_T0 = itemgetter(2)
_SECONDS = itemgetter(3)
_BUCKET = partial(bisect_left, STATEMENT_BUCKETS)
#: Bucket counts of one execution, per bucket it fell in.
_ONE_IN_BUCKET = tuple(
    tuple(int(i == bucket) for i in range(len(STATEMENT_BUCKETS) + 1))
    for bucket in range(len(STATEMENT_BUCKETS) + 1)
)


def _unrepeated(pending: list[Pending]) -> list[tuple[str, str, float]] | None:
    """(pool, operation, seconds) of each statement of `pending`, when no two share a shape;
    else None. Every shape-based finding (N+1, duplicates, bulk writes) needs a shape run
    twice, so a unit of such statements alone has nothing to detect in them. Their bound
    values stay with the unit until its report is dropped or its shapes are read: an
    executemany batch (its rows) makes it None, and is folded at close."""
    seen: set[str] = set()
    unrepeated: list[tuple[str, str, float]] = []
    last_source: Any = None
    cache: dict[str, StatementShape] = {}
    dialect: str | None = None
    for entry in pending:
        if type(entry[1]) is list:  # an executemany batch: folded, not kept with its rows
            return None
        statement, source = entry[0], entry[4]
        if source is not last_source:
            last_source = source
            dialect, cache = _dialect_of(source)
        shaped = cache.get(statement)
        if shaped is None:
            shaped = shape_of(statement, dialect=dialect)
        fingerprint = shaped[0]
        if fingerprint in seen:
            return None
        seen.add(fingerprint)
        unrepeated.append((source[0], shaped[1], entry[3]))
    return unrepeated


def _add_keys(known: set[int], keys: list[int | None]) -> None:
    """Add the parameter hashes `keys` (None: an executemany batch) to `known`, up to
    `MAX_PARAMETER_KEYS`."""
    if None in keys:
        keys = [key for key in keys if key is not None]
    if len(known) + len(keys) <= MAX_PARAMETER_KEYS:
        known.update(cast("list[int]", keys))
        return
    for key in cast("list[int]", keys):
        if len(known) >= MAX_PARAMETER_KEYS:
            return
        known.add(key)


def _parameter_keys(statement: str, parameters: list[Any]) -> list[int | None]:
    """`_parameter_key` of each parameter set of a run, the common cases (tuples or dicts of
    hashable values, no UUID) hashed without a Python step per execution."""
    kind = type(parameters[0])
    if set(map(type, parameters)) == {kind}:
        rows: list[Any] | None = None
        if kind is tuple:
            values = chain.from_iterable(parameters)
            rows = parameters
        elif kind is dict:
            values = chain.from_iterable(map(dict.values, parameters))
            rows = list(map(tuple, map(dict.items, parameters)))
        if rows is not None and UUID not in map(type, values):
            try:
                return list(map(hash, zip(repeat(statement), rows)))
            except TypeError:  # unhashable values (arrays, JSON)
                pass
    return [_parameter_key(statement, values) for values in parameters]


def _reads_at_once(
    shape: Shape, keys: list[int], idles: list[float], state: tuple[Any, int, int], where: Where
) -> bool:
    """Track the duplicates of a run of reads per distinct parameter set, when every repeat in
    it is plainly a duplicate or plainly not (no pause of `POLL_INTERVAL` within the run or
    since an earlier read of the same values); False, changing nothing, otherwise."""
    last_reads = shape.last
    low, high = min(idles), max(idles)
    if high - low >= POLL_INTERVAL:
        return False
    latest = dict(zip(keys, idles, strict=True))
    if len(latest) == len(keys) and last_reads.keys().isdisjoint(latest):
        # Values not read before, each once: nothing redundant.
        if len(last_reads) + len(keys) > MAX_PARAMETER_KEYS:
            return False
        fresh = zip(repeat(state), idles, repeat(where), repeat(1))
        last_reads.update(zip(keys, fresh, strict=True))
        return True
    counts = Counter(keys)
    if len(last_reads) + len(counts) > MAX_PARAMETER_KEYS:
        return False
    priors = [last_reads.get(key) for key in counts]
    for prior in priors:
        if prior is not None and prior[0] == state and high - prior[1] >= POLL_INTERVAL:
            return False
    duplicates = shape.duplicates
    for (key, count), prior in zip(counts.items(), priors, strict=True):
        if prior is not None and (prior[0] is state or prior[0] == state):
            redundant, run, first = count, prior[3] + count, prior[2]
        else:
            redundant, run, first = count - 1, count, where
        last_reads[key] = (state, latest[key], where, run)
        if not redundant:
            continue
        duplicate = duplicates.get(key)
        if duplicate is None:
            duplicate = duplicates[key] = Duplicate(first)
        duplicate.redundant += redundant
        if run > duplicate.most:
            duplicate.most = run
        wheres = duplicate.wheres
        if where is not wheres[-1] and len(wheres) < MAX_DUPLICATE_SITES and where not in wheres:
            wheres.append(where)
    return True


def _reads_one_by_one(
    shape: Shape,
    keys: list[int | None],
    idles: list[float],
    state: tuple[Any, int, int],
    where: Where,
    examples: dict[int, str] | None,
    pending: list[Pending],
    start: int,
) -> None:
    """Track the duplicates of a run of reads one execution at a time: a repeat is redundant
    unless `POLL_INTERVAL` of idle time passed since the previous read of the same values."""
    last_reads = shape.last
    duplicates = shape.duplicates
    for offset, (key, idle) in enumerate(zip(keys, idles, strict=True)):
        if key is None:
            continue
        last = last_reads.get(key)
        if last is None:
            if len(last_reads) < MAX_PARAMETER_KEYS:
                last_reads[key] = (state, idle, where, 1)
            continue
        if (last[0] is state or last[0] == state) and idle - last[1] < POLL_INTERVAL:
            run = last[3] + 1
            duplicate = duplicates.get(key)
            if duplicate is None:
                duplicate = duplicates[key] = Duplicate(last[2])
            duplicate.redundant += 1
            if run > duplicate.most:
                duplicate.most = run
            wheres = duplicate.wheres
            if (
                where is not wheres[-1]
                and len(wheres) < MAX_DUPLICATE_SITES
                and where not in wheres
            ):
                wheres.append(where)
            if examples is not None and duplicate.examples is None:
                duplicate.examples = _example(examples, pending, start + offset)
            last_reads[key] = (state, idle, where, run)
        else:
            last_reads[key] = (state, idle, where, 1)


#: Distinct IN-list lengths remembered per call site.
MAX_IN_LENGTHS = 16


def _hash(value: Any) -> int:
    try:
        return hash(value)
    except TypeError:  # unhashable values (arrays, JSON): hash their text instead
        return hash(repr(value))


def _parameter_key(statement: str, parameters: Any) -> int | None:
    """A hash of the statement string and its bound values (None for an executemany batch,
    which is never a duplicate). The statement is part of it: a `text()` statement with its
    values pasted in differs by its string, not its parameters."""
    kind = type(parameters)
    if kind is list:
        return None
    try:
        if kind is dict:
            if UUID in map(type, parameters.values()):
                return hash((statement, tuple(_same_text(parameters.items()))))
            return hash((statement, tuple(parameters.items())))
        if kind is tuple and UUID in map(type, parameters):
            return hash((statement, tuple(_text_of(value) for value in parameters)))
        return hash((statement, parameters))
    except TypeError:
        return hash((statement, repr(parameters)))


def _same_text(items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """Bound values with UUIDs as their text: a UUID and its string are one value."""
    for name, value in items:
        yield name, _text_of(value)


def _text_of(value: Any) -> Any:
    return str(value) if type(value) is UUID else value


def _example(made: dict[int, str], pending: list[Pending], index: int) -> str:
    """The parameter example of a pending statement (made once per fold and unit)."""
    text = made.get(index)
    if text is None:
        text = made[index] = parameter_example(pending[index][1])
    return text


class Report:
    """What a unit of work did. Figures read inside the unit are the figures so far; they are
    final once it has ended, and findings exist only then."""

    __slots__ = ("__weakref__", "_c", "_pool")

    def __init__(self, collector: Collector) -> None:
        self._c = collector
        #: `pool`, once the unit has ended (several reporters read it)
        self._pool: PoolReport | None = None

    def __repr__(self) -> str:
        c = self._c
        state = "final" if c.closed else "open"
        return (
            f"<querywatch.Report {c.name!r} {state}: {c.statements} statements, "
            f"{c.db_seconds * 1000:.1f} ms, {len(self.findings)} findings>"
        )

    @property
    def name(self) -> str:
        """The unit of work's name: the `watch()` name, or `METHOD /route` for a request."""
        return self._c.name

    @property
    def kind(self) -> str:
        """`request` for HTTP requests, `job` for `watch()` units, `test` for the pytest plugin."""
        return self._c.kind

    @property
    def parent(self) -> Report | None:
        """The report of the unit of work this one is nested in; None for an outermost unit."""
        return self._c.parent.report if self._c.parent is not None else None

    @property
    def final(self) -> bool:
        """True once the unit of work has ended."""
        return self._c.closed

    @property
    def settings(self) -> Settings:
        """The settings this unit of work ran with."""
        return self._c.settings

    @property
    def statements(self) -> int:
        """SQL statements executed (an `executemany` batch counts once), exact."""
        return self._c.statements

    @property
    def failed_statements(self) -> int:
        """Statements that raised a database error (included in `statements`)."""
        return self._c.failed_statements

    @property
    def db_seconds(self) -> float:
        """Time spent in the database driver executing statements."""
        return self._c.db_seconds

    @property
    def duration_seconds(self) -> float:
        """Wall time of the unit of work (so far, while it is open)."""
        c = self._c
        end = c.finished if c.finished is not None else time.perf_counter()
        return end - c.started

    @property
    def queries(self) -> tuple[Query, ...]:
        """The first `Settings.max_queries` statements, in order."""
        return tuple(Query(*row) for row in self.query_rows)

    @property
    def query_rows(self) -> tuple[tuple[str, str, float, str, str | None], ...]:
        """`queries` as plain tuples `(fingerprint, operation, seconds, pool, callsite)`: the
        same statements without a `Query` object each (for reporters that keep them)."""
        self._c.fold_for_reading()
        return tuple(
            (fingerprint, operation, seconds, pool, callsite)
            for fingerprint, operation, run, pool, callsite in self._c.queries
            for seconds in run
        )

    @property
    def fingerprints(self) -> dict[str, int]:
        """Executions per statement shape (shapes beyond `Settings.max_shapes` are not listed)."""
        self._c.fold_for_reading()
        return {fp: shape.count for fp, shape in self._c.shapes.items()}

    @property
    def pool(self) -> PoolReport:
        """Connection-pool figures: checkouts, wait, timeouts, most held at once, leaks."""
        if self._pool is not None:
            return self._pool
        c = self._c
        usage = c.pool
        leaked = usage.leaked
        report = frozen(
            PoolReport,
            checkouts=usage.checkouts,
            wait_seconds=usage.wait_seconds,
            timeouts=usage.timeouts,
            max_held=usage.max_held,
            leaked=sum(leak.connections for leak in leaked) if leaked else 0,
        )
        if c.findings is not None:  # ended and detected: the figures are final
            self._pool = report
        return report

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Every finding, once the unit of work has ended (empty before)."""
        return self._c.findings or ()

    def _of(self, cls: type[Finding]) -> tuple[Any, ...]:
        findings = self._c.findings
        return tuple(f for f in findings if isinstance(f, cls)) if findings else ()

    @property
    def n_plus_one(self) -> tuple[NPlusOneFinding, ...]:
        """N+1 findings: lazy loads per relationship and per-item statement loops."""
        return self._of(NPlusOneFinding)

    @property
    def bulk_writes(self) -> tuple[BulkWriteFinding, ...]:
        """INSERT/UPDATE/DELETE executed once per item of a loop."""
        return self._of(BulkWriteFinding)

    @property
    def duplicates(self) -> tuple[DuplicateQueryFinding, ...]:
        """The same statement with the same parameters executed more than once."""
        return self._of(DuplicateQueryFinding)

    @property
    def lazy_loads_after_close(self) -> tuple[LazyLoadAfterCloseFinding, ...]:
        """Lazy loads attempted on detached objects or outside a greenlet."""
        return self._of(LazyLoadAfterCloseFinding)

    @property
    def leaks(self) -> tuple[ConnectionLeakFinding, ...]:
        """Connections still checked out when the unit of work ended."""
        return self._of(ConnectionLeakFinding)

    @property
    def http(self) -> HttpRequest | None:
        """The HTTP request this unit of work served; None for jobs and tests."""
        return self._c.http

    def findings_to_report(self) -> tuple[Finding, ...]:
        """Findings not already reported by a unit of work nested inside this one."""
        c = self._c
        findings = c.findings or ()
        nested = c.nested_finding_ids
        return tuple(f for f in findings if f.id not in nested) if nested else findings

    @property
    def shape_durations(self) -> tuple[ShapeDurations, ...]:
        """Statement durations per shape that ran in this unit itself (a nested unit's
        statements are its own), for duration histograms."""
        c = self._c
        with c.lock:  # not while another thread folds: its shapes would be half made
            unfolded = c.unfolded_statements()
            if unfolded is not None:  # one shape per statement: each its own durations
                return tuple(
                    frozen(
                        ShapeDurations,
                        pool=pool,
                        operation=operation,
                        buckets=_ONE_IN_BUCKET[_BUCKET(seconds)],
                        seconds=seconds,
                    )
                    for pool, operation, seconds in unfolded
                )
            c.fold_for_reading()
            return tuple(
                frozen(
                    ShapeDurations,
                    pool=shape.pool,
                    operation=shape.operation,
                    buckets=tuple(shape.buckets),
                    seconds=shape.bucket_seconds,
                )
                for shape in c.shapes.values()
                if shape.bucket_seconds or any(shape.buckets)
            )

    @property
    def other_pool_durations(self) -> tuple[StatementDuration, ...]:
        """Statements of this unit whose shape was first seen on another pool: their pool,
        operation and duration, one by one (`shape_durations` counts the others)."""
        c = self._c
        with c.lock:
            if c.unfolded_statements() is not None:  # one shape per statement, on its own pool
                return ()
            c.fold_for_reading()
            return tuple(StatementDuration(*entry) for entry in c.other_pool_durations)

    @property
    def lazy_loads(self) -> dict[str, int]:
        """ORM lazy loads by phase (`handler`, `serialization`), those of the units nested in
        this one included."""
        totals: dict[str, int] = {}
        for group in self._c.lazy.values():
            for phase, count in group.phases.items():
                totals[phase] = totals.get(phase, 0) + count
        return totals

    @property
    def metrics(self) -> tuple[Any, ...] | None:
        """The Prometheus metrics this unit records into: those of the middleware that served
        it (or the unit it is nested in); None for every registry metrics were installed in."""
        return self._c.metrics


def current_collector() -> Collector | None:
    """The collector of the unit of work running in this context, if any."""
    return current_unit.get()


def current_report() -> Report | None:
    """The (live) report of the unit of work running in this context, if any."""
    collector = current_unit.get()
    return collector.report if collector is not None else None


def open_unit(
    name: str, *, settings: Settings | None = None, kind: str = "job"
) -> tuple[Collector, Token[Collector | None]]:
    """Start a unit of work in the current context. The middleware and `watch()` use this."""
    parent = current_unit.get()
    if parent is None:
        fallback = _fallback_parent
        if fallback is not None and not fallback.closed:
            parent = fallback
    if parent is not None:
        # The parent's statements so far come before the new unit's, in the parent's record too
        # (a re-read is judged against the writes that preceded it).
        parent.fold()
    collector = Collector(name, settings or _settings, parent, kind)
    return collector, current_unit.set(collector)


def set_fallback_parent(collector: Collector | None) -> Collector | None:
    """Make `collector` the parent of units opened where no unit is current (in any thread);
    returns the previous one. The pytest plugin sets its test unit here while a test runs."""
    global _fallback_parent
    previous, _fallback_parent = _fallback_parent, collector
    return previous


def close_unit(
    collector: Collector, token: Token[Collector | None] | None, *, raise_findings: bool = True
) -> None:
    """End a unit of work: reset the context, detect, freeze, report, and apply the mode.

    Raises `FindingsDetected` only in `raise` mode, only when `raise_findings` is true.
    """
    if token is not None:
        try:
            current_unit.reset(token)
        except ValueError:
            # Closed from another context (a generator finalised elsewhere): restore the parent.
            current_unit.set(collector.parent)
    if collector.closed:
        return
    collector.finished = time.perf_counter()
    collector.active = False
    # Every unit ends here, once per request: its steps are guarded inline, like the hot hooks
    # (no call when nothing fails), each step on its own so that one failing step skips
    # nothing else.
    try:
        if _guard.injected_faults:
            _guard.maybe_fail("collector")
        pending = collector.pending
        if pending:
            # A unit of its own (nothing to fold into) whose statements all differ in shape and
            # made no lazy load, the common request, has nothing the detectors could find in
            # them (parameter examples of lazy loads come from the shapes): the fold,
            # which builds the shapes, is left to whoever reads them (`Report.fingerprints`,
            # `query_rows`, ...; the reporters by default need only durations).
            if (
                collector.parent is None
                and not collector.counted
                and not collector.lazy
                and not collector.settings.log_parameters  # examples come from the fold
                and len(pending) <= collector.max_shapes  # beyond, the fold keeps no shape
            ):
                with collector.lock:
                    collector.unfolded = _unrepeated(pending)
            if collector.unfolded is None:
                collector.fold()
    except Exception as exc:
        internal_error("collector", exc)
        collector.unfolded = None
        collector.fold_for_reading()
    for component, finish in _finishers:  # connections still out are leaks, found first
        try:
            finish(collector)
        except Exception as exc:
            internal_error(component, exc)
    findings: list[Finding] = []
    for detect in _detectors:
        try:
            if _guard.injected_faults:
                _guard.maybe_fail("detection")
            findings.extend(detect(collector))
        except Exception as exc:
            internal_error("detection", exc)
    collector.findings = tuple(findings)
    parent = collector.parent
    if parent is not None and (findings or collector.nested_finding_ids):
        parent.nested_finding_ids.update(f.id for f in findings)
        parent.nested_finding_ids.update(collector.nested_finding_ids)
    report = collector.report
    collector.release()
    for reporter in tuple(_reporters):
        try:
            if _guard.injected_faults:
                _guard.maybe_fail("reporter")
            reporter(report)
        except Exception as exc:
            internal_error("reporter", exc)
    if not findings or not collector.settings.enabled:
        return
    mode: Mode = collector.settings.mode
    if mode == "warn":
        for finding in report.findings_to_report():
            warn_finding(finding)  # at its call site in the user's code
    elif mode == "raise" and raise_findings:
        raise FindingsDetected(collector.name, findings)


class watch:
    """Audit a unit of work that is not an HTTP request: a job, a CLI command, a test.

    Usable as `with` and `async with`; yields the unit's `Report`, live inside the block and
    final after it. In `raise` mode, findings raise `FindingsDetected` when the block exits
    (unless the block itself raised: your exception is never replaced).
    """

    __slots__ = ("_collector", "_kind", "_name", "_settings", "_token")

    def __init__(
        self,
        name: str = "watch",
        *,
        settings: Settings | None = None,
        mode: Mode | None = None,
        kind: str = "job",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("watch() needs a non-empty name, e.g. watch('nightly-import')")
        resolved = settings if settings is not None else _settings
        if mode is not None:
            resolved = resolved.replace(mode=mode)
        self._name = name
        self._settings = resolved
        self._kind = kind
        self._collector: Collector | None = None
        self._token: Token[Collector | None] | None = None

    def __enter__(self) -> Report:
        if self._collector is not None:
            raise RuntimeError("a querywatch.watch() object can be entered only once")
        self._collector, self._token = open_unit(
            self._name, settings=self._settings, kind=self._kind
        )
        return self._collector.report

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._collector is not None, "watch() exited without being entered"
        close_unit(self._collector, self._token, raise_findings=exc_type is None)
        self._token = None

    async def __aenter__(self) -> Report:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
