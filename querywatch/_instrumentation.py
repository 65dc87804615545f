"""`instrument()` and `uninstrument()`: attaching querywatch to engines, and setting up what
every unit of work runs when it ends (the pool's leak check, the detectors, the structlog
reporter) - the unit of work imports none of them itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from querywatch import _detection, _orm, _reporting, _statement_hooks, pool
from querywatch._collection import add_detector, add_finisher, configure
from querywatch._engines import (
    Instrumentation,
    engine_name,
    handle_of,
    instrumented_engines,
    register,
    require_sync_engine,
    sync_engine_of,
)
from querywatch.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Instrumentation",
    "engine_name",
    "instrument",
    "instrumented_engines",
    "sync_engine_of",
    "uninstrument",
    "use_default_pipeline",
]


def use_default_pipeline() -> None:
    """Make every unit of work check the pool for leaks, run the detectors and log through
    structlog when it ends (idempotent)."""
    add_finisher("pool", pool.finish_unit)
    add_detector(_detection.detect)
    _reporting.install()


def instrument(
    engine: Engine | AsyncEngine, *, name: str | None = None, settings: Settings | None = None
) -> Instrumentation:
    """Attach querywatch to `engine` (sync or async). Idempotent: a second call returns the
    same handle. `name` is the engine's `pool` label (default `driver://host:port/db`).
    `settings`, when given, become the process-wide default (see `querywatch.configure`)."""
    sync_engine = require_sync_engine(engine)
    if settings is not None:
        configure(settings)
    use_default_pipeline()
    existing = handle_of(sync_engine)
    if existing is not None:
        return existing
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError("instrument(name=...) must be a non-empty string")
    handle = Instrumentation(sync_engine, name or engine_name(sync_engine))
    _statement_hooks.attach(handle, sync_engine)
    pool.attach(handle, sync_engine)
    _orm.ensure_installed(handle)
    register(sync_engine, handle)
    return handle


def uninstrument(engine: Engine | AsyncEngine) -> bool:
    """Detach querywatch from `engine`. Returns False when it was not instrumented."""
    handle = handle_of(require_sync_engine(engine))
    if handle is None:
        return False
    handle.remove()
    return True
