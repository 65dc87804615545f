"""Engines querywatch was not handed: `instrument_all()` instruments every engine created after
it, and a pool listener notices when engines querywatch does not instrument serve a request.

`instrument_all()` wraps `Dialect.engine_created`, the hook SQLAlchemy's `create_engine()` calls
with every finished `Engine` (documented for dialects and wrappers to attach to new engines).
Hooking the class, rather than wrapping the `create_engine` functions as OpenTelemetry's
instrumentor does, also catches engines created through a `from sqlalchemy import create_engine`
that ran before `instrument_all()`. `create_async_engine()` builds its sync engine with
`create_engine()`, so async engines are covered too. A dialect class that overrides
`engine_created` without calling `super()` is not seen.

Noticing uninstrumented engines costs nothing per statement: a class-level pool `checkout`
listener (engine events would switch every engine's executions to SQLAlchemy's slower
event-dispatching path; pool events do not) counts checkouts into the box the middleware put in
the request's context, and the middleware compares that count with the checkouts of the engines
querywatch instruments.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import Pool

from querywatch import _guard
from querywatch._collection import configure
from querywatch._instrumentation import Instrumentation, instrument

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from querywatch.settings import Settings

__all__ = [
    "AutoInstrumentation",
    "checkouts",
    "count_checkouts",
    "instrument_all",
    "stop_counting_checkouts",
    "uninstrument_all",
]

_lock = threading.Lock()
_active: AutoInstrumentation | None = None


class AutoInstrumentation:
    """The handle `instrument_all()` returns: remove it (or call `uninstrument_all()`) to stop
    instrumenting new engines and detach querywatch from the engines it instrumented."""

    def __init__(self) -> None:
        #: Handles of the engines this instrumented; weak, like every engine reference we hold.
        self._handles: weakref.WeakSet[Instrumentation] = weakref.WeakSet()
        self._original: Any = None
        self._hook: Any = None
        self.removed = False

    def __repr__(self) -> str:
        state = " removed" if self.removed else ""
        return f"<querywatch.AutoInstrumentation {len(self._handles)} engines{state}>"

    @property
    def instrumentations(self) -> list[Instrumentation]:
        """The live instrumentations of the engines created since `instrument_all()`."""
        return [handle for handle in list(self._handles) if not handle.removed]

    def _install(self) -> None:
        original = Dialect.__dict__["engine_created"]
        handles = self._handles

        def engine_created(cls: type[Dialect], engine: Engine) -> None:
            original.__func__(cls, engine)
            if self.removed:
                return  # someone wrapped the hook after us: ours is left in place, inert
            with _guard.guarding("engine"):
                _guard.maybe_fail("engine")
                handle = instrument(engine)
                handles.add(handle)

        self._original = original
        self._hook = classmethod(engine_created)
        Dialect.engine_created = self._hook  # type: ignore[method-assign]

    def remove(self) -> None:
        """Stop instrumenting new engines, and detach querywatch from the engines it
        instrumented. Engines instrumented with `instrument()` stay instrumented. Idempotent."""
        global _active
        with _lock:
            if self.removed:
                return
            self.removed = True
            if Dialect.__dict__.get("engine_created") is self._hook:
                Dialect.engine_created = self._original  # type: ignore[method-assign]
            if _active is self:
                _active = None
        for handle in list(self._handles):
            handle.remove()
        self._handles.clear()


def instrument_all(*, settings: Settings | None = None) -> AutoInstrumentation:
    """Instrument every SQLAlchemy `Engine` and `AsyncEngine` created from now on (engines that
    exist already are not touched: pass them to `instrument()`). Idempotent: while active, a
    second call returns the same handle. `settings`, when given, become the process-wide
    default (see `querywatch.configure`)."""
    global _active
    if settings is not None:
        configure(settings)
    with _lock:
        if _active is None:
            auto = AutoInstrumentation()
            auto._install()
            _active = auto
        return _active


def uninstrument_all() -> bool:
    """Undo `instrument_all()` (see `AutoInstrumentation.remove`). False when it was not active."""
    active = _active
    if active is None:
        return False
    active.remove()
    return True


# -- noticing engines querywatch does not instrument -------------------------------------------

#: Per request, set by the middleware: `[checkouts seen on any pool]`.
checkouts: ContextVar[list[int] | None] = ContextVar("querywatch_checkouts", default=None)
_listening = False


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    try:
        box = checkouts.get()
        if box is not None:
            box[0] += 1
    except Exception as exc:
        _guard.internal_error("pool", exc)


def count_checkouts() -> None:
    """Count every pool's checkouts into the `checkouts` box of the current context (once per
    process; a pool event, so statements are never slowed)."""
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    with _guard.guarding("pool"):
        event.listen(Pool, "checkout", _on_checkout)


def stop_counting_checkouts() -> None:
    """Remove the listener `count_checkouts()` added."""
    global _listening
    with _lock:
        if not _listening:
            return
        _listening = False
    if event.contains(Pool, "checkout", _on_checkout):
        event.remove(Pool, "checkout", _on_checkout)
