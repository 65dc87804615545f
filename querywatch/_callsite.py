"""Find the line of user code that caused a statement: the first frame that is not library code.

Whether a code object is library code is decided once and cached per code object, so a capture
costs a short frame walk. Under SQLAlchemy's asyncio extension the statement runs in a greenlet
whose frames end at the greenlet's start; the walk then continues in the parent greenlet (the
asyncio task), where the user's coroutine awaits.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import sysconfig
from collections.abc import Callable
from contextvars import ContextVar
from types import CodeType, FrameType, SimpleNamespace
from typing import Any, cast

__all__ = [
    "Where",
    "capture",
    "capture_for",
    "endpoint_site",
    "fallback_site",
    "forget",
    "location",
    "memo_of",
    "project_root",
    "set_project_root",
    "source_line",
    "stable_site",
    "user_frame",
    "where_for",
]

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
    _filenames.clear()
    _memos.clear()


def project_root() -> str:
    """The folder call sites are shown relative to."""
    return _root


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


def _is_library(code: CodeType) -> bool:
    """`_library(code)`, decided once per code object."""
    library = _is_library_code.get(code)
    if library is None:
        library = _library(code)
        if len(_is_library_code) < _MAX_CACHED_CODES:
            _is_library_code[code] = library
    return library


def _no_greenlet() -> Any:
    return SimpleNamespace(parent=None)


#: `greenlet.getcurrent` once a call site was found in a parent greenlet (greenlet is imported
#: by then): the memo checks of such sites use it.
_getcurrent: Callable[[], Any] = _no_greenlet


def _locate(frame: FrameType | None) -> tuple[FrameType | None, int, bool]:
    """The first non-library frame from `frame` outwards, its depth from `frame`, and whether it
    was found in the parent greenlet (the asyncio task awaiting SQLAlchemy's greenlet)."""
    depth = 0
    in_parent = False
    while True:
        while frame is not None and depth < _MAX_DEPTH:
            if not _is_library(frame.f_code):
                return frame, depth, in_parent
            frame = frame.f_back
            depth += 1
        global _getcurrent
        greenlet_module = sys.modules.get("greenlet")
        if in_parent or greenlet_module is None or depth >= _MAX_DEPTH:
            return None, 0, False
        _getcurrent = greenlet_module.getcurrent
        parent = _getcurrent().parent
        if parent is None:
            return None, 0, False
        frame = parent.gr_frame
        depth = 0
        in_parent = True


def user_frame(frame: FrameType | None) -> FrameType | None:
    """The first non-library frame from `frame` outwards, following greenlets to their parent."""
    return _locate(frame)[0]


def function_name(code: CodeType) -> str:
    """The name of the function a code object belongs to: for a generator expression, a
    comprehension or a lambda (`<genexpr>`, `<listcomp>` ...), the function that encloses it."""
    name = code.co_name
    if not name.startswith("<"):
        return name
    qualname: str = getattr(code, "co_qualname", name)  # Python 3.11+
    for part in reversed(qualname.split(".")):
        if not part.startswith("<"):
            return part
    return name


def format_frame(frame: FrameType) -> str:
    """`path/to/file.py:LINE in function`, the path relative to the project root."""
    code = frame.f_code
    filename = code.co_filename
    display = _display(filename)
    if len(_filenames) < _MAX_CACHED_CODES:
        _filenames[display] = filename
    return f"{display}:{frame.f_lineno} in {function_name(code)}"


_LINE = re.compile(r":\d+ in ")
_LOCATION = re.compile(r"^(.*?):(\d+) in ")  # the first site, when a text names several
#: display path -> the file's real path, for reading a call site's source line back
_filenames: dict[str, str] = {}


def stable_site(callsite: str | None) -> str:
    """A call site without its line number (`path in function`): what finding ids are made of,
    so that they survive edits elsewhere in the file."""
    if not callsite:
        return ""
    return _LINE.sub(" in ", callsite, count=1)


def location(callsite: str | None) -> tuple[str, int] | None:
    """(real file name, line number) of a call site this process formatted, else None."""
    match = _LOCATION.match(callsite or "")
    if match is None:
        return None
    display, line = match.groups()
    return _filenames.get(display) or os.path.join(_root, display), int(line)


def source_line(callsite: str | None) -> str:
    """The source text at a call site (stripped), or "" when it cannot be read."""
    where = location(callsite)
    if where is None:
        return ""
    return linecache.getline(*where).strip()


#: The call site to report when no user frame is on the stack: while FastAPI builds a response
#: model (pydantic reads ORM attributes from compiled code), the endpoint being serialized. A
#: site, or a function that works it out (called only when needed: most responses run no SQL).
fallback_site: ContextVar[str | Callable[[], str | None] | None] = ContextVar(
    "querywatch_fallback_site", default=None
)


def fallback() -> str | None:
    """The call site `fallback_site` gives, if any."""
    site = fallback_site.get()
    if site is None or type(site) is str:
        return site
    return site()  # type: ignore[operator]


def endpoint_site(filename: str, line: int, function: str, activity: str) -> str:
    """`path:LINE in function (activity)` for code that is not on the stack."""
    return f"{_display(filename)}:{line} in {function} ({activity})"


def capture(skip: int = 1) -> str | None:
    """The call site of the caller's caller's user code (or the fallback site), else None."""
    frame = user_frame(sys._getframe(skip + 1))
    return format_frame(frame) if frame is not None else fallback()


#: Frames looked through beyond a call site for the user code that called it.
_MAX_CALLER_DEPTH = 64
#: Code that calls user code as a framework does (an event loop running a task, a server, a
#: router, a dependency injector, a thread pool, a test runner): a function it called has no
#: caller worth naming, the next user frame out being the program's entry point
#: (`uvicorn.run(app)`, `asyncio.run(main())`, a test driving an app). By module: these
#: packages as a whole, and asyncio's and concurrent.futures' running machinery (not, say,
#: `asyncio.wait_for`, which awaits the caller's coroutine in place, nor a package of that name
#: inside another, like `sqlalchemy.ext.asyncio`).
_DISPATCHER_PACKAGES = frozenset(
    ("anyio", "starlette", "fastapi", "uvicorn", "hypercorn", "trio", "_pytest", "pluggy")
)
_DISPATCHER_MODULES = frozenset(
    ("asyncio.events", "asyncio.base_events", "asyncio.runners", "concurrent.futures.thread",
     "concurrent.futures.process")
)  # fmt: skip
_is_dispatcher_code: dict[CodeType, bool] = {}


def _dispatcher(frame: FrameType) -> bool:
    """Whether `frame` runs a framework's code that calls user code (see
    `_DISPATCHER_PACKAGES`), decided once per code object."""
    code = frame.f_code
    dispatcher = _is_dispatcher_code.get(code)
    if dispatcher is None:
        module = frame.f_globals.get("__name__")
        module = module if isinstance(module, str) else ""
        dispatcher = (
            module.partition(".")[0] in _DISPATCHER_PACKAGES or module in _DISPATCHER_MODULES
        )
        if len(_is_dispatcher_code) < _MAX_CACHED_CODES:
            _is_dispatcher_code[code] = dispatcher
    return dispatcher


def _caller_of(frame: FrameType) -> tuple[FrameType | None, int, bool]:
    """The next user frame outwards from the user frame `frame` (the code that called the
    function holding the call site), its distance from `frame`, and True; or, when a framework
    called the function (an endpoint, a task, a test), the framework's frame, its distance and
    False (a memo checks that it is still there); (None, 0, False) when there is neither."""
    caller = frame.f_back
    distance = 1
    while caller is not None and distance <= _MAX_CALLER_DEPTH:
        if not _is_library(caller.f_code):
            return caller, distance, True
        if _dispatcher(caller):
            return caller, distance, False
        caller = caller.f_back
        distance += 1
    return None, 0, False


#: A call site and the user line that called its function: `(site, caller or None)`.
Where = tuple["str | None", "str | None"]


class _Memo:
    """Where the user frame of a statement (and its caller's) was last found, and what they
    said."""

    __slots__ = ("caller_code", "caller_depth", "caller_lasti", "code", "depth", "in_parent",
                 "lasti", "where")  # fmt: skip

    def __init__(
        self,
        depth: int,
        in_parent: bool,
        found: FrameType,
        caller: FrameType | None,
        distance: int,
        named: bool,
    ) -> None:
        self.depth = depth
        self.in_parent = in_parent
        self.code = found.f_code
        self.lasti = found.f_lasti
        # The caller's frame, or the framework's that called the function: checked either way,
        # so that the same function called directly from user code is not taken for this.
        self.caller_depth = distance
        self.caller_code = caller.f_code if caller is not None else None
        self.caller_lasti = caller.f_lasti if caller is not None else -1
        self.where: Where = (
            format_frame(found),
            format_frame(caller) if caller is not None and named else None,
        )


_MAX_MEMOS = 4096
#: Longer statement strings are not kept as memo keys: the count bound alone would let 4096
#: distinct long statements (inlined literals, big expanded IN lists) pin megabytes each.
_MAX_MEMO_KEY_LENGTH = 10_000
_memos: dict[object, _Memo] = {}
#: The memo of a key, if any: for the statement hook, which inlines `where_for`'s memo check.
#: A memo's `depth` counts from the frame that called `where_for`'s caller.
memo_of = _memos.get


def forget(key: object) -> None:
    """Drop the memo of `key` (an engine's pool goes, and its memo with it)."""
    _memos.pop(key, None)


def _up(frame: Any, steps: int) -> FrameType | None:
    """The frame `steps` levels outwards from `frame`, None past the outermost. A memo check in
    the parent greenlet walks some 30 to 60 frames: eight levels per statement, the rest by
    the bits of what remains."""
    try:
        while steps >= 8:
            frame = frame.f_back.f_back.f_back.f_back.f_back.f_back.f_back.f_back
            steps -= 8
        if steps & 4:
            frame = frame.f_back.f_back.f_back.f_back
        if steps & 2:
            frame = frame.f_back.f_back
        if steps & 1:
            frame = frame.f_back
    except AttributeError:  # walked past the outermost frame (None has no f_back)
        return None
    return cast("FrameType | None", frame)


_NOWHERE: Where = (None, None)


def where_for(key: object, skip: int = 1) -> Where:
    """The call site of the caller's caller's user code and the user line that called its
    function, remembered per `key` (a statement string): when both frames found last time for
    this key are at the same depths, in the same code at the same instructions, it is the same
    place, and the walk and the formatting are skipped. Otherwise, a full walk."""
    memo = _memos.get(key)
    if memo is not None:
        if memo.in_parent:
            # The parent greenlet's stack (the asyncio task awaiting SQLAlchemy's greenlet):
            # walked from the frame where it switched, as `_locate` found the memo's frames.
            parent = _getcurrent().parent
            frame = _up(parent.gr_frame, memo.depth) if parent is not None else None
            if frame is not None and frame.f_code is memo.code and frame.f_lasti == memo.lasti:
                if memo.caller_code is None:
                    return memo.where
                frame = _up(frame, memo.caller_depth)
                if (
                    frame is not None
                    and frame.f_code is memo.caller_code
                    and frame.f_lasti == memo.caller_lasti
                ):
                    return memo.where
        else:  # checked inline: this runs for nearly every statement
            depth = skip + 1 + memo.depth
            try:
                frame = sys._getframe(depth)  # walks in C
                same = frame.f_code is memo.code and frame.f_lasti == memo.lasti
                if same and memo.caller_code is not None:
                    frame = sys._getframe(depth + memo.caller_depth)
                    same = frame.f_code is memo.caller_code and frame.f_lasti == memo.caller_lasti
            except ValueError:  # the stack is shallower now
                same = False
            if same:
                return memo.where
    found, depth, in_parent = _locate(sys._getframe(skip + 1))
    if found is None:
        site = fallback()
        return (site, None) if site is not None else _NOWHERE
    caller, distance, named = _caller_of(found)
    memo = _Memo(depth, in_parent, found, caller, distance, named)
    if type(key) is str and len(key) > _MAX_MEMO_KEY_LENGTH:
        return memo.where
    if len(_memos) >= _MAX_MEMOS:
        _memos.clear()
    _memos[key] = memo
    return memo.where


def capture_for(key: object, skip: int = 1) -> str | None:
    """`where_for(key)`'s call site alone."""
    return where_for(key, skip + 1)[0]
