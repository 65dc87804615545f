"""The OpenTelemetry reporter: findings on the active span, pool metrics in the semantic
conventions, trace ids on querywatch's log events.

`enable()` (`querywatch.fastapi.setup(app, engine, otel=True)` calls it) registers, until
`disable()`:

- a reporter: when a unit of work ends inside a sampled span (the request's server span, or your
  own span around a `watch()` block), each finding becomes a span event (`querywatch.n_plus_one`,
  ...) with the fields of its log event under `querywatch.` (bound values only with
  `Settings.log_parameters`), and the span gets summary attributes (`querywatch.db.statements`,
  `querywatch.n_plus_one`, ...). Tracing middleware ends the server span once the response is
  sent, before the request's unit closes: `hold_current_span()` (which `setup(..., otel=True)`
  applies per request) defers that end until the unit has reported. A span that has ended all the
  same cannot take them: they go on a `querywatch <unit>` child span of it instead.
  `Settings.otel_finding_spans` adds a child span per finding. No span, or an unsampled one:
  nothing is recorded on traces;
- instruments read from `querywatch.pool`'s `PoolStats` (the figures the Prometheus metrics
  show): the `db.client.connection.*` instruments of the database client semantic conventions,
  with `db.client.connection.pool.name` (the engine's `pool` label). Counts, limits and pending
  requests are observable instruments read at collection time. OpenTelemetry has no observable
  histogram, so `wait_time`, `use_time` and `create_time` are histograms (with querywatch's
  bucket bounds as advice) fed from `querywatch.pool.add_observer`: after each checkout and
  checkin, the observations `PoolStats` added since the last call (count and sum equal
  `PoolStats`' from `enable()` on; when two arrive at once, each is recorded as their mean).
  Per unit of work: `querywatch.request.db.statements` / `querywatch.request.db.duration`
  histograms and the `querywatch.findings` counter;
- a source of `trace_id` and `span_id` (W3C hex) for querywatch's structlog events, while a span
  is active.

Only `opentelemetry-api` is needed (`pip install 'querywatch[otel]'`): with no SDK configured every
span is invalid and every instrument a no-op, and the reporter stops at its first check.
OpenTelemetry cannot remove an instrument once created: after `disable()` the callbacks report
nothing and hold no engine, and a later `enable()` with the same meter provider reuses them.
Everything runs inside the guard as component `otel`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from typing import Any

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import Span, SpanKind, TracerProvider
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
    raise ImportError(
        "querywatch.otel needs the OpenTelemetry API: pip install 'querywatch[otel]'"
    ) from exc

import querywatch
from querywatch import _guard, _reporting, pool
from querywatch._metrics import REQUEST_SECONDS_BUCKETS, REQUEST_STATEMENT_BUCKETS
from querywatch.findings import (
    ConnectionLeakFinding,
    Finding,
)

__all__ = ["HeldSpan", "disable", "enable", "hold_current_span", "is_enabled", "trace_fields"]

#: The instrumentation scope of querywatch's tracer and meter.
SCOPE = "querywatch"
#: Attribute names of the database client semantic conventions.
POOL_NAME = "db.client.connection.pool.name"
POOL_STATE = "db.client.connection.state"
_lock = threading.Lock()
_bridge: _Bridge | None = None
#: Instruments per meter provider (None: the global one), created once: OpenTelemetry has no
#: way to remove an instrument, so enabling again must not create a second set.
_instruments: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_global_instruments: _Instruments | None = None
#: The span `hold_current_span()` holds open in this context.
_held: ContextVar[HeldSpan | None] = ContextVar("querywatch_otel_held_span", default=None)


def enable(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    traces: bool = True,
    metrics: bool = True,
    logs: bool = True,
) -> None:
    """Report to OpenTelemetry from now on: findings and counts on the active span (`traces`),
    pool and unit-of-work instruments (`metrics`), `trace_id`/`span_id` on querywatch's log
    events (`logs`). The providers default to the global ones (resolved when used, so the SDK
    may be configured later). Calling it again replaces the previous configuration."""
    global _bridge
    with _lock:
        if _bridge is not None:
            _bridge.close()
            _bridge = None
        _bridge = _Bridge(
            tracer_provider, meter_provider, traces=traces, metrics=metrics, logs=logs
        )


def disable() -> None:
    """Stop reporting to OpenTelemetry: unregister the reporter, the pool observer and the log
    fields; the instruments' callbacks report nothing from now on."""
    global _bridge
    with _lock:
        if _bridge is not None:
            _bridge.close()
            _bridge = None


def is_enabled() -> bool:
    """True between `enable()` and `disable()`."""
    return _bridge is not None


def trace_fields(report: querywatch.Report | None = None) -> dict[str, str]:
    """`{"trace_id": ..., "span_id": ...}` (W3C hex) of the active span, or `{}` without one:
    the fields `enable()` adds to querywatch's log events."""
    with _guard.guarding("otel"):
        _guard.maybe_fail("otel")
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return {}
        return {
            "trace_id": trace.format_trace_id(context.trace_id),
            "span_id": trace.format_span_id(context.span_id),
        }
    return {}


class HeldSpan:
    """A recording span whose `end()` is deferred until `release()`, keeping the end time it
    was given: tracing middleware ends the server span as soon as the response is sent, before
    the request's unit of work has ended and can report on it."""

    __slots__ = ("end_time", "released", "span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        #: The end time the span's owner asked for (None: not ended yet).
        self.end_time: int | None = None
        self.released = False
        self.token: Token[HeldSpan | None] | None = None
        # An attribute of the instance shadows the class's method, for this span only.
        span.end = self._end  # type: ignore[method-assign]

    def _end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time if end_time is not None else time.time_ns()

    def release(self) -> None:
        """Give the span its own `end()` back, and end it if its owner already did. Call it in
        the context `hold_current_span()` was called in."""
        if self.released:
            return
        self.released = True
        try:
            del self.span.end
        finally:
            token, self.token = self.token, None
            if token is not None:
                with contextlib.suppress(ValueError):  # released from another context
                    _held.reset(token)
            if self.end_time is not None:
                self.span.end(end_time=self.end_time)


def hold_current_span() -> HeldSpan | None:
    """Hold the active span open (see `HeldSpan`) while a unit of work runs in this context;
    release it once the unit has ended (`querywatch.fastapi.setup(..., otel=True)` adds an ASGI
    middleware outside querywatch's that does this for each request). None when there is
    nothing to hold: the bridge is not enabled with traces, no recording span, one held
    already, or a span class that cannot be held."""
    bridge = _bridge
    if bridge is None or not bridge.traces:
        return None
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    held = _held.get()
    if held is not None and held.span is span and not held.released:
        return None
    try:
        hold = HeldSpan(span)
    except (AttributeError, TypeError):  # a span class with __slots__: not held
        return None
    hold.token = _held.set(hold)
    return hold


class _Bridge:
    """What one `enable()` registered; `close()` undoes it."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        *,
        traces: bool,
        metrics: bool,
        logs: bool,
    ) -> None:
        self.tracer = trace.get_tracer(SCOPE, querywatch.__version__, tracer_provider)
        self.traces = traces
        self.instruments = _instruments_for(meter_provider) if metrics else None
        self._removers: list[Callable[[], None]] = []
        if self.instruments is not None:
            self.instruments.activate()
            self._removers.append(self.instruments.deactivate)
            self._removers.append(pool.add_observer(self.instruments.observe_pool))
            self._removers.append(_guard.subscribe(self.instruments.count_internal_error))
        if logs:
            self._removers.append(_reporting.add_fields(trace_fields))
        self._removers.append(querywatch.add_reporter(self.report))

    def close(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()

    def report(self, report: querywatch.Report) -> None:
        """The reporter: decorate the active span, record the unit's instruments."""
        with _guard.guarding("otel"):
            _guard.maybe_fail("otel")
            settings = report.settings
            if not settings.enabled:
                return
            if self.traces:
                self._decorate(report, settings)
            if self.instruments is not None:
                self.instruments.record(report)

    def _decorate(self, report: querywatch.Report, settings: querywatch.Settings) -> None:
        span = trace.get_current_span()
        context = span.get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return  # no SDK, no span, or a trace nobody keeps: nothing to do
        target: Span = span
        own = not span.is_recording()
        if own:
            # Ended already: its attributes and events are frozen, a child of it is not.
            started = time.time_ns() - int(report.duration_seconds * 1e9)
            target = self.tracer.start_span(
                f"querywatch {report.name}",
                context=trace.set_span_in_context(span),
                kind=SpanKind.INTERNAL,
                start_time=started,
            )
        now = time.time_ns()
        held = _held.get()
        if held is not None and held.span is span and held.end_time is not None:
            now = held.end_time  # events at the span's end, not after it
        try:
            target.set_attributes(summary_attributes(report))
            max_sql = settings.max_sql_length
            finding_spans = settings.otel_finding_spans
            for finding in report.findings_to_report():
                attributes = finding_attributes(finding, max_sql)
                target.add_event(finding.event, attributes, timestamp=now)
                if finding_spans:
                    child = self.tracer.start_span(
                        finding.event,
                        context=trace.set_span_in_context(target),
                        kind=SpanKind.INTERNAL,
                        attributes=attributes,
                        start_time=now,
                    )
                    child.end(end_time=now)
            usage = report.pool
            if usage.timeouts:
                target.add_event(
                    "querywatch.pool_timeout",
                    {
                        "querywatch.kind": "pool_timeout",
                        "querywatch.timeouts": usage.timeouts,
                        "querywatch.pool_wait_ms": round(usage.wait_seconds * 1000, 3),
                        "querywatch.pool_checkouts": usage.checkouts,
                    },
                    timestamp=now,
                )
        finally:
            if own:
                target.end()


def summary_attributes(report: querywatch.Report) -> dict[str, Any]:
    """The span attributes of a finished unit of work: statements, database time, findings
    (`querywatch.findings`, and per kind those found: `querywatch.n_plus_one`, ..., units nested
    in it included), pool checkouts and wait (timeouts and leaks when there were any), and the
    unit's name and kind when it is not an HTTP request (whose span names its route already).
    Absent counts are zero: an attribute per kind on every span would cost more than it says."""
    findings = report.findings
    usage = report.pool
    attributes: dict[str, Any] = {
        "querywatch.db.statements": report.statements,
        "querywatch.db.duration_ms": round(report.db_seconds * 1000, 3),
        "querywatch.findings": len(findings),
        "querywatch.pool.checkouts": usage.checkouts,
        "querywatch.pool.wait_ms": round(usage.wait_seconds * 1000, 3),
    }
    for finding in findings:
        key = f"querywatch.{finding.kind}"
        attributes[key] = attributes.get(key, 0) + 1
    if usage.timeouts:
        attributes["querywatch.pool.timeouts"] = usage.timeouts
    if usage.leaked:
        attributes["querywatch.pool.leaked"] = usage.leaked
    if report.kind != "request":
        attributes["querywatch.unit.name"] = report.name
        attributes["querywatch.unit.kind"] = report.kind
    return attributes


def finding_attributes(finding: Finding, max_sql_length: int) -> dict[str, Any]:
    """The fields of a finding's log event as span attributes: under `querywatch.`, absent
    values left out (OpenTelemetry has no null), lists as lists of strings."""
    attributes: dict[str, Any] = {}
    for key, value in finding.as_log_fields(max_sql_length=max_sql_length).items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = [str(item) for item in value]
        elif not isinstance(value, (str, bool, int, float)):
            value = str(value)
        attributes[f"querywatch.{key}"] = value
    return attributes


def _instruments_for(meter_provider: MeterProvider | None) -> _Instruments:
    global _global_instruments
    if meter_provider is None:
        if _global_instruments is None:
            _global_instruments = _Instruments(
                otel_metrics.get_meter(SCOPE, querywatch.__version__)
            )
        return _global_instruments
    try:
        found = _instruments.get(meter_provider)
    except TypeError:  # a provider that cannot be weakly referenced: not cached
        return _Instruments(meter_provider.get_meter(SCOPE, querywatch.__version__))
    if found is None:
        found = _Instruments(meter_provider.get_meter(SCOPE, querywatch.__version__))
        _instruments[meter_provider] = found
    return found


#: What each pool histogram is: (PoolStats attribute, instrument name, description).
_POOL_HISTOGRAMS = (
    ("wait", "db.client.connection.wait_time",
     "The time it took to obtain an open connection from the pool."),
    ("use", "db.client.connection.use_time",
     "The time between borrowing a connection and returning it to the pool."),
    ("create", "db.client.connection.create_time",
     "The time it took to create a new connection."),
)  # fmt: skip


class _Instruments:
    """querywatch's instruments in one meter, created once; they record while active."""

    def __init__(self, meter: Meter) -> None:
        self.active = False
        self._lock = threading.Lock()
        #: PoolStats -> [count, sum] per histogram of `_POOL_HISTOGRAMS`, as last recorded
        self._seen: weakref.WeakKeyDictionary[pool.PoolStats, list[float]] = (
            weakref.WeakKeyDictionary()
        )
        self.statements = meter.create_histogram(
            "querywatch.request.db.statements",
            unit="{statement}",
            description="SQL statements executed per HTTP request.",
            explicit_bucket_boundaries_advisory=REQUEST_STATEMENT_BUCKETS,
        )
        self.db_duration = meter.create_histogram(
            "querywatch.request.db.duration",
            unit="s",
            description="Time spent executing SQL statements per HTTP request.",
            explicit_bucket_boundaries_advisory=REQUEST_SECONDS_BUCKETS,
        )
        self.findings = meter.create_counter(
            "querywatch.findings",
            unit="{finding}",
            description="Findings reported by units of work, by kind.",
        )
        self.leaked = meter.create_counter(
            "querywatch.db.client.connection.leaked",
            unit="{connection}",
            description="Connections still checked out when their unit of work ended.",
        )
        self.internal_errors = meter.create_counter(
            "querywatch.internal_errors",
            unit="{error}",
            description="Errors inside querywatch itself (swallowed; the application is "
            "unaffected).",
        )
        bounds = {"wait": pool.WAIT_BUCKETS, "use": pool.USE_BUCKETS, "create": pool.CREATE_BUCKETS}
        self.pool_histograms = tuple(
            (
                attribute,
                meter.create_histogram(
                    name,
                    unit="s",
                    description=description,
                    explicit_bucket_boundaries_advisory=bounds[attribute],
                ),
            )
            for attribute, name, description in _POOL_HISTOGRAMS
        )
        up_down = meter.create_observable_up_down_counter
        counter = meter.create_observable_counter
        up_down(
            "db.client.connection.count",
            callbacks=[self._guarded(self._count)],
            unit="{connection}",
            description="The number of connections that are currently in state described by "
            "the `state` attribute.",
        )
        up_down(
            "db.client.connection.max",
            callbacks=[self._guarded(self._max)],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        up_down(
            "db.client.connection.idle.max",
            callbacks=[self._guarded(self._idle_max)],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        up_down(
            "db.client.connection.pending_requests",
            callbacks=[self._guarded(self._pending)],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        counter(
            "db.client.connection.timeouts",
            callbacks=[self._guarded(self._timeouts)],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        up_down(
            "querywatch.db.client.connection.overflow",
            callbacks=[self._guarded(self._overflow)],
            unit="{connection}",
            description="Connections open beyond pool_size.",
        )
        counter(
            "querywatch.db.client.connection.checkouts",
            callbacks=[self._guarded(self._checkouts)],
            unit="{checkout}",
            description="Connections checked out.",
        )
        counter(
            "querywatch.db.client.connection.opened",
            callbacks=[self._guarded(self._opened)],
            unit="{connection}",
            description="DBAPI connections opened.",
        )
        counter(
            "querywatch.db.client.connection.closed",
            callbacks=[self._guarded(self._closed)],
            unit="{connection}",
            description="DBAPI connections closed.",
        )
        counter(
            "querywatch.db.client.connection.invalidations",
            callbacks=[self._guarded(self._invalidations)],
            unit="{connection}",
            description="Connections invalidated, by kind (hard or soft).",
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def activate(self) -> None:
        """Record from now on; pool histograms start from the pools' figures as they are now."""
        with self._lock:
            for stats in pool.stats_for_all():
                self._seen[stats] = _histogram_figures(stats)
            self.active = True

    def deactivate(self) -> None:
        with self._lock:
            self.active = False
            self._seen.clear()

    # -- per unit of work ---------------------------------------------------------------------

    def record(self, report: querywatch.Report) -> None:
        http = report.http
        base: dict[str, Any] = {"querywatch.unit.kind": report.kind}
        if http is not None:
            route = http.route
            request = {"http.route": route, "http.request.method": http.method}
            self.statements.record(report.statements, request)
            self.db_duration.record(report.db_seconds, request)
            base["http.route"] = route
        for finding in report.findings_to_report():
            self.findings.add(1, {**base, "querywatch.finding.kind": finding.kind})
            if isinstance(finding, ConnectionLeakFinding):
                self.leaked.add(finding.connections, {**base, POOL_NAME: finding.pool})

    def count_internal_error(self, component: str) -> None:
        if self.active:
            self.internal_errors.add(1, {"querywatch.component": component})

    # -- pool histograms (pushed: OpenTelemetry has no observable histogram) ------------------

    def observe_pool(self, stats: pool.PoolStats) -> None:
        """The pool observer: record what `stats`' histograms gained since the last call."""
        # Runs after every checkout and checkin: an inline guard, like `querywatch.pool`'s.
        try:
            _guard.maybe_fail("otel")
            if not self.active:
                return
            gained: list[tuple[Any, int, float]] = []
            with self._lock:
                seen = self._seen.get(stats)
                if seen is None:  # instrumented after enable(): every observation is new
                    seen = self._seen[stats] = [0.0] * (2 * len(self.pool_histograms))
                for i, (attribute, instrument) in enumerate(self.pool_histograms):
                    histogram = getattr(stats, attribute)
                    count = histogram.count  # read first: `observe` adds to the sum before it
                    n = int(count - seen[2 * i])
                    if n > 0:
                        total = histogram.sum
                        gained.append((instrument, n, max(0.0, (total - seen[2 * i + 1]) / n)))
                        seen[2 * i], seen[2 * i + 1] = count, total
            if gained:
                attributes = {POOL_NAME: stats.name}
                for instrument, n, value in gained:
                    for _ in range(n):
                        instrument.record(value, attributes)
        except Exception as exc:
            _guard.internal_error("otel", exc)

    # -- observable instruments (read at collection time) -------------------------------------

    def _guarded(
        self, read: Callable[[list[pool.PoolStats]], Iterable[tuple[float, dict[str, Any]]]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            with _guard.guarding("otel"):
                _guard.maybe_fail("otel")
                if not self.active:
                    return []
                # Engines sharing a pool name add up (as in the Prometheus metrics).
                totals: dict[tuple[tuple[str, Any], ...], float] = {}
                for value, attributes in read(pool.stats_for_all()):
                    key = tuple(attributes.items())
                    totals[key] = totals.get(key, 0) + value
                return [Observation(value, dict(key)) for key, value in totals.items()]
            return []

        return callback

    @staticmethod
    def _count(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            state = stats.state()
            for name, value in (("used", state.used), ("idle", state.idle)):
                if value is not None:
                    yield value, {POOL_NAME: stats.name, POOL_STATE: name}

    @staticmethod
    def _max(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            limit = stats.state().max
            if limit is not None:
                yield limit, {POOL_NAME: stats.name}

    @staticmethod
    def _idle_max(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            limit = stats.idle_max
            if limit is not None:
                yield limit, {POOL_NAME: stats.name}

    @staticmethod
    def _pending(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            yield stats.pending, {POOL_NAME: stats.name}

    @staticmethod
    def _overflow(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            overflow = stats.state().overflow
            if overflow is not None:
                yield overflow, {POOL_NAME: stats.name}

    @staticmethod
    def _timeouts(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            yield stats.checkout_timeouts_total, {POOL_NAME: stats.name}

    @staticmethod
    def _checkouts(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            yield stats.checkouts_total, {POOL_NAME: stats.name}

    @staticmethod
    def _opened(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            yield stats.connections_opened_total, {POOL_NAME: stats.name}

    @staticmethod
    def _closed(all_stats: list[pool.PoolStats]) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            yield stats.connections_closed_total, {POOL_NAME: stats.name}

    @staticmethod
    def _invalidations(
        all_stats: list[pool.PoolStats],
    ) -> Iterable[tuple[float, dict[str, Any]]]:
        for stats in all_stats:
            for kind, n in dict(stats.invalidations_total).items():
                yield n, {POOL_NAME: stats.name, "querywatch.invalidation.kind": kind}


def _histogram_figures(stats: pool.PoolStats) -> list[float]:
    figures: list[float] = []
    for attribute, _name, _description in _POOL_HISTOGRAMS:
        histogram = getattr(stats, attribute)
        figures += [histogram.count, histogram.sum]
    return figures
