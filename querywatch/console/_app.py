"""The console's ASGI app: who may see it, the page, its static files and the JSON API.

Every path is under the console's prefix. Who may see it: without `Settings.console_token`,
loopback clients asking for a loopback host (a DNS-rebinding page cannot reach it); with a
token, any client that presents it (`Authorization: Bearer`, or the cookie the login path
sets), compared in constant time. Anyone else is answered exactly as if the console did not
exist. Every response carries a strict Content-Security-Policy; the page builds its DOM from the
JSON with text nodes only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from querywatch import _guard
from querywatch.console import _api
from querywatch.console._explain import ExplainError

if TYPE_CHECKING:
    from querywatch.console import Console

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The cookie `login` sets: an HMAC of the token, never the token itself.
COOKIE = "querywatch_console"
#: Header the page sends with POST requests: a cross-site form or `fetch` cannot send it
#: without a CORS preflight, which the console never answers.
CSRF_HEADER = b"x-querywatch-console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def is_loopback(host: str | None) -> bool:
    """`host` (an address or `localhost`) is this machine."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"host":
            text: str = value.decode("latin-1")
            if text.startswith("["):  # [::1]:8000
                return text[1 : text.find("]")] if "]" in text else text
            return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def cookie_value(token: str) -> str:
    """What the login cookie holds for `token`."""
    return hmac.new(token.encode(), b"querywatch-console-cookie", hashlib.sha256).hexdigest()


class ConsoleApp:
    """Serve one console under its prefix. `fallback` answers refused and unknown requests
    (the wrapped app: a refused client gets the app's own 404); None: a plain 404."""

    def __init__(self, console: Console, fallback: ASGIApp | None = None) -> None:
        self.console = console
        self.prefix = console.settings.console_path
        self.token = console.settings.console_token
        self.cookie = cookie_value(self.token) if self.token is not None else None
        self.fallback = fallback
        self._files: dict[str, bytes] = {}

    def allowed(self, scope: Scope) -> bool:
        """May this request see the console?"""
        if self.token is None:
            client = scope.get("client")
            host = _host_name(scope)
            return (
                client is not None
                and is_loopback(client[0])
                and (host is None or is_loopback(host))
            )
        presented = b""
        authorization = _header(scope, b"authorization")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip().encode()
            return hmac.compare_digest(presented, self.token.encode())
        cookies = _header(scope, b"cookie")
        if cookies is not None and self.cookie is not None:
            for part in cookies.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return hmac.compare_digest(value.encode(), self.cookie.encode())
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            served = await self._serve(scope, tracked)
        except Exception as exc:  # the console's own bug: logged, counted, never the app's
            _guard.internal_error("console", exc)
            if not started:
                await _json(send, 500, {"error": "internal error (logged)"})
            return
        if not served:  # refused: answered exactly as if the console did not exist
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            else:
                await _respond(
                    send, 404, b"Not Found", "text/plain; charset=utf-8", [], secure=False
                )

    async def _serve(self, scope: Scope, send: Send) -> bool:
        """Answer a console request; False when it is refused."""
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        sub = path[len(self.prefix) :]
        method = scope.get("method", "GET")
        if sub == "/login" and self.token is not None:
            return await self._login(scope, send)
        if not self.allowed(scope):
            return False
        if sub == "":
            location = root_path + self.prefix + "/"
            await _respond(send, 307, b"", "text/plain", [(b"location", location.encode())])
            return True
        if method in ("GET", "HEAD"):
            handled = await self._get(sub, scope, send)
        elif method == "POST" and _header(scope, CSRF_HEADER) == "1":
            handled = await self._post(sub, send)
        else:
            handled = False
        if not handled:
            await _json(send, 404, {"error": "not found"})
        return True

    async def _get(self, sub: str, scope: Scope, send: Send) -> bool:
        console = self.console
        if sub == "/":
            await self._static(send, "index.html")
            return True
        if sub.startswith("/static/") and sub[8:] in _STATIC:
            await self._static(send, sub[8:])
            return True
        if sub == "/api/units":
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            document = _api.units(console.buffer, query, console.buffer.latest_id, console.size)
            await _json(send, 200, document)
            return True
        if sub == "/api/routes":
            await _json(send, 200, _api.routes(console.buffer.routes()))
            return True
        if sub.startswith("/api/units/"):
            unit = _unit(console, sub[len("/api/units/") :])
            if unit is None:
                return False
            captured = console.captured
            document = _api.detail(
                unit,
                editor=console.editor,
                explainable=captured.has if captured is not None else None,
            )
            document["explain_enabled"] = captured is not None
            await _json(send, 200, document)
            return True
        return False

    async def _post(self, sub: str, send: Send) -> bool:
        # /api/units/{id}/groups/{group}/explain
        parts = sub.strip("/").split("/")
        if (
            len(parts) != 6
            or parts[:2] != ["api", "units"]
            or parts[3:6:2] != ["groups", "explain"]
        ):
            return False
        captured = self.console.captured
        if captured is None:
            await _json(send, 403, {"error": "EXPLAIN is off (Settings.console_explain)"})
            return True
        unit = _unit(self.console, parts[2])
        if unit is None or not parts[4].isdigit():
            return False
        document = _api.detail(unit, editor=None)
        groups = document["groups"]
        index = int(parts[4])
        if index >= len(groups):
            return False
        group = groups[index]
        if group["operation"] != "SELECT":
            await _json(send, 400, {"error": "only SELECT statements are explained"})
            return True
        try:
            plan = await captured.explain(group["fingerprint"])
        except ExplainError as exc:
            await _json(send, 400, {"error": str(exc)})
            return True
        except Exception as exc:  # the database refused: show why, it is the developer's
            await _json(send, 400, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            return True
        await _json(
            send,
            200,
            {
                "dialect": plan.dialect,
                "columns": list(plan.columns),
                "rows": [list(row) for row in plan.rows],
                "note": "plan of the last captured execution of this statement shape",
            },
        )
        return True

    async def _login(self, scope: Scope, send: Send) -> bool:
        assert self.token is not None
        assert self.cookie is not None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = query.get("token", "").encode()
        root_path: str = scope.get("root_path", "")
        if not hmac.compare_digest(given, self.token.encode()):
            return False
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        path = quote(root_path + self.prefix)
        cookie = f"{COOKIE}={self.cookie}; Path={path}; HttpOnly; SameSite=Strict{secure}"
        headers = [(b"location", f"{path}/".encode()), (b"set-cookie", cookie.encode())]
        await _respond(send, 303, b"", "text/plain", headers)
        return True

    async def _static(self, send: Send, name: str) -> None:
        body = self._files.get(name)
        if body is None:
            body = (resources.files("querywatch.console") / "static" / name).read_bytes()
            self._files[name] = body
        await _respond(send, 200, body, _STATIC[name], [])


def _unit(console: Console, text: str) -> Any:
    if not text.isdigit() or len(text) > 18:
        return None
    return console.buffer.get(int(text))


async def _json(send: Send, status: int, document: Any) -> None:
    body = json.dumps(document, separators=(",", ":")).encode()
    await _respond(send, status, body, "application/json", [])


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[bytes, bytes]],
    *,
    secure: bool = True,
) -> None:
    all_headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *(_SECURITY_HEADERS if secure else ()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
