"""The console's memory: a bounded ring buffer of per-unit snapshots, and per-route figures.

A snapshot is taken from the public `Report` once per finished unit of work, in the console's
reporter (registered only while the console is on). It holds what the report already made:
the first `Settings.max_queries` statements as plain tuples, the finding objects (frozen), the
pool figures and the HTTP request, by reference; nothing is formatted until a client asks.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from querywatch._collection import PoolReport, Report
from querywatch.findings import Finding, NPlusOneFinding

#: Routes tracked by the routes view; requests of further routes are counted under `OTHER_ROUTE`.
MAX_ROUTES = 500
OTHER_ROUTE = "<other routes>"
#: Statement counts kept per route for its median and p95 (the most recent ones).
ROUTE_SAMPLES = 512


@dataclass(frozen=True, slots=True)
class UnitSnapshot:
    """What the console keeps of one finished unit of work (immutable)."""

    id: int
    #: Wall-clock time the unit ended (seconds since the epoch).
    ended: float
    kind: str
    name: str
    duration_seconds: float
    db_seconds: float
    statements: int
    failed_statements: int
    #: The first `Settings.max_queries` statements: (fingerprint, operation, seconds, pool,
    #: call site), as `Report.query_rows` gives them.
    queries: tuple[tuple[str, str, float, str, str | None], ...]
    findings: tuple[Finding, ...]
    pool: PoolReport
    method: str | None = None
    route: str | None = None
    path: str | None = None
    status: int | None = None
    request_id: str | None = None
    error: str | None = None
    #: The unit ran with `Settings.log_parameters`: its findings may carry parameter examples.
    log_parameters: bool = False
    #: Statement shapes longer than this were cut (`clip`).
    max_sql_length: int = 2000


@dataclass(slots=True)
class RouteStats:
    """Requests of one route template (method and route) since the console started."""

    requests: int = 0
    db_seconds: float = 0.0
    duration_seconds: float = 0.0
    statements_max: int = 0
    with_n_plus_one: int = 0
    last_finding: str | None = None
    last_finding_at: float | None = None
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=ROUTE_SAMPLES))

    def add(self, unit: UnitSnapshot) -> None:
        self.requests += 1
        self.db_seconds += unit.db_seconds
        self.duration_seconds += unit.duration_seconds
        if unit.statements > self.statements_max:
            self.statements_max = unit.statements
        self.recent.append(unit.statements)
        if unit.findings:
            if any(isinstance(f, NPlusOneFinding) for f in unit.findings):
                self.with_n_plus_one += 1
            self.last_finding = unit.findings[0].kind
            self.last_finding_at = unit.ended

    def percentile(self, q: float) -> int:
        """The q-quantile (0 < q <= 1, nearest rank) of the statements per request kept in
        `recent`; 0 before the first request."""
        values = sorted(self.recent)
        if not values:
            return 0
        return values[max(0, math.ceil(q * len(values)) - 1)]


def clip(shape: str, limit: int) -> str:
    """A statement shape cut to `limit` characters (marked), or the shape itself."""
    return shape if len(shape) <= limit else shape[:limit] + " \u2026"


class UnitBuffer:
    """The last `size` units of work (newest last) and per-route figures; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._units: deque[UnitSnapshot] = deque(maxlen=size)
        self._routes: dict[tuple[str, str], RouteStats] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def record(self, report: Report) -> UnitSnapshot:
        """Take the snapshot of a finished unit of work and keep it (the reporter)."""
        http = report.http
        settings = report.settings
        rows = report.query_rows
        limit = settings.max_sql_length
        if rows and max(len(row[0]) for row in rows) > limit:
            # a huge shape is cut (the cache it came from may drop it: the buffer must not keep
            # it whole)
            rows = tuple((clip(row[0], limit), *row[1:]) for row in rows)
        # Everything read from the report first, outside the lock.
        fields: dict[str, Any] = {
            "ended": time.time(),
            "kind": report.kind,
            "name": report.name,
            "duration_seconds": report.duration_seconds,
            "db_seconds": report.db_seconds,
            "statements": report.statements,
            "failed_statements": report.failed_statements,
            "queries": rows,
            "findings": report.findings,
            "pool": report.pool,
            "log_parameters": settings.log_parameters,
            "max_sql_length": limit,
        }
        if http is not None:
            fields.update(
                method=http.method,
                route=http.route,
                path=http.path,
                status=http.status,
                request_id=http.request_id,
                error=http.error,
            )
        with self._lock:  # ids in the order units are appended: `get()` relies on it
            unit = UnitSnapshot(id=self._next_id, **fields)
            self._next_id += 1
            self._units.append(unit)
            if http is not None:
                key = (http.method, http.route)
                stats = self._routes.get(key)
                if stats is None:
                    if len(self._routes) >= MAX_ROUTES:
                        key = ("", OTHER_ROUTE)
                    stats = self._routes.setdefault(key, RouteStats())
                stats.add(unit)
        return unit

    def __len__(self) -> int:
        return len(self._units)

    def __iter__(self) -> Iterator[UnitSnapshot]:
        """The units, newest first (a copy: safe while others are recorded)."""
        with self._lock:
            units = list(self._units)
        return reversed(units)

    def get(self, unit_id: int) -> UnitSnapshot | None:
        """The unit with this id, if it is still in the buffer."""
        with self._lock:
            units = list(self._units)
        if not units or not units[0].id <= unit_id <= units[-1].id:
            return None
        # ids grow by one per unit appended: the position is known
        index = unit_id - units[0].id
        if index < len(units) and units[index].id == unit_id:
            return units[index]
        return next((u for u in units if u.id == unit_id), None)

    @property
    def latest_id(self) -> int:
        """The id of the newest unit recorded (0 before the first)."""
        return self._next_id - 1

    def routes(self) -> list[tuple[str, str, RouteStats]]:
        """(method, route, figures) of every route seen, as copies."""
        with self._lock:
            return [
                (method, route, _copy(stats)) for (method, route), stats in self._routes.items()
            ]

    def clear(self) -> None:
        with self._lock:
            self._units.clear()
            self._routes.clear()


def _copy(stats: RouteStats) -> RouteStats:
    return RouteStats(
        requests=stats.requests,
        db_seconds=stats.db_seconds,
        duration_seconds=stats.duration_seconds,
        statements_max=stats.statements_max,
        with_n_plus_one=stats.with_n_plus_one,
        last_finding=stats.last_finding,
        last_finding_at=stats.last_finding_at,
        recent=deque(stats.recent, maxlen=ROUTE_SAMPLES),
    )
