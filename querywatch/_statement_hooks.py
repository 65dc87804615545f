"""The statement hooks: the hot path that times each statement and records it.

Outside a unit of work they cost one ContextVar read. Inside one they time the cursor
execution and append the statement, its parameters, its call site and its transaction to the
unit's collector; shapes and parameter hashes are worked out in batches (`Collector.fold`).
They never decide, log or raise: errors go to the guard.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from sys import _getframe
from time import perf_counter
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.engine.interfaces import ExecuteStyle

from querywatch import _guard
from querywatch._callsite import Where, memo_of, where_for
from querywatch._collection import FOLD_EVERY, Collector, current_unit
from querywatch._engines import Instrumentation
from querywatch._guard import internal_error

__all__ = ["attach", "record_statement"]


#: Transaction serials: a connection's serial changes at every commit and rollback, and two
#: statements ran in the same transaction when they ran on connections with the same serial.
_serials = itertools.count(1)
_INSERTMANYVALUES = ExecuteStyle.INSERTMANYVALUES


def _transaction_of(context: Any) -> int | None:
    """The serial of the transaction `context` runs in, given to its connection now (the first
    statement on a connection since it was opened, committed or rolled back)."""
    record = getattr(getattr(context, "_dbapi_connection", None), "_connection_record", None)
    if record is None:
        return None
    serial: int = next(_serials)
    record._querywatch_txn = serial
    return serial


def _end_transaction(dbapi_connection: Any) -> None:
    """A commit or rollback on `dbapi_connection` (the pool's proxy): its next statement runs in
    a new transaction."""
    record = getattr(dbapi_connection, "_connection_record", None)
    if record is not None:
        record._querywatch_txn = next(_serials)


def record_statement(
    collector: Collector,
    statement: str,
    parameters: Any,
    t0: float,
    seconds: float,
    source: tuple[str, Any],
    context: Any,
    where: Where,
) -> None:
    """Record one executed statement into `collector`: the general path, for what the
    wrappers' inlined fast path leaves to it (a connection's first statement, insertmanyvalues
    pages, no execution context, injected faults). The parameters stay referenced until the
    fold, which keeps only their hash (values only with `Settings.log_parameters`)."""
    if _guard.injected_faults:
        _guard.maybe_fail("engine")
    paged = getattr(context, "execute_style", None) is _INSERTMANYVALUES
    if paged:
        # insertmanyvalues sends one `execute()` of many rows as several statements, pages of
        # one execution context: one logical statement, whatever the number of pages. The
        # context is held weakly (a strong reference would keep its cursor open).
        last = collector.last_context
        if last is not None and last() is context:
            collector.add_page(seconds)
            return
    pending = collector.pending
    pending.append((statement, parameters, t0, seconds, source, where, _transaction_for(context)))
    if paged:
        collector.first_page(context)
    if len(pending) >= FOLD_EVERY:
        collector.fold()


def _transaction_for(context: Any) -> int | None:
    try:
        txn: int | None = context._dbapi_connection._connection_record._querywatch_txn
    except AttributeError:  # the connection's first statement in this process, or no context
        txn = _transaction_of(context)
    return txn


def attach(handle: Instrumentation, engine: Engine) -> None:
    """Time statements at the dialect's execute methods (the documented `Dialect` interface),
    and mark transaction ends at its commit and rollback methods.

    SQLAlchemy's cursor events would do, but any engine listener switches every execution to
    its event-dispatching path, which costs several microseconds per statement even when the
    listener returns at once. Wrapping the methods of this engine's dialect instance costs one
    call when no unit of work is running.
    """
    dialect = engine.dialect
    source = (handle.name, dialect)
    names = ("do_execute", "do_executemany", "do_execute_no_params", "do_commit", "do_rollback")
    originals = {name: dialect.__dict__.get(name) for name in names}

    def record(
        collector: Collector,
        statement: str,
        parameters: Any,
        t0: float,
        context: Any,
        where: Where,
        failed: bool = False,
    ) -> None:
        if collector.active and not handle.removed:
            try:
                record_statement(
                    collector,
                    statement,
                    parameters,
                    t0,
                    perf_counter() - t0,
                    source,
                    context,
                    where,
                )
                if failed:
                    collector.add_failure()
            except Exception as exc:
                internal_error("engine", exc)

    def timed(name: str) -> Callable[..., Any]:
        """A recording wrapper of `do_execute` or `do_executemany` (the same signature)."""
        execute = getattr(dialect, name)
        # The default methods only call the cursor's method of the same name (`execute`,
        # `executemany`): when this dialect keeps them, the wrapper calls the cursor itself,
        # one Python call less per statement.
        direct = name not in dialect.__dict__ and getattr(type(dialect), name) is getattr(
            DefaultDialect, name
        )
        many = name == "do_executemany"

        def querywatch_execute(
            cursor: Any, statement: str, parameters: Any, context: Any = None
        ) -> Any:
            collector = current_unit.get()
            if collector is None:
                return execute(cursor, statement, parameters, context)
            t0 = perf_counter()
            try:
                if not direct:
                    execute(cursor, statement, parameters, context)
                elif many:
                    cursor.executemany(statement, parameters)
                else:
                    cursor.execute(statement, parameters)
            except BaseException:
                record(collector, statement, parameters, t0, context, where_for(statement), True)
                raise
            seconds = perf_counter() - t0
            # The common case inlined (a clock read, one append): a statement on a connection
            # that has run one before, not an insertmanyvalues page, no fault injected.
            if collector.active and not handle.removed:
                try:
                    try:
                        txn = context._dbapi_connection._connection_record._querywatch_txn
                        fast = context.execute_style is not _INSERTMANYVALUES
                    except AttributeError:
                        fast = False
                    # `where_for(statement)`'s memo check, inlined (it runs for nearly every
                    # statement): the frames found last time, still at the same depths, in the
                    # same code at the same instructions. Anything else asks `where_for`.
                    memo = memo_of(statement)
                    where: Where | None = None
                    if memo is not None and not memo.in_parent:
                        try:
                            frame = _getframe(memo.depth + 1)
                            if frame.f_code is memo.code and frame.f_lasti == memo.lasti:
                                code = memo.caller_code
                                if code is None:
                                    where = memo.where
                                else:
                                    frame = _getframe(memo.depth + 1 + memo.caller_depth)
                                    if frame.f_code is code and frame.f_lasti == memo.caller_lasti:
                                        where = memo.where
                        except ValueError:
                            pass
                    if where is None:
                        where = where_for(statement)
                    if fast and not _guard.injected_faults:
                        pending = collector.pending
                        pending.append((statement, parameters, t0, seconds, source, where, txn))
                        if len(pending) >= FOLD_EVERY:
                            collector.fold()
                    else:
                        record_statement(
                            collector, statement, parameters, t0, seconds, source, context, where
                        )
                except Exception as exc:
                    internal_error("engine", exc)
            return None

        return querywatch_execute

    execute_no_params = dialect.do_execute_no_params

    def querywatch_do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> Any:
        collector = current_unit.get()
        if collector is None:
            return execute_no_params(cursor, statement, context)
        t0 = perf_counter()
        try:
            execute_no_params(cursor, statement, context)
        except BaseException:
            record(collector, statement, (), t0, context, where_for(statement), True)
            raise
        record(collector, statement, (), t0, context, where_for(statement))
        return None

    def ends_transaction(end: Callable[[Any], None], name: str) -> Callable[[Any], None]:
        def querywatch_end(dbapi_connection: Any) -> None:
            try:
                end(dbapi_connection)
            finally:
                try:
                    _end_transaction(dbapi_connection)
                except Exception as exc:
                    internal_error("engine", exc)

        querywatch_end.__name__ = f"querywatch_{name}"
        return querywatch_end

    wrappers: dict[str, Callable[..., Any]] = {
        "do_execute": timed("do_execute"),
        "do_executemany": timed("do_executemany"),
        "do_execute_no_params": querywatch_do_execute_no_params,
    }
    for name in ("do_commit", "do_rollback"):
        wrappers[name] = ends_transaction(getattr(dialect, name), name)
    for name, wrapper in wrappers.items():
        setattr(dialect, name, wrapper)

    def restore() -> None:
        for name, wrapper in wrappers.items():
            if dialect.__dict__.get(name) is not wrapper:
                continue  # wrapped again by someone else: ours now passes through (removed)
            original = originals[name]
            if original is None:
                delattr(dialect, name)
            else:
                setattr(dialect, name, original)

    handle.on_remove(restore)
