"""querywatch on a realistic app: `project/` is a FastAPI + SQLAlchemy 2.x app written like the
popular full-stack templates (users and items CRUD, login with a password-hash upgrade, a
session-scoped database fixture shared by the tests), audited with `mode="raise"`.

Its own suite runs in a separate pytest process with `--querywatch-fail-on=any`, on SQLite and
on PostgreSQL: as written, it must pass with no finding anywhere; with three mistakes seeded
(`REALWORLD_MISTAKE`), each must be found with the right kind, subject and call site.
The `realworld_probe` plugin hands the inner run's reports back as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import PG_DB, PG_HOST, PG_PORT, PG_USER, require_postgres

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "project"
#: The inner run's budget: a hung run must fail the test, not the CI job.
TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Seeded:
    """A mistake the app can be run with (`REALWORLD_MISTAKE`), and how it must be found."""

    #: The test of the realistic suite that exercises it.
    test: str
    #: The finding's kind.
    kind: str
    #: The unit of work (request) the finding belongs to.
    request: str
    #: The project file, and the markers of the lines the finding's call site may name.
    path: str
    markers: tuple[str, ...]

    def sites(self) -> tuple[str, ...]:
        return tuple(marker_site(self.path, marker) for marker in self.markers)


SEEDED = {
    "n_plus_one": Seeded(
        test="app/tests/api/routes/test_items.py::test_read_items",
        kind="n_plus_one",
        request="GET /api/v1/items/",
        path="app/api/routes/items.py",
        markers=("items-page",),
    ),
    "duplicate": Seeded(
        test="app/tests/api/routes/test_users.py::test_get_users_normal_user_me",
        kind="duplicate_query",
        request="GET /api/v1/users/me",
        path="app/api/deps.py",
        markers=("duplicate-lookup",),
    ),
    # A leak's call site is where its session was opened, or where the connection was taken.
    "leak": Seeded(
        test="app/tests/api/routes/test_utils.py::test_health_check",
        kind="connection_leak",
        request="GET /health",
        path="app/api/routes/utils.py",
        markers=("leaked-session", "leaked-checkout"),
    ),
}


def marker_site(path: str, marker: str) -> str:
    """`app/api/deps.py:42`: where the line carrying `# marker: <marker>` is in the project."""
    lines = (PROJECT / path).read_text(encoding="utf-8").splitlines()
    found = [n for n, line in enumerate(lines, start=1) if line.endswith(f"# marker: {marker}")]
    assert len(found) == 1, f"expected one '# marker: {marker}' in {path}, found {found}"
    return f"{path}:{found[0]}"


def names(text: str | None, site: str) -> bool:
    """Whether `text` (a call site, a message) names `site` (`deps.py:4` is not `deps.py:42`)."""
    return re.search(re.escape(site) + r"(?!\d)", text or "") is not None


@dataclass(frozen=True)
class Run:
    """One run of the realistic suite, as the probe recorded it."""

    returncode: int
    output: str
    outcomes: dict[str, dict[str, str]]
    units: list[dict[str, Any]]
    events: list[dict[str, str]]
    internal_errors: list[str]
    test_labels: list[str]

    def findings(self, *, test: str | None = None) -> list[dict[str, Any]]:
        """Findings of every unit of work (of those that ran during `test`), with their unit."""
        return [
            {**finding, "unit": unit["name"], "unit_kind": unit["kind"], "test": unit["test"]}
            for unit in self.units
            if test is None or unit["test"] == test
            for finding in unit["findings"]
        ]

    def bug_list(self) -> str:
        """Every finding and every finding event logged, one line each: what a false alarm
        looks like, for failure messages."""
        lines = [
            f"{f['kind']} in {f['unit_kind']} {f['unit']!r} (test {f['test']}): {f['message']}"
            for f in self.findings()
        ]
        lines.extend(
            f"logged {e['event']} of {e.get('route') or e.get('unit')!r} (test {e['test']}) "
            f"at {e.get('callsite')}"
            for e in self.events
        )
        return "\n".join(lines) or "(no findings)"


def run_suite(database_url: str, tmp_path: Path, *, mistakes: str, tests: list[str]) -> Run:
    """Run the realistic suite (or `tests` of it) in a pytest process of its own."""
    out = tmp_path / "probe.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_CURRENT")}
    env.update(
        REALWORLD_DATABASE_URL=database_url,
        REALWORLD_MISTAKE=mistakes,
        REALWORLD_PROBE_OUT=str(out),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        *tests,
        "--querywatch-fail-on=any",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        # The app's suite needs no hypothesis; its plugin would double the start-up time.
        "-p",
        "no:hypothesispytest",
        "-p",
        "realworld_probe",
        "-q",
    ]
    result = subprocess.run(
        command,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    assert out.exists(), f"the realistic suite did not run:\n{output[-4000:]}"
    data = json.loads(out.read_text(encoding="utf-8"))
    return Run(
        returncode=result.returncode,
        output=output,
        outcomes=data["outcomes"],
        units=data["units"],
        events=data["events"],
        internal_errors=data["internal_errors"],
        test_labels=data["test_labels"],
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL for one run, dropped after it."""
    # Named like tests/conftest.py's run databases, so that its clean-up of the databases of
    # runs that died drops this one too.
    name = f"querywatch_test_realworld_{os.getpid()}"
    admin = sa.create_engine(
        f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}",
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


class Suite:
    """The realistic suite on one database, run at most twice: as written, and with every
    mistake seeded (each mistake is exercised by a test of its own)."""

    def __init__(self, database: str, tmp_path: Path) -> None:
        self.database = database
        self.tmp_path = tmp_path
        self._runs: dict[bool, Run] = {}

    def _run(self, *, seeded: bool) -> Run:
        if seeded not in self._runs:
            directory = self.tmp_path / ("seeded" if seeded else "clean")
            directory.mkdir(exist_ok=True)
            mistakes = ",".join(sorted(SEEDED)) if seeded else ""
            tests = sorted({m.test for m in SEEDED.values()}) if seeded else []
            if self.database == "postgresql":
                with postgres_database() as url:
                    run = run_suite(url, directory, mistakes=mistakes, tests=tests)
            else:
                url = f"sqlite:///{directory / 'app.db'}"
                run = run_suite(url, directory, mistakes=mistakes, tests=tests)
            self._runs[seeded] = run
        return self._runs[seeded]

    def clean(self) -> Run:
        """The whole suite, the app as written."""
        return self._run(seeded=False)

    def seeded(self) -> Run:
        """The tests that exercise the seeded mistakes, with the mistakes in the app."""
        return self._run(seeded=True)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Suite:
    """The realistic suite, run on SQLite, then on PostgreSQL (psycopg 3)."""
    if request.param == "postgresql":
        require_postgres()
    return Suite(request.param, tmp_path_factory.mktemp(f"realworld-{request.param}"))


# The app as written: everything passes, nothing is found.


def test_suite_passes_clean(suite: Suite) -> None:
    """Every test of the realistic suite passes with `--querywatch-fail-on=any` and the app in
    `mode="raise"`."""
    run = suite.clean()
    failed = {test: o for test, o in run.outcomes.items() if o["outcome"] != "passed"}
    details = "\n".join(f"{test}: {o['longrepr'][-1500:]}" for test, o in failed.items())
    assert not failed, f"{len(failed)} of {len(run.outcomes)} tests failed:\n{details}"
    assert run.returncode == 0, run.output[-4000:]


def test_suite_requests_have_no_finding(suite: Suite) -> None:
    """No request of the realistic suite has a finding."""
    run = suite.clean()
    findings = [f for f in run.findings() if f["unit_kind"] == "request"]
    assert findings == [], run.bug_list()


def test_suite_logs_no_finding(suite: Suite) -> None:
    """querywatch logs no finding event while the realistic suite runs (a test unit logs only
    what it judges, and it judges none)."""
    run = suite.clean()
    assert run.events == [], run.bug_list()


def test_suite_requests_are_labelled_with_their_route(suite: Suite) -> None:
    """Every request of the suite is labelled with its route template, `/docs` and
    `/openapi.json` included."""
    run = suite.clean()
    routes = {unit["http"]["route"] for unit in run.units if unit["kind"] == "request"}
    assert {"/docs", "/redoc", "/openapi.json", "/api/v1/items/{id}"} <= routes
    assert "<unmatched>" not in routes


def test_suite_metrics_never_name_a_test(suite: Suite) -> None:
    """No metric sample of the realistic suite has a test id as a label value."""
    assert suite.clean().test_labels == []


def test_suite_has_no_internal_error(suite: Suite) -> None:
    """querywatch logs no internal error while the realistic suite runs."""
    assert suite.clean().internal_errors == []


# Seeded mistakes, all three in one run: each is found in the request that made it, with its
# kind, subject and call site, and fails the test that exercises it.


@pytest.mark.parametrize("mistake", sorted(SEEDED))
def test_seeded_mistake_fails_its_test(suite: Suite, mistake: str) -> None:
    """The realistic test that exercises a seeded mistake fails, naming the mistake's line."""
    seeded = SEEDED[mistake]
    outcome = suite.seeded().outcomes[seeded.test]
    assert outcome["outcome"] == "failed"
    assert any(names(outcome["longrepr"], site) for site in seeded.sites()), outcome["longrepr"]


@pytest.mark.parametrize("mistake", sorted(SEEDED))
def test_seeded_mistake_is_found_in_its_request(suite: Suite, mistake: str) -> None:
    """A seeded mistake is a finding of its kind, at its line, in the request that made it."""
    seeded = SEEDED[mistake]
    run = suite.seeded()
    found = [
        f["unit"]
        for f in run.findings(test=seeded.test)
        if f["kind"] == seeded.kind and any(names(f["callsite"], s) for s in seeded.sites())
    ]
    assert seeded.request in found, run.bug_list()


def test_seeded_n_plus_one_names_the_relationship(suite: Suite) -> None:
    """The items list without its eager load is an N+1 on `Item.owner`."""
    run = suite.seeded()
    found = [
        f["relationship"]
        for f in run.findings(test=SEEDED["n_plus_one"].test)
        if f["kind"] == "n_plus_one" and f["unit"] == SEEDED["n_plus_one"].request
    ]
    assert found == ["Item.owner"], run.bug_list()


def test_seeded_mistakes_in_one_request_are_both_found(suite: Suite) -> None:
    """The items list, which has the N+1 and (through `get_current_user`) the duplicate lookup,
    reports both, although the lazy loads share the duplicate's statement."""
    run = suite.seeded()
    kinds = {
        f["kind"]
        for f in run.findings(test=SEEDED["n_plus_one"].test)
        if f["unit"] == SEEDED["n_plus_one"].request
    }
    assert {"n_plus_one", "duplicate_query"} <= kinds, run.bug_list()


def test_seeded_duplicate_names_both_lookups(suite: Suite) -> None:
    """The duplicate query names the first lookup as well as the repeat."""
    run = suite.seeded()
    first = marker_site("app/api/deps.py", "current-user-query")
    (repeat,) = SEEDED["duplicate"].sites()
    duplicates = [
        f for f in run.findings(test=SEEDED["duplicate"].test) if f["kind"] == "duplicate_query"
    ]
    assert any(names(f["message"], first) and names(f["message"], repeat) for f in duplicates), (
        run.bug_list()
    )


def test_seeded_leak_names_where_the_session_was_opened(suite: Suite) -> None:
    """The leak names the line where its session was opened, not only the query's."""
    run = suite.seeded()
    opened = marker_site("app/api/routes/utils.py", "leaked-session")
    leaks = [f for f in run.findings(test=SEEDED["leak"].test) if f["kind"] == "connection_leak"]
    assert any(names(f["message"], opened) for f in leaks), run.bug_list()
