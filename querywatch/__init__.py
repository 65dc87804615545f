"""querywatch: runtime query auditing for SQLAlchemy 2.x and FastAPI/Starlette.

Count and time every statement of a unit of work (an HTTP request, a job, a test), find N+1
queries, redundant queries and lazy loads after close, and audit the connection pool.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from querywatch._autoinstrument import AutoInstrumentation, instrument_all, uninstrument_all
    from querywatch._collection import (
        HttpRequest,
        PoolReport,
        Report,
        add_reporter,
        configure,
        current_report,
        watch,
    )
    from querywatch._instrumentation import Instrumentation, instrument, uninstrument
    from querywatch._reporting import add_fields
    from querywatch.exceptions import (
        ConfigError,
        FindingsDetected,
        NPlusOneDetected,
        QueryWatchError,
        QueryWatchWarning,
    )
    from querywatch.fingerprinting import fingerprint
    from querywatch.middleware import QueryWatchMiddleware
    from querywatch.settings import Settings

__all__ = [
    "AutoInstrumentation",
    "ConfigError",
    "FindingsDetected",
    "HttpRequest",
    "Instrumentation",
    "NPlusOneDetected",
    "PoolReport",
    "QueryWatchError",
    "QueryWatchMiddleware",
    "QueryWatchWarning",
    "Report",
    "Settings",
    "add_fields",
    "add_reporter",
    "configure",
    "current_report",
    "fingerprint",
    "instrument",
    "instrument_all",
    "uninstrument",
    "uninstrument_all",
    "watch",
]
__version__ = "0.1.0"

# Names are imported on first use (PEP 562): `import querywatch` stays cheap (the pytest plugin
# imports it in every suite), and the middleware needs the web extras only when it is used.
_LOCATIONS = {
    "ConfigError": "querywatch.exceptions",
    "FindingsDetected": "querywatch.exceptions",
    "NPlusOneDetected": "querywatch.exceptions",
    "QueryWatchError": "querywatch.exceptions",
    "QueryWatchWarning": "querywatch.exceptions",
    "HttpRequest": "querywatch._collection",
    "PoolReport": "querywatch._collection",
    "Report": "querywatch._collection",
    "add_reporter": "querywatch._collection",
    "configure": "querywatch._collection",
    "current_report": "querywatch._collection",
    "watch": "querywatch._collection",
    "fingerprint": "querywatch.fingerprinting",
    "Instrumentation": "querywatch._instrumentation",
    "instrument": "querywatch._instrumentation",
    "uninstrument": "querywatch._instrumentation",
    "AutoInstrumentation": "querywatch._autoinstrument",
    "instrument_all": "querywatch._autoinstrument",
    "uninstrument_all": "querywatch._autoinstrument",
    "QueryWatchMiddleware": "querywatch.middleware",
    "Settings": "querywatch.settings",
    "add_fields": "querywatch._reporting",
}


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'querywatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
