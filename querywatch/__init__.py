"""querywatch: runtime query auditing for SQLAlchemy 2.x and FastAPI/Starlette.

Count and time every statement of a unit of work (an HTTP request, a job, a test), find N+1
queries, redundant queries and lazy loads after close, and audit the connection pool.
"""

from __future__ import annotations

from querywatch.collection import Report, add_reporter, configure, current_report, watch
from querywatch.exceptions import ConfigError, NPlusOneDetected, QueryWatchError
from querywatch.fingerprinting import fingerprint
from querywatch.instrumentation import Instrumentation, instrument, uninstrument
from querywatch.settings import Settings

__all__ = [
    "ConfigError",
    "Instrumentation",
    "NPlusOneDetected",
    "QueryWatchError",
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
