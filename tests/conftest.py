"""Shared fixtures: real databases, the guard in re-raise mode, clean global state per test."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

import querywatch
from querywatch import _collection, _guard, _reporting
from querywatch.settings import DEFAULT_SETTINGS
from tests.models import create_schema, seed

PG_HOST = os.environ.get("QUERYWATCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("QUERYWATCH_PG_PORT", "5432"))
PG_USER = os.environ.get("QUERYWATCH_PG_USER", "postgres")
PG_DB = os.environ.get("QUERYWATCH_PG_DB", "test")
# Each test run works in a scratch database of its own, created from the server's `test`
# database connection, so two runs on one machine (a developer and CI) never race on tables.
RUN_DB = f"querywatch_test_{os.getpid()}"
_ADMIN_URL = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
PSYCOPG_URL = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{RUN_DB}"
ASYNCPG_URL = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{RUN_DB}"
MARIADB_HOST = os.environ.get("QUERYWATCH_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("QUERYWATCH_MARIADB_PORT", "3306"))
MARIADB_URL = f"mysql+pymysql://root@{MARIADB_HOST}:{MARIADB_PORT}/test"


def _postgres_answers() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    """Skip when no PostgreSQL answers, unless CI demands it (QUERYWATCH_REQUIRE_POSTGRES=1)."""
    if _postgres_answers():
        return
    if os.environ.get("QUERYWATCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"QUERYWATCH_REQUIRE_POSTGRES=1 but no PostgreSQL at {PG_HOST}:{PG_PORT}")
    pytest.skip(f"no PostgreSQL at {PG_HOST}:{PG_PORT}")


def require_mariadb() -> None:
    """Skip when no MariaDB answers, unless CI demands it (QUERYWATCH_REQUIRE_MARIADB=1)."""
    try:
        with socket.create_connection((MARIADB_HOST, MARIADB_PORT), timeout=1.0):
            return
    except OSError:
        pass
    if os.environ.get("QUERYWATCH_REQUIRE_MARIADB") == "1":
        pytest.fail(f"QUERYWATCH_REQUIRE_MARIADB=1 but no MariaDB at {MARIADB_HOST}:{MARIADB_PORT}")
    pytest.skip(f"no MariaDB at {MARIADB_HOST}:{MARIADB_PORT}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session", autouse=True)
def _postgres_run_database() -> Iterator[None]:
    """Create this run's scratch database (and drop those of runs that died) when PostgreSQL
    answers; drop it at the end."""
    if not _postgres_answers():
        yield
        return
    admin = sa.create_engine(_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        names = conn.exec_driver_sql(
            "SELECT datname FROM pg_database WHERE datname LIKE 'querywatch_test_%%'"
        ).scalars()
        for name in list(names):
            pid = name.rsplit("_", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{RUN_DB}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{RUN_DB}"')
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{RUN_DB}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(autouse=True)
def _querywatch_test_mode() -> Iterator[None]:
    """Our own bugs fail our tests: the guard re-raises; global settings are reset after."""
    _guard.raise_internal_errors = True
    _reporting.forget_logged_findings()
    yield
    _guard.raise_internal_errors = False
    _guard.injected_faults = frozenset()
    _collection.configure(DEFAULT_SETTINGS)
    assert _collection.current_collector() is None, "a test leaked an open unit of work"


@pytest.fixture
def sqlite_engine() -> Iterator[sa.Engine]:
    """A fresh in-memory SQLite engine (one shared connection), instrumented."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    """An instrumented psycopg 3 engine on the local PostgreSQL (skips when absent)."""
    require_postgres()
    engine = sa.create_engine(PSYCOPG_URL)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
def mariadb_engine() -> Iterator[sa.Engine]:
    """An instrumented pymysql engine on the local MariaDB's `test` database (skips when
    absent)."""
    require_mariadb()
    engine = sa.create_engine(MARIADB_URL)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
async def aiosqlite_engine() -> AsyncIterator[AsyncEngine]:
    """An instrumented aiosqlite engine on a shared in-memory database."""
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=sa.pool.StaticPool)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    await engine.dispose()


@pytest.fixture
async def asyncpg_engine() -> AsyncIterator[AsyncEngine]:
    """An instrumented asyncpg engine on the local PostgreSQL (skips when absent)."""
    require_postgres()
    engine = create_async_engine(ASYNCPG_URL)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An instrumented sync engine: SQLite, then PostgreSQL (psycopg 3)."""
    if request.param == "postgresql":
        require_postgres()
        engine = sa.create_engine(PSYCOPG_URL)
    else:
        engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture(params=["aiosqlite", "asyncpg"])
async def any_async_engine(request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    """An instrumented async engine: aiosqlite, then PostgreSQL (asyncpg)."""
    if request.param == "asyncpg":
        require_postgres()
        engine = create_async_engine(ASYNCPG_URL)
    else:
        engine = create_async_engine("sqlite+aiosqlite://", poolclass=sa.pool.StaticPool)
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    await engine.dispose()


def _sqlite_engine() -> sa.Engine:
    # Sync endpoints run in a threadpool: the one in-memory connection is shared across threads.
    return sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )


@pytest.fixture
def sqlite_web_engine() -> Iterator[sa.Engine]:
    """An instrumented in-memory SQLite engine usable from a threadpool (web app tests)."""
    engine = _sqlite_engine()
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
def web_library(sqlite_web_engine: sa.Engine) -> sa.Engine:
    """`sqlite_web_engine` with the shared models, seeded: 10 authors with 3 books each (the web
    apps' `/authors` lazy-loads each author's books: an N+1)."""
    create_schema(sqlite_web_engine)
    with Session(sqlite_web_engine) as session:
        seed(session)
    return sqlite_web_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def web_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An instrumented sync engine usable from a threadpool: SQLite, then PostgreSQL."""
    if request.param == "postgresql":
        require_postgres()
        engine = sa.create_engine(PSYCOPG_URL)
    else:
        engine = _sqlite_engine()
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


@pytest.fixture
def reports() -> Iterator[list[querywatch.Report]]:
    """Every report of a unit of work that ends during the test."""
    collected: list[querywatch.Report] = []
    remove = querywatch.add_reporter(collected.append)
    yield collected
    remove()


class Logs:
    """structlog's real output: JSON lines written to a buffer."""

    def __init__(self, buffer: io.StringIO) -> None:
        self.buffer = buffer

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def logs() -> Iterator[Logs]:
    """structlog rendering JSON (context variables merged in) into a buffer, for the test."""
    buffer = io.StringIO()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=buffer),
        cache_logger_on_first_use=False,
    )
    yield Logs(buffer)
    structlog.reset_defaults()
