"""The Prometheus reporter: every `querywatch_*` metric, built once per registry.

`install(registry)` builds the metrics into `registry` the first time and returns the same
object on every later call, so apps created many times in one process, and Starlette rebuilding
its middleware stack, never hit "Duplicated timeseries". The registry itself remembers its
metrics (an attribute we set on it), so a fresh copy of this module (a test fixture deleted it
from `sys.modules`, then it was imported again) finds and reuses them too. Finished units of
work are recorded by one process-wide reporter: a request into the metrics of the middleware
that served it (none when that app was set up without metrics), any other unit into every live
`QueryWatchMetrics`. Per-request work is a few cached child lookups and, in one process, direct
writes of the histograms' values under one lock per unit; statement durations arrive
pre-bucketed from the collector (one increment per non-empty bucket, not one observation per
statement).

Pool metrics: in a single process a custom collector reads each pool's state and counters at
scrape time (no work per checkout). Under `PROMETHEUS_MULTIPROC_DIR` the scrape runs in one
worker and reads every worker's files, so pool figures are written into real metrics as they
change instead (gauges in `livesum` mode: each worker has its own pool).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.values import MutexValue

from querywatch import _guard, pool
from querywatch._collection import STATEMENT_BUCKETS, Report, add_reporter
from querywatch.findings import DuplicateQueryFinding, LazyLoadAfterCloseFinding, NPlusOneFinding

__all__ = [
    "REQUEST_SECONDS_BUCKETS",
    "REQUEST_STATEMENT_BUCKETS",
    "QueryWatchMetrics",
    "install",
    "multiprocess_mode",
]

#: Buckets of `querywatch_request_db_statements` (statements per request).
REQUEST_STATEMENT_BUCKETS: tuple[float, ...] = (
    0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377,
)  # fmt: skip
#: Buckets of `querywatch_request_db_seconds` (database time per request).
REQUEST_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_lock = threading.Lock()
# registry -> its metrics. The metrics object never references the registry, so a registry
# dropped by a test takes its metrics with it (the registry keeps the metrics alive, not us).
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, QueryWatchMetrics] = (
    weakref.WeakKeyDictionary()
)
_live: weakref.WeakSet[QueryWatchMetrics] = weakref.WeakSet()
_hooked = False
#: This copy's reporter and internal-error subscriber: (the function that registered it, the
#: function that removes it). The registering function tells which copy of `collection` (or
#: `_guard`) holds it.
_hooks: list[tuple[Callable[..., Any], Callable[[], None]]] = []
#: The attribute of a registry holding its `QueryWatchMetrics`: it outlives this module's state.
_REGISTRY_ATTRIBUTE = "_querywatch_metrics"


def multiprocess_mode() -> bool:
    """True when prometheus_client writes to `PROMETHEUS_MULTIPROC_DIR` (gunicorn workers)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def install(registry: CollectorRegistry | None = None) -> QueryWatchMetrics:
    """Build the querywatch metrics into `registry` (default: prometheus_client's `REGISTRY`)
    once, and record every finished unit of work into them. Idempotent per registry, also
    across copies of this module (see the module docstring)."""
    global _hooked
    target = REGISTRY if registry is None else registry
    with _lock:
        metrics = _by_registry.get(target)
        if metrics is None:
            metrics = getattr(target, _REGISTRY_ATTRIBUTE, None)
            if metrics is not None:
                # Built by an earlier copy of this module (same code, that copy's class): its
                # collectors are the ones in the registry. Where that copy's reporter sits in
                # the same `collection` as ours, it gives way to ours, or units would count
                # twice (requests still reach that copy's other registries through their
                # middleware; its other units no longer do). In a `collection` of its own, it
                # keeps recording the units of the apps built before.
                if metrics.hooks is not _hooks:
                    for registrar, remove in metrics.hooks:
                        if registrar is add_reporter or registrar is _guard.subscribe:
                            remove()
                metrics.pools.observe_pools()
            else:
                metrics = QueryWatchMetrics(target, multiprocess=multiprocess_mode())
                with contextlib.suppress(AttributeError):  # a registry class with __slots__
                    setattr(target, _REGISTRY_ATTRIBUTE, metrics)
            metrics.hooks = _hooks
            _by_registry[target] = metrics
            _live.add(metrics)
        if not _hooked:
            _hooks.append((add_reporter, add_reporter(_record_report)))
            _hooks.append((_guard.subscribe, _guard.subscribe(_record_internal_error)))
            _hooked = True
    return metrics


#: The `route` label of units that are not HTTP requests, by unit kind.
_UNIT_ROUTES = {"job": "<job>", "test": "<test>", "request": "<request>"}


def _unit_route(kind: str) -> str:
    """The `route` label of a unit of work that is not an HTTP request: `<job>` for `watch()`
    units, `<test>` for the pytest plugin's and `querywatch.testing`'s (any other kind counts
    as a job)."""
    return _UNIT_ROUTES.get(kind, "<job>")


def _record_report(report: Report) -> None:
    try:  # once per unit: guarded inline (see `querywatch._guard`)
        if _guard.injected_faults:
            _guard.maybe_fail("metrics")
        # A request counts in its own app's registry only; other units (jobs) in every one.
        targets = report.metrics
        for metrics in list(_live) if targets is None else targets:
            metrics.record(report)
    except Exception as exc:
        _guard.internal_error("metrics", exc)


def _record_internal_error(component: str) -> None:
    for metrics in list(_live):
        metrics.internal_errors.labels(component).inc()


class _Anchor:
    """Registered in the registry so that the registry keeps its `QueryWatchMetrics` alive;
    yields the pool metrics at scrape time in single-process mode."""

    def __init__(self, metrics: QueryWatchMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self.metrics.describe_pools()

    def collect(self) -> Iterable[Metric]:
        return self.metrics.collect_pools()


class QueryWatchMetrics:
    """The querywatch metrics of one registry. Build with `install()`, not directly."""

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        r = registry
        self.request_db_statements = Histogram(
            "querywatch_request_db_statements",
            "SQL statements executed per HTTP request.",
            ["route", "method"],
            buckets=REQUEST_STATEMENT_BUCKETS,
            registry=r,
        )
        self.request_db_seconds = Histogram(
            "querywatch_request_db_seconds",
            "Time spent executing SQL statements per HTTP request.",
            ["route", "method"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=r,
        )
        self.statement_duration = Histogram(
            "querywatch_db_statement_duration_seconds",
            "Duration of SQL statements executed inside units of work.",
            ["pool", "operation"],
            buckets=STATEMENT_BUCKETS,
            registry=r,
        )
        self.n_plus_one = Counter(
            "querywatch_n_plus_one_total", "N+1 findings.", ["route"], registry=r
        )
        self.duplicate_queries = Counter(
            "querywatch_duplicate_queries_total", "Duplicate-query findings.", ["route"], registry=r
        )
        self.lazy_loads = Counter(
            "querywatch_lazy_loads_total",
            "ORM lazy loads, by phase (handler or serialization).",
            ["route", "phase"],
            registry=r,
        )
        self.lazy_loads_after_close = Counter(
            "querywatch_lazy_loads_after_close_total",
            "Lazy loads attempted on detached objects or outside a greenlet.",
            ["route"],
            registry=r,
        )
        self.leaked_connections = Counter(
            "querywatch_db_pool_leaked_connections_total",
            "Connections still checked out when their unit of work ended.",
            ["pool", "route"],
            registry=r,
        )
        self.internal_errors = Counter(
            "querywatch_internal_errors_total",
            "Errors inside querywatch itself (swallowed; the application is unaffected).",
            ["component"],
            registry=r,
        )
        #: finding kind -> its counter (leaks count connections per pool: see `record`)
        self._finding_counters = {
            NPlusOneFinding.kind: self.n_plus_one,
            DuplicateQueryFinding.kind: self.duplicate_queries,
            LazyLoadAfterCloseFinding.kind: self.lazy_loads_after_close,
        }
        #: Taken by `record` for the histograms it writes directly (see there).
        self._lock = threading.Lock()
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        #: open unit -> lazy loads per phase already counted by units nested in it
        self._nested_lazy: weakref.WeakKeyDictionary[Report, dict[str, int]] = (
            weakref.WeakKeyDictionary()
        )
        self.pools = PoolMetrics(r, multiprocess=multiprocess)
        #: The hooks of the copy of this module recording into these metrics (see `install`).
        self.hooks: list[tuple[Callable[..., Any], Callable[[], None]]] = []
        r.register(_Anchor(self))

    # -- per unit of work -------------------------------------------------------------------

    def record(self, report: Report) -> None:
        """Record one finished unit of work."""
        if not report.settings.enabled:
            return
        http = report.http
        statements, db_seconds = report.statements, report.db_seconds
        durations = report.shape_durations
        others = report.other_pool_durations
        # In one process, the histograms' values are written directly, under one lock per
        # unit: every write to them is made here, so they stay exact, and a unit costs one
        # lock instead of one per bucket and sum (a scrape reads each float atomically).
        with self._lock:
            if http is not None:
                route = http.route
                key = (route, http.method)
                children = self._request_children.get(key)
                if children is None:
                    children = self._request_children[key] = (
                        self._child(self.request_db_statements, *key),
                        self._child(self.request_db_seconds, *key),
                    )
                _observe(children[0], statements)
                _observe(children[1], db_seconds)
            else:
                # Never the unit's name: a test id or a job name is one label value per test
                # or job, without bound. The kind is a fixed, small set.
                route = _unit_route(report.kind)
            # Shapes count the durations of the statements of this (innermost) unit per
            # bucket: one write per non-empty bucket, not one observation per statement.
            for shape in durations:
                child = self._child(self.statement_duration, shape.pool, shape.operation)
                _add_bucketed(child, shape.buckets, shape.seconds)
            for statement in others:
                child = self._child(self.statement_duration, statement.pool, statement.operation)
                _observe(child, statement.seconds)
        reported = report.findings_to_report()
        if reported:
            for finding in reported:
                # By kind, not class: a fresh copy of this module may record the findings of
                # another copy's classes (see the module docstring).
                counter = self._finding_counters.get(finding.kind)
                if counter is not None:
                    self._child(counter, route).inc()
            for leak in report.leaks:
                if leak in reported:
                    self._child(self.leaked_connections, leak.pool, route).inc(leak.connections)
        self._record_lazy_loads(report, route)

    def _record_lazy_loads(self, report: Report, route: str) -> None:
        # Lazy loads are recorded in every enclosing unit too: count each once, in the
        # innermost unit, by subtracting what the units nested in this one counted already.
        totals = report.lazy_loads
        if not totals:
            return
        nested = self._nested_lazy.pop(report, None) or {}
        for phase, count in totals.items():
            own = count - nested.get(phase, 0)
            if own > 0:
                self._child(self.lazy_loads, route, phase).inc(own)
        parent = report.parent
        if parent is not None and not parent.final:
            counted = self._nested_lazy.setdefault(parent, {})
            for phase, count in totals.items():
                counted[phase] = counted.get(phase, 0) + count

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (label values are route templates, pools and
        other small sets); a histogram's as `_writable` gives it."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _writable(metric.labels(*labels))
        return child

    # -- pools ------------------------------------------------------------------------------

    def describe_pools(self) -> Iterator[Metric]:
        return self.pools.describe()

    def collect_pools(self) -> Iterator[Metric]:
        return self.pools.collect()


def _writable(child: Any) -> Any:
    """A histogram child's (bucket values, sum value, upper bounds) when they are plain
    in-process values, written directly under `QueryWatchMetrics`' lock; else the child itself
    (written through its own methods)."""
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    bounds = getattr(child, "_upper_bounds", None)
    if (
        buckets is None
        or bounds is None
        or type(total) is not MutexValue
        or any(type(value) is not MutexValue for value in buckets)
    ):  # multiprocess values (they write files), or another client version
        return child
    return (buckets, total, bounds)


def _observe(child: Any, amount: float) -> None:
    """One observation of `amount` (a `_writable` histogram child)."""
    if type(child) is not tuple:
        child.observe(amount)
        return
    buckets, total, bounds = child
    buckets[bisect_left(bounds, amount)]._value += 1
    total._value += amount


def _add_bucketed(child: Any, counts: Sequence[int], total_seconds: float) -> None:
    """Add pre-bucketed observations (non-cumulative `counts`, one per bucket incl. +Inf) to a
    `_writable` histogram child."""
    if type(child) is tuple:
        values, total, _ = child
        for index in compress(range(len(counts)), counts):  # the buckets that counted any
            values[index]._value += counts[index]
        total._value += total_seconds
        return
    values = getattr(child, "_buckets", None)
    if values is None or len(values) != len(counts):  # pragma: no cover - other client versions
        bounds = (*STATEMENT_BUCKETS, float("inf"))
        for bound, count in zip(bounds, counts, strict=False):
            for _ in range(count):
                child.observe(bound if bound != float("inf") else STATEMENT_BUCKETS[-1] * 2)
        return
    for index in compress(range(len(counts)), counts):
        values[index].inc(counts[index])
    child._sum.inc(total_seconds)


class PoolMetrics:
    """The `querywatch_db_pool_*` metrics, read from `querywatch.pool`'s per-engine `PoolStats`.

    Single process: nothing is recorded per checkout; `collect()` reads every pool's counters,
    histograms and `state()` when Prometheus scrapes. Multiprocess: real metrics, brought up to
    date from the pool's observer hook after each checkout, checkin and timeout.
    """

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool) -> None:
        self.multiprocess = multiprocess
        self._lock = threading.Lock()
        self._flushed: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self._remove_observer: Any = None
        self._observed: Any = None
        if not multiprocess:
            return
        r = registry
        self.connections = Gauge(*_POOL_GAUGES["connections"], registry=r,
                                 multiprocess_mode="livesum")  # fmt: skip
        self.connections_max = Gauge(*_POOL_GAUGES["connections_max"], registry=r,
                                     multiprocess_mode="livesum")  # fmt: skip
        self.overflow = Gauge(*_POOL_GAUGES["overflow"], registry=r, multiprocess_mode="livesum")
        self.pending = Gauge(*_POOL_GAUGES["pending"], registry=r, multiprocess_mode="livesum")
        self.counters = {
            attr: Counter(name, doc, labels, registry=r)
            for attr, (name, doc, labels) in _POOL_COUNTERS.items()
        }
        self.histograms = {
            attr: Histogram(name, doc, ["pool"], buckets=bounds, registry=r)
            for attr, (name, doc, bounds) in _pool_histograms().items()
        }
        self.observe_pools()

    def observe_pools(self) -> None:
        """Multiprocess: be told of the pools of the `querywatch.pool` module in use now (again,
        when a fresh copy of it was imported). Idempotent."""
        if not self.multiprocess:
            return
        if self._observed is pool:
            return
        if self._remove_observer is not None:
            self._remove_observer()
        self._remove_observer = pool.add_observer(self._observe)
        self._observed = pool
        weakref.finalize(self, self._remove_observer)

    # -- single process: read at scrape time --------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        if self.multiprocess:
            return
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        if self.multiprocess:
            return
        merged: dict[str, tuple[Any, Any]] = {}
        for stats in pool.stats_for_all():
            snapshot, state = stats.snapshot(), stats.state()
            previous = merged.get(stats.name)
            merged[stats.name] = (
                (snapshot, state) if previous is None else _merge(previous, (snapshot, state))
            )
        yield from self._families(merged)

    def _families(self, pools: dict[str, tuple[Any, Any]] | None = None) -> Iterator[Metric]:
        pools = pools or {}
        name, doc, labels = _POOL_GAUGES["connections"]
        connections = GaugeMetricFamily(name, doc, labels=labels)
        name, doc, labels = _POOL_GAUGES["connections_max"]
        maximum = GaugeMetricFamily(name, doc, labels=labels)
        name, doc, labels = _POOL_GAUGES["overflow"]
        overflow = GaugeMetricFamily(name, doc, labels=labels)
        name, doc, labels = _POOL_GAUGES["pending"]
        pending = GaugeMetricFamily(name, doc, labels=labels)
        counters = {
            attr: CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            for attr, (name, doc, labels) in _POOL_COUNTERS.items()
        }
        histograms = {
            attr: HistogramMetricFamily(name, doc, labels=["pool"])
            for attr, (name, doc, _bounds) in _pool_histograms().items()
        }
        for pool_name, (stats, state) in sorted(pools.items()):
            if state.idle is not None:
                connections.add_metric([pool_name, "idle"], state.idle)
            if state.used is not None:
                connections.add_metric([pool_name, "used"], state.used)
            if state.max is not None:
                maximum.add_metric([pool_name], state.max)
            if state.overflow is not None:
                overflow.add_metric([pool_name], state.overflow)
            pending.add_metric([pool_name], state.pending)
            for attr, family in counters.items():
                if attr == "invalidations_total":
                    for kind, n in sorted(stats.invalidations_total.items()):
                        family.add_metric([pool_name, kind], n)
                else:
                    family.add_metric([pool_name], getattr(stats, attr))
            for attr, hfamily in histograms.items():
                histogram = getattr(stats, attr)
                hfamily.add_metric(
                    [pool_name],
                    [(_bound(b), n) for b, n in histogram.cumulative()],
                    histogram.sum,
                )
        yield connections
        yield maximum
        yield overflow
        yield pending
        yield from counters.values()
        yield from histograms.values()

    # -- multiprocess: written as things change -----------------------------------------------

    def _observe(self, stats: Any) -> None:
        state = stats.state()
        name = stats.name
        with self._lock:
            if state.idle is not None:
                self.connections.labels(name, "idle").set(state.idle)
            if state.used is not None:
                self.connections.labels(name, "used").set(state.used)
            if state.max is not None:
                self.connections_max.labels(name).set(state.max)
            if state.overflow is not None:
                self.overflow.labels(name).set(state.overflow)
            self.pending.labels(name).set(state.pending)
            flushed = self._flushed.get(stats)
            if flushed is None:
                flushed = self._flushed[stats] = {}
            for attr, counter in self.counters.items():
                if attr == "invalidations_total":
                    for kind, n in stats.invalidations_total.items():
                        key = f"invalidations_{kind}"
                        delta = n - flushed.get(key, 0)
                        if delta > 0:
                            counter.labels(name, kind).inc(delta)
                            flushed[key] = n
                    continue
                n = getattr(stats, attr)
                delta = n - flushed.get(attr, 0)
                if delta > 0:
                    counter.labels(name).inc(delta)
                    flushed[attr] = n
            for attr, metric in self.histograms.items():
                histogram = getattr(stats, attr)
                seen = flushed.get(attr)
                if seen is None:
                    seen = flushed[attr] = ([0] * len(histogram.counts), 0.0)
                counts, total = histogram.counts, histogram.sum
                if counts == seen[0]:
                    continue
                deltas = [now - before for now, before in zip(counts, seen[0], strict=False)]
                _add_bucketed(metric.labels(name), deltas, total - seen[1])
                flushed[attr] = (list(counts), total)


_POOL_GAUGES: dict[str, tuple[str, str, list[str]]] = {
    "connections": (
        "querywatch_db_pool_connections",
        "Connections of the pool, by state: idle (in the pool) or used (checked out).",
        ["pool", "state"],
    ),
    "connections_max": (
        "querywatch_db_pool_connections_max",
        "Most connections the pool allows (pool_size + max_overflow); absent when unlimited.",
        ["pool"],
    ),
    "overflow": (
        "querywatch_db_pool_overflow",
        "Connections open beyond pool_size.",
        ["pool"],
    ),
    "pending": (
        "querywatch_db_pool_pending_requests",
        "Checkouts waiting for (or opening) a connection.",
        ["pool"],
    ),
}
_POOL_COUNTERS: dict[str, tuple[str, str, list[str]]] = {
    "checkouts_total": (
        "querywatch_db_pool_checkouts_total", "Connections checked out.", ["pool"],
    ),
    "checkout_timeouts_total": (
        "querywatch_db_pool_checkout_timeouts_total",
        "Checkouts that gave up waiting for a connection (pool timeout).",
        ["pool"],
    ),
    "connections_opened_total": (
        "querywatch_db_pool_connections_opened_total", "DBAPI connections opened.", ["pool"],
    ),
    "connections_closed_total": (
        "querywatch_db_pool_connections_closed_total", "DBAPI connections closed.", ["pool"],
    ),
    "invalidations_total": (
        "querywatch_db_pool_invalidations_total",
        "Connections invalidated, by kind (hard or soft).",
        ["pool", "kind"],
    ),
}  # fmt: skip


def _pool_histograms() -> dict[str, tuple[str, str, tuple[float, ...]]]:
    return {
        "wait": (
            "querywatch_db_pool_wait_seconds",
            "Time a checkout waited for a connection.",
            pool.WAIT_BUCKETS,
        ),
        "use": (
            "querywatch_db_pool_use_seconds",
            "Time a connection was held, checkout to checkin.",
            pool.USE_BUCKETS,
        ),
        "create": (
            "querywatch_db_pool_connection_create_seconds",
            "Time to open a new DBAPI connection.",
            pool.CREATE_BUCKETS,
        ),
    }


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _merge(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """Two engines sharing one `pool` name: their figures add up."""
    (sa, ta), (sb, tb) = a, b
    stats = sa  # a snapshot: ours to modify
    for attr in _POOL_COUNTERS:
        if attr == "invalidations_total":
            for kind, n in sb.invalidations_total.items():
                stats.invalidations_total[kind] = stats.invalidations_total.get(kind, 0) + n
        else:
            setattr(stats, attr, getattr(sa, attr) + getattr(sb, attr))
    for attr in ("wait", "use", "create"):
        ha, hb = getattr(sa, attr), getattr(sb, attr)
        merged = pool.Histogram(ha.bounds)
        merged.counts = [x + y for x, y in zip(ha.counts, hb.counts, strict=False)]
        merged.sum, merged.count = ha.sum + hb.sum, ha.count + hb.count
        setattr(stats, attr, merged)

    def add(x: int | None, y: int | None) -> int | None:
        return None if x is None or y is None else x + y

    state = pool.PoolState(
        ta.pool_class,
        used=add(ta.used, tb.used),
        idle=add(ta.idle, tb.idle),
        max=add(ta.max, tb.max),
        overflow=add(ta.overflow, tb.overflow),
        pending=ta.pending + tb.pending,
        unlimited=ta.unlimited or tb.unlimited,
    )
    return stats, state
