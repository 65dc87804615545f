"""Expected call sites in tests: the line after the caller's, as querywatch formats it."""

from __future__ import annotations

import os
import sys


def next_line(lines: int = 1) -> str:
    """`tests/test_x.py:N in test_y` for the line `lines` below the calling line."""
    frame = sys._getframe(1)
    path = os.path.relpath(frame.f_code.co_filename).replace(os.sep, "/")
    return f"{path}:{frame.f_lineno + lines} in {frame.f_code.co_name}"
