"""The structlog reporter: a `querywatch.request` event per HTTP request, one event per finding.

Events carry JSON-friendly values only, and bound parameter values only as the bounded examples
of `Settings.log_parameters` (off by default). Levels: `info` for a clean request, `warning` for
findings, `error` for pool timeouts and lazy loads after close. `Settings.log_requests` decides
which requests log `querywatch.request`. A finding is logged once per route per
`Settings.log_finding_interval` (60 s by default): an N+1 on a busy endpoint is one event a
minute, carrying `repeats` (the requests that found it and did not log it), not one per
request; metrics count every one. Jobs (`watch()`) are limited the same way per job name, and
log with `unit=<name>` instead of route and request id; tests log every finding.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from querywatch import _guard
from querywatch._collection import Report, add_reporter
from querywatch.findings import Finding

__all__ = ["add_fields", "forget_logged_findings", "install", "log_report", "uninstall"]

#: Finding kinds counted on the `querywatch.request` event, in this order.
FINDING_KINDS = (
    "n_plus_one",
    "duplicate_query",
    "bulk_write",
    "lazy_load_after_close",
    "connection_leak",
    "stale_allowlist_entry",
)

_logger = structlog.get_logger("querywatch")
_remove: Callable[[], None] | None = None
#: Sources of fields added to every event of a unit (`querywatch.otel`: trace ids).
_field_sources: list[Callable[[Report], dict[str, Any]]] = []


def add_fields(source: Callable[[Report], dict[str, Any]]) -> Callable[[], None]:
    """Add `source(report)` to the fields of every event logged for a finished unit of work
    (it runs inside this reporter's guard); returns the removal function."""
    _field_sources.append(source)

    def remove() -> None:
        if source in _field_sources:
            _field_sources.remove(source)

    return remove


def _extra_fields(report: Report) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for source in tuple(_field_sources):
        fields.update(source(report))
    return fields


def install() -> None:
    """Register the structlog reporter (once per process; later calls do nothing)."""
    global _remove
    if _remove is None:
        _remove = add_reporter(log_report)


def uninstall() -> None:
    """Unregister the structlog reporter."""
    global _remove
    if _remove is not None:
        _remove()
        _remove = None


def _context(report: Report) -> dict[str, Any]:
    http = report.http
    if http is None:
        return {"unit": report.name, "unit_kind": report.kind}
    return {"route": http.route, "method": http.method, "request_id": http.request_id}


def log_report(report: Report) -> None:
    """Log one finished unit of work (the reporter `install()` registers). Its own errors
    count as component `structlog`."""
    try:  # once per unit: guarded inline (see `querywatch._guard`)
        if _guard.injected_faults:
            _guard.maybe_fail("structlog")
        _log_report(report)
    except Exception as exc:
        _guard.internal_error("structlog", exc)


def _log_report(report: Report) -> None:
    settings = report.settings
    if not settings.enabled:
        return
    findings = report.findings_to_report()
    usage = report.pool
    timeouts = usage.timeouts
    http = report.http
    logged = 0
    if findings or timeouts:
        interval = settings.log_finding_interval
        if interval > 0 and http is not None:
            due = _due(_last_logged, http.route, findings, interval)
        elif interval > 0 and report.kind == "job":
            # A job name run as often as a route (a unit per queue message) is limited the
            # same way, in a memory of its own (job names may be many: `watch(f"order-{id}")`
            # must not push the routes out); tests log every finding.
            due = _due(_last_logged_jobs, report.name, findings, interval)
        else:
            due = [(finding, 0) for finding in findings]
        logged = len(due)
        if logged or timeouts:  # the context only for events that are logged
            context = {**_context(report), **_extra_fields(report)}
            max_sql = settings.max_sql_length
            for finding, repeats in due:
                _log_finding(finding, context, max_sql, repeats)
            if timeouts:
                _logger.error(
                    "querywatch.pool_timeout",
                    **context,
                    kind="pool_timeout",
                    timeouts=timeouts,
                    pool_wait_ms=round(usage.wait_seconds * 1000, 3),
                    pool_checkouts=usage.checkouts,
                )
    if http is None:
        return
    policy = settings.log_requests
    if policy == "none":
        return
    # A request whose findings were all repeats not logged (see `_due`) is logged as a clean one.
    quiet = not logged and not timeouts
    if quiet and (
        policy == "findings"
        or (policy == "sampled" and random.random() >= settings.log_sample_rate)
    ):
        return
    counts = dict.fromkeys(FINDING_KINDS, 0)
    worst = "info"
    for finding in findings:
        counts[finding.kind] = counts.get(finding.kind, 0) + 1
        if finding.level == "error":
            worst = "error"
        elif worst == "info":
            worst = "warning"
    if timeouts:
        worst = "error"
    fields: dict[str, Any] = {
        "method": http.method,
        "route": http.route,
        "status": http.status,
        "duration_ms": round(report.duration_seconds * 1000, 3),
        "request_id": http.request_id,
        "db_statements": report.statements,
        "db_ms": round(report.db_seconds * 1000, 3),
        "findings": len(findings),
        **counts,
        "pool_timeout": timeouts,
        "pool_checkouts": usage.checkouts,
        "pool_wait_ms": round(usage.wait_seconds * 1000, 3),
        "pool_leaked": usage.leaked,
        **_extra_fields(report),
    }
    if http.disconnected:
        fields["disconnected"] = True
    if http.error is not None:
        fields["error"] = http.error
    getattr(_logger, worst)("querywatch.request", **fields)


#: (route, finding id) -> [when it was last logged (monotonic), repeats not logged since]; the
#: same per (job name, finding id) for jobs.
_last_logged: dict[tuple[str, str], list[Any]] = {}
_last_logged_jobs: dict[tuple[str, str], list[Any]] = {}
_last_logged_lock = threading.Lock()
#: (route, finding) pairs remembered; beyond, the memory starts afresh (each logs once more).
_MAX_LOGGED = 4096


def _due(
    memory: dict[tuple[str, str], list[Any]],
    route: str,
    findings: tuple[Finding, ...],
    interval: float,
) -> list[tuple[Finding, int]]:
    """The findings of a request to `route` (or of the job named so) to log now, each with the
    number of units that found it since it was last logged for it, as `memory` remembers
    (`Settings.log_finding_interval`)."""
    now = time.monotonic()
    due: list[tuple[Finding, int]] = []
    with _last_logged_lock:
        if len(memory) >= _MAX_LOGGED:
            memory.clear()
        for finding in findings:
            key = (route, finding.id)
            last = memory.get(key)
            if last is None or now - last[0] >= interval:
                due.append((finding, last[1] if last is not None else 0))
                memory[key] = [now, 0]
            else:
                last[1] += 1
    return due


def forget_logged_findings() -> None:
    """Log the next occurrence of every finding, whenever the last one was logged (the pytest
    plugin calls this before each test)."""
    with _last_logged_lock:
        _last_logged.clear()
        _last_logged_jobs.clear()


def _log_finding(finding: Finding, context: dict[str, Any], max_sql: int, repeats: int = 0) -> None:
    fields = {**context, **finding.as_log_fields(max_sql_length=max_sql)}
    if repeats:
        fields["repeats"] = repeats
    log = _logger.error if finding.level == "error" else _logger.warning
    log(finding.event, **fields)
