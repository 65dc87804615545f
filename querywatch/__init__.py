"""querywatch: runtime query auditing for SQLAlchemy 2.x and FastAPI/Starlette.

Count and time every statement of a unit of work (an HTTP request, a job, a test), find N+1
queries, redundant queries and lazy loads after close, and audit the connection pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from querywatch import reporting as _reporting
from querywatch.collection import Report, add_reporter, configure, current_report, watch
from querywatch.exceptions import ConfigError, NPlusOneDetected, QueryWatchError
from querywatch.fingerprinting import fingerprint
from querywatch.instrumentation import Instrumentation, instrument, uninstrument
from querywatch.settings import Settings

if TYPE_CHECKING:
    from querywatch.middleware import QueryWatchMiddleware

__all__ = [
    "ConfigError",
    "Instrumentation",
    "NPlusOneDetected",
    "QueryWatchError",
    "QueryWatchMiddleware",
    "Report",
    "Settings",
    "add_reporter",
    "configure",
    "current_report",
    "fingerprint",
    "instrument",
    "uninstrument",
    "watch",
]
__version__ = "0.1.0"

# Findings of every unit of work are logged through structlog (`querywatch.reporting`).
_reporting.install()


def __getattr__(name: str) -> Any:
    # The middleware is imported on first use: the core works without the web extras.
    if name == "QueryWatchMiddleware":
        from querywatch.middleware import QueryWatchMiddleware

        return QueryWatchMiddleware
    raise AttributeError(f"module 'querywatch' has no attribute {name!r}")
