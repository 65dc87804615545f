"""Detectors: turn what a unit of work recorded into findings, when the unit ends.

Nothing here runs in the hot path. The order of decisions matters, because a group of
statements is one problem, reported once:

1. ORM lazy loads (recorded by `_orm`): a relationship lazy-loaded for at least
   `n_plus_one_threshold` distinct parent objects from one call site is an N+1; so are expired
   or deferred attributes reloaded object by object. The statement shapes these loads ran are
   *claimed*: the backstop below never reports them again.
2. The statement-shape backstop, for loops the ORM cannot attribute (`session.get()` per item,
   a repository call per item, Core or `text()`): one shape from one call site with at least
   `n_plus_one_threshold` distinct parameter sets. Not N+1, and exempt: transaction control,
   catalog and reflection queries, pagination walks (OFFSET, or LIMIT with a range condition),
   and chunked IN batches (a shape with an `IN (...)` list is already the batched form - this
   is how `selectinload` batches 500 ids). INSERT/UPDATE/DELETE loops are bulk-write findings.
3. Duplicates: one shape executed with identical parameters `duplicate_threshold` times or more.
   Shapes already reported as N+1 or bulk writes are not reported again as duplicates.
4. The allowlist removes findings (by relationship, model, fingerprint, call-site glob or id);
   entries that matched nothing can be reported as stale.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

from querywatch.collection import Collector, LazyGroup, Shape
from querywatch.findings import (
    BulkWriteFinding,
    DuplicateQueryFinding,
    Finding,
    LazyLoadAfterCloseFinding,
    NPlusOneFinding,
    StaleAllowlistFinding,
    finding_id,
)
from querywatch.fingerprinting import fingerprint
from querywatch.settings import Settings

__all__ = ["detect"]

# Statements that are never a loop worth reporting (transaction control, session settings).
_CONTROL = re.compile(
    r"\s*(?:begin|start\s+transaction|savepoint|release|rollback|commit|end|set|reset|show|"
    r"pragma|discard|deallocate|listen|unlisten|notify|checkpoint|vacuum|analyze)\b"
)
# Catalog and reflection queries (has_table, get_columns, server version probes ...).
_CATALOG = re.compile(
    r"\b(?:pg_catalog|information_schema|sqlite_master|sqlite_schema|sqlite_temp_master|"
    r"pg_namespace|pg_class|pg_attribute|pg_type|current_schema|version\s*\(|"
    r"mysql\.|performance_schema)"
)
_PAGINATION = re.compile(r"\boffset\s+\?|\bfetch\s+(?:first|next)\b")
_LIMIT = re.compile(r"\blimit\s+\?")
_RANGE = re.compile(r"(?:>|<|>=|<=)\s*\?")
_IN_BATCH = re.compile(r"\bin\s*\(\s*\?\s*\)|=\s*any\s*\(\s*\?")
_FROM = re.compile(r'\bfrom\s+("?[\w.]+"?)')
_WHERE_EQ = re.compile(r'\bwhere\s+(?:"?(\w+)"?\.)?"?(\w+)"?\s*=\s*\?')
_TABLE_OF_WRITE = re.compile(r'^\s*(?:insert\s+into|update|delete\s+from)\s+("?[\w.]+"?)')


def detect(collector: Collector) -> list[Finding]:
    """Every finding of a finished unit of work."""
    settings = collector.settings
    threshold = settings.n_plus_one_threshold
    findings: list[Finding] = []
    claimed: set[str] = set()  # shapes owned by ORM lazy loads
    lazy_shapes: set[str] = set()  # shapes of reported lazy-load N+1: not duplicates too
    loop_sites: set[tuple[str, str | None]] = set()  # (shape, site) reported as a loop

    shapes = collector.shapes
    for (_, callsite), group in collector.lazy.items():
        if group.fingerprint:
            claimed.add(group.fingerprint)
        if len(group.parents) >= threshold:
            # The loads' statements ran at the line that touched the attribute: their site.
            shape = shapes.get(group.fingerprint)
            site = shape.sites.get(callsite) if shape is not None else None
            examples = _examples(site.examples if site is not None else None)
            findings.append(_lazy_finding(group, callsite, examples))
            if group.fingerprint:
                lazy_shapes.add(group.fingerprint)

    for fp, shape in shapes.items():
        if shape.count < 2 or fp in claimed or _exempt(fp, shape):
            continue
        for callsite, site in shape.sites.items():
            distinct = len(site.parameter_keys)
            if site.count < threshold or distinct < threshold:
                continue
            if shape.operation in ("INSERT", "UPDATE", "DELETE"):
                findings.append(
                    BulkWriteFinding(
                        id=finding_id("bulk_write", fp, callsite),
                        callsite=callsite,
                        fingerprint=fp,
                        operation=shape.operation,
                        count=site.count,
                        seconds=site.seconds,
                        suggestion=_bulk_suggestion(fp, shape.operation),
                        parameters=_examples(site.examples),
                    )
                )
            elif not _is_batch_or_page(fp):
                findings.append(
                    NPlusOneFinding(
                        id=finding_id("n_plus_one", fp, callsite),
                        callsite=callsite,
                        fingerprint=fp,
                        operation=shape.operation,
                        count=site.count,
                        seconds=site.seconds,
                        suggestion=_loop_suggestion(fp),
                        distinct=distinct,
                        parameters=_examples(site.examples),
                    )
                )
            else:
                continue
            loop_sites.add((fp, callsite))

    duplicate_threshold = settings.duplicate_threshold
    for fp, shape in shapes.items():
        if shape.count < 2 or fp in lazy_shapes or _exempt(fp, shape):
            continue
        findings.extend(_duplicates(shape, duplicate_threshold, loop_sites))

    findings.extend(_merge_after_close(collector.after_close))
    findings.extend(collector.pool.leaked)
    return _apply_allowlist(findings, settings)


def _exempt(fp: str, shape: Shape) -> bool:
    """Statements that are never N+1 or duplicates: transaction control, catalog queries."""
    return bool((shape.operation == "OTHER" and _CONTROL.match(fp)) or _CATALOG.search(fp))


def _is_batch_or_page(fp: str) -> bool:
    """Pagination walks and chunked IN batches repeat a shape on purpose."""
    if _IN_BATCH.search(fp) or _PAGINATION.search(fp):
        return True
    return bool(_LIMIT.search(fp) and _RANGE.search(fp))


def _examples(kept: dict[Any, str] | None) -> tuple[str, ...]:
    """The parameter examples kept for a finding (`Settings.log_parameters`), else ()."""
    return tuple(kept.values()) if kept else ()


def _lazy_finding(
    group: LazyGroup, callsite: str | None, parameters: tuple[str, ...] = ()
) -> NPlusOneFinding:
    relationship = group.subject if group.pattern == "lazy_load" else None
    phase = max(group.phases.items(), key=lambda item: item[1])[0] if group.phases else "handler"
    subject = relationship or f"{group.subject}#{group.pattern}"
    return NPlusOneFinding(
        id=finding_id("n_plus_one", subject, callsite),
        callsite=callsite,
        fingerprint=group.fingerprint,
        operation="SELECT",
        count=group.count,
        seconds=group.seconds,
        suggestion=group.suggestion,
        relationship=relationship,
        pattern=group.pattern,
        phase=phase,
        model=None if relationship else group.subject,
        attributes=() if relationship else tuple(sorted(group.attributes)),
        distinct=len(group.parents),
        parameters=parameters,
    )


def _duplicates(
    shape: Shape, threshold: int, loop_sites: set[tuple[str, str | None]]
) -> Iterable[DuplicateQueryFinding]:
    """One finding per call site where identical parameter sets were repeated (except where
    the same statements are already reported as an N+1 or bulk-write loop)."""
    per_site: dict[str | None, tuple[int, int]] = {}  # site -> (most repeats, redundant runs)
    for key, count in shape.parameter_counts.items():
        if count < threshold:
            continue
        site = shape.duplicate_sites.get(key)
        if (shape.fingerprint, site) in loop_sites:
            continue
        most, redundant = per_site.get(site, (0, 0))
        per_site[site] = (max(most, count), redundant + count - 1)
    average = shape.seconds / shape.count if shape.count else 0.0
    examples = shape.duplicate_examples or {}
    for site, (most, redundant) in per_site.items():
        yield DuplicateQueryFinding(
            id=finding_id("duplicate_query", shape.fingerprint, site),
            callsite=site,
            fingerprint=shape.fingerprint,
            operation=shape.operation,
            count=most,
            seconds=average * redundant,
            suggestion=(
                "run it once and reuse the result (pass the loaded rows or objects along, or "
                "cache them for the unit of work); for one ORM object by primary key, "
                "session.get() answers repeats from the identity map"
            ),
            parameters=_examples(examples.get(site)),
        )


def _merge_after_close(
    recorded: list[LazyLoadAfterCloseFinding],
) -> list[LazyLoadAfterCloseFinding]:
    merged: dict[str, LazyLoadAfterCloseFinding] = {}
    counts: dict[str, int] = {}
    for finding in recorded:
        if finding.id not in merged:
            merged[finding.id] = finding
        counts[finding.id] = counts.get(finding.id, 0) + finding.count
    return [
        f if counts[f.id] == f.count else _replace(f, count=counts[f.id]) for f in merged.values()
    ]


def _replace(finding: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(finding, **changes)


# -- suggestions --------------------------------------------------------------------------


def _mapped(table: str) -> tuple[str, dict[str, str], tuple[str, ...]] | None:
    """(class name, column -> attribute, primary-key columns) of the mapped class of `table`."""
    table = table.strip('"').rsplit(".", 1)[-1]
    try:
        from sqlalchemy.orm import mapperlib

        registries = list(getattr(mapperlib, "_mapper_registries", ()))
        for registry in registries:
            for mapper in list(registry.mappers):
                local = getattr(mapper, "local_table", None)
                if getattr(local, "name", None) != table:
                    continue
                columns: dict[str, str] = {}
                for prop in mapper.column_attrs:
                    for column in prop.columns:
                        name = getattr(column, "name", None)
                        if name is not None:
                            columns.setdefault(name.lower(), prop.key)
                primary = tuple(c.name.lower() for c in mapper.primary_key)
                return mapper.class_.__name__, columns, primary
    except Exception:  # a half-configured mapper: fall back to the table name
        return None
    return None


def _loop_suggestion(fp: str) -> str:
    table_match = _FROM.search(fp)
    where = _WHERE_EQ.search(fp)
    if table_match is None or where is None:
        return (
            "run one query for all items instead of one per item: collect the keys and use "
            "`where ... in (...)`, a join, or an eager-loading option"
        )
    table = table_match.group(1).strip('"')
    column = where.group(2)
    mapped = _mapped(table)
    shape = f"`select ... where {table}.{column} in (...)`"
    if mapped is None:
        return (
            f"load them in one query before the loop: one {shape} for all the keys, "
            f"then pick the rows per item in Python"
        )
    cls, columns, primary = mapped
    attribute = columns.get(column, column)
    query = f"session.scalars(select({cls}).where({cls}.{attribute}.in_(keys)))"
    if primary == (column,):
        return (
            f"one query instead of a get per item: {shape}, e.g. `{query}` before the loop "
            f"(session.get() then answers from the identity map)"
        )
    return f"load them in one query before the loop: {shape}, e.g. `{query}`, then group them"


def _bulk_suggestion(fp: str, operation: str) -> str:
    match = _TABLE_OF_WRITE.search(fp)
    table = match.group(1).strip('"') if match else "the table"
    mapped = _mapped(table) if match else None
    target = mapped[0] if mapped else table
    if operation == "INSERT":
        return (
            f"insert them in one statement: `session.execute(insert({target}), [{{...}}, ...])` "
            f"(or `conn.execute(insert(table), rows)`) with a list of rows"
        )
    if operation == "UPDATE":
        return (
            f"update them in one statement: `session.execute(update({target}), [{{'id': ..., "
            f"...}}, ...])` (bulk UPDATE by primary key), or one `update ... where id in (...)`"
        )
    return f"delete them in one statement: `delete({target}).where(... .in_(ids))`"


# -- allowlist ------------------------------------------------------------------------------


def _subjects(finding: Finding) -> set[str]:
    subjects = {finding.id}
    for name in ("relationship", "model"):
        value = getattr(finding, name, None)
        if value:
            subjects.add(value)
    model = getattr(finding, "model", None)
    for attribute in getattr(finding, "attributes", ()) or ():
        subjects.add(f"{model}.{attribute}")
    attribute = getattr(finding, "attribute", None)
    if model and isinstance(attribute, str):
        subjects.add(f"{model}.{attribute}")
    fp = getattr(finding, "fingerprint", None)
    if fp:
        subjects.add(fp)
    return subjects


def _matches(entry: str, normalised: str, finding: Finding, subjects: set[str]) -> bool:
    if entry in subjects or normalised in subjects:
        return True
    callsite = finding.callsite
    if callsite is None:
        return False
    if any(ch in entry for ch in "*?["):
        return fnmatch.fnmatchcase(callsite, entry) or fnmatch.fnmatchcase(
            callsite.split(" in ", 1)[0], entry
        )
    return callsite == entry or callsite.split(" in ", 1)[0] == entry


def _apply_allowlist(findings: list[Finding], settings: Settings) -> list[Finding]:
    entries = settings.allowlist
    if not entries:
        return findings
    normalised = {entry: fingerprint(entry) for entry in entries}
    used: set[str] = set()
    kept: list[Finding] = []
    for finding in findings:
        subjects = _subjects(finding)
        hit = [e for e in entries if _matches(e, normalised[e], finding, subjects)]
        if hit:
            used.update(hit)
        else:
            kept.append(finding)
    if settings.report_stale_allowlist:
        for entry in entries:
            if entry in used:
                continue
            kept.append(
                StaleAllowlistFinding(
                    id=finding_id("stale_allowlist_entry", entry, None),
                    callsite=None,
                    entry=entry,
                    suggestion="remove it from Settings.allowlist (or QUERYWATCH_ALLOWLIST)",
                )
            )
    return kept
