"""ORM attribution: which relationship or expired attribute a lazy load was for, and lazy loads
that failed because the object's session is gone (or there is no greenlet).

One hook, installed once per process: `AttributeImpl._fire_loader_callables`, the single point
where SQLAlchemy (2.0 and 2.1) loads an attribute that is not in an object's `__dict__` - a lazy
relationship, an expired column after `commit()`, a deferred column. Eager loads (`selectinload`,
`joinedload`, ...) populate the attributes directly and never pass through it, so they can never
be mistaken for lazy loads.

Why not the Session's `do_orm_execute` event: any listener of it makes *every* ORM execution in
the process (inside a unit of work or not) build an `ORMExecuteState` and dispatch - about 9 µs
per statement measured on this machine - and it fires before the statement runs, so it knows
neither the time nor the SQL. The attribute hook costs nothing on loaded attributes, one
ContextVar read per load outside a unit of work, and inside one it sees the load's statements
(the collector's counters before and after) and the user line that touched the attribute.

`DetachedInstanceError` and `MissingGreenlet` have no SQLAlchemy event. Both surface through
the same hook (raised by the lazy loader or the expired-attribute loader, or by the asyncio
adaptation underneath them), so it records a `LazyLoadAfterCloseFinding` and re-raises the
original exception unchanged - also when user code catches it afterwards.

Listeners only record; the detectors decide at the end of the unit of work.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any

from sqlalchemy.exc import MissingGreenlet, StatementError
from sqlalchemy.orm import attributes
from sqlalchemy.orm.exc import DetachedInstanceError

from querywatch import _callsite, _guard
from querywatch._collection import Collector, LazyGroup, Pending, current_unit
from querywatch._engines import instrumented_engines
from querywatch._guard import internal_error, maybe_fail
from querywatch.findings import LazyLoadAfterCloseFinding, finding_id
from querywatch.fingerprinting import dialect_key, shape_of

__all__ = ["ensure_installed", "installed", "release_if_unused", "uninstall"]

#: Distinct parent objects remembered per lazy-load group: enough to tell an N+1 (the
#: threshold is a handful) while a loop over a million objects holds a bounded set.
MAX_DISTINCT_PARENTS = 1024
#: Distinct lazy-load-after-close findings kept per unit of work (each with its count).
MAX_AFTER_CLOSE_FINDINGS = 256

_lock = threading.Lock()
#: (owner class, attribute name, original function) of the installed hook, or None.
_installed: tuple[Any, str, Callable[..., Any]] | None = None


def _attribute_impl_class() -> Any:
    """The base class of attribute implementations: `AttributeImpl` in SQLAlchemy 2.0,
    `_AttributeImpl` in 2.1 (None if neither exists)."""
    for name in ("AttributeImpl", "_AttributeImpl"):
        owner = getattr(attributes, name, None)
        if owner is not None and "_fire_loader_callables" in owner.__dict__:
            return owner
    return None


def ensure_installed(handle: Any = None) -> None:
    """Install the ORM hook once; later calls do nothing. With an `Instrumentation` handle,
    the hook is removed again when the last instrumented engine is uninstrumented."""
    global _installed
    with _lock:
        if _installed is None:
            owner = _attribute_impl_class()
            name = "_fire_loader_callables"
            original = owner.__dict__.get(name) if owner is not None else None
            if original is None or not callable(original):
                # A SQLAlchemy without this method: no ORM attribution, the statement-shape
                # backstop still finds N+1 loops.
                return
            setattr(owner, name, _make_hook(original))
            _installed = (owner, name, original)
    if handle is not None:
        handle.on_remove(release_if_unused)


def installed() -> bool:
    """True while the ORM hook is in place."""
    return _installed is not None


def uninstall() -> None:
    """Restore SQLAlchemy's original method. Idempotent."""
    global _installed
    with _lock:
        if _installed is None:
            return
        owner, name, original = _installed
        _installed = None
        current = owner.__dict__.get(name)
        if getattr(current, "_querywatch_hook", False):
            setattr(owner, name, original)


def release_if_unused() -> None:
    """Uninstall when no engine is instrumented any more."""
    if not instrumented_engines():
        uninstall()


def _make_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    def _fire_loader_callables(self: Any, state: Any, key: str, passive: Any) -> Any:
        collector = current_unit.get()
        if collector is None or not collector.active:
            return original(self, state, key, passive)
        # Decided before the load: loading clears the state's expired attributes.
        expired = key in state.expired_attributes
        # The unit's statements before and after the load tell whether it ran SQL. Read under
        # the unit's lock (what `Collector.statements` does, inlined): a fold in another
        # thread counts its batch before it leaves `pending`.
        lock = collector.lock
        with lock:
            statements = collector.counted + len(collector.pending)
        t0 = perf_counter()
        try:
            result = original(self, state, key, passive)
        except (DetachedInstanceError, MissingGreenlet) as exc:
            _record_after_close(collector, self, state, key, exc)
            raise
        except StatementError as exc:
            # SQLAlchemy 2.1 wraps a MissingGreenlet raised by some drivers (aiosqlite).
            if isinstance(exc.orig, MissingGreenlet):
                _record_after_close(collector, self, state, key, exc.orig)
            raise
        recorded: list[Pending] | None = None
        with lock:  # no fold meanwhile (other threads may still append)
            pending = collector.pending
            position = statements - collector.counted  # of the first statement of the load
            ran = len(pending) - position
            if ran and position >= 0:
                # The statements recorded during the load, by position: appended in order and
                # only taken out by a fold, so these are they even if other threads have
                # appended since (the last `ran` entries may be theirs).
                recorded = pending[position : position + ran]
        if ran:
            try:
                _record_load(collector, self, state, key, expired, recorded, t0)
            except Exception as exc:
                internal_error("orm", exc)
        return result

    _fire_loader_callables._querywatch_hook = True  # type: ignore[attr-defined]
    _fire_loader_callables.__wrapped__ = original  # type: ignore[attr-defined]
    return _fire_loader_callables


def _is_relationship(prop: Any) -> bool:
    return prop is not None and hasattr(prop, "direction") and hasattr(prop, "mapper")


def _model_name(state: Any) -> str:
    cls = getattr(state, "class_", None)
    return cls.__name__ if cls is not None else "?"


#: (attribute impl, class) -> (relationship property or None, subject, the lazy-load group's
#: name for a relationship): worked out once.
_described: dict[tuple[Any, Any], tuple[Any, str, str]] = {}
_MAX_DESCRIBED = 10_000


def _describe(impl: Any, state: Any, key: str) -> tuple[Any, str, str]:
    prop = getattr(impl, "parent_token", None)
    model = _model_name(state)
    if _is_relationship(prop):
        subject = f"{_owner_name(prop, model)}.{key}"
        described: tuple[Any, str, str] = (prop, subject, f"lazy_load:{subject}")
    else:
        described = (None, model, "")
    if len(_described) < _MAX_DESCRIBED:
        _described[(impl, state.class_)] = described
    return described


def _record_load(
    collector: Collector,
    impl: Any,
    state: Any,
    key: str,
    expired: bool,
    recorded: list[Pending] | None,
    t0: float,
) -> None:
    """One attribute load that ran SQL: credit it to its relationship (or model) and call site.
    `recorded`: the statements recorded in the unit while it ran, by this thread and any other
    writing the same unit; None when some were folded already."""
    if _guard.injected_faults:
        maybe_fail("orm")
    described = _described.get((impl, state.class_))
    if described is None:
        described = _describe(impl, state, key)
    prop, subject, name = described
    statement: str | None = None
    callsite: str | None = None
    dialect: Any = None
    if recorded is None:  # folded already: the wall time of the load
        seconds = perf_counter() - t0
    elif len(recorded) == 1:
        # The load's own SELECT, just recorded with its call site: the same user line that
        # touched the attribute, so no second stack walk.
        own = recorded[0]
        seconds = own[3]
        statement, callsite, dialect = own[0], own[5][0], own[4][1]
    else:  # the load's database time: its statements'
        seconds = sum([entry[3] for entry in recorded])
    if callsite is None:
        callsite = _callsite.capture(1)
    if prop is None:
        pattern = "expired_load" if expired else "deferred_load"
        name = f"{pattern}:{subject}"
    else:
        pattern = "lazy_load"
    group_key = (name, callsite)
    parent = id(state)
    for c in collector.chain:
        if c.finished is not None:  # ended (`closed`)
            continue
        with c.lock:  # one unit may be written by several threads
            group = c.lazy.get(group_key)
            if group is None:
                group = c.lazy[group_key] = LazyGroup(subject, pattern)
                group.suggestion = _suggestion(pattern, prop, state, subject, key)
            group.count += 1
            group.seconds += seconds
            parents = group.parents
            if len(parents) < MAX_DISTINCT_PARENTS:
                parents.add(parent)
            if prop is None:  # a relationship's loads are of its own attribute
                group.attributes.add(key)
            phases = group.phases
            phase = c.phase
            phases[phase] = phases.get(phase, 0) + 1
            if not group.fingerprint and statement is not None:
                # The shape the fold gives the same statement: read as its engine's dialect.
                group.fingerprint = shape_of(statement, dialect=dialect_key(dialect))[0]


def _owner_name(prop: Any, fallback: str) -> str:
    parent = getattr(prop, "parent", None)
    cls = getattr(parent, "class_", None)
    return cls.__name__ if cls is not None else fallback


def _loader_for(prop: Any) -> str:
    return "selectinload" if getattr(prop, "uselist", True) else "joinedload"


def _load_path(state: Any) -> list[Any]:
    """The relationships through which `state`'s object was loaded (outermost first)."""
    path = getattr(getattr(state, "load_path", None), "path", ())
    return [step for step in path if _is_relationship(step)]


def _option_chain(props: list[Any]) -> str:
    parts = [f"{_loader_for(p)}({_owner_name(p, '?')}.{p.key})" for p in props]
    return ".".join(parts)


def _suggestion(pattern: str, prop: Any, state: Any, subject: str, key: str) -> str:
    """The concrete fix, computed once per group (not per load)."""
    if pattern == "lazy_load":
        props = [*_load_path(state), prop]
        try:
            chain = _option_chain(props)
        except Exception:
            chain = f"{_loader_for(prop)}({subject})"
        root = _owner_name(props[0], subject.split(".")[0])
        return f"eager-load it: add .options({chain}) to the query that loads the {root} objects"
    if pattern == "expired_load":
        return (
            f"the {subject} objects were expired (by commit() or expire()) and are reloaded one "
            f"by one: create the session with expire_on_commit=False, or reload them in one "
            f"query after the commit (select({subject}).where(...in_(ids)) with "
            f"populate_existing)"
        )
    return (
        f"the deferred column is loaded once per object: add .options(undefer({subject}.{key})) "
        f"to the query that loads the {subject} objects"
    )


def _record_after_close(
    collector: Collector, impl: Any, state: Any, key: str, exc: BaseException
) -> None:
    try:
        if _guard.injected_faults:
            maybe_fail("orm")
        error = type(exc).__name__
        model = _model_name(state)
        prop = getattr(impl, "parent_token", None)
        if _is_relationship(prop):
            owner = _owner_name(prop, model)
            fix_load = f".options({_loader_for(prop)}({owner}.{key}))"
        else:
            owner = model
            fix_load = "expire_on_commit=False on the session"
        if isinstance(exc, MissingGreenlet):
            suggestion = (
                f"in async code, load it before use: {fix_load} on the query, or "
                f"`await obj.awaitable_attrs.{key}`, or run the code in `session.run_sync()`"
            )
        else:
            suggestion = (
                f"the object's session was closed before {owner}.{key} was loaded: load it while "
                f"the session is open ({fix_load}), or keep the session open until the "
                f"object is used"
            )
        callsite = _callsite.capture(1)
        fid = finding_id("lazy_load_after_close", f"{owner}.{key}", callsite)
        for c in collector.chain:
            if c.closed:
                continue
            with c.lock:  # one unit may be written by several threads
                # Merged as they happen (one entry per finding id, with a count): a loop that
                # catches the error a million times holds one finding, not a million.
                recorded = c.after_close
                for i, seen in enumerate(recorded):
                    if seen.id == fid:
                        recorded[i] = dataclasses.replace(seen, count=seen.count + 1)
                        break
                else:
                    if len(recorded) < MAX_AFTER_CLOSE_FINDINGS:
                        recorded.append(
                            LazyLoadAfterCloseFinding(
                                id=fid,
                                callsite=callsite,
                                model=owner,
                                attribute=key,
                                error=error,
                                suggestion=suggestion,
                                phase=c.phase,
                            )
                        )
    except Exception as internal:
        internal_error("orm", internal)
