"""Assertions on the statements a block of code runs, for any test framework.

`assert_max_statements(n)` and `assert_no_n_plus_one()` are context managers built on
`querywatch.watch(kind="test")`: usable in pytest, unittest or a plain script, in sync and async
code. A failed assertion raises `QueryAssertionError` (an `AssertionError`, so unittest reports
a failure, not an error) whose message lists what a developer needs to fix it: the count
against the budget, the statement shapes, and each finding with its call site and fix.

Units of work opened inside the block (the requests of a `TestClient`, `watch()` jobs) count
toward it: their statements through the nesting rule, their findings gathered when they end.
`assert_query_snapshot(path, name)` (from `querywatch._snapshots`) compares the statement shapes
a block runs with a snapshot record file, like the pytest plugin's snapshots.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from contextvars import Token
from types import TracebackType
from typing import Any

from querywatch._collection import (
    Collector,
    Report,
    add_reporter,
    close_unit,
    default_settings,
    open_unit,
    set_fallback_parent,
)
from querywatch._snapshots import assert_query_snapshot
from querywatch.findings import Finding, NPlusOneFinding
from querywatch.settings import Settings

__all__ = [
    "QueryAssertionError",
    "WatchedUnit",
    "assert_max_statements",
    "assert_no_n_plus_one",
    "assert_query_snapshot",
    "describe_budget",
    "describe_findings",
]

#: Statement shapes listed in a budget failure (most executed first).
MAX_SHAPES_SHOWN = 10
#: Longest statement shape shown in a failure message.
MAX_SHAPE_CHARS = 200


class QueryAssertionError(AssertionError):
    """A block of code ran more statements than its budget, or had a finding it must not have."""

    def __init__(self, message: str, *, report: Report, findings: Sequence[Finding] = ()) -> None:
        super().__init__(message)
        self.report = report
        self.findings = tuple(findings)


#: The statement-count thresholds of a test unit in which other units ran: never reached, so
#: the detectors that aggregate statements (N+1, bulk writes, duplicates) find nothing there.
_NEVER = sys.maxsize


def _nested_scope(settings: Settings) -> Settings:
    """The detection settings of a test unit in which requests or jobs ran: only what is
    recorded as it happens (lazy loads after close, connection leaks) is its own finding.

    Each nested unit judges its own statements; the test unit sees them all together, and six
    requests that each load one author, or two identical requests, are neither an N+1 nor a
    duplicate of the test. Their findings are the test's through `WatchedUnit.findings`."""
    return settings.replace(n_plus_one_threshold=_NEVER, duplicate_threshold=_NEVER)


class WatchedUnit:
    """A `watch()` unit of kind `test` that also gathers the findings of the units nested in it.

    Findings are detected, and reported, by the innermost unit; a test wants all of them,
    including those of the requests it made. The unit is also the fallback parent while it is
    open, so units opened in threads that did not inherit the context still nest in it.

    What a test unit judges is what it reports: when units ran nested in it, its own detection
    is narrowed to `_nested_scope` before it ends, so its report - and with it the structlog
    events and Prometheus counters of the test unit - holds no finding made by adding up the
    statements of several requests. `findings` is the report's findings plus the nested units'.
    Usable as a context manager too (`with WatchedUnit("block") as report:`).
    """

    __slots__ = (
        "_collector",
        "_name",
        "_nested",
        "_nested_units",
        "_previous_fallback",
        "_remove_reporter",
        "_settings",
        "_token",
        "report",
    )

    def __init__(self, name: str, *, settings: Settings | None = None) -> None:
        self._name = name
        # `log`: the unit never warns or raises by itself; the assertion decides.
        self._settings = (settings or default_settings()).replace(mode="log")
        self._collector: Collector | None = None
        self._token: Token[Collector | None] | None = None
        self._nested: list[Finding] = []
        self._nested_units = 0
        self._previous_fallback: Collector | None = None
        self._remove_reporter: Any = None
        self.report: Report | None = None

    def open(self) -> Report:
        if self._collector is not None:
            raise RuntimeError("a WatchedUnit can be opened only once")
        collector, self._token = open_unit(self._name, settings=self._settings, kind="test")
        self._collector = collector
        report = self.report = collector.report
        nested = self._nested

        def gather(finished: Report) -> None:
            parent = finished.parent
            while parent is not None and parent is not report:
                parent = parent.parent
            if parent is report:
                self._nested_units += 1
                nested.extend(finished.findings)

        self._remove_reporter = add_reporter(gather)
        self._previous_fallback = set_fallback_parent(collector)
        return report

    def close(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        set_fallback_parent(self._previous_fallback)
        collector = self._collector
        if collector is None or collector.closed:
            return
        try:
            if self._nested_units:
                collector.settings = _nested_scope(collector.settings)
            close_unit(collector, self._token)
            self._token = None
        finally:
            if self._remove_reporter is not None:
                self._remove_reporter()
                self._remove_reporter = None

    def __enter__(self) -> Report:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exc_type, exc, tb)

    async def __aenter__(self) -> Report:
        return self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exc_type, exc, tb)

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Its report's findings and those of the units nested in it (each request's, each
        job's), each once."""
        own = self.report.findings if self.report is not None else ()
        seen: set[str] = set()
        unique: list[Finding] = []
        for finding in (*own, *self._nested):
            if finding.id not in seen:
                seen.add(finding.id)
                unique.append(finding)
        return tuple(unique)


def _clip(text: str, limit: int = MAX_SHAPE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_finding(finding: Finding) -> list[str]:
    """A finding as indented lines: what, where, which statement, the fix, and its id."""
    lines = [f"  - {finding.headline}", f"      at: {finding.where}"]
    if finding.phase != "handler":
        lines.append(f"      phase: {finding.phase}")
    if finding.statement:
        lines.append(f"      statement: {_clip(finding.statement)}")
    if finding.fix:
        lines.append(f"      fix: {finding.fix}")
    lines.append(f"      id: {finding.id}")
    return lines


def describe_findings(findings: Iterable[Finding]) -> list[str]:
    """Every finding as indented lines (see `describe_finding`)."""
    lines: list[str] = []
    for finding in findings:
        lines.extend(describe_finding(finding))
    return lines


def describe_budget(
    report: Report, max_statements: int, *, unit: str, findings: Iterable[Finding] = ()
) -> str:
    """The message of an exceeded statement budget: count, budget, shapes, likely causes."""
    count = report.statements
    lines = [
        f"querywatch: {unit} ran {count} statements, budget is {max_statements} "
        f"(max_statements={max_statements})",
        "statements by shape, most executed first:",
    ]
    shapes = sorted(report.fingerprints.items(), key=lambda item: -item[1])
    for fingerprint, executions in shapes[:MAX_SHAPES_SHOWN]:
        lines.append(f"  {executions:>4} x {_clip(fingerprint)}")
    if len(shapes) > MAX_SHAPES_SHOWN:
        rest = sum(n for _, n in shapes[MAX_SHAPES_SHOWN:])
        lines.append(f"  ... {len(shapes) - MAX_SHAPES_SHOWN} more shapes ({rest} statements)")
    causes = [f for f in findings if f.explains_statements]
    if causes:
        lines.append("likely cause:")
        lines.extend(describe_findings(causes))
    return "\n".join(lines)


class _Assertion:
    """Shared `with`/`async with` plumbing of the assertion context managers."""

    __slots__ = ("_unit",)

    def __init__(self, name: str, settings: Settings | None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("the assertion needs a non-empty name")
        self._unit = WatchedUnit(name, settings=settings)

    def __enter__(self) -> Report:
        return self._unit.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unit.close(exc_type, exc, tb)
        if exc_type is None:
            self._check()

    async def __aenter__(self) -> Report:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _check(self) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


class assert_max_statements(_Assertion):  # used like a function
    """Fail when the block runs more than `max_statements` SQL statements.

    `with assert_max_statements(3) as report:` - the report is live inside the block and final
    after it. Statements of requests and jobs run inside the block count too.
    """

    __slots__ = ("_max",)

    def __init__(
        self,
        max_statements: int,
        *,
        name: str = "assert_max_statements",
        settings: Settings | None = None,
    ) -> None:
        if isinstance(max_statements, bool) or not isinstance(max_statements, int):
            raise TypeError(f"max_statements must be an integer, got {max_statements!r}")
        if max_statements < 0:
            raise ValueError(f"max_statements must be at least 0, got {max_statements}")
        super().__init__(name, settings)
        self._max = max_statements

    def _check(self) -> None:
        unit = self._unit
        report = unit.report
        assert report is not None
        if report.statements > self._max:
            findings = unit.findings
            message = describe_budget(report, self._max, unit="the block", findings=findings)
            raise QueryAssertionError(message, report=report, findings=findings)


class assert_no_n_plus_one(_Assertion):  # used like a function
    """Fail when the block has an N+1 finding (lazy loads per object, or a per-item query).

    `threshold` overrides `Settings.n_plus_one_threshold` for statements run directly in the
    block (tests often want a stricter threshold than production).
    """

    __slots__ = ()

    def __init__(
        self,
        *,
        threshold: int | None = None,
        name: str = "assert_no_n_plus_one",
        settings: Settings | None = None,
    ) -> None:
        if threshold is not None:
            settings = (settings or default_settings()).replace(n_plus_one_threshold=threshold)
        super().__init__(name, settings)

    def _check(self) -> None:
        unit = self._unit
        report = unit.report
        assert report is not None
        found = [f for f in unit.findings if isinstance(f, NPlusOneFinding)]
        if found:
            lines = [f"querywatch: {len(found)} N+1 finding(s) in the block:"]
            lines.extend(describe_findings(found))
            raise QueryAssertionError("\n".join(lines), report=report, findings=found)
