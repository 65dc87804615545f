"""Detectors: turn what a unit of work recorded into findings, when the unit ends.

Nothing here runs in the hot path. The order of decisions matters, because a group of
statements is one problem, reported once:

1. ORM lazy loads (recorded by `_orm`): a relationship lazy-loaded for at least
   `n_plus_one_threshold` distinct parent objects from one call site is an N+1; so are expired
   or deferred attributes reloaded object by object. The statement shapes these loads ran are
   *claimed*: the backstop below never reports them again.
2. The statement-shape backstop, for loops the ORM cannot attribute (`session.get()` per item,
   a repository call per item, Core or `text()`, `immediateload`, dynamic and write-only
   relationships - named when the statement is a relationship's own load): one shape from one
   call site with at least `n_plus_one_threshold` distinct statements (string and parameters).
   Not N+1, and exempt: transaction control, catalog and reflection queries, and walks through
   one result - pages whose row-selecting values stay the same (LIMIT / OFFSET / keyset), and
   IN lists cut into chunks of one size (`selectinload`, hand-written chunking). A LIMIT query
   whose filter changes per item, or IN lists of varying length, is a loop. INSERT / UPDATE /
   DELETE loops are bulk-write findings; the pages of one execution are one statement.
3. Duplicates: a read repeated with identical parameters in the same transaction, with nothing
   written to its tables in between and no pause (see `Shape.read`), `duplicate_threshold`
   times or more. Shapes already reported as N+1 or bulk writes are not reported again.
4. The allowlist removes findings (by relationship, model, fingerprint, call-site glob or id);
   entries that matched nothing can be reported as stale.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import mapperlib
from sqlalchemy.orm.interfaces import MANYTOONE

from querywatch._callsite import source_line
from querywatch._collection import Collector, Duplicate, LazyGroup, Shape, Site
from querywatch._statements import is_control, tables_read
from querywatch.findings import (
    MAX_PARAMETER_EXAMPLES,
    BulkWriteFinding,
    DuplicateQueryFinding,
    Finding,
    NPlusOneFinding,
    StaleAllowlistFinding,
)
from querywatch.fingerprinting import fingerprint
from querywatch.settings import Settings

__all__ = ["detect"]

# Catalog and reflection queries (has_table, get_columns, server version probes ...).
_CATALOG = re.compile(
    r"\b(?:pg_catalog|information_schema|sqlite_master|sqlite_schema|sqlite_temp_master|"
    r"pg_namespace|pg_class|pg_attribute|pg_type|current_schema|version\s*\(|"
    r"mysql\.|performance_schema)"
)
_FROM = re.compile(r'\bfrom\s+("?[\w.]+"?)')
_WHERE_EQ = re.compile(r'\bwhere\s+(?:"?(\w+)"?\.)?"?(\w+)"?\s*=\s*\?')
#: The dialect families an allowlist entry written as SQL is read as (None: the conservative one).
_ALLOWLIST_DIALECTS = (None, "postgresql", "mysql", "sqlite", "mssql", "oracle")
_TABLE_OF_WRITE = re.compile(r'^\s*(?:insert\s+into|update|delete\s+from)\s+("?[\w.]+"?)')


def detect(collector: Collector) -> list[Finding]:
    """Every finding of a finished unit of work."""
    settings = collector.settings
    threshold = settings.n_plus_one_threshold
    findings: list[Finding] = []
    claimed: set[str] = set()  # shapes owned by ORM lazy loads
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
                # The loads' repeats are this N+1, not duplicates; the same statement run
                # elsewhere (a user lookup that SQLAlchemy renders like a lazy load) still is.
                loop_sites.add((group.fingerprint, callsite))

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
                        id=BulkWriteFinding.id_for(fp, callsite),
                        callsite=callsite,
                        fingerprint=fp,
                        operation=shape.operation,
                        count=site.count,
                        seconds=site.seconds,
                        suggestion=_bulk_suggestion(fp, shape.operation),
                        parameters=_examples(site.examples),
                    )
                )
            elif not _walks_one_result(shape, site, threshold):
                relationship = _relationship_for(fp)
                findings.append(
                    NPlusOneFinding(
                        id=NPlusOneFinding.id_for(
                            relationship[0] if relationship else fp, callsite
                        ),
                        callsite=callsite,
                        fingerprint=fp,
                        operation=shape.operation,
                        count=site.count,
                        seconds=site.seconds,
                        suggestion=relationship[1] if relationship else _loop_suggestion(fp),
                        relationship=relationship[0] if relationship else None,
                        distinct=distinct,
                        parameters=_examples(site.examples),
                    )
                )
            else:
                continue
            loop_sites.add((fp, callsite))

    duplicate_threshold = settings.duplicate_threshold
    for fp, shape in shapes.items():
        if not shape.duplicates or _exempt(fp, shape):
            continue
        findings.extend(_duplicates(shape, duplicate_threshold, loop_sites))

    findings.extend(collector.after_close)
    findings.extend(collector.pool.leaked)
    return _apply_allowlist(findings, settings)


def _exempt(fp: str, shape: Shape) -> bool:
    """Statements that are never N+1 or duplicates: transaction control, catalog queries."""
    return bool((shape.operation == "OTHER" and is_control(fp)) or _CATALOG.search(fp))


def _walks_one_result(shape: Shape, site: Site, threshold: int) -> bool:
    """Whether a repeated read from one call site walks through one result on purpose rather
    than running once per item of a loop: pages (LIMIT / OFFSET / keyset) whose row-selecting
    values stay the same, or an IN list cut into chunks of one size (the last one shorter), as
    `selectinload` and hand-written chunking do. A filter value that changes per execution, or
    IN lists of varying length (one list per item), is a loop."""
    if site.filter_keys is not None:
        return len(site.filter_keys) < threshold
    lengths = site.in_lengths
    if lengths:
        size = max(lengths)
        others = sum(count for length, count in lengths.items() if length != size)
        return size > 1 and others <= 1
    return False


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
        id=NPlusOneFinding.id_for(subject, callsite),
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
    """One finding per call site where a read was repeated redundantly (except where the same
    statements are already reported as an N+1 or bulk-write loop). A finding names every call
    site involved, first execution first, and the callers of a shared helper."""
    per_site: dict[str | None, list[Duplicate]] = {}
    for duplicate in shape.duplicates.values():
        if duplicate.most < threshold:
            continue
        wheres = duplicate.wheres
        site = wheres[1][0] if len(wheres) > 1 else wheres[0][0]  # where it was repeated
        if (shape.fingerprint, site) in loop_sites:
            continue
        per_site.setdefault(site, []).append(duplicate)
    average = shape.seconds / shape.count if shape.count else 0.0
    for site, duplicates in per_site.items():
        wheres = []
        for duplicate in duplicates:
            wheres.extend(w for w in duplicate.wheres if w not in wheres)
        callsites = tuple(dict.fromkeys(w[0] for w in wheres if w[0] is not None))
        callers = tuple(dict.fromkeys(w[1] for w in wheres if w[1] is not None))
        examples = tuple(d.examples for d in duplicates if d.examples is not None)
        yield DuplicateQueryFinding(
            id=DuplicateQueryFinding.id_for(shape.fingerprint, site),
            callsite=site,
            fingerprint=shape.fingerprint,
            operation=shape.operation,
            count=max(d.most for d in duplicates),
            seconds=average * sum(d.redundant for d in duplicates),
            suggestion=_duplicate_suggestion(callsites),
            parameters=examples[:MAX_PARAMETER_EXAMPLES],
            callsites=callsites,
            callers=callers if len(callsites) == 1 and len(callers) > 1 else (),
        )


def _duplicate_suggestion(callsites: tuple[str, ...]) -> str:
    """The fix for a repeated read, fitted to what the lines involved do."""
    lines = [source_line(site) for site in callsites]
    if any(".refresh(" in line for line in lines):
        return (
            "session.refresh() always runs a SELECT: nothing was written since the object was "
            "loaded in this transaction, so drop the refresh (after a commit or a flush it is "
            "legitimate, and not reported)"
        )
    if any(".get(" in line for line in lines):
        return (
            "session.get() answers from the identity map while the object stays in the same "
            "session: the repeat means another session (or an expunge or expire) in between - "
            "pass the loaded object along instead of loading it again"
        )
    return (
        "run it once and reuse the result: pass the loaded rows or objects along (a shared "
        "helper can take them as an argument), or cache them for the unit of work"
    )


def _relationship_for(fp: str) -> tuple[str, str] | None:
    """(`Author.books`, the fix) when a looped SELECT is a relationship's own load statement:
    `immediateload`, a dynamic or write-only relationship, or a lazy load run by hand. Only
    one-to-many and many-to-many: a many-to-one's load is a primary-key get, which a loop of
    `session.get()` runs too."""
    tables = tables_read(fp)
    if not tables:
        return None
    try:
        for registry in list(getattr(mapperlib, "_mapper_registries", ())):
            for mapper in list(registry.mappers):
                for prop in mapper.relationships:
                    if prop.direction is MANYTOONE:
                        continue
                    remote = [r for _, r in prop.local_remote_pairs]
                    if not any(_compares(fp, column) for column in remote):
                        continue
                    target = getattr(prop.mapper.local_table, "name", None)
                    if target not in tables:
                        continue
                    owner = mapper.class_.__name__
                    name = f"{owner}.{prop.key}"
                    child = prop.mapper.class_.__name__
                    if prop.lazy in ("dynamic", "write_only"):
                        fix = (
                            f"{name} is a {prop.lazy} relationship, which cannot be eager-loaded: "
                            f"load the {child} objects of all the {owner} objects in one query "
                            f"(select({child}).where(... .in_(ids))), or make it a regular "
                            f"relationship and add .options(selectinload({name}))"
                        )
                    else:
                        fix = (
                            f"eager-load it: add .options(selectinload({name})) to the query "
                            f"that loads the {owner} objects"
                        )
                    return name, fix
    except Exception:  # a half-configured mapper: no name, the generic fix
        return None
    return None


def _compares(fp: str, column: Any) -> bool:
    """Whether the fingerprint compares `column` (table.column) with a placeholder."""
    table = getattr(getattr(column, "table", None), "name", None)
    name = getattr(column, "name", None)
    if not table or not name:
        return False
    for qualified in (f"{table}.{name}", f'"{table}"."{name}"', f"`{table}`.`{name}`"):
        if f"? = {qualified}" in fp or f"{qualified} = ?" in fp:
            return True
    return False


# -- suggestions --------------------------------------------------------------------------


def _mapped(table: str) -> tuple[str, dict[str, str], tuple[str, ...]] | None:
    """(class name, column -> attribute, primary-key columns) of the mapped class of `table`."""
    table = table.strip('"').rsplit(".", 1)[-1]
    try:
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


def _matches(entry: str, shapes: set[str], finding: Finding, subjects: frozenset[str]) -> bool:
    if entry in subjects or not shapes.isdisjoint(subjects):
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
    # An entry written as SQL matches the shape of its statement as any dialect reads it (a
    # PostgreSQL `#>` operator or a MySQL backslash escape read by its own tokenizer).
    normalised = {
        entry: {fingerprint(entry, dialect=dialect) for dialect in _ALLOWLIST_DIALECTS}
        for entry in entries
    }
    used: set[str] = set()
    kept: list[Finding] = []
    for finding in findings:
        subjects = finding.allowlist_keys
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
                    id=StaleAllowlistFinding.id_for(entry, None),
                    callsite=None,
                    entry=entry,
                    suggestion="remove it from Settings.allowlist (or QUERYWATCH_ALLOWLIST)",
                )
            )
    return kept
