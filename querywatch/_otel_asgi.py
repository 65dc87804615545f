"""`querywatch.fastapi.setup(app, engine, otel=True)`: the OpenTelemetry bridge for one app.

The bridge puts a request's findings on the span that is active when its unit of work ends: the
server span of the tracing middleware (opentelemetry-instrumentation-asgi/-fastapi, or FastAPI's
own telemetry). Two things stand in the way, and this module removes both:

- Tracing middleware ends the server span as soon as the response's last body message is sent,
  while querywatch's unit of work ends when the app returns (background tasks included). So
  `ServerSpanHold`, an ASGI middleware directly outside querywatch's, holds the span open
  (`querywatch.otel.hold_current_span`): the tracing middleware's `end()` is recorded, with its
  time, and carried out once querywatch's unit has reported. The client's response is not
  delayed, and the span keeps the end time it was given.
- Starlette runs the middleware added last outermost: an `OpenTelemetryMiddleware` added with
  `app.add_middleware()` *before* `setup()` would sit inside querywatch's, its span started after
  the unit began and ended before it closed. So querywatch's two middleware are moved to directly
  inside the innermost such tracing middleware. (`FastAPIInstrumentor`, FastAPI's own telemetry
  and an app wrapped as `OpenTelemetryMiddleware(app)` are outermost whatever the order.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from querywatch import _guard, otel
from querywatch.middleware import QueryWatchMiddleware

__all__ = ["ServerSpanHold", "place_inside_tracing", "setup"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def setup(app: Any) -> None:
    """Enable the bridge (unless `querywatch.otel.enable()` already configured it), add
    `ServerSpanHold` directly outside querywatch's middleware, and place both inside the app's
    OpenTelemetry ASGI middleware. Call right after `app.add_middleware(QueryWatchMiddleware)`."""
    if not otel.is_enabled():
        otel.enable()
    app.add_middleware(ServerSpanHold)
    place_inside_tracing(app)


class ServerSpanHold:
    """Hold the request's server span open until the app call (and so querywatch's unit of
    work, inside it) has returned; pure ASGI, HTTP only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = None
        with _guard.guarding("otel"):
            _guard.maybe_fail("otel")
            held = otel.hold_current_span()
        if held is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            with _guard.guarding("otel"):
                held.release()


def place_inside_tracing(app: Any) -> bool:
    """Move querywatch's middleware (`ServerSpanHold` and `QueryWatchMiddleware`, in that order)
    in `app.user_middleware` to directly inside the innermost OpenTelemetry ASGI middleware
    added before them; True when they moved."""
    stack = getattr(app, "user_middleware", None)
    if not isinstance(stack, list):
        return False
    ours = [i for i, entry in enumerate(stack) if _is_ours(entry)]
    if not ours:
        return False
    tracing = [i for i, entry in enumerate(stack) if i > ours[0] and _is_tracing(entry)]
    if not tracing or tracing[-1] < ours[-1]:
        return False
    moved = [stack[i] for i in ours]
    for i in reversed(ours):
        del stack[i]
    at = tracing[-1] - len(ours) + 1  # right after the tracing middleware, now moved up
    stack[at:at] = moved
    return True


def _is_ours(entry: Any) -> bool:
    return getattr(entry, "cls", None) in (ServerSpanHold, QueryWatchMiddleware)


def _is_tracing(entry: Any) -> bool:
    """An entry for opentelemetry-instrumentation-asgi's `OpenTelemetryMiddleware` (or a
    subclass), recognised without importing it."""
    cls = getattr(entry, "cls", None)
    return isinstance(cls, type) and any(
        klass.__module__ == "opentelemetry.instrumentation.asgi"
        and klass.__name__ == "OpenTelemetryMiddleware"
        for klass in cls.__mro__
    )
