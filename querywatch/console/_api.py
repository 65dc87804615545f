"""The console's JSON documents: unit summaries, one unit in full, per-route figures.

Everything is built from the snapshots when a client asks, never when a unit is recorded.
Values are data, never markup: the page puts them into the DOM as text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from querywatch import _callsite
from querywatch.console._buffer import RouteStats, UnitSnapshot, clip
from querywatch.findings import StatementFinding

#: Units a list request returns at most.
MAX_LIST = 500


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def editor_url(pattern: str | None, callsite: str | None) -> str | None:
    """The editor link of a call site (`Settings.console_editor`), or None."""
    if pattern is None or not callsite:
        return None
    where = _callsite.location(callsite)
    if where is None:
        return None
    path, line = where
    return pattern.replace("{path}", quote(path, safe="/:\\")).replace("{line}", str(line))


def summary(unit: UnitSnapshot) -> dict[str, Any]:
    """One row of the list view."""
    kinds: dict[str, int] = {}
    for finding in unit.findings:
        kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
    return {
        "id": unit.id,
        "ended": _iso(unit.ended),
        "kind": unit.kind,
        "name": unit.name,
        "method": unit.method,
        "route": unit.route,
        "path": unit.path,
        "status": unit.status,
        "error": unit.error,
        "duration_ms": _ms(unit.duration_seconds),
        "db_ms": _ms(unit.db_seconds),
        "statements": unit.statements,
        "findings": kinds,
        "pool_wait_ms": _ms(unit.pool.wait_seconds),
    }


def units(
    snapshots: Iterable[UnitSnapshot], query: Mapping[str, str], latest: int, size: int
) -> dict[str, Any]:
    """The list view's rows, newest first, filtered by `query`: `route` (part of the route
    template or path), `kind` (of unit), `finding` (a finding kind), `findings=1` (with
    findings only), `slower_ms`, `after` (ids greater than it), `limit`."""
    route = query.get("route", "").strip()
    kind = query.get("kind", "").strip()
    finding = query.get("finding", "").strip()
    only_findings = query.get("findings", "") in ("1", "true", "on")
    slower = _number(query.get("slower_ms")) or 0.0
    after = int(_number(query.get("after")) or 0)
    limit = min(MAX_LIST, int(_number(query.get("limit")) or MAX_LIST))
    rows: list[dict[str, Any]] = []
    for unit in snapshots:
        if unit.id <= after or len(rows) >= limit:
            break  # newest first: everything after this one is older
        if route and route not in (unit.route or unit.name) and route not in (unit.path or ""):
            continue
        if kind and unit.kind != kind:
            continue
        if only_findings and not unit.findings:
            continue
        if finding and not any(f.kind == finding for f in unit.findings):
            continue
        if unit.duration_seconds * 1000 < slower:
            continue
        rows.append(summary(unit))
    return {"latest": latest, "size": size, "units": rows}


def _number(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value >= 0 else None  # no NaN, no negatives


def detail(unit: UnitSnapshot, *, editor: str | None, explainable: Any = None) -> dict[str, Any]:
    """The unit view: statements in order, grouped repeats, findings, pool figures.

    `explainable(fingerprint) -> bool`: whether a group's statement can be EXPLAINed.
    """
    document = summary(unit)
    tags: dict[str, str] = {}
    for finding in unit.findings:
        shape = finding.statement
        if isinstance(finding, StatementFinding) and shape is not None:
            tags.setdefault(clip(shape, unit.max_sql_length), finding.kind)
    statements = []
    groups: list[dict[str, Any]] = []
    group_of: dict[tuple[str, str | None], dict[str, Any]] = {}
    for index, (shape, operation, seconds, pool_name, site) in enumerate(unit.queries):
        group = group_of.get((shape, site))
        if group is None:
            group = group_of[shape, site] = {
                "group": len(groups),
                "fingerprint": shape,
                "operation": operation,
                "pool": pool_name,
                "callsite": site,
                "editor_url": editor_url(editor, site),
                "count": 0,
                "ms": 0.0,
                "first": index,
                "finding": tags.get(shape),
                "explain": bool(
                    explainable is not None and operation == "SELECT" and explainable(shape)
                ),
            }
            groups.append(group)
        group["count"] += 1
        group["ms"] = round(group["ms"] + seconds * 1000, 3)
        statements.append({"index": index, "ms": _ms(seconds), "group": group["group"]})
    findings = []
    for finding in unit.findings:
        fields: dict[str, Any] = {
            "id": finding.id,
            "kind": finding.kind,
            "headline": finding.headline,
            "fix": finding.fix,
            "callsite": finding.callsite,
            "editor_url": editor_url(editor, finding.callsite),
            "count": getattr(finding, "count", None),
            "fingerprint": finding.statement,
        }
        parameters = getattr(finding, "parameters", ())
        if unit.log_parameters and parameters:
            fields["parameters"] = list(parameters)
        findings.append(fields)
    pool = unit.pool
    document.update(
        request_id=unit.request_id,
        failed_statements=unit.failed_statements,
        statements_kept=len(unit.queries),
        log_parameters=unit.log_parameters,
        pool={
            "checkouts": pool.checkouts,
            "wait_ms": _ms(pool.wait_seconds),
            "timeouts": pool.timeouts,
            "max_held": pool.max_held,
            "leaked": pool.leaked,
        },
        statement_list=statements,
        groups=groups,
        finding_list=findings,
    )
    return document


def routes(rows: Iterable[tuple[str, str, RouteStats]]) -> dict[str, Any]:
    """The routes view: per route template, since the console started."""
    result = []
    for method, route, stats in sorted(rows, key=lambda row: (-row[2].db_seconds, row[1])):
        n = stats.requests
        result.append(
            {
                "method": method,
                "route": route,
                "requests": n,
                "statements_median": stats.percentile(0.5),
                "statements_p95": stats.percentile(0.95),
                "statements_max": stats.statements_max,
                "db_ms_total": _ms(stats.db_seconds),
                "db_ms_mean": _ms(stats.db_seconds / n) if n else 0.0,
                "duration_ms_mean": _ms(stats.duration_seconds / n) if n else 0.0,
                "n_plus_one_rate": round(stats.with_n_plus_one / n, 4) if n else 0.0,
                "last_finding": stats.last_finding,
                "last_finding_at": _iso(stats.last_finding_at),
            }
        )
    return {"routes": result}
