"""The import paths of 0.1.0 that are internal modules now: each still answers, with a
`DeprecationWarning` that names the public import to use instead."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["alias"]


def alias(old: str, new: str) -> Callable[[str], Any]:
    """A module `__getattr__` for the old module `old` that forwards to the internal module
    `new`, warning once per name at the user's line."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        instead = (
            f"import {name} from querywatch instead"
            if name in importlib.import_module("querywatch").__all__
            else f"{name} is not public API"
        )
        warnings.warn(
            f"{old} is internal since querywatch 0.2 and will be removed in 0.3: {instead}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
