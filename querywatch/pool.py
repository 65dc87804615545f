"""Connection-pool auditing (lands with the pool issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from querywatch.instrumentation import Instrumentation


def attach(handle: Instrumentation, engine: Engine) -> None:
    """Attach the pool listeners of `engine` to `handle`."""
