"""Every knob of querywatch, in one frozen dataclass.

Environment variables are read in exactly one place, `Settings.from_env()`; each field `name`
maps to `QUERYWATCH_NAME`. An invalid value raises `ConfigError` naming the setting, at start-up.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from querywatch.exceptions import ConfigError

__all__ = ["DEFAULT_SETTINGS", "LogRequests", "Mode", "Settings"]

Mode = Literal["log", "warn", "raise"]
LogRequests = Literal["all", "sampled", "findings", "none"]

_MODES: tuple[str, ...] = get_args(Mode)
_LOG_REQUESTS: tuple[str, ...] = get_args(LogRequests)
_ENV_PREFIX = "QUERYWATCH_"
_CHOICES = {"Mode": _MODES, "LogRequests": _LOG_REQUESTS}
_CONSOLE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")
#: `Settings.console_editor` shorthands: the URL pattern of a call site in each editor.
_EDITORS = {
    "vscode": "vscode://file/{path}:{line}",
    "pycharm": "pycharm://open?file={path}&line={line}",
}
_EDITOR_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_UNSAFE_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob"})


def editor_pattern(editor: str | None) -> str | None:
    """The URL pattern of `Settings.console_editor` (shorthands expanded), or None."""
    return None if editor is None else _EDITORS.get(editor, editor)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Configuration of querywatch. Build it directly, or with `Settings.from_env()`."""

    enabled: bool = field(
        default=True, metadata=_doc("Master switch: when false, units of work record nothing.")
    )
    mode: Mode = field(
        default="log",
        metadata=_doc(
            "What a unit of work does with findings: `log` reports them, `warn` also calls "
            "`warnings.warn`, `raise` raises `NPlusOneDetected` when the unit ends."
        ),
    )
    n_plus_one_threshold: int = field(
        default=5,
        metadata=_doc(
            "Lazy loads of one relationship (distinct parents), or executions of one statement "
            "shape from one call site, that make an N+1 finding."
        ),
    )
    duplicate_threshold: int = field(
        default=2,
        metadata=_doc(
            "Executions of the same statement with identical parameters that make a "
            "duplicate-query finding."
        ),
    )
    max_queries: int = field(
        default=200,
        metadata=_doc(
            "Statements kept per unit of work in `report.queries`; counts stay exact beyond it."
        ),
    )
    max_shapes: int = field(
        default=1000,
        metadata=_doc(
            "Distinct statement shapes tracked per unit of work for detection (bounds memory)."
        ),
    )
    fingerprint_cache_size: int = field(
        default=2048, metadata=_doc("Statement strings whose fingerprint is cached per process.")
    )
    max_sql_length: int = field(
        default=2000,
        metadata=_doc("Longest statement shape written to a log event; longer ones are cut."),
    )
    log_requests: LogRequests = field(
        default="findings",
        metadata=_doc(
            "Which HTTP requests log a `querywatch.request` event: `all`, `sampled` (see "
            "`log_sample_rate`), `findings` (only requests with findings) or `none`."
        ),
    )
    log_sample_rate: float = field(
        default=0.01,
        metadata=_doc("Share of clean requests logged when `log_requests` is `sampled`."),
    )
    log_finding_interval: float = field(
        default=60.0,
        metadata=_doc(
            "Seconds before a finding logged for a route is logged again for that route: the "
            "requests in between count it (metrics, the `querywatch.request` counts of any "
            "request that is logged) but do not log it, and its next event says how many "
            "did not (`repeats`). Jobs are limited the same way per job name; tests log "
            "every finding. 0: log every one."
        ),
    )
    log_parameters: bool = field(
        default=False,
        metadata=_doc(
            "Opt in to bound parameter values in findings and logs: N+1, duplicate-query and "
            "bulk-write findings carry up to 3 examples (`parameters`, each cut to 200 "
            "characters). Off: values never leave the process."
        ),
    )
    server_timing: bool = field(
        default=False,
        metadata=_doc('Add `Server-Timing: db;dur=12.3;desc="7 statements"` to responses.'),
    )
    allowlist: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Findings to ignore: a relationship (`Author.books`), a fingerprint, a call-site "
            "glob (`app/legacy/*`) or a finding id. Comma-separated in the environment."
        ),
    )
    report_stale_allowlist: bool = field(
        default=False,
        metadata=_doc("Report allowlist entries that matched nothing in a unit of work."),
    )
    project_root: str | None = field(
        default=None,
        metadata=_doc("Directory call sites are shown relative to (default: working directory)."),
    )
    request_id_header: str = field(
        default="X-Request-ID",
        metadata=_doc("Header the request id is read from and echoed on."),
    )
    otel: bool = field(
        default=False,
        metadata=_doc(
            "Turn on the OpenTelemetry bridge in `querywatch.fastapi.setup()` (needs "
            "`pip install 'querywatch[otel]'`; elsewhere call `querywatch.otel.enable()`): "
            "findings as events and counts as attributes of the active span, pool metrics as "
            "`db.client.connection.*` instruments, `trace_id`/`span_id` on log events."
        ),
    )
    otel_finding_spans: bool = field(
        default=False,
        metadata=_doc(
            "With the OpenTelemetry bridge, also a child span per finding (for backends that "
            "index spans but not span events)."
        ),
    )

    console: bool = field(
        default=False,
        metadata=_doc(
            "Serve the live console (`querywatch.fastapi.setup()`, or `querywatch.console`): "
            "the last `console_units` units of work, their statements and findings, per-route "
            "figures. Off: nothing is recorded for it. Loopback clients only, unless "
            "`console_token` is set."
        ),
    )
    console_path: str = field(
        default="/_querywatch",
        metadata=_doc("Path prefix the console is served under."),
    )
    console_units: int = field(
        default=200,
        metadata=_doc("Units of work the console keeps (a ring buffer: the oldest go first)."),
    )
    console_token: str | None = field(
        default=None,
        repr=False,  # a secret: never in a log line or a traceback
        metadata=_doc(
            "Token the console requires from every client (`Authorization: Bearer ...`, or "
            "the cookie set by `<console_path>/login?token=...`); at least 16 characters. "
            "Unset: only loopback clients are served."
        ),
    )
    console_explain: bool = field(
        default=False,
        metadata=_doc(
            "Development only: run `EXPLAIN` for a captured SELECT from the console (read-only "
            "transaction, rolled back). Needs `log_parameters` (plans show the values)."
        ),
    )
    console_editor: str | None = field(
        default=None,
        metadata=_doc(
            "Call sites in the console link to your editor: `vscode`, `pycharm`, or a URL "
            "pattern with `{path}` and `{line}` (`idea://open?file={path}&line={line}`). "
            "Unset: plain text."
        ),
    )

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError("mode", f"must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.log_requests not in _LOG_REQUESTS:
            raise ConfigError(
                "log_requests",
                f"must be one of {', '.join(_LOG_REQUESTS)}, got {self.log_requests!r}",
            )
        for name, minimum in (
            ("n_plus_one_threshold", 2),
            ("duplicate_threshold", 2),
            ("max_queries", 0),
            ("max_shapes", 1),
            ("fingerprint_cache_size", 0),
            ("max_sql_length", 80),
            ("console_units", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(name, f"must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(name, f"must be at least {minimum}, got {value}")
        rate = self.log_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ConfigError("log_sample_rate", f"must be a number from 0 to 1, got {rate!r}")
        interval = self.log_finding_interval
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not 0.0 <= interval < float("inf")
        ):
            raise ConfigError(
                "log_finding_interval", f"must be a number of seconds, 0 or more, got {interval!r}"
            )
        for name in (
            "enabled",
            "log_parameters",
            "server_timing",
            "report_stale_allowlist",
            "otel",
            "otel_finding_spans",
            "console",
            "console_explain",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.allowlist, str) or not all(
            isinstance(entry, str) and entry for entry in self.allowlist
        ):
            raise ConfigError("allowlist", "must be a sequence of non-empty strings")
        object.__setattr__(self, "allowlist", tuple(self.allowlist))
        header = self.request_id_header
        if not isinstance(header, str) or not header or not header.isascii() or " " in header:
            raise ConfigError("request_id_header", f"must be an HTTP header name, got {header!r}")
        self._check_console()

    def _check_console(self) -> None:
        path = self.console_path
        if not isinstance(path, str) or not _CONSOLE_PATH.fullmatch(path):
            raise ConfigError(
                "console_path",
                f"must start with '/' and hold only letters, digits and -._~/ (no trailing "
                f"'/'), got {path!r}",
            )
        token = self.console_token
        if token is not None and (
            not isinstance(token, str) or len(token) < 16 or not token.isascii()
        ):
            raise ConfigError(
                "console_token", "must be a string of at least 16 ASCII characters (or unset)"
            )
        if self.console_explain and not self.log_parameters:
            raise ConfigError(
                "console_explain",
                "needs log_parameters=True: EXPLAIN runs a statement with its bound values, "
                "and plans show them",
            )
        editor = self.console_editor
        if editor is not None:
            pattern = _EDITORS.get(editor, editor) if isinstance(editor, str) else None
            if (
                pattern is None
                or "{path}" not in pattern
                or not _EDITOR_URL.match(pattern)
                or pattern.split(":", 1)[0].lower() in _UNSAFE_SCHEMES
            ):
                raise ConfigError(
                    "console_editor",
                    f"must be {', '.join(_EDITORS)} or a URL pattern with {{path}} (and "
                    f"{{line}}), e.g. 'vscode://file/{{path}}:{{line}}', got {editor!r}",
                )

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (validated like the original)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `QUERYWATCH_*` variables (`environ` defaults to `os.environ`)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse(f.name, f.default, raw)
        values.update(overrides)
        return cls(**values)


def _parse(name: str, default: Any, raw: str) -> Any:
    text = raw.strip()
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"{_ENV_PREFIX}{name.upper()} must be true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(
                name, f"{_ENV_PREFIX}{name.upper()} must be an integer, got {raw!r}"
            ) from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(
                name, f"{_ENV_PREFIX}{name.upper()} must be a number, got {raw!r}"
            ) from None
    if isinstance(default, tuple):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if default is None:
        return text or None
    return text


def options_table() -> str:
    """The README's options table (name, type, default, environment variable, description)."""
    rows = [
        "| Setting | Type | Default | Environment variable | Description |",
        "|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(Settings):
        choices = _CHOICES.get(str(f.type))
        kind = " or ".join(repr(c) for c in choices) if choices else str(f.type).replace("|", "or")
        default = "()" if f.default == () else repr(f.default).replace("|", "\\|")
        env = _ENV_PREFIX + f.name.upper()
        rows.append(f"| `{f.name}` | `{kind}` | `{default}` | `{env}` | {f.metadata['doc']} |")
    return "\n".join(rows)


DEFAULT_SETTINGS = Settings()
