"""Connection-pool auditing: checkouts, waits, hold times, timeouts, leaks and pool state.

What is measured, and where
---------------------------
SQLAlchemy fires no event before a checkout, none on a pool timeout, and its `checkin` event
fires before the connection is back in the pool. So the hot path is measured by wrapping two
methods of each pool *instance* (never its class): `Pool.connect` (wait, pending requests,
timeouts, the checkout itself) and `Pool._return_conn` (the checkin, recorded just before the
connection goes back in the queue, where another thread may take it at once; observers are told
once it is back). `Pool.recreate` is wrapped too, so the pool that `engine.dispose()` puts in
place is wrapped before its first use. Each wrapper calls the original method: the pool behaves
exactly as before, and its exceptions pass through unchanged. The rarer events are SQLAlchemy
pool events (which, unlike engine events, do not slow statement execution): `connect` (creation
time), `invalidate` / `soft_invalidate`, `close`, `detach`, `close_detached`.

`checkout`, `checkin` and `reset` are deliberately *not* listened to: every checkout+checkin
cycle would pay SQLAlchemy's event dispatch for them (about 2 µs here), and the wrappers above
see the same moments exactly.

Per unit of work (`report.pool`, `querywatch._collection.PoolUsage`): checkouts, wait seconds,
timeouts, the most connections held at once, and at the end the connections still checked out:
one `ConnectionLeakFinding` per pool and owner's call site, computed by `finish_unit()` just
before the detectors run.

Who holds a connection (leaks)
------------------------------
A connection still checked out when a unit ends is that unit's leak only if what holds it was
opened during the unit. A plain `Connection` checks its connection out in its constructor, so it
was opened at the checkout. A `Session` checks one out at the start of each of its transactions,
possibly long after it was opened: a Session opened by a session-scoped test fixture, or an
app-wide one, and used by a request is not that request's to close. So `Session.__init__` is
wrapped (once per process, like `querywatch._orm`'s hook) to stamp each Session opened while a
unit records with `_querywatch_opened = (perf_counter(), call site)`, and a class-level
`after_begin` listener (once per Session transaction, never per statement; registered when this
module is imported, inert while no unit records) finds the connection the transaction checked
out: kept as the leak of the units the Session was opened in, with the line that opened it, and
dropped from the units that began before it was opened. A Session bound to a Connection it was
given (`Session(bind=conn)`) leaves the connection to that Connection. AsyncSession runs a sync
Session inside, so it is covered the same way.

Process-wide statistics (the API the Prometheus reporter reads)
---------------------------------------------------------------
One `PoolStats` per instrumented engine, surviving `engine.dispose()`:

- `stats_for_all() -> list[PoolStats]`: every live instrumented engine's statistics;
  `stats_for(engine) -> PoolStats | None` for one engine (sync or async).
- `PoolStats.name`: the engine's `pool` label. Cumulative counters (ints, only ever grow):
  `checkouts_total`, `checkins_total`, `checkout_timeouts_total`, `connections_opened_total`,
  `connections_closed_total`, `invalidations_total` (a dict: `{"hard": n, "soft": n}`).
- Histograms (`Histogram`: `bounds`, `counts` per bucket with +Inf last, `sum`, `count`,
  `cumulative()` -> `[(upper_bound, cumulative_count), ..., (inf, count)]`):
  `wait` (seconds a checkout waited for a connection, the ones that timed out included;
  opening a new connection is not waiting; bounds `WAIT_BUCKETS`), `use` (seconds a connection
  was held, checkout to checkin, `USE_BUCKETS`), `create` (seconds to open a new DBAPI
  connection, the dialect's first-connect set-up included, `CREATE_BUCKETS`).
  `PoolStats.snapshot()` copies them all, for figures that must agree with each other.
- `PoolStats.state() -> PoolState`: read from the engine's current pool when called (at
  collection time): `used`, `idle`, `max`, `overflow`, `pending`, `unlimited`. A figure a pool
  class cannot report is `None`, never a guess; see `PoolState`.
- `add_observer(callback) -> remove`: `callback(stats)` runs after each checkout, checkin and
  timeout, and when a request starts waiting, so prometheus-client's multiprocess mode (where
  custom collectors do not work) can set gauges from `stats.state()` as things change (when a
  checkout starts waiting: only for a QueuePool with no idle connection). Observers run inside
  the guard, on the thread that checked the connection out or in: keep them cheap.

Counters and histograms are updated without a lock: each update is a single `+=` on an
attribute or list item, which the GIL makes atomic, and a lock would double the cost of the
cycle. Read several figures that must agree through `PoolStats.snapshot()`.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from querywatch import _callsite, _guard
from querywatch._collection import Collector, current_unit
from querywatch._engines import Instrumentation, handle_of, sync_engine_of
from querywatch._guard import guard, internal_error, maybe_fail
from querywatch.findings import ConnectionLeakFinding, finding_id

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CREATE_BUCKETS",
    "USE_BUCKETS",
    "WAIT_BUCKETS",
    "Histogram",
    "PoolState",
    "PoolStats",
    "add_observer",
    "attach",
    "finish_unit",
    "session_hooks_installed",
    "stats_for",
    "stats_for_all",
]

#: Upper bounds (seconds) of the wait histogram: time a checkout waited for a connection.
WAIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Upper bounds (seconds) of the use histogram: time a connection was held, checkout to checkin.
USE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
#: Upper bounds (seconds) of the create histogram: time to open a new DBAPI connection.
CREATE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: The fix of a leaked Connection (`engine.connect()`, `engine.raw_connection()`).
LEAK_SUGGESTION = (
    "close the Connection before the unit of work ends: `with engine.connect() as conn:` "
    "(`async with` for an AsyncEngine), or `conn.close()` in a `finally`"
)
#: The fix of a connection held by a Session opened during the unit of work.
SESSION_LEAK_SUGGESTION = (
    "close the Session before the unit of work ends (`with Session(engine) as session:`, "
    "`async with` for AsyncSession, or a dependency that closes it in `finally`); a Session "
    "shared by several units of work must be opened before they begin"
)

_CREATED_ATTR = "_querywatch_created"

_observers: list[Callable[[PoolStats], None]] = []
_stats: weakref.WeakKeyDictionary[Instrumentation, PoolStats] = weakref.WeakKeyDictionary()


class Histogram:
    """Bucket counts and sum of observations, with fixed bounds: cheap to record, ready to expose
    as a Prometheus histogram."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: observations per bucket (not cumulative); the last one is +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """`(upper bound, observations <= bound)` per bucket, ending with `(inf, count)`."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def _copy(self) -> Histogram:
        copy = Histogram(self.bounds)
        copy.counts = list(self.counts)
        copy.sum = self.sum
        copy.count = self.count
        return copy


class PoolState(NamedTuple):
    """The state of an engine's pool at one moment. `None` means "this pool class cannot say".

    - `used`: connections checked out. QueuePool: `pool.checkedout()`; other pools: connections
      querywatch saw checked out and not yet returned (counted from `instrument()` on).
    - `idle`: connections open in the pool, ready for a checkout. QueuePool: `pool.checkedin()`;
      NullPool: 0; StaticPool, SingletonThreadPool: None.
    - `max`: most connections the pool allows, `pool_size + max_overflow`; None when
      `unlimited` (QueuePool with `max_overflow=-1` or `pool_size=0`, NullPool) or unknown.
    - `overflow`: connections open beyond `pool_size` (QueuePool only; `pool.status()`'s
      "Current Overflow" is this figure minus the connections never opened, when negative).
    - `pending`: checkouts waiting for (or opening) a connection right now. Every pool.
    - `unlimited`: the pool sets no limit on connections (NullPool, unbounded QueuePool).
    """

    pool_class: str
    used: int | None
    idle: int | None
    max: int | None
    overflow: int | None
    pending: int
    unlimited: bool = False


class PoolStats:
    """Cumulative statistics and live state of one instrumented engine's pool(s)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.name = name
        self._engine_ref = weakref.ref(engine)
        self.checkouts_total = 0
        self.checkins_total = 0
        self.checkout_timeouts_total = 0
        self.connections_opened_total = 0
        self.connections_closed_total = 0
        self.invalidations_total: dict[str, int] = {"hard": 0, "soft": 0}
        self.wait = Histogram(WAIT_BUCKETS)
        self.use = Histogram(USE_BUCKETS)
        self.create = Histogram(CREATE_BUCKETS)
        #: checkouts in progress (waiting for or opening a connection)
        self.pending = 0
        #: connection record -> (checkout time, units of work holding it, innermost first): the
        #: records querywatch saw checked out and not yet back
        self._out: dict[object, tuple[float, tuple[Collector, ...]]] = {}
        #: identifies this engine in the call-site memo
        self._site_key = f"\x00querywatch.pool {id(self)}"

    def __repr__(self) -> str:
        return (
            f"<querywatch.PoolStats {self.name!r}: {self.checkouts_total} checkouts, "
            f"{self.checkout_timeouts_total} timeouts>"
        )

    @property
    def checked_out(self) -> int:
        """Connections querywatch saw checked out and not yet returned."""
        return len(self._out)

    @property
    def idle_max(self) -> int | None:
        """Most idle connections the engine's pool keeps open (QueuePool: `pool_size`; NullPool:
        0); None where the pool class sets no such limit or cannot say, or the engine is gone."""
        engine = self._engine_ref()
        if engine is None:
            return None
        pool = engine.pool
        if isinstance(pool, sa_pool.QueuePool):  # AsyncAdaptedQueuePool too
            size = pool.size()
            return size if size > 0 else None  # pool_size=0: no limit
        return 0 if isinstance(pool, sa_pool.NullPool) else None

    def snapshot(self) -> PoolStats:
        """A copy of the counters and histograms, for reading several figures that agree with
        each other (its `state()` stays live)."""
        copy = PoolStats.__new__(PoolStats)
        copy.__dict__.update(self.__dict__)
        copy.invalidations_total = dict(self.invalidations_total)
        copy.wait = self.wait._copy()
        copy.use = self.use._copy()
        copy.create = self.create._copy()
        copy._out = dict(self._out)
        return copy

    def state(self) -> PoolState:
        """The engine's current pool, read now. Figures a pool class cannot give are None."""
        engine = self._engine_ref()
        pending = self.pending
        if engine is None:
            return PoolState("", None, None, None, None, pending)
        pool = engine.pool
        kind = type(pool).__name__
        if isinstance(pool, sa_pool.QueuePool):  # AsyncAdaptedQueuePool too
            size = pool.size()
            max_overflow = getattr(pool, "_max_overflow", None)
            unlimited = max_overflow == -1 or size == 0
            limit = None if max_overflow is None or unlimited else size + max_overflow
            return PoolState(
                kind,
                used=pool.checkedout(),
                idle=pool.checkedin(),
                max=limit,
                overflow=max(0, pool.overflow()),
                pending=pending,
                unlimited=unlimited,
            )
        used = len(self._out)
        if isinstance(pool, sa_pool.NullPool):
            return PoolState(kind, used, 0, None, None, pending, unlimited=True)
        return PoolState(kind, used, idle=None, max=None, overflow=None, pending=pending)


def stats_for(engine: Engine | AsyncEngine) -> PoolStats | None:
    """The pool statistics of an instrumented engine, or None when it is not instrumented."""
    sync_engine = sync_engine_of(engine)
    if sync_engine is None:
        return None
    handle = handle_of(sync_engine)
    return _stats.get(handle) if handle is not None else None


def stats_for_all() -> list[PoolStats]:
    """The pool statistics of every live instrumented engine."""
    return [
        stats
        for handle, stats in list(_stats.items())
        if not handle.removed and handle.engine is not None
    ]


def add_observer(callback: Callable[[PoolStats], None]) -> Callable[[], None]:
    """Call `callback(stats)` after each checkout, checkin and timeout, and when a checkout
    starts waiting; returns the removal function."""
    _observers.append(callback)

    def remove() -> None:
        if callback in _observers:
            _observers.remove(callback)

    return remove


def _notify(stats: PoolStats) -> None:
    for observer in tuple(_observers):
        try:
            observer(stats)
        except Exception as exc:
            internal_error("pool", exc)


def _forget_site(site_key: str) -> None:
    _callsite.forget(site_key)


def attach(handle: Instrumentation, engine: Engine) -> None:
    """Attach the pool auditing of `engine` to `handle`.

    Nothing here holds the engine or its pools strongly from the handle (which the registry of
    instrumented engines keeps): pools are remembered weakly, so an engine the application drops
    is freed even when it was never uninstrumented."""
    stats = PoolStats(engine, handle.name)
    _stats[handle] = stats
    # The call-site memo of this engine's checkouts goes with it: otherwise every engine ever
    # instrumented leaves one behind (until the memo table fills up and is cleared).
    weakref.finalize(stats, _forget_site, stats._site_key).atexit = False
    wrapped: weakref.WeakSet[sa_pool.Pool] = weakref.WeakSet()
    ours: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
    _wrap_pool(handle, stats, engine.pool, wrapped, ours)
    listeners = _listeners(stats)
    for identifier, fn in listeners.items():
        # Through the engine: SQLAlchemy copies them to the pool `engine.dispose()` creates.
        event.listen(engine, identifier, fn)

    engine_ref = weakref.ref(engine)

    def detach() -> None:
        for pool in list(wrapped):
            for name in ("connect", "_return_conn", "recreate"):
                if pool.__dict__.get(name) in ours:
                    del pool.__dict__[name]
        wrapped.clear()
        live_engine = engine_ref()
        if live_engine is not None:
            for identifier, fn in listeners.items():
                # Removing through the engine removes the copies on every pool it has had.
                if event.contains(live_engine, identifier, fn):
                    event.remove(live_engine, identifier, fn)

    handle.on_remove(detach)
    _install_session_hooks(handle)


def _wrap_pool(
    handle: Instrumentation,
    stats: PoolStats,
    pool: sa_pool.Pool,
    wrapped: weakref.WeakSet[sa_pool.Pool],
    ours: weakref.WeakSet[Callable[..., Any]],
) -> None:
    """Wrap `pool`'s connect, return and recreate methods (on the instance, calling the bound
    originals, so the class and other pools are untouched)."""
    if pool in wrapped:
        return
    connect = pool.connect
    return_conn = pool._return_conn
    recreate = pool.recreate
    out = stats._out
    wait_hist = stats.wait
    use_hist = stats.use
    name = stats.name
    site_key = stats._site_key
    observers = _observers
    # Only a QueuePool makes a checkout wait: tell observers when one is about to.
    checkedin = pool.checkedin if isinstance(pool, sa_pool.QueuePool) else None

    def querywatch_connect() -> sa_pool.PoolProxiedConnection:
        if handle.removed:
            return connect()
        t0 = perf_counter()
        stats.pending += 1
        if observers and checkedin is not None:
            try:
                if checkedin() == 0:
                    _notify(stats)
            except Exception as exc:
                internal_error("pool", exc)
        try:
            fairy = connect()
        except sa_exc.TimeoutError:
            _timed_out(stats, perf_counter() - t0)
            raise
        except BaseException:
            stats.pending -= 1
            raise
        now = perf_counter()
        wait = -1.0  # stays negative unless this call checked a connection out
        try:
            if _guard.injected_faults:
                maybe_fail("pool")
            record = fairy._connection_record
            # The same record again is not a new checkout: SingletonThreadPool's nested connect,
            # or StaticPool handing its one connection out twice.
            if record not in out:
                wait = now - t0
                created = record.__dict__.pop(_CREATED_ATTR, None)
                if created is not None and created[0] >= t0:
                    # Opening a new connection is not waiting: that is the `create` histogram.
                    wait = max(0.0, wait - created[1])
                collector = current_unit.get()
                if collector is not None and collector.active:
                    units = collector.chain
                    callsite = _callsite.capture_for(site_key, 1)
                    # Owner None: the Connection checking it out now, opened here (a Session's
                    # `after_begin` names itself right after, see `_session_began`).
                    entry = (name, now, callsite, None)
                    key = id(record)
                    for c in units:
                        with c.lock:  # one unit may be written by several threads
                            usage = c.pool
                            usage.checkouts += 1
                            usage.wait_seconds += wait
                            held = usage.held
                            held[key] = entry
                            if len(held) > usage.max_held:
                                usage.max_held = len(held)
                else:
                    units = ()
                out[record] = (now, units)
        except Exception as exc:
            internal_error("pool", exc)
        finally:
            stats.pending -= 1
            if wait >= 0.0:
                stats.checkouts_total += 1
                wait_hist.counts[bisect_left(wait_hist.bounds, wait)] += 1
                wait_hist.sum += wait
                wait_hist.count += 1
        if observers:
            _notify(stats)
        return fairy

    def querywatch_return_conn(record: sa_pool.ConnectionPoolEntry) -> None:
        # Bookkeeping first, while the record is still checked out: once `return_conn` has put
        # it back in the queue, another thread can check it out at once, and that checkout must
        # not be taken for this one (`record in out`) nor lose its `held` entries to this one.
        try:
            try:
                if _guard.injected_faults:
                    maybe_fail("pool")
                checked_out = out.pop(record, None)
                if checked_out is not None:
                    since, units = checked_out
                    held_for = perf_counter() - since
                    if units:
                        key = id(record)
                        for c in units:
                            c.pool.held.pop(key, None)
                    stats.checkins_total += 1
                    use_hist.counts[bisect_left(use_hist.bounds, held_for)] += 1
                    use_hist.sum += held_for
                    use_hist.count += 1
            except Exception as exc:
                internal_error("pool", exc)
        finally:
            return_conn(record)
        if observers:
            # After the return: observers read `state()`, which must show the connection idle.
            _notify(stats)

    def querywatch_recreate() -> sa_pool.Pool:
        new_pool = recreate()
        if not handle.removed:
            with guard("pool"):
                _wrap_pool(handle, stats, new_pool, wrapped, ours)
        return new_pool

    for method_name, wrapper in (
        ("connect", querywatch_connect),
        ("_return_conn", querywatch_return_conn),
        ("recreate", querywatch_recreate),
    ):
        ours.add(wrapper)
        setattr(pool, method_name, wrapper)
    wrapped.add(pool)


def _timed_out(stats: PoolStats, waited: float) -> None:
    try:
        stats.pending -= 1
        stats.checkout_timeouts_total += 1
        stats.wait.observe(waited)
        collector = current_unit.get()
        if collector is not None and collector.active:
            for c in collector.chain:
                with c.lock:
                    c.pool.timeouts += 1
                    c.pool.wait_seconds += waited
        if _observers:
            _notify(stats)
    except Exception as exc:
        internal_error("pool", exc)


def _listeners(stats: PoolStats) -> dict[str, Callable[..., None]]:
    """The pool event listeners recording into `stats`, by event name."""
    out = stats._out

    def on_connect(dbapi_connection: Any, record: sa_pool.ConnectionPoolEntry) -> None:
        try:
            # `starttime` is stamped by the pool just before it calls the DBAPI's connect.
            started = getattr(record, "starttime", None)
            seconds = max(0.0, time.time() - started) if started else None
            if seconds is not None:
                setattr(record, _CREATED_ATTR, (perf_counter(), seconds))
            stats.connections_opened_total += 1
            if seconds is not None:
                stats.create.observe(seconds)
        except Exception as exc:
            internal_error("pool", exc)

    def counting(count: Callable[[], None]) -> Callable[..., None]:
        """A listener that only counts (closes, invalidations), whatever the event passes."""

        def on_event(*args: Any) -> None:
            try:
                count()
            except Exception as exc:
                internal_error("pool", exc)

        return on_event

    def closed() -> None:
        stats.connections_closed_total += 1

    def invalidated(kind: str) -> Callable[[], None]:
        def count() -> None:
            stats.invalidations_total[kind] += 1

        return count

    def on_detach(dbapi_connection: Any, record: sa_pool.ConnectionPoolEntry) -> None:
        # A detached connection leaves the pool without a checkin: it is no longer "held".
        try:
            checked_out = out.pop(record, None)
            if checked_out is not None:
                key = id(record)
                for c in checked_out[1]:
                    c.pool.held.pop(key, None)
            if _observers:
                _notify(stats)
        except Exception as exc:
            internal_error("pool", exc)

    return {
        "connect": on_connect,
        "close": counting(closed),
        "close_detached": counting(closed),
        "invalidate": counting(invalidated("hard")),
        "soft_invalidate": counting(invalidated("soft")),
        "detach": on_detach,
    }


# -- who holds a connection: Sessions -----------------------------------------------------------

#: Set on each Session opened while a unit of work records: (perf_counter() when it was opened,
#: the call site that opened it). A Session without it was opened outside every unit of work.
_OPENED_ATTR = "_querywatch_opened"
#: The call-site memo key of Session openings (one per process: a session-per-request app opens
#: them at one line, which the memo then finds without a walk).
_SESSION_SITE_KEY = "\x00querywatch.session"

_session_lock = threading.Lock()
#: (original `Session.__init__`, our wrapper) while the Session hooks are installed.
_session_hooks: tuple[Callable[..., None], Callable[..., None]] | None = None


def _install_session_hooks(handle: Instrumentation) -> None:
    """Wrap `Session.__init__`, once per process; undone when the last instrumented engine is
    uninstrumented (like `querywatch._orm`'s hook)."""
    _add_session_hooks()
    handle.on_remove(_release_session_hooks)


def _add_session_hooks() -> None:
    global _session_hooks
    with _session_lock:
        if _session_hooks is None:
            original = Session.__dict__["__init__"]
            if getattr(original, "_querywatch_hook", False):
                # Installed by an earlier copy of this module (deleted from `sys.modules` and
                # imported again): replace it, or every Session would be stamped twice.
                original = original.__wrapped__
            wrapper = _stamping_init(original)
            Session.__init__ = wrapper  # type: ignore[method-assign]
            _session_hooks = (original, wrapper)


def _release_session_hooks() -> None:
    """Undo `_install_session_hooks` when no instrumented engine is left."""
    if not stats_for_all():
        _remove_session_hooks()


def _remove_session_hooks() -> None:
    global _session_hooks
    with _session_lock:
        if _session_hooks is None:
            return
        original, wrapper = _session_hooks
        _session_hooks = None
        # Wrapped again on top of ours by someone else: leave theirs (ours is then inert).
        if Session.__dict__.get("__init__") is wrapper:
            Session.__init__ = original  # type: ignore[method-assign]


def session_hooks_installed() -> bool:
    """True while `Session.__init__` is wrapped (Sessions opened in a unit are stamped)."""
    return _session_hooks is not None


def _stamping_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        collector = current_unit.get()
        if collector is None or not collector.active:
            return
        hooks = _session_hooks
        if hooks is None or hooks[1] is not __init__:
            return  # uninstalled, and left in place under someone else's wrapper
        # Guarded, but no fault switch: the safety matrix counts the pool's checkouts and
        # checkins exactly, and these run per Session, not per checkout.
        try:
            # The line that created the Session, not the `super().__init__()` of a subclass.
            codes = _constructors.get(type(self)) or _constructor_codes(type(self))
            skip = 1
            frame = sys._getframe(1)
            while frame.f_code in codes and frame.f_back is not None:
                frame = frame.f_back
                skip += 1
            site = _callsite.capture_for(_SESSION_SITE_KEY, skip)
            setattr(self, _OPENED_ATTR, (perf_counter(), site))
        except Exception as exc:
            internal_error("pool", exc)

    __init__._querywatch_hook = True  # type: ignore[attr-defined]
    return __init__


#: Session class -> the code of the `__init__` methods it and its bases define.
_constructors: dict[type, frozenset[CodeType]] = {}
_MAX_CONSTRUCTORS = 1024


def _constructor_codes(cls: type) -> frozenset[CodeType]:
    codes = frozenset(
        code
        for klass in cls.__mro__
        if (code := getattr(klass.__dict__.get("__init__"), "__code__", None)) is not None
    )
    if len(_constructors) < _MAX_CONSTRUCTORS:
        _constructors[cls] = codes
    return codes


def _session_began(session: Any, transaction: Any, connection: Any) -> None:
    """`after_begin`: the transaction has its connection. If this Session checked it out, the
    units it was opened in keep it as theirs, with the Session's opening line; the units that
    began before the Session was opened drop it (not theirs to close)."""
    collector = current_unit.get()
    if collector is None or not collector.active:
        return
    try:  # guarded, no fault switch (see `_stamping_init`)
        joined = getattr(transaction, "_connections", {}).get(connection)
        if joined is not None and len(joined) > 3 and not joined[3]:
            return  # `Session(bind=conn)`: the Connection it was given holds it
        record = getattr(connection._dbapi_connection, "_connection_record", None)
        if record is None:
            return
        key = id(record)
        opened = session.__dict__.get(_OPENED_ATTR)
        owner: tuple[str, str | None] | None = None
        for c in collector.chain:
            held = c.pool.held
            checked_out = held.get(key)
            # Already owned: a savepoint of the same Session, or another Session given the same
            # connection by a single-connection pool (StaticPool): the first owner stays.
            if checked_out is None or checked_out[3] is not None:
                continue
            if opened is None or opened[0] < c.started:
                del held[key]
                continue
            if owner is None:
                owner = (_session_kind(session), opened[1])
            held[key] = (checked_out[0], checked_out[1], checked_out[2], owner)
    except Exception as exc:
        internal_error("pool", exc)


#: The Session class attribute naming the `after_begin` listener of this process.
_LISTENER_ATTR = "_querywatch_after_begin"


def _listen_to_sessions() -> None:
    """Listen to `after_begin` on the Session class: SQLAlchemy applies a class listener to
    every subclass (sessionmaker's, SQLModel's) and to the Session inside each AsyncSession.

    Registered once, when this module is imported, and left in place: without a unit of work
    recording it returns at once, and registering it with the first instrumented engine and
    removing it with the last would change SQLAlchemy's event registry back and forth (the
    lifecycle tests count it). The listener of an earlier copy of this module is replaced."""
    stale = Session.__dict__.get(_LISTENER_ATTR)
    if (
        stale is not None
        and stale is not _session_began
        and event.contains(Session, "after_begin", stale)
    ):
        event.remove(Session, "after_begin", stale)
    if not event.contains(Session, "after_begin", _session_began):
        event.listen(Session, "after_begin", _session_began)
    setattr(Session, _LISTENER_ATTR, _session_began)


with guard("pool"):
    _listen_to_sessions()


def _session_kind(session: Any) -> str:
    """`AsyncSession` for the Session inside one, else the Session's class name."""
    asyncio_session = sys.modules.get("sqlalchemy.ext.asyncio.session")
    if asyncio_session is not None:
        proxy = asyncio_session.async_session(session)
        if proxy is not None:
            return type(proxy).__name__
    return type(session).__name__


def finish_unit(collector: Collector) -> None:
    """At the end of a unit of work: the connections still checked out by what it opened are
    leaks, one finding per pool and owner's call site. Called by `close_unit` before
    detection."""
    held = collector.pool.held
    if not held:
        return
    if _guard.injected_faults:
        maybe_fail("pool")
    now = perf_counter()
    # (pool, owner kind, opened at) -> (first checkout's call site, ages)
    groups: dict[tuple[str, str, str | None], tuple[str | None, list[float]]] = {}
    for pool_name, since, callsite, owner in list(held.values()):
        kind, opened_at = ("Connection", callsite) if owner is None else owner
        group = groups.get((pool_name, kind, opened_at))
        if group is None:
            group = groups[(pool_name, kind, opened_at)] = (callsite, [])
        group[1].append(now - since)
    for (pool_name, kind, opened_at), (callsite, ages) in groups.items():
        collector.pool.leaked.append(
            ConnectionLeakFinding(
                # The owner's kind is part of the subject: a Session and a Connection left open
                # in one function are two leaks.
                id=finding_id("connection_leak", f"{pool_name} {kind}", opened_at),
                callsite=callsite,
                pool=pool_name,
                held_seconds=max(ages),
                suggestion=LEAK_SUGGESTION if kind == "Connection" else SESSION_LEAK_SUGGESTION,
                unit=collector.name,
                connections=len(ages),
                owner=kind,
                opened_at=opened_at,
            )
        )
