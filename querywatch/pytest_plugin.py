"""pytest plugin: statement budgets, and findings (N+1, ...) as test failures.

Registered through the `pytest11` entry point and inert unless used: until a test asks for the
`querywatch` fixture or the `query_budget` marker, or a `--querywatch-*` option / `querywatch_*`
ini key is set, it adds no per-test hook and imports nothing of querywatch beyond this module.

What a test's unit of work is: the test *body* (pytest's call phase), not its fixtures' setup,
so seeding a database in a fixture never counts. It is a `watch()` unit of kind `test`; units
opened while it runs - the requests a `TestClient` or an httpx `ASGITransport` sends through
`QueryWatchMiddleware`, `watch()` jobs - nest in it: **requests count toward the test's budget**,
and their findings fail the test. The test unit's own findings - what it logs and counts - are
the ones it fails on: it never adds up the statements of its requests into findings of its own
(see `querywatch.testing.WatchedUnit`). Requests served by a `TestClient`'s portal thread nest
through the context anyio copies into the portal, or, where it does not, through the test unit
being the fallback parent of every unit opened with no current unit while the test runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from querywatch._collection import Report
    from querywatch._snapshots import SnapshotBlocks, SnapshotSession, TestSnapshot
    from querywatch.findings import Finding
    from querywatch.settings import Settings
    from querywatch.testing import WatchedUnit
    from querywatch.testing import assert_max_statements as AssertMaxStatements
    from querywatch.testing import assert_no_n_plus_one as AssertNoNPlusOne

__all__ = ["KINDS", "QueryWatchFixture"]

#: Finding kinds a test can fail on (the `kind` of each finding class).
KINDS = ("n_plus_one", "bulk_write", "duplicate_query", "lazy_load_after_close", "connection_leak")
_ALIASES = {
    "duplicates": "duplicate_query",
    "bulk_writes": "bulk_write",
    "lazy_loads_after_close": "lazy_load_after_close",
    "leaks": "connection_leak",
    "connection_leaks": "connection_leak",
}
_ALL = ("any", "all")
_NONE = ("none", "")
_BASELINE_VERSION = 1
_MARKER = "query_budget"
_FIXTURE = "querywatch"
_MARKER_DOC = (
    "query_budget(max_statements=None, *, n_plus_one=None, duplicate_query=None, bulk_write=None, "
    'lazy_load_after_close=None, connection_leak=None, n_plus_one_threshold=None): "fail" or '
    '"ignore" per finding kind, and a statement budget for the test body (querywatch).'
)

_SESSION: pytest.StashKey[QueryWatchSession] = pytest.StashKey()
_UNIT: pytest.StashKey[WatchedUnit] = pytest.StashKey()
#: The options, kept until something activates the plugin: (fail-on kinds, baseline, update).
_OPTIONS: pytest.StashKey[tuple[frozenset[str], Path | None, bool]] = pytest.StashKey()
_SNAPSHOT = "querywatch_snapshot"  # the marker's and the fixture's name
_SNAPSHOT_MARKER_DOC = (
    "querywatch_snapshot(enabled=True): record the test body's SQL statements (shapes, in "
    "order) in <module>.querywatch.yml and fail when they change (querywatch)."
)
#: Snapshot options: (every test, update, strict, directory of the record files or None).
_SNAPSHOT_OPTIONS: pytest.StashKey[tuple[bool, bool, bool, Path | None]] = pytest.StashKey()
_SNAPSHOTS: pytest.StashKey[SnapshotSession] = pytest.StashKey()
_SNAPSHOT_TEST: pytest.StashKey[TestSnapshot] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("querywatch", "querywatch: SQL statement budgets and N+1 failures")
    kinds = ", ".join((*KINDS, *_ALIASES, "any", "none"))
    group.addoption(
        "--querywatch-fail-on",
        dest="querywatch_fail_on",
        metavar="KINDS",
        default=None,
        help=f"Fail every test with a finding of these comma-separated kinds ({kinds}). "
        "Overrides the querywatch_fail_on ini key.",
    )
    group.addoption(
        "--querywatch-baseline",
        dest="querywatch_baseline",
        metavar="PATH",
        default=None,
        help="JSON file of known finding ids that do not fail tests (stale entries are "
        "reported). Overrides the querywatch_baseline ini key.",
    )
    group.addoption(
        "--querywatch-update-baseline",
        dest="querywatch_update_baseline",
        action="store_true",
        default=False,
        help="Write the findings that would fail tests to the baseline file instead of failing; "
        "entries of tests that did not run are kept.",
    )
    group.addoption(
        "--querywatch-snapshot",
        dest="querywatch_snapshot",
        action="store_true",
        default=None,
        help="Record every test's SQL statements in <module>.querywatch.yml and fail a test "
        "whose statements differ from its record. Overrides the querywatch_snapshot ini key.",
    )
    group.addoption(
        "--querywatch-snapshot-update",
        dest="querywatch_snapshot_update",
        action="store_true",
        default=False,
        help="Rewrite the snapshot records of the tests that ran, and remove the records of "
        "tests that no longer exist.",
    )
    group.addoption(
        "--querywatch-snapshot-strict",
        dest="querywatch_snapshot_strict",
        action="store_true",
        default=False,
        help="Fail a snapshot test that has no record yet (for CI) instead of writing it.",
    )
    parser.addini(
        "querywatch_snapshot",
        type="bool",
        help="Record every test's SQL statements in a snapshot (like --querywatch-snapshot).",
        default=False,
    )
    parser.addini(
        "querywatch_snapshot_dir",
        help="Directory of the snapshot record files, relative to the rootdir (default: "
        "beside each test module).",
        default="",
    )
    parser.addini(
        "querywatch_fail_on",
        help="Finding kinds that fail every test (comma-separated, like --querywatch-fail-on).",
        default="",
    )
    parser.addini(
        "querywatch_baseline",
        help="Baseline file of known finding ids, relative to the rootdir.",
        default="",
    )


def parse_kinds(value: str, *, source: str) -> frozenset[str]:
    """`n_plus_one, duplicates` -> the finding kinds; `any` for all, `none` for none."""
    kinds: set[str] = set()
    for raw in re.split(r"[,\s]+", value.strip()):
        word = raw.strip().lower()
        if word in _NONE:
            continue
        if word in _ALL:
            kinds.update(KINDS)
        elif word in KINDS:
            kinds.add(word)
        elif word in _ALIASES:
            kinds.add(_ALIASES[word])
        else:
            accepted = ", ".join((*KINDS, *_ALIASES, *_ALL, "none"))
            raise pytest.UsageError(f"{source}: unknown finding kind {raw!r}; accepted: {accepted}")
    return frozenset(kinds)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_DOC)
    config.addinivalue_line("markers", _SNAPSHOT_MARKER_DOC)
    option = config.getoption("querywatch_fail_on")
    if option is not None:
        fail_on = parse_kinds(option, source="--querywatch-fail-on")
    else:
        fail_on = parse_kinds(str(config.getini("querywatch_fail_on")), source="querywatch_fail_on")
    baseline: Path | None = None
    path_option = config.getoption("querywatch_baseline")
    if path_option:
        baseline = Path(path_option).resolve()
    elif config.getini("querywatch_baseline"):
        baseline = (config.rootpath / str(config.getini("querywatch_baseline"))).resolve()
    update = bool(config.getoption("querywatch_update_baseline"))
    if update and baseline is None:
        raise pytest.UsageError(
            "--querywatch-update-baseline needs the baseline file: --querywatch-baseline=PATH "
            "or the querywatch_baseline ini key"
        )
    if fail_on or baseline is not None:
        _activate(config, fail_on=fail_on, baseline=baseline, update=update)
    else:
        config.stash[_OPTIONS] = (fail_on, baseline, update)
    _configure_snapshots(config)


def _configure_snapshots(config: pytest.Config) -> None:
    option = config.getoption("querywatch_snapshot")
    every = bool(config.getini(_SNAPSHOT)) if option is None else bool(option)
    update = bool(config.getoption("querywatch_snapshot_update"))
    strict = bool(config.getoption("querywatch_snapshot_strict"))
    directory = str(config.getini("querywatch_snapshot_dir"))
    config.stash[_SNAPSHOT_OPTIONS] = (
        every,
        update,
        strict,
        (config.rootpath / directory).resolve() if directory else None,
    )
    if every or update or strict:
        _snapshots(config)  # before collection: an update run removes records of gone tests
    if every:
        _activate(config)


def _snapshots(config: pytest.Config) -> SnapshotSession:
    """The snapshot part of the session, registered on first use."""
    session = config.stash.get(_SNAPSHOTS, None)
    if session is None:
        from querywatch._snapshots import SnapshotSession  # deferred: plugin start-up stays light

        _, update, strict, directory = config.stash[_SNAPSHOT_OPTIONS]
        session = config.stash[_SNAPSHOTS] = SnapshotSession(
            config, update=update, strict=strict, directory=directory
        )
        config.pluginmanager.register(session, "querywatch-snapshots")
    return session


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: add up the snapshot records each worker wrote."""
    output = getattr(node, "workeroutput", None) or {}
    if "querywatch_snapshots" in output:
        _snapshots(node.config).add_worker(output)


def _snapshot_test(item: pytest.Item) -> TestSnapshot | None:
    """The snapshot of a test that records one (marker, option, or the fixture's blocks)."""
    every = item.config.stash[_SNAPSHOT_OPTIONS][0]
    if (
        not every
        and item.get_closest_marker(_SNAPSHOT) is None
        and _SNAPSHOT not in getattr(item, "fixturenames", ())
    ):
        return None
    from querywatch._snapshots import mode_of  # deferred: plugin start-up stays light

    try:
        mode = mode_of(item, marker=_SNAPSHOT, fixture=_SNAPSHOT, suite_wide=every)
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    if mode is None:
        return None
    snapshot = item.stash[_SNAPSHOT_TEST] = _snapshots(item.config).test(
        item, whole=mode == "whole"
    )
    return snapshot


def _activate(
    config: pytest.Config,
    *,
    fail_on: frozenset[str] | None = None,
    baseline: Path | None = None,
    update: bool = False,
) -> QueryWatchSession:
    session = config.stash.get(_SESSION, None)
    if session is None:
        if fail_on is None:
            fail_on, baseline, update = config.stash.get(_OPTIONS, (frozenset(), None, False))
        session = config.stash[_SESSION] = QueryWatchSession(
            config, fail_on=fail_on, baseline=baseline, update=update
        )
        config.pluginmanager.register(session, "querywatch-session")
        _show_callsites_from(config.rootpath, config)
    return session


def _show_callsites_from(root: Path, config: pytest.Config) -> None:
    """Show call sites relative to the rootdir for the session, so finding ids (and with them
    the baseline) do not depend on the directory pytest was started from."""
    from querywatch import _callsite  # deferred: plugin start-up stays light
    from querywatch._collection import default_settings  # deferred: plugin start-up stays light

    if default_settings().project_root is not None:
        return  # the user chose a root
    previous = _callsite.project_root()
    _callsite.set_project_root(str(root))
    config.add_cleanup(lambda: _callsite.set_project_root(previous))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _SESSION in config.stash:
        return
    for item in items:
        if item.get_closest_marker(_MARKER) is not None or _FIXTURE in getattr(
            item, "fixturenames", ()
        ):
            _activate(config)
            return
        if item.get_closest_marker(_SNAPSHOT) is not None or _SNAPSHOT in getattr(
            item, "fixturenames", ()
        ):
            _activate(config)
            return


class BaselineEntry:
    """A known finding: its id, what it is (for humans reading the file), the tests it fails."""

    __slots__ = ("callsite", "id", "kind", "subject", "tests")

    def __init__(
        self, id: str, kind: str, subject: str, callsite: str | None, tests: Iterable[str]
    ) -> None:
        self.id = id
        self.kind = kind
        self.subject = subject
        self.callsite = callsite
        self.tests = set(tests)

    @classmethod
    def of(cls, finding: Finding, test: str) -> BaselineEntry:
        return cls(finding.id, finding.kind, finding.baseline_key, finding.callsite, (test,))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "callsite": self.callsite,
            "tests": sorted(self.tests),
        }

    def line(self) -> str:
        return (
            f"{self.id} {self.kind} {self.subject[:80]} at {self.callsite or 'unknown call site'}"
        )


def load_baseline(path: Path) -> dict[str, BaselineEntry]:
    """The entries of a baseline file, by finding id; `UsageError` naming the file if invalid."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != _BASELINE_VERSION:
            raise ValueError(f"expected an object with version {_BASELINE_VERSION}")
        entries: dict[str, BaselineEntry] = {}
        for raw in data["findings"]:
            entry = BaselineEntry(
                str(raw["id"]),
                str(raw.get("kind", "")),
                str(raw.get("subject", "")),
                raw.get("callsite"),
                (str(test) for test in raw.get("tests", ())),
            )
            entries[entry.id] = entry
        return entries
    except FileNotFoundError:
        raise pytest.UsageError(
            f"querywatch baseline {path} does not exist; create it with "
            "--querywatch-update-baseline"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise pytest.UsageError(f"querywatch baseline {path} is not valid: {exc}") from None


def write_baseline(path: Path, entries: Iterable[BaselineEntry]) -> None:
    """Write the baseline sorted by id, one entry per block, so diffs stay small."""
    data = {
        "version": _BASELINE_VERSION,
        "findings": [entry.as_json() for entry in sorted(entries, key=lambda e: e.id)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Policy:
    """What fails one test: a statement budget and finding kinds; its unit's settings."""

    __slots__ = ("fail_on", "max_statements", "settings", "sources")

    def __init__(
        self,
        fail_on: frozenset[str],
        max_statements: int | None,
        settings: Settings | None,
        sources: dict[str, str],
    ) -> None:
        self.fail_on = fail_on
        self.max_statements = max_statements
        self.settings = settings
        #: kind -> where the decision to fail on it came from, for the failure message
        self.sources = sources


def _marker_policy(item: pytest.Item, fail_on: frozenset[str]) -> Policy:
    kinds = set(fail_on)
    sources = {kind: f"fail-on {kind}" for kind in fail_on}
    max_statements: int | None = None
    settings: Settings | None = None
    marker = item.get_closest_marker(_MARKER)
    if marker is None:
        return Policy(frozenset(kinds), None, None, sources)
    args = list(marker.args)
    kwargs = dict(marker.kwargs)
    if len(args) > 1:
        pytest.fail(
            f"{_MARKER}: at most one positional argument (max_statements), got {len(args)}",
            pytrace=False,
        )
    if args:
        if "max_statements" in kwargs:
            pytest.fail(f"{_MARKER}: max_statements given twice", pytrace=False)
        kwargs["max_statements"] = args[0]
    for key, value in kwargs.items():
        if key == "max_statements":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                pytest.fail(
                    f"{_MARKER}: max_statements must be an integer >= 0, got {value!r}",
                    pytrace=False,
                )
            max_statements = value
        elif key == "n_plus_one_threshold":
            # deferred: plugin start-up stays light
            from querywatch._collection import default_settings
            from querywatch.exceptions import ConfigError

            try:
                settings = default_settings().replace(n_plus_one_threshold=value)
            except ConfigError as exc:
                pytest.fail(f"{_MARKER}: {exc}", pytrace=False)
        elif key in KINDS or key in _ALIASES:
            kind = _ALIASES.get(key, key)
            if value == "fail":
                kinds.add(kind)
                sources[kind] = f'{_MARKER}({key}="fail")'
            elif value == "ignore" or value is None:
                kinds.discard(kind)
            else:
                pytest.fail(
                    f'{_MARKER}: {key} must be "fail" or "ignore", got {value!r}', pytrace=False
                )
        else:
            accepted = ", ".join(("max_statements", "n_plus_one_threshold", *KINDS))
            pytest.fail(f"{_MARKER}: unknown argument {key!r}; accepted: {accepted}", pytrace=False)
    return Policy(frozenset(kinds), max_statements, settings, sources)


class QueryWatchSession:
    """The active part of the plugin, registered only once something asks for it."""

    def __init__(
        self,
        config: pytest.Config,
        *,
        fail_on: frozenset[str],
        baseline: Path | None,
        update: bool,
    ) -> None:
        self.config = config
        self.fail_on = fail_on
        self.baseline_path = baseline
        self.update = update
        self.baseline: dict[str, BaselineEntry] = {}
        if baseline is not None and not (update and not baseline.exists()):
            self.baseline = load_baseline(baseline)
        #: failing findings seen in this session (baselined or not), by id
        self.seen: dict[str, BaselineEntry] = {}
        #: every finding id seen in a watched test (for stale entries)
        self.seen_ids: set[str] = set()
        self.ran: set[str] = set()
        self.baselined_tests: set[str] = set()
        self.baselined_ids: set[str] = set()
        self.written: int | None = None

    def pytest_report_header(self) -> list[str]:
        parts = [f"fail-on={','.join(sorted(self.fail_on)) or 'none'}"]
        if self.baseline_path is not None:
            parts.append(f"baseline={self.baseline_path} ({len(self.baseline)} known findings)")
            if self.update:
                parts.append("updating the baseline")
        return ["querywatch: " + ", ".join(parts)]

    def _watched(self, item: pytest.Item, policy: Policy) -> bool:
        return bool(
            policy.fail_on
            or policy.max_statements is not None
            or item.get_closest_marker(_MARKER) is not None
            or _FIXTURE in getattr(item, "fixturenames", ())
        )

    # trylast: innermost, inside the capture plugin's wrapper, so what the reporters log when
    # the unit closes is captured with the test's output.
    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        from querywatch import _reporting  # deferred: plugin start-up stays light

        # Each test logs its requests' findings, whatever an earlier test logged.
        _reporting.forget_logged_findings()
        policy = _marker_policy(item, self.fail_on)
        snapshot = _snapshot_test(item)
        if snapshot is None and not self._watched(item, policy):
            return (yield)
        from querywatch.testing import WatchedUnit  # deferred: plugin start-up stays light

        settings = policy.settings if snapshot is None else snapshot.settings(policy.settings)
        unit = item.stash[_UNIT] = WatchedUnit(item.nodeid, settings=settings)
        report = unit.open()
        if snapshot is not None:
            snapshot.start(report)
        try:
            result = yield
        except BaseException as exc:
            unit.close(type(exc), exc, exc.__traceback__)
            if snapshot is not None:
                snapshot.stop()
            self._record(item, unit, policy)
            raise
        unit.close()
        message = self._record(item, unit, policy)
        if snapshot is not None:
            message = "\n\n".join(part for part in (message, snapshot.finish()) if part)
        if message:
            pytest.fail(message, pytrace=False)
        return result

    def _record(self, item: pytest.Item, unit: WatchedUnit, policy: Policy) -> str:
        """Remember the test's findings; the failure message, or "" when it passes."""
        # deferred: plugin start-up stays light
        from querywatch.testing import describe_budget, describe_findings

        report = unit.report
        assert report is not None
        test = item.nodeid
        self.ran.add(test)
        findings = unit.findings
        new: list[Finding] = []
        for finding in findings:
            self.seen_ids.add(finding.id)
            if finding.kind not in policy.fail_on:
                continue
            entry = self.seen.get(finding.id)
            if entry is None:
                self.seen[finding.id] = BaselineEntry.of(finding, test)
            else:
                entry.tests.add(test)
            if finding.id in self.baseline:
                self.baselined_ids.add(finding.id)
                self.baselined_tests.add(test)
            elif not self.update:
                new.append(finding)
        parts: list[str] = []
        budget = policy.max_statements
        if budget is not None and report.statements > budget:
            parts.append(describe_budget(report, budget, unit="the test", findings=findings))
        if new:
            why = sorted({policy.sources.get(f.kind, "") for f in new} - {""})
            lines = [
                f"querywatch: {len(new)} finding(s) fail this test ({', '.join(why)}):",
                *describe_findings(new),
            ]
            if self.fail_on & {f.kind for f in new} or self.baseline_path is not None:
                lines.append(
                    "fix them, or accept them for now in the baseline: "
                    "--querywatch-baseline=PATH --querywatch-update-baseline"
                )
            parts.append("\n".join(lines))
        return "\n\n".join(parts)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        try:
            return (yield)
        finally:
            # Fixtures may read the report in their teardown; then it is freed.
            if _UNIT in item.stash:
                del item.stash[_UNIT]
            if _SNAPSHOT_TEST in item.stash:
                del item.stash[_SNAPSHOT_TEST]

    def stale(self) -> list[BaselineEntry]:
        """Baseline entries not found any more, among those whose tests all ran."""
        return [
            entry
            for entry in self.baseline.values()
            if entry.id not in self.seen_ids and entry.tests <= self.ran
        ]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.update or self.baseline_path is None:
            return
        if hasattr(self.config, "workerinput"):
            return  # pytest-xdist worker: the baseline is written by one process only
        merged: dict[str, BaselineEntry] = {}
        for entry in self.baseline.values():
            kept = entry.tests - self.ran
            if kept:
                merged[entry.id] = BaselineEntry(
                    entry.id, entry.kind, entry.subject, entry.callsite, kept
                )
        for entry in self.seen.values():
            existing = merged.get(entry.id)
            if existing is None:
                merged[entry.id] = entry
            else:
                existing.tests |= entry.tests
        write_baseline(self.baseline_path, merged.values())
        self.written = len(merged)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines: list[str] = []
        if self.baselined_ids and not self.update:
            lines.append(
                f"{len(self.baselined_ids)} baselined finding(s) did not fail "
                f"{len(self.baselined_tests)} test(s)"
            )
        stale = self.stale() if not self.update else []
        if stale:
            lines.append(
                f"{len(stale)} stale baseline entr{'y' if len(stale) == 1 else 'ies'} (not found "
                "any more: delete them, or rerun with --querywatch-update-baseline):"
            )
            lines.extend(f"  {entry.line()}" for entry in sorted(stale, key=lambda e: e.id))
        if self.written is not None:
            lines.append(f"wrote {self.written} finding(s) to the baseline {self.baseline_path}")
        if lines:
            terminalreporter.write_sep("=", "querywatch")
            for line in lines:
                terminalreporter.write_line(line)


class QueryWatchFixture:
    """What the `querywatch` fixture gives a test: its report, block watches, assertions."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    @property
    def report(self) -> Report:
        """The test body's report: live during the test (findings exist once it has ended)."""
        unit = self._item.stash.get(_UNIT, None)
        if unit is None or unit.report is None:
            raise RuntimeError(
                "querywatch.report is the test body's report: read it in the test, not in a "
                "fixture's setup, and request the querywatch fixture as an argument"
            )
        return unit.report

    def watch(self, name: str = "block") -> WatchedUnit:
        """Watch a block inside the test: `with querywatch.watch() as report:`. Its statements
        also count toward the test's budget, and its findings are the test's. A test unit like
        the test body: requests made in the block judge their own statements."""
        from querywatch.testing import WatchedUnit  # deferred: plugin start-up stays light

        return WatchedUnit(name)

    def assert_max_statements(self, max_statements: int) -> AssertMaxStatements:
        """`with querywatch.assert_max_statements(3):` fails when the block runs more."""
        # deferred: plugin start-up stays light
        from querywatch.testing import assert_max_statements

        return assert_max_statements(max_statements)

    def assert_no_n_plus_one(self, *, threshold: int | None = None) -> AssertNoNPlusOne:
        """`with querywatch.assert_no_n_plus_one():` fails on an N+1 finding in the block."""
        from querywatch.testing import assert_no_n_plus_one  # deferred: plugin start-up stays light

        return assert_no_n_plus_one(threshold=threshold)


@pytest.fixture(name=_FIXTURE)
def querywatch_fixture(request: pytest.FixtureRequest) -> QueryWatchFixture:
    """The test body's querywatch report, plus block watches and statement assertions."""
    _activate(request.config)
    return QueryWatchFixture(request.node)


@pytest.fixture(name=_SNAPSHOT)
def querywatch_snapshot_fixture(request: pytest.FixtureRequest) -> SnapshotBlocks:
    """Named blocks in the test's snapshot: `with querywatch_snapshot("after login"):`."""
    _activate(request.config)
    from querywatch._snapshots import SnapshotBlocks  # deferred: plugin start-up stays light

    node = request.node
    return SnapshotBlocks(lambda: node.stash.get(_SNAPSHOT_TEST, None))
