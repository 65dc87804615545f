"""The exceptions querywatch raises on purpose, and the warning it issues in `warn` mode.

querywatch never raises into user code except at start-up (`ConfigError`) and in the explicit
`raise` mode (`FindingsDetected` at the end of a unit of work). In `warn` mode each finding is a
`QueryWatchWarning` issued at the finding's call site in the user's code.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from querywatch import _callsite, _guard

if TYPE_CHECKING:
    from querywatch.findings import Finding

__all__ = [
    "ConfigError",
    "FindingsDetected",
    "NPlusOneDetected",
    "QueryWatchError",
    "QueryWatchWarning",
    "warn_finding",
]


class QueryWatchError(Exception):
    """Base class of every exception querywatch raises on purpose."""


class ConfigError(QueryWatchError, ValueError):
    """A setting has an invalid value; the message names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"querywatch setting {setting!r}: {message}")


class FindingsDetected(QueryWatchError):
    """A unit of work in `raise` mode ended with findings (N+1 queries, duplicate queries, lazy
    loads after close, connection leaks ...); `findings` holds them all."""

    def __init__(self, unit: str, findings: Sequence[Finding]) -> None:
        self.unit = unit
        self.findings = tuple(findings)
        lines = [f"querywatch found {len(self.findings)} problem(s) in {unit!r}:"]
        for finding in self.findings:
            lines.append(f"  - {finding.describe()}")
        super().__init__("\n".join(lines))


#: The name `FindingsDetected` had before it was raised for every kind of finding under its own
#: name: the very same class, so `except NPlusOneDetected:` keeps catching what it always caught
#: (any finding in `raise` mode, not only N+1 queries).
NPlusOneDetected = FindingsDetected


class QueryWatchWarning(UserWarning):
    """Issued for each finding in `warn` mode, at the finding's call site in your code."""


def warn_finding(finding: Finding) -> None:
    """Issue `QueryWatchWarning(finding.describe())` at the finding's call site, in the module
    that holds it (so `-W` options and warning filters by module apply, and "once per location"
    is remembered there), or at the first frame of user code on the stack when the call site
    is unknown."""
    message = QueryWatchWarning(finding.describe())
    filename, lineno, module_globals = "", 0, None
    with _guard.guarding("collector"):
        filename, lineno, module_globals = _origin(finding.callsite, sys._getframe(1))
    if not filename:  # the line that closed the unit of work, as `warnings.warn` would say
        warnings.warn(message, stacklevel=3)
        return
    if module_globals is not None:
        module = module_globals.get("__name__")
        registry = module_globals.setdefault("__warningregistry__", {})
    else:  # a file no loaded module was imported from (a script run with exec)
        module, registry = _module_name(filename), _registry
    # Outside the guard: a filter turning the warning into an error raises it, on purpose.
    warnings.warn_explicit(
        message,
        QueryWatchWarning,
        filename,
        lineno,
        module=module,
        registry=registry,
        module_globals=module_globals,
    )


#: "Once per location" of warnings issued in files no loaded module was imported from.
_registry: dict[Any, Any] = {}
_MAX_MODULE_NAMES = 4096
#: absolute file name -> the name of the module imported from it
_module_names: dict[str, str] = {}


def _origin(callsite: str | None, caller: FrameType) -> tuple[str, int, dict[str, Any] | None]:
    """(file, line, module globals) to warn at: the call site, else the first frame of user
    code from `caller` outwards; ("", 0, None) when there is no user code on the stack."""
    where = _callsite.location(callsite)
    if where is not None:
        filename, lineno = where
        return filename, lineno, _module_globals(filename)
    frame = _callsite.user_frame(caller)
    if frame is None:
        return "", 0, None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def _module_globals(filename: str) -> dict[str, Any] | None:
    """The globals of the loaded module imported from `filename`, else None."""
    key = os.path.normcase(os.path.abspath(filename))
    name = _module_names.get(key)
    module = sys.modules.get(name) if name is not None else None
    if module is None:
        # Once per file: warn mode is for development, and the scan is a few thousand lookups.
        for candidate_name, candidate in list(sys.modules.items()):
            path = getattr(candidate, "__file__", None)
            if isinstance(path, str) and os.path.normcase(os.path.abspath(path)) == key:
                if len(_module_names) >= _MAX_MODULE_NAMES:
                    _module_names.clear()
                _module_names[key] = candidate_name
                module = candidate
                break
    return vars(module) if module is not None else None


def _module_name(filename: str) -> str:
    """The module name for a file no module was imported from: its name without `.py`."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    return stem or "<unknown>"
