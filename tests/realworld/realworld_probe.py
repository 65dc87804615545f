"""A pytest plugin loaded into the realistic suite's run (`-p realworld_probe`) by the driver.

It writes what the driver asserts on to the JSON file named by `REALWORLD_PROBE_OUT`: every
test's outcome, every unit of work querywatch ended (its kind, route, and findings), the finding
events querywatch logged, its internal errors, and the metric samples whose labels name a test.
The realistic suite itself stays as a user writes it: nothing in it knows about the probe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

import querywatch


def _finding(finding: Any) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "id": finding.id,
        "callsite": finding.callsite,
        "relationship": getattr(finding, "relationship", None),
        "message": finding.describe(),
    }


class _InternalErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Probe:
    """Records units of work, test outcomes and internal errors; writes them at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.units: list[dict[str, Any]] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.errors = _InternalErrors()
        self._remove_reporter = querywatch.add_reporter(self.record)
        logging.getLogger("querywatch").addHandler(self.errors)
        # First in the chain, so the events are seen as logged, and still printed as usual.
        self._processors = structlog.get_config()["processors"]
        structlog.configure(processors=[self.capture, *self._processors])

    def capture(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        """A structlog processor: remember querywatch's finding events, pass everything on."""
        event = event_dict.get("event")
        if isinstance(event, str) and event.startswith("querywatch.") and "kind" in event_dict:
            fields = {key: str(value) for key, value in event_dict.items()}
            self.events.append({**fields, "test": _current_test()[0]})
        return event_dict

    def record(self, report: querywatch.Report) -> None:
        test, phase = _current_test()
        self.units.append(
            {
                "name": report.name,
                "kind": report.kind,
                "http": dataclasses.asdict(report.http) if report.http else None,
                "test": test,
                "phase": phase,
                "findings": [_finding(f) for f in report.findings],
                "reported": [f.id for f in report.findings_to_report()],
            }
        )

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": "passed", "longrepr": ""})
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["longrepr"] += f"[{report.when}] {report.longreprtext}\n"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        self._remove_reporter()
        logging.getLogger("querywatch").removeHandler(self.errors)
        structlog.configure(processors=self._processors)
        data = {
            "events": self.events,
            "outcomes": self.outcomes,
            "units": self.units,
            "internal_errors": self.errors.messages,
            "test_labels": _test_labels(),
        }
        self.path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _current_test() -> tuple[str | None, str | None]:
    """The running test and its phase. PYTEST_CURRENT_TEST is process-wide, so it names the test
    in the TestClient's portal thread too: "path::test (call)"."""
    test, _, phase = os.environ.get("PYTEST_CURRENT_TEST", "").rpartition(" ")
    return test or None, phase.strip("()") or None


def _test_labels() -> list[str]:
    """Metric samples (of the default registry and the app's) with a test id as a label value."""
    from prometheus_client import REGISTRY

    registries = [REGISTRY]
    app_main = sys.modules.get("app.main")
    if app_main is not None:
        registries.append(app_main.metrics_registry)
    found: list[str] = []
    for registry in registries:
        for metric in registry.collect():
            for sample in metric.samples:
                if any("::" in value for value in sample.labels.values()):
                    found.append(f"{sample.name}{sample.labels}")
    return found


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get("REALWORLD_PROBE_OUT")
    if out:
        config.pluginmanager.register(Probe(Path(out)), "realworld-probe")
