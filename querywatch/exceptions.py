"""The exceptions querywatch raises on purpose.

querywatch never raises into user code except at start-up (`ConfigError`) and in the explicit
`raise` mode (`NPlusOneDetected` and its siblings at the end of a unit of work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from querywatch.findings import Finding


class QueryWatchError(Exception):
    """Base class of every exception querywatch raises on purpose."""


class ConfigError(QueryWatchError, ValueError):
    """A setting has an invalid value; the message names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"querywatch setting {setting!r}: {message}")


class FindingsDetected(QueryWatchError):
    """A unit of work in `raise` mode ended with findings."""

    def __init__(self, unit: str, findings: Sequence[Finding]) -> None:
        self.unit = unit
        self.findings = tuple(findings)
        lines = [f"querywatch found {len(self.findings)} problem(s) in {unit!r}:"]
        for finding in self.findings:
            lines.append(f"  - {finding.describe()}")
        super().__init__("\n".join(lines))


class NPlusOneDetected(FindingsDetected):
    """A unit of work in `raise` mode ended with N+1 (or other) findings."""
