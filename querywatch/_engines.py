"""Instrumented engines: the handle `instrument()` returns, and the registry of them.

Handles are remembered in a WeakKeyDictionary keyed by the engine, and the hooks hold the
engine only through that handle's weak reference, so querywatch never keeps an engine alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Instrumentation",
    "engine_name",
    "handle_of",
    "instrumented_engines",
    "register",
    "require_sync_engine",
    "sync_engine_of",
]

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


def require_sync_engine(engine: Engine | AsyncEngine) -> Engine:
    sync_engine = sync_engine_of(engine)
    if sync_engine is None:
        raise TypeError(
            f"querywatch.instrument() takes a SQLAlchemy Engine or AsyncEngine, "
            f"got {type(engine).__name__}"
        )
    return sync_engine


def register(engine: Engine, handle: Instrumentation) -> None:
    """Remember `handle` as `engine`'s instrumentation."""
    _handles[engine] = handle


def handle_of(engine: Engine) -> Instrumentation | None:
    """The live handle of an instrumented engine, else None."""
    handle = _handles.get(engine)
    return handle if handle is not None and not handle.removed else None


def instrumented_engines() -> list[Instrumentation]:
    """The handles of every live instrumented engine."""
    return [handle for handle in list(_handles.values()) if not handle.removed]
