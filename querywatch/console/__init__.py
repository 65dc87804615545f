"""The live console: the last units of work, their statements and findings, in a browser.

    console = querywatch.console.Console(settings=settings, engines=[engine])
    app = console.wrap(app)   # any ASGI app
    # or, on Starlette: app.add_middleware(ConsoleMiddleware, console=console)

`querywatch.fastapi.setup(app, engine, console=True)` does both. While a console exists, a
reporter keeps a snapshot of every finished unit of work in a bounded ring buffer
(`Settings.console_units`); before (and after `close()`) nothing is recorded for it. The
console is served in front of the auditing middleware: its own requests never open a unit of
work. See docs/console.md for the views, the JSON API and the security model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog

from querywatch import _collection, _guard
from querywatch.console._app import ASGIApp, ConsoleApp, Receive, Scope, Send, is_loopback
from querywatch.console._buffer import UnitBuffer, UnitSnapshot
from querywatch.console._explain import Captured
from querywatch.settings import Settings, editor_pattern

__all__ = ["Console", "ConsoleMiddleware", "UnitSnapshot"]


class Console:
    """A console: the ring buffer its reporter fills, and the settings it is served with.

    `settings` (default: the process-wide settings): `console_path`, `console_units`,
    `console_token`, `console_editor`, `console_explain`. `engines`: the engines EXPLAIN may
    use (only with `console_explain`). Call `close()` to stop recording.
    """

    def __init__(self, *, settings: Settings | None = None, engines: Iterable[Any] = ()) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"Console(settings=...) takes a querywatch.Settings, got {settings!r}")
        self.settings = settings if settings is not None else _collection.default_settings()
        self.size = self.settings.console_units
        self.buffer = UnitBuffer(self.size)
        self.editor = editor_pattern(self.settings.console_editor)
        self.captured = Captured(engines) if self.settings.console_explain else None
        self._warned_bind = False
        self._remove = _collection.add_reporter(self._record)

    def _record(self, report: _collection.Report) -> None:
        self.buffer.record(report)  # the reporter: runs inside the unit's guard

    @property
    def path(self) -> str:
        """The path prefix the console is served under."""
        return self.settings.console_path

    def close(self) -> None:
        """Stop recording (the buffer is emptied)."""
        self._remove()
        if self.captured is not None:
            self.captured.close()
        self.buffer.clear()

    def wrap(self, app: ASGIApp) -> ConsoleMiddleware:
        """`app` with the console served in front of it."""
        return ConsoleMiddleware(app, console=self)

    def check_bind(self, scope: Scope) -> None:
        """Warn once when the server listens beyond loopback and no token guards the console."""
        if self._warned_bind:
            return
        self._warned_bind = True
        server = scope.get("server")
        host = server[0] if server else None
        if self.settings.console_token is None and host is not None and not is_loopback(host):
            structlog.get_logger("querywatch").warning(
                "querywatch.console_exposed",
                bind=host,
                path=self.path,
                hint=(
                    "the console is on and the server listens beyond loopback without "
                    "Settings.console_token: only loopback clients are served (others get 404), "
                    "but set QUERYWATCH_CONSOLE_TOKEN to use it remotely, or turn it off"
                ),
            )


class ConsoleMiddleware:
    """Serve `console` under its path in front of `app` (pure ASGI; every other request and
    scope passes through unchanged). Add it after (outside) `QueryWatchMiddleware`, so that
    console requests are never audited."""

    def __init__(self, app: ASGIApp, *, console: Console) -> None:
        self.app = app
        self.console = console
        self.prefix = console.path
        self.console_app = ConsoleApp(console, fallback=app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self.console._warned_bind:
                with _guard.guard("console"):
                    self.console.check_bind(scope)
            path: str = scope.get("path", "")
            root_path: str = scope.get("root_path", "")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :]
            if path.startswith(self.prefix) and (
                len(path) == len(self.prefix) or path[len(self.prefix)] == "/"
            ):
                await self.console_app(scope, receive, send)
                return
        await self.app(scope, receive, send)
