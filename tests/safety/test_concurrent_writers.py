"""One unit of work written by 8 threads and 8 asyncio tasks at once counts exactly.

A request that fans out to threads with a copied context, or gathers tasks, has every writer
record into the same collector. The GIL switch interval is cut to a microsecond here, so that
an unguarded read-modify-write (`count += 1`) between two threads would lose updates within a
few hundred statements.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

import querywatch
from querywatch import Report
from tests.conftest import ASYNCPG_URL, PSYCOPG_URL, require_postgres
from tests.models import Author, seeded

THREADS = 8
TASKS = 8
#: Connections each writer checks out, and statements it runs on each.
CONNECTIONS = 10
STATEMENTS = 30
#: Authors whose books each thread lazy-loads (one SELECT per author).
AUTHORS = 10


@dataclass
class Hammered:
    report: Report
    sync_engine: sa.Engine


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    """Threads switch every microsecond: any lost update shows up."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(params=["sqlite", "postgresql"])
def engines(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[sa.Engine, AsyncEngine]]:
    """A sync and an async engine on one database, both instrumented, connections enough for
    every writer at once."""
    if request.param == "postgresql":
        require_postgres()
        sync_url, async_url = PSYCOPG_URL, ASYNCPG_URL
    else:
        path = tmp_path / "hammer.db"
        sync_url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    sync_engine = sa.create_engine(sync_url, pool_size=THREADS, max_overflow=THREADS)
    # NullPool: every task's connection opens and closes inside the one event loop it runs in.
    async_engine = create_async_engine(async_url, poolclass=sa.pool.NullPool)
    asyncio.run(_first_connect(async_engine))  # the dialect's first-connect queries, not ours
    seeded(sync_engine, authors=AUTHORS, books_per_author=2)
    querywatch.instrument(sync_engine)
    querywatch.instrument(async_engine)
    yield sync_engine, async_engine
    querywatch.uninstrument(sync_engine)
    querywatch.uninstrument(async_engine)
    sync_engine.dispose()
    asyncio.run(async_engine.dispose())


async def _first_connect(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))


def _thread_work(engine: sa.Engine, start: threading.Barrier) -> None:
    start.wait()
    for _ in range(CONNECTIONS):
        with engine.connect() as conn:
            for i in range(STATEMENTS):
                conn.execute(sa.text("SELECT CAST(:i AS INTEGER) AS n"), {"i": i}).all()
    with Session(engine) as session:
        for author in session.scalars(sa.select(Author).order_by(Author.id)).all():
            len(author.books)


async def _task_work(engine: AsyncEngine) -> None:
    for _ in range(CONNECTIONS):
        async with engine.connect() as conn:
            for i in range(STATEMENTS):
                await conn.execute(sa.text("SELECT CAST(:i AS INTEGER) AS m"), {"i": i})
                await asyncio.sleep(0)  # let the other tasks in between statements


async def _tasks(engine: AsyncEngine) -> None:
    await asyncio.gather(*(_task_work(engine) for _ in range(TASKS)))


@pytest.fixture
def hammered(engines: tuple[sa.Engine, AsyncEngine]) -> Hammered:
    """Run 8 threads (copied contexts) and 8 tasks at once inside one `watch()` unit."""
    sync_engine, async_engine = engines
    start = threading.Barrier(THREADS + 1)
    with querywatch.watch("hammer") as report:
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run, args=(_thread_work, sync_engine, start)
            )
            for _ in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        start.wait()
        asyncio.run(_tasks(async_engine))
        for thread in threads:
            thread.join()
    return Hammered(report, sync_engine)


#: Per thread: the statement loop, one SELECT of the authors, one lazy load per author.
PER_THREAD = CONNECTIONS * STATEMENTS + 1 + AUTHORS
PER_TASK = CONNECTIONS * STATEMENTS


def test_statements_are_counted_exactly(hammered: Hammered) -> None:
    """Every statement of every thread and task is counted, none lost or doubled."""
    assert hammered.report.statements == THREADS * PER_THREAD + TASKS * PER_TASK


def test_each_shape_is_counted_exactly(hammered: Hammered) -> None:
    """The per-shape counts add up to each writer's share."""
    counts = sorted(hammered.report.fingerprints.values())
    expected = [
        THREADS * CONNECTIONS * STATEMENTS,  # the threads' statement loop
        TASKS * CONNECTIONS * STATEMENTS,  # the tasks' statement loop
        THREADS,  # each thread's SELECT of the authors
        THREADS * AUTHORS,  # the lazy loads of their books
    ]
    assert counts == sorted(expected)


def test_pool_checkouts_are_counted_exactly(hammered: Hammered) -> None:
    """Each connection checked out by a thread or a task is one checkout of the unit."""
    per_thread = CONNECTIONS + 1  # the Session's connection too
    assert hammered.report.pool.checkouts == THREADS * per_thread + TASKS * CONNECTIONS


def test_lazy_loads_are_counted_exactly(hammered: Hammered) -> None:
    """The lazy loads of all threads land in one N+1 finding with their exact count."""
    lazy = [f for f in hammered.report.n_plus_one if f.pattern == "lazy_load"]
    assert [(f.relationship, f.count) for f in lazy] == [("Author.books", THREADS * AUTHORS)]
