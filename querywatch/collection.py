"""Units of work: the collector that SQLAlchemy's events record into, `watch()`, and the `Report`.

Data flows one way. Listeners record into the collector of the current unit of work (a
ContextVar, default `None`, set and reset only by `watch()` and the middleware). When the unit
ends, the detectors turn what was recorded into findings, the report is frozen, and the
reporters (structlog, Prometheus) receive it.

Nesting: a unit opened inside another is its own unit. Everything it records also counts in
every enclosing unit (a request's statement count includes the job it ran inline, and a test's
report includes the requests it made), while each finding is *reported* (logged, counted in
metrics) once, by the innermost unit that found it.
"""

from __future__ import annotations

import time
import warnings
from bisect import bisect_left
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from querywatch import _guard
from querywatch.exceptions import NPlusOneDetected
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
from querywatch.fingerprinting import _cache as _fingerprint_cache
from querywatch.fingerprinting import fingerprint_and_operation
from querywatch.settings import DEFAULT_SETTINGS, Mode, Settings

__all__ = ["Collector", "PoolReport", "Query", "Report", "current_report", "watch"]

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

_current: ContextVar[Collector | None] = ContextVar("querywatch_collector", default=None)
#: The parent of units opened where no unit is current (a thread that did not inherit the
#: context): the pytest plugin's test unit, so that requests a `TestClient` serves from its
#: portal thread count toward the test whichever way anyio propagates the context.
_fallback_parent: Collector | None = None

_settings = DEFAULT_SETTINGS
_reporters: list[Callable[[Report], None]] = []
_default_reporters_installed = False


_stage_modules: tuple[Any, Any] | None = None


def _stages() -> tuple[Any, Any]:
    """The pool and detection modules (imported on first use: they import this module)."""
    global _stage_modules
    if _stage_modules is None:
        from querywatch import detection, pool

        _stage_modules = (pool, detection)
    return _stage_modules


def _install_default_reporters() -> None:
    # The structlog reporter is installed on first use, not at import: importing querywatch
    # (the pytest plugin does, in every suite) must stay cheap.
    global _default_reporters_installed
    _default_reporters_installed = True
    from querywatch import reporting

    reporting.install()


def configure(settings: Settings) -> None:
    """Make `settings` the default of every unit of work opened from now on."""
    global _settings
    if not isinstance(settings, Settings):
        raise TypeError(f"configure() takes a querywatch.Settings, got {type(settings).__name__}")
    from querywatch import _callsite, fingerprinting

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


class Site:
    """Executions of one statement shape from one call site."""

    __slots__ = ("count", "examples", "parameter_keys", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.parameter_keys: set[int] = set()
        #: parameter hash -> clipped repr of the first distinct parameter sets, only when
        #: `Settings.log_parameters` is on (see `Collector.fold`)
        self.examples: dict[int | None, str] | None = None


class Shape:
    """What one unit of work executed of one statement shape."""

    __slots__ = (
        "bucket_seconds",
        "buckets",
        "count",
        "duplicate_examples",
        "duplicate_sites",
        "fingerprint",
        "operation",
        "parameter_counts",
        "pool",
        "seconds",
        "sites",
    )

    def __init__(self, fingerprint: str, operation: str, pool: str) -> None:
        self.fingerprint = fingerprint
        self.operation = operation
        self.pool = pool
        self.count = 0
        self.seconds = 0.0
        #: executions of the innermost unit per bucket of STATEMENT_BUCKETS (+Inf last)
        self.buckets = [0] * (len(STATEMENT_BUCKETS) + 1)
        #: total seconds of the executions counted in `buckets` (the histogram's sum)
        self.bucket_seconds = 0.0
        #: hash of the parameters -> executions; values themselves are never kept.
        self.parameter_counts: dict[int, int] = {}
        #: hash of the parameters -> the call site where it was first repeated.
        self.duplicate_sites: dict[int, str | None] = {}
        #: call site of a repeat -> hash -> clipped repr of the parameter sets repeated
        #: `duplicate_threshold` times, only when `Settings.log_parameters` is on
        self.duplicate_examples: dict[str | None, dict[int, str]] | None = None
        #: call site -> executions there
        self.sites: dict[str | None, Site] = {}

    def add(
        self,
        seconds: float,
        key: int | None,
        pool: str,
        callsite: str | None,
        innermost: Collector | None,
    ) -> None:
        self.count += 1
        self.seconds += seconds
        if innermost is not None:
            # Durations feed the statement histogram once, from the innermost unit.
            if pool == self.pool:
                self.buckets[bisect_left(STATEMENT_BUCKETS, seconds)] += 1
                self.bucket_seconds += seconds
            elif len(innermost.other_pool_durations) < MAX_OTHER_POOL_DURATIONS:
                innermost.other_pool_durations.append((pool, self.operation, seconds))
        sites = self.sites
        site = sites.get(callsite)
        if site is None:
            if len(sites) >= MAX_CALLSITES:
                return
            site = sites[callsite] = Site()
        site.count += 1
        site.seconds += seconds
        if key is not None:
            keys = site.parameter_keys
            if len(keys) < MAX_PARAMETER_KEYS:
                keys.add(key)
            counts = self.parameter_counts
            seen = counts.get(key)
            if seen is not None:
                counts[key] = seen + 1
                if seen == 1:
                    self.duplicate_sites[key] = callsite
            elif len(counts) < MAX_PARAMETER_KEYS:
                counts[key] = 1


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
        #: id(connection record) -> (pool name, checkout time, call site or None)
        self.held: dict[int, tuple[str, float, str | None]] = {}
        self.leaked: list[ConnectionLeakFinding] = []


@dataclass(frozen=True)
class PoolReport:
    """The pool figures of a unit of work."""

    checkouts: int
    wait_seconds: float
    timeouts: int
    max_held: int
    leaked: int


class Collector:
    """The mutable record of one unit of work. Listeners write; nobody else reads until it ends."""

    __slots__ = (
        "__weakref__",
        "active",
        "after_close",
        "chain",
        "db_seconds",
        "failed_statements",
        "findings",
        "finished",
        "http",
        "kind",
        "lazy",
        "max_queries",
        "max_shapes",
        "metrics",
        "name",
        "nested_finding_ids",
        "other_pool_durations",
        "parent",
        "pending",
        "pending_parameters",
        "phase",
        "pool",
        "queries",
        "report",
        "settings",
        "shapes",
        "started",
        "statements",
        "untracked_statements",
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
        self.statements = 0
        self.failed_statements = 0
        self.db_seconds = 0.0
        #: (fingerprint, operation, seconds, pool) of the first `max_queries` statements
        self.queries: list[tuple[str, str, float, str]] = []
        #: Statements not folded yet: (statement, seconds, parameter hash, pool, call site).
        self.pending: list[tuple[str, float, int | None, str, str | None]] = []
        #: The parameters of the pending statements, in step with `pending`, when this unit or
        #: one enclosing it has `Settings.log_parameters` on; None (the hot path skips it) else.
        inherited = parent is not None and parent.pending_parameters is not None
        self.pending_parameters: list[Any] | None = (
            [] if settings.log_parameters or inherited else None
        )
        self.shapes: dict[str, Shape] = {}
        self.untracked_statements = 0
        self.lazy: dict[tuple[str, str | None], LazyGroup] = {}
        self.after_close: list[LazyLoadAfterCloseFinding] = []
        self.pool = PoolUsage()
        #: (pool, operation, seconds) of statements whose shape was first seen on another pool
        self.other_pool_durations: list[tuple[str, str, float]] = []
        self.phase = "handler"
        self.http: dict[str, Any] | None = None
        self.findings: tuple[Finding, ...] | None = None
        self.nested_finding_ids: set[str] = set()
        self.report = Report(self)

    @property
    def closed(self) -> bool:
        return self.finished is not None

    def fold(self) -> None:
        """Fold the buffered statements into shapes, sites and parameter counts, here and in
        every enclosing unit. Called by the hot path every `FOLD_EVERY` statements, and before
        anything reads the shapes."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        parameters = self.pending_parameters
        if parameters is not None:
            self.pending_parameters = []
        cache = _fingerprint_cache
        for c in self.chain:
            innermost = c is self
            if not innermost:
                c.statements += len(pending)
                c.db_seconds += sum(entry[1] for entry in pending)
            shapes = c.shapes
            queries = c.queries
            max_queries = c.max_queries
            unit = c if innermost else None
            for statement, seconds, key, pool, callsite in pending:
                cached = cache.get(statement)
                fingerprint, operation = (
                    cached if cached is not None else fingerprint_and_operation(statement)
                )
                shape = shapes.get(fingerprint)
                if shape is None:
                    if len(shapes) >= c.max_shapes:
                        c.untracked_statements += 1
                        if len(queries) < max_queries:
                            queries.append((fingerprint, operation, seconds, pool))
                        continue
                    shape = shapes[fingerprint] = Shape(fingerprint, operation, pool)
                if len(queries) < max_queries:
                    # The shape's own string: the queries of a long statement (too long for the
                    # fingerprint cache, so fingerprinted anew each time) share one copy.
                    queries.append((shape.fingerprint, operation, seconds, pool))
                shape.add(seconds, key, pool, callsite, unit)
        if parameters is not None and len(parameters) == len(pending):
            self._keep_examples(pending, parameters)

    def _keep_examples(
        self,
        pending: list[tuple[str, float, int | None, str, str | None]],
        parameters: list[Any],
    ) -> None:
        """Keep clipped examples of the bound parameters on the sites and duplicate groups of
        every unit in the chain with `Settings.log_parameters` on (at most
        `MAX_PARAMETER_EXAMPLES` each, made only for the ones kept)."""
        made: dict[int, str] = {}  # index in pending -> its example, shared by every unit
        shapes_of: dict[str, str] = {}  # statement -> fingerprint, computed once per fold

        def example(index: int) -> str:
            text = made.get(index)
            if text is None:
                text = made[index] = parameter_example(parameters[index])
            return text

        for c in self.chain:
            if not c.settings.log_parameters:
                continue
            threshold = c.settings.duplicate_threshold
            shapes = c.shapes
            for index, (statement, _, key, _, callsite) in enumerate(pending):
                fingerprint = shapes_of.get(statement)
                if fingerprint is None:
                    fingerprint = shapes_of[statement] = fingerprint_and_operation(statement)[0]
                shape = shapes.get(fingerprint)
                if shape is None:
                    continue
                site = shape.sites.get(callsite)
                if site is not None:
                    kept = site.examples
                    if kept is None:
                        kept = site.examples = {}
                    if len(kept) < MAX_PARAMETER_EXAMPLES and key not in kept:
                        kept[key] = example(index)
                if key is None or shape.parameter_counts.get(key, 0) < threshold:
                    continue
                groups = shape.duplicate_examples
                if groups is None:
                    groups = shape.duplicate_examples = {}
                repeated = groups.setdefault(shape.duplicate_sites.get(key), {})
                if len(repeated) < MAX_PARAMETER_EXAMPLES and key not in repeated:
                    repeated[key] = example(index)


class Report:
    """What a unit of work did. Figures read inside the unit are the figures so far; they are
    final once it has ended, and findings exist only then."""

    __slots__ = ("_c",)

    def __init__(self, collector: Collector) -> None:
        self._c = collector

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
    def final(self) -> bool:
        """True once the unit of work has ended."""
        return self._c.closed

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
        self._c.fold()
        return tuple(Query(*query) for query in self._c.queries)

    @property
    def fingerprints(self) -> dict[str, int]:
        """Executions per statement shape (shapes beyond `Settings.max_shapes` are not listed)."""
        self._c.fold()
        return {fp: shape.count for fp, shape in self._c.shapes.items()}

    @property
    def pool(self) -> PoolReport:
        """Connection-pool figures: checkouts, wait, timeouts, most held at once, leaks."""
        usage = self._c.pool
        return PoolReport(
            checkouts=usage.checkouts,
            wait_seconds=usage.wait_seconds,
            timeouts=usage.timeouts,
            max_held=usage.max_held,
            leaked=len(usage.leaked),
        )

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Every finding, once the unit of work has ended (empty before)."""
        return self._c.findings or ()

    def _of(self, cls: type[Finding]) -> tuple[Any, ...]:
        return tuple(f for f in self.findings if isinstance(f, cls))

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
    def http(self) -> dict[str, Any] | None:
        """method, route, status, request_id of an HTTP request; None for other units."""
        return dict(self._c.http) if self._c.http is not None else None

    def findings_to_report(self) -> tuple[Finding, ...]:
        """Findings not already reported by a unit of work nested inside this one."""
        nested = self._c.nested_finding_ids
        return tuple(f for f in self.findings if f.id not in nested)


def current_collector() -> Collector | None:
    """The collector of the unit of work running in this context, if any."""
    return _current.get()


def current_report() -> Report | None:
    """The (live) report of the unit of work running in this context, if any."""
    collector = _current.get()
    return collector.report if collector is not None else None


def open_unit(
    name: str, *, settings: Settings | None = None, kind: str = "job"
) -> tuple[Collector, Token[Collector | None]]:
    """Start a unit of work in the current context. The middleware and `watch()` use this."""
    parent = _current.get()
    if parent is None:
        fallback = _fallback_parent
        if fallback is not None and not fallback.closed:
            parent = fallback
    collector = Collector(name, settings or _settings, parent, kind)
    return collector, _current.set(collector)


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

    Raises `NPlusOneDetected` only in `raise` mode, only when `raise_findings` is true.
    """
    if token is not None:
        try:
            _current.reset(token)
        except ValueError:
            # Closed from another context (a generator finalised elsewhere): restore the parent.
            _current.set(collector.parent)
    if collector.closed:
        return
    collector.finished = time.perf_counter()
    collector.active = False
    # The guards are inline try/except blocks: a generator context manager costs microseconds
    # per use, and this runs once per request.
    try:
        _guard.maybe_fail("collector")
        collector.fold()
    except Exception as exc:
        _guard.internal_error("collector", exc)
    pool, detection = _stages()
    try:
        pool.finish_unit(collector)  # connections still out are leaks, found before detection
    except Exception as exc:
        _guard.internal_error("pool", exc)
    findings: list[Finding] = []
    try:
        _guard.maybe_fail("detection")
        findings = detection.detect(collector)
    except Exception as exc:
        _guard.internal_error("detection", exc)
    collector.findings = tuple(findings)
    parent = collector.parent
    if parent is not None and (findings or collector.nested_finding_ids):
        parent.nested_finding_ids.update(f.id for f in findings)
        parent.nested_finding_ids.update(collector.nested_finding_ids)
    report = collector.report
    if not _default_reporters_installed:
        _install_default_reporters()
    for reporter in tuple(_reporters):
        try:
            _guard.maybe_fail("reporter")
            reporter(report)
        except Exception as exc:
            _guard.internal_error("reporter", exc)
    if not findings or not collector.settings.enabled:
        return
    mode: Mode = collector.settings.mode
    if mode == "warn":
        for finding in report.findings_to_report():
            warnings.warn(QueryWatchWarning(finding.describe()), stacklevel=3)
    elif mode == "raise" and raise_findings:
        raise NPlusOneDetected(collector.name, findings)


class QueryWatchWarning(UserWarning):
    """Issued for each finding in `warn` mode."""


class watch:
    """Audit a unit of work that is not an HTTP request: a job, a CLI command, a test.

    Usable as `with` and `async with`; yields the unit's `Report`, live inside the block and
    final after it. In `raise` mode, findings raise `NPlusOneDetected` when the block exits
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
