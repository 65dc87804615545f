"""Collector._fold, a run at a time, against the fold it replaced, one statement at a time.

`_reference_fold` is the previous implementation (commit 62ddd8c), kept here verbatim as the
specification: `self` became the collector `c`, and the statements kept for `report.queries`
go to a list of their own, one tuple per statement (the collector now keeps them a run at a
time). Everything else the fold records must come out the same.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from querywatch import _statements
from querywatch._callsite import Where
from querywatch._collection import (
    MAX_CALLSITES,
    MAX_DUPLICATE_SITES,
    MAX_IN_LENGTHS,
    MAX_OTHER_POOL_DURATIONS,
    MAX_PARAMETER_KEYS,
    POLL_INTERVAL,
    STATEMENT_BUCKETS,
    Collector,
    Duplicate,
    Pending,
    Shape,
    ShapeInfo,
    Site,
    _example,
    _hash,
    _parameter_key,
)
from querywatch.findings import MAX_PARAMETER_EXAMPLES
from querywatch.fingerprinting import StatementShape, cache_for, dialect_key, shape_of
from querywatch.settings import DEFAULT_SETTINGS, Settings

#: A statement kept for `report.queries`: (fingerprint, operation, seconds, pool, call site).
QueryRow = tuple[str, str, float, str, "str | None"]


def _reference_fold(
    c: Collector, pending: list[Pending], innermost: bool, queries: list[QueryRow]
) -> None:
    # Written out inline: this loop runs for every statement, and a method call per step
    # would cost as much as the step. Consecutive executions of one statement from one place
    # (the body of a loop) form a run: its shape, site, counters and the state its reads
    # see are worked out once per run, not once per statement.
    shapes = c.shapes
    room = c.max_queries - len(queries)
    examples: dict[int, str] | None = {} if c.settings.log_parameters else None
    table_writes = c.table_writes
    other_durations = c.other_pool_durations
    clock = c.db_clock
    last_source: Any = None
    last_statement: Any = None
    last_where: Any = None
    cache: dict[str, StatementShape] = {}
    dialect: str | None = None
    pool = fingerprint = operation = ""
    shape: Shape | None = None
    site: Site | None = None
    info: ShapeInfo | None = None
    buckets: list[int] = []
    histogram = False
    last_reads: dict[int, tuple[tuple[Any, int, int], float, Where, int]] = {}
    duplicates: dict[int, Duplicate] = {}
    #: the run so far: executions and their seconds, not yet added to shape and site
    run_count = 0
    run_seconds = 0.0
    #: the state the run's reads see (None: not worked out yet), for transaction `state_txn`
    state: tuple[Any, int, int] | None = None
    state_txn: Any = None
    for index, (statement, parameters, t0, seconds, source, where, txn) in enumerate(pending):
        if statement is not last_statement or where is not last_where or source is not last_source:
            if run_count and shape is not None:
                shape.count += run_count
                shape.seconds += run_seconds
                if histogram:
                    shape.bucket_seconds += run_seconds
                if site is not None:
                    site.count += run_count
                    site.seconds += run_seconds
            run_count = 0
            run_seconds = 0.0
            state = None
            if source is not last_source:
                last_source = source
                pool = source[0]
                dialect = dialect_key(source[1])  # once per fold and engine
                cache = cache_for(dialect)
            last_statement = statement
            last_where = where
            shaped = cache.get(statement)
            if shaped is None:
                shaped = shape_of(statement, dialect=dialect)
            fingerprint, operation, _ = shaped
            shape = shapes.get(fingerprint)
            if shape is None and len(shapes) < c.max_shapes:
                shape = shapes[fingerprint] = Shape(fingerprint, operation, pool)
            if shape is not None:
                # The shape's own string: the queries of a long statement (too long for
                # the fingerprint cache, so fingerprinted anew each time) share one copy.
                fingerprint = shape.fingerprint
                info = shape.info
                sites = shape.sites
                site = sites.get(where[0])
                if site is None and len(sites) < MAX_CALLSITES:
                    site = sites[where[0]] = Site(info)
                # Durations feed the statement histogram once, from the innermost unit.
                histogram = innermost and pool == shape.pool
                buckets = shape.buckets
                last_reads = shape.last
                duplicates = shape.duplicates
        before = clock
        clock += seconds
        if room > 0:
            queries.append((fingerprint, operation, seconds, pool, where[0]))
            room -= 1
        if shape is None:
            c.untracked_statements += 1
            continue
        assert info is not None
        run_count += 1
        run_seconds += seconds
        if histogram:
            buckets[bisect_left(STATEMENT_BUCKETS, seconds)] += 1
        elif innermost and len(other_durations) < MAX_OTHER_POOL_DURATIONS:
            other_durations.append((pool, operation, seconds))
        # `_parameter_key`, its common case inlined: a tuple of hashable values, no UUID.
        if type(parameters) is tuple and UUID not in map(type, parameters):
            try:
                key: int | None = hash((statement, parameters))
            except TypeError:
                key = _parameter_key(statement, parameters)
        else:
            key = _parameter_key(statement, parameters)
        if site is not None:
            if key is not None and len(site.parameter_keys) < MAX_PARAMETER_KEYS:
                site.parameter_keys.add(key)
            filters = site.filter_keys
            if filters is not None and len(filters) < MAX_PARAMETER_KEYS:
                slots = _statements.paging_slots(statement)
                filters.add(_hash(_statements.filter_values(parameters, slots)))
            lengths = site.in_lengths
            if lengths is not None:
                length = _statements.in_list_length(statement, parameters)
                if length in lengths or len(lengths) < MAX_IN_LENGTHS:
                    lengths[length] = lengths.get(length, 0) + 1
            if examples is not None:
                kept = site.examples
                if kept is None:
                    kept = site.examples = {}
                if len(kept) < MAX_PARAMETER_EXAMPLES and key not in kept:
                    kept[key] = _example(examples, pending, index)
        written = info.written
        if written is not None:
            table_writes[written] = table_writes.get(written, 0) + 1
            c.writes += 1
            continue
        if not info.reads:
            if info.boundary or operation != "OTHER":
                c.barrier += 1  # a write whose table cannot be read off: anything changed
            continue
        if key is None:
            continue
        # Duplicates: a read repeated in the same state - its transaction, the boundaries
        # sent as statements, the writes to the tables it reads - without a pause between
        # (idle time: wall time not spent running statements) is redundant. Within a run
        # nothing is written, so the state changes only with the transaction.
        if state is None or txn != state_txn:
            tables = info.tables
            if not tables:
                seen = c.writes
            elif len(tables) == 1:
                seen = table_writes.get(info.table, 0)
            else:
                seen = sum(table_writes.get(table, 0) for table in tables)
            state = (txn, c.barrier, seen)
            state_txn = txn
        idle = t0 - before
        last = last_reads.get(key)
        if last is None:
            if len(last_reads) < MAX_PARAMETER_KEYS:
                last_reads[key] = (state, idle, where, 1)
            continue
        if (last[0] is state or last[0] == state) and idle - last[1] < POLL_INTERVAL:
            run = last[3] + 1
            duplicate = duplicates.get(key)
            if duplicate is None:
                duplicate = duplicates[key] = Duplicate(last[2])
            duplicate.redundant += 1
            if run > duplicate.most:
                duplicate.most = run
            wheres = duplicate.wheres
            if (
                where is not wheres[-1]
                and len(wheres) < MAX_DUPLICATE_SITES
                and where not in wheres
            ):
                wheres.append(where)
            if examples is not None and duplicate.examples is None:
                duplicate.examples = _example(examples, pending, index)
            last_reads[key] = (state, idle, where, run)
        else:
            last_reads[key] = (state, idle, where, 1)
    if run_count and shape is not None:
        shape.count += run_count
        shape.seconds += run_seconds
        if histogram:
            shape.bucket_seconds += run_seconds
        if site is not None:
            site.count += run_count
            site.seconds += run_seconds
    c.db_clock = clock


# Statements as the hot path buffers them, each kind one string object (as SQLAlchemy's
# compiled cache hands them out), with how its parameters are drawn.
POINT_T = "SELECT t.a FROM t WHERE t.id = ?"
POINT_U = "SELECT u.b FROM u WHERE u.id = ?"
JOIN = "SELECT t.a, u.b FROM t JOIN u ON t.id = u.id WHERE t.id = ?"
NAMED = "SELECT u.b FROM u WHERE u.b = :b"
IN_LIST = "SELECT t.a FROM t WHERE t.id IN (?, ?)"
PAGED = "SELECT t.a FROM t ORDER BY t.id LIMIT ? OFFSET ?"
UPDATE_T = "UPDATE t SET a=? WHERE t.id = ?"
INSERT_U = "INSERT INTO u (b) VALUES (?)"
SAVEPOINT = "SAVEPOINT sa_savepoint_1"
NO_TABLE = "SELECT ?"
PRAGMA = "PRAGMA foreign_keys = ON"

UUIDS = (UUID(int=1), UUID(int=2))
#: Bound values: mostly a few small ints (so parameter sets repeat), a UUID or its text (one
#: value to the fold), an unhashable value.
values = st.sampled_from((0, 1, 2, 3, 0, 1, 2, 3, UUIDS[0], UUIDS[1], str(UUIDS[0]), [1]))
one = st.tuples(values)
two = st.tuples(values, values)
KINDS: tuple[tuple[str, st.SearchStrategy[Any]], ...] = (
    (POINT_T, one),
    (POINT_U, one | st.lists(one, min_size=1, max_size=3)),  # a SELECT sent as executemany
    (JOIN, one),
    (NAMED, st.fixed_dictionaries({"b": values})),
    (IN_LIST, two),
    (PAGED, two),
    (UPDATE_T, two | st.lists(two, min_size=1, max_size=3)),
    (INSERT_U, one),
    (SAVEPOINT, st.just(())),
    (NO_TABLE, one),
    (PRAGMA, st.just(())),
)

DIALECT = sa.create_engine("sqlite://").dialect
MAIN = ("main", DIALECT)
REPLICA = ("replica", DIALECT)
WHERES: tuple[Where, ...] = (
    ("app.py:10 in list_items", "app.py:3 in main"),
    ("app.py:20 in get_item", None),
    (None, None),
)
#: Durations across the histogram's buckets, and idle gaps before a statement: none, short,
#: and longer than POLL_INTERVAL (a polling re-read).
SECONDS = st.sampled_from((0.0001, 0.0004, 0.002, 0.3))
GAPS = st.sampled_from((0.0, 0.001, 0.25))


@st.composite
def loops(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Executions of one statement from one place in one transaction, as a loop runs them:
    (statement, parameters, seconds, idle gap before it, source, where, transaction)."""
    statement, parameters = draw(st.sampled_from(KINDS))
    source = draw(st.sampled_from((MAIN, MAIN, MAIN, REPLICA)))
    where = draw(st.sampled_from(WHERES))
    txn = draw(st.sampled_from((1, 2, None)))
    return [
        (statement, draw(parameters), draw(SECONDS), draw(GAPS), source, where, txn)
        for _ in range(draw(st.integers(1, 8)))
    ]


def _timeline(batches: list[list[tuple[Any, ...]]]) -> list[Pending]:
    """The executions as pending entries, each starting its gap after the previous one ended."""
    entries: list[Pending] = []
    end = 0.0
    for statement, parameters, seconds, gap, source, where, txn in [
        execution for batch in batches for execution in batch
    ][:60]:
        t0 = end + gap
        end = t0 + seconds
        entries.append((statement, parameters, t0, seconds, source, where, txn))
    return entries


pendings = st.lists(loops(), min_size=1, max_size=15).map(_timeline)


def _record(c: Collector, queries: list[QueryRow] | tuple[QueryRow, ...]) -> dict[str, Any]:
    """Everything the fold records in `c`, as plain data."""
    return {
        "shapes": {
            fingerprint: {
                "operation": shape.operation,
                "pool": shape.pool,
                "count": shape.count,
                "seconds": shape.seconds,
                "buckets": shape.buckets,
                "bucket_seconds": shape.bucket_seconds,
                "sites": {
                    callsite: {
                        "count": site.count,
                        "seconds": site.seconds,
                        "parameter_keys": site.parameter_keys,
                        "filter_keys": site.filter_keys,
                        "in_lengths": site.in_lengths,
                        "examples": site.examples,
                    }
                    for callsite, site in shape.sites.items()
                },
                "last": shape.last,
                "duplicates": {
                    key: (d.redundant, d.most, d.wheres, d.examples)
                    for key, d in shape.duplicates.items()
                },
            }
            for fingerprint, shape in c.shapes.items()
        },
        "shape_order": list(c.shapes),
        "table_writes": c.table_writes,
        "writes": c.writes,
        "barrier": c.barrier,
        "untracked_statements": c.untracked_statements,
        "db_clock": c.db_clock,
        "other_pool_durations": c.other_pool_durations,
        "queries": list(queries),
    }


def _approximately(value: Any) -> Any:
    """`value` with its floats compared approximately (sums may differ in their last bits)."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-9, abs=1e-12)
    if isinstance(value, dict):
        return {key: _approximately(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_approximately(item) for item in value)
    return value


@pytest.mark.parametrize(
    "unit_settings",
    [
        DEFAULT_SETTINGS,
        DEFAULT_SETTINGS.replace(log_parameters=True),
        DEFAULT_SETTINGS.replace(max_queries=5),
        DEFAULT_SETTINGS.replace(max_shapes=3),
    ],
    ids=["default", "log_parameters", "max_queries", "max_shapes"],
)
@given(entries=pendings, split=st.integers(0, 60), innermost=st.booleans())
@settings(max_examples=300, deadline=None, database=None)
def test_run_at_a_time_fold_records_what_one_statement_at_a_time_records(
    unit_settings: Settings, entries: list[Pending], split: int, innermost: bool
) -> None:
    """The run-at-a-time fold records exactly what folding one statement at a time records,
    over one fold or two."""
    collector = Collector("t", unit_settings, None)
    reference = Collector("t", unit_settings, None)
    reference_queries: list[QueryRow] = []
    for batch in (entries[:split], entries[split:]):
        if batch:
            collector._fold(list(batch), innermost)
            _reference_fold(reference, list(batch), innermost, reference_queries)
    assert _record(collector, collector.report.query_rows) == _approximately(
        _record(reference, reference_queries)
    )
