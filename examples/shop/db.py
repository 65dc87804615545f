"""Engines for the shop: `DATABASE_URL` (PostgreSQL, ...) or a SQLite file next to this package.

Two pools, as in many real services: `shop` serves the requests, `reports` (same database, a
small pool, short timeout) serves the reporting endpoints, so the leaky reporting helper drains
its own pool and the dashboard shows two pools.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import URL, make_url

DEFAULT_SQLITE = Path(__file__).resolve().parent.parent / "shop.db"
#: The reports pool: two connections, and a request waits at most this long for one.
REPORTS_POOL_SIZE = 2
REPORTS_POOL_TIMEOUT = 0.5


def database_url(url: str | None = None) -> URL:
    """The URL to use: `url`, else `DATABASE_URL`, else the SQLite file `examples/shop.db`."""
    raw = url or os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE}"
    parsed = make_url(raw)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def async_database_url(url: str | None = None) -> URL:
    """The async driver for the same database: aiosqlite, or psycopg 3 in async mode."""
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() != "aiosqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql" and parsed.get_driver_name() not in ("asyncpg", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def engine_options(url: URL, *, reports: bool = False) -> dict[str, object]:
    """Pool options (SQLAlchemy picks a queue pool for files and servers, sync and async)."""
    options: dict[str, object] = {}
    if url.get_backend_name() == "sqlite":
        options["connect_args"] = {"check_same_thread": False}
    if reports:
        options.update(
            pool_size=REPORTS_POOL_SIZE, max_overflow=0, pool_timeout=REPORTS_POOL_TIMEOUT
        )
    else:
        options.update(pool_size=5, max_overflow=5, pool_timeout=10)
    return options


def prepare(url: URL) -> None:
    """Create the tables and seed them (idempotent), through a short-lived sync engine."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from shop.models import Base, seed

    if url.get_backend_name() == "sqlite" and url.get_driver_name() == "aiosqlite":
        url = url.set(drivername="sqlite")
    elif url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg":
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            seed(session)
    finally:
        engine.dispose()
