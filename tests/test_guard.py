"""The internal-error guard: querywatch's own failures never reach the host application."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

import querywatch
from querywatch import _guard


@pytest.fixture
def production_guard() -> None:
    """The guard as it runs in production: swallow, log, count."""
    _guard.raise_internal_errors = False
    _guard._last_logged.clear()


def _broken_record(*args: object, **kwargs: object) -> None:
    raise ZeroDivisionError("querywatch bug")


@pytest.mark.usefixtures("production_guard")
def test_a_failing_hook_does_not_reach_the_application(
    sqlite_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the statement hook leaves the query's result intact."""
    monkeypatch.setattr(_guard, "injected_faults", frozenset({"engine"}))
    with sqlite_engine.connect() as conn, querywatch.watch("bug"):
        assert conn.exec_driver_sql("SELECT 41 + 1").scalar() == 42


@pytest.mark.usefixtures("production_guard")
def test_internal_errors_are_counted_per_component(
    sqlite_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every swallowed error is counted under its component."""
    monkeypatch.setattr(_guard, "injected_faults", frozenset({"engine"}))
    before = _guard.internal_error_counts().get("engine", 0)
    with sqlite_engine.connect() as conn, querywatch.watch("bug"):
        for _ in range(3):
            conn.exec_driver_sql("SELECT 1")
    assert _guard.internal_error_counts()["engine"] - before == 3


@pytest.mark.usefixtures("production_guard")
def test_internal_errors_are_logged_once_per_interval(
    sqlite_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook failing on every statement logs once, not once per statement."""
    monkeypatch.setattr(_guard, "injected_faults", frozenset({"engine"}))
    with (
        caplog.at_level(logging.ERROR, logger="querywatch"),
        sqlite_engine.connect() as conn,
        querywatch.watch("bug"),
    ):
        for _ in range(50):
            conn.exec_driver_sql("SELECT 1")
    records = [r for r in caplog.records if r.name == "querywatch"]
    assert len(records) == 1
    assert "internal error in engine" in records[0].getMessage()


@pytest.mark.usefixtures("production_guard")
def test_subscribers_hear_of_each_error() -> None:
    """Subscribers (the Prometheus counter) are called with the component."""
    heard: list[str] = []
    unsubscribe = _guard.subscribe(heard.append)
    try:
        with _guard.guard("reporter"):
            raise ValueError("x")
    finally:
        unsubscribe()
    assert heard == ["reporter"]


def test_test_mode_reraises_our_own_bugs() -> None:
    """In querywatch's own test suite, an internal error is re-raised, never hidden."""
    with pytest.raises(ValueError, match="ours"), _guard.guard("detection"):
        raise ValueError("ours")


@pytest.mark.usefixtures("production_guard")
def test_a_failing_user_statement_keeps_its_own_exception(
    sqlite_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When both the database and querywatch fail, the user sees the database's error."""
    monkeypatch.setattr(_guard, "injected_faults", frozenset({"engine"}))
    with (
        sqlite_engine.connect() as conn,
        querywatch.watch("both"),
        pytest.raises(sa.exc.OperationalError, match="no such table"),
    ):
        conn.exec_driver_sql("SELECT * FROM nowhere")


def test_injected_fault_fires_only_in_its_component() -> None:
    """maybe_fail raises in the named component and nowhere else."""
    _guard.injected_faults = frozenset({"pool"})
    _guard.maybe_fail("engine")
    with pytest.raises(_guard.InjectedFault):
        _guard.maybe_fail("pool")


def test_one_guard_per_component() -> None:
    """`guarding()` hands out one cached, stateless instance per component name."""
    assert _guard.guarding("structlog") is _guard.guarding("structlog")
    assert _guard.guarding("structlog") is not _guard.guarding("metrics")
    assert not hasattr(_guard.guarding("structlog"), "__dict__")


@pytest.mark.usefixtures("production_guard")
def test_guard_swallows_and_counts_an_error() -> None:
    """In production the block's exception is counted under the component and swallowed."""
    before = _guard.internal_error_counts().get("otel", 0)
    with _guard.guarding("otel"):
        raise KeyError("querywatch bug")
    assert _guard.internal_error_counts()["otel"] - before == 1


@pytest.mark.usefixtures("production_guard")
def test_guard_lets_cancellation_through() -> None:
    """A `BaseException` that is not an `Exception` (cancellation, Ctrl-C) is never swallowed."""
    with pytest.raises(KeyboardInterrupt), _guard.guarding("otel"):
        raise KeyboardInterrupt


@pytest.mark.usefixtures("production_guard")
def test_guard_nests_in_itself() -> None:
    """The same instance guards nested blocks: the inner error stays inside the inner block."""
    guard = _guard.guarding("reporter")
    reached = []
    with guard:
        with guard:
            raise ValueError("inner")
        reached.append("after the inner block")
    assert reached == ["after the inner block"]
