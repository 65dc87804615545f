"""Find the line of user code that caused a statement: the first frame that is not library code.

Whether a code object is library code is decided once and cached per code object, so a capture
costs a short frame walk. Under SQLAlchemy's asyncio extension the statement runs in a greenlet
whose frames end at the greenlet's start; the walk then continues in the parent greenlet (the
asyncio task), where the user's coroutine awaits.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from contextvars import ContextVar
from types import CodeType, FrameType

_LIBRARY_PACKAGES = (
    "sqlalchemy",
    "querywatch",
    "starlette",
    "fastapi",
    "anyio",
    "asyncio",
    "pydantic",
    "pydantic_core",
    "greenlet",
    "structlog",
    "prometheus_client",
    "httpx",
    "uvicorn",
    "concurrent",
    "_pytest",
    "pluggy",
    "pytest_asyncio",
)
_MAX_CACHED_CODES = 20_000
_MAX_DEPTH = 200

_here = os.path.dirname(os.path.abspath(__file__))
_library_prefixes: tuple[str, ...] = tuple(
    sorted(
        {
            os.path.normcase(os.path.realpath(path)) + os.sep
            for key in ("stdlib", "platstdlib", "purelib", "platlib")
            if (path := sysconfig.get_paths().get(key))
        }
        | {os.path.normcase(_here) + os.sep}
    )
)

_is_library_code: dict[CodeType, bool] = {}
_display_names: dict[str, str] = {}
_root = os.getcwd()


def set_project_root(root: str | None) -> None:
    """Show call sites relative to `root` (default: the working directory at import)."""
    global _root
    _root = os.path.abspath(root) if root else os.getcwd()
    _display_names.clear()
    _memos.clear()


def _library(code: CodeType) -> bool:
    filename = code.co_filename
    if filename.startswith("<"):
        return True  # frozen modules, exec()'d and generated code (dataclass __init__ ...)
    normalized = os.path.normcase(filename)
    if "site-packages" in normalized or "dist-packages" in normalized:
        return True
    if normalized.startswith(_library_prefixes):
        # The venv's site-packages are under purelib; the project itself never is, unless it
        # lives inside the interpreter's prefix, which we then cannot tell apart.
        return True
    parts = normalized.replace("\\", "/").split("/")
    return any(part in _LIBRARY_PACKAGES for part in parts[-4:-1])


def _display(filename: str) -> str:
    name = _display_names.get(filename)
    if name is None:
        try:
            relative = os.path.relpath(filename, _root)
        except ValueError:  # another drive on Windows
            relative = filename
        name = filename if relative.startswith("..") else relative.replace(os.sep, "/")
        if len(_display_names) < _MAX_CACHED_CODES:
            _display_names[filename] = name
    return name


def _locate(frame: FrameType | None) -> tuple[FrameType | None, int, bool]:
    """The first non-library frame from `frame` outwards, its depth from `frame`, and whether it
    was found in the parent greenlet (the asyncio task awaiting SQLAlchemy's greenlet)."""
    depth = 0
    cache = _is_library_code
    in_parent = False
    while True:
        while frame is not None and depth < _MAX_DEPTH:
            code = frame.f_code
            library = cache.get(code)
            if library is None:
                library = _library(code)
                if len(cache) < _MAX_CACHED_CODES:
                    cache[code] = library
            if not library:
                return frame, depth, in_parent
            frame = frame.f_back
            depth += 1
        greenlet_module = sys.modules.get("greenlet")
        if in_parent or greenlet_module is None or depth >= _MAX_DEPTH:
            return None, 0, False
        parent = greenlet_module.getcurrent().parent
        if parent is None:
            return None, 0, False
        frame = parent.gr_frame
        depth = 0
        in_parent = True


def user_frame(frame: FrameType | None) -> FrameType | None:
    """The first non-library frame from `frame` outwards, following greenlets to their parent."""
    return _locate(frame)[0]


def format_frame(frame: FrameType) -> str:
    """`path/to/file.py:LINE in function`, the path relative to the project root."""
    return f"{_display(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


#: The call site to report when no user frame is on the stack: while FastAPI builds a response
#: model (pydantic reads ORM attributes from compiled code), the endpoint being serialized.
fallback_site: ContextVar[str | None] = ContextVar("querywatch_fallback_site", default=None)


def endpoint_site(filename: str, line: int, function: str, activity: str) -> str:
    """`path:LINE in function (activity)` for code that is not on the stack."""
    return f"{_display(filename)}:{line} in {function} ({activity})"


def capture(skip: int = 1) -> str | None:
    """The call site of the caller's caller's user code (or the fallback site), else None."""
    frame = user_frame(sys._getframe(skip + 1))
    return format_frame(frame) if frame is not None else fallback_site.get()


class _Memo:
    """Where the user frame of a statement was last found, and what it said."""

    __slots__ = ("code", "depth", "in_parent", "lasti", "text")

    def __init__(self, depth: int, in_parent: bool, code: CodeType, lasti: int, text: str) -> None:
        self.depth = depth
        self.in_parent = in_parent
        self.code = code
        self.lasti = lasti
        self.text = text


_MAX_MEMOS = 4096
#: Longer statement strings are not kept as memo keys: the count bound alone would let 4096
#: distinct long statements (inlined literals, big expanded IN lists) pin megabytes each.
_MAX_MEMO_KEY_LENGTH = 10_000
_memos: dict[object, _Memo] = {}


def _frame_at(memo: _Memo) -> FrameType | None:
    """The frame `memo.depth` levels into the parent greenlet's stack."""
    greenlet_module = sys.modules.get("greenlet")
    parent = greenlet_module.getcurrent().parent if greenlet_module is not None else None
    frame: FrameType | None = parent.gr_frame if parent is not None else None
    for _ in range(memo.depth):
        if frame is None:
            return None
        frame = frame.f_back
    return frame


def capture_for(key: object, skip: int = 1) -> str | None:
    """`capture()`, remembered per `key` (a statement string): when the frame found last time
    for this key is at the same depth, in the same code at the same instruction, it is the same
    call site, and the walk and the formatting are skipped. Otherwise, a full walk."""
    memo = _memos.get(key)
    if memo is not None:
        frame: FrameType | None
        if memo.in_parent:
            frame = _frame_at(memo)
        else:
            try:
                frame = sys._getframe(skip + 1 + memo.depth)  # walks in C
            except ValueError:  # the stack is shallower now
                frame = None
        if frame is not None and frame.f_code is memo.code and frame.f_lasti == memo.lasti:
            return memo.text
    found, depth, in_parent = _locate(sys._getframe(skip + 1))
    if found is None:
        return fallback_site.get()
    text = format_frame(found)
    if type(key) is str and len(key) > _MAX_MEMO_KEY_LENGTH:
        return text
    if len(_memos) >= _MAX_MEMOS:
        _memos.clear()
    _memos[key] = _Memo(depth, in_parent, found.f_code, found.f_lasti, text)
    return text
