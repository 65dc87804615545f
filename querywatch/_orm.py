"""Session-level (ORM) listeners, installed once per process (lands with the detection issue)."""

from __future__ import annotations


def ensure_installed() -> None:
    """Install the ORM listeners once; later calls do nothing."""
