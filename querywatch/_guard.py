"""The one guard around every hook querywatch runs inside the host application.

An exception raised by querywatch's own code is logged (at most once per component per
interval), counted, handed to subscribers (the Prometheus reporter counts it as
`querywatch_internal_errors_total{component}`) and swallowed. Our own test suite flips
`raise_internal_errors` so that our bugs fail our tests instead of hiding.

Hot paths - per statement, per checkout, and once per unit of work (the middleware, closing the
unit, the built-in reporters) - use ``try: ... except Exception as exc: internal_error("engine",
exc)`` inline: no call at all when nothing fails, and fault injection behind ``if
injected_faults:``. Everything else uses one shape, ``with guarding("component"):`` - a cached,
slotted context manager (about 0.25 us per use, where a `@contextmanager` generator costs about
1.4 us), like sentry-python's `capture_internal_exceptions`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = [
    "Guard",
    "InjectedFault",
    "guard",
    "guarding",
    "injected_faults",
    "internal_error",
    "internal_error_counts",
    "maybe_fail",
    "subscribe",
]

logger = logging.getLogger("querywatch")

#: Set to True by querywatch's own test suite: internal errors are re-raised, never swallowed.
raise_internal_errors = False

#: Components in which `maybe_fail` raises: the fault-injection switch of the safety tests.
injected_faults: frozenset[str] = frozenset()

LOG_INTERVAL_SECONDS = 60.0

_lock = threading.Lock()
_counts: dict[str, int] = {}
_last_logged: dict[str, float] = {}
_suppressed: dict[str, int] = {}
_subscribers: list[Callable[[str], None]] = []


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` in a component named in `injected_faults`."""


def internal_error(component: str, exc: BaseException) -> None:
    """Record an internal error of `component`; re-raise only when our tests asked for it."""
    with _lock:
        _counts[component] = _counts.get(component, 0) + 1
        now = time.monotonic()
        last = _last_logged.get(component)
        should_log = last is None or now - last >= LOG_INTERVAL_SECONDS
        if should_log:
            _last_logged[component] = now
            suppressed = _suppressed.pop(component, 0)
        else:
            _suppressed[component] = _suppressed.get(component, 0) + 1
    if should_log:
        # A broken logging configuration must not break the application either.
        with contextlib.suppress(Exception):
            logger.error(
                "querywatch internal error in %s (%d similar errors suppressed since the last "
                "report); the application is unaffected",
                component,
                suppressed,
                exc_info=exc,
            )
    for subscriber in tuple(_subscribers):
        with contextlib.suppress(Exception):
            subscriber(component)
    if raise_internal_errors and not isinstance(exc, InjectedFault):
        raise exc


class Guard:
    """`with guarding("component"):` - an exception in the block is an internal error of the
    component: logged, counted and swallowed (re-raised in our own tests). Stateless, so one
    instance per component serves every thread, task and nesting level at once."""

    __slots__ = ("component",)

    def __init__(self, component: str) -> None:
        self.component = component

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, cancellation: never ours to swallow
        internal_error(self.component, exc)
        return True


_guards: dict[str, Guard] = {}


def guarding(component: str) -> Guard:
    """The guard of `component` (one cached instance per component name)."""
    guard = _guards.get(component)
    if guard is None:
        guard = _guards.setdefault(component, Guard(component))
    return guard


#: The earlier name of `guarding`.
guard = guarding


def maybe_fail(component: str) -> None:
    """Raise `InjectedFault` when the safety tests inject a fault into `component`."""
    if component in injected_faults:
        raise InjectedFault(f"injected fault in {component}")


def subscribe(callback: Callable[[str], None]) -> Callable[[], None]:
    """Call `callback(component)` on every internal error; returns the unsubscribe function."""
    _subscribers.append(callback)

    def unsubscribe() -> None:
        if callback in _subscribers:
            _subscribers.remove(callback)

    return unsubscribe


def internal_error_counts() -> dict[str, int]:
    """Internal errors counted so far in this process, by component."""
    with _lock:
        return dict(_counts)
