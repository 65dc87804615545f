"""Attaching to engines: `instrument()`, `uninstrument()`, and the statement listeners.

The statement hooks are the hot path. Outside a unit of work they cost one ContextVar read.
Inside one they time the cursor execution, take the statement's shape from the SQL string the cursor
already has (cached per string), and record into the unit's collector. They never decide, log
or raise: errors go to the guard.

Handles are remembered in a WeakKeyDictionary keyed by the engine, and the hooks hold the
engine only through that handle's weak reference, so querywatch never keeps an engine alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

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


def _other_parameter_key(parameters: Any) -> int | None:
    """The parameter hash for what is neither a tuple nor a dict (`record_statement` hashes
    those inline: they are nearly every statement)."""
    if type(parameters) is list:  # executemany: not a duplicate candidate
        return None
    return hash(parameters)


def record_statement(
    collector: Collector, statement: str, seconds: float, parameters: Any, pool: str
) -> None:
    """Record one executed statement into `collector` (the hot path: counts now, the rest in
    batches, see `Collector.fold`). Parameters are kept only as a hash, never as values,
    unless a unit opted in with `Settings.log_parameters`."""
    if _guard.injected_faults:
        _guard.maybe_fail("engine")
    collector.statements += 1
    collector.db_seconds += seconds
    kind = type(parameters)
    try:
        if kind is tuple:
            key: int | None = hash(parameters)
        elif kind is dict:
            key = hash(tuple(parameters.items()))
        else:
            key = _other_parameter_key(parameters)
    except TypeError:  # unhashable values (arrays, JSON): hash their text instead
        key = hash(repr(parameters))
    # After the first walk per statement string, `capture_for` checks one frame.
    pending = collector.pending
    pending.append((statement, seconds, key, pool, _callsite.capture_for(statement, 1)))
    if collector.pending_parameters is not None:  # Settings.log_parameters: until the fold
        collector.pending_parameters.append(parameters)
    if len(pending) >= FOLD_EVERY:
        collector.fold()


def _attach_statement_listeners(handle: Instrumentation, engine: Engine) -> None:
    """Time statements at the dialect's execute methods (the documented `Dialect` interface).

    SQLAlchemy's cursor events would do, but any engine listener switches every execution to
    its event-dispatching path, which costs several microseconds per statement even when the
    listener returns at once. Wrapping the three execute methods of this engine's dialect
    instance costs one call when no unit of work is running.
    """
    dialect = engine.dialect
    pool = handle.name
    originals = {
        name: dialect.__dict__.get(name)
        for name in ("do_execute", "do_executemany", "do_execute_no_params")
    }
    do_execute = dialect.do_execute
    do_executemany = dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params

    def finish(
        collector: Collector, statement: str, parameters: Any, t0: float, failed: bool
    ) -> None:
        try:
            if collector.active and not handle.removed:
                record_statement(collector, statement, perf_counter() - t0, parameters, pool)
                if failed:
                    collector.failed_statements += 1
        except Exception as exc:
            internal_error("engine", exc)

    def querywatch_do_execute(
        cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        collector = _current.get()
        if collector is None:
            return do_execute(cursor, statement, parameters, context)
        t0 = perf_counter()
        try:
            do_execute(cursor, statement, parameters, context)
        except BaseException:
            finish(collector, statement, parameters, t0, True)
            raise
        if collector.active and not handle.removed:
            try:
                record_statement(collector, statement, perf_counter() - t0, parameters, pool)
            except Exception as exc:
                internal_error("engine", exc)

    def querywatch_do_executemany(
        cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        collector = _current.get()
        if collector is None:
            return do_executemany(cursor, statement, parameters, context)
        t0 = perf_counter()
        try:
            do_executemany(cursor, statement, parameters, context)
        except BaseException:
            finish(collector, statement, parameters, t0, True)
            raise
        if collector.active and not handle.removed:
            try:
                record_statement(collector, statement, perf_counter() - t0, parameters, pool)
            except Exception as exc:
                internal_error("engine", exc)

    def querywatch_do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        collector = _current.get()
        if collector is None:
            return do_execute_no_params(cursor, statement, context)
        t0 = perf_counter()
        try:
            do_execute_no_params(cursor, statement, context)
        except BaseException:
            finish(collector, statement, (), t0, True)
            raise
        finish(collector, statement, (), t0, False)

    wrappers = {
        "do_execute": querywatch_do_execute,
        "do_executemany": querywatch_do_executemany,
        "do_execute_no_params": querywatch_do_execute_no_params,
    }
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
