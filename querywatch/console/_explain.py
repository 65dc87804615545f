"""EXPLAIN for the console (`Settings.console_explain`, development only).

While it is on, the last execution of each SELECT shape run inside a unit of work on the
console's engines is kept (statement text and bound parameters, as the driver received them;
at most `MAX_CAPTURED` shapes). On request, its plan is read with `EXPLAIN` (PostgreSQL,
MySQL/MariaDB) or `EXPLAIN QUERY PLAN` (SQLite) on a connection of the same engine, in a
read-only transaction that is rolled back. No other statement is ever explained.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from querywatch import _collection, _guard, fingerprinting

#: SELECT shapes whose last execution is kept for EXPLAIN.
MAX_CAPTURED = 512
#: Plan rows returned (a plan longer than this is cut).
MAX_PLAN_ROWS = 500
#: What a statement may start with (after comments and whitespace) to be explained.
_READ = re.compile(r"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*(?:select|with)\b", re.I | re.S)
_PREFIX = {"postgresql": "EXPLAIN ", "mysql": "EXPLAIN ", "mariadb": "EXPLAIN "}
_READ_ONLY = {
    "postgresql": "SET TRANSACTION READ ONLY",
    "mysql": "SET TRANSACTION READ ONLY",
    "mariadb": "SET TRANSACTION READ ONLY",
}
SUPPORTED = ("postgresql", "mysql", "mariadb", "sqlite")


class ExplainError(Exception):
    """The statement cannot be explained (message for the console's user)."""


@dataclass(frozen=True)
class Plan:
    """An EXPLAIN result: column names and rows, as text."""

    dialect: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


class Captured:
    """The last execution of each SELECT shape on the given engines (bounded)."""

    def __init__(self, engines: Iterable[Any]) -> None:
        #: id(sync engine) -> the engine as given (an AsyncEngine is run asynchronously)
        self._engines: dict[int, tuple[Engine, Any]] = {}
        for engine in engines:
            sync = getattr(engine, "sync_engine", engine)
            if isinstance(sync, Engine) and sync.dialect.name in SUPPORTED:
                self._engines[id(sync)] = (sync, engine)
        self._statements: OrderedDict[str, tuple[int, str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        for sync, _ in self._engines.values():
            event.listen(sync, "before_cursor_execute", self._capture)

    def close(self) -> None:
        for sync, _ in self._engines.values():
            if event.contains(sync, "before_cursor_execute", self._capture):
                event.remove(sync, "before_cursor_execute", self._capture)
        self._engines.clear()
        with self._lock:
            self._statements.clear()

    def _capture(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        try:
            if executemany or _collection.current_collector() is None:
                return
            if not _READ.match(statement):
                return
            key = fingerprinting.dialect_key(conn.dialect)
            shape, operation = fingerprinting.fingerprint_and_operation(statement, dialect=key)
            if operation != "SELECT":
                return
            with self._lock:
                self._statements[shape] = (id(conn.engine), statement, parameters)
                self._statements.move_to_end(shape)
                while len(self._statements) > MAX_CAPTURED:
                    self._statements.popitem(last=False)
        except Exception as exc:
            _guard.internal_error("console", exc)

    def has(self, fingerprint: str) -> bool:
        """A statement of this shape was captured (and can be explained)."""
        return fingerprint in self._statements

    async def explain(self, fingerprint: str) -> Plan:
        """The plan of the captured statement of this shape; `ExplainError` when there is none."""
        with self._lock:
            captured = self._statements.get(fingerprint)
        if captured is None:
            raise ExplainError("no captured execution of this statement (or it is not a SELECT)")
        engine_id, statement, parameters = captured
        pair = self._engines.get(engine_id)
        if pair is None:
            raise ExplainError("its engine is not the console's any more")
        sync, engine = pair
        dialect = sync.dialect.name
        if engine is sync:
            import anyio.to_thread  # deferred: anyio only with EXPLAIN on

            return await anyio.to_thread.run_sync(
                _explain_sync, sync, dialect, statement, parameters
            )
        return await _explain_async(engine, dialect, statement, parameters)


def _explain_statement(dialect: str, statement: str) -> str:
    if not _READ.match(statement):  # pragma: no cover - captured statements passed it already
        raise ExplainError("only SELECT statements are explained")
    return _PREFIX.get(dialect, "EXPLAIN QUERY PLAN ") + statement


def _explain_sync(engine: Engine, dialect: str, statement: str, parameters: Any) -> Plan:
    explain = _explain_statement(dialect, statement)
    with engine.connect() as conn:
        sqlite = dialect == "sqlite"
        try:
            conn.exec_driver_sql("PRAGMA query_only = ON" if sqlite else _READ_ONLY[dialect])
            result = conn.exec_driver_sql(explain, parameters)
            return _plan(dialect, tuple(result.keys()), result.fetchmany(MAX_PLAN_ROWS))
        finally:
            conn.rollback()
            if sqlite:
                conn.exec_driver_sql("PRAGMA query_only = OFF")
                conn.rollback()


async def _explain_async(engine: Any, dialect: str, statement: str, parameters: Any) -> Plan:
    explain = _explain_statement(dialect, statement)
    async with engine.connect() as conn:
        sqlite = dialect == "sqlite"
        try:
            await conn.exec_driver_sql("PRAGMA query_only = ON" if sqlite else _READ_ONLY[dialect])
            result = await conn.exec_driver_sql(explain, parameters)
            return _plan(dialect, tuple(result.keys()), result.fetchmany(MAX_PLAN_ROWS))
        finally:
            await conn.rollback()
            if sqlite:
                await conn.exec_driver_sql("PRAGMA query_only = OFF")
                await conn.rollback()


def _plan(dialect: str, columns: tuple[str, ...], rows: Any) -> Plan:
    return Plan(
        dialect=dialect,
        columns=tuple(str(c) for c in columns),
        rows=tuple(tuple("" if v is None else str(v) for v in row) for row in rows),
    )
