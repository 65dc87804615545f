"""The `serialization` phase: lazy loads fired while FastAPI builds a response model from ORM
objects (after the endpoint returned) are tagged `phase="serialization"` and credited to the
endpoint. FastAPI builds responses in `fastapi.routing.serialize_response`, which is wrapped once
per process; FastAPI is optional, so it is imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from querywatch import _callsite, _guard
from querywatch._collection import current_unit

__all__ = ["install_serialization_hook"]

_serialize_hooked = False


#: Endpoint sites by (file, line, function, project root): formatted once per endpoint (the
#: text is relative to the project root, which `Settings.project_root` may change).
_sites: dict[tuple[Any, Any, Any, str], str] = {}
_MAX_SITES = 4096


def _endpoint_site(endpoint_ctx: Any) -> str | None:
    """`app.py:42 in list_orders (serializing its response)` from FastAPI's endpoint context
    (FastAPI >= 0.115 passes one to serialize_response), else None."""
    with _guard.guarding("fastapi"):
        if isinstance(endpoint_ctx, Mapping):
            get = endpoint_ctx.get
            file, line, function = get("file"), get("line"), get("function")
            if isinstance(file, str) and isinstance(line, int) and isinstance(function, str):
                where = (file, line, function, _callsite.project_root())
                site = _sites.get(where)
                if site is None:
                    site = _callsite.endpoint_site(file, line, function, "serializing its response")
                    if len(_sites) >= _MAX_SITES:
                        _sites.clear()
                    _sites[where] = site
                return site
    return None


def install_serialization_hook() -> None:
    """Wrap `fastapi.routing.serialize_response` so that what runs inside it (response-model
    validation from ORM attributes) is the `serialization` phase. Idempotent; does nothing
    without FastAPI or when FastAPI no longer has the function."""
    global _serialize_hooked
    if _serialize_hooked:
        return
    try:
        import fastapi.routing as routing  # deferred: FastAPI is optional
    except ImportError:
        return
    original = getattr(routing, "serialize_response", None)
    if original is None or getattr(original, "_querywatch_wrapped", False):
        _serialize_hooked = True
        return

    async def serialize_response(*args: Any, **kwargs: Any) -> Any:
        collector = current_unit.get()
        if collector is None:
            return await original(*args, **kwargs)
        try:  # once per request: guarded inline (see `querywatch._guard`)
            if _guard.injected_faults:
                _guard.maybe_fail("fastapi")
            # The endpoint's site is worked out only if something in here needs it.
            site = partial(_endpoint_site, kwargs.get("endpoint_ctx"))
            token = _callsite.fallback_site.set(site)
            previous = collector.phase
            collector.phase = "serialization"
        except Exception as exc:
            _guard.internal_error("fastapi", exc)
            return await original(*args, **kwargs)
        try:
            return await original(*args, **kwargs)
        finally:
            collector.phase = previous
            _callsite.fallback_site.reset(token)

    serialize_response._querywatch_wrapped = True  # type: ignore[attr-defined]
    serialize_response.__wrapped__ = original  # type: ignore[attr-defined]
    with _guard.guarding("fastapi"):
        routing.serialize_response = serialize_response
    _serialize_hooked = True
