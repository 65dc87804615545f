"""Detectors: turn what a unit of work recorded into findings, when the unit ends.

(The N+1, duplicate and bulk-write detectors land with the detection issue; until then this
passes on what the listeners recorded as findings already.)
"""

from __future__ import annotations

from querywatch.collection import Collector
from querywatch.findings import Finding


def detect(collector: Collector) -> list[Finding]:
    """Every finding of a finished unit of work."""
    findings: list[Finding] = []
    findings.extend(collector.after_close)
    findings.extend(collector.pool.leaked)
    return findings
