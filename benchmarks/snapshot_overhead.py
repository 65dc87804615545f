"""What snapshot mode adds to a test run: a 200-test pytest suite with and without snapshots.

The suite (written to a temporary directory) is what an app's own tests look like: ORM reads
with eager and lazy loads, an N+1, writes rolled back, and requests through FastAPI's
`TestClient`, on SQLite, 200 tests in 4 modules. Each configuration runs it in a fresh
`python -m pytest` process; rounds alternate the configurations so machine drift cancels, and
the result is the median of the per-round ratios: of the CPU time of the pytest process (user +
system: the least disturbed by other work on the machine), of its wall time, and of the session
time pytest reports (collection and tests, without interpreter start-up).

On a busy machine the differences between whole runs drown in noise; so the script also runs
the snapshot configuration once under cProfile and reports the share of the session spent in
the snapshot code itself (recording, building and comparing each test's record, writing files).

Configurations: `off` (querywatch installed, no option: the plugin stays inert), `fail-on`
(`--querywatch-fail-on=connection_leak`: every test watched, detection run, none fails),
`snapshot` (the same plus `--querywatch-snapshot`, the records already written: every test's
record built and compared with its file).

    python benchmarks/snapshot_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from _common import interleaved, paired_ratios

CONFTEST = """
import pytest
import sqlalchemy as sa
from _common import Author, reset
from fastapi import FastAPI
from sqlalchemy.orm import Session

import querywatch
from querywatch.middleware import QueryWatchMiddleware


@pytest.fixture(scope="session")
def engine():
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    querywatch.instrument(engine)
    reset(engine, authors=10)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    with Session(engine) as session:
        yield session
        session.rollback()


@pytest.fixture(scope="session")
def app(engine):
    app = FastAPI()
    app.add_middleware(QueryWatchMiddleware, metrics=False)

    @app.get("/authors/{author_id}")
    def author(author_id: int):
        with Session(engine) as session:
            author = session.get(Author, author_id)
            return {"name": author.name, "books": [book.title for book in author.books]}

    return app
"""

MODULES = {
    "test_reads": """
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import selectinload
from _common import Author, Book

@pytest.mark.parametrize("i", range(50))
def test_eager(session, i):
    authors = session.scalars(sa.select(Author).options(selectinload(Author.books))).all()
    assert len(authors) == 10
    assert session.get(Book, 10 + i % 3).title
""",
    "test_lazy": """
import pytest
import sqlalchemy as sa
from _common import Author

@pytest.mark.parametrize("i", range(50))
def test_lazy(session, i):
    for author in session.scalars(sa.select(Author).limit(1 + i % 8)):
        assert author.books
""",
    "test_writes": """
import pytest
import sqlalchemy as sa
from _common import Author, Book

@pytest.mark.parametrize("i", range(50))
def test_write(session, i):
    session.add(Book(id=1000 + i, title="new", author_id=1))
    session.flush()
    session.execute(sa.update(Author).where(Author.id == 1).values(name="renamed"))
    assert session.scalar(sa.select(sa.func.count()).select_from(Book)) == 31
""",
    "test_requests": """
import pytest
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

@pytest.mark.parametrize("i", range(50))
def test_request(app, i):
    client = TestClient(app)
    assert client.get(f"/authors/{1 + i % 10}").status_code == 200
    assert client.get("/authors/1").status_code == 200
""",
}

INI = """
[pytest]
filterwarnings =
    error
    ignore::DeprecationWarning
"""

CONFIGS = {
    "off": (),
    "fail-on": ("--querywatch-fail-on=connection_leak",),
    "snapshot": ("--querywatch-fail-on=connection_leak", "--querywatch-snapshot"),
}
_SESSION_SECONDS = re.compile(r" in ([0-9.]+)s")
#: The suite's environment: it imports its models from `_common`, beside this file.
ENV = {
    **os.environ,
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")])
    ),
}


def write_suite(root: Path) -> None:
    (root / "pytest.ini").write_text(INI)
    (root / "conftest.py").write_text(CONFTEST)
    for name, source in MODULES.items():
        (root / f"{name}.py").write_text(source)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(root: Path, args: tuple[str, ...]) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds of the pytest process, session seconds pytest reports)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env=ENV,
    )
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if done.returncode != 0 or "200 passed" not in done.stdout:
        raise SystemExit(f"the suite failed with {args}:\n{done.stdout[-3000:]}{done.stderr}")
    found = _SESSION_SECONDS.findall(done.stdout)
    return cpu, wall, float(found[-1])


#: The snapshot code's entry points, none called from another: (file name, function name).
ENTRY_POINTS = {
    ("pytest_plugin.py", "_snapshot_test"),
    ("pytest_plugin.py", "pytest_testnodedown"),
    ("_snapshots.py", "settings"),
    ("_snapshots.py", "start"),
    ("_snapshots.py", "_finished"),
    ("_snapshots.py", "finish"),
    ("_snapshots.py", "pytest_itemcollected"),
    ("_snapshots.py", "pytest_collectstart"),
    ("_snapshots.py", "pytest_sessionfinish"),
    ("_snapshots.py", "pytest_terminal_summary"),
}


def profile(root: Path) -> tuple[float, float]:
    """(seconds in the snapshot code, seconds of the test run loop) of one profiled run."""
    out = root / "profile.out"
    command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "pytest", "-q"]
    subprocess.run(
        [*command, "-p", "no:cacheprovider", *CONFIGS["snapshot"]],
        cwd=root,
        capture_output=True,
        check=True,
        env=ENV,
    )
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    snapshot = 0.0
    session = 0.0
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        name = Path(filename).name
        if (name, function) in ENTRY_POINTS and "querywatch" in filename:
            snapshot += cumulative
        elif name == "main.py" and function == "pytest_runtestloop":
            session = max(session, cumulative)
    out.unlink()
    return snapshot, session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="querywatch-snapshot-bench-") as tmp:
        root = Path(tmp)
        write_suite(root)
        run(root, CONFIGS["snapshot"])  # writes the records (and warms the file cache)
        records = sorted(root.glob("*.querywatch.yml"))
        lines = sum(len(path.read_text().splitlines()) for path in records)
        print(f"200 tests, {len(records)} record files ({lines} lines); {options.rounds} rounds")
        times = interleaved(
            options.rounds, {name: partial(run, root, args) for name, args in CONFIGS.items()}
        )
        metrics = (("cpu", 0), ("wall", 1), ("session", 2))
        for name in CONFIGS:
            medians = ", ".join(
                f"{label} {statistics.median(t[index] for t in times[name]):.2f} s"
                for label, index in metrics
            )
            print(f"{name:>9}: medians {medians}")
        snapshot, session = profile(root)
        print(
            f"profiled: snapshot code {snapshot * 1000:.0f} ms of a {session:.2f} s test loop "
            f"({snapshot / session:.1%}), {snapshot / 200 * 1000:.2f} ms per test"
        )
        for base, other in (("fail-on", "snapshot"), ("off", "snapshot"), ("off", "fail-on")):
            for label, index in metrics:
                ratios = paired_ratios(
                    [t[index] for t in times[base]], [t[index] for t in times[other]]
                )
                print(
                    f"{other} vs {base} ({label}): median {statistics.median(ratios) - 1:+.1%}, "
                    f"range {min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%}"
                )


if __name__ == "__main__":
    main()
