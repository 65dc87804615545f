"""Attaching to engines: `instrument()`, `uninstrument()`, and the statement listeners.

The statement hooks are the hot path. Outside a unit of work they cost one ContextVar read.
Inside one they time the cursor execution, take the statement's shape from the SQL string the cursor
already has (cached per string), and record into the unit's collector. They never decide, log
or raise: errors go to the guard.

Handles are remembered in a WeakKeyDictionary keyed by the engine, and the hooks hold the
engine only through that handle's weak reference, so querywatch never keeps an engine alive.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import ExecuteStyle

from querywatch import _callsite, _guard
from querywatch._guard import internal_error
from querywatch.collection import FOLD_EVERY, Collector, _current, configure
from querywatch.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Instrumentation", "instrument", "instrumented_engines", "uninstrument"]

_handles: weakref.WeakKeyDictionary[Engine, Instrumentation] = weakref.WeakKeyDictionary()


def engine_name(engine: Engine) -> str:
    """`driver://host:port/database`, without credentials: the engine's default `pool` label."""
    url = engine.url
    host = url.host or ""
    if url.port:
        host = f"{host}:{url.port}"
    database = url.database or ""
    return f"{url.drivername}://{host}/{database}"


class Instrumentation:
    """The handle `instrument()` returns: what querywatch attached to one engine."""

    def __init__(self, engine: Engine, name: str) -> None:
        self._engine_ref = weakref.ref(engine)
        self.name = name
        #: (weak reference to the target, event name, listener): a strong reference here would
        #: keep the engine alive (this handle is the engine's value in a WeakKeyDictionary).
        self._listeners: list[tuple[Callable[[], Any], str, Callable[..., Any]]] = []
        self._cleanups: list[Callable[[], None]] = []
        self.removed = False

    def __repr__(self) -> str:
        return f"<querywatch.Instrumentation {self.name!r}{' removed' if self.removed else ''}>"

    @property
    def engine(self) -> Engine | None:
        """The instrumented engine, or None once it has been garbage-collected."""
        return self._engine_ref()

    def listen(self, target: Any, identifier: str, fn: Callable[..., Any], **kw: Any) -> None:
        """Attach `fn` and remember it, so `remove()` detaches it."""
        event.listen(target, identifier, fn, **kw)
        try:
            ref: Callable[[], Any] = weakref.ref(target)
        except TypeError:  # not weakly referenceable: a class, not an engine
            ref = lambda: target  # noqa: E731
        self._listeners.append((ref, identifier, fn))

    def on_remove(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` when the instrumentation is removed."""
        self._cleanups.append(cleanup)

    def remove(self) -> None:
        """Detach every listener querywatch added to the engine. Idempotent."""
        if self.removed:
            return
        self.removed = True
        for ref, identifier, fn in reversed(self._listeners):
            target = ref()
            if target is not None and event.contains(target, identifier, fn):
                event.remove(target, identifier, fn)
        self._listeners.clear()
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()
        engine = self._engine_ref()
        if engine is not None and _handles.get(engine) is self:
            del _handles[engine]


def sync_engine_of(engine: object) -> Engine | None:
    """The `Engine` behind an `Engine` or `AsyncEngine`, else None. Duck-typed: importing
    sqlalchemy.ext.asyncio needs greenlet, which SQLAlchemy 2.1 no longer installs by default."""
    if isinstance(engine, Engine):
        return engine
    inner = getattr(engine, "sync_engine", None)
    return inner if isinstance(inner, Engine) else None


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    sync_engine = sync_engine_of(engine)
    if sync_engine is None:
        raise TypeError(
            f"querywatch.instrument() takes a SQLAlchemy Engine or AsyncEngine, "
            f"got {type(engine).__name__}"
        )
    return sync_engine


def instrument(
    engine: Engine | AsyncEngine, *, name: str | None = None, settings: Settings | None = None
) -> Instrumentation:
    """Attach querywatch to `engine` (sync or async). Idempotent: a second call returns the
    same handle. `name` is the engine's `pool` label (default `driver://host:port/db`).
    `settings`, when given, become the process-wide default (see `querywatch.configure`)."""
    sync_engine = _sync_engine(engine)
    if settings is not None:
        configure(settings)
    existing = _handles.get(sync_engine)
    if existing is not None and not existing.removed:
        return existing
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError("instrument(name=...) must be a non-empty string")
    handle = Instrumentation(sync_engine, name or engine_name(sync_engine))
    _attach_statement_listeners(handle, sync_engine)
    from querywatch import _orm, pool

    pool.attach(handle, sync_engine)
    _orm.ensure_installed(handle)
    _handles[sync_engine] = handle
    return handle


def uninstrument(engine: Engine | AsyncEngine) -> bool:
    """Detach querywatch from `engine`. Returns False when it was not instrumented."""
    handle = _handles.get(_sync_engine(engine))
    if handle is None:
        return False
    handle.remove()
    return True


def instrumented_engines() -> list[Instrumentation]:
    """The handles of every live instrumented engine."""
    return [handle for handle in list(_handles.values()) if not handle.removed]


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
) -> None:
    """Record one executed statement into `collector` (the hot path: count, and one append;
    shapes, parameter hashes and call-site bookkeeping happen in batches, see
    `Collector.fold`). The parameters stay referenced until the fold, which keeps only their
    hash (values only when a unit opted in with `Settings.log_parameters`)."""
    if _guard.injected_faults:
        _guard.maybe_fail("engine")
    if getattr(context, "execute_style", None) is _INSERTMANYVALUES:
        # insertmanyvalues sends one `execute()` of many rows as several statements, pages of
        # one execution context: one logical statement, whatever the number of pages. The
        # context is held weakly (a strong reference would keep its cursor open).
        last = collector.last_context
        if last is not None and last() is context:
            collector.add_page(seconds)
            return
        collector.last_context = weakref.ref(context)
    collector.statements += 1
    collector.db_seconds += seconds
    try:
        txn = context._dbapi_connection._connection_record._querywatch_txn
    except AttributeError:  # the connection's first statement in this process, or no context
        txn = _transaction_of(context)
    pending = collector.pending
    pending.append(
        (statement, parameters, t0, seconds, source, _callsite.where_for(statement, 1), txn)
    )
    if len(pending) >= FOLD_EVERY:
        collector.fold()


def _attach_statement_listeners(handle: Instrumentation, engine: Engine) -> None:
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
        failed: bool = False,
    ) -> None:
        if collector.active and not handle.removed:
            try:
                record_statement(
                    collector, statement, parameters, t0, perf_counter() - t0, source, context
                )
                if failed:
                    collector.failed_statements += 1
            except Exception as exc:
                internal_error("engine", exc)

    def timed(execute: Callable[..., Any]) -> Callable[..., Any]:
        """A recording wrapper of `do_execute` or `do_executemany` (the same signature)."""

        def querywatch_execute(
            cursor: Any, statement: str, parameters: Any, context: Any = None
        ) -> Any:
            collector = _current.get()
            if collector is None:
                return execute(cursor, statement, parameters, context)
            t0 = perf_counter()
            try:
                execute(cursor, statement, parameters, context)
            except BaseException:
                record(collector, statement, parameters, t0, context, True)
                raise
            # The success path is `record()` inlined: one call less per statement.
            if collector.active and not handle.removed:
                try:
                    record_statement(
                        collector, statement, parameters, t0, perf_counter() - t0, source, context
                    )
                except Exception as exc:
                    internal_error("engine", exc)
            return None

        return querywatch_execute

    execute_no_params = dialect.do_execute_no_params

    def querywatch_do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> Any:
        collector = _current.get()
        if collector is None:
            return execute_no_params(cursor, statement, context)
        t0 = perf_counter()
        try:
            execute_no_params(cursor, statement, context)
        except BaseException:
            record(collector, statement, (), t0, context, True)
            raise
        record(collector, statement, (), t0, context)
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
        "do_execute": timed(dialect.do_execute),
        "do_executemany": timed(dialect.do_executemany),
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
