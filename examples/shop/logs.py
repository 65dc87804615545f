"""structlog output for the shop: readable lines on a terminal, JSON lines otherwise.

querywatch logs through structlog (`querywatch.request`, `querywatch.n_plus_one`, ...), so the
app's own configuration decides how its events look. `SHOP_LOG_FORMAT=json|console` overrides.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(log_format: str | None = None) -> None:
    """Configure structlog once for the process: JSON lines, or colourless console lines."""
    chosen = log_format or os.environ.get("SHOP_LOG_FORMAT") or "console"
    renderer: structlog.typing.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
