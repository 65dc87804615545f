"""`QueryWatchMiddleware`: one unit of work per HTTP request, as a pure ASGI middleware.

For each HTTP request it opens a unit of work, binds the request id to structlog's contextvars,
calls the app, and in `finally` resolves the route template, closes the unit (detection, then the
reporters) and resets the context — also when the app raises (the exception passes through
unchanged, status recorded as 500) and when the client disconnects. Lifespan and websocket scopes
pass straight through. Per-request state lives in local variables, never on `self`.

It needs no framework: the route template is read from the scope after the app ran (Starlette
and FastAPI put the matched route there); requests no route matched share one label.

Requests that counted no statement while they checked connections out of engines querywatch
does not instrument (an engine swapped in after `setup()`) are counted; the third one logs
`querywatch.no_statements`, once per process.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

import structlog
from structlog.contextvars import bind_contextvars

from querywatch import _autoinstrument, _guard, _reporting
from querywatch import _metrics as prometheus_metrics
from querywatch._collection import (
    Collector,
    close_unit,
    default_settings,
    http_request,
    open_unit,
)
from querywatch._serialization import install_serialization_hook
from querywatch.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["UNMATCHED_ROUTE", "QueryWatchMiddleware", "resolve_route"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The `route` label of every request no route matched (404 scanners, CORS preflights).
UNMATCHED_ROUTE = "<unmatched>"
#: Methods kept as the `method` label; anything else is `OTHER` (methods are client input).
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
#: A request id taken from the client: bounded, and only characters safe in logs and headers.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")
#: Status of a request whose client went away before a response started (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
#: Requests without statements but with connections of uninstrumented engines before the
#: `querywatch.no_statements` warning (one such request can be a health check's own engine).
SILENT_REQUESTS_BEFORE_WARNING = 3


class QueryWatchMiddleware:
    """Audit every HTTP request of an ASGI app: count, time and check its SQL statements, log
    a `querywatch.request` event and findings, and record the Prometheus metrics.

    `settings` defaults to the process-wide settings at the time of each request;
    `registry` is the Prometheus registry to record into (`metrics=False`: none);
    `exclude_paths` are paths (without root path) that are passed through unaudited.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings | None = None,
        registry: CollectorRegistry | None = None,
        metrics: bool = True,
        exclude_paths: Collection[str] = (),
    ) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(
                f"QueryWatchMiddleware(settings=...) takes a querywatch.Settings, "
                f"got {type(settings).__name__}"
            )
        self.app = app
        self.settings = settings
        self.exclude_paths = frozenset(exclude_paths)
        _reporting.install()
        #: The metrics this app's requests record into: its own registry's, or none.
        self.metrics: tuple[Any, ...] = ()
        if metrics:
            self.metrics = (prometheus_metrics.install(registry),)
        _install_framework_hooks()
        _autoinstrument.count_checkouts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.exclude_paths:
            path = scope.get("path", "")
            root_path = scope.get("root_path", "")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :]
            if path in self.exclude_paths:
                await self.app(scope, receive, send)
                return
        settings = self.settings
        collector: Collector | None = None
        token: Any = None
        log_token: Any = None
        checkouts = [0]  # on every pool, instrumented or not (see querywatch._autoinstrument)
        checkouts_token: Any = None
        # Once per request, so guarded inline like the hot hooks (see `querywatch._guard`).
        try:
            method = scope.get("method", "GET")
            if method not in KNOWN_METHODS:
                method = "OTHER"
            base_root_path = scope.get("app_root_path", scope.get("root_path", ""))
            header_name, request_id = _request_id(scope, settings)
            request_id_bytes = request_id.encode("latin-1")
            collector, token = open_unit(method, settings=settings, kind="request")
            collector.metrics = self.metrics
            log_token = _bind_request_id(request_id)
            checkouts_token = _autoinstrument.checkouts.set(checkouts)
        except Exception as exc:
            _guard.internal_error("middleware", exc)
        if collector is None:
            await self.app(scope, receive, send)
            return
        # Per-request state: plain locals shared with the closures below.
        status = 0
        disconnected = False
        server_timing = collector.settings.server_timing

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                try:
                    status = message["status"]
                    if _guard.injected_faults:
                        _guard.maybe_fail("middleware")
                    message = _with_headers(
                        message, header_name, request_id_bytes, collector, server_timing
                    )
                except Exception as exc:
                    _guard.internal_error("middleware", exc)
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            error = exc
            raise
        finally:
            raise_findings = error is None
            try:
                if _guard.injected_faults:
                    _guard.maybe_fail("middleware")
                if error is not None:
                    if isinstance(error, Exception):
                        status = 500
                    elif not status:  # cancelled: the client went away
                        status = CLIENT_CLOSED_REQUEST
                        disconnected = True
                elif disconnected and not status:
                    status = CLIENT_CLOSED_REQUEST
                route = resolve_route(scope, base_root_path)
                collector.name = f"{method} {route}"
                collector.http = http_request(
                    method,
                    route,
                    scope.get("path", ""),
                    status,
                    request_id,
                    disconnected,
                    type(error).__name__ if error is not None else None,
                )
                if checkouts[0] > collector.pool.checkouts and not collector.statements:
                    _silent_request(route)
            except Exception as exc:
                _guard.internal_error("middleware", exc)
            try:
                close_unit(collector, token, raise_findings=raise_findings)
            finally:
                if checkouts_token is not None:
                    _autoinstrument.checkouts.reset(checkouts_token)
                if log_token is not None:
                    log_token.var.reset(log_token)


#: The structlog context variable of `request_id`, once known: set directly afterwards (what
#: `bind_contextvars(request_id=...)` does, without its per-call mapping and key formatting).
_request_id_var: ContextVar[Any] | None = None


def _bind_request_id(request_id: str) -> Token[Any]:
    """Bind `request_id` in structlog's context variables; returns the token to reset."""
    global _request_id_var
    var = _request_id_var
    if var is None:
        token = bind_contextvars(request_id=request_id)["request_id"]
        _request_id_var = token.var
        return token
    return var.set(request_id)


_silent_lock = threading.Lock()
_silent_requests = 0
_silent_warned = False


def _silent_request(route: str) -> None:
    """Count a request that used only engines querywatch does not instrument; warn once."""
    global _silent_requests, _silent_warned
    with _silent_lock:
        _silent_requests += 1
        if _silent_warned or _silent_requests < SILENT_REQUESTS_BEFORE_WARNING:
            return
        _silent_warned = True
        requests = _silent_requests
    structlog.get_logger("querywatch").warning(
        "querywatch.no_statements",
        requests=requests,
        route=route,
        hint=(
            "these requests checked out database connections of engines querywatch does not "
            "instrument and counted no statement (an engine created after setup(), e.g. by a "
            "test suite, or never passed to it): instrument it with querywatch.instrument("
            "engine), or call querywatch.instrument_all() (or setup(app) without an engine) "
            "before the engines are created"
        ),
    )


#: Request id header names as the lower-case bytes ASGI headers carry (a few per process).
_header_names: dict[str, bytes] = {}


def _request_id(scope: Scope, settings: Settings | None) -> tuple[bytes, str]:
    """The request id header name (lower-case bytes) and the request's id."""
    name = settings.request_id_header if settings is not None else _default_header()
    header = _header_names.get(name)
    if header is None:
        header = name.lower().encode("latin-1")
        if len(_header_names) < 64:
            _header_names[name] = header
    for key, value in scope.get("headers", ()):
        if key == header:
            if _SANE_REQUEST_ID.fullmatch(value):
                return header, value.decode("latin-1")
            break
    return header, os.urandom(16).hex()


def _default_header() -> str:
    return default_settings().request_id_header


def _with_headers(
    message: Message,
    header: bytes,
    request_id: bytes,
    collector: Collector,
    server_timing: bool,
) -> Message:
    headers = list(message.get("headers", ()))
    for key, _ in headers:
        if key.lower() == header:
            break
    else:
        headers.append((header, request_id))
    if server_timing:
        ms = collector.db_seconds * 1000
        n = collector.statements
        noun = "statement" if n == 1 else "statements"
        headers.append((b"server-timing", f'db;dur={ms:.1f};desc="{n} {noun}"'.encode()))
    return {**message, "headers": headers}


def resolve_route(scope: Scope, base_root_path: str = "") -> str:
    """The route template a finished request matched, or `UNMATCHED_ROUTE`.

    Reads what the routers left in the scope: `scope["route"]` (Starlette's router sets it for
    every route, FastAPI's `APIRoute` for itself), FastAPI's effective route context for routers
    included with a prefix (FastAPI >= 0.120 keeps the router's own route there, whose
    `path_format` lacks the prefix), and the mount prefixes accumulated in `root_path`. FastAPI's
    own router (>= 0.120) leaves `scope["route"]` unset for the plain Starlette routes it serves
    (`/docs`, `/openapi.json`, `app.add_route`, mounts): those are found by the endpoint the
    match put in the scope, see `_route_by_endpoint`.
    """
    route = scope.get("route")
    kind = "" if route is None else (_route_kinds.get(type(route)) or _route_kind(route))
    if route is None or (kind == "mount" and scope.get("endpoint") is not route.app):
        # No route recorded, or only a mount whose app then matched a route of its own
        # without recording it (a FastAPI app mounted in a Starlette app).
        found = _route_by_endpoint(scope)
        if found is not None:
            route, kind = found, _route_kind(found)
    if route is None:
        return UNMATCHED_ROUTE
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE
    if kind == "host":
        return UNMATCHED_ROUTE
    if kind == "mount":
        # A mounted app without routes (static files), or whose routes matched nothing: the
        # mount's own prefix is already in root_path, the label is `<prefix>/{path}`.
        template = "/{path}"
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        context = fastapi_scope.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            effective = getattr(context, "path_format", None)
            if isinstance(effective, str):
                template = effective
    root_path: str = scope.get("root_path", "")
    if root_path != base_root_path and root_path.startswith(base_root_path):
        prefix = root_path[len(base_root_path) :]
        params = scope.get("path_params")
        if params:
            own = getattr(route, "param_convertors", {})
            for key, value in params.items():
                if key not in own:
                    # a parameter of a mount: put its name back in place of its value
                    prefix = prefix.replace(f"/{value}", f"/{{{key}}}", 1)
        template = prefix + template
    return template


#: How deep `_route_by_endpoint` looks into `Mount(routes=[...])` inside the app.
_MAX_MOUNT_DEPTH = 8


def _route_by_endpoint(scope: Scope) -> Any:
    """The Starlette `Route` (or `Mount`) of the innermost app that served the request, found
    by the endpoint its match put in `scope["endpoint"]`, else None.

    The innermost Starlette or FastAPI app that ran is `scope["app"]` (each sets itself there);
    its routes are searched for the endpoint, through `Mount(routes=[...])` (no app of their
    own). When one endpoint serves several paths, the route that matches the scope wins.
    Requests no route matched carry no endpoint and cost nothing here.
    """
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return None
    routes = getattr(scope.get("app"), "routes", None)
    candidates: list[Any] = []
    _collect_by_endpoint(routes, endpoint, candidates, 0)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    from starlette.routing import Match  # deferred: Starlette is optional (any ASGI app)

    partial = None
    for route in candidates:
        match, _ = route.matches(scope)  # reads the scope, never writes it
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial if partial is not None else candidates[0]


def _collect_by_endpoint(routes: Any, endpoint: Any, found: list[Any], depth: int) -> None:
    if not isinstance(routes, list) or depth > _MAX_MOUNT_DEPTH:
        return
    try:
        # deferred: Starlette is optional (any ASGI app)
        from starlette.routing import Mount, Route, Router
    except ImportError:  # pragma: no cover - no Starlette, nothing to search
        return
    for route in routes:
        if isinstance(route, Route):
            if route.endpoint is endpoint:
                found.append(route)
        elif isinstance(route, Mount):
            if route.app is endpoint:
                found.append(route)
            elif isinstance(route.app, Router):
                # `Mount(routes=[...])`: its router matched inside the same app. A mounted
                # Starlette or FastAPI app would have put itself in scope["app"] instead.
                _collect_by_endpoint(route.routes, endpoint, found, depth + 1)


_mount_type: type | None = None
_host_type: type | None = None


#: Route class -> its kind, as `_route_kind` found it (the route classes of the app's routers).
_route_kinds: dict[type, str] = {}


def _route_kind(route: Any) -> str:
    global _mount_type, _host_type
    if _mount_type is None:
        try:
            # deferred: Starlette is optional (any ASGI app)
            from starlette.routing import Host, Mount
        except ImportError:  # pragma: no cover - no Starlette, no mounts
            return "route"
        _mount_type, _host_type = Mount, Host
    if isinstance(route, _mount_type):
        kind = "mount"
    elif _host_type is not None and isinstance(route, _host_type):
        kind = "host"
    else:
        kind = "route"
    if len(_route_kinds) < 64:
        _route_kinds[type(route)] = kind
    return kind


def _install_framework_hooks() -> None:
    """Tag FastAPI's response-model serialization as the `serialization` phase (once; only
    when the app is a FastAPI app, i.e. FastAPI is imported already)."""
    if "fastapi" in sys.modules:
        with _guard.guarding("middleware"):
            install_serialization_hook()
