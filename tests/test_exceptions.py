"""The `warn` and `raise` modes: warnings issued at the finding's line in the user's code (and
filtered by the user's module), `FindingsDetected` raised under its own name, and the names
exported at top level."""

from __future__ import annotations

import sys
import warnings

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import querywatch
from querywatch import FindingsDetected, QueryWatchWarning, Settings
from querywatch.exceptions import warn_finding
from querywatch.findings import StaleAllowlistFinding
from querywatch.middleware import QueryWatchMiddleware
from tests.web_apps import asgi_client, warm

_DUPLICATE = sa.text("SELECT 1 WHERE 1 = :i")


def _this_line() -> int:
    return sys._getframe(1).f_lineno


def test_warn_mode_warns_at_the_findings_line(sqlite_engine: sa.Engine) -> None:
    """The warning's file and line are those of the user's statement, not querywatch's."""
    with (  # noqa: PT031
        pytest.warns(QueryWatchWarning, match="duplicate query") as record,
        querywatch.watch("dup", mode="warn"),
        sqlite_engine.connect() as conn,
    ):
        line = _this_line() + 2
        for _ in range(2):
            conn.execute(_DUPLICATE, {"i": 1})
    (warning,) = record
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_warn_mode_obeys_a_filter_on_the_users_module(sqlite_engine: sa.Engine) -> None:
    """A warning filter naming the module of the finding's line silences the warning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=QueryWatchWarning, module=__name__)
        with querywatch.watch("dup", mode="warn"), sqlite_engine.connect() as conn:
            for _ in range(2):
                conn.execute(_DUPLICATE, {"i": 1})
    assert record == []


def test_warning_without_a_call_site_points_at_the_calling_user_line() -> None:
    """A finding whose call site is unknown is issued at the first user frame on the stack."""
    finding = StaleAllowlistFinding(id="0", callsite=None, entry="Book.tags", suggestion="drop it")
    line = _this_line() + 2
    with pytest.warns(QueryWatchWarning, match="stale allowlist entry") as record:
        warn_finding(finding)
    (warning,) = record
    assert (warning.filename, warning.lineno) == (__file__, line)


async def test_warn_mode_in_a_request_points_at_the_endpoint_line(
    sqlite_web_engine: sa.Engine,
) -> None:
    """In a FastAPI request, the warning names the endpoint's line, not FastAPI's code."""
    warm(sqlite_web_engine)
    app = FastAPI()
    lines: list[int] = []

    @app.get("/dup")
    def dup() -> dict[str, int]:
        with sqlite_web_engine.connect() as conn:
            lines.append(_this_line() + 2)
            for _ in range(2):
                conn.execute(_DUPLICATE, {"i": 1})
        return {}

    app.add_middleware(
        QueryWatchMiddleware, settings=Settings(mode="warn"), registry=CollectorRegistry()
    )
    with pytest.warns(QueryWatchWarning, match="duplicate query") as record:
        async with asgi_client(app) as c:
            assert (await c.get("/dup")).status_code == 200
    (warning,) = record
    assert (warning.filename, warning.lineno) == (__file__, lines[0])


def test_raise_mode_raises_findings_detected_for_a_duplicate(sqlite_engine: sa.Engine) -> None:
    """A duplicate query raises `FindingsDetected` by that name, with a message naming it."""
    with (  # noqa: PT012
        pytest.raises(FindingsDetected) as raised,
        querywatch.watch("lookup", mode="raise"),
        sqlite_engine.connect() as conn,
    ):
        for _ in range(2):
            conn.execute(_DUPLICATE, {"i": 1})
    assert type(raised.value).__name__ == "FindingsDetected"
    header, line = str(raised.value).splitlines()
    assert header == "querywatch found 1 problem(s) in 'lookup':"
    assert line.startswith("  - duplicate query: ")
    assert [f.kind for f in raised.value.findings] == ["duplicate_query"]


def test_except_nplusonedetected_still_catches_every_finding(sqlite_engine: sa.Engine) -> None:
    """Code written as `except NPlusOneDetected:` keeps catching what `raise` mode raises."""
    caught: list[FindingsDetected] = []
    try:
        with querywatch.watch("lookup", mode="raise"), sqlite_engine.connect() as conn:
            for _ in range(2):
                conn.execute(_DUPLICATE, {"i": 1})
    except querywatch.NPlusOneDetected as exc:
        caught.append(exc)
    assert [f.kind for f in caught[0].findings] == ["duplicate_query"]


def test_top_level_names_are_the_ones_issued_and_raised() -> None:
    """`querywatch.QueryWatchWarning` and `querywatch.FindingsDetected` are importable, listed
    in `__all__`, and are the classes `warn` and `raise` modes use."""
    from querywatch import _collection, exceptions

    assert {"QueryWatchWarning", "FindingsDetected"} <= set(querywatch.__all__)
    assert querywatch.QueryWatchWarning is exceptions.QueryWatchWarning
    assert _collection.QueryWatchWarning is querywatch.QueryWatchWarning
    assert issubclass(querywatch.FindingsDetected, querywatch.QueryWatchError)
